"""The scorer benchmark's real requests."""

from __future__ import annotations

from experiments.bench_scorer import env_requests


def test_real_requests_come_from_the_games_states(tw_suite):
    reqs = env_requests("textworld", 12, games_dir=tw_suite)
    assert len(reqs) == 12
    assert len({r.prompt for r in reqs}) > 1  # states change as the random actions play
    for r in reqs:
        assert r.candidates and r.prompt.endswith("Next action:")
        assert all(c in r.prompt for c in r.candidates)  # the prompt lists them
