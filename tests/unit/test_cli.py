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
    assert res.exit_code != 0 and "duplicate" in str(res.exception)


def test_cache_inspect(tmp_path):
    snap = filled_cache_dir(tmp_path)
    res = runner.invoke(app, ["cache", "inspect", str(snap)])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["size"] == 3 and out["model_version"] == "v1"
