"""Candidate scoring with a causal LM: the prior ``p(a|s)`` (see docs/priors.md).

The score of candidate ``a`` is the mean token log-likelihood of ``a``'s tokens after the prompt
(length-normalised so short commands are not favoured); the prior is
``softmax(score / prior_temperature)`` over the candidates.

Prefix sharing: the prompt's forward pass runs once and its key/value cache is shared by all
candidates of that prompt, so a prompt of ``P`` tokens with ``C`` candidates of ``L`` tokens costs
``P + C*L`` token positions instead of ``C*(P+L)``. By default the candidates then run as one
*tree*: all their tokens in a single sequence after the prompt, with an attention mask that lets
each token see the prompt and its own candidate's earlier tokens only (and position ids that
restart after the prompt for every candidate). That avoids copying the prompt's cache once per
candidate, which on a CPU cost more than the prompt itself. Models that reject a 4-D attention
mask fall back to the per-candidate copy (``candidate_attention="repeat"``), checked on the first
request. Several requests (a Serve batch) run in one *packed* pass: each a row of its prompt
followed by its candidate tree, right-padded, under one mask (checked against the two-pass tree on
the first request; :meth:`CandidateScorer.score_each`).

Speed on a CPU: only the prompt's last position goes through the LM head
(``logits_to_keep=1`` where the model takes it), GPT-2's ``gelu_new`` runs as PyTorch's fused
tanh-GELU (the same approximation in one kernel; scores agree to about 1e-5 nats), and candidate
texts are tokenised in one call per request through a bounded cache (commands recur across
states).
"""

from __future__ import annotations

import copy
import functools
import hashlib
import inspect
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from cachellm_rl.contracts import PriorRequest, PriorResponse
from cachellm_rl.prior.prompts import PROMPT_LAYOUT_FILE, load_prompt_config

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

_CANDIDATE_IDS_MAX = 100_000  # distinct candidate texts kept tokenised (then cleared)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True, kw_only=True)
class ScorerConfig:
    """How the LM prior is loaded and evaluated.

    Attributes:
        model_dir: Local Hugging Face model directory (``config.json`` + ``*.safetensors``).
        adapter_dir: Optional LoRA adapter directory (peft) applied on top of the base model.
        dtype: ``"auto"`` (bfloat16 on CUDA, float32 on CPU), ``"float32"``, ``"bfloat16"`` or
            ``"float16"``. Ignored for GPTQ checkpoints, whose quantization config decides.
        device: ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda[:N]"``.
        trust_remote_code: Passed to ``from_pretrained``; off unless the user asks.
        load_in_4bit: Quantise with bitsandbytes 4-bit on load (needs CUDA and bitsandbytes).
        prior_temperature: ``T_prior`` of the softmax over candidate scores; > 0.
        candidate_prefix: Text put before each candidate (a space, so BPE sees a new word).
        max_context_tokens: Context length; None reads it from the model config.
        max_candidates_per_forward: Candidates of one prompt scored per forward pass (memory cap).
        max_batch_tokens: Token slots (requests times the longest packed row) of one packed forward
            pass over several requests; more requests start another pass (memory cap).
        max_padding_fraction: Largest share of a packed pass's token slots that may be padding.
            Requests are sorted by width and one that would pad the pass beyond this starts
            another pass; 1.0 packs regardless. Long prompts are compute-bound, so padding
            costs what one pass for several requests saves (docs/priors.md).
        candidate_attention: ``"tree"`` (all candidates in one masked sequence after the
            prompt; falls back to ``"repeat"`` when the model cannot take a 4-D mask) or
            ``"repeat"`` (the prompt's cache copied per candidate).
    """

    model_dir: str
    adapter_dir: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    trust_remote_code: bool = False
    load_in_4bit: bool = False
    prior_temperature: float = 1.0
    candidate_prefix: str = " "
    max_context_tokens: int | None = None
    max_candidates_per_forward: int = 64
    max_batch_tokens: int = 16_384
    max_padding_fraction: float = 0.1
    candidate_attention: str = "tree"

    def __post_init__(self) -> None:
        if self.candidate_attention not in ("tree", "repeat"):
            raise ValueError(
                "ScorerConfig.candidate_attention must be 'tree' or 'repeat', got "
                f"{self.candidate_attention!r}"
            )
        if self.dtype != "auto" and self.dtype not in _DTYPES:
            raise ValueError(
                f"ScorerConfig.dtype must be 'auto' or one of {sorted(_DTYPES)}, got {self.dtype!r}"
            )
        if not self.prior_temperature > 0:
            raise ValueError(
                f"ScorerConfig.prior_temperature must be > 0, got {self.prior_temperature}"
            )
        if self.max_candidates_per_forward < 1:
            raise ValueError("ScorerConfig.max_candidates_per_forward must be >= 1")
        if self.max_batch_tokens < 1:
            raise ValueError("ScorerConfig.max_batch_tokens must be >= 1")
        if not 0.0 <= self.max_padding_fraction <= 1.0:
            raise ValueError(
                "ScorerConfig.max_padding_fraction must be in [0, 1], got "
                f"{self.max_padding_fraction}"
            )
        if self.max_context_tokens is not None and self.max_context_tokens < 2:
            raise ValueError("ScorerConfig.max_context_tokens must be >= 2")


def check_model_dir(model_dir: str | Path) -> Path:
    """Check that a directory holds a loadable safetensors checkpoint.

    Args:
        model_dir: Directory to check.

    Returns:
        The directory as a resolved Path.

    Raises:
        FileNotFoundError: The directory or its ``config.json`` is missing.
        ValueError: The directory has no ``*.safetensors`` weights (``.bin`` pickles are refused).
    """
    path = Path(model_dir).expanduser().resolve()
    if not path.is_dir():
        raise FileNotFoundError(f"model directory {str(path)!r} does not exist")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model directory {str(path)!r} has no config.json")
    if not list(path.glob("*.safetensors")):
        pickled = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
        hint = (
            f" It holds pickled weights {pickled}; re-save them with "
            "`model.save_pretrained(dir, safe_serialization=True)`: pickles are not loaded."
            if pickled
            else ""
        )
        raise ValueError(f"model directory {str(path)!r} has no *.safetensors weights.{hint}")
    return path


def weights_version(*dirs: str | Path | None, extra: str = "") -> str:
    """Content hash of the safetensors weights (and adapter, and prompt layout file) in
    ``dirs``: the model version.

    Args:
        *dirs: Model and adapter directories; None entries are skipped.
        extra: Extra text mixed into the hash (e.g. the prior temperature).

    Returns:
        16 hex characters.
    """
    h = hashlib.blake2b(digest_size=8)
    for d in dirs:
        if d is None:
            continue
        for f in sorted(Path(d).glob("*.safetensors")):
            h.update(f.name.encode())
            with f.open("rb") as fh:
                while chunk := fh.read(1 << 22):
                    h.update(chunk)
        cfg = Path(d) / "adapter_config.json"
        if cfg.is_file():
            h.update(cfg.read_bytes())
        layout = Path(d) / PROMPT_LAYOUT_FILE  # a prior prompted another way is another prior
        if layout.is_file():
            h.update(layout.read_bytes())
    h.update(extra.encode())
    return h.hexdigest()


def _pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_causal_lm(
    config: ScorerConfig,
) -> tuple[torch.nn.Module, PreTrainedTokenizerBase, torch.device]:
    """Load model and tokenizer from a local directory (safetensors only).

    Args:
        config: Scorer configuration.

    Returns:
        ``(model, tokenizer, device)`` with the model in eval mode.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = check_model_dir(config.model_dir)
    device = _pick_device(config.device)
    hf_config = AutoConfig.from_pretrained(path, trust_remote_code=config.trust_remote_code)
    quant = getattr(hf_config, "quantization_config", None)
    kwargs: dict = {"use_safetensors": True, "trust_remote_code": config.trust_remote_code}
    if getattr(hf_config, "activation_function", None) == "gelu_new":
        # Same tanh approximation as transformers' Python `gelu_new`, in one fused kernel.
        hf_config.activation_function = "gelu_pytorch_tanh"
        kwargs["config"] = hf_config
    if quant is not None:
        method = quant.get("quant_method") if isinstance(quant, dict) else None
        if method == "gptq":
            try:
                import gptqmodel  # noqa: F401
            except ImportError as exc:
                raise ImportError(
                    f"{str(path)!r} is a GPTQ checkpoint; install the `gptq` extra "
                    "(gptqmodel, the backend transformers uses; auto-gptq is unmaintained)"
                ) from exc
        kwargs["device_map"] = "auto" if device.type == "cuda" else {"": str(device)}
    elif config.load_in_4bit:
        from transformers import BitsAndBytesConfig

        if device.type != "cuda":
            raise ValueError("ScorerConfig.load_in_4bit needs a CUDA device")
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16
        )
        kwargs["device_map"] = {"": str(device)}
    else:
        if config.dtype == "auto":
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        else:
            dtype = _DTYPES[config.dtype]
        kwargs["dtype"] = dtype
    model: torch.nn.Module = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if config.adapter_dir is not None:
        from peft import PeftModel

        check_adapter = Path(config.adapter_dir)
        if not (check_adapter / "adapter_config.json").is_file():
            raise FileNotFoundError(
                f"adapter directory {str(check_adapter)!r} has no adapter_config.json"
            )
        model = PeftModel.from_pretrained(model, str(check_adapter))
    if "device_map" not in kwargs:
        model = model.to(device)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=config.trust_remote_code)
    return model, tokenizer, device


def _context_length(model: torch.nn.Module, override: int | None) -> int:
    if override is not None:
        return override
    cfg = model.config
    for name in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048


def candidate_token_logprobs(
    model: torch.nn.Module,
    prompt_ids: Sequence[int],
    candidate_ids: Sequence[Sequence[int]],
    *,
    device: torch.device,
    max_candidates_per_forward: int = 64,
) -> list[np.ndarray]:
    """Per-token log-likelihoods of each candidate after one prompt, with prefix sharing.

    The prompt runs once with ``use_cache=True``; its key/value cache is repeated for the
    candidates, which run in one right-padded batch. Padding sits after each candidate's last
    real token, so causal attention keeps it out of the real tokens' outputs.

    Args:
        model: Causal LM in eval mode.
        prompt_ids: Prompt token ids (non-empty).
        candidate_ids: Token ids of each candidate (each non-empty).
        device: Device of the model.
        max_candidates_per_forward: Candidates per forward pass.

    Returns:
        One float64 array per candidate with the log-probability of each of its tokens.
    """
    if len(prompt_ids) == 0:
        raise ValueError("prompt_ids is empty: scoring needs at least one context token")
    prompt = torch.tensor([list(prompt_ids)], dtype=torch.long, device=device)
    p_len = prompt.shape[1]
    out: list[np.ndarray] = []
    with torch.inference_mode():
        prompt_out = model(input_ids=prompt, use_cache=True, **_last_logits_only(model))
        first_logp = torch.log_softmax(prompt_out.logits[0, -1].float(), dim=-1)  # (V,)
        base_cache = prompt_out.past_key_values
        for start in range(0, len(candidate_ids), max_candidates_per_forward):
            chunk = candidate_ids[start : start + max_candidates_per_forward]
            n = len(chunk)
            max_len = max(len(c) for c in chunk)
            ids_CL = torch.zeros((n, max_len), dtype=torch.long, device=device)
            for i, c in enumerate(chunk):
                ids_CL[i, : len(c)] = torch.tensor(list(c), dtype=torch.long)
            if max_len > 1:
                cache = copy.deepcopy(base_cache) if start + n < len(candidate_ids) else base_cache
                cache.batch_repeat_interleave(n)
                positions_CL = torch.arange(p_len, p_len + max_len - 1, device=device).expand(n, -1)
                cand_out = model(
                    input_ids=ids_CL[:, :-1],
                    **{_cache_kwarg(model): cache},
                    position_ids=positions_CL,
                    attention_mask=torch.ones((n, p_len + max_len - 1), device=device),
                    use_cache=True,
                )
                rest_logp_CLV = torch.log_softmax(cand_out.logits.float(), dim=-1)
            for i, c in enumerate(chunk):
                lp = [first_logp[c[0]].item()]
                if len(c) > 1:
                    tgt = ids_CL[i, 1 : len(c)]
                    lp.extend(
                        rest_logp_CLV[i, : len(c) - 1].gather(-1, tgt[:, None]).squeeze(-1).tolist()
                    )
                out.append(np.asarray(lp, dtype=np.float64))
    return out


@functools.cache
def _forward_params(forward) -> frozenset[str]:
    """The keyword names a model class's ``forward`` takes (looked up once per class)."""
    return frozenset(inspect.signature(forward).parameters)


def _last_logits_only(model: torch.nn.Module) -> dict:
    """``{"logits_to_keep": 1}`` where the model can skip the LM head on all but the last
    position (the prompt pass needs only that one), else ``{}``."""
    return {"logits_to_keep": 1} if "logits_to_keep" in _forward_params(type(model).forward) else {}


def _cache_kwarg(model: torch.nn.Module) -> str:
    """The keyword under which ``model.forward`` takes a key/value cache (transformers 5
    renamed ``past_key_values`` to ``cache``)."""
    return "cache" if "cache" in _forward_params(type(model).forward) else "past_key_values"


@dataclass(frozen=True)
class CandidateTrie:
    """The candidates' input tokens as a prefix tree: one node per distinct proper prefix.

    Node ``n`` holds the last token of its prefix; its output predicts the next token of every
    candidate that extends the prefix. Candidates sharing a prefix ("cook pepper with oven" /
    "... with stove") share its nodes, so a tree pass runs each shared token once.

    Attributes:
        tokens: Token of each node, parents before children.
        depth: 0-based depth of each node (its position after the prompt).
        allow_TT: ``allow_TT[n, m]``: node ``m`` is ``n`` or an ancestor of ``n`` (what ``n``
            attends to besides the prompt).
        preds: Per candidate, the node whose output predicts its token ``j`` for ``j >= 1``.
    """

    tokens: list[int]
    depth: list[int]
    allow_TT: np.ndarray
    preds: list[list[int]]

    @staticmethod
    def size(candidate_ids: Sequence[Sequence[int]]) -> int:
        """Nodes of the trie of ``candidate_ids`` (the tree pass's length), without building it.

        Example:
            >>> CandidateTrie.size([[5, 6, 7], [5, 6, 8], [9]])
            2
        """
        return len({tuple(c[:k]) for c in candidate_ids for k in range(1, len(c))})

    @classmethod
    def build(cls, candidate_ids: Sequence[Sequence[int]]) -> CandidateTrie:
        """The trie of ``candidate_ids``' proper prefixes.

        Example:
            >>> t = CandidateTrie.build([[5, 6, 7], [5, 6, 8], [9]])
            >>> t.tokens, t.depth, t.preds
            ([5, 6], [0, 1], [[0, 1], [0, 1], []])
        """
        index: dict[tuple[int, int], int] = {}
        tokens: list[int] = []
        depth: list[int] = []
        parent: list[int] = []
        preds: list[list[int]] = []
        for c in candidate_ids:
            path, prev = [], -1
            for k in range(len(c) - 1):
                node = index.get((prev, c[k]))
                if node is None:
                    node = index[(prev, c[k])] = len(tokens)
                    tokens.append(int(c[k]))
                    depth.append(k)
                    parent.append(prev)
                path.append(node)
                prev = node
            preds.append(path)
        allow = np.eye(len(tokens), dtype=bool)
        for n in range(len(tokens)):
            a = parent[n]
            while a >= 0:
                allow[n, a] = True
                a = parent[a]
        return cls(tokens=tokens, depth=depth, allow_TT=allow, preds=preds)


def tree_candidate_token_logprobs(
    model: torch.nn.Module,
    prompt_ids: Sequence[int],
    candidate_ids: Sequence[Sequence[int]],
    *,
    device: torch.device,
    max_candidates_per_forward: int = 64,
) -> list[np.ndarray]:
    """:func:`candidate_token_logprobs` with the candidates as one masked sequence (a tree).

    After the prompt's forward pass, the candidates' input tokens (all but each one's last) run
    as one sequence on top of the prompt's cache, as a prefix tree (:class:`CandidateTrie`: a
    prefix several candidates share runs once). The node of token ``j`` has position ``P + j``
    and attends to the prompt and to its own prefix only, which gives the same log-likelihoods
    as scoring each candidate after its own copy of the prompt cache, without the copies.
    """
    if len(prompt_ids) == 0:
        raise ValueError("prompt_ids is empty: scoring needs at least one context token")
    p_len = len(prompt_ids)
    cache_kw = _cache_kwarg(model)
    out: list[np.ndarray] = []
    with torch.inference_mode():
        prompt_out = model(
            input_ids=torch.tensor([list(prompt_ids)], dtype=torch.long, device=device),
            use_cache=True,
            **_last_logits_only(model),
        )
        first_logp_V = torch.log_softmax(prompt_out.logits[0, -1].float(), dim=-1)
        base_cache = prompt_out.past_key_values
        for start in range(0, len(candidate_ids), max_candidates_per_forward):
            chunk = [list(c) for c in candidate_ids[start : start + max_candidates_per_forward]]
            trie = CandidateTrie.build(chunk)
            rest_logp_TV = None
            if trie.tokens:
                t = len(trie.tokens)
                ids = torch.tensor([trie.tokens], device=device)
                pos = torch.tensor([[p_len + d for d in trie.depth]], device=device)
                allow_TT = torch.from_numpy(trie.allow_TT).to(device)
                allow = torch.cat(
                    [torch.ones((t, p_len), dtype=torch.bool, device=device), allow_TT], dim=1
                )
                last = start + len(chunk) >= len(candidate_ids)
                cache = base_cache if last else copy.deepcopy(base_cache)
                cand_out = model(
                    input_ids=ids,
                    position_ids=pos,
                    attention_mask=allow[None, None],
                    use_cache=True,
                    **{cache_kw: cache},
                )
                rest_logp_TV = torch.log_softmax(cand_out.logits[0].float(), dim=-1)
            for c, path in zip(chunk, trie.preds, strict=True):
                lp = [first_logp_V[c[0]].item()]
                if path and rest_logp_TV is not None:
                    tgt = torch.tensor(c[1:], device=device)
                    rows = torch.tensor(path, device=device)
                    lp.extend(rest_logp_TV[rows, tgt].tolist())
                out.append(np.asarray(lp, dtype=np.float64))
    return out


def packed_candidate_token_logprobs(
    model: torch.nn.Module,
    items: Sequence[tuple[Sequence[int], Sequence[Sequence[int]]]],
    *,
    device: torch.device,
) -> list[list[np.ndarray]]:
    """:func:`tree_candidate_token_logprobs` for several prompts in **one** forward pass.

    Row ``r`` of the batch holds prompt ``r``'s tokens followed by its candidates' prefix tree
    (:class:`CandidateTrie`: all but each candidate's last token, a shared prefix once),
    right-padded to the longest row. One 4-D mask gives each row causal attention over its
    prompt and lets each tree node see the prompt and its own prefix only; padding sees only
    itself and nothing sees padding. Position ids restart after the prompt for every
    candidate. The numbers equal the two-pass tree's (the same attention pattern, with the
    prompt's keys computed in the same pass instead of read from a cache); the saving is in
    calls: one model call for a whole Serve batch instead of two per request, which on a CPU
    is most of a small model's cost.

    Args:
        model: Causal LM in eval mode that accepts a 4-D boolean attention mask.
        items: ``(prompt_ids, candidate_ids)`` per prompt; prompts and candidates non-empty.
        device: Device of the model.

    Returns:
        Per prompt, one float64 array per candidate with the log-probability of each token.
    """
    if not items:
        return []
    rows = []
    for prompt_ids, candidate_ids in items:
        if len(prompt_ids) == 0:
            raise ValueError("prompt_ids is empty: scoring needs at least one context token")
        p_len = len(prompt_ids)
        trie = CandidateTrie.build(candidate_ids)
        ids = list(prompt_ids) + trie.tokens
        pos = list(range(p_len)) + [p_len + d for d in trie.depth]
        rows.append((p_len, trie, ids, pos))
    b, width = len(rows), max(len(r[2]) for r in rows)
    ids_BL = torch.zeros((b, width), dtype=torch.long)
    pos_BL = torch.zeros((b, width), dtype=torch.long)
    allow_BLL = torch.zeros((b, width, width), dtype=torch.bool)
    for r, (p_len, trie, ids, pos) in enumerate(rows):
        n = len(ids)
        ids_BL[r, :n] = torch.tensor(ids)
        pos_BL[r, :n] = torch.tensor(pos)
        allow_BLL[r, :p_len, :p_len] = torch.ones((p_len, p_len), dtype=torch.bool).tril()
        if trie.tokens:
            allow_BLL[r, p_len:n, :p_len] = True
            allow_BLL[r, p_len:n, p_len:n] = torch.from_numpy(trie.allow_TT)
        pad = torch.arange(n, width)
        allow_BLL[r, pad, pad] = True  # padding attends to itself only (no empty softmax rows)
    # Only positions from the earliest prompt end on are needed: keep just those logits.
    keep = width - min(r[0] for r in rows) + 1
    kwargs = {"logits_to_keep": keep} if _last_logits_only(model) else {}
    with torch.inference_mode():
        logits = model(
            input_ids=ids_BL.to(device),
            position_ids=pos_BL.to(device),
            attention_mask=allow_BLL[:, None].to(device),
            use_cache=False,
            **kwargs,
        ).logits
        offset = width - logits.shape[1]  # column c of the kept logits is position offset + c
        logp_BKV = torch.log_softmax(logits.float(), dim=-1)
        # Gather every scored token at once: (row, position whose output predicts it, token).
        g_row, g_col, g_tok, sizes = [], [], [], []
        for r, (p_len, trie, _, _) in enumerate(rows):
            _, candidate_ids = items[r]
            for c, path in zip(candidate_ids, trie.preds, strict=True):
                g_row.append(r)
                g_col.append(p_len - 1 - offset)  # the prompt's last output: first token
                g_tok.append(c[0])
                for j in range(1, len(c)):
                    g_row.append(r)
                    g_col.append(p_len + path[j - 1] - offset)
                    g_tok.append(c[j])
                sizes.append(len(c))
        flat = logp_BKV[torch.tensor(g_row), torch.tensor(g_col), torch.tensor(g_tok)]
        values = flat.double().cpu().numpy()
    pieces = iter(np.split(values, np.cumsum(sizes)[:-1]))
    return [[next(pieces) for _ in candidate_ids] for _, candidate_ids in items]


def candidate_token_logprobs_full(
    model: torch.nn.Module,
    prompt_ids: Sequence[int],
    candidate_ids: Sequence[Sequence[int]],
    *,
    device: torch.device,
) -> list[np.ndarray]:
    """Reference computation without prefix sharing: each prompt+candidate run separately.

    Used to check :func:`candidate_token_logprobs` and as the benchmark's baseline.
    """
    out: list[np.ndarray] = []
    p_len = len(prompt_ids)
    with torch.inference_mode():
        for c in candidate_ids:
            seq = torch.tensor([list(prompt_ids) + list(c)], dtype=torch.long, device=device)
            logp = torch.log_softmax(model(input_ids=seq).logits[0].float(), dim=-1)
            tgt = seq[0, p_len:]
            out.append(
                logp[p_len - 1 : p_len - 1 + len(c)]
                .gather(-1, tgt[:, None])
                .squeeze(-1)
                .double()
                .cpu()
                .numpy()
            )
    return out


def prior_from_token_logprobs(
    token_logprobs: Sequence[np.ndarray], prior_temperature: float = 1.0
) -> np.ndarray:
    """Length-normalised scores → normalised prior log-probabilities.

    Args:
        token_logprobs: Per-token log-likelihoods of each candidate.
        prior_temperature: Softmax temperature over the mean scores.

    Returns:
        float32 log-probabilities with logsumexp 0.

    Example:
        >>> lp = prior_from_token_logprobs([np.log([0.5]), np.log([0.5, 0.5])])
        >>> np.allclose(np.exp(lp), [0.5, 0.5])
        True
    """
    scores = np.array([float(np.mean(t)) for t in token_logprobs], dtype=np.float64)
    z = scores / prior_temperature
    z = z - z.max()
    logp = z - np.log(np.exp(z).sum())
    return logp.astype(np.float32)


def _agrees(
    name: str, fallback: str, ref: list[np.ndarray], run: Callable[[], list[np.ndarray]]
) -> bool:
    """Whether ``run()`` works on this model and gives ``ref`` to 1e-3 nats (else a warning
    naming the ``fallback`` the scorer takes instead)."""
    try:
        got = run()
    except Exception as exc:  # e.g. an architecture that rejects 4-D masks
        logger.warning("%s unavailable for this model (%r); %s", name, exc, fallback)
        return False
    gap = max(float(np.max(np.abs(a - b))) for a, b in zip(ref, got, strict=True))
    if gap > 1e-3:
        logger.warning("%s differs by %.2g nats on this model; %s", name, gap, fallback)
        return False
    return True


class CandidateScorer:
    """Scores the candidate actions of states with a causal LM (see docs/priors.md).

    Any Hugging Face causal LM in a local directory works: the project's embedded default prior,
    a user's bf16 checkpoint, a GPTQ checkpoint (with the ``gptq`` extra), or bitsandbytes 4-bit.

    Args:
        config: Scorer configuration.
    """

    def __init__(self, config: ScorerConfig) -> None:
        self.config = config
        self.model, self.tokenizer, self.device = load_causal_lm(config)
        self.context_tokens = _context_length(self.model, config.max_context_tokens)
        self.model_version = weights_version(
            config.model_dir,
            config.adapter_dir,
            extra=json.dumps({"T_prior": config.prior_temperature, "pre": config.candidate_prefix}),
        )
        # The layout the model was trained with (its prompt_layout.json; default otherwise).
        self.prompt_config = load_prompt_config(config.model_dir)
        self.num_truncated_prompts = 0
        self._candidate_ids: dict[str, list[int]] = {}
        # Decided on the first request: does this model give the same numbers with the tree?
        self._tree: bool | None = None if config.candidate_attention == "tree" else False
        # Decided with the tree: do several requests in one packed pass give the same numbers?
        self._packed: bool | None = None if config.candidate_attention == "tree" else False

    def encode(self, request: PriorRequest) -> tuple[list[int], list[list[int]]]:
        """Tokenise a request: prompt ids (left-truncated to the context) and candidate ids."""
        tok = self.tokenizer
        known = self._candidate_ids
        new = [c for c in dict.fromkeys(request.candidates) if c not in known]
        if new:
            if len(known) + len(new) > _CANDIDATE_IDS_MAX:
                known.clear()
            texts = [self.config.candidate_prefix + c for c in new]
            for c, ids in zip(new, tok(texts, add_special_tokens=False)["input_ids"], strict=True):
                known[c] = list(ids)
        cand_ids = [known[c] for c in request.candidates]
        for c, ids in zip(request.candidates, cand_ids, strict=True):
            if not ids:
                raise ValueError(f"candidate {c!r} tokenises to no tokens")
        prompt_ids = list(tok(request.prompt)["input_ids"])
        if not prompt_ids:
            start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
            if start is None:
                raise ValueError("empty prompt and the tokenizer has no BOS/EOS token to start")
            prompt_ids = [start]
        budget = self.context_tokens - max(len(c) for c in cand_ids)
        if budget < 1:
            raise ValueError(
                f"a candidate of {max(len(c) for c in cand_ids)} tokens does not fit the "
                f"model's context of {self.context_tokens} tokens"
            )
        if len(prompt_ids) > budget:
            # Keep the end of the prompt: the current state and the action header are last.
            prompt_ids = prompt_ids[-budget:]
            self.num_truncated_prompts += 1
        return prompt_ids, cand_ids

    def token_logprobs(self, request: PriorRequest) -> list[np.ndarray]:
        """Per-token log-likelihoods of each candidate of one request (prefix shared)."""
        prompt_ids, cand_ids = self.encode(request)
        if self._tree is None:
            self._tree = self._tree_matches(prompt_ids, cand_ids)
        score = tree_candidate_token_logprobs if self._tree else candidate_token_logprobs
        return score(
            self.model,
            prompt_ids,
            cand_ids,
            device=self.device,
            max_candidates_per_forward=self.config.max_candidates_per_forward,
        )

    def _tree_matches(self, prompt_ids: list[int], cand_ids: list[list[int]]) -> bool:
        """Whether tree scoring runs on this model and agrees with the per-candidate copy."""
        n = self.config.max_candidates_per_forward
        ref = candidate_token_logprobs(
            self.model, prompt_ids, cand_ids, device=self.device, max_candidates_per_forward=n
        )
        return _agrees(
            "tree scoring",
            "copying caches",
            ref,
            lambda: tree_candidate_token_logprobs(
                self.model, prompt_ids, cand_ids, device=self.device, max_candidates_per_forward=n
            ),
        )

    def _packed_matches(self, prompt_ids: list[int], cand_ids: list[list[int]]) -> bool:
        """Whether the packed pass runs on this model and agrees with the two-pass tree."""
        n = self.config.max_candidates_per_forward
        ref = tree_candidate_token_logprobs(
            self.model, prompt_ids, cand_ids, device=self.device, max_candidates_per_forward=n
        )
        # Two copies, the second one shorter: exercises the padding as well.
        short = prompt_ids[-max(1, len(prompt_ids) // 2) :]
        return _agrees(
            "packed scoring",
            "one at a time",
            ref,
            lambda: packed_candidate_token_logprobs(
                self.model, [(prompt_ids, cand_ids), (short, cand_ids)], device=self.device
            )[0],
        )

    def _pack(self, encoded: list[tuple[int, list[int], list[list[int]]]]):
        """Split encoded requests into packed passes: by width, at most ``max_batch_tokens``
        slots and ``max_padding_fraction`` padding per pass."""

        def width(item: tuple[int, list[int], list[list[int]]]) -> int:
            _, p, c = item
            return len(p) + CandidateTrie.size(c)

        cfg = self.config
        group: list[tuple[int, list[int], list[list[int]]]] = []
        used = 0
        for item in sorted(encoded, key=width):
            n = width(item)  # the widest so far: the pass's width if the item joins
            slots = (len(group) + 1) * n
            if group and (
                slots > cfg.max_batch_tokens or 1 - (used + n) / slots > cfg.max_padding_fraction
            ):
                yield group
                group, used = [], 0
            group.append(item)
            used += n
        if group:
            yield group

    def score_each(self, requests: Sequence[PriorRequest]) -> list[PriorResponse | Exception]:
        """Score several requests; a bad request gets its exception, not its batch-mates.

        Requests are packed into as few forward passes as ``max_batch_tokens`` allows (one for a
        typical Serve batch) when the model passed the packed check on the first request, else
        scored one at a time.

        Args:
            requests: States to score; each has a non-empty, duplicate-free candidate list.

        Returns:
            Per request, a :class:`PriorResponse` (``logp`` aligned with its candidates) or the
            exception that request raised.
        """
        out: list[PriorResponse | Exception | None] = [None] * len(requests)
        encoded: list[tuple[int, list[int], list[list[int]]]] = []
        for k, req in enumerate(requests):
            try:
                if not isinstance(req, PriorRequest):
                    raise ValueError(f"score() takes PriorRequest items, got {type(req).__name__}")
                encoded.append((k, *self.encode(req)))
            except Exception as exc:
                out[k] = exc
        if encoded and self._tree is None:
            self._tree = self._tree_matches(encoded[0][1], encoded[0][2])
        if encoded and self._packed is None:
            self._packed = bool(self._tree) and self._packed_matches(encoded[0][1], encoded[0][2])
        cap = self.config.max_candidates_per_forward
        packable = [e for e in encoded if self._packed and len(e[2]) <= cap]
        alone = [e for e in encoded if not (self._packed and len(e[2]) <= cap)]
        token_lps: dict[int, list[np.ndarray]] = {}
        for group in self._pack(packable):
            try:
                lps = packed_candidate_token_logprobs(
                    self.model, [(p, c) for _, p, c in group], device=self.device
                )
                token_lps.update({k: lp for (k, _, _), lp in zip(group, lps, strict=True)})
            except Exception:  # e.g. out of memory: the same requests one at a time
                logger.warning("a packed pass of %d requests failed; one at a time", len(group))
                alone += group
        score = tree_candidate_token_logprobs if self._tree else candidate_token_logprobs
        for k, p, c in alone:
            try:
                token_lps[k] = score(
                    self.model, p, c, device=self.device, max_candidates_per_forward=cap
                )
            except Exception as exc:
                out[k] = exc
        for k, lp in token_lps.items():
            logp = prior_from_token_logprobs(lp, self.config.prior_temperature)
            out[k] = PriorResponse(logp=logp, model_version=self.model_version)
        done: list[PriorResponse | Exception] = []
        for r in out:
            if r is None:  # every request is scored or failed above
                raise RuntimeError("a request was neither scored nor failed")
            done.append(r)
        return done

    def score(self, requests: Sequence[PriorRequest]) -> list[PriorResponse]:
        """Score several requests (see :meth:`score_each`); the first bad one raises.

        Args:
            requests: States to score; each has a non-empty, duplicate-free candidate list.

        Returns:
            One :class:`PriorResponse` per request, ``logp`` aligned with its candidates.
        """
        responses = []
        for r in self.score_each(requests):
            if isinstance(r, Exception):
                raise r
            responses.append(r)
        return responses
