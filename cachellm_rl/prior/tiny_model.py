"""Small GPT-2-architecture causal LMs with a word-level tokenizer, saved in Hugging Face format.

These are real Hugging Face checkpoints (``config.json`` + ``model.safetensors`` + tokenizer
files) that load through ``from_pretrained`` like any user model. The embedded default prior
(see docs/priors.md) is trained from this starting point; tests and benchmarks build untrained ones.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[BOS]", "[EOS]")
_WORD_RE = re.compile(r"\w+|[^\w\s]")


@dataclass(frozen=True, kw_only=True)
class TinyLMConfig:
    """Size of a small GPT-2 model.

    Attributes:
        n_layer: Transformer blocks.
        n_head: Attention heads.
        n_embd: Hidden size (divisible by ``n_head``).
        n_positions: Context length in tokens.
        max_vocab: Most frequent words kept in the tokenizer (plus special tokens).
        dropout: Dropout of embeddings, residuals and attention weights during training
            (GPT-2's 0.1). With 0, PyTorch's fused attention kernel runs in training too,
            about twice as fast on a CPU.
        seed: Seed of the random initialisation.
    """

    n_layer: int = 2
    n_head: int = 2
    n_embd: int = 64
    n_positions: int = 512
    max_vocab: int = 5000
    dropout: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"TinyLMConfig.dropout must be in [0, 1), got {self.dropout}")
        if self.n_embd % self.n_head:
            raise ValueError("TinyLMConfig.n_embd must be divisible by n_head")
        if min(self.n_layer, self.n_head, self.n_embd, self.n_positions, self.max_vocab) < 1:
            raise ValueError("TinyLMConfig sizes must be >= 1")


def word_vocabulary(texts: Iterable[str], max_vocab: int) -> list[str]:
    """Most frequent lower-cased words and punctuation marks of ``texts``."""
    counts: Counter[str] = Counter()
    for t in texts:
        counts.update(_WORD_RE.findall(t.lower()))
    return [w for w, _ in counts.most_common(max_vocab)]


def build_word_tokenizer(texts: Iterable[str], max_vocab: int = 5000):
    """A word-level fast tokenizer (lower-cased, splits words and punctuation).

    Args:
        texts: Corpus the vocabulary is taken from.
        max_vocab: Most frequent words kept.

    Returns:
        A ``transformers.PreTrainedTokenizerFast``.
    """
    from tokenizers import Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for w in word_vocabulary(texts, max_vocab):
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        unk_token="[UNK]",
        bos_token="[BOS]",
        eos_token="[EOS]",
    )


def make_tiny_causal_lm(
    out_dir: str | Path, texts: Iterable[str], config: TinyLMConfig | None = None
):
    """Build a randomly initialised GPT-2 and its word tokenizer, save both to ``out_dir``.

    Args:
        out_dir: Directory to write (created).
        texts: Corpus for the tokenizer's vocabulary.
        config: Model size.

    Returns:
        ``(model, tokenizer)`` as saved.
    """
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = config or TinyLMConfig()
    tokenizer = build_word_tokenizer(texts, cfg.max_vocab)
    torch.manual_seed(cfg.seed)
    model = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=len(tokenizer),
            n_positions=cfg.n_positions,
            n_embd=cfg.n_embd,
            n_layer=cfg.n_layer,
            n_head=cfg.n_head,
            resid_pdrop=cfg.dropout,
            embd_pdrop=cfg.dropout,
            attn_pdrop=cfg.dropout,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    model.eval()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return model, tokenizer
