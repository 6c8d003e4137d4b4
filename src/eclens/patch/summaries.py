"""Summaries of the patching tables (top components, attribution vs exact agreement)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd


def attribution_summary(df: pd.DataFrame, k: int | None = None) -> dict:
    """Spearman correlation (scipy) of attribution with exact patching over verified rows,
    pooled and per pair (median), and the top-K overlap within each pair's verified rows."""
    from scipy.stats import spearmanr

    v = df[df["verified"]] if "verified" in df.columns else df.iloc[0:0]
    out: dict = {"n_rows": int(len(df)), "n_verified": int(len(v))}
    if len(v) < 3:
        out.update(spearman=None, spearman_median_pair=None, topk_overlap=None)
        return out
    # A constant column (e.g. every verified effect 0) has no rank correlation: None, not scipy's warning and NaN.
    varies = v["exact"].nunique() > 1 and v["attribution"].nunique() > 1
    out["spearman"] = float(spearmanr(v["attribution"], v["exact"]).statistic) if varies else None
    per, overlaps = [], []
    for _, g in v.groupby(["pair_id", "direction"]):
        if len(g) >= 3 and g["exact"].nunique() > 1 and g["attribution"].nunique() > 1:
            per.append(float(spearmanr(g["attribution"], g["exact"]).statistic))
        kk = k or int((g["verify_group"] == "top").sum())
        if kk:
            top_a = set(g["attribution"].abs().sort_values(ascending=False).head(kk).index)
            top_e = set(g["exact"].abs().sort_values(ascending=False).head(kk).index)
            overlaps.append(len(top_a & top_e) / kk)
    out["spearman_median_pair"] = float(np.median(per)) if per else None
    out["topk_overlap"] = float(np.mean(overlaps)) if overlaps else None
    out.update(_visible_agreement(v, k))
    return out


def _rho(g: pd.DataFrame) -> float | None:
    """Spearman of ``attribution`` with ``exact`` over ``g`` (None: under 3 rows, or a constant column)."""
    from scipy.stats import spearmanr

    if len(g) < 3 or g["exact"].nunique() < 2 or g["attribution"].nunique() < 2:
        return None
    return float(spearmanr(g["attribution"], g["exact"]).statistic)


def _per_pair(s: pd.DataFrame, k_of: Callable[[pd.DataFrame], int]) -> tuple[float | None, float | None]:
    """Median per-pair Spearman and mean top-K recall (the share of a pair's ``k_of(pair)`` largest |exact|
    that attribution also puts in its top K), over the (pair, direction) groups of ``s``."""
    per, recalls = [], []
    for _, g in s.groupby(["pair_id", "direction"]):
        r = _rho(g)
        if r is not None:
            per.append(r)
        kk = k_of(g)
        if kk:
            top_e = set(g["exact"].abs().sort_values(ascending=False, kind="stable").head(kk).index)
            top_a = set(g["attribution"].abs().sort_values(ascending=False, kind="stable").head(kk).index)
            recalls.append(len(top_e & top_a) / kk)
    return (float(np.median(per)) if per else None), (float(np.mean(recalls)) if recalls else None)


def _visible_agreement(v: pd.DataFrame, k: int | None) -> dict:
    """Spearman and top-K recall over the verified components the metric can see (``visible`` and a
    non-zero attribution): a component the metric cannot see scores exactly 0 on both sides, and a pool of
    such ties inflates both numbers. Pooled, per pair (median) and per position kind."""
    if "visible" not in v.columns:
        return {"n_visible": None, "spearman_visible": None, "topk_recall_visible": None}
    s = v[v["visible"].astype(bool) & (v["attribution"] != 0)]
    out: dict = {"n_visible": int(len(s)), "spearman_visible": _rho(s)}
    out["spearman_visible_median_pair"], out["topk_recall_visible"] = _per_pair(
        s, lambda g: min(k or max(1, int((g["verify_group"] == "top").sum())), len(g)))
    if "position_kind" in s.columns:
        out["spearman_visible_by_position"] = {str(kind): _rho(g) for kind, g in s.groupby("position_kind")}
    return out


SWEEP_KEYS = ["pair_id", "direction", "hook", "layer", "position", "head"]


def sweep_agreement(attr: pd.DataFrame, exact: pd.DataFrame, metric: str, k: int = 10) -> pd.DataFrame:
    """Attribution against the *full* exact sweep of the same pairs (issue 19): one row per position kind
    (and ``all``) with the number of components, Spearman pooled and the median per pair, and top-K recall
    (the share of each pair's K largest exact effects that attribution also puts in its top K).

    Only components the metric can see are scored (``visible`` and a non-zero exact or attribution value):
    the verified-top-K check ranks inside a pool attribution chose itself, and invisible components tie at
    0 on both sides; both inflate agreement. The exact effect is the patched run's metric minus the base
    run's (corrupt for denoising, clean for noising), the quantity attribution estimates."""
    cols = ["scope", "position_kind", "n_components", "n_pairs", "spearman", "spearman_median_pair",
            f"top{k}_recall"]
    need = {metric, f"{metric}_clean", f"{metric}_corrupt", *SWEEP_KEYS}
    if attr.empty or exact.empty or not need <= set(exact.columns):
        return pd.DataFrame(columns=cols)
    e = exact[[*SWEEP_KEYS, metric, f"{metric}_clean", f"{metric}_corrupt"]].copy()
    base = np.where(e["direction"].to_numpy() == "denoise", e[f"{metric}_corrupt"], e[f"{metric}_clean"])
    e["exact"] = e[metric].to_numpy(dtype=float) - base.astype(float)  # the sweep's effect, attribution's estimand
    a = attr[[*SWEEP_KEYS, "position_kind", "visible", "attribution"]]
    j = a.merge(e[[*SWEEP_KEYS, "exact"]], on=SWEEP_KEYS, how="inner")
    j = j[j["visible"].astype(bool) & np.isfinite(j["attribution"]) & np.isfinite(j["exact"])
          & ((j["attribution"] != 0) | (j["exact"] != 0))]

    def row(scope: str, kind: str, g: pd.DataFrame) -> dict:
        median, recall = _per_pair(g, lambda h: min(k, len(h)))
        return {"scope": scope, "position_kind": kind, "n_components": int(len(g)),
                "n_pairs": int(g["pair_id"].nunique()), "spearman": _rho(g), "spearman_median_pair": median,
                f"top{k}_recall": recall}

    rows = [row("all", "all", j)] if len(j) else []
    rows += [row("position", str(kind), g) for kind, g in j.groupby("position_kind", sort=False)]
    return pd.DataFrame(rows, columns=cols)


def topk_overlap(a: Sequence[float], b: Sequence[float], k: int) -> float:
    """Share of the ``k`` largest ``|a|`` that are among the ``k`` largest ``|b|``."""
    a, b = np.abs(np.asarray(a, dtype=float)), np.abs(np.asarray(b, dtype=float))
    ta = set(np.argsort(-a, kind="stable")[:k].tolist())
    tb = set(np.argsort(-b, kind="stable")[:k].tolist())
    return len(ta & tb) / k


def exact_summary(df: pd.DataFrame, metric: str = "logit_diff", top: int = 10) -> dict:
    """Headline numbers of an exact sweep: mean restored per (direction, hook, layer, position kind), the top cells."""
    col = f"{metric}_restored"
    out: dict = {"metric": metric, "n_rows": int(len(df)),
                 "n_pairs": int(df["pair_id"].nunique()) if len(df) else 0}
    nan_pairs = df.groupby("pair_id")[col].apply(lambda s: bool(s.isna().all()))
    out["pairs_without_ratio"] = int(nan_pairs.sum())
    g = (df[df["position_kind"] != "before"]
         .groupby(["direction", "hook", "layer", "position_kind", "head"])[col].mean().reset_index())
    g = g.dropna(subset=[col])
    out["top"] = g.reindex(g[col].abs().sort_values(ascending=False).index).head(top).to_dict(orient="records")
    return out
