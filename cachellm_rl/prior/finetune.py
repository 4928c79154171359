"""LoRA few-shot fine-tuning of a causal LM prior on expert ``(prompt, action)`` pairs.

The loss is the negative mean token log-likelihood of the expert action after its prompt, i.e.
minus the very score :class:`~cachellm_rl.prior.scoring.CandidateScorer` ranks candidates by:
prompt and action are tokenised exactly as ``CandidateScorer.encode`` does (prompt with the
tokenizer's special tokens and left-truncated to the context, action as ``candidate_prefix +
action`` without special tokens, no EOS since the scorer does not score one). Only the adapter is
saved (peft, safetensors), so ``ScorerConfig(model_dir=..., adapter_dir=...)`` loads it and the
model version hash changes with it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from cachellm_rl.prior.scoring import (
    _DTYPES,
    ScorerConfig,
    _context_length,
    check_model_dir,
    load_causal_lm,
)
from cachellm_rl.reproducibility import compute_fingerprint, fixed_torch_threads

logger = logging.getLogger(__name__)

FINETUNE_REPORT = "finetune.json"
_ADAPTER_SUFFIX = "-lora"


@dataclass(frozen=True, kw_only=True)
class FinetuneConfig:
    """LoRA fine-tuning hyper-parameters.

    Attributes:
        rank: LoRA rank ``r``; >= 1.
        alpha: LoRA scaling numerator (the update is scaled by ``alpha / rank``); >= 1.
        dropout: Dropout on the LoRA input, in [0, 1).
        learning_rate: AdamW step size; > 0. 5e-3 suits small models and few examples; use
            ~1e-4 to 5e-4 for billion-parameter models.
        weight_decay: AdamW weight decay on the LoRA weights; >= 0.
        epochs: Passes over the examples; >= 1.
        batch_size: Examples per optimizer step; >= 1.
        max_grad_norm: Gradient-norm clip; None disables clipping; otherwise > 0.
        max_length: Token budget of prompt + action; the prompt is left-truncated to fit (its
            end holds the current state and the action header). None uses the model's context.
        target_modules: Names of the linear layers that get adapters; None detects the
            attention and MLP projections of the architecture (every ``nn.Linear`` / GPT-2
            ``Conv1D`` except the output embedding).
        seed: Seed of the LoRA initialisation, dropout and example shuffling.
        candidate_prefix: Text put before the action; must equal the scorer's
            ``ScorerConfig.candidate_prefix`` so training matches scoring.
        device: ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda[:N]"``.
        dtype: Base weights' dtype, as ``ScorerConfig.dtype`` (``"auto"``: bfloat16 on CUDA,
            float32 on CPU). The LoRA weights are kept in float32.
        trust_remote_code: Passed to ``from_pretrained``.
        num_threads: Torch CPU threads while training; fixed (not the machine's core count)
            because CPU results depend on it, so one seed gives one adapter on any machine
            with the same torch and CPU instruction set.
    """

    rank: int = 8
    alpha: int = 16
    dropout: float = 0.05
    learning_rate: float = 5e-3
    weight_decay: float = 0.0
    epochs: int = 30
    batch_size: int = 8
    max_grad_norm: float | None = 1.0
    max_length: int | None = None
    target_modules: tuple[str, ...] | None = None
    seed: int = 0
    candidate_prefix: str = " "
    device: str = "auto"
    dtype: str = "auto"
    trust_remote_code: bool = False
    num_threads: int = 2

    def __post_init__(self) -> None:
        for name in ("rank", "alpha", "epochs", "batch_size", "seed", "max_length", "num_threads"):
            value = getattr(self, name)
            if value is None and name == "max_length":
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"FinetuneConfig.{name} must be an integer, got {value!r}")
        if not isinstance(self.trust_remote_code, bool):
            raise ValueError("FinetuneConfig.trust_remote_code must be a bool")
        if self.rank < 1:
            raise ValueError(f"FinetuneConfig.rank must be >= 1, got {self.rank}")
        if self.num_threads < 1:
            raise ValueError(f"FinetuneConfig.num_threads must be >= 1, got {self.num_threads}")
        if self.alpha < 1:
            raise ValueError(f"FinetuneConfig.alpha must be >= 1, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"FinetuneConfig.dropout must be in [0, 1), got {self.dropout}")
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise ValueError(
                f"FinetuneConfig.learning_rate must be finite and > 0, got {self.learning_rate}"
            )
        if not self.weight_decay >= 0:
            raise ValueError(f"FinetuneConfig.weight_decay must be >= 0, got {self.weight_decay}")
        if self.epochs < 1:
            raise ValueError(f"FinetuneConfig.epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"FinetuneConfig.batch_size must be >= 1, got {self.batch_size}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(
                f"FinetuneConfig.max_grad_norm must be None or > 0, got {self.max_grad_norm}"
            )
        if self.max_length is not None and self.max_length < 2:
            raise ValueError(f"FinetuneConfig.max_length must be >= 2, got {self.max_length}")
        if self.target_modules is not None:
            if isinstance(self.target_modules, str) or not isinstance(self.target_modules, tuple):
                raise ValueError(
                    "FinetuneConfig.target_modules must be None or a tuple of module names, "
                    f"got {self.target_modules!r}"
                )
            if not self.target_modules or not all(
                isinstance(m, str) and m for m in self.target_modules
            ):
                raise ValueError(
                    "FinetuneConfig.target_modules must hold at least one non-empty name, "
                    f"got {self.target_modules!r}"
                )
        if not isinstance(self.candidate_prefix, str):
            raise ValueError("FinetuneConfig.candidate_prefix must be a string")
        if self.dtype != "auto" and self.dtype not in _DTYPES:
            raise ValueError(
                f"FinetuneConfig.dtype must be 'auto' or one of {sorted(_DTYPES)}, "
                f"got {self.dtype!r}"
            )
        if not (
            self.device in ("auto", "cpu")
            or self.device == "cuda"
            or self.device.startswith("cuda:")
        ):
            raise ValueError(
                f"FinetuneConfig.device must be 'auto', 'cpu' or 'cuda[:N]', got {self.device!r}"
            )


def default_adapter_dir(model_dir: str | Path) -> Path:
    """Where :func:`finetune_lora` saves by default: ``<parent>/<model name>-lora``.

    Example:
        >>> default_adapter_dir("/models/qwen").as_posix()
        '/models/qwen-lora'
    """
    path = Path(model_dir)
    return path.parent / f"{path.name}{_ADAPTER_SUFFIX}"


def encode_example(
    tokenizer, prompt: str, action: str, *, context_tokens: int, candidate_prefix: str = " "
) -> tuple[list[int], list[int]]:
    """Tokenise one ``(prompt, action)`` pair exactly as ``CandidateScorer.encode`` does.

    Args:
        tokenizer: Hugging Face tokenizer of the model.
        prompt: Prompt text (from :func:`~cachellm_rl.prior.prompts.build_prompt`).
        action: Expert action; scored as ``candidate_prefix + action``.
        context_tokens: Token budget of prompt + action.
        candidate_prefix: Text before the action.

    Returns:
        ``(prompt_ids, action_ids)``, the prompt left-truncated to fit the budget.

    Raises:
        ValueError: The action tokenises to nothing or does not fit the budget.
    """
    action_ids = list(tokenizer(candidate_prefix + action, add_special_tokens=False)["input_ids"])
    if not action_ids:
        raise ValueError(f"action {action!r} tokenises to no tokens")
    prompt_ids = list(tokenizer(prompt)["input_ids"])
    if not prompt_ids:
        start = (
            tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        )
        if start is None:
            raise ValueError("empty prompt and the tokenizer has no BOS/EOS token to start")
        prompt_ids = [start]
    budget = context_tokens - len(action_ids)
    if budget < 1:
        raise ValueError(
            f"action {action!r} of {len(action_ids)} tokens does not fit the budget of "
            f"{context_tokens} tokens"
        )
    return prompt_ids[-budget:], action_ids


def _is_linear(module: torch.nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    # Quantised linears (bitsandbytes Linear4bit, GPTQ QuantLinear) are matched by class name.
    return isinstance(module, torch.nn.Linear | Conv1D) or type(module).__name__.endswith("Linear")


def detect_target_modules(model: torch.nn.Module) -> tuple[str, ...]:
    """Names of the linear layers LoRA adapts: all linear/Conv1D leaves but the output head.

    GPT-2 gives ``("c_attn", "c_fc", "c_proj")``; Llama/Qwen give ``q_proj``, ``k_proj``,
    ``v_proj``, ``o_proj``, ``gate_proj``, ``up_proj``, ``down_proj``.

    Args:
        model: The base causal LM.

    Returns:
        Sorted, distinct last components of the module names.

    Raises:
        ValueError: The model has no linear layer besides its output embedding.
    """
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    names = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if name and module is not head and _is_linear(module)
    }
    if not names:
        raise ValueError(
            f"found no linear/Conv1D layers to adapt in {type(model).__name__}; "
            "set FinetuneConfig.target_modules to the names of its projection layers"
        )
    return tuple(sorted(names))


def _check_targets(model: torch.nn.Module, targets: Sequence[str]) -> None:
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules() if name}
    missing = [t for t in targets if t not in present]
    if missing:
        raise ValueError(
            f"FinetuneConfig.target_modules {missing} match no module of "
            f"{type(model).__name__}; linear layers it has: {list(detect_target_modules(model))}"
        )


def _check_examples(examples: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    pairs = list(examples)
    if not pairs:
        raise ValueError("examples is empty: fine-tuning needs at least one (prompt, action) pair")
    for i, pair in enumerate(pairs):
        if not (isinstance(pair, tuple | list) and len(pair) == 2):
            raise ValueError(f"examples[{i}] must be a (prompt, action) pair, got {pair!r}")
        prompt, action = pair
        if not isinstance(prompt, str) or not isinstance(action, str):
            raise ValueError(f"examples[{i}] must hold two strings, got {pair!r}")
        if not action.strip():
            raise ValueError(f"examples[{i}] has an empty action")
    return [(p, a) for p, a in pairs]


def _collate(
    batch: Sequence[tuple[list[int], list[int]]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and a mask of the action-target positions.

    ``target_mask_BT[b, t]`` is true where position ``t``'s logits predict an action token
    (``input_ids[b, t + 1]``).
    """
    max_len = max(len(p) + len(a) for p, a in batch)
    ids_BT = torch.full((len(batch), max_len), pad_id, dtype=torch.long)
    attn_BT = torch.zeros((len(batch), max_len), dtype=torch.long)
    target_mask_BT = torch.zeros((len(batch), max_len), dtype=torch.bool)
    for b, (p, a) in enumerate(batch):
        n = len(p) + len(a)
        ids_BT[b, :n] = torch.tensor(p + a, dtype=torch.long)
        attn_BT[b, :n] = 1
        target_mask_BT[b, len(p) - 1 : n - 1] = True
    return ids_BT.to(device), attn_BT.to(device), target_mask_BT.to(device)


def action_nll_loss(
    logits_BTV: torch.Tensor, ids_BT: torch.Tensor, target_mask_BT: torch.Tensor
) -> torch.Tensor:
    """Negative mean token log-likelihood of each action, averaged over the batch.

    Per example this is minus the scorer's length-normalised candidate score, so each example
    weighs the same whatever its action's length.

    Args:
        logits_BTV: Model logits.
        ids_BT: Input ids (targets are ``ids_BT[:, 1:]``).
        target_mask_BT: True where the logits at ``t`` predict an action token.

    Returns:
        Scalar loss.

    Example:
        >>> ids = torch.tensor([[0, 1]])
        >>> logits = torch.zeros(1, 2, 4)
        >>> mask = torch.tensor([[True, False]])
        >>> round(action_nll_loss(logits, ids, mask).item(), 4) == round(math.log(4), 4)
        True
    """
    logp_BTV = torch.log_softmax(logits_BTV[:, :-1].float(), dim=-1)
    tgt_logp_BT = logp_BTV.gather(-1, ids_BT[:, 1:].unsqueeze(-1)).squeeze(-1)
    mask_BT = target_mask_BT[:, :-1].to(tgt_logp_BT.dtype)
    per_example_B = -(tgt_logp_BT * mask_BT).sum(dim=1) / mask_BT.sum(dim=1)
    return per_example_B.mean()


def finetune_lora(
    model_dir: str | Path,
    examples: Sequence[tuple[str, str]],
    *,
    out_dir: str | Path | None = None,
    config: FinetuneConfig | None = None,
    progress: bool = True,
) -> Path:
    """Fine-tune a LoRA adapter so the model prefers the expert's actions.

    Args:
        model_dir: Local Hugging Face model directory (safetensors weights).
        examples: ``(prompt, action)`` pairs: the expert's action in the state the prompt
            (built with :func:`~cachellm_rl.prior.prompts.build_prompt`) describes.
        out_dir: Adapter directory to write; default ``<model_dir parent>/<model name>-lora``.
        config: Hyper-parameters; defaults to :class:`FinetuneConfig`.
        progress: Show a tqdm progress bar.

    Returns:
        The adapter directory, holding ``adapter_config.json``, ``adapter_model.safetensors``
        and ``finetune.json`` (config, number of examples, per-epoch and final losses).

    Raises:
        ValueError: No examples, an empty action, bad target modules, or a model directory
            without safetensors weights.
        FileNotFoundError: The model directory or its ``config.json`` is missing.
        ImportError: peft is not installed (a core dependency; `pip install peft`).
    """
    cfg = config or FinetuneConfig()
    with fixed_torch_threads(cfg.num_threads):
        return _finetune_lora(model_dir, examples, out_dir, cfg, progress)


def _finetune_lora(
    model_dir: str | Path,
    examples: Sequence[tuple[str, str]],
    out_dir: str | Path | None,
    cfg: FinetuneConfig,
    progress: bool,
) -> Path:
    pairs = _check_examples(examples)
    model_path = check_model_dir(model_dir)
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as exc:
        raise ImportError("LoRA fine-tuning needs peft: `pip install peft`") from exc
    from tqdm.auto import tqdm
    from transformers.pytorch_utils import Conv1D

    adapter_dir = Path(out_dir) if out_dir is not None else default_adapter_dir(model_path)
    adapter_dir = adapter_dir.expanduser().resolve()
    if adapter_dir == model_path:
        raise ValueError("out_dir must differ from model_dir: the adapter would mix with the base")

    started = time.perf_counter()
    model, tokenizer, device = load_causal_lm(
        ScorerConfig(
            model_dir=str(model_path),
            device=cfg.device,
            dtype=cfg.dtype,
            trust_remote_code=cfg.trust_remote_code,
        )
    )
    context_tokens = _context_length(model, None)
    budget = context_tokens if cfg.max_length is None else min(cfg.max_length, context_tokens)
    encoded = [
        encode_example(
            tokenizer, p, a, context_tokens=budget, candidate_prefix=cfg.candidate_prefix
        )
        for p, a in pairs
    ]

    targets = cfg.target_modules or detect_target_modules(model)
    _check_targets(model, targets)
    fan_in_fan_out = any(
        isinstance(m, Conv1D) for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in targets
    )
    torch.manual_seed(cfg.seed)
    lora_config = LoraConfig(
        task_type="CAUSAL_LM",
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(targets),
        fan_in_fan_out=fan_in_fan_out,
        bias="none",
    )
    peft_model = get_peft_model(model, lora_config)
    peft_model.train()
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    pad_id = getattr(tokenizer, "pad_token_id", None)
    pad_id = 0 if pad_id is None else pad_id  # padding sits after the targets: any id works
    shuffle_gen = torch.Generator().manual_seed(cfg.seed)
    steps_per_epoch = math.ceil(len(encoded) / cfg.batch_size)

    epoch_losses: list[float] = []
    bar = tqdm(
        total=cfg.epochs * steps_per_epoch, desc="LoRA fine-tune", unit="step", disable=not progress
    )
    try:
        for _ in range(cfg.epochs):
            order = torch.randperm(len(encoded), generator=shuffle_gen).tolist()
            total, count = 0.0, 0
            for start in range(0, len(order), cfg.batch_size):
                batch = [encoded[i] for i in order[start : start + cfg.batch_size]]
                ids_BT, attn_BT, target_mask_BT = _collate(batch, pad_id, device)
                logits_BTV = peft_model(input_ids=ids_BT, attention_mask=attn_BT).logits
                loss = action_nll_loss(logits_BTV, ids_BT, target_mask_BT)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                optimizer.step()
                total += loss.item() * len(batch)
                count += len(batch)
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.4f}")
            epoch_losses.append(total / count)
    finally:
        bar.close()

    peft_model.eval()
    adapter_dir.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(str(adapter_dir), safe_serialization=True)
    report = {
        "model_dir": str(model_path),
        "config": {
            **dataclasses.asdict(cfg),
            "target_modules": list(cfg.target_modules) if cfg.target_modules else None,
        },
        "target_modules": list(targets),
        "num_examples": len(encoded),
        "num_action_tokens": sum(len(a) for _, a in encoded),
        "max_length": budget,
        "epoch_losses": epoch_losses,
        "final_loss": epoch_losses[-1],
        "trainable_parameters": sum(p.numel() for p in params),
        "seconds": round(time.perf_counter() - started, 3),
        "compute": compute_fingerprint(),
    }
    (adapter_dir / FINETUNE_REPORT).write_text(json.dumps(report, indent=2) + "\n")
    logger.info(
        "LoRA adapter saved to %s (%d examples, loss %.4f -> %.4f)",
        adapter_dir,
        len(encoded),
        epoch_losses[0],
        epoch_losses[-1],
    )
    return adapter_dir
