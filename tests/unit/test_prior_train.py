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


def test_trained_prior_fits_the_train_split(tw_prior):
    """The fixture's prior (≈50 s of training on 10 easy games) solves its own train games."""
    _, report = tw_prior
    assert report["epoch_losses"][-1] < report["epoch_losses"][0] / 4
    assert report["direct_success"]["train"]["success_rate"] >= 0.8
    assert set(report["direct_success"]) == {"train", "test"}
