"""Where two token sequences differ, where a word of a sentence sits in its tokens, and where a
pair's two sentences are read.

Pure functions on token-id lists and strings (no tokenizer state), used by
:func:`eclens.pairs.align`: the one contiguous span in which a pair's tokenizations
differ (span mode), and the conversion of a ``detect`` word index to a token position
under a given tokenizer. Then the aligned positions every step that reads both runs of a
pair uses (diff, recovery, invariance, the probe): offset 0 at each side's own span end.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

_WORD = re.compile(r"\S+")


@dataclass(frozen=True)
class Span:
    """Token ranges ``[start, clean_end)`` and ``[start, corrupt_end)`` where two sequences differ.

    Tokens before ``start`` are identical; so are the ``len - end`` tokens after each end."""

    start: int
    clean_end: int
    corrupt_end: int


def diff_span(a: Sequence[int], b: Sequence[int]) -> Span | str:
    """The one contiguous replaced span between ``a`` and ``b``, or why there is none.

    Strips the longest common prefix, then the longest common suffix of what is left.
    The rest is one replaced span when both sides are non-empty and share no token
    (a shared token inside would be a second, separate difference); else the reason:
    ``identical``, ``insertion`` (one side empty: tokens added, none replaced) or
    ``multiple_spans``.
    """
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    if i == len(a) == len(b):
        return "identical"
    j = 0
    while j < n - i and a[len(a) - 1 - j] == b[len(b) - 1 - j]:
        j += 1
    mid_a, mid_b = a[i:len(a) - j], b[i:len(b) - j]
    if not mid_a or not mid_b:
        return "insertion"
    if set(mid_a) & set(mid_b):
        return "multiple_spans"
    return Span(i, len(a) - j, len(b) - j)


def word_starts(text: str) -> list[int]:
    """Character offsets of the whitespace-separated words of ``text``."""
    return [m.start() for m in _WORD.finditer(text)]


def word_char(text: str, word: int) -> int:
    """Character offset of word number ``word`` (0-based, whitespace-separated) of ``text``."""
    starts = word_starts(text)
    if not 0 <= word < len(starts):
        raise IndexError(f"word index {word} is outside the {len(starts)} words of {text!r}")
    return starts[word]


def char_token(tokenizer, text: str, char: int, prepend_bos: bool = False) -> int:
    """The index of the token (as :func:`eclens.pairs.encode` numbers them) holding character ``char``.

    A token that starts with the space before a word holds that word's first character.
    Uses the tokenizer's offset mapping; a tokenizer without one is asked how many
    tokens the text up to the word has (the same answer for tokenizers that split on
    spaces first, which is all eclens uses).
    """
    shift = int(prepend_bos and tokenizer.bos_token_id is not None)
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
    except (NotImplementedError, TypeError, ValueError, KeyError):
        offsets = None
    if offsets:
        for k, (s, e) in enumerate(offsets):
            if s <= char < e or (char < s):
                return k + shift
        return len(offsets) - 1 + shift
    head = text[:char].rstrip()
    return len(tokenizer(head, add_special_tokens=False)["input_ids"]) + shift if head else shift


def map_char(clean: str, corrupt: str, char: int) -> int:
    """Character ``char`` of ``corrupt`` carried over to ``clean`` (the two differ in one place): before the
    change it stays, after it it keeps its distance from the end."""
    n = min(len(clean), len(corrupt))
    i = 0
    while i < n and clean[i] == corrupt[i]:
        i += 1
    if char < i:
        return char
    return max(i, char - len(corrupt) + len(clean))


# ----------------------------------------------------------------------------- aligned positions of a pair
#
# One meaning of "p" for every step that reads both runs of a pair (diff, recovery, invariance, the probe):
# offset 0 is the change's last token on each side (its own span end; the changed token of a single-token
# pair), offset k >= 1 the k-th token after it, offset -1 the last token. After the span the two sentences
# hold the same tokens, so offset k names the same word on both sides although the positions differ by the
# span's length difference. Positions inside a span have no counterpart and are never read.


def anchor_offset(a, anchor: str = "p") -> int:
    """Where offset 0 sits, in offsets from the change's last token: 0 for ``p``, the detect word's offset
    for ``detect`` (0 when the record names none)."""
    if anchor == "p":
        return 0
    d = a.detect_offset
    return 0 if d is None else int(d)


def side_anchor(a, side: str, anchor: str = "p") -> int:
    """The token position of offset 0 on ``side`` (``clean`` or ``corrupt``) under ``anchor`` (``p``/``detect``)."""
    end = a.clean_end if side == "clean" else a.corrupt_end
    return int(end) - 1 + anchor_offset(a, anchor)


def side_length(a, side: str) -> int:
    return len(a.clean_ids if side == "clean" else a.corrupt_ids)


def single_token_subset(pairs: Sequence, step: str) -> tuple[list, str | None]:
    """The single-token pairs, for a step of a run that cannot take span pairs, and a one-line note saying how
    many were left out and why (``None`` when none were)."""
    keep = [a for a in pairs if a.mode == "single"]
    n = len(pairs) - len(keep)
    if not n:
        return keep, None
    return keep, (f"{step}: {n} span-aligned pair(s) left out (this step swaps activations position by position, "
                  f"and a span of another length has no position-by-position counterpart); {len(keep)} "
                  "single-token pair(s) remain")
