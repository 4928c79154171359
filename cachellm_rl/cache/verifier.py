"""A learned reuse verifier: is a cached neighbour's prior safe to reuse for this state?

A bi-encoder (MiniLM or the learned encoder) compares two states through one number, the cosine
of their embeddings, and states that differ in one decisive token ("2 steps left" / "2 steps
right", "fried" / "raw") stay close under it. The verifier reads the *pair*: the word n-grams
one state has and the other lacks (the difference is what decides whether the same action is
right), the candidate actions one has and the other lacks, the size of the difference, the
prior a reuse would serve and the encoder's cosine, and predicts ``P(reuse correct)`` with a
small ensemble of networks. The cache then uses that probability, not the cosine, as the
"similarity" its correctness model is fitted on (see docs/cache.md, "The reuse verifier"), so
the delta rule's online fit and its confidence bound stay what decides; the verifier only gives
the fit a sharper input.

It is trained on the same labelled pairs as the learned encoder (states of the train games,
each with its nearest neighbours and random others) and scored on states of games it never saw.
It costs about half a millisecond per pair (set differences of n-grams and three small MLPs).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from cachellm_rl.cache.learned_encoder import goal_ngrams, hashed_ids, word_ngrams

# size buckets of the n-gram difference: 0, 1, 2, 3, 4, 5-6, 7-9, 10-14, 15-20, 21+
_SIZE_EDGES = (1, 2, 3, 4, 5, 7, 10, 15, 21)


@dataclass(frozen=True, kw_only=True)
class VerifierConfig:
    """Shape of the reuse verifier.

    Attributes:
        buckets: Hash buckets of the pair features.
        dim: Width of the feature embedding.
        hidden: Width of the MLP's hidden layer.
        goal_features: Include :func:`~cachellm_rl.cache.learned_encoder.goal_ngrams` in the
            compared n-grams.
        prior_features: Include :func:`prior_features` of the neighbour's cached prior.
        candidate_features: Include the candidate actions one state has and the other lacks
            (off when training from labels that do not record candidates).
        members: Networks in the ensemble (each trained on its own shuffles of the pairs).
        seed: Initialisation seed.
    """

    buckets: int = 1 << 15
    dim: int = 32
    hidden: int = 64
    goal_features: bool = True
    prior_features: bool = True
    candidate_features: bool = True
    members: int = 3
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("buckets", "dim", "hidden", "members"):
            if getattr(self, name) < 1:
                raise ValueError(f"VerifierConfig.{name} must be >= 1, got {getattr(self, name)}")


@functools.lru_cache(maxsize=16_384)
def _grams(text: str, goal: bool) -> frozenset[str]:
    """A text's n-grams (memoised: a query meets several cached texts, and a cached text
    meets many queries)."""
    return frozenset(word_ngrams(text) + (goal_ngrams(text) if goal else []))


def _size_bucket(n: int) -> int:
    return int(np.searchsorted(_SIZE_EDGES, n, side="right"))


def pair_features(
    text_a: str,
    text_b: str,
    candidates_a: Sequence[str] = (),
    candidates_b: Sequence[str] = (),
    *,
    goal_features: bool = True,
) -> list[str]:
    """String features of a pair of states: what differs between them.

    ``d:<gram>`` for each word n-gram in one text but not the other (side-agnostic), ``c:<action>``
    for each candidate action in one set but not the other, and ``n:<k>`` / ``nc:<k>`` for the
    size bucket of each difference.

    Example:
        >>> pair_features("a key 2 steps left", "a key 2 steps right")[:3]
        ['d:2 steps left', 'd:2 steps right', 'd:left']
    """
    ga, gb = _grams(text_a, goal_features), _grams(text_b, goal_features)
    diff = sorted(ga ^ gb)
    cdiff = sorted(set(candidates_a) ^ set(candidates_b))
    return (
        [f"d:{g}" for g in diff]
        + [f"c:{c}" for c in cdiff]
        + [f"n:{_size_bucket(len(diff))}", f"nc:{_size_bucket(len(cdiff))}"]
    )


def _cos_feature(cos: np.ndarray) -> np.ndarray:
    """``-log(1 - cos)`` scaled to about [0, 1] (cosine 0.9 -> 0.25, 0.999 -> 0.75)."""
    return -np.log(np.maximum(1.0 - np.asarray(cos, np.float64), 1e-4)) / 9.21


class _Member(nn.Module):
    """Hashed pair features (summed embedding) and the cosine feature -> MLP -> logit."""

    def __init__(self, cfg: VerifierConfig) -> None:
        super().__init__()
        self.features = nn.EmbeddingBag(cfg.buckets, cfg.dim, mode="sum")
        nn.init.normal_(self.features.weight, std=0.05)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.dim + 1, cfg.hidden), nn.GELU(), nn.Linear(cfg.hidden, 1)
        )

    def forward(
        self, ids_F: torch.Tensor, offsets_B: torch.Tensor, cos_B: torch.Tensor
    ) -> torch.Tensor:
        bag_BD = self.features(ids_F, offsets_B)
        return self.mlp(torch.cat([bag_BD, cos_B[:, None]], dim=-1)).squeeze(-1)


class VerifierNet(nn.Module):
    """An ensemble of ``members`` independently initialised networks; the verifier's logit is
    their mean (an ensemble is surer than any one member only where all agree, which is what
    the top of the score, where reuse is served, needs)."""

    def __init__(self, cfg: VerifierConfig) -> None:
        super().__init__()
        torch.manual_seed(cfg.seed)
        self.members = nn.ModuleList(_Member(cfg) for _ in range(cfg.members))

    def member_logits(
        self, ids_F: torch.Tensor, offsets_B: torch.Tensor, cos_B: torch.Tensor
    ) -> torch.Tensor:
        """Each member's logits, shape ``(members, B)``."""
        return torch.stack([m(ids_F, offsets_B, cos_B) for m in self.members])

    def forward(
        self, ids_F: torch.Tensor, offsets_B: torch.Tensor, cos_B: torch.Tensor
    ) -> torch.Tensor:
        """Logits of ``P(correct)``, shape ``(B,)``."""
        return self.member_logits(ids_F, offsets_B, cos_B).mean(0)


@dataclass(frozen=True)
class VerifierPair:
    """One pair to score: the query state and a cached neighbour.

    Attributes:
        text_a: Canonical text of the state looked up.
        text_b: Canonical text of the neighbour.
        cos: The encoder's cosine similarity of the two.
        candidates_a: The state's candidate actions.
        candidates_b: The neighbour's.
        logp_b: The neighbour's cached prior aligned to ``candidates_a`` (what reusing it would
            serve); empty when unknown.
    """

    text_a: str
    text_b: str
    cos: float
    candidates_a: tuple[str, ...] = ()
    candidates_b: tuple[str, ...] = ()
    logp_b: tuple[float, ...] = ()


def prior_features(candidates: Sequence[str], logp: Sequence[float]) -> list[str]:
    """Features of the prior a reuse would serve: its top action, how sure it is (top
    probability, log-gap to the runner-up). Reuse of a confident prior survives small state
    changes more often than reuse of a hesitant one, and which action it favours says which
    differences matter (a distance to the goal changes while walking forward).

    Example:
        >>> prior_features(("go forward", "turn left"), (-0.1, -2.4))
        ['top:go forward', 'pt:9', 'gap:2']
    """
    if not len(logp) or len(logp) != len(candidates):
        return []
    lp = np.asarray(logp, np.float64)
    order = np.argsort(-lp)
    p_top = float(np.exp(lp[order[0]]))
    gap = float(lp[order[0]] - lp[order[1]]) if len(lp) > 1 else 10.0
    return [
        f"top:{candidates[int(order[0])]}",
        f"pt:{min(int(p_top * 10), 9)}",
        f"gap:{min(int(gap), 6)}",
    ]


class ReuseVerifier:
    """``P(reusing b's prior for a is correct)`` from the pair's differences.

    Args:
        config: Shape.
        weights: Trained weights (None: random initialisation, for training and tests).
    """

    def __init__(
        self, config: VerifierConfig | None = None, weights: dict[str, torch.Tensor] | None = None
    ) -> None:
        self.config = config or VerifierConfig()
        self.net = VerifierNet(self.config)
        if weights is not None:
            self.net.load_state_dict(weights)
        self.net.eval()

    def featurize(
        self, pairs: Sequence[VerifierPair]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Flattened feature ids, their per-pair offsets and the cosine features."""
        ids = [
            hashed_ids(
                pair_features(
                    p.text_a,
                    p.text_b,
                    p.candidates_a if self.config.candidate_features else (),
                    p.candidates_b if self.config.candidate_features else (),
                    goal_features=self.config.goal_features,
                )
                + (prior_features(p.candidates_a, p.logp_b) if self.config.prior_features else []),
                self.config.buckets,
            )
            for p in pairs
        ]
        offsets = np.cumsum([0] + [len(x) for x in ids[:-1]]).astype(np.int64)
        cos = _cos_feature(np.asarray([p.cos for p in pairs], np.float64)).astype(np.float32)
        return (
            torch.from_numpy(np.concatenate(ids)),
            torch.from_numpy(offsets),
            torch.from_numpy(cos),
        )

    def logits(self, pairs: Sequence[VerifierPair]) -> np.ndarray:
        """Logits of ``P(correct)`` for each pair."""
        if not pairs:
            return np.zeros(0, np.float64)
        with torch.inference_mode():
            return self.net(*self.featurize(pairs)).double().numpy()

    def p_correct(self, pairs: Sequence[VerifierPair]) -> np.ndarray:
        """``P(correct)`` for each pair, in ``(0, 1)``."""
        z = np.clip(self.logits(pairs), -30.0, 30.0)
        return 1.0 / (1.0 + np.exp(-z))

    def log_loss(
        self, pairs: Sequence[VerifierPair], correct: Sequence[bool] | np.ndarray
    ) -> float:
        """Mean binary cross-entropy of the verifier's ``P(correct)`` on labelled pairs."""
        z = self.logits(pairs)
        y = np.asarray(correct, np.float64)
        return float(np.mean(np.logaddexp(0.0, z) - y * z))

    def state(self) -> dict[str, torch.Tensor]:
        """Trained weights."""
        return {k: v.detach().clone() for k, v in self.net.state_dict().items()}

    def config_dict(self) -> dict:
        """JSON-ready config."""
        return asdict(self.config)


@dataclass(frozen=True, kw_only=True)
class VerifierTrainConfig:
    """How :func:`train_verifier` trains.

    Attributes:
        epochs: Passes over the pairs.
        batch_pairs: Pairs per step.
        lr: Adam learning rate.
        weight_decay: Adam weight decay.
        seed: Shuffling seed.
    """

    epochs: int = 6
    batch_pairs: int = 256
    lr: float = 3e-3
    weight_decay: float = 1e-6
    seed: int = 0


def train_verifier(
    pairs: Sequence[VerifierPair],
    correct: Sequence[bool] | np.ndarray,
    *,
    config: VerifierConfig | None = None,
    train: VerifierTrainConfig | None = None,
    valid: tuple[Sequence[VerifierPair], Sequence[bool] | np.ndarray] | None = None,
    progress: bool = False,
) -> tuple[ReuseVerifier, list[float]]:
    """Fit the verifier to labelled pairs (binary cross-entropy).

    Args:
        pairs: Pairs (query state, neighbour) with the encoder's cosine.
        correct: Whether reusing the neighbour's prior was correct.
        config: Shape.
        train: Training settings.
        valid: Held-out pairs and labels (states of other games): the weights of the epoch
            with the lowest held-out loss are kept (early stopping; a verifier trained too
            long grows sure of itself on games it has not seen).
        progress: Show a progress bar.

    Returns:
        The trained verifier and the mean training loss of each epoch (over its members).
    """
    from tqdm import tqdm

    y = torch.as_tensor(np.asarray(correct, np.float32))
    if len(pairs) != len(y) or len(y) == 0:
        raise ValueError(f"need equal, non-zero numbers of pairs and labels, got {len(pairs)}")
    if valid is not None and (len(valid[0]) != len(valid[1]) or len(valid[0]) == 0):
        raise ValueError("valid needs equal, non-zero numbers of pairs and labels")
    tc = train or VerifierTrainConfig()
    ver = ReuseVerifier(config)
    ids, offsets, cos = ver.featurize(pairs)
    ends = torch.cat([offsets[1:], torch.tensor([len(ids)])])
    members = list(ver.net.members)
    opts = [
        torch.optim.Adam(m.parameters(), lr=tc.lr, weight_decay=tc.weight_decay) for m in members
    ]
    rngs = [np.random.default_rng([tc.seed, k]) for k in range(len(members))]
    ver.net.train()
    losses: list[float] = []
    best: tuple[float, dict[str, torch.Tensor]] | None = None
    per_epoch = math.ceil(len(y) / tc.batch_pairs)
    bar = tqdm(
        total=tc.epochs * per_epoch * len(members),
        desc="verifier",
        unit="step",
        disable=not progress,
    )
    for _ in range(tc.epochs):
        total = 0.0
        for member, opt, rng in zip(members, opts, rngs, strict=True):
            order = rng.permutation(len(y))
            for start in range(0, len(y), tc.batch_pairs):
                idx = torch.from_numpy(order[start : start + tc.batch_pairs])
                parts = [ids[offsets[i] : ends[i]] for i in idx.tolist()]
                sub_off = torch.cumsum(torch.tensor([0] + [len(p) for p in parts[:-1]]), 0)
                logits = member(torch.cat(parts), sub_off, cos[idx])
                loss = nn.functional.binary_cross_entropy_with_logits(logits, y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(idx)
                bar.update(1)
        losses.append(total / (len(y) * len(members)))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if valid is not None:
            ver.net.eval()
            valid_loss = ver.log_loss(*valid)
            ver.net.train()
            if best is None or valid_loss < best[0]:
                best = (valid_loss, ver.state())
    bar.close()
    if best is not None:
        ver.net.load_state_dict(best[1])
    ver.net.eval()
    return ver, losses


__all__ = [
    "ReuseVerifier",
    "VerifierConfig",
    "VerifierPair",
    "VerifierTrainConfig",
    "pair_features",
    "train_verifier",
]
