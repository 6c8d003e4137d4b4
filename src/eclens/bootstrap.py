"""Intervals that respect clusters: a full cluster bootstrap and a streaming, mergeable Poisson bootstrap.

Pairs made from one frame (a cluster) are not independent, so every interval resamples
clusters, never pairs.

*Full cluster bootstrap* (:func:`cluster_bootstrap`), for headline and layer-level
numbers: draw clusters with replacement ``n_boot`` times. Drawing clusters with
replacement is the same as giving every row the multinomial count of its cluster as a
weight, so the built-in statistics (``mean``, ``median``, ``ratio`` of means) are
computed for all replicates at once from a ``[n_boot, n_rows]`` weight matrix; any other
statistic is a function ``f(values, weights) -> float`` called per replicate.
Percentile or BCa intervals (BCa's acceleration from the leave-one-cluster-out jackknife).

*Poisson bootstrap* (:class:`PoissonBootstrap`), for per-cell intervals over hundreds of
thousands of cells in one streaming pass: each cluster gets ``B`` independent Poisson(1)
weights (Hanley & MacGibbon 2006; Chamandy et al. 2012), drawn from
``blake2b(seed, cluster id, replicate)`` by the inverse CDF of Poisson(1). A cluster's
weights depend on nothing else, so shards, processes and reruns draw the same weights and
the per-replicate weighted sums merge exactly by addition. Replicate 0 has weight 1 (the
point estimate). Intervals: ``estimate ± z · sd`` over replicates (``normal``, default:
the standard deviation is well estimated by B = 100 where the 2.5 % tail is not) or
``percentile``.

Both follow one accumulator protocol (``update`` / ``merge`` / ``state_dict`` /
``from_state``) like baukit's runningstats.
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Callable, Hashable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from jaxtyping import Float
from scipy.special import ndtri
from scipy.stats import norm, poisson

from .errors import EclensError

Statistic = Callable[[np.ndarray, np.ndarray], float]
BUILTIN = ("mean", "median", "ratio")
_POIS_CDF = poisson.cdf(np.arange(40), 1.0)  # inverse-CDF table of Poisson(1); P(K >= 40) < 1e-47


@dataclass(frozen=True)
class BootstrapConfig:
    """``n_boot`` cluster resamples; ``level`` the coverage; ``method`` ``percentile`` or ``bca``."""

    n_boot: int = 2000
    level: float = 0.95
    method: str = "percentile"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in ("percentile", "bca"):
            raise EclensError(f"bootstrap method must be 'percentile' or 'bca', got {self.method!r}")
        if not 0 < self.level < 1:
            raise EclensError(f"bootstrap level must be between 0 and 1, got {self.level}")
        if self.n_boot < 10:
            raise EclensError(f"n_boot must be at least 10, got {self.n_boot}")


@dataclass(frozen=True)
class Interval:
    estimate: float
    low: float
    high: float
    level: float
    method: str
    n_clusters: int
    n: int

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return f"{self.estimate:.3g} [{self.low:.3g}, {self.high:.3g}]"


def cluster_codes(clusters: Sequence[Hashable]) -> tuple[np.ndarray, int]:
    """Integer codes ``0..G-1`` of ``clusters`` (first-seen order) and ``G``."""
    index: dict[Hashable, int] = {}
    codes = np.fromiter((index.setdefault(c, len(index)) for c in clusters), dtype=np.int64, count=len(clusters))
    return codes, len(index)


# ------------------------------------------------------------------------ weighted statistics


def weighted_mean(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Mean of ``x [n]`` under each row of weights ``w [R, n]``."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return (w @ x) / w.sum(-1)


def weighted_median(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """The median of the multiset in which row ``i`` of ``x`` occurs ``w[r, i]`` times, per row ``r``
    (integer weights: exactly the resampled data's median, the mean of the two middle values when even)."""
    order = np.argsort(x, kind="stable")
    xs = x[order]
    c = np.cumsum(w[:, order], axis=1)
    total = c[:, -1]
    lo = np.floor((total - 1) / 2)
    hi = np.floor(total / 2)
    i_lo = (c > lo[:, None]).argmax(1)
    i_hi = (c > hi[:, None]).argmax(1)
    out = (xs[i_lo] + xs[i_hi]) / 2
    return np.where(total > 0, out, np.nan)


def _builtin(name: str, values: np.ndarray, w: np.ndarray) -> np.ndarray:
    if name == "mean":
        return weighted_mean(values, w)
    if name == "median":
        return weighted_median(values, w)
    # ratio of means: column 0 over column 1
    with np.errstate(invalid="ignore", divide="ignore"):
        return (w @ values[:, 0]) / (w @ values[:, 1])


def _evaluate(statistic: str | Statistic, values: np.ndarray, w: np.ndarray) -> np.ndarray:
    if isinstance(statistic, str):
        return _builtin(statistic, values, w)
    return np.array([float(statistic(values, row)) for row in w])


# ------------------------------------------------------------------------ full cluster bootstrap


def _clean(values, clusters, statistic) -> tuple[np.ndarray, list]:
    if isinstance(statistic, str) and statistic not in BUILTIN:
        raise EclensError(f"statistic must be one of {', '.join(BUILTIN)} or a function, got {statistic!r}")
    x = np.asarray(values, dtype=float)
    cl = list(clusters)
    if len(cl) != len(x):
        raise EclensError(f"{len(x)} values but {len(cl)} cluster labels")
    if statistic == "ratio" and (x.ndim != 2 or x.shape[1] != 2):
        raise EclensError("the ratio statistic needs values of shape [n, 2] (numerator, denominator)")
    if len(x) == 0:  # no rows (e.g. no sentence reaches an offset): reshape(0, -1) is ambiguous
        return x, []
    keep = ~np.isnan(x.reshape(len(x), -1)).any(1)
    return x[keep], [c for c, k in zip(cl, keep) if k]


def cluster_counts(G: int, n_boot: int, seed: int) -> np.ndarray:
    """``[n_boot, G]`` read-only: how often each of ``G`` clusters is drawn in each replicate (a seeded
    multinomial per replicate, as the resampling of whole clusters gives). The same for every statistic of
    the same clusters: numpy draws a multinomial one replicate at a time, so it is drawn once and kept."""
    return _cluster_counts(int(G), int(n_boot), int(seed))


def forget_cluster_counts() -> None:
    """Drop the kept draws of :func:`cluster_counts`."""
    _cluster_counts.cache_clear()


@functools.lru_cache(maxsize=32)
def _cluster_counts(G: int, n_boot: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(G, np.full(G, 1.0 / G), size=n_boot).astype(float) if G else np.zeros((n_boot, 0))
    counts.setflags(write=False)
    return counts


def cluster_replicates(
    values: np.ndarray | Sequence[float],
    clusters: Sequence[Hashable],
    statistic: str | Statistic = "mean",
    cfg: BootstrapConfig = BootstrapConfig(),
) -> tuple[float, np.ndarray, int, int]:
    """``(estimate, replicates [n_boot], n_clusters, n_rows)`` of a cluster bootstrap (see :func:`cluster_bootstrap`);
    replicates of independent groups combine (e.g. a difference of two groups' medians)."""
    x, cl = _clean(values, clusters, statistic)
    if len(x) == 0:
        return math.nan, np.full(cfg.n_boot, np.nan), 0, 0
    codes, G = cluster_codes(cl)
    est = float(_evaluate(statistic, x, np.ones((1, len(x))))[0])
    counts = cluster_counts(G, cfg.n_boot, cfg.seed)  # [B, G]
    return est, _evaluate(statistic, x, counts[:, codes]), G, len(x)


def percentile_interval(est: float, reps: np.ndarray, n_clusters: int, n: int,
                        cfg: BootstrapConfig = BootstrapConfig()) -> Interval:
    """Percentile interval from replicates; NaN bounds with fewer than two clusters or half the replicates undefined."""
    finite = reps[np.isfinite(reps)]
    if n_clusters < 2 or len(finite) < max(10, len(reps) // 2):
        return Interval(est, math.nan, math.nan, cfg.level, "percentile", n_clusters, n)
    a = (1 - cfg.level) / 2
    lo, hi = np.quantile(finite, [a, 1 - a])
    return Interval(est, float(lo), float(hi), cfg.level, "percentile", n_clusters, n)


def cluster_bootstrap(
    values: np.ndarray | Sequence[float],
    clusters: Sequence[Hashable],
    statistic: str | Statistic = "mean",
    cfg: BootstrapConfig = BootstrapConfig(),
) -> Interval:
    """Interval for ``statistic`` of ``values`` (``[n]``, or ``[n, 2]`` for ``ratio``) resampling whole clusters.

    ``statistic``: ``mean``, ``median``, ``ratio`` (mean of column 0 over mean of column 1), or
    ``f(values, weights) -> float`` where ``weights[i]`` is how often row ``i``'s cluster was drawn.
    Rows with a NaN value are left out (a stated drop: ``Interval.n`` counts the rows used).
    """
    est, reps, G, n = cluster_replicates(values, clusters, statistic, cfg)
    finite = reps[np.isfinite(reps)]
    if G < 2 or len(finite) < cfg.n_boot // 2:
        return Interval(est, math.nan, math.nan, cfg.level, cfg.method, G, n)
    alpha = (1 - cfg.level) / 2
    q = np.array([alpha, 1 - alpha])
    if cfg.method == "bca":
        x, cl = _clean(values, clusters, statistic)
        codes, _ = cluster_codes(cl)
        q = _bca_quantiles(statistic, x, codes, G, est, finite, q)
    lo, hi = np.quantile(finite, q)
    return Interval(est, float(lo), float(hi), cfg.level, cfg.method, G, n)


def _bca_quantiles(statistic, x, codes, G, est, reps, q) -> np.ndarray:
    """Efron's bias-corrected and accelerated quantiles; acceleration from the leave-one-cluster-out jackknife."""
    prop = (np.sum(reps < est) + 0.5 * np.sum(reps == est)) / len(reps)
    if prop <= 0 or prop >= 1:
        return q
    z0 = ndtri(prop)
    jack_w = np.ones((G, len(x)))
    jack_w[codes, np.arange(len(x))] = 0.0  # row g leaves cluster g out
    jack = _evaluate(statistic, x, jack_w)
    jack = jack[np.isfinite(jack)]
    d = jack.mean() - jack
    den = 6.0 * (d**2).sum() ** 1.5
    a = (d**3).sum() / den if den > 0 else 0.0
    z = ndtri(q)
    return norm.cdf(z0 + (z0 + z) / (1 - a * (z0 + z)))


# ------------------------------------------------------------------------ Poisson bootstrap


def poisson_weights(cluster: Hashable, n_reps: int, seed: int = 0) -> np.ndarray:
    """``n_reps`` Poisson(1) weights of one cluster from ``blake2b(seed, cluster, r)``: the same in every shard."""
    key = f"{seed}".encode()
    c = str(cluster).encode("utf-8", "surrogatepass")
    u = np.empty(n_reps)
    for r in range(n_reps):
        h = hashlib.blake2b(c + b"\x1f" + str(r).encode(), digest_size=8, key=key).digest()
        u[r] = ((int.from_bytes(h, "little") >> 11) + 0.5) / 2.0**53  # uniform in (0, 1)
    return np.searchsorted(_POIS_CDF, u, side="right").astype(float)


def split_half(cluster: Hashable, seed: int = 0) -> int:
    """0 or 1: a fixed, hash-drawn half of the clusters (select on one half, test on the other)."""
    h = hashlib.blake2b(str(cluster).encode("utf-8", "surrogatepass"), digest_size=1, key=f"half{seed}".encode())
    return h.digest()[0] & 1


@dataclass(frozen=True)
class PoissonConfig:
    """``n_reps`` replicates (B); ``level`` coverage; ``method`` ``normal`` or ``percentile``."""

    n_reps: int = 100
    seed: int = 0
    level: float = 0.95
    method: str = "normal"

    def __post_init__(self) -> None:
        if self.method not in ("normal", "percentile"):
            raise EclensError(f"Poisson bootstrap method must be 'normal' or 'percentile', got {self.method!r}")
        if self.n_reps < 10:
            raise EclensError(f"n_reps must be at least 10, got {self.n_reps}")


class PoissonBootstrap:
    """Per-replicate weighted sums ``sum w`` and ``sum w·x`` (and ``sum w·y`` for ratios) over cells.

    ``update(x, clusters, mask=None, y=None)`` adds rows ``x [n, *cell]`` of clusters ``clusters`` (a row's
    ``mask`` false: not counted in that cell); ``merge(other)`` adds another shard's sums; :meth:`mean`
    and :meth:`ratio` give ``[1 + B, *cell]`` (row 0 the point estimate), :meth:`interval` the bounds.
    """

    def __init__(self, cell_shape: Sequence[int], cfg: PoissonConfig = PoissonConfig(), ratio: bool = False,
                 device: str | torch.device = "cpu"):
        self.cfg = cfg
        self.cell_shape = tuple(int(s) for s in cell_shape)
        self.has_y = ratio
        shape = (cfg.n_reps + 1, *self.cell_shape)
        self.sw = torch.zeros(shape, dtype=torch.float64, device=device)
        self.swx = torch.zeros(shape, dtype=torch.float64, device=device)
        self.swy = torch.zeros(shape, dtype=torch.float64, device=device) if ratio else None
        self.n = 0
        self._cache: dict[str, np.ndarray] = {}

    def weights(self, clusters: Sequence[Hashable]) -> Float[torch.Tensor, "reps n"]:
        """``[1 + B, n]``: 1 then the cluster's ``B`` hashed Poisson weights, per row."""
        cols = []
        for c in clusters:
            k = str(c)
            w = self._cache.get(k)
            if w is None:
                w = self._cache[k] = np.concatenate([[1.0], poisson_weights(k, self.cfg.n_reps, self.cfg.seed)])
            cols.append(w)
        return torch.from_numpy(np.stack(cols, 1)).to(self.sw.device)

    def update(self, x: torch.Tensor, clusters: Sequence[Hashable], mask: torch.Tensor | None = None,
               y: torch.Tensor | None = None) -> None:
        n = x.shape[0]
        if len(clusters) != n:
            raise EclensError(f"{n} rows but {len(clusters)} cluster labels")
        if tuple(x.shape[1:]) != self.cell_shape:
            raise EclensError(f"rows of shape {tuple(x.shape[1:])} where the accumulator has {self.cell_shape}")
        if self.has_y != (y is not None):
            raise EclensError("a ratio accumulator needs y (and a mean accumulator takes none)")
        W = self.weights(clusters)  # [R, n]
        x = x.to(self.sw.device, torch.float64).reshape(n, -1)
        m = (torch.ones_like(x) if mask is None else mask.to(self.sw.device).reshape(n, -1).to(torch.float64))
        x = torch.where(m > 0, x, torch.zeros_like(x))  # a masked NaN must not poison the sums
        R = W.shape[0]
        self.sw += (W @ m).reshape(R, *self.cell_shape)
        self.swx += (W @ x).reshape(R, *self.cell_shape)
        if y is not None:
            y = y.to(self.sw.device, torch.float64).reshape(n, -1)
            self.swy += (W @ torch.where(m > 0, y, torch.zeros_like(y))).reshape(R, *self.cell_shape)
        self.n += n

    def merge(self, other: PoissonBootstrap) -> None:
        if (other.cfg, other.cell_shape, other.has_y) != (self.cfg, self.cell_shape, self.has_y):
            raise EclensError("cannot merge Poisson bootstraps of different settings or cells")
        self.sw += other.sw.to(self.sw.device)
        self.swx += other.swx.to(self.sw.device)
        if self.has_y:
            self.swy += other.swy.to(self.sw.device)
        self.n += other.n

    def state_dict(self) -> dict:
        d = {"cfg": asdict(self.cfg), "cell_shape": list(self.cell_shape), "ratio": self.has_y, "n": self.n,
             "sw": self.sw.cpu(), "swx": self.swx.cpu()}
        if self.has_y:
            d["swy"] = self.swy.cpu()
        return d

    @classmethod
    def from_state(cls, d: dict, device: str | torch.device = "cpu") -> PoissonBootstrap:
        acc = cls(d["cell_shape"], PoissonConfig(**d["cfg"]), ratio=bool(d["ratio"]), device=device)
        acc.sw.copy_(d["sw"])
        acc.swx.copy_(d["swx"])
        if acc.has_y:
            acc.swy.copy_(d["swy"])
        acc.n = int(d["n"])
        return acc

    def mean(self) -> torch.Tensor:
        return self.swx / self.sw

    def ratio(self) -> torch.Tensor:
        """Ratio of means ``mean(x) / mean(y)`` per replicate (the weight sums cancel)."""
        if not self.has_y:
            raise EclensError("ratio() needs an accumulator made with ratio=True")
        return self.swx / self.swy

    def interval(self, reps: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(estimate, low, high)`` per cell from ``reps [1 + B, *cell]`` (default: :meth:`mean`)."""
        return replicate_interval(self.mean() if reps is None else reps, self.cfg)


def replicate_interval(reps: torch.Tensor, cfg: PoissonConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Interval from replicate estimates ``[1 + B, *cell]``, row 0 the point estimate."""
    est, r = reps[0], reps[1:]
    if cfg.method == "normal":
        sd = r.std(0)
        z = float(ndtri(1 - (1 - cfg.level) / 2))
        return est, est - z * sd, est + z * sd
    a = (1 - cfg.level) / 2
    q = torch.tensor([a, 1 - a], dtype=r.dtype, device=r.device)
    lo, hi = torch.nanquantile(r, q, dim=0)
    return est, lo, hi
