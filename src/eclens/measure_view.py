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
    return ("Recovery index at the last token (negative: errors fade faster than their twins; cluster-bootstrap "
            "95 % intervals): " + "; ".join(parts) + ".")


__all__ = ["MeasurePanel", "measure_panel", "glance_line", "index_pivot", "ignore_table", "interval"]
