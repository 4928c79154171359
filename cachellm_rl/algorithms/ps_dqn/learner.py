"""``PSDQNTorchLearner``: double-DQN (or soft-Q-with-prior) TD loss over masked candidates."""

from __future__ import annotations

from typing import Any

import torch
from ray.rllib.algorithms.dqn.dqn_learner import (
    QF_LOSS_KEY,
    QF_MAX_KEY,
    QF_MEAN_KEY,
    QF_MIN_KEY,
    QF_NEXT_PREDS,
    QF_PREDS,
    QF_TARGET_NEXT_PREDS,
    TD_ERROR_MEAN_KEY,
)
from ray.rllib.algorithms.dqn.torch.dqn_torch_learner import DQNTorchLearner
from ray.rllib.core.columns import Columns
from ray.rllib.utils.metrics import NUM_ENV_STEPS_SAMPLED_LIFETIME, TD_ERROR_KEY

from cachellm_rl.algorithms.columns import OBS_ACTION_MASK, OBS_PRIOR_LOGP
from cachellm_rl.algorithms.ps_dqn.losses import (
    cql_regulariser,
    double_q_next_value,
    masked,
    posterior_logits,
    soft_prior_next_value,
    td_loss,
    td_targets,
)

PRIOR_KL_KEY = "kl_posterior_to_prior"
CONSERVATIVE_KEY = "conservative_gap"
TEMPERATURE_KEY = "posterior_temperature"


class PSDQNTorchLearner(DQNTorchLearner):
    """TD loss of posterior-sampling DQN.

    Next-state value: double-DQN over the next state's admissible actions, or with
    ``config.soft_q_prior`` the KL-regularised ``T log sum_a p(a|s')^beta exp(Q(s',a)/T)``
    using the next state's prior (stored in the observation by the prior connector) and the
    schedule's ``T`` at the current global env step. With ``config.conservative_alpha > 0``
    the loss adds ``alpha * (logsumexp_a Q(s, a) - Q(s, a_taken))`` over the admissible
    candidates (CQL(H)): a candidate the agent never tried cannot keep a Q above the tried
    ones' through generalisation alone. Also logs ``KL(posterior || prior)`` of
    the batch's states and the current ``T``.
    """

    _env_steps: int = 0

    def before_gradient_based_update(self, *, timesteps: dict[str, Any]) -> None:
        super().before_gradient_based_update(timesteps=timesteps)
        self._env_steps = int(timesteps.get(NUM_ENV_STEPS_SAMPLED_LIFETIME, 0) or 0)

    def compute_loss_for_module(self, *, module_id, config, batch, fwd_out):
        module = self.module[module_id].unwrapped()
        posterior = module.posterior
        obs, next_obs = batch[Columns.OBS], batch[Columns.NEXT_OBS]
        q_BA = fwd_out[QF_PREDS]
        actions_B1 = batch[Columns.ACTIONS].long().reshape(-1, 1)
        q_sel_B = q_BA.gather(-1, actions_B1).squeeze(-1)
        next_mask_BA = next_obs[OBS_ACTION_MASK]
        if getattr(config, "soft_q_prior", False):
            _, next_hit_B = module._prior_and_hit_rate(next_obs)
            next_v_B = soft_prior_next_value(
                fwd_out[QF_TARGET_NEXT_PREDS],
                next_obs[OBS_PRIOR_LOGP].float(),
                next_mask_BA,
                module.temperatures(next_hit_B, self._env_steps),
                posterior.prior_weight,
            )
        elif config.double_q:
            next_v_B = double_q_next_value(
                fwd_out[QF_NEXT_PREDS], fwd_out[QF_TARGET_NEXT_PREDS], next_mask_BA
            )
        else:
            next_v_B = masked(fwd_out[QF_TARGET_NEXT_PREDS], next_mask_BA).max(-1).values
        discount_B = config.gamma ** batch["n_step"].float()
        target_B = td_targets(
            batch[Columns.REWARDS], batch[Columns.TERMINATEDS], next_v_B, discount_B
        )
        weights_B = batch.get("weights")
        loss, td_error_B = td_loss(
            q_sel_B, target_B, weights_B, huber=config.td_error_loss_fn == "huber"
        )
        alpha = float(getattr(config, "conservative_alpha", 0.0))
        gap_B = None
        if alpha > 0:  # weighted like the TD term (prioritised replay's importance weights)
            gap_B = cql_regulariser(q_BA, actions_B1.squeeze(-1), obs[OBS_ACTION_MASK])
            weighted_B = gap_B if weights_B is None else gap_B * weights_B
            loss = loss + alpha * weighted_B.mean()
        self.metrics.log_value(
            key=(module_id, TD_ERROR_KEY), value=td_error_B, reduce="item_series"
        )
        log = {
            QF_LOSS_KEY: loss,
            QF_MEAN_KEY: q_sel_B.mean(),
            QF_MAX_KEY: q_sel_B.max(),
            QF_MIN_KEY: q_sel_B.min(),
            TD_ERROR_MEAN_KEY: td_error_B.mean(),
        }
        if gap_B is not None:
            log[CONSERVATIVE_KEY] = gap_B.detach().mean()
        if OBS_PRIOR_LOGP in obs:
            with torch.no_grad():
                mask_BA = obs[OBS_ACTION_MASK] > 0.5
                prior_BA, hit_B = module._prior_and_hit_rate(obs)
                temp_B = module.temperatures(hit_B, self._env_steps)
                post_BA = posterior_logits(
                    q_BA, prior_BA, mask_BA, temp_B, posterior.prior_weight
                ).log_softmax(-1)
                prior_BA = masked(prior_BA, mask_BA).log_softmax(-1)
                kl_B = torch.where(mask_BA, post_BA.exp() * (post_BA - prior_BA), 0.0).sum(-1)
            log[PRIOR_KL_KEY] = kl_B.mean()
            log[TEMPERATURE_KEY] = temp_B.mean()
        self.metrics.log_dict(log, key=module_id, window=1)
        return loss
