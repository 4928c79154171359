"""Text and control environments (gymnasium); they never import RLlib."""
