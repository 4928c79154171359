"""Language-model priors: prompts, candidate scoring, the Serve deployment (no RLlib here)."""
