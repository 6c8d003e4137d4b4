"""Recovery: equal to plain transformers on the embedded model; a planted corrector recovers, no plant does not."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from _designpairs import design_pairs
from eclens.pairs import MinimalPair, align
from eclens.recovery import RecoveryConfig, measure_recovery, pair_recovery

CFG = RecoveryConfig(max_offset=3)


class PlantedCorrector:
    """The tiny model plus a plant that is a function of the input ids: after block ``layer`` every position
    after an error token gets the residual the run with the error corrected (``fix``: error id -> clean id)
    would have there. It undoes the error downstream, so error pairs must come out recovering."""

    def __init__(self, model, fix: dict[int, int], layer: int):
        self.model, self.fix, self.name = model, fix, f"blocks.{layer}.hook_resid_post"

    def __getattr__(self, name):
        return getattr(self.model, name)

    def run_with_hooks(self, toks, fwd_hooks=()):
        corrected = toks.clone()
        err = torch.zeros_like(toks, dtype=torch.bool)
        for e, c in self.fix.items():
            err |= toks == e
            corrected[toks == e] = c
        after = (err.cumsum(1) - err.long()) > 0  # strictly after the first error token
        _, cache = self.model.run_with_cache(corrected, names_filter=self.name)
        fixed = cache[self.name]

        def plant(act, hook):
            return torch.where(after[..., None], fixed.to(act.dtype), act)

        return self.model.run_with_hooks(toks, fwd_hooks=[*fwd_hooks, (self.name, plant)])


@pytest.fixture(scope="module")
def tiny_pairs(tiny):
    return design_pairs(tiny.tokenizer, n_clusters=24)


@pytest.mark.slow  # ~100 s wall on the shared 2-core machine under load
def test_planted_corrector_recovers(tiny, tiny_pairs):
    tok = tiny.tokenizer
    fix = {tok(" zebra", add_special_tokens=False)["input_ids"][0]: tok(" dog", add_special_tokens=False)["input_ids"][0]}
    planted = measure_recovery(PlantedCorrector(tiny, fix, layer=tiny.cfg.n_layers - 1), tiny_pairs, CFG)
    # the null: errors and twins exchangeable (the error word alternates between clusters), no plant
    plain = measure_recovery(tiny, design_pairs(tiny.tokenizer, n_clusters=24, balanced=True), CFG)
    for res, recovering in ((planted, True), (plain, False)):
        idx = res.index.set_index("offset")
        assert (idx["comparison"] == "twins (paired within clusters)").all()
        assert idx.loc["last", "n_clusters"] == 24
        for lab in ("1", "last"):
            lo, hi = idx.loc[lab, "low"], idx.loc[lab, "high"]
            if recovering:
                assert hi < -1, (lab, lo, hi)  # errors fade orders of magnitude faster than twins
            else:
                assert lo < 0 < hi, (lab, lo, hi)
    # the plant acts on the error runs only: twins' KL is untouched, errors' is gone after p
    pos = planted.positions
    assert (pos.loc[(pos.role == "error") & (pos.offset >= 1), "kl_changed"] < 1e-8).all()
    base = measure_recovery(tiny, tiny_pairs, CFG).positions.set_index(["id", "t"])["kl_changed"]
    tw = pos[pos.role == "twin"].set_index(["id", "t"])["kl_changed"]
    assert np.allclose(tw, base.loc[tw.index], atol=1e-9)


def test_tables_and_bad_input(tiny, tiny_pairs):
    res = measure_recovery(tiny, tiny_pairs[:6], CFG)
    pos = res.positions
    per_pair = pos.groupby("id").size()
    for a in tiny_pairs[:6]:
        assert per_pair[a.id] == a.length - a.position
    assert set(res.curves["run"]) == {"error", "twin", "ignore_mean", "ignore_delete"}
    assert set(res.ignore["ignore"]) == {"ignore_mean", "ignore_delete"}
    assert "recovery index" in res.headline()
    from eclens.measureviz import recovery_figure

    fig = recovery_figure(res.curves)
    assert {t.name for t in fig.data} == {"error", "twin", "ignore_mean", "ignore_delete"}
    from eclens.errors import EclensError

    with pytest.raises(EclensError, match="at least one"):
        pair_recovery(tiny, [])
    bad = tiny_pairs[0]
    bad.detect_position = bad.length  # past the sentence
    try:
        with pytest.raises(EclensError, match="detect"):
            pair_recovery(tiny, [bad])
    finally:
        bad.detect_position = None


def _hf_reference(hf, a, mean_emb):
    """KL per position and next-token log-prob differences from plain transformers, one sentence at a time."""
    def lp(ids=None, embeds=None):
        out = hf(input_ids=ids, inputs_embeds=embeds).logits[0]
        return torch.log_softmax(out.double(), -1)

    p, n = a.position, a.length
    c = torch.tensor([a.clean_ids])
    x = torch.tensor([a.corrupt_ids])
    emb = hf.get_input_embeddings()(x).clone()
    emb[0, p] = mean_emb
    d = torch.tensor([a.corrupt_ids[:p] + a.corrupt_ids[p + 1:]])
    lc = lp(c)[p:n]
    runs = {"changed": lp(x)[p:n], "ignore_mean": lp(embeds=emb)[p:n], "ignore_delete": lp(d)[p - 1:n - 1]}
    nxt = torch.tensor(a.clean_ids[p + 1:n])
    out = {}
    for k, lx in runs.items():
        out[f"kl_{k}"] = (lc.exp() * (lc - lx)).sum(-1).numpy()
        out[f"lp_{k}"] = (lx[:-1].gather(-1, nxt[:, None]) - lc[:-1].gather(-1, nxt[:, None])).squeeze(-1).numpy()
    return out


@pytest.mark.slow
def test_matches_plain_transformers(model):
    from transformers import AutoModelForCausalLM

    from eclens.model import cache_root

    folder = cache_root() / "models" / "smollm2-135m-instruct-f32"
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tok = model.tokenizer
    raw = [("The keys to the cabinet are on the table.", "The keys to the cabinet is on the table."),
           ("Yesterday, Anna walked to the station with her dog.", "Yesterday, Anna walks to the station with her dog."),
           ("She gave me an old book for my birthday.", "She gave me a old book for my birthday.")]
    pairs = [align(MinimalPair(f"p{i}", c, x, "grammar/x"), tok) for i, (c, x) in enumerate(raw)]
    pos = pair_recovery(model, pairs, RecoveryConfig(batch_size=2))
    mean_emb = hf.get_input_embeddings().weight.mean(0)
    worst = {}
    with torch.no_grad():
        for a in pairs:
            ref = _hf_reference(hf, a, mean_emb)
            got = pos[pos.id == a.id].sort_values("t")
            for k, v in ref.items():
                g = got[k].to_numpy()[: len(v)]
                worst[k] = max(worst.get(k, 0.0), float(np.abs(g - v).max()))
                # measured worst case 2e-5 (the bridge's float32 log-probs match transformers to ~3e-5)
                assert np.allclose(g, v, atol=1e-4, rtol=0), (a.id, k, np.abs(g - v).max())
            assert math.isnan(got["lp_changed"].iloc[-1])
            assert got["kl_changed"].iloc[0] > 0.01  # the change registers: the comparison is not vacuous
    print("max |eclens - transformers|:", worst)
