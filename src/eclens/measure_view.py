"""The measure step's results in words, small tables and figures: the report's "Recovery" section and the
web UI's Recovery tab show the same :class:`MeasurePanel` (rules of :mod:`eclens.summaries`: numbers with
units and intervals, missing values as "—", never JSON)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from .summaries import MISSING, num, plural

IGNORE_WORDS = {"ignore_mean": "mean embedding", "ignore_delete": "token deleted"}


@dataclass
class MeasurePanel:
    sentences: list[str] = field(default_factory=list)
    tables: list[tuple[str, pd.DataFrame]] = field(default_factory=list)
    figures: list[tuple[str, Any]] = field(default_factory=list)  # (caption, plotly figure)


def interval(est: Any, lo: Any, hi: Any, digits: int = 3) -> str:
    """``est [lo, hi]``; the estimate alone when the interval is undefined (fewer than two clusters)."""
    e = num(est, digits)
    if e == MISSING:
        return MISSING
    if num(lo) == MISSING or num(hi) == MISSING:
        return f"{e} (no interval: under 2 clusters)"
    return f"{e} [{num(lo, digits)}, {num(hi, digits)}]"


def _f(v: Any) -> float:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return math.nan
    return x


def index_pivot(idx: pd.DataFrame) -> pd.DataFrame:
    """Per category: the recovery index at each offset after detect as ``est [lo, hi]``, its comparison."""
    ri = idx[idx["measure"] == "recovery_index"]
    rows = []
    for cat, g in ri.groupby("category", sort=True):
        row = {"category": cat, "compared with": str(g["note"].iloc[0]).removeprefix("vs "),
               "clusters": int(_f(g["n_clusters"].max())) if g["n_clusters"].notna().any() else MISSING}
        for r in g.itertuples(index=False):
            row[f"t = detect + {r.offset}" if str(r.offset) != "last" else "last token"] = interval(r.estimate, r.low,
                                                                                                     r.high, 2)
        rows.append(row)
    return pd.DataFrame(rows)


def ignore_table(idx: pd.DataFrame) -> pd.DataFrame:
    rows = []
    ig = idx[idx["measure"].astype(str).str.startswith("ignore_")].copy()
    ig["run"] = ig["measure"].str.rsplit("_", n=1).str[0]
    for (cat, run), g in ig.groupby(["category", "run"], sort=True):
        cost = g[g["measure"].str.endswith("_cost")]
        gap = g[g["measure"].str.endswith("_gap")]
        if cost.empty or gap.empty:
            continue
        c, p = cost.iloc[0], gap.iloc[0]
        rows.append({"category": cat, "ignore run": IGNORE_WORDS.get(run, run),
                     "cost of ignoring (nats)": interval(c["estimate"], c["low"], c["high"]),
                     "error − ignore (nats)": interval(p["estimate"], p["low"], p["high"]),
                     "clusters": int(_f(p["n_clusters"])) if pd.notna(p["n_clusters"]) else MISSING,
                     "verdict": str(p["note"])})
    return pd.DataFrame(rows)


def invariance_sentences(inv: dict) -> tuple[list[str], pd.DataFrame | None]:
    if not inv or inv.get("reached") is None:
        return [], None
    lo, hi = (inv.get("bounds") or [0.5, 2.0])[:2]
    offs = ", ".join("last" if int(o) < 0 else f"detect + {o}" if o else "detect" for o in inv.get("offsets") or [])
    out = [f"Selective invariance ({inv.get('hooks', 'hook_resid_post')}, positions {offs or MISSING}; "
           f"{plural(int(inv.get('pairs') or 0), 'pair')}): of {inv['reached']} reached cells (twins move them by at "
           f"least {num(inv.get('reach_floor'))} σ), {inv['invariant']} are error-invariant (the error pairs' mean "
           f"|Δ| over the twins' reliably below {num(lo)}) and {inv['specific']} error-specific (reliably above "
           f"{num(hi)}), at a Benjamini–Hochberg false discovery rate of {num(inv.get('fdr', 0.05))} per class."]
    null = (f"Under the permutation null ({inv.get('null') or 'permuted roles'}, "
            f"{plural(int(inv.get('n_permutations') or 0), 'draw')}) the same rule finds "
            f"{num(inv.get('null_invariant_mean'))} error-invariant (at most {inv.get('null_invariant_max')}) and "
            f"{num(inv.get('null_specific_mean'))} error-specific cells (at most {inv.get('null_specific_max')})")
    beat = [k for k in ("invariant", "specific") if int(inv[k]) > int(inv.get(f"null_{k}_max") or 0)]
    out.append(null + ("; a null result: neither count exceeds what permuted labels give." if not beat else
                       f"; the {' and '.join('error-' + k for k in beat)} count exceeds every permutation's."))
    table = pd.DataFrame([{"class": f"error-{k}", "cells": int(inv[k]), "null mean": _f(inv.get(f"null_{k}_mean")),
                           "null max": int(inv.get(f"null_{k}_max") or 0)} for k in ("invariant", "specific")])
    return out, table


def probe_sentences(pr: dict, curve: pd.DataFrame | None) -> tuple[list[str], pd.DataFrame | None]:
    if not pr or pr.get("peak_acc") is None or curve is None or curve.empty:
        return [], None
    out = [f"Error signal: a linear probe per layer on {pr.get('items')} ({plural(int(pr.get('n_items') or 0), 'item')}"
           f" in {plural(int(pr.get('n_clusters') or 0), 'cluster')}, cross-validated by cluster) peaks at layer "
           f"{pr['peak_layer']} with accuracy {interval(pr['peak_acc'], pr['peak_low'], pr['peak_high'], 2)}; the "
           f"within-cluster permutation null's 95th percentile there is {num(pr.get('peak_null_q95'), 2)} and the "
           f"control task reaches {num(pr.get('peak_control_acc'), 2)}.",
           "Layer-0 check: " + str(pr.get("note", MISSING)) + "."]
    t = curve[["layer", "acc", "low", "high", "control_acc", "null_q95", "p_perm"]].rename(columns={
        "acc": "accuracy", "control_acc": "control task", "null_q95": "null 95 %", "p_perm": "permutation p"})
    return out, t


def measure_panel(rd) -> MeasurePanel | None:
    """What the measure step found in the run ``rd`` (a ``RunData``); ``None`` when the step has not run."""
    s = rd.measure
    if s is None:
        return None
    panel = MeasurePanel()
    if s.get("status") == "empty":
        panel.sentences.append(str(s.get("note", "nothing was measured")) + ".")
        return panel
    from . import measureviz

    n = s.get("n_pairs")
    panel.sentences.append(
        f"Measured on {plural(int(n or 0), 'pair')} ({s.get('n_errors')} errors, {s.get('n_twins')} twins; at most "
        f"{(s.get('config') or {}).get('max_clusters') or 'every'} clusters per category). Recovery: KL(clean ‖ run) "
        "of the next-token distribution after the error's detect position; the recovery index is the change of "
        "log KL from detect to later tokens for errors minus that for their twins (negative: errors fade faster "
        "than an acceptable change of the same word), the cluster-bootstrap median with a 95 % interval.")
    idx = rd.recovery_index
    if idx is not None and not idx.empty:
        panel.tables.append(("Recovery index per category (log KL decay, errors minus twins)", index_pivot(idx)))
        ign = ignore_table(idx)
        if not ign.empty:
            panel.sentences.append(
                "Ignore baseline: the error run against runs that ignore the changed token (its embedding replaced "
                "by the mean embedding, or the token deleted), by the clean continuation's log-prob from detect on. "
                "Correction means the error run ends closer to the clean run than the ignore run; where ignoring "
                "costs almost nothing the test has no power, and the verdict says so.")
            panel.tables.append(("Ignore baseline", ign))
    t2 = two_by_two_table(_csv(rd, "recovery_2x2.csv"))
    if t2 is not None:
        panel.sentences.append(
            "2x2 designs: the error effect (error minus twin, both error cells weighted equally so the changed "
            "token's identity cancels: the design's interaction) and whether it differs between the cells, from a "
            "model with cluster effects adjusted for log KL at detect; 95 % full cluster bootstrap intervals, "
            "Freedman–Lane permutation p.")
        panel.tables.append(("2x2 designs: error effect with cluster effects", t2))
    bt = baseline_table(_csv(rd, "baseline_random_measure.csv"))
    if bt is not None:
        panel.sentences.append("Random-weight baseline: the same measurements on the architecture with random "
                               "weights; a number it reaches as well says nothing about training.")
        panel.tables.append(("Trained vs random weights", bt))
    curves = rd.recovery_curves
    if curves is not None and not curves.empty:
        panel.figures.append(("median KL(clean ‖ run) per token after detect, cluster-bootstrap intervals",
                              measureviz.recovery_figure(curves)))
    sent, table = invariance_sentences(s.get("invariance_summary") or {})
    panel.sentences += sent
    if table is not None:
        panel.tables.append(("Error-invariant and error-specific cells vs the permutation null", table))
    sent, table = probe_sentences(s.get("probe") or {}, rd.probe)
    panel.sentences += sent
    if table is not None:
        panel.figures.append(("probe accuracy per layer (-1: the embedding)",
                              measureviz.probe_figure({str(s["probe"].get("items", "probe")): rd.probe})))
        panel.tables.append(("Probe per layer", table))
    for k in ("invariance_note", "probe_note"):
        if s.get(k):
            panel.sentences.append(str(s[k]) + ".")
    return panel


def _csv(rd, name: str) -> pd.DataFrame | None:
    p = rd.file(name) if hasattr(rd, "file") else None
    if p is None or p.stat().st_size <= 1:
        return None
    try:
        return pd.read_csv(p)
    except (pd.errors.EmptyDataError, pd.errors.ParserError):
        return None


OUTCOME_WORDS = {"decay_last": "log KL decay to the last token", "suffix_changed": "suffix log-prob (nats)"}


def two_by_two_table(t: pd.DataFrame | None) -> pd.DataFrame | None:
    """``recovery_2x2.csv`` as a small table: per category and outcome, the error effect and its cell difference."""
    if t is None or t.empty:
        return None
    t = t[t["outcome"].isin(list(OUTCOME_WORDS))]
    rows = []
    for (cat, out), g in t.groupby(["category", "outcome"], sort=True):
        e = g[g["term"] == "error_effect"]
        x = g[g["term"] == "error_x_cell"]
        if e.empty:
            continue
        e, x = e.iloc[0], (x.iloc[0] if len(x) else None)
        rows.append({"category": cat, "outcome": OUTCOME_WORDS[out],
                     "error effect": interval(e["estimate"], e["low"], e["high"], 2), "p": num(e["p_perm"], 2),
                     "cell difference": interval(x["estimate"], x["low"], x["high"], 2) if x is not None else MISSING,
                     "p (cells)": num(x["p_perm"], 2) if x is not None else MISSING,
                     "clusters": int(_f(e["n_clusters"])), "cells": e["cells"]})
    return pd.DataFrame(rows) if rows else None


def baseline_table(t: pd.DataFrame | None) -> pd.DataFrame | None:
    """``baseline_random_measure.csv`` as one row per (measure, category) with both weights side by side."""
    if t is None or t.empty:
        return None
    rows = []
    for (m, cat), g in t.groupby(["measure", "category"], sort=True):
        row = {"measure": m, "category": cat}
        for w in ("trained", "random"):
            r = g[g["weights"] == w]
            row[w] = interval(r["estimate"].iloc[0], r["low"].iloc[0], r["high"].iloc[0], 2) if len(r) else MISSING
        rows.append(row)
    return pd.DataFrame(rows)


def glance_line(rd) -> str | None:
    """The at-a-glance sentence of the measure step."""
    s = rd.measure
    if not s:
        return None
    if s.get("status") == "empty":
        return str(s.get("note")) + "."
    idx = [r for r in (s.get("recovery") or {}).get("index_last") or [] if r.get("index") is not None]
    if not idx:
        return None
    parts = [f"{r['category']} {interval(r['index'], r.get('low'), r.get('high'), 2)}" for r in idx]
    out = ("Recovery index at the last token (negative: errors fade faster than their twins; cluster-bootstrap "
           "95 % intervals): " + "; ".join(parts) + ".")
    i2 = [r for r in (s.get("recovery") or {}).get("interaction_2x2") or [] if r.get("estimate") is not None]
    if i2:
        out += (" 2x2 designs, error effect on the decay to the last token with cluster effects (adjusted for KL at "
                "detect): " + "; ".join(f"{r['category']} {interval(r['estimate'], r.get('low'), r.get('high'), 2)}"
                                        f" (permutation p {num(r.get('p_perm'), 2)})" for r in i2) + ".")
    return out


__all__ = ["MeasurePanel", "measure_panel", "glance_line", "index_pivot", "ignore_table", "interval",
           "two_by_two_table", "baseline_table"]
