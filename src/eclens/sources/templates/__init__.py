"""Offline template generator (v2): the default dataset of ``ec run``, no network needed.

Every frame becomes a *cluster*: for the error categories an error pair and its twin
(the same clean sentence, the same word replaced acceptably), agreement and anaphor as
2x2 designs (two error cells and their twins); for the meaning categories one
acceptable change. See ``frames.py`` for the record of a cluster and the category
modules for the linguistics. Every pair of a cluster must align under the target
tokenizer (typos in span mode, the rest single-token, never at the first token) or
the whole cluster is redrawn; the counts of every rejection are in the stats table.

With a reference model (default: the embedded SmolLM2), frames whose clean sentence
is among the least likely 10 % of their category are dropped, and each twin's change
at ``detect`` is compared with its error's (size match, DESIGN.md). The reference and
its scores are written into every record (``meta``), so every model sees the same
pairs. Generation is seeded per category (``sha256(seed, category)``): the same seed,
tokenizer and reference give byte-identical output on every machine.
"""

from __future__ import annotations

import hashlib
import math
import random
import statistics
from collections import Counter
from collections.abc import Callable, Sequence

from ...errors import EclensError
from ...pairs import AlignedPair, MinimalPair, align, pair_id
from ..categories import resolve_categories
from .agreement import agreement, anaphor
from .frames import Cluster
from .grammar import article, preposition, tense
from .meaning import meaning_adjective, meaning_location, meaning_subject
from .typo import typo

SOURCE = "templates"
ERROR_CATEGORIES = ("grammar/agreement", "grammar/tense", "grammar/article", "grammar/preposition",
                    "grammar/anaphor", "typo")
SPAN_CATEGORIES = ("typo",)  # aligned in span mode: misspellings often change the number of tokens
BUILDERS: dict[str, Callable[..., Cluster | None]] = {
    "grammar/agreement": agreement,
    "grammar/tense": tense,
    "grammar/article": article,
    "grammar/preposition": preposition,
    "grammar/anaphor": anaphor,
    "typo": typo,
    "meaning/subject": meaning_subject,
    "meaning/location": meaning_location,
    "meaning/adjective": meaning_adjective,
}
# Draws per wanted pair before giving up (an exhausted space must end with a message, not a loop).
MAX_DRAWS_PER_PAIR = 40
DROP_FRACTION = 0.10  # least likely share of frames the plausibility filter drops
SIZE_MATCH = (0.8, 1.25)


def category_seed(seed: int, category: str) -> int:
    """A per-category seed that does not depend on Python's hash salt or on which categories run."""
    return int.from_bytes(hashlib.sha256(f"eclens-templates\x1f{seed}\x1f{category}".encode()).digest()[:8], "big")


def _is_unit(p: MinimalPair, category: str) -> bool:
    """What ``n`` counts: error pairs (incl. 2x2 error cells) in error categories, every pair in the others."""
    return p.role not in ("twin",) if category in ERROR_CATEGORIES else True


def _records(c: Cluster, category: str) -> list[MinimalPair]:
    first = c.variants[0]
    cluster = f"{c.template}/{pair_id(first.clean, first.changed, category)[:8]}"
    ids = [pair_id(v.clean, v.changed, category) for v in c.variants]
    out = []
    for v, pid in zip(c.variants, ids):
        meta = {"template": c.template, "clean_word": v.clean_word, "corrupt_word": v.changed_word, "head": c.head}
        if v.cell_error:
            meta.update(design="2x2", cell_error=True)
        out.append(MinimalPair(pid, v.clean, v.changed, category, SOURCE, meta, cluster=cluster, role=v.role,
                               twin_kind=v.twin_kind, twin_of=ids[v.twin_of] if v.twin_of is not None else None,
                               swap_direction=v.swap_direction, detect=v.detect, typo_kind=v.typo_kind))
    return out


def _one_token(tokenizer) -> Callable[[str], bool]:
    return lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"]) == 1


def _draw(category: str, rng: random.Random, k: int, prefer) -> Cluster | None:
    if category == "typo":
        return typo(rng, k, prefer)
    return BUILDERS[category](rng)


def generate_templates_with_stats(
    tokenizer,
    n_per_category: int = 200,
    seed: int = 0,
    categories: Sequence[str] | None = None,
    prepend_bos: bool = False,
    *,
    reference: str | None = None,
    extra_tokenizers: Sequence[tuple[object, bool]] = (),
):
    """Template pairs and a per-category table of how they were made.

    Returns ``(pairs, stats)``: ``n_per_category`` error pairs (each with its twin) per
    error category and ``n_per_category`` pairs per meaning category, as
    :class:`~eclens.pairs.MinimalPair` records in canonical category order. Every pair
    is valid under ``tokenizer`` and each of ``extra_tokenizers`` (``(tokenizer,
    prepend_bos)``). ``reference`` names the reference model of the plausibility filter
    and the size match (``None``: neither). ``stats`` has one row per category.
    """
    import pandas as pd

    if n_per_category < 1:
        raise EclensError(f"--n must be at least 1, got {n_per_category}")
    cats = resolve_categories(list(categories) if categories else None)
    toks = [(tokenizer, prepend_bos), *extra_tokenizers]
    ref = None
    if reference:
        from .reference import Reference

        ref = Reference(reference)
    out: list[MinimalPair] = []
    rows = []
    for cat in cats:
        got, row = _category(cat, n_per_category, seed, toks, ref)
        out.extend(got)
        rows.append(row)
        if ref is not None:
            ref.save()  # per category: an interrupted run keeps the scores it paid for
    return out, pd.DataFrame(rows)


def _align_all(recs: list[MinimalPair], toks, mode: str) -> tuple[list[AlignedPair] | None, str | None]:
    first: list[AlignedPair] = []
    for k, (tok, bos) in enumerate(toks):
        for p in recs:
            a = align(p, tok, prepend_bos=bos, mode=mode)
            if not isinstance(a, AlignedPair):
                return None, a.reason
            if a.position < 1 + int(bos):
                return None, "first_token"
            if k == 0:
                first.append(a)
    return first, None


def _category(cat: str, n: int, seed: int, toks, ref):
    rng = random.Random(category_seed(seed, cat))
    mode = "span" if cat in SPAN_CATEGORIES else "single"
    prefer = _one_token(toks[0][0])
    # With the filter, make enough frames that n units remain after dropping the least likely tenth.
    want = math.ceil(n / (1 - DROP_FRACTION)) + 2 if ref is not None else n
    seen: set[tuple[str, str]] = set()
    kept: list[tuple[list[MinimalPair], list[AlignedPair]]] = []
    rejected: Counter = Counter()
    draws = dupes = units = 0
    limit = MAX_DRAWS_PER_PAIR * n + 200
    while units < want:
        if draws >= limit:
            raise EclensError(
                f"templates: only {units} distinct valid {cat} pairs after {draws} draws "
                f"(rejected: {dict(rejected)}); ask for fewer with --n or use --source openai")
        draws += 1
        c = _draw(cat, rng, draws, prefer)
        if c is None:
            rejected["no_misspelling"] += 1
            continue
        recs = _records(c, cat)
        keys = {(p.clean, p.corrupt) for p in recs}
        if keys & seen or len(keys) < len(recs):  # any pair of the cluster already made (ids must be unique)
            dupes += 1
            continue
        aligned, why = _align_all(recs, toks, mode)
        if aligned is None:
            rejected[why] += 1
            continue
        seen |= keys
        kept.append((recs, aligned))
        units += sum(_is_unit(p, cat) for p in recs)
    dropped = 0
    if ref is not None:
        lp = ref.logprobs([p.clean for recs, _ in kept for p in recs])
        score = [min(lp[p.clean] for p in recs) for recs, _ in kept]
        cut = sorted(score)[int(DROP_FRACTION * len(score))]
        for recs, _ in kept:
            for p in recs:
                p.meta.update(reference=ref.name, ref_logprob=lp[p.clean])
        before = len(kept)
        kept = [k for k, s in zip(kept, score) if s >= cut]
        dropped = before - len(kept)
    final: list[tuple[list[MinimalPair], list[AlignedPair]]] = []
    units = 0
    for recs, al in kept:
        if units >= n:
            break
        final.append((recs, al))
        units += sum(_is_unit(p, cat) for p in recs)
    pairs = [p for recs, _ in final for p in recs]
    aligned = [a for _, al in final for a in al]
    size = _size_match(ref, pairs) if ref is not None and cat in ERROR_CATEGORIES else None
    return pairs, _row(cat, pairs, aligned, draws, dupes, rejected, dropped, size)


def _size_match(ref, pairs: list[MinimalPair]) -> dict[str, float]:
    """Each twin's layer-0 change over its error's, both at the error's ``detect`` (DESIGN.md: a twin is
    size-matched when its change there is within x0.8-1.25 of the error's); recorded in the twin's meta."""
    from dataclasses import replace

    by_id = {p.id: p for p in pairs}
    probe = [replace(p, detect=by_id[p.twin_of].detect) if p.is_twin and p.twin_of in by_id else p for p in pairs]
    change = ref.layer0_change(probe)
    ratios = []
    for p in pairs:
        p.meta["l0_change"] = change[p.id]
        if p.is_twin and change.get(p.id) is not None and change.get(p.twin_of):
            r = change[p.id] / change[p.twin_of]
            p.meta["size_ratio"] = round(r, 4)
            p.meta["size_matched"] = SIZE_MATCH[0] <= r <= SIZE_MATCH[1]
            ratios.append(r)
    twins = [p for p in pairs if p.is_twin]
    return {"twins": len(twins), "size_matched": sum(bool(p.meta.get("size_matched")) for p in twins),
            "ratio_median": round(statistics.median(ratios), 3) if ratios else math.nan}


def _row(cat, pairs, aligned, draws, dupes, rejected, dropped, size) -> dict:
    units = [p for p in pairs if _is_unit(p, cat)]
    errors = [a for a in aligned if _is_unit(a.pair, cat)]
    lengths = [a.length for a in aligned]
    positions = [a.position for a in aligned]
    dirs = Counter(p.swap_direction for p in units if p.swap_direction)
    row = {"category": cat, "pairs": len(units), "twins": sum(p.is_twin for p in pairs),
           "clusters": len({p.cluster for p in pairs}), "draws": draws, "duplicates": dupes,
           "dropped_implausible": dropped}
    for reason in ("different_length", "multiple_differences", "multiple_spans", "insertion", "identical",
                   "first_token", "no_misspelling"):
        row[f"rejected_{reason}"] = rejected.get(reason, 0)
    row.update(
        templates=len({p.meta["template"] for p in pairs}),
        word_pairs=len({(p.meta["clean_word"], p.meta["corrupt_word"]) for p in units}),
        combinations=len({(p.meta["clean_word"], p.meta["corrupt_word"], p.meta["head"]) for p in units}),
        span_pairs=sum(a.mode == "span" for a in aligned),
        detect_not_p=sum(a.detect_position is not None and a.detect_position != a.corrupt_end - 1 for a in errors),
        swap_share=round(max(dirs.values()) / sum(dirs.values()), 3) if dirs else math.nan,
        len_min=min(lengths), len_median=statistics.median(lengths), len_max=max(lengths),
        pos_min=min(positions), pos_median=statistics.median(positions), pos_max=max(positions),
        typo_kinds=",".join(f"{k}:{v}" for k, v in sorted(Counter(p.typo_kind for p in units if p.typo_kind).items())),
    )
    if size is not None:
        row.update(twins_size_matched=size["size_matched"], twin_size_ratio_median=size["ratio_median"])
    return row


def generate_templates(
    tokenizer,
    n_per_category: int = 200,
    seed: int = 0,
    categories: Sequence[str] | None = None,
    prepend_bos: bool = False,
    *,
    reference: str | None = None,
) -> list[MinimalPair]:
    """:func:`generate_templates_with_stats` without the table."""
    return generate_templates_with_stats(tokenizer, n_per_category, seed, categories, prepend_bos,
                                         reference=reference)[0]
