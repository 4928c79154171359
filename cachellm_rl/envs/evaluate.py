"""Greedy evaluation of a text-game policy: each game played once with a deterministic policy.

Pure (no Ray, no RLlib): used by the direct-prior calibration of ``prior train`` and by the
text suite's final evaluation of every method.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from cachellm_rl.contracts import LatencyHistogram
from cachellm_rl.envs.text_env import INFO_WON


@dataclass
class GreedyResult:
    """Greedy evaluation of one (method, seed) on a set of games."""

    per_game_success: dict[str, float]
    returns: list[float]
    lengths: list[int]
    decisions: int = 0
    latency_hit: LatencyHistogram = field(default_factory=LatencyHistogram)
    latency_miss: LatencyHistogram = field(default_factory=LatencyHistogram)

    @property
    def success_rate(self) -> float:
        return float(np.mean(list(self.per_game_success.values())))

    def per_game_success_by_name(self) -> dict[str, float]:
        """Per-game success keyed by :func:`short_game_names` instead of full paths."""
        names = short_game_names(list(self.per_game_success))
        return {names[g]: s for g, s in self.per_game_success.items()}


def short_game_names(games: Sequence[str]) -> dict[str, str]:
    """The shortest path tails that tell ``games`` apart: the file name, unless several games
    share it (every ALFWorld game is a ``game.tw-pddl``), then with its parent folders.

    Example:
        >>> short_game_names(["/s/test/a.z8", "/s/test/b.z8"])
        {'/s/test/a.z8': 'a.z8', '/s/test/b.z8': 'b.z8'}
        >>> short_game_names(["/s/test/t1/game.tw-pddl", "/s/test/t2/game.tw-pddl"])
        {'/s/test/t1/game.tw-pddl': 't1/game.tw-pddl', '/s/test/t2/game.tw-pddl': 't2/game.tw-pddl'}
    """
    unique = list(dict.fromkeys(str(g) for g in games))
    depth = max((len(Path(g).parts) for g in unique), default=1)
    for k in range(1, depth + 1):
        names = ["/".join(Path(g).parts[-k:]) for g in unique]
        if len(set(names)) == len(unique):
            return dict(zip(unique, names, strict=True))
    return {g: g for g in unique}


def greedy_evaluate(
    env,
    games: Sequence[str],
    choose: Callable[[dict, dict], tuple[int, bool | None, float]],
    *,
    progress: bool = False,
) -> GreedyResult:
    """Play each game once with a deterministic policy.

    Args:
        env: Text env.
        games: Games to play.
        choose: ``(obs, info) -> (action, hit or None, decision latency ms)``.
        progress: Show a progress bar.

    Returns:
        Per-game success, returns, lengths and decision latencies split hit/miss.
    """
    res = GreedyResult(per_game_success={}, returns=[], lengths=[])
    for game in tqdm(games, desc="greedy eval", disable=not progress, unit="game"):
        obs, info = env.reset(options={"game": game})
        done, ret, n = False, 0.0, 0
        while not done:
            action, hit, ms = choose(obs, info)
            res.decisions += 1
            if hit is not None:
                (res.latency_hit if hit else res.latency_miss).record(ms)
            obs, r, term, trunc, info = env.step(action)
            ret += r
            n += 1
            done = term or trunc
        res.per_game_success[str(game)] = float(bool(info.get(INFO_WON)))
        res.returns.append(ret)
        res.lengths.append(n)
    return res
