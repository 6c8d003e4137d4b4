"""Selective invariance: which units change less (or more) for an error than for an acceptable change?

Per cell (hook, layer, aligned offset after ``detect``, unit) the statistic is the ratio of the
error pairs' mean |Δ| to the twins' (Δ = changed − clean at the aligned position). It is what
DESIGN.md calls the ratio of normalised |Δ|: σ, the spread of the clean activation of the cell,
cancels in the ratio and is used only for the *reached* test. Both means are streamed in
:class:`~eclens.bootstrap.PoissonBootstrap` accumulators that share the hashed cluster weights,
so each replicate's ratio resamples clusters, and shards merge exactly.

- *Reached*: the twins' mean |Δ|/σ is at least ``reach_floor``. (DESIGN.md says median; the mean
  streams and merges exactly where a median needs a sample of every cell, and it is the
  denominator of the ratio itself. Unreached cells are neither invariant nor specific.)
- *Error-invariant*: the ratio is reliably below ``invariant_bound`` (0.5); *error-specific*:
  reliably above ``specific_bound`` (2). "Reliably": a one-sided test of the log ratio against
  the bound with the replicates' standard deviation, Benjamini–Hochberg at ``fdr`` over the
  reached cells of each class (the multiplicity control).
- *Null*: the same counts with roles permuted within clusters (clusters that hold both roles),
  or across clusters (when every cluster holds one role, as pairs without a design do), in
  ``n_permutations`` extra accumulator pairs of the same pass.
- *Directions* (the residual stream has no privileged basis): per layer and offset, the mean
  error Δ minus the mean twin Δ, estimated on each hashed half of the clusters; reported as the
  cosine between the halves' directions and the held-out projection (half B's difference
  projected on half A's unit direction, in σ units).

Where pairs have no twins, any role other than ``error`` is the comparison; ``compare_roles``
maps pairs to roles for unpaired comparisons (e.g. grammar errors against meaning changes).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from scipy.stats import norm

from .bootstrap import PoissonBootstrap, PoissonConfig, split_half
from .diff import hook_groups, pair_index
from .errors import EclensError
from .hooks import iter_batches, pad_id, select_hooks
from .pairs import AlignedPair
from .roles import cluster_of, role_of
from .stats import bh_qvalues

CLASSES = ("invariant", "specific")


@dataclass(frozen=True)
class InvarianceConfig:
    hooks: str = "hook_resid_post"
    offsets: tuple[int, ...] = (0, 1, 2, -1)  # after detect; -1 = the last token
    reach_floor: float = 0.1
    invariant_bound: float = 0.5
    specific_bound: float = 2.0
    fdr: float = 0.05
    n_permutations: int = 3
    batch_size: int = 16
    seed: int = 0
    poisson: PoissonConfig = field(default_factory=PoissonConfig)


def permuted_roles(roles: Sequence[str], clusters: Sequence[str], rng: np.random.Generator) -> tuple[list[str], str]:
    """Roles shuffled within clusters where clusters hold both roles, else across clusters (cluster-level labels)."""
    by: dict[str, list[int]] = {}
    for i, c in enumerate(clusters):
        by.setdefault(c, []).append(i)
    mixed = sum(len({roles[i] for i in ix}) > 1 for ix in by.values())
    out = list(roles)
    if mixed >= len(by) / 2:
        for ix in by.values():
            perm = rng.permutation(ix)
            for i, j in zip(ix, perm):
                out[i] = roles[j]
        return out, "within clusters"
    keys = list(by)
    labels = [roles[by[k][0]] for k in keys]
    shuffled = [labels[j] for j in rng.permutation(len(keys))]
    for k, lab in zip(keys, shuffled):
        for i in by[k]:
            out[i] = lab
    return out, "across clusters"


class _Cells:
    """Accumulators of one hook group: error and comparison |Δ| (real and permuted roles), clean moments,
    and Δ sums per cluster half and role for directions."""

    def __init__(self, n_layers: int, n_off: int, width: int, cfg: InvarianceConfig):
        shape = (n_layers, n_off, width)
        self.err = [PoissonBootstrap(shape, cfg.poisson) for _ in range(cfg.n_permutations + 1)]
        self.cmp = [PoissonBootstrap(shape, cfg.poisson) for _ in range(cfg.n_permutations + 1)]
        self.s1 = torch.zeros(shape, dtype=torch.float64)
        self.s2 = torch.zeros(shape, dtype=torch.float64)
        self.n = torch.zeros((n_layers, n_off, 1), dtype=torch.float64)
        self.dsum = torch.zeros((2, 2, *shape), dtype=torch.float64)  # [half, role(err, cmp)]
        self.dn = torch.zeros((2, 2, n_layers, n_off, 1), dtype=torch.float64)


@dataclass
class InvarianceResult:
    cells: pd.DataFrame  # one row per reached cell
    directions: pd.DataFrame
    counts: dict
    cfg: InvarianceConfig

    def headline(self) -> str:
        c = self.counts
        return (f"selective invariance: {c['reached']} reached cells; error-invariant {c['invariant']} "
                f"(null {c['null_invariant_mean']:.1f}, max {c['null_invariant_max']}), error-specific "
                f"{c['specific']} (null {c['null_specific_mean']:.1f}, max {c['null_specific_max']})")


def measure_invariance(model, pairs: Sequence[AlignedPair], cfg: InvarianceConfig = InvarianceConfig(),
                       role: Callable[[AlignedPair], str] = role_of) -> InvarianceResult:
    """Stream the pairs once and classify every reached cell (module docstring). ``role(pair)`` gives
    ``error`` or anything else (the comparison: twins by default)."""
    if not pairs:
        raise EclensError("invariance needs at least one valid pair")
    roles = [role(a) for a in pairs]
    if "error" not in roles or all(r == "error" for r in roles):
        raise EclensError("invariance needs error pairs and comparison pairs (twins, or another role via `role`)")
    clusters = [cluster_of(a) for a in pairs]
    rng = np.random.default_rng(cfg.seed)
    perms = [roles]
    null_kind = ""
    for _ in range(cfg.n_permutations):
        r, null_kind = permuted_roles(roles, clusters, rng)
        perms.append(r)
    names = select_hooks(model, cfg.hooks)
    groups = hook_groups(model, names)
    offsets = list(cfg.offsets)
    cells = {g.suffix: _Cells(len(g.names), len(offsets), g.width, cfg) for g in groups}
    index = {a.id: i for i, a in enumerate(pairs)}
    dev = next(model.parameters()).device
    # Position-aligned at detect: a batch's rows are read at detect + k, each side from its own span end
    # (diff.pair_index; the same position for single-token pairs); one hook per name fills one layer slot.
    with torch.no_grad():
        for batch in iter_batches(pairs, cfg.batch_size, pad_id(model), dev):
            B = batch.size
            ix = pair_index(batch.pairs, offsets, dev, batch.tokens.shape[1], anchor="detect")
            got: dict[str, list] = {g.suffix: [None] * len(g.names) for g in groups}

            def grab(suffix, slot, got=got, ix=ix, B=B):
                def fn(x, hook):
                    got[suffix][slot] = x.flatten(0, 1).index_select(0, ix.flat).reshape(2 * B, len(offsets), -1)
                return fn

            hooks = [(n, grab(g.suffix, s)) for g in groups for s, n in enumerate(g.names)]
            model.run_with_hooks(batch.tokens, fwd_hooks=hooks, return_type=None)
            rows = [index[a.id] for a in batch.pairs]
            cl = [clusters[i] for i in rows]
            half = torch.tensor([split_half(c, cfg.seed) for c in cl])
            valid = ix.valid_cpu.to(torch.float64)[:, :, None]  # [B, O, 1]
            for g in groups:
                act = torch.stack(got[g.suffix], 2).double().cpu()  # [2B, O, L, W]
                clean, delta = act[:B], act[B:] - act[:B]
                acc = cells[g.suffix]
                m = valid[:, :, None]  # [B, O, 1, 1]
                acc.s1 += (clean * m).sum(0).transpose(0, 1)
                acc.s2 += (clean.square() * m).sum(0).transpose(0, 1)
                acc.n += m.sum(0).transpose(0, 1)
                absd = delta.abs().transpose(1, 2)  # [B, L, O, W]
                mask = m.transpose(1, 2).expand_as(absd)
                for j, rl in enumerate(perms):
                    is_err = torch.tensor([rl[i] == "error" for i in rows])
                    for a, sel in ((acc.err[j], is_err), (acc.cmp[j], ~is_err)):
                        if sel.any():
                            a.update(absd[sel], [c for c, s in zip(cl, sel.tolist()) if s], mask[sel])
                is_err = torch.tensor([roles[i] == "error" for i in rows])
                for h in (0, 1):
                    for r, sel in ((0, is_err), (1, ~is_err)):
                        s = sel & (half == h)
                        if s.any():
                            acc.dsum[h, r] += (delta[s] * m[s]).sum(0).transpose(0, 1)
                            acc.dn[h, r] += m[s].sum(0).transpose(0, 1)
    return _classify(groups, cells, offsets, cfg, null_kind)


def _classes(err: PoissonBootstrap, cmp: PoissonBootstrap, reached: torch.Tensor, cfg: InvarianceConfig):
    """Log ratio replicates -> (ratio, low, high, q_invariant, q_specific, invariant, specific) over reached cells."""
    # an error |Δ| of exactly 0 (a unit restored to the clean value) is a ratio of 0: floor it, don't drop it
    lr = torch.log((err.mean() / cmp.mean()).clamp_min(1e-12))  # [1 + B, *cell]
    est, reps = lr[0], lr[1:]
    sd = reps.std(0)
    z = float(norm.ppf(1 - (1 - cfg.poisson.level) / 2))
    ok = reached & torch.isfinite(est) & torch.isfinite(sd)
    e, s = est[ok].numpy(), sd[ok].numpy()
    with np.errstate(divide="ignore", invalid="ignore"):  # sd 0: the replicates agree, p is 0 or 1
        p_inv = np.nan_to_num(norm.sf((np.log(cfg.invariant_bound) - e) / s), nan=1.0)  # H0: ratio >= bound
        p_spec = np.nan_to_num(norm.sf((e - np.log(cfg.specific_bound)) / s), nan=1.0)  # H0: ratio <= bound
    q_inv, q_spec = bh_qvalues(p_inv), bh_qvalues(p_spec)
    return ok, np.exp(e), np.exp(e - z * s), np.exp(e + z * s), np.asarray(q_inv), np.asarray(q_spec)


def _classify(groups, cells, offsets, cfg: InvarianceConfig, null_kind: str) -> InvarianceResult:
    frames, dirs = [], []
    counts = {"reached": 0, "invariant": 0, "specific": 0, "null": null_kind}
    nulls = {k: [0] * cfg.n_permutations for k in CLASSES}
    for g in groups:
        acc = cells[g.suffix]
        mean = acc.s1 / acc.n
        sigma = (acc.s2 / acc.n - mean.square()).clamp_min(0).sqrt()
        twin_absz = acc.cmp[0].mean()[0] / sigma
        reached = twin_absz >= cfg.reach_floor
        counts["reached"] += int(reached.sum())
        for j in range(cfg.n_permutations + 1):
            ok, ratio, lo, hi, q_inv, q_spec = _classes(acc.err[j], acc.cmp[j], reached, cfg)
            inv, spec = q_inv < cfg.fdr, q_spec < cfg.fdr
            if j > 0:
                nulls["invariant"][j - 1] += int(inv.sum())
                nulls["specific"][j - 1] += int(spec.sum())
                continue
            counts["invariant"] += int(inv.sum())
            counts["specific"] += int(spec.sum())
            li, oi, ui = (x.numpy() for x in torch.nonzero(ok, as_tuple=True))
            err_absz = (acc.err[0].mean()[0] / sigma)[ok].numpy()
            frames.append(pd.DataFrame({
                "hook": g.suffix, "layer": np.asarray(g.layers)[li], "offset": np.asarray(offsets)[oi], "unit": ui,
                "err_absz": err_absz, "twin_absz": twin_absz[ok].numpy(), "ratio": ratio, "low": lo, "high": hi,
                "q_invariant": q_inv, "q_specific": q_spec,
                "class": np.where(inv, "invariant", np.where(spec, "specific", "")),
            }))
        dirs.append(_directions(g, acc, sigma, offsets))
    for k in CLASSES:
        counts[f"null_{k}_mean"] = float(np.mean(nulls[k])) if nulls[k] else float("nan")
        counts[f"null_{k}_max"] = int(max(nulls[k])) if nulls[k] else 0
        counts[f"null_{k}"] = nulls[k]
    cells_df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    return InvarianceResult(cells_df, pd.concat(dirs, ignore_index=True), counts, cfg)


def _directions(g, acc: _Cells, sigma: torch.Tensor, offsets) -> pd.DataFrame:
    """Per layer and offset: split-half directions of mean error Δ minus mean comparison Δ (in σ units)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        mean = acc.dsum / acc.dn  # [half, role, L, O, W]
    safe = torch.where(sigma > 0, sigma, torch.ones_like(sigma))
    d = (mean[:, 0] - mean[:, 1]) / safe  # [half, L, O, W]
    a, b = d[0], d[1]
    na, nb = a.norm(dim=-1), b.norm(dim=-1)
    cos = (a * b).sum(-1) / (na * nb)
    held = (b * a).sum(-1) / na  # half B's difference along half A's unit direction
    n_layers, n_off = cos.shape
    return pd.DataFrame({
        "hook": g.suffix, "layer": np.repeat(np.asarray(g.layers), n_off),
        "offset": np.tile(np.asarray(offsets), n_layers),
        "split_half_cos": cos.reshape(-1).numpy(), "heldout_projection": held.reshape(-1).numpy(),
        "norm_half_a": na.reshape(-1).numpy(), "norm_half_b": nb.reshape(-1).numpy(),
    })
