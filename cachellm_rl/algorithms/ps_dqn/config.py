"""``PSDQNConfig`` / ``PSDQN``: RLlib's DQN training loop with the posterior-sampling module,
learner and prior connector."""

from __future__ import annotations

import math

from ray.rllib.algorithms.dqn.dqn import DQN, DQNConfig
from ray.rllib.core.rl_module.rl_module import RLModuleSpec

from cachellm_rl.algorithms.ps_dqn.connectors import PriorConnectorConfig, PriorObservationConnector


class PSDQNConfig(DQNConfig):
    """DQN config plus ``soft_q_prior``, ``conservative_alpha`` and the prior connector.

    Example:
        >>> cfg = PSDQNConfig().training(soft_q_prior=True)
        >>> cfg.soft_q_prior
        True
    """

    def __init__(self, algo_class=None) -> None:
        super().__init__(algo_class=algo_class or PSDQN)
        self.soft_q_prior = False
        self.conservative_alpha = 0.0
        self.prior_connector = PriorConnectorConfig()

    def training(
        self,
        *,
        soft_q_prior: bool | None = None,
        conservative_alpha: float | None = None,
        **kwargs,
    ) -> PSDQNConfig:
        """DQN's ``training(...)`` plus ``soft_q_prior`` (the KL-regularised target of
        docs/algorithms.md) and ``conservative_alpha`` (weight of the CQL(H) term that keeps
        untried candidates' Q from rising above the tried ones'; 0: none)."""
        super().training(**kwargs)
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


class PSDQN(DQN):
    """RLlib DQN driven by :class:`PSDQNConfig`."""

    @classmethod
    def get_default_config(cls) -> PSDQNConfig:
        return PSDQNConfig()
