"""Batch and observation keys shared by the connectors, modules and learners (one place, so a
renamed key fails loudly)."""

from cachellm_rl.envs.text_env import OBS_ACTION_MASK, OBS_ACTION_TOKENS, OBS_STATE_TOKENS

# Written into the observation by the prior connector (so the replay buffer keeps them for both
# the current and the next state of a transition).
OBS_PRIOR_LOGP = "prior_logp"
OBS_TEMPERATURE = "posterior_temperature"

# Extra module outputs.
POSTERIOR_LOGITS = "posterior_logits"

__all__ = [
    "OBS_ACTION_MASK",
    "OBS_ACTION_TOKENS",
    "OBS_PRIOR_LOGP",
    "OBS_STATE_TOKENS",
    "OBS_TEMPERATURE",
    "POSTERIOR_LOGITS",
]
