"""Discrete CQL and CQL-Prior losses against hand computations."""

from __future__ import annotations

import math

import pytest
import torch

from cachellm_rl.algorithms.cql_prior.losses import (
    CQLPriorLossConfig,
    behaviour_cloning_loss,
    cql_prior_loss,
    cql_regulariser,
    policy_prior_kl,
)

Q = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
ACTIONS = torch.tensor([0, 1])
TARGET = torch.tensor([1.5, -1.0])
PRIOR = torch.log(torch.tensor([[0.2, 0.5, 0.3], [0.9, 0.1, 0.5]]))  # row 2: slot 3 masked


def _hand_terms(alpha_cql: float, alpha_prior: float, temperature: float) -> float:
    # TD (Huber, both errors |0.5| and |0| are < 1): mean(0.5 * e^2)
    td = (0.5 * 0.5**2 + 0.5 * 0.0**2) / 2
    # CQL: logsumexp over admissible minus Q(s, a_data)
    c1 = math.log(math.e**1 + math.e**2 + math.e**0.5) - 1.0
    c2 = math.log(math.e**0 + math.e**-1) - (-1.0)
    cql = (c1 + c2) / 2
    kls = []
    for q_row, p_row, n in (([1.0, 2.0, 0.5], [0.2, 0.5, 0.3], 3), ([0.0, -1.0], [0.9, 0.1], 2)):
        z = sum(math.exp(q / temperature) for q in q_row[:n])
        pi = [math.exp(q / temperature) / z for q in q_row[:n]]
        zp = sum(p_row[:n])
        p = [x / zp for x in p_row[:n]]
        kls.append(sum(a * math.log(a / b) for a, b in zip(pi, p, strict=True)))
    kl = sum(kls) / 2
    return td + alpha_cql * cql + alpha_prior * kl


@pytest.mark.parametrize(
    ("alpha_cql", "alpha_prior", "temperature"), [(1.0, 0.0, 1.0), (0.5, 0.3, 2.0)]
)
def test_the_loss_matches_a_hand_computation(alpha_cql, alpha_prior, temperature):
    cfg = CQLPriorLossConfig(alpha_cql=alpha_cql, alpha_prior=alpha_prior, temperature=temperature)
    loss, terms = cql_prior_loss(Q, ACTIONS, MASK, TARGET, cfg, PRIOR)
    assert float(loss) == pytest.approx(_hand_terms(alpha_cql, alpha_prior, temperature), rel=1e-5)
    assert terms["td_error_B"].tolist() == pytest.approx([0.5, 0.0])


def test_alpha_prior_zero_is_plain_cql():
    cfg = CQLPriorLossConfig(alpha_cql=1.0, alpha_prior=0.0)
    with_prior, _ = cql_prior_loss(Q, ACTIONS, MASK, TARGET, cfg, PRIOR)
    without, terms = cql_prior_loss(Q, ACTIONS, MASK, TARGET, cfg, None)
    assert float(with_prior) == pytest.approx(float(without))
    assert float(terms["kl"]) == 0.0
    plain = torch.nn.functional.huber_loss(Q.gather(-1, ACTIONS[:, None]).squeeze(-1), TARGET)
    assert float(without) == pytest.approx(float(plain + cql_regulariser(Q, ACTIONS, MASK).mean()))


def test_the_kl_gradient_reaches_q_and_pulls_towards_the_prior():
    q = torch.zeros(1, 3, requires_grad=True)
    prior = torch.log(torch.tensor([[0.8, 0.1, 0.1]]))
    kl = policy_prior_kl(q, prior, torch.ones(1, 3), 1.0).sum()
    kl.backward()
    assert q.grad is not None and float(q.grad.abs().sum()) > 0
    # descending the KL raises Q of the action the prior favours, lowers the others
    assert q.grad[0, 0] < 0 and q.grad[0, 1] > 0 and q.grad[0, 2] > 0
    cfg = CQLPriorLossConfig(alpha_cql=0.0, alpha_prior=1.0)
    q2 = torch.zeros(1, 3, requires_grad=True)
    loss, _ = cql_prior_loss(q2, torch.tensor([1]), torch.ones(1, 3), torch.zeros(1), cfg, prior)
    loss.backward()
    assert torch.allclose(q2.grad, q.grad)  # TD is 0 here: the whole gradient is the KL's


def test_masked_candidates_never_count_and_never_give_nan():
    q = torch.tensor([[1.0, 50.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 0.0]])
    assert float(cql_regulariser(q.detach(), torch.tensor([0]), mask)[0]) == pytest.approx(0.0)
    kl = policy_prior_kl(q, torch.log(torch.tensor([[1.0, 1e-30]])), mask, 1.0)
    kl.sum().backward()
    assert float(kl[0]) == pytest.approx(0.0, abs=1e-6) and torch.isfinite(q.grad).all()
    assert float(behaviour_cloning_loss(q.detach(), torch.tensor([0]), mask)) == pytest.approx(0.0)


def test_bad_weights_are_refused():
    with pytest.raises(ValueError, match=">= 0"):
        CQLPriorLossConfig(alpha_cql=-1.0)
    with pytest.raises(ValueError, match="temperature"):
        CQLPriorLossConfig(temperature=0.0)
    with pytest.raises(ValueError, match="needs the prior"):
        cql_prior_loss(Q, ACTIONS, MASK, TARGET, CQLPriorLossConfig(alpha_prior=0.1), None)


def test_a_prior_weight_without_an_annotated_batch_is_refused():
    from cachellm_rl.algorithms.cql_prior.learner import prior_for_loss

    with_prior = {"prior_logp": PRIOR.double()}
    assert prior_for_loss({}, CQLPriorLossConfig(alpha_prior=0.0)) is None
    assert prior_for_loss(with_prior, CQLPriorLossConfig(alpha_prior=0.0)) is None
    got = prior_for_loss(with_prior, CQLPriorLossConfig(alpha_prior=0.5))
    assert got is not None and got.dtype == torch.float32
    with pytest.raises(ValueError, match="annotated with priors"):
        prior_for_loss({}, CQLPriorLossConfig(alpha_prior=0.5))
