"""Hook points read once (``eclens.diff.aliases``): ``hook_resid_post`` of layer ``l`` is ``hook_resid_pre`` of
``l + 1``, so a run holds it once, and every table equals a run that keeps both copies."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

import eclens.diff.stream as stream
from eclens.diff import DiffResult, merge_results, run_diff
from eclens.diff.aliases import Alias, aliases_where_equal, find_aliases
from eclens.errors import EclensError
from eclens.hooks import PROBE_TOKENS, HookGroup, hook_groups, probe_activations, select_hooks
from eclens.pairs import MinimalPair, check_with_model

POST, PRE = "hook_resid_post", "hook_resid_pre"
TABLES = ("layers", "dims", "candidates", "sensitivity", "contrasts", "heads")


def _pairs(model, n=20):
    words = ["dog", "cat", "bird", "horse", "man", "girl", "boy", "child", "car", "tree"]
    raw = [MinimalPair(f"p{i}", f"The {words[i % 10]} runs{' fast' * (i // 10)}.",
                       f"The {words[i % 10]} run{' fast' * (i // 10)}.", "grammar/agreement" if i % 2 else "meaning/x")
           for i in range(n)]
    return check_with_model(raw, model).valid


def _both_copies(monkeypatch) -> None:
    monkeypatch.setattr(stream, "find_aliases", lambda model, groups, acts=None: [])


def _same_tables(a: DiffResult, b: DiffResult, exact: bool = True) -> None:
    """Equal to float64 rounding (bit for bit on the machine this was written on): every statistic of a layer
    is made by the same calls whatever layers the state holds (eclens.diff.row_sums.weighted_sums sums a layer at a
    time; a product over several layers rounded the recentred sums otherwise, ~1e-6 relative in ``z_mean``
    here). Not ``exact``: within the stream's float32 accuracy (a resumed run adds its staged sums to float64
    totals at the checkpoint, one run at the end)."""
    for name in TABLES:
        tol = dict(rtol=1e-9, atol=1e-12) if exact else dict(rtol=1e-6, atol=1e-6)
        pd.testing.assert_frame_equal(getattr(a, name), getattr(b, name), obj=name, **tol)


@pytest.fixture(scope="module")
def three_layers():
    from eclens import tiny_model

    return tiny_model(n_layers=3, d_model=64, n_heads=4, n_kv_heads=2, d_mlp=128, seed=1)


def test_an_aliased_run_equals_one_that_keeps_both_copies(three_layers, monkeypatch):
    m = three_layers
    pairs = _pairs(m)
    kw = dict(batch_size=4, sample_size=12)
    got = run_diff(m, pairs, **kw)
    assert got.aliases == {POST: Alias(POST, PRE, 1, (0, 1))}
    assert got.tensors[f"{POST}/feat"].shape[3] == 1 and got.tensors[f"{PRE}/feat"].shape[3] == 3  # layer 2 only
    assert got.stored_group(POST).layers == [2] and got.group(POST).layers == [0, 1, 2]
    with monkeypatch.context() as mp:
        _both_copies(mp)
        want = run_diff(m, pairs, **kw)
    assert not want.aliases and want.tensors[f"{POST}/feat"].shape[3] == 3
    _same_tables(got, want)
    # the pair sample over every layer, the alias's read from its source: the same float16 values
    for name in ("sample_delta", "sample_rel_l2", "sample_cos"):
        full = want.tensors[f"{POST}/{name}"]
        assert torch.equal(got.hook_sample(POST, name), full)
        assert torch.equal(got.hook_sample(POST, name, 1), full[:, 1])
        for li in range(3):
            assert torch.equal(got.hook_sample(POST, name, 1, li), full[:, 1, li])
    for k, v in want.cell_stats(POST, "grammar/agreement").items():
        assert torch.allclose(got.cell_stats(POST, "grammar/agreement")[k], v, rtol=1e-9, atol=1e-12, equal_nan=True), k
    # what the contrasts read without a group's statistics: the whole dataset's σ and massive dimensions, the
    # alias's assembled from its source's as cell_stats assembles them
    for r in (got, want):
        fresh = DiffResult(r.meta, dict(r.tensors), r.model, r.timing)
        spread = {h: fresh.clean_spread(h) for h in fresh.hooks}
        assert not any(isinstance(k, tuple) and k[0] in fresh.hooks for k in fresh._cache)  # no group computed
        for h in fresh.hooks:
            for k in ("sigma_clean", "massive"):
                torch.testing.assert_close(spread[h][k], fresh.cell_stats(h)[k], rtol=0, atol=0, equal_nan=True)


def test_a_residual_stream_changed_between_blocks_is_not_aliased(three_layers, monkeypatch):
    """A hook that edits block 1's input: resid_post of layer 0 is no longer that input, and is kept."""
    m = three_layers
    pairs = _pairs(m, 12)
    m.add_hook("blocks.1.hook_resid_pre", lambda act, hook: act + 0.25)
    try:
        groups = hook_groups(m, select_hooks(m, [f"blocks.{i}.{h}" for i in range(3) for h in (PRE, POST)]))
        assert find_aliases(m, groups) == [Alias(POST, PRE, 1, (1,))]
        got = run_diff(m, pairs, batch_size=4, sample_size=8)
        assert got.aliases[POST].layers == (1,) and got.stored_group(POST).layers == [0, 2]
        with monkeypatch.context() as mp:
            _both_copies(mp)
            want = run_diff(m, pairs, batch_size=4, sample_size=8)
        _same_tables(got, want)
        # the edit shows: layer 0's resid_post differs from layer 1's resid_pre
        lay = got.layers[(got.layers["category"] == "all") & (got.layers["swap_direction"] == "all")]
        post0 = lay[(lay["hook"] == POST) & (lay["layer"] == 0)]["l2_mean"].to_numpy()
        pre1 = lay[(lay["hook"] == PRE) & (lay["layer"] == 1)]["l2_mean"].to_numpy()
        assert post0.shape == pre1.shape and not (post0 == pre1).all()
    finally:
        m.reset_hooks(including_permanent=True)


def test_one_probe_pass_gives_the_shapes_and_the_aliases(three_layers, monkeypatch):
    """run_diff probes the model once (a bridge pass costs ~60 ms whatever its input), and that pass gives what
    two passes gave: the groups' shapes and the aliases."""
    m = three_layers
    names = select_hooks(m, [f"blocks.{i}.{h}" for i in range(3) for h in (PRE, POST)])
    acts = probe_activations(m, names)
    assert set(acts) == set(names) and all(a.shape[:2] == (1, PROBE_TOKENS) for a in acts.values())
    groups = hook_groups(m, names, acts)
    assert groups == hook_groups(m, names)
    assert find_aliases(m, groups, acts) == find_aliases(m, groups) == [Alias(POST, PRE, 1, (0, 1))]
    calls = []
    monkeypatch.setattr(stream, "probe_activations", lambda *a: calls.append(a) or probe_activations(*a))
    run_diff(m, _pairs(m, 4), batch_size=4, sample_size=4)
    assert len(calls) == 1
    # an activation without a position axis is refused in one line that names the hook
    with pytest.raises(EclensError, match=r"blocks\.0\.hook_resid_pre has shape \[1, 'positions'"):
        hook_groups(m, names, dict(acts, **{names[0]: torch.zeros(1, 2, 4)}))


def test_the_alias_keeps_one_layer_and_needs_equal_tensors():
    g = {s: HookGroup(s, [f"blocks.{i}.{s}" for i in range(4)], list(range(4)), "resid", (8,)) for s in (PRE, POST)}
    same = {n: torch.ones(3) for s in (PRE, POST) for n in g[s].names}
    # pre holds layers 0-3: post 0-2 are pre 1-3, post 3 is its own
    assert aliases_where_equal(list(g.values()), lambda names: same) == [Alias(POST, PRE, 1, (0, 1, 2))]
    differ = dict(same, **{"blocks.2.hook_resid_pre": torch.zeros(3)})
    assert aliases_where_equal(list(g.values()), lambda names: differ) == [Alias(POST, PRE, 1, (0, 2))]
    # pre only at layers 1-3 and post only at 0-2: every post layer could be read, the last stays its own
    pre = HookGroup(PRE, g[PRE].names[1:], [1, 2, 3], "resid", (8,))
    post = HookGroup(POST, g[POST].names[:3], [0, 1, 2], "resid", (8,))
    assert aliases_where_equal([pre, post], lambda names: same) == [Alias(POST, PRE, 1, (0, 1))]
    assert aliases_where_equal([g[POST]], lambda names: same) == []  # no source selected


def test_a_checkpoint_keeps_its_layout_and_merges_need_the_same(three_layers, tmp_path, monkeypatch):
    """A checkpoint made with both copies (an older eclens) resumes with both; merging it with an aliased state
    is refused in one line."""
    m = three_layers
    pairs = _pairs(m, 16)
    with monkeypatch.context() as mp:
        _both_copies(mp)
        run_diff(m, pairs, batch_size=4, sample_size=8, run=tmp_path / "r", max_batches=2)
        full = run_diff(m, pairs, batch_size=4, sample_size=8)
    resumed = run_diff(m, pairs, batch_size=4, sample_size=8, run=tmp_path / "r")
    assert resumed.timing["resumed_from"] == 8 and not resumed.aliases
    _same_tables(resumed, full, exact=False)
    a = run_diff(m, pairs[:8], batch_size=4, sample_size=8)
    with monkeypatch.context() as mp:
        _both_copies(mp)
        b = run_diff(m, pairs[8:], batch_size=4, sample_size=8)
    with pytest.raises(EclensError, match="hold different layers"):
        merge_results(a, b)
