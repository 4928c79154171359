"""LoRA few-shot fine-tuning: the adapter loads in the scorer and raises the expert's prior."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from cachellm_rl.contracts import PriorRequest
from cachellm_rl.prior.finetune import (
    FINETUNE_REPORT,
    FinetuneConfig,
    default_adapter_dir,
    detect_target_modules,
    encode_example,
    finetune_lora,
)
from cachellm_rl.prior.prompts import build_prompt
from cachellm_rl.prior.scoring import CandidateScorer, ScorerConfig
from tests.helpers import make_tiny_model_dir

CANDS = ("go north", "take red apple", "open fridge", "eat red apple", "examine counter")
# Five states, each with a different expert action: the adapter must read the state.
STATES = (
    ("you are in the hallway . a door leads north .", "go north"),
    ("you are in the kitchen . you see a red apple .", "take red apple"),
    ("you are in the kitchen . you see a fridge .", "open fridge"),
    ("you carry a red apple .", "eat red apple"),
    ("you see a counter .", "examine counter"),
)
EXAMPLES = tuple(
    (build_prompt(state=s, objective="eat the apple", candidates=CANDS), a) for s, a in STATES
)
EPOCHS = 60


def expert_probs(scorer: CandidateScorer) -> tuple[np.ndarray, np.ndarray]:
    """Prior probability of the expert action and whether it is the argmax, per example."""
    probs, is_argmax = [], []
    for prompt, action in EXAMPLES:
        (resp,) = scorer.score([PriorRequest(prompt=prompt, candidates=CANDS)])
        i = CANDS.index(action)
        probs.append(float(np.exp(resp.logp[i])))
        is_argmax.append(int(np.argmax(resp.logp)) == i)
    return np.array(probs), np.array(is_argmax)


def make_sharp_tiny_model_dir(path):
    """A tiny GPT-2 whose output layer can produce confident distributions.

    At random initialisation the tied 0.02-std embeddings and the unit ``ln_f`` bound every
    logit gap to about one nat whatever the hidden state, so no adapter could make a candidate
    clearly likelier. Scaling ``ln_f`` gives the logit range of a trained model.
    """
    from transformers import AutoModelForCausalLM

    make_tiny_model_dir(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        model.transformer.ln_f.weight.mul_(8.0)
    model.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Run this module's torch work on one thread.

    Tiny backward passes on 2 OpenMP threads crawl (measured 0.4 s -> 40 s) while another
    process holds a core; one thread keeps the module fast on a busy machine.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    model_dir = make_sharp_tiny_model_dir(tmp_path_factory.mktemp("ft") / "tiny")
    base = CandidateScorer(ScorerConfig(model_dir=str(model_dir)))
    base_probs, base_argmax = expert_probs(base)
    adapter_dir = finetune_lora(
        model_dir, EXAMPLES, config=FinetuneConfig(epochs=EPOCHS, seed=0), progress=False
    )
    return {
        "model_dir": model_dir,
        "adapter_dir": adapter_dir,
        "base_version": base.model_version,
        "base_probs": base_probs,
        "base_argmax": base_argmax,
    }


def test_adapter_is_saved_next_to_the_model(finetuned):
    model_dir, adapter_dir = finetuned["model_dir"], finetuned["adapter_dir"]
    assert adapter_dir == model_dir.parent / "tiny-lora" == default_adapter_dir(model_dir)
    assert (adapter_dir / "adapter_config.json").is_file()
    assert (adapter_dir / "adapter_model.safetensors").is_file()
    assert not (adapter_dir / "model.safetensors").exists()  # only the adapter, not the base
    report = json.loads((adapter_dir / FINETUNE_REPORT).read_text())
    assert report["num_examples"] == len(EXAMPLES)
    assert report["target_modules"] == ["c_attn", "c_fc", "c_proj"]
    assert len(report["epoch_losses"]) == EPOCHS
    assert report["final_loss"] == report["epoch_losses"][-1]
    print(f"loss per epoch: first {report['epoch_losses'][0]:.3f}, last {report['final_loss']:.3f}")
    assert report["final_loss"] < 0.5 * report["epoch_losses"][0]
    assert report["config"]["rank"] == 8


def test_adapter_loads_in_the_scorer_and_raises_the_expert_prior(finetuned):
    tuned = CandidateScorer(
        ScorerConfig(
            model_dir=str(finetuned["model_dir"]), adapter_dir=str(finetuned["adapter_dir"])
        )
    )
    assert tuned.model_version != finetuned["base_version"]
    probs, is_argmax = expert_probs(tuned)
    base_probs = finetuned["base_probs"]
    print(
        f"expert prior among {len(CANDS)} candidates: base {np.round(base_probs, 3)} "
        f"(mean {base_probs.mean():.3f}, argmax {finetuned['base_argmax'].sum()}/5) -> "
        f"LoRA {np.round(probs, 3)} (mean {probs.mean():.3f}, argmax {is_argmax.sum()}/5)"
    )
    assert is_argmax.all()
    assert (probs > base_probs).all()
    assert probs.mean() > 0.5 and probs.mean() > 2.0 * base_probs.mean()


def test_training_tokenisation_matches_the_scorer(tiny_model_dir):
    scorer = CandidateScorer(ScorerConfig(model_dir=str(tiny_model_dir), max_context_tokens=24))
    long_prompt = "you see a fridge . " * 10 + EXAMPLES[0][0]
    for prompt in (EXAMPLES[0][0], long_prompt, ""):
        for action in ("go north", "put apple in fridge"):
            expected = scorer.encode(PriorRequest(prompt=prompt, candidates=(action,)))
            got = encode_example(scorer.tokenizer, prompt, action, context_tokens=24)
            assert got == (expected[0], expected[1][0])


def test_target_modules_are_detected_per_architecture(tiny_model_dir):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    gpt2 = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert detect_target_modules(gpt2) == ("c_attn", "c_fc", "c_proj")
    llama = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=32,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
        )
    )
    found = detect_target_modules(llama)
    assert set(found) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj"} | {
        "down_proj"
    }
    assert "lm_head" not in found
    with pytest.raises(ValueError, match="no linear"):
        detect_target_modules(torch.nn.Sequential(torch.nn.Embedding(4, 4)))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("rank", 0),
        ("alpha", 0),
        ("alpha", 1.5),
        ("dropout", 1.0),
        ("dropout", -0.1),
        ("learning_rate", 0.0),
        ("learning_rate", float("nan")),
        ("weight_decay", -1.0),
        ("rank", 4.0),
        ("epochs", 0),
        ("seed", None),
        ("trust_remote_code", "yes"),
        ("batch_size", 0),
        ("max_grad_norm", 0.0),
        ("max_length", 1),
        ("target_modules", ()),
        ("target_modules", "c_attn"),
        ("target_modules", ("c_attn", "")),
        ("dtype", "int3"),
        ("device", "tpu"),
    ],
)
def test_config_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=f"FinetuneConfig.{field}"):
        FinetuneConfig(**{field: value})


def test_bad_inputs_get_clear_errors(tmp_path, tiny_model_dir):
    with pytest.raises(ValueError, match="examples is empty"):
        finetune_lora(tiny_model_dir, [], out_dir=tmp_path / "a")
    with pytest.raises(ValueError, match="empty action"):
        finetune_lora(tiny_model_dir, [("prompt", "  ")], out_dir=tmp_path / "a")
    with pytest.raises(ValueError, match="pair"):
        finetune_lora(tiny_model_dir, [("prompt only",)], out_dir=tmp_path / "a")
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    shutil.copy(tiny_model_dir / "config.json", no_weights / "config.json")
    with pytest.raises(ValueError, match=r"no \*\.safetensors"):
        finetune_lora(no_weights, EXAMPLES, out_dir=tmp_path / "a")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        finetune_lora(tmp_path / "nope", EXAMPLES, out_dir=tmp_path / "a")
    with pytest.raises(ValueError, match="match no module"):
        finetune_lora(
            tiny_model_dir,
            EXAMPLES,
            out_dir=tmp_path / "a",
            config=FinetuneConfig(target_modules=("q_proj",)),
            progress=False,
        )
    assert not (tmp_path / "a").exists()


def test_same_seed_gives_the_same_adapter(tmp_path, tiny_model_dir):
    from safetensors.torch import load_file

    cfg = FinetuneConfig(epochs=3, batch_size=2, seed=3, max_length=32)
    runs = [
        finetune_lora(tiny_model_dir, EXAMPLES, out_dir=tmp_path / name, config=cfg, progress=False)
        for name in ("a", "b")
    ]
    a, b = (load_file(r / "adapter_model.safetensors") for r in runs)
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    losses = [json.loads((r / FINETUNE_REPORT).read_text())["epoch_losses"] for r in runs]
    assert losses[0] == losses[1]
