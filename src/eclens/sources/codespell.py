"""Natural typos from real data: codespell's dictionary of misspellings people made.

codespell (PyPI, GPL-2.0) ships ``codespell_lib/data/dictionary.txt``, tens of
thousands of lines ``misspelling->correction`` collected from real text. Each entry
with one correction becomes a cluster: the correction in a sentence frame (clean),
the misspelling in its place (error, its typo kind classified by
:func:`eclens.sources.typos.classify`), and a twin: the British/American spelling
variant where codespell lists one (neutral), else another real word of the same
frame (acceptable). Most misspellings change the number of tokens: align them with
``mode="span"`` (``ec pairs check --span``).
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

from ..errors import EclensError
from ..pairs import MinimalPair, pair_id
from .templates.frames import NAMES, render
from .typos import classify

SOURCE = "codespell"
CATEGORY = "typo/codespell"
# Frames that take any word: they talk about the word, so no part of speech is needed.
FRAMES = ("{N} wrote the word {X} on the board before the lesson.",
          "The word {X} appears twice in the first letter.",
          "{N} could not remember how to say {X} in French.",
          "In the old book, {X} was underlined in red ink.",
          "The children had to use {X} in a sentence of their own.",
          "{N} asked what {X} meant, and nobody knew.")


def data_dir() -> Path:
    try:
        import codespell_lib
    except ImportError:
        raise EclensError("the codespell source needs the codespell package: pip install codespell") from None
    return Path(codespell_lib.__file__).parent / "data"


@lru_cache(maxsize=1)
def entries() -> tuple[tuple[str, str], ...]:
    """``(misspelling, correction)`` of every plain-word entry with one correction, in file order."""
    out = []
    for line in (data_dir() / "dictionary.txt").read_text(encoding="utf-8").splitlines():
        wrong, _, right = line.partition("->")
        right = right.strip().rstrip(",")
        if not right or "," in right or not wrong.replace(" ", "").isalpha() or not wrong.islower():
            continue
        if not right.replace(" ", "").isalpha() or not right.islower():
            continue
        out.append((wrong, right))
    return tuple(out)


@lru_cache(maxsize=1)
def real_words() -> frozenset[str]:
    """Words codespell knows to be right: every correction (and each word of a multi-word one)."""
    return frozenset(w for _, right in entries() for w in right.split())


@lru_cache(maxsize=1)
def spelling_variants() -> dict[str, str]:
    """British -> American spellings codespell lists (and back), for neutral twins."""
    out: dict[str, str] = {}
    for line in (data_dir() / "dictionary_en-GB_to_en-US.txt").read_text(encoding="utf-8").splitlines():
        gb, _, us = line.partition("->")
        us = us.strip().rstrip(",")
        if gb.isalpha() and us.isalpha() and "," not in us:
            out[gb] = us
            out.setdefault(us, gb)
    return out


def codespell_pairs(n: int = 500, seed: int = 0, *, min_len: int = 4, kinds: Sequence[str] | None = None,
                    common: set[str] | frozenset[str] | None = None) -> list[MinimalPair]:
    """``n`` clusters (error + twin) from codespell entries, drawn with ``seed``.

    Only corrections of at least ``min_len`` letters, one word (a split misspelling's
    correction is one word), and, with ``common``, only corrections in that set.
    ``kinds`` restricts the typo kinds (default: all, ``other`` included).
    """
    pool = [(w, r) for w, r in entries() if len(r) >= min_len and " " not in r and (common is None or r in common)]
    if kinds:
        pool = [(w, r) for w, r in pool if classify(r, w) in kinds]
    if not pool:
        raise EclensError("codespell: no entries left after the filters; relax --kinds or the word list")
    rng = random.Random(int.from_bytes(hashlib.sha256(f"eclens-codespell\x1f{seed}".encode()).digest()[:8], "big"))
    picks = rng.sample(pool, min(n, len(pool)))
    by_len: dict[int, list[str]] = {}
    for r in sorted({r for _, r in pool}):
        by_len.setdefault(len(r), []).append(r)
    variants = spelling_variants()
    out: list[MinimalPair] = []
    for wrong, right in picks:
        i = rng.randrange(len(FRAMES))
        slots = {"N": rng.choice(NAMES)}
        if right in variants:
            twin, twin_kind = variants[right], "neutral"
        else:
            twin, twin_kind = rng.choice([w for w in by_len.get(len(right), [right]) if w != right] or [right]), \
                "acceptable"
        clean, _ = render(FRAMES[i], right, **slots)
        err, _ = render(FRAMES[i], wrong, **slots)
        tw, _ = render(FRAMES[i], twin, **slots)
        cluster = f"codespell/{i}/{right}"
        eid = pair_id(clean, err, CATEGORY)
        meta = {"template": f"codespell/{i}", "clean_word": right, "corrupt_word": wrong}
        out.append(MinimalPair(eid, clean, err, CATEGORY, SOURCE, meta, cluster=cluster, role="error",
                               typo_kind=classify(right, wrong)))
        if twin != right:
            out.append(MinimalPair(pair_id(clean, tw, CATEGORY), clean, tw, CATEGORY, SOURCE,
                                   {**meta, "corrupt_word": twin}, cluster=cluster, role="twin",
                                   twin_kind=twin_kind, twin_of=eid))
    return out


def kind_counts(pairs: Sequence[MinimalPair]) -> dict[str, int]:
    return dict(Counter(p.typo_kind for p in pairs if p.role == "error"))


def codespell_check(n: int, seed: int, toks: Sequence[tuple[object, bool]]):
    """``n`` codespell clusters checked under every ``(tokenizer, prepend_bos)``: the clusters whose error and
    twin both align in span mode under all of them, and a yield table per typo kind (single-token and span)."""
    import pandas as pd

    from ..pairs import AlignedPair, align

    pairs = codespell_pairs(n, seed)
    by_cluster: dict[str, list[MinimalPair]] = {}
    for p in pairs:
        by_cluster.setdefault(p.cluster_id, []).append(p)
    rows: dict[str, Counter] = {}
    kept: list[MinimalPair] = []
    for recs in by_cluster.values():
        err = recs[0]
        row = rows.setdefault(err.typo_kind or "other", Counter())
        row["errors"] += 1
        modes = {}
        for mode in ("single", "span"):
            modes[mode] = all(isinstance(a, AlignedPair) and a.position >= 1 + int(bos)
                              for tok, bos in toks for a in [align(err, tok, prepend_bos=bos, mode=mode)])
            row[f"{mode}_valid"] += modes[mode]
        ok = modes["span"] and all(isinstance(align(p, tok, prepend_bos=bos, mode="span"), AlignedPair)
                                   for p in recs[1:] for tok, bos in toks)
        row["kept_with_twin"] += ok
        if ok:
            kept.extend(recs)
    table = pd.DataFrame([{"typo kind": k, **{c: v.get(c, 0) for c in ("errors", "single_valid", "span_valid",
                                                                       "kept_with_twin")}}
                          for k, v in sorted(rows.items())])
    return kept, table
