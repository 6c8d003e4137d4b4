"""What determines a diff run's numbers: :class:`DiffConfig`, the file names, the category rows."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from ..errors import EclensError
from ..pairs import AlignedPair

STATS_FILE = "diff_stats.safetensors"
META_KEY = "eclens_diff"


QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)


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

    @property
    def offsets(self) -> list[int]:
        return list(range(self.max_offset + 1)) + ([-1] if self.include_last else [])

    def numbers_key(self) -> dict:
        """The fields a resumed run must share with the checkpoint."""
        return {k: getattr(self, k) for k in ("hooks", "max_offset", "include_last", "categories", "by_category",
                                              "sample_size", "seed")}

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
