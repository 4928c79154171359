"""CQL-Prior: discrete offline RL with an LM prior (see docs/offline.md)."""
