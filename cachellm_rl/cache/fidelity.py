"""Measuring how faithful semantic reuse is, on logged states (see docs/cache.md, "Cache
fidelity").

The functional core of ``experiments/cache_fidelity.py``:
collect the distinct states a perturbed expert visits, score each once with the prior LM, then

- label pairs of states (would reusing one's prior for the other be correct?) to train the
  learned encoder (:func:`training_pairs`);
- replay the states in visit order through an idealised cache (every earlier state cached) and
  measure, for a reuse rule, the share of lookups served from a neighbour and how often a
  served prior was wrong (:func:`simulate_tau`, :func:`simulate_delta`).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from cachellm_rl.cache.adaptive import align_prior
from cachellm_rl.cache.client import TextState
from cachellm_rl.cache.correctness import CorrectnessConfig, CorrectnessModel, tv_distance
from cachellm_rl.cache.verifier import ReuseVerifier, VerifierPair
from cachellm_rl.stats import wilson_interval


@dataclass(frozen=True)
class LoggedState:
    """A distinct state visited while logging.

    Attributes:
        state: Its texts.
        game: The game it came from.
    """

    state: TextState
    game: str


def collect_states(
    env_id: str,
    games: Sequence[str],
    *,
    episodes_per_game: int = 3,
    perturb_probability: float = 0.3,
    seed: int = 0,
    progress: bool = True,
) -> list[LoggedState]:
    """Distinct states (text and candidate set) a perturbed expert visits, in visit order."""
    from cachellm_rl.envs.demos import collect_demonstrations
    from cachellm_rl.envs.registry import make_text_env

    env = make_text_env(env_id, {"games": list(games), "expert": True, "game_order": "cycle"})
    try:
        demos, _ = collect_demonstrations(
            env,
            list(games),
            episodes_per_game=episodes_per_game,
            perturb_probability=perturb_probability,
            seed=seed,
            progress=progress,
        )
    finally:
        env.close()
    seen: set[tuple[str, tuple[str, ...]]] = set()
    out = []
    for d in demos:
        s = TextState(
            observation=d.decision.observation,
            candidates=tuple(d.decision.candidates),
            objective=d.decision.objective,
            inventory=d.decision.inventory,
        )
        key = (s.key_text(), tuple(sorted(s.candidates)))
        if key not in seen:
            seen.add(key)
            out.append(LoggedState(state=s, game=d.game))
    return out


def pair_label(
    a: TextState,
    logp_a: np.ndarray,
    b: TextState,
    logp_b: np.ndarray,
    *,
    max_tv: float,
    min_cov: float,
) -> bool | None:
    """Whether serving ``b``'s prior for state ``a`` is a correct reuse; None when ``b`` does not
    cover enough of ``a``'s candidates to be served at all."""
    m = pair_measure(a, logp_a, b, logp_b, min_cov=min_cov)
    return None if m is None else bool(m[0] and m[1] <= max_tv)


def pair_measure(
    a: TextState, logp_a: np.ndarray, b: TextState, logp_b: np.ndarray, *, min_cov: float
) -> tuple[bool, float] | None:
    """``(same top action, total-variation distance)`` of serving ``b``'s prior for ``a``; None
    when ``b`` does not cover enough of ``a``'s candidates."""
    aligned, cov = align_prior(b.candidates, logp_b, a.candidates, 2.0)
    if cov < min_cov:
        return None
    same = int(np.argmax(logp_a)) == int(np.argmax(aligned))
    return same, tv_distance(logp_a, aligned)


def training_pairs(
    states: Sequence[TextState],
    logps: Sequence[np.ndarray],
    embeddings: np.ndarray,
    *,
    near: int = 8,
    random: int = 4,
    max_tv: float = 0.2,
    min_cov: float = 0.75,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Labelled pairs for the learned encoder: each state with its ``near`` most similar other
    states under ``embeddings`` (the hard cases: close in the old space, reuse maybe wrong)
    and ``random`` random others.

    Returns:
        ``(index_a, index_b, correct, tv)``; pairs whose candidates do not cover are left out.
    """
    n = len(states)
    rng = np.random.default_rng(seed)
    sims = embeddings @ embeddings.T
    np.fill_diagonal(sims, -np.inf)
    ia, ib, ys, tvs = [], [], [], []
    for i in range(n):
        order = np.argsort(-sims[i])[:near].tolist()
        others = rng.choice(n, size=min(random, n), replace=False).tolist() if n > 1 else []
        for j in dict.fromkeys(order + others):
            if j == i:
                continue
            m = pair_measure(states[i], logps[i], states[j], logps[j], min_cov=min_cov)
            if m is not None:
                ia.append(i)
                ib.append(j)
                ys.append(m[0] and m[1] <= max_tv)
                tvs.append(m[1])
    return (
        np.asarray(ia, np.int64),
        np.asarray(ib, np.int64),
        np.asarray(ys, bool),
        np.asarray(tvs, np.float64),
    )


@dataclass(frozen=True)
class StreamResult:
    """What a reuse rule did over a replay of logged states.

    Attributes:
        rule: Rule and its setting (e.g. ``tau=0.95``, ``delta=0.05``).
        lookups: States looked up (all but the first).
        served: Lookups answered from a neighbour.
        served_wrong: Of which the served prior was not a correct reuse.
        labels: Labels the rule's correctness model was fitted on (0 for ``tau``).
        hit_rate: ``served / lookups``.
        served_error_rate: ``served_wrong / served`` (nan when nothing was served).
        served_error_wilson_lo: Wilson 95% lower bound of that rate.
        served_error_wilson_hi: Wilson 95% upper bound.
        error_per_lookup: ``served_wrong / lookups``.
    """

    rule: str
    lookups: int
    served: int
    served_wrong: int
    labels: int
    hit_rate: float
    served_error_rate: float
    served_error_wilson_lo: float
    served_error_wilson_hi: float
    error_per_lookup: float

    @classmethod
    def of(cls, rule: str, lookups: int, served: int, wrong: int, labels: int) -> StreamResult:
        """Fill the rates from the counts."""
        lo, hi = wilson_interval(wrong, served) if served else (float("nan"), float("nan"))
        return cls(
            rule=rule,
            lookups=lookups,
            served=served,
            served_wrong=wrong,
            labels=labels,
            hit_rate=served / lookups if lookups else 0.0,
            served_error_rate=wrong / served if served else float("nan"),
            served_error_wilson_lo=lo,
            served_error_wilson_hi=hi,
            error_per_lookup=wrong / lookups if lookups else 0.0,
        )

    def as_dict(self) -> dict:
        """JSON-ready."""
        return asdict(self)


def _nearest_earlier(embeddings: np.ndarray, i: int, scan: int) -> tuple[list[int], np.ndarray]:
    """Indices of the ``scan`` states before ``i`` most similar to it, most similar first (the
    neighbours the cache's index would return), and the similarities of all states before
    ``i``."""
    sims = embeddings[:i] @ embeddings[i]
    return np.argsort(-sims)[:scan].tolist(), sims


def nearest_usable(
    states: Sequence[TextState], embeddings: np.ndarray, i: int, *, min_cov: float, scan: int = 4
) -> tuple[int, float] | None:
    """Index and similarity of the most similar earlier state (``< i``) whose candidates cover
    state ``i``'s, among the ``scan`` most similar (as the cache's index does)."""
    if i == 0:
        return None
    nearest, sims = _nearest_earlier(embeddings, i, scan)
    for j in nearest:
        cands = set(states[j].candidates)
        cov = sum(1 for c in states[i].candidates if c in cands) / len(states[i].candidates)
        if cov >= min_cov:
            return j, float(sims[j])
    return None


def verifier_pair(
    a: TextState, b: TextState, logp_b: np.ndarray, similarity: float
) -> VerifierPair:
    """The reuse verifier's view of serving ``b``'s prior for ``a`` (as the cache builds it:
    ``b``'s prior aligned to ``a``'s candidates)."""
    aligned, _ = align_prior(b.candidates, logp_b, a.candidates, 2.0)
    return VerifierPair(
        text_a=a.key_text(),
        text_b=b.key_text(),
        cos=float(similarity),
        candidates_a=tuple(a.candidates),
        candidates_b=tuple(b.candidates),
        logp_b=tuple(float(v) for v in aligned),
    )


def verifier_pairs(
    states: Sequence[TextState],
    logps: Sequence[np.ndarray],
    embeddings: np.ndarray,
    index_a: np.ndarray,
    index_b: np.ndarray,
) -> list[VerifierPair]:
    """:func:`verifier_pair` for each ``(index_a[k], index_b[k])`` (e.g. from
    :func:`training_pairs`), with the cosine under ``embeddings``."""
    sims = np.einsum("ij,ij->i", embeddings[index_a], embeddings[index_b])
    return [
        verifier_pair(states[a], states[b], logps[b], float(c))
        for a, b, c in zip(index_a.tolist(), index_b.tolist(), sims.tolist(), strict=True)
    ]


def simulate_pairs(
    states: Sequence[TextState],
    logps: Sequence[np.ndarray],
    embeddings: np.ndarray,
    *,
    max_tv: float = 0.2,
    min_cov: float = 0.75,
    verifier: ReuseVerifier | None = None,
) -> list[tuple[float, bool] | None]:
    """The replay's lookups: for every state after the first, ``(similarity, reuse correct)``
    of its usable neighbour (None: none), with a ``verifier`` its ``P(correct)`` for the pair in
    place of the similarity; computed once, for sweeps with :func:`simulate_delta_on`."""
    out: list[tuple[float, bool] | None] = []
    for i in range(1, len(states)):
        nb = nearest_usable(states, embeddings, i, min_cov=min_cov)
        if nb is None:
            out.append(None)
            continue
        j, sim = nb
        y = pair_label(states[i], logps[i], states[j], logps[j], max_tv=max_tv, min_cov=min_cov)
        if verifier is not None:
            pair = verifier_pair(states[i], states[j], logps[j], sim)
            sim = float(verifier.p_correct([pair])[0])
        out.append((sim, bool(y)))
    return out


def oracle_reuse(
    states: Sequence[TextState],
    logps: Sequence[np.ndarray],
    embeddings: np.ndarray | None = None,
    *,
    max_tv: float = 0.2,
    min_cov: float = 0.75,
    scan: int = 4,
) -> StreamResult:
    """The ceiling of correct serves on the replay: a lookup counts as servable when *some*
    earlier state's prior (all earlier states; with ``embeddings``, only the ``scan`` nearest
    under them, as the cache's index retrieves) would be a correct reuse. Nothing it serves is
    wrong, by construction: an oracle that knew every label. Its hit rate against a rule's says
    how much of the gap is retrieval (the right neighbour is not among those found) and how
    much is deciding (it is found, but cannot be told apart from wrong ones)."""
    served = 0
    for i in range(1, len(states)):
        if embeddings is None:
            order: Sequence[int] = range(i)
        else:
            order, _ = _nearest_earlier(embeddings, i, scan)
        if any(
            pair_label(states[i], logps[i], states[j], logps[j], max_tv=max_tv, min_cov=min_cov)
            for j in order
        ):
            served += 1
    rule = "oracle" if embeddings is None else f"oracle_top{scan}"
    return StreamResult.of(rule, max(len(states) - 1, 0), served, 0, 0)


def simulate_tau(
    states: Sequence[TextState],
    logps: Sequence[np.ndarray],
    embeddings: np.ndarray,
    taus: Sequence[float],
    *,
    max_tv: float = 0.2,
    min_cov: float = 0.75,
    verifier: ReuseVerifier | None = None,
) -> list[StreamResult]:
    """The fixed-threshold rule: serve the neighbour when ``cos >= tau`` (with a ``verifier``:
    its ``P(correct) >= tau``), for each ``tau``."""
    pairs = simulate_pairs(
        states, logps, embeddings, max_tv=max_tv, min_cov=min_cov, verifier=verifier
    )
    lookups = len(pairs)
    out = []
    for tau in taus:
        served = [ok for p in pairs if p is not None and p[0] >= tau for ok in [p[1]]]
        wrong = sum(1 for ok in served if not ok)
        out.append(StreamResult.of(f"tau={tau:g}", lookups, len(served), wrong, 0))
    return out


def simulate_delta(
    states: Sequence[TextState],
    logps: Sequence[np.ndarray],
    embeddings: np.ndarray,
    config: CorrectnessConfig,
    *,
    min_cov: float = 0.75,
    seed: int = 0,
    verifier: ReuseVerifier | None = None,
) -> StreamResult:
    """The delta rule as the adaptive cache runs it: a lookup whose neighbour the correctness
    model (fitted only on the labels the replay has produced so far) allows is served (or, with
    the exploration probability or while the on-policy guard is closed, sent to the LM and
    labelled as on-policy); every other lookup with a
    neighbour is a miss whose LM answer becomes a label. With a ``verifier`` the model is
    fitted on, and decides by, the verifier's score as the cache does."""
    pairs = simulate_pairs(
        states, logps, embeddings, max_tv=config.max_tv, min_cov=min_cov, verifier=verifier
    )
    return simulate_delta_on(pairs, config, seed=seed)


def simulate_delta_on(
    pairs: Sequence[tuple[float, bool] | None], config: CorrectnessConfig, *, seed: int = 0
) -> StreamResult:
    """:func:`simulate_delta` on replayed ``(score, correct)`` lookups (None: no neighbour).
    The pairs carry no entry ids, so the per-entry narrowing of the live cache is not
    replayed."""
    rng = np.random.default_rng(seed)
    model = CorrectnessModel(config)
    explore = config.explore_probability
    if config.served_guard:
        explore = max(explore, config.guard_explore_probability)
    served = wrong = 0
    for p in pairs:
        if p is None:
            continue
        sim, ok = p
        if not model.allows(sim):
            model.record(sim, ok)  # a miss
        elif model.guard_open() and rng.random() >= explore:
            served += 1
            wrong += 0 if ok else 1
        else:  # exploration, or the on-policy guard holding it: an on-policy label
            model.record(sim, ok, on_policy=True)
    return StreamResult.of(f"delta={config.delta:g}", len(pairs), served, wrong, model.labels_total)


RELIABILITY_EDGES = (0.0, 0.9, 0.95, 0.98, 0.99, 0.995, 0.998, 1.0 + 1e-9)


def reliability(
    states: Sequence[TextState],
    logps: Sequence[np.ndarray],
    embeddings: np.ndarray,
    *,
    edges: Sequence[float] = RELIABILITY_EDGES,
    max_tv: float = 0.2,
    min_cov: float = 0.75,
    verifier: ReuseVerifier | None = None,
) -> list[dict]:
    """How often reusing the nearest earlier state's prior is correct, by its similarity (with
    a ``verifier``: by its score).

    A reuse rule that keeps the served error under ``delta`` can only serve in bins whose
    correct rate is at least ``1 - delta`` (with room for its confidence bound): this table
    shows whether an encoder has such a region at all, and how many lookups fall in it.

    Args:
        states: Logged states in visit order.
        logps: Their fresh priors.
        embeddings: Their unit embeddings under one encoder.
        edges: Bin edges of the similarity, ascending; a bin is ``[lo, hi)``.
        max_tv: The label's total-variation limit.
        min_cov: Candidate coverage below which a neighbour cannot be served.

    Returns:
        One row per non-empty bin: ``sim_lo``, ``sim_hi``, ``n``, ``share`` (of all lookups),
        ``correct`` (rate) and its Wilson 95% bounds ``correct_lo``, ``correct_hi``.
    """
    pairs = simulate_pairs(
        states, logps, embeddings, max_tv=max_tv, min_cov=min_cov, verifier=verifier
    )
    lookups = len(pairs)
    usable = [p for p in pairs if p is not None]
    rows = []
    for lo, hi in itertools.pairwise(edges):
        labels = [ok for sim, ok in usable if lo <= sim < hi]
        if not labels:
            continue
        good = sum(labels)
        c_lo, c_hi = wilson_interval(good, len(labels))
        rows.append(
            {
                "sim_lo": float(lo),
                "sim_hi": float(min(hi, 1.0)),
                "n": len(labels),
                "share": len(labels) / lookups if lookups else 0.0,
                "correct": good / len(labels),
                "correct_lo": c_lo,
                "correct_hi": c_hi,
            }
        )
    return rows
