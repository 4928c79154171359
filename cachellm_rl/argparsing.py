"""Command-line parsing for the experiment scripts: a user's mistake is one line on stderr and
exit code 2, never a traceback or a usage dump."""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors print ``prog: error: message`` only.

    Example:
        >>> p = ArgumentParser(prog="x")
        >>> _ = p.add_argument("--n", type=int)
        >>> try:
        ...     p.parse_args(["--n", "two"])
        ... except SystemExit as e:
        ...     e.code
        2
    """

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


def user_error(prog: str, message: str) -> int:
    """Print a one-line error for ``prog`` and return exit code 2."""
    print(f"{prog}: error: {message}", file=sys.stderr)
    return 2
