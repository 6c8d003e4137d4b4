"""What determines a diff run's numbers: :class:`DiffConfig`, the file names, the category rows."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from ..errors import EclensError
from ..pairs import AlignedPair
from ..roles import swap_direction_of

STATS_FILE = "state/diff_stats.safetensors"  # RUN/state: what only a resume or a merge reads (eclens.state)
META_KEY = "eclens_diff"


QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)
ANCHORS = ("p", "detect")
# Threshold sensitivity (sensitivity.csv): candidate counts over these values of each rule's threshold.
THRESHOLD_GRID = (0.025, 0.05, 0.1, 0.2, 0.4)
RESPONSIVE_Z_GRID = (0.25, 0.5, 1.0, 2.0, 4.0)
RESPONSIVE_SIGN_GRID = (0.6, 0.7, 0.8, 0.9, 1.0)
ALL = "all"
NO_DIRECTION = "none"  # the swap direction of a pair whose record names none


def position_kind(offset: int) -> str:
    return "changed" if offset == 0 else "last" if offset < 0 else "after"




@dataclass
class DiffConfig:
    """Everything that determines the numbers (stored in the stats file; a resume must match).

    As ``run_diff(config=...)``: ``hooks`` may be a spec (``None``: the default hooks, a string, globs)
    and ``categories`` ``[]`` means "group by ``by_category``"; the result's config holds them resolved."""

    hooks: list[str] | str | None = None
    max_offset: int = 3
    include_last: bool = True
    categories: list[str] = field(default_factory=list)  # state rows; [] = one row, "all" only
    by_category: str = "full"  # full | top | none
    sample_size: int = 512
    seed: int = 0
    threshold: float = 0.1
    stable_frac: float = 0.9
    responsive_z: float = 1.0
    responsive_sign: float = 0.8
    massive_ratio: float = 100.0
    min_pairs: int = 10
    max_candidates: int = 50
    min_group: int = 5
    contrast_offsets: list[int] = field(default_factory=lambda: [0])
    alpha: float = 0.05
    # Where offset 0 sits: the changed token ``p`` or the token where the error becomes detectable (roles.detect_of).
    anchor: str = "p"
    # The state rows' (category, swap direction) cells, each split into two halves of the clusters
    # (bootstrap.split_half(cluster, seed)); resolved from the pairs (resolve_cells), shared by shards.
    cells: list[list[str]] = field(default_factory=list)
    n_boot: int = 1000  # cluster-bootstrap replicates (layer-level intervals, contrasts)
    n_perm: int = 1000  # label permutations across clusters (contrasts)

    def __post_init__(self) -> None:
        if self.anchor not in ANCHORS:
            raise EclensError(f"unknown anchor {self.anchor!r}: use p or detect")

    @property
    def offsets(self) -> list[int]:
        return list(range(self.max_offset + 1)) + ([-1] if self.include_last else [])

    def numbers_key(self) -> dict:
        """The fields a resumed run must share with the checkpoint."""
        return {k: getattr(self, k) for k in ("hooks", "max_offset", "include_last", "categories", "by_category",
                                              "sample_size", "seed", "anchor", "cells")}

    @property
    def rows(self) -> list[tuple[str, str, int]]:
        """The state rows ``(category, swap direction, half)``: each cell's half 0 then half 1. A config
        without cells (a stats file written before them) has one row per category, halves unknown (-1)."""
        if not self.cells:
            return [(c, NO_DIRECTION, -1) for c in (self.categories or [ALL])]
        return [(c, d, h) for c, d in self.cells for h in (0, 1)]

    def category_of(self, cat: str) -> str:
        if self.by_category == "top":
            return cat.split("/", 1)[0]
        return cat


def resolve_categories(pairs: Sequence[AlignedPair], by_category: str | bool | Sequence[str]) -> tuple[str, list[str]]:
    """``(grouping, category labels)``; a list of labels fixes the rows (shards of one dataset must share them)."""
    if isinstance(by_category, (list, tuple)):
        labels = sorted(set(by_category))
        by = "top" if labels and all("/" not in c for c in labels) and any("/" in a.category for a in pairs) \
            else "full"
        key = (lambda c: c.split("/", 1)[0]) if by == "top" else (lambda c: c)
        missing = sorted({key(a.category) for a in pairs} - set(labels))
        if missing:
            raise EclensError(f"category {missing[0]!r} of the pairs is not among the given categories")
        return by, labels
    by = {True: "full", False: "none"}.get(by_category, by_category) if isinstance(by_category, bool) else by_category
    if by not in ("full", "top", "none"):
        raise EclensError(f"unknown category grouping {by_category!r}: use full, top or none")
    if by == "none":
        return by, []
    key = (lambda c: c.split("/", 1)[0]) if by == "top" else (lambda c: c)
    return by, sorted({key(a.category) for a in pairs})


def pooled_rows(df):
    """The rows of a diff table that pool every swap direction (``swap_direction`` ``all``; tables written before
    the column existed are pooled throughout)."""
    if df is None or "swap_direction" not in df.columns:
        return df
    return df[df["swap_direction"].astype(str) == ALL]


def direction_label(a: AlignedPair) -> str:
    return swap_direction_of(a) or NO_DIRECTION


def resolve_cells(pairs: Sequence[AlignedPair], cfg: DiffConfig) -> list[list[str]]:
    """The sorted ``[category row, swap direction]`` cells the pairs occupy (category ``all`` without categories).
    Shards of one dataset must share them: resolve on the whole dataset, then shard."""
    def cat(a: AlignedPair) -> str:
        return cfg.category_of(a.category) if cfg.categories else ALL

    return [list(c) for c in sorted({(cat(a), direction_label(a)) for a in pairs})]


def anchor_position(a: AlignedPair, anchor: str) -> int:
    """The token position offset 0 stands for under ``anchor`` in the clean sentence (the changed one's is
    :func:`eclens.spans.side_anchor`; the same for a single-token pair)."""
    from ..spans import side_anchor

    return side_anchor(a, "clean", anchor)
