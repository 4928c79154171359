from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from tests.helpers import make_tiny_model_dir

    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny_gpt2"))


@pytest.fixture(scope="session")
def text_encoder():
    from cachellm_rl.cache.encoders import TextStateEncoder

    return TextStateEncoder()


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray (2 CPUs, dashboard off, temp dir in an ignored folder) per test session."""
    import ray

    from cachellm_rl.config import init_ray

    init_ray(num_cpus=2)
    yield ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="session")
def tw_suite(tmp_path_factory):
    """A tiny generated tw-cooking suite: 10 easy train games, 1 valid, 2 test games."""
    from cachellm_rl.envs.games import CookingLevel, SuiteConfig, make_suite

    root = tmp_path_factory.mktemp("tw_suite")
    cfg = SuiteConfig(
        n_train=10,
        n_valid=1,
        n_test=2,
        levels=(CookingLevel(recipe=2, take=2, go=1, open=True, cook=False),),
        seed=7,
    )
    make_suite(cfg, root, progress=False)
    return root


@pytest.fixture(scope="session")
def tw_prior(tw_suite, tmp_path_factory):
    """An embedded prior trained (briefly) on the tiny suite's train split."""
    from cachellm_rl.prior.embedded import train_embedded_prior

    out = tmp_path_factory.mktemp("tw_prior") / "model"
    report = train_embedded_prior(
        "textworld",
        games_dir=tw_suite,
        out_dir=out,
        episodes_per_game=4,
        epochs=16,
        dropout=0.0,  # PyTorch's fused attention kernel: half the time of GPT-2's 0.1
        max_minutes=15.0,  # a safety cap: 16 epochs take about 40 s
        eval_splits=("test",),
        progress=False,
    )
    return out, report


@pytest.fixture(scope="session")
def tw_prior_app(ray_session, tw_prior):
    """The briefly trained TextWorld prior behind a real Serve deployment."""
    from cachellm_rl.prior.scoring import ScorerConfig
    from cachellm_rl.prior.server import PriorServerConfig, deploy_prior_server
    from tests.helpers import TW_PRIOR_APP

    model_dir, _ = tw_prior
    deploy_prior_server(
        PriorServerConfig(scorer=ScorerConfig(model_dir=str(model_dir)), num_cpus=0),
        app_name=TW_PRIOR_APP,
    )
    return TW_PRIOR_APP


def pytest_collection_modifyitems(config, items):
    """Skip `gpu` tests on machines without CUDA (CI never has one)."""
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
