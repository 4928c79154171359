"""Training the embedded default prior (see docs/priors.md) and measuring a prior as a policy.

The embedded prior is a small GPT-2-architecture causal LM with its own word-level tokenizer,
trained by maximum likelihood of the expert's action given the same prompt the cache client
builds (:func:`cachellm_rl.prior.prompts.build_prompt`). Only the action tokens carry loss, and
they are tokenized exactly as :class:`~cachellm_rl.prior.scoring.CandidateScorer` does
(``candidate_prefix`` + action, prompt left-truncated), so what is trained is what is scored.
The result is saved in Hugging Face format and loaded through the same ``CandidateScorer`` path
as any user model.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from cachellm_rl.contracts import PriorRequest
from cachellm_rl.envs.evaluate import greedy_evaluate
from cachellm_rl.envs.text_env import INFO_CANDIDATES
from cachellm_rl.prior.prompts import PromptConfig, build_prompt, save_prompt_config
from cachellm_rl.prior.tiny_model import TinyLMConfig, make_tiny_causal_lm
from cachellm_rl.reproducibility import compute_fingerprint, fixed_torch_threads

TRAIN_REPORT = "prior_train.json"

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class PriorTrainConfig:
    """How the embedded prior is trained.

    Attributes:
        model: Size of the GPT-2 model and its vocabulary.
        epochs: Passes over the demonstrations: training stops after exactly this many, so one
            seed gives one prior however loaded the machine is.
        batch_size: Examples per step (length-bucketed to limit padding).
        learning_rate: Peak AdamW learning rate (linear warm-up, cosine decay).
        weight_decay: AdamW weight decay.
        warmup_fraction: Fraction of steps of linear warm-up.
        max_minutes: Safety cap on the training loop's wall-clock time. It is not how
            training normally ends (``epochs`` is); when it fires the prior depends on the
            machine's speed, so the report says so (``stopped_by_time_budget``) and a warning
            is logged.
        candidate_prefix: Text before each action (must match the scorer's).
        seed: Seed of initialisation and shuffling.
        num_threads: Torch CPU threads during training. The weights depend on this number
            (kernels split their sums by thread), so it is fixed rather than taken from the
            machine's cores: one seed then gives the same prior, bit for bit, on any machine
            with the same torch and CPU instruction set (both recorded in the report).
    """

    model: TinyLMConfig = field(
        default_factory=lambda: TinyLMConfig(
            n_layer=2, n_head=4, n_embd=128, n_positions=768, max_vocab=4000
        )
    )
    epochs: int = 8
    batch_size: int = 16
    learning_rate: float = 3e-3
    weight_decay: float = 0.01
    warmup_fraction: float = 0.05
    max_minutes: float = 120.0
    candidate_prefix: str = " "
    seed: int = 0
    num_threads: int = 2

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("PriorTrainConfig.epochs and batch_size must be >= 1")
        if self.num_threads < 1:
            raise ValueError("PriorTrainConfig.num_threads must be >= 1")
        if not self.learning_rate > 0:
            raise ValueError("PriorTrainConfig.learning_rate must be > 0")
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise ValueError("PriorTrainConfig.warmup_fraction must be in [0, 1)")
        if not self.max_minutes > 0:
            raise ValueError("PriorTrainConfig.max_minutes must be > 0")


def decision_prompt(decision, prompt_config: PromptConfig | None = None) -> str:
    """The prompt of a text decision, exactly as the cache client builds it."""
    return build_prompt(
        state=decision.observation,
        objective=decision.objective,
        inventory=decision.inventory,
        candidates=decision.candidates,
        config=prompt_config,
    )


def _encode_examples(tokenizer, examples, context: int, prefix: str):
    encoded = []
    for prompt, action in examples:
        a_ids = list(tokenizer(prefix + action, add_special_tokens=False)["input_ids"])
        p_ids = list(tokenizer(prompt)["input_ids"])
        if not a_ids:
            raise ValueError(f"action {action!r} tokenises to no tokens")
        p_ids = p_ids[-(context - len(a_ids)) :]
        encoded.append((p_ids, a_ids))
    return encoded


def _batches(encoded, batch_size: int, rng: np.random.Generator):
    order = rng.permutation(len(encoded))
    # Bucket by length: sort chunks of 50 batches, then shuffle the batches.
    chunk = batch_size * 50
    batches = []
    for s in range(0, len(order), chunk):
        part = sorted(order[s : s + chunk], key=lambda i: len(encoded[i][0]) + len(encoded[i][1]))
        batches += [part[j : j + batch_size] for j in range(0, len(part), batch_size)]
    rng.shuffle(batches)
    return batches


def _collate(encoded, idx, pad_id: int):
    import torch

    seqs = [encoded[i][0] + encoded[i][1] for i in idx]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
    labels = torch.full((len(idx), width), -100, dtype=torch.long)
    attn = torch.zeros((len(idx), width), dtype=torch.long)
    for r, i in enumerate(idx):
        p, a = encoded[i]
        n = len(p) + len(a)
        ids[r, :n] = torch.tensor(p + a)
        attn[r, :n] = 1
        labels[r, len(p) : n] = torch.tensor(a)
    return ids, attn, labels


def train_prior(
    examples: Sequence[tuple[str, str]],
    out_dir: str | Path,
    config: PriorTrainConfig | None = None,
    *,
    extra_report: dict | None = None,
    prompt_config: PromptConfig | None = None,
    progress: bool = True,
) -> dict:
    """Train a small GPT-2 prior on ``(prompt, expert action)`` pairs and save it.

    Args:
        examples: Training pairs (from the train split only).
        out_dir: Output model directory (Hugging Face format).
        config: Training settings.
        extra_report: Extra fields written into ``prior_train.json`` (e.g. demo statistics).
        prompt_config: The layout the examples' prompts were built with; saved beside the
            weights (``prompt_layout.json``) so every scorer prompts the prior the same way.
            None: the default layout, and no file (as priors trained before layouts existed).
        progress: Show a progress bar.

    Returns:
        The training report (also saved as ``prior_train.json`` in ``out_dir``).

    The model is trained in ``<out_dir>.partial`` and moved to ``out_dir`` only when its
    report is written, so an interrupted training never leaves a model that looks usable.
    """
    cfg = config or PriorTrainConfig()
    with fixed_torch_threads(cfg.num_threads):
        return _train_prior(examples, Path(out_dir), cfg, extra_report, prompt_config, progress)


def _train_prior(
    examples: Sequence[tuple[str, str]],
    final: Path,
    cfg: PriorTrainConfig,
    extra_report: dict | None,
    prompt_config: PromptConfig | None,
    progress: bool,
) -> dict:
    import shutil

    import torch

    if not examples:
        raise ValueError("train_prior needs at least one (prompt, action) example")
    for prompt, action in examples:
        if not action.strip():
            raise ValueError(f"empty expert action in an example (prompt {prompt[:60]!r}...)")
    t0 = time.perf_counter()
    out = final.with_name(final.name + ".partial")
    shutil.rmtree(out, ignore_errors=True)
    corpus = [p for p, _ in examples] + [a for _, a in examples]
    model, tokenizer = make_tiny_causal_lm(out, corpus, cfg.model)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    encoded = _encode_examples(tokenizer, examples, cfg.model.n_positions, cfg.candidate_prefix)
    steps_per_epoch = math.ceil(len(encoded) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    warm = max(1, int(cfg.warmup_fraction * total))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / total))),
    )
    model.train()
    deadline = t0 + cfg.max_minutes * 60
    losses: list[float] = []
    step = 0
    stopped_early = False
    bar = tqdm(total=total, desc="prior train", disable=not progress, unit="step")
    for _epoch in range(cfg.epochs):
        epoch_loss, n = 0.0, 0
        for idx in _batches(encoded, cfg.batch_size, rng):
            ids, attn, labels = _collate(encoded, idx, tokenizer.pad_token_id)
            loss = model(input_ids=ids, attention_mask=attn, labels=labels).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            step += 1
            loss_value = loss.detach().item()
            epoch_loss += loss_value * len(idx)
            n += len(idx)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.3f}")
            if time.perf_counter() > deadline:
                stopped_early = True
                break
        losses.append(epoch_loss / max(n, 1))
        if stopped_early:
            break
    bar.close()
    if stopped_early:
        logger.warning(
            "prior training hit its %.0f-minute safety cap after %d of %d steps: this prior "
            "depends on the machine's speed (raise max_minutes for a reproducible prior)",
            cfg.max_minutes,
            step,
            total,
        )
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    if prompt_config is not None:
        save_prompt_config(out, prompt_config)
    report = {
        "config": asdict(cfg),
        "examples": len(examples),
        "vocab_size": len(tokenizer),
        "parameters": sum(p.numel() for p in model.parameters()),
        "steps": step,
        "planned_steps": total,
        "epoch_losses": losses,
        "stopped_by_time_budget": stopped_early,
        "train_seconds": round(time.perf_counter() - t0, 1),
        "compute": compute_fingerprint(),
        "prompt_layout": asdict(prompt_config or PromptConfig()),
        **(extra_report or {}),
    }
    (out / TRAIN_REPORT).write_text(json.dumps(report, indent=1))
    shutil.rmtree(final, ignore_errors=True)
    out.rename(final)
    return report


@dataclass(frozen=True, kw_only=True)
class DirectPriorResult:
    """A prior used as a greedy policy (``direct_lm``) on a set of games."""

    success_rate: float
    mean_return: float
    mean_steps: float
    per_game_success: dict[str, bool]
    lm_calls: int


def evaluate_direct_prior(
    scorer,
    env,
    games: Sequence[str],
    *,
    prompt_config: PromptConfig | None = None,
    progress: bool = True,
) -> DirectPriorResult:
    """Play each game once with the argmax of the prior (no learning, no cache).

    Args:
        scorer: A :class:`~cachellm_rl.prior.scoring.CandidateScorer`.
        env: A text env (see :func:`cachellm_rl.envs.demos.collect_demonstrations`).
        games: Games to play.
        prompt_config: Prompt layout (default: the scorer's model's).
        progress: Show a progress bar.

    Returns:
        Success rate, mean return and steps, per-game success, LM calls made.
    """
    prompt_config = prompt_config or getattr(scorer, "prompt_config", None)

    def choose(obs: dict, info: dict) -> tuple[int, None, float]:
        d = env.decision
        (resp,) = scorer.score(
            [PriorRequest(prompt=decision_prompt(d, prompt_config), candidates=d.candidates)]
        )
        return int(np.argmax(resp.logp[: len(info[INFO_CANDIDATES])])), None, 0.0

    res = greedy_evaluate(env, games, choose, progress=progress)
    return DirectPriorResult(
        success_rate=res.success_rate,
        mean_return=float(np.mean(res.returns)),
        mean_steps=float(np.mean(res.lengths)),
        per_game_success={g: bool(s) for g, s in res.per_game_success_by_name().items()},
        lm_calls=res.decisions,
    )
