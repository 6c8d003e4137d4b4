"""How a pairs file is designed: twins and their partners, clusters, roles, swap directions.

The glossary is in DESIGN.md ("Method, second edition"). This module reads only the
records' design fields (:data:`eclens.pairs.DESIGN_FIELDS`); it needs no tokenizer.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from .pairs import MinimalPair


def is_error(p: MinimalPair) -> bool:
    """Whether a record is an error pair: role ``error``, or a 2x2 cell the record marks as an error."""
    return p.role == "error" or (p.role not in (None, "twin") and bool(p.meta.get("cell_error")))


@dataclass
class DesignReport:
    n_pairs: int
    n_clusters: int
    cluster_sizes: dict[int, int]  # cluster size -> how many clusters have it
    roles: dict[str, int]
    twin_kinds: dict[str, int]
    twins_without_partner: list[str] = field(default_factory=list)  # twin ids whose twin_of is not in the file
    errors_without_twin: list[str] = field(default_factory=list)  # error ids no twin points at
    swap_directions: dict[str, dict[str, int]] = field(default_factory=dict)  # category -> direction -> count
    sources_without_twins: list[str] = field(default_factory=list)

    @property
    def has_twins(self) -> bool:
        return bool(self.twin_kinds)

    def lines(self) -> list[str]:
        """The report as short lines for a terminal."""
        sizes = ", ".join(f"{n} of size {k}" for k, n in sorted(self.cluster_sizes.items())[:4])
        if len(self.cluster_sizes) > 4:
            big = [k for k in self.cluster_sizes if k > sorted(self.cluster_sizes)[3]]
            sizes += f", {sum(self.cluster_sizes[k] for k in big)} larger (up to {max(big)})"
        out = [f"{self.n_pairs} pairs in {self.n_clusters} clusters ({sizes})"]
        if self.roles:
            out.append("roles: " + ", ".join(f"{k} {v}" for k, v in sorted(self.roles.items())))
        if self.has_twins:
            out.append("twins: " + ", ".join(f"{k} {v}" for k, v in sorted(self.twin_kinds.items()))
                       + f"; {len(self.twins_without_partner)} without a partner in the file"
                       + (f" (first: {self.twins_without_partner[0]})" if self.twins_without_partner else "")
                       + f"; {len(self.errors_without_twin)} error pairs without a twin")
        else:
            out.append("no twins in this file: error pairs cannot be compared with acceptable changes of the "
                       "same word (templates and codespell sources make them)")
        for src in self.sources_without_twins:
            out.append(f"source {src!r} has no twins (it has none to give: e.g. BLiMP pairs only errors)")
        for cat, dirs in sorted(self.swap_directions.items()):
            total = sum(dirs.values())
            shares = ", ".join(f"{d} {n} ({n / total:.0%})" for d, n in sorted(dirs.items()))
            out.append(f"swap direction {cat}: {shares}")
        return out


def design_report(pairs: Sequence[MinimalPair]) -> DesignReport:
    ids = {p.id for p in pairs}
    clusters = Counter(p.cluster_id for p in pairs)
    twinned = {p.twin_of for p in pairs if p.is_twin}
    swaps: dict[str, Counter] = {}
    for p in pairs:
        if p.swap_direction and not p.is_twin:
            swaps.setdefault(p.category, Counter())[p.swap_direction] += 1
    by_source: dict[str, bool] = {}
    for p in pairs:
        by_source[p.source] = by_source.get(p.source, False) or p.is_twin
    any_twins = any(by_source.values())
    return DesignReport(
        n_pairs=len(pairs),
        n_clusters=len(clusters),
        cluster_sizes=dict(sorted(Counter(clusters.values()).items())),
        roles=dict(Counter(p.role for p in pairs if p.role)),
        twin_kinds=dict(Counter(p.twin_kind for p in pairs if p.is_twin)),
        twins_without_partner=[p.id for p in pairs if p.is_twin and p.twin_of not in ids],
        errors_without_twin=[p.id for p in pairs if is_error(p) and p.id not in twinned] if any_twins else [],
        swap_directions={c: dict(v) for c, v in swaps.items()},
        sources_without_twins=sorted(s for s, has in by_source.items() if not has and any_twins or s == "blimp"),
    )
