"""The ``summary.json`` of a diff run (:attr:`DiffResult.summary`): counts, the rule, headline numbers and
their intervals (:func:`eclens.summary_intervals.add_intervals`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pandas as pd
import torch

from ..summary_intervals import add_intervals

if TYPE_CHECKING:
    from .result import DiffResult


def diff_summary(res: DiffResult) -> dict:
    """What :attr:`DiffResult.summary` returns (made from its tables, read once)."""
    cfg = res.config
    pairs = res.pairs
    cand = res.candidates
    layers = res.layers
    s: dict[str, Any] = {
        "n_pairs": res.n_pairs,
        "categories": {c: int(v) for c, v in pairs["category"].value_counts().sort_index().items()}
        if not pairs.empty else {},
        "hooks": res.hooks,
        "n_hook_points": sum(len(g.names) for g in res.groups),
        "offsets": res.offsets,
        "sample_size": cfg.sample_size,
        "n_sample": int(torch.isfinite(res.tensors["sample/keys"]).sum()),
        "threshold": cfg.threshold,
        "rule": {"stable": f"frac(|Δ|/σ < {cfg.threshold}) >= {cfg.stable_frac}",
                 "responsive": f"median |Δ|/σ >= {cfg.responsive_z} and sign consistency >= "
                               f"{cfg.responsive_sign}",
                 "min_pairs": cfg.min_pairs, "massive_ratio": cfg.massive_ratio, "excludes_massive": True},
    }
    s["rule"]["responsive_per_swap_direction"] = True
    s["anchor"] = cfg.anchor
    if not cand.empty:
        pooled = cand[cand["swap_direction"] == "all"]
        c = pooled[pooled["category"] == "all"]
        s["n_candidates"] = {k: int((c["kind"] == k).sum()) for k in ("stable", "responsive")}
        s["n_candidates_by_category"] = {
            cat: {k: int(((pooled["category"] == cat) & (pooled["kind"] == k)).sum())
                  for k in ("stable", "responsive")} for cat in res.categories}
        per = cand[cand["swap_direction"] != "all"]
        s["n_responsive_by_direction"] = {}
        for d in res.directions("all"):
            cat, _ = res.direction_group(d)
            s["n_responsive_by_direction"][d] = int(((per["category"] == cat) & (per["swap_direction"] == d)
                                                     & (per["kind"] == "responsive")).sum()) \
                if res.mixed(cat) else int(((pooled["category"] == cat) & (pooled["kind"] == "responsive")).sum())
        s["n_candidates_by_direction"] = {
            f"{cat} {d}": {k: int(((per["category"] == cat) & (per["swap_direction"] == d) & (per["kind"] == k))
                                  .sum()) for k in ("stable", "responsive")}
            for cat, d in res.stat_groups() if d != "all"}
    else:
        s["n_candidates"] = {"stable": 0, "responsive": 0}
    if not pairs.empty:
        for col in ("logprob_diff", "token_logprob_diff", "kl_0", "kl_mean"):
            if col in pairs:
                s[f"mean_{col}"] = float(pd.to_numeric(pairs[col], errors="coerce").mean())
    la = layers[(layers["category"] == "all") & (layers["swap_direction"] == "all") & (layers["offset"] == 0)]
    top = {}
    for h, d in la.groupby("hook"):
        d = d.dropna(subset=["rel_l2_mean"])
        if not d.empty:
            r = d.loc[d["rel_l2_mean"].idxmax()]
            top[h] = {"layer": int(r["layer"]), "rel_l2_mean": float(r["rel_l2_mean"]),
                      "rel_l2_mean_lo": float(r["rel_l2_mean_lo"]), "rel_l2_mean_hi": float(r["rel_l2_mean_hi"]),
                      "rel_l2_rms": float(r["rel_l2_rms"]), "rel_l2_rms_nomassive": float(r["rel_l2_rms_nomassive"])}
    s["max_rel_l2_at_p"] = top
    massive = {}
    for g in res.groups:
        st = res.cell_stats(g.suffix, "all")
        m = st["massive"]
        if bool(m.any()):
            massive[g.suffix] = sorted({int(d) for d in torch.nonzero(m)[:, 2].tolist()})
    s["massive_dims"] = massive
    con = res.contrasts
    s["contrasts"] = {
        "n_tests": {k: int(v) for k, v in con.dropna(subset=["p"]).groupby("measure").size().items()},
        "n_significant": {k: int(v) for k, v in con[con["significant"] == True]  # noqa: E712
                          .groupby("measure").size().items()},
        "alpha": cfg.alpha, "test": "difference of group means per (hook, layer, offset), labels permuted "
                                    "across clusters", "n_perm": cfg.n_perm, "n_boot": cfg.n_boot,
    }
    return add_intervals(res, {**s, "timing": res.timing})  # issue 17: every mean
