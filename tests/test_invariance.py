"""Selective invariance: planted units come out error-specific, a planted corrector error-invariant, no plant
nothing beyond the within-cluster permutation null."""

from __future__ import annotations

import pytest
import torch

from _designpairs import design_pairs
from eclens.errors import EclensError
from eclens.invariance import InvarianceConfig, measure_invariance, permuted_roles

CFG = InvarianceConfig(offsets=(0, 1, -1), n_permutations=2)
UNITS = [3, 17, 40]


class Planted:
    """``add``: after block ``layer``, add ``scale`` at ``UNITS`` at every position from the error token on;
    ``restore``: after block ``layer``, positions after the error token get the corrected run's residual.
    Both are functions of the input ids (the plant knows the error sentences' token ids and their clean ids)."""

    def __init__(self, model, pairs, layer: int, kind: str, scale: float = 30.0):
        self.model, self.kind, self.scale = model, kind, scale
        self.name = f"blocks.{layer}.hook_resid_post"
        errs = [a for a in pairs if a.pair.role == "error"]
        self.fix = {tuple(a.corrupt_ids): (a.position, a.clean_ids) for a in errs}

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, *a, **kw):  # shape probes run the plain model
        return self.model(*a, **kw)

    def _where(self, toks):
        after = torch.zeros(toks.shape, dtype=torch.bool)
        corrected = toks.clone()
        for i, row in enumerate(toks.tolist()):
            for n in range(len(row), 0, -1):  # right padding: match the unpadded prefix
                hit = self.fix.get(tuple(row[:n]))
                if hit:
                    p, clean = hit
                    after[i, p + (self.kind == "restore"):n] = True
                    corrected[i, :n] = torch.tensor(clean)
                    break
        return after, corrected

    def run_with_hooks(self, toks, fwd_hooks=(), **kw):
        after, corrected = self._where(toks.cpu())
        if self.kind == "add":
            def plant(act, hook):
                act = act.clone()
                act[..., UNITS] += self.scale * after[..., None].to(act)
                return act
        else:
            _, cache = self.model.run_with_cache(corrected, names_filter=self.name)
            fixed = cache[self.name]

            def plant(act, hook):
                return torch.where(after[..., None], fixed.to(act), act)
        # the plant runs before any reader of the same hook point
        return self.model.run_with_hooks(toks, fwd_hooks=[(self.name, plant), *fwd_hooks], **kw)


@pytest.fixture(scope="module")
def pairs(tiny):
    # error and twin words alternate between clusters, so without a plant errors and twins are exchangeable
    return design_pairs(tiny.tokenizer, n_clusters=24, balanced=True)


def test_planted_units_are_error_specific(tiny, pairs):
    L = tiny.cfg.n_layers - 1
    res = measure_invariance(Planted(tiny, pairs, L, "add"), pairs, CFG)
    spec = res.cells[res.cells["class"] == "specific"]
    got = set(zip(spec.layer, spec.offset, spec.unit))
    want = {(L, k, u) for k in CFG.offsets for u in UNITS}
    assert got == want, (got ^ want)
    assert res.counts["null_specific_max"] == 0 and res.counts["null"] == "within clusters"


def test_planted_corrector_is_error_invariant(tiny, pairs):
    L = tiny.cfg.n_layers - 1
    res = measure_invariance(Planted(tiny, pairs, L, "restore"), pairs, CFG)
    c = res.cells
    inv = c[c["class"] == "invariant"]
    assert len(inv) and set(inv.layer) == {L} and 0 not in set(inv.offset)  # after the error token, at L only
    reached_after = c[(c.layer == L) & (c.offset != 0)]
    assert len(inv) == len(reached_after)  # every reached unit there
    assert (c["class"] == "specific").sum() <= res.counts["null_specific_max"] + 1


def test_no_plant_nothing_beyond_null(tiny, pairs):
    res = measure_invariance(tiny, pairs, CFG)
    n = res.counts
    assert n["reached"] > 100
    assert n["invariant"] + n["specific"] <= 2 + n["null_invariant_max"] + n["null_specific_max"], n
    d = res.directions
    assert set(d.columns) >= {"split_half_cos", "heldout_projection"}
    assert "selective invariance" in res.headline()


def test_roles_and_bad_input(tiny, pairs):
    import numpy as np

    roles = ["error", "twin"] * 4
    cl = ["a", "a", "b", "b", "c", "c", "d", "d"]
    r, kind = permuted_roles(roles, cl, np.random.default_rng(0))
    assert kind == "within clusters" and all(sorted(r[i:i + 2]) == ["error", "twin"] for i in range(0, 8, 2))
    r, kind = permuted_roles(roles, list("abcdefgh"), np.random.default_rng(0))
    assert kind == "across clusters" and sorted(r) == sorted(roles)
    with pytest.raises(EclensError, match="comparison"):
        measure_invariance(tiny, [a for a in pairs if a.pair.role == "error"], CFG)
