"""Exact-tier keys of the cache (see docs/cache.md)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence


def canonical_text(text: str) -> str:
    """Whitespace-collapsed, stripped text: states that differ only in spacing share a key."""
    return " ".join(text.split())


def exact_key(
    text: str, candidates: Sequence[str], *, prior_version: str, encoder_tag: str = ""
) -> bytes:
    """Hash of (canonical text, candidate set, prior version, encoder tag).

    The candidate *set* is hashed (order does not matter), so the same state with reordered
    candidates hits the exact tier; priors are aligned to the caller's order on the way out.

    Args:
        text: State text (canonicalised here).
        candidates: Candidate actions.
        prior_version: Model version of the prior.
        encoder_tag: Tag of the state encoder.

    Returns:
        16 bytes.

    Example:
        >>> k1 = exact_key("a  b", ["x", "y"], prior_version="v")
        >>> k1 == exact_key("a b", ["y", "x"], prior_version="v")
        True
    """
    h = hashlib.blake2b(digest_size=16)
    h.update(canonical_text(text).encode())
    h.update(b"\x00")
    for c in sorted(set(candidates)):
        h.update(c.encode())
        h.update(b"\x1f")
    h.update(b"\x00" + prior_version.encode() + b"\x00" + encoder_tag.encode())
    return h.digest()
