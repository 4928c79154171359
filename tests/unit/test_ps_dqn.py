"""PS-DQN without Ray actors: module shapes, masking, losses, targets, connector helpers."""

from __future__ import annotations

import itertools
from dataclasses import replace
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from ray.rllib.core.columns import Columns

from cachellm_rl.algorithms.columns import (
    OBS_ACTION_MASK,
    OBS_ACTION_TOKENS,
    OBS_HIT_RATE,
    OBS_PRIOR_LOGP,
    OBS_STATE_TOKENS,
)
from cachellm_rl.algorithms.ps_dqn.connectors import (
    PriorConnectorConfig,
    PriorConnectorReport,
    PriorObservationConnector,
    prior_row,
)
from cachellm_rl.algorithms.ps_dqn.losses import (
    cql_regulariser,
    double_q_next_value,
    posterior_logits,
    soft_prior_next_value,
    td_loss,
    td_targets,
)
from cachellm_rl.algorithms.ps_dqn.methods import (
    METHODS,
    MethodSettings,
    algo_config_for,
    cache_config_for,
    check_methods,
    connector_config_for,
    posterior_for_run,
)
from cachellm_rl.algorithms.ps_dqn.posterior import PosteriorConfig
from cachellm_rl.algorithms.ps_dqn.rl_module import PSDQNTorchRLModule
from cachellm_rl.envs.text_env import TextObsConfig, text_observation_space

A, LS, LA, B = 6, 12, 3, 5


def _space():
    base = text_observation_space(
        TextObsConfig(max_state_tokens=LS, max_actions=A, max_action_tokens=LA, vocab_size=97)
    )
    return PriorObservationConnector(base, gym.spaces.Discrete(A)).observation_space


def _module(**model_config):
    from cachellm_rl.algorithms.ps_dqn.config import PSDQNConfig

    spec = PSDQNConfig().get_default_rl_module_spec()
    spec.observation_space = _space()
    spec.action_space = gym.spaces.Discrete(A)
    spec.model_config = {"hidden": 16, "embed_dim": 8, **model_config}
    module = spec.build()
    assert isinstance(module, PSDQNTorchRLModule)
    module.make_target_networks()
    return module


def _obs(valid: int = 3, seed: int = 0, prior_on_masked: bool = False) -> dict:
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(B, A)
    mask[:, :valid] = 1.0
    state = torch.randint(1, 97, (B, LS), generator=g)
    actions = torch.randint(1, 97, (B, A, LA), generator=g) * mask[..., None].long()
    prior = torch.full((B, A), -20.0)
    if prior_on_masked:
        prior[:, valid:] = 0.0  # all prior mass on masked slots
    else:
        prior[:, :valid] = -np.log(valid)
    return {
        OBS_STATE_TOKENS: state,
        OBS_ACTION_TOKENS: actions,
        OBS_ACTION_MASK: mask,
        OBS_PRIOR_LOGP: prior,
        OBS_HIT_RATE: torch.zeros(B, 1),
    }


def test_connector_adds_prior_and_hit_rate_to_the_space():
    space = _space()
    assert space[OBS_PRIOR_LOGP].shape == (A,) and space[OBS_HIT_RATE].shape == (1,)
    assert {OBS_STATE_TOKENS, OBS_ACTION_TOKENS, OBS_ACTION_MASK} <= set(space.spaces)


def test_module_output_shapes():
    m = _module()
    obs = _obs()
    q = m.compute_q_values({Columns.OBS: obs})["qf_preds"]
    assert q.shape == (B, A)
    out = m.forward_train({Columns.OBS: obs, Columns.NEXT_OBS: _obs(seed=1)})
    for k in ("qf_preds", "qf_next_preds", "qf_target_next_preds"):
        assert out[k].shape == (B, A), k
    assert m.forward_inference({Columns.OBS: obs})[Columns.ACTIONS].shape == (B,)


@pytest.mark.parametrize("exploration", ["posterior", "epsilon"])
def test_never_picks_a_masked_action_even_with_prior_mass_there(exploration):
    m = _module(exploration=exploration, epsilon=[[0, 1.0], [1, 1.0]])
    obs = _obs(valid=2, prior_on_masked=True)
    with torch.no_grad():
        for _ in range(200):
            a = m.forward_exploration({Columns.OBS: obs}, t=0)[Columns.ACTIONS]
            assert (a < 2).all()
        assert (m.forward_inference({Columns.OBS: obs})[Columns.ACTIONS] < 2).all()


def test_posterior_follows_the_prior_when_q_is_flat():
    q = torch.zeros(1, 3)
    prior = torch.log(torch.tensor([[0.7, 0.2, 0.1]]))
    logits = posterior_logits(q, prior, torch.ones(1, 3), torch.tensor([1.0]))
    np.testing.assert_allclose(logits.softmax(-1).numpy(), [[0.7, 0.2, 0.1]], rtol=1e-5)
    # with Q, a low-prior action with high value overtakes: p * exp(Q/T)
    q = torch.tensor([[0.0, 0.0, 3.0]])
    assert posterior_logits(q, prior, torch.ones(1, 3), torch.tensor([1.0])).argmax() == 2
    # a higher temperature shrinks Q's weight
    assert posterior_logits(q, prior, torch.ones(1, 3), torch.tensor([10.0])).argmax() == 0


def test_targets_ignore_masked_next_actions_and_terminals():
    online = torch.tensor([[0.0, 1.0, 50.0]])
    target = torch.tensor([[3.0, 2.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    assert double_q_next_value(online, target, mask).item() == 2.0
    lp = torch.log(torch.tensor([[0.5, 0.5, 1e-6]]))
    v = soft_prior_next_value(target, lp, mask, torch.tensor([1.0]))
    expected = np.log(0.5 * np.exp(3.0) + 0.5 * np.exp(2.0))
    assert v.item() == pytest.approx(expected, rel=1e-5)
    # beta < 1: the reference policy p^beta is normalised, so V stays within [E_pi0 Q, max Q]
    # (unnormalised, sum_a p^beta > 1 would add T log sum_a p^beta to every step's value)
    peaked = torch.log(torch.tensor([[0.9, 0.1, 1e-6]]))
    for beta in (0.0, 0.3, 1.0):
        for t in (0.1, 1.0, 10.0):
            v = soft_prior_next_value(target, peaked, mask, torch.tensor([t]), beta).item()
            pi0 = np.array([0.9, 0.1]) ** beta
            pi0 /= pi0.sum()
            assert pi0 @ np.array([3.0, 2.0]) - 1e-5 <= v <= 3.0 + 1e-5, (beta, t, v)
    flat = soft_prior_next_value(torch.zeros(1, 3), peaked, mask, torch.tensor([1.0]), 0.3)
    assert flat.item() == pytest.approx(0.0, abs=1e-6)  # Q = 0 everywhere: no survival bonus
    y = td_targets(
        torch.tensor([1.0, 1.0]), torch.tensor([0.0, 1.0]), torch.tensor([5.0, 5.0]), 0.9
    )
    assert y.tolist() == pytest.approx([5.5, 1.0])


@pytest.mark.parametrize("encoder", ["bag", "gru"])
def test_td_loss_gradients_are_finite_with_masked_entries(encoder):
    m = _module(encoder=encoder)
    # Zero-initialised output layer: only it gets a gradient on the first step; perturb it so
    # the test sees gradients reach the encoders too.
    torch.nn.init.normal_(m.q_net.head[-1].weight)
    out = m.forward_train({Columns.OBS: _obs(valid=2), Columns.NEXT_OBS: _obs(valid=1, seed=3)})
    q_sel = out["qf_preds"].gather(-1, torch.zeros(B, 1, dtype=torch.long)).squeeze(-1)
    v = double_q_next_value(
        out["qf_next_preds"], out["qf_target_next_preds"], _obs(valid=1)[OBS_ACTION_MASK]
    )
    loss, td = td_loss(q_sel, td_targets(torch.ones(B), torch.zeros(B), v, 0.9), torch.ones(B))
    loss.backward()
    grads = [p.grad for p in m.q_net.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert td.shape == (B,) and torch.isfinite(td).all()
    # the target network is untouched by the loss
    assert all(p.grad is None for p in m._target_q_net.parameters())


def _algo_kw() -> dict:
    """Keyword arguments of :func:`algo_config_for` for a config-only TextWorld check."""
    from cachellm_rl.envs.textworld_env import TextWorldEnv

    return {
        "env_class": TextWorldEnv,
        "env_config": {},
        "cache_name": "x",
        "num_env_runners": 1,
        "total_env_steps": 1000,
        "seed": 0,
    }


def _untried_minus_tried_after_training(alpha: float) -> float:
    """Train Q with the TD loss (target 1 on candidate 0, the only one ever taken) plus
    ``alpha`` times the conservative term; return mean Q(untried) - Q(tried) afterwards."""
    torch.manual_seed(0)
    m = _module()
    torch.nn.init.normal_(m.q_net.head[-1].weight)
    obs = _obs(valid=3)
    mask = obs[OBS_ACTION_MASK]
    taken = torch.zeros(B, dtype=torch.long)
    opt = torch.optim.SGD(m.q_net.parameters(), lr=0.05)
    for _ in range(60):
        q = m.compute_q_values({Columns.OBS: obs})["qf_preds"]
        q_sel = q.gather(-1, taken[:, None]).squeeze(-1)
        loss, _ = td_loss(q_sel, torch.ones(B))
        if alpha:
            loss = loss + alpha * cql_regulariser(q, taken, mask).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        q = m.compute_q_values({Columns.OBS: obs})["qf_preds"]
    return float((q[:, 1:3].mean(-1) - q[:, 0]).mean())


def test_conservative_term_pushes_untried_candidates_below_the_tried_one():
    plain = _untried_minus_tried_after_training(0.0)
    conservative = _untried_minus_tried_after_training(1.0)
    # TD alone never sees candidates 1-2: whatever generalisation gives them stays. The
    # conservative term lowers them under the taken candidate.
    assert conservative < plain - 0.2, (plain, conservative)
    assert conservative < 0


def test_conservative_alpha_reaches_the_learner_config_and_is_checked():
    from cachellm_rl.algorithms.ps_dqn.config import PSDQNConfig

    kw = _algo_kw()
    for method in ("uncached", "no_prior", "frozen_q"):
        cfg = algo_config_for(method, MethodSettings(conservative_alpha=0.3), **kw)
        assert cfg.conservative_alpha == 0.3
    assert algo_config_for("uncached", MethodSettings(), **kw).conservative_alpha == 0.0
    with pytest.raises(ValueError, match="conservative_alpha"):
        MethodSettings(conservative_alpha=-0.1)
    bad = PSDQNConfig().training(conservative_alpha=-1.0, dueling=False)
    with pytest.raises(ValueError, match="conservative_alpha"):
        bad.validate()


def test_epsilon_schedule_is_linear():
    m = _module(exploration="epsilon", epsilon=[[0, 1.0], [100, 0.1]])
    assert m.epsilon(0) == 1.0 and m.epsilon(50) == pytest.approx(0.55) and m.epsilon(1000) == 0.1


def test_prior_row_and_report_merge():
    row = prior_row(np.array([-0.1, -50000.0], np.float32), 4)
    assert row.tolist() == pytest.approx([-0.1, -1e4, 0.0, 0.0])
    a = PriorConnectorReport(decisions=10, hits=5, hit_rate_ema=0.5, connector_s=1.0)
    b = PriorConnectorReport(decisions=30, hits=30, hit_rate_ema=1.0, connector_s=2.0)
    merged = PriorConnectorReport().merge(a).merge(b)
    assert merged.decisions == 40 and merged.hits == 35
    assert merged.hit_rate_ema == pytest.approx(0.875) and merged.connector_s == 3.0


def test_method_configs():
    assert check_methods(["adaptive"]) == ("adaptive",)
    with pytest.raises(ValueError, match="unknown method"):
        check_methods(["cached"])
    s = MethodSettings()
    assert cache_config_for("no_prior", s) is None
    for m in ("uncached", "direct_lm", "frozen_q"):
        assert cache_config_for(m, s).bypass, m
        assert not connector_config_for(m, s, "x").use_embeddings, m
    lru = cache_config_for("lru", s)
    assert lru.cache.capacity_entries == 1000 and lru.cache.visit_bonus_steps == 0
    assert lru.cache.refresh_probability == 0 and lru.meta.mode == "static"
    assert cache_config_for("static", s).meta.mode == "static"
    assert cache_config_for("adaptive", s).meta.mode == "heuristic"
    assert connector_config_for("no_prior", s, "x").mode == "uniform"
    assert not connector_config_for("uncached", s, "x").use_embeddings
    assert connector_config_for("adaptive", s, "x").use_embeddings
    adaptive = cache_config_for("adaptive", s, env="textworld")
    assert adaptive.cache.reuse_rule == "delta" and adaptive.meta.reuse_rule == "delta"
    assert adaptive.cache.env == "textworld"
    assert adaptive.cache.correctness.delta == 0.05
    for m in ("lru", "static"):
        assert cache_config_for(m, s).cache.reuse_rule == "tau", m
    exact = cache_config_for("exact_only", s)
    assert not exact.cache.semantic_tier and not exact.bypass
    # exact reuse is never cut short by eviction, in the baseline or in adaptive (whose
    # meta-optimiser shrinks K only once the cache is full): both start at the ceiling
    assert exact.cache.capacity_entries == s.meta.capacity_max == adaptive.cache.capacity_entries
    small = replace(s, meta=replace(s.meta, capacity_max=5000), adaptive_initial_capacity=10**7)
    assert cache_config_for("adaptive", small).cache.capacity_entries == 5000
    assert not connector_config_for("exact_only", s, "x").use_embeddings
    assert set(METHODS) == {
        "no_prior",
        "direct_lm",
        "uncached",
        "frozen_q",
        "exact_only",
        "lru",
        "static",
        "adaptive",
    }
    with pytest.raises(ValueError, match="mode"):
        PriorConnectorConfig(mode="lm")
    for bad, field in (({"n_step": 0}, "n_step"), ({"lr": -1.0}, "lr"), ({"gamma": 0.0}, "gamma")):
        with pytest.raises(ValueError, match=field):
            MethodSettings(**bad)


def test_suite_preset_resolves_per_env_defaults():
    from cachellm_rl.algorithms.ps_dqn.suite import preset

    for env, games, steps in (
        ("textworld", "data/games/cooking", 30),
        ("alfworld", "data/games/alfworld-gen", 50),
        ("babyai", "data/games/babyai", 64),
    ):
        cfg = preset("quick", env=env)
        assert (cfg.games_dir, cfg.max_episode_steps) == (str(Path(games).resolve()), steps)
        assert cfg.prior_model == str(Path(f"artifacts/priors/{env}").resolve())
    # Paths are made absolute: Ray processes do not share the driver's working folder.
    assert preset("full", env="babyai", games_dir="g").games_dir == str(Path("g").resolve())
    with pytest.raises(ValueError, match="unknown env id"):
        preset("quick", env="zork")


# -- the posterior as a policy: beta, temperature schedules, epsilon by global env steps ------
def test_beta_weighs_the_prior_against_q():
    prior = torch.log(torch.tensor([[0.9, 0.1]]))
    q, mask, t = torch.tensor([[0.0, 1.0]]), torch.ones(1, 2), torch.tensor([1.0])
    # log-odds of action 1 over 0 = beta * log(0.1 / 0.9) + 1 / T
    for beta in (0.0, 0.5, 1.0, 2.0):
        logits = posterior_logits(q, prior, mask, t, beta)
        expected = beta * np.log(0.1 / 0.9) + 1.0
        assert (logits[0, 1] - logits[0, 0]).item() == pytest.approx(expected, rel=1e-5)
    # beta = 0: a Boltzmann policy over Q alone; a large beta: the prior's argmax
    assert posterior_logits(q, prior, mask, t, 0.0).argmax().item() == 1
    assert posterior_logits(q, prior, mask, t, 2.0).argmax().item() == 0


def test_temperature_schedules():
    fixed = PosteriorConfig(schedule="fixed", temperature=0.7, temperature_final=0.1)
    assert fixed.temperature_at(0) == fixed.temperature_at(10**6) == fixed.final_temperature()
    assert fixed.final_temperature() == 0.7
    ann = PosteriorConfig(
        schedule="annealed", temperature=1.0, temperature_final=0.01, anneal_env_steps=1000
    )
    temps = [ann.temperature_at(t) for t in (0, 250, 500, 1000, 5000)]
    assert temps[0] == 1.0 and temps[2] == pytest.approx(0.1) and temps[3] == temps[4] == 0.01
    assert all(a > b for a, b in itertools.pairwise(temps[:4]))  # falls until the end
    assert ann.final_temperature() == 0.01
    # annealed ignores the hit rate: every method acts at the same T at the same step
    assert ann.temperature_at(250, 0.0) == ann.temperature_at(250, 0.9)
    hit = PosteriorConfig(schedule="hit_rate", temperature=2.0, temperature_final=1.0)
    assert hit.temperature_at(123, 0.0) == 2.0 and hit.temperature_at(0, 1.0) == 1.0
    assert hit.final_temperature(0.5) == 1.5
    with pytest.raises(ValueError, match="schedule"):
        PosteriorConfig(schedule="cosine")
    with pytest.raises(ValueError, match="temperature_final"):
        PosteriorConfig(temperature=0.1, temperature_final=0.5)
    with pytest.raises(ValueError, match="prior_weight"):
        PosteriorConfig(prior_weight=-1.0)


def _prior_against_q() -> tuple[PSDQNTorchRLModule, dict]:
    """A module annealing T from 1 to 0.01 over 100 steps, and observations where Q prefers
    action 1 by 0.1 while the prior prefers action 0 by log(0.9 / 0.1) = 2.2 nats: at T = 1 the
    prior wins, at T = 0.01 Q wins."""
    post = PosteriorConfig(
        schedule="annealed", temperature=1.0, temperature_final=0.01, anneal_env_steps=100
    )
    m = _module(posterior=post.to_dict())
    obs = _obs(valid=2)
    q_BA = torch.zeros(B, A)
    q_BA[:, 1] = 0.1
    obs[OBS_PRIOR_LOGP][:, :2] = torch.log(torch.tensor([0.9, 0.1]))
    m._q = lambda net, o: q_BA
    return m, obs


def test_module_acts_at_the_schedules_temperature_of_global_step_t():
    m, obs = _prior_against_q()
    hit_B = torch.zeros(B)
    assert m.temperatures(hit_B, 0).tolist() == pytest.approx([1.0] * B)
    assert m.temperatures(hit_B, 100).tolist() == pytest.approx([0.01] * B)
    _, early = m._posterior({Columns.OBS: obs}, 0)
    _, late = m._posterior({Columns.OBS: obs}, 100)
    assert (early.argmax(-1) == 0).all() and (late.argmax(-1) == 1).all()
    # greedy inference uses the schedule's final T
    assert (m.forward_inference({Columns.OBS: obs})[Columns.ACTIONS] == 1).all()
    with torch.no_grad():
        m.forward_exploration({Columns.OBS: obs}, t=42)
    assert m.last_t == 42


def test_evaluation_overrides_change_beta_and_the_greedy_temperature():
    from cachellm_rl.algorithms.ps_dqn.checkpoints import override_posterior

    m, obs = _prior_against_q()

    def greedy() -> list[int]:
        return m.forward_inference({Columns.OBS: obs})[Columns.ACTIONS].tolist()

    assert greedy() == [1] * B  # T_final 0.01: Q wins
    assert override_posterior(m).final_temperature() == 0.01  # no override: unchanged
    assert override_posterior(m, temperature=1.0).final_temperature() == 1.0
    assert greedy() == [0] * B  # at T = 1 the prior wins
    assert override_posterior(m, prior_weight=0.0).prior_weight == 0.0
    assert greedy() == [1] * B  # without the prior, Q's argmax
    q_only = _module(inference="q")
    assert override_posterior(q_only) is None
    with pytest.raises(ValueError, match="argmax Q"):
        override_posterior(q_only, temperature=1.0)


def test_hit_rate_schedule_reads_the_observed_hit_rate():
    post = PosteriorConfig(schedule="hit_rate", temperature=2.0, temperature_final=1.0)
    m = _module(posterior=post.to_dict())
    hit_B = torch.tensor([0.0, 0.5, 1.0, 0.25, 0.75])
    assert m.temperatures(hit_B, 0).tolist() == pytest.approx([2.0, 1.5, 1.0, 1.75, 1.25])


def test_untrained_q_is_zero_so_the_posterior_is_the_prior():
    m = _module()
    obs = _obs(valid=3)
    obs[OBS_PRIOR_LOGP][:, :3] = torch.log(torch.tensor([0.2, 0.5, 0.3]))
    q = m.compute_q_values({Columns.OBS: obs})["qf_preds"]
    assert torch.equal(q[:, :3], torch.zeros(B, 3))
    assert (m.forward_inference({Columns.OBS: obs})[Columns.ACTIONS] == 1).all()


def test_epsilon_and_annealing_follow_the_runs_budget_in_global_steps():
    from cachellm_rl.envs.textworld_env import TextWorldEnv

    s = MethodSettings(epsilon_fraction=0.5, anneal_fraction=0.25)
    assert posterior_for_run(s, 8000).anneal_env_steps == 2000
    cfg = algo_config_for(
        "no_prior",
        s,
        env_class=TextWorldEnv,
        env_config={},
        cache_name="x",
        num_env_runners=2,
        total_env_steps=8000,
        seed=0,
    )
    # Schedules are over *global* env steps (RLlib passes them as ``t``), so they do not
    # depend on how many env runners sample.
    assert cfg.model_config["epsilon"] == [[0, 1.0], [4000, s.epsilon_final]]
    assert cfg.model_config["posterior"]["anneal_env_steps"] == 2000
    # A sample() call that outlasts RLlib's timeout is dropped after the runner stepped: the
    # episode chunk is lost and the replay buffer asserts on the next chunk (seen on ALFWorld).
    assert cfg.sample_timeout_s is None


def test_frozen_q_is_uncached_with_learning_rate_zero():
    kw = _algo_kw()
    s = MethodSettings(lr=3e-4)
    frozen, uncached = algo_config_for("frozen_q", s, **kw), algo_config_for("uncached", s, **kw)
    assert frozen.lr == 0.0 and uncached.lr == 3e-4
    assert frozen.model_config == uncached.model_config
    assert frozen.prior_connector == uncached.prior_connector
