"""Error-signal probe: a planted error vector from layer L is found from L on and not before; no plant, nothing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from _designpairs import design_pairs
from eclens.errors import EclensError
from eclens.probe import ProbeConfig, ProbeItems, activations, items_from_pairs, layer0_check, probe_curve

CFG = ProbeConfig(n_permutations=5, boot=ProbeConfig().boot.__class__(n_boot=300))


def words(tok, *ws):
    return [tok(w, add_special_tokens=False)["input_ids"][0] for w in ws]


def two_by_two(tok, n_clusters=40) -> tuple[ProbeItems, set[tuple[int, ...]]]:
    """2x2 cells per cluster: ``A`` (big/small) at position 1, ``B`` (dog/cat) at ``detect`` = 3; the error cells
    are one diagonal, which diagonal drawn at random per cluster. Each token occurs in both classes equally often,
    and nothing in the tokens predicts the label in a held-out cluster (a random model's attention computes the
    A x B interaction, so a fixed diagonal would be decodable without any plant)."""
    A, B = words(tok, " big", " small"), words(tok, " dog", " cat")
    fill = words(tok, " red", " blue", " green", " old", " new", " table", " horse", " tiger", " lion", " banana")
    ids, pos, lab, cl = [], [], [], []
    rng = np.random.default_rng(0)
    for c in range(n_clusters):
        f = rng.choice(fill, 4, replace=False).tolist()
        diag = int(rng.integers(2))
        for i, a in enumerate(A):
            for j, b in enumerate(B):
                ids.append([words(tok, "The")[0], a, f[0], b, f[1], f[2], f[3]])
                pos.append(3)
                lab.append(int((i != j) ^ diag))
                cl.append(f"c{c}")
    errors = {tuple(s) for s, y in zip(ids, lab) if y}
    return ProbeItems(ids, pos, np.array(lab), cl), errors


class PlantedSignal:
    """Adds a fixed vector to the residual stream after block ``layer`` at position 3 (``detect``) of every error
    sentence: a function of the input ids only (the plant knows which sentences are errors)."""

    def __init__(self, model, errors: set[tuple[int, ...]], layer: int, scale: float = 4.0):
        self.model, self.errors, self.name = model, errors, f"blocks.{layer}.hook_resid_post"
        g = torch.Generator().manual_seed(1)
        self.v = torch.randn(model.cfg.d_model, generator=g) * scale

    def __getattr__(self, name):
        return getattr(self.model, name)

    def run_with_hooks(self, toks, fwd_hooks=(), **kw):
        err = torch.zeros(toks.shape, dtype=torch.bool)
        for i, row in enumerate(toks.tolist()):
            err[i, 3] = tuple(row) in self.errors

        def plant(act, hook):
            return act + err[..., None].to(act.dtype) * self.v.to(act)

        return self.model.run_with_hooks(toks, fwd_hooks=[(self.name, plant), *fwd_hooks], **kw)


@pytest.mark.slow  # ~100 s wall on the shared 2-core machine under load
def test_planted_signal_found_from_its_layer(tiny):
    items, errors = two_by_two(tiny.tokenizer)
    L = 1
    planted = probe_curve(PlantedSignal(tiny, errors, L), items, CFG)
    plain = probe_curve(tiny, items, CFG)
    for _, r in planted.iterrows():
        if r.layer >= L:
            assert r.low > 0.9 and r.p_perm < 0.2, r.to_dict()
        else:
            assert r.low < 0.5 < r.high or r.acc <= r.null_q95, r.to_dict()
    for _, r in plain.iterrows():
        assert r.acc < 0.65 and (r.low < 0.5 < r.high or r.acc <= r.null_q95), r.to_dict()
    assert layer0_check(planted)["at_chance"] and layer0_check(plain)["at_chance"]
    from eclens.measureviz import probe_figure

    assert len(probe_figure({"planted": planted, "plain": plain}).data) == 8
    assert abs(planted["null_mean"].mean() - 0.5) < 0.1  # the within-cluster permutation null sits at chance


def test_token_identity_fails_the_layer0_check(tiny):
    # plain error-vs-clean pairs read at p: the error token itself separates the classes at the embedding
    pairs = design_pairs(tiny.tokenizer, n_clusters=16)
    items = items_from_pairs([a for a in pairs if a.pair.role == "error"])
    curve = probe_curve(tiny, items, ProbeConfig(n_permutations=4, boot=CFG.boot))
    chk = layer0_check(curve)
    assert not chk["at_chance"] and "token identity" in chk["note"]
    # read one token later, where the sentences agree, the embedding is at chance again
    items1 = items_from_pairs([a for a in pairs if a.pair.role == "error"], offset=1)
    acts = activations(tiny, items1)
    assert torch.equal(acts[0][items1.label == 0], acts[0][items1.label == 1])
    with pytest.raises(EclensError, match="one class"):
        items_from_pairs([a for a in pairs if a.pair.role == "twin"][:0])
