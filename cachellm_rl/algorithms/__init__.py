"""RLlib algorithms (new API stack). The only package that imports RLlib."""
