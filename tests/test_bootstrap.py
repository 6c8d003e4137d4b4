"""Cluster intervals: coverage on synthetic clustered data, exact shard merges, hashed weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from eclens.bootstrap import (
    BootstrapConfig,
    PoissonBootstrap,
    PoissonConfig,
    cluster_bootstrap,
    poisson_weights,
    split_half,
    weighted_median,
)
from eclens.errors import EclensError

N_DRAWS = 200


def clustered(rng, n_clusters=30, cells=1):
    """Rows of ``n_clusters`` clusters of 2-8 rows; a cluster effect as large as the row noise (true mean 0)."""
    sizes = rng.integers(2, 9, n_clusters)
    cl = np.repeat(np.arange(n_clusters), sizes)
    x = rng.normal(size=(n_clusters, cells))[cl] + rng.normal(size=(len(cl), cells))
    return x, cl


@pytest.mark.parametrize("stat,method", [("mean", "percentile"), ("median", "percentile"), ("mean", "bca"),
                                         ("ratio", "percentile")])
def test_cluster_bootstrap_coverage(stat, method):
    rng = np.random.default_rng(1)
    cfg = BootstrapConfig(n_boot=600, method=method, seed=2)
    hits = 0
    for _ in range(N_DRAWS):
        x, cl = clustered(rng, n_clusters=40, cells=2)
        if stat == "ratio":
            vals, truth = np.stack([2 + x[:, 0], 1 + 0.2 * x[:, 1]], 1), 2.0
        else:
            vals, truth = x[:, 0], 0.0
        iv = cluster_bootstrap(vals, cl, stat, cfg)
        hits += iv.low <= truth <= iv.high
    assert hits / N_DRAWS >= 0.90, f"{stat}/{method} coverage {hits / N_DRAWS:.3f}"


def test_cluster_bootstrap_ignores_within_cluster_copies():
    # Ten copies of each row change nothing a cluster bootstrap can see: the interval stays as wide.
    rng = np.random.default_rng(0)
    x, cl = clustered(rng)
    a = cluster_bootstrap(x[:, 0], cl, "mean", BootstrapConfig(n_boot=2000))
    b = cluster_bootstrap(np.repeat(x[:, 0], 10), np.repeat(cl, 10), "mean", BootstrapConfig(n_boot=2000))
    assert a.estimate == pytest.approx(b.estimate)
    assert (b.high - b.low) == pytest.approx(a.high - a.low, rel=1e-9)


def test_custom_statistic_and_weighted_median():
    x = np.array([3.0, 1.0, 2.0, 10.0])
    assert weighted_median(x, np.array([[1, 1, 1, 1], [0, 2, 1, 0], [0, 0, 0, 3]]).astype(float)).tolist() == \
        [2.5, 1.0, 10.0]
    rng = np.random.default_rng(3)
    x, cl = clustered(rng)
    f = cluster_bootstrap(x[:, 0], cl, lambda v, w: float((w @ v) / w.sum()), BootstrapConfig(n_boot=300))
    m = cluster_bootstrap(x[:, 0], cl, "mean", BootstrapConfig(n_boot=300))
    assert (f.low, f.high) == pytest.approx((m.low, m.high))
    with pytest.raises(EclensError):
        cluster_bootstrap(x[:, 0], cl[:-1], "mean")


def test_poisson_coverage():
    # 200 independent draws as 200 cells of one accumulator (same clusters, independent data per cell).
    rng = np.random.default_rng(4)
    x, cl = clustered(rng, n_clusters=40, cells=N_DRAWS)
    acc = PoissonBootstrap((N_DRAWS,), PoissonConfig(n_reps=100, seed=5))
    acc.update(torch.from_numpy(x), [f"c{c}" for c in cl])
    est, lo, hi = acc.interval()
    cover = ((lo <= 0) & (hi >= 0)).double().mean().item()
    assert cover >= 0.90, f"Poisson bootstrap coverage {cover:.3f}"
    # ratio of means, truth 2
    y = 1 + 0.2 * rng.normal(size=x.shape)
    acc = PoissonBootstrap((N_DRAWS,), PoissonConfig(n_reps=100, seed=5), ratio=True)
    acc.update(torch.from_numpy(2 + x), [f"c{c}" for c in cl], y=torch.from_numpy(y))
    est, lo, hi = acc.interval(acc.ratio())
    cover = ((lo <= 2) & (hi >= 2)).double().mean().item()
    assert cover >= 0.90, f"Poisson bootstrap ratio coverage {cover:.3f}"


def test_poisson_merge_is_exact_and_weights_are_shard_free():
    rng = np.random.default_rng(6)
    # multiples of 1/1024: every float64 sum is exact, so equality is exact whatever the order
    x = torch.from_numpy(np.round(rng.normal(size=(300, 3, 4)) * 1024) / 1024)
    mask = torch.from_numpy(rng.random((300, 3, 4)) > 0.1)
    cl = [f"frame{i % 37}" for i in range(300)]
    cfg = PoissonConfig(n_reps=50, seed=9)
    one = PoissonBootstrap((3, 4), cfg)
    one.update(x, cl, mask)
    a, b = PoissonBootstrap((3, 4), cfg), PoissonBootstrap((3, 4), cfg)
    perm = rng.permutation(300)
    a.update(x[perm[:120]], [cl[i] for i in perm[:120]], mask[perm[:120]])
    b.update(x[perm[120:]], [cl[i] for i in perm[120:]], mask[perm[120:]])
    a.merge(PoissonBootstrap.from_state(b.state_dict()))
    assert torch.equal(a.sw, one.sw) and torch.equal(a.swx, one.swx) and a.n == one.n
    # the same cluster gets the same weights in any shard; a different seed or cluster does not
    assert np.array_equal(poisson_weights("frame3", 50, 9), b.weights(["frame3"])[1:, 0].numpy())
    assert not np.array_equal(poisson_weights("frame3", 50, 9), poisson_weights("frame3", 50, 10))
    w = np.stack([poisson_weights(f"k{i}", 100) for i in range(200)])
    assert w.mean() == pytest.approx(1.0, abs=0.03) and w.var() == pytest.approx(1.0, abs=0.06)
    assert {split_half(f"k{i}") for i in range(20)} == {0, 1}
    with pytest.raises(EclensError):
        a.merge(PoissonBootstrap((3, 4), PoissonConfig(n_reps=20)))


def test_cluster_counts_are_drawn_once_read_only_and_as_the_seeded_multinomial():
    """The replicate counts are kept per (clusters, replicates, seed): every statistic of the same clusters
    reads one draw, the one numpy's seeded multinomial gives, and nobody can change it."""
    from eclens.bootstrap import cluster_counts, forget_cluster_counts

    c = cluster_counts(6, 40, 3)
    assert cluster_counts(6, 40, 3) is c and not c.flags.writeable
    want = np.random.default_rng(3).multinomial(6, np.full(6, 1 / 6), size=40).astype(float)
    assert np.array_equal(c, want) and (c.sum(1) == 6).all()
    assert cluster_counts(0, 5, 3).shape == (5, 0)
    forget_cluster_counts()
    assert cluster_counts(6, 40, 3) is not c
