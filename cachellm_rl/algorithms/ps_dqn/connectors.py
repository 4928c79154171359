"""Env-to-module connector that fetches the LM prior of every sub-env's state from the shared
cache actor: **one** actor call per vector step (see docs/architecture.md).

Keys and embeddings are computed here, in the env runner. The prior log-probabilities and the
runner's cache hit-rate EMA are written *into the observation* (``prior_logp``,
``cache_hit_rate``), so the replay buffer keeps them for both the current and the next state of
every transition: the learner sees the prior without a custom buffer, and the
soft-Q-with-prior target gets the next state's prior. The posterior temperature is not stored:
it is a function of the global env step (and, for the ``hit_rate`` schedule, of the stored hit
rate), computed by the module and the learner.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field

import gymnasium as gym
import numpy as np
import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
from ray.rllib.connectors.connector_v2 import ConnectorV2

from cachellm_rl.algorithms.columns import OBS_ACTION_MASK, OBS_HIT_RATE, OBS_PRIOR_LOGP
from cachellm_rl.cache.actor import (
    DEFAULT_CACHE_NAME,
    DEFAULT_NAMESPACE,
    SharedCacheConfig,
    get_or_create_cache,
)
from cachellm_rl.cache.client import CacheActorUnavailable
from cachellm_rl.contracts import LatencyHistogram
from cachellm_rl.envs.text_env import (
    INFO_CANDIDATES,
    INFO_CANDIDATES_DROPPED,
    INFO_GAME,
    INFO_INVALID_ACTION,
    INFO_INVENTORY,
    INFO_OBJECTIVE,
    INFO_OBSERVATION,
    INFO_STATE_TOKENS_TRUNCATED,
    INFO_WON,
)

PRIOR_FLOOR = -1e4
PRIOR_MODES = ("cache", "uniform")


@dataclass(frozen=True, kw_only=True)
class PriorConnectorConfig:
    """Settings of :class:`PriorObservationConnector`.

    Attributes:
        mode: ``"cache"`` (priors from the shared cache actor) or ``"uniform"`` (no LM; the
            ``no_prior`` baseline gets the same observation layout).
        cache_name: Name of the shared cache actor.
        namespace: Its Ray namespace.
        use_embeddings: Compute state embeddings for the semantic tier (False for a cache that
            never does semantic lookups, e.g. ``uncached``).
        hit_rate_ema_decay: Weight of the newest decision in this runner's hit-rate EMA ``h``
            (written into the observation for the ``hit_rate`` temperature schedule).
        encoder_threads: Torch threads of the state encoder in the env runner.
        encoder_max_tokens: Word pieces of each state text the encoder reads.
        query_final_observations: Also fetch the prior of an episode's final observation when
            it was truncated (needed by the soft-Q-with-prior target, which bootstraps from it).
            Terminal observations never need one: every target multiplies it by 0.
        follow_cache_encoder: Embed states with the learned encoder the cache actor holds (and
            follow its versions); MiniLM when the cache holds none.
        own_cache: Isolated caches, a scaling baseline: each env runner creates and uses its
            own cache actor with these settings, named ``<cache_name>-<pid>`` (see
            :func:`own_cache_name`), instead of the shared one. None (the default): the shared
            cache.
    """

    mode: str = "cache"
    cache_name: str = DEFAULT_CACHE_NAME
    namespace: str = DEFAULT_NAMESPACE
    use_embeddings: bool = True
    hit_rate_ema_decay: float = 0.02
    encoder_threads: int = 1
    encoder_max_tokens: int | None = 128
    query_final_observations: bool = False
    follow_cache_encoder: bool = False
    own_cache: SharedCacheConfig | None = None

    def __post_init__(self) -> None:
        if self.mode not in PRIOR_MODES:
            raise ValueError(
                f"PriorConnectorConfig.mode must be one of {PRIOR_MODES}, got {self.mode!r}"
            )
        if not 0 < self.hit_rate_ema_decay <= 1:
            raise ValueError("PriorConnectorConfig.hit_rate_ema_decay must be in (0, 1]")


@dataclass
class PriorConnectorReport:
    """What one env runner's connector measured (picklable; merged by the driver).

    ``latency_hit`` / ``latency_miss`` record each decision's actor call (encoding included)
    by its own outcome, so a hit that shares a call with a miss waits for the miss's LM call;
    ``latency_all_hit`` records only the calls whose every decision was a hit: what a vector
    step served from the cache costs the runner, end to end. ``latency_call`` is the actor
    round trip of every call, encoding excluded.
    """

    decisions: int = 0
    actor_calls: int = 0
    vector_steps: int = 0
    final_observations: int = 0
    hits: int = 0
    actor_failures: int = 0
    sources: dict[str, int] = field(default_factory=dict)
    latency_hit: LatencyHistogram = field(default_factory=LatencyHistogram)
    latency_miss: LatencyHistogram = field(default_factory=LatencyHistogram)
    latency_call: LatencyHistogram = field(default_factory=LatencyHistogram)
    latency_all_hit: LatencyHistogram = field(default_factory=LatencyHistogram)
    hit_rate_ema: float = 0.0
    connector_s: float = 0.0
    actor_call_s: float = 0.0
    encode_s: float = 0.0
    pid: int = 0
    episodes: list[dict] = field(default_factory=list)

    def merge(self, other: PriorConnectorReport) -> PriorConnectorReport:
        """Sum of two reports (the hit-rate gauge: decision-weighted mean)."""
        out = PriorConnectorReport(
            decisions=self.decisions + other.decisions,
            actor_calls=self.actor_calls + other.actor_calls,
            vector_steps=self.vector_steps + other.vector_steps,
            final_observations=self.final_observations + other.final_observations,
            hits=self.hits + other.hits,
            actor_failures=self.actor_failures + other.actor_failures,
            sources={
                k: self.sources.get(k, 0) + other.sources.get(k, 0)
                for k in set(self.sources) | set(other.sources)
            },
            latency_hit=self.latency_hit.merged(other.latency_hit),
            latency_miss=self.latency_miss.merged(other.latency_miss),
            latency_call=self.latency_call.merged(other.latency_call),
            latency_all_hit=self.latency_all_hit.merged(other.latency_all_hit),
            hit_rate_ema=_weighted(self, other, "hit_rate_ema"),
            connector_s=self.connector_s + other.connector_s,
            actor_call_s=self.actor_call_s + other.actor_call_s,
            encode_s=self.encode_s + other.encode_s,
            episodes=self.episodes + other.episodes,
        )
        return out


def _weighted(a: PriorConnectorReport, b: PriorConnectorReport, name: str) -> float:
    n = a.decisions + b.decisions
    if n == 0:
        return getattr(b, name)
    return (getattr(a, name) * a.decisions + getattr(b, name) * b.decisions) / n


def _uniform_row(n: int, num_slots: int) -> np.ndarray:
    return prior_row(np.full(n, -math.log(max(n, 1)), np.float32), num_slots)


def text_state_from_info(info: dict):
    """The cache client's ``TextState`` of an env ``info`` dict."""
    from cachellm_rl.cache.client import TextState

    return TextState(
        observation=info[INFO_OBSERVATION],
        candidates=tuple(info[INFO_CANDIDATES]),
        objective=info.get(INFO_OBJECTIVE, ""),
        inventory=info.get(INFO_INVENTORY),
    )


def prior_row(logp: np.ndarray, num_slots: int) -> np.ndarray:
    """A fixed-size prior row: the candidates' log-probs, 0 on empty slots, floored.

    Example:
        >>> [round(float(x), 3) for x in prior_row(np.log(np.array([0.5, 0.5])), 3)]
        [-0.693, -0.693, 0.0]
    """
    row = np.zeros(num_slots, np.float32)
    n = min(len(logp), num_slots)
    row[:n] = np.maximum(np.asarray(logp[:n], np.float32), PRIOR_FLOOR)
    return row


logger = logging.getLogger(__name__)

# Errors that mean "the cache actor is not there right now" (killed, restarting, or its
# node gone): the connector degrades to uniform priors and counts them. Anything else the
# actor raises is a contract error (e.g. an embedding of the wrong size) and fails the run.
ACTOR_UNAVAILABLE = (RayActorError, GetTimeoutError, CacheActorUnavailable)


def own_cache_name(cache_name: str, pid: int) -> str:
    """Name of the isolated cache of the env runner in process ``pid``.

    Example:
        >>> own_cache_name("bench", 4242)
        'bench-4242'
    """
    return f"{cache_name}-{pid}"


def make_prior_client(config: PriorConnectorConfig, caller_id: int | None = None):
    """The cache client a connector with ``config`` uses: the learned encoder the cache actor
    holds (when it follows the cache's encoder and the cache has one), else MiniLM, or no
    encoder when the method never does semantic lookups. With ``config.own_cache`` the client
    talks to this process's own cache actor, created here (the client keeps its handle, which
    keeps the actor alive)."""
    from cachellm_rl.cache.client import PriorCacheClient

    follow = config.use_embeddings and config.follow_cache_encoder
    name, own = config.cache_name, None
    if config.own_cache is not None:
        name = own_cache_name(config.cache_name, os.getpid())
        own = get_or_create_cache(config.own_cache, name=name, namespace=config.namespace)
    client = PriorCacheClient(
        None,
        cache_name=name,
        namespace=config.namespace,
        caller_id=caller_id,
        follow_cache_encoder=follow,
    )
    client.owned_actor = own
    if config.use_embeddings and not (follow and client.sync_encoder()):
        from cachellm_rl.cache.encoders import TextEncoderConfig, TextStateEncoder

        client.encoder = TextStateEncoder(
            TextEncoderConfig(
                max_threads=config.encoder_threads, max_tokens=config.encoder_max_tokens
            )
        )
    return client


def preflight_prior_connector(config: PriorConnectorConfig) -> None:
    """Check, before any env runner starts, that the queries a connector with ``config`` will
    send are ones its cache actor accepts (the embedding dimension of the encoder it will use,
    the keys), so a mismatch fails the run at once with one line instead of crashing every env
    runner (which RLlib would restart over and over).

    Raises:
        ValueError: The actor is missing or refuses the connector's queries.
    """
    if config.mode != "cache":
        return
    from cachellm_rl.cache.client import TextState

    state = TextState(
        observation="preflight", candidates=("look", "wait"), objective="", inventory=""
    )
    try:
        client = make_prior_client(config)
        queries = client.build_queries([state])
        ray.get(client.actor.check_queries.remote(queries))
    except RayTaskError as exc:
        cause = getattr(exc, "cause", None)
        msg = str(cause) if isinstance(cause, ValueError) else str(exc).strip().splitlines()[-1]
        raise ValueError(
            f"cache actor {config.cache_name!r} refuses this run's queries: {msg}"
        ) from None
    except CacheActorUnavailable as exc:
        raise ValueError(str(exc)) from None


class PriorObservationConnector(ConnectorV2):
    """Adds ``prior_logp`` (A,) and ``cache_hit_rate`` (1,) to each sub-env's latest
    observation, with one call to the shared cache actor for all sub-envs of a vector step.

    Args:
        input_observation_space: Set by RLlib.
        input_action_space: Set by RLlib.
        config: Connector settings.
    """

    def __init__(
        self,
        input_observation_space: gym.Space | None = None,
        input_action_space: gym.Space | None = None,
        *,
        config: PriorConnectorConfig | None = None,
        **kwargs,
    ) -> None:
        self.config = config or PriorConnectorConfig()
        super().__init__(input_observation_space, input_action_space, **kwargs)
        self._client = None
        self.report = PriorConnectorReport(pid=os.getpid())
        self._hit_ema = 0.0

    def recompute_output_observation_space(self, input_observation_space, input_action_space):
        if not isinstance(input_observation_space, gym.spaces.Dict):
            return input_observation_space
        num = input_observation_space[OBS_ACTION_MASK].shape[0]
        spaces = dict(input_observation_space.spaces)
        spaces[OBS_PRIOR_LOGP] = gym.spaces.Box(PRIOR_FLOOR, 0.0, (num,), np.float32)
        spaces[OBS_HIT_RATE] = gym.spaces.Box(0.0, 1.0, (1,), np.float32)
        return gym.spaces.Dict(spaces)

    def _get_client(self):
        if self._client is None:
            self._client = make_prior_client(self.config, caller_id=os.getpid())
        return self._client

    def __call__(self, *, rl_module, batch, episodes, explore=None, shared_data=None, **kwargs):
        t_start = time.perf_counter()
        eps = list(self.single_agent_episode_iterator(episodes, agents_that_stepped_only=True))
        if not eps:
            return batch
        obs = [e.get_observations(-1) for e in eps]
        infos = [e.get_infos(-1) for e in eps]
        num = obs[0][OBS_ACTION_MASK].shape[0]
        rep = self.report
        # An episode's final observation is never acted on; it only feeds the target, which
        # multiplies it by 0 when terminated. Give those a uniform row instead of a query.
        final = [
            e.is_terminated or (e.is_truncated and not self.config.query_final_observations)
            for e in eps
        ]
        rows = [_uniform_row(len(i[INFO_CANDIDATES]), num) for i in infos]
        ask = [k for k, f in enumerate(final) if not f]
        rep.vector_steps += 1
        rep.final_observations += len(eps) - len(ask)
        if self.config.mode == "uniform":
            rep.decisions += len(ask)
        elif ask:
            self._cache_rows(ask, infos, rows, num)
        hit_row = np.array([self._hit_ema], np.float32)
        for e, o, row in zip(eps, obs, rows, strict=True):
            new = dict(o)
            new[OBS_PRIOR_LOGP] = row
            new[OBS_HIT_RATE] = hit_row
            e.set_observations(at_indices=-1, new_data=new)
            e.observation_space = self.observation_space
        rep.connector_s += time.perf_counter() - t_start
        return batch

    def _cache_rows(self, ask: list[int], infos: list[dict], rows: list, num: int) -> None:
        """Fill ``rows[k]`` for ``k in ask`` with priors from one cache-actor call."""
        rep = self.report
        states = [text_state_from_info(infos[k]) for k in ask]
        client = self._get_client()
        t0 = time.perf_counter()
        try:
            results = client.get_priors(states)  # the one actor call
        except ACTOR_UNAVAILABLE as exc:
            # The cache actor is gone or restarting: act on the uniform rows already in ``rows``
            # (counted) and look the actor up again next step, instead of crashing the runner.
            client.forget_actor()
            if not rep.actor_failures:
                logger.warning("cache actor unavailable, uniform priors meanwhile: %r", exc)
            rep.actor_failures += len(ask)
            rep.decisions += len(ask)
            return
        ms = (time.perf_counter() - t0) * 1e3
        rep.actor_calls += 1
        rep.actor_call_s += ms / 1e3 - client.last_encode_s
        rep.latency_call.record(ms - client.last_encode_s * 1e3)  # one actor round trip
        rep.encode_s += client.last_encode_s
        decay = self.config.hit_rate_ema_decay
        for k, r in zip(ask, results, strict=True):
            rows[k] = prior_row(r.logp, num)
            hit = r.hit
            self._hit_ema += decay * (float(hit) - self._hit_ema)
            rep.decisions += 1
            rep.hits += int(hit)
            rep.sources[r.source.value] = rep.sources.get(r.source.value, 0) + 1
            (rep.latency_hit if hit else rep.latency_miss).record(ms)
        if all(r.hit for r in results):  # a decision served from the cache, end to end
            rep.latency_all_hit.record(ms)
        rep.hit_rate_ema = self._hit_ema


def record_episode_end(*, episode, env_runner=None, prev_episode_chunks=None, **kwargs) -> None:
    """RLlib ``on_episode_end`` callback: keeps success, return, length and counters of each
    finished episode in the runner's prior-connector report (collected by the driver)."""
    conn = find_prior_connector(env_runner) if env_runner is not None else None
    if conn is None:
        return
    chunks = [*(prev_episode_chunks or []), episode]
    # A chunk after the first starts with the previous chunk's last info (its ts 0): skip it.
    infos = list(chunks[0].get_infos()) + [i for c in chunks[1:] for i in c.get_infos()[1:]]
    last = infos[-1] if infos else {}
    conn.report.episodes.append(
        {
            "success": float(bool(last.get(INFO_WON, False))),
            "return": float(sum(c.get_return() for c in chunks)),
            "length": int(sum(len(c) for c in chunks)),
            "game": last.get(INFO_GAME, ""),
            "invalid_actions": int(sum(bool(i.get(INFO_INVALID_ACTION)) for i in infos)),
            "candidates_dropped": int(sum(i.get(INFO_CANDIDATES_DROPPED, 0) for i in infos)),
            "state_tokens_truncated": int(
                sum(i.get(INFO_STATE_TOKENS_TRUNCATED, 0) for i in infos)
            ),
        }
    )


def pop_report(env_runner) -> PriorConnectorReport | None:
    """The runner's report; its episode records are handed over (and cleared there)."""
    conn = find_prior_connector(env_runner)
    if conn is None:
        return None
    rep = conn.report
    out = PriorConnectorReport(**{**rep.__dict__, "episodes": list(rep.episodes)})
    rep.episodes.clear()
    return out


def find_prior_connector(env_runner) -> PriorObservationConnector | None:
    """The prior connector inside an env runner's env-to-module pipeline (None if absent)."""
    pipeline = getattr(env_runner, "_env_to_module", None)
    for piece in getattr(pipeline, "connectors", []) or []:
        if isinstance(piece, PriorObservationConnector):
            return piece
    return None
