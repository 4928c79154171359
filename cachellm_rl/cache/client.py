"""Caller side of the shared cache (runs in env runners): prompts, exact keys and memoised
embeddings are computed here, in parallel across workers, and sent to the actor in one call per
vector step (see docs/architecture.md).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import ray

from cachellm_rl.cache.actor import DEFAULT_CACHE_NAME, DEFAULT_NAMESPACE
from cachellm_rl.cache.keys import canonical_text, exact_key
from cachellm_rl.cache.sharding import shard_name, split_by_shard
from cachellm_rl.contracts import CacheQuery, PriorResult
from cachellm_rl.prior.prompts import PromptConfig, prior_request, prompt_config_from_dict


class CacheActorUnavailable(RuntimeError):
    """The named cache actor cannot be found (killed, or not created yet)."""


@dataclass(frozen=True, kw_only=True)
class TextState:
    """The texts of one decision of a text environment.

    Attributes:
        observation: Current observation text.
        candidates: Admissible actions.
        objective: Task objective ('' when none).
        inventory: Inventory text, None when the env has none.
    """

    observation: str
    candidates: tuple[str, ...]
    objective: str = ""
    inventory: str | None = None

    def key_text(self) -> str:
        """Canonical text of the state (what the exact tier hashes and the encoder embeds).

        The inventory comes first and the objective last: sentence encoders truncate long
        inputs (MiniLM at 256 word pieces), and the objective is the part shared by every
        state of an episode, so it is the part to lose.
        """
        inv = "" if self.inventory is None else self.inventory
        return canonical_text(f"{inv}\n{self.observation}\n{self.objective}")


class PriorCacheClient:
    """Builds queries for text states and calls the shared cache actor once per batch.

    Args:
        encoder: A text encoder with ``encode(texts) -> (B, dim)`` and a ``tag``; None sends no
            embeddings (exact tier only).
        cache_name: Name of the shared cache actor.
        namespace: Its Ray namespace.
        prompt_config: Prompt layout; None follows the served prior's (its
            ``prompt_layout.json``, read through the cache actor on first use).
        caller_id: Stable id of this caller (env-runner index) for SPSA sign assignment.
        follow_cache_encoder: Use the learned encoder the cache actor holds, when it holds one
            (fetched on first use and again whenever a result shows the cache's encoder tag
            changed: the version handshake); ``encoder`` is used otherwise.
    """

    def __init__(
        self,
        encoder,
        *,
        cache_name: str = DEFAULT_CACHE_NAME,
        namespace: str = DEFAULT_NAMESPACE,
        prompt_config: PromptConfig | None = None,
        caller_id: int | None = None,
        follow_cache_encoder: bool = False,
    ) -> None:
        self.encoder = encoder
        self.follow_cache_encoder = follow_cache_encoder
        self.encoder_syncs = 0
        self.cache_name, self.namespace = cache_name, namespace
        self.prompt_config = prompt_config or PromptConfig()
        # Without an explicit layout, requests follow the served prior's (asked once).
        self._follow_layout = prompt_config is None
        self._layout_known = False
        self.caller_id = caller_id
        self._actor = None
        self._shards: list | None = None
        self._prior_version: str | None = None
        self.calls = 0
        self.owned_actor = None  # a handle that keeps a runner-owned cache actor alive
        self.last_encode_s = 0.0  # seconds the last build_queries spent encoding

    @property
    def actor(self):
        """The shared cache actor (looked up lazily by name).

        Raises:
            CacheActorUnavailable: No actor of that name is alive.
        """
        if self._actor is None:
            try:
                self._actor = ray.get_actor(self.cache_name, namespace=self.namespace)
            except ValueError:
                raise CacheActorUnavailable(
                    f"no cache actor named {self.cache_name!r} in namespace {self.namespace!r}"
                ) from None
        return self._actor

    def forget_actor(self) -> None:
        """Look the actor up by name again on the next call (after it died or restarted)."""
        self._actor = None
        self._shards = None

    def shards(self) -> list:
        """Handles of every shard of the cache, shard 0 first (just the actor when unsharded;
        the topology is asked once).

        Raises:
            CacheActorUnavailable: Shard 0 or another shard is gone.
        """
        if self._shards is None:
            n, group, ns = ray.get(self.actor.topology.remote())
            try:
                self._shards = [self.actor] + [
                    ray.get_actor(shard_name(group, i), namespace=ns) for i in range(1, int(n))
                ]
            except ValueError:
                raise CacheActorUnavailable(f"a shard of the cache {group!r} is gone") from None
        return self._shards

    def prior_version(self) -> str:
        """The prior model version hashed into exact keys (asked once, then kept)."""
        if self._prior_version is None:
            self._prior_version, tag = ray.get(self.actor.versions.remote())
            if self.follow_cache_encoder and tag != getattr(self.encoder, "tag", ""):
                self.sync_encoder()
        if self._follow_layout and not self._layout_known and not self.sync_prompt_layout():
            raise CacheActorUnavailable(
                "the served prior's prompt layout is unknown (Serve did not answer): no "
                "request is sent in a guessed layout"
            )
        return self._prior_version

    def sync_prompt_layout(self) -> bool:
        """Take the served prior's prompt layout from the cache actor (a prior is prompted the
        way it was trained); returns whether it was known. While Serve cannot say,
        :meth:`prior_version` (and so every query) raises :class:`CacheActorUnavailable`, which
        the env runners' connector answers with uniform priors (counted) until it can."""
        layout = ray.get(self.actor.prompt_layout.remote())
        if layout is None:
            return False
        self.prompt_config = prompt_config_from_dict(layout)
        self._layout_known = True
        return True

    def sync_encoder(self) -> bool:
        """Fetch the cache actor's learned encoder; returns whether one was installed."""
        blob = ray.get(self.actor.encoder_blob.remote())
        if blob is None:
            return False
        from cachellm_rl.cache.learned_encoder import DecisionStateEncoder

        self.encoder = DecisionStateEncoder.from_bytes(blob)
        self.encoder_syncs += 1
        return True

    def build_queries(self, states: Sequence[TextState]) -> list[CacheQuery]:
        """Prompts, exact keys and (memoised, batched) embeddings for ``states``."""
        version = self.prior_version()
        tag = getattr(self.encoder, "tag", "")
        texts = [s.key_text() for s in states]
        t0 = time.perf_counter()
        if self.encoder is not None and states:
            embeddings = list(self.encoder.encode(texts))
        else:
            embeddings = [None] * len(states)
        self.last_encode_s = time.perf_counter() - t0
        queries = []
        for s, text, emb in zip(states, texts, embeddings, strict=True):
            queries.append(
                CacheQuery(
                    exact_key=exact_key(text, s.candidates, prior_version=version, encoder_tag=tag),
                    embedding=emb,
                    request=prior_request(s, self.prompt_config),
                    text=text,
                    encoder_tag=tag,
                )
            )
        return queries

    def get_priors(self, states: Sequence[TextState]) -> list[PriorResult]:
        """One actor call for all ``states``; always returns usable priors."""
        if not states:
            return []
        queries = self.build_queries(states)
        self.calls += 1
        shards = self.shards()
        if len(shards) == 1:
            results = ray.get(self.actor.get_priors.remote(queries, self.caller_id))
        else:  # each query to the shard that owns its exact key, all shards at once
            groups = split_by_shard([q.exact_key for q in queries], len(shards))
            refs = [
                (idx, shards[j].get_priors.remote([queries[i] for i in idx], self.caller_id))
                for j, idx in enumerate(groups)
                if idx
            ]
            results = [None] * len(queries)
            for idx, ref in refs:
                for i, r in zip(idx, ray.get(ref), strict=True):
                    results[i] = r
        tag = getattr(self.encoder, "tag", "")
        for r in results:
            if r.model_version and r.model_version != self._prior_version and not r.stale:
                self._prior_version = r.model_version  # the server was updated
                self._layout_known = False  # its model may be prompted another way
        if self.follow_cache_encoder and any(
            r.encoder_tag and r.encoder_tag != tag for r in results
        ):
            self.sync_encoder()  # the cache moved to a new encoder version
        return results


class DirectPriorClient:
    """The :class:`PriorCacheClient` interface without Ray: every state is scored by an
    in-process :class:`~cachellm_rl.prior.scoring.CandidateScorer` (uncached). For tools that
    play a trained agent in a plain process, e.g. ``cachellm-rl evaluate``.

    Args:
        scorer: The scorer (its ``model_version`` is the prior version).
        prompt_config: Prompt layout; None takes the scorer's model's (its
            ``prompt_layout.json``, else the default).
    """

    def __init__(self, scorer, *, prompt_config: PromptConfig | None = None) -> None:
        self.scorer = scorer
        self.prompt_config = (
            prompt_config or getattr(scorer, "prompt_config", None) or PromptConfig()
        )
        self.calls = 0

    def prior_version(self) -> str:
        """The scorer's model version."""
        return str(self.scorer.model_version)

    def get_priors(self, states: Sequence[TextState]) -> list[PriorResult]:
        """One LM scoring per state; always returns usable priors."""
        from cachellm_rl.contracts import PriorSource

        requests = [prior_request(s, self.prompt_config) for s in states]
        self.calls += 1
        out = []
        for resp in self.scorer.score(requests):
            out.append(
                PriorResult(
                    logp=resp.logp,
                    source=PriorSource.LM,
                    latency_ms=0.0,
                    model_version=resp.model_version,
                )
            )
        return out
