"""PriorServer in a real Serve deployment batches concurrent requests."""

from __future__ import annotations

import asyncio
import socket

import numpy as np
import pytest

from cachellm_rl.contracts import PriorRequest
from cachellm_rl.prior.scoring import CandidateScorer, ScorerConfig

pytestmark = pytest.mark.integration

CANDS = ("go north", "take red apple", "open fridge")


def test_serve_batches_concurrent_requests(prior_app, tiny_model_dir):
    _, handle = prior_app
    reqs = [
        PriorRequest(prompt=f"observation : you are in room {i} . next action :", candidates=CANDS)
        for i in range(16)
    ]

    async def burst():
        return await asyncio.gather(*[handle.remote(r) for r in reqs])

    before = handle.timings.remote().result()
    responses = asyncio.run(burst())
    after = handle.timings.remote().result()
    # The replica accounts for what it scored (benchmarks divide cost by request size).
    assert after["requests"] - before["requests"] == 16
    assert after["candidates"] - before["candidates"] == 16 * len(CANDS)
    assert after["prompt_chars"] - before["prompt_chars"] == sum(len(r.prompt) for r in reqs)
    assert after["score_s"] > before["score_s"]
    sizes = handle.batch_sizes.remote().result()
    assert sum(sizes) >= 16 and max(sizes) > 1, sizes  # concurrent requests shared batches
    direct = CandidateScorer(ScorerConfig(model_dir=str(tiny_model_dir)))
    for r, resp in zip(reqs, responses, strict=True):
        np.testing.assert_allclose(resp.logp, direct.score([r])[0].logp, atol=1e-5)
        assert resp.model_version == direct.model_version
    assert handle.model_version.remote().result() == direct.model_version


def test_http_proxy_is_off_by_default(prior_app):
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", 8000)) != 0
