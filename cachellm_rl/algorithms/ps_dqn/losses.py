"""Pure torch functions of posterior-sampling DQN (no RLlib): posterior logits, double-DQN and
soft-Q-with-prior targets, the conservative (CQL) regulariser, and the TD loss.

Masks are float or bool tensors with 1 for an admissible action. Masked entries are filled with
a large finite negative number, never ``-inf``, so no gradient turns into NaN.
"""

from __future__ import annotations

import torch

MASKED_LOGIT = -1e9


def masked(x_BA: torch.Tensor, mask_BA: torch.Tensor, fill: float = MASKED_LOGIT) -> torch.Tensor:
    """``x`` with non-admissible entries set to ``fill``.

    Example:
        >>> masked(torch.tensor([[1.0, 2.0]]), torch.tensor([[1.0, 0.0]]), fill=-5.0)
        tensor([[ 1., -5.]])
    """
    return x_BA.masked_fill(mask_BA <= 0.5, fill)


def posterior_logits(
    q_BA: torch.Tensor,
    prior_logp_BA: torch.Tensor,
    mask_BA: torch.Tensor,
    temperature_B: torch.Tensor,
    prior_weight: float = 1.0,
) -> torch.Tensor:
    """Masked logits of the posterior ``p(a|s)^beta exp(Q(s,a)/T)``: ``beta log p + Q/T``.

    Args:
        q_BA: Q-values.
        prior_logp_BA: Prior log-probabilities (any finite value on masked slots).
        mask_BA: Admissible actions.
        temperature_B: Posterior temperature per row (> 0).
        prior_weight: ``beta``, the weight of the prior (>= 0).

    Returns:
        (B, A) logits with masked slots at :data:`MASKED_LOGIT`.

    Example:
        >>> q = torch.tensor([[0.0, 1.0, 5.0]])
        >>> lp = torch.log(torch.tensor([[0.5, 0.5, 1e-3]]))
        >>> posterior_logits(q, lp, torch.tensor([[1.0, 1.0, 0.0]]), torch.tensor([1.0])).argmax(-1)
        tensor([1])
        >>> lp2 = torch.log(torch.tensor([[0.9, 0.1]]))
        >>> q2, m2, t2 = torch.tensor([[0.0, 1.0]]), torch.ones(1, 2), torch.tensor([0.5])
        >>> posterior_logits(q2, lp2, m2, t2).argmax(-1)  # beta = 1: the prior wins
        tensor([0])
        >>> posterior_logits(q2, lp2, m2, t2, prior_weight=0.2).argmax(-1)  # Q wins
        tensor([1])
    """
    t_B1 = temperature_B.reshape(-1, 1).clamp_min(1e-6)
    return masked(prior_weight * prior_logp_BA + q_BA / t_B1, mask_BA)


def masked_argmax(x_BA: torch.Tensor, mask_BA: torch.Tensor) -> torch.Tensor:
    """Argmax over admissible actions only.

    Example:
        >>> masked_argmax(torch.tensor([[9.0, 1.0]]), torch.tensor([[0.0, 1.0]]))
        tensor([1])
    """
    return masked(x_BA, mask_BA).argmax(dim=-1)


def cql_regulariser(
    q_BA: torch.Tensor, actions_B: torch.Tensor, mask_BA: torch.Tensor
) -> torch.Tensor:
    """``logsumexp`` of Q over the admissible candidates minus Q of the data's action, per row.

    Example:
        >>> q = torch.tensor([[1.0, 2.0, 5.0]]); m = torch.tensor([[1.0, 1.0, 0.0]])
        >>> round(float(cql_regulariser(q, torch.tensor([1]), m)[0]), 4)  # log(e + e^2) - 2
        0.3133
    """
    lse_B = torch.logsumexp(masked(q_BA, mask_BA), dim=-1)
    q_data_B = q_BA.gather(-1, actions_B.long().reshape(-1, 1)).squeeze(-1)
    return lse_B - q_data_B


def double_q_next_value(
    q_next_online_BA: torch.Tensor, q_next_target_BA: torch.Tensor, next_mask_BA: torch.Tensor
) -> torch.Tensor:
    """Double-DQN value of the next state: target Q at the online net's masked argmax.

    Example:
        >>> online = torch.tensor([[1.0, 3.0, 9.0]]); target = torch.tensor([[10.0, 2.0, 7.0]])
        >>> double_q_next_value(online, target, torch.tensor([[1.0, 1.0, 0.0]]))
        tensor([2.])
    """
    idx_B1 = masked_argmax(q_next_online_BA, next_mask_BA).unsqueeze(-1)
    return q_next_target_BA.gather(-1, idx_B1).squeeze(-1)


def soft_prior_next_value(
    q_next_target_BA: torch.Tensor,
    next_prior_logp_BA: torch.Tensor,
    next_mask_BA: torch.Tensor,
    temperature_B: torch.Tensor,
    prior_weight: float = 1.0,
) -> torch.Tensor:
    """KL-regularised soft value ``V(s') = T log sum_a pi0(a|s') exp(Q(s',a)/T)`` with the
    reference policy ``pi0 = p^beta / sum_a p^beta`` over the admissible actions (see
    docs/algorithms.md).

    ``V = max_pi E_pi[Q] - T KL(pi || pi0)``, so ``E_pi0[Q] <= V <= max_a Q``: the value never
    exceeds the best action's. Without the normalisation (``p^beta`` itself, which sums to more
    than 1 for ``beta < 1``) every step would add ``T log sum_a p^beta > 0``, a reward for
    merely staying in the episode that can outweigh a sparse success reward.

    Example:
        >>> q = torch.tensor([[1.0, 1.0]]); lp = torch.log(torch.tensor([[0.5, 0.5]]))
        >>> soft_prior_next_value(q, lp, torch.ones(1, 2), torch.tensor([0.5]))
        tensor([1.])
        >>> soft_prior_next_value(q, lp, torch.ones(1, 2), torch.tensor([0.5]), prior_weight=0.3)
        tensor([1.])
    """
    t_B = temperature_B.reshape(-1).clamp_min(1e-6)
    logits_BA = posterior_logits(
        q_next_target_BA, next_prior_logp_BA, next_mask_BA, t_B, prior_weight
    )
    log_norm_B = torch.logsumexp(masked(prior_weight * next_prior_logp_BA, next_mask_BA), dim=-1)
    return t_B * (torch.logsumexp(logits_BA, dim=-1) - log_norm_B)


def td_targets(
    rewards_B: torch.Tensor,
    terminateds_B: torch.Tensor,
    next_value_B: torch.Tensor,
    discount_B: torch.Tensor | float,
) -> torch.Tensor:
    """``r + discount * (1 - terminated) * V(s')``, detached.

    Example:
        >>> r, done, v = torch.ones(2), torch.tensor([0.0, 1.0]), torch.full((2,), 2.0)
        >>> td_targets(r, done, v, 0.5)
        tensor([2., 1.])
    """
    not_done_B = 1.0 - terminateds_B.float()
    return (rewards_B + discount_B * not_done_B * next_value_B).detach()


def td_loss(
    q_selected_B: torch.Tensor,
    target_B: torch.Tensor,
    weights_B: torch.Tensor | None = None,
    *,
    huber: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Importance-weighted Huber (or squared) TD loss.

    Returns:
        ``(loss, abs_td_error_B)``; the errors feed prioritised replay.
    """
    fn = torch.nn.functional.huber_loss if huber else torch.nn.functional.mse_loss
    per_B = fn(q_selected_B, target_B, reduction="none")
    if weights_B is not None:
        per_B = per_B * weights_B
    return per_B.mean(), (q_selected_B - target_B).abs().detach()
