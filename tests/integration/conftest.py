"""One Serve app with a tiny real GPT-2 per test session (Ray itself: ``ray_session``)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def prior_app(ray_session, tiny_model_dir):
    """A real PriorServer Serve deployment hosting the tiny GPT-2 (HTTP proxy off)."""
    from cachellm_rl.prior.scoring import ScorerConfig
    from cachellm_rl.prior.server import PriorServerConfig, deploy_prior_server

    cfg = PriorServerConfig(
        scorer=ScorerConfig(model_dir=str(tiny_model_dir)),
        max_batch_size=8,
        batch_wait_timeout_s=0.05,
        num_cpus=0.25,
    )
    handle = deploy_prior_server(cfg, app_name="test_prior")
    return "test_prior", handle
