"""Argument errors of experiments/cache_fidelity.py are one line with exit code 2."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "experiments"))


def test_bad_arguments_exit_2(capsys):
    import cache_fidelity

    for argv, message in (
        (["--envs", "zork"], "unknown env"),
        (["--max-tv", "0"], "--max-tv"),
    ):
        with pytest.raises(SystemExit) as exc:
            cache_fidelity.parse_args(argv)
        assert exc.value.code == 2
        assert message in capsys.readouterr().err
    quick = cache_fidelity.parse_args(["--quick"])
    assert quick.train_games == 12 and quick.test_games == 8 and quick.epochs <= 4


def test_a_missing_prior_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    import cache_fidelity

    monkeypatch.chdir(tmp_path)  # no artifacts/priors here
    rc = cache_fidelity.main(["--envs", "babyai", "--out", str(tmp_path / "out"), "-v"])
    assert rc == 2
    out = capsys.readouterr()
    assert "no babyai prior" in out.out + out.err
