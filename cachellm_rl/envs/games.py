"""Seeded generation of TextWorld game suites into train / valid / test splits.

``make_suite`` is idempotent: a game already on disk with the same settings is kept, so a second
call costs nothing. A ``manifest.json`` in the suite folder lists every game and its settings;
envs and experiments read the splits from it.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

SPLITS = ("train", "valid", "test")
MANIFEST = "manifest.json"
SUITES = ("cooking",)


def derive_game_seed(seed: int, split: str, index: int) -> int:
    """Seed of game ``index`` of ``split`` in a suite with base seed ``seed`` (every suite).

    Example:
        >>> derive_game_seed(1234, "train", 0) != derive_game_seed(1234, "test", 0)
        True
    """
    return (seed * 1_000_003 + zlib.crc32(split.encode()) + index * 7919) % (2**31 - 1)


def write_manifest(root: Path, manifest: dict) -> None:
    """Write ``manifest.json`` atomically (a crash never leaves half a manifest)."""
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    tmp.replace(root / MANIFEST)


@dataclass(frozen=True, kw_only=True)
class CookingLevel:
    """Difficulty of tw-cooking games (the ``tw-make tw-cooking`` options).

    Attributes:
        recipe: Ingredients in the recipe.
        take: Ingredients to fetch (<= recipe).
        go: Rooms (1, 6, 9 or 12).
        open: Containers/doors must be opened.
        cook: Ingredients must be cooked.
        cut: Ingredients must be cut.
    """

    recipe: int = 1
    take: int = 1
    go: int = 1
    open: bool = True
    cook: bool = False
    cut: bool = False

    def __post_init__(self) -> None:
        if not 1 <= self.recipe <= 5:
            raise ValueError(f"CookingLevel.recipe must be in 1..5, got {self.recipe}")
        if not 0 <= self.take <= self.recipe:
            raise ValueError(f"CookingLevel.take must be in 0..recipe, got {self.take}")
        if self.go not in (1, 6, 9, 12):
            raise ValueError(f"CookingLevel.go must be 1, 6, 9 or 12, got {self.go}")

    def tag(self) -> str:
        """Short name, e.g. ``r2t1g1-oc``."""
        flags = "".join(f for f, on in (("o", self.open), ("c", self.cook), ("x", self.cut)) if on)
        return f"r{self.recipe}t{self.take}g{self.go}-{flags or 'none'}"


def _default_levels() -> tuple[CookingLevel, ...]:
    return (
        CookingLevel(recipe=1, take=1, go=1, open=True, cook=True, cut=False),
        CookingLevel(recipe=2, take=1, go=1, open=True, cook=False, cut=True),
        CookingLevel(recipe=2, take=2, go=1, open=True, cook=True, cut=True),
    )


@dataclass(frozen=True, kw_only=True)
class SuiteConfig:
    """A game suite: how many games per split, at which levels, from which seed.

    Attributes:
        suite: Suite name (``"cooking"``).
        n_train: Games in the train split (the prior learns from these only).
        n_valid: Games in the valid split.
        n_test: Games in the test split (held out from the prior).
        levels: Difficulty levels, used in turn.
        food_splits: Use tw-cooking's food splits, so valid/test games hold foods and
            preparations never seen in train games.
        seed: Base seed; game ``i`` of a split has a seed derived from (seed, split, i).
    """

    suite: str = "cooking"
    n_train: int = 60
    n_valid: int = 30
    n_test: int = 30
    levels: tuple[CookingLevel, ...] = field(default_factory=_default_levels)
    food_splits: bool = False
    seed: int = 1234

    def __post_init__(self) -> None:
        if self.suite not in SUITES:
            raise ValueError(f"unknown game suite {self.suite!r}; known: {list(SUITES)}")
        for name in ("n_train", "n_valid", "n_test"):
            if getattr(self, name) < 0:
                raise ValueError(f"SuiteConfig.{name} must be >= 0")
        if not self.levels:
            raise ValueError("SuiteConfig.levels is empty")

    def count(self, split: str) -> int:
        """Games in ``split``."""
        return {"train": self.n_train, "valid": self.n_valid, "test": self.n_test}[split]

    def game_seed(self, split: str, index: int) -> int:
        """Seed of game ``index`` of ``split``."""
        return derive_game_seed(self.seed, split, index)


def _settings(level: CookingLevel, split: str, food_splits: bool) -> dict:
    return {
        "recipe": level.recipe,
        "take": level.take,
        "go": level.go,
        "open": level.open,
        "cook": level.cook,
        "cut": level.cut,
        "drop": False,
        "recipe_seed": 0,
        "split": split if food_splits else None,
    }


def make_game(path: Path, level: CookingLevel, split: str, seed: int, food_splits: bool) -> Path:
    """Generate and compile one tw-cooking game at ``path`` (``.z8``, plus its ``.json``)."""
    import textworld
    import textworld.challenges
    from textworld.generator import compile_game

    _, make, _ = textworld.challenges.CHALLENGES["tw-cooking"]
    options = textworld.GameOptions()
    options.seeds = seed
    options.path = str(path)
    options.file_ext = ".z8"
    options.force_recompile = True
    game = make(settings=_settings(level, split, food_splits), options=options)
    return Path(compile_game(game, options))


def load_manifest(suite_dir: str | Path) -> dict:
    """The manifest of a generated suite, with a clear error when there is none."""
    path = Path(suite_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(
            f"no game suite at {suite_dir} (missing {MANIFEST}); create it with "
            f"`cachellm-rl games make --out {suite_dir}`"
        )
    return json.loads(path.read_text())


def split_games(suite_dir: str | Path, split: str) -> list[str]:
    """Absolute paths of the games of ``split`` in a generated suite."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known: {list(SPLITS)}")
    manifest = load_manifest(suite_dir)
    root = Path(suite_dir)
    games = [str((root / g["file"]).resolve()) for g in manifest["games"] if g["split"] == split]
    if not games:
        raise ValueError(f"the suite at {suite_dir} has no {split} games")
    return games


def make_suite(config: SuiteConfig, out_dir: str | Path, *, progress: bool = True) -> dict:
    """Generate the suite's games (skipping those already there) and write the manifest.

    Args:
        config: What to generate.
        out_dir: Suite folder (``<out_dir>/<split>/<name>.z8``).
        progress: Show a progress bar.

    Returns:
        The manifest dict (also written to ``<out_dir>/manifest.json``).
    """
    root = Path(out_dir)
    jobs = []
    for split in SPLITS:
        for i in range(config.count(split)):
            level = config.levels[i % len(config.levels)]
            seed = config.game_seed(split, i)
            fs = "-fs" if config.food_splits else ""  # settings in the name: reruns never mix
            name = f"{split}/{config.suite}-{level.tag()}{fs}-{i:03d}-s{seed}.z8"
            jobs.append((split, i, level, seed, name))
    entries = []
    made = 0
    for split, i, level, seed, name in tqdm(
        jobs, desc=f"games {config.suite}", disable=not progress, unit="game"
    ):
        path = root / name
        if not (path.is_file() and path.with_suffix(".json").is_file()):
            path.parent.mkdir(parents=True, exist_ok=True)
            make_game(path, level, split, seed, config.food_splits)
            made += 1
        entries.append(
            {"split": split, "index": i, "file": name, "seed": seed, "level": asdict(level)}
        )
    manifest: dict[str, Any] = {"config": asdict(config), "games": entries}
    write_manifest(root, manifest)
    manifest["generated"] = made
    return manifest
