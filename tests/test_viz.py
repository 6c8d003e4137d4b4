"""Figures from a real run's tables, per-pair views on the embedded model, circuitsvis views."""

from __future__ import annotations

import html
import json

import numpy as np
import plotly.graph_objects as go
import pytest

from _viewruns import XSS_CLEAN, XSS_ID, real_run  # noqa: F401 - session fixture
from eclens import viz
from eclens.errors import EclensError
from eclens.report import RunData


@pytest.fixture(scope="module")
def rd(real_run):  # noqa: F811
    return RunData(real_run.path)


def test_layer_offset_heatmap_is_the_layers_table(rd):
    fig = viz.layer_offset_heatmap(rd.layers, hook="hook_resid_post")
    assert isinstance(fig, go.Figure)
    tr = fig.data[0]
    want = rd.layers[(rd.layers["category"] == "all") & (rd.layers["hook"] == "hook_resid_post")]
    if "swap_direction" in want.columns:  # the pooled rows are the figure's
        want = want[want["swap_direction"] == "all"]
    offs = sorted(o for o in want["offset"].unique() if o >= 0) + [-1]
    assert list(tr.x) == [viz.offset_label(o) for o in offs] and tr.x[0] == "p" and tr.x[-1] == "last"
    z = np.asarray(tr.z, dtype=float)
    assert z.shape == (30, len(offs))
    for (layer, off), v in want.set_index(["layer", "offset"])["rel_l2_mean"].items():
        assert z[layer, offs.index(off)] == pytest.approx(v, nan_ok=True)
    # a one-token change is largest at the changed token and shrinks downstream at layer 0
    assert z[0, 0] > z[0, 1]


def test_category_curves_one_trace_per_category(rd):
    fig = viz.category_curves(rd.layers, offset=0)
    names = [html.unescape(t.name) for t in fig.data]
    assert set(names) == set(rd.layers["category"].unique())
    assert names[0] == "all"


def test_layer_dim_heatmap_sorts_and_marks(rd):
    dims = rd.dims_slice(hook="hook_attn_out")
    fig = viz.layer_dim_heatmap(dims, sort="max", massive=[0, 5])
    strip, main = fig.data
    z = np.asarray(main.z, dtype=float)
    assert z.shape == (30, 576)
    col_max = np.nanmax(z, axis=0)
    assert col_max[0] == pytest.approx(np.nanmax(z)) and (np.diff(col_max) <= 1e-6).all()  # sorted by max
    # the dimension ids ride along for the hover, and the strip marks exactly the massive ones
    ids = np.asarray(main.customdata)[0]
    marked = {int(d) for d, s in zip(ids, strip.z[0]) if s is not None}
    assert marked == {0, 5}
    labels = [b.label for b in fig.layout.updatemenus[0].buttons]
    assert labels == ["sort: max", "sort: mean", "sort: index"]
    by_index = fig.layout.updatemenus[0].buttons[2].args[0]["customdata"][1][0]
    assert list(by_index) == list(range(576))
    with pytest.raises(EclensError, match="unknown sort"):
        viz.layer_dim_heatmap(dims, sort="random")


def test_patching_heatmap_and_token_labels(rd):
    exact = rd.patch_exact
    pid = rd.exact_pair_ids()[0]
    pair = rd.pairs_by_id[pid]
    toks = [f"t{i}" for i in range(pair["length"])]
    fig = viz.patching_heatmap(exact, pair_id=pid, direction="denoise", tokens=toks, changed=pair["position"])
    z = np.asarray(fig.data[0].z, dtype=float)
    assert z.shape == (30, pair["length"])
    rows = exact[(exact["pair_id"] == pid) & (exact["direction"] == "denoise") & (exact["head"] == -1)]
    metric = next(m for m in viz.PATCH_METRICS if rows[m].notna().any())
    assert metric in fig.layout.title.text
    cell = rows[(rows["layer"] == 3) & (rows["position"] == pair["position"])][metric].iloc[0]
    assert z[3, pair["position"]] == pytest.approx(cell, nan_ok=True)
    assert fig.data[0].x[0] == "0: t0" and len(fig.layout.shapes) == 1


def test_attribution_scatter_reports_spearman(rd):
    from scipy.stats import spearmanr

    attr = rd.patch_attribution
    v = attr[attr["verified"].astype(bool)].dropna(subset=["attribution", "exact"])
    fig = viz.attribution_scatter(attr)
    rho = spearmanr(v["attribution"], v["exact"]).statistic
    assert f"{rho:.3f}" in fig.layout.title.text and f"over {len(v)} components" in fig.layout.title.text


def test_control_distribution_empirical_p():
    ctrl = [0.1, -0.2, 0.3, 0.05, -0.5]
    fig = viz.control_distribution(0.4, ctrl)
    # two of five controls are at least as large in magnitude: p = (1 + 1) / (5 + 1)
    assert "p=0.333" in fig.layout.annotations[0].text
    assert list(fig.data[0].x) == ctrl


def test_missing_columns_and_empty_slices_are_clear(rd):
    with pytest.raises(EclensError, match="relative L2"):
        viz.layer_offset_heatmap(rd.layers.drop(columns=["rel_l2_mean", "rel_l2_median"]))
    with pytest.raises(EclensError, match="hook 'hook_nope'"):
        viz.layer_offset_heatmap(rd.layers, hook="hook_nope")
    fig = viz.layer_offset_heatmap(rd.layers, category="no-such-category")
    assert "no rows" in fig.layout.annotations[0].text


def test_pair_view_on_the_real_model(model, rd):
    pair = rd.aligned(rd.pairs[0]["id"])
    v = viz.pair_view(model, pair, attention_layers=[3])
    p, T = pair.position, pair.length
    d = v.diffs[v.diffs["hook"] == "hook_resid_post"]
    assert len(d) == 30 * T
    before = d[d["position"] < p]["rel_l2"]
    # a causal model has not seen the change before p: identical activations there
    assert before.abs().max() < 1e-5
    assert (d[d["position"] == p]["rel_l2"] > 0.01).all()
    kl = np.array(v.kl)
    assert kl.shape == (T,) and np.abs(kl[:p]).max() < 1e-5 and kl[p] > 0
    clean, corrupt = v.attention[3]
    assert clean.shape == (model.cfg.n_heads, T, T)
    assert np.allclose(clean.sum(-1), 1, atol=1e-4) and np.allclose(np.triu(clean, 1), 0)
    # before p the two sentences are identical, so are their attention patterns
    assert np.allclose(clean[:, :p, :p], corrupt[:, :p, :p], atol=1e-5)
    assert v.clean_tokens == [model.tokenizer.decode([i]) for i in pair.clean_ids]
    fig = viz.pair_diff_heatmap(v)
    assert np.asarray(fig.data[0].z).shape == (30, T)
    with pytest.raises(EclensError, match="out of range"):
        viz.pair_view(model, pair, attention_layers=[30])


def test_circuitsvis_views_escape_hostile_tokens(model, rd):
    pair = rd.aligned(XSS_ID)
    assert pair.pair.clean == XSS_CLEAN
    v = viz.pair_view(model, pair, attention_layers=[0])
    att_clean, _ = viz.pair_attention_views(v, 0)
    kl = viz.kl_tokens_view(v.clean_tokens, v.kl)
    assert any("script" in t for t in att_clean.props["tokens"])
    for view in (att_clean, kl):
        frag = view.fragment("x")
        # the only closing script tag is the fragment's own
        assert frag.count("</script") == 1 and frag.endswith("</script>")
        assert "<script>alert" not in frag
        props = json.loads(frag[frag.index(", {") + 2: frag.rindex(");")])
        assert props["tokens"] == v.clean_tokens
    page = att_clean.standalone_html()
    assert page.count("var CircuitsVis=") == 1 and "unpkg.com" not in page and "</script><script>alert" not in page
    assert "<script>" in att_clean._repr_html_()
    with pytest.raises(EclensError, match="does not match"):
        viz.attention_view(["a", "b"], np.zeros((2, 3, 3)))


def test_script_json_cannot_close_a_script():
    s = viz.script_json({"t": "</script><script>alert(1)</script>", "u": "\u2028<!--"})
    assert "<" not in s and ">" not in s and "\u2028" not in s
    assert json.loads(s)["t"] == "</script><script>alert(1)</script>"
