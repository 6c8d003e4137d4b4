"""A pair's place in a design (DESIGN.md, "Method, second edition"), read with defaults.

The design fields (``cluster``, ``role``, ``twin_kind``, ``twin_of``, ``swap_direction`` on the
record; ``detect_position`` on the aligned pair) are optional: a pair without them is its own
cluster, an error pair, and detectable at its changed position ``p``. The measurement modules
read them only through these functions.
"""

from __future__ import annotations

from .errors import EclensError
from .pairs import AlignedPair

ROLES = ("error", "twin")


def cluster_of(a: AlignedPair) -> str:
    """The cluster the pair counts in: its ``cluster`` field, else its id (one cluster per pair)."""
    return str(getattr(a.pair, "cluster", None) or a.id)


def role_of(a: AlignedPair) -> str:
    """``error``, ``twin`` or a 2x2 cell name; ``error`` when the record says nothing."""
    return str(getattr(a.pair, "role", None) or "error")


def twin_kind_of(a: AlignedPair) -> str | None:
    return getattr(a.pair, "twin_kind", None)


def twin_of(a: AlignedPair) -> str | None:
    return getattr(a.pair, "twin_of", None)


def swap_direction_of(a: AlignedPair) -> str | None:
    return getattr(a.pair, "swap_direction", None)


def detect_of(a: AlignedPair) -> int:
    """The token position where the error becomes detectable; ``p`` when unknown."""
    d = getattr(a, "detect_position", None)
    return int(a.position if d is None else d)


def single_token_only(pairs, step: str) -> None:
    """Refuse span-aligned pairs (their positions after the change differ between the sentences) in one line."""
    for a in pairs:
        if getattr(a, "mode", "single") != "single":
            raise EclensError(f"pair {a.id!r}: {step} needs single-token pairs (this one is span-aligned); "
                              "re-align without span mode")
