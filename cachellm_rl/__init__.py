"""cachellm_rl: RL guided by language-model priors, with a shared semantic cache of priors.

The package is layered (see docs/architecture.md): ``prior``, ``cache`` and ``envs`` never import
RLlib; only ``algorithms`` does. Wire contracts shared by the layers live in
:mod:`cachellm_rl.contracts`.
"""

__version__ = "0.1.0"
