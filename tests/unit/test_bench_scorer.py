"""The scorer benchmark's real requests."""

from __future__ import annotations

import pytest

from experiments.bench_scorer import env_requests


def test_real_requests_come_from_the_games_states(tw_suite):
    reqs = env_requests("textworld", 12, games_dir=tw_suite)
    assert len(reqs) == 12
    assert len({r.prompt for r in reqs}) > 1  # states change as the random actions play
    for r in reqs:
        assert r.candidates and r.prompt.endswith("Next action:")
        assert all(c in r.prompt for c in r.candidates)  # the prompt lists them


def test_the_prior_can_play_the_states_and_small_ones_are_left_out(tw_suite, tw_prior):
    from cachellm_rl.prior.prompts import PromptConfig
    from cachellm_rl.prior.scoring import CandidateScorer, ScorerConfig

    scorer = CandidateScorer(ScorerConfig(model_dir=str(tw_prior[0])))
    unlisted = PromptConfig(candidates_header=None)
    reqs = env_requests(
        "textworld", 6, games_dir=tw_suite, prompt_config=unlisted, scorer=scorer, min_candidates=4
    )
    assert len(reqs) == 6 and min(len(r.candidates) for r in reqs) >= 4
    assert not any("Admissible actions" in r.prompt for r in reqs)  # the layout asked for
    with pytest.raises(ValueError, match="only 0 states with >= 999 candidates"):
        env_requests("textworld", 1, games_dir=tw_suite, min_candidates=999, max_episodes=2)
