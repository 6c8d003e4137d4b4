"""Property tests (hypothesis) of every pair loader and of alignment.

Whatever the bytes or records, a loader either returns well-formed pairs (string fields,
unique ids, a dict ``meta``, writable and re-readable as JSONL) or raises an
:class:`~eclens.errors.EclensError` (the one-line errors the CLI prints). Alignment
returns an :class:`AlignedPair` whose invariants hold, or a :class:`Rejection`, for any
text. Anything else (a ``TypeError``, ``UnicodeEncodeError``, ``csv.Error``, ...) is a bug.

Loaders covered: JSONL (``load_jsonl``), CSV/TSV (``load_csv``), the study's JSON
(``load_study_json``), BLiMP paradigm files (``read_blimp_file``/``import_blimp``), the
aligned ``pairs.jsonl`` of a run (``load_aligned``) and the resume file of ``ec generate``
(``read_existing``).
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from eclens.errors import EclensError
from eclens.pairs import (
    FIELDS,
    AlignedPair,
    MinimalPair,
    Rejection,
    align,
    encode,
    load_aligned,
    load_csv,
    load_jsonl,
    load_study_json,
    write_jsonl,
)
from eclens.sources.blimp import import_blimp, read_blimp_file
from eclens.sources.openai_gen import read_existing

FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# Text as it can arrive in JSON: any code point, including unpaired surrogates ("\ud800" escapes).
ANY_TEXT = st.text(alphabet=st.characters(exclude_categories=()), max_size=40)
WORDS = st.sampled_from(["The", " cat", " dog", " sat", " runs", " run", ".", " 日本", "🍕", " ", "", "\n", "\t",
                         "é", "\u200b", "\x00", "\ud800", '"', "\\", ","])
JSON_SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | ANY_TEXT
JSON_VALUES = st.recursive(JSON_SCALARS, lambda c: st.lists(c, max_size=3) |
                           st.dictionaries(ANY_TEXT, c, max_size=3), max_leaves=8)
SENTENCE = st.lists(WORDS, max_size=8).map("".join) | ANY_TEXT


@pytest.fixture(scope="module")
def tok():
    from eclens.model import load_tokenizer

    return load_tokenizer("smollm2-135m")


# One folder for every generated file, removed when the module is done (hypothesis makes hundreds of
# examples: a folder each left thousands behind in /tmp).
_ROOT = tempfile.TemporaryDirectory(prefix="eclens-fuzz-")
_SEQ = itertools.count()


def _file(data: bytes, suffix: str) -> Path:
    d = Path(_ROOT.name) / str(next(_SEQ))
    d.mkdir()
    p = d / f"pairs{suffix}"
    p.write_bytes(data)
    return p


def _well_formed(pairs: list[MinimalPair]) -> None:
    """What every loader promises about what it returns."""
    assert isinstance(pairs, list) and pairs
    ids = [p.id for p in pairs]
    assert len(set(ids)) == len(ids)
    for p in pairs:
        assert isinstance(p, MinimalPair)
        for f in ("id", "clean", "corrupt", "category", "source"):
            v = getattr(p, f)
            assert isinstance(v, str), (f, v)
            v.encode("utf-8")  # valid Unicode text: it can be tokenized and written
        assert p.id and p.category and p.source
        assert isinstance(p.meta, dict)
    # Writable as JSONL and read back unchanged.
    out = _file(b"", ".jsonl")
    write_jsonl(out, pairs)
    back = load_jsonl(out)
    assert [(p.id, p.clean, p.corrupt, p.category, p.meta) for p in back] == \
        [(p.id, p.clean, p.corrupt, p.category, p.meta) for p in pairs]


def _loads_or_clean_error(loader, path: Path, **kw):
    try:
        pairs = loader(path, **kw)
    except EclensError as e:
        msg = str(e)
        assert "\n" not in msg and msg.startswith(str(path)), msg
        return None
    return pairs


# ----------------------------------------------------------------------------- raw bytes


@FUZZ
@given(data=st.binary(max_size=400))
@example(data=b"\xef\xbb\xbf")
@example(data=b'{"clean": "a\\ud800", "corrupt": "b"}\n')
@example(data=b'{"clean": "a", "corrupt": "b", "meta": {"k": "\\udfff"}}\n')
def test_any_bytes_jsonl(data):
    pairs = _loads_or_clean_error(load_jsonl, _file(data, ".jsonl"))
    if pairs is not None:
        _well_formed(pairs)


@FUZZ
@given(data=st.binary(max_size=400))
@example(data=b"clean,corrupt\na\x00b,c\n")
@example(data=b'clean,corrupt\n"never closed,x\n')
def test_any_bytes_csv(data):
    pairs = _loads_or_clean_error(load_csv, _file(data, ".csv"))
    if pairs is not None:
        _well_formed(pairs)


def test_csv_field_over_the_csv_module_limit():
    p = _file(b"clean,corrupt\n" + b"a" * 200_000 + b",b\n", ".csv")
    with pytest.raises(EclensError, match=rf"^{p}:2: "):
        load_csv(p)


@FUZZ
@given(data=st.binary(max_size=400))
@example(data=b'{"diff_token_type": {"t": {"s": {"sentence_pairs": [{"sentence1": "\\ud800", "sentence2": "b"}]}}}}')
@example(data=b'[{"clean": "a", "corrupt": "b"}, {"clean": "a", "corrupt": "b"}]')
def test_any_bytes_study_json(data):
    pairs = _loads_or_clean_error(load_study_json, _file(data, ".json"))
    if pairs is not None:
        _well_formed(pairs)


@FUZZ
@given(data=st.binary(max_size=400))
def test_any_bytes_blimp_and_aligned(data):
    pairs = _loads_or_clean_error(read_blimp_file, _file(data, ".jsonl"))
    if pairs is not None:
        _well_formed(pairs)
    aligned = _loads_or_clean_error(load_aligned, _file(data, ".jsonl"))
    if aligned is not None:
        _aligned_ok(aligned)


# ------------------------------------------------------------------------- structured records

RECORD = st.fixed_dictionaries({}, optional={k: JSON_VALUES | SENTENCE for k in FIELDS}) | \
    st.dictionaries(st.sampled_from([*FIELDS, "label", ""]), JSON_VALUES, max_size=6) | JSON_VALUES


def _jsonl(records, ascii_only: bool) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=ascii_only) + "\n" for r in records).encode("utf-8", "surrogatepass")


@FUZZ
@given(records=st.lists(RECORD, min_size=1, max_size=5), ascii_only=st.booleans())
def test_jsonl_records(records, ascii_only):
    pairs = _loads_or_clean_error(load_jsonl, _file(_jsonl(records, ascii_only), ".jsonl"))
    if pairs is not None:
        _well_formed(pairs)


@FUZZ
@given(records=st.lists(RECORD, min_size=1, max_size=5))
def test_generate_resume_file_records(tok, records):
    p = _file(_jsonl(records, True), ".jsonl")
    try:
        pairs, _ = read_existing(p, tok, prepend_bos=False, max_len=64)
    except EclensError as e:
        assert "\n" not in str(e) and str(e).startswith(str(p))
        return
    if pairs:
        _well_formed(pairs)


@FUZZ
@given(rows=st.lists(st.lists(SENTENCE, min_size=0, max_size=5), min_size=0, max_size=5),
       header=st.lists(st.sampled_from(["clean", "corrupt", "category", "id", "x", ""]), min_size=1, max_size=5),
       delim=st.sampled_from([",", "\t", ";"]))
def test_csv_rows(rows, header, delim):
    buf = io.StringIO()
    w = csv.writer(buf, delimiter=delim)
    w.writerow(header)
    for r in rows:
        w.writerow(r)
    data = buf.getvalue().encode("utf-8", "surrogatepass")
    pairs = _loads_or_clean_error(load_csv, _file(data, ".csv"), delimiter=delim)
    if pairs is not None:
        _well_formed(pairs)


STUDY = st.fixed_dictionaries({"diff_token_type": st.dictionaries(
    ANY_TEXT, st.dictionaries(ANY_TEXT, st.fixed_dictionaries({"sentence_pairs": st.lists(
        st.fixed_dictionaries({"sentence1": SENTENCE, "sentence2": SENTENCE}) | JSON_VALUES, max_size=3)})
        | JSON_VALUES, max_size=2), max_size=2) | JSON_VALUES}) | JSON_VALUES


@FUZZ
@given(doc=STUDY)
def test_study_json_documents(doc):
    pairs = _loads_or_clean_error(load_study_json, _file(json.dumps(doc).encode(), ".json"))
    if pairs is not None:
        _well_formed(pairs)


BLIMP = st.fixed_dictionaries(
    {"sentence_good": SENTENCE, "sentence_bad": SENTENCE},
    optional={"UID": ANY_TEXT | JSON_VALUES, "linguistics_term": ANY_TEXT, "field": ANY_TEXT,
              "pairID": st.integers() | ANY_TEXT | JSON_VALUES, "one_prefix_method": JSON_VALUES,
              "one_prefix_prefix": ANY_TEXT, "one_prefix_word_good": ANY_TEXT, "one_prefix_word_bad": ANY_TEXT,
              "lexically_identical": JSON_VALUES}) | JSON_VALUES


@FUZZ
@given(records=st.lists(BLIMP, min_size=1, max_size=4))
def test_blimp_records(tok, records):
    p = _file(_jsonl(records, True), ".jsonl")
    try:
        pairs, report = import_blimp([p], tok, max_len=64)
    except EclensError as e:
        assert "\n" not in str(e) and str(e).startswith(str(p))
        return
    _well_formed(pairs)
    assert int(report["total"].sum()) == len(pairs)


ALIGNED = st.fixed_dictionaries(
    {"id": ANY_TEXT | JSON_VALUES, "clean": SENTENCE | JSON_VALUES, "corrupt": SENTENCE,
     "clean_ids": st.lists(st.integers(-2, 60000), max_size=6) | JSON_VALUES,
     "corrupt_ids": st.lists(st.integers(-2, 60000), max_size=6) | JSON_VALUES,
     "position": st.integers(-2, 8) | JSON_VALUES, "clean_token": ANY_TEXT | JSON_VALUES,
     "corrupt_token": ANY_TEXT},
    optional={"category": ANY_TEXT | JSON_VALUES, "source": ANY_TEXT, "meta": JSON_VALUES}) | JSON_VALUES


def _aligned_ok(aligned: list[AlignedPair]) -> None:
    """What the steps after `ec pairs check` rely on."""
    assert aligned
    assert len({a.id for a in aligned}) == len(aligned)
    for a in aligned:
        for f in ("id", "clean", "corrupt", "category", "source"):
            assert isinstance(getattr(a.pair, f), str)
        assert isinstance(a.pair.meta, dict)
        assert all(type(i) is int and i >= 0 for i in a.clean_ids + a.corrupt_ids)
        assert len(a.clean_ids) == len(a.corrupt_ids) >= 1 and 0 <= a.position < a.length
        diffs = [i for i, (x, y) in enumerate(zip(a.clean_ids, a.corrupt_ids)) if x != y]
        assert diffs == [a.position]
        assert isinstance(a.clean_token, str) and isinstance(a.corrupt_token, str)


@FUZZ
@given(records=st.lists(ALIGNED, min_size=1, max_size=4))
@example(records=[{"id": "a", "clean": "x", "corrupt": "y", "clean_ids": "abc", "corrupt_ids": "abd",
                   "position": 2, "clean_token": "c", "corrupt_token": "d"}])
def test_aligned_records(records):
    aligned = _loads_or_clean_error(load_aligned, _file(_jsonl(records, True), ".jsonl"))
    if aligned is not None:
        _aligned_ok(aligned)


# ---------------------------------------------------------------------------------- alignment


@FUZZ
@given(clean=SENTENCE, corrupt=SENTENCE, bos=st.booleans(), max_len=st.none() | st.integers(1, 12))
@example(clean="a \ud800 b", corrupt="a \ud800 c", bos=False, max_len=None)
def test_align_any_text(tok, clean, corrupt, bos, max_len):
    p = MinimalPair("x", clean, corrupt)
    try:
        r = align(p, tok, prepend_bos=bos, max_len=max_len)
    except EclensError as e:
        assert "\n" not in str(e)
        return
    if isinstance(r, AlignedPair):
        _aligned_ok([r])
        assert r.clean_ids[r.position] != r.corrupt_ids[r.position]
        assert max_len is None or r.length <= max_len
        assert r.clean_token == tok.decode([r.clean_ids[r.position]])
    else:
        assert isinstance(r, Rejection) and r.reason in ("empty", "identical", "different_length",
                                                         "multiple_differences", "too_long")
        if r.reason == "empty":
            assert not clean.strip() or not corrupt.strip()


@FUZZ
@given(words=st.lists(st.sampled_from([" cat", " dog", " sat", " on", " the", " mat", " runs", " 日本", " 🍕"]),
                      min_size=1, max_size=8), where=st.integers(0, 7),
       new=st.sampled_from([" bird", " horse", " is", " was", " 猫"]))
def test_align_finds_a_one_word_swap(tok, words, where, new):
    """Swapping one word gives a valid pair at that word's token, or a counted rejection, never a crash."""
    assume(where < len(words) and words[where] != new)
    clean = "The" + "".join(words) + "."
    corrupt = "The" + "".join(words[:where] + [new] + words[where + 1:]) + "."
    r = align(MinimalPair("x", clean, corrupt), tok)
    if isinstance(r, AlignedPair):
        _aligned_ok([r])
        # Every word starts with a space, so the tokens before the swapped word are the prefix's own,
        # and the changed token lies inside the swapped word (its last word may merge with the ".").
        prefix = encode(tok, "The" + "".join(words[:where]))
        upto = encode(tok, "The" + "".join(words[:where + 1]) + ("." if where == len(words) - 1 else ""))
        assert r.clean_ids[:len(prefix)] == prefix
        assert len(prefix) <= r.position < len(upto), (r.position, len(prefix), len(upto))
    else:
        assert r.reason in ("different_length", "multiple_differences")
