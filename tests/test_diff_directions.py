"""The diff's second-edition statistics on a tiny random model: per swap direction, ``--anchor detect``,
massive dimensions per (hook, layer), threshold sensitivity, split-half state, cluster-permutation contrasts.
Planted effects are functions of the input ids only; without a plant, nothing."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest
import torch

from eclens.diff import DiffResult, run_diff
from eclens.errors import EclensError
from eclens.pairs import AlignedPair, MinimalPair, align
from eclens.stats import Moments

WORDS = [(" dog", " cat"), (" horse", " lion"), (" tiger", " banana"), (" table", " chair"), (" boy", " girl"),
         (" car", " bus"), (" tree", " house")]
FRAMES = ("The{A}{X} sat near the{B} for a long time.", "Yesterday the{A}{X} ran past the{B} again.")
ADJ = (" big", " small", " old", " new", " red")
NOUN = (" river", " wall", " road")
UNITS = [5, 41]


def direction_pairs(tokenizer, n_clusters: int = 28, category: str = "test/x") -> list[AlignedPair]:
    """Per cluster (one frame) two pairs: ``up`` changes word a to b, ``down`` another pair's b' to a'; the words
    vary by cluster,
    so nothing but a plant moves a dimension the same way in every pair of a direction."""
    out = []
    combos = list(itertools.product(FRAMES, ADJ, NOUN))[:n_clusters]
    for c, (frame, adj, noun) in enumerate(combos):
        a, b = WORDS[c % len(WORDS)]
        e, f = WORDS[(c + 1) % len(WORDS)]  # another word pair: no sentence of one direction is in the other
        for d, (x, y) in (("up", (a, b)), ("down", (f, e))):
            pair = MinimalPair(f"c{c}-{d}", frame.format(A=adj, X=x, B=noun), frame.format(A=adj, X=y, B=noun),
                               category, "test")
            r = align(pair, tokenizer)
            assert isinstance(r, AlignedPair), (pair, r)
            pair.cluster, pair.swap_direction = f"c{c}", d
            out.append(r)
    return out


class Plant:
    """The model with a forward hook at ``name`` that rewrites the activation as ``fn(act, tokens)``."""

    def __init__(self, model, name: str, fn):
        self.model, self.name, self.fn, self.toks = model, name, fn, None

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, toks, *a, **kw):
        self.toks = toks
        return self.model(toks, *a, **kw)

    def hooks(self, fwd_hooks=(), **kw):  # the plant runs before any reader of the same hook point
        return self.model.hooks(fwd_hooks=[(self.name, lambda act, hook: self.fn(act, self.toks)), *fwd_hooks], **kw)


def plant_up(pairs, scale: float = 30.0, which=lambda a: a.pair.swap_direction == "up"):
    """Adds ``scale`` at ``UNITS`` from the changed token on, in the changed sentences of ``up`` pairs only."""
    marks = {tuple(a.corrupt_ids): a.position for a in pairs if which(a)}

    def fn(act, toks):
        act = act.clone()
        for i, row in enumerate(toks.tolist()):
            for n in range(len(row), 0, -1):  # right padding: match the unpadded prefix
                p = marks.get(tuple(row[:n]))
                if p is not None:
                    act[i, p:n, UNITS] += scale
                    break
        return act

    return fn


def responsive(res, category, direction, hook="hook_resid_post", layer=0):
    c = res.candidates
    c = c[(c.kind == "responsive") & (c.category == category) & (c.swap_direction == direction) & (c.hook == hook)
          & (c.layer == layer)]
    return {(int(r.offset), int(r.dim)) for r in c.itertuples()}


KW = dict(hooks="hook_resid_post", max_offset=2, batch_size=8, sample_size=64, min_pairs=5, n_boot=200, n_perm=200)


@pytest.fixture(scope="module")
def dpairs(tiny):
    return direction_pairs(tiny.tokenizer)


@pytest.fixture(scope="module")
def unplanted(tiny, dpairs):
    return run_diff(tiny, dpairs, **KW)


def test_a_plant_in_one_direction_is_found_there_and_not_pooled(tiny, dpairs, unplanted):
    res = run_diff(Plant(tiny, "blocks.0.hook_resid_post", plant_up(dpairs)), dpairs, **KW)
    # one category: its directions are its own groups (``all`` would repeat them)
    assert res.stat_groups() == [("all", "all"), ("test/x", "all"), ("test/x", "down"), ("test/x", "up")]
    offs = [o for o in res.offsets]
    want = {(o, u) for o in offs for u in UNITS}
    cat = "test/x"
    assert not want & responsive(unplanted, cat, "up")  # the planted units do nothing by themselves
    # found in its direction at every aligned position, exactly the planted units
    assert responsive(res, cat, "up") - responsive(unplanted, cat, "up") == want
    assert responsive(res, cat, "down") == responsive(unplanted, cat, "down")
    # pooled: no responsive candidate and no signed statistic (the directions would cancel in it)
    c = res.candidates
    pooled = c[c.swap_direction == "all"]
    assert (pooled.kind == "stable").all() and pooled["sign_consistency"].isna().all()
    lay = res.layers
    assert lay[lay.swap_direction == "all"]["dir_consistency"].isna().all()
    assert lay[lay.swap_direction == "up"]["dir_consistency"].notna().any()
    s = res.summary
    assert s["n_candidates"]["responsive"] == 0 and s["n_candidates_by_direction"]["test/x up"]["responsive"] > 0
    assert s["n_responsive_by_direction"]["up"] == s["n_candidates_by_direction"]["test/x up"]["responsive"]


def test_unplanted_pooled_statistics_are_the_merge_of_the_directions(unplanted):
    """Directions and halves are state rows; every group is their exact merge."""
    full = unplanted.cell_stats("hook_resid_post")
    parts = [unplanted.cell_stats("hook_resid_post", "test/x", d) for d in ("up", "down")]
    halves = [unplanted.for_half(h).cell_stats("hook_resid_post") for h in (0, 1)]
    for ps in (parts, halves):
        n = sum(p["n"] for p in ps)
        assert torch.equal(n, full["n"])
        mean = sum(p["mean_delta"] * p["n"][None, :, None] for p in ps) / n[None, :, None]
        np.testing.assert_allclose(mean.numpy(), full["mean_delta"].numpy(), rtol=1e-9, atol=1e-9)
        m = Moments(torch.stack([p["n"][None, :, None].expand_as(p["mean_delta"]) for p in ps]),
                    torch.stack([p["mean_delta"] for p in ps]),
                    torch.stack([p["std_delta"] ** 2 * (p["n"][None, :, None] - 1) for p in ps])).reduce(0)
        np.testing.assert_allclose(m.std.numpy(), full["std_delta"].numpy(), rtol=1e-7, atol=1e-9)
    # the halves split clusters, never a cluster's pairs
    rows = unplanted.config.rows
    cl = unplanted.pairs.set_index("id")["cluster"]
    ids = unplanted.meta["sample_ids"]
    half_of = {}
    for slot, r in enumerate(unplanted.tensors["sample/category"].tolist()):
        if ids[slot] is not None:
            assert half_of.setdefault(cl[ids[slot]], rows[r][2]) == rows[r][2]
    assert set(half_of.values()) == {0, 1}
    c0 = unplanted.candidates_for_half(0)
    assert c0.empty or (c0["n"] <= unplanted.for_half(0).counts()[0].item()).all()


def test_anchor_detect_shifts_the_offsets(tiny, dpairs):
    moved = [dataclasses.replace(a, detect_position=a.position + 1) for a in dpairs]
    at_p = run_diff(tiny, moved, hooks="hook_resid_post", max_offset=3, batch_size=8, sample_size=64)
    at_d = run_diff(tiny, moved, hooks="hook_resid_post", max_offset=2, batch_size=8, sample_size=64,
                    anchor="detect")
    assert at_d.config.anchor == "detect" and at_d.summary["anchor"] == "detect"
    p, d = at_p.cell_stats("hook_resid_post"), at_d.cell_stats("hook_resid_post")
    for k_d, k_p in ((0, 1), (1, 2), (2, 3), (-1, -1)):
        i, j = at_d.offsets.index(k_d), at_p.offsets.index(k_p)
        assert d["n"][i] == p["n"][j]
        np.testing.assert_allclose(d["mean_delta"][:, i].numpy(), p["mean_delta"][:, j].numpy(), rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(d["rel_l2_mean"][:, i].numpy(), p["rel_l2_mean"][:, j].numpy(), rtol=1e-6)
    # the per-pair rows (KL from p) do not move with the anchor
    assert np.allclose(at_d.pairs["kl_0"], at_p.pairs["kl_0"])


def test_massive_dimension_is_flagged_per_layer_and_left_out_of_the_norm(tiny, dpairs, unplanted):
    m = 9

    def huge(act, toks):  # the same at every position of every sentence: Δ untouched, a_m huge
        act = act.clone()
        act[..., m] += 1000.0
        return act

    res = run_diff(Plant(tiny, "blocks.0.hook_resid_post", huge), dpairs, **KW)
    st = res.cell_stats("hook_resid_post")
    assert st["massive"][0, :, m].all() and int(st["massive"][0].sum()) == len(res.offsets)
    # flagged at every offset of the layer, also where the cell rule alone would not
    assert torch.equal(st["massive"], st["massive_cell"].any(1, keepdim=True).expand_as(st["massive"]))
    # the norm without it equals the unplanted run's sums over the other dimensions (Δ and a_d, d != m, unchanged)
    u = unplanted.cell_stats("hook_resid_post")
    n = u["n"][None, :, None]
    e_d2 = (u["std_delta"] ** 2 * (n - 1) / n + u["mean_delta"] ** 2)[0]
    e_a2 = (u["rms_clean"] ** 2)[0]
    keep = torch.ones(e_d2.shape[-1], dtype=torch.bool)
    keep[m] = False
    want = (e_d2[:, keep].sum(-1) / e_a2[:, keep].sum(-1)).sqrt()
    np.testing.assert_allclose(st["rel_l2_rms_nomassive"][0].numpy(), want.numpy(), rtol=1e-5)
    assert (st["rel_l2_rms"][0] < st["rel_l2_rms_nomassive"][0] / 5).all()
    lay = res.layers
    row = lay[(lay.category == "all") & (lay.swap_direction == "all") & (lay.layer == 0)]
    assert (row["n_massive"] == 1).all() and (row["rel_l2_rms"] < row["rel_l2_rms_nomassive"]).all()


def test_sensitivity_is_monotone_and_matches_the_candidates(unplanted):
    sens = unplanted.sensitivity
    assert set(sens["parameter"]) == {"threshold", "responsive_z", "responsive_sign"}
    for (cat, d, _h, param), g in sens.groupby(["category", "swap_direction", "hook", "parameter"]):
        v = g.sort_values("value")["n_candidates"].to_numpy()
        assert (np.diff(v) >= 0).all() if param == "threshold" else (np.diff(v) <= 0).all(), (cat, d, param)
        assert g["default"].sum() == 1
    cand = unplanted.candidates
    for (cat, d, h, kind), g in sens[sens["default"]].groupby(["category", "swap_direction", "hook", "kind"]):
        c = cand[(cand.category == cat) & (cand.swap_direction == d) & (cand.hook == h) & (cand.kind == kind)]
        listed = int(c.drop_duplicates(["layer", "offset"])["n_passing"].sum()) if not c.empty else 0
        assert (g["n_candidates"] == listed).all(), (cat, d, kind)
    # Every count, the whole grid at once, is the candidate rule's own mask at that setting.
    for r in sens.itertuples():
        kw = ({"threshold": r.value} if r.parameter == "threshold"
              else {r.parameter: r.value})
        m = unplanted.candidate_masks(r.hook, r.category, r.swap_direction, **kw)[r.kind]
        assert r.n_candidates == int(m.sum()), r
    # Each threshold of the grid: the stable masks of a run set to it (its fraction of pairs under it)
    for v in unplanted.grid("threshold"):
        other = DiffResult({**unplanted.meta, "config": {**unplanted.meta["config"], "threshold": v}},
                           unplanted.tensors)
        for cat, d in unplanted.stat_groups():
            for h in unplanted.hooks:
                if d == "all":
                    assert torch.equal(unplanted.candidate_masks(h, cat, d, threshold=v)["stable"],
                                       other.candidate_masks(h, cat, d)["stable"]), (v, cat, h)
    with pytest.raises(EclensError, match="pool their swap directions only"):  # one direction: no threshold grid
        unplanted.candidate_masks(unplanted.hooks[0], "test/x", "up", threshold=0.1)


def test_sensitivity_figure(unplanted):
    from eclens.measureviz import sensitivity_figure

    fig = sensitivity_figure(unplanted.sensitivity)
    names = {t.name for t in fig.data}
    assert names == {"all"} and len(fig.layout.annotations) == 3
    fig = sensitivity_figure(unplanted.sensitivity, category="test/x")
    assert {t.name for t in fig.data} == {"all", "up", "down"}


def test_layer_intervals_cover_the_estimate(unplanted):
    lay = unplanted.layers
    ok = lay["rel_l2_mean_lo"].notna()
    assert ok.mean() > 0.9
    d = lay[ok]
    assert (d["rel_l2_mean_lo"] <= d["rel_l2_mean"] + 1e-12).all() and (d["rel_l2_mean"] <= d["rel_l2_mean_hi"]
                                                                        + 1e-12).all()
    top = unplanted.summary["max_rel_l2_at_p"]["hook_resid_post"]
    assert top["rel_l2_mean_lo"] <= top["rel_l2_mean"] <= top["rel_l2_mean_hi"]


def labelled_pairs(tiny):
    pairs = direction_pairs(tiny.tokenizer, n_clusters=30)
    for a in pairs:
        c = int(a.pair.cluster[1:])
        a.pair.category = "alpha/x" if (c * 7) % 3 else "beta/x"
    return pairs


CON = dict(hooks="hook_resid_post,hook_mlp_out", max_offset=1, batch_size=8, sample_size=64, n_boot=200, n_perm=300,
           contrast_offsets=[0, 1])


def test_contrast_finds_a_planted_group_difference(tiny):
    pairs = labelled_pairs(tiny)
    model = Plant(tiny, "blocks.0.hook_resid_post", plant_up(pairs, 10.0, lambda a: a.category == "beta/x"))
    con = run_diff(model, pairs, **CON).contrasts
    sig = con[con["significant"]]
    # found where the plant is (layer 0's residual stream, and what reads it), with beta above alpha
    assert ((con.hook == "hook_resid_post") & (con.layer == 0) & con.significant).sum() == 4  # measures x offsets
    assert (sig["effect"] < 0).all() and (sig["effect_hi"] < 0).all()


def test_contrast_null_on_an_unplanted_model_finds_nothing(tiny):
    """Two category groups of the same kind of pair (labels drawn by cluster): no effect survives."""
    res = run_diff(tiny, labelled_pairs(tiny), **CON)
    con = res.contrasts
    assert set(con["contrast"]) == {"alpha vs beta"} and len(con) == 2 * 2 * 2 * 2  # measures x hooks x L x offs
    assert not con["significant"].any()
    assert (con["effect_lo"] <= con["effect"]).all() and (con["effect"] <= con["effect_hi"]).all()
    assert res.summary["contrasts"]["n_significant"] == {}
