"""Reading offline datasets with RLlib's offline pipeline (see docs/offline.md).

Arrow stores a Dict observation as a struct of list columns. Read back as numpy, a 2-D field
(``action_tokens``: candidates x tokens) arrives as an object array of 1-D arrays, which
RLlib's :class:`~ray.rllib.offline.offline_prelearner.OfflinePreLearner` would pass on as an
object array instead of an integer tensor. :class:`TextOfflinePreLearner` restores every field
to the dtype and shape of the observation space first, then runs RLlib's pre-learner.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
from ray.rllib.offline.offline_prelearner import OfflinePreLearner

from cachellm_rl.offline.datasets import COL_NEW_OBS, COL_OBS


def decode_observation(obs: dict, space: gym.spaces.Dict) -> dict:
    """One stored Dict observation as arrays of the space's dtype and shape.

    Args:
        obs: The observation as read from parquet (nested lists or object arrays).
        space: The env's observation space.

    Returns:
        The observation, each field an array of ``space[key].shape``.

    Raises:
        ValueError: A field is missing or has another shape than the space's.
    """
    out = {}
    for key, sub in space.spaces.items():
        if key not in obs:
            raise ValueError(f"stored observation has no {key!r} field (has {sorted(obs)})")
        value = obs[key]
        if isinstance(value, np.ndarray) and value.dtype == object:
            value = np.stack([np.asarray(v) for v in value]) if len(value) else value
        arr = np.asarray(value, dtype=sub.dtype)
        if arr.shape != sub.shape:
            raise ValueError(
                f"stored observation field {key!r} has shape {arr.shape}, the space {sub.shape}"
            )
        out[key] = arr
    return out


def decode_observation_column(column: Any, space: gym.spaces.Dict) -> np.ndarray:
    """A batch's observation column (one stored observation per row) decoded row by row."""
    rows = np.empty(len(column), dtype=object)
    for i, obs in enumerate(column):
        rows[i] = decode_observation(obs, space)
    return rows


def single_space(space: gym.spaces.Dict) -> gym.spaces.Dict:
    """The one-env space of a Dict space that may carry a vector env's leading axis of 1
    (RLlib's offline loop hands the pre-learner its env runner's vectorised spaces)."""
    boxes = {k: s for k, s in space.spaces.items() if isinstance(s, gym.spaces.Box)}
    if len(boxes) == len(space.spaces) and all(b.shape[:1] == (1,) for b in boxes.values()):
        return gym.spaces.Dict(
            {
                k: gym.spaces.Box(b.low[0], b.high[0], b.shape[1:], b.dtype)  # type: ignore[arg-type]
                for k, b in boxes.items()
            }
        )
    return space


class TextOfflinePreLearner(OfflinePreLearner):
    """RLlib's offline pre-learner with the stored Dict observations decoded first."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        space = self.observation_space
        if isinstance(space, gym.spaces.Dict):
            space = single_space(space)
            batch = dict(batch)
            for col in (COL_OBS, COL_NEW_OBS):
                if col in batch:
                    batch[col] = decode_observation_column(batch[col], space)
        return super().__call__(batch)
