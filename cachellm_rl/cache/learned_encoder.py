"""A cheap, decision-aware state encoder for the cache (see docs/cache.md, "The learned
encoder").

Sentence encoders put states that differ in one decisive word or number ("fried" / "raw",
"cabinet 2" / "cabinet 3") at cosine > 0.97, so a similarity threshold cannot tell a safe reuse
from a wrong one, and MiniLM costs about 34 ms per new text on a 2-core CPU. This encoder is
trained so that cosine similarity tracks *reuse correctness* (same top action, small
total-variation distance between the two states' priors), and it costs well under a
millisecond per text:

- a static embedding: the mean of MiniLM's own word-piece input embeddings (frozen, read from
  the packaged model, no transformer layers run);
- hashed word unigrams, bigrams, trigrams and number-word pairs (a trainable
  ``EmbeddingBag``), which keep the decisive tokens apart ("2 steps left", "cabinet 3");
- a two-layer MLP to ``dim`` outputs, L2-normalised.

It is trained on labelled pairs of states (:func:`train_decision_encoder`) with a logistic loss
on the scaled cosine, hard negatives included (pairs that MiniLM puts close but whose reuse is
wrong). Weights are versioned by a content hash (the ``tag``); caches treat entries embedded under
another tag as misses, so versions never mix.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from cachellm_rl.cache.encoders import MemoCounters, TextMemo, default_text_model_dir

if TYPE_CHECKING:
    from cachellm_rl.cache.verifier import ReuseVerifier

_WORD = re.compile(r"[a-z]+|\d+")
WEIGHTS_FILE = "decision_encoder.safetensors"
CONFIG_FILE = "decision_encoder.json"
VERIFIER_KEY = "verifier"  # the verifier's config in the saved head
VERIFIER_PREFIX = "verifier."  # its weights' names among the encoder's


@dataclass(frozen=True, kw_only=True)
class DecisionEncoderConfig:
    """Shape of the learned encoder.

    Attributes:
        dim: Output dimension.
        ngram_buckets: Hash buckets of the word n-gram features.
        ngram_dim: Width of the n-gram embedding.
        hidden: Width of the MLP's hidden layer.
        max_word_pieces: Word pieces of a text read by the static embedding.
        static_model_dir: Sentence-transformers folder whose input embeddings are the static
            part (None: the packaged all-MiniLM-L6-v2).
        goal_features: Add :func:`goal_ngrams` (phrases about the objective's own objects).
        seed: Initialisation seed.
    """

    dim: int = 128
    ngram_buckets: int = 1 << 14
    ngram_dim: int = 64
    hidden: int = 256
    max_word_pieces: int = 256
    static_model_dir: str | None = None
    goal_features: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("dim", "ngram_buckets", "ngram_dim", "hidden", "max_word_pieces"):
            if getattr(self, name) < 1:
                raise ValueError(
                    f"DecisionEncoderConfig.{name} must be >= 1, got {getattr(self, name)}"
                )


def word_ngrams(text: str) -> list[str]:
    """Word unigrams, bigrams, trigrams and number-word pairs of a text (lower-cased).

    Example:
        >>> word_ngrams("Open cabinet 2")
        ['open', 'cabinet', '2', 'open cabinet', 'cabinet 2', 'open cabinet 2', '#cabinet 2']
    """
    words = _WORD.findall(text.lower())
    grams = list(words)
    grams += [f"{a} {b}" for a, b in itertools.pairwise(words)]
    grams += [f"{a} {b} {c}" for a, b, c in zip(words, words[1:], words[2:], strict=False)]
    # a number bound to the word before it ("cabinet 2", "2 steps") as its own feature
    grams += [f"#{a} {b}" for a, b in itertools.pairwise(words) if b.isdigit()]
    grams += [f"{a} {b}#" for a, b in itertools.pairwise(words) if a.isdigit()]
    return grams


_SENTENCE = re.compile(r"[.!?;\n]+")
_STOP = frozenset(
    [
        "a",
        "an",
        "the",
        "to",
        "of",
        "in",
        "on",
        "at",
        "and",
        "or",
        "is",
        "are",
        "you",
        "your",
        "there",
        "here",
        "it",
        "its",
        "with",
        "from",
        "for",
        "by",
    ]
)


def goal_ngrams(text: str) -> list[str]:
    """Features of the sentences that mention the objective, marked as such.

    A state's key text ends with its objective (see ``TextState.key_text``). Every earlier
    sentence that shares at least two content words with that last sentence (e.g. "you see a
    green key 2 steps left" for "go to the green key") gives its word bigrams and trigrams again
    with a ``g:`` prefix, so the position or state of the objective's own object is a feature
    of its own rather than one among the same phrases about every other object.

    Example:
        >>> goal_ngrams("You see a red ball 1 step left. You see a green key 2 steps left. "
        ...             "go to the green key")[:3]
        ['g:you see', 'g:see a', 'g:a green']
    """
    sentences = [x for x in _SENTENCE.split(text.lower()) if x.strip()]
    if len(sentences) < 2:
        return []
    goal = {w for w in _WORD.findall(sentences[-1]) if w not in _STOP and not w.isdigit()}
    out: list[str] = []
    for sent in sentences[:-1]:
        words = _WORD.findall(sent)
        if len(goal.intersection(words)) < min(2, len(goal)) or not goal:
            continue
        out += [f"g:{a} {b}" for a, b in itertools.pairwise(words)]
        out += [f"g:{a} {b} {c}" for a, b, c in zip(words, words[1:], words[2:], strict=False)]
    return out


def hashed_ids(features: Sequence[str], buckets: int) -> np.ndarray:
    """Stable (process-independent) hash buckets of string features."""
    return np.fromiter(
        (zlib.crc32(f.encode()) % buckets for f in features), dtype=np.int64, count=len(features)
    )


def _load_static_table(model_dir: str) -> torch.Tensor:
    from safetensors import safe_open

    path = Path(model_dir) / "model.safetensors"
    with safe_open(str(path), "pt") as f:
        for key in f.keys():  # noqa: SIM118 - safe_open has no __iter__
            if key.endswith("word_embeddings.weight"):
                return f.get_tensor(key).float()
    raise ValueError(f"{str(path)!r} holds no word_embeddings.weight")


class DecisionEncoderNet(nn.Module):
    """Static word-piece mean + hashed n-grams -> MLP -> unit vector."""

    def __init__(self, cfg: DecisionEncoderConfig, static_table: torch.Tensor) -> None:
        super().__init__()
        torch.manual_seed(cfg.seed)
        self.static = nn.EmbeddingBag.from_pretrained(static_table, freeze=True, mode="mean")
        self.ngram = nn.EmbeddingBag(cfg.ngram_buckets, cfg.ngram_dim, mode="mean")
        nn.init.normal_(self.ngram.weight, std=0.1)
        self.mlp = nn.Sequential(
            nn.Linear(static_table.shape[1] + cfg.ngram_dim, cfg.hidden),
            nn.GELU(),
            nn.Linear(cfg.hidden, cfg.dim),
        )

    def forward(
        self,
        piece_ids_T: torch.Tensor,
        piece_offsets_B: torch.Tensor,
        gram_ids_G: torch.Tensor,
        gram_offsets_B: torch.Tensor,
    ) -> torch.Tensor:
        """Embed a batch given flattened ids and per-text offsets; returns ``(B, dim)``."""
        static_BS = self.static(piece_ids_T, piece_offsets_B)
        grams_BN = self.ngram(gram_ids_G, gram_offsets_B)
        out_BD = self.mlp(torch.cat([static_BS, grams_BN], dim=-1))
        return nn.functional.normalize(out_BD, dim=-1)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The trained weights (the frozen static table is not among them)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("static.")}


class DecisionStateEncoder(MemoCounters):
    """The learned encoder behind the text-encoder interface (``dim``, ``tag``, ``encode``).

    Args:
        config: Encoder shape.
        weights: Trained weights (:meth:`DecisionEncoderNet.trainable_state`); None leaves the
            random initialisation (an untrained encoder, for tests and training).
        memo_entries: Exact-text memo size (LRU); 0 disables it.
        verifier: A trained reuse verifier that travels with the encoder (same version tag;
            see :mod:`cachellm_rl.cache.verifier`), or None.
    """

    def __init__(
        self,
        config: DecisionEncoderConfig | None = None,
        weights: dict[str, torch.Tensor] | None = None,
        *,
        memo_entries: int = 100_000,
        verifier: ReuseVerifier | None = None,
    ) -> None:
        from tokenizers import Tokenizer

        self.config = config or DecisionEncoderConfig()
        model_dir = self.config.static_model_dir or default_text_model_dir()
        self._tokenizer = Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))
        self._tokenizer.no_padding()
        self._tokenizer.enable_truncation(self.config.max_word_pieces)
        self.net = DecisionEncoderNet(self.config, _load_static_table(model_dir))
        if weights is not None:
            missing, unexpected = self.net.load_state_dict(weights, strict=False)
            bad = [k for k in missing if not k.startswith("static.")] + list(unexpected)
            if bad:
                raise ValueError(f"decision-encoder weights do not match the config: {bad}")
        self.net.eval()
        self.dim = self.config.dim
        self._memo = TextMemo(self.config.dim, memo_entries)
        self.verifier = verifier
        self.tag = ""
        self._retag()

    def attach_verifier(self, verifier: ReuseVerifier | None) -> None:
        """Make ``verifier`` part of this encoder version (the tag changes with it)."""
        self.verifier = verifier
        self._retag()

    def _all_weights(self) -> dict[str, torch.Tensor]:
        """Trained weights of the encoder and, prefixed ``verifier.``, of its verifier."""
        out = dict(self.net.trainable_state())
        if self.verifier is not None:
            out.update({f"{VERIFIER_PREFIX}{k}": v for k, v in self.verifier.state().items()})
        return {k: v.detach().contiguous() for k, v in out.items()}

    def _head(self) -> dict:
        """Config (and the verifier's, when there is one) as saved beside the weights."""
        head = asdict(self.config)
        if self.verifier is not None:
            head[VERIFIER_KEY] = self.verifier.config_dict()
        return head

    def _retag(self) -> None:
        h = hashlib.blake2b(digest_size=6)
        h.update(json.dumps(self._head(), sort_keys=True).encode())
        for k, v in sorted(self._all_weights().items()):
            h.update(k.encode())
            h.update(v.cpu().numpy().tobytes())
        self.tag = f"decision-{self.dim}-{h.hexdigest()}"
        self._memo.clear()

    def featurize(
        self, texts: Sequence[str]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Flattened word-piece ids, their offsets, n-gram ids and their offsets."""
        encs = self._tokenizer.encode_batch(list(texts), add_special_tokens=False)
        pieces = [np.asarray(e.ids or [0], dtype=np.int64) for e in encs]
        grams = [
            hashed_ids(
                (word_ngrams(t) + (goal_ngrams(t) if self.config.goal_features else []))
                or ["<empty>"],
                self.config.ngram_buckets,
            )
            for t in texts
        ]

        def flat(parts: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
            offsets = np.cumsum([0] + [len(p) for p in parts[:-1]]).astype(np.int64)
            return torch.from_numpy(np.concatenate(parts)), torch.from_numpy(offsets)

        return (*flat(pieces), *flat(grams))

    def forward(self, texts: Sequence[str]) -> torch.Tensor:
        """Differentiable embeddings (training)."""
        return self.net(*self.featurize(texts))

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Embed texts: ``(len(texts), dim)`` float32 unit vectors (memoised by text)."""
        return self._memo.encode(texts, self._compute, who="DecisionStateEncoder")

    def _compute(self, texts: list[str]) -> np.ndarray:
        with torch.inference_mode():
            return self.net(*self.featurize(texts)).numpy().astype(np.float32)

    # -- persistence and the version handshake --------------------------------------------------
    def to_bytes(self) -> bytes:
        """Config and trained weights as one blob (what a cache snapshot and the handshake
        carry)."""
        from safetensors.torch import save

        weights = save(self._all_weights())
        head = json.dumps(self._head()).encode()
        return len(head).to_bytes(8, "little") + head + weights

    @classmethod
    def from_bytes(cls, blob: bytes, **kw) -> DecisionStateEncoder:
        """Rebuild an encoder from :meth:`to_bytes` output."""
        from safetensors.torch import load

        n = int.from_bytes(blob[:8], "little")
        return cls._build(json.loads(blob[8 : 8 + n].decode()), load(blob[8 + n :]), **kw)

    @classmethod
    def _build(cls, head: dict, weights: dict[str, torch.Tensor], **kw) -> DecisionStateEncoder:
        """An encoder (and its verifier, when the head names one) from a saved head and
        weights."""
        from cachellm_rl.cache.verifier import ReuseVerifier, VerifierConfig

        head = dict(head)
        head.pop("tag", None)
        vcfg = head.pop(VERIFIER_KEY, None)
        own = {k: v for k, v in weights.items() if not k.startswith(VERIFIER_PREFIX)}
        verifier = None
        if vcfg is not None:
            n = len(VERIFIER_PREFIX)
            vw = {k[n:]: v for k, v in weights.items() if k.startswith(VERIFIER_PREFIX)}
            verifier = ReuseVerifier(VerifierConfig(**vcfg), vw)
        return cls(DecisionEncoderConfig(**head), own, verifier=verifier, **kw)

    def save(self, directory: str | Path) -> Path:
        """Write ``decision_encoder.json`` and ``decision_encoder.safetensors``."""
        from safetensors.torch import save_file

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        save_file(self._all_weights(), d / WEIGHTS_FILE)
        (d / CONFIG_FILE).write_text(json.dumps({**self._head(), "tag": self.tag}))
        return d

    @classmethod
    def load(cls, directory: str | Path, **kw) -> DecisionStateEncoder:
        """Load an encoder (with its verifier, when it was saved with one) written by
        :meth:`save`."""
        from safetensors.torch import load_file

        return cls._build(_saved_config(directory), load_file(Path(directory) / WEIGHTS_FILE), **kw)


def saved_encoder_dim(directory: str | Path) -> int:
    """Output dimension of the encoder saved in ``directory``, read from its config alone.

    Raises:
        FileNotFoundError: If ``directory`` holds no saved encoder.
    """
    return int(_saved_config(directory)["dim"])


def saved_encoder_tag(directory: str | Path) -> str:
    """The version tag of the encoder saved in ``directory`` (without loading its weights)."""
    return str(_saved_config(directory)["tag"])


def _saved_config(directory: str | Path) -> dict:
    """The ``decision_encoder.json`` written by :meth:`DecisionStateEncoder.save`."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{str(directory)!r} holds no {CONFIG_FILE}")
    return json.loads(path.read_text())


@dataclass(frozen=True, kw_only=True)
class EncoderTrainConfig:
    """How :func:`train_decision_encoder` trains.

    Attributes:
        epochs: Passes over the pairs.
        batch_pairs: Pairs per step.
        lr: Adam learning rate.
        weight_decay: Adam weight decay.
        init_scale: Initial scale ``kappa`` of ``P(correct) = sigmoid(kappa * (cos - c0))``.
        init_center: Initial centre ``c0``.
        tv_weight: Weight of the regression of ``cos`` on ``1 - TV`` (when the pairs' total
            variation distances are given): it gives every pair a graded target, not only a
            side of the threshold.
        seed: Shuffling seed.
    """

    epochs: int = 8
    batch_pairs: int = 256
    lr: float = 3e-3
    weight_decay: float = 1e-5
    init_scale: float = 10.0
    init_center: float = 0.8
    tv_weight: float = 1.0
    seed: int = 0


def train_decision_encoder(
    text_a: Sequence[str],
    text_b: Sequence[str],
    correct: Sequence[bool] | np.ndarray,
    *,
    tv: Sequence[float] | np.ndarray | None = None,
    config: DecisionEncoderConfig | None = None,
    train: EncoderTrainConfig | None = None,
    progress: bool = False,
) -> tuple[DecisionStateEncoder, list[float]]:
    """Train the encoder so that the cosine of a pair predicts whether reusing one state's prior
    for the other is correct.

    Loss: binary cross-entropy of ``sigmoid(kappa * (cos(a, b) - c0))`` against the label,
    ``kappa`` and ``c0`` learned with the encoder, plus (with ``tv``) ``tv_weight`` times the
    squared error of ``cos(a, b)`` against ``1 - TV(a, b)``.

    Args:
        text_a: First state of each pair.
        text_b: Second state of each pair.
        correct: Whether the reuse is correct.
        tv: Total-variation distance between the two priors of each pair (optional).
        config: Encoder shape.
        train: Training settings.
        progress: Show a progress bar.

    Returns:
        The trained encoder and the mean loss of each epoch.
    """
    from tqdm import tqdm

    y = torch.as_tensor(np.asarray(correct, np.float32))
    target = None if tv is None else torch.as_tensor(1.0 - np.asarray(tv, np.float32))
    if not (len(text_a) == len(text_b) == len(y)) or len(y) == 0:
        raise ValueError(f"need equal, non-zero numbers of pairs and labels, got {len(y)}")
    tc = train or EncoderTrainConfig()
    enc = DecisionStateEncoder(config, memo_entries=0)
    scale = nn.Parameter(torch.tensor(float(tc.init_scale)))
    center = nn.Parameter(torch.tensor(float(tc.init_center)))
    params = [p for p in enc.net.parameters() if p.requires_grad] + [scale, center]
    opt = torch.optim.Adam(params, lr=tc.lr, weight_decay=tc.weight_decay)
    rng = np.random.default_rng(tc.seed)
    enc.net.train()
    losses = []
    steps = tc.epochs * int(np.ceil(len(y) / tc.batch_pairs))
    bar = tqdm(total=steps, desc="encoder", unit="step", disable=not progress)
    for _ in range(tc.epochs):
        order = rng.permutation(len(y))
        total = 0.0
        for start in range(0, len(y), tc.batch_pairs):
            idx = order[start : start + tc.batch_pairs]
            emb_a = enc.forward([text_a[i] for i in idx])
            emb_b = enc.forward([text_b[i] for i in idx])
            cos = (emb_a * emb_b).sum(-1)
            logits = scale * (cos - center)
            loss = nn.functional.binary_cross_entropy_with_logits(logits, y[idx])
            if target is not None and tc.tv_weight > 0:
                loss = loss + tc.tv_weight * ((cos - target[idx]) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
            bar.update(1)
        losses.append(total / len(y))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    bar.close()
    enc.net.eval()
    enc._memo.max_entries = 100_000
    enc._retag()
    return enc, losses


__all__ = [
    "DecisionEncoderConfig",
    "DecisionStateEncoder",
    "EncoderTrainConfig",
    "hashed_ids",
    "train_decision_encoder",
    "word_ngrams",
]
