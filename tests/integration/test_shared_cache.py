"""The shared named cache actor: sharing, single flight, restart restore, LM fallback."""

from __future__ import annotations

import time
import uuid
from dataclasses import asdict

import numpy as np
import pytest

from cachellm_rl.cache.actor import (
    DEFAULT_NAMESPACE,
    SharedCacheConfig,
    get_or_create_cache,
    kill_cache,
)
from cachellm_rl.cache.adaptive import CacheConfig
from cachellm_rl.cache.client import PriorCacheClient, TextState
from cachellm_rl.contracts import CacheQuery, PriorRequest, PriorSource
from cachellm_rl.prior.prompts import PromptConfig

pytestmark = pytest.mark.integration

CANDS = ("go north", "take red apple", "open fridge")


def q(key: str, emb=None, cands=CANDS) -> CacheQuery:
    return CacheQuery(
        exact_key=key.encode(),
        embedding=emb,
        request=PriorRequest(prompt=f"observation : {key} . next action :", candidates=cands),
    )


def crash_and_wait_for_restore(ray, handle, stats="stats"):
    """Kill the actor as a crash would (Ray restarts it) and return the restored actor's stats
    (``stats="local_stats"``: one shard's own)."""
    ray.kill(handle, no_restart=False)
    deadline = time.time() + 60
    while True:  # the old instance may answer once more before it dies
        try:
            s = ray.get(getattr(handle, stats).remote(), timeout=10)
            if s.restored_entries:
                return s
        except Exception:
            if time.time() > deadline:
                raise
        time.sleep(0.5)


def make_cache(app, **kw):
    name = f"cache-{uuid.uuid4().hex[:8]}"
    cfg = SharedCacheConfig(
        cache=CacheConfig(
            dim=8, capacity_entries=1000, min_cosine_similarity=0.9, refresh_probability=0.0
        ),
        prior_app=app,
        **kw,
    )
    return name, get_or_create_cache(cfg, name=name)


def test_actor_is_shared_by_two_separate_workers(ray_session, prior_app):
    ray = ray_session
    app, _ = prior_app
    name, handle = make_cache(app)

    @ray.remote(num_cpus=0)
    def worker(key):
        from cachellm_rl.cache.actor import get_or_create_cache

        actor = get_or_create_cache(name=name)  # same name: the existing actor
        res = ray.get(actor.get_priors.remote([q(key)]))
        return res[0].source.value, ray.get(actor.size.remote())

    @ray.remote(num_cpus=0)
    class Runner:
        def run(self, key):
            actor = ray.get_actor(name, namespace="cachellm_rl")
            return [r.source.value for r in ray.get(actor.get_priors.remote([q(key)]))]

    first = ray.get(worker.remote("kitchen"))
    assert first == (PriorSource.LM.value, 1)
    assert ray.get(Runner.remote().run.remote("kitchen")) == [PriorSource.CACHE_EXACT.value]
    stats = ray.get(handle.stats.remote())
    assert stats.lm_queries == 1 and stats.hits_exact == 1 and stats.size == 1
    kill_cache(name)


def test_single_flight_coalesces_concurrent_misses(ray_session, prior_app):
    ray = ray_session
    app, _ = prior_app
    name, handle = make_cache(app)
    refs = [handle.get_priors.remote([q("brand new state")]) for _ in range(8)]
    results = [r[0] for r in ray.get(refs)]
    stats = ray.get(handle.stats.remote())
    assert stats.lm_queries == 1
    assert stats.coalesced_misses == 7
    assert sorted(r.source.value for r in results).count(PriorSource.COALESCED.value) == 7
    for r in results:
        np.testing.assert_allclose(r.logp, results[0].logp, atol=1e-6)
    kill_cache(name)


def test_killed_actor_restores_its_snapshot(ray_session, prior_app, tmp_path):
    ray = ray_session
    app, _ = prior_app
    name, handle = make_cache(app, snapshot_dir=str(tmp_path / "snap"), max_restarts=2)
    emb = np.eye(8, dtype=np.float32)
    before = ray.get(handle.get_priors.remote([q(f"s{i}", emb[i]) for i in range(4)]))
    ray.get(handle.save.remote())
    restored = crash_and_wait_for_restore(ray, handle)
    assert restored.size == 4
    after = ray.get(handle.get_priors.remote([q(f"s{i}", emb[i]) for i in range(4)]))
    assert all(r.source is PriorSource.CACHE_EXACT for r in after)
    for a, b in zip(before, after, strict=True):
        np.testing.assert_allclose(a.logp, b.logp, atol=1e-6)
    stats = ray.get(handle.stats.remote())
    assert stats.restored_entries == 4 and stats.lm_queries == 4  # counters survive too
    kill_cache(name)


def test_lm_timeout_falls_back_and_is_counted(ray_session, prior_app):
    ray = ray_session
    app, _ = prior_app
    name, handle = make_cache(app, lm_timeout_s=1e-4)
    emb = np.eye(8, dtype=np.float32)
    (r,) = ray.get(handle.get_priors.remote([q("slow", emb[0])]))
    assert r.source is PriorSource.FALLBACK_UNIFORM and r.stale
    np.testing.assert_allclose(r.logp, np.full(3, -np.log(3)), atol=1e-6)
    stats = ray.get(handle.stats.remote())
    assert stats.lm_timeouts == 1 and stats.fallbacks_uniform == 1
    kill_cache(name)


def test_unreachable_lm_falls_back_to_nearest_cached_prior(ray_session, prior_app):
    ray = ray_session
    app, _ = prior_app
    emb = np.eye(8, dtype=np.float32)
    name, handle = make_cache(app)
    known = ray.get(handle.get_priors.remote([q("known", emb[0])]))[0]
    assert known.source is PriorSource.LM
    # the LM disappears: point a restored copy of this cache at an app that does not exist
    snap = ray.get(handle.save.remote("/tmp/cachellm-test-fallback-" + name))
    assert snap
    cfg = SharedCacheConfig(
        cache=CacheConfig(dim=8, min_cosine_similarity=0.99),
        prior_app="no_such_app",
        lm_timeout_s=2.0,
    )
    broken = get_or_create_cache(cfg, name=name + "-broken")
    assert ray.get(broken.restore.remote("/tmp/cachellm-test-fallback-" + name)) == 1
    near = emb[0] * 0.8 + emb[1] * 0.6  # cos 0.8 < tau: a miss, but the nearest entry exists
    (stale,) = ray.get(broken.get_priors.remote([q("other", near)]))
    assert stale.source is PriorSource.FALLBACK_STALE and stale.stale
    np.testing.assert_allclose(stale.logp, known.logp, atol=1e-6)  # same candidates
    s = ray.get(broken.stats.remote())
    assert s.lm_failures + s.lm_timeouts == 1 and s.fallbacks_stale == 1
    kill_cache(name)
    kill_cache(name + "-broken")


def minilm_cache(app, encoder, **kw):
    """A cache of MiniLM-keyed priors (tau 0.9) and a client that reaches it."""
    name = f"cache-{uuid.uuid4().hex[:8]}"
    cfg = SharedCacheConfig(
        cache=CacheConfig(dim=384, min_cosine_similarity=0.9, min_candidate_coverage=0.6),
        prior_app=app,
        encoder_tag=encoder.tag,
        **kw,
    )
    handle = get_or_create_cache(cfg, name=name)
    return name, handle, PriorCacheClient(encoder, cache_name=name)


def test_client_end_to_end_with_real_encoder(ray_session, prior_app, text_encoder):
    name, handle, client = minilm_cache(prior_app[0], text_encoder)
    s1 = TextState(
        observation="You are in the kitchen. You see a fridge and a red apple.",
        candidates=CANDS,
        objective="Eat the apple.",
    )
    s2 = TextState(
        observation="You are in the kitchen. You see a fridge and a red apple!",
        candidates=("open fridge", "take red apple", "go north"),
        objective="Eat the apple.",
    )
    s3 = TextState(
        observation="A dusty library with tall shelves.", candidates=("read book", "go east")
    )
    r1 = client.get_priors([s1])
    r2 = client.get_priors([s1, s2, s3])
    assert r1[0].source is PriorSource.LM
    assert [r.source for r in r2] == [
        PriorSource.CACHE_EXACT,
        PriorSource.CACHE_SEMANTIC,
        PriorSource.LM,
    ]
    assert client.calls == 2  # one actor call per batch of states
    assert client.prior_version() == prior_app[1].model_version.remote().result()
    # The served model has no layout file: the actor relays the default layout from Serve.
    assert ray_session.get(handle.prompt_layout.remote()) == asdict(PromptConfig())
    assert client.prompt_config == PromptConfig()
    kill_cache(name)
    del handle


def test_a_sharded_cache_routes_by_key_and_serves_across_shards(
    ray_session, prior_app, text_encoder
):
    from cachellm_rl.cache.sharding import shard_name, shard_of

    ray = ray_session
    name, handle, client = minilm_cache(prior_app[0], text_encoder, num_shards=2)
    kitchen = "You are in the kitchen. You see a fridge and a red apple"
    s1 = TextState(observation=kitchen + ".", candidates=CANDS, objective="Eat the apple.")
    owner = shard_of(client.build_queries([s1])[0].exact_key, 2)
    # a near state whose exact key another shard owns
    s2 = next(
        s
        for s in (
            TextState(observation=kitchen + end, candidates=CANDS, objective="Eat the apple.")
            for end in ("!", "!!", " .", "?", "...", " !", ";")
        )
        if shard_of(client.build_queries([s])[0].exact_key, 2) != owner
    )
    s3 = TextState(observation="A dusty library.", candidates=("read book", "go east"))
    assert [r.source for r in client.get_priors([s1, s3])] == [PriorSource.LM] * 2
    r = client.get_priors([s1, s2])
    assert [x.source for x in r] == [PriorSource.CACHE_EXACT, PriorSource.CACHE_SEMANTIC]
    sizes = [ray.get(h.local_size.remote()) for h in client.shards()]
    assert sum(sizes) == 2 and sizes[owner] >= 1
    st = ray.get(handle.stats.remote())
    assert st.shards_reporting == 2 and st.size == 2 and st.lm_queries == 2
    assert st.hits_remote == 1 and st.decisions == 4 and st.hits_exact == 1
    kill_cache(name)
    with pytest.raises(ValueError):
        ray.get_actor(shard_name(name, 1), namespace=DEFAULT_NAMESPACE)
    del handle


def test_a_crashed_shard_comes_back_with_its_own_snapshot(
    ray_session, prior_app, text_encoder, tmp_path
):
    from cachellm_rl.cache.sharding import shard_name

    ray = ray_session
    name, handle, client = minilm_cache(
        prior_app[0], text_encoder, num_shards=2, snapshot_dir=str(tmp_path), max_restarts=2
    )
    states = [
        TextState(observation=f"Room {i}: a {c} box.", candidates=CANDS)
        for i, c in enumerate(("red", "blue", "green", "black", "white", "pink"))
    ]
    first = client.get_priors(states)
    sizes = [ray.get(h.local_size.remote()) for h in client.shards()]
    assert sum(sizes) == 6 and min(sizes) >= 1, sizes  # both shards own some states
    ray.get(handle.save.remote())  # every shard writes its own snapshot
    assert (tmp_path / "shard-0" / "LATEST").is_file()
    assert (tmp_path / "shard-1" / "LATEST").is_file()
    shard1 = ray.get_actor(shard_name(name, 1), namespace=DEFAULT_NAMESPACE)
    restored = crash_and_wait_for_restore(ray, shard1, "local_stats")
    assert restored.size == sizes[1] and restored.actor_restarts == 1
    again = client.get_priors(states)
    assert all(r.source is PriorSource.CACHE_EXACT for r in again)
    for a, b in zip(first, again, strict=True):
        np.testing.assert_allclose(a.logp, b.logp, atol=1e-6)
    st = ray.get(handle.stats.remote())
    assert st.shards_reporting == 2 and st.lm_queries == 6 and st.size == 6
    kill_cache(name)
    del handle


def _unit(v) -> np.ndarray:
    v = np.asarray(v, np.float32)
    return v / np.linalg.norm(v)


@pytest.mark.parametrize("rule", ["tau", "delta", "exact_only"])
def test_near_inflight_reuse_is_counted_as_reuse(ray_session, prior_app, rule):
    """Eight concurrent near states: under ``tau`` (cos 0.99 >= 0.9) one LM call answers all and
    the seven followers count as semantic reuse; under ``delta`` with no labels yet the rule
    refuses the reuse, so each state gets its own LM call; so does a cache without a semantic
    tier (``exact_only`` reuses exact keys only)."""
    ray = ray_session
    app, _ = prior_app
    name = f"cache-{uuid.uuid4().hex[:8]}"
    cfg = SharedCacheConfig(
        cache=CacheConfig(
            dim=8,
            min_cosine_similarity=0.9,
            refresh_probability=0.0,
            reuse_rule="tau" if rule == "exact_only" else rule,
            semantic_tier=rule != "exact_only",
            min_candidate_coverage=0.5,
        ),
        prior_app=app,
    )
    handle = get_or_create_cache(cfg, name=name)
    base = np.eye(8, dtype=np.float32)[0]
    embs = [_unit(base + 0.01 * i * np.eye(8, dtype=np.float32)[1]) for i in range(8)]
    refs = [handle.get_priors.remote([q(f"near-{i}", embs[i])]) for i in range(8)]
    results = [r[0] for r in ray.get(refs)]
    s = ray.get(handle.stats.remote())
    if rule == "tau":
        coalesced = [r.source for r in results].count(PriorSource.COALESCED)
        assert coalesced >= 1 and s.coalesced_semantic == coalesced  # the rest: plain hits
        assert s.lm_queries == 1 and s.hits_semantic == 7
        assert s.misses == 1 and s.hit_rate == pytest.approx(7 / 8)
    else:
        assert s.lm_queries == 8 and s.coalesced_semantic == 0 and s.hits == 0
    kill_cache(name)


def test_restarted_actor_keeps_adapted_parameters_and_labels(ray_session, prior_app, tmp_path):
    ray = ray_session
    app, _ = prior_app
    name = f"cache-{uuid.uuid4().hex[:8]}"
    cfg = SharedCacheConfig(
        cache=CacheConfig(dim=8, refresh_probability=0.05, reuse_rule="delta"),
        prior_app=app,
        snapshot_dir=str(tmp_path / "snap"),
        max_restarts=2,
    )
    handle = get_or_create_cache(cfg, name=name)
    e = np.eye(8, dtype=np.float32)
    ray.get(handle.get_priors.remote([q("s0", e[0])]))
    ray.get(handle.get_priors.remote([q("s1", _unit(e[0] + 0.3 * e[1]))]))  # labelled vs s0
    ray.get(handle.set_params.remote(321, 0.97, 0.123, 0.17))  # as a meta-optimiser would
    before = ray.get(handle.stats.remote())
    assert before.labels == 1
    ray.get(handle.save.remote())
    after = crash_and_wait_for_restore(ray, handle)
    assert after.capacity_entries == 321 and after.min_cosine_similarity == pytest.approx(0.97)
    assert after.refresh_probability == pytest.approx(0.123)
    assert after.explore_probability == pytest.approx(0.17)
    assert after.labels == 1 and after.size == 2
    kill_cache(name)


def test_encoder_handshake_new_versions_and_audits(ray_session, prior_app, tmp_path):
    """The cache hands its learned encoder to a following client; a new version re-embeds the
    entries and the client follows after one call whose embedding the cache ignores; a served
    semantic hit is audited by an LM call counted apart from the method's queries."""
    from dataclasses import replace

    from cachellm_rl.cache.learned_encoder import DecisionEncoderConfig, DecisionStateEncoder

    ray = ray_session
    app, _ = prior_app
    small = DecisionEncoderConfig(dim=32, ngram_buckets=1024, ngram_dim=16, hidden=64)
    enc = DecisionStateEncoder(small)
    enc.save(tmp_path / "enc")
    name = f"cache-{uuid.uuid4().hex[:8]}"
    cfg = SharedCacheConfig(
        cache=CacheConfig(dim=32, min_cosine_similarity=0.5, refresh_probability=0.0),
        prior_app=app,
        encoder_dir=str(tmp_path / "enc"),
        audit_probability=1.0,
    )
    handle = get_or_create_cache(cfg, name=name)
    client = PriorCacheClient(None, cache_name=name, follow_cache_encoder=True)
    client.prior_version()
    assert client.encoder.tag == enc.tag and client.encoder_syncs == 1
    states = [
        TextState(observation=f"you are in the kitchen {i} .", candidates=CANDS, objective="eat")
        for i in range(2)
    ]
    client.get_priors(states[:1])
    (r,) = client.get_priors(states[1:])
    assert r.source is PriorSource.CACHE_SEMANTIC
    ray.get(handle.drain.remote())
    s = ray.get(handle.stats.remote())
    assert s.lm_queries == 1 and s.audits == 1 and s.audit_queries == 1
    (rec,) = ray.get(handle.label_records.remote())  # what a run's labels/ file holds
    assert rec["source"] == "audit" and rec["shard"] == 0
    assert rec["query_text"] and rec["neighbour_text"] and rec["similarity"] < 1.0
    new = DecisionStateEncoder(replace(small, seed=3))
    out = ray.get(handle.set_encoder.remote(new.to_bytes()))
    assert out == {"tag": new.tag, "entries": 1}
    client.get_priors(states[1:])  # embedded with the old version: ignored, then the sync
    assert client.encoder.tag == new.tag and client.encoder_syncs == 2
    assert ray.get(handle.stats.remote()).encoder_mismatches == 1
    (r,) = client.get_priors(states[:1])  # re-keyed under the new tag: an exact hit
    assert r.source is PriorSource.CACHE_EXACT
    kill_cache(name)


def test_preflight_refuses_a_connector_whose_queries_do_not_fit_the_cache(ray_session, prior_app):
    """A cache sized for 8-d embeddings and env runners that would send MiniLM's 384-d ones:
    the run fails before any env runner starts, with one line naming the mismatch."""
    from cachellm_rl.algorithms.ps_dqn.connectors import (
        PriorConnectorConfig,
        preflight_prior_connector,
    )

    app, _ = prior_app
    name, _ = make_cache(app)
    try:
        with pytest.raises(ValueError, match=r"refuses this run's queries.*expects \(8,\)"):
            preflight_prior_connector(PriorConnectorConfig(cache_name=name, use_embeddings=True))
        # without embeddings (an exact-tier-only method) the same cache accepts the queries
        preflight_prior_connector(PriorConnectorConfig(cache_name=name, use_embeddings=False))
    finally:
        kill_cache(name)
    with pytest.raises(ValueError, match="no cache actor named"):
        preflight_prior_connector(PriorConnectorConfig(cache_name=name, use_embeddings=False))


def test_connector_degrades_to_uniform_priors_while_the_actor_is_gone(ray_session, prior_app):
    """The connector's actor call fails (the actor was killed): the decisions get uniform rows
    and are counted as actor failures; once an actor of that name is back, priors flow again."""
    from cachellm_rl.algorithms.ps_dqn.connectors import (
        PriorConnectorConfig,
        PriorObservationConnector,
    )

    app, _ = prior_app
    name, _ = make_cache(app)
    conn = PriorObservationConnector(
        config=PriorConnectorConfig(cache_name=name, use_embeddings=False)
    )
    from cachellm_rl.envs.text_env import (
        INFO_CANDIDATES,
        INFO_INVENTORY,
        INFO_OBJECTIVE,
        INFO_OBSERVATION,
    )

    info = {
        INFO_OBSERVATION: "a kitchen",
        INFO_CANDIDATES: list(CANDS),
        INFO_OBJECTIVE: "",
        INFO_INVENTORY: "",
    }
    rows = [None, None]
    conn._cache_rows([0, 1], [info, info], rows, 8)
    assert all(r is not None for r in rows) and conn.report.actor_failures == 0
    assert conn.report.latency_all_hit.total == 0  # the first call asked the LM
    conn._cache_rows([0, 1], [info, info], rows, 8)  # both cached now: an all-hit call
    assert conn.report.latency_all_hit.total == 1 and conn.report.latency_hit.total >= 2
    kill_cache(name)  # returns once the actor is gone for good: its name is released
    with pytest.raises(ValueError):
        ray_session.get_actor(name, namespace=DEFAULT_NAMESPACE)
    uniform = [object(), object()]
    rows = list(uniform)
    conn._cache_rows([0, 1], [info, info], rows, 8)  # no actor: no exception
    assert rows == uniform and conn.report.actor_failures == 2
    back = make_cache_named(app, name)  # keep the handle: the creator's handle keeps it alive
    conn._cache_rows([0, 1], [info, info], rows, 8)
    assert all(isinstance(r, np.ndarray) for r in rows) and conn.report.actor_failures == 2
    del back
    kill_cache(name)


def make_cache_named(app, name):
    cfg = SharedCacheConfig(
        cache=CacheConfig(dim=8, capacity_entries=100, refresh_probability=0.0), prior_app=app
    )
    return get_or_create_cache(cfg, name=name)


def test_clients_follow_a_served_unlisted_layout_even_when_they_ask_together(
    ray_session, tiny_model_dir, tmp_path
):
    """A prior served with its own layout file: concurrent first asks all get the layout
    (none is sent a guess), and the client's priors are the ones the model gives in it."""
    import shutil

    from ray import serve

    from cachellm_rl.cache.client import DirectPriorClient
    from cachellm_rl.prior.prompts import save_prompt_config
    from cachellm_rl.prior.scoring import CandidateScorer, ScorerConfig
    from cachellm_rl.prior.server import PriorServerConfig, deploy_prior_server

    model = tmp_path / "unlisted"
    shutil.copytree(tiny_model_dir, model)
    save_prompt_config(model, PromptConfig(candidates_header=None))
    scorer = ScorerConfig(model_dir=str(model))
    deploy_prior_server(PriorServerConfig(scorer=scorer, num_cpus=0), app_name="unlisted_prior")
    try:
        name, handle = make_cache("unlisted_prior")
        asks = ray_session.get([handle.prompt_layout.remote() for _ in range(6)])
        assert [a and a["candidates_header"] for a in asks] == [None] * 6 and all(asks)
        client = PriorCacheClient(None, cache_name=name)
        state = TextState(observation="A kitchen.", candidates=CANDS, objective="Eat.")
        (query,) = client.build_queries([state])
        assert "Admissible actions" not in query.request.prompt
        (got,) = client.get_priors([state])
        assert got.source is PriorSource.LM
        (want,) = DirectPriorClient(CandidateScorer(scorer)).get_priors([state])
        np.testing.assert_allclose(got.logp, want.logp, atol=1e-5)
        assert client.prior_version() == want.model_version  # the layout is in the version
        kill_cache(name)
    finally:
        serve.delete("unlisted_prior")
