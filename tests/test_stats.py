"""Streaming accumulators: exactness, merging, order independence."""

import numpy as np
import pytest
import torch

from eclens.stats import BottomK, Moments, PowerSums, bh_qvalues, item_key, masked_quantiles

F64 = torch.float64


def _rand(n, *shape, seed=0, loc=0.0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return loc + scale * torch.randn((n, *shape), generator=g, dtype=F64)


def test_moments_merge_of_halves_equals_whole():
    x = _rand(101, 3, 4, seed=1, loc=5.0)
    whole = Moments.from_batch(x)
    a, b = Moments.from_batch(x[:37]), Moments.from_batch(x[37:])
    m = a.merge(b)
    assert torch.allclose(m.mean, x.mean(0), rtol=0, atol=1e-12)
    assert torch.allclose(m.var, x.var(0), rtol=1e-12)
    assert torch.allclose(m.var, whole.var, rtol=1e-12)
    assert torch.equal(m.count, torch.full_like(m.count, 101.0))
    # many small batches via update (Welford/Chan in chunks)
    s = Moments.zeros((3, 4))
    for i in range(0, 101, 7):
        s.update(x[i : i + 7])
    assert torch.allclose(s.mean, x.mean(0), atol=1e-12) and torch.allclose(s.std, x.std(0), rtol=1e-12)


def test_moments_groups_mask_and_reduce():
    x = _rand(60, 5, seed=2)
    groups = torch.arange(60) % 3
    mask = (torch.arange(60) % 4 != 0)[:, None].expand(60, 5)
    m = Moments.from_batch(x, mask, groups, 3)
    for g in range(3):
        sel = x[(groups == g) & mask[:, 0]]
        assert torch.allclose(m.mean[g], sel.mean(0), atol=1e-12)
        assert torch.allclose(m.var[g], sel.var(0), rtol=1e-12)
    allm = m.reduce(0)
    sel = x[mask[:, 0]]
    assert torch.allclose(allm.mean, sel.mean(0), atol=1e-12)
    assert torch.allclose(allm.var, sel.var(0), rtol=1e-12)


def test_var_nan_below_two_items():
    m = Moments.from_batch(_rand(1, 3))
    assert torch.isnan(m.var).all()


def test_power_sums_exact_for_massive_values_and_mergeable():
    # A "massive" dimension: mean 1e4, spread 1. Plain sums of squares in float32 would lose everything.
    x = _rand(500, 6, seed=3, loc=1e4, scale=1.0)
    groups = torch.arange(500) % 2
    ps = PowerSums.zeros(2, (6,))
    for i in range(0, 500, 32):
        ps.update(x[i : i + 32], groups[i : i + 32])
    mom = ps.moments()
    ref = np.asarray(x.numpy())
    for g in range(2):
        r = ref[groups.numpy() == g]
        assert np.allclose(mom.mean[g].numpy(), r.mean(0), rtol=0, atol=1e-9)
        assert np.allclose(mom.var[g].numpy(), r.var(0, ddof=1), rtol=1e-10)
    # Two accumulators with the same shift merge by addition (what all_reduce(SUM) does).
    a, b = PowerSums.zeros(2, (6,)), PowerSums.zeros(2, (6,))
    a.set_shift(ps.shift)
    b.set_shift(ps.shift)
    a.update(x[:250], groups[:250])
    b.update(x[250:], groups[250:])
    m2 = a.merge_(b).moments()
    assert torch.allclose(m2.var, mom.var, rtol=1e-10)
    # With different shifts: through Chan's merge and back.
    c, d = PowerSums.zeros(2, (6,)), PowerSums.zeros(2, (6,))
    c.update(x[:111], groups[:111])
    d.update(x[111:], groups[111:])
    assert not torch.equal(c.shift, d.shift)
    with pytest.raises(ValueError):
        c.merge_(d)
    e = PowerSums.from_moments(c.moments().merge(d.moments()))
    assert torch.allclose(e.moments().var, mom.var, rtol=1e-10)
    # ... and the result keeps accumulating correctly with a per-group shift
    e2 = PowerSums.from_moments(c.moments())
    e2.update(x[111:], groups[111:])
    assert torch.allclose(e2.moments().var, mom.var, rtol=1e-10)
    assert torch.allclose(e2.moments().mean, mom.mean, rtol=0, atol=1e-9)


def test_power_sums_mask_and_state_dict_roundtrip():
    x = _rand(40, 2, 3, seed=4)
    mask = torch.ones(40, 1, 3, dtype=F64)
    mask[::3, :, 1] = 0
    groups = torch.zeros(40, dtype=torch.long)
    ps = PowerSums.zeros(1, (2, 3), (1, 3))
    ps.update(x[:20], groups[:20], mask[:20])
    ps.update(x[20:], groups[20:], mask[20:])
    ps2 = PowerSums.from_state_dict(ps.state_dict("p/"), "p/")
    mom = ps2.moments()
    keep = mask[:, 0, 1] > 0
    assert mom.count[0, 0, 1] == keep.sum()
    assert torch.allclose(mom.mean[0, :, 1], x[keep][:, :, 1].mean(0), atol=1e-12)
    assert torch.allclose(mom.var[0, :, 1], x[keep][:, :, 1].var(0), rtol=1e-10)
    assert torch.allclose(mom.var[0, :, 0], x[:, :, 0].var(0), rtol=1e-10)


def test_bottom_k_is_order_and_batch_independent():
    ids = [f"pair{i}" for i in range(300)]
    keys = [item_key(7, i) for i in ids]
    want = sorted(keys)[:50]

    def run(order, bs):
        bk = BottomK.empty(50)
        slot_of = {}
        for s in range(0, len(order), bs):
            chunk = order[s : s + bs]
            slots, items = bk.offer([keys[i] for i in chunk])
            for sl, it in zip(slots, items):
                slot_of[sl] = chunk[it]
        return sorted(bk.keys.tolist()), sorted(keys[i] for i in slot_of.values())

    a = run(list(range(300)), 1)
    b = run(list(range(299, -1, -1)), 16)
    c = run(list(np.random.default_rng(0).permutation(300)), 7)
    assert a[0] == b[0] == c[0] == want
    assert a[1] == b[1] == c[1] == want  # the slot bookkeeping tracks exactly the kept items
    assert BottomK.empty(0).offer([0.1]) == ([], [])
    assert item_key(7, "x") == item_key(7, "x") != item_key(8, "x")


def test_masked_quantiles_match_torch_quantile():
    x = _rand(33, 4, 5, seed=5)
    valid = torch.rand(33, 4, 5, generator=torch.Generator().manual_seed(1)) > 0.3
    valid[:, 0, 0] = False  # a cell with no data
    qs = (0.1, 0.5, 0.9)
    got = masked_quantiles(x, valid, qs)
    for i in range(4):
        for j in range(5):
            sel = x[valid[:, i, j], i, j]
            if sel.numel() == 0:
                assert torch.isnan(got[:, i, j]).all()
                continue
            ref = torch.quantile(sel, torch.tensor(qs, dtype=F64))
            assert torch.allclose(got[:, i, j], ref, atol=1e-12)


def test_bh_qvalues_against_the_definition():
    p = np.array([0.001, 0.04, 0.03, 0.5, np.nan, 0.02])
    q = bh_qvalues(p)
    ok = np.isfinite(p)
    ps = p[ok]
    n = len(ps)
    order = np.argsort(ps)
    ranked = ps[order] * n / np.arange(1, n + 1)
    ref = np.minimum.accumulate(ranked[::-1])[::-1]
    expect = np.empty(n)
    expect[order] = np.minimum(ref, 1)
    assert np.allclose(q[ok], expect) and np.isnan(q[~ok]).all()
