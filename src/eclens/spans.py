"""Where two token sequences differ, and where a word of a sentence sits in its tokens.

Pure functions on token-id lists and strings (no tokenizer state), used by
:func:`eclens.pairs.align`: the one contiguous span in which a pair's tokenizations
differ (span mode), and the conversion of a ``detect`` word index to a token position
under a given tokenizer.
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
