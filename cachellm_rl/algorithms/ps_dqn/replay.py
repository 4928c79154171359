"""Prioritized episode replay whose n-step returns are cut at the end of the stored data.

RLlib's ``PrioritizedEpisodeReplayBuffer.sample`` redraws any transition whose ``t + n``
runs past its episode's end. Those last ``n - 1`` transitions of every finished episode are
then never sampled, so (a) the decisions closest to the reward never get a TD update of
their own, and (b) they keep the maximum priority forever: once the sampled transitions' TD
errors shrink (sparse rewards), nearly every draw lands on them and sampling crawls (tens of
minutes per iteration on BabyAI with ``n_step = 3``).

``ClampedNStepPrioritizedEpisodeReplayBuffer`` draws one-step transitions with the
parent's prioritized sampler (which never redraws for ``n = 1``) and extends each to
``k = min(n, len - t)`` steps itself: the discounted sum of the ``k`` rewards, the
observation ``k`` steps later, the episode's terminal flags when the window reaches its
end, and ``n_step = k`` so the learner discounts the bootstrap by ``gamma ** k``. A window
cut at the end of an unfinished chunk bootstraps from the chunk's last observation, a valid
``k``-step target.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from ray.rllib.env.single_agent_episode import SingleAgentEpisode
from ray.rllib.utils.replay_buffers.prioritized_episode_buffer import (
    PrioritizedEpisodeReplayBuffer,
)

N_STEP_KEY = "n_step"
WEIGHTS_KEY = "weights"


def discounted_sum(rewards: np.ndarray, gamma: float) -> float:
    """``sum_i gamma**i * rewards[i]``.

    Args:
        rewards: Rewards of consecutive steps, earliest first.
        gamma: Discount factor.

    Returns:
        The discounted return of the window.
    """
    rewards = np.asarray(rewards, dtype=np.float64)
    return float(np.sum(rewards * gamma ** np.arange(len(rewards))))


def clamped_window(n_step: int, episode_len: int, t: int) -> int:
    """Steps of the return window that starts at ``t``: ``min(n_step, episode_len - t)``.

    Args:
        n_step: Requested steps.
        episode_len: Number of transitions stored for the episode.
        t: Start of the window, ``0 <= t < episode_len``.

    Returns:
        The window length, at least 1.

    Raises:
        ValueError: If ``t`` is not a stored transition or ``n_step < 1``.
    """
    if n_step < 1:
        raise ValueError(f"n_step must be >= 1, got {n_step}")
    if not 0 <= t < episode_len:
        raise ValueError(f"t={t} is outside an episode of {episode_len} transitions")
    return min(n_step, episode_len - t)


class ClampedNStepPrioritizedEpisodeReplayBuffer(PrioritizedEpisodeReplayBuffer):
    """Prioritized replay with n-step windows cut at the end of the stored episode."""

    def sample(  # type: ignore[override]
        self,
        num_items: int | None = None,
        *,
        n_step: int | tuple[int, int] | None = None,
        gamma: float = 0.99,
        include_infos: bool = False,
        include_extra_model_outputs: bool = False,
        to_numpy: bool = False,
        **kwargs: Any,
    ) -> list[SingleAgentEpisode]:
        """Prioritized sample of n-step transitions; see the module docstring.

        Args:
            num_items: Batch size (or ``batch_size_B`` in ``kwargs``).
            n_step: Steps of the return, or a ``[low, high)`` range drawn per item.
            gamma: Discount of the rewards inside the window.
            include_infos: Also return the infos at ``t`` and ``t + k``.
            include_extra_model_outputs: Also return the extra model outputs at ``t``.
            to_numpy: Convert the returned episodes to numpy.
            **kwargs: Passed to the parent's ``sample`` (``beta``, ``batch_size_B``, ...).

        Returns:
            One two-observation episode per sampled transition.
        """
        if n_step is None or n_step == 1:
            return super().sample(  # type: ignore[return-value]
                num_items,
                n_step=1,
                gamma=gamma,
                include_infos=include_infos,
                include_extra_model_outputs=include_extra_model_outputs,
                to_numpy=to_numpy,
                **kwargs,
            )
        one_step: list[SingleAgentEpisode] = super().sample(  # type: ignore[assignment]
            num_items, n_step=1, gamma=gamma, to_numpy=False, **kwargs
        )
        out = []
        for tree_idx, item in zip(self._last_sampled_indices, one_step, strict=True):
            episode_idx, t, _ = self._indices[self._tree_idx_to_sample_idx[tree_idx]]
            episode = self.episodes[episode_idx - self._num_episodes_evicted]
            wanted = (
                int(self.rng.integers(n_step[0], n_step[1]))
                if isinstance(n_step, tuple)
                else int(n_step)
            )
            k = clamped_window(wanted, len(episode), t)
            ends = t + k == len(episode)
            extra = {
                WEIGHTS_KEY: [item.get_extra_model_outputs(WEIGHTS_KEY, 0)],
                N_STEP_KEY: [k],
            }
            if include_extra_model_outputs:
                for key in episode.extra_model_outputs:
                    extra[key] = [episode.get_extra_model_outputs(key, t)]
            window = SingleAgentEpisode(
                observations=[episode.get_observations(t), episode.get_observations(t + k)],
                observation_space=episode.observation_space,
                infos=([episode.get_infos(t), episode.get_infos(t + k)] if include_infos else None),
                actions=[episode.get_actions(t)],
                action_space=episode.action_space,
                rewards=[discounted_sum(episode.get_rewards(slice(t, t + k)), gamma)],
                terminated=bool(ends and episode.is_terminated),
                truncated=bool(ends and episode.is_truncated),
                extra_model_outputs=extra,
                len_lookback_buffer=0,
                t_started=t,
            )
            if to_numpy:
                window.to_numpy()
            out.append(window)
        return out
