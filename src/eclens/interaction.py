"""The 2x2 designs' recovery estimand: error vs twin with cluster effects (DESIGN.md, "Recovery").

A 2x2 design (agreement: subject number x verb number; anaphor: antecedent x reflexive gender) gives
per frame (cluster) two error cells — ``subj_sg:verb_pl`` (clean ``sg:sg`` → ``sg:pl``) and
``subj_pl:verb_sg`` (``pl:pl`` → ``pl:sg``) — each with a twin (the same word changed acceptably). Per
pair we have an outcome ``y``: the log KL decay ``log(KL(k)/KL(0))`` at offset ``k`` after detect (and
at the last token), and the clean continuation's suffix log-prob difference. The model, per category and
outcome, over the pairs of couples (an error cell and its twin, both measured)::

    y = cluster effect + b_err * error + b_cell * cell + b_int * error * cell + b_kl0 * log KL(0) + e

with ``error`` 1/0, ``cell`` coded ±½ (the two error cells), and cluster fixed effects (each frame its own
level: the frame's length, vocabulary and how the model reads it cancel).

Why this and not the within-cluster paired index alone:

- ``b_err`` is **the 2x2 interaction**. Each frame contributes both error cells, so each verb form (or
  reflexive) is the changed-to token once in an error and the main effect of the token's identity cancels
  in the cell-balanced average (±½ coding makes ``b_err`` the mean over the two cells, not a weighted one);
  what remains is what the subject x verb mismatch adds beyond an acceptable change of the same word (the
  twin). For the suffix log-prob this is literally the interaction contrast: the two error pairs' sum is
  ``Y(sg,pl) + Y(pl,sg) − Y(sg,sg) − Y(pl,pl)``.
- **Adjusted for the change at detect** (DESIGN.md): errors register more strongly than twins at detect,
  and a larger initial change may decay differently whatever its kind; ``log KL(0)`` as a covariate
  (ANCOVA) compares errors and twins at the same initial change. The paired index only normalises by it.
- ``b_int`` says whether the error effect differs between the two cells (the swap directions), which the
  design asks to report beside the pooled number.
- A linear model with fixed effects is a mean, not the paired index's median: its full cluster bootstrap
  (clusters resampled with replacement, the model refitted — exact because fixed effects make each
  cluster's contribution to ``X'X`` and ``X'y`` separate) carries the frames' dependence, and the
  permutation p (error and twin labels swapped within each couple at random, the model refitted) needs no
  normality. It is Freedman-Lane's: the residuals of the model without the tested term are exchanged
  between the error and the twin of a couple (exchangeable under that term's null), because exchanging
  the labels themselves would break their correlation with ``log KL(0)`` and make p too small.

Rows: ``recovery_2x2.csv`` — category, outcome, term, estimate, low, high, p_perm, n_clusters,
n_couples, cells. Categories without 2x2 cells give no rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from .bootstrap import BootstrapConfig

TERMS = ("error_effect", "error_x_cell", "cell", "log_kl0")
COLUMNS = ["category", "outcome", "term", "estimate", "low", "high", "p_perm", "n_clusters", "n_couples",
           "n_permutations", "cells"]


def design_columns(pairs: Sequence) -> pd.DataFrame:
    """Per pair id: its 2x2 ``cell`` (a twin takes its error's) and ``couple`` (the error's id), for the
    pairs of 2x2 designs only (records with ``meta['design'] == '2x2'`` and their twins)."""
    cell_of = {a.id: str(a.pair.role) for a in pairs if a.pair.meta.get("design") == "2x2"}
    rows = [{"id": i, "cell": c, "couple": i} for i, c in cell_of.items()]
    rows += [{"id": a.id, "cell": cell_of[a.pair.twin_of], "couple": a.pair.twin_of} for a in pairs
             if a.pair.is_twin and a.pair.twin_of in cell_of]
    return pd.DataFrame(rows, columns=["id", "cell", "couple"])


def _within(X: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """``X`` minus its mean within each group (the cluster fixed effects, by Frisch-Waugh-Lovell)."""
    out = X.astype(float).copy()
    for g in np.unique(groups):
        m = groups == g
        out[m] -= out[m].mean(0)
    return out


def _design(err: np.ndarray, cell: np.ndarray, kl0: np.ndarray) -> np.ndarray:
    return np.column_stack([err, cell, err * cell, kl0])


def _solve(xtx: np.ndarray, xty: np.ndarray) -> np.ndarray:
    """Batched least squares from cross-products (``[..., p, p]``, ``[..., p]``); NaN where singular."""
    out = np.full(xty.shape, np.nan)
    ok = np.abs(np.linalg.det(xtx)) > 1e-12 * np.maximum(1.0, np.abs(xtx).max(axis=(-1, -2))) ** xtx.shape[-1]
    if ok.any():
        out[ok] = np.linalg.solve(xtx[ok], xty[ok][..., None])[..., 0]
    return out


def fit_2x2(df: pd.DataFrame, y: str, boot: BootstrapConfig = BootstrapConfig(), n_perm: int = 1000) -> list[dict]:
    """The model of the module docstring for one category and outcome column ``y``. ``df``: one row per pair
    with ``cluster``, ``role`` (error/twin), ``cell``, ``couple``, ``kl0_changed`` and ``y``. Returns one dict
    per term (estimate, percentile cluster-bootstrap interval, two-sided permutation p)."""
    d = df[np.isfinite(df[y].to_numpy(float)) & np.isfinite(df["kl0_changed"].to_numpy(float))]
    # only complete couples: an error without its twin (or the reverse) has nothing to be compared with
    full = d.groupby("couple")["role"].agg(lambda r: set(r) == {"error", "twin"})
    d = d[d["couple"].isin(full[full].index)].sort_values(["cluster", "couple", "role"]).reset_index(drop=True)
    cells = sorted(d["cell"].unique())
    base = {"n_clusters": int(d["cluster"].nunique()), "n_couples": int(d["couple"].nunique()),
            "n_permutations": n_perm, "cells": " / ".join(cells)}
    nan = {"estimate": np.nan, "low": np.nan, "high": np.nan, "p_perm": np.nan}
    if len(cells) != 2 or base["n_clusters"] < 3:
        return [{"term": t, **nan, **base} for t in TERMS]
    err = (d["role"] == "error").to_numpy(float)
    cell = np.where(d["cell"] == cells[0], 0.5, -0.5)
    kl0 = np.log(np.maximum(d["kl0_changed"].to_numpy(float), 1e-4))
    yv = d[y].to_numpy(float)
    cl = d["cluster"].to_numpy()
    X = _within(_design(err, cell, kl0), cl)
    yw = _within(yv[:, None], cl)[:, 0]
    codes, uniq = pd.factorize(cl)
    C = len(uniq)
    # per-cluster cross-products: a bootstrap draw of clusters is a weighted sum of them
    A = np.zeros((C, 4, 4))
    b = np.zeros((C, 4))
    np.add.at(A, codes, X[:, :, None] * X[:, None, :])
    np.add.at(b, codes, X * yw[:, None])
    est = _solve(A.sum(0)[None], b.sum(0)[None])[0]
    rng = np.random.default_rng(boot.seed)
    w = rng.multinomial(C, np.full(C, 1.0 / C), size=boot.n_boot).astype(float)
    reps = _solve(np.einsum("bc,cij->bij", w, A), np.einsum("bc,ci->bi", w, b))
    a = (1 - boot.level) / 2
    low, high = np.nanquantile(reps, a, axis=0), np.nanquantile(reps, 1 - a, axis=0)
    # permutation (Freedman-Lane): the residuals of the model without the tested term, swapped between the
    # error and the twin of randomly chosen couples, added back to that model's fit, the full model refitted.
    # Swapping the labels themselves would break their correlation with KL(0) and make p too small.
    first = d.groupby("couple", sort=False).indices
    pos = np.array([v[:2] for v in first.values() if len(v) == 2])  # [couples, 2] rows of each couple
    flips = rng.integers(0, 2, size=(n_perm, len(pos))).astype(bool)
    idx = np.tile(np.arange(len(d)), (n_perm, 1))
    for j, (r0, r1) in enumerate(pos):
        idx[flips[:, j], r0], idx[flips[:, j], r1] = r1, r0
    p = np.full(4, np.nan)
    xtx = A.sum(0)
    for k in (0, 2):  # error_effect, error_x_cell
        keep = [i for i in range(4) if i != k]
        Z = X[:, keep]
        g = _solve((Z.T @ Z)[None], (Z.T @ yw)[None])[0]
        fit = Z @ g
        yp = fit[None, :] + (yw - fit)[idx]
        perm = _solve(np.broadcast_to(xtx, (n_perm, 4, 4)), yp @ X)
        p[k] = (1 + (np.abs(perm[:, k]) >= np.abs(est[k]) - 1e-12).sum()) / (1 + n_perm)
    names = ("error_effect", "cell", "error_x_cell", "log_kl0")
    out = {n: {"term": n, "estimate": float(est[i]), "low": float(low[i]), "high": float(high[i]),
               "p_perm": float(p[i]), **base}
           for i, n in enumerate(names)}
    return [out[t] for t in TERMS]


def interaction_table(pairs_df: pd.DataFrame, design: pd.DataFrame, outcomes: Sequence[str],
                      boot: BootstrapConfig = BootstrapConfig(), n_perm: int = 1000) -> pd.DataFrame:
    """``recovery_2x2.csv``: :func:`fit_2x2` per 2x2 category and outcome (``outcomes``: columns of the
    recovery pairs table, e.g. ``decay_1 .. decay_last, suffix_changed``)."""
    if design.empty:
        return pd.DataFrame(columns=COLUMNS)
    df = pairs_df.merge(design, on="id", how="inner")
    rows = []
    for cat, g in df.groupby("category", sort=True):
        for y in outcomes:
            if y in g.columns:
                rows += [{"category": cat, "outcome": y, **r} for r in fit_2x2(g, y, boot, n_perm)]
    return pd.DataFrame(rows, columns=COLUMNS)


def headline_rows(table: pd.DataFrame, outcome: str = "decay_last") -> list[dict]:
    """The error effect (the 2x2 interaction) at ``outcome`` per category, for summaries and the headline."""
    if table is None or table.empty:
        return []
    t = table[(table["term"] == "error_effect") & (table["outcome"] == outcome)]

    def f(x):
        return float(x) if x is not None and np.isfinite(x) else None

    return [{"category": r.category, "outcome": outcome, "estimate": f(r.estimate), "low": f(r.low),
             "high": f(r.high), "p_perm": f(r.p_perm), "n_clusters": int(r.n_clusters), "cells": r.cells}
            for r in t.itertuples(index=False)]


__all__ = ["COLUMNS", "TERMS", "design_columns", "fit_2x2", "headline_rows", "interaction_table"]
