"""Import minimal pairs from a CSV/TSV file with user-named columns.

A thin layer over :func:`eclens.pairs.load_csv` that first checks every column
the user named is in the header (a typo in ``--category-col`` would otherwise
file every pair under ``uncategorized``) and reports single-token yield per category.
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

from ..errors import PairFileError
from ..pairs import MinimalPair, check_pairs, load_csv, read_text


def csv_header(path: str | os.PathLike, delimiter: str | None = None) -> list[str]:
    path = Path(path)
    text = read_text(path)
    if delimiter is None:
        delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    try:
        header = next(csv.reader(io.StringIO(text, newline=""), delimiter=delimiter), [])
    except csv.Error as e:  # e.g. a field longer than the csv module's limit
        raise PairFileError(path, f"not readable as CSV ({e})", 1) from None
    if not any(h.strip() for h in header):
        raise PairFileError(path, "no header row; the first line must name the columns", 1)
    return header


def import_csv(
    path: str | os.PathLike,
    *,
    clean_col: str = "clean",
    corrupt_col: str = "corrupt",
    category_col: str | None = None,
    id_col: str | None = None,
    category: str | None = None,
    source: str = "csv",
    delimiter: str | None = None,
    tokenizer=None,
    prepend_bos: bool = False,
    only_valid: bool = False,
) -> tuple[list[MinimalPair], object]:
    """Pairs from ``path`` and, with a tokenizer, a per-category check table (else ``None``).

    ``category_col``/``id_col`` default to the columns ``category``/``id`` when the header
    has them; ``category`` names the category of rows without one. Other columns go to
    ``meta``. With ``only_valid`` only single-token pairs are returned.
    """
    path = Path(path)
    header = csv_header(path, delimiter)
    for col, flag in ((clean_col, "--clean-col"), (corrupt_col, "--corrupt-col"), (category_col, "--category-col"),
                      (id_col, "--id-col")):
        if col is not None and col not in header:
            raise PairFileError(path, f"no column {col!r} (columns: {', '.join(header)}); choose one with {flag}", 1)
    if category_col is None and "category" in header:
        category_col = "category"
    if id_col is None and "id" in header:
        id_col = "id"
    pairs = load_csv(path, clean_col=clean_col, corrupt_col=corrupt_col, category_col=category_col, id_col=id_col,
                     source=source, delimiter=delimiter)
    if category:
        for p in pairs:
            if p.category == "uncategorized":
                p.category = category
    if tokenizer is None:
        return pairs, None
    res = check_pairs(pairs, tokenizer, prepend_bos=prepend_bos)
    if only_valid:
        pairs = [a.pair for a in res.valid]
    return pairs, res.by_category()
