"""Demonstration augmentation for the embedded prior.

Games that name things by class and instance number (ALFWorld's ``cabinet 3``) let a small
model memorise numbers instead of reading them: in the train rooms ``shelf 5`` may often be
where the expert goes next, and in an unseen room the model goes there again though the
observation says it was searched. :func:`renumber_instances` relabels the instance numbers of
a decision, consistently across objective, observation, inventory, candidates and the expert's
action, so the number of the right place can only be read off the texts.
"""

from __future__ import annotations

import re
from dataclasses import replace

import numpy as np

from cachellm_rl.envs.text_env import TextDecision

_INSTANCE_RE = re.compile(r"\b([a-z]+) (\d+)\b")


def instance_names(candidates) -> set[str]:
    """Classes that appear with an instance number in the candidate actions.

    Example:
        >>> sorted(instance_names(["go to cabinet 2", "take apple 1 from cabinet 2", "look"]))
        ['apple', 'cabinet']
    """
    return {cls for c in candidates for cls, _ in _INSTANCE_RE.findall(c)}


def renumber_instances(
    decision: TextDecision, action: str, rng: np.random.Generator, *, max_number: int = 12
) -> tuple[TextDecision, str]:
    """Relabel the instance numbers of ``decision`` and ``action`` consistently.

    Each class named with a number in the candidates (``cabinet``, ``apple``) gets a random
    one-to-one map of its numbers into ``1..max(max_number, largest number seen)``; every
    ``<class> <number>`` in every text is rewritten with it, so the decision describes the same
    situation under other names. Classes not among the candidates (``1 step``) are untouched.

    Args:
        decision: The decision's texts.
        action: The expert's action (one of the candidates).
        rng: Random generator.
        max_number: Numbers are drawn from at least ``1..max_number``.

    Returns:
        ``(decision, action)`` renumbered.

    Example:
        >>> d = TextDecision(objective="put a mug in shelf.", inventory=None,
        ...                  observation="Not visited yet: shelf 1, shelf 2.",
        ...                  candidates=("go to shelf 1", "go to shelf 2"))
        >>> d2, a2 = renumber_instances(d, "go to shelf 1", np.random.default_rng(0))
        >>> a2 == d2.candidates[0] and d2.observation.startswith(f"Not visited yet: {a2[6:]},")
        True
    """
    if max_number < 1:
        raise ValueError(f"max_number must be >= 1, got {max_number}")
    texts = [decision.objective, decision.observation, decision.inventory or "", action]
    texts += list(decision.candidates)
    numbers: dict[str, set[int]] = {}
    classes = instance_names(decision.candidates)
    for t in texts:
        for cls, n in _INSTANCE_RE.findall(t):
            if cls in classes:
                numbers.setdefault(cls, set()).add(int(n))
    mapping: dict[str, dict[int, int]] = {}
    for cls in sorted(numbers):
        old = sorted(numbers[cls])
        pool = max(max_number, old[-1])
        new = rng.choice(np.arange(1, pool + 1), size=len(old), replace=False)
        mapping[cls] = {o: int(n) for o, n in zip(old, new, strict=True)}

    def sub(text: str) -> str:
        def one(m: re.Match) -> str:
            cls, n = m.group(1), int(m.group(2))
            return f"{cls} {mapping[cls][n]}" if cls in mapping else m.group(0)

        return _INSTANCE_RE.sub(one, text)

    new_decision = replace(
        decision,
        objective=sub(decision.objective),
        observation=sub(decision.observation),
        inventory=None if decision.inventory is None else sub(decision.inventory),
        candidates=tuple(sub(c) for c in decision.candidates),
    )
    return new_decision, sub(action)
