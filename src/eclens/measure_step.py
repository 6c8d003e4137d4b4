"""The ``measure`` step: error correction as a measured quantity, on a run's aligned pairs.

It chains the three measurements of DESIGN.md ("Method, second edition") over the pairs of a
run and writes them into the run folder (``docs/run-folder.md``):

- **recovery** (:mod:`eclens.recovery`): ``recovery.csv`` — one row per pair and position
  ``t = p..last`` (KL of the changed run and of both ignore runs against the clean run, and the
  clean next token's log-prob difference); this is the raw table every summary is computed
  from, so a reader can recompute any summary on a subset (``ec compare`` does, on the pairs
  valid in every run). ``recovery_pairs.csv`` (per pair: suffix log-prob differences, log KL
  decay), ``recovery_curves.csv`` (per category, run and offset after detect: median KL with a
  cluster-bootstrap interval) and ``recovery_index.csv`` (the headline table, tidy: per category
  one row per ``measure`` — the recovery index at each offset, and the ignore baseline's ``cost``
  and ``gap`` per ignore run — with ``estimate, low, high, n_clusters`` and a ``note``: the
  comparison the index used, or the verdict with its power statement);
- **selective invariance** (:mod:`eclens.invariance`): ``invariance.parquet`` (one row per
  reached cell), ``invariance_directions.csv``; the counts of error-invariant / error-specific
  cells beside the permutation null go into ``measure.json`` and ``summary.json``
  (``invariance_summary``);
- **error signal** (:mod:`eclens.probe`): ``probe.csv`` (per layer: CV accuracy with a cluster
  bootstrap interval, control task, permutation null, and the layer-0 check on every row).

Roles: a record's design role is mapped to what the measurements compare — ``error`` (role
``error`` or a 2x2 cell marked as an error, :func:`eclens.designs.is_error`; a record without
design fields is an error pair, as :func:`eclens.roles.role_of` says), ``twin``, and
``comparison`` (``meaning/*`` pairs without a role, and any other role). The original role is
kept in a ``design_role`` column. The probe reads the 2x2 error cells when the run has them
(the same tokens occur in both classes, so layer 0 must be at chance), else errors and twins.

Pairs without twins (files from before designs, BLiMP) cannot be measured this way: the step
says so in one line and writes every table with its header and no rows. Span-aligned pairs are
measured from their span end (offset 0, on each side its own position: :mod:`eclens.spans`).

Cost (embedded model, 2 CPU cores, the default ``ec run`` pairs): recovery is four forward
passes per pair (clean, changed, two ignore runs), invariance one pass of both sentences with
``B = 100`` Poisson replicate accumulators per cell, the probe one pass plus
``(2 + 2 n_permutations) x folds`` logistic regressions per layer; ``max_clusters`` bounds the
clusters per category (the README states the measured seconds).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd

from .bootstrap import BootstrapConfig
from .designs import is_error
from .errors import EclensError
from .interaction import COLUMNS as INTERACTION_COLUMNS
from .interaction import design_columns, headline_rows, interaction_table
from .invariance import InvarianceConfig, measure_invariance
from .pairs import AlignedPair
from .probe import ProbeConfig, items_from_pairs, layer0_check, probe_curve
from .recovery import RecoveryConfig, RecoveryResult, measure_recovery
from .runs import merge_json, record_step, write_json, write_table
from .steps import StepOutcome

FILES = ("recovery.csv", "recovery_pairs.csv", "recovery_curves.csv", "recovery_index.csv", "recovery_2x2.csv",
         "invariance.parquet", "invariance_directions.csv", "probe.csv", "measure.json")

# Every table's columns, so a step with nothing to measure still writes readable headers.
COLUMNS: dict[str, tuple[str, ...]] = {
    "recovery.csv": ("id", "category", "cluster", "role", "p", "detect", "length", "t", "offset", "t_changed", "last",
                     "kl_changed", "lp_changed", "kl_ignore_mean", "lp_ignore_mean", "kl_ignore_delete",
                     "lp_ignore_delete", "design_role"),
    "recovery_pairs.csv": ("id", "category", "cluster", "role", "p", "detect", "length", "suffix_changed",
                           "klmean_changed", "suffix_ignore_mean", "klmean_ignore_mean", "suffix_ignore_delete",
                           "klmean_ignore_delete", "kl0_changed", "kllast_changed", "kl0_ignore_mean",
                           "kllast_ignore_mean", "kl0_ignore_delete", "kllast_ignore_delete", "decay_last"),
    "recovery_curves.csv": ("category", "run", "offset", "kl_median", "low", "high", "n_clusters"),
    "recovery_index.csv": ("category", "measure", "offset", "estimate", "low", "high", "n_clusters", "note"),
    "recovery_2x2.csv": tuple(INTERACTION_COLUMNS),
    "invariance.parquet": ("hook", "layer", "offset", "unit", "err_absz", "twin_absz", "ratio", "low", "high",
                           "q_invariant", "q_specific", "class"),
    "invariance_directions.csv": ("hook", "layer", "offset", "split_half_cos", "heldout_projection",
                                  "norm_half_a", "norm_half_b"),
    "probe.csv": ("layer", "hook", "acc", "low", "high", "control_acc", "selectivity", "null_mean", "null_q95",
                  "p_perm", "majority", "n", "n_clusters", "items", "layer0_at_chance"),
}


@dataclass(frozen=True)
class MeasureConfig:
    """Settings of the measure step. ``max_clusters``: clusters per category (a deterministic hashed choice;
    ``None``: all). ``invariance`` / ``probe``: run them (recovery always runs)."""

    max_clusters: int | None = 10
    seed: int = 0
    invariance: bool = True
    probe: bool = True
    n_boot: int = 1000                   # full cluster bootstrap of the recovery summaries and probe accuracy
    n_permutations: int = 3              # invariance's permutation null (probe: 2x as many, they are cheap)
    max_offset: int = 4                  # recovery summaries: offsets 1..max_offset after detect, and the last
    invariance_offsets: tuple[int, ...] = (0, 1, -1)
    hooks: str = "hook_resid_post"
    batch_size: int = 16
    comparison: str = "meaning/*"

    def params(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    def recovery_cfg(self) -> RecoveryConfig:
        return RecoveryConfig(batch_size=self.batch_size, max_offset=self.max_offset, comparison=self.comparison,
                              boot=BootstrapConfig(n_boot=self.n_boot, seed=self.seed))

    def invariance_cfg(self) -> InvarianceConfig:
        return InvarianceConfig(hooks=self.hooks, offsets=tuple(self.invariance_offsets),
                                n_permutations=self.n_permutations, batch_size=self.batch_size, seed=self.seed)

    def probe_cfg(self) -> ProbeConfig:
        return ProbeConfig(n_permutations=2 * self.n_permutations, seed=self.seed, batch_size=2 * self.batch_size,
                           boot=BootstrapConfig(n_boot=self.n_boot, seed=self.seed))


# ----------------------------------------------------------------------------- roles


def measure_role(a: AlignedPair, comparison: str = "meaning/*") -> str:
    """What the measurements compare the pair as: ``error``, ``twin`` or ``comparison`` (module docstring)."""
    p = a.pair
    if p.is_twin:
        return "twin"
    if is_error(p):
        return "error"
    if p.role is None:  # no design fields: an error pair, unless its category is a comparison category
        return "comparison" if fnmatch.fnmatchcase(a.category, comparison) else "error"
    return "comparison"


def with_roles(pairs: Sequence[AlignedPair], comparison: str = "meaning/*") -> list[AlignedPair]:
    """The pairs with ``role`` set to :func:`measure_role` (the measurement modules read ``role``)."""
    return [replace(a, pair=replace(a.pair, role=measure_role(a, comparison))) for a in pairs]


def rec_pairs_design(pairs: Sequence[AlignedPair], chosen: Sequence[AlignedPair]) -> list[AlignedPair]:
    """The ``chosen`` pairs with their design roles back (the measurement roles replace them in ``with_roles``)."""
    by_id = {a.id: a for a in pairs}
    return [by_id.get(a.id, a) for a in chosen]


def choose_clusters(pairs: Sequence[AlignedPair], max_clusters: int | None, seed: int = 0) -> list[AlignedPair]:
    """At most ``max_clusters`` clusters per category, chosen by a hash of (seed, cluster): deterministic, and
    the same clusters whichever pairs a tokenizer rejected (so two models' runs keep the same frames)."""
    if max_clusters is None:
        return list(pairs)
    by_cat: dict[str, set[str]] = {}
    for a in pairs:
        by_cat.setdefault(a.category, set()).add(a.pair.cluster_id)

    def h(c: str) -> str:
        return hashlib.blake2b(f"{seed}:{c}".encode(), digest_size=8).hexdigest()

    keep = {cat: set(sorted(cs, key=h)[:max_clusters]) for cat, cs in by_cat.items()}
    return [a for a in pairs if a.pair.cluster_id in keep[a.category]]


# ----------------------------------------------------------------------------- result


@dataclass
class MeasureResult:
    tables: dict[str, pd.DataFrame]
    summary: dict
    recovery: RecoveryResult | None = None
    notes: list[str] = field(default_factory=list)

    def headline(self) -> str:
        return headline(self.summary)


def empty(name: str) -> pd.DataFrame:
    return pd.DataFrame(columns=list(COLUMNS[name]))


def index_table(rec: RecoveryResult) -> pd.DataFrame:
    """``recovery_index.csv``: the recovery index per category and offset, then the ignore baseline's cost and
    gap per category and ignore run (tidy: one row per category and measure)."""
    rows = []
    for r in rec.index.itertuples(index=False):
        rows.append({"category": r.category, "measure": "recovery_index", "offset": str(r.offset),
                     "estimate": r.index, "low": r.low, "high": r.high, "n_clusters": r.n_clusters,
                     "note": f"vs {r.comparison}"})
    for r in rec.ignore.itertuples(index=False):
        for what in ("cost", "gap"):
            rows.append({"category": r.category, "measure": f"{r.ignore}_{what}", "offset": "suffix",
                         "estimate": getattr(r, what), "low": getattr(r, f"{what}_low"),
                         "high": getattr(r, f"{what}_high"), "n_clusters": r.n_clusters,
                         "note": r.verdict if what == "gap" else
                         "clean minus ignore suffix log-prob of the clean continuation (what ignoring costs)"})
    return pd.DataFrame(rows, columns=list(COLUMNS["recovery_index.csv"])) if rows else empty("recovery_index.csv")


def _finite(x) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if np.isfinite(v) else None


def recovery_summary(rec: RecoveryResult) -> dict:
    """The headline numbers: index at the last token per category, the ignore verdicts."""
    last = rec.index[rec.index["offset"] == "last"]
    index = [{"category": r.category, "index": _finite(r.index), "low": _finite(r.low), "high": _finite(r.high),
              "n_clusters": int(r.n_clusters), "comparison": r.comparison} for r in last.itertuples(index=False)]
    ignore = [{"category": r.category, "ignore": r.ignore, "cost": _finite(r.cost), "cost_low": _finite(r.cost_low),
               "cost_high": _finite(r.cost_high), "gap": _finite(r.gap), "gap_low": _finite(r.gap_low),
               "gap_high": _finite(r.gap_high), "n_clusters": int(r.n_clusters), "verdict": r.verdict}
              for r in rec.ignore.itertuples(index=False)]
    return {"index_last": index, "ignore": ignore, "n_pairs": int(len(rec.pairs)),
            "n_clusters": int(rec.pairs["cluster"].nunique()), "kl_floor": rec.cfg.kl_floor,
            "level": rec.cfg.boot.level, "max_offset": rec.cfg.max_offset}


def _short(cat: str) -> str:
    return cat.split("/", 1)[1] if cat.startswith("grammar/") else cat


def headline(s: dict) -> str:
    """One line: the recovery index per category, the ignore verdicts, invariance counts vs null, the probe."""
    if s.get("status") == "empty":
        return s.get("note", "nothing measured")
    parts = []
    rec = s.get("recovery") or {}
    idx = [r for r in rec.get("index_last") or [] if r.get("index") is not None]
    if idx:
        parts.append("recovery index at the last token (< 0: errors fade faster than twins): " + ", ".join(
            f"{_short(r['category'])} {r['index']:+.2f} [{r['low']:+.2f}, {r['high']:+.2f}]"
            if r.get("low") is not None else f"{_short(r['category'])} {r['index']:+.2f}" for r in idx))
    i2 = [r for r in rec.get("interaction_2x2") or [] if r.get("estimate") is not None]
    if i2:
        parts.append("2x2 error effect on log KL decay to the last token (error vs twin, cluster effects, adjusted "
                     "for KL at detect): " + ", ".join(
                         f"{_short(r['category'])} {r['estimate']:+.2f} [{r['low']:+.2f}, {r['high']:+.2f}] "
                         f"p={r['p_perm']:.3g}" for r in i2))
    ign = [r for r in rec.get("ignore") or [] if r.get("ignore") == "ignore_mean"]
    if ign:
        n = len(ign)
        k = {w: sum(r["verdict"].startswith(w) for r in ign) for w in ("corrects", "no power", "no correction")}
        parts.append(f"ignore baseline (mean embedding): corrects in {k['corrects']}/{n} categories, no power in "
                     f"{k['no power']}, no correction in {k['no correction']}")
    inv = s.get("invariance_summary") or {}
    if inv.get("reached") is not None:
        parts.append(f"{inv['invariant']} error-invariant / {inv['specific']} error-specific of {inv['reached']} "
                     f"reached cells (permutation null {inv['null_invariant_mean']:.1f} / "
                     f"{inv['null_specific_mean']:.1f})")
    pr = s.get("probe") or {}
    if pr.get("peak_acc") is not None:
        parts.append(f"probe: peak {pr['peak_acc']:.2f} [{pr['peak_low']:.2f}, {pr['peak_high']:.2f}] at layer "
                     f"{pr['peak_layer']} (null 95 % {pr['peak_null_q95']:.2f}); layer 0 "
                     + ("at chance" if pr.get("at_chance") else "NOT at chance (token identity)"))
    for k in ("invariance_note", "probe_note"):
        if s.get(k):
            parts.append(s[k])
    return "; ".join(parts) if parts else "nothing measured"


# ----------------------------------------------------------------------------- the computation


def measure(model, pairs: Sequence[AlignedPair], cfg: MeasureConfig = MeasureConfig(), *,
            log=None, progress: bool = False) -> MeasureResult:
    """Recovery, selective invariance and the probe on ``pairs`` (see the module docstring)."""
    say = log or (lambda s: None)
    chosen = with_roles(choose_clusters(pairs, cfg.max_clusters, cfg.seed), cfg.comparison)
    design = {a.id: str(a.pair.role) for a in pairs}
    roles = [a.pair.role for a in chosen]
    n_err, n_twin = roles.count("error"), roles.count("twin")
    tables = {name: empty(name) for name in COLUMNS}
    summary: dict = {"n_pairs": len(chosen), "n_errors": n_err, "n_twins": n_twin,
                     "n_comparison": roles.count("comparison"), "config": cfg.params()}
    if not n_twin or not n_err:
        what = "twins" if not n_twin else "error pairs"
        summary.update(status="empty", note=(
            f"no {what} among the {len(pairs)} pairs (files without designs, BLiMP): recovery, invariance and the "
            "probe compare error pairs with their twins, so nothing was measured; tables written with headers only"))
        return MeasureResult(tables, summary)
    summary["status"] = "done"
    # Recovery: errors and twins, plus the comparison pairs only where an error category has no twins.
    # Twins of a category none of whose errors aligned (typos are mostly multi-token) measure nothing: left out.
    twin_cats = {a.category for a in chosen if a.pair.role == "twin"}
    err_cats = {a.category for a in chosen if a.pair.role == "error"}
    need_cmp = bool(err_cats - twin_cats)
    rec_pairs = [a for a in chosen if (a.pair.role == "error" or (a.pair.role == "twin" and a.category in err_cats)
                                       or (a.pair.role == "comparison" and need_cmp))]
    if twin_cats - err_cats:
        summary["twins_without_errors"] = sorted(twin_cats - err_cats)
    t0 = time.perf_counter()
    from .progress import TaskBar

    with TaskBar(progress, len(rec_pairs), "recovery") as bar:
        rec = measure_recovery(model, rec_pairs, cfg.recovery_cfg(), progress=bar.advance)
    pos = rec.positions.copy()
    pos["design_role"] = pos["id"].map(design)
    tables["recovery.csv"] = pos
    tables["recovery_pairs.csv"] = rec.pairs
    tables["recovery_curves.csv"] = rec.curves
    tables["recovery_index.csv"] = index_table(rec)
    summary["recovery"] = recovery_summary(rec)
    # the 2x2 designs' estimand: error vs twin with cluster effects, adjusted for KL at detect (eclens.interaction)
    rcfg = cfg.recovery_cfg()
    outcomes = [f"decay_{k}" for k in range(1, cfg.max_offset + 1)] + ["decay_last", "suffix_changed"]
    inter = interaction_table(rec.pairs, design_columns(rec_pairs_design(pairs, rec_pairs)), outcomes, rcfg.boot,
                              n_perm=cfg.n_boot)
    tables["recovery_2x2.csv"] = inter if len(inter) else empty("recovery_2x2.csv")
    summary["recovery"]["interaction_2x2"] = headline_rows(inter)
    summary["seconds"] = {"recovery": round(time.perf_counter() - t0, 2)}
    say(f"      recovery: {len(rec_pairs)} pairs in {summary['seconds']['recovery']:.1f} s")
    if cfg.invariance:
        t0 = time.perf_counter()
        inv_pairs = [a for a in chosen if a.pair.role in ("error", "twin")]
        try:
            inv = measure_invariance(model, inv_pairs, cfg.invariance_cfg())
            tables["invariance.parquet"] = inv.cells if len(inv.cells.columns) else empty("invariance.parquet")
            tables["invariance_directions.csv"] = inv.directions
            summary["invariance_summary"] = {k: v for k, v in inv.counts.items()}
            summary["invariance_summary"].update(
                pairs=len(inv_pairs), hooks=cfg.hooks, offsets=list(cfg.invariance_offsets),
                bounds=[inv.cfg.invariant_bound, inv.cfg.specific_bound], fdr=inv.cfg.fdr,
                reach_floor=inv.cfg.reach_floor, n_permutations=inv.cfg.n_permutations)
        except EclensError as e:
            summary["invariance_note"] = f"invariance not measured: {e}"
        summary["seconds"]["invariance"] = round(time.perf_counter() - t0, 2)
        say(f"      invariance: {len(inv_pairs)} pairs in {summary['seconds']['invariance']:.1f} s")
    if cfg.probe:
        t0 = time.perf_counter()
        summary["probe"], tables["probe.csv"] = _probe(model, chosen, cfg, summary)
        summary["seconds"]["probe"] = round(time.perf_counter() - t0, 2)
        say(f"      probe: {summary['seconds']['probe']:.1f} s")
    return MeasureResult(tables, summary, rec)


def _probe(model, chosen: Sequence[AlignedPair], cfg: MeasureConfig, summary: dict) -> tuple[dict, pd.DataFrame]:
    """The probe on the 2x2 error cells when there are any (token identity held fixed), else errors and twins."""
    cells = [a for a in chosen if a.pair.role == "error" and a.pair.meta.get("design") == "2x2"]
    use, items_kind = (cells, "2x2 error cells") if cells else (
        [a for a in chosen if a.pair.role in ("error", "twin")], "errors and twins (token identity not held fixed)")
    try:
        items = items_from_pairs(use)
        curve = probe_curve(model, items, cfg.probe_cfg())
    except EclensError as e:
        summary["probe_note"] = f"probe not measured: {e}"
        return {"items": items_kind}, empty("probe.csv")
    check = layer0_check(curve)
    curve["items"] = items_kind
    curve["layer0_at_chance"] = check["at_chance"]
    peak = curve.iloc[int(curve["acc"].to_numpy().argmax())]
    return ({"items": items_kind, "n_items": int(len(items.ids)), "n_clusters": int(len(set(items.cluster))),
             "peak_layer": int(peak["layer"]), "peak_acc": float(peak["acc"]), "peak_low": float(peak["low"]),
             "peak_high": float(peak["high"]), "peak_null_q95": float(peak["null_q95"]),
             "peak_control_acc": _finite(peak["control_acc"]), **check}, curve)


# ----------------------------------------------------------------------------- the step


def save_measure(run: str | Path, res: MeasureResult) -> list[str]:
    run = Path(run)
    for name, df in res.tables.items():
        write_table(df, run / name)
    write_json(run / "measure.json", res.summary)
    if (run / "summary.json").exists():  # beside diff's aggregates; a rerun of diff rewrites it, measure.json stays
        merge_json(run / "summary.json", "invariance_summary", res.summary.get("invariance_summary"))
        merge_json(run / "summary.json", "recovery_index", (res.summary.get("recovery") or {}).get("index_last"))
        merge_json(run / "summary.json", "recovery_2x2", (res.summary.get("recovery") or {}).get("interaction_2x2"))
    return list(FILES)


def measure_step(run: str | Path, model, pairs: Sequence, config: MeasureConfig | None = None, *,
                 progress: bool = True, log=None) -> StepOutcome:
    """:func:`measure` over the run's pairs, its files written and the ``measure`` step recorded."""
    run, cfg, t0 = Path(run), config or MeasureConfig(), time.perf_counter()
    res = measure(model, pairs, cfg, log=log, progress=progress)
    files = save_measure(run, res)
    head = res.headline()
    record_step(run, "measure", {"params": cfg.params(), "seconds": round(time.perf_counter() - t0, 2),
                                 "parts": res.summary.get("seconds"), "outputs": files, "headline": head})
    return StepOutcome("empty" if res.summary.get("status") == "empty" else "done", files, head, res)


def read_measure(run) -> dict | None:
    """``measure.json`` of a run (a ``RunData`` or a folder), or ``None``."""
    p = run.file("measure.json") if hasattr(run, "file") else Path(run) / "measure.json"
    if p is None or not Path(p).is_file():
        return None
    try:
        return json.loads(Path(p).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise EclensError(f"{p}: not valid JSON ({e.msg}); rerun `ec measure`") from None


__all__ = ["MeasureConfig", "MeasureResult", "measure", "measure_step", "save_measure", "measure_role",
           "with_roles", "choose_clusters", "headline", "index_table", "read_measure", "COLUMNS", "FILES"]
