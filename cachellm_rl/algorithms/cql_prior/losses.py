"""Pure torch losses of discrete offline RL (no RLlib): behaviour cloning, discrete CQL and
CQL-Prior (see docs/offline.md).

For a batch of dataset transitions ``(s, a, r, s')`` with Q-values ``Q(s, ·)`` over the
admissible candidates (mask ``M``), the CQL-Prior loss is

    L = TD(Q(s, a), r + gamma^n (1 - done) V(s'))
        + alpha_cql * (logsumexp_{a' in M} Q(s, a') - Q(s, a))
        + alpha_prior * KL(softmax(Q(s, ·) / T) || p(· | s))

with ``p`` the LM prior over the same candidates. ``alpha_prior = 0`` is plain discrete CQL
(the CQL(H) regulariser of Kumar et al., 2020); ``alpha_cql = alpha_prior = 0`` is (double)
DQN on the fixed data. The KL term pulls the greedy policy of Q towards the prior, most where
the data says least.

Masked entries are filled with a large finite negative number (never ``-inf``), so no gradient
turns into NaN; rows of the batch are suffixed ``_B``, candidate axes ``_A``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cachellm_rl.algorithms.ps_dqn.losses import cql_regulariser as cql_regulariser
from cachellm_rl.algorithms.ps_dqn.losses import masked

# ``cql_regulariser`` lives in ps_dqn.losses (PS-DQN's conservative term uses it too) and is
# re-exported here, where the CQL-Prior loss names it.


@dataclass(frozen=True)
class CQLPriorLossConfig:
    """Weights of the loss terms.

    Attributes:
        alpha_cql: Weight of the conservative term (0: no CQL).
        alpha_prior: Weight of the KL to the prior (0: no prior).
        temperature: ``T`` of the policy ``softmax(Q / T)`` in the KL.
        huber: Huber TD loss (else squared).
    """

    alpha_cql: float = 1.0
    alpha_prior: float = 0.0
    temperature: float = 1.0
    huber: bool = True

    def __post_init__(self) -> None:
        if self.alpha_cql < 0 or self.alpha_prior < 0:
            raise ValueError("alpha_cql and alpha_prior must be >= 0")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")


def policy_prior_kl(
    q_BA: torch.Tensor, prior_logp_BA: torch.Tensor, mask_BA: torch.Tensor, temperature: float
) -> torch.Tensor:
    """``KL(softmax(Q / T) || p)`` over the admissible candidates, per row.

    Example:
        >>> q = torch.zeros(1, 2); p = torch.log(torch.tensor([[0.5, 0.5]]))
        >>> float(policy_prior_kl(q, p, torch.ones(1, 2), 1.0)[0])
        0.0
    """
    admissible_BA = mask_BA > 0.5
    logpi_BA = masked(q_BA / temperature, mask_BA).log_softmax(-1)
    logp_BA = masked(prior_logp_BA, mask_BA).log_softmax(-1)
    per_BA = torch.where(admissible_BA, logpi_BA.exp() * (logpi_BA - logp_BA), 0.0)
    return per_BA.sum(-1)


def behaviour_cloning_loss(
    logits_BA: torch.Tensor, actions_B: torch.Tensor, mask_BA: torch.Tensor
) -> torch.Tensor:
    """Mean negative log-likelihood of the data's actions under ``softmax(logits)`` over the
    admissible candidates.

    Example:
        >>> round(float(behaviour_cloning_loss(torch.zeros(1, 4), torch.tensor([0]),
        ...     torch.tensor([[1.0, 1.0, 0.0, 0.0]]))), 4)  # log 2
        0.6931
    """
    logp_BA = masked(logits_BA, mask_BA).log_softmax(-1)
    return -logp_BA.gather(-1, actions_B.long().reshape(-1, 1)).squeeze(-1).mean()


def cql_prior_loss(
    q_BA: torch.Tensor,
    actions_B: torch.Tensor,
    mask_BA: torch.Tensor,
    target_B: torch.Tensor,
    config: CQLPriorLossConfig,
    prior_logp_BA: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The CQL-Prior loss of a batch (see the module docstring).

    Args:
        q_BA: Q-values of the batch's states (B, A).
        actions_B: The data's actions (B,).
        mask_BA: Admissible candidates (B, A), 1 = admissible.
        target_B: TD targets (B,), already detached.
        config: Term weights.
        prior_logp_BA: The prior's log-probabilities (B, A); required when
            ``config.alpha_prior > 0``.

    Returns:
        ``(loss, terms)``: the scalar loss and its mean terms (``td``, ``cql``, ``kl``) and the
        per-row absolute TD errors (``td_error_B``) for logging.
    """
    if config.alpha_prior > 0 and prior_logp_BA is None:
        raise ValueError("alpha_prior > 0 needs the prior's log-probabilities")
    q_data_B = q_BA.gather(-1, actions_B.long().reshape(-1, 1)).squeeze(-1)
    fn = torch.nn.functional.huber_loss if config.huber else torch.nn.functional.mse_loss
    td = fn(q_data_B, target_B, reduction="mean")
    cql = cql_regulariser(q_BA, actions_B, mask_BA).mean()
    kl = (
        policy_prior_kl(q_BA, prior_logp_BA, mask_BA, config.temperature).mean()
        if prior_logp_BA is not None
        else torch.zeros((), dtype=q_BA.dtype, device=q_BA.device)
    )
    loss = td + config.alpha_cql * cql + config.alpha_prior * kl
    terms = {"td": td.detach(), "cql": cql.detach(), "kl": kl.detach()}
    terms["td_error_B"] = (q_data_B - target_B).abs().detach()
    return loss, terms
