"""Prior scoring math against a direct full-sequence computation, and bad inputs."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from cachellm_rl.contracts import PriorRequest
from cachellm_rl.prior.prompts import FewShotExample, PromptConfig, build_prompt
from cachellm_rl.prior.scoring import (
    CandidateScorer,
    CandidateTrie,
    ScorerConfig,
    candidate_token_logprobs,
    candidate_token_logprobs_full,
    packed_candidate_token_logprobs,
    prior_from_token_logprobs,
    tree_candidate_token_logprobs,
    weights_version,
)

CANDS = ("go north", "take red apple", "open fridge", "put apple in fridge", "eat red apple")
# Candidates sharing prefixes (one a prefix of another): the prefix tree shares their nodes.
SHARED = (
    "take red apple",
    "take red apple from fridge",
    "take red onion",
    "cook red apple with oven",
    "cook red apple with stove",
    "go north",
)
PROMPT = "goal : eat the apple . observation : you are in the kitchen . next action :"


@pytest.fixture(scope="module")
def scorer(tiny_model_dir):
    return CandidateScorer(ScorerConfig(model_dir=str(tiny_model_dir)))


@pytest.mark.parametrize("chunk", [1, 2, 64])
def test_prefix_sharing_matches_full_sequences(scorer, chunk):
    prompt_ids, cand_ids = scorer.encode(PriorRequest(prompt=PROMPT, candidates=CANDS))
    assert len({len(c) for c in cand_ids}) > 1  # different lengths exercise the padding
    shared = candidate_token_logprobs(
        scorer.model, prompt_ids, cand_ids, device=scorer.device, max_candidates_per_forward=chunk
    )
    full = candidate_token_logprobs_full(scorer.model, prompt_ids, cand_ids, device=scorer.device)
    for a, b, ids in zip(shared, full, cand_ids, strict=True):
        assert a.shape == (len(ids),)
        np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("cands", [CANDS, SHARED])
@pytest.mark.parametrize("chunk", [1, 2, 64])
def test_tree_scoring_matches_full_sequences(scorer, chunk, cands):
    prompt_ids, cand_ids = scorer.encode(PriorRequest(prompt=PROMPT, candidates=cands))
    assert max(len(c) for c in cand_ids) > 2  # a tree deeper than one token
    tree = tree_candidate_token_logprobs(
        scorer.model, prompt_ids, cand_ids, device=scorer.device, max_candidates_per_forward=chunk
    )
    full = candidate_token_logprobs_full(scorer.model, prompt_ids, cand_ids, device=scorer.device)
    for a, b, ids in zip(tree, full, cand_ids, strict=True):
        assert a.shape == (len(ids),)
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_scorer_uses_the_tree_when_it_matches(tiny_model_dir):
    tree = CandidateScorer(ScorerConfig(model_dir=str(tiny_model_dir)))
    repeat = CandidateScorer(
        ScorerConfig(model_dir=str(tiny_model_dir), candidate_attention="repeat")
    )
    req = PriorRequest(prompt=PROMPT, candidates=CANDS)
    np.testing.assert_allclose(tree.score([req])[0].logp, repeat.score([req])[0].logp, atol=1e-5)
    assert tree._tree is True and repeat._tree is False
    with pytest.raises(ValueError, match="candidate_attention"):
        ScorerConfig(model_dir=str(tiny_model_dir), candidate_attention="flat")


def test_the_tree_runs_a_shared_prefix_once(scorer):
    _, cand_ids = scorer.encode(PriorRequest(prompt=PROMPT, candidates=SHARED))
    trie = CandidateTrie.build(cand_ids)
    distinct = {tuple(c[:k]) for c in cand_ids for k in range(1, len(c))}
    assert len(trie.tokens) == len(distinct) == CandidateTrie.size(cand_ids)
    assert len(trie.tokens) < sum(len(c) - 1 for c in cand_ids)
    for c, path in zip(cand_ids, trie.preds, strict=True):
        assert [trie.tokens[n] for n in path] == list(c[:-1])  # each path spells its prefix
        assert [trie.depth[n] for n in path] == list(range(len(c) - 1))
        for n in path:  # a node sees exactly its own prefix
            assert set(np.flatnonzero(trie.allow_TT[n])) == set(path[: trie.depth[n] + 1])


PACKED_REQUESTS = (
    PriorRequest(prompt=PROMPT, candidates=CANDS),
    PriorRequest(prompt="observation : hallway .", candidates=("go south", "take red apple")),
    PriorRequest(prompt="goal : eat . " + PROMPT, candidates=("eat red apple",)),
    PriorRequest(prompt="next action :", candidates=("go", "put apple in fridge")),
)


@pytest.mark.parametrize(
    "requests",
    [
        PACKED_REQUESTS,
        (
            *PACKED_REQUESTS[:2],
            PriorRequest(prompt="observation : a dark pantry .", candidates=SHARED),
        ),
    ],
)
def test_packed_scoring_matches_full_sequences(scorer, requests):
    """Several prompts of different lengths in one padded pass: each candidate's token
    log-likelihoods equal those of its own prompt + candidate run alone."""
    items = [scorer.encode(r) for r in requests]
    assert len({len(p) for p, _ in items}) == len(items)  # rows of different widths: padding
    packed = packed_candidate_token_logprobs(scorer.model, items, device=scorer.device)
    assert len(packed) == len(items)
    for (prompt_ids, cand_ids), got in zip(items, packed, strict=True):
        full = candidate_token_logprobs_full(
            scorer.model, prompt_ids, cand_ids, device=scorer.device
        )
        assert [len(g) for g in got] == [len(c) for c in cand_ids]
        for a, b in zip(got, full, strict=True):
            np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("max_batch_tokens", [1, 64, 16_384])
def test_score_each_packs_requests_and_isolates_a_bad_one(tiny_model_dir, max_batch_tokens):
    sc = CandidateScorer(
        ScorerConfig(
            model_dir=str(tiny_model_dir),
            max_batch_tokens=max_batch_tokens,
            max_padding_fraction=1.0,  # rows of very different widths, packed anyway
        )
    )
    ref = CandidateScorer(ScorerConfig(model_dir=str(tiny_model_dir), candidate_attention="repeat"))
    mixed = [*PACKED_REQUESTS[:2], "not a request", *PACKED_REQUESTS[2:]]
    got = sc.score_each(mixed)  # type: ignore[arg-type]
    assert sc._packed is True and ref._packed is False
    assert isinstance(got[2], ValueError) and "PriorRequest" in str(got[2])
    want = ref.score(list(PACKED_REQUESTS))
    for g, w in zip([r for k, r in enumerate(got) if k != 2], want, strict=True):
        assert not isinstance(g, Exception)
        np.testing.assert_allclose(g.logp, w.logp, atol=1e-5)
    groups = list(sc._pack([(k, *sc.encode(r)) for k, r in enumerate(PACKED_REQUESTS)]))
    assert sum(len(g) for g in groups) == len(PACKED_REQUESTS)
    assert len(groups) == {1: 4, 64: 2, 16_384: 1}[max_batch_tokens]
    with pytest.raises(ValueError, match="PriorRequest"):
        sc.score(mixed)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_batch_tokens"):
        ScorerConfig(model_dir="x", max_batch_tokens=0)


def test_packing_keeps_padding_under_its_cap(tiny_model_dir):
    """Requests of very different widths go to separate passes; ones of the same width share
    one; the scores are the same either way."""
    sc = CandidateScorer(ScorerConfig(model_dir=str(tiny_model_dir), max_padding_fraction=0.1))
    reqs = [*PACKED_REQUESTS, *PACKED_REQUESTS]  # each width twice
    encoded = [(k, *sc.encode(r)) for k, r in enumerate(reqs)]
    groups = list(sc._pack(encoded))
    # Widths 6, 7, 23 and 26 slots: the two short ones and the two long ones pack together.
    assert sorted(len(g) for g in groups) == [4, 4]
    for g in groups:
        widths = [len(p) + CandidateTrie.size(c) for _, p, c in g]
        assert 1 - sum(widths) / (len(g) * max(widths)) <= 0.1
    loose = CandidateScorer(ScorerConfig(model_dir=str(tiny_model_dir), max_padding_fraction=1.0))
    assert len(list(loose._pack(encoded))) == 1
    for a, b in zip(sc.score(reqs), loose.score(reqs), strict=True):
        np.testing.assert_allclose(a.logp, b.logp, atol=1e-5)
    with pytest.raises(ValueError, match="max_padding_fraction"):
        ScorerConfig(model_dir="x", max_padding_fraction=1.5)


def test_prior_is_softmax_of_mean_token_logprob(scorer):
    req = PriorRequest(prompt=PROMPT, candidates=CANDS)
    prompt_ids, cand_ids = scorer.encode(req)
    full = candidate_token_logprobs_full(scorer.model, prompt_ids, cand_ids, device=scorer.device)
    means = np.array([f.mean() for f in full])
    expected = means - np.log(np.exp(means - means.max()).sum()) - means.max()
    (resp,) = scorer.score([req])
    assert resp.logp.dtype == np.float32 and resp.logp.shape == (len(CANDS),)
    np.testing.assert_allclose(resp.logp, expected, atol=1e-5)
    assert abs(np.log(np.exp(resp.logp.astype(np.float64)).sum())) < 1e-5
    assert resp.model_version == scorer.model_version


def test_prior_temperature_flattens():
    lp = [np.array([-1.0]), np.array([-3.0, -3.0])]
    cold = prior_from_token_logprobs(lp, 0.5)
    hot = prior_from_token_logprobs(lp, 5.0)
    assert cold[0] - cold[1] > hot[0] - hot[1] > 0


def test_several_prompts_in_one_call(scorer):
    reqs = [
        PriorRequest(prompt=PROMPT, candidates=CANDS),
        PriorRequest(
            prompt="observation : you are in the hallway .", candidates=("go south", "go north")
        ),
    ]
    batch = scorer.score(reqs)
    single = [scorer.score([r])[0] for r in reqs]
    for b, s in zip(batch, single, strict=True):
        np.testing.assert_allclose(b.logp, s.logp, atol=1e-6)


def test_long_prompt_is_truncated_from_the_left(tiny_model_dir):
    scorer = CandidateScorer(ScorerConfig(model_dir=str(tiny_model_dir), max_context_tokens=24))
    long_prompt = "you see a fridge . " * 40 + PROMPT
    req = PriorRequest(prompt=long_prompt, candidates=CANDS)
    prompt_ids, cand_ids = scorer.encode(req)
    assert len(prompt_ids) + max(len(c) for c in cand_ids) <= 24
    full_ids = list(scorer.tokenizer(long_prompt)["input_ids"])
    assert prompt_ids == full_ids[-len(prompt_ids) :]  # the end (current state) is kept
    resp = scorer.score([req])[0]
    assert np.isfinite(resp.logp).all() and scorer.num_truncated_prompts >= 1


def test_bad_requests_get_clear_errors():
    with pytest.raises(ValueError, match="empty"):
        PriorRequest(prompt="x", candidates=())
    with pytest.raises(ValueError, match="duplicate"):
        PriorRequest(prompt="x", candidates=("go north", "go north"))
    with pytest.raises(ValueError, match="empty candidate"):
        PriorRequest(prompt="x", candidates=("go", "  "))


def test_model_directory_errors(tmp_path, tiny_model_dir):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        CandidateScorer(ScorerConfig(model_dir=str(tmp_path / "nope")))
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    shutil.copy(tiny_model_dir / "config.json", no_weights / "config.json")
    with pytest.raises(ValueError, match=r"no \*\.safetensors"):
        CandidateScorer(ScorerConfig(model_dir=str(no_weights)))
    (no_weights / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(ValueError, match="pickled weights"):
        CandidateScorer(ScorerConfig(model_dir=str(no_weights)))
    with pytest.raises(ValueError, match="prior_temperature"):
        ScorerConfig(model_dir="x", prior_temperature=0.0)
    with pytest.raises(ValueError, match="dtype"):
        ScorerConfig(model_dir="x", dtype="int3")


def test_model_version_is_a_weights_hash(tmp_path, tiny_model_dir):
    from tests.helpers import make_tiny_model_dir

    other = make_tiny_model_dir(tmp_path / "other", seed=1)
    assert weights_version(tiny_model_dir) == weights_version(tiny_model_dir)
    assert weights_version(tiny_model_dir) != weights_version(other)


def test_prompt_builder_layout():
    p = build_prompt(
        state="You see a key.",
        objective="Open the door.",
        inventory="a lamp",
        candidates=["take key", "go west"],
        examples=[FewShotExample(state="A dark room.", action="light lamp")],
    )
    order = [
        p.index(s) for s in ("A dark room.", "Goal:", "You see a key.", "Inventory:", "take key")
    ]
    assert order == sorted(order)
    assert p.endswith("Next action:")
    no_list = build_prompt(state="s", config=PromptConfig(candidates_header=None))
    assert "Admissible" not in no_list


def test_fused_gelu_and_last_logits_give_the_stored_models_scores(scorer, tiny_model_dir):
    """The scorer loads GPT-2's ``gelu_new`` as the fused tanh-GELU and keeps only the prompt's
    last logits; the stored model, loaded as saved and run on full sequences, agrees."""
    from transformers import AutoModelForCausalLM

    assert scorer.model.config.activation_function == "gelu_pytorch_tanh"
    stored = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval()
    assert stored.config.activation_function == "gelu_new"
    prompt_ids, cand_ids = scorer.encode(PriorRequest(prompt=PROMPT, candidates=CANDS))
    ref = candidate_token_logprobs_full(stored, prompt_ids, cand_ids, device=scorer.device)
    got = scorer.token_logprobs(PriorRequest(prompt=PROMPT, candidates=CANDS))
    for a, b in zip(got, ref, strict=True):
        np.testing.assert_allclose(a, b, atol=2e-5)


def test_candidate_tokenisation_is_cached_and_matches_the_tokenizer(tiny_model_dir):
    sc = CandidateScorer(ScorerConfig(model_dir=str(tiny_model_dir)))
    tok = sc.tokenizer
    _, first = sc.encode(PriorRequest(prompt=PROMPT, candidates=CANDS[:3]))
    _, second = sc.encode(PriorRequest(prompt=PROMPT, candidates=CANDS[::-1]))
    assert set(sc._candidate_ids) == set(CANDS)
    for ids, c in zip(second, CANDS[::-1], strict=True):
        assert ids == tok(" " + c, add_special_tokens=False)["input_ids"]
    assert second[-3:] == first[::-1]
