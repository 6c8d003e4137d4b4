"""Category contrasts as effect sizes with intervals, tested by permuting group labels across clusters.

The first edition ran a Mann–Whitney test per dimension (518,400 tests on the committed study) over
pairs that share frames: one effect counted many times (pseudo-replication), and a count of
"significant" tests no reader can interpret. Here a contrast is one number per (group pair,
measure, hook, layer, offset): the difference of the groups' mean per-pair change, with

* a cluster-bootstrap interval (each group's clusters resampled on their own), and
* a permutation p-value: the group labels are permuted across the units (a cluster within a
  group), so the pairs of one frame move together, as the null of "no group difference" allows;
  Benjamini–Hochberg q-values over all rows of a measure.

Measures, per sampled pair: ``rel_l2`` (‖Δ‖/‖a_clean‖ of the layer) and ``absz_mean`` (the mean of
``|Δ|/σ`` over the layer's dimensions, massive ones and σ = 0 left out).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float

from ..blas import one_blas_thread
from ..stats import F64, bh_qvalues
from .intervals import cluster_weights, nan_quantiles

if TYPE_CHECKING:
    from .result import DiffResult

COLUMNS = ["contrast", "group_a", "group_b", "measure", "hook", "layer", "offset", "n_a", "n_b", "clusters_a",
           "clusters_b", "mean_a", "mean_b", "effect", "effect_lo", "effect_hi", "p", "q", "significant"]


def unit_sums(x: Float[np.ndarray, "n cells"], ok: Bool[np.ndarray, "n cells"], units: np.ndarray, U: int
              ) -> tuple[np.ndarray, np.ndarray]:
    """Per unit the sum of valid values and their number, ``[U, cells]`` each."""
    S = np.zeros((U, x.shape[1]))
    N = np.zeros((U, x.shape[1]))
    np.add.at(S, units, np.where(ok, x, 0.0))
    np.add.at(N, units, ok.astype(float))
    return S, N


def permutation_effects(S: np.ndarray, N: np.ndarray, is_a: np.ndarray, n_perm: int, seed: int) -> np.ndarray:
    """``[n_perm, cells]`` differences of means (a minus b) with the units' labels permuted."""
    A, B = permuted_labels(is_a.tobytes(), len(is_a), n_perm, seed)
    with np.errstate(invalid="ignore", divide="ignore"), one_blas_thread():
        return (A @ S) / (A @ N) - (B @ S) / (B @ N)


@functools.lru_cache(maxsize=8)
def permuted_labels(is_a: bytes, U: int, n_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The permuted labels ``A`` ``[P, U]`` (1: group a) and ``1 - A``, read-only. One contrast reads the same
    ones for every hook, layer and measure: made once, they were half of the contrasts' time (a Python loop
    of ``n_perm`` permutations per call)."""
    rng = np.random.default_rng(seed)
    labels = np.frombuffer(is_a, dtype=bool, count=U)
    A = np.stack([rng.permutation(labels) for _ in range(n_perm)]).astype(float)
    B = 1 - A
    A.flags.writeable = B.flags.writeable = False
    return A, B


def forget_permutations() -> None:
    """Drop the kept permuted labels (:func:`permuted_labels`): up to megabytes each."""
    permuted_labels.cache_clear()


def effect_table(x: np.ndarray, ok: np.ndarray, group: np.ndarray, clusters: list[str], n_boot: int, n_perm: int,
                 seed: int, level: float = 0.95) -> dict[str, np.ndarray]:
    """Effect (mean of group 1 minus group 0) per cell with its interval and permutation p-value.
    ``x``/``ok`` ``[n, cells]``, ``group`` ``[n]`` in {0: b, 1: a}, ``clusters`` ``[n]``."""
    keys = [(int(g), c) for g, c in zip(group, clusters)]
    index: dict = {}
    units = np.array([index.setdefault(k, len(index)) for k in keys])
    U = len(index)
    is_a = np.zeros(U, dtype=bool)
    for (g, _), u in index.items():
        is_a[u] = g == 1
    S, N = unit_sums(x, ok, units, U)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_a = S[is_a].sum(0) / N[is_a].sum(0)
        mean_b = S[~is_a].sum(0) / N[~is_a].sum(0)
    eff = mean_a - mean_b
    reps = []
    for k, sel in enumerate((is_a, ~is_a)):  # each group's clusters resampled on their own
        w = cluster_weights(list(np.nonzero(sel)[0]), n_boot, seed + 1 + k)
        with np.errstate(invalid="ignore", divide="ignore"), one_blas_thread():
            reps.append((w @ S[sel]) / (w @ N[sel]))
    rep = reps[0] - reps[1]
    a = (1 - level) / 2
    enough = (is_a.sum() >= 2) & ((~is_a).sum() >= 2)
    if enough:
        lo, hi = nan_quantiles(rep, (a, 1 - a))
    else:
        lo = hi = np.full(eff.shape, np.nan)
    perm = permutation_effects(S, N, is_a, n_perm, seed)
    with np.errstate(invalid="ignore"):
        extreme = (np.abs(perm) >= np.abs(eff)[None] - 1e-12).sum(0)
    p = np.where(np.isfinite(eff), (1 + extreme) / (1 + n_perm), np.nan)
    return {"mean_a": mean_a, "mean_b": mean_b, "effect": eff, "effect_lo": lo, "effect_hi": hi, "p": p,
            "clusters_a": int(is_a.sum()), "clusters_b": int((~is_a).sum())}


def compute_contrasts(result: DiffResult) -> pd.DataFrame:
    """The rows of :attr:`DiffResult.contrasts`: every pair of category groups (first path component) with at
    least ``min_group`` sampled pairs, at each of ``contrast_offsets``."""
    cfg = result.config
    if not cfg.categories:
        return pd.DataFrame(columns=COLUMNS)
    rows_cat = [c for c, _, _ in cfg.rows]
    cat = result.tensors["sample/category"]
    keys = result.tensors["sample/keys"]
    ok = torch.isfinite(keys) & (cat >= 0)
    names = sorted({c.split("/", 1)[0] for c in cfg.categories})
    gidx = torch.tensor([names.index(c.split("/", 1)[0]) for c in rows_cat] + [-1], dtype=torch.long)
    sgroup = torch.where(ok, gidx[cat.clamp_min(0)], torch.full_like(cat, -1))
    frames = []
    for off in cfg.contrast_offsets:
        if off not in result.offsets:
            continue
        oi = result.offsets.index(off)
        valid = result.tensors["sample/valid"][:, oi] & (sgroup >= 0)
        for ia in range(len(names)):
            for ib in range(ia + 1, len(names)):
                mem = result.by_pair_id(torch.nonzero(valid & ((sgroup == ia) | (sgroup == ib))).flatten())
                grp = (sgroup.index_select(0, mem) == ia).numpy().astype(int)
                na, nb = int(grp.sum()), int(len(grp) - grp.sum())
                if na < cfg.min_group or nb < cfg.min_group:
                    continue
                clusters = result.sample_clusters(mem)
                for g in result.groups:
                    st = result.clean_spread(g.suffix)
                    sigma = st["sigma_clean"][:, oi, :]  # [L, D]
                    keep = (sigma > 0) & ~st["massive"][:, oi, :]
                    inv = torch.where(keep, 1 / sigma.clamp_min(1e-300), torch.zeros((), dtype=F64))
                    # the offset first, then the pairs: the other order copied every offset of the sample
                    sd = result.hook_sample(g.suffix, "sample_delta", oi).index_select(0, mem).to(F64)  # [s, L, D]
                    absz = sd.abs_().mul_(inv).sum(-1) / keep.sum(-1).clamp_min(1)  # [s, L]
                    rl = result.hook_sample(g.suffix, "sample_rel_l2", oi).index_select(0, mem).to(F64)  # [s, L]
                    for measure, x in (("rel_l2", rl), ("absz_mean", absz)):
                        xv = x.numpy()
                        okv = np.isfinite(xv)
                        t = effect_table(xv, okv, grp, clusters, cfg.n_boot, cfg.n_perm, cfg.seed)
                        frames.append(pd.DataFrame({
                            "contrast": f"{names[ia]} vs {names[ib]}", "group_a": names[ia], "group_b": names[ib],
                            "measure": measure, "hook": g.suffix, "layer": np.array(g.layers), "offset": off,
                            "n_a": na, "n_b": nb, **t}))
    if not frames:
        return pd.DataFrame(columns=COLUMNS)
    df = pd.concat(frames, ignore_index=True)
    df["q"] = np.nan
    for _measure, idx in df.groupby("measure").groups.items():
        df.loc[idx, "q"] = bh_qvalues(df.loc[idx, "p"].to_numpy())
    df["significant"] = df["q"] <= cfg.alpha
    return df[COLUMNS]
