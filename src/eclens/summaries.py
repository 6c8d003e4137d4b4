"""What a run found, in the words and small tables a researcher reads.

Shared by the report ("At a glance", the causal summary, the contrasts note) and the
web UI (overview, causal tab, contrasts tab), so both say the same thing. Rules: every
number carries its unit; a missing value is ``MISSING`` ("—"), never None, NaN or
null; nothing is shown as JSON (a nested summary becomes a table or a sentence).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

MISSING = "—"

# metric name -> (what it is, its unit)
METRICS = {
    "logit_diff": ("logit difference (clean token minus corrupt token)", "logits"),
    "logprob": ("log-probability of the clean token", "nats"),
    "kl": ("KL divergence of the next-token distribution", "nats"),
}


def metric_words(metric: str | None) -> tuple[str, str]:
    return METRICS.get(str(metric), (str(metric or "the metric"), "units of the metric"))


def num(v: Any, digits: int = 3, unit: str = "") -> str:
    """A number for a person: ``digits`` significant digits, its unit, ``MISSING`` for None/NaN/inf."""
    if v is None or isinstance(v, bool):
        return MISSING if v is None else ("yes" if v else "no")
    try:
        x = float(v)
    except (TypeError, ValueError):
        return str(v)
    if not math.isfinite(x):
        return MISSING
    txt = str(int(x)) if x == int(x) and abs(x) < 1e15 else f"{x:.{digits}g}"
    return f"{txt} {unit}".strip() if unit else txt


def pct(v: Any, digits: int = 3) -> str:
    """A fraction as a percentage ("0.5" -> "50 %"), ``MISSING`` for None/NaN."""
    try:
        x = float(v)
    except (TypeError, ValueError):
        return MISSING
    return f"{x * 100:.{digits}g} %" if math.isfinite(x) else MISSING


def ci(bounds: Any, digits: int = 3, unit: str = "", percent: bool = False) -> str:
    """`` [lo, hi]`` for an interval beside its number (``""`` where there is none: one cluster, no data)."""
    if not isinstance(bounds, (list, tuple)) or len(bounds) != 2 or any(
            b is None or not math.isfinite(float(b)) for b in bounds):
        return ""
    f = (lambda b: pct(b, digits)) if percent else (lambda b: num(b, digits))
    return f" [{f(bounds[0])}, {f(bounds[1])}]" + (f" {unit}" if unit and not percent else "")


def _random_counts(s: dict) -> str:
    """``; with random weights …`` from the random-weight baseline in ``summary.json``, if it ran."""
    rows = [r for r in ((s.get("baseline_random") or {}).get("candidates") or [])
            if r.get("weights") == "random" and r.get("hook") == "(any)"]
    if not rows:
        return ""
    k = {r["kind"]: int(r["n_candidates"]) for r in rows}
    return (f"; the same rules on the architecture with random weights find {k.get('stable', 0)} stable and "
            f"{k.get('responsive', 0)} responsive")


def verdict_text(v: Any) -> str:
    """A step's verdict as a sentence: the writers' terse "null: …" prefix reads "a null result: …"."""
    t = str(v).strip().rstrip(".")
    return "a null result: " + t[5:].lstrip() if t.lower().startswith("null:") else t


def plural(n: int, word: str, many: str | None = None) -> str:
    return f"{n} {word if n == 1 else (many or word + 's')}"


def cell(v: Any) -> Any:
    """A table cell: scalars kept (numbers stay numbers for sorting), missing as ``MISSING``,
    lists as comma-separated text, dicts as ``key value`` pairs (never JSON)."""
    if v is None:
        return MISSING
    if isinstance(v, float) and not math.isfinite(v):
        return MISSING
    if isinstance(v, (list, tuple)):
        return ", ".join(str(cell(x)) for x in v) if v else MISSING
    if isinstance(v, dict):
        return "; ".join(f"{k} {cell(x)}" for k, x in v.items()) if v else MISSING
    return v


@dataclass
class Block:
    """One titled part of a summary: plain sentences and an optional small table."""

    title: str
    sentences: list[str] = field(default_factory=list)
    table: pd.DataFrame | None = None


# ------------------------------------------------------------------ at a glance


def glance(run) -> list[str]:
    """The headline findings of a run (a ``RunData``), one plain sentence each, numbers with
    units, null results stated as null."""
    out = []
    n_valid, n_rej = len(run.pairs or []), len(run.rejected or [])
    model = (run.manifest.get("model") or {}).get("name")
    if run.pairs is not None:
        out.append(f"{plural(n_valid, 'minimal pair')} in {plural(len(run.categories()), 'category', 'categories')}"
                   + (f" were run through {model}" if model else "")
                   + f"; {n_rej} more {'was' if n_rej == 1 else 'were'} rejected because clean and corrupt do not "
                   "differ in exactly one token.")
    s = run.summary or {}
    if s.get("mean_logprob_diff") is not None:
        out.append(f"On average the corrupt sentence's log-probability differs from the clean one's by "
                   f"{num(s['mean_logprob_diff'], 3, 'nats')}{ci(s.get('mean_logprob_diff_ci'))}, and "
                   f"the next-token distribution at the changed token moves by a KL divergence of "
                   f"{num(s.get('mean_kl_0'), 3, 'nats')}{ci(s.get('mean_kl_0_ci'))}"
                   + (" (95 % cluster-bootstrap intervals)" if ci(s.get("mean_kl_0_ci")) else "") + ".")
    top = s.get("max_rel_l2_at_p") or {}
    if top:
        out.append("At the changed token the activations move most, relative to their size (‖Δ‖/‖a‖), in: " + "; ".join(
            f"{h} at layer {v.get('layer')} ({pct(v.get('rel_l2_mean'), 2)} of the activation's norm"
            f"{ci([v.get('rel_l2_mean_lo'), v.get('rel_l2_mean_hi')], 2, percent=True)}; root mean square without "
            f"massive dimensions {pct(v.get('rel_l2_rms_nomassive'), 2)}"
            f"{ci([v.get('rel_l2_rms_nomassive_lo'), v.get('rel_l2_rms_nomassive_hi')], 2, percent=True)})"
            for h, v in top.items() if isinstance(v, dict)) + ".")
    nc = s.get("n_candidates")
    if nc is not None:
        st, rs = int(nc.get("stable", 0)), int(nc.get("responsive", 0))
        massive = s.get("massive_dims") or {}
        out.append(f"Over all pairs, {plural(st, 'dimension')} change consistently little (stable) and "
                   f"{plural(rs, 'dimension')} change consistently much (responsive)"
                   + (" — no responsive dimension was found" if rs == 0 else "")
                   + (("; massive-activation dimensions were left out (" + "; ".join(
                       f"{h}: {', '.join(map(str, d))}" for h, d in massive.items()) + ")") if massive else "")
                   + "; these are counts under a stated rule, without an interval (the threshold grid is in "
                   "sensitivity.csv)" + _random_counts(s) + ".")
    con = s.get("contrasts") or {}
    if con.get("n_tests"):
        tests = sum(con["n_tests"].values())
        sig = sum((con.get("n_significant") or {}).values())
        out.append(f"Category contrasts: {sig} of {tests} layer-level effects (difference of group means, "
                   f"labels permuted across clusters) are significant at a Benjamini–Hochberg false discovery rate "
                   f"of {num(con.get('alpha', 0.05))}"
                   + (" — a null result: no layer separates the categories." if sig == 0 else "."))
    from .measure_view import glance_line

    rec = glance_line(run) if hasattr(run, "measure") else None
    if rec:
        out.append(rec)
    ps = run.patch_summary or {}
    dims = ps.get("dims") if isinstance(ps.get("dims"), dict) else None
    if dims and dims.get("verdict"):
        out.append("Causal test of candidate dimension sets against random sets of the same size: "
                   f"{verdict_text(dims['verdict'])}.")
    at = ps.get("attribution") if isinstance(ps.get("attribution"), dict) else None
    if at and at.get("n_verified") is not None:
        if at.get("spearman") is None:
            out.append(f"Attribution patching could not be compared with exact patching: the "
                       f"{plural(int(at['n_verified']), 'verified component')} do not vary (Spearman ρ undefined).")
        else:
            out.append(f"Attribution patching ranks components like exact patching with Spearman ρ = "
                       f"{num(at['spearman'], 2)} over {plural(int(at['n_verified']), 'verified component')}"
                       + (f"; its top components overlap exact patching's by {pct(at['topk_overlap'], 2)}"
                          if at.get("topk_overlap") is not None else "") + ".")
    ex = ps.get("exact") if isinstance(ps.get("exact"), dict) else None
    if ex and ex.get("top"):
        m = ex.get("metric", "logit_diff")
        t = ex["top"][0]
        val = t.get(f"{m}_restored")
        if val is not None:
            out.append(f"Exact activation patching ({plural(int(ex.get('n_pairs') or 0), 'pair')}): the strongest "
                       f"cell, {t.get('direction')} {t.get('hook')} at layer {t.get('layer')}, {t.get('position_kind')} "
                       f"position, restores {pct(val, 3)} of the clean–corrupt {metric_words(m)[0]} gap.")
    return out


# ------------------------------------------------------------------ causal


def _exact_block(ex: dict) -> Block:
    m = ex.get("metric", "logit_diff")
    words, _ = metric_words(m)
    b = Block("Exact activation patching")
    b.sentences.append(f"{plural(int(ex.get('n_rows') or 0), 'patched run')} over "
                       f"{plural(int(ex.get('n_pairs') or 0), 'pair')}, judged by the {words}. "
                       "Restored: the share of the clean–corrupt gap a patch closes (100 % = all of it).")
    if ex.get("pairs_without_ratio"):
        b.sentences.append(f"{plural(int(ex['pairs_without_ratio']), 'pair')} had no clean–corrupt gap to "
                           "restore and are left out of the shares.")
    top = ex.get("top") or []
    if top:
        b.table = pd.DataFrame([{
            "direction": t.get("direction", MISSING), "hook": t.get("hook", MISSING), "layer": t.get("layer", MISSING),
            "position": t.get("position_kind", MISSING),
            "head": "all" if t.get("head") in (None, -1) else t.get("head"),
            "restored": pct(t.get(f"{m}_restored")),
        } for t in top])
    return b


def _pairs_phrase(n) -> str:
    """``n_pairs`` of a dims summary: one count, or a count per test (``{test: n}``) when the tests drew
    different numbers of pairs."""
    if isinstance(n, dict):
        counts = sorted({int(v) for v in n.values()})
        if len(counts) == 1:
            return f"{plural(counts[0], 'pair')} each"
        return f"{counts[0]}–{counts[-1]} pairs (by test)"
    return plural(int(n or 0), "pair")


def _dims_block(d: dict) -> Block:
    m = d.get("metric", "logit_diff")
    words, unit = metric_words(m)
    b = Block("Candidate dimension sets vs random sets")
    if d.get("verdict"):
        v = verdict_text(d["verdict"])
        b.sentences.append(v[0].upper() + v[1:] + ".")
    if d.get("n_sets"):
        b.sentences.append(f"{plural(int(d['n_sets']), 'candidate set')} patched on "
                           f"{_pairs_phrase(d.get('n_pairs'))}, each against "
                           f"{num(d.get('n_controls'))} random sets of the same size in the same layer; "
                           f"effects are mean changes in the {words}, in {unit}.")
    sets = d.get("sets") or []
    if sets:
        b.table = pd.DataFrame([{
            "set": s.get("set", MISSING), "direction": s.get("direction", MISSING), "pairs": s.get("n_pairs", MISSING),
            f"effect ({unit})": cell(s.get(f"{m}_effect")), f"random mean ({unit})": cell(s.get(f"{m}_control_mean")),
            "z": cell(s.get(f"{m}_z")), "p": cell(s.get(f"{m}_p")), "q (BH)": cell(s.get(f"{m}_q")),
            "verdict": verdict_text(s["verdict"]) if s.get("verdict") else MISSING} for s in sets])
    return b


def _attribution_block(a: dict) -> Block:
    b = Block("Attribution patching vs exact patching")
    n = int(a.get("n_verified") or 0)
    if a.get("spearman") is None:
        b.sentences.append(f"{plural(n, 'component')} verified with exact patching; the rank correlation is "
                           "undefined (the verified effects do not vary).")
    else:
        b.sentences.append(f"Over {plural(n, 'component')} verified with exact patching, attribution ranks them "
                           f"with Spearman ρ = {num(a['spearman'], 2)} (median per pair "
                           f"{num(a.get('spearman_median_pair'), 2)}); the top components overlap by "
                           f"{pct(a.get('topk_overlap'), 2)}.")
    sw = a.get("sweep")
    if isinstance(sw, dict) and sw.get("n_components"):
        b.sentences.append(
            f"Against the full exact sweep of {plural(int(sw['n_pairs']), 'pair')} (every component the metric "
            f"can see, {sw['n_components']} in all), Spearman ρ = {num(sw.get('spearman'), 2)} (median per pair "
            f"{num(sw.get('spearman_median_pair'), 2)}) and attribution's top {sw.get('k')} recovers "
            f"{pct(sw.get('topk_recall'), 2)} of exact patching's top {sw.get('k')}.")
        by = {k: v for k, v in (sw.get("by_position") or {}).items() if v is not None}
        if by:
            b.sentences.append("By position: " + ", ".join(f"{k} ρ = {num(v, 2)}" for k, v in by.items()) + ".")
    return b


def patch_blocks(patch_summary: dict | None) -> list[Block]:
    """``patch_summary.json`` as titled sentences and tables (one block per patching mode)."""
    out = []
    for mode, v in (patch_summary or {}).items():
        if not isinstance(v, dict):
            continue
        if mode == "exact":
            out.append(_exact_block(v))
        elif mode == "dims":
            out.append(_dims_block(v))
        elif mode == "attribution":
            out.append(_attribution_block(v))
        else:  # a mode this page does not know yet: its scalar numbers as a two-column table
            rows = [{"quantity": k, "value": cell(x)} for k, x in v.items() if not isinstance(x, (dict, list))]
            out.append(Block(f"Patching: {mode}", table=pd.DataFrame(rows) if rows else None))
    return out


# ------------------------------------------------------------------ contrasts


def contrasts_note(run, shown: int | None = None) -> str:
    """What the contrasts table holds, next to how many tests were run and how many are significant."""
    df = run.contrasts
    con = (run.summary or {}).get("contrasts") or {}
    n_tests = sum((con.get("n_tests") or {}).values()) if con.get("n_tests") else None
    n_sig = sum((con.get("n_significant") or {}).values()) if con.get("n_tests") else None
    alpha = con.get("alpha", 0.05)
    qcol = next((c for c in ("q", "q_value", "qvalue") if df is not None and c in df.columns), None)
    n_sig_rows = int((df[qcol] <= alpha).sum()) if qcol else None
    parts = []
    if n_tests is not None:
        parts.append(f"{n_tests} category contrasts were tested, one per (group pair, measure, hook, layer, "
                     f"offset): the difference of the groups' mean change with a cluster-bootstrap interval, "
                     f"p from permuting group labels across clusters; {n_sig} are "
                     f"significant at a Benjamini–Hochberg false discovery rate of {num(alpha)}"
                     + (" — a null result: no layer separates the categories." if n_sig == 0 else "."))
    if df is not None:
        parts.append(f"The table holds {plural(len(df), 'row')}, sorted by q"
                     + (f" ({n_sig_rows} of them with q ≤ {num(alpha)})" if n_sig_rows is not None else "")
                     + (f"; {shown} are shown" if shown is not None and shown < len(df) else "") + ".")
    return " ".join(parts)
