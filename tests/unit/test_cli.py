"""The cachellm-rl command line."""

from __future__ import annotations

import json
import re

from typer.testing import CliRunner

from cachellm_rl.cli import app
from tests.helpers import filled_cache_dir

runner = CliRunner()


def score_args(model_dir, state, *candidates):
    args = ["prior", "score", "--model", str(model_dir), "--state", state]
    for c in candidates:
        args += ["--candidate", c]
    return args


def test_prior_score_prints_a_normalised_prior(tiny_model_dir):
    res = runner.invoke(
        app, score_args(tiny_model_dir, "you are in the kitchen", "go north", "open fridge")
    )
    assert res.exit_code == 0, res.output
    rows = [ln for ln in res.stdout.splitlines() if re.match(r"^\d\.\d{4}  ", ln)]
    assert len(rows) == 2, res.output
    probs = [float(ln.split()[0]) for ln in rows]
    assert abs(sum(probs) - 1.0) < 1e-3
    assert "model_version" in res.output


def test_prior_score_rejects_duplicate_candidates(tiny_model_dir):
    res = runner.invoke(app, score_args(tiny_model_dir, "s", "go", "go"))
    assert res.exit_code == 2 and "duplicate" in res.output


def _one_line_error(res) -> str:
    """The error a command printed: exactly one line, no traceback."""
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1, res.output
    return lines[0]


def test_user_errors_are_one_line_with_exit_code_2(tmp_path):
    line = _one_line_error(runner.invoke(app, score_args(tmp_path / "nope", "s", "a", "b")))
    assert line.startswith("cachellm-rl: error:") and "nope" in line
    line = _one_line_error(
        runner.invoke(app, ["evaluate", "--checkpoint", str(tmp_path), "--env", "textworld"])
    )
    assert "not a complete cachellm_rl checkpoint" in line
    line = _one_line_error(runner.invoke(app, ["prior", "evaluate", "--env", "zork"]))
    assert "unknown env id 'zork'" in line


def test_cache_inspect(tmp_path):
    snap = filled_cache_dir(tmp_path)
    res = runner.invoke(app, ["cache", "inspect", str(snap)])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["size"] == 3 and out["model_version"] == "v1"


def test_cache_train_encoder_from_labels(tmp_path):
    rows = []
    for i in range(30):
        rows.append(
            {
                "query_text": f"the carrot is fried . room {i}",
                "neighbour_text": f"the carrot is {'fried' if i % 2 else 'raw'} . room {i + 1}",
                "correct": bool(i % 2),
                "similarity": 0.97,
            }
        )
    labels = tmp_path / "labels.jsonl"
    labels.write_text("\n".join(json.dumps(r) for r in rows))
    res = runner.invoke(
        app,
        ["cache", "train-encoder", str(labels), "--out", str(tmp_path / "enc"), "--epochs", "2"],
    )
    assert res.exit_code == 0, res.output
    assert (tmp_path / "enc" / "decision_encoder.json").is_file() and "saved to" in res.output
    from cachellm_rl.cache.learned_encoder import DecisionStateEncoder

    enc = DecisionStateEncoder.load(tmp_path / "enc")
    assert enc.verifier is not None and "with its reuse verifier" in res.output
    assert not enc.verifier.config.prior_features and not enc.verifier.config.candidate_features
    line = _one_line_error(
        runner.invoke(
            app,
            ["cache", "train-encoder", str(labels), "--out", "x", "--verifier-epochs", "-1"],
        )
    )
    assert "--verifier-epochs must be >= 0" in line
    labels.write_text("\n".join(json.dumps(r) for r in rows[:5]))
    line = _one_line_error(
        runner.invoke(app, ["cache", "train-encoder", str(labels), "--out", str(tmp_path / "e2")])
    )
    assert "need >= 20" in line
    line = _one_line_error(
        runner.invoke(app, ["cache", "train-encoder", str(tmp_path / "none"), "--out", "x"])
    )
    assert "no cache snapshot" in line


def test_games_make_is_idempotent(tmp_path):
    args = ["games", "make", "--out", str(tmp_path), "--n-train", "1", "--n-valid", "0"]
    args += ["--n-test", "1"]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    assert "2 games" in first.output and "2 generated" in first.output
    again = runner.invoke(app, args)
    assert again.exit_code == 0 and "0 generated, 2 kept" in again.output
    assert len(list(tmp_path.glob("*/*.z8"))) == 2


def test_prior_train_writes_a_loadable_model(tw_suite, tmp_path):
    from cachellm_rl.prior.scoring import CandidateScorer, ScorerConfig

    out = tmp_path / "prior"
    res = runner.invoke(
        app,
        [
            *("prior", "train", "--env", "textworld", "--games", str(tw_suite)),
            *("--out", str(out), "--episodes-per-game", "1", "--epochs", "1", "--no-evaluate"),
        ],
    )
    assert res.exit_code == 0, res.output
    report = json.loads((out / "prior_train.json").read_text())
    assert report["train_games"] == 10 and report["examples"] > 0
    assert report["demonstrations"]["expert_missing"] == 0
    # TextWorld's recipe leaves the action list out of the prompt; the layout is saved.
    default = CandidateScorer(ScorerConfig(model_dir=str(out)))  # the path of any model
    assert (out / "prompt_layout.json").is_file()
    assert default.prompt_config.candidates_header is None
    assert report["prompt_layout"]["candidates_header"] is None
    listed_dir = tmp_path / "listed"
    res = runner.invoke(
        app,
        [
            *("prior", "train", "--env", "textworld", "--games", str(tw_suite)),
            *("--out", str(listed_dir), "--episodes-per-game", "1", "--epochs", "1"),
            *("--no-evaluate", "--list-candidates"),
        ],
    )
    assert res.exit_code == 0, res.output
    assert not (listed_dir / "prompt_layout.json").exists()  # the default layout: no file
    listed = CandidateScorer(ScorerConfig(model_dir=str(listed_dir)))
    assert listed.prompt_config.candidates_header is not None


def test_prior_train_rejects_unknown_env(tmp_path):
    res = runner.invoke(app, ["prior", "train", "--env", "zork", "--out", str(tmp_path / "m")])
    assert res.exit_code == 2 and "unknown env id 'zork'" in " ".join(res.output.split())
    args = ["prior", "train", "--env", "textworld", "--out", str(tmp_path / "m")]
    res = runner.invoke(app, [*args, "--dropout", "1.5"])
    assert res.exit_code == 2 and "dropout must be in [0, 1)" in " ".join(res.output.split())


def test_games_make_babyai_and_unknown_suite(tmp_path):
    args = ["games", "make", "--suite", "babyai", "--out", str(tmp_path), "--n-train", "3"]
    res = runner.invoke(app, [*args, "--n-valid", "0", "--n-test", "1"])
    assert res.exit_code == 0, res.output
    assert "4 games" in res.output and "4 generated" in res.output
    assert len(list(tmp_path.glob("*/*.json"))) == 4
    bad = runner.invoke(app, ["games", "make", "--suite", "zork", "--out", str(tmp_path)])
    assert bad.exit_code == 2 and "unknown game suite 'zork'" in " ".join(bad.output.split())


def test_prior_finetune_saves_an_adapter_beside_the_model(tiny_model_dir, tw_suite, tmp_path):
    import shutil

    from cachellm_rl.prior.scoring import CandidateScorer, ScorerConfig

    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    res = runner.invoke(
        app,
        [
            *("prior", "finetune", "--model", str(base), "--shots", "2"),
            *("--games", str(tw_suite), "--epochs", "2"),
        ],
    )
    assert res.exit_code == 0, res.output
    adapter = tmp_path / "base-lora"
    assert (adapter / "adapter_config.json").is_file()
    assert (adapter / "adapter_model.safetensors").is_file()
    with_adapter = CandidateScorer(ScorerConfig(model_dir=str(base), adapter_dir=str(adapter)))
    assert (
        with_adapter.model_version
        != CandidateScorer(ScorerConfig(model_dir=str(base))).model_version
    )


def test_fresh_seeds_flags_name_the_seeds_or_refuse_in_one_line(capsys):
    import argparse

    import pytest

    from cachellm_rl.argparsing import suite_seeds

    assert suite_seeds(argparse.Namespace(seeds=2, first_seed=100)) == (100, 101)
    assert suite_seeds(argparse.Namespace(seeds=None, first_seed=0)) is None
    with pytest.raises(ValueError, match="--first-seed needs --seeds"):
        suite_seeds(argparse.Namespace(seeds=None, first_seed=5))
    from experiments.text_suite import main

    assert main(["--first-seed", "3", "--envs", "textworld"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["text_suite.py: error: --first-seed needs --seeds N"]


def test_cache_shards_flag_is_checked_and_reaches_the_settings(capsys):
    import pytest

    from experiments.text_suite import build_configs, parse_args

    with pytest.raises(SystemExit) as bad:
        parse_args(["--cache-shards", "0"])
    assert bad.value.code == 2 and "--cache-shards must be >= 1" in capsys.readouterr().err
    (cfg,) = build_configs(parse_args(["--envs", "textworld", "--cache-shards", "2"]))
    assert cfg.settings.cache_shards == 2


def test_delta_and_bound_flags_reach_adaptives_correctness_settings(capsys):
    import pytest

    from experiments.text_suite import build_configs, parse_args

    (cfg,) = build_configs(parse_args(["--envs", "textworld"]))
    assert cfg.settings.correctness.bound == "delta_method"
    args = ["--envs", "textworld", "--delta", "0.1", "--bound", "region"]
    (cfg,) = build_configs(parse_args(args))
    assert cfg.settings.correctness.bound == "region" and cfg.settings.correctness.delta == 0.1
    with pytest.raises(SystemExit) as bad:
        parse_args(["--bound", "wilson"])
    assert bad.value.code == 2 and "invalid choice: 'wilson'" in capsys.readouterr().err


def test_select_posterior_controls_flag_is_checked(capsys):
    import pytest

    from experiments.select_posterior import parse_args

    with pytest.raises(SystemExit) as bad:
        parse_args(["--controls", "direct_lm,uncached"])
    assert bad.value.code == 2 and "unknown control 'uncached'" in capsys.readouterr().err
    assert parse_args([]).controls == ("direct_lm", "frozen_q")
    assert parse_args(["--controls", "direct_lm"]).controls == ("direct_lm",)
    assert parse_args(["--controls", ""]).controls == ()


def test_select_posterior_grid_flags_are_checked(capsys):
    import pytest

    from experiments.select_posterior import grid, parse_args

    for argv, message in (
        (["--soft-q-priors", "2"], "--soft-q-priors takes 0 and/or 1"),
        (["--conservative-alphas", "inf"], "--conservative-alphas must be finite"),
        (["--conservative-alphas", "-0.1"], "--conservative-alphas must be finite"),
        (["--betas", ""], "--betas is empty"),
        (["--gammas", "1.5"], "--gammas must be in (0, 1]"),
        (["--q-encoders", "bag,lstm"], "unknown Q encoder 'lstm'"),
    ):
        with pytest.raises(SystemExit) as bad:
            parse_args(argv)
        assert bad.value.code == 2 and message in capsys.readouterr().err, argv
    grid_argv = ["--betas", "1", "--temperature-finals", "0.3", "--n-steps", "1"]
    args = parse_args([*grid_argv, "--soft-q-priors", "0,1", "--conservative-alphas", "0,0.1"])
    names = [s.name for s in grid(args)]
    assert names == [
        "beta1-annealed-T1-0.3-n1",
        "beta1-annealed-T1-0.3-n1-cql0.1",
        "beta1-annealed-T1-0.3-n1-soft",
        "beta1-annealed-T1-0.3-n1-soft-cql0.1",
    ]
    args = parse_args([*grid_argv, "--gammas", "0.9,0.99", "--soft-q-priors", "1"])
    assert [s.name for s in grid(args)] == [
        "beta1-annealed-T1-0.3-n1-soft",
        "beta1-annealed-T1-0.3-n1-g0.99-soft",
    ]
    args = parse_args([*grid_argv, "--q-encoders", "bag,gru"])
    assert [(s.name, s.q_encoder) for s in grid(args)] == [
        ("beta1-annealed-T1-0.3-n1", "bag"),
        ("beta1-annealed-T1-0.3-n1-gru", "gru"),
    ]
    args = parse_args([*grid_argv, "--mark-repeats", "0,1"])
    assert [(s.name, s.mark_repeats) for s in grid(args)] == [
        ("beta1-annealed-T1-0.3-n1", False),
        ("beta1-annealed-T1-0.3-n1-marks", True),
    ]
    with pytest.raises(SystemExit) as bad:
        parse_args(["--mark-repeats", "yes"])
    assert bad.value.code == 2


def test_posterior_from_carries_the_chosen_td_target(tmp_path):
    import json

    from experiments.text_suite import build_configs, parse_args

    sel = tmp_path / "selection.json"
    chosen = {"prior_weight": 1.0, "schedule": "annealed", "temperature": 1.0}
    sel.write_text(
        json.dumps(
            {
                "chosen": {**chosen, "temperature_final": 0.3},
                "chosen_n_step": 1,
                "chosen_gamma": 0.99,
                "chosen_soft_q_prior": True,
                "chosen_conservative_alpha": 0.1,
                "chosen_q_encoder": "gru",
                "chosen_mark_repeats": True,
            }
        )
    )
    base = ["--envs", "textworld", "--posterior-from", str(sel)]
    (cfg,) = build_configs(parse_args(base))
    assert cfg.settings.soft_q_prior and cfg.settings.conservative_alpha == 0.1
    assert cfg.settings.gamma == 0.99 and cfg.settings.encoder == "gru"
    assert cfg.settings.posterior.temperature_final == 0.3 and cfg.settings.mark_repeats
    (cfg,) = build_configs(parse_args([*base, "--no-soft-q-prior", "--conservative-alpha", "0"]))
    assert not cfg.settings.soft_q_prior and cfg.settings.conservative_alpha == 0.0
    (cfg,) = build_configs(parse_args([*base, "--no-mark-repeats"]))
    assert not cfg.settings.mark_repeats


def test_greedy_loops_rule_escapes_a_two_state_loop_and_counts_it(capsys):
    """The diagnostic's greedy play loops between two states until the limit; its no-repeat
    rule takes the next-best candidate there and wins. A missing prior is a one-line error."""
    import numpy as np
    import pytest

    from cachellm_rl.envs.text_env import TextDecision
    from experiments.greedy_loops import parse_args, play

    class TwoRooms:  # "a" -east-> "b" -west-> "a"; "wait" in "b" wins
        def reset(self, options=None):
            self.room = "a"

        @property
        def decision(self):
            cands = ("east",) if self.room == "a" else ("west", "wait")
            return TextDecision(
                objective="o", observation=self.room, inventory=None, candidates=cands
            )

        def step(self, a):
            cmd = self.decision.candidates[a]
            if cmd == "wait":
                return None, 1.0, True, False, {"won": True}
            self.room = "b" if cmd == "east" else "a"
            return None, 0.0, False, False, {"won": False}

    def score(d):  # the prior prefers going back
        return np.log(np.array([1.0] if len(d.candidates) == 1 else [0.7, 0.3]))

    greedy = play(TwoRooms(), "g", score, "greedy", 10)
    assert not greedy["won"] and greedy["looped"] and greedy["steps"] == 10
    rule = play(TwoRooms(), "g", score, "no_repeat", 10)
    assert rule["won"] and rule["steps"] == 4 and rule["gaps"] == [pytest.approx(np.log(7 / 3))]
    with pytest.raises(SystemExit) as bad:
        parse_args(["--prior-model", "/nonexistent-prior"])
    assert bad.value.code == 2 and "no prior model in /nonexistent-prior" in capsys.readouterr().err


def test_bench_scorer_times_packed_batches_that_give_the_two_pass_scores(tmp_path, capsys):
    """The scorer benchmark runs on a small shape and its packed passes agree with the
    two-pass tree (the numbers it times are the same scores); bad flags are one-line errors."""
    import pytest

    from experiments.bench_scorer import main, parse_args

    out = main(
        [
            "--prompt-tokens", "12", "--candidates", "3", "--requests", "3",
            "--batches", "1,2", "--rounds", "1", "--json", str(tmp_path / "b" / "s.json"),
        ]
    )  # fmt: skip
    saved = json.loads((tmp_path / "b" / "s.json").read_text())
    for way in ("two_pass", "packed_1", "packed_2"):
        assert saved[f"{way}_ms_per_request"] > 0
        assert saved[f"{way}_max_abs_diff"] < 1e-4, saved
    assert out["requests"] == 3 and "packed_2" in capsys.readouterr().out
    for bad, msg in ((["--batches", "0"], "batch sizes"), (["--requests", "0"], "--requests")):
        with pytest.raises(SystemExit) as err:
            parse_args(bad)
        assert err.value.code == 2 and msg in capsys.readouterr().err
