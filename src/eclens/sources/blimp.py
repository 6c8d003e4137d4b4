"""Import BLiMP (Warstadt et al., TACL 2020) paradigm files as minimal pairs.

``sentence_good`` becomes the clean sentence and ``sentence_bad`` the corrupt one;
the category is ``blimp/<linguistics_term>/<UID>``. For one-prefix paradigms the
words that follow the shared prefix are the logit-difference targets:
``meta["target_clean"]``, ``meta["target_corrupt"]`` and ``meta["prefix"]``.
Most BLiMP pairs differ in more than one token under a given tokenizer; the
per-paradigm report says how many survive the single-token filter and why the
rest do not.

Design fields: every pair is an ``error``; its ``cluster`` is the paradigm UID and the
pair of differing words (pairs that swap the same words in one paradigm are not
independent); one-prefix paradigms get ``detect``, the first word after the shared
prefix. BLiMP has no twins (no acceptable change of the same word), which
``ec pairs check`` says.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

from ..errors import EclensError, PairFileError
from ..pairs import NOT_TEXT, REASONS, AlignedPair, MinimalPair, align, is_text, iter_jsonl

SOURCE = "blimp"
REQUIRED = ("sentence_good", "sentence_bad", "UID", "linguistics_term", "field", "pairID")
ONE_PREFIX = ("one_prefix_prefix", "one_prefix_word_good", "one_prefix_word_bad")
# Kept from the record besides the required fields (small, and useful to slice results by).
EXTRA_META = ("lexically_identical", "dependency_length", "crucial_item")


def blimp_files(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Path]:
    """The paradigm files named by ``paths``: files as given, folders expanded to their ``*.jsonl``."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(p.glob("*.jsonl"))
            if not found:
                raise EclensError(f"{p}: folder has no *.jsonl BLiMP paradigm files")
            files.extend(found)
        elif p.exists():
            files.append(p)
        else:
            raise PairFileError(p, "no such file or folder")
    if not files:
        raise EclensError("no BLiMP files given")
    return files


def read_blimp_file(path: str | os.PathLike) -> list[MinimalPair]:
    """Every record of one BLiMP paradigm file as a :class:`MinimalPair` (no filtering)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise PairFileError(path, f"cannot read ({e.strerror})") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise PairFileError(path, "not UTF-8; BLiMP files are UTF-8 JSONL", raw[: e.start].count(b"\n") + 1) \
            from None
    out: list[MinimalPair] = []
    for i, line, rec in iter_jsonl(path, text):
        if not isinstance(rec, dict):
            raise PairFileError(path, f"expected a JSON object, got {type(rec).__name__}", i)
        if "\\u" in line and not is_text(rec):
            raise PairFileError(path, f"the record {NOT_TEXT}", i)
        missing = [k for k in REQUIRED if k not in rec]
        if missing:
            raise PairFileError(path, f"missing BLiMP field(s) {', '.join(missing)}; is this a BLiMP paradigm file?", i)
        for k in ("sentence_good", "sentence_bad", "UID", "linguistics_term", "field"):
            if not isinstance(rec[k], str) or not rec[k].strip():
                raise PairFileError(path, f"field {k!r} must be a non-empty string", i)
        if not isinstance(rec["pairID"], (str, int)):
            raise PairFileError(path, "field 'pairID' must be a string or an integer", i)
        uid, term = rec["UID"], rec["linguistics_term"]
        meta = {"pairID": str(rec["pairID"]), "field": rec["field"], "UID": uid, "linguistics_term": term}
        meta.update({k: rec[k] for k in EXTRA_META if k in rec})
        detect = None
        if rec.get("one_prefix_method") and all(isinstance(rec.get(k), str) for k in ONE_PREFIX):
            meta.update(prefix=rec["one_prefix_prefix"], target_clean=rec["one_prefix_word_good"],
                        target_corrupt=rec["one_prefix_word_bad"])
            # The error shows at the first word after the shared prefix (when that is not before the change:
            # some prefixes end before the differing word, and then the changed word is where it shows).
            n_prefix = len(rec["one_prefix_prefix"].split())
            first = first_difference(rec["sentence_good"], rec["sentence_bad"])
            if first <= n_prefix < len(rec["sentence_bad"].split()):
                detect = n_prefix
        good_w, bad_w = differing_words(rec["sentence_good"], rec["sentence_bad"])
        out.append(MinimalPair(
            id=f"blimp-{uid}-{rec['pairID']}", clean=rec["sentence_good"], corrupt=rec["sentence_bad"],
            category=f"blimp/{term}/{uid}", source=SOURCE, meta=meta,
            cluster=f"{uid}:{good_w}->{bad_w}", role="error", detect=detect,
        ))
    if not out:
        raise PairFileError(path, "file is empty; a BLiMP paradigm file has one pair per line")
    return out


def differing_words(good: str, bad: str) -> tuple[str, str]:
    """The words where two sentences differ (joined with spaces when several), by a word-level diff."""
    from difflib import SequenceMatcher

    a, b = good.split(), bad.split()
    ga, ba = [], []
    for tag, i1, i2, j1, j2 in SequenceMatcher(None, a, b, autojunk=False).get_opcodes():
        if tag != "equal":
            ga.extend(a[i1:i2])
            ba.extend(b[j1:j2])
    strip = ".,;:!?\"'"
    return " ".join(w.strip(strip) for w in ga), " ".join(w.strip(strip) for w in ba)


def first_difference(good: str, bad: str) -> int:
    """The index of the first word where two sentences differ."""
    a, b = good.split(), bad.split()
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def import_blimp(
    paths: str | os.PathLike | Sequence[str | os.PathLike],
    tokenizer=None,
    *,
    prepend_bos: bool = False,
    max_len: int | None = None,
    only_valid: bool = False,
    max_per_paradigm: int | None = None,
):
    """Read BLiMP files (or folders of them) and report single-token yield per paradigm.

    Returns ``(pairs, report)``. ``pairs`` holds every pair (or, with ``only_valid``, the
    pairs that are a single-token change under ``tokenizer``), at most
    ``max_per_paradigm`` per paradigm, in file order. ``report`` has one row per paradigm:
    ``UID, linguistics_term, field, one_prefix, total``, then with a tokenizer ``valid``,
    one column per rejection reason (:data:`eclens.pairs.REASONS`) and ``valid_frac``.
    """
    import pandas as pd

    if only_valid and tokenizer is None:
        raise EclensError("only_valid needs a tokenizer to check the pairs with")
    if max_per_paradigm is not None and max_per_paradigm < 1:
        raise EclensError(f"max_per_paradigm must be at least 1, got {max_per_paradigm}")
    first_seen: dict[str, Path] = {}
    pairs: list[MinimalPair] = []
    rows = []
    for path in blimp_files(paths):
        recs = read_blimp_file(path)
        by_uid: dict[str, list[MinimalPair]] = {}
        for p in recs:
            if p.id in first_seen:
                raise PairFileError(path, f"pair {p.id!r} was already read from {first_seen[p.id]}; "
                                    "give each paradigm file once")
            first_seen[p.id] = path
            by_uid.setdefault(p.meta["UID"], []).append(p)
        for uid, group in by_uid.items():
            row = {"UID": uid, "linguistics_term": group[0].meta["linguistics_term"],
                   "field": group[0].meta["field"], "one_prefix": "target_clean" in group[0].meta,
                   "total": len(group)}
            kept = group
            if tokenizer is not None:
                reasons: Counter = Counter()
                valid = []
                for p in group:
                    r = align(p, tokenizer, prepend_bos=prepend_bos, max_len=max_len)
                    if isinstance(r, AlignedPair):
                        valid.append(p)
                    else:
                        reasons[r.reason] += 1
                row["valid"] = len(valid)
                row.update({k: reasons.get(k, 0) for k in REASONS})
                row["valid_frac"] = round(len(valid) / len(group), 4)
                if only_valid:
                    kept = valid
            pairs.extend(kept[:max_per_paradigm] if max_per_paradigm else kept)
            rows.append(row)
    report = pd.DataFrame(rows).sort_values("UID", kind="stable").reset_index(drop=True)
    return pairs, report
