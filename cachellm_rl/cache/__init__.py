"""The adaptive semantic cache of priors and its shared actor (no RLlib here)."""
