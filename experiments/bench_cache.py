"""Benchmark of the prior cache and LM prior service.

Measures, on this machine, with real parts: FAISS flat vs HNSW search latency and HNSW recall@1 on
real all-MiniLM-L6-v2 embeddings of generated game-like state texts; ``get_priors`` latency
through the named cache actor (exact hits, semantic hits with encoding, misses served by a real
tiny GPT-2 in a real Serve deployment); single-flight LM calls; prefix-sharing speedup and
accuracy; bytes per cached entry at 100k entries; and (part ``verified``) one decision's latency
by outcome under the adaptive method's delta rule with a trained state encoder and its reuse
verifier, on real env states scored by the env's trained prior.

Usage:
    python experiments/bench_cache.py --json results/bench_cache.json [--n-entries 100000]

Prints a table and writes a flat JSON of the numbers. Embeddings are cached under
``artifacts/bench_cache/`` so reruns skip the (slow on CPU) encoding.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

ROOMS = [
    "kitchen",
    "pantry",
    "living room",
    "bedroom",
    "bathroom",
    "cellar",
    "garden",
    "shed",
    "hallway",
    "attic",
    "study",
    "garage",
    "porch",
    "backyard",
    "laundry room",
    "library",
]
OBJECTS = [
    "red apple",
    "yellow potato",
    "carrot",
    "knife",
    "wooden key",
    "iron key",
    "old book",
    "blue mug",
    "lamp",
    "toolbox",
    "cookbook",
    "salt",
    "onion",
    "chicken leg",
    "bread",
    "milk",
    "frying pan",
    "coin",
    "map",
    "candle",
    "rope",
    "hammer",
    "letter",
    "banana",
]
CONTAINERS = [
    "fridge",
    "counter",
    "table",
    "shelf",
    "chest",
    "cupboard",
    "oven",
    "sofa",
    "bookcase",
    "toolbox",
    "basket",
    "drawer",
    "workbench",
    "sink",
    "stove",
    "bed",
]
EXITS = ["north", "south", "east", "west"]
GOALS = [
    "prepare a meal following the cookbook",
    "find the key and unlock the door",
    "put the food in the fridge",
    "read the letter in the study",
    "light the candle",
    "bring the map to the porch",
    "cook the potato with the stove",
    "eat the red apple",
]
VERBS = ["take", "open", "examine", "close", "drop", "eat", "cook", "slice", "put"]


def state_text(rng: np.random.Generator) -> tuple[str, tuple[str, ...]]:
    """One game-like state text and its admissible actions."""
    room = ROOMS[rng.integers(len(ROOMS))]
    goal = GOALS[rng.integers(len(GOALS))]
    conts = rng.choice(CONTAINERS, size=int(rng.integers(1, 4)), replace=False)
    objs = rng.choice(OBJECTS, size=int(rng.integers(1, 5)), replace=False)
    exits = rng.choice(EXITS, size=int(rng.integers(1, 3)), replace=False)
    inv = rng.choice(OBJECTS, size=int(rng.integers(0, 3)), replace=False)
    placed = [f"a {o} on the {conts[i % len(conts)]}" for i, o in enumerate(objs)]
    closed = f" The {conts[0]} is closed." if rng.random() < 0.5 else ""
    text = (
        f"Goal: {goal}. You are in the {room}. You see {', '.join(placed)}.{closed} "
        f"Exits lead {' and '.join(exits)}. Inventory: {', '.join(inv) if len(inv) else 'nothing'}."
        f" Score {int(rng.integers(0, 10))} of 10, move {int(rng.integers(1, 200))}."
    )
    cands = [f"go {e}" for e in exits] + [f"take {o}" for o in objs] + [f"open {conts[0]}"]
    cands += [f"{VERBS[rng.integers(len(VERBS))]} {o}" for o in inv]
    return text, tuple(dict.fromkeys(cands))


def paraphrase(text: str) -> str:
    """A near-duplicate of a state text (what a semantic hit looks like)."""
    return text.replace("You see", "You can see").replace("Exits lead", "There are exits")


def generate_states(n: int, seed: int) -> list[tuple[str, tuple[str, ...]]]:
    rng = np.random.default_rng(seed)
    seen: dict[str, tuple[str, ...]] = {}
    while len(seen) < n:
        t, c = state_text(rng)
        seen.setdefault(t, c)
    return list(seen.items())


def embed_cached(encoder, texts: list[str], cache_dir: Path, label: str) -> np.ndarray:
    """Encode texts once; reuse ``cache_dir/<label>-<hash>.npy`` afterwards."""
    h = hashlib.blake2b("\n".join(texts).encode(), digest_size=8).hexdigest()
    path = cache_dir / f"{label}-{len(texts)}-{h}.npy"
    if path.is_file():
        return np.load(path, allow_pickle=False)
    out = np.empty((len(texts), encoder.dim), np.float32)
    step = 512
    for i in tqdm(range(0, len(texts), step), desc=f"encoding {label}", unit="batch"):
        out[i : i + step] = encoder.encode(texts[i : i + step])
    cache_dir.mkdir(parents=True, exist_ok=True)
    np.save(path, out, allow_pickle=False)
    return out


def p50_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1e3


def rss_bytes() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


# -- 1. index latency and recall ----------------------------------------------------------------
def bench_index(emb: np.ndarray, queries: np.ndarray, args) -> dict:
    import faiss

    from cachellm_rl.cache.index import IndexConfig, PriorIndex

    faiss.omp_set_num_threads(1)  # one query at a time: threads only add overhead
    n = len(emb)
    ids = np.arange(n, dtype=np.int64)
    flat = PriorIndex(IndexConfig(dim=emb.shape[1], hnsw_threshold=n + 1))
    flat.add(ids, emb)
    t0 = time.perf_counter()
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    hnsw = PriorIndex(
        IndexConfig(
            dim=emb.shape[1],
            hnsw_threshold=0,
            hnsw_m=args.hnsw_m,
            hnsw_ef_construction=args.hnsw_ef_construction,
            hnsw_ef_search=args.hnsw_ef_search,
        )
    )
    hnsw.add(ids, emb)
    build_s = time.perf_counter() - t0
    faiss.omp_set_num_threads(1)
    assert hnsw.kind == "hnsw" and flat.kind == "flat"
    out = {"hnsw_build_s": build_s}
    for name, idx in (("flat", flat), ("hnsw", hnsw)):
        for q in queries[:20]:
            idx.search(q, 1)
        ts = []
        for q in queries:
            t = time.perf_counter()
            idx.search(q, 1)
            ts.append(time.perf_counter() - t)
        out[f"{name}_p50_ms"] = p50_ms(ts)
        out[f"{name}_p95_ms"] = float(np.percentile(ts, 95) * 1e3)
    fs, fi = flat.search(queries, 1)
    hs, hi = hnsw.search(queries, 1)
    # Count a tie (a different id with the same similarity, e.g. identical texts) as correct.
    correct = (fi[:, 0] == hi[:, 0]) | (hs[:, 0] >= fs[:, 0] - 1e-6)
    out["recall_at_1"] = float(correct.mean())
    out["recall_at_1_same_id"] = float((fi[:, 0] == hi[:, 0]).mean())
    del flat, hnsw
    gc.collect()
    return out


# -- 2. memory per entry ------------------------------------------------------------------------
def bench_memory(states, emb: np.ndarray) -> dict:
    from cachellm_rl.cache.adaptive import AdaptiveCache, CacheConfig
    from cachellm_rl.contracts import CacheQuery, PriorRequest, PriorResponse

    n = len(emb)
    gc.collect()
    before = rss_bytes()
    cache = AdaptiveCache(
        CacheConfig(dim=emb.shape[1], capacity_entries=n, refresh_probability=0.0),
        model_version="bench",
    )
    t0 = time.perf_counter()
    for i, ((text, cands), e) in enumerate(
        tqdm(zip(states, emb, strict=True), total=n, desc="filling cache", unit="entry")
    ):
        logp = np.full(len(cands), -np.log(len(cands)), np.float32)
        cache.insert(
            CacheQuery(
                exact_key=hashlib.blake2b(text.encode(), digest_size=16).digest(),
                embedding=e,
                request=PriorRequest(prompt=text, candidates=cands),
            ),
            PriorResponse(logp=logp, model_version="bench"),
        )
        if i == 0:
            insert_t0 = time.perf_counter()
    fill_s = time.perf_counter() - t0
    gc.collect()
    after = rss_bytes()
    mean_cands = float(np.mean([len(c) for _, c in states]))
    out = {
        "bytes_per_entry": (after - before) / n,
        "fill_s": fill_s,
        "insert_mean_ms": (time.perf_counter() - insert_t0) / max(1, n - 1) * 1e3,
        "mean_candidates_per_entry": mean_cands,
        "index_kind": cache.index.kind,
    }
    del cache
    gc.collect()
    return out


# -- 3. actor latency ---------------------------------------------------------------------------
def bench_actor(states, encoder, model_dir: Path, args) -> dict:
    import ray

    from cachellm_rl.cache.actor import SharedCacheConfig, get_or_create_cache
    from cachellm_rl.cache.adaptive import CacheConfig
    from cachellm_rl.cache.client import PriorCacheClient, TextState
    from cachellm_rl.config import init_ray
    from cachellm_rl.prior.scoring import ScorerConfig
    from cachellm_rl.prior.server import PriorServerConfig, deploy_prior_server

    init_ray(num_cpus=os.cpu_count() or 2)
    deploy_prior_server(
        PriorServerConfig(
            scorer=ScorerConfig(model_dir=str(model_dir)),
            max_batch_size=16,
            batch_wait_timeout_s=0.005,
            num_cpus=0.5,
        ),
        app_name="bench_prior",
    )
    handle = get_or_create_cache(
        SharedCacheConfig(
            cache=CacheConfig(
                dim=encoder.dim,
                capacity_entries=100_000,
                min_cosine_similarity=0.9,
                min_candidate_coverage=0.75,
                refresh_probability=0.0,
            ),
            prior_app="bench_prior",
            encoder_tag=encoder.tag,
        ),
        name="bench_cache",
    )
    client = PriorCacheClient(encoder, cache_name="bench_cache")
    as_state = [TextState(observation=t, candidates=c) for t, c in states]
    iters = args.actor_iters

    # misses: 8 new states per call, each scored by the tiny GPT-2 behind Serve
    miss_ts = []
    pos = 0
    for _ in tqdm(range(args.miss_iters + 3), desc="actor misses", unit="call"):
        batch = as_state[pos : pos + 8]
        pos += 8
        queries = client.build_queries(batch)  # encoding outside the timed region
        t = time.perf_counter()
        res = ray.get(handle.get_priors.remote(queries))
        # Generated states can be near-duplicates of earlier ones (a real semantic hit):
        # only calls where all 8 went to the LM count as miss latency.
        if all(r.source.value == "lm" for r in res):
            miss_ts.append(time.perf_counter() - t)
    miss_ts = miss_ts[3:]

    # exact hits: the same 8 (already cached) states
    queries = client.build_queries(as_state[:8])
    for _ in range(20):
        ray.get(handle.get_priors.remote(queries))
    exact_ts = []
    for _ in tqdm(range(iters), desc="actor exact hits", unit="call"):
        t = time.perf_counter()
        res = ray.get(handle.get_priors.remote(queries))
        exact_ts.append(time.perf_counter() - t)
    assert all(r.source.value == "cache_exact" for r in res)

    # semantic hits, encoding included: near-duplicates of cached states, new text every call
    cached = as_state[: pos - 8]
    sem_ts, sem_all_hit = [], 0
    n_sem = min(args.semantic_iters, len(cached) // 8)
    for i in tqdm(range(n_sem), desc="actor semantic hits", unit="call"):
        batch = [
            TextState(observation=paraphrase(s.observation) + f" ({i})", candidates=s.candidates)
            for s in cached[i * 8 % len(cached) : i * 8 % len(cached) + 8]
        ]
        if len(batch) < 8:
            continue
        t = time.perf_counter()
        res = client.get_priors(batch)
        dt = time.perf_counter() - t
        if all(r.source.value == "cache_semantic" for r in res):
            sem_ts.append(dt)
            sem_all_hit += 1
    stats = ray.get(handle.stats.remote())

    # single flight: 8 concurrent callers (separate Ray tasks) ask for the same new state
    new_state = TextState(
        observation="A brand new state nobody has seen, in the observatory.",
        candidates=("look through telescope", "go down", "take star chart"),
    )
    (q_new,) = client.build_queries([new_state])
    lm_before = ray.get(handle.stats.remote()).lm_queries

    @ray.remote(num_cpus=0)
    class Caller:
        def __init__(self):
            from cachellm_rl.cache.actor import get_or_create_cache as get

            self.actor = get(name="bench_cache")

        def ready(self):
            return ray.get(self.actor.ping.remote())

        def call(self, query):
            return ray.get(self.actor.get_priors.remote([query]))[0].source.value

    callers = [Caller.remote() for _ in range(8)]
    ray.get([c.ready.remote() for c in callers])  # all 8 started before the burst
    sources = ray.get([c.call.remote(q_new) for c in callers])
    sf_stats = ray.get(handle.stats.remote())
    learned = bench_learned_semantic_hits(as_state[: pos - 8], args)
    return {
        **learned,
        "actor_exact_hit_batch8_p50_ms": p50_ms(exact_ts),
        "actor_exact_hit_batch8_p95_ms": float(np.percentile(exact_ts, 95) * 1e3),
        "actor_semantic_hit_batch8_p50_ms": p50_ms(sem_ts) if sem_ts else float("nan"),
        "actor_semantic_calls_all_hit": sem_all_hit,
        "actor_semantic_calls": n_sem,
        "actor_miss_batch8_p50_ms": p50_ms(miss_ts),
        "actor_miss_batch8_p95_ms": float(np.percentile(miss_ts, 95) * 1e3),
        "actor_hit_p50_ms_inside_actor": stats.latency_hit.quantile(0.5),
        "actor_miss_p50_ms_inside_actor": stats.latency_miss.quantile(0.5),
        "single_flight_lm_calls": sf_stats.lm_queries - lm_before,
        "single_flight_sources": sorted(sources),
    }


def bench_learned_semantic_hits(cached_states, args) -> dict:
    """One decision's semantic hit with the learned encoder: encoding in the caller plus the
    actor call, for batches of 1 and 8 (near-duplicates, new text every call). The encoder is
    untrained here (its speed does not depend on its weights), so the cache uses a loose fixed
    threshold to make the hits happen."""
    import ray

    from cachellm_rl.cache.actor import SharedCacheConfig, get_or_create_cache
    from cachellm_rl.cache.adaptive import CacheConfig
    from cachellm_rl.cache.client import PriorCacheClient, TextState
    from cachellm_rl.cache.learned_encoder import DecisionStateEncoder

    encoder = DecisionStateEncoder()
    handle = get_or_create_cache(
        SharedCacheConfig(
            cache=CacheConfig(
                dim=encoder.dim,
                capacity_entries=100_000,
                min_cosine_similarity=0.5,
                min_candidate_coverage=0.75,
                refresh_probability=0.0,
            ),
            prior_app="bench_prior",
            encoder_tag=encoder.tag,
        ),
        name="bench_cache_learned",
    )
    client = PriorCacheClient(encoder, cache_name="bench_cache_learned")
    client.get_priors(cached_states[:64])  # fill (misses)
    out: dict = {}
    for batch in (1, 8):
        ts = []
        for i in tqdm(range(args.semantic_iters), desc=f"learned semantic x{batch}", unit="call"):
            states = [
                TextState(
                    observation=paraphrase(s.observation) + f" ({i}.{j})", candidates=s.candidates
                )
                for j, s in enumerate(cached_states[(i * batch) % 56 : (i * batch) % 56 + batch])
            ]
            t = time.perf_counter()
            res = client.get_priors(states)
            dt = time.perf_counter() - t
            if all(r.source.value == "cache_semantic" for r in res):
                ts.append(dt)
        out[f"learned_semantic_hit_batch{batch}_p50_ms"] = p50_ms(ts) if ts else float("nan")
        out[f"learned_semantic_hit_batch{batch}_calls"] = len(ts)
    out["learned_encode_one_text_p50_ms"] = p50_ms(
        [
            _timed(encoder.encode, [paraphrase(s.observation) + f" [{k}]"])
            for k, s in enumerate(cached_states[:50])
        ]
    )
    ray.kill(handle)
    return out


def bench_verified_decisions(args) -> dict:
    """One decision at a time through the ``adaptive`` method's cache: the delta rule, a trained
    state encoder with its reuse verifier (``--state-encoder``, as ``cache_fidelity.py`` writes
    it), the env's trained prior behind Serve, on the states a perturbed expert visits in the
    env's test games, in visit order (as an env runner asks). The cache starts empty, so the
    first decisions are misses that give the correctness model its labels; semantic hits come
    once its bound allows them. Per outcome (semantic hit, exact hit, LM), the client-side time
    of one ``get_priors`` call of one state, encoding included. Nothing else runs in this
    process while it is timed; other load on the machine is not controlled."""
    from dataclasses import replace

    import ray

    from cachellm_rl.algorithms.ps_dqn.methods import MethodSettings, cache_config_for
    from cachellm_rl.algorithms.ps_dqn.suite import preset, suite_games
    from cachellm_rl.cache.actor import get_or_create_cache
    from cachellm_rl.cache.client import PriorCacheClient
    from cachellm_rl.cache.fidelity import collect_states
    from cachellm_rl.cache.learned_encoder import DecisionStateEncoder
    from cachellm_rl.config import init_ray
    from cachellm_rl.prior.scoring import ScorerConfig
    from cachellm_rl.prior.server import PriorServerConfig, deploy_prior_server

    cfg = preset("quick", env=args.verified_env, split="test", num_games=0, progress=False)
    enc_dir = Path(args.state_encoder or f"artifacts/encoders/{args.verified_env}")
    if not (enc_dir / "decision_encoder.json").is_file():
        print(f"verified: skipped, no learned encoder in {enc_dir} (cache_fidelity.py trains it)")
        return {}
    if not (Path(str(cfg.prior_model)) / "config.json").is_file():
        print(f"verified: skipped, no prior in {cfg.prior_model} (`cachellm-rl prior train`)")
        return {}
    encoder = DecisionStateEncoder.load(enc_dir)
    if encoder.verifier is None:
        print(f"verified: the encoder in {enc_dir} has no reuse verifier; timing without one")
    games = suite_games(cfg)
    logged = collect_states(
        args.verified_env,
        games,
        episodes_per_game=args.verified_episodes,
        seed=args.verified_seed,
        progress=True,
    )
    init_ray(num_cpus=os.cpu_count() or 2)
    app = "bench_prior_verified"
    deploy_prior_server(
        PriorServerConfig(
            scorer=ScorerConfig(
                model_dir=str(cfg.prior_model), prior_temperature=cfg.prior_temperature
            ),
            num_cpus=0.5,
        ),
        app_name=app,
    )
    settings = MethodSettings(state_encoder_dir=str(enc_dir.resolve()), prior_app=app)
    settings = replace(settings, correctness=replace(settings.correctness, delta=args.delta))
    cache_cfg = cache_config_for("adaptive", settings, env=args.verified_env)
    assert cache_cfg is not None
    name = "bench_cache_verified"
    handle = get_or_create_cache(cache_cfg, name=name)
    client = PriorCacheClient(encoder, cache_name=name)
    times: dict[str, list[float]] = {}
    inside: dict[str, list[float]] = {}  # the actor's own time to the answer
    encode: dict[str, list[float]] = {}  # the caller's state encoding
    for ls in tqdm(logged, desc=f"verified decisions ({args.verified_env})", unit="decision"):
        t = time.perf_counter()
        (res,) = client.get_priors([ls.state])
        times.setdefault(res.source.value, []).append(time.perf_counter() - t)
        inside.setdefault(res.source.value, []).append(res.latency_ms / 1e3)
        encode.setdefault(res.source.value, []).append(client.last_encode_s)
    # the same states again: exact hits, the baseline of the path (RPC, actor, encoding)
    for ls in logged[: args.semantic_iters]:
        t = time.perf_counter()
        (res,) = client.get_priors([ls.state])
        times.setdefault(f"repeat_{res.source.value}", []).append(time.perf_counter() - t)
    stats = ray.get(handle.stats.remote())
    ray.kill(handle)
    from ray import serve

    serve.delete(app)
    out: dict = {
        "verified_env": args.verified_env,
        "verified_delta": args.delta,
        "verified_decisions": len(logged),
        "verified_with_verifier": encoder.verifier is not None,
        "verified_verifier_calls": int(stats.verifier_calls),
        "verified_actor_hit_p50_ms_inside_actor": stats.latency_hit.quantile(0.5),
    }
    for source, ts in sorted(times.items()):
        out[f"verified_{source}_decisions"] = len(ts)
        out[f"verified_{source}_p50_ms"] = p50_ms(ts)
        out[f"verified_{source}_p95_ms"] = float(np.percentile(ts, 95) * 1e3)
        if source in inside:
            out[f"verified_{source}_inside_actor_p50_ms"] = p50_ms(inside[source])
            out[f"verified_{source}_encode_p50_ms"] = p50_ms(encode[source])
    return out


def _timed(fn, *a) -> float:
    t = time.perf_counter()
    fn(*a)
    return time.perf_counter() - t


# -- 4. prefix sharing --------------------------------------------------------------------------
def bench_prefix_sharing(args) -> dict:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from cachellm_rl.prior.scoring import candidate_token_logprobs

    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=8000,
        n_positions=512,
        n_embd=args.ps_embd,
        n_layer=args.ps_layers,
        n_head=max(1, args.ps_embd // 64),
    )
    model = GPT2LMHeadModel(cfg).eval()
    dev = torch.device("cpu")
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, 8000, size=256).tolist()
    cands = [rng.integers(0, 8000, size=int(rng.integers(2, 7))).tolist() for _ in range(24)]

    def concatenated():
        # Baseline: the 24 prompt+candidate sequences in one right-padded batch.
        L = max(len(c) for c in cands)
        ids = torch.zeros((24, 256 + L), dtype=torch.long)
        for i, c in enumerate(cands):
            ids[i, : 256 + len(c)] = torch.tensor(prompt + c)
        with torch.inference_mode():
            logp = torch.log_softmax(model(input_ids=ids).logits.float(), -1)
        out = []
        for i, c in enumerate(cands):
            tgt = ids[i, 256 : 256 + len(c)]
            out.append(logp[i, 255 : 255 + len(c)].gather(-1, tgt[:, None])[:, 0].double().numpy())
        return out

    def shared():
        return candidate_token_logprobs(model, prompt, cands, device=dev)

    a, b = shared(), concatenated()
    diff = max(float(np.max(np.abs(x - y))) for x, y in zip(a, b, strict=True))
    times = {}
    for name, fn in (("shared", shared), ("concatenated", concatenated)):
        fn()
        ts = []
        for _ in range(args.ps_iters):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        times[name] = statistics.median(ts)
    return {
        "prefix_sharing_speedup": times["concatenated"] / times["shared"],
        "prefix_sharing_max_abs_diff": diff,
        "prefix_sharing_shared_ms": times["shared"] * 1e3,
        "prefix_sharing_concatenated_ms": times["concatenated"] * 1e3,
        "prefix_sharing_model": f"GPT-2 {args.ps_layers} layers x {args.ps_embd} hidden, fp32, CPU",
    }


def bench_minilm_parts(args, skip: set[str]) -> dict:
    """Parts index, memory and actor: generated texts embedded with MiniLM."""
    from cachellm_rl.cache.encoders import TextEncoderConfig, TextStateEncoder
    from cachellm_rl.prior.tiny_model import TinyLMConfig, make_tiny_causal_lm

    art = Path("artifacts/bench_cache")
    states = generate_states(args.n_entries + args.n_queries, seed=0)
    index_states, query_states = states[: args.n_entries], states[args.n_entries :]
    encoder = TextStateEncoder(TextEncoderConfig(batch_size=128))
    emb = embed_cached(encoder, [t for t, _ in index_states], art, "entries")
    # Queries: near-duplicates of indexed states plus unseen states (half each).
    half = args.n_queries // 2
    q_texts = [paraphrase(t) for t, _ in index_states[:half]] + [t for t, _ in query_states[half:]]
    q_emb = embed_cached(encoder, q_texts, art, "queries")
    n = args.n_entries
    tag = f"{n // 1000}k" if n % 1000 == 0 else str(n)
    out: dict = {"n_entries": n, "embedding_dim": int(emb.shape[1])}
    if "index" not in skip:
        r = bench_index(emb, q_emb, args)
        out.update(
            {
                f"flat_{tag}_p50_ms": r["flat_p50_ms"],
                f"hnsw_{tag}_p50_ms": r["hnsw_p50_ms"],
                f"flat_{tag}_p95_ms": r["flat_p95_ms"],
                f"hnsw_{tag}_p95_ms": r["hnsw_p95_ms"],
                f"hnsw_{tag}_recall_at_1": r["recall_at_1"],
                f"hnsw_{tag}_recall_at_1_same_id": r["recall_at_1_same_id"],
                f"hnsw_{tag}_build_s": r["hnsw_build_s"],
                "hnsw_params": f"M={args.hnsw_m} efConstruction={args.hnsw_ef_construction} "
                f"efSearch={args.hnsw_ef_search}",
            }
        )
    if "memory" not in skip:
        r = bench_memory(index_states, emb)
        out.update(
            {
                f"bytes_per_entry_{tag}": r["bytes_per_entry"],
                f"cache_fill_{tag}_s": r["fill_s"],
                "mean_candidates_per_entry": r["mean_candidates_per_entry"],
            }
        )
    if "actor" not in skip:
        with tempfile.TemporaryDirectory() as d:
            model_dir = Path(d) / "tiny_gpt2"
            make_tiny_causal_lm(
                model_dir,
                [t for t, _ in states[:2000]],
                TinyLMConfig(n_layer=2, n_head=2, n_embd=64),
            )
            out.update(bench_actor(index_states, encoder, model_dir, args))
            out["actor_miss_model"] = (
                "GPT-2 2 layers x 64 hidden, word tokenizer, CPU, Serve batch<=16"
            )
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--json", type=Path, default=Path("results/bench_cache.json"))
    ap.add_argument("--n-entries", type=int, default=100_000)
    ap.add_argument("--n-queries", type=int, default=1000)
    ap.add_argument("--hnsw-m", type=int, default=32)
    ap.add_argument("--hnsw-ef-construction", type=int, default=80)
    ap.add_argument("--hnsw-ef-search", type=int, default=64)
    ap.add_argument("--actor-iters", type=int, default=500)
    ap.add_argument("--miss-iters", type=int, default=40)
    ap.add_argument("--semantic-iters", type=int, default=100)
    ap.add_argument("--ps-layers", type=int, default=6)
    ap.add_argument("--ps-embd", type=int, default=512)
    ap.add_argument("--ps-iters", type=int, default=10)
    ap.add_argument(
        "--verified-env", default="textworld", choices=("textworld", "babyai", "alfworld")
    )
    ap.add_argument(
        "--state-encoder",
        type=Path,
        default=None,
        help="learned encoder (+ verifier) for part verified (default artifacts/encoders/<env>)",
    )
    ap.add_argument("--delta", type=float, default=0.05, help="error budget of part verified")
    ap.add_argument("--verified-episodes", type=int, default=2, help="expert episodes per game")
    ap.add_argument("--verified-seed", type=int, default=0)
    ap.add_argument("--skip", default="", help="comma list of: index,memory,actor,prefix,verified")
    args = ap.parse_args(argv)
    if args.n_entries < 100:
        ap.error("--n-entries must be >= 100")
    skip = set(filter(None, args.skip.split(",")))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    t_start = time.perf_counter()
    out: dict = {}
    if not {"index", "memory", "actor"} <= skip:
        out.update(bench_minilm_parts(args, skip))
    if "prefix" not in skip:
        out.update(bench_prefix_sharing(args))
    if "verified" not in skip:
        out.update(bench_verified_decisions(args))
    out["wall_s"] = time.perf_counter() - t_start
    out["machine"] = f"{platform.machine()} {os.cpu_count()} CPUs, Python {sys.version.split()[0]}"
    print_table(out)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2, default=str))
    print(f"\nwrote {args.json}")
    if not {"actor", "verified"} <= skip:
        import ray
        from ray import serve

        serve.shutdown()
        ray.shutdown()
    return out


TARGETS = {
    "learned_semantic_hit_batch1_p50_ms": ("<=", 10.0),
    "verified_cache_semantic_p50_ms": ("<=", 10.0),
    "hnsw_100k_p50_ms": ("<=", 0.5),
    "hnsw_100k_recall_at_1": (">=", 0.98),
    "actor_exact_hit_batch8_p50_ms": ("<=", 2.0),
    "single_flight_lm_calls": ("<=", 1),
    "prefix_sharing_speedup": (">=", 3.0),
    "prefix_sharing_max_abs_diff": ("<=", 1e-4),
}


def print_table(out: dict) -> None:
    print(f"\n{'metric':42s} {'value':>14s}  target")
    print("-" * 72)
    for k, v in out.items():
        val = f"{v:14.4g}" if isinstance(v, float) else f"{v!s:>14s}"
        tgt = ""
        if k in TARGETS:
            op, t = TARGETS[k]
            ok = v <= t if op == "<=" else v >= t
            tgt = f"{op} {t}  {'met' if ok else 'MISSED'}"
        print(f"{k:42s} {val}  {tgt}")


if __name__ == "__main__":
    main()
