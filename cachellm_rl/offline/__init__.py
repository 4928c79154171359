"""Offline RL from generated datasets (see docs/offline.md)."""
