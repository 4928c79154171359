"""The text-game observation contract shared by every text environment (see docs/envs.md).

RLlib has no text space, so a text state becomes fixed-size integer arrays:
``Dict(state_tokens, action_tokens, action_mask)``. Words are hashed into a fixed vocabulary
(no fitted vocabulary to ship or keep in sync between env runners). Raw texts travel in
``info`` (:data:`INFO_*` keys) for the prior connector and the logs. Truncation of a long state
text, of a long candidate, or of a candidate list beyond ``max_actions`` is counted in ``info``,
never silent.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import gymnasium as gym
import numpy as np

# Observation keys.
OBS_STATE_TOKENS = "state_tokens"
OBS_ACTION_TOKENS = "action_tokens"
OBS_ACTION_MASK = "action_mask"

# Info keys (raw texts and counters).
INFO_OBJECTIVE = "objective"
INFO_OBSERVATION = "observation"
INFO_INVENTORY = "inventory"
INFO_CANDIDATES = "candidates"
INFO_WON = "won"
INFO_LOST = "lost"
INFO_SCORE = "score"
INFO_MAX_SCORE = "max_score"
INFO_GAME = "game"
INFO_EXPERT_ACTION = "expert_action"
INFO_STATE_TOKENS_TRUNCATED = "state_tokens_truncated"
INFO_ACTION_TOKENS_TRUNCATED = "action_tokens_truncated"
INFO_CANDIDATES_DROPPED = "candidates_dropped"
INFO_INVALID_ACTION = "invalid_action"

PAD_ID = 0
# The word of a repeat mark: ``words`` never yields it from a text ("<", ">" are split off).
REPEAT_MARK = "<repeat>"
MAX_REPEAT_MARKS = 2
_WORD_RE = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")


@dataclass(frozen=True, kw_only=True)
class TextObsConfig:
    """Sizes of the fixed-size text observation.

    Attributes:
        max_state_tokens: Tokens of the state text kept (the text's *end* is dropped beyond it).
        max_actions: Candidate slots; candidates beyond it are dropped (counted).
        max_action_tokens: Tokens per candidate.
        vocab_size: Hashed vocabulary size (id 0 is padding).
        mark_repeats: Give the Q network episodic memory of its own choices: a candidate the
            agent already took in this same state (same state text) earlier in the episode
            carries one repeat token per earlier time (at most :data:`MAX_REPEAT_MARKS`) in
            its action tokens. A memoryless greedy policy that comes back to a state does
            there what it did before and can loop until the step limit; with the marks the Q
            network can tell a repeated choice from a first one and learn what repeating
            costs. Only the Q network's observation changes: the prior's prompt, the
            candidate texts and the cache keys do not.
    """

    max_state_tokens: int = 256
    max_actions: int = 64
    max_action_tokens: int = 8
    vocab_size: int = 8192
    mark_repeats: bool = False

    def __post_init__(self) -> None:
        for name in ("max_state_tokens", "max_actions", "max_action_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"TextObsConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.vocab_size < 2:
            raise ValueError(f"TextObsConfig.vocab_size must be >= 2, got {self.vocab_size}")


def words(text: str) -> list[str]:
    """Lower-cased words and punctuation marks of ``text``.

    Example:
        >>> words("Take the Red apple.")
        ['take', 'the', 'red', 'apple', '.']
    """
    return _WORD_RE.findall(text.lower())


def hash_tokens(text: str, max_len: int, vocab_size: int) -> tuple[np.ndarray, int]:
    """Hashed token ids of ``text``, padded with 0 to ``max_len``.

    Args:
        text: Text to tokenize.
        max_len: Output length.
        vocab_size: Ids fall in ``[1, vocab_size)``.

    Returns:
        ``(ids, n_dropped)``: int64 ids of shape ``(max_len,)`` and how many tokens were cut.

    Example:
        >>> ids, cut = hash_tokens("go north", 4, 100)
        >>> ids.shape, int((ids > 0).sum()), cut
        ((4,), 2, 0)
    """
    toks = words(text)
    out = np.zeros(max_len, np.int64)
    kept = toks[:max_len]
    for i, w in enumerate(kept):
        out[i] = token_id(w, vocab_size)
    return out, len(toks) - len(kept)


@dataclass(frozen=True, kw_only=True)
class TextDecision:
    """The texts of one decision point of a text game.

    Attributes:
        objective: Task objective.
        observation: What the agent sees now.
        inventory: Inventory text (None when the game has none).
        candidates: Admissible actions, in the order the env offers them.
    """

    objective: str
    observation: str
    inventory: str | None
    candidates: tuple[str, ...]

    def state_text(self) -> str:
        """The text the Q network reads: inventory, objective, observation (in this order, so
        the observation's long tail is what a token limit cuts)."""
        inv = "" if self.inventory is None else f"{self.inventory} | "
        return f"{inv}{self.objective} | {self.observation}"


@dataclass
class TruncationCounters:
    """Running counts of what did not fit the fixed-size observation."""

    state_tokens: int = 0
    action_tokens: int = 0
    candidates: int = 0
    decisions: int = 0
    extra: dict[str, int] = field(default_factory=dict)


def text_observation_space(cfg: TextObsConfig) -> gym.spaces.Dict:
    """The ``Dict(state_tokens, action_tokens, action_mask)`` space of ``cfg``."""
    return gym.spaces.Dict(
        {
            OBS_STATE_TOKENS: gym.spaces.Box(
                0, cfg.vocab_size - 1, (cfg.max_state_tokens,), np.int64
            ),
            OBS_ACTION_TOKENS: gym.spaces.Box(
                0, cfg.vocab_size - 1, (cfg.max_actions, cfg.max_action_tokens), np.int64
            ),
            OBS_ACTION_MASK: gym.spaces.Box(0.0, 1.0, (cfg.max_actions,), np.float32),
        }
    )


def token_id(word: str, vocab_size: int) -> int:
    """The hashed id of one word, in ``[1, vocab_size)``."""
    return 1 + zlib.crc32(word.encode()) % (vocab_size - 1)


def add_repeat_marks(ids: np.ndarray, repeats: int, vocab_size: int) -> np.ndarray:
    """``ids`` (one candidate's padded token ids) with ``min(repeats, MAX_REPEAT_MARKS)``
    repeat marks after its last real token (over its last tokens when it has no room left).

    Example:
        >>> ids, _ = hash_tokens("go north", 4, 100)
        >>> marked = add_repeat_marks(ids, 1, 100)
        >>> int((marked > 0).sum()), bool(marked[2] == token_id(REPEAT_MARK, 100))
        (3, True)
    """
    n = min(int(repeats), MAX_REPEAT_MARKS, len(ids))
    if n <= 0:
        return ids
    out = ids.copy()
    start = min(int((ids != PAD_ID).sum()), len(ids) - n)
    out[start : start + n] = token_id(REPEAT_MARK, vocab_size)
    return out


def encode_decision(
    decision: TextDecision, cfg: TextObsConfig, repeats: Sequence[int] | None = None
) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Encode one decision as the fixed-size observation.

    Args:
        decision: Texts of the decision.
        cfg: Sizes.
        repeats: Times each candidate was taken earlier in this episode in this same state
            (used when ``cfg.mark_repeats``; None: none).

    Returns:
        ``(obs, truncation)``: the observation dict and the counts cut in this decision
        (``state_tokens_truncated``, ``action_tokens_truncated``, ``candidates_dropped``).

    Raises:
        ValueError: When there is no candidate.
    """
    if not decision.candidates:
        raise ValueError("a text decision needs at least one candidate action")
    state, cut_state = hash_tokens(decision.state_text(), cfg.max_state_tokens, cfg.vocab_size)
    kept = decision.candidates[: cfg.max_actions]
    actions = np.zeros((cfg.max_actions, cfg.max_action_tokens), np.int64)
    cut_action = 0
    for i, c in enumerate(kept):
        actions[i], cut = hash_tokens(c, cfg.max_action_tokens, cfg.vocab_size)
        cut_action += cut
        if cfg.mark_repeats and repeats is not None and repeats[i]:
            actions[i] = add_repeat_marks(actions[i], repeats[i], cfg.vocab_size)
    mask = np.zeros(cfg.max_actions, np.float32)
    mask[: len(kept)] = 1.0
    obs = {OBS_STATE_TOKENS: state, OBS_ACTION_TOKENS: actions, OBS_ACTION_MASK: mask}
    return obs, {
        INFO_STATE_TOKENS_TRUNCATED: cut_state,
        INFO_ACTION_TOKENS_TRUNCATED: cut_action,
        INFO_CANDIDATES_DROPPED: len(decision.candidates) - len(kept),
    }


def decision_info(decision: TextDecision, cfg: TextObsConfig) -> dict:
    """The raw-text part of ``info`` (candidates cut to the slots the observation has)."""
    return {
        INFO_OBJECTIVE: decision.objective,
        INFO_OBSERVATION: decision.observation,
        INFO_INVENTORY: decision.inventory,
        INFO_CANDIDATES: list(decision.candidates[: cfg.max_actions]),
    }


def check_action(action: int, candidates: Sequence[str], *, strict: bool) -> str | None:
    """The command of a discrete action.

    Args:
        action: Index into ``candidates``.
        candidates: The candidates the observation's mask allows.
        strict: Raise on a masked index instead of returning None.

    Returns:
        The command, or None for a masked index when not ``strict``.

    Raises:
        ValueError: A masked index with ``strict``, naming the valid range.
    """
    a = int(action)
    if 0 <= a < len(candidates):
        return candidates[a]
    if strict:
        raise ValueError(
            f"action {a} is masked: this state has {len(candidates)} candidate actions "
            f"(valid indices 0..{len(candidates) - 1})"
        )
    return None
