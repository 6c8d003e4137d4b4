"""Cluster-bootstrap intervals and cluster-permutation tests of layer-level numbers, vectorised over cells.

:func:`eclens.bootstrap.cluster_bootstrap` resamples clusters for one statistic; the layer tables need
the same interval for thousands of (hook, layer, offset) cells from the same pairs, so the replicate
weights (each row's cluster drawn ``k`` times, the multinomial counts of :func:`cluster_replicates`)
are drawn once and applied to all cells with one matrix product.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from functools import lru_cache

import numpy as np
from jaxtyping import Bool, Float

from ..blas import one_blas_thread
from ..bootstrap import cluster_codes, cluster_counts, forget_cluster_counts


def cluster_weights(clusters: Sequence[Hashable], n_boot: int, seed: int = 0) -> np.ndarray:
    """``[n_boot, n]`` weights: how often each row's cluster is drawn in each replicate (read-only: the same
    draw serves every hook of a group, and numpy's multinomial draws one row at a time)."""
    return _cluster_weights(tuple(clusters), n_boot, seed)


def forget_cluster_weights() -> None:
    """Drop the cached draws of :func:`cluster_weights` (tens of MB once a run's groups have been drawn)."""
    _cluster_weights.cache_clear()
    forget_cluster_counts()


@lru_cache(maxsize=64)  # a run's groups (about 30 for the default templates), each drawn once for every hook
def _cluster_weights(clusters: tuple, n_boot: int, seed: int) -> np.ndarray:
    codes, G = cluster_codes(list(clusters))
    w = cluster_counts(G, n_boot, seed)[:, codes]
    w.setflags(write=False)
    return w


def masked_means(values: Float[np.ndarray, "n cells"], ok: Bool[np.ndarray, "n cells"],
                 w: Float[np.ndarray, "reps n"]) -> Float[np.ndarray, "reps cells"]:
    """Weighted means of each column over its valid rows, for each row of weights (NaN where no weight)."""
    x = np.where(ok, values, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"), one_blas_thread():
        return (w @ x) / (w @ ok.astype(float))


def nan_quantiles(x: Float[np.ndarray, "reps cells"], qs: Sequence[float]) -> Float[np.ndarray, "q cells"]:
    """``np.nanquantile(x, qs, axis=0)`` (linear interpolation) for every column at once: numpy's runs a
    Python-level loop over columns, most of the time of the layer intervals. NaN for an all-NaN column."""
    xs = np.sort(x, axis=0)  # NaN last
    k = (~np.isnan(x)).sum(0)
    out = []
    for q in qs:
        pos = q * np.clip(k - 1, 0, None)
        lo = np.floor(pos).astype(np.int64)
        hi = np.ceil(pos).astype(np.int64)
        frac = pos - lo
        a = np.take_along_axis(xs, lo[None], 0)[0]
        b = np.take_along_axis(xs, hi[None], 0)[0]
        with np.errstate(invalid="ignore"):
            r = np.where(frac == 0, a, a + (b - a) * frac)
        out.append(np.where(k > 0, r, np.nan))
    return np.stack(out)


def mean_intervals(values: Float[np.ndarray, "n cells"], ok: Bool[np.ndarray, "n cells"],
                   clusters: Sequence[Hashable], n_boot: int = 1000, level: float = 0.95, seed: int = 0
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Percentile cluster-bootstrap intervals ``(lo, hi)`` ``[cells]`` of each column's mean over its valid rows.
    NaN with fewer than two clusters (no interval can be drawn from one)."""
    n_cells = values.shape[1]
    nan = np.full(n_cells, np.nan)
    if len(set(clusters)) < 2 or n_cells == 0:
        return nan, nan.copy()
    reps = masked_means(values, ok, cluster_weights(clusters, n_boot, seed))
    a = (1 - level) / 2
    lo, hi = nan_quantiles(reps, (a, 1 - a))  # all-NaN columns: NaN bounds, said by NaN
    return lo, hi
