"""Test helpers: a small game-like corpus and a tiny real Hugging Face model directory."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cachellm_rl.cache.adaptive import CacheConfig
from cachellm_rl.contracts import CacheQuery, PriorRequest
from cachellm_rl.prior.tiny_model import TinyLMConfig, make_tiny_causal_lm

# The Serve app of the ``tw_prior_app`` fixture: not the default name, which a suite run
# deploys (and deletes) itself.
TW_PRIOR_APP = "test_tw_prior"

CORPUS = [
    "you are in the kitchen . you see a fridge , a counter and a red apple .",
    "you are in the hallway . a door leads north . you carry a key .",
    "go north",
    "go south",
    "take red apple",
    "open fridge",
    "eat red apple",
    "unlock door with key",
    "examine counter",
    "put apple in fridge",
    "goal : eat the apple . observation : inventory : admissible actions : next action :",
]


def make_tiny_model_dir(path: Path, seed: int = 0) -> Path:
    """Save a randomly initialised 2-layer GPT-2 + word tokenizer with ``save_pretrained``."""
    make_tiny_causal_lm(path, CORPUS, TinyLMConfig(n_layer=2, n_head=2, n_embd=32, seed=seed))
    return path


def unit(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, np.float32)
    return v / np.linalg.norm(v)


def query(key: str, emb: np.ndarray | None, candidates=("a", "b", "c")) -> CacheQuery:
    return CacheQuery(
        exact_key=key.encode(),
        embedding=None if emb is None else unit(emb),
        request=PriorRequest(prompt=f"state {key}", candidates=tuple(candidates)),
        text=f"text of {key}",
    )


def small_config(**kw) -> CacheConfig:
    base = {
        "dim": 8,
        "capacity_entries": 100,
        "min_cosine_similarity": 0.9,
        "refresh_probability": 0.0,
        "min_candidate_coverage": 0.5,
        "visit_bonus_steps": 0.0,
    }
    base.update(kw)
    return CacheConfig(**base)


def filled_cache_dir(path: Path) -> Path:
    """Save a 3-entry cache snapshot under ``path``."""
    from cachellm_rl.cache.adaptive import AdaptiveCache
    from cachellm_rl.contracts import PriorResponse

    c = AdaptiveCache(small_config(), model_version="v1")
    for i in range(3):
        c.insert(
            query(f"s{i}", np.eye(8)[i]),
            PriorResponse(np.log([0.5, 0.25, 0.25]).astype(np.float32), "v1"),
        )
    c.save(path)
    return path
