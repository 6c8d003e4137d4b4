"""Typo kinds: classify a (word, misspelling) pair, and make misspellings of each kind.

The five kinds: ``deletion`` (a letter dropped), ``insertion`` (a letter added),
``transposition`` (two neighbouring letters swapped), ``substitution`` (one letter
replaced by a neighbouring key on a QWERTY keyboard) and ``split`` (a space inside
the word). Anything else (two edits, a far-away key, words run together) is
``other``.
"""

from __future__ import annotations

import random

_ROWS = ("qwertyuiop", "asdfghjkl", "zxcvbnm")
_POS = {ch: (r, c) for r, row in enumerate(_ROWS) for c, ch in enumerate(row)}
KINDS = ("deletion", "insertion", "transposition", "substitution", "split")


def adjacent_keys(ch: str) -> str:
    """Letters whose keys touch ``ch``'s on a QWERTY keyboard (same row +-1, rows above/below, staggered)."""
    if ch.lower() not in _POS:
        return ""
    r, c = _POS[ch.lower()]
    out = []
    for rr, cc in ((r, c - 1), (r, c + 1), (r - 1, c), (r - 1, c + 1), (r + 1, c - 1), (r + 1, c)):
        if 0 <= rr < 3 and 0 <= cc < len(_ROWS[rr]):
            out.append(_ROWS[rr][cc])
    return "".join(out)


def classify(right: str, wrong: str) -> str:
    """The kind of typo that turns ``right`` into ``wrong``."""
    if right == wrong:
        return "other"
    if " " in wrong and " " not in right and wrong.replace(" ", "") == right:
        return "split"
    if right.count(" ") != wrong.count(" "):
        return "other"  # words run together ("a lot" -> "alot"), or spaces moved with other edits
    a, b = right.lower(), wrong.lower()
    if len(b) == len(a) - 1 and any(a[:i] + a[i + 1:] == b for i in range(len(a))):
        return "deletion"
    if len(b) == len(a) + 1 and any(b[:i] + b[i + 1:] == a for i in range(len(b))):
        return "insertion"
    if len(a) == len(b):
        diff = [i for i in range(len(a)) if a[i] != b[i]]
        if len(diff) == 2 and diff[1] == diff[0] + 1 and a[diff[0]] == b[diff[1]] and a[diff[1]] == b[diff[0]]:
            return "transposition"
        if len(diff) == 1 and b[diff[0]] in adjacent_keys(a[diff[0]]):
            return "substitution"
    return "other"


def candidates(word: str, kind: str) -> list[str]:
    """Every misspelling of ``word`` of one kind (first letter kept, so the word stays recognisable)."""
    n = len(word)
    out: set[str] = set()
    if kind == "deletion":
        out = {word[:i] + word[i + 1:] for i in range(1, n)}
    elif kind == "insertion":
        out = {word[:i] + ch + word[i:] for i in range(1, n + 1)
               for ch in {word[i - 1], *adjacent_keys(word[i - 1])}}
    elif kind == "transposition":
        out = {word[:i] + word[i + 1] + word[i] + word[i + 2:] for i in range(1, n - 1) if word[i] != word[i + 1]}
    elif kind == "substitution":
        out = {word[:i] + ch + word[i + 1:] for i in range(1, n) for ch in adjacent_keys(word[i])}
    elif kind == "split":
        out = {word[:i] + " " + word[i:] for i in range(2, n - 1)}
    else:
        raise ValueError(f"unknown typo kind {kind!r}: use one of {', '.join(KINDS)}")
    out.discard(word)
    return sorted(w for w in out if classify(word, w) == kind)


def misspell(rng: random.Random, word: str, kind: str, real_words: set[str], prefer=None) -> str | None:
    """One misspelling of ``word`` of ``kind`` that is not a real word (no part of a split one either), or None.
    ``prefer(w)``: a test; misspellings that pass it are drawn first (e.g. one token under a tokenizer)."""
    opts = [w for w in candidates(word, kind) if not any(part in real_words for part in w.split())]
    if prefer is not None:
        good = [w for w in opts if prefer(w)]
        opts = good or opts
    return rng.choice(opts) if opts else None
