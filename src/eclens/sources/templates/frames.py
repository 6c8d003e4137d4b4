"""What a template builder returns: one frame rendered into a cluster of pairs.

A *frame* is a sentence with slots; ``{X}`` is the changed slot. A builder fills the
other slots once and renders the frame with several words at ``{X}`` (the clean
word, the error word, the twin word), so every pair of a cluster shares its frame.
The ``detect`` slot marks the word where an error first becomes detectable; its
word index in the changed sentence is recorded.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

_MARK = "\x01"  # put before the detect slot's value while rendering, then removed


@dataclass(frozen=True)
class Variant:
    """One pair of a cluster: the clean sentence and one changed sentence."""

    clean: str
    changed: str
    clean_word: str
    changed_word: str
    role: str | None  # "error", "twin", a 2x2 cell name, or None (a meaning change)
    twin_kind: str | None = None
    twin_of: int | None = None  # index of the error variant in the cluster this twin belongs to
    swap_direction: str | None = None
    detect: int | None = None  # word index in the changed sentence; None: the changed word itself
    typo_kind: str | None = None
    cell_error: bool = False


@dataclass
class Cluster:
    template: str  # "<category family>/<frame id>"
    head: str  # the word the change depends on (subject noun, head verb, following noun, ...)
    variants: list[Variant] = field(default_factory=list)


def cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def tidy(s: str) -> str:
    # Optional slots may be empty: collapse the double spaces and " ," they leave.
    while "  " in s:
        s = s.replace("  ", " ")
    return cap(s.replace(" ,", ",").replace(" .", ".").replace(" ?", "?").strip())


def render(frame: str, x: str, detect: str | None = None, **slots: str) -> tuple[str, int | None]:
    """The frame with ``x`` at ``{X}``; and the word index of slot ``detect``'s first word
    (``"X+1"``: the word after ``{X}``'s last word), or ``None``."""
    vals = dict(slots, X=x)
    if detect == "X+1":
        vals["X"] = x + _MARK
    elif detect is not None:
        vals[detect] = _MARK + vals[detect]
    text = tidy(frame.format(**vals))
    if detect is None:
        return text, None
    words = text.split()
    hit = next(i for i, w in enumerate(words) if _MARK in w)
    text = text.replace(_MARK, "")
    if detect == "X+1":
        return text, (hit + 1 if hit + 1 < len(words) else None)
    return text, hit


def error_and_twin(frame: str, words: tuple[str, str, str], *, twin_kind: str, detect: str | None = None,
                   swap: str | None = None, role: str = "error", typo_kind: str | None = None,
                   twin_detect: bool = False, **slots: str) -> list[Variant]:
    """An error pair (clean word -> error word) and its twin (clean word -> twin word), from one frame.

    The twin records the error's detect word only when ``twin_detect`` (its change may
    not become visible where the error's does)."""
    good, bad, twin = words
    clean, _ = render(frame, good, **slots)
    err, d = render(frame, bad, detect, **slots)
    tw, td = render(frame, twin, detect if twin_detect else None, **slots)
    cell = role != "error"
    return [Variant(clean, err, good, bad, role, swap_direction=swap, detect=d, typo_kind=typo_kind,
                    cell_error=cell),
            Variant(clean, tw, good, twin, "twin", twin_kind=twin_kind, twin_of=0, detect=td)]


def one_change(frame: str, words: tuple[str, str], swap: str | None = None, **slots: str) -> list[Variant]:
    """A single acceptable change (a meaning pair): no role, no twin."""
    clean, _ = render(frame, words[0], **slots)
    changed, _ = render(frame, words[1], **slots)
    return [Variant(clean, changed, words[0], words[1], None, swap_direction=swap)]


def two(rng: random.Random, seq: Sequence[str]) -> tuple[str, str]:
    a, b = rng.sample(list(seq), 2)
    return a, b


def ordered(a: str, b: str) -> str:
    """A direction label for a pair without a natural one: alphabetical order or not."""
    return "up" if a < b else "down"


NAMES_M = ("John", "David", "Peter", "James", "Tom", "Mark", "Paul", "Daniel", "Michael", "Robert", "George",
           "Frank", "Henry", "Jack", "Sam", "Ben", "Oliver", "Lucas", "Leo", "Eric", "Kevin", "Brian", "Steve",
           "Martin", "Victor", "Oscar", "Simon", "Luke", "Ryan", "Carl", "Noah", "Arthur", "Hugo", "Felix")
NAMES_F = ("Mary", "Anna", "Sarah", "Emma", "Lucy", "Kate", "Laura", "Alice", "Julia", "Helen", "Rachel", "Sophie",
           "Linda", "Susan", "Jane", "Emily", "Grace", "Olivia", "Claire", "Nina", "Rosa", "Maria", "Ella", "Amy",
           "Hannah", "Diana", "Karen", "Lisa", "Ruth", "Eva", "Irene", "Martha", "Vera", "Clara")
NAMES = NAMES_M + NAMES_F
