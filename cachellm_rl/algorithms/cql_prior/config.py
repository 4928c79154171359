"""The RLlib config of an offline learner: RLlib's CQL algorithm (its offline data pipeline and
training step) with :class:`~cachellm_rl.algorithms.cql_prior.learner.CQLPriorTorchLearner`
and the posterior-sampling DQN module (see docs/offline.md)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from cachellm_rl.algorithms.cql_prior.learner import LEARNER_MODES, loss_config_from


@dataclass(frozen=True, kw_only=True)
class OfflineLearnerSettings:
    """What an offline learner trains with.

    Attributes:
        mode: ``"cql"`` (TD + CQL + prior KL) or ``"bc"`` (behaviour cloning).
        alpha_cql: Weight of the conservative term.
        alpha_prior: Weight of the KL to the dataset's prior (needs an annotated dataset).
        temperature: ``T`` of ``softmax(Q / T)`` in the KL.
        lr: Adam learning rate of the Q-network.
        gamma: Discount.
        tau: Soft target-network update rate, every training step.
        batch_size: Transitions per update.
        iters_per_train: Updates per ``algo.train()`` (RLlib needs at least 2 with no remote
            learners).
        hidden: Q-network width.
        encoder: Q-network text encoder (``bag`` or ``gru``).
        policy: How the trained agent acts: ``"q"`` (argmax of Q: no LM at play time) or
            ``"posterior"`` (argmax of ``log p(a|s) + Q(s, a) / T``, the policy the KL-
            regularised objective is optimal for; it asks the prior at every decision).
    """

    mode: str = "cql"
    alpha_cql: float = 1.0
    alpha_prior: float = 0.0
    temperature: float = 1.0
    lr: float = 1e-3
    gamma: float = 0.99
    tau: float = 0.01
    batch_size: int = 64
    iters_per_train: int = 10
    hidden: int = 128
    encoder: str = "bag"
    policy: str = "q"

    def __post_init__(self) -> None:
        if self.policy not in ("q", "posterior"):
            raise ValueError(f"policy must be 'q' or 'posterior', got {self.policy!r}")
        if self.mode not in LEARNER_MODES:
            raise ValueError(f"mode must be one of {LEARNER_MODES}, got {self.mode!r}")
        if self.iters_per_train < 2:
            raise ValueError(
                "iters_per_train must be >= 2 (RLlib's offline loop with local learner)"
            )
        if self.lr < 0 or self.batch_size < 1:
            raise ValueError("lr must be >= 0 and batch_size >= 1")
        loss_config_from(self.learner_config())  # validates the loss weights

    def learner_config(self) -> dict[str, Any]:
        """The learner's ``learner_config_dict``."""
        return {
            "mode": self.mode,
            "alpha_cql": self.alpha_cql,
            "alpha_prior": self.alpha_prior,
            "temperature": self.temperature,
        }

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return asdict(self)


def offline_algo_config(
    env_id: str,
    games: Sequence[str],
    dataset_dirs: Sequence[str],
    settings: OfflineLearnerSettings,
    *,
    seed: int = 0,
):
    """An RLlib ``CQLConfig`` that trains ``settings`` on the parquet datasets in
    ``dataset_dirs`` (the env and ``games`` only give RLlib its spaces; nothing is played).

    On a 2-CPU machine RLlib's default pre-learner pool asks for more CPUs than exist and the
    dataset never starts, so one pre-learner with half a CPU is used.
    """
    from ray.rllib.algorithms.cql import CQLConfig
    from ray.rllib.core.rl_module.rl_module import RLModuleSpec

    from cachellm_rl.algorithms.cql_prior.learner import CQLPriorTorchLearner
    from cachellm_rl.algorithms.ps_dqn.rl_module import PSDQNTorchRLModule
    from cachellm_rl.envs.registry import env_class
    from cachellm_rl.offline.reader import TextOfflinePreLearner

    s = settings
    model_config = {
        "hidden": s.hidden,
        "encoder": s.encoder,
        "exploration": "epsilon",
        "inference": s.policy,
        "epsilon": [[0, 0.0]],
        "posterior": {"prior_weight": 1.0, "schedule": "fixed", "temperature": s.temperature},
    }
    return (
        CQLConfig()
        .environment(env_class(env_id), env_config={"games": list(games)})
        .offline_data(
            input_=[str(d) for d in dataset_dirs],
            input_read_method="read_parquet",
            input_read_episodes=False,
            dataset_num_iters_per_learner=s.iters_per_train,
            prelearner_class=TextOfflinePreLearner,
            map_batches_kwargs={"concurrency": 1, "num_cpus": 0.5},
        )
        .training(
            lr=None,  # RLlib's CQL requires it; the learner uses critic_lr
            critic_lr=s.lr,
            gamma=s.gamma,
            tau=s.tau,
            target_network_update_freq=0,
            train_batch_size_per_learner=s.batch_size,
            learner_class=CQLPriorTorchLearner,
            learner_config_dict=s.learner_config(),
        )
        .rl_module(
            rl_module_spec=RLModuleSpec(module_class=PSDQNTorchRLModule, model_config=model_config)
        )
        .env_runners(num_env_runners=0)
        .learners(num_learners=0)
        .debugging(seed=seed, log_level="ERROR")
    )


def learned_module(algo):
    """The module as the learner has trained it.

    An offline algorithm never samples, so RLlib never copies the learner's weights to its env
    runners, and ``algo.get_module()`` (the local env runner's module) keeps its initial
    weights. This syncs them first, then returns that module.
    """
    algo.env_runner_group.sync_weights(
        from_worker_or_learner_group=algo.learner_group, inference_only=True
    )
    return algo.get_module()
