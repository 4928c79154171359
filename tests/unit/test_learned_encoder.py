"""The learned, decision-aware state encoder and the cache's encoder versions (see
docs/cache.md)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from cachellm_rl.cache.adaptive import AdaptiveCache
from cachellm_rl.cache.keys import exact_key
from cachellm_rl.cache.learned_encoder import (
    DecisionEncoderConfig,
    DecisionStateEncoder,
    EncoderTrainConfig,
    goal_ngrams,
    train_decision_encoder,
    word_ngrams,
)
from cachellm_rl.contracts import CacheQuery, HitTier, PriorRequest, PriorResponse
from tests.helpers import small_config

SMALL = DecisionEncoderConfig(dim=32, ngram_buckets=1 << 10, ngram_dim=16, hidden=64)
ADJ = ("fried", "raw", "sliced", "roasted")
ROOMS = ("kitchen", "pantry", "garden", "cellar", "bedroom", "attic")


FURNITURE = ("table", "chair", "shelf", "bench")


def text(obj: str, adj: str, room: str, furniture: str = "table") -> str:
    return f"you are in the {room} . the {obj} is {adj} . a {furniture} is here ."


def pairs(objs, seed=0):
    """Same object and state in another room with other furniture: correct (two words differ);
    same object and room, another state: wrong (one word differs)."""
    rng = np.random.default_rng(seed)
    a, b, y = [], [], []
    for obj, adj in itertools.product(objs, ADJ):
        for _ in range(6):
            r1, r2 = rng.choice(ROOMS, 2, replace=False)
            f1, f2 = rng.choice(FURNITURE, 2, replace=False)
            a.append(text(obj, adj, r1, f1))
            b.append(text(obj, adj, r2, f2))
            y.append(True)
            a.append(text(obj, adj, r1, f1))
            b.append(text(obj, str(rng.choice([x for x in ADJ if x != adj])), r1, f1))
            y.append(False)
    return a, b, np.array(y)


def auc(enc, a, b, y) -> float:
    ea, eb = enc.encode(a), enc.encode(b)
    cos = (ea * eb).sum(1)
    pos, neg = cos[y], cos[~y]
    return float((pos[:, None] > neg[None, :]).mean())


def test_word_ngrams_keep_numbers_bound_to_their_words():
    assert "#cabinet 2" in word_ngrams("open cabinet 2")
    assert "#cabinet 3" in word_ngrams("open cabinet 3")
    assert "2 steps#" in word_ngrams("the ball is 2 steps left")


def test_goal_ngrams_mark_the_objectives_own_object():
    t = "You see a red ball 1 step left. You see a green key 2 steps left. go to the green key"
    grams = goal_ngrams(t)
    assert "g:2 steps left" in grams and not any("red" in g for g in grams)
    assert goal_ngrams("no objective here") == []


def test_training_pairs_label_near_and_random_pairs():
    from cachellm_rl.cache.client import TextState
    from cachellm_rl.cache.fidelity import training_pairs

    states = [TextState(observation=f"s{i}", candidates=("a", "b")) for i in range(6)]
    logps = [np.log([0.9, 0.1]) if i < 3 else np.log([0.1, 0.9]) for i in range(6)]
    emb = np.eye(6, dtype=np.float32)
    ia, ib, y, tv = training_pairs(states, logps, emb, near=2, random=2, max_tv=0.2)
    assert len(ia) == len(ib) == len(y) == len(tv) > 0 and not np.any(ia == ib)
    same_group = (ia < 3) == (ib < 3)
    np.testing.assert_array_equal(y, same_group)
    np.testing.assert_allclose(tv[~same_group], 0.8, atol=1e-6)


def test_encode_is_deterministic_unit_and_round_trips(tmp_path):
    enc = DecisionStateEncoder(SMALL)
    texts = [text("carrot", "raw", "kitchen"), text("carrot", "fried", "kitchen")]
    e = enc.encode(texts)
    assert e.shape == (2, 32) and e.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(enc.encode(texts), e)
    again = DecisionStateEncoder.from_bytes(enc.to_bytes())
    assert again.tag == enc.tag
    np.testing.assert_allclose(again.encode(texts), e, atol=1e-6)
    loaded = DecisionStateEncoder.load(enc.save(tmp_path / "enc"))
    assert loaded.tag == enc.tag
    other = DecisionStateEncoder(DecisionEncoderConfig(**{**SMALL.__dict__, "seed": 1}))
    assert other.tag != enc.tag  # other weights, other version
    with pytest.raises(ValueError, match="strings"):
        enc.encode([3])  # type: ignore[list-item]


def test_training_separates_decisive_words_on_unseen_objects():
    """Trained on carrots and potatoes, tested on peppers and tomatoes: the cosine must rank a
    correct reuse (same object and state, another room and furniture) above a wrong one (same
    room, another state). An untrained encoder (the same code with no training) cannot: word
    overlap says the opposite."""
    a, b, y = pairs(("carrot", "potato", "apple", "onion"))
    ta, tb, ty = pairs(("pepper", "tomato", "lettuce"), seed=1)
    untrained = DecisionStateEncoder(SMALL)
    enc, losses = train_decision_encoder(
        a, b, y, config=SMALL, train=EncoderTrainConfig(epochs=30, batch_pairs=64)
    )
    assert losses[-1] < losses[0]
    assert auc(enc, ta, tb, ty) >= 0.9
    assert auc(untrained, ta, tb, ty) < 0.6
    assert enc.tag != untrained.tag


def test_a_new_encoder_version_reembeds_and_rekeys_the_entries():
    old = DecisionStateEncoder(SMALL)
    new = DecisionStateEncoder(DecisionEncoderConfig(**{**SMALL.__dict__, "seed": 5}))
    cache = AdaptiveCache(small_config(dim=32), model_version="v1", encoder_tag=old.tag)
    texts = [text("carrot", adj, "kitchen") for adj in ADJ]
    cands = ("eat carrot", "cook carrot")
    for t, emb in zip(texts, old.encode(texts), strict=True):
        q = CacheQuery(
            exact_key=exact_key(t, cands, prior_version="v1", encoder_tag=old.tag),
            embedding=emb,
            request=PriorRequest(prompt=t, candidates=cands),
            text=t,
        )
        cache.insert(
            q, PriorResponse(logp=np.log([0.7, 0.3]).astype(np.float32), model_version="v1")
        )
    cache.correctness.record(0.99, True)
    assert cache.reembed(new.tag, new.encode) == 4
    assert cache.encoder_tag == new.tag and cache.correctness.num_labels == 0
    for t, emb in zip(texts, new.encode(texts), strict=True):
        key = exact_key(t, cands, prior_version="v1", encoder_tag=new.tag)
        q = CacheQuery(
            exact_key=key, embedding=emb, request=PriorRequest(prompt=t, candidates=cands)
        )
        assert cache.lookup(q, update=False).tier is HitTier.EXACT
        sims, _ = cache.index.search(emb, 1)
        assert sims[0][0] == pytest.approx(1.0, abs=1e-5)  # the index holds the new vectors
        old_key = exact_key(t, cands, prior_version="v1", encoder_tag=old.tag)
        stale = CacheQuery(exact_key=old_key, embedding=None, request=q.request)
        assert cache.lookup(stale, update=False).tier is HitTier.MISS


def test_adaptive_cache_takes_the_learned_encoders_dimension(tmp_path):
    """The cache's embedding size follows ``--state-encoder``: with MiniLM's 384 a 32-d
    learned encoder's queries are refused by the cache (every env runner fails)."""
    from cachellm_rl.algorithms.ps_dqn.methods import MethodSettings, cache_config_for
    from cachellm_rl.cache.learned_encoder import saved_encoder_dim

    folder = DecisionStateEncoder(SMALL).save(tmp_path / "enc")
    assert saved_encoder_dim(folder) == 32
    s = MethodSettings(state_encoder_dir=str(folder))
    adaptive = cache_config_for("adaptive", s)
    assert adaptive.cache.dim == 32 and adaptive.encoder_dir == str(folder)
    assert cache_config_for("lru", s).cache.dim == 384  # the fixed-tau baselines keep MiniLM
    with pytest.raises(FileNotFoundError, match="holds no"):
        saved_encoder_dim(tmp_path)
