"""The shared suite layer: planned runs, resume, aggregation and the offline suite's
normalised score."""

from __future__ import annotations

import json

import pytest

from cachellm_rl import suite as layer
from cachellm_rl.suite import RunOutcome, SuiteMethod

GAMES = ["g1", "g2", "g3", "g4"]


def _row(method: str, seed: int, per_game: list[float], **extra) -> dict:
    return {
        "method": method,
        "seed": seed,
        "success": sum(per_game) / len(per_game),
        "per_game_success": dict(zip(GAMES, per_game, strict=True)),
        **extra,
    }


def test_a_method_needs_a_known_cache_preset():
    with pytest.raises(ValueError, match="cache preset"):
        SuiteMethod("x", "ps_dqn", "faiss")


def test_run_suite_appends_rows_and_resumes_without_rerunning(tmp_path):
    calls: list[tuple[str, int]] = []

    def run_one(method, seed, _bar):
        calls.append((method, seed))
        if (method, seed) == ("b", 1):
            raise KeyboardInterrupt  # the suite is stopped here
        return RunOutcome(_row(method, seed, [1, 0, 1, 0]), curve=[{"method": method, "x": 1}])

    written: list[int] = []
    plan = layer.planned_runs(
        [SuiteMethod("a", "x", "none"), SuiteMethod("b", "x", "uncached")], [0, 1]
    )
    assert plan == [("a", 0), ("b", 0), ("a", 1), ("b", 1)]
    with pytest.raises(KeyboardInterrupt):
        layer.run_suite(tmp_path, plan, run_one, lambda h: written.append(1) or {}, desc="t")
    assert len((tmp_path / "runs.jsonl").read_text().splitlines()) == 3
    assert len(written) == 3  # outputs rewritten after each finished run
    calls.clear()

    def finish(method, seed, _bar):
        calls.append((method, seed))
        return RunOutcome(_row(method, seed, [1, 1, 1, 1]))

    layer.run_suite(tmp_path, plan, finish, lambda h: {}, desc="t", progress=False)
    assert calls == [("b", 1)]  # only the unfinished run
    rows, curves = layer.read_rows(tmp_path)
    assert [(r["method"], r["seed"]) for r in rows] == plan and len(curves) == 3


def test_degraded_decisions_are_reported_on_the_console(tmp_path, capsys):
    run = layer.run_suite(
        tmp_path,
        [("a", 0)],
        lambda m, s, b: RunOutcome(_row(m, s, [1, 1, 1, 1], lm_fallbacks=7)),
        lambda h: {"ok": True},
        desc="t",
        progress=False,
        degraded={"lm_fallbacks": "used a fallback prior"},
    )
    assert run == {"ok": True}
    assert "a s0: 7 decisions used a fallback prior" in capsys.readouterr().err


def test_aggregates_pair_methods_on_the_same_games_and_seeds():
    rows = [
        _row("a", 0, [1, 1, 1, 0], wall_s=2.0),
        _row("a", 1, [1, 1, 0, 1], wall_s=4.0),
        _row("b", 0, [0, 0, 1, 0], wall_s=1.0),
        _row("b", 1, [0, 1, 0, 0]),
        _row("d", 0, [1, 0, 0, 0], deterministic=True),
    ]
    mats = layer.success_matrices(rows, ["a", "b", "d", "missing"], GAMES, [0, 1])
    assert mats["missing"] is None and mats["d"].shape == (2, 4)
    agg = layer.method_aggregates(rows, mats, ["a", "b", "d"], ["wall_s"], reps=200)
    assert agg["a"]["success_mean"] == pytest.approx(0.75)
    assert agg["a"]["wall_s"] == 3.0 and agg["b"]["wall_s"] == 1.0 and agg["d"]["wall_s"] is None
    lo, hi = agg["a"]["success_ci95"]
    assert lo < 0.75 < hi
    pairs = [("a", "b"), ("a", "missing"), ("a", "d", "a vs d")]
    comps = layer.paired_comparisons(mats, pairs, reps=500)
    assert set(comps) == {"a vs b", "a vs d"}
    assert comps["a vs b"]["difference"]["value"] == pytest.approx(0.5)
    assert comps["a vs b"]["difference"]["low"] > 0  # a beats b on every (game, seed) pair but one
    assert layer.best_of(["b", "d", "missing"], mats, agg) == "b"


def test_tables_and_the_all_envs_summary(tmp_path):
    agg = {"a": {"success_mean": 0.5, "success_ci95": [0.25, 0.75], "seeds": 2}}
    text = layer.write_table(tmp_path, "env", "the protocol", agg, [("method", "m")], {})
    assert "the protocol" in text and (tmp_path / "table.md").read_text() == text
    summaries = {"env1": {"methods": agg, "comparisons": {}, "protocol_note": "p1"}}
    table = layer.write_env_summary(
        tmp_path, summaries, [("env", "env"), ("success_ci", "CI")], "all"
    )
    assert "[+0.25, +0.75]" in table and "p1" in table
    assert json.loads((tmp_path / "summary.json").read_text())["envs"]["env1"]["methods"] == agg


def test_offline_normalised_score_and_comparisons():
    from cachellm_rl.algorithms.cql_prior.suite import aggregate

    seeds = [0, 1]
    rows = [
        _row("random", 0, [0, 0, 0, 0]),
        _row("random", 1, [0, 0, 1, 0]),  # random: 0.125
        _row("expert", 0, [1, 1, 1, 1], deterministic=True),
        _row("direct_lm", 0, [1, 0, 0, 0], deterministic=True),
        _row("cql", 0, [1, 0, 0, 0]),
        _row("cql", 1, [0, 1, 0, 0]),
        _row("cql_prior_adaptive", 0, [1, 1, 1, 0]),
        _row("cql_prior_adaptive", 1, [1, 1, 0, 1]),
    ]
    methods = ["random", "expert", "direct_lm", "cql", "cql_prior_adaptive"]
    out = aggregate(rows, methods, GAMES, seeds, reps=200)
    assert out["normaliser"] == (0.125, 1.0)
    agg = out["methods"]
    assert agg["expert"]["normalised"] == pytest.approx(1.0)
    assert agg["random"]["normalised"] == pytest.approx(0.0)
    assert agg["cql_prior_adaptive"]["normalised"] == pytest.approx((0.75 - 0.125) / 0.875)
    (label,) = [k for k in out["comparisons"] if k.startswith("cql_prior_adaptive vs best of")]
    comp = out["comparisons"][label]
    assert comp["normalised_difference"]["value"] == pytest.approx(
        comp["difference"]["value"] / 0.875
    )


def test_offline_config_refuses_bad_input(tmp_path):
    from cachellm_rl.algorithms.cql_prior.suite import OfflineSuiteConfig, offline_preset

    with pytest.raises(ValueError, match="unknown offline methods"):
        OfflineSuiteConfig(methods=("td3_bc",))
    with pytest.raises(ValueError, match="unknown dataset"):
        OfflineSuiteConfig(dataset="human")
    with pytest.raises(TypeError):
        OfflineSuiteConfig(cql_grid=({"alpha_qcl": 1.0},))
    with pytest.raises(ValueError):
        OfflineSuiteConfig(cql_prior_grid=({"alpha_prior": -1.0},))
    # the quick preset never writes over a full-size dataset
    quick = offline_preset("quick", env="babyai")
    assert str(quick.dataset_dir).endswith("data/offline/babyai/random-quick")
    assert OfflineSuiteConfig(env="babyai").cache_presets() == ["uncached", "static", "adaptive"]


def test_offline_selection_picks_the_best_valid_point_and_resumes(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from cachellm_rl.algorithms.cql_prior import suite as offline
    from cachellm_rl.algorithms.ps_dqn.methods import MethodSettings

    cfg = offline.OfflineSuiteConfig(
        methods=("cql", "cql_prior_uncached"),
        cql_grid=({"alpha_cql": 0.5}, {"alpha_cql": 1.0}, {"alpha_cql": 2.0}),
        cql_prior_grid=({"alpha_cql": 1.0, "alpha_prior": 1.0},),
        games_dir=str(tmp_path),
    )
    valid_success = {0.5: 0.2, 1.0: 0.6, 2.0: 0.6}  # a tie: the earlier point wins
    trained: list[float] = []

    def fake_train(cfg_, method, seed, learner, games):
        trained.append(learner.alpha_cql)
        return SimpleNamespace(module=learner.alpha_cql)

    class FakePlayer:
        def play(self, cfg_, games, module):
            return SimpleNamespace(success_rate=valid_success[module])

        def close(self) -> None:
            pass

    monkeypatch.setattr(offline, "split_games", lambda cfg_, split, n: ["v1", "v2"])
    monkeypatch.setattr(offline, "train_learner", fake_train)
    monkeypatch.setattr(offline, "player_for", lambda *a: FakePlayer())
    chosen = offline.select_hyperparameters(cfg, tmp_path, ["t1"], MethodSettings(), log=print)
    assert chosen == {"cql": {"alpha_cql": 1.0}, "cql_prior": cfg.cql_prior_grid[0]}
    assert trained == [0.5, 1.0, 2.0]  # a one-point grid is taken without a valid run
    sel = json.loads((tmp_path / "selection.json").read_text())
    assert [s["valid_success"] for s in sel["scores"]["cql"]] == [0.2, 0.6, 0.6]
    assert sel["scores"]["cql_prior"] == [{"point": cfg.cql_prior_grid[0], "valid_success": None}]
    # a second call resumes from selection.json: nothing is trained again
    assert offline.select_hyperparameters(cfg, tmp_path, ["t1"], MethodSettings()) == chosen
    assert trained == [0.5, 1.0, 2.0]


def test_a_folder_resumed_with_fewer_seeds_is_summarised_on_those_seeds_only(tmp_path):
    """Every column of the table describes the requested seeds' runs: a folder holding seeds
    0-2 summarised with ``seeds=(0,)`` reports seed 0's success *and* seed 0's return."""
    from cachellm_rl.algorithms.ps_dqn.suite import TextSuiteConfig, write_outputs

    rows = [
        _row("direct_lm", 0, [1, 0, 0, 0], deterministic=True, return_mean=0.25),
        *(
            _row("uncached", s, per, return_mean=r)
            for s, per, r in (
                (0, [1, 1, 0, 0], 0.5),
                (1, [1, 1, 1, 1], 1.0),
                (2, [0, 0, 0, 0], 0.0),
            )
        ),
    ]
    (tmp_path / "runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    curve = [{"method": "uncached", "seed": s, "env_steps": 1, "train_success": s} for s in (0, 1)]
    (tmp_path / "curves.jsonl").write_text("".join(json.dumps(c) + "\n" for c in curve))
    assert len(layer.read_rows(tmp_path)[0]) == 4
    kept, curves = layer.read_rows(tmp_path, [0])
    assert [(r["method"], r["seed"]) for r in kept] == [("direct_lm", 0), ("uncached", 0)]
    assert [c["seed"] for c in curves] == [0]
    cfg = TextSuiteConfig(
        env="babyai", games_dir=str(tmp_path), methods=("direct_lm", "uncached"), seeds=(0,)
    )
    summary = write_outputs(tmp_path, cfg, {}, GAMES)
    unc = summary["methods"]["uncached"]
    assert unc["seeds"] == 1
    assert unc["success_mean"] == pytest.approx(0.5) and unc["return_mean"] == pytest.approx(0.5)
    assert [r["seed"] for r in summary["runs"] if r["method"] == "uncached"] == [0]
    table = (tmp_path / "table.md").read_text()
    assert "| uncached | 1 | 0.500 |" in table
