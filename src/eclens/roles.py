"""A pair's place in a design (DESIGN.md, "Method, second edition"), read with its defaults.

The design fields (``cluster``, ``role``, ``twin_kind``, ``twin_of``, ``swap_direction`` on the
record; ``detect_position`` on the aligned pair) are optional: a pair without them is its own
cluster, an error pair, and detectable at its changed position ``p``. The measurement modules
read them through these functions, so the defaults live in one place.
"""

from __future__ import annotations

from .designs import is_error
from .pairs import AlignedPair, require_single

ROLES = ("error", "twin")


def cluster_of(a: AlignedPair) -> str:
    """The cluster the pair counts in: its ``cluster`` field, else its id (one cluster per pair)."""
    return str(a.pair.cluster_id)


def role_of(a: AlignedPair) -> str:
    """``error``, ``twin`` or a 2x2 cell name (e.g. ``subj_sg:verb_pl``, as the record gives it); ``error``
    when the record says nothing. Whether a pair is an error: :func:`is_error_of` (a 2x2 error cell is one)."""
    return str(a.pair.role or "error")


def is_error_of(a: AlignedPair) -> bool:
    """Whether the pair is an error pair: role ``error`` (or none), or a 2x2 cell marked as an error.

    Code that picks the error pairs must ask this, not ``role_of(a) == "error"``: the latter drops the
    2x2 designs' error cells (agreement and anaphor in the template pairs)."""
    return role_of(a) == "error" or is_error(a.pair)


def twin_kind_of(a: AlignedPair) -> str | None:
    return a.pair.twin_kind


def twin_of(a: AlignedPair) -> str | None:
    return a.pair.twin_of


def swap_direction_of(a: AlignedPair) -> str | None:
    return a.pair.swap_direction


def detect_of(a: AlignedPair) -> int:
    """The token position (in the changed sentence) where the error becomes detectable; ``p`` when unknown,
    which for a span pair is the span's last token (:mod:`eclens.spans`: offset 0 is the span end)."""
    return int(a.corrupt_end - 1 if a.detect_position is None else a.detect_position)


def single_token_only(pairs, step: str) -> None:
    """Refuse span-aligned pairs (positions after the change differ between the sentences) in one line."""
    require_single(pairs, step)
