"""Prompt construction for candidate scoring (see docs/priors.md)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Protocol

from cachellm_rl.contracts import PriorRequest


@dataclass(frozen=True, kw_only=True)
class FewShotExample:
    """One solved step shown to the LM before the current state.

    Attributes:
        state: State text of the example.
        action: The expert's action in that state.
    """

    state: str
    action: str


@dataclass(frozen=True, kw_only=True)
class PromptConfig:
    """How prompts are laid out.

    Attributes:
        objective_header: Label before the task objective.
        state_header: Label before the current observation.
        inventory_header: Label before the inventory (omitted when the env has none).
        candidates_header: Label before the list of admissible actions; None omits the list.
        action_header: Text the candidate is appended to; the scored tokens follow it.
        max_listed_candidates: At most this many candidates are listed in the prompt body.
    """

    objective_header: str = "Goal:"
    state_header: str = "Observation:"
    inventory_header: str = "Inventory:"
    candidates_header: str | None = "Admissible actions:"
    action_header: str = "Next action:"
    max_listed_candidates: int = 64

    def __post_init__(self) -> None:
        if self.max_listed_candidates < 0:
            raise ValueError("PromptConfig.max_listed_candidates must be >= 0")


PROMPT_LAYOUT_FILE = "prompt_layout.json"
"""File in a prior's model directory naming the prompt layout it was trained with."""


def save_prompt_config(model_dir: str | Path, config: PromptConfig) -> Path:
    """Write ``config`` as the prompt layout of the model in ``model_dir``.

    A prior must be prompted the way it was trained; the layout file travels with its weights
    (and is hashed into its model version), so every scorer of the model reads the same layout.
    """
    path = Path(model_dir) / PROMPT_LAYOUT_FILE
    path.write_text(json.dumps(asdict(config), indent=1, sort_keys=True))
    return path


def prompt_config_from_dict(layout: dict | None) -> PromptConfig:
    """The :class:`PromptConfig` of a saved layout; ``None`` or ``{}`` give the default.

    Raises:
        ValueError: The layout names a field :class:`PromptConfig` does not have.
    """
    if not layout:
        return PromptConfig()
    known = {f.name for f in fields(PromptConfig)}
    unknown = sorted(set(layout) - known)
    if unknown:
        raise ValueError(f"unknown prompt layout fields {unknown} (known: {sorted(known)})")
    return PromptConfig(**layout)


def load_prompt_config(model_dir: str | Path | None) -> PromptConfig:
    """The prompt layout of the model in ``model_dir``: its ``prompt_layout.json``, or the
    default layout (candidates listed in the prompt) for a model without one.

    Raises:
        ValueError: The layout file is not valid JSON or names unknown fields.

    Example:
        >>> load_prompt_config(None) == PromptConfig()
        True
    """
    if model_dir is None:
        return PromptConfig()
    path = Path(model_dir) / PROMPT_LAYOUT_FILE
    if not path.is_file():
        return PromptConfig()
    try:
        layout = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(layout, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(layout).__name__}")
    try:
        return prompt_config_from_dict(layout)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None


def build_prompt(
    *,
    state: str,
    objective: str = "",
    inventory: str | None = None,
    candidates: Sequence[str] = (),
    examples: Sequence[FewShotExample] = (),
    config: PromptConfig | None = None,
) -> str:
    """Build the text after which each candidate action is scored.

    The layout is: optional k-shot block, objective, state, inventory, the listed candidates, then
    the action header. The prompt ends without a trailing space: the scorer prepends
    ``ScorerConfig.candidate_prefix`` (a space by default) to each candidate, which is how BPE
    tokenizers see a new word.

    Args:
        state: Current observation text.
        objective: Task or objective text.
        inventory: Inventory text, or None when the env has no inventory.
        candidates: Candidate actions listed in the prompt body (optional).
        examples: Few-shot (state, action) pairs shown first.
        config: Layout; defaults to :class:`PromptConfig`.

    Returns:
        The prompt string.

    Example:
        >>> build_prompt(state="You see a key.", objective="Open the door.")
        'Goal: Open the door.\\nObservation: You see a key.\\nAdmissible actions: \\nNext action:'
    """
    cfg = config or PromptConfig()
    if not isinstance(state, str):
        raise ValueError(f"state must be a string, got {type(state).__name__}")
    parts: list[str] = []
    for ex in examples:
        parts.append(
            f"{cfg.state_header} {ex.state.strip()}\n{cfg.action_header} {ex.action.strip()}\n"
        )
    if objective:
        parts.append(f"{cfg.objective_header} {objective.strip()}\n")
    parts.append(f"{cfg.state_header} {state.strip()}\n")
    if inventory is not None:
        parts.append(f"{cfg.inventory_header} {inventory.strip()}\n")
    if cfg.candidates_header is not None:
        listed = list(candidates)[: cfg.max_listed_candidates]
        parts.append(f"{cfg.candidates_header} {', '.join(listed)}\n")
    parts.append(cfg.action_header)
    return "".join(parts)


class DecisionTexts(Protocol):
    """What a prompt is built from: a cache client's ``TextState`` or an env's decision."""

    @property
    def observation(self) -> str: ...
    @property
    def objective(self) -> str: ...
    @property
    def inventory(self) -> str | None: ...
    @property
    def candidates(self) -> Sequence[str]: ...


def prior_request(state: DecisionTexts, config: PromptConfig | None = None) -> PriorRequest:
    """The LM request of one decision: its prompt (:func:`build_prompt`) and candidates.

    Args:
        state: The decision's texts.
        config: Prompt layout; defaults to :class:`PromptConfig`.

    Returns:
        A :class:`~cachellm_rl.contracts.PriorRequest`.
    """
    return PriorRequest(
        prompt=build_prompt(
            state=state.observation,
            objective=state.objective,
            inventory=state.inventory,
            candidates=state.candidates,
            config=config,
        ),
        candidates=tuple(state.candidates),
    )
