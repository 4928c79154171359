"""The methods of the text suite (see docs/results.md) as configurations of one algorithm, plus
the pieces the suite's run and greedy-evaluation loops use for each (method, seed).

- ``no_prior``: epsilon-greedy DQN, uniform prior, inference = argmax Q.
- ``direct_lm``: argmax of the prior, no learning (every decision asks the LM).
- ``uncached``: posterior sampling, the LM answers every decision.
- ``frozen_q``: ``uncached`` with no Q updates (learning rate 0): the same agent, code path and
  budget, so ``uncached`` minus ``frozen_q`` is what learning adds beyond the prior.
- ``exact_only``: posterior + the exact tier alone (a state's prior is reused only for the very
  same state), holding up to ``meta.capacity_max`` entries (the most ``adaptive`` may grow to,
  so eviction never decides the comparison): the baseline the semantic tier must beat.
- ``lru``: posterior + exact/semantic cache, plain LRU eviction, fixed ``K``, ``tau``, no refresh.
- ``static``: posterior + the adaptive cache's eviction and refresh with fixed ``(K, tau, rho)``.
- ``adaptive``: posterior + error-bounded semantic reuse (the ``delta`` rule on measured reuse
  labels) and meta-optimised ``(K, rho, exploration rate)``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, replace

import numpy as np
import ray
import torch
from ray.rllib.core.columns import Columns

from cachellm_rl.algorithms.columns import OBS_HIT_RATE, OBS_PRIOR_LOGP
from cachellm_rl.algorithms.ps_dqn.config import PSDQNConfig
from cachellm_rl.algorithms.ps_dqn.connectors import (
    PriorConnectorConfig,
    PriorConnectorReport,
    pop_report,
    preflight_prior_connector,
    prior_row,
    record_episode_end,
    text_state_from_info,
)
from cachellm_rl.algorithms.ps_dqn.posterior import PosteriorConfig
from cachellm_rl.algorithms.ps_dqn.replay import (
    N_STEP_TAILS,
    ClampedNStepPrioritizedEpisodeReplayBuffer,
)
from cachellm_rl.algorithms.ps_dqn.rl_module import ENCODERS
from cachellm_rl.cache.actor import SharedCacheConfig, get_or_create_cache
from cachellm_rl.cache.adaptive import CacheConfig
from cachellm_rl.cache.correctness import CorrectnessConfig
from cachellm_rl.cache.meta import MetaConfig
from cachellm_rl.config import PLACEMENT_SLIVER
from cachellm_rl.contracts import DEFAULT_PRIOR_APP
from cachellm_rl.envs.text_env import INFO_CANDIDATES
from cachellm_rl.suite import SuiteMethod

METHODS = (
    "no_prior",
    "direct_lm",
    "uncached",
    "frozen_q",
    "exact_only",
    "lru",
    "static",
    "adaptive",
)
RL_METHODS = ("no_prior", "uncached", "frozen_q", "exact_only", "lru", "static", "adaptive")
# Each method as an algorithm with a cache preset: ``ps_dqn`` is posterior-sampling DQN,
# ``ps_dqn_frozen`` the same agent with no Q updates (lr = 0), ``prior_argmax`` the prior alone.
SUITE_METHODS = {
    m.name: m
    for m in (
        SuiteMethod("no_prior", "ps_dqn", "none"),
        SuiteMethod("direct_lm", "prior_argmax", "uncached", deterministic=True),
        SuiteMethod("uncached", "ps_dqn", "uncached"),
        SuiteMethod("frozen_q", "ps_dqn_frozen", "uncached"),
        SuiteMethod("exact_only", "ps_dqn", "exact_only"),
        SuiteMethod("lru", "ps_dqn", "lru"),
        SuiteMethod("static", "ps_dqn", "static"),
        SuiteMethod("adaptive", "ps_dqn", "adaptive"),
    )
}
# Methods whose every decision is answered by the LM (no cache).
UNCACHED_METHODS = ("direct_lm", "uncached", "frozen_q")
# Replay buffer of every RL method (see replay.py for why not RLlib's own).
_BUFFER = ClampedNStepPrioritizedEpisodeReplayBuffer


def check_methods(methods: Sequence[str]) -> tuple[str, ...]:
    """``methods`` if all are known, else a ValueError naming the unknown ones."""
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise ValueError(f"unknown method(s) {bad}; known: {list(METHODS)}")
    return tuple(methods)


@dataclass(frozen=True, kw_only=True)
class MethodSettings:
    """Hyper-parameters shared by the methods of one suite run.

    Attributes:
        capacity_entries: ``K`` of ``lru`` (fixed at 1000 by the protocol) and of ``static``;
            ``exact_only`` keeps up to ``meta.capacity_max`` entries.
        min_cosine_similarity: ``tau`` of ``lru`` and ``static``, and the start of ``adaptive``.
        refresh_probability: ``rho`` of ``static`` and the start of ``adaptive``.
        adaptive_initial_capacity: Starting ``K`` of ``adaptive`` (clipped to
            ``meta.capacity_max``). By default the ceiling, as ``exact_only``'s: a smaller
            start evicted states the agent met again before capacity misses could grow ``K``
            (ALFWorld, 10 000 steps from ``K = 1000``: about 310 such misses per run). The
            meta-optimiser shrinks ``K`` only once the cache is full.
        meta: Meta-optimiser of ``adaptive``.
        correctness: The reuse labels' ``epsilon`` (``max_tv``), the error budget ``delta``,
            the exploration rate and the correctness model of ``adaptive``.
        audit_probability: Chance that a served semantic reuse of ``lru``, ``static`` or
            ``adaptive`` is audited by a fresh LM call that changes nothing (its served-error
            rate; audit calls are reported apart from the method's LM queries).
        state_encoder_dir: A learned state encoder (``cachellm-rl cache train-encoder`` or
            ``experiments/cache_fidelity.py`` output, with its reuse verifier when it has one)
            that ``adaptive``'s cache holds and hands to the env runners; None: MiniLM.
        posterior: The posterior ``beta * log p + Q / T`` and its temperature schedule (its
            ``anneal_env_steps`` is set per run from ``anneal_fraction``).
        anneal_fraction: Fraction of the step budget over which ``annealed`` lowers ``T``.
        encoder: Text encoders of the Q network (``"bag"`` or ``"gru"``).
        mark_repeats: The Q network sees which candidates it already took in the same state
            this episode (the env's ``obs.mark_repeats``; see docs/algorithms.md, "Repeat
            marks"). Every method of a run gets the same observation.
        lr: Learning rate of the Q network (``frozen_q`` always uses 0).
        gamma: Discount.
        n_step: Steps of the bootstrapped return (RLlib's replay buffer sums the rewards).
        n_step_tail: What an episode's last ``n_step - 1`` transitions are trained with:
            ``"skip"`` (not trained, as in RLlib's buffer, but never stalling sampling) or
            ``"clamp"`` (windows cut at the episode's end); see ``replay.py``.
        train_batch_size: Transitions per update.
        replay_capacity: Replay buffer size (transitions).
        learning_starts: Env steps before the first update.
        target_update_steps: Env steps between target-network updates.
        training_intensity: Replayed / sampled transitions ratio actually run (RLlib's own
            setting assumes the local runner samples too; :func:`algo_config_for` corrects it).
        overlap_sampling: The learner updates while the env runners sample the next fragment
            (acting with weights one iteration old) instead of after; same replay ratio (see
            :class:`~cachellm_rl.algorithms.ps_dqn.config.PSDQN`).
        epsilon_final: Final epsilon of ``no_prior``.
        epsilon_fraction: Fraction of the step budget over which epsilon decays.
        hidden: Width of the DRRN network.
        soft_q_prior: KL-regularised soft-Q target (posterior methods).
        conservative_alpha: Weight of the conservative (CQL(H)) term of the TD loss, all RL
            methods (0: plain double-DQN loss).
        num_envs_per_env_runner: Sub-envs per env runner (rows of one actor call).
        rollout_fragment_length: Env steps per sub-env per sample call.
        num_cpus_per_env_runner: CPUs reserved per env runner.
        env_runner_resource: A custom Ray resource each remote env runner reserves one unit
            of, to pin env runners to the nodes that advertise it (e.g. ``rollout`` on the
            CPU workers of ``cluster.yaml``); None: anywhere.
        cache_resource: A custom Ray resource the run's cache actor reserves a sliver of
            (0.001), which places it on the nodes that advertise it (the prior's node, with
            ``--prior-resource``); None: the creator's node is preferred.
        cache_shards: Cache actors the run's cache is sharded over (``--cache-shards``; see
            docs/cluster.md for when one actor stops being enough); 1: one actor.
        env_steps_per_iteration: Env steps per ``algo.train()`` (one learning-curve point).
        prior_app: Name of the ``PriorServer`` Serve application the cache actors ask.
    """

    capacity_entries: int = 1000
    min_cosine_similarity: float = 0.95
    refresh_probability: float = 0.05
    adaptive_initial_capacity: int = 1_000_000
    meta: MetaConfig = field(
        default_factory=lambda: MetaConfig(
            mode="heuristic",
            window_decisions=200,
            stale_signal="error_rate",
            target_refresh_error_rate=0.3,
            rho_min=0.02,  # keep measuring the cache error (and narrowing radii)
        )
    )
    correctness: CorrectnessConfig = field(default_factory=CorrectnessConfig)
    audit_probability: float = 0.1
    state_encoder_dir: str | None = None
    posterior: PosteriorConfig = field(default_factory=PosteriorConfig)
    anneal_fraction: float = 0.5
    encoder: str = "bag"
    mark_repeats: bool = False
    lr: float = 1e-3
    gamma: float = 0.9
    n_step: int = 1
    n_step_tail: str = "skip"
    train_batch_size: int = 32
    replay_capacity: int = 20_000
    learning_starts: int = 200
    target_update_steps: int = 200
    training_intensity: float = 4.0
    overlap_sampling: bool = False
    epsilon_final: float = 0.05
    epsilon_fraction: float = 0.5
    hidden: int = 128
    soft_q_prior: bool = False
    conservative_alpha: float = 0.0
    num_envs_per_env_runner: int = 4
    rollout_fragment_length: int = 8
    num_cpus_per_env_runner: float = 0.5
    env_runner_resource: str | None = None
    cache_resource: str | None = None
    cache_shards: int = 1
    env_steps_per_iteration: int = 250
    prior_app: str = DEFAULT_PRIOR_APP

    def __post_init__(self) -> None:
        positive = (
            "train_batch_size",
            "replay_capacity",
            "n_step",
            "hidden",
            "num_envs_per_env_runner",
            "rollout_fragment_length",
            "env_steps_per_iteration",
            "training_intensity",
            "target_update_steps",
        )
        for name in positive:
            if not getattr(self, name) > 0:
                raise ValueError(f"MethodSettings.{name} must be > 0, got {getattr(self, name)}")
        if self.lr < 0:
            raise ValueError(f"MethodSettings.lr must be >= 0, got {self.lr}")
        if not 0 <= self.conservative_alpha < math.inf:
            raise ValueError(
                "MethodSettings.conservative_alpha must be finite and >= 0, "
                f"got {self.conservative_alpha}"
            )
        if not 0 < self.gamma <= 1:
            raise ValueError(f"MethodSettings.gamma must be in (0, 1], got {self.gamma}")
        for name in ("anneal_fraction", "epsilon_fraction"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"MethodSettings.{name} must be in (0, 1]")
        if self.encoder not in ENCODERS:
            raise ValueError(
                f"MethodSettings.encoder must be one of {ENCODERS}, got {self.encoder!r}"
            )
        if self.n_step_tail not in N_STEP_TAILS:
            raise ValueError(
                f"MethodSettings.n_step_tail must be one of {N_STEP_TAILS}, "
                f"got {self.n_step_tail!r}"
            )


def cache_config_for(
    method: str, s: MethodSettings, *, dim: int = 384, env: str = ""
) -> SharedCacheConfig | None:
    """The shared-cache actor settings of ``method`` (None: the method uses no LM); ``env``
    names the env in the cache's reuse labels. ``dim`` is the callers' embedding size; with a
    learned state encoder (``adaptive`` only) it is that encoder's."""
    check_methods([method])
    if method == "adaptive" and s.state_encoder_dir is not None:
        from cachellm_rl.cache.learned_encoder import saved_encoder_dim

        dim = saved_encoder_dim(s.state_encoder_dir)
    static = MetaConfig(mode="static")
    if method == "no_prior":
        return None
    if method in UNCACHED_METHODS:
        return SharedCacheConfig(
            cache=CacheConfig(dim=dim, refresh_probability=0.0),
            meta=static,
            bypass=True,
            prior_app=s.prior_app,
        )
    if method == "exact_only":
        # K at adaptive's ceiling: with lru's K = 1000 a 20k-step run evicted states it met
        # again (2 733 capacity misses on 60 TextWorld games), which adaptive's grown K kept.
        cache = CacheConfig(
            dim=dim,
            capacity_entries=s.meta.capacity_max,
            refresh_probability=0.0,
            semantic_tier=False,
            env=env,
        )
        return SharedCacheConfig(cache=cache, meta=static, prior_app=s.prior_app)
    if method == "lru":
        cache = CacheConfig(
            dim=dim,
            env=env,
            capacity_entries=s.capacity_entries,
            min_cosine_similarity=s.min_cosine_similarity,
            refresh_probability=0.0,
            visit_bonus_steps=0.0,
            ghost_entries=0,
        )
        return SharedCacheConfig(
            cache=cache,
            meta=static,
            prior_app=s.prior_app,
            audit_probability=s.audit_probability,
        )
    adaptive = method == "adaptive"
    cache = CacheConfig(
        dim=dim,
        capacity_entries=(
            min(s.adaptive_initial_capacity, s.meta.capacity_max)
            if adaptive
            else s.capacity_entries
        ),
        min_cosine_similarity=s.min_cosine_similarity,
        refresh_probability=s.refresh_probability,
        learn_entry_radius=False,  # static keeps one fixed radius; adaptive uses the delta rule
        reuse_rule="delta" if adaptive else "tau",
        correctness=s.correctness,
        env=env,
    )
    meta = replace(s.meta, reuse_rule="delta") if adaptive else static
    return SharedCacheConfig(
        cache=cache,
        meta=meta,
        prior_app=s.prior_app,
        encoder_dir=s.state_encoder_dir if adaptive else None,
        audit_probability=s.audit_probability,
    )


def connector_config_for(method: str, s: MethodSettings, cache_name: str) -> PriorConnectorConfig:
    """The prior-connector settings of ``method``."""
    check_methods([method])
    if method == "no_prior":
        return PriorConnectorConfig(mode="uniform", cache_name=cache_name)
    return PriorConnectorConfig(
        mode="cache",
        cache_name=cache_name,
        use_embeddings=method not in UNCACHED_METHODS and method != "exact_only",
        follow_cache_encoder=method == "adaptive" and s.state_encoder_dir is not None,
    )


NESTED_SETTINGS = ("meta", "correctness", "posterior")


def settings_with(s: MethodSettings, overrides: dict) -> MethodSettings:
    """``s`` with dotted-key overrides, as Tune spaces and ``best.json`` files write them.

    ``"lr"`` sets a field of :class:`MethodSettings`; ``"meta.rho_min"``,
    ``"correctness.explore_probability"``, ``"posterior.prior_weight"`` set a field of the
    nested config. Integer fields take integers (Tune samples floats for some of them).

    Raises:
        ValueError: An unknown key, or a value the settings refuse.

    Example:
        >>> settings_with(MethodSettings(), {"meta.rho_min": 0.03}).meta.rho_min
        0.03
    """
    top: dict = {}
    nested: dict[str, dict] = {}
    for key, value in overrides.items():
        head, _, leaf = key.partition(".")
        if leaf:
            if head not in NESTED_SETTINGS or "." in leaf:
                raise ValueError(f"unknown setting {key!r} (nested: {', '.join(NESTED_SETTINGS)})")
            nested.setdefault(head, {})[leaf] = value
        else:
            top[key] = value
    names = {f.name: f for f in fields(MethodSettings)}
    for key, value in top.items():
        if key not in names or key in NESTED_SETTINGS:
            raise ValueError(f"unknown setting {key!r}")
        top[key] = _cast_like(getattr(s, key), value, key)
    for head, values in nested.items():
        sub = getattr(s, head)
        sub_names = {f.name for f in fields(sub)}
        for leaf, value in values.items():
            if leaf not in sub_names:
                raise ValueError(f"unknown setting '{head}.{leaf}'")
            values[leaf] = _cast_like(getattr(sub, leaf), value, f"{head}.{leaf}")
        top[head] = replace(sub, **values)
    return replace(s, **top)


def _cast_like(current, value, key: str):
    """``value`` in the type of ``current`` (ints stay ints; bools and strings are not cast).

    Raises:
        ValueError: ``value`` is not a number where ``current`` is one.
    """
    if isinstance(current, int | float) and not isinstance(current, bool):
        try:
            float(value)
        except (TypeError, ValueError):
            raise ValueError(f"setting {key} takes a number, got {value!r}") from None
    if isinstance(current, bool | str) or current is None:
        return value
    if isinstance(current, int):
        return round(float(value))
    if isinstance(current, float):
        return float(value)
    return value


def posterior_for_run(s: MethodSettings, total_env_steps: int) -> PosteriorConfig:
    """``s.posterior`` with ``anneal_env_steps`` sized to a run of ``total_env_steps``."""
    steps = max(1, int(s.anneal_fraction * total_env_steps))
    return replace(s.posterior, anneal_env_steps=steps)


def algo_config_for(
    method: str,
    s: MethodSettings,
    *,
    env_class,
    env_config: dict,
    cache_name: str,
    num_env_runners: int,
    total_env_steps: int,
    seed: int,
) -> PSDQNConfig:
    """The RLlib config of an RL method (not ``direct_lm``)."""
    if method not in RL_METHODS:
        raise ValueError(f"{method!r} is not trained with RLlib; RL methods: {list(RL_METHODS)}")
    posterior = method != "no_prior"
    # RLlib divides by (num_env_runners + 1) sampling runners; only the remote ones sample.
    rllib_intensity = s.training_intensity * (
        num_env_runners / (num_env_runners + 1) if num_env_runners else 1.0
    )
    connector = replace(
        connector_config_for(method, s, cache_name),
        query_final_observations=s.soft_q_prior and posterior,
    )
    eps_steps = max(1, int(s.epsilon_fraction * total_env_steps))
    model_config = {
        "hidden": s.hidden,
        "encoder": s.encoder,
        "exploration": "posterior" if posterior else "epsilon",
        "inference": "posterior" if posterior else "q",
        "epsilon": [[0, 1.0], [eps_steps, s.epsilon_final]],
        "posterior": posterior_for_run(s, total_env_steps).to_dict(),
    }
    cfg = (
        PSDQNConfig()
        .environment(env_class, env_config=env_config)
        .env_runners(
            num_env_runners=num_env_runners,
            num_envs_per_env_runner=s.num_envs_per_env_runner,
            rollout_fragment_length=s.rollout_fragment_length,
            # RLlib's annotation says int; fractions are what small machines need, and work.
            num_cpus_per_env_runner=s.num_cpus_per_env_runner,  # type: ignore[arg-type]
            # RLlib drops a sample() result that outlasts sample_timeout_s (60 s by default);
            # the runner has already stepped, so the episode chunk is lost and the replay
            # buffer later fails to concatenate the episode's next chunk (an AssertionError in
            # concat_episode). Slow engines (ALFWorld resets, a loaded machine) get there.
            sample_timeout_s=None,
            custom_resources_per_env_runner=(
                {s.env_runner_resource: 1} if s.env_runner_resource else {}
            ),
        )
        .prior(connector)
        .training(
            soft_q_prior=s.soft_q_prior and posterior,
            conservative_alpha=s.conservative_alpha,
            overlap_sampling=s.overlap_sampling,
            lr=0.0 if method == "frozen_q" else s.lr,
            gamma=s.gamma,
            double_q=True,
            dueling=False,
            num_atoms=1,
            n_step=s.n_step,
            train_batch_size_per_learner=s.train_batch_size,
            num_steps_sampled_before_learning_starts=s.learning_starts,
            target_network_update_freq=s.target_update_steps,
            training_intensity=rllib_intensity,
            replay_buffer_config={
                # RLlib's prioritized buffer with n-step windows cut at episode ends
                # (its own never samples an episode's last n - 1 steps; see replay.py).
                # RLlib wants a string naming an "...EpisodeReplayBuffer".
                "type": f"{_BUFFER.__module__}.{_BUFFER.__qualname__}",
                "capacity": s.replay_capacity,
                "n_step_tail": s.n_step_tail,
                "alpha": 0.6,
                "beta": 0.4,
            },
        )
        .rl_module(model_config=model_config)
        .callbacks(on_episode_end=record_episode_end)
        .learners(num_learners=0)
        .debugging(seed=seed, log_level="ERROR")
        .reporting(
            metrics_num_episodes_for_smoothing=20,
            # A budget smaller than one iteration is not overshot several times over.
            min_sample_timesteps_per_iteration=min(s.env_steps_per_iteration, total_env_steps),
            min_time_s_per_iteration=0,
        )
    )
    return cfg


def start_cache(method: str, s: MethodSettings, name: str, namespace: str, *, env: str = ""):
    """Create the method's fresh cache actor (None for ``no_prior``); ``env`` names the env in
    its reuse labels.

    Raises:
        ValueError: The env runners' queries would not fit the cache (e.g. a state encoder of
            another dimension than the cache's), found before any env runner starts.
    """
    cfg = cache_config_for(method, s, env=env)
    if cfg is None:
        return None
    if s.cache_resource:
        cfg = replace(cfg, resources={s.cache_resource: PLACEMENT_SLIVER})
    if s.cache_shards != 1:
        cfg = replace(cfg, num_shards=s.cache_shards)
    handle = get_or_create_cache(cfg, name=name, namespace=namespace)
    ray.get(handle.ping.remote())
    if method != "direct_lm":  # an RL run: check its env runners' queries fit this cache
        connector = replace(connector_config_for(method, s, name), namespace=namespace)
        preflight_prior_connector(connector)
    return handle


def merge_reports(reports: Sequence[PriorConnectorReport | None]) -> PriorConnectorReport:
    """One report from the env runners' reports."""
    out = PriorConnectorReport()
    for r in reports:
        if r is not None:
            out = out.merge(r)
    return out


def collect_reports(algo) -> PriorConnectorReport:
    """Pop the prior-connector reports of all env runners (local and remote)."""
    return merge_reports(algo.env_runner_group.foreach_env_runner(pop_report))


def prior_chooser(client, *, hit_rate: float = 0.0, module=None) -> Callable:
    """A ``choose`` function for :func:`greedy_evaluate`.

    With ``module`` it is the module's inference (masked argmax of the posterior at the
    schedule's final ``T``, or of Q) on an observation carrying the prior and ``hit_rate`` (the
    runners' final hit-rate EMA, read by the ``hit_rate`` schedule only); without it, the argmax
    of the prior (``direct_lm``). With ``client=None`` the prior is uniform (``no_prior``).
    """

    def choose(obs: dict, info: dict) -> tuple[int, bool | None, float]:
        n = len(info[INFO_CANDIDATES])
        num = obs["action_mask"].shape[0]
        hit, ms = None, 0.0
        if client is None:
            logp = np.full(n, -np.log(n), np.float32)
        else:
            t0 = time.perf_counter()
            (r,) = client.get_priors([text_state_from_info(info)])
            ms = (time.perf_counter() - t0) * 1e3
            logp, hit = r.logp, r.hit
        if module is None:
            return int(np.argmax(logp[:n])), hit, ms
        full = {k: torch.as_tensor(v)[None] for k, v in obs.items()}
        full[OBS_PRIOR_LOGP] = torch.as_tensor(prior_row(logp, num))[None]
        full[OBS_HIT_RATE] = torch.tensor([[hit_rate]], dtype=torch.float32)
        with torch.no_grad():
            a = module.forward_inference({Columns.OBS: full})[Columns.ACTIONS]
        return int(a.reshape(-1)[0]), hit, ms

    return choose
