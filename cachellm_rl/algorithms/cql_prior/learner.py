"""``CQLPriorTorchLearner``: discrete CQL, CQL-Prior and behaviour cloning on RLlib's offline
loop (see docs/offline.md).

RLlib's own CQL handles continuous actions only, so this learner runs inside RLlib's CQL
algorithm (its offline data pipeline and training step) with the posterior-sampling DQN module
(:class:`~cachellm_rl.algorithms.ps_dqn.rl_module.PSDQNTorchRLModule`: Q over the masked
candidates, a target network). The loss is :func:`~cachellm_rl.algorithms.cql_prior.losses.
cql_prior_loss` (or behaviour cloning on ``softmax(Q)``), configured by
``config.learner_config_dict``:

- ``mode``: ``"cql"`` (TD + CQL + prior KL, by the weights below) or ``"bc"``;
- ``alpha_cql``, ``alpha_prior``, ``temperature``: :class:`CQLPriorLossConfig`'s fields.

The prior, when ``alpha_prior > 0``, is the dataset's ``prior_logp`` column (an annotated
dataset), which RLlib's pre-learner passes into the train batch.
"""

from __future__ import annotations

from typing import Any

import torch
from ray.rllib.algorithms.dqn.dqn_learner import (
    QF_LOSS_KEY,
    QF_MEAN_KEY,
    QF_NEXT_PREDS,
    QF_PREDS,
    QF_TARGET_NEXT_PREDS,
)
from ray.rllib.algorithms.dqn.torch.dqn_torch_learner import DQNTorchLearner
from ray.rllib.core.columns import Columns

from cachellm_rl.algorithms.columns import OBS_ACTION_MASK
from cachellm_rl.algorithms.cql_prior.losses import (
    CQLPriorLossConfig,
    behaviour_cloning_loss,
    cql_prior_loss,
)
from cachellm_rl.algorithms.ps_dqn.losses import double_q_next_value, td_targets

PRIOR_LOGP_COLUMN = "prior_logp"
LEARNER_MODES = ("cql", "bc")


def loss_config_from(learner_config: dict[str, Any]) -> tuple[str, CQLPriorLossConfig]:
    """``(mode, loss weights)`` from a learner config dict (unknown keys are refused)."""
    d = dict(learner_config)
    mode = str(d.pop("mode", "cql"))
    if mode not in LEARNER_MODES:
        raise ValueError(f"learner mode must be one of {LEARNER_MODES}, got {mode!r}")
    known = {"alpha_cql", "alpha_prior", "temperature", "huber"}
    unknown = set(d) - known
    if unknown:
        raise ValueError(f"unknown CQL-Prior learner settings: {sorted(unknown)}")
    return mode, CQLPriorLossConfig(**d)


def prior_for_loss(batch: dict, loss_cfg: CQLPriorLossConfig) -> torch.Tensor | None:
    """The batch's prior log-probabilities when the loss uses them (None otherwise).

    Raises:
        ValueError: ``alpha_prior > 0`` but the batch has no ``prior_logp`` column.
    """
    if loss_cfg.alpha_prior <= 0:
        return None
    prior = batch.get(PRIOR_LOGP_COLUMN)
    if prior is None:
        raise ValueError(
            "alpha_prior > 0 needs a dataset annotated with priors (a prior_logp column)"
        )
    return prior.float()


class CQLPriorTorchLearner(DQNTorchLearner):
    """Discrete CQL / CQL-Prior / BC loss over masked candidates (see the module docstring)."""

    def configure_optimizers_for_module(self, module_id, config=None) -> None:
        # RLlib's CQL config requires lr=None and uses critic_lr for the Q-function.
        module = self.module[module_id]
        params = self.get_parameters(module)
        self.register_optimizer(
            module_id=module_id,
            optimizer=torch.optim.Adam(params),
            params=params,
            lr_or_lr_schedule=config.critic_lr,
        )

    def compute_loss_for_module(self, *, module_id, config, batch, fwd_out):
        mode, loss_cfg = loss_config_from(config.learner_config_dict)
        obs, next_obs = batch[Columns.OBS], batch[Columns.NEXT_OBS]
        q_BA = fwd_out[QF_PREDS]
        mask_BA = obs[OBS_ACTION_MASK]
        actions_B = batch[Columns.ACTIONS].long()
        if mode == "bc":
            loss = behaviour_cloning_loss(q_BA, actions_B, mask_BA)
            self.metrics.log_dict({"bc_loss": loss}, key=module_id, window=1)
            return loss
        next_v_B = double_q_next_value(
            fwd_out[QF_NEXT_PREDS], fwd_out[QF_TARGET_NEXT_PREDS], next_obs[OBS_ACTION_MASK]
        )
        target_B = td_targets(
            batch[Columns.REWARDS], batch[Columns.TERMINATEDS], next_v_B, config.gamma
        )
        loss, terms = cql_prior_loss(
            q_BA, actions_B, mask_BA, target_B, loss_cfg, prior_for_loss(batch, loss_cfg)
        )
        self.metrics.log_dict(
            {
                QF_LOSS_KEY: loss,
                QF_MEAN_KEY: q_BA.gather(-1, actions_B.reshape(-1, 1)).mean(),
                "td_loss": terms["td"],
                "cql_loss": terms["cql"],
                "kl_to_prior": terms["kl"],
            },
            key=module_id,
            window=1,
        )
        return loss
