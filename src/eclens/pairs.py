"""Minimal pairs: the record, loaders for the formats people have, and alignment
under the model's own tokenizer.

A pair is valid when, under the analysed model's tokenizer, the clean and corrupt
sentences have the same number of tokens and differ at exactly one position ``p``
(single-token mode, the default), or, in span mode, differ in one contiguous span of
tokens whose lengths may differ (" umbrella" against " umb", "rel", "a").
Pairs that fail are kept as :class:`Rejection` records with a reason, never dropped.

A record may say how it belongs to a design (see "Method, second edition" in DESIGN.md):
its ``cluster`` (pairs made from one frame; a record without one is its own cluster),
its ``role`` (``error``, ``twin`` or a 2x2 cell name), ``twin_kind`` and ``twin_of``
for twins, ``swap_direction``, ``detect`` (the word index, in the changed sentence,
where the error first becomes detectable; converted to a token position per tokenizer
by :func:`align`) and ``typo_kind``.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import EclensError, PairFileError
from .runs import atomic_path, jsonl_lines

DESIGN_FIELDS = ("cluster", "role", "twin_kind", "twin_of", "swap_direction", "detect", "typo_kind")
FIELDS = ("id", "clean", "corrupt", "category", "source", "meta", *DESIGN_FIELDS)
# What eclens adds when it writes aligned pairs (RUN/pairs.jsonl): accepted and ignored on input, since the
# pairs are aligned again under the model they are used with.
ALIGNED_FIELDS = ("position", "length", "clean_token", "corrupt_token", "clean_ids", "corrupt_ids", "mode",
                  "clean_end", "corrupt_end", "detect_position")
REASONS = ("empty", "identical", "different_length", "multiple_differences", "too_long")
# Span mode's own reasons (it has no different_length): tokens only added, or two separate differences.
SPAN_REASONS = ("insertion", "multiple_spans", "bad_detect")
TWIN_KINDS = ("neutral", "acceptable")
TYPO_KINDS = ("deletion", "insertion", "transposition", "substitution", "split", "other")
MODES = ("single", "span")


@dataclass
class MinimalPair:
    """A clean sentence and a corrupt one that should differ in one token.

    ``meta`` may hold ``target_clean`` / ``target_corrupt`` (strings whose first
    token is the logit-difference target, e.g. BLiMP's one-prefix words) and any
    provenance the source keeps (``pairID``, ``field``, ...).
    """

    id: str
    clean: str
    corrupt: str
    category: str = "uncategorized"
    source: str = "user"
    meta: dict[str, Any] = field(default_factory=dict)
    cluster: str | None = None
    role: str | None = None
    twin_kind: str | None = None
    twin_of: str | None = None
    swap_direction: str | None = None
    detect: int | None = None
    typo_kind: str | None = None

    @property
    def cluster_id(self) -> str:
        """The cluster this pair counts in: its own ``cluster``, else its id (one cluster per pair)."""
        return self.cluster or self.id

    @property
    def is_twin(self) -> bool:
        return self.role == "twin"

    def to_dict(self) -> dict[str, Any]:
        # Design fields only when set, so files without designs stay as they were.
        return {k: v for k, v in asdict(self).items() if k not in DESIGN_FIELDS or v is not None}


@dataclass
class AlignedPair:
    """A valid pair with its token ids and the changed position ``position``.

    Single-token mode (``mode == "single"``): the ids differ at ``position`` only.
    Span mode: they differ in ``[position, clean_end)`` of the clean ids and
    ``[position, corrupt_end)`` of the corrupt ids, whose lengths may differ; positions
    after the span are aligned from each side's own span end (:meth:`position_at`).
    ``detect_position`` is the token (corrupt side) where the error becomes detectable,
    from the record's ``detect`` word; ``None`` when the record has none (then ``p``).
    """

    pair: MinimalPair
    clean_ids: list[int]
    corrupt_ids: list[int]
    position: int
    clean_token: str
    corrupt_token: str
    mode: str = "single"
    clean_end: int | None = None
    corrupt_end: int | None = None
    detect_position: int | None = None

    def __post_init__(self) -> None:
        if self.clean_end is None:
            self.clean_end = self.position + 1
        if self.corrupt_end is None:
            self.corrupt_end = self.position + 1

    @property
    def is_span(self) -> bool:
        return self.mode == "span"

    def position_at(self, offset: int, side: str = "clean") -> int | None:
        """The token position ``offset`` tokens after the change's last token on ``side`` (``clean`` or
        ``corrupt``): 0 is the span's end, 1 the token after it; ``None`` past the sentence's end."""
        if side not in ("clean", "corrupt"):
            raise EclensError(f"side must be 'clean' or 'corrupt', got {side!r}")
        if offset < 0:
            raise EclensError(f"offset must be 0 or more (positions before the change are shared), got {offset}")
        end, n = (self.clean_end, len(self.clean_ids)) if side == "clean" else (self.corrupt_end,
                                                                                 len(self.corrupt_ids))
        t = end - 1 + offset
        return t if t < n else None

    @property
    def detect_offset(self) -> int | None:
        """``detect_position`` as an offset from the change's last token (the same on both sides)."""
        return None if self.detect_position is None else self.detect_position - (self.corrupt_end - 1)

    @property
    def id(self) -> str:
        return self.pair.id

    @property
    def category(self) -> str:
        return self.pair.category

    @property
    def length(self) -> int:
        return len(self.clean_ids)

    def to_dict(self) -> dict[str, Any]:
        d = self.pair.to_dict()
        d.update(
            position=self.position,
            length=self.length,
            clean_token=self.clean_token,
            corrupt_token=self.corrupt_token,
            clean_ids=self.clean_ids,
            corrupt_ids=self.corrupt_ids,
        )
        if self.mode != "single":
            d.update(mode=self.mode, clean_end=self.clean_end, corrupt_end=self.corrupt_end)
        if self.detect_position is not None:
            d["detect_position"] = self.detect_position
        return d


def require_single(pairs: Sequence[AlignedPair], step: str) -> None:
    """Refuse span pairs in a step that needs both runs position by position (one line)."""
    spans = [a.id for a in pairs if a.mode != "single"]
    if spans:
        raise EclensError(f"{step} needs single-token pairs, but {len(spans)} pair(s) are span-aligned "
                          f"(first: {spans[0]!r}); re-align without span mode (`ec pairs check` without --span)")


def aligned_position(position, length, offset: int):
    """``position + offset``, or the last token ``length - 1`` for a negative offset (single-token pairs,
    ints or arrays alike); may lie past the end, callers check ``< length``."""
    return position + offset if offset >= 0 else length - 1


def iter_jsonl(path: Path, text: str, bad_json: Callable[[json.JSONDecodeError], str] | None = None
               ) -> Iterator[tuple[int, str, Any]]:
    """``(line number, line, record)`` of every non-blank line of the JSONL ``text`` read from ``path``;
    a line that is not JSON is a one-line :class:`PairFileError` (``bad_json(e)``: its message)."""
    for i, line in enumerate(jsonl_lines(text), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            msg = bad_json(e) if bad_json else f"invalid JSON ({e.msg}, column {e.colno})"
            raise PairFileError(path, msg, i) from None
        yield i, line, rec


@dataclass
class Rejection:
    pair: MinimalPair
    reason: str
    detail: int | None = None
    clean_tokens: list[str] = field(default_factory=list)
    corrupt_tokens: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.reason}({self.detail})" if self.detail is not None else self.reason

    def to_dict(self) -> dict[str, Any]:
        d = self.pair.to_dict()
        d.update(reason=self.reason, detail=self.detail, clean_tokens=self.clean_tokens,
                 corrupt_tokens=self.corrupt_tokens)
        return d


def pair_id(clean: str, corrupt: str, category: str = "") -> str:
    """A stable id from the content, so reruns and reorderings keep ids."""
    return hashlib.sha1(f"{category}\x1f{clean}\x1f{corrupt}".encode()).hexdigest()[:12]


NOT_TEXT = "holds an unpaired surrogate escape such as \\ud800, which is not text; fix or remove the escape"


def is_text(obj: Any) -> bool:
    """Whether every string in ``obj`` is Unicode text. JSON's ``"\\ud800"`` escapes decode to unpaired
    surrogates, which can be neither tokenized nor written as UTF-8: loaders refuse them."""
    try:
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# --------------------------------------------------------------------------- loading


def read_text(path: Path) -> str:
    if not path.exists():
        raise PairFileError(path, "no such file")
    if path.is_dir():
        raise PairFileError(path, "is a folder, not a pairs file")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")  # tolerate a UTF-8 byte-order mark
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise PairFileError(path, f"not UTF-8 (byte {e.start}); save the file as UTF-8", line) from None
    if not text.strip():
        raise PairFileError(path, "file is empty; it needs at least one pair")
    return text


def pair_from_record(rec: Any, path: Path, line: int, defaults: dict[str, str]) -> MinimalPair:
    if not isinstance(rec, dict):
        raise PairFileError(path, f"expected a JSON object, got {type(rec).__name__}", line)
    unknown = sorted(set(rec) - set(FIELDS) - set(ALIGNED_FIELDS))
    if unknown:
        raise PairFileError(path, f"unknown field(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(FIELDS)} "
                            "(put extra information under \"meta\")", line)
    for key in ("clean", "corrupt"):
        if key not in rec:
            raise PairFileError(path, f"missing field {key!r}", line)
    for key in ("id", "clean", "corrupt", "category", "source"):
        if key in rec and not isinstance(rec[key], str):
            raise PairFileError(path, f"field {key!r} must be a string, got {type(rec[key]).__name__}", line)
    meta = rec.get("meta", {})
    if meta is None:
        meta = {}
    if not isinstance(meta, dict):
        raise PairFileError(path, f"field 'meta' must be an object, got {type(meta).__name__}", line)
    strings = [rec[k] for k in ("id", "clean", "corrupt", "category", "source") if k in rec]
    if (meta or not all(v.isascii() for v in strings)) and not is_text(rec):
        raise PairFileError(path, f"the record {NOT_TEXT}", line)
    category = rec.get("category") or defaults.get("category", "uncategorized")
    design = design_fields(rec, lambda why: PairFileError(path, why, line))
    return MinimalPair(
        id=rec.get("id") or pair_id(rec["clean"], rec["corrupt"], category),
        clean=rec["clean"],
        corrupt=rec["corrupt"],
        category=category,
        source=rec.get("source") or defaults.get("source", "user"),
        meta=meta,
        **design,
    )


def design_fields(rec: dict[str, Any], fail) -> dict[str, Any]:
    """The design fields of a record (JSON values, or CSV strings where empty means absent), checked;
    ``fail(why)`` makes the exception to raise."""
    out: dict[str, Any] = {}
    for key in DESIGN_FIELDS:
        v = rec.get(key)
        if v is None or v == "":
            continue
        if key == "detect":
            if isinstance(v, str) and v.strip().isdigit():
                v = int(v.strip())
            if type(v) is not int or v < 0:
                raise fail(f"field 'detect' must be a word index (an integer >= 0), got {v!r}")
        elif not isinstance(v, str):
            raise fail(f"field {key!r} must be a string, got {type(v).__name__}")
        elif key == "twin_kind" and v not in TWIN_KINDS:
            raise fail(f"field 'twin_kind' must be one of {', '.join(TWIN_KINDS)}, got {v!r}")
        elif key == "typo_kind" and v not in TYPO_KINDS:
            raise fail(f"field 'typo_kind' must be one of {', '.join(TYPO_KINDS)}, got {v!r}")
        out[key] = v
    if out.get("role") == "twin" and "twin_kind" not in out:
        raise fail("a twin (role 'twin') needs 'twin_kind': neutral or acceptable")
    return out


def load_jsonl(path: str | os.PathLike, *, source: str | None = None) -> list[MinimalPair]:
    path = Path(path)
    text = read_text(path)
    out: list[tuple[int, MinimalPair]] = []
    defaults = {"source": source or "user"}
    for i, _, rec in iter_jsonl(path, text):
        out.append((i, pair_from_record(rec, path, i, defaults)))
    return _check_unique(path, out)


def _check_unique(path: Path, items: list[tuple[int, MinimalPair]]) -> list[MinimalPair]:
    seen: dict[str, int] = {}
    for line, p in items:
        if p.id in seen:
            raise PairFileError(path, f"duplicate pair id {p.id!r} (first at line {seen[p.id]}); "
                                "give each pair its own id or remove the repeat", line)
        seen[p.id] = line
    return [p for _, p in items]


def load_csv(
    path: str | os.PathLike,
    *,
    clean_col: str = "clean",
    corrupt_col: str = "corrupt",
    category_col: str | None = "category",
    id_col: str | None = "id",
    source: str | None = None,
    delimiter: str | None = None,
) -> list[MinimalPair]:
    path = Path(path)
    text = read_text(path)
    if delimiter is None:
        delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        cols = reader.fieldnames or []
    except csv.Error as e:  # e.g. a field longer than the csv module's limit
        raise PairFileError(path, f"not readable as CSV ({e})", reader.line_num + 1) from None
    for need, flag in ((clean_col, "--clean-col"), (corrupt_col, "--corrupt-col")):
        if need not in cols:
            raise PairFileError(path, f"no column {need!r} (columns: {', '.join(cols)}); choose one with {flag}", 1)
    out: list[tuple[int, MinimalPair]] = []
    line = 1
    rows = iter(reader)
    while True:
        try:
            row = next(rows)
        except StopIteration:
            break
        except csv.Error as e:
            # line_num counts the lines read *before* the one that failed
            raise PairFileError(path, f"not readable as CSV ({e})", reader.line_num + 1) from None
        line = reader.line_num
        if None in row:
            raise PairFileError(path, f"row has more fields than the header's {len(cols)}", line)
        if all((v or "").strip() == "" for v in row.values()):
            continue
        clean, corrupt = row.get(clean_col), row.get(corrupt_col)
        if clean is None or corrupt is None:
            raise PairFileError(path, "row has fewer fields than the header", line)
        category = (row.get(category_col) if category_col else None) or "uncategorized"
        pid = (row.get(id_col) if id_col else None) or pair_id(clean, corrupt, category)
        design = design_fields(row, lambda why, line=line: PairFileError(path, why, line))
        taken = {clean_col, corrupt_col, category_col, id_col, *DESIGN_FIELDS}
        meta = {k: v for k, v in row.items() if k not in taken}
        out.append((line, MinimalPair(pid, clean, corrupt, category, source or "csv", meta, **design)))
    if not out:
        raise PairFileError(path, "no rows under the header; it needs at least one pair")
    return _check_unique(path, out)


def load_study_json(path: str | os.PathLike, *, source: str | None = None) -> list[MinimalPair]:
    """The original study's format: ``{"metadata", "diff_token_type": {type: {subtype: {"sentence_pairs": [...]}}}}``."""
    path = Path(path)
    text = read_text(path)
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise PairFileError(path, f"invalid JSON ({e.msg}, column {e.colno})", e.lineno) from None
    if "\\u" in text and not is_text(doc):
        raise PairFileError(path, f"the document {NOT_TEXT}")
    if isinstance(doc, list):  # a plain JSON list of pair records
        items = [(i + 1, pair_from_record(r, path, i + 1, {"source": source or "user"})) for i, r in enumerate(doc)]
        if not items:
            raise PairFileError(path, "the list is empty; it needs at least one pair")
        return _check_unique(path, items)
    if not isinstance(doc, dict) or not isinstance(doc.get("diff_token_type"), dict):
        raise PairFileError(path, "expected the study format {\"diff_token_type\": {type: {subtype: "
                            "{\"sentence_pairs\": [...]}}}} or a list of pair records")
    out: list[tuple[int, MinimalPair]] = []
    n = 0
    for typ, subs in doc["diff_token_type"].items():
        if not isinstance(subs, dict):
            raise PairFileError(path, f"diff_token_type.{_key(typ)} must be an object of subtypes")
        for sub, body in subs.items():
            where = f"diff_token_type.{_key(typ)}.{_key(sub)}"
            sp = body.get("sentence_pairs") if isinstance(body, dict) else None
            if not isinstance(sp, list):
                raise PairFileError(path, f"{where}: missing list 'sentence_pairs'")
            for j, rec in enumerate(sp):
                n += 1
                if not isinstance(rec, dict) or not isinstance(rec.get("sentence1"), str) \
                        or not isinstance(rec.get("sentence2"), str):
                    raise PairFileError(path, f"{where}.sentence_pairs[{j}]: needs string fields "
                                        "'sentence1' and 'sentence2'")
                cat = f"{typ}/{sub}"
                extra = {k: v for k, v in rec.items() if k not in ("sentence1", "sentence2")}
                p = MinimalPair(pair_id(rec["sentence1"], rec["sentence2"], cat), rec["sentence1"],
                                rec["sentence2"], cat, source or "study-json", extra)
                out.append((n, p))
    if not out:
        raise PairFileError(path, "no sentence pairs found")
    return _check_unique(path, out)


def _key(k: str) -> str:
    """A JSON key as shown in a one-line message (quoted when it holds line breaks or other controls)."""
    return k if k.isprintable() else json.dumps(k)


def load_pairs(path: str | os.PathLike, fmt: str | None = None, **kwargs: Any) -> list[MinimalPair]:
    """Load pairs from JSONL (default), CSV/TSV or the study's JSON format, by suffix or ``fmt``."""
    path = Path(path)
    fmt = fmt or {".csv": "csv", ".tsv": "csv", ".json": "json"}.get(path.suffix.lower(), "jsonl")
    if fmt == "jsonl":
        return load_jsonl(path, **kwargs)
    if fmt == "csv":
        return load_csv(path, **kwargs)
    if fmt == "json":
        return load_study_json(path, **kwargs)
    raise EclensError(f"unknown pairs format {fmt!r}: use jsonl, csv or json")


def load_aligned(path: str | os.PathLike) -> list[AlignedPair]:
    """Read a ``pairs.jsonl`` written by :func:`write_aligned` (ids and position included)."""
    path = Path(path)
    text = read_text(path)
    out: list[AlignedPair] = []
    seen: dict[str, int] = {}
    def bad_json(e: json.JSONDecodeError) -> str:
        return f"not an aligned pair record ({type(e).__name__}: {e}); re-create it with `ec pairs check`"

    for i, _, d in iter_jsonl(path, text, bad_json):
        try:
            a = aligned_from_dict(d, lambda why: ValueError(why))
            why = _aligned_problem(a) or (None if is_text(d) else NOT_TEXT)
        except (KeyError, TypeError, ValueError) as e:
            why = f"{type(e).__name__}: {e}"
        if why is None and a.id in seen:
            why = f"duplicate pair id {a.id!r} (first at line {seen[a.id]})"
        if why is not None:
            raise PairFileError(path, f"not an aligned pair record ({why}); re-create it with `ec pairs check`",
                                i) from None
        seen[a.id] = i
        out.append(a)
    return out


def aligned_from_dict(d: dict[str, Any], fail=lambda why: ValueError(why)) -> AlignedPair:
    """An :class:`AlignedPair` from its ``to_dict`` (records written before span mode and designs included)."""
    pair = MinimalPair(d["id"], d["clean"], d["corrupt"], d.get("category", "uncategorized"),
                       d.get("source", "user"), d.get("meta") or {}, **design_fields(d, fail))
    return AlignedPair(pair, d["clean_ids"], d["corrupt_ids"], d["position"], d["clean_token"], d["corrupt_token"],
                       d.get("mode", "single"), d.get("clean_end"), d.get("corrupt_end"), d.get("detect_position"))


def _aligned_problem(a: AlignedPair) -> str | None:
    """What is wrong with an aligned record read from disk (later steps index tensors with it), or None."""
    p = a.pair
    for name in ("id", "clean", "corrupt", "category", "source"):
        if not isinstance(getattr(p, name), str):
            return f"{name!r} must be a string"
    if not isinstance(p.meta, dict):
        return "'meta' must be an object"
    if not isinstance(a.clean_token, str) or not isinstance(a.corrupt_token, str):
        return "'clean_token' and 'corrupt_token' must be strings"
    ids = (a.clean_ids, a.corrupt_ids)
    if not all(isinstance(x, list) and all(type(t) is int and t >= 0 for t in x) for x in ids):
        return "'clean_ids' and 'corrupt_ids' must be lists of token ids"
    if a.detect_position is not None and (type(a.detect_position) is not int
                                          or not 0 <= a.detect_position < len(a.corrupt_ids)):
        return f"'detect_position' must be a token index below {len(a.corrupt_ids)}"
    if a.mode == "span":
        from .spans import Span, diff_span

        ends = (a.clean_end, a.corrupt_end)
        if not all(type(e) is int for e in ends):
            return "a span record needs integer 'clean_end' and 'corrupt_end'"
        if diff_span(a.clean_ids, a.corrupt_ids) != Span(a.position, a.clean_end, a.corrupt_end):
            return "the token ids must differ in [position, clean_end) / [position, corrupt_end) and nowhere else"
        return None
    if a.mode != "single":
        return f"'mode' must be one of {', '.join(MODES)}, got {a.mode!r}"
    if not a.clean_ids or len(a.clean_ids) != len(a.corrupt_ids):
        return "'clean_ids' and 'corrupt_ids' must have the same, non-zero length"
    if type(a.position) is not int or not 0 <= a.position < len(a.clean_ids):
        return f"'position' must be a token index below {len(a.clean_ids)}"
    if [i for i, (x, y) in enumerate(zip(a.clean_ids, a.corrupt_ids)) if x != y] != [a.position]:
        return "the token ids must differ at 'position' and nowhere else"
    return None


def write_jsonl(path: str | os.PathLike, records: Iterable[Any]) -> Path:
    """Write records (dataclasses with ``to_dict`` or dicts) as JSONL, atomically."""
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        for r in records:
            d = r.to_dict() if hasattr(r, "to_dict") else r
            fh.write(json.dumps(d, ensure_ascii=False) + "\n")
    return path


write_pairs = write_jsonl
write_aligned = write_jsonl


# ------------------------------------------------------------------------- alignment


def encode(tokenizer, text: str, prepend_bos: bool = False) -> list[int]:
    """Token ids as the model sees them: no special tokens, plus BOS if the model prepends one."""
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if prepend_bos and tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id, *ids]
    return ids


def token_strings(tokenizer, ids: Sequence[int]) -> list[str]:
    return [tokenizer.decode([int(i)]) for i in ids]


def align(
    pair: MinimalPair,
    tokenizer,
    *,
    prepend_bos: bool = False,
    max_len: int | None = None,
    mode: str = "single",
) -> AlignedPair | Rejection:
    """Align one pair under ``tokenizer``: the changed position (or span), or a rejection.

    ``mode="single"`` (default) accepts one differing token in sequences of equal length;
    ``mode="span"`` also accepts one contiguous differing span whose lengths may differ
    (a pair that is a single-token change is still returned as ``mode == "single"``).
    The record's ``detect`` word is converted to ``detect_position`` under ``tokenizer``.
    """
    if mode not in MODES:
        raise EclensError(f"unknown alignment mode {mode!r}: use {' or '.join(MODES)}")
    for name, text in (("clean", pair.clean), ("corrupt", pair.corrupt)):
        if not isinstance(text, str):
            raise EclensError(f"pair {pair.id!r}: {name} must be a string, got {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise EclensError(f"pair {pair.id!r}: {name} {NOT_TEXT}") from None
    if not pair.clean.strip() or not pair.corrupt.strip():
        return Rejection(pair, "empty")
    if pair.clean == pair.corrupt:
        return Rejection(pair, "identical")
    a = encode(tokenizer, pair.clean, prepend_bos)
    b = encode(tokenizer, pair.corrupt, prepend_bos)
    if max_len is not None and max(len(a), len(b)) > max_len:
        return Rejection(pair, "too_long", max(len(a), len(b)))
    if mode == "span":
        from .spans import diff_span

        sp = diff_span(a, b)
        if isinstance(sp, str):
            return Rejection(pair, sp, len(b) - len(a), token_strings(tokenizer, a), token_strings(tokenizer, b))
        single = sp.clean_end - sp.start == 1 and sp.corrupt_end - sp.start == 1
        out = AlignedPair(pair, a, b, sp.start, tokenizer.decode(a[sp.start:sp.clean_end]),
                          tokenizer.decode(b[sp.start:sp.corrupt_end]), "single" if single else "span",
                          sp.clean_end, sp.corrupt_end)
        return _with_detect(out, tokenizer, prepend_bos)
    if len(a) != len(b):
        return Rejection(pair, "different_length", len(b) - len(a), token_strings(tokenizer, a),
                         token_strings(tokenizer, b))
    diffs = [i for i, (x, y) in enumerate(zip(a, b)) if x != y]
    if not diffs:
        return Rejection(pair, "identical")
    if len(diffs) > 1:
        return Rejection(pair, "multiple_differences", len(diffs), token_strings(tokenizer, a),
                         token_strings(tokenizer, b))
    p = diffs[0]
    return _with_detect(AlignedPair(pair, a, b, p, tokenizer.decode([a[p]]), tokenizer.decode([b[p]])), tokenizer,
                        prepend_bos)


def _changed_word(clean: str, corrupt: str) -> int:
    """The index of the word of ``corrupt`` holding its first character that differs from ``clean``."""
    i = next((k for k, (x, y) in enumerate(zip(clean, corrupt)) if x != y), min(len(clean), len(corrupt)))
    return len(corrupt[:i].split()) - (0 if i == 0 or corrupt[i - 1].isspace() else 1)


def _with_detect(a: AlignedPair, tokenizer, prepend_bos: bool) -> AlignedPair | Rejection:
    """Fill ``detect_position`` from the record's ``detect`` word; a detect word before the change or past the
    sentence is a rejection (``bad_detect``), not a silent ``p``."""
    d = a.pair.detect
    if d is None:
        return a
    from .spans import char_token, word_char

    try:
        t = char_token(tokenizer, a.pair.corrupt, word_char(a.pair.corrupt, d), prepend_bos)
    except IndexError:
        return Rejection(a.pair, "bad_detect", d)
    if not a.corrupt_end - 1 <= t < len(a.corrupt_ids):
        # The changed word itself (its first token may be shared, " store" in " store"+"s") means the
        # change's last token.
        if a.position <= t < a.corrupt_end or d == _changed_word(a.pair.clean, a.pair.corrupt):
            t = a.corrupt_end - 1
        else:
            return Rejection(a.pair, "bad_detect", d)
    a.detect_position = t
    return a


@dataclass
class CheckResult:
    valid: list[AlignedPair]
    rejected: list[Rejection]

    @property
    def n_total(self) -> int:
        return len(self.valid) + len(self.rejected)

    def by_category(self):
        import pandas as pd

        rows: dict[str, Counter] = {}
        for a in self.valid:
            rows.setdefault(a.category, Counter())["valid"] += 1
        for r in self.rejected:
            rows.setdefault(r.pair.category, Counter())[r.reason] += 1
        df = pd.DataFrame.from_dict(rows, orient="index").fillna(0).astype(int)
        extra = [r for r in SPAN_REASONS if r in df.columns]  # span mode's reasons, when any occurred
        spans = sum(a.mode == "span" for a in self.valid)
        for col in ("valid", *REASONS):
            if col not in df.columns:
                df[col] = 0
        df = df[["valid", *REASONS, *extra]]
        if spans:
            df.insert(1, "span", pd.Series({c: sum(a.mode == "span" for a in self.valid if a.category == c)
                                            for c in df.index}).reindex(df.index).fillna(0).astype(int))
        df.insert(0, "total", df.sum(axis=1))
        df.index.name = "category"
        return df.sort_index().reset_index()

    def by_reason(self) -> dict[str, int]:
        c = Counter(r.reason for r in self.rejected)
        return {k: c.get(k, 0) for k in (*REASONS, *SPAN_REASONS) if k in REASONS or c.get(k)}

    def none_valid_error(self, source: str | os.PathLike) -> PairFileError:
        """The one-line error of a step that found no valid pair in ``source`` (raised before it writes anything)."""
        why = ", ".join(f"{k} {v}" for k, v in self.by_reason().items() if v) or "no pairs"
        return PairFileError(source, f"none of the {self.n_total} pairs is a single-token change under this model's "
                             f"tokenizer ({why}); nothing written: see `ec pairs check {source}`")


def check_pairs(
    pairs: Sequence[MinimalPair],
    tokenizer,
    *,
    prepend_bos: bool = False,
    max_len: int | None = None,
    mode: str = "single",
) -> CheckResult:
    valid, rejected = [], []
    for p in pairs:
        r = align(p, tokenizer, prepend_bos=prepend_bos, max_len=max_len, mode=mode)
        (valid if isinstance(r, AlignedPair) else rejected).append(r)
    return CheckResult(valid, rejected)


def check_with_model(pairs: Sequence[MinimalPair], model, mode: str = "single") -> CheckResult:
    """:func:`check_pairs` with the model's tokenizer, BOS setting and context length."""
    return check_pairs(pairs, model.tokenizer, prepend_bos=bool(model.cfg.default_prepend_bos),
                       max_len=int(model.cfg.n_ctx), mode=mode)
