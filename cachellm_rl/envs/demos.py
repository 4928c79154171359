"""Expert demonstrations from text environments: walkthroughs plus expert recoveries.

An episode follows the env's expert, except that with probability ``perturb_probability`` a step
takes a random non-expert candidate instead. Every visited state is labelled with the expert's
action from that state, so perturbed episodes teach recoveries from states a walkthrough never
visits. Used to train the embedded default prior and for few-shot fine-tuning.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from tqdm.auto import tqdm

from cachellm_rl.envs.text_env import INFO_CANDIDATES, INFO_EXPERT_ACTION, INFO_WON, TextDecision


@dataclass(frozen=True, kw_only=True)
class Demonstration:
    """One expert-labelled decision.

    Attributes:
        decision: Texts of the state.
        action: The expert's action (one of ``decision.candidates``).
        game: Game it came from.
        episode: Episode index within that game's demonstrations.
    """

    decision: TextDecision
    action: str
    game: str
    episode: int


@dataclass(frozen=True, kw_only=True)
class DemoStats:
    """What a collection produced."""

    episodes: int
    decisions: int
    unique_decisions: int
    expert_missing: int
    won_episodes: int


def collect_demonstrations(
    env,
    games: Sequence[str],
    *,
    episodes_per_game: int = 4,
    perturb_probability: float = 0.2,
    seed: int = 0,
    progress: bool = True,
) -> tuple[list[Demonstration], DemoStats]:
    """Run the expert (with perturbations) on each game and label every state.

    Args:
        env: A text env with ``reset(options={"game": g})``, an ``info["expert_action"]`` and a
            ``decision`` property (e.g. :class:`~cachellm_rl.envs.textworld_env.TextWorldEnv`).
        games: Game files to play.
        episodes_per_game: Episodes per game; the first is an unperturbed walkthrough.
        perturb_probability: Chance per step of a random non-expert action (later episodes).
        seed: Seed of the perturbations.
        progress: Show a progress bar.

    Returns:
        ``(demonstrations, stats)``; exact duplicates (same state and action) are kept once.
    """
    if episodes_per_game < 1:
        raise ValueError("episodes_per_game must be >= 1")
    if not 0.0 <= perturb_probability < 1.0:
        raise ValueError("perturb_probability must be in [0, 1)")
    if not games:
        raise ValueError("collect_demonstrations needs at least one game")
    rng = np.random.default_rng(seed)
    demos: list[Demonstration] = []
    seen: set[tuple] = set()
    n_dec = missing = won = n_ep = 0
    for game in tqdm(games, desc="demonstrations", disable=not progress, unit="game"):
        for ep in range(episodes_per_game):
            _, info = env.reset(options={"game": game})
            n_ep += 1
            p = 0.0 if ep == 0 else perturb_probability
            done = False
            while not done:
                cands = info[INFO_CANDIDATES]
                expert = info.get(INFO_EXPERT_ACTION)
                decision = env.decision
                if expert is None or expert not in cands:
                    missing += 1
                    action = int(rng.integers(len(cands)))
                else:
                    n_dec += 1
                    key = (decision, expert)
                    if key not in seen:
                        seen.add(key)
                        demos.append(
                            Demonstration(decision=decision, action=expert, game=game, episode=ep)
                        )
                    action = cands.index(expert)
                    if len(cands) > 1 and rng.random() < p:
                        others = [i for i in range(len(cands)) if i != action]
                        action = int(rng.choice(others))
                _, _, term, trunc, info = env.step(action)
                done = term or trunc
            won += int(bool(info.get(INFO_WON)))
    stats = DemoStats(
        episodes=n_ep,
        decisions=n_dec,
        unique_decisions=len(demos),
        expert_missing=missing,
        won_episodes=won,
    )
    return demos, stats
