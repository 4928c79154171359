"""Batch and observation keys shared by the connectors, modules and learners (one place, so a
renamed key fails loudly)."""

from cachellm_rl.envs.text_env import OBS_ACTION_MASK, OBS_ACTION_TOKENS, OBS_STATE_TOKENS

# Written into the observation by the prior connector (so the replay buffer keeps them for both
# the current and the next state of a transition): the prior's log-probabilities over the
# candidate slots, and the env runner's cache hit-rate EMA (read by the ``hit_rate``
# temperature schedule only).
OBS_PRIOR_LOGP = "prior_logp"
OBS_HIT_RATE = "cache_hit_rate"

__all__ = [
    "OBS_ACTION_MASK",
    "OBS_ACTION_TOKENS",
    "OBS_HIT_RATE",
    "OBS_PRIOR_LOGP",
    "OBS_STATE_TOKENS",
]
