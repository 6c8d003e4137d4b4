"""Choosing candidate sets on one half of the clusters and testing them on the other (issue 19).

``--split SEED`` puts each cluster in half A or B (:func:`eclens.bootstrap.split_half`, a hash of the
cluster id and the seed: the same in every process and rerun). Candidate sets are chosen from a diff of
half A's error pairs and tested on half B's, so a set cannot be significant merely because the pairs it
was chosen on are the pairs it is tested on. A set given by hand was chosen on no pairs: it is tested on
all of them.

**Where half A's statistics come from.** A second streaming pass over half A's *error* pairs
(:func:`select_half`). The run's diff also keeps its accumulators per (category, swap direction, half) state
row (:meth:`eclens.diff.DiffResult.for_half`, equal to a diff of half A alone: ``tests/test_selection.py``),
but those rows are not kept per role: their pooled rows mix half A's twins and comparison pairs with its
errors, so they cannot choose sets meant to describe errors (and ranking every category's rows cost ~800 s
and 5 GB on the default run, against ~150 s for the second pass).

Sets of one swap direction (a label ``.../{kind}[{direction}]/k{n}``, :func:`eclens.steps.choose_sets`) were
chosen on that direction's pairs: :func:`set_direction` reads it so the dims step tests each such set on the
held-out pairs of its own direction only.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from .bootstrap import split_half
from .errors import EclensError
from .pairs import AlignedPair
from .roles import cluster_of, is_error_of

STAT_COLUMNS = ["hook", "layer", "offset", "dim", "sigma_clean", "absz_median", "absz_q90", "massive"]


def halves(pairs: Sequence[AlignedPair], seed: int) -> tuple[list[AlignedPair], list[AlignedPair]]:
    """``(A, B)``: the pairs whose cluster falls in half 0 and in half 1 for ``seed``."""
    a = [p for p in pairs if split_half(cluster_of(p), seed) == 0]
    b = [p for p in pairs if split_half(cluster_of(p), seed) == 1]
    return a, b


def select_half(model, pairs_a: Sequence[AlignedPair], config=None, batch_size: int = 16, progress: bool = False):
    """The diff of half A's error pairs (twins and 2x2 cells are comparisons, not what candidates describe)."""
    from .diff import DiffConfig, run_diff

    errors = [p for p in pairs_a if is_error_of(p)]
    if not errors:
        raise EclensError("--split: the selection half has no error pairs; use more pairs or another --split seed")
    return run_diff(model, errors, batch_size=batch_size, progress=progress, config=config or DiffConfig())


_DIRECTION = re.compile(r"/[^/\[]+\[([^\]]+)\]/k\d+$")


def set_direction(s) -> str | None:
    """The swap direction a set was chosen on (its label ``.../{kind}[{direction}]/k{n}``), else ``None``."""
    m = _DIRECTION.search(str(getattr(s, "label", "") or ""))
    return m.group(1) if m and m.group(1) != "all" else None  # "[all]": chosen on the pooled rows


def set_cells(stats: pd.DataFrame, sets: Sequence) -> dict[str, pd.DataFrame]:
    """Per set label, the rows of ``stats`` (one per dim) at the set's hook, layer and offset."""
    out = {}
    if stats is None or stats.empty:
        return out
    for s in sets:
        cell = stats[(stats["hook"] == s.hook) & (stats["layer"] == s.layer) & (stats["offset"] == s.offset)]
        if "category" in cell.columns:
            cell = cell[cell["category"] == "all"]
        out[s.label] = cell.reset_index(drop=True)
    return out


def run_stats(run: str | Path, sets: Sequence) -> dict[str, pd.DataFrame]:
    """:func:`set_cells` from the run's ``dims.parquet`` (the statistics over every pair), if there is one."""
    path = Path(run) / "dims.parquet"
    if not path.exists() or not sets:
        return {}
    import pyarrow.parquet as pq

    cols = [c for c in [*STAT_COLUMNS, "category"] if c in pq.read_schema(path).names]
    hooks = sorted({s.hook for s in sets})
    t = pq.read_table(path, columns=cols, filters=[("hook", "in", hooks)]).to_pandas()
    return set_cells(t, sets)


__all__ = ["halves", "run_stats", "select_half", "set_cells", "set_direction"]
