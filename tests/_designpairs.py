"""Design pairs for the measurement tests: clusters of an error pair and its twin sharing one frame.

Every cluster is one frame ``The {A} {X} sat near the {B} for a long time.``: the error pair
changes ``X`` from the clean word to the error word, the twin from the clean word to the twin
word. The design fields are set as attributes (``cluster``, ``role``, ``twin_kind``, ``twin_of``),
as the pairs module stores them.
"""

from __future__ import annotations

import itertools

from eclens.pairs import AlignedPair, MinimalPair, align

ADJ = (" big", " small", " old", " new", " red", " blue", " green")
NOUN = (" table", " horse", " tiger", " lion", " banana")
FRAMES = ("The{A}{X} sat near the{B} for a long time.", "Yesterday the{A}{X} ran past the{B} again.")


def design_pairs(tokenizer, n_clusters: int = 20, clean=" dog", error=" zebra", twin=" cat",
                 frames=FRAMES, balanced: bool = False) -> list[AlignedPair]:
    """``balanced``: every other cluster swaps the error and twin words, so that in an unplanted model
    errors and twins are exchangeable (a null); otherwise the error word is always ``error``."""
    out = []
    combos = list(itertools.product(frames, ADJ, NOUN))[:n_clusters]
    for c, (frame, a, b) in enumerate(combos):
        clean_s = frame.format(A=a, X=clean, B=b)
        words = (error, twin) if not (balanced and c % 2) else (twin, error)
        for role, word in zip(("error", "twin"), words):
            pair = MinimalPair(f"c{c}-{role}", clean_s, frame.format(A=a, X=word, B=b), "test/design", "test")
            r = align(pair, tokenizer)
            assert isinstance(r, AlignedPair), (pair, r)
            pair.cluster = f"c{c}"
            pair.role = role
            if role == "twin":
                pair.twin_kind, pair.twin_of = "acceptable", f"c{c}-error"
            out.append(r)
    return out
