"""The learned reuse verifier (see docs/cache.md, "The reuse verifier")."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from cachellm_rl.cache.verifier import (
    ReuseVerifier,
    VerifierConfig,
    VerifierPair,
    VerifierTrainConfig,
    pair_features,
    train_verifier,
)

SMALL = VerifierConfig(buckets=1 << 10, dim=16, hidden=32)
ADJ = ("fried", "raw", "sliced", "roasted")
ROOMS = ("kitchen", "pantry", "garden", "cellar", "bedroom", "attic")


def text(obj: str, adj: str, room: str) -> str:
    return f"you are in the {room} . the {obj} is {adj} ."


def pairs(objs, rooms, seed=0):
    """Another room, same object state: correct; same room, another state: wrong. Word overlap
    gives no hint: both differ in one word, at the same cosine."""
    rng = np.random.default_rng(seed)
    out, y = [], []
    for obj, adj in itertools.product(objs, ADJ):
        for _ in range(4):
            r1, r2 = rng.choice(rooms, 2, replace=False)
            out.append(VerifierPair(text(obj, adj, r1), text(obj, adj, r2), 0.97))
            y.append(True)
            other = str(rng.choice([x for x in ADJ if x != adj]))
            out.append(VerifierPair(text(obj, adj, r1), text(obj, other, r1), 0.97))
            y.append(False)
    return out, np.array(y)


def auc(ver, ps, y) -> float:
    p = ver.p_correct(ps)
    return float((p[y][:, None] > p[~y][None, :]).mean())


def test_pair_features_are_the_differences():
    f = pair_features("a key 2 steps left", "a key 2 steps right", ("go",), ("go", "pick up"))
    assert "d:left" in f and "d:right" in f and "d:2 steps left" in f
    assert not any(x in f for x in ("d:key", "d:a key", "d:go"))
    assert "c:pick up" in f and "n:0" not in f and "nc:1" in f
    assert pair_features("same text", "same text") == ["n:0", "nc:0"]
    # side-agnostic: the pair's features do not depend on its order
    assert pair_features("x y", "x z") == pair_features("x z", "x y")


def test_training_learns_which_differences_decide_on_unseen_objects_and_rooms():
    """Trained on some objects and rooms, tested on others: the verifier must rank a correct
    reuse above a wrong one and be confident about both. The untrained one (the same code, no
    training) says about 0.5 for every pair."""
    ps, y = pairs(("carrot", "potato", "apple"), ROOMS[:4])
    tps, ty = pairs(("pepper", "tomato"), ROOMS[2:], seed=1)
    untrained = ReuseVerifier(SMALL)
    ver, losses = train_verifier(ps, y, config=SMALL, train=VerifierTrainConfig(epochs=40))
    assert losses[-1] < 0.5 * losses[0]
    assert auc(ver, tps, ty) >= 0.95
    p = ver.p_correct(tps)
    assert p.shape == (len(tps),) and np.all((p > 0) & (p < 1))
    assert p[ty].mean() >= 0.8 and p[~ty].mean() <= 0.2
    p0 = untrained.p_correct(tps)
    assert not (p0[ty].mean() >= 0.8 and p0[~ty].mean() <= 0.2)


def test_no_learning_with_zero_learning_rate():
    ps, y = pairs(("carrot", "potato", "apple"), ROOMS[:4])
    tps, _ = pairs(("pepper", "tomato"), ROOMS[2:], seed=1)
    ver, _ = train_verifier(ps, y, config=SMALL, train=VerifierTrainConfig(epochs=5, lr=0.0))
    np.testing.assert_allclose(ver.p_correct(tps), ReuseVerifier(SMALL).p_correct(tps))


def test_weights_round_trip_and_bad_input():
    ver = ReuseVerifier(SMALL)
    ps, _ = pairs(("carrot",), ROOMS)
    again = ReuseVerifier(SMALL, ver.state())
    np.testing.assert_array_equal(again.logits(ps), ver.logits(ps))
    assert ver.logits([]).shape == (0,)
    with pytest.raises(ValueError, match="non-zero numbers"):
        train_verifier(ps, [True], config=SMALL)
    with pytest.raises(ValueError, match="buckets"):
        VerifierConfig(buckets=0)


# -- the verifier in the cache ----------------------------------------------------------------
class _Stub:
    """A verifier that says what it was told: P(correct) by the query's text."""

    def __init__(self, by_text: dict[str, float]) -> None:
        self.by_text = by_text
        self.seen: list[VerifierPair] = []

    def p_correct(self, ps):
        self.seen += list(ps)
        return np.array([self.by_text[p.text_a] for p in ps])


def _delta_cache():
    from cachellm_rl.cache.adaptive import AdaptiveCache
    from cachellm_rl.cache.correctness import CorrectnessConfig
    from tests.helpers import small_config

    cfg = CorrectnessConfig(
        min_labels=20, explore_probability=0.0, guard_explore_probability=0.0, refit_every=1
    )
    return AdaptiveCache(small_config(reuse_rule="delta", correctness=cfg), model_version="v1")


def test_the_delta_rule_reads_the_verifiers_score_not_the_cosine():
    """Two queries at the same cosine 0.999 from one entry: the verifier says 0.999 for one and
    0.5 for the other. Once the model has learned from labels that high scores are right and
    low ones wrong, the first is served and the second refused, whatever their cosine."""
    from cachellm_rl.contracts import HitTier, PriorResponse
    from tests.helpers import query, unit

    e = np.eye(8, dtype=np.float32)
    near = unit(0.999 * e[0] + np.sqrt(1 - 0.999**2) * e[7])
    c = _delta_cache()
    stub = _Stub({"text of good": 0.999, "text of bad": 0.5, "text of lab": 0.9})
    c.verifier = stub
    lp = np.log(np.array([0.7, 0.2, 0.1], np.float32))
    c.insert(query("s0", e[0]), PriorResponse(logp=lp, model_version="v1"))
    # a label: the score (not the cosine) enters the model and the label
    lab = c.record_label(query("lab", near), lp, source="miss")
    assert lab is not None and lab.score == pytest.approx(0.9)
    assert lab.similarity == pytest.approx(0.999, abs=1e-4)
    assert stub.seen[-1].text_b == "text of s0" and stub.seen[-1].candidates_b == ("a", "b", "c")
    assert len(stub.seen[-1].logp_b) == 3
    rng = np.random.default_rng(0)
    for _ in range(2000):
        s = float(rng.uniform(0.5, 1.0))
        c.correctness.record(s, s >= 0.95, on_policy=s >= 0.95)
    assert c.lookup(query("good", near)).tier is HitTier.SEMANTIC
    assert c.lookup(query("bad", near)).tier is HitTier.MISS
    assert c.stats.verifier_calls >= 3
    # without the verifier the cosine decides again (0.999 is servable on these labels)
    c.verifier = None
    assert c.lookup(query("bad", near)).tier is HitTier.SEMANTIC


def test_the_encoder_carries_its_verifier_and_versions_it(tmp_path):
    from cachellm_rl.cache.learned_encoder import DecisionEncoderConfig, DecisionStateEncoder

    enc = DecisionStateEncoder(DecisionEncoderConfig(dim=16, ngram_buckets=256, ngram_dim=8))
    bare = enc.tag
    ver = ReuseVerifier(SMALL)
    enc.attach_verifier(ver)
    assert enc.tag != bare  # the verifier is part of the version
    ps, _ = pairs(("carrot",), ROOMS)
    for again in (
        DecisionStateEncoder.from_bytes(enc.to_bytes()),
        DecisionStateEncoder.load(enc.save(tmp_path / "enc")),
    ):
        assert again.tag == enc.tag and again.verifier is not None
        np.testing.assert_allclose(again.verifier.logits(ps), ver.logits(ps), atol=1e-6)
    with_ver = enc.tag
    enc.attach_verifier(ReuseVerifier(VerifierConfig(**{**SMALL.__dict__, "seed": 3})))
    assert enc.tag not in (bare, with_ver)  # other verifier weights, another version
    enc.attach_verifier(None)
    assert enc.tag == bare


def test_the_fidelity_replay_decides_by_the_verifier_when_given_one():
    """Every follower sits at cosine 0.99 from its anchor; half of them take another action.
    The cosine cannot tell them apart, so the delta rule serves nothing; a verifier that can
    (here a stub reading the text) lets it serve the right half, and nothing wrong."""
    from cachellm_rl.cache.client import TextState
    from cachellm_rl.cache.correctness import CorrectnessConfig
    from cachellm_rl.cache.fidelity import simulate_delta, simulate_tau
    from tests.helpers import unit

    class TextStub:
        def p_correct(self, ps):
            return np.array([0.999 if "same" in p.text_a else 0.3 for p in ps])

    rng = np.random.default_rng(0)
    states, logps, embs = [], [], []
    top = {True: np.log([0.88, 0.04, 0.04, 0.04]), False: np.log([0.04, 0.88, 0.04, 0.04])}
    for k in range(600):
        anchor = unit(rng.normal(size=32))
        noise = rng.normal(size=32)
        noise = unit(noise - (noise @ anchor) * anchor)
        same = bool(k % 2)
        for emb, text, lp in (
            (anchor, f"anchor {k}", top[True]),
            (
                unit(0.99 * anchor + np.sqrt(1 - 0.99**2) * noise),
                f"{same and 'same'} {k}",
                top[same],
            ),
        ):
            states.append(TextState(observation=text, candidates=tuple("abcd")))
            logps.append(lp)
            embs.append(emb)
    emb = np.stack(embs)
    cfg = CorrectnessConfig(delta=0.2)
    assert simulate_delta(states, logps, emb, cfg).served == 0
    d = simulate_delta(states, logps, emb, cfg, verifier=TextStub())
    assert d.served > 50 and d.served_wrong == 0
    (t,) = simulate_tau(states, logps, emb, [0.9], verifier=TextStub())
    assert t.served_wrong == 0 and t.served > 250


def test_early_stopping_keeps_the_epoch_best_on_held_out_pairs():
    """Held-out pairs whose labels say the opposite of the training pairs: every epoch of
    training makes the held-out loss worse, so early stopping must keep the first epoch's
    weights (a 12-epoch run without it ends far worse there)."""
    ps, y = pairs(("carrot", "potato", "apple"), ROOMS[:4])
    tps, ty = pairs(("pepper", "tomato"), ROOMS[2:], seed=1)
    flipped = ~ty
    tc = VerifierTrainConfig(epochs=12)
    stopped, _ = train_verifier(ps, y, config=SMALL, train=tc, valid=(tps, flipped))
    first, _ = train_verifier(ps, y, config=SMALL, train=VerifierTrainConfig(epochs=1))
    full, _ = train_verifier(ps, y, config=SMALL, train=tc)
    assert stopped.log_loss(tps, flipped) == pytest.approx(first.log_loss(tps, flipped))
    assert full.log_loss(tps, flipped) > first.log_loss(tps, flipped) + 0.05
    with pytest.raises(ValueError, match="valid needs"):
        train_verifier(ps, y, config=SMALL, valid=([], []))


class _CountingStub(_Stub):
    def __init__(self, by_text):
        super().__init__(by_text)
        self.batches: list[int] = []

    def p_correct(self, ps):
        self.batches.append(len(ps))
        return super().p_correct(ps)


def test_the_delta_rule_scores_a_querys_neighbours_in_one_batch_and_none_before_labels():
    """Three cached neighbours of one query: before the correctness model has its labels no pair
    is scored (nothing is servable); after, all three in one verifier call, and the hit is the
    most similar neighbour the rule allows, as when they were scored one by one."""
    from cachellm_rl.contracts import HitTier, PriorResponse
    from tests.helpers import query, unit

    e = np.eye(8, dtype=np.float32)
    c = _delta_cache()
    stub = _CountingStub({"text of q": 0.99})
    c.verifier = stub
    lp = np.log(np.array([0.7, 0.2, 0.1], np.float32))
    for k, cos in enumerate((0.999, 0.998, 0.997)):
        c.insert(
            query(f"s{k}", unit(cos * e[0] + np.sqrt(1 - cos**2) * e[k + 1])),
            PriorResponse(logp=lp, model_version="v1"),
        )
    assert c.lookup(query("q", e[0])).tier is HitTier.MISS
    assert stub.batches == [] and c.stats.verifier_calls == 0
    assert c.stats.semantic_refused == 1
    rng = np.random.default_rng(0)
    for _ in range(2000):
        s = float(rng.uniform(0.5, 1.0))
        c.correctness.record(s, s >= 0.95, on_policy=s >= 0.95)
    res = c.lookup(query("q", e[0]))
    assert res.tier is HitTier.SEMANTIC and res.similarity == pytest.approx(0.999, abs=1e-3)
    assert stub.batches == [3] and c.stats.verifier_calls == 3
    assert [p.text_b for p in stub.seen] == ["text of s0", "text of s1", "text of s2"]
