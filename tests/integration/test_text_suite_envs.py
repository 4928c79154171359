"""Smoke run of ALFWorld and BabyAI-Text through ``experiments/text_suite.py`` (quick preset,
shortened): both envs in one ``--envs`` call, the prior alone and an RL agent on the prior
through the adaptive cache (sampled in the driver), per-env and all-envs outputs. Every method
runs on TextWorld in ``test_ps_dqn_rllib.py``; the methods' code paths do not depend on the
env."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("fast_downward", reason="needs textworld[pddl] (fast-downward-textworld)")
pytest.importorskip("minigrid", reason="needs minigrid")

ROOT = Path(__file__).resolve().parents[2]
METHODS = {"direct_lm", "adaptive"}


def _tiny_suite_and_prior(env: str, suite_dir: Path, prior_dir: Path) -> None:
    from cachellm_rl.envs.alfworld_gen import AlfWorldSuiteConfig, make_alfworld_suite
    from cachellm_rl.envs.babyai import BabyAISuiteConfig, make_babyai_suite
    from cachellm_rl.prior.embedded import train_embedded_prior

    if env == "alfworld":
        cfg = AlfWorldSuiteConfig(
            n_train=2,
            n_valid=0,
            n_test=1,
            task_types=("pick_and_place_simple",),
            max_distractors=3,
            seed=11,
        )
        make_alfworld_suite(cfg, suite_dir, progress=False)
    else:
        make_babyai_suite(
            BabyAISuiteConfig(n_train=8, n_valid=0, n_test=2), suite_dir, progress=False
        )
    report = train_embedded_prior(
        env,
        games_dir=suite_dir,
        out_dir=prior_dir,
        episodes_per_game=2,
        epochs=2,
        dropout=0.0,
        evaluate=False,
        progress=False,
    )
    # ALFWorld's recipe adds one renumbered copy of each demonstration
    copies = 2 if env == "alfworld" else 1
    assert report["examples"] == copies * report["demonstrations"]["unique_decisions"]


# 4 runs (2 methods x 2 envs): a minute or two alone; more when experiments share the cores.
@pytest.mark.timeout(1200)
def test_quick_preset_runs_alfworld_and_babyai(ray_session, tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "experiments"))
    import text_suite

    from cachellm_rl.envs.registry import default_games_dir, default_prior_dir

    # The suite's per-env defaults (data/games/<suite>, artifacts/priors/<env>) resolve
    # relative to the working folder: put tiny suites and priors there.
    monkeypatch.chdir(tmp_path)
    for env in ("alfworld", "babyai"):
        _tiny_suite_and_prior(
            env, tmp_path / default_games_dir(env), tmp_path / default_prior_dir(env)
        )
    out = tmp_path / "results"
    rc = text_suite.main(
        [
            *("--preset", "quick", "--envs", "alfworld,babyai"),
            *("--env-steps", "40", "--num-games", "1", "--no-progress", "--out", str(out)),
            *("--num-env-runners", "0", "--methods", ",".join(sorted(METHODS))),
        ]
    )
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["envs"]) == {"alfworld", "babyai"}
    table = (out / "table.md").read_text()
    for env in ("alfworld", "babyai"):
        assert set(summary["envs"][env]["methods"]) == METHODS
        assert f"| {env} | adaptive |" in table
        env_summary = json.loads((out / env / "summary.json").read_text())
        assert env_summary["env"] == env
        runs = env_summary["runs"]
        assert {r["method"] for r in runs} == METHODS
        assert all(r["train_env_steps"] >= 40 for r in runs if r["method"] != "direct_lm")
        assert env_summary["methods"]["adaptive"]["lm_queries"] > 0
        assert env_summary["methods"]["direct_lm"]["eval_lm_queries"] > 0
        assert (out / env / "learning_curves.png").stat().st_size > 1000
        config = json.loads((out / env / "config.json").read_text())
        assert config["suite"]["max_episode_steps"] == {"alfworld": 50, "babyai": 64}[env]
        # The tiny prior and suite were used (absolute paths reach the Ray processes).
        assert config["suite"]["prior_model"] == str((tmp_path / default_prior_dir(env)).resolve())
        assert config["suite"]["games_dir"] == str((tmp_path / default_games_dir(env)).resolve())
    # The session's Ray is still up (the script only removes its own Serve app).
    assert ray_session.is_initialized()


def test_envs_argument_errors(capsys):
    sys.path.insert(0, str(ROOT / "experiments"))
    import text_suite

    for argv, msg in (
        (["--envs", "zork"], "unknown env id 'zork'"),
        (["--envs", "babyai,babyai"], "lists an env twice"),
        (["--envs", "alfworld,babyai", "--games", "x"], "apply to one env"),
    ):
        with pytest.raises(SystemExit):
            text_suite.parse_args(argv)
        assert msg in capsys.readouterr().err
