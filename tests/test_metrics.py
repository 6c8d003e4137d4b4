"""Patching metrics: definitions checked against plain loops, and their behaviour on real runs."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from eclens.metrics import (
    downstream_kl,
    fraction_restored,
    logit_diff,
    meta_targets,
    prepare_pair,
    sentence_logprob,
    suffix_logprob,
)
from eclens.pairs import MinimalPair, align, check_with_model, encode


def _lp(seed: int, shape=(3, 6, 11)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.log_softmax(torch.randn(*shape, generator=g) * 3, -1)


def test_logit_diff_and_suffix_logprob_match_loops():
    lp = _lp(0)
    toks = torch.tensor([1, 4, 2, 9, 0, 5])
    assert torch.allclose(logit_diff(lp, 2, 7, 3), lp[:, 2, 7] - lp[:, 2, 3])
    want = torch.stack([sum(lp[b, t, toks[t + 1]] for t in range(2, 5)) for b in range(3)])
    assert torch.allclose(suffix_logprob(lp, toks, 2), want)
    want_all = torch.stack([sum(lp[b, t, toks[t + 1]] for t in range(0, 5)) for b in range(3)])
    assert torch.allclose(sentence_logprob(lp, toks), want_all)
    assert torch.isnan(suffix_logprob(lp, toks, 5)).all()  # change at the last token: no suffix


def test_downstream_kl_matches_definition_and_is_zero_on_itself():
    lp = _lp(1)
    ref = lp[0]
    got = downstream_kl(ref, lp, 3)
    want = torch.stack([
        torch.stack([(ref[t].exp() * (ref[t] - lp[b, t])).sum() for t in range(3, 6)]).mean() for b in range(3)
    ])
    assert torch.allclose(got, want, atol=1e-6)
    assert abs(float(got[0])) < 1e-6 and (got[1:] > 0).all()


def test_fraction_restored_scalars_arrays_tensors_and_guard():
    assert fraction_restored(1.0, 3.0, -1.0) == pytest.approx(0.5)
    assert fraction_restored(3.0, 3.0, -1.0) == 1.0 and fraction_restored(-1.0, 3.0, -1.0) == 0.0
    assert math.isnan(fraction_restored(1.0, 1.0, 1.005))  # |clean - corrupt| < min_delta: no ratio
    assert math.isnan(fraction_restored(1.0, float("nan"), 0.0))
    arr = fraction_restored(np.array([0.0, 2.0]), np.array([2.0, 2.0]), np.array([0.0, 1.999]))
    assert arr[0] == 0.0 and np.isnan(arr[1])
    t = fraction_restored(torch.tensor([1.0, 5.0]), torch.tensor(2.0), torch.tensor(0.0))
    assert torch.allclose(t, torch.tensor([0.5, 2.5]))
    # KL: m_clean = 0, so restored = 1 - m / m_corrupt
    assert fraction_restored(0.25, 0.0, 1.0) == pytest.approx(0.75)


def test_meta_targets_follow_the_prefix_tokenisation(tokenizer):
    pair = align(MinimalPair("x", "Katherine can't help herself.", "Katherine can't help himself.",
                             meta={"prefix": "Katherine can't help", "target_clean": "herself",
                                   "target_corrupt": "himself"}), tokenizer)
    q, tc, tk = meta_targets(pair, tokenizer)
    assert q == pair.position - 1  # BLiMP's prefix ends right before the changed word
    assert (tc, tk) == (pair.clean_ids[pair.position], pair.corrupt_ids[pair.position])
    none = align(MinimalPair("y", "The cat is here.", "The cats is here."), tokenizer)
    assert meta_targets(none, tokenizer) is None


def test_prepare_pair_on_real_runs(model, tokenizer):
    pairs = [
        MinimalPair("agr", "The keys to the cabinet are here.", "The keys to the cabinet is here.",
                    "grammar/agreement"),
        # targets after the change, read at the last token
        MinimalPair("fact", "The capital of France is", "The capital of Italy is", "meaning/subject",
                    meta={"target_clean": " Paris", "target_corrupt": " Rome"}),
        # BLiMP one-prefix pair: targets at p-1 become pref_clean; the patchable diff uses the answers
        MinimalPair("blimp", "Katherine can't help herself.", "Katherine can't help himself.", "blimp",
                    meta={"prefix": "Katherine can't help", "target_clean": "herself", "target_corrupt": "himself"}),
    ]
    res = check_with_model(pairs, model)
    assert len(res.valid) == 3, [r.label for r in res.rejected]
    for a in res.valid:
        toks = torch.tensor([a.clean_ids, a.corrupt_ids])
        logits = model(toks)
        lp = torch.log_softmax(logits.float(), -1)
        p = a.position
        # the prediction at p-1 cannot see p: identical in both runs, hence useless for patching
        assert torch.allclose(lp[0, p - 1], lp[1, p - 1], atol=1e-5)
        ctx = prepare_pair(a, logits[0], logits[1], tokenizer)
        assert ctx.ld_position >= p
        assert ctx.pref_clean == pytest.approx(float(lp[0, p - 1, a.clean_ids[p]] - lp[0, p - 1, a.corrupt_ids[p]]),
                                               abs=1e-4)
        # scoring the two reference runs again reproduces the stored values
        again = ctx.evaluate(logits)
        for m in ("logit_diff", "logprob", "kl"):
            assert float(again[m][0]) == pytest.approx(ctx.clean[m], abs=1e-4)
            assert float(again[m][1]) == pytest.approx(ctx.corrupt[m], abs=1e-4)
        assert ctx.clean["kl"] == 0.0 and ctx.corrupt["kl"] > 0.01
        # full-sentence difference = pref_clean + the patchable suffix difference
        full = ctx.sentence_logprob_clean - ctx.sentence_logprob_corrupt
        assert full == pytest.approx(ctx.pref_clean + ctx.clean["logprob"] - ctx.corrupt["logprob"], abs=1e-3)
        row = ctx.baseline_row(tokenizer)
        json.dumps(row)  # plain values only
        if a.id == "fact":
            assert ctx.ld_source == "meta" and ctx.ld_position == a.length - 1
            assert row["target_clean"] == " Paris" and row["target_corrupt"] == " Rome"
            assert ctx.clean["logit_diff"] > 0 > ctx.corrupt["logit_diff"]  # the model knows both facts
        else:
            assert ctx.ld_source == "answers" and ctx.ld_position == p
            assert ctx.target_clean == int(lp[0, p].argmax())
            assert ctx.clean["logit_diff"] >= 0 and ctx.clean["logit_diff"] > ctx.corrupt["logit_diff"]
    assert encode(tokenizer, "Paris")[0] != encode(tokenizer, " Paris")[0]  # why targets are joined to a prefix
