"""The fast table building of a diff run (issue 20): the whole-array helpers against their plain
definitions, and a group's moments from the common-shift sums against a float64 brute force."""

from __future__ import annotations

import math
import threading
import warnings

import numpy as np
import pandas as pd
import pytest
import torch

from eclens.diff import run_diff
from eclens.diff import sample_stats as SS
from eclens.diff.intervals import nan_quantiles
from eclens.diff.tables import dim_means, ranked
from eclens.pairs import AlignedPair, MinimalPair, align
from eclens.stats import masked_quantiles


def test_nan_quantiles_equal_numpys():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 40))
    x[rng.random(x.shape) < 0.3] = np.nan
    x[:, 3] = np.nan  # no value: NaN
    x[:-1, 5] = np.nan  # one value: that value
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        want = np.nanquantile(x, [0.025, 0.5, 0.975], axis=0)
    got = nan_quantiles(x, (0.025, 0.5, 0.975))
    assert np.array_equal(np.isnan(want), np.isnan(got))
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)


def test_ranked_keeps_the_loop_order():
    """Passing dims first by score (ties in dim order, NaN last), at most ``top``, with their ranks."""
    m = np.array([[[True, False, True, True, True]]])
    sc = np.array([[[0.5, -9.0, 0.1, 0.5, np.nan]]])
    li, oi, d, rank, n = ranked(m, sc, True, 3)
    assert d.tolist() == [2, 0, 3] and rank.tolist() == [1, 2, 3] and n.tolist() == [4, 4, 4]
    _, _, d, _, _ = ranked(m, sc, False, 10)
    assert d.tolist() == [0, 3, 2, 4]  # descending, stable among ties, NaN last as in torch.argsort
    dims = torch.nonzero(torch.from_numpy(m[0, 0])).flatten()
    want = torch.argsort(-torch.from_numpy(sc[0, 0])[dims], stable=True)
    assert dims[want].tolist() == d.tolist()


def test_ranked_equals_a_sort_of_every_row():
    """Sorting only the passing cells gives what a stable sort of every (layer, offset) row gave: random masks
    of every density, tied and NaN scores, ``top`` below and above the passing counts."""
    rng = np.random.default_rng(0)
    for density in (0.0, 0.02, 0.3, 1.0):
        m = rng.random((4, 3, 50)) < density
        sc = rng.integers(0, 6, (4, 3, 50)).astype(np.float64)  # ties
        sc[rng.random(sc.shape) < 0.1] = np.nan
        for asc in (True, False):
            for top in (1, 7, 100):
                order = np.lexsort((sc if asc else -sc, ~m), axis=-1)[..., :top]  # the row-by-row reference
                picked = np.take_along_axis(m, order, -1)
                li, oi, k = np.nonzero(picked)
                want = (li, oi, order[li, oi, k], k + 1, m.sum(-1)[li, oi])
                got = ranked(m, sc, asc, top)
                for g, w in zip(got, want):
                    assert np.array_equal(g, w), (density, asc, top)


def test_cluster_weights_are_drawn_once_and_read_only():
    """One draw per (clusters, replicates, seed), shared by every hook of a group, read-only so that no caller
    can change another's; forgetting draws it again, the same numbers (a seeded multinomial per replicate)."""
    from eclens.diff.intervals import cluster_weights, forget_cluster_weights

    cl = ["a", "b", "a", "c"]
    w = cluster_weights(cl, 50, seed=3)
    assert cluster_weights(cl, 50, seed=3) is w and not w.flags.writeable
    assert cluster_weights(cl, 50, seed=4) is not w
    assert (w[:, 0] == w[:, 2]).all() and (w[:, [0, 1, 3]].sum(1) == 3).all()  # per cluster; G draws each
    want = np.random.default_rng(3).multinomial(3, np.full(3, 1 / 3), size=50).astype(float)
    assert np.array_equal(w[:, [0, 1, 3]], want)
    forget_cluster_weights()
    again = cluster_weights(cl, 50, seed=3)
    assert again is not w and np.array_equal(again, w)


def testpermuted_labels_are_drawn_once_read_only_and_as_before():
    """The contrasts' label permutations: one draw per (labels, permutations, seed), read-only, the seeded
    permutations a loop per call drew; the effects are those of the per-call draw."""
    from eclens.diff.contrasts import forget_permutations, permutation_effects, permuted_labels

    is_a = np.array([True, False, True, True, False, False, True])
    A, B = permuted_labels(is_a.tobytes(), len(is_a), 40, 5)
    assert permuted_labels(is_a.tobytes(), len(is_a), 40, 5)[0] is A and not A.flags.writeable
    rng = np.random.default_rng(5)
    want = np.stack([rng.permutation(is_a) for _ in range(40)]).astype(float)
    assert np.array_equal(A, want) and np.array_equal(B, 1 - want) and (A.sum(1) == is_a.sum()).all()
    S, N = np.random.default_rng(0).normal(size=(7, 3)), np.ones((7, 3))
    direct = (want @ S) / (want @ N) - ((1 - want) @ S) / ((1 - want) @ N)
    assert np.array_equal(permutation_effects(S, N, is_a, 40, 5), direct)
    forget_permutations()
    assert permuted_labels(is_a.tobytes(), len(is_a), 40, 5)[0] is not A


def test_dim_means_skip_massive_and_nan():
    x = torch.tensor([[[1.0, float("nan"), 3.0, 100.0]], [[float("nan")] * 4]], dtype=torch.float64)
    keep = torch.tensor([[[True, True, True, False]], [[True] * 4]])
    got = dim_means(x, keep)
    assert got[0, 0] == 2.0 and np.isnan(got[1, 0])


def test_sample_stats_in_chunks_equal_whole_and_a_direct_computation(monkeypatch):
    g = torch.Generator().manual_seed(0)
    r, O, L, D = 12, 2, 5, 7  # noqa: E741
    sd = torch.randn(r, O, L, D, generator=g).half()
    rows = torch.tensor([0, 2, 3, 5, 6, 7, 9, 10, 11])  # the group's sampled pairs
    s = len(rows)
    sv = torch.rand(s, O, generator=g) > 0.2
    inv = torch.rand(L, O, D, generator=g, dtype=torch.float64) + 0.5
    inv[0, 0, 0] = float("nan")  # σ = 0
    S = torch.randn(L, O, D, generator=g, dtype=torch.float64)
    grid = [0.1, 0.3, 1.0]
    bound = SS.threshold_bounds(inv, [0.3], sd.dtype)[..., 0]
    ranks = [0, 7]  # offset 0: every cell passes; 1: the 7th smallest (past the valid values in some cells)
    whole = SS.sample_stats(sd, rows, sv, inv, S, bound, ranks)
    monkeypatch.setattr(SS, "CHUNK_ELEMENTS", s * O * D * 2)  # two layers a chunk, the last one alone
    parts = SS.sample_stats(sd, rows, sv, inv, S, bound, ranks)
    for k in whole:
        assert torch.equal(torch.nan_to_num(whole[k], nan=-7.0), torch.nan_to_num(parts[k], nan=-7.0)), k
    # Every cell against torch.quantile and plain counting over that cell's valid items (independent of the sort).
    x = sd[rows].permute(0, 2, 1, 3).double()  # [s, L, O, D]
    z = x.abs() * inv
    qs = torch.tensor((0.1, 0.25, 0.5, 0.75, 0.9), dtype=torch.float64)
    for li in range(L):
        for o in range(O):
            for d in range(D):
                v = z[:, li, o, d][sv[:, o] & ~torch.isnan(z[:, li, o, d])]
                want = torch.quantile(v, qs) if len(v) else torch.full((5,), float("nan"), dtype=torch.float64)
                got = whole["q"][:, li, o, d]
                assert torch.allclose(got, want, rtol=0, atol=1e-12, equal_nan=True), (li, o, d)
                assert whole["under"][li, o, d] == (v < 0.3).sum()
                # the ranked value says, for every threshold, whether at least that many are under it
                assert [bool(whole["ranked"][li, o, d] < t) for t in grid] == [bool((v < t).sum() >= ranks[o])
                                                                               for t in grid] or inv[li, o, d].isnan()
    assert torch.allclose(whole["dd"], (x * x).sum(-1), rtol=1e-12, atol=0)
    assert torch.allclose(whole["dot"], (x * S).sum(-1), rtol=1e-12, atol=1e-12)


def _reference_sample_stats(sd, rows, sv, inv, S, threshold, ranks):
    """The definition: ``z = |Δ|·inv`` in float64, sorted per cell with missing and NaN items last, quantiles
    as ``torch.quantile``'s interpolation, the count of ``z`` under the threshold, the ``ranks``-th smallest."""
    from eclens.diff.config import QUANTILES
    from eclens.stats import sorted_quantiles

    x = sd[rows].double().permute(2, 1, 3, 0)  # [L, O, D, s]
    z = x.abs() * inv[..., None]
    bad = ~sv.T[None, :, None, :] | torch.isnan(z)
    z = torch.where(bad, float("inf"), z).sort(-1).values
    k = (~bad).sum(-1)
    under = (z < threshold).sum(-1).double()
    # the rank-th smallest z: NaN Δ after the missing pairs (+inf), as float64 sorts them
    zr = torch.where(~sv.T[None, :, None, :], float("inf"), x.abs() * inv[..., None]).sort(-1).values
    ranked = torch.stack([zr[:, o, :, m - 1] if 0 < m <= zr.shape[-1] else
                          torch.full_like(inv[:, o], -math.inf if m == 0 else math.inf) for o, m in enumerate(ranks)], 1)
    ranked[inv.isnan()] = math.nan
    xs = sd[rows].double()  # [s, O, L, D]
    return {"q": sorted_quantiles(z, k, QUANTILES), "under": under, "ranked": ranked,
            "dot": torch.einsum("sold,lod->slo", xs, S), "dd": (xs * xs).sum(-1).transpose(1, 2)}


def test_sample_stats_sort_bits_and_equal_a_float64_sort_of_z_exactly():
    """|Δ| sorted as integers and the threshold counts found by bit boundaries give the numbers of a float64
    sort of |Δ|·inv bit for bit: Δ placed on each side of every threshold's boundary, NaN and ±inf Δ, missing
    pairs (some NaN there), σ = 0 cells, a float32 sample, and a group with no pair."""
    g = torch.Generator().manual_seed(1)
    r, O, L, D = 40, 3, 4, 33  # noqa: E741
    t = 0.1
    for dtype in (torch.float16, torch.float32):
        inv = torch.rand(L, O, D, generator=g, dtype=torch.float64) * 3 + 0.01
        inv[0, 1, :5] = float("nan")
        sd = torch.randn(r, O, L, D, generator=g).to(dtype) * 0.2
        # values at and next to t/inv (the boundary of "z < t"), in the sample's own precision
        edge = (t / inv).to(dtype)
        step = torch.finfo(dtype).eps * edge.abs()
        for i, d in enumerate((-1, 0, 1)):
            sd[i] = (edge + d * step).to(dtype).permute(1, 0, 2) * (-1 if i % 2 else 1)
        sd[5, 0, 1, 2] = float("nan")
        sd[6, 1, 2, 3] = float("inf")
        sd[7, 2, 3, 4] = -float("inf")
        sv = torch.rand(r, O, generator=g) > 0.25
        sd[8, :, 0, 0] = float("nan")
        sv[8] = False  # a NaN where the pair has no value: not counted anywhere
        S = torch.randn(L, O, D, generator=g, dtype=torch.float64)
        # with rows 0-2 (NaN at σ = 0) or 5 every cell takes the path for NaN Δ; without, the count per offset (±inf in)
        for rows in (torch.arange(r), torch.tensor([0, 1, 2, 5, 6, 9, 11, 30]), torch.tensor([3, 4, 6, 7, 8, 9, 11, 30]),
                     torch.tensor([], dtype=torch.long)):
            ranks = [0, max(1, len(rows) // 2), len(rows) + 1][:O]
            got = SS.sample_stats(sd, rows, sv[rows], inv, S, SS.threshold_bounds(inv, [t], dtype)[..., 0], ranks)
            want = _reference_sample_stats(sd, rows, sv[rows], inv, S, t, ranks)
            for k in ("q", "under", "ranked"):
                assert torch.equal(torch.nan_to_num(got[k], nan=-7.0), torch.nan_to_num(want[k], nan=-7.0)), \
                    (dtype, len(rows), k)
            # at the threshold's own boundary (Δ on each side of it): under it exactly where that many are
            for o, m in enumerate(ranks):
                ok = ~inv[:, o].isnan()
                assert torch.equal((got["ranked"][:, o] < t)[ok], (want["under"][:, o] >= m)[ok]), (dtype, len(rows), o)
            assert torch.allclose(got["dd"], want["dd"], rtol=1e-12, atol=0, equal_nan=True)
            assert torch.allclose(got["dot"], want["dot"], rtol=1e-12, atol=1e-12, equal_nan=True)


def test_stable_rank_is_the_least_count_whose_fraction_passes():
    for frac in (0.0, 0.1, 0.3, 0.7, 0.9, 1.0, 1.5, 0.1 + 0.2):  # 0.1 + 0.2: frac·n rounds next to an integer
        for n in range(0, 60):
            m = SS.stable_rank(n, frac)
            if n == 0:
                assert m == 1  # no pair: the first value is missing (+inf), never under a threshold
                continue
            passing = [k for k in range(n + 1) if k / n >= frac]
            assert m == (passing[0] if passing else n + 1), (frac, n)


def test_masked_quantiles_ignore_missing_items_and_empty_samples():
    x = torch.tensor([[1.0, 5.0], [float("nan"), 2.0], [3.0, 4.0], [2.0, 9.0]], dtype=torch.float64)
    valid = torch.tensor([[True, True], [True, True], [True, False], [False, True]])
    got = masked_quantiles(x, valid, (0.5,))[0]
    assert got.tolist() == [2.0, 5.0]  # column 0: {1, 3} (NaN and the invalid 2 left out); column 1: {5, 2, 9}
    empty = masked_quantiles(torch.zeros(0, 3, dtype=torch.float64), torch.zeros(0, 3, dtype=torch.bool), (0.1, 0.9))
    assert empty.shape == (2, 3) and torch.isnan(empty).all()


def _pairs(tok):
    out = []
    subjects = ["dog", "cat", "girl", "boy", "teacher", "doctor", "farmer", "singer"]
    for i, s in enumerate(subjects * 2):
        for cat, (a, b), d in (("grammar/agreement", ("runs", "run"), "sg->pl"),
                               ("grammar/agreement", ("walk", "walks"), "pl->sg"),
                               ("meaning/verb", ("runs", "reads"), None)):
            p = MinimalPair(f"{cat}-{d}-{i}", f"The {s} {a} here.", f"The {s} {b} here.", cat, swap_direction=d,
                            cluster=s)
            al = align(p, tok)
            if isinstance(al, AlignedPair):
                out.append(al)
    return out


def test_group_moments_equal_brute_force(tiny):
    """Every group's mean Δ, σ of Δ and of the clean activation from the common-shift sums equal the float64
    moments of the per-pair values of its rows (the sample holds every pair here); constant cells keep σ = 0."""
    pairs = _pairs(tiny.tokenizer)
    res = run_diff(tiny, pairs, hooks="hook_resid_pre", max_offset=1, batch_size=8, sample_size=256,
                   include_last=True)
    assert len(res.stat_groups()) > 3
    h = res.hooks[0]
    rows = res.config.rows
    cat_of = res.tensors["sample/category"]
    sd = res.tensors[f"{h}/sample_delta"].double()  # [s, O, L, D] float16 Δ: compare to float16 precision
    valid = res.tensors["sample/valid"]
    for cat, dr in res.stat_groups():
        r = [i for i, (c, d, _) in enumerate(rows) if cat in ("all", c) and dr in ("all", d)]
        members = torch.isin(cat_of, torch.tensor(r)) & torch.isfinite(res.tensors["sample/keys"])
        st = res.cell_stats(h, cat, dr)
        for o in range(len(res.offsets)):
            m = members & valid[:, o]
            x = sd[m, o].permute(1, 0, 2)  # [L, n, D]
            assert int(st["n"][o]) == int(m.sum())
            torch.testing.assert_close(st["mean_delta"][:, o], x.mean(1), rtol=2e-3, atol=2e-3)
            if int(m.sum()) > 1:
                torch.testing.assert_close(st["std_delta"][:, o], x.std(1), rtol=2e-3, atol=2e-3)
    # layer 0's resid_pre at the last token is the embedding of "." in every pair: σ exactly 0
    sig = res.cell_stats(h, "all")["sigma_clean"][0, res.offsets.index(-1)]
    assert torch.equal(sig, torch.zeros_like(sig))


def test_release_memory_runs():
    from eclens.model import release_memory

    release_memory()  # glibc: returns freed heap pages; elsewhere a no-op


def test_tables_have_the_row_loops_columns(tiny):
    """A tiny run's tables build (one frame per table) with the columns the row loops wrote."""
    pairs = _pairs(tiny.tokenizer)[:12]
    res = run_diff(tiny, pairs, hooks="hook_resid_post", max_offset=1, batch_size=6, sample_size=32, min_pairs=2)
    lay = res.layers
    assert list(lay.columns[:9]) == ["category", "swap_direction", "hook", "layer", "offset", "position_kind", "n",
                                     "n_sample", "reachable"]
    assert len(lay) == len(res.stat_groups()) * len(res.group(res.hooks[0]).layers) * len(res.offsets)
    assert lay["n"].dtype.kind == "i" and lay["reachable"].dtype == bool
    cand = res.candidates
    if not cand.empty:
        assert cand["rank"].min() == 1 and cand["n"].dtype.kind == "i"
    before = res.cell_stats(res.hooks[0], "all")["absz_median"].clone()
    res.release_arrays()  # the tables stay, the arrays behind them are recomputed on demand
    assert res.layers is lay and not any(isinstance(k, tuple) for k in res._cache)
    assert torch.equal(torch.nan_to_num(res.cell_stats(res.hooks[0], "all")["absz_median"], nan=-1.0),
                       torch.nan_to_num(before, nan=-1.0))


def test_one_pass_tables_equal_the_tables_one_by_one_and_keep_only_the_all_group(tiny):
    """:meth:`DiffResult.build_tables` (what ``save`` runs) gives every table exactly as the properties do one
    by one, and forgets each hook's arrays as it goes: only the ``all`` group's stay cached."""
    from eclens.diff import DiffResult

    pairs = _pairs(tiny.tokenizer)
    res = run_diff(tiny, pairs, hooks=["hook_resid_post", "attn.hook_z"], max_offset=1, batch_size=8,
                   sample_size=256, min_pairs=2)
    assert len(res.stat_groups()) > 3 and len(res.config.categories) > 1
    one = DiffResult(res.meta, res.tensors, res.model, res.timing)
    one.build_tables()
    every = {("all", "all")}
    kept = {(k[0], k[1]) for k in one._cache if isinstance(k, tuple) and len(k) == 2 and k[0] in one.hooks}
    assert kept == {(h, None) for h in one.hooks}, kept  # cell_stats of "all" only (rows None)
    assert not any(isinstance(k, tuple) and k[0] == "sums" for k in one._cache)  # each hook's sums forgotten
    assert not any(isinstance(k, tuple) and k[0] in ("cand", "cand_base") and k[2:4] not in every
                   for k in one._cache)
    for name in ("layers", "candidates", "sensitivity", "heads", "contrasts"):  # contrasts: on a worker thread
        want = getattr(res, name)
        assert not want.empty, name
        pd.testing.assert_frame_equal(getattr(one, name), want, check_exact=True, obj=name)
    # dims.parquet's table, made from the blocks without the float64 frame: the frame at the declared precision
    from eclens.tables import narrow

    stored = one.dims_stored.to_pandas()
    assert list(stored.columns) == list(narrow(res.dims, "dims.parquet").columns) and len(stored) == len(res.dims)
    pd.testing.assert_frame_equal(stored, narrow(res.dims, "dims.parquet"), check_exact=True, obj="dims_stored")
    pd.testing.assert_frame_equal(one.dims, res.dims, check_exact=True, obj="dims")  # made on demand


def test_tables_do_not_depend_on_the_worker_threads(tiny, monkeypatch):
    """:func:`eclens.diff.tables.all_tables` runs the groups on worker threads: one worker and three give the
    same tables bit for bit, torch's thread count is the caller's again afterwards, and an error in a worker
    reaches the caller."""
    from eclens.diff import DiffResult
    from eclens.diff import tables as T

    pairs = _pairs(tiny.tokenizer)
    res = run_diff(tiny, pairs, hooks=["hook_resid_post", "attn.hook_z", "hook_mlp_out"], max_offset=1,
                   batch_size=8, sample_size=256, min_pairs=2)
    threads = torch.get_num_threads()
    built = {}
    for workers in (1, 3):
        r = DiffResult(res.meta, res.tensors, res.model, res.timing)
        built[workers] = T.all_tables(r, workers=workers)
        built[workers]["dims"] = T.dims_stored(r, built[workers].pop("dims_parts")).to_pandas()
        assert torch.get_num_threads() == threads
        others = [k for k in r._cache if isinstance(k, tuple) and k[0] == "scratch" and k[1] != threading.get_ident()]
        assert not others  # the workers' chunk buffers are dropped with them
    for name, want in built[1].items():
        assert not want.empty, name
        pd.testing.assert_frame_equal(built[3][name], want, check_exact=True, obj=name)

    def fail(res, h, cat, dr):
        if h == "hook_mlp_out" and cat != "all":
            raise RuntimeError(f"planted failure in {h} {cat} {dr}")
        return real(res, h, cat, dr)

    real = T.layers_block
    monkeypatch.setattr(T, "layers_block", fail)
    with pytest.raises(RuntimeError, match="planted failure in hook_mlp_out"):
        T.all_tables(DiffResult(res.meta, res.tensors, res.model, res.timing), workers=2)
    assert torch.get_num_threads() == threads
