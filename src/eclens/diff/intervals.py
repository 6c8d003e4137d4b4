"""Cluster-bootstrap intervals and cluster-permutation tests of layer-level numbers, vectorised over cells.

:func:`eclens.bootstrap.cluster_bootstrap` resamples clusters for one statistic; the layer tables need
the same interval for thousands of (hook, layer, offset) cells from the same pairs, so the replicate
weights (each row's cluster drawn ``k`` times, the multinomial counts of :func:`cluster_replicates`)
are drawn once and applied to all cells with one matrix product.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import numpy as np
from jaxtyping import Bool, Float

from ..bootstrap import cluster_codes


def cluster_weights(clusters: Sequence[Hashable], n_boot: int, seed: int = 0) -> np.ndarray:
    """``[n_boot, n]`` weights: how often each row's cluster is drawn in each replicate."""
    codes, G = cluster_codes(list(clusters))
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(G, np.full(G, 1.0 / G), size=n_boot).astype(float) if G else np.zeros((n_boot, 0))
    return counts[:, codes]


def masked_means(values: Float[np.ndarray, "n cells"], ok: Bool[np.ndarray, "n cells"],
                 w: Float[np.ndarray, "reps n"]) -> Float[np.ndarray, "reps cells"]:
    """Weighted means of each column over its valid rows, for each row of weights (NaN where no weight)."""
    x = np.where(ok, values, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (w @ x) / (w @ ok.astype(float))


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
    with np.errstate(all="ignore"):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns: NaN bounds, said by NaN
            lo, hi = np.nanquantile(reps, [a, 1 - a], axis=0)
    return lo, hi
