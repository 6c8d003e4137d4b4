"""Causal tests that can fail (issue 19): test pairs drawn at random, layer skipping and exchange, held-out
splits, matched controls and the error-minus-twin interaction, on planted tiny models."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from eclens.bootstrap import BootstrapConfig
from eclens.pairs import AlignedPair, MinimalPair
from eclens.steps import spread_pairs


def _fake(i: int, cat: str, cluster: str, length: int) -> AlignedPair:
    mp = MinimalPair(f"{cat}-{cluster}-{i}", "a", "b", cat, cluster=cluster)
    ids = list(range(length))
    return AlignedPair(mp, ids, ids[:1] + [999] + ids[2:], 1, "x", "y")


def test_spread_pairs_is_a_seeded_stratified_draw_never_by_length():
    pairs = [_fake(i, cat, f"c{i % 4}", 3 + i) for cat in ("a", "b") for i in range(12)]
    got = spread_pairs(pairs, 8, seed=0)
    # categories in turn, and within one category every cluster once before any cluster twice
    cats = [a.category for a in got]
    assert cats[:2] in (["a", "b"], ["b", "a"]) and cats == cats[:2] * 4
    # fewer pairs than categories: which category gets them is part of the draw, not the alphabet
    assert {spread_pairs(pairs, 1, seed=s)[0].category for s in range(12)} == {"a", "b"}
    for cat in ("a", "b"):
        assert len({a.pair.cluster for a in got if a.category == cat}) == 4
    # a function of the set of pairs (input order does not matter), a prefix of the full order, and seeded
    assert [a.id for a in spread_pairs(pairs[::-1], 8, seed=0)] == [a.id for a in got]
    full = spread_pairs(pairs, len(pairs), seed=0)
    assert [a.id for a in spread_pairs(full, 8, seed=0)] == [a.id for a in full[:8]]
    draws = {tuple(a.id for a in spread_pairs(pairs, 4, seed=s)) for s in range(6)}
    assert len(draws) > 1
    # not the shortest: over seeds the drawn pairs' lengths are spread like the pool's
    lengths = [a.length for s in range(20) for a in spread_pairs(pairs, 4, seed=s)]
    assert max(lengths) - min(lengths) > 6


# --------------------------------------------------------------------------- planted models
#
# A tiny Llama whose attention writes nothing (o_proj = 0) is a function of each input id: the clean token
# c_i, its error e_i = c_i + s·v and its twin w_i = c_i + s·u_i, with v on the planted dims S and u_i a random
# direction off S. Every other embedding has no v component. "carry": the error rides in S to the logits.
# "undo": layer 1's MLP has one unit that reads v and writes -v, cancelling the error (not the twin).




@pytest.fixture(autouse=True)
def one_thread():
    # Many small forward passes: on a shared 2-core machine two threads spin against other processes
    # and run far slower than one (as in test_patch).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


S = [3, 17, 29, 41]
N_CLUSTERS = 24
VOCAB = 2048
PREFIX = [100, 200, 300]     # shared context; position p = 3
SUFFIX = [400, 500, 600]


_BASE: dict = {}


def _planted(plant: str, seed: int = 0):
    """``plant``: ``carry`` (errors along v on S), ``undo`` (and layer 1 cancels them) or ``none`` (errors
    along random directions off S, like the twins: nothing is planted). The model is built once per session
    and re-planted in place (tokens, unembedding and the MLP unit are all rewritten)."""
    from eclens import tiny_model

    if "m" not in _BASE:
        _BASE["m"] = tiny_model(n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, d_mlp=128, seed=0, compat=False)
    m = _BASE["m"]
    hf = m.original_model
    g = torch.Generator().manual_seed(1000 + seed)
    d = 64
    v = torch.zeros(d)
    v[S] = 0.5
    ids = {"clean": [], "error": [], "twin": []}
    with torch.no_grad():
        for layer in hf.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
            layer.post_attention_layernorm.weight.fill_(1.0)
        # A 2048-token vocabulary (the ids used here): the 49k-row unembedding would cost most of each pass.
        if hf.lm_head.weight.shape[0] != VOCAB:
            hf.model.embed_tokens.weight = torch.nn.Parameter(hf.model.embed_tokens.weight[:VOCAB].clone())
        hf.lm_head.weight = torch.nn.Parameter(torch.randn(VOCAB, d, generator=g) * 0.5)
        if getattr(hf.lm_head, "bias", None) is not None:  # the bridge gives the unembedding a (zero) bias buffer
            hf.lm_head.bias = torch.zeros(VOCAB)
        W = hf.model.embed_tokens.weight
        W -= (W @ v)[:, None] * v[None, :]
        s = 1.0
        for i in range(N_CLUSTERS):
            c, e, w = 1000 + 3 * i, 1001 + 3 * i, 1002 + 3 * i
            W[c] = W[c] / W[c].norm() * 0.2  # one norm for every clean token: one gain undoes every error
            u = torch.randn(d, generator=g)
            u[S] = 0
            if plant == "none":
                r = torch.randn(d, generator=g)
                r[S] = 0
                W[e] = W[c] + s * r / r.norm()
            else:
                W[e] = W[c] + s * v
            W[w] = W[c] + s * u / u.norm()
            ids["clean"].append(c), ids["error"].append(e), ids["twin"].append(w)
        if plant == "undo":
            mlp = hf.model.layers[1].mlp
            x = W[ids["error"][0]]
            z = float((x / x.pow(2).mean().sqrt()) @ v)  # v . RMSNorm(x) (norm weight 1), the same for every error
            gain = 4.0
            mlp.gate_proj.weight[0] = gain * v
            mlp.up_proj.weight[0] = v
            act = torch.nn.functional.silu(torch.tensor(gain * z)) * z
            mlp.down_proj.weight[:, 0] = -s * v / float(act)
    return m, ids


def _planted_pairs(ids, n_clusters: int = N_CLUSTERS):
    out = []
    for i in range(n_clusters):
        c, e, w = ids["clean"][i], ids["error"][i], ids["twin"][i]
        clean = PREFIX + [c] + SUFFIX
        for role, tok in (("error", e), ("twin", w)):
            mp = MinimalPair(f"{role}{i}", "x", "y", "planted", cluster=f"k{i}", role=role,
                             twin_of=f"error{i}" if role == "twin" else None)
            out.append(AlignedPair(mp, clean, PREFIX + [tok] + SUFFIX, len(PREFIX), "c", "e"))
    return out


def _hand_logprobs(hf, toks: torch.Tensor, skip: tuple[int, str] | None = None) -> torch.Tensor:
    """A Llama forward pass written out on the model's own weights, with one layer or component skipped."""
    cfg = hf.config
    H, KV = cfg.num_attention_heads, cfg.num_key_value_heads
    hd = cfg.hidden_size // H
    T = toks.shape[-1]

    def rms(x, w):
        return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps) * w

    theta = (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta") or 100000.0  # tiny_hf_model's value
    inv = 1.0 / (theta ** (torch.arange(0, hd, 2).float() / hd))
    ang = torch.arange(T).float()[:, None] * inv[None, :]
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()

    def rope(x):
        x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
        return x * cos + torch.cat([-x2, x1], -1) * sin

    h = hf.model.embed_tokens.weight[toks]
    for L, layer in enumerate(hf.model.layers):
        a = layer.self_attn
        x = rms(h, layer.input_layernorm.weight)
        q = (x @ a.q_proj.weight.T).view(T, H, hd).transpose(0, 1)
        k = (x @ a.k_proj.weight.T).view(T, KV, hd).transpose(0, 1).repeat_interleave(H // KV, 0)
        vv = (x @ a.v_proj.weight.T).view(T, KV, hd).transpose(0, 1).repeat_interleave(H // KV, 0)
        sc = rope(q) @ rope(k).transpose(-1, -2) / math.sqrt(hd)
        sc = sc.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf"))
        attn = (sc.softmax(-1) @ vv).transpose(0, 1).reshape(T, -1) @ a.o_proj.weight.T
        mid = h if skip in ((L, "attn"), (L, "block")) else h + attn
        x2 = rms(mid, layer.post_attention_layernorm.weight)
        mlp = layer.mlp
        out = (torch.nn.functional.silu(x2 @ mlp.gate_proj.weight.T) * (x2 @ mlp.up_proj.weight.T)) @ mlp.down_proj.weight.T
        new = mid if skip in ((L, "mlp"), (L, "block")) else mid + out
        h = h if skip == (L, "block") else new
    return torch.log_softmax(rms(h, hf.model.norm.weight) @ hf.lm_head.weight.T, -1)


@pytest.mark.parametrize("skip", [None, (0, "block"), (1, "attn"), (0, "mlp"), (1, "block")])
def test_skip_equals_a_forward_pass_written_by_hand(tiny, skip):
    from eclens.patch.skip import run_skipped

    toks = torch.tensor([[5, 91, 7, 1200, 33, 8, 640]])
    got = torch.log_softmax(run_skipped(tiny, toks, [skip]).float(), -1)[0]
    with torch.no_grad():
        ref = _hand_logprobs(tiny.original_model, toks[0], skip)
    assert (got - ref).abs().max().item() < 1e-5
    if skip is not None:  # the skip did something (not a pass-through of the unskipped run)
        assert (got - torch.log_softmax(tiny(toks).float(), -1)[0]).abs().max().item() > 1e-3


def test_skipping_the_planted_block_removes_recovery_for_errors_not_twins():
    from eclens.patch.skip import SkipConfig, layer_skip

    torch.set_grad_enabled(False)
    m, ids = _planted("undo")
    pairs = _planted_pairs(ids, 8)
    cfg = SkipConfig(boot=BootstrapConfig(n_boot=200), min_clusters=8)
    res = layer_skip(m, pairs, cfg)
    t = res.table.set_index(["layer", "component"])
    # the planted unit: with it the error fades; skipped, the error run stays far from the clean one
    for key in ((1, "mlp"), (1, "block")):
        r = t.loc[key]
        assert r["d_kl_error_low"] > 1.0 and abs(r["d_kl_twin"]) < 1e-6, r
        assert r["d_kl_diff_low"] > 1.0 and r["verdict"].startswith("the layer helps errors"), r
        assert not r["broken"] and r["clean_kl_median"] < 1e-9  # the unit is silent on clean tokens
    for key in ((0, "block"), (0, "attn"), (0, "mlp"), (1, "attn")):
        assert t.loc[key, "verdict"].startswith("null"), t.loc[key]
    assert res.summary["error_specific"] == ["L1/block", "L1/mlp"]
    # unplanted (the same model without the unit): nothing comes out
    with torch.no_grad():
        m.original_model.model.layers[1].mlp.down_proj.weight.zero_()
    t0 = layer_skip(m, pairs, cfg).table
    assert not t0["verdict"].str.startswith("the layer helps").any()


def test_layer_exchange_reuses_exact_patching():
    """The twin's MLP write at layer 1 put into the error run: in the undo model it removes the correction
    (the error run moves away from the twin's); in the carry model (no MLP writes) it changes nothing."""
    from eclens.patch.skip import layer_exchange

    torch.set_grad_enabled(False)
    m, ids = _planted("undo")
    ex = layer_exchange(m, _planted_pairs(ids, 4)).set_index(["layer", "component"])
    assert len(ex) == 4 * 2 * 2
    # with the planted unit the error run ends at the clean run (KL ~ 0); without its write it does not
    assert (ex.loc[(1, "mlp"), "kl_exchanged"] > ex.loc[(1, "mlp"), "kl_error"] + 0.1).all()
    np.testing.assert_allclose(ex.loc[(0, "mlp"), "kl_exchanged"], ex.loc[(0, "mlp"), "kl_error"], atol=1e-6)
    m, ids = _planted("carry")
    ex = layer_exchange(m, _planted_pairs(ids, 4))
    np.testing.assert_allclose(ex["moved"], 0.0, atol=1e-4)


def test_planted_set_is_found_on_held_out_clusters_and_beats_matched_controls(tmp_path):
    """Chosen on half A's clusters (a diff of half A), tested on half B's: the planted dims S come out, beat
    uniform and matched controls, and their effect is error-specific (the interaction); stable sets of the
    same run (dims the errors do not move) come out null."""
    from eclens import patch as P
    from eclens.bootstrap import split_half
    from eclens.diff import DiffConfig
    from eclens.steps import DimsConfig, dims_step

    torch.set_grad_enabled(False)
    m, ids = _planted("carry")
    pairs = _planted_pairs(ids, 24)
    cfg = DimsConfig(method="patch", direction="denoise", metric="kl", n_controls=79, split=0, n_perm=200,
                     diff=DiffConfig(hooks="resid_pre", min_pairs=4, max_offset=1, include_last=False),
                     choose=lambda cand: P.candidate_sets(cand, top_k=4, max_sets=2))
    out = dims_step(tmp_path, m, pairs, [], cfg, progress=False)
    t = out.value.set_index("kind")
    resp, stable = t.loc["responsive"], t.loc["stable"]
    assert [int(x) for x in resp["dims"].split()] == S
    assert resp["significant"] and resp["kl_p_uniform"] < 0.05 and resp["kl_p_matched"] < 0.05
    assert resp["interaction"] < 0 and resp["interaction_high"] < 0 and resp["interaction_p"] < 0.05
    assert 0 <= resp["match_sigma"] and resp["kl_sees"] == 1.0
    assert not stable["significant"] and stable["interaction_p"] > 0.05
    # the tested pairs are half B's error pairs, all of them, and the manifest records the split
    import json

    man = json.loads((tmp_path / "manifest.json").read_text())["steps"]["patch"]["dims"]["params"]
    assert man["split"] == 0 and man["n_test_clusters"] == sum(split_half(f"k{i}", 0) for i in range(24))
    tested = set(man["pairs"])
    assert tested and all(split_half("k" + p[len("error"):], 0) == 1 for p in tested)


def _null_rates(n_seeds: int) -> tuple[int, int]:
    """Over ``n_seeds`` unplanted models (errors along random directions, like their twins), how many times a
    random set beats its uniform controls (q < 0.05) and how many times its interaction is significant."""
    from eclens import patch as P

    sig = inter = 0
    for seed in range(n_seeds):
        m, ids = _planted("none", seed)
        pairs = _planted_pairs(ids, 12)
        errs = [a for a in pairs if a.pair.role == "error"]
        twins = [a for a in pairs if a.pair.role == "twin"]
        dims = sorted(np.random.default_rng(seed).choice(64, 4, replace=False).tolist())
        res = P.causal_test(m, errs, [P.DimSet("hook_resid_pre", 1, dims, 0, "random")], twins=twins,
                            metric="kl", n_controls=39, seed=seed, n_perm=200)
        r = res.table.iloc[0]
        sig += bool(r["significant"])
        inter += bool(r["interaction_p"] < 0.05)
    return sig, inter


def test_random_set_on_an_unplanted_model_is_null_in_most_seeds():
    sig, inter = _null_rates(8)
    assert sig <= 1 and inter <= 1, (sig, inter)


@pytest.mark.slow
def test_random_set_on_an_unplanted_model_is_null_in_90_of_100_seeds():
    sig, inter = _null_rates(100)
    print(f"null: random set significant in {sig}/100 seeds, interaction significant in {inter}/100")
    assert sig <= 10 and inter <= 10, (sig, inter)


def test_attribution_agreement_counts_only_what_the_metric_can_see():
    """Components the metric cannot see score exactly 0 on both sides: among them any ranking 'agrees'.
    The visible-only numbers leave them out (here they turn a perfect pooled rank agreement into none)."""
    import pandas as pd

    from eclens.patch import attribution_summary

    n_vis, n_hidden = 10, 30
    exact = np.r_[np.arange(1.0, n_vis + 1), np.zeros(n_hidden)]
    attr = np.r_[np.arange(n_vis, 0.0, -1), np.zeros(n_hidden)]  # visible ranks exactly reversed
    df = pd.DataFrame({"pair_id": "a", "direction": "denoise", "exact": exact, "attribution": attr,
                       "verified": True, "verify_group": ["top"] * 5 + ["random"] * (n_vis + n_hidden - 5),
                       "visible": [True] * n_vis + [False] * n_hidden, "position_kind": "after"})
    s = attribution_summary(df, 5)
    assert s["n_visible"] == n_vis
    assert s["spearman"] > 0.5 and s["spearman_visible"] == pytest.approx(-1.0)  # ties at 0 inflate the pool
    assert s["topk_recall_visible"] == 0.0


def _two_pair_run(tiny, tmp_path, monkeypatch):
    """A run folder of two checked pairs (no twins) made with ``tiny``, which the CLI then loads."""
    from eclens.commands import _common
    from eclens.model import manifest_model_entry
    from eclens.pairs import check_with_model, write_jsonl
    from eclens.runs import update_manifest

    raw = [MinimalPair("cat", "The cat is here.", "The cats is here.", "grammar/agreement"),
           MinimalPair("run", "A dog ran.", "A dog run.", "grammar/tense")]
    run = tmp_path / "run"
    write_jsonl(run / "pairs.jsonl", check_with_model(raw, tiny).valid)
    update_manifest(run, model=manifest_model_entry(tiny))
    monkeypatch.setattr(_common, "load", lambda *a, **k: tiny)
    return run


def test_cli_patch_skip_on_a_run(tiny, tmp_path, monkeypatch):
    """`ec patch --mode skip` writes its tables and records itself (pairs without twins: per role only)."""
    import json

    import pandas as pd

    from eclens.cli import main

    run = _two_pair_run(tiny, tmp_path, monkeypatch)
    assert main(["patch", str(run), "--mode", "skip", "--components", "block,mlp"]) == 0
    t = pd.read_csv(run / "patch_skip.csv")
    assert len(t) == 2 * 2 and set(t["component"]) == {"block", "mlp"}
    assert (t["verdict"].str.startswith("no twins") | t["broken"]).all()
    man = json.loads((run / "manifest.json").read_text())["steps"]["patch"]["skip"]
    assert man["params"]["components"] == ["block", "mlp"] and "patch_skip_pairs.csv" in man["files"]
    assert main(["patch", str(run), "--mode", "skip", "--components", "head"]) == 2  # one-line error


def test_random_baseline_counts_beside_the_real_models(tiny, tmp_path):
    import pandas as pd

    from eclens import tiny_model
    from eclens.baseline import baseline_step
    from eclens.diff import DiffConfig
    from eclens.pairs import check_with_model

    raw = [MinimalPair("cat", "The cat is here.", "The cats is here.", "grammar/agreement"),
           MinimalPair("run", "A dog ran.", "A dog run.", "grammar/tense")]
    pairs = check_with_model(raw, tiny).valid
    pd.DataFrame([{"category": "all", "hook": "hook_resid_pre", "layer": 0, "offset": 0, "dim": d,
                   "kind": "stable", "rank": d} for d in range(3)]).to_csv(tmp_path / "candidates.csv", index=False)
    asked = []

    def loader(name):
        asked.append(name)
        return tiny_model(n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, d_mlp=128, seed=7)

    out = baseline_step(tmp_path, tiny, pairs, diff_config=DiffConfig(hooks="resid_pre", min_pairs=1), seed=3,
                        loader=loader)
    assert asked == [f"random:{tiny.eclens_name}@3"]
    t = pd.read_csv(tmp_path / "baseline_random.csv")
    real = t[(t["weights"] == "trained") & (t["hook"] == "(any)")].set_index("kind")["n_candidates"]
    assert real["stable"] == 3 and real["responsive"] == 0
    assert set(t["weights"]) == {"trained", "random"} and "vs" in out.headline


def test_cli_patch_dims_split_records_the_split(tiny, tmp_path, monkeypatch):
    """`ec patch --mode dims --split S` needs no candidates file (it chooses on half A) and records the split;
    too few pairs for both halves is a stated null, not an error."""
    import json

    from eclens.cli import main

    run = _two_pair_run(tiny, tmp_path, monkeypatch)
    assert main(["patch", str(run), "--mode", "dims", "--split", "5", "--hooks", "resid_pre"]) == 0
    s = json.loads((run / "patch_summary.json").read_text())["dims"]
    assert s["n_sets"] == 0 and s["verdict"].startswith("null") and s["split"]["split"] == 5


def _sweep_frames(attr_vals, sweep_vals, visible):
    import pandas as pd

    n = len(attr_vals)
    keys = {"pair_id": "a", "direction": "denoise", "hook": "hook_resid_pre", "layer": np.arange(n) // 4,
            "position": np.arange(n) % 4, "head": -1}
    attr = pd.DataFrame({**keys, "position_kind": np.where(np.arange(n) % 4 == 3, "last", "p+1"),
                         "visible": visible, "attribution": attr_vals})
    exact = pd.DataFrame({**keys, "logit_diff": np.asarray(sweep_vals) + 2.0, "logit_diff_clean": 5.0,
                          "logit_diff_corrupt": 2.0})
    return attr, exact


def test_sweep_agreement_finds_agreement_and_disagreement_over_visible_components():
    """Against the full sweep: attribution equal to the exact effect agrees perfectly, reversed it
    disagrees perfectly, and components the metric cannot see are not scored at all."""
    from eclens.patch import sweep_agreement

    effect = np.arange(1.0, 13.0)
    visible = np.r_[[True] * 12, [False] * 8]
    hidden = np.zeros(8)
    attr, exact = _sweep_frames(np.r_[effect, hidden], np.r_[effect, hidden], visible)
    t = sweep_agreement(attr, exact, "logit_diff", k=3).set_index("position_kind")
    assert t.loc["all", "n_components"] == 12 and t.loc["all", "n_pairs"] == 1
    assert t.loc["all", "spearman"] == pytest.approx(1.0) and t.loc["all", "top3_recall"] == 1.0
    assert set(t.index) == {"all", "p+1", "last"}
    attr, exact = _sweep_frames(np.r_[effect[::-1], hidden], np.r_[effect, hidden], visible)
    t = sweep_agreement(attr, exact, "logit_diff", k=3).set_index("position_kind")
    assert t.loc["all", "spearman"] == pytest.approx(-1.0) and t.loc["all", "top3_recall"] == 0.0


def test_attribution_step_checks_against_the_exact_steps_full_sweep(tiny, tmp_path, monkeypatch):
    """In a run whose exact step swept a pair in full, attribution scores that pair too (even when its own
    draw missed it) and writes the sweep check; its summary sentence reaches the patch summary."""
    import pandas as pd

    from eclens import steps as S
    from eclens.pairs import load_aligned
    from eclens.runs import RunData

    run = _two_pair_run(tiny, tmp_path, monkeypatch)
    pairs = load_aligned(run / "pairs.jsonl")
    S.exact_step(run, tiny, pairs, S.ExactConfig(hooks=("hook_resid_pre",), direction="denoise", n_pairs=1,
                                                 seed=0), progress=False)
    swept = set(RunData(run).patch_exact["pair_id"])
    other_seed = next(s for s in range(50) if {a.id for a in S.spread_pairs(pairs, 1, s)} != swept)
    out = S.attribution_step(run, tiny, pairs, S.AttributionConfig(hooks=("hook_resid_pre",), n_pairs=1, metric="kl",
                                                                   seed=other_seed), progress=False)
    assert "patch_attribution_check.csv" in out.files and "full exact sweep" in out.headline
    check = pd.read_csv(run / "patch_attribution_check.csv")
    assert check.loc[check["scope"] == "all", "n_pairs"].item() == 1
    assert set(out.value["pair_id"]) == {a.id for a in pairs}
    exact = RunData(run).patch_exact
    n_visible = int(((exact["position"] >= exact["pair_id"].map({a.id: a.position for a in pairs}))).sum())
    assert 0 < check.loc[check["scope"] == "all", "n_components"].item() <= n_visible
