"""``PSDQNConfig`` / ``PSDQN``: RLlib's DQN training loop with the posterior-sampling module,
learner and prior connector."""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

import numpy as np
from ray.rllib.algorithms.dqn.dqn import DQN, DQNConfig, calculate_rr_weights
from ray.rllib.core.rl_module.rl_module import RLModuleSpec
from ray.rllib.utils.metrics import (
    ALL_MODULES,
    ENV_RUNNER_RESULTS,
    LEARNER_RESULTS,
    NUM_AGENT_STEPS_SAMPLED_LIFETIME,
    NUM_ENV_STEPS_SAMPLED_LIFETIME,
    REPLAY_BUFFER_RESULTS,
    TD_ERROR_KEY,
)
from ray.rllib.utils.numpy import convert_to_numpy
from ray.rllib.utils.replay_buffers.utils import update_priorities_in_episode_replay_buffer

from cachellm_rl.algorithms.ps_dqn.connectors import PriorConnectorConfig, PriorObservationConnector


class PSDQNConfig(DQNConfig):
    """DQN config plus ``soft_q_prior``, ``conservative_alpha``, ``overlap_sampling`` and the
    prior connector.

    Example:
        >>> cfg = PSDQNConfig().training(soft_q_prior=True)
        >>> cfg.soft_q_prior
        True
    """

    def __init__(self, algo_class=None) -> None:
        super().__init__(algo_class=algo_class or PSDQN)
        self.soft_q_prior = False
        self.conservative_alpha = 0.0
        self.overlap_sampling = False
        self.prior_connector = PriorConnectorConfig()

    def training(
        self,
        *,
        soft_q_prior: bool | None = None,
        conservative_alpha: float | None = None,
        overlap_sampling: bool | None = None,
        **kwargs,
    ) -> PSDQNConfig:
        """DQN's ``training(...)`` plus ``soft_q_prior`` (the KL-regularised target of
        docs/algorithms.md), ``conservative_alpha`` (weight of the CQL(H) term that keeps
        untried candidates' Q from rising above the tried ones'; 0: none) and
        ``overlap_sampling`` (the learner updates while the env runners sample the next
        fragment, which they act on with weights one iteration old; see :class:`PSDQN`)."""
        super().training(**kwargs)
        if overlap_sampling is not None:
            self.overlap_sampling = bool(overlap_sampling)
        if soft_q_prior is not None:
            self.soft_q_prior = bool(soft_q_prior)
        if conservative_alpha is not None:
            self.conservative_alpha = float(conservative_alpha)
        return self

    def prior(self, connector: PriorConnectorConfig) -> PSDQNConfig:
        """Where priors come from (the shared cache actor, or uniform for ``no_prior``)."""
        self.prior_connector = connector

        def make_connector(env, spaces=None, device=None) -> PriorObservationConnector:
            return PriorObservationConnector(config=connector)

        self.env_runners(env_to_module_connector=make_connector)
        return self

    def get_default_learner_class(self):
        from cachellm_rl.algorithms.ps_dqn.learner import PSDQNTorchLearner

        return PSDQNTorchLearner

    def get_default_rl_module_spec(self) -> RLModuleSpec:
        from cachellm_rl.algorithms.ps_dqn.rl_module import PSDQNTorchRLModule

        return RLModuleSpec(module_class=PSDQNTorchRLModule)

    def validate(self) -> None:
        super().validate()
        if self.num_atoms != 1 or self.dueling:
            raise ValueError("PSDQN supports num_atoms=1 and dueling=False only")
        if not 0 <= self.conservative_alpha < math.inf:
            raise ValueError(
                f"conservative_alpha must be finite and >= 0, got {self.conservative_alpha}"
            )
        if self.soft_q_prior and self.prior_connector.mode != "cache":
            raise ValueError(
                "soft_q_prior needs priors: set .prior(PriorConnectorConfig(mode='cache'))"
            )


SAMPLE_TAG = "ps_dqn_sample"


class PSDQN(DQN):
    """RLlib DQN driven by :class:`PSDQNConfig`.

    With ``overlap_sampling`` (and remote env runners) one iteration is: wait for the sample
    launched by the previous iteration, send the runners the latest weights, launch the next
    sample, store the one that arrived, then run the learner updates *while the runners
    sample*. RLlib's own loop samples, then updates while the runners sit idle. Replay ratio,
    batch size and the updates per sampled step are the same; the runners act with weights one
    iteration older. No sample is ever dropped: saving a checkpoint first stores the one in
    flight (a dropped fragment would leave a gap in its episodes) and syncs the weights.
    """

    _pending_sample: bool = False
    _weights_stale: bool = False

    @classmethod
    def get_default_config(cls) -> PSDQNConfig:
        return PSDQNConfig()

    def _overlapping(self) -> bool:
        return bool(getattr(self.config, "overlap_sampling", False)) and (
            self.env_runner_group is not None and self.env_runner_group.num_remote_workers() > 0
        )

    def training_step(self) -> None:
        if not self._overlapping():
            return super().training_step()
        cfg: Any = self.config
        store_weight, train_weight = calculate_rr_weights(cfg)
        for _ in range(int(store_weight)):
            self._store(self._next_sample())
        if self._env_steps() >= cfg.num_steps_sampled_before_learning_starts:
            for _ in range(int(train_weight)):
                self._update_once()
            self._weights_stale = True
        return None

    # -- sampling ---------------------------------------------------------------------------
    def _launch_sample(self) -> None:
        runners: Any = self.env_runner_group
        runners.foreach_env_runner_async(lambda w: (w.sample(), w.get_metrics()), tag=SAMPLE_TAG)
        self._pending_sample = True

    def _wait_sample(self) -> list:
        runners: Any = self.env_runner_group
        results = runners.fetch_ready_async_reqs(tags=SAMPLE_TAG, timeout_seconds=None)
        self._pending_sample = False
        return [r for _, r in results]

    def _next_sample(self) -> list:
        """The sample in flight (or a fresh one), after which the next is launched with the
        latest weights."""
        if not self._pending_sample:
            self._launch_sample()
        results = self._wait_sample()
        if self._weights_stale:
            self._sync_weights()
        self._launch_sample()
        return results

    def _store(self, results: list) -> None:
        metrics: Any = self.metrics
        buffer: Any = self.local_replay_buffer
        episodes = [e for eps, _ in results for e in eps]
        metrics.aggregate([m for _, m in results], key=ENV_RUNNER_RESULTS)
        if episodes:
            buffer.add(episodes)

    def _settle(self) -> None:
        """Store the sample in flight, if any, and send every runner (the local one, whose
        module greedy evaluation plays, included) the latest weights: before a checkpoint is
        written, the algorithm is then as RLlib's own loop would leave it."""
        if self._pending_sample and self._overlapping():
            self._store(self._wait_sample())
        if self._weights_stale:
            self._sync_weights()

    def _sync_weights(self) -> None:
        runners: Any = self.env_runner_group
        runners.sync_weights(
            from_worker_or_learner_group=self.learner_group, global_vars=None, inference_only=True
        )
        self._weights_stale = False

    # -- learning ---------------------------------------------------------------------------
    def _env_steps(self) -> int:
        metrics: Any = self.metrics
        return int(metrics.peek((ENV_RUNNER_RESULTS, NUM_ENV_STEPS_SAMPLED_LIFETIME), default=0))

    def _update_once(self) -> None:
        """One replay sample and learner update, as RLlib's DQN loop does it."""
        cfg: Any = self.config
        metrics: Any = self.metrics
        buffer: Any = self.local_replay_buffer
        learners: Any = self.learner_group
        episodes = buffer.sample(
            num_items=cfg.total_train_batch_size,
            n_step=cfg.n_step,
            batch_length_T=self._module_is_stateful * cfg.model_config.get("max_seq_len", 0),
            lookback=int(self._module_is_stateful),
            min_batch_length_T=getattr(cfg, "burn_in_len", 0),
            gamma=cfg.gamma,
            beta=cfg.replay_buffer_config.get("beta"),
            sample_episodes=True,
        )
        metrics.aggregate([buffer.get_metrics()], key=REPLAY_BUFFER_RESULTS)
        results = learners.update(
            episodes=episodes,
            timesteps={
                NUM_ENV_STEPS_SAMPLED_LIFETIME: self._env_steps(),
                NUM_AGENT_STEPS_SAMPLED_LIFETIME: metrics.peek(
                    (ENV_RUNNER_RESULTS, NUM_AGENT_STEPS_SAMPLED_LIFETIME), default={}
                ),
            },
        )
        td_errors: dict = defaultdict(list)
        for res in results:
            for module_id, module_results in res.items():
                if module_id != ALL_MODULES and TD_ERROR_KEY in module_results:
                    td_errors[module_id].extend(
                        convert_to_numpy(module_results.pop(TD_ERROR_KEY).peek())
                    )
        metrics.aggregate(results, key=LEARNER_RESULTS)
        update_priorities_in_episode_replay_buffer(
            replay_buffer=buffer,
            td_errors={m: {TD_ERROR_KEY: np.concatenate(v, axis=0)} for m, v in td_errors.items()},
        )

    # -- checkpoints ------------------------------------------------------------------------
    def get_state(self, *args, **kwargs):
        self._settle()
        return super().get_state(*args, **kwargs)

    def set_state(self, state) -> None:
        if self._pending_sample and self._overlapping():
            self._wait_sample()  # sampled by the run being replaced: not stored
        super().set_state(state)
        self._weights_stale = False
