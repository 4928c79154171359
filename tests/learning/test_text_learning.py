"""Learning test: posterior-sampling DQN ends up playing better than its prior.

Tiny generated cooking games (2 ingredients to fetch, one room, no cooking; the prior trained for
about 40 s on 10 train games). Both methods train on the 2 test games (``same_games``) for
the same budget; ``frozen_q`` is the same agent and code path with learning rate 0, so its Q
stays 0 and it plays the prior's argmax. The assertion is on *greedy* success after training,
the argmax of ``beta log p + Q / T``: sampling the prior during training cannot pass it.
With ``CACHELLM_LEARNING_TEST_LR=0`` (learning broken) the two methods are the same agent and
the test fails by construction.
"""

from __future__ import annotations

import os

import pytest

pytestmark = [pytest.mark.learning, pytest.mark.slow]

LR = float(os.environ.get("CACHELLM_LEARNING_TEST_LR", "1e-3"))
GAP = 0.5  # one more game of the two won greedily


def test_posterior_learns_beyond_its_frozen_prior(
    ray_session, tw_prior_app, tw_suite, tw_prior, tmp_path
):
    from cachellm_rl.algorithms.ps_dqn.methods import MethodSettings
    from cachellm_rl.algorithms.ps_dqn.posterior import PosteriorConfig
    from cachellm_rl.algorithms.ps_dqn.suite import TextSuiteConfig, run_text_suite

    model_dir, report = tw_prior
    cfg = TextSuiteConfig(
        games_dir=str(tw_suite),
        prior_model=str(model_dir),
        prior_temperature=1.0,  # the prior the Serve app scores with (tw_prior_app)
        methods=("frozen_q", "uncached"),
        seeds=(0,),
        env_steps=2000,
        max_episode_steps=20,
        num_env_runners=2,
        settings=MethodSettings(
            hidden=64,
            lr=LR,
            learning_starts=64,
            env_steps_per_iteration=250,
            # Measured on these games (2000 steps, one seed), greedy success of uncached:
            # 1-step returns 0.0 at T_final = 0.3 and 0.5 at T = 1; 3-step returns 1.0 at
            # T_final = 0.3.
            n_step=3,
            posterior=PosteriorConfig(
                prior_weight=0.5, schedule="annealed", temperature=1.0, temperature_final=0.3
            ),
            anneal_fraction=0.6,
            prior_app=tw_prior_app,
        ),
        progress=False,
    )
    summary = run_text_suite(cfg, tmp_path)
    rows = {r["method"]: r for r in summary["runs"]}
    learned, frozen = rows["uncached"], rows["frozen_q"]
    print(
        "direct prior on the test games:",
        report["direct_success"]["test"]["success_rate"],
        "| frozen_q greedy:",
        frozen["per_game_success"],
        "train:",
        frozen["train_success_all"],
        "| uncached greedy:",
        learned["per_game_success"],
        "train:",
        learned["train_success_all"],
    )
    # every decision was answered by the served prior (none by a fallback)
    assert learned["lm_fallbacks"] == 0 and learned["train_lm_queries"] > 0
    assert learned["train_episodes"] >= 20 and frozen["train_episodes"] >= 20
    assert learned["success"] >= frozen["success"] + GAP
