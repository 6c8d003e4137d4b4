"""`ec diff`: streaming statistics against brute force, invariances, resume, CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from eclens.diff import STATS_FILE, DiffConfig, DiffResult, load_stats, merge_results, resolve_cells, run_diff
from eclens.errors import EclensError
from eclens.hooks import iter_batches, pad_id, select_hooks, split_hook
from eclens.pairs import AlignedPair, MinimalPair, check_with_model, write_jsonl
from eclens.tables import read_table_file

SENTENCES = [
    ("The keys to the cabinet are here.", "The keys to the cabinet is here.", "grammar/agreement"),
    ("The cat sits on the mat.", "The cat sit on the mat.", "grammar/agreement"),
    ("My brother plays the guitar every evening after dinner.",
     "My brother play the guitar every evening after dinner.", "grammar/agreement"),
    ("The children were happy.", "The children was happy.", "grammar/agreement"),
    ("She visited the old museum in Paris yesterday.", "She visited the old museum in London yesterday.",
     "meaning/location"),
    ("The dog chased the ball.", "The cat chased the ball.", "meaning/subject"),
    ("He walked to the station", "He walked to the school", "meaning/location"),
    ("A small bird sang in the tall tree this morning.", "A small bird sang in the old tree this morning.",
     "meaning/adjective"),
]
SUFFIXES = ("hook_resid_pre", "hook_attn_out", "hook_resid_mid", "hook_mlp_out", "hook_resid_post", "mlp.hook_post",
            "attn.hook_z", "attn.hook_pattern")
# Every kind of hook, at the first two, a middle and the last layer (the brute force is slow in numpy).
HOOKS = [f"blocks.{layer}.{h}" for layer in (0, 1, 15, 29) for h in SUFFIXES]


def make_pairs(model, sentences=SENTENCES):
    pairs = [MinimalPair(f"p{i}", c, x, cat) for i, (c, x, cat) in enumerate(sentences)]
    res = check_with_model(pairs, model)
    assert len(res.valid) >= len(sentences) - 1, [r.label for r in res.rejected]
    return res.valid


@pytest.fixture(scope="module")
def pairs(model):
    return make_pairs(model)


# ----------------------------------------------------------------------------- brute force


def brute_force(model, pairs, names, offsets, batched_with: int | None):
    """Per-pair activations from ``run_with_cache`` (whole cache), then statistics in numpy.

    ``batched_with``: run the same padded batches as the streaming run (bit-identical
    activations); ``None``: each sentence alone (differs by float32 forward noise).
    """
    per_pair = {}
    if batched_with:
        for b in iter_batches(pairs, batched_with, pad_id(model)):
            _, cache = model.run_with_cache(b.tokens, names_filter=lambda n: n in names)
            for i, a in enumerate(b.pairs):
                per_pair[a.id] = {n: (cache[n][i], cache[n][b.size + i]) for n in names}
    else:
        for a in pairs:
            _, cc = model.run_with_cache(torch.tensor([a.clean_ids]), names_filter=lambda n: n in names)
            _, cx = model.run_with_cache(torch.tensor([a.corrupt_ids]), names_filter=lambda n: n in names)
            per_pair[a.id] = {n: (cc[n][0], cx[n][0]) for n in names}
    # values[name][offset] = list of (category, clean_vec, corrupt_vec)
    out = {}
    for n in names:
        pattern = n.endswith("hook_pattern")
        for o, off in enumerate(offsets):
            rows = []
            for a in pairs:
                t = a.position + off if off >= 0 else a.length - 1
                if t >= a.length:
                    continue
                c, x = per_pair[a.id][n]
                if pattern:
                    vc, vx = c[:, t, a.position], x[:, t, a.position]
                else:
                    vc, vx = c[t].reshape(-1), x[t].reshape(-1)
                rows.append((a.category, vc.double().numpy(), vx.double().numpy(), a.id))
            out[(n, o)] = rows
    return out


def ref_stats(rows, category, sigma, threshold):
    sel = [r for r in rows if category == "all" or r[0] == category]
    C = np.stack([r[1] for r in sel])
    X = np.stack([r[2] for r in sel])
    D = X - C
    n = len(sel)
    z = np.abs(D) / sigma
    S = D.sum(0)
    loo = []
    for d in D:
        rest = S - d
        if np.linalg.norm(d) > 0 and np.linalg.norm(rest) > 1e-2 * np.linalg.norm(d) and n > 1:
            loo.append(d @ rest / (np.linalg.norm(d) * np.linalg.norm(rest)))
    with np.errstate(all="ignore"):
        out = {
            "mean_delta": D.mean(0),
            "std_delta": D.std(0, ddof=1) if n > 1 else np.full(D.shape[1], np.nan),
            "mean_abs_delta": np.abs(D).mean(0),
            "mean_clean": C.mean(0),
            "sign_consistency": np.maximum((D > 0).mean(0), (D < 0).mean(0)),
            "absz_median": np.median(z, 0),
            "absz_q90": np.quantile(z, 0.9, axis=0),
            "frac_under": (z < threshold).mean(0),
            "rel_l2_mean": np.mean(np.linalg.norm(D, axis=1) / np.linalg.norm(C, axis=1)),
            "cos_mean": np.mean((C * X).sum(1) / (np.linalg.norm(C, axis=1) * np.linalg.norm(X, axis=1))),
            "dir_consistency": np.sum(D.mean(0) ** 2) / np.mean(np.sum(D**2, 1)),
            "loo_cos_mean": np.mean(loo) if loo else np.nan,
        }
    return out, n


def rel_err(a, b):
    a, b = np.asarray(a, float), np.asarray(b, float)
    ok = np.isfinite(b)
    assert np.array_equal(np.isfinite(a), ok), "NaN pattern differs"
    if not ok.any():
        return 0.0
    den = np.linalg.norm(b[ok])
    return float(np.linalg.norm(a[ok] - b[ok]) / (den if den > 0 else 1.0))


def compare_to_brute(res: DiffResult, ref, names, categories, tol, sample_tol, same_batches=True):
    worst = {}
    for n in names:
        layer, suffix = split_hook(n)
        g = res.group(suffix)
        li = g.layers.index(layer)
        all_rows = {o: ref[(n, o)] for o in range(len(res.offsets))}
        for cat in categories:
            st = res.cell_stats(suffix, cat)
            for o in range(len(res.offsets)):
                rows = all_rows[o]
                if not [r for r in rows if cat == "all" or r[0] == cat]:
                    assert int(st["n"][o]) == 0
                    continue
                Call = np.stack([r[1] for r in rows])
                sigma = Call.std(0, ddof=1) if len(rows) > 1 else np.full(Call.shape[1], np.nan)
                with np.errstate(all="ignore"):
                    sigma = np.where(sigma > 0, sigma, np.nan)
                want, nn = ref_stats(rows, cat, sigma, res.config.threshold)
                assert int(st["n"][o]) == nn
                assert np.allclose(st["sigma_clean"][li, o].numpy(), sigma, rtol=1e-5, equal_nan=True) or \
                    rel_err(st["sigma_clean"][li, o].numpy(), sigma) < tol
                for k, v in want.items():
                    got = st[k][li, o].numpy()
                    if k in ("mean_delta", "mean_abs_delta", "mean_clean", "std_delta"):
                        got = got.copy()
                    if k == "frac_under" or (k == "sign_consistency" and not same_batches):
                        # a z within float16 rounding of the threshold may fall on either side; run in
                        # other batches, a Δ within float32 noise of 0 may change sign (seen: 1 of 8 pairs)
                        e = float(np.nanmax(np.abs(got - v))) if np.isfinite(v).any() else 0.0
                        assert e <= 1.0 / nn + 1e-12, (n, cat, o, k, e)
                        continue
                    if k in ("mean_delta",) and np.allclose(v, 0):
                        continue
                    try:
                        e = rel_err(got, v)
                    except AssertionError as err:
                        raise AssertionError((n, cat, res.offsets[o], k, got, v)) from err
                    if k == "loo_cos_mean":  # a cosine (of float16 sample values) near 0: compare absolutely
                        e = float(abs(got - v)) if np.isfinite(v) else 0.0
                    t = sample_tol if k in ("absz_median", "absz_q90", "loo_cos_mean") else tol
                    worst[k] = max(worst.get(k, 0.0), e)
                    assert e <= t, (n, cat, res.offsets[o], k, e)
    return worst


@pytest.mark.slow
@pytest.mark.parametrize("batched", [True, False], ids=["same-batches", "one-sentence-at-a-time"])
def test_streaming_equals_brute_force(model, pairs, batched):
    res = run_diff(model, pairs, hooks=HOOKS, max_offset=2, batch_size=4, sample_size=64)
    names = select_hooks(model, HOOKS)
    ref = brute_force(model, pairs, names, res.offsets, 4 if batched else None)
    cats = ["all", "grammar/agreement", "meaning/location"]
    # Exact statistics: relative error <= 1e-5. With the same batches the activations are bit-identical;
    # run one sentence at a time, float32 matmuls of other shapes change Δ by ~5e-6 relative, so there
    # the exact statistics are held to 1e-4. Sample statistics are float16 (~5e-4 relative).
    tol = 1e-5 if batched else 1e-4
    worst = compare_to_brute(res, ref, names, cats, tol=tol, sample_tol=5e-3, same_batches=batched)
    assert worst["mean_abs_delta"] <= tol and worst["rel_l2_mean"] <= tol


@pytest.mark.slow
def test_pair_metrics_match_brute_force(model, pairs):
    some = pairs[:5]
    res = run_diff(model, some, hooks="blocks.0.hook_resid_post", batch_size=3, sample_size=8)
    df = res.pairs.set_index("id")
    for a in some:
        lc = torch.log_softmax(model(torch.tensor([a.clean_ids]))[0].double(), -1)
        lx = torch.log_softmax(model(torch.tensor([a.corrupt_ids]))[0].double(), -1)
        T, p = a.length, a.position
        sc = float(sum(lc[t, a.clean_ids[t + 1]] for t in range(T - 1)))
        sx = float(sum(lx[t, a.corrupt_ids[t + 1]] for t in range(T - 1)))
        kl = [(lc[t].exp() * (lc[t] - lx[t])).sum().item() for t in range(p, T)]
        r = df.loc[a.id]
        assert r["clean_logprob"] == pytest.approx(sc, abs=2e-3)
        assert r["corrupt_logprob"] == pytest.approx(sx, abs=2e-3)
        assert r["clean_token_logprob"] == pytest.approx(float(lc[p - 1, a.clean_ids[p]]), abs=1e-4)
        assert r["corrupt_token_logprob"] == pytest.approx(float(lc[p - 1, a.corrupt_ids[p]]), abs=1e-4)
        assert np.allclose(json.loads(r["kl"]), kl, atol=1e-4)
        assert r["kl_0"] == pytest.approx(kl[0], abs=1e-4) and r["kl_last"] == pytest.approx(kl[-1], abs=1e-4)


def test_identical_sentences_give_exactly_zero(model, pairs):
    same = [AlignedPair(MinimalPair(f"same{i}", a.pair.clean, a.pair.clean, a.category), a.clean_ids,
                        list(a.clean_ids), a.position, a.clean_token, a.clean_token) for i, a in enumerate(pairs)]
    res = run_diff(model, same, hooks=HOOKS, max_offset=2, batch_size=4, sample_size=16)
    from eclens.diff import FEATURES

    for h in res.hooks:
        feat = res.tensors[f"{h}/feat"]
        for k in ("delta_s1", "delta_s2", "delta_abs", "delta_sign", "delta_nonzero"):
            assert torch.count_nonzero(feat[:, :, FEATURES.index(k)]) == 0, (h, k)
        st = res.cell_stats(h)
        assert torch.count_nonzero(torch.nan_to_num(st["mean_delta"])) == 0
        assert torch.count_nonzero(torch.nan_to_num(st["rel_l2_mean"])) == 0
        assert torch.count_nonzero(res.tensors[f"{h}/sample_delta"]) == 0
        assert not st["reachable"].any()
    assert (res.pairs["kl_mean"] == 0).all() and (res.pairs["logprob_diff"] == 0).all()
    assert res.candidates.empty  # nothing is "stable" where nothing can change


@pytest.mark.slow
def test_batch_size_1_and_16_give_the_same_numbers(model, pairs):
    assert len({a.length for a in pairs}) >= 4  # mixed lengths: padding in every batch of 16
    r1 = run_diff(model, pairs, hooks=HOOKS, max_offset=2, batch_size=1, sample_size=64)
    r16 = run_diff(model, pairs, hooks=HOOKS, max_offset=2, batch_size=16, sample_size=64)
    assert r1.meta["sample_ids"] == r16.meta["sample_ids"]
    assert torch.equal(r1.tensors["count"], r16.tensors["count"])
    for h in r1.hooks:
        for cat in r1.categories:
            a, b = r1.cell_stats(h, cat), r16.cell_stats(h, cat)
            for k in ("mean_delta", "std_delta", "mean_abs_delta", "sigma_clean", "rel_l2_mean", "cos_mean",
                      "dir_consistency", "sign_consistency"):
                # float32 forward passes of other shapes differ by ~1e-6; nothing else may differ
                assert rel_err(a[k].numpy(), b[k].numpy()) < 1e-4, (h, cat, k)
            for k in ("absz_median", "loo_cos_mean"):  # from the float16 sample
                assert np.allclose(a[k].numpy(), b[k].numpy(), rtol=2e-3, atol=2e-3, equal_nan=True), (h, cat, k)
    p1, p16 = r1.pairs.set_index("id"), r16.pairs.set_index("id").loc[r1.pairs["id"]]
    assert np.allclose(p1["logprob_diff"], p16["logprob_diff"], atol=1e-3)
    assert np.allclose(p1["kl_mean"], p16["kl_mean"], atol=1e-5)


@pytest.mark.slow
def test_two_halves_merged_equal_the_whole(model, pairs):
    # Split at a batch boundary of the length-sorted order, so both runs see the same batches.
    order = sorted(pairs, key=lambda a: a.length)
    cats = sorted({a.category for a in pairs})
    hooks = ["blocks.1.hook_resid_post", "blocks.15.mlp.hook_post", "blocks.15.attn.hook_z",
             "blocks.29.hook_attn_out"]
    # shards of one dataset share its categories and its (category, swap direction) cells
    cells = resolve_cells(order, DiffConfig(categories=cats))
    whole = run_diff(model, order, hooks=hooks, batch_size=4, sample_size=5, categories=cats)
    a = run_diff(model, order[:4], hooks=hooks, batch_size=4, sample_size=5, categories=cats, cells=cells)
    b = run_diff(model, order[4:], hooks=hooks, batch_size=4, sample_size=5, categories=cats, cells=cells)
    m = merge_results(a, b)
    assert sorted(m.meta["sample_ids"]) == sorted(whole.meta["sample_ids"])  # bottom-k merges exactly
    for h in whole.hooks:
        for cat in whole.categories:
            x, y = whole.cell_stats(h, cat), m.cell_stats(h, cat)
            for k in ("mean_delta", "std_delta", "sigma_clean", "mean_abs_delta", "rel_l2_mean", "cos_mean",
                      "absz_median", "frac_under", "loo_cos_mean", "dir_consistency"):
                # the leave-one-out cosine subtracts a pair from the float32-accumulated sum of the
                # others (rest2 = |S|^2 - 2 d.S + |d|^2): cancellation leaves it ~10 eps32 (seen 1.4e-6)
                assert rel_err(y[k].numpy(), x[k].numpy()) < (1e-5 if k == "loo_cos_mean" else 1e-6), (h, cat, k)
    pd.testing.assert_frame_equal(m.layers, whole.layers, rtol=1e-5, atol=1e-6)
    with pytest.raises(EclensError):
        merge_results(a, a)


def test_tables_and_candidate_rule(model, pairs):
    res = run_diff(model, pairs, hooks=HOOKS, max_offset=1, batch_size=8, sample_size=64, min_pairs=3)
    L = res.layers
    assert {"category", "hook", "layer", "offset", "position_kind", "n", "rel_l2_mean", "cos_mean",
            "absz_median", "dir_consistency", "loo_cos_median", "n_massive", "reachable"} <= set(L.columns)
    assert set(L["offset"]) == {0, 1, -1} and set(L["category"]) == set(res.categories)
    assert not L[(L.hook == "hook_resid_pre") & (L.layer == 0) & (L.offset == 1)]["reachable"].any()
    D = res.dims
    assert {"dim", "unit", "head", "absz_median", "frac_under", "sign_consistency", "massive"} <= set(D.columns)
    assert set(D[D.hook == "attn.hook_z"]["unit"]) == {"head_dim"}
    assert set(D[D.hook == "mlp.hook_post"]["unit"]) == {"neuron"}
    assert D[D.hook == "attn.hook_z"]["head"].max() == model.cfg.n_heads - 1
    # every candidate satisfies the documented rule
    C = res.candidates
    assert not C.empty
    cfg = res.config
    s = C[C.kind == "stable"]
    r = C[C.kind == "responsive"]
    assert (s["frac_under"] >= cfg.stable_frac).all()
    assert (r["absz_median"] >= cfg.responsive_z).all() and (r["sign_consistency"] >= cfg.responsive_sign).all()
    assert (C["n"] >= 3).all()
    # ... and a dimension that satisfies it is listed (up to the per-layer cap)
    all0 = D[(D.category == "all") & (D.offset == 0) & ~D.massive & (D.n_sample >= 3)]
    pass_r = all0[(all0.absz_median >= 1) & (all0.sign_consistency >= 0.8) & (all0.sigma_clean > 0)]
    listed = C[(C.category == "all") & (C.offset == 0) & (C.kind == "responsive")]
    assert len(listed) == sum(min(len(g), cfg.max_candidates) for _, g in pass_r.groupby(["hook", "layer"]))
    assert res.heads.shape[0] > 0 and set(res.heads["hook"]) == {"attn.hook_z"}
    s = res.summary
    assert s["n_pairs"] == len(pairs) and "massive_dims" in s and "contrasts" in s


@pytest.mark.slow
def test_massive_dimensions_are_flagged(model, pairs):
    res = run_diff(model, pairs, hooks="hook_resid_post", max_offset=1, batch_size=8, min_pairs=3)
    st = res.cell_stats("hook_resid_post")
    g = res.group("hook_resid_post")
    # The RMS of each dimension's clean activation over the pairs, from run_with_cache, and the rule
    # (RMS > 100x the median dimension's RMS at that layer and offset) applied to it in numpy.
    names = [f"blocks.{layer}.hook_resid_post" for layer in g.layers]
    ref = brute_force(model, pairs, names, res.offsets, batched_with=8)
    rms = np.stack([[np.sqrt((np.stack([r[1] for r in ref[(n, o)]]) ** 2).mean(0)) for o in range(len(res.offsets))]
                    for n in names])  # [L, O, D]
    np.testing.assert_allclose(st["rms_clean"].numpy(), rms, rtol=1e-5)
    ratio = rms / np.median(rms, -1, keepdims=True)
    # torch's median of an even count is the lower middle value: cells within 1% of the threshold may differ
    clear = np.abs(ratio / 100 - 1) > 0.01
    assert clear.mean() > 0.99
    assert np.array_equal(st["massive_cell"].numpy()[clear], (ratio > 100)[clear])
    # a dimension massive at one aligned position of a layer is flagged at all of them
    assert torch.equal(st["massive"], st["massive_cell"].any(1, keepdim=True).expand_as(st["massive"]))
    # SmolLM2 has massive dimensions here (above 100x at p+1 in early layers; short of Sun et al.'s 1000x
    # at the first token, which is not aligned here), and they are the largest dimension at most layers.
    assert (ratio > 100).any()
    top = int(np.bincount(ratio.argmax(-1).ravel()).argmax())
    L = res.layers[(res.layers.category == "all")]
    assert (L["rms_ratio_dim"] == top).mean() > 0.5 and L["rms_ratio_max"].max() > 100
    low = run_diff(model, pairs, hooks="hook_resid_post", max_offset=1, batch_size=8, min_pairs=3,
                   massive_ratio=20)
    D = low.dims
    massive = D[D.massive & (D.category == "all")]
    clear20 = np.abs(ratio / 20 - 1) > 0.01
    want = {(g.layers[li], d) for li, o, d in zip(*np.nonzero((ratio > 20) & clear20))}
    got = {(int(r.layer), int(r.dim)) for r in massive.itertuples()}
    near = {(g.layers[li], d) for li, o, d in zip(*np.nonzero(~clear20))}
    assert want - near == got - near and top in {d for _, d in got}
    assert len(massive) == len(got) * len(res.offsets)  # every offset of the layer
    # flagged dimensions are never candidates
    C = low.candidates
    assert C.merge(D[D.massive][["category", "hook", "layer", "offset", "dim"]]).empty
    assert low.summary["massive_dims"]["hook_resid_post"] == sorted({d for _, d in got})


def test_contrasts_are_layer_effects_with_bh_over_all_rows(model):
    sents = [(f"The {w} runs fast.", f"The {w} run fast.", "grammar/agreement")
             for w in ("dog", "girl", "horse", "boy", "car", "child")]
    sents += [(f"The dog saw the {w}.", f"The dog saw the {v}.", "meaning/subject")
              for w, v in (("cat", "cow"), ("man", "boy"), ("car", "bus"), ("tree", "house"), ("bird", "fish"),
                           ("king", "queen"))]
    ps = make_pairs(model, sents)
    res = run_diff(model, ps, hooks="hook_resid_post", max_offset=0, batch_size=8, sample_size=64)
    con = res.contrasts
    assert set(con["contrast"]) == {"grammar vs meaning"} and set(con["measure"]) == {"rel_l2", "absz_mean"}
    assert len(con) == 2 * len(res.group("hook_resid_post").layers)  # one effect per measure and layer
    for _m, d in con.groupby("measure"):
        from scipy.stats import false_discovery_control

        assert np.allclose(d["q"], false_discovery_control(d["p"], method="bh"))
    assert (con["significant"] == (con["q"] <= 0.05)).all()


# ------------------------------------------------------------------------- resume, CLI (tiny model)


def small_pairs(tokenizer, n=24):
    words = ["dog", "cat", "bird", "horse", "man", "girl", "boy", "child", "car", "tree", "fish", "cow"]
    verbs = [("runs", "run"), ("sleeps", "sleep"), ("walks", "walk")]
    out = []
    for i in range(n):
        w, tail = words[i % 12], " every single day" * ((i // 12) % 3)
        v, x = verbs[(i // 36) % 3]
        out.append((f"The {w} {v}{tail}.", f"The {w} {x}{tail}.", "grammar/agreement" if i % 2 else "meaning/x"))
    assert len(set(out)) == n
    return out


def test_resume_continues_and_refuses_other_settings(tiny, tmp_path):
    pairs = make_pairs(tiny, small_pairs(tiny.tokenizer))
    full = run_diff(tiny, pairs, batch_size=4, sample_size=8)
    run = tmp_path / "run"
    part = run_diff(tiny, pairs, batch_size=4, sample_size=8, run=run, max_batches=2)
    assert not part.meta["complete"] and len(part.meta["done"]) == 8
    _, meta = load_stats(run)
    assert not meta["complete"] and len(meta["done"]) == 8
    with pytest.raises(EclensError, match="not complete"):
        DiffResult.load(run)
    with pytest.raises(EclensError, match="other settings"):
        run_diff(tiny, pairs, batch_size=4, sample_size=8, run=run, max_offset=2)
    from eclens import tiny_model

    other = tiny_model(n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, d_mlp=128, seed=1)
    with pytest.raises(EclensError, match="model"):
        run_diff(other, pairs, batch_size=4, sample_size=8, run=run)
    done = run_diff(tiny, pairs, batch_size=4, sample_size=8, run=run)
    assert done.meta["complete"] and done.timing["resumed_from"] == 8
    for h in full.hooks:
        for k in ("mean_delta", "std_delta", "sigma_clean", "absz_median", "rel_l2_mean"):
            # the same batches; only where the float32 staging sums are flushed differs
            assert rel_err(done.cell_stats(h)[k].numpy(), full.cell_stats(h)[k].numpy()) < 1e-7
    assert done.meta["sample_ids"] == full.meta["sample_ids"]
    assert sorted(r["id"] for r in done.meta["rows"]) == sorted(a.id for a in pairs)
    done.save(run)
    again = DiffResult.load(run)
    pd.testing.assert_frame_equal(again.layers, done.layers)


def test_checkpoints_follow_the_time_or_the_batch_count_and_sigterm_saves_one(tiny, tmp_path, monkeypatch):
    """By default a checkpoint is written once CHECKPOINT_SECONDS of streaming have passed (none in a short
    run: the complete state is the caller's to write), with checkpoint_every every that many batches; SIGTERM,
    like Ctrl-C, stops at the next batch boundary with a checkpoint that a rerun resumes from."""
    import eclens.diff.stream as stream

    pairs = make_pairs(tiny, small_pairs(tiny.tokenizer))  # 24 pairs: 6 batches of 4
    saved: list[int] = []
    real_save = stream.save_stats

    def save(run, tensors, meta):
        saved.append(len(meta["done"]))
        real_save(run, tensors, meta)

    monkeypatch.setattr(stream, "save_stats", save)

    def checkpoints(seconds: float, every: int | None, name: str) -> list[int]:
        saved.clear()
        monkeypatch.setattr(stream, "CHECKPOINT_SECONDS", seconds)
        run_diff(tiny, pairs, batch_size=4, sample_size=8, run=tmp_path / name, checkpoint_every=every)
        return list(saved)

    assert checkpoints(1e9, None, "long") == []  # the finished stream is never checkpointed
    assert checkpoints(0.0, None, "always") == [4, 8, 12, 16, 20]
    assert checkpoints(0.0, 2, "every2") == [8, 16]  # the batch count rules when given

    monkeypatch.setattr(stream, "CHECKPOINT_SECONDS", 1e9)
    calls = []
    real_metrics = stream.pair_metric_tensors

    def metrics(*a, **k):  # a scheduler's SIGTERM arrives during the second batch
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_metrics(*a, **k)

    monkeypatch.setattr(stream, "pair_metric_tensors", metrics)
    saved.clear()
    run = tmp_path / "term"
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt):
        run_diff(tiny, pairs, batch_size=4, sample_size=8, run=run)
    assert saved == [8] and signal.getsignal(signal.SIGTERM) == before  # the handler is put back
    monkeypatch.setattr(stream, "pair_metric_tensors", real_metrics)
    done = run_diff(tiny, pairs, batch_size=4, sample_size=8, run=run)
    assert done.meta["complete"] and done.timing["resumed_from"] == 8


def test_staged_sums_are_flushed_before_any_row_holds_more_than_the_bound(tiny, monkeypatch):
    """A staged float32 sum never holds more than ``flush_pairs`` terms (pairs of its state row since the last
    flush), whatever the batch; flushing more or less often changes the numbers by float32 rounding only."""
    from eclens.diff.accumulate import DiffAccumulator

    pairs = make_pairs(tiny, small_pairs(tiny.tokenizer))
    want = run_diff(tiny, pairs, batch_size=4, sample_size=8)  # 24 pairs: no row reaches 256, one flush
    monkeypatch.setattr(DiffAccumulator, "flush_pairs", 6)
    seen, flushes = [], []
    real_update, real_flush = DiffAccumulator._update, DiffAccumulator.flush

    def update(self, pairs, *a):
        real_update(self, pairs, *a)
        seen.append(int(self._row_terms.max()) + len(pairs))  # what the next batch could bring a row to

    def flush(self, final=False):
        flushes.append(int(self._row_terms.max()))
        real_flush(self, final)

    monkeypatch.setattr(DiffAccumulator, "_update", update)
    monkeypatch.setattr(DiffAccumulator, "flush", flush)
    got = run_diff(tiny, pairs, batch_size=4, sample_size=8)
    assert max(seen) <= 6 and len(flushes) > 2 and max(flushes) <= 6
    for h in want.hooks:
        for k in ("mean_delta", "std_delta", "sigma_clean", "absz_mean", "rel_l2_mean"):
            assert rel_err(got.cell_stats(h)[k].numpy(), want.cell_stats(h)[k].numpy()) < 1e-6, (h, k)


def test_host_sample_equals_device_sample(tiny, tmp_path):
    """The GPU layout of the pair sample (host memory, rows queued per batch and written oldest first) gives
    the same state as the in-place one, when the sample overflows (slots overwritten) and across a resume."""
    pairs = make_pairs(tiny, small_pairs(tiny.tokenizer))
    ref = run_diff(tiny, pairs, batch_size=4, sample_size=6)
    run = tmp_path / "run"
    run_diff(tiny, pairs, batch_size=4, sample_size=6, run=run, max_batches=1, host_sample=True)
    got = run_diff(tiny, pairs, batch_size=4, sample_size=6, run=run, host_sample=True)
    assert got.timing["resumed_from"] == 4 and len(pairs) > 2 * 6
    sample = [k for k in ref.tensors if k.endswith("sample_delta")]
    assert sample and all(torch.equal(ref.tensors[k], got.tensors[k]) for k in sample)
    assert got.meta["sample_ids"] == ref.meta["sample_ids"]
    pd.testing.assert_frame_equal(got.layers, ref.layers, rtol=1e-7)
    # Fewer pairs than slots: the unfilled slots of the uninitialised host buffer read as zeros.
    part = run_diff(tiny, pairs, batch_size=4, sample_size=64, max_batches=1, host_sample=True)
    keys = part.tensors["sample/keys"]
    assert (~torch.isfinite(keys)).any()
    assert all(not part.tensors[k][~torch.isfinite(keys)].any() for k in sample)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tokenizer):
    """A random-weight 2-layer Llama saved as a local Hugging Face folder (loadable by `--model PATH`)."""
    from eclens.model import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"), vocab_from=tokenizer, max_positions=256)


def _write_raw(path: Path, tokenizer, n=24):
    rows = [{"id": f"r{i}", "clean": c, "corrupt": x, "category": cat}
            for i, (c, x, cat) in enumerate(small_pairs(tokenizer, n))]
    rows.append({"id": "bad", "clean": "The cat sat on the mat.", "corrupt": "A cat sat on a mat.", "category": "typo"})
    write_jsonl(path, rows)
    return path


def test_cli_diff_writes_the_run_folder_and_resumes(tiny_dir, tokenizer, tmp_path, capsys):
    from eclens.cli import main

    raw = _write_raw(tmp_path / "raw.jsonl", tokenizer)
    run = tmp_path / "run"
    rc = main(["diff", str(raw), "--model", str(tiny_dir), "--out", str(run), "--batch-size", "4",
               "--hooks", "default,attn.hook_z", "--keep-state"])
    assert rc == 0, capsys.readouterr().err
    for f in ("manifest.json", "pairs.jsonl", "rejected.jsonl", "check.csv", STATS_FILE, "layers.parquet",
              "dims.parquet", "candidates.parquet", "contrasts.parquet", "sensitivity.csv", "pairs.csv", "summary.json",
              "heads.csv", "diff_directions.safetensors"):
        assert (run / f).exists(), f
    assert not list(run.glob(".*.tmp"))
    man = json.loads((run / "manifest.json").read_text())
    assert man["model"]["name"] == str(tiny_dir) and man["dataset"]["n_valid"] == 24
    assert man["steps"]["diff"]["n_pairs"] == 24 and "layers.parquet" in man["steps"]["diff"]["outputs"]
    rej = [json.loads(x) for x in (run / "rejected.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rej] == ["bad"] and rej[0]["reason"] == "multiple_differences"
    pairs_csv = pd.read_csv(run / "pairs.csv")
    assert len(pairs_csv) == 24 and {"clean_logprob", "corrupt_logprob", "kl_0", "kl_last", "kl"} <= set(pairs_csv)
    layers = read_table_file(run / "layers.parquet")
    assert not (run / "contrasts.csv").exists() and not (run / "layers.csv").exists()
    assert man["state"]["kept"] is True and man["state"]["bytes"] > 0
    assert len(layers) == (1 + 2) * (5 * 2 + 2) * 5  # categories x hook points x offsets
    _check_directions_and_contrasts(run, tiny_dir)
    # A rerun on the run folder resumes from the complete statistics (kept) instead of recomputing.
    capsys.readouterr()
    rc = main(["diff", str(run), "--model", str(tiny_dir), "--batch-size", "4", "--hooks", "default,attn.hook_z"])
    assert rc == 0 and "resumed: 24 pairs" in capsys.readouterr().err
    assert not (run / "state").exists() and not (run / ".state.deleting").exists()  # no --keep-state this time


def _check_directions_and_contrasts(run: Path, tiny_dir: Path) -> None:
    """diff_directions.safetensors and contrasts.parquet against numpy/scipy on the model's own
    activations, taken with ``run_with_cache`` in the run's batches (bit-identical float32)."""
    from safetensors import safe_open

    from eclens import load_model
    from eclens.pairs import load_aligned

    model = load_model(str(tiny_dir))
    pairs = load_aligned(run / "pairs.jsonl")
    with safe_open(str(run / "diff_directions.safetensors"), framework="pt") as f:
        meta = f.metadata()
        mean_delta = f.get_tensor("hook_resid_post/mean_delta").double().numpy()  # [L, O, D]
        sigma = f.get_tensor("hook_resid_post/sigma_clean").double().numpy()
    offsets = json.loads(meta["offsets"])
    layers = json.loads(meta["layers"])["hook_resid_post"]
    names = [f"blocks.{layer}.hook_resid_post" for layer in layers]
    ref = brute_force(model, pairs, names, offsets, batched_with=4)
    for li, n in enumerate(names):
        for o in range(len(offsets)):
            C = np.stack([r[1] for r in ref[(n, o)]])
            X = np.stack([r[2] for r in ref[(n, o)]])
            assert rel_err(mean_delta[li, o], (X - C).mean(0)) < 1e-5, (n, offsets[o])
            assert rel_err(sigma[li, o], C.std(0, ddof=1)) < 1e-5, (n, offsets[o])
    con = pd.read_parquet(run / "contrasts.parquet")
    o = offsets.index(0)
    grp = {a.id: a.category.split("/")[0] for a in pairs}
    for li, n in enumerate(names):
        rows = ref[(n, o)]
        rel = {r[3]: np.linalg.norm(r[2] - r[1]) / np.linalg.norm(r[1]) for r in rows}
        xa = np.array([v for k, v in rel.items() if grp[k] == "grammar"])
        xb = np.array([v for k, v in rel.items() if grp[k] == "meaning"])
        got = con[(con.hook == "hook_resid_post") & (con.layer == layers[li]) & (con.offset == 0)
                  & (con.measure == "rel_l2")]
        assert len(got) == 1 and set(got["contrast"]) == {"grammar vs meaning"}
        r = got.iloc[0]
        assert r["n_a"] == len(xa) and r["n_b"] == len(xb)
        # one effect per layer: the difference of the groups' mean relative L2 (float32 per-pair values)
        assert r["effect"] == pytest.approx(xa.mean() - xb.mean(), abs=1e-5)
        assert r["effect_lo"] <= r["effect"] <= r["effect_hi"] and 0 < r["p"] <= 1
    from scipy.stats import false_discovery_control

    for _m, g in con.dropna(subset=["p"]).groupby("measure"):
        assert np.allclose(g["q"], false_discovery_control(g["p"], method="bh"))


def test_cli_refuses_a_run_of_another_model(tiny_dir, tokenizer, tmp_path, capsys):
    from eclens.cli import main
    from eclens.runs import update_manifest

    run = tmp_path / "run"
    update_manifest(run, model={"name": "meta-llama/Meta-Llama-3-8B", "weights_hash": "abc"})
    raw = _write_raw(tmp_path / "raw.jsonl", tokenizer, 4)
    rc = main(["diff", str(raw), "--model", str(tiny_dir), "--out", str(run)])
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert rc == 2 and last.startswith("error:") and "Meta-Llama-3-8B" in last and "another --out" in last
    assert "Traceback" not in err
    assert not (run / STATS_FILE).exists()


def test_cli_bad_input_is_one_line(tmp_path, capsys):
    from eclens.cli import main

    rc = main(["diff", str(tmp_path / "missing.jsonl")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "no such file" in err and len(err.splitlines()) == 1 and err.startswith("error:")


def _stats_ok(path: Path) -> bool:
    if not path.exists():
        return True
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["eclens_diff"])
        for k in f.keys():
            f.get_tensor(k)
    return len(meta["done"]) == len(meta["rows"])


def _start_and_signal(cmd, env, stats: Path, sig, after_done: int) -> subprocess.CompletedProcess:
    """Start ``ec diff``; once its checkpoint holds more than ``after_done`` pairs, send ``sig``."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        try:
            if stats.exists() and len(load_stats(stats.parent.parent)[1]["done"]) > after_done:
                break
        except EclensError:
            pass  # being replaced right now: os.replace is atomic, so the next look sees a whole file
        time.sleep(0.05)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.mark.slow
def test_interrupted_runs_leave_whole_files_and_resume(tiny_dir, tokenizer, tmp_path, capsys):
    from eclens.cli import main

    raw = _write_raw(tmp_path / "raw.jsonl", tokenizer, 36)
    run = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    args = ["diff", str(raw), "--model", str(tiny_dir), "--out", str(run), "--batch-size", "1",
            "--checkpoint-every", "1", "--hooks", "all", "--keep-state"]
    cmd = [sys.executable, "-m", "eclens", *args]
    stats = run / STATS_FILE
    # Ctrl-C: the loop stops at the end of the batch, saves, and says so. The signal goes out once the
    # checkpoint holds a pair, with 35 one-pair batches still to run: a run that finished first would
    # prove nothing, so it fails the test.
    r = _start_and_signal(cmd, env, stats, signal.SIGINT, 0)
    assert r.returncode == 130 and "interrupted" in r.stderr and "Traceback" not in r.stderr, (r.returncode, r.stderr)
    assert _stats_ok(stats)
    n1 = len(load_stats(run)[1]["done"])
    assert 0 < n1 < 36, n1
    # SIGKILL, possibly in the middle of writing a checkpoint: the old or the new file, never half of one.
    r = _start_and_signal(cmd, env, stats, signal.SIGKILL, n1)
    assert r.returncode == -signal.SIGKILL, (r.returncode, r.stderr[-2000:])
    assert _stats_ok(stats)
    n2 = len(load_stats(run)[1]["done"])
    assert n1 < n2 < 36, (n1, n2)  # it had saved more than n1 when killed, and was killed before the end
    capsys.readouterr()
    assert main(args) == 0  # the same command resumes (here, in this process: no second ~8 s of imports)
    assert f"resumed: {n2} pairs" in capsys.readouterr().err
    res = DiffResult.load(run)
    assert res.n_pairs == 36 and res.meta["complete"]
    assert sorted(x["id"] for x in res.meta["rows"]) == sorted(f"r{i}" for i in range(36))


def test_prepare_run_pairs_writes_nothing_without_a_valid_pair(tiny, tmp_path):
    """The library path (not only the CLI) refuses a file of rejected pairs before writing into the run."""
    from eclens.diff import prepare_run_pairs
    from eclens.pipeline import RunConfig, run_pipeline

    src = tmp_path / "bad.jsonl"
    write_jsonl(src, [{"id": "a", "clean": "The cat sat.", "corrupt": "The cat sat."},
                      {"id": "b", "clean": "A cat sat on a mat.", "corrupt": "The dog sat on the rug."}])
    with pytest.raises(EclensError, match="none of the 2 pairs"):
        prepare_run_pairs(tiny, src, tmp_path / "run")
    assert not (tmp_path / "run").exists()
    with pytest.raises(EclensError, match="none of the 2 pairs"):
        run_pipeline(tmp_path / "run2", tiny, RunConfig(pairs_file=str(src)), log=lambda m: None, progress=False)
    assert not list((tmp_path / "run2").glob("*.jsonl"))


def test_accumulators_merge_as_the_results_do(tiny):
    """DiffAccumulator.merge (update / merge / state protocol) gives merge_results' statistics, and both
    the whole run's."""
    from eclens.diff import DiffAccumulator

    pairs = sorted(make_pairs(tiny, small_pairs(tiny.tokenizer)), key=lambda a: a.length)
    cats = sorted({a.category for a in pairs})
    kw = dict(batch_size=4, sample_size=6, categories=cats)
    whole = run_diff(tiny, pairs, **kw)
    a, b = run_diff(tiny, pairs[:8], **kw), run_diff(tiny, pairs[8:], **kw)
    accs = []
    for r in (a, b):
        with pytest.raises(EclensError, match="aliases differ"):  # the state holds resid_post's last layer only
            DiffAccumulator(r.config, r.groups, "cpu", n_pairs=r.n_pairs).load(r.tensors, r.meta)
        acc = DiffAccumulator(r.config, r.groups, "cpu", n_pairs=r.n_pairs, aliases=r.aliases.values())
        acc.load(r.tensors, r.meta)
        accs.append(acc)
    accs[0].merge(accs[1])
    got, want = accs[0].result(a.model), merge_results(a, b)
    assert set(got.tensors) == set(want.tensors)
    # Both merge the same states by the same algebra (shifts are fixed once set): equal bit for bit.
    assert all(torch.equal(got.tensors[k], want.tensors[k]) for k in want.tensors)
    pd.testing.assert_frame_equal(got.layers, want.layers, rtol=1e-9, atol=1e-12)
    pd.testing.assert_frame_equal(got.dims, want.dims, rtol=1e-9, atol=1e-12)
    assert got.meta["sample_ids"] == want.meta["sample_ids"] and got.meta["rows"] == want.meta["rows"]
    pd.testing.assert_frame_equal(got.layers, whole.layers, rtol=1e-6, atol=1e-7)
    with pytest.raises(EclensError):
        accs[0].merge(accs[0])


def test_the_last_flush_hands_the_stage_over_and_the_accumulator_goes_on(tiny):
    """A run that flushes once takes its stage as the totals, a view instead of a copy: the same numbers as the
    copy, bit for bit; and an accumulator fed more batches after that result adds them as one run would have
    (the view is copied once, into float64, at the next flush)."""
    from eclens.diff.accumulate import DiffAccumulator
    from eclens.diff.gather import Gatherer
    from eclens.diff.stream import feed_batch
    from eclens.hooks import hook_groups, iter_batches, pad_id

    pairs = sorted(make_pairs(tiny, small_pairs(tiny.tokenizer)), key=lambda a: a.length)
    whole = run_diff(tiny, pairs, batch_size=4, sample_size=8)
    cfg = whole.config
    groups = hook_groups(tiny, list(cfg.hooks))

    def feed(acc, some):
        gat = Gatherer(groups, "cpu")
        with torch.inference_mode(), tiny.hooks(fwd_hooks=gat.hooks()):
            for b in iter_batches(some, 4, pad_id(tiny), "cpu"):
                feed_batch(tiny, gat, acc, b)

    def accumulator():
        return DiffAccumulator(cfg, groups, "cpu", n_pairs=len(pairs))

    handed, copied = accumulator(), accumulator()
    feed(handed, pairs)
    feed(copied, pairs)
    copied.flush()  # a flush before the last: the stage is copied into new totals
    a, b = handed.result(whole.model), copied.result(whole.model)
    h0 = whole.hooks[0]
    assert not a.tensors[f"{h0}/feat"].is_contiguous() and b.tensors[f"{h0}/feat"].is_contiguous()
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in b.tensors)
    pd.testing.assert_frame_equal(a.layers, b.layers, check_exact=True)

    went_on = accumulator()
    feed(went_on, pairs[:10])
    first = went_on.result(whole.model)
    before = first.tensors[f"{h0}/feat"].clone()
    feed(went_on, pairs[10:])
    got = went_on.result(whole.model)
    assert torch.equal(first.tensors[f"{h0}/feat"], before)  # the earlier result is not written into
    for h in whole.hooks:
        for k in ("mean_delta", "std_delta", "sigma_clean", "absz_mean", "rel_l2_mean"):
            assert rel_err(got.cell_stats(h)[k].numpy(), whole.cell_stats(h)[k].numpy()) < 1e-6, (h, k)
