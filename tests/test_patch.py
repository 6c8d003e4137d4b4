"""Batched exact patching against TransformerLens, dimension sets against random controls,
attribution against finite differences and exact patching, and the `ec patch` command."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from eclens import patch as P
from eclens.errors import EclensError
from eclens.metrics import METRICS
from eclens.pairs import MinimalPair, check_with_model, load_aligned, write_jsonl

# Short pairs (4-5 tokens) keep TransformerLens's one-pass-per-patch reference cheap.
SHORT = [
    MinimalPair("cat", "The cat is here.", "The cats is here.", "grammar/agreement"),
    MinimalPair("walk", "She walks home.", "She walk home.", "grammar/agreement"),
    MinimalPair("run", "A dog ran.", "A dog run.", "grammar/tense"),
]
LONGER = [
    MinimalPair("keys", "The keys to the cabinet are here.", "The keys to the cabinet is here.", "grammar/agreement"),
    MinimalPair("book", "She read a book about the sea.", "She read a book about the war.", "meaning/adjective"),
    MinimalPair("went", "They went to the market yesterday.", "They go to the market yesterday.", "grammar/tense"),
    MinimalPair("an", "He ate an apple after lunch.", "He ate a apple after lunch.", "grammar/article"),
]


@contextlib.contextmanager
def one_thread():
    # Many tiny single-sentence forward passes: on a shared 2-core machine, two threads
    # spin against other processes and run ~5x slower than one.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@pytest.fixture(scope="module")
def short(model):
    res = check_with_model(SHORT, model)
    assert len(res.valid) == 3, [r.label for r in res.rejected]
    return res.valid


@pytest.fixture(scope="module")
def tiny_pairs(tiny):
    res = check_with_model(SHORT + LONGER, tiny)
    assert len(res.valid) >= 5, [r.label for r in res.rejected]
    return res.valid


# ------------------------------------------------------------------------ exact patching


# ~14 s: TransformerLens patches one position per forward pass; the fast tests compare it with ec on the tiny
# model (test_bench_script_smoke)
@pytest.mark.slow
def test_exact_resid_pre_matches_transformerlens(model, short):
    """Our batched sweep equals TransformerLens's one-pass-per-patch sweep (all positions,
    a subset of layers to keep the reference cheap), for every metric, within 1e-4."""
    from transformer_lens import patching as tlp

    df = P.exact_patch(model, short, hooks="resid_pre", direction="denoise")
    layers = [0, 1, 15, 29]
    for a in short:
        prep = next(P.prepare(model, [a]))
        ctx = prep.metrics
        _, cache = model.run_with_cache(torch.tensor([a.clean_ids]), names_filter=lambda n: n.endswith("resid_pre"))
        index = pd.DataFrame([(L, t) for L in layers for t in range(a.length)], columns=["layer", "pos"])
        fns = {m: (lambda logits, m=m, ctx=ctx: ctx.evaluate(logits)[m][0]) for m in METRICS}
        with one_thread():
            ref = tlp.generic_activation_patch(model, torch.tensor([a.corrupt_ids]), cache, fns,
                                               tlp.layer_pos_patch_setter, "resid_pre", index_df=index)
        ours = df[df.pair_id == a.id].set_index(["layer", "position"])
        for k, m in enumerate(METRICS):
            got = np.array([ours.loc[(L, t), m] for L, t in index.itertuples(index=False)])
            np.testing.assert_allclose(got, ref.values[k].numpy(), atol=1e-4, err_msg=f"{a.id} {m}")
        # the whole grid is there: every layer x position, with restored fractions
        assert len(ours) == model.cfg.n_layers * a.length
        assert set(ours["position_kind"]) >= {"before", "changed", "last"}


def test_patching_every_position_at_layer0_resid_pre_restores_exactly(model, short):
    with one_thread():
        _restores_exactly(model, short)


def _restores_exactly(model, short):
    for a in short:
        r = P.patch_all_positions(model, a, "resid_pre", 0, "denoise")
        for m in METRICS:
            assert r[f"{m}_restored"] == pytest.approx(1.0, abs=1e-5), (a.id, m, r)
        n = P.patch_all_positions(model, a, "resid_pre", 0, "noise")  # the clean run becomes the corrupt run
        for m in METRICS:
            assert n[f"{m}_restored"] == pytest.approx(0.0, abs=1e-5), (a.id, m, n)


def test_exact_patch_batching_directions_and_heads(tiny, tiny_pairs):
    pairs = tiny_pairs[:3]
    a = P.exact_patch(tiny, pairs, direction="both", heads=True, batch_size=256)
    b = P.exact_patch(tiny, pairs, direction="both", heads=True, batch_size=37, skip_noops=False)
    assert len(a) == len(b)
    for m in METRICS:  # chunking and the no-op shortcut change nothing
        np.testing.assert_allclose(a[m].to_numpy(), b[m].to_numpy(), atol=2e-5)
    n_pos = sum(p.length for p in pairs)
    L, H = tiny.cfg.n_layers, tiny.cfg.n_heads
    assert len(a) == 2 * n_pos * L * (4 + H)
    heads = a[a.hook == P.HEAD_HOOK]
    assert sorted(heads["head"].unique()) == list(range(H)) and (a[a.hook != P.HEAD_HOOK]["head"] == -1).all()
    # patching a position before p is a no-op in both directions
    before = a[a.position_kind == "before"]
    assert (before[before.direction == "denoise"]["logit_diff_restored"].abs() < 1e-6).all()
    assert ((before[before.direction == "noise"]["logit_diff_restored"] - 1).abs() < 1e-6).all()
    # resid_pre at layer 0 at the changed position carries the whole difference
    p0 = a[(a.hook == "hook_resid_pre") & (a.layer == 0) & (a.position_kind == "changed")]
    np.testing.assert_allclose(p0[p0.direction == "denoise"]["logit_diff_restored"], 1.0, atol=1e-5)
    np.testing.assert_allclose(p0[p0.direction == "noise"]["logit_diff_restored"], 0.0, atol=1e-5)
    t = P.exact_tensors(a, [p.id for p in pairs], L, "logit_diff_restored")
    assert t["exact/denoise/hook_resid_pre/logit_diff_restored"].shape == (3, L, max(p.length for p in pairs))
    assert t[f"exact/noise/{P.HEAD_HOOK}/logit_diff_restored"].shape[-1] == H


def test_all_heads_equal_attn_out(tiny, tiny_pairs):
    """Patching z of every head at (layer, position) is patching attn_out there (attn_out is linear in z)."""
    a = tiny_pairs[0]
    names = ["blocks.1.attn.hook_z", "blocks.1.hook_attn_out"]
    prep = next(P.prepare(tiny, [a], names))
    t = a.position
    rows_z = P.Rows.build([(1, names[0], 0, t, -1)])
    rows_o = P.Rows.build([(1, names[1], 0, t, -1)])
    rz = P.run_rows(tiny, prep, rows_z, {names[0]: prep.acts[names[0]]})
    ro = P.run_rows(tiny, prep, rows_o, {names[1]: prep.acts[names[1]]})
    for m in METRICS:
        assert rz[m][0] == pytest.approx(ro[m][0], abs=1e-5)
    assert rz["kl"][0] != pytest.approx(prep.metrics.corrupt["kl"], abs=1e-6)  # and it did something


def test_exact_patch_errors(tiny, tiny_pairs):
    with pytest.raises(EclensError, match="unknown hook"):
        P.exact_patch(tiny, tiny_pairs[:1], hooks="resid_nowhere")
    with pytest.raises(EclensError, match="out of range"):
        P.exact_patch(tiny, tiny_pairs[:1], layers=[5])
    with pytest.raises(EclensError, match="direction"):
        P.exact_patch(tiny, tiny_pairs[:1], direction="sideways")
    with pytest.raises(EclensError, match="no valid pairs"):
        P.exact_patch(tiny, [])
    with pytest.raises(EclensError, match="attention pattern"):
        P.exact_patch(tiny, tiny_pairs[:1], hooks="attn.hook_pattern")


# -------------------------------------------------------------------------- dimension sets


def test_random_control_pvalues_are_uniform_on_random_sets(tiny, tiny_pairs):
    """A "candidate" set drawn at random is exchangeable with its controls: p ~ uniform."""
    from scipy.stats import kstest

    rng = np.random.default_rng(123)
    d = tiny.cfg.d_model
    sets = [P.DimSet("hook_resid_pre", 1, rng.choice(d, size=6, replace=False).tolist(), 0, label=f"r{i}")
            for i in range(30)]
    res = P.dims_interventions(tiny, tiny_pairs[:2], sets, method="zero", n_controls=39, seed=5, batch_size=256)
    p = res.table["logit_diff_p"].to_numpy()
    assert len(p) == 30 and not np.isnan(p).any()
    assert kstest(p, "uniform").pvalue > 0.01
    assert abs(p.mean() - 0.5) < 0.15
    assert (res.table["logit_diff_q"] >= res.table["logit_diff_p"] - 1e-12).all()  # BH never lowers p
    assert res.table["verdict"].str.startswith("null").mean() > 0.8
    assert len(res.controls) == 30 * 39


def test_dims_patch_detects_the_dims_that_carry_the_change(model, short):
    """Patching the 8 residual dims with the largest clean-corrupt difference at p beats
    random 8-dim sets; a planted effect is found, and the controls are the same for every pair."""
    name = "blocks.3.hook_resid_pre"
    deltas = []
    for prep in P.prepare(model, short, [name]):
        a = prep.acts[name]
        deltas.append((a[0, prep.pair.position] - a[1, prep.pair.position]).abs())
    top = torch.stack(deltas).mean(0).topk(8).indices.tolist()
    res = P.dims_intervention(model, short, "resid_pre", 3, top, method="patch", n_controls=20, seed=1,
                              direction="both")
    t = res.table.set_index("direction")
    for d in ("denoise", "noise"):
        assert t.loc[d, "kl_p"] == pytest.approx(1 / 21)  # beyond every control
        assert abs(t.loc[d, "kl_z"]) > 3
    assert t.loc["denoise", "kl_effect"] < 0 < t.loc["noise", "kl_effect"]  # closer to / further from clean
    c = res.controls
    assert c.groupby("direction")["dims"].apply(list).apply(tuple).nunique() == 1  # same controls both ways
    assert all(len(s.split()) == 8 and not set(map(int, s.split())) & set(top) for s in c["dims"])
    assert len(res.per_pair) == 2 * len(short)


@pytest.mark.parametrize("method", ["mean", "resample", "zero"])
def test_dims_ablations_run_and_are_seeded(tiny, tiny_pairs, method):
    args = dict(method=method, n_controls=10, seed=3, direction="both")
    r1 = P.dims_intervention(tiny, tiny_pairs[:4], "mlp_out", 1, [0, 5, 9], offset=-1, **args)
    r2 = P.dims_intervention(tiny, tiny_pairs[:4], "mlp_out", 1, [0, 5, 9], offset=-1, **args)
    pd.testing.assert_frame_equal(r1.table, r2.table)
    assert (r1.table["n_pairs"] == 4).all() and (r1.table["offset"] == -1).all()
    assert r1.table["logprob_effect"].notna().all()


def test_dims_skips_pairs_too_short_for_the_offset(tiny, tiny_pairs):
    r = P.dims_intervention(tiny, tiny_pairs, "resid_pre", 0, [1, 2], offset=4, n_controls=5)
    want = sum(1 for a in tiny_pairs if a.position + 4 < a.length)
    assert int(r.table["n_pairs"].iloc[0]) == want < len(tiny_pairs)


def test_dims_errors(tiny, tiny_pairs):
    with pytest.raises(EclensError, match="at least 2 pairs"):
        P.dims_intervention(tiny, tiny_pairs[:1], "resid_pre", 0, [1], method="resample")
    with pytest.raises(EclensError, match="out of range"):
        P.dims_intervention(tiny, tiny_pairs[:2], "resid_pre", 0, [1, 999])
    with pytest.raises(EclensError, match="too few"):
        P.dims_intervention(tiny, tiny_pairs[:2], "resid_pre", 0, list(range(40)))
    with pytest.raises(EclensError, match="unknown ablation"):
        P.dims_intervention(tiny, tiny_pairs[:2], "resid_pre", 0, [1], method="scramble")


def test_candidate_sets_from_the_diff_contract(tmp_path):
    rows = []
    for kind, layer, dims in (("stable", 2, [5, 1, 9, 3]), ("responsive", 4, [7, 8]), ("stable", 0, [2])):
        for r, d in enumerate(dims):
            rows.append({"category": "all", "hook": "hook_resid_pre", "layer": layer, "offset": 0, "dim": d,
                         "kind": kind, "rank": r + (0 if layer == 4 else 1)})
    rows.append({"category": "grammar", "hook": "hook_resid_pre", "layer": 1, "offset": 0, "dim": 4,
                 "kind": "stable", "rank": 0})
    f = tmp_path / "candidates.csv"
    pd.DataFrame(rows).to_csv(f, index=False)
    sets = P.candidate_sets(str(f), top_k=3)
    # kinds interleaved, file order within a kind (no score columns)
    assert [(s.layer, s.kind) for s in sets] == [(2, "stable"), (4, "responsive"), (0, "stable")]
    assert sets[0].dims == [1, 5, 9]  # best three by rank, sorted
    assert [s.layer for s in P.candidate_sets(str(f), kind="stable", max_sets=1)] == [2]
    scored = pd.DataFrame(rows).assign(absz_q90=lambda d: np.where(d["layer"] == 0, 0.01, 0.05))
    assert [s.layer for s in P.candidate_sets(scored, kind="stable")] == [0, 2]  # strongest stable set first
    pattern = pd.DataFrame(rows).assign(hook="attn.hook_pattern")
    with pytest.raises(EclensError, match="attention-pattern"):
        P.candidate_sets(pattern)
    assert P.candidate_sets(str(f), category="grammar")[0].dims == [4]
    pd.DataFrame(rows).drop(columns="rank").to_csv(f, index=False)
    with pytest.raises(EclensError, match="missing column.*rank"):
        P.candidate_sets(str(f))
    with pytest.raises(EclensError, match="no candidates file"):
        P.candidate_sets(str(tmp_path / "nope.csv"))


def test_bh_qvalues():
    from scipy.stats import false_discovery_control

    p = np.array([0.01, 0.04, 0.03, np.nan, 0.5, 0.002])
    q = P.bh_qvalues(p)
    ok = ~np.isnan(p)
    np.testing.assert_allclose(q[ok], false_discovery_control(p[ok], method="bh"))
    assert np.isnan(q[3])


# ------------------------------------------------------------------------- attribution


def test_attribution_is_the_gradient_times_delta(tiny, tiny_pairs):
    """Central finite difference along (clean - corrupt) at one (hook, layer, position) equals the score."""
    a = tiny_pairs[0]
    df = P.attribution_patch(tiny, [a], hooks="resid_pre,mlp_out", metric="logprob")
    for hook, layer, t in (("hook_resid_pre", 1, a.position), ("hook_mlp_out", 0, a.length - 1)):
        name = f"blocks.{layer}.{hook}"
        prep = next(P.prepare(tiny, [a], [name]))
        acts = prep.acts[name]
        delta = acts[0] - acts[1]
        eps = 1e-2
        bank = torch.stack([acts[1] + eps * delta, acts[1] - eps * delta])
        rows = P.Rows.build([(1, name, 0, t, -1), (1, name, 1, t, -1)])
        r = P.run_rows(tiny, prep, rows, {name: bank})
        fd = (r["logprob"][0] - r["logprob"][1]) / (2 * eps)
        score = df[(df.hook == hook) & (df.layer == layer) & (df.position == t)]["attribution"].item()
        assert score == pytest.approx(fd, rel=0.02, abs=1e-5)


def test_attribution_heads_sum_to_attn_out_and_verify(tiny, tiny_pairs):
    pairs = tiny_pairs[:3]
    df, dims = P.attribution_patch(tiny, pairs, hooks="attn_out", heads=True, direction="both", verify_top=4,
                                   return_dims=True, batch_size=2)
    key = ["pair_id", "direction", "layer", "position"]
    z = df[df.hook == P.HEAD_HOOK].groupby(key)["attribution"].sum()
    o = df[df.hook == "hook_attn_out"].set_index(key)["attribution"]
    np.testing.assert_allclose(z.loc[o.index].to_numpy(), o.to_numpy(), atol=1e-5)
    ver = df[df.verified]
    assert set(ver["verify_group"]) == {"top", "random"}
    assert (ver.groupby(["pair_id", "direction"]).size() == 8).all()
    assert (ver["position"] >= ver["pair_id"].map({p.id: p.position for p in pairs})).all()
    s = P.attribution_summary(df, 4)
    assert s["n_verified"] == len(ver) and s["spearman"] > 0.5
    # The verified "top" rows are each group's 4 largest |attribution|, so the top-4 overlap is the share
    # of them among the 4 largest |exact| (0.96 here: the linear estimate ranks a tiny model's heads well).
    overlaps = [len(set(g.index[g.verify_group == "top"]) & set(g["exact"].abs().nlargest(4).index)) / 4
                for _, g in ver.groupby(["pair_id", "direction"])]
    assert s["topk_overlap"] == pytest.approx(np.mean(overlaps)) and s["topk_overlap"] > 0.5
    assert dims["denoise/hook_attn_out"].shape == (3, tiny.cfg.n_layers, tiny.cfg.d_model)
    # per-dimension scores at p sum to the component's score at p
    for i, p in enumerate(pairs):
        row = o.loc[(p.id, "denoise", 1, p.position)]
        assert float(dims["denoise/hook_attn_out"][i, 1].sum()) == pytest.approx(row, abs=1e-5)


def test_topk_overlap():
    assert P.topk_overlap([5, -4, 0.1, 0.2], [3, 0, -9, 0], 2) == 0.5


# ---------------------------------------------------------------------------------- CLI


@pytest.mark.slow  # a child process loads the embedded model: ~15 s; in-process `ec patch` runs in the fast tests
def test_cli_patch_end_to_end(tmp_path):
    """Real `ec patch` in a subprocess: a raw pairs file aligned into a run, exact patching written."""
    f = tmp_path / "pairs.jsonl"
    write_jsonl(f, [*SHORT[:2], MinimalPair("bad", "The cat sat.", "A dog sat.")])
    run = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "eclens", "patch", str(f), "--out", str(run), "--hooks",
                        "resid_pre,mlp_out", "--layers", "0-1,29"], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})  # see one_thread()
    assert r.returncode == 0, r.stderr
    assert len(load_aligned(run / "pairs.jsonl")) == 2
    assert json.loads((run / "rejected.jsonl").read_text())["reason"] == "multiple_differences"
    df = pd.read_csv(run / "patch_exact.csv")
    for col in ("pair_id", "category", "direction", "hook", "layer", "position", "offset", "token", "head",
                *METRICS, *(f"{m}_restored" for m in METRICS)):
        assert col in df.columns
    assert set(df["layer"]) == {0, 1, 29} and set(df["direction"]) == {"denoise", "noise"}
    man = json.loads((run / "manifest.json").read_text())
    assert man["model"]["name"] == "smollm2-135m" and man["dataset"]["n_valid"] == 2
    assert "patch_exact.csv" in man["steps"]["patch"]["exact"]["files"]
    assert "exact" in json.loads((run / "patch_summary.json").read_text())
    from safetensors.torch import load_file

    t = load_file(str(run / "patch.safetensors"))
    assert t["exact/denoise/hook_resid_pre/logit_diff_restored"].shape[:2] == (2, 30)


def test_cli_patch_dims_and_attribution_on_a_run(model, short, tmp_path, monkeypatch):
    """The other modes on an existing run (in-process, reusing the loaded embedded model)."""
    from eclens.cli import main
    from eclens.commands import _common
    from eclens.model import manifest_model_entry
    from eclens.runs import update_manifest

    run = tmp_path / "run"
    short = short[:2]
    write_jsonl(run / "pairs.jsonl", short)
    update_manifest(run, model=manifest_model_entry(model))
    monkeypatch.setattr(_common, "load", lambda *a, **k: model)
    assert main(["patch", str(run), "--mode", "dims"]) == 2  # no candidates yet: one-line error
    pd.DataFrame([{"category": "all", "hook": "hook_resid_pre", "layer": 3, "offset": 0, "dim": d,
                   "kind": "responsive", "rank": r} for r, d in enumerate([10, 20, 30])]).to_csv(
        run / "candidates.csv", index=False)
    assert main(["patch", str(run), "--mode", "dims", "--n-controls", "10", "--direction", "denoise"]) == 0
    dims = pd.read_csv(run / "patch_dims.csv")
    assert len(dims) == 1 and dims["dims"].iloc[0] == "10 20 30" and dims["n_controls"].iloc[0] == 10
    assert len(pd.read_csv(run / "patch_dims_controls.csv")) == 10
    assert main(["patch", str(run), "--mode", "attribution", "--hooks", "resid_pre", "--verify-top", "3",
                 "--direction", "denoise"]) == 0
    att = pd.read_csv(run / "patch_attribution.csv")
    assert len(att) == sum(p.length for p in short) * 30 and att["verified"].sum() == 6 * len(short)
    summary = json.loads((run / "patch_summary.json").read_text())
    assert {"dims", "attribution"} <= set(summary) and summary["attribution"]["spearman"] is not None
    man = json.loads((run / "manifest.json").read_text())
    assert {"dims", "attribution"} <= set(man["steps"]["patch"])


def test_cli_patch_bad_input_one_line(tmp_path):
    from eclens.cli import main

    r = subprocess.run([sys.executable, "-m", "eclens", "patch", str(tmp_path / "missing.jsonl")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip() == f"error: {tmp_path / 'missing.jsonl'}: no such run folder or pairs file"
    f = tmp_path / "p.jsonl"
    write_jsonl(f, SHORT[:1])
    assert main(["patch", str(f)]) == 2  # a pairs file needs --out
    assert main(["patch", str(f), "--out", str(tmp_path / "r"), "--mode", "sideways"]) == 2
    assert not (tmp_path / "r").exists()


def test_bench_script_smoke(tmp_path):
    """scripts/bench_patch.py end to end on the tiny model (TransformerLens vs ec, attribution vs exact)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "bench_patch.py"
    spec = importlib.util.spec_from_file_location("bench_patch", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    with one_thread():
        assert bench.main(["--model", "tiny", "--tl-pairs", "1", "--attr-pairs", "2", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    a = res["tl_vs_ec"]
    assert max(a["ec_max_abs_diff"].values()) < 1e-4 and a["patched_runs"] == 2 * a["lengths"][0]
    b = res["attribution_vs_exact"]
    # attribution is a first-order estimate of exact patching: on the tiny model it ranks the 72
    # components nearly as exact patching does (Spearman 0.88 measured); unrelated rankings give ~0
    assert b["spearman_pooled"] > 0.5 and b["components"] > 0
