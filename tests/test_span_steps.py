"""Span pairs in the steps that read both runs of a pair: diff, recovery, invariance and the probe.

Offset 0 is each side's own span end, offset k the k-th token after it (eclens.spans); the sentences
differ in length before it, so a step that read both at one position would compare different words.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from eclens.pairs import AlignedPair, MinimalPair, check_with_model

TYPOS = [  # (clean, misspelt): span pairs under the embedded tokenizer, and one single-token pair
    ("She forgot her umbrella at home today.", "She forgot her umbrela at home today."),
    ("We walked across the bridge in the rain.", "We walked accross the bridge in the rain."),
    ("He definitely wanted to leave early.", "He definately wanted to leave early."),
    ("The cat sits on the mat.", "The cat sit on the mat."),
]


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # many tiny forward passes on a shared machine (as in test_causal)
    yield
    torch.set_num_threads(n)


def _span_pairs(model):
    res = check_with_model([MinimalPair(f"p{i}", c, x, "typo") for i, (c, x) in enumerate(TYPOS)], model,
                           mode="span")
    assert [a.mode for a in res.valid] == ["span", "span", "span", "single"]
    assert [a.corrupt_end - a.clean_end for a in res.valid[:3]] == [2, 1, 1]  # the sides' lengths differ
    return res.valid


def _side(a, side, k):
    end, ids = (a.clean_end, a.clean_ids) if side == "clean" else (a.corrupt_end, a.corrupt_ids)
    return end - 1 + k if k >= 0 else len(ids) - 1


def test_diff_on_span_pairs_equals_the_hand_aligned_delta(tiny):
    """Mean Δ per offset and the per-pair KL list of ``ec diff`` against each sentence run alone and read at
    its own span end + k; the whole span's log-prob against a hand sum."""
    from eclens.diff import run_diff

    pairs = _span_pairs(tiny)
    hook = "blocks.1.hook_resid_post"
    res = run_diff(tiny, pairs, hooks=hook, max_offset=2, batch_size=3, sample_size=8)
    st = res.cell_stats("hook_resid_post", "all")
    acts, logp = {}, {}
    for a in pairs:
        for side, ids in (("clean", a.clean_ids), ("corrupt", a.corrupt_ids)):
            with torch.no_grad():
                logits, cache = tiny.run_with_cache(torch.tensor([ids]), names_filter=lambda n: n == hook)
            acts[a.id, side] = cache[hook][0].double()
            logp[a.id, side] = torch.log_softmax(logits[0].double(), -1)
    for o, k in enumerate(res.offsets):
        want = torch.stack([acts[a.id, "corrupt"][_side(a, "corrupt", k)] - acts[a.id, "clean"][_side(a, "clean", k)]
                            for a in pairs]).mean(0)
        # float32 forward passes of other shapes (batched, padded) differ by ~1e-6 relative
        assert torch.allclose(st["mean_delta"][0, o], want, atol=1e-5 * float(want.abs().max()) + 1e-7), k
        assert int(st["n"][o]) == len(pairs)
    df = res.pairs.set_index("id")
    for a in pairs:
        lc, lx = logp[a.id, "clean"], logp[a.id, "corrupt"]
        kl = [float((lc[t].exp() * (lc[t] - lx[t + a.corrupt_end - a.clean_end])).sum())
              for t in range(a.clean_end - 1, a.length)]
        assert np.allclose(json.loads(df.loc[a.id, "kl"]), kl, atol=1e-5)
        assert df.loc[a.id, "kl_1"] == pytest.approx(kl[1], abs=1e-5)
        span = [float(lc[a.position - 1, a.corrupt_ids[a.position]])]  # first token: the shared prefix
        span += [float(lx[t - 1, a.corrupt_ids[t]]) for t in range(a.position + 1, a.corrupt_end)]
        assert df.loc[a.id, "corrupt_token_logprob"] == pytest.approx(sum(span), abs=1e-4)
        assert df.loc[a.id, "mode"] == a.mode and df.loc[a.id, "corrupt_end"] == a.corrupt_end


# --------------------------------------------------------------------------- a planted, position-local model
#
# Attention and MLP write nothing, so every residual stream is its own token's embedding. A span pair
# PREFIX + [c] + SUFFIX against PREFIX + [x, y, e] + SUFFIX (three tokens for one) then differs at its span
# end by e - c and nowhere after it. Planted: e = c + v with v on the dims S, in every cluster. Unplanted:
# e = c + a random direction off S per cluster. Read at one position for both sides, offset k would compare
# different tokens (the plant would show at offsets after the span, and spread over every dim).

S = [3, 17, 29, 41]
VOCAB = 2048
PREFIX, SUFFIX = [100, 200, 300], [400, 500, 600]
N = 16


_BASE: dict = {}


def _planted(plant: bool):
    """Built once per session and re-planted in place (every weight the plant uses is rewritten)."""
    from eclens import tiny_model

    if "m" not in _BASE:
        _BASE["m"] = tiny_model(n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, d_mlp=128, seed=0, compat=False)
    m = _BASE["m"]
    hf = m.original_model
    g = torch.Generator().manual_seed(7)
    v = torch.zeros(64)
    v[S] = 0.5
    pairs = []
    with torch.no_grad():
        for layer in hf.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        if hf.model.embed_tokens.weight.shape[0] != VOCAB:
            hf.model.embed_tokens.weight = torch.nn.Parameter(hf.model.embed_tokens.weight[:VOCAB].clone())
        hf.lm_head.weight = torch.nn.Parameter(torch.randn(VOCAB, 64, generator=g) * 0.5)
        if getattr(hf.lm_head, "bias", None) is not None:
            hf.lm_head.bias = torch.zeros(VOCAB)
        W = hf.model.embed_tokens.weight
        W -= (W @ v)[:, None] * v[None, :]
        for i in range(N):
            c, x, y, e = (1000 + 4 * i + j for j in range(4))
            W[c] = W[c] / W[c].norm() * 0.2
            if plant:
                W[e] = W[c] + v
            else:
                r = torch.randn(64, generator=g)
                r[S] = 0
                W[e] = W[c] + r / r.norm()
            mp = MinimalPair(f"e{i}", "x", "y", "typo", cluster=f"k{i}", role="error")
            pairs.append(AlignedPair(mp, PREFIX + [c] + SUFFIX, PREFIX + [x, y, e] + SUFFIX, len(PREFIX), "c", "xye",
                                     "span", len(PREFIX) + 1, len(PREFIX) + 3))
    return m, pairs


@pytest.mark.parametrize("plant", [True, False], ids=["planted", "unplanted"])
def test_planted_span_pairs_are_found_at_the_span_end_only(plant):
    from eclens.diff import run_diff

    m, pairs = _planted(plant)
    res = run_diff(m, pairs, hooks="hook_resid_post", max_offset=2, batch_size=8, sample_size=64, min_pairs=N)
    cand = res.candidates
    resp = cand[(cand["kind"] == "responsive") & (cand["category"] == "all")] if len(cand) else cand
    st = res.cell_stats("hook_resid_post", "all")
    # After the span both sides hold the same tokens: Δ is exactly 0 there (a misaligned read would not be).
    assert float(st["mean_abs_delta"][:, 1:].abs().max()) == 0.0
    if plant:
        assert sorted(set(resp["dim"])) == S and set(resp["offset"]) == {0} and set(resp["layer"]) == {0, 1}
        assert torch.allclose(st["mean_delta"][:, 0][:, S], torch.full((2, len(S)), 0.5, dtype=torch.float64))
    else:
        assert len(resp) == 0


def test_recovery_probe_and_invariance_read_each_side_at_its_span_end():
    """The rows recovery writes, the positions the probe reads and the index invariance and diff gather by."""
    from eclens.diff import pair_index
    from eclens.probe import items_from_pairs
    from eclens.recovery import batch_rows

    _, pairs = _planted(True)
    a = pairs[0]
    twin = AlignedPair(MinimalPair("t0", "x", "z", "typo", cluster="k0", role="twin"), a.clean_ids,
                       PREFIX + [7] + SUFFIX, len(PREFIX), "c", "z")
    ix = pair_index([a, twin], [0, 1, -1], "cpu", 9)
    assert ix.pos.tolist() == [[3, 4, 6], [3, 4, 6], [5, 6, 8], [3, 4, 6]] and ix.valid.all()
    it = items_from_pairs([a, twin], offset=1)
    assert it.position == [4, 6, 4] and it.label.tolist() == [0, 1, 0]  # clean once, error, twin
    assert (it.read_tokens == SUFFIX[0]).all()  # the same word on every side
    logits = torch.randn(8, 9, VOCAB)
    df = batch_rows(logits, [a, twin])
    e = df[df["id"] == "e0"]
    assert e["t"].tolist() == [3, 4, 5, 6] and e["t_changed"].tolist() == [5, 6, 7, 8]
    assert e["offset"].tolist() == [0, 1, 2, 3]
    lc = torch.log_softmax(logits[0, 4].double(), -1)
    for run, row, pos in (("changed", 2, 6), ("ignore_mean", 4, 6), ("ignore_delete", 6, 3)):
        lx = torch.log_softmax(logits[row, pos].double(), -1)
        assert e[f"kl_{run}"].iloc[1] == pytest.approx(float((lc.exp() * (lc - lx)).sum()), abs=1e-9)


@pytest.mark.slow
def test_recovery_after_a_span_equals_plain_transformers(model):
    """KL(clean ‖ changed) and the deleted-span run, at every position from the span end on, against the
    embedded model run through plain transformers, one sentence at a time (float32: 1e-4 nats)."""
    from eclens.recovery import RecoveryConfig, pair_recovery

    a = check_with_model([MinimalPair("u", *TYPOS[0], "typo")], model, mode="span").valid[0]
    assert a.is_span
    df = pair_recovery(model, [a], RecoveryConfig(batch_size=1))
    hf = model.original_model

    def logp(ids):
        return torch.log_softmax(hf(torch.tensor([ids])).logits[0].double(), -1)

    lc, lx = logp(a.clean_ids), logp(a.corrupt_ids)
    ld = logp(a.corrupt_ids[:a.position] + a.corrupt_ids[a.corrupt_end:])
    assert df["t"].tolist() == list(range(a.clean_end - 1, a.length))
    for r in df.itertuples():
        k = r.t - (a.clean_end - 1)
        p = lc[r.t].exp()
        assert r.kl_changed == pytest.approx(float((p * (lc[r.t] - lx[a.corrupt_end - 1 + k])).sum()), abs=1e-4)
        assert r.kl_ignore_delete == pytest.approx(float((p * (lc[r.t] - ld[a.position - 1 + k])).sum()), abs=1e-4)


@pytest.mark.slow
def test_ec_run_takes_span_pairs_end_to_end(tiny, tmp_path):
    """`ec run --span` on codespell's natural typos: diff and measure read the span pairs; the patching steps
    run on the single-token ones (or record themselves empty) with one line saying what they left out."""
    import pandas as pd

    from eclens.pairs import load_aligned, write_jsonl
    from eclens.pipeline import RunConfig, run_pipeline
    from eclens.sources.codespell import codespell_pairs

    f = tmp_path / "typos.jsonl"
    write_jsonl(f, codespell_pairs(8, seed=3))
    run, logs = tmp_path / "run", []
    cfg = RunConfig(pairs_file=str(f), span=True, exact_pairs=1, dims_pairs=2, n_controls=2, attribution_pairs=2,
                    verify_top=1, measure_clusters=None, measure_permutations=1, skip_pairs=1)
    res = run_pipeline(run, tiny, cfg, log=logs.append, progress=False)
    status = {s.step: s.status for s in res.steps}
    assert status["pairs"] == status["diff"] == status["measure"] == "done" and res.report is not None
    pairs = load_aligned(run / "pairs.jsonl")
    spans = [a for a in pairs if a.is_span]
    assert len(spans) >= 8 and len(pairs) == 16
    rec = pd.read_csv(run / "recovery.csv")
    moved = rec[rec["id"].isin({a.id for a in spans if a.corrupt_end != a.clean_end})]
    assert len(moved) and (moved["t_changed"] != moved["t"]).all()
    for step in ("exact", "dims", "attribution", "skip"):
        # (the planned cost lines also start with the step's name: "  exact: 31 forward passes, ~0 s")
        line = next(s for s in logs if s.strip().startswith(f"{step}: ") and "forward passes" not in s)
        assert "span-aligned pair(s) left out" in line and "\n" not in line
        if not any(a.mode == "single" for a in pairs):
            assert status[step] == "empty"


def test_pair_view_reads_a_span_pair_from_its_span_end():
    """The report's and `ec serve`'s per-pair view: rows are clean positions, the changed sentence read at the
    aligned one, so on the position-local model nothing differs after the span and the span end does."""
    from eclens import viz

    m, pairs = _planted(True)
    a = pairs[0]
    v = viz.pair_view(m, a, hooks=("hook_resid_post",), attention_layers=[0])
    d = v.diffs[v.diffs["layer"] == 1].set_index("position")["rel_l2"]
    assert len(d) == a.length and d.loc[: a.position - 1].max() == 0 and d.loc[a.clean_end:].max() == 0
    assert d.loc[a.clean_end - 1] > 0.5  # e - c at the span end
    assert len(v.kl) == a.length and max(v.kl[a.clean_end:]) < 1e-6
    clean, corrupt = v.attention[0]
    assert clean.shape[1:] == (a.length, a.length) and corrupt.shape[1:] == (len(a.corrupt_ids),) * 2
