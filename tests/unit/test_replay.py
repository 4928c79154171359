"""n-step windows of the prioritized replay buffer are cut at the episode's end."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
from ray.rllib.env.single_agent_episode import SingleAgentEpisode
from ray.rllib.utils.replay_buffers.prioritized_episode_buffer import (
    PrioritizedEpisodeReplayBuffer,
)

from cachellm_rl.algorithms.ps_dqn.replay import (
    ClampedNStepPrioritizedEpisodeReplayBuffer,
    clamped_window,
    discounted_sum,
)

GAMMA = 0.9


def _episode(length: int, *, terminated: bool, reward_at_end: float = 1.0) -> SingleAgentEpisode:
    obs_space = gym.spaces.Box(-1e6, 1e6, (1,), np.float32)
    rewards = [0.0] * (length - 1) + [reward_at_end]
    return SingleAgentEpisode(
        observations=[np.array([float(i)], np.float32) for i in range(length + 1)],
        actions=list(range(length)),
        rewards=rewards,
        terminated=terminated,
        observation_space=obs_space,
        action_space=gym.spaces.Discrete(100),
        len_lookback_buffer=0,
    )


def _sample_all(buffer, n_step: int, draws: int = 40):
    seen = {}
    for _ in range(draws):
        for item in buffer.sample(16, n_step=n_step, gamma=GAMMA, beta=0.4):
            seen[item.t_started] = item
    return seen


def test_window_helpers():
    assert clamped_window(3, 10, 0) == 3
    assert clamped_window(3, 10, 8) == 2
    assert clamped_window(3, 10, 9) == 1
    with pytest.raises(ValueError, match="outside"):
        clamped_window(3, 10, 10)
    with pytest.raises(ValueError, match="n_step"):
        clamped_window(0, 10, 0)
    assert discounted_sum(np.array([1.0, 0.0, 2.0]), 0.5) == pytest.approx(1.5)


def test_clamp_samples_tail_transitions_with_short_windows():
    buffer = ClampedNStepPrioritizedEpisodeReplayBuffer(
        capacity=1000, alpha=0.6, n_step_tail="clamp"
    )
    buffer.add(_episode(6, terminated=True, reward_at_end=1.0))
    seen = _sample_all(buffer, n_step=3)
    # Every transition, the last two included, is drawn.
    assert sorted(seen) == list(range(6))
    for t, item in seen.items():
        k = min(3, 6 - t)
        assert item.get_extra_model_outputs("n_step", 0) == k
        # Next observation k steps later; the reward inside the window is discounted.
        assert float(item.get_observations(1)[0]) == t + k
        expected = GAMMA ** (5 - t) if t + k == 6 else 0.0
        assert float(item.get_rewards(0)) == pytest.approx(expected)
        assert item.is_terminated == (t + k == 6)


def test_clamp_bootstraps_an_unfinished_chunk_from_its_last_observation():
    buffer = ClampedNStepPrioritizedEpisodeReplayBuffer(
        capacity=1000, alpha=0.6, n_step_tail="clamp"
    )
    buffer.add(_episode(4, terminated=False, reward_at_end=0.0))
    seen = _sample_all(buffer, n_step=3)
    last = seen[3]
    assert last.get_extra_model_outputs("n_step", 0) == 1
    assert not last.is_terminated and not last.is_truncated


def test_skip_never_trains_the_tail_and_never_stalls():
    """Like RLlib's buffer, tail windows are not returned; unlike it, a finished episode's
    tail transitions are zeroed once drawn, so full batches keep coming."""
    buffer = ClampedNStepPrioritizedEpisodeReplayBuffer(capacity=1000, alpha=0.6)
    assert buffer.n_step_tail == "skip"
    buffer.add(_episode(6, terminated=True))
    for _ in range(20):
        batch = buffer.sample(16, n_step=3, gamma=GAMMA, beta=0.4)
        assert len(batch) == 16 and len(buffer._last_sampled_indices) == 16
        assert {item.get_extra_model_outputs("n_step", 0) for item in batch} == {3}
        buffer.update_priorities(np.full(len(batch), 1e-6))  # small TD errors: tails dominate
    seen = _sample_all(buffer, n_step=3)
    assert sorted(seen) == [0, 1, 2, 3]
    assert buffer.tail_transitions_zeroed == 2  # t = 4 and 5, each zeroed once
    assert float(seen[3].get_rewards(0)) == pytest.approx(GAMMA**2)  # the reward still arrives
    assert seen[3].is_terminated


def test_skip_bootstraps_an_unfinished_chunks_tail_without_zeroing_it():
    buffer = ClampedNStepPrioritizedEpisodeReplayBuffer(capacity=1000, alpha=0.6)
    buffer.add(_episode(5, terminated=False, reward_at_end=0.0))
    seen = _sample_all(buffer, n_step=3)
    assert sorted(seen) == list(range(5)) and buffer.tail_transitions_zeroed == 0
    assert seen[4].get_extra_model_outputs("n_step", 0) == 1 and not seen[4].is_terminated
    with pytest.raises(ValueError, match="n_step_tail"):
        ClampedNStepPrioritizedEpisodeReplayBuffer(capacity=10, n_step_tail="drop")


def test_rllib_buffer_never_samples_the_tail():
    """The behaviour the subclass fixes: the parent redraws t + n > len forever."""
    buffer = PrioritizedEpisodeReplayBuffer(capacity=1000, alpha=0.6)
    buffer.add(_episode(6, terminated=True))
    seen = _sample_all(buffer, n_step=3)
    assert sorted(seen) == [0, 1, 2, 3]


def test_one_step_is_the_parents_sample():
    buffer = ClampedNStepPrioritizedEpisodeReplayBuffer(capacity=1000, alpha=0.6)
    buffer.add(_episode(5, terminated=True))
    seen = _sample_all(buffer, n_step=1)
    assert sorted(seen) == list(range(5))
    assert float(seen[4].get_rewards(0)) == 1.0 and seen[4].is_terminated


def test_priorities_update_for_the_sampled_windows():
    buffer = ClampedNStepPrioritizedEpisodeReplayBuffer(capacity=1000, alpha=0.6)
    buffer.add(_episode(6, terminated=True))
    batch = buffer.sample(8, n_step=3, gamma=GAMMA, beta=0.4)
    buffer.update_priorities(np.full(len(batch), 1e-6))
    assert buffer._last_sampled_indices == []
