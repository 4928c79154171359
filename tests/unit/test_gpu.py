"""GPU paths (skipped without CUDA): faiss-gpu exact index and bf16 scoring on CUDA."""

from __future__ import annotations

import numpy as np
import pytest

from cachellm_rl.cache.index import IndexConfig, PriorIndex

pytestmark = pytest.mark.gpu


def test_gpu_exact_index_matches_cpu():
    faiss = pytest.importorskip("faiss")
    if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() == 0:
        pytest.skip("faiss-gpu is not installed")
    rng = np.random.default_rng(0)
    v = rng.normal(size=(1000, 64)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    cpu = PriorIndex(IndexConfig(dim=64))
    gpu = PriorIndex(IndexConfig(dim=64, use_gpu=True))
    cpu.add(np.arange(1000), v)
    gpu.add(np.arange(1000), v)
    _, ic = cpu.search(v[:50], 1)
    _, ig = gpu.search(v[:50], 1)
    np.testing.assert_array_equal(ic, ig)


def test_bf16_scoring_on_cuda_is_normalised(tiny_model_dir):
    from cachellm_rl.contracts import PriorRequest
    from cachellm_rl.prior.scoring import CandidateScorer, ScorerConfig

    s = CandidateScorer(ScorerConfig(model_dir=str(tiny_model_dir), device="cuda", dtype="auto"))
    (r,) = s.score([PriorRequest(prompt="you are in the kitchen", candidates=("go north", "eat"))])
    assert abs(np.log(np.exp(r.logp.astype(np.float64)).sum())) < 1e-4
