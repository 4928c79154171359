"""Embedded-prior training: prompts match the cache client's, errors, the trained fixture."""

from __future__ import annotations

import pytest

from cachellm_rl.cache.client import PriorCacheClient, TextState
from cachellm_rl.envs.text_env import TextDecision
from cachellm_rl.prior.train import PriorTrainConfig, decision_prompt, train_prior


class _NoActorClient(PriorCacheClient):
    def prior_version(self) -> str:
        return "v"


def test_training_prompt_is_the_prompt_the_cache_client_sends():
    d = TextDecision(
        objective="Cook. Recipe: apple.",
        observation="[Kitchen] A fridge.",
        inventory="You carry nothing.",
        candidates=("open fridge", "take apple"),
    )
    state = TextState(
        observation=d.observation,
        candidates=d.candidates,
        objective=d.objective,
        inventory=d.inventory,
    )
    (query,) = _NoActorClient(None).build_queries([state])
    assert query.request.prompt == decision_prompt(d)
    assert query.embedding is None  # no encoder: exact tier only


def test_train_prior_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="at least one"):
        train_prior([], tmp_path / "m")
    with pytest.raises(ValueError, match="empty expert action"):
        train_prior([("prompt", "  ")], tmp_path / "m")
    with pytest.raises(ValueError, match="max_minutes"):
        PriorTrainConfig(max_minutes=0)


def test_one_seed_gives_one_prior(tmp_path):
    """Training stops on its epoch count, not the clock: the same seed gives the same weights."""
    import torch
    from safetensors.torch import load_file

    from cachellm_rl.prior.tiny_model import TinyLMConfig

    examples = [
        (f"goal: eat. state: room {i}. actions: go north, take apple{i % 3}", f"take apple{i % 3}")
        for i in range(24)
    ]
    cfg = PriorTrainConfig(
        model=TinyLMConfig(n_layer=1, n_head=2, n_embd=16, n_positions=64), epochs=2, batch_size=8
    )
    reports = [train_prior(examples, tmp_path / f"m{k}", cfg, progress=False) for k in (0, 1)]
    assert [r["steps"] for r in reports] == [6, 6] == [r["planned_steps"] for r in reports]
    assert not any(r["stopped_by_time_budget"] for r in reports)
    w0, w1 = (load_file(str(tmp_path / f"m{k}" / "model.safetensors")) for k in (0, 1))
    assert w0.keys() == w1.keys() and all(torch.equal(w0[k], w1[k]) for k in w0)


def test_dropout_reaches_the_saved_model_and_is_checked(tmp_path):
    """The recipe's dropout is the saved GPT-2's (so a reload trains and scores the same)."""
    import json

    from cachellm_rl.prior.tiny_model import TinyLMConfig

    examples = [(f"goal: eat. state: room {i}. actions: go north", "go north") for i in range(8)]
    for dropout in (0.0, 0.25):
        small = TinyLMConfig(n_layer=1, n_head=2, n_embd=16, n_positions=64, dropout=dropout)
        cfg = PriorTrainConfig(model=small, epochs=1, batch_size=8)
        report = train_prior(examples, tmp_path / f"m{dropout}", cfg, progress=False)
        saved = json.loads((tmp_path / f"m{dropout}" / "config.json").read_text())
        assert saved["attn_pdrop"] == saved["resid_pdrop"] == saved["embd_pdrop"] == dropout
        assert report["config"]["model"]["dropout"] == dropout
    with pytest.raises(ValueError, match="dropout"):
        TinyLMConfig(dropout=1.0)


def test_trained_prior_fits_the_train_split(tw_prior):
    """The fixture's prior (≈40 s of training on 10 easy games) solves its own train games."""
    _, report = tw_prior
    assert report["config"]["model"]["dropout"] == 0.0
    assert report["epoch_losses"][-1] < report["epoch_losses"][0] / 4
    assert report["direct_success"]["train"]["success_rate"] >= 0.8
    assert set(report["direct_success"]) == {"train", "test"}


def test_renumbering_relabels_instances_consistently():
    import numpy as np

    from cachellm_rl.prior.augment import renumber_instances

    d = TextDecision(
        objective="put a mug in shelf.",
        observation="You arrive at shelf 2. On the shelf 2, you see a mug 1. "
        "Not visited yet: shelf 1, shelf 3. Seen: mug 1 at shelf 2. You walk 1 step.",
        inventory="You are not carrying anything.",
        candidates=("go to shelf 1", "go to shelf 3", "take mug 1 from shelf 2"),
    )
    rng = np.random.default_rng(0)
    seen_numbers = set()
    for _ in range(20):
        d2, a2 = renumber_instances(d, "take mug 1 from shelf 2", rng)
        assert a2 == d2.candidates[2]
        shelf_here = a2.split(" from ")[1]  # the same renaming everywhere in the texts
        assert d2.observation.startswith(f"You arrive at {shelf_here}. On the {shelf_here},")
        assert f"Seen: {a2[5:].replace(' from ', ' at ')}." in d2.observation
        assert d2.observation.endswith("You walk 1 step.")  # not a candidate's class
        assert d2.objective == d.objective and d2.inventory == d.inventory
        shelves = [c[len("go to ") :] for c in d2.candidates[:2]] + [shelf_here]
        assert len(set(shelves)) == 3  # one-to-one
        seen_numbers |= {int(s.split()[1]) for s in shelves}
        assert f"Not visited yet: {shelves[0]}, {shelves[1]}." in d2.observation
    assert max(seen_numbers) > 3  # numbers are drawn beyond the ones the room has
    with pytest.raises(ValueError, match="max_number"):
        renumber_instances(d, d.candidates[0], rng, max_number=0)


def test_an_interrupted_training_leaves_no_usable_looking_prior(tmp_path, monkeypatch):
    """A training killed midway must not leave a model folder that the suites take as
    trained (an untrained GPT-2 once served as a TextWorld prior that way)."""
    import cachellm_rl.prior.train as train_mod
    from cachellm_rl.algorithms.ps_dqn.suite import needs_training
    from cachellm_rl.envs.registry import default_prior_dir
    from cachellm_rl.prior.tiny_model import TinyLMConfig

    examples = [(f"state {i}. actions: go north, take apple", "take apple") for i in range(8)]
    cfg = PriorTrainConfig(
        model=TinyLMConfig(n_layer=1, n_head=2, n_embd=16, n_positions=64), epochs=1, batch_size=4
    )

    def killed(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_mod, "_collate", killed)
    out = tmp_path / "artifacts" / "priors" / "textworld"
    with pytest.raises(KeyboardInterrupt):
        train_prior(examples, out, cfg, progress=False)
    assert not out.exists()
    monkeypatch.undo()
    train_prior(examples, out, cfg, progress=False)
    assert (out / "config.json").is_file() and not out.with_name("textworld.partial").exists()
    # a default prior folder without its training report (an old interrupted run) is retrained
    monkeypatch.chdir(tmp_path)
    assert default_prior_dir("textworld").resolve() == out.resolve()
    assert not needs_training("textworld", out)
    (out / train_mod.TRAIN_REPORT).unlink()
    assert needs_training("textworld", out)
    own = tmp_path / "my_model"  # a user's own model folder: never retrained
    own.mkdir()
    (own / "config.json").write_text("{}")
    assert not needs_training("textworld", own)


def _long_examples(n: int) -> list[tuple[str, str]]:
    """Prompts long enough (about 300 tokens) that torch's CPU kernels split work by thread."""
    return [
        (
            " ".join(f"word{(i * j) % 97} state{j % 13}" for j in range(150))
            + f" actions: go north, take apple{i % 3}",
            f"take apple{i % 3}",
        )
        for i in range(n)
    ]


def test_the_prior_does_not_depend_on_the_callers_torch_threads(tmp_path):
    """Torch's thread count changes CPU sums; training fixes it, so the caller's count (the
    machine's cores, or OMP_NUM_THREADS under Ray) does not reach the weights. The control
    (two different fixed counts) shows the count would matter."""
    import torch
    from safetensors.torch import load_file

    from cachellm_rl.prior.tiny_model import TinyLMConfig

    def weights(name: str, caller_threads: int, num_threads: int):
        cfg = PriorTrainConfig(
            model=TinyLMConfig(n_layer=1, n_head=4, n_embd=128, n_positions=512),
            epochs=1,
            batch_size=16,
            num_threads=num_threads,
        )
        before = torch.get_num_threads()
        torch.set_num_threads(caller_threads)
        try:
            report = train_prior(_long_examples(32), tmp_path / name, cfg, progress=False)
            assert torch.get_num_threads() == caller_threads  # restored
        finally:
            torch.set_num_threads(before)
        assert report["compute"]["torch_threads"] == num_threads
        return load_file(str(tmp_path / name / "model.safetensors"))

    a, b = weights("a", caller_threads=1, num_threads=2), weights("b", 2, 2)
    assert all(torch.equal(a[k], b[k]) for k in a)
    c = weights("c", caller_threads=2, num_threads=1)
    assert not all(torch.equal(a[k], c[k]) for k in a)


UNLISTED_STATE = TextState(
    observation="[Kitchen] A fridge.",
    candidates=("open fridge", "take apple"),
    objective="Cook.",
    inventory="You carry nothing.",
)


def test_a_prior_trained_unlisted_is_prompted_unlisted_by_every_scorer(tmp_path):
    """The layout a prior was trained with is saved beside its weights, read by its scorer
    and direct client, and hashed into its version (so a cache or checkpoint never mixes the
    two layouts)."""
    import shutil

    from cachellm_rl.cache.client import DirectPriorClient
    from cachellm_rl.prior.prompts import (
        PROMPT_LAYOUT_FILE,
        PromptConfig,
        load_prompt_config,
        prior_request,
    )
    from cachellm_rl.prior.scoring import CandidateScorer, ScorerConfig
    from cachellm_rl.prior.tiny_model import TinyLMConfig

    unlisted = PromptConfig(candidates_header=None)
    prompt = prior_request(UNLISTED_STATE, unlisted).prompt
    assert "Admissible actions" not in prompt
    examples = [(prompt, "open fridge")] * 8
    cfg = PriorTrainConfig(
        model=TinyLMConfig(n_layer=1, n_head=2, n_embd=16, n_positions=64), epochs=1, batch_size=8
    )
    report = train_prior(examples, tmp_path / "m", cfg, prompt_config=unlisted, progress=False)
    assert report["prompt_layout"]["candidates_header"] is None
    assert load_prompt_config(tmp_path / "m") == unlisted
    scorer = CandidateScorer(ScorerConfig(model_dir=str(tmp_path / "m")))
    assert scorer.prompt_config == unlisted
    sent = []
    score = scorer.score
    scorer.score = lambda reqs: sent.extend(reqs) or score(reqs)  # type: ignore[method-assign]
    DirectPriorClient(scorer).get_priors([UNLISTED_STATE])
    assert [r.prompt for r in sent] == [prompt]
    # The same weights without the layout file are another prior version.
    shutil.copytree(tmp_path / "m", tmp_path / "listed")
    (tmp_path / "listed" / PROMPT_LAYOUT_FILE).unlink()
    listed = CandidateScorer(ScorerConfig(model_dir=str(tmp_path / "listed")))
    assert listed.prompt_config == PromptConfig()
    assert listed.model_version != scorer.model_version
    # A prior trained without a layout writes no file (the versions of older priors stand).
    train_prior(examples, tmp_path / "d", cfg, progress=False)
    assert not (tmp_path / "d" / PROMPT_LAYOUT_FILE).exists()


def test_a_bad_layout_file_is_refused_in_one_line(tmp_path):
    from cachellm_rl.prior.prompts import PROMPT_LAYOUT_FILE, load_prompt_config

    (tmp_path / PROMPT_LAYOUT_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_prompt_config(tmp_path)
    (tmp_path / PROMPT_LAYOUT_FILE).write_text('{"candidate_header": null}')
    with pytest.raises(ValueError, match=r"unknown prompt layout fields \['candidate_header'\]"):
        load_prompt_config(tmp_path)
    assert load_prompt_config(tmp_path / "nothing-here").candidates_header is not None


def test_a_cache_client_prompts_in_the_served_priors_layout(ray_session):
    """Without an explicit layout, the client asks the cache actor for the served prior's (and
    sends nothing, asking again, while Serve cannot say)."""
    import ray

    from cachellm_rl.cache.client import CacheActorUnavailable

    @ray.remote(num_cpus=0)
    class _Cache:
        def __init__(self) -> None:
            self.layout: dict | None = None
            self.asked = 0

        def versions(self) -> tuple[str, str]:
            return "v1", ""

        def prompt_layout(self) -> dict | None:
            self.asked += 1
            return self.layout

        def set_layout(self, layout: dict) -> None:
            self.layout = layout

        def times_asked(self) -> int:
            return self.asked

    actor = _Cache.options(name="layout_test_cache", namespace="layout_test").remote()
    client = PriorCacheClient(None, cache_name="layout_test_cache", namespace="layout_test")
    with pytest.raises(CacheActorUnavailable, match="layout is unknown"):
        client.build_queries([UNLISTED_STATE])  # Serve could not say: no guessed layout
    ray.get(actor.set_layout.remote({"candidates_header": None}))
    (q,) = client.build_queries([UNLISTED_STATE])
    assert "Admissible actions" not in q.request.prompt
    client.build_queries([UNLISTED_STATE])
    assert ray.get(actor.times_asked.remote()) == 2  # known once, not asked again
    from cachellm_rl.prior.prompts import PromptConfig

    fixed = PriorCacheClient(
        None, cache_name="layout_test_cache", namespace="layout_test", prompt_config=PromptConfig()
    )
    (q,) = fixed.build_queries([UNLISTED_STATE])
    assert "Admissible actions" in q.request.prompt  # an explicit layout is kept
    ray.kill(actor)


def test_an_interrupted_training_keeps_its_demonstrations_for_the_rerun(
    tw_suite, tmp_path, monkeypatch
):
    """Demonstrations (the slow part on ALFWorld) survive a training stopped after them; the
    rerun uses them, and a finished training removes them."""
    from cachellm_rl.prior import embedded

    out = tmp_path / "prior"
    kw = dict(games_dir=tw_suite, out_dir=out, episodes_per_game=1, epochs=1, evaluate=False)

    def stopped(*a, **k):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(embedded, "train_prior", stopped)
        with pytest.raises(KeyboardInterrupt):
            embedded.train_embedded_prior("textworld", progress=False, **kw)
    cache = embedded.demos_cache_path(out)
    assert cache.is_file() and not out.exists()

    def collect_again(*a, **k):
        raise AssertionError("demonstrations collected again")

    with monkeypatch.context() as m:
        m.setattr(embedded, "collect_demonstrations", collect_again)
        report = embedded.train_embedded_prior("textworld", progress=False, **kw)
    assert report["examples"] > 0 and (out / "model.safetensors").is_file()
    assert not cache.exists()
    # Other settings do not take another setting's demonstrations.
    embedded._save_demos(cache, {"format": 1}, ([], None))
    fresh = embedded.demos_cache_path(tmp_path / "not" / "yet" / "prior")  # a fresh clone
    embedded._save_demos(fresh, {"format": 1}, ([], None))
    assert embedded._load_demos(fresh, {"format": 1}) == ([], None)
    assert embedded._load_demos(cache, {"format": 2}) is None
    cache.write_bytes(b"torn")
    assert embedded._load_demos(cache, {"format": 1}) is None
