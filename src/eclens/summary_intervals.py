"""Intervals for the diff's headline aggregates in ``summary.json`` (issue 17: every aggregate has one).

The diff's summary (:attr:`eclens.diff.DiffResult.summary`) states means over pairs and the largest
relative change per hook; this module adds a full cluster bootstrap interval to each (clusters
resampled with replacement, :func:`eclens.bootstrap.cluster_bootstrap`, percentile, the diff's ``n_boot``
and seed):

- ``mean_<x>_ci`` for ``mean_logprob_diff``, ``mean_token_logprob_diff``, ``mean_kl_0``, ``mean_kl_mean``
  (from the per-pair table ``pairs.csv``: every pair, not a sample);
- in ``max_rel_l2_at_p[hook]``: ``rel_l2_rms_lo``/``_hi`` and ``rel_l2_rms_nomassive_lo``/``_hi`` beside the
  existing ``rel_l2_mean_lo``/``_hi``. ``rel_l2_rms`` is a ratio of means over pairs (``E‖Δ‖² / E‖a‖²``), so
  its interval is the cluster bootstrap of that ratio over the sampled pairs (all pairs when there are at
  most ``sample_size``), per pair ``‖Δ‖²`` from the sampled Δ and ``‖a‖² = ‖Δ‖² / rel_l2²``; it is rescaled
  by the exact estimate over the sample's estimate, so it brackets the number shown. Without the massive
  dimensions the per-pair clean energy of those dimensions is not kept, so each pair's ``‖a‖²`` is scaled
  by the pooled share of the clean energy outside them (exact in the pooled estimate; an approximation
  per pair, stated in ``interval_notes``).

**Counts have no interval, by rule**: ``n_candidates`` (and per category / direction), ``n_tests`` and
``n_significant`` are counts of things found under a stated rule. Their uncertainty is shown where it
can be read: the threshold grid (``sensitivity.csv``), the random-weight baseline's counts
(``baseline_random.csv``) and, for the measure step's invariance counts, the within-cluster permutation
null beside them. ``interval_notes`` in the summary says so.
"""

from __future__ import annotations

import math

import pandas as pd
import torch

from .bootstrap import BootstrapConfig, cluster_bootstrap

MEANS = ("logprob_diff", "token_logprob_diff", "kl_0", "kl_mean")
COUNT_RULE = ("counts (n_candidates, n_tests, n_significant) have no interval: they are counts under a stated rule; "
              "see sensitivity.csv (threshold grid), baseline_random.csv (random weights) and the invariance "
              "counts' permutation null")
RMS_NOTE = ("rel_l2_rms intervals: cluster bootstrap of the ratio of mean squares over the sampled pairs, rescaled "
            "to the exact estimate; without massive dimensions each pair's clean energy is scaled by the pooled "
            "share outside them")


def _finite(x) -> float | None:
    return float(x) if x is not None and math.isfinite(float(x)) else None


def pair_mean_intervals(pairs: pd.DataFrame, cfg: BootstrapConfig) -> dict:
    """``{"mean_<x>_ci": [lo, hi]}`` for each per-pair column of :data:`MEANS` that ``pairs`` has."""
    out = {}
    if pairs is None or pairs.empty:
        return out
    clusters = pairs["cluster"].astype(str).tolist() if "cluster" in pairs else pairs["id"].astype(str).tolist()
    for col in MEANS:
        if col in pairs:
            iv = cluster_bootstrap(pd.to_numeric(pairs[col], errors="coerce").to_numpy(float), clusters, "mean", cfg)
            out[f"mean_{col}_ci"] = [_finite(iv.low), _finite(iv.high)]
    return out


def rms_intervals(res, hook: str, layer: int, cfg: BootstrapConfig, offset: int = 0) -> dict:
    """``rel_l2_rms_lo/_hi`` and ``rel_l2_rms_nomassive_lo/_hi`` at ``(hook, layer, offset)`` over all pairs."""
    nan = {k: None for k in ("rel_l2_rms_lo", "rel_l2_rms_hi", "rel_l2_rms_nomassive_lo", "rel_l2_rms_nomassive_hi")}
    keys = res.tensors["sample/keys"]
    mem = res.by_pair_id(torch.nonzero(torch.isfinite(keys) & (res.tensors["sample/category"] >= 0)).flatten())
    if len(mem) < 2 or offset not in res.offsets:
        return nan
    oi = res.offsets.index(offset)
    li = res.group(hook).layers.index(layer)
    # one (offset, layer) of the sample, then its pairs: the other order copied the whole sample (88 MB at 512 pairs)
    d = res.hook_sample(hook, "sample_delta", oi, li).index_select(0, mem).to(torch.float64)  # [s, D]
    rl = res.hook_sample(hook, "sample_rel_l2", oi, li).index_select(0, mem).to(torch.float64)  # [s]
    ok = res.tensors["sample/valid"].index_select(0, mem)[:, oi] & torch.isfinite(rl) & (rl > 0)
    st = res.cell_stats(hook, "all")
    massive = st["massive"][li, oi].bool()
    d2 = (d * d).sum(-1)
    a2 = d2 / rl.clamp_min(1e-300) ** 2
    # share of the pooled clean energy outside the massive dimensions (the per-pair split is not kept)
    rms_clean = st["rms_clean"][li, oi].to(torch.float64)
    e_a2 = rms_clean * rms_clean
    share = float(e_a2[~massive].sum() / e_a2.sum()) if float(e_a2.sum()) > 0 else float("nan")
    clusters = res.sample_clusters(mem)
    out = {}
    for name, num, den, exact in (
            ("rel_l2_rms", d2, a2, st["rel_l2_rms"][li, oi]),
            ("rel_l2_rms_nomassive", (d[:, ~massive] ** 2).sum(-1), a2 * share, st["rel_l2_rms_nomassive"][li, oi])):
        v = torch.stack([num, den], 1)[ok].numpy()
        iv = cluster_bootstrap(v, [c for c, k in zip(clusters, ok.tolist()) if k], "ratio", cfg)
        ex = float(exact)
        if not (math.isfinite(iv.estimate) and iv.estimate > 0 and math.isfinite(ex)):
            out[f"{name}_lo"] = out[f"{name}_hi"] = None
            continue
        scale = ex / math.sqrt(iv.estimate)  # the interval of the ratio of mean squares, as a root, around ex
        out[f"{name}_lo"] = _finite(math.sqrt(max(iv.low, 0)) * scale)
        out[f"{name}_hi"] = _finite(math.sqrt(max(iv.high, 0)) * scale)
    return out


def add_intervals(res, summary: dict) -> dict:
    """``summary`` (a diff summary) with the intervals of this module and ``interval_notes`` added."""
    cfg = BootstrapConfig(n_boot=int(res.config.n_boot), seed=int(res.config.seed))
    s = dict(summary)
    s.update(pair_mean_intervals(res.pairs, cfg))
    top = {}
    for hook, v in (s.get("max_rel_l2_at_p") or {}).items():
        top[hook] = {**v, **rms_intervals(res, hook, int(v["layer"]), cfg)} if isinstance(v, dict) else v
    s["max_rel_l2_at_p"] = top
    s["interval_notes"] = {"counts": COUNT_RULE, "rel_l2_rms": RMS_NOTE,
                           "means": "mean_<x>_ci: full cluster bootstrap over every pair (pairs.csv)"}
    return s


__all__ = ["COUNT_RULE", "MEANS", "add_intervals", "pair_mean_intervals", "rms_intervals"]
