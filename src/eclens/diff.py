"""Streaming, position-aligned, normalised activation differences (``ec diff``).

For every pair, the clean and the corrupt sentence run in one batch (clean rows
``0..B-1``, corrupt rows ``B..2B-1``; :mod:`eclens.hooks`). A forward hook on each
selected hook point gathers only the aligned positions every pair needs — the
changed position ``p`` (offset 0), ``p+1..p+K`` (offsets ``1..K``, where inside the
sentence) and the last token (offset ``-1``) — and drops the rest of the
activation. After the forward pass the gathered activations of all layers of one
hook are reduced together: ``Δ = corrupt - clean`` and the clean activation update
streaming accumulators (:mod:`eclens.stats`), per category, on the model's device. Memory does not grow with the number of pairs; padded positions are
never read (positions are clamped to each sentence's own length and masked).

What is accumulated, per (category, hook, layer, offset, dimension) — exactly:

* count, mean and M2 of Δ (mean Δ, spread of Δ) and of the clean activation
  (its mean and its spread σ, the normaliser), as shifted power sums; the sum of
  |Δ|; the sum of sign(Δ) and the number of non-zero Δ (sign consistency). The root
  mean square of the clean activation (the massive-activation criterion) follows
  from its moments;
* per (category, hook, layer, offset), for each pair: ‖Δ‖, the relative L2
  ‖Δ‖/‖a_clean‖ and the cosine of the clean and corrupt activation vectors (count,
  mean, M2); for per-head hooks (``attn.hook_q/k/v/z``) the last two per head.

Precision: the per-batch work is float32 and the totals float64 (see
:class:`_GroupAcc`); exact statistics agree with a float64 brute force from
``run_with_cache`` to ~1e-7 relative. Memory: the totals are ``O x C x 7 x L x D``
float64 per hook, plus the pair sample below — fixed, whatever the number of pairs.

What is sampled: a uniform sample of at most ``sample_size`` pairs (bottom-k on a
hash of the pair id: independent of batch size, order and resumes) keeps each
sampled pair's Δ at every gathered position (float16) and its per-layer scalars.
Everything that needs the normaliser σ (known only at the end) or the final mean
direction comes from this sample, with σ and the mean direction taken from the
exact accumulators: the quantiles (median, q10/q25/q75/q90) of the normalised
change ``|Δ|/σ``, the fraction of pairs with ``|Δ|/σ < threshold``, the
leave-one-out cosine of each pair's Δ with the mean Δ of the others
(``cos(δ_i, S - δ_i)``, ``S`` the exact sum) and the per-dimension category
contrasts. Why a sample rather than a sketch: a fixed-bin histogram of ``|Δ|/σ``
needs σ before the data, a log-binned histogram of raw ``|Δ|`` needs hundreds of
bins per cell (more memory than the sample), and per-pair values are needed anyway
for the rank tests of the contrasts and the cosine distribution. With at most
``sample_size`` pairs these numbers are exact (up to float16 rounding, ~5e-4
relative); beyond, they are estimates from a uniform sample, and ``n_sample``
says from how many pairs.

Normalisation: σ of a (hook, layer, offset, dimension) is the standard deviation
(ddof=1) of the *clean* activation of that dimension at that aligned position over
all pairs (category ``all``), so categories are measured on one scale. ``absz``
is ``|Δ|/σ``; dims with σ = 0 (e.g. the embedding of a token every sentence shares)
give NaN. **Massive activations** (Sun et al. 2024): a dimension is flagged when the
root mean square of its clean activation is at least ``massive_ratio`` (100) times
the median dimension's at that (hook, layer, offset) — RMS rather than mean |a|
because it follows exactly from the accumulated moments; ``layers.csv`` reports the
largest ratio and its dimension (``rms_ratio_max``, ``rms_ratio_dim``) so outliers
under the threshold stay visible (on a handful of test sentences SmolLM2-135M's dimension 507 sat at 30-130x at the
aligned positions, above 100x only at ``p+1`` of the early layers; the 1000x values of
Sun et al. are at the first token, which is not an aligned position). Flagged
dimensions are reported, and left out of the candidates and the per-layer averages
of ``absz``.

**Candidate rule** (per category and ``all``, hook, layer and offset; a dimension
needs ``n >= min_pairs`` pairs in the exact count and in the sample, σ > 0, a
reachable position — Δ not identically zero, as at ``hook_resid_pre`` of layer 0
after ``p`` — and not massive):

* *stable*: ``frac_under >= stable_frac`` (0.9), i.e. in at least 90 % of the
  pairs the change is under ``threshold`` (0.1) of the dimension's spread; ranked by
  ``absz_q90`` ascending;
* *responsive*: ``absz_median >= responsive_z`` (1.0: half of the pairs move it by
  at least its whole spread) and sign consistency ``>= responsive_sign`` (0.8: at
  least 80 % of the pairs move it the same way); ranked by ``absz_median``
  descending.

At most ``max_candidates`` per (category, hook, layer, offset, kind) are listed.

**Directions**: the residual stream has no privileged basis, so per (hook, layer,
offset) we also report the mean-Δ direction (``dir_norm`` = ‖mean Δ‖, exact) and how
consistently pairs follow it: ``dir_consistency`` = ‖mean Δ‖² / mean‖Δ‖² (exact; 1 when
all pairs move the same way, about 1/n for random directions) and the distribution
of the leave-one-out cosines (sample). The unit of a dimension is in ``unit``:
``resid`` (residual-stream and attention/MLP output dimensions), ``neuron``
(``mlp.hook_pre``/``hook_post``), ``head_dim`` (``attn.hook_q/k/v/z``, with
``head``), ``head`` (``attn.hook_pattern``: the attention each head pays from the
aligned position to the changed token ``p``).

**Contrasts**: categories are grouped by the first path component
(``grammar/agreement`` -> ``grammar``); for every two groups with at least
``min_group`` sampled pairs, every (hook, layer, dimension) at offset 0 gets a
two-sided Mann–Whitney U test of ``|Δ|/σ`` (``measure = abs``) and of the signed
``Δ/σ`` (``measure = signed``), with Benjamini–Hochberg q-values over all tests of
one measure (every contrast, hook, layer and dimension).

Per pair (``pairs.csv``): teacher-forced log-probs of both sentences, the log-prob
of the clean and of the corrupt token at ``p`` (both read from the clean run's
prediction at ``p-1``: the prefixes are identical), and ``KL(P_clean || P_corrupt)``
of the next-token distributions at every position from ``p`` on.

Key layout of ``diff_stats.safetensors`` (``H`` a hook suffix such as
``hook_resid_pre``; ``C`` categories, ``L`` the hook's layers, ``O`` offsets, ``D``
its flattened width; all float64 unless noted):

* ``count``: ``[C, O]`` pairs with that aligned position;
* ``{H}/feat`` ``[O, C, 7, L, D]``: sums of ``Δ - K_Δ``, ``(Δ - K_Δ)^2``, ``a - K_a``,
  ``(a - K_a)^2`` (``a`` the clean activation), ``|Δ|``, ``sign(Δ)``, ``[Δ != 0]``
  (:data:`FEATURES`); ``{H}/shift`` ``[2, O, C, L, D]``: the shifts ``K_Δ, K_a``;
  ``{H}/shift_set`` ``[O, C]`` (bool). ``mean = K + s1/n``, ``M2 = s2 - s1^2/n``;
* ``{H}/scalars/{count,s1,s2,shift,shift_set}``: power sums
  (:class:`eclens.stats.PowerSums`) ``[C, 3, O, L]`` of ‖Δ‖, ‖Δ‖/‖a‖ and cos(a_clean,
  a_corrupt) (:data:`SCALARS`); ``{H}/head_scalars/...`` ``[C, 2, O, L, heads]`` of the
  per-head relative L2 and cosine, for per-head hooks;
* ``sample/keys`` ``[S]`` (float64; ``inf`` = empty slot), ``sample/category`` ``[S]``
  (int64), ``sample/valid`` ``[S, O]`` (bool), ``{H}/sample_delta`` ``[S, O, L, D]``
  (float16), ``{H}/sample_{rel_l2,cos}`` ``[S, O, L]`` (float32);
* metadata ``eclens_diff``: JSON with the configuration (hooks and their layers,
  offsets, categories, thresholds), the processed pair ids, the sampled pair ids, the
  per-pair rows and ``complete``. The file is the checkpoint too: it is rewritten
  atomically every ``checkpoint_every`` batches, and a rerun resumes from it.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float

from .errors import EclensError
from .hooks import DEFAULT_HOOKS, iter_batches, pad_id, select_hooks, split_hook
from .pairs import AlignedPair, require_single
from .runs import prepare_run_pairs, save_check  # noqa: F401 - their home is the run-folder module
from .stats import (
    F64,
    BottomK,
    Moments,
    PowerSums,
    bh_qvalues,
    group_onehot,
    item_key,
    masked_quantiles,
)

STATS_FILE = "diff_stats.safetensors"
META_KEY = "eclens_diff"
HEAD_HOOKS = ("attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_z", "attn.hook_result")
PATTERN_HOOKS = ("attn.hook_pattern", "attn.hook_attn_scores")
NEURON_HOOKS = ("mlp.hook_pre", "mlp.hook_post", "mlp.hook_pre_linear")
QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)


def position_kind(offset: int) -> str:
    return "changed" if offset == 0 else "last" if offset < 0 else "after"


# --------------------------------------------------------------------------- configuration


@dataclass
class DiffConfig:
    """Everything that determines the numbers (stored in the stats file; a resume must match).

    As ``run_diff(config=...)``: ``hooks`` may be a spec (``None``: the default hooks, a string, globs)
    and ``categories`` ``[]`` means "group by ``by_category``"; the result's config holds them resolved."""

    hooks: list[str] | str | None = None
    max_offset: int = 3
    include_last: bool = True
    categories: list[str] = field(default_factory=list)  # state rows; [] = one row, "all" only
    by_category: str = "full"  # full | top | none
    sample_size: int = 512
    seed: int = 0
    threshold: float = 0.1
    stable_frac: float = 0.9
    responsive_z: float = 1.0
    responsive_sign: float = 0.8
    massive_ratio: float = 100.0
    min_pairs: int = 10
    max_candidates: int = 50
    min_group: int = 5
    contrast_offsets: list[int] = field(default_factory=lambda: [0])
    alpha: float = 0.05

    @property
    def offsets(self) -> list[int]:
        return list(range(self.max_offset + 1)) + ([-1] if self.include_last else [])

    def numbers_key(self) -> dict:
        """The fields a resumed run must share with the checkpoint."""
        return {k: getattr(self, k) for k in ("hooks", "max_offset", "include_last", "categories", "by_category",
                                              "sample_size", "seed")}

    def category_of(self, cat: str) -> str:
        if self.by_category == "top":
            return cat.split("/", 1)[0]
        return cat


@dataclass
class HookGroup:
    """All selected hooks with one suffix (``hook_resid_pre`` of every layer), reduced together."""

    suffix: str
    names: list[str]
    layers: list[int]
    kind: str  # resid | neuron | head_dim | head | other
    rest: tuple[int, ...]  # activation shape after (batch, pos) (pattern: (heads,))

    @property
    def width(self) -> int:
        return int(np.prod(self.rest)) if self.rest else 1

    @property
    def n_heads(self) -> int:
        return self.rest[0] if self.kind == "head_dim" else 0

    def to_dict(self) -> dict:
        return {"suffix": self.suffix, "names": self.names, "layers": self.layers, "kind": self.kind,
                "rest": list(self.rest)}

    @classmethod
    def from_dict(cls, d: dict) -> HookGroup:
        return cls(d["suffix"], list(d["names"]), [int(x) for x in d["layers"]], d["kind"], tuple(d["rest"]))


def _unit_kind(suffix: str, rest: tuple[int, ...]) -> str:
    if suffix in PATTERN_HOOKS:
        return "head"
    if suffix in HEAD_HOOKS and len(rest) == 2:
        return "head_dim"
    if suffix in NEURON_HOOKS:
        return "neuron"
    if suffix.startswith("hook_") or suffix in ("attn.hook_out", "mlp.hook_out"):
        return "resid"
    return "other"


def hook_groups(model, names: Sequence[str]) -> list[HookGroup]:
    """Group hook names by suffix and probe each activation's shape with a 2-token forward pass."""
    shapes: dict[str, tuple[int, ...]] = {}

    def probe(name):
        def fn(act, hook):
            shapes[name] = tuple(act.shape)
        return fn

    dev = _device(model)
    toks = torch.tensor([[pad_id(model)] * 2], device=dev)
    with torch.inference_mode(), model.hooks(fwd_hooks=[(n, probe(n)) for n in names]):
        model(toks)
    groups: dict[str, HookGroup] = {}
    for n in names:
        if n not in shapes:
            raise EclensError(f"hook {n} did not fire in a forward pass; choose another with --hooks")
        layer, suffix = split_hook(n)
        s = shapes[n]
        if suffix in PATTERN_HOOKS:
            rest = (s[1],)
        else:
            if len(s) < 2 or s[1] != 2:
                raise EclensError(f"hook {n} has shape {list(s)}, not (batch, position, ...); it cannot be "
                                  "compared position by position")
            rest = tuple(s[2:])
        g = groups.get(suffix)
        if g is None:
            g = groups[suffix] = HookGroup(suffix, [], [], _unit_kind(suffix, rest), rest)
        elif g.rest != rest:
            raise EclensError(f"hook {n} has shape {list(rest)} but other layers of {suffix} have {list(g.rest)}")
        g.names.append(n)
        g.layers.append(-1 if layer is None else layer)
    return list(groups.values())


def _device(model) -> torch.device:
    return next(model.parameters()).device


# --------------------------------------------------------------------------- gathering


@dataclass
class AlignedIndex:
    """Where every pair of a batch is read: rows ``[2B, 1]``, positions ``[2B, O]`` (clamped), validity ``[B, O]``."""

    rows: torch.Tensor
    pos: torch.Tensor
    key: torch.Tensor  # [2B, 1] the changed position, for attention patterns
    valid: torch.Tensor  # bool [B, O], on the device
    valid_cpu: torch.Tensor
    all_valid: bool
    flat: torch.Tensor  # [2B * O] row index into the activation flattened over (batch, position)


def aligned_index(positions: Sequence[int], lengths: Sequence[int], offsets: Sequence[int], device,
                  seq_len: int | None = None) -> AlignedIndex:
    p = torch.tensor(list(positions), dtype=torch.long)
    n = torch.tensor(list(lengths), dtype=torch.long)
    cols = [p + k if k >= 0 else n - 1 for k in offsets]
    pos = torch.stack(cols, 1)
    valid = pos < n[:, None]
    pos = torch.minimum(pos, (n - 1)[:, None])  # never read a padded position
    B = len(p)
    T = int(seq_len if seq_len is not None else n.max())
    pos2 = torch.cat([pos, pos])
    flat = (torch.arange(2 * B)[:, None] * T + pos2).reshape(-1)
    rows = torch.arange(2 * B, device=device)[:, None]
    key = torch.cat([p, p])[:, None].to(device, non_blocking=True)
    return AlignedIndex(rows, pos2.to(device, non_blocking=True), key, valid.to(device, non_blocking=True), valid,
                        bool(valid.all()), flat.to(device, non_blocking=True))


class _Gatherer:
    """Forward hooks that keep only the aligned positions of each activation.

    Each hook copies its rows straight into slot ``l`` of one buffer per hook group,
    ``[L, 2B*O, *rest]`` (no per-hook tensors to stack afterwards); :meth:`collect`
    returns a ``[2B, O, L, *rest]`` view of it.
    """

    def __init__(self, groups: list[HookGroup], device):
        self.groups = groups
        self.device = torch.device(device)
        self.index: AlignedIndex | None = None
        self.bufs: dict[str, torch.Tensor | None] = {g.suffix: None for g in groups}
        self.filled: dict[str, list[bool]] = {g.suffix: [False] * len(g.names) for g in groups}

    def hooks(self) -> list[tuple[str, Callable]]:
        out = []
        for g in self.groups:
            for slot, name in enumerate(g.names):
                out.append((name, self._make(g, slot, g.suffix in PATTERN_HOOKS)))
        return out

    def _buffer(self, g: HookGroup, rows: int, dtype: torch.dtype) -> torch.Tensor:
        buf = self.bufs[g.suffix]
        shape = (len(g.names), rows, *g.rest)
        if buf is None or tuple(buf.shape) != shape or buf.dtype != dtype:
            buf = self.bufs[g.suffix] = torch.empty(shape, dtype=dtype, device=self.device)
        return buf

    def _make(self, g: HookGroup, slot: int, pattern: bool):
        filled = self.filled[g.suffix]

        def fn(act, hook):
            ix = self.index
            buf = self._buffer(g, ix.flat.numel(), act.dtype)
            if pattern:  # [2B, H, q, k] -> [2B, O, H]: attention from each aligned position to p
                buf[slot].copy_(act[ix.rows, :, ix.pos, ix.key].reshape(buf.shape[1:]))
            elif act.device == self.device:
                # [2B, T, *rest] -> [2B*O, *rest]: whole rows of the (batch*position) matrix, into the buffer
                torch.index_select(act.flatten(0, 1), 0, ix.flat, out=buf[slot])
            else:
                buf[slot].copy_(act.flatten(0, 1).index_select(0, ix.flat.to(act.device)), non_blocking=True)
            filled[slot] = True
            return None

        return fn

    def collect(self) -> dict[str, torch.Tensor]:
        out = {}
        two_b, n_off = self.index.pos.shape
        for g in self.groups:
            f = self.filled[g.suffix]
            if not all(f):
                raise EclensError(f"hook {g.names[f.index(False)]} did not fire in the forward pass")
            buf = self.bufs[g.suffix]
            L = buf.shape[0]
            out[g.suffix] = buf.view(L, two_b, n_off, *g.rest).movedim(0, 2)  # [2B, O, L, *rest] (a view)
            f[:] = [False] * len(f)  # in place: the hooks hold this list
        return out


# --------------------------------------------------------------------------- per-pair metrics


def pair_metric_tensors(logits: Float[torch.Tensor, "two_b seq vocab"], tokens: torch.Tensor,
                        positions: Sequence[int], lengths: Sequence[int]) -> dict[str, torch.Tensor]:
    """Per-pair log-probs and KL, as tensors on the logits' device (no host sync).

    ``clean_logprob``/``corrupt_logprob`` ``[B]``: teacher-forced log-prob of each sentence;
    ``clean_token_logprob``/``corrupt_token_logprob`` ``[B]``: log p of the clean and of the
    corrupt token at ``p`` under the clean run's prediction at ``p-1`` (the prefixes are
    identical); ``kl`` ``[sum(len - p)]``: KL(P_clean || P_corrupt) at ``t = p..len-1``,
    pair after pair (only those rows of the vocabulary-sized log-probs are read again).
    """
    B = len(positions)
    T = tokens.shape[1]
    dev = logits.device
    tok = tokens.to(dev)
    p_cpu = torch.tensor(list(positions), dtype=torch.long)
    n_cpu = torch.tensor(list(lengths), dtype=torch.long)
    tmask = torch.arange(T - 1)[None] < (n_cpu - 1)[:, None]  # [B, T-1]: predictions inside the sentence
    cnt = n_cpu - p_cpu  # KL rows per pair: t = p .. len-1
    # Log-softmax over the vocabulary (one fused pass; faster on the CPU than logsumexp, and the KL reuses it),
    # a few pairs at a time on the CPU: the [k, T, V] log-probs stay in cache and their memory is reused,
    # where one [2B, T, V] tensor (190 MB for 32 SmolLM2 pairs) ran half as fast. One block on a GPU.
    k = B if dev.type != "cpu" else max(1, (8 << 20) // max(1, T * logits.shape[-1] * 4))
    out: dict[str, list[torch.Tensor]] = {name: [] for name in ("clean_logprob", "corrupt_logprob", "kl",
                                                                "clean_token_logprob", "corrupt_token_logprob")}
    for s in range(0, B, k):
        e = min(B, s + k)
        c = cnt[s:e]
        ri = torch.repeat_interleave(torch.arange(e - s), c)
        ti = torch.arange(int(c.sum())) - torch.repeat_interleave(c.cumsum(0) - c, c) + p_cpu[s:e][ri]
        ri, ti = ri.to(dev, non_blocking=True), ti.to(dev, non_blocking=True)
        mask = tmask[s:e].to(dev, non_blocking=True)
        lp = {}
        for side, o in (("clean", 0), ("corrupt", B)):
            lp[side] = torch.log_softmax(logits[o + s:o + e].float(), dim=-1)  # [k, T, V]
            tl = lp[side][:, :-1].gather(-1, tok[o + s:o + e, 1:, None]).squeeze(-1)
            out[f"{side}_logprob"].append((tl * mask).sum(-1))
        # log p of the clean and of the corrupt token at p under the clean run's prediction at p-1
        pos = p_cpu[s:e].to(dev, non_blocking=True)
        before = lp["clean"][torch.arange(e - s, device=dev), (pos - 1).clamp_min(0)]  # [k, V]
        for side, o in (("clean", 0), ("corrupt", B)):
            out[f"{side}_token_logprob"].append(before.gather(-1, tok[o + s:o + e].gather(1, pos[:, None])))
        lc, lx = lp["clean"][ri, ti], lp["corrupt"][ri, ti]
        out["kl"].append((lc.exp() * (lc - lx)).sum(-1))
        del lp, lc, lx, before
    return {key: torch.cat(v).reshape(-1) for key, v in out.items()}


def metric_rows(batches: Sequence[tuple[Sequence[AlignedPair], dict[str, torch.Tensor]]],
                offsets: Sequence[int]) -> list[dict]:
    """Rows of ``pairs.csv`` from :func:`pair_metric_tensors` of several batches (one host transfer per column)."""
    if not batches:
        return []
    pairs = [a for ps, _ in batches for a in ps]
    cols = {k: torch.cat([m[k].reshape(-1) for _, m in batches]).double().cpu().numpy()
            for k in batches[0][1]}
    p = np.array([a.position for a in pairs])
    n = np.array([a.length for a in pairs])
    cnt = n - p
    start = np.concatenate([[0], np.cumsum(cnt)[:-1]])
    kl_all = cols.pop("kl")
    out = {k: cols[k] for k in ("clean_logprob", "corrupt_logprob")}
    out["logprob_diff"] = cols["corrupt_logprob"] - cols["clean_logprob"]
    for k in ("clean_token_logprob", "corrupt_token_logprob"):
        out[k] = np.where(p > 0, cols[k], np.nan)  # nothing predicts the first token
    out["token_logprob_diff"] = out["corrupt_token_logprob"] - out["clean_token_logprob"]
    for k in offsets:
        t = p + k if k >= 0 else n - 1
        ok = t < n
        out[f"kl_{k}" if k >= 0 else "kl_last"] = np.where(ok, kl_all[start + np.where(ok, t - p, 0)], np.nan)
    seg = np.split(kl_all, np.cumsum(cnt)[:-1])
    out["kl_mean"] = np.add.reduceat(kl_all, start) / cnt
    out["kl_max"] = np.maximum.reduceat(kl_all, start)
    out["kl"] = [json.dumps(x.tolist()) for x in seg]
    keys = list(out)
    vals = [out[k].tolist() if isinstance(out[k], np.ndarray) else out[k] for k in keys]
    return [dict(zip(keys, row)) for row in zip(*vals)]


def pair_metrics(logits: Float[torch.Tensor, "two_b seq vocab"], tokens: torch.Tensor, pairs: Sequence[AlignedPair],
                 offsets: Sequence[int]) -> list[dict]:
    """:func:`pair_metric_tensors` of one batch as ``pairs.csv`` rows (log-probs, per-offset KL, the KL list)."""
    m = pair_metric_tensors(logits, tokens, [a.position for a in pairs], [a.length for a in pairs])
    return metric_rows([(pairs, m)], offsets)


def pair_info(a: AlignedPair) -> dict:
    return {"id": a.id, "category": a.category, "source": a.pair.source, "position": a.position,
            "length": a.length, "clean_token": a.clean_token, "corrupt_token": a.corrupt_token}


# --------------------------------------------------------------------------- accumulation


FEATURES = ("delta_s1", "delta_s2", "clean_s1", "clean_s2", "delta_abs", "delta_sign", "delta_nonzero")
SCALARS = ("l2", "rel_l2", "cos")
HEAD_SCALARS = ("rel_l2", "cos")


class _GroupAcc:
    """The accumulators of one hook group.

    ``feat`` ``[O, C, F, L, D]`` (float64) holds, per offset, category, feature, layer and
    dimension, the sums of :data:`FEATURES` over pairs: ``Δ - K_Δ`` and its square,
    ``clean - K_clean`` and its square (shifted power sums, :class:`eclens.stats.PowerSums`
    algebra, shifts in ``shift`` ``[2, O, L, D]``), ``|Δ|``, ``sign(Δ)`` and ``[Δ != 0]``.

    Speed: one batch writes its features into a ``[B, O, F, L, D]`` buffer and adds them
    to every category at once with one matrix product per offset (the one-hot category
    matrix times the validity mask), so masking costs nothing and there is no Python
    loop over pairs. The buffer and the staged sums are float32 — exact subtraction about
    a float32 shift per (offset, category, layer, dimension), squares and sums of at most
    ~256 terms (``DiffAccumulator.flush_pairs``; TF32 is switched off for these products)
    — and go into the float64 totals at every flush, where the shifts are re-centred on
    the running means by exact float64 algebra. This halves the memory traffic of float64
    work, which is what bounds this step on the CPU and the GPU alike; the statistics
    agree with a float64 brute force to ~1e-7 relative (see the tests).
    """

    def __init__(self, g: HookGroup, C: int, n_off: int, S: int, device, sample_dtype=torch.float16,
                 host_sample: bool = False):
        L, D, O = len(g.layers), g.width, n_off  # noqa: E741
        self.g = g
        self.C, self.O, self.L, self.D = C, O, L, D
        device = torch.device(device)
        self.wd = torch.float32
        self.feat = torch.zeros((O, C, len(FEATURES), L, D), dtype=F64, device=device)
        self.stage = self.feat if self.wd == F64 else torch.zeros_like(self.feat, dtype=self.wd)
        # Shifts per (offset, category): set from the first batch where the category has the offset,
        # re-centred on the running mean at every flush (exact float64 algebra on the sums).
        self.shift = torch.zeros((2, O, C, L, D), dtype=F64, device=device)
        self.shift_set = torch.zeros((O, C), dtype=torch.bool)
        self._shift_w = self.shift.to(self.wd)
        self._sync_shift()
        # Per-pair scalars (SCALARS), one accumulator with a feature axis: fewer, larger operations.
        self.scalars = PowerSums.zeros(C, (len(SCALARS), O, L), None, device)
        H = g.n_heads
        self.heads = PowerSums.zeros(C, (len(HEAD_SCALARS), O, L, H), None, device) if H else None
        # The pair sample is the largest part of the state (float16 [S, O, L, D]: 3.4 GB for Llama-3-8B's
        # default hooks). On a GPU it lives in host memory, filled by asynchronous copies of each batch's
        # sampled rows from pinned buffers: a device copy would cost its allocation plus one blocking
        # device-to-host transfer of the whole sample at the end of every call. Unfilled slots are
        # zeroed only when the state is read (DiffAccumulator.state_dict), not page by page up front.
        self.host_sample = host_sample
        self.sample_delta = (torch.empty((S, O, L, D), dtype=sample_dtype) if host_sample
                             else torch.zeros((S, O, L, D), dtype=sample_dtype, device=device))
        self._sample_queue: list[tuple[Any, torch.Tensor, torch.Tensor]] = []
        self.sample_scalars = {k: torch.full((S, O, L), float("nan"), dtype=torch.float32, device=device)
                               for k in ("rel_l2", "cos")}
        self.shared_buffers: dict = {}

    def _sync_shift(self) -> None:
        """The work-dtype shifts, category-major ``[2, C, O, L, D]``: a pair's shift is one contiguous row."""
        self._shift_cm = self._shift_w.permute(0, 2, 1, 3, 4).contiguous()

    def _buffer(self, B: int) -> torch.Tensor:
        # One buffer for all groups of the same shape (they are reduced one after the other).
        key = (B, self.O, self.L, self.D, self.wd, self.feat.device)
        buf = self.shared_buffers.get(key)
        if buf is None:
            for k in [k for k in self.shared_buffers if k[0] != B]:  # a new batch size: drop the old ones
                del self.shared_buffers[k]
            buf = self.shared_buffers[key] = torch.empty((B, self.O, len(FEATURES), self.L, self.D), dtype=self.wd,
                                                         device=self.feat.device)
        return buf

    def flush(self, count: torch.Tensor) -> None:
        """Add the staged float32 sums to the float64 totals and re-centre the shifts (``count`` ``[C, O]``)."""
        if self.stage is not self.feat:
            self.feat += self.stage
            self.stage.zero_()
        n = count.T[:, :, None, None].to(F64)  # [O, C, 1, 1]
        nn = n.clamp_min(1)
        for w in (0, 1):
            s1, s2, K = self.feat[:, :, 2 * w], self.feat[:, :, 2 * w + 1], self.shift[w]
            knew = torch.where(n > 0, (K + s1 / nn).to(self.wd).to(F64), K)
            dk = K - knew
            s2 += 2 * dk * s1 + n * dk * dk
            s1 += n * dk
            self.shift[w] = knew
        # In place: the state is made outside inference mode and must stay a normal tensor.
        self._shift_w.copy_(self.shift)
        self._sync_shift()

    def update(self, X: torch.Tensor, cat: torch.Tensor, W: torch.Tensor, Wo: torch.Tensor, m3: torch.Tensor,
               new_shift: list[tuple[int, int]], slots: torch.Tensor | None, items: torch.Tensor | None,
               slots_cpu: torch.Tensor | None = None) -> None:
        """``X`` ``[2B, O, L, *rest]``; ``W`` one-hot ``[C, B]`` (float64), ``Wo`` ``[O, C, B]`` = ``W`` x validity
        (work dtype), ``m3`` validity ``[B, O, 1]`` (float64); ``new_shift``: the (offset, category) cells
        seen for the first time; ``slots``/``items``: which batch items enter which sample slots."""
        B = X.shape[0] // 2
        O, L = self.O, self.L  # noqa: E741
        x = X.flatten(3) if X.ndim > 4 else X.reshape(2 * B, O, L, self.D)  # a view for the gatherer's layout
        if x.dtype != self.wd:
            x = x.to(self.wd)
        clean, cor = x[:B], x[B:]
        d = cor - clean
        if new_shift:
            # Shift about the first batch's means, in the work dtype, so that x - K is exact near K.
            cnt = Wo.sum(-1)  # [O, C]
            for o in sorted({o for o, _ in new_shift}):
                sd = Wo[o] @ d[:, o].reshape(B, -1)
                sc = Wo[o] @ clean[:, o].reshape(B, -1)
                for oo, c in new_shift:
                    if oo == o:
                        self._shift_w[0, o, c] = (sd[c] / cnt[o, c]).view(L, self.D)
                        self._shift_w[1, o, c] = (sc[c] / cnt[o, c]).view(L, self.D)
                        self.shift_set[o, c] = True
            self.shift.copy_(self._shift_w)
            self._sync_shift()
        # Each pair's own category shift [B, O, L, D]: whole contiguous rows of the category-major copy.
        kd = self._shift_cm[0].index_select(0, cat)
        kc = self._shift_cm[1].index_select(0, cat)
        buf = self._buffer(B)
        torch.sub(d, kd, out=buf[:, :, 0])
        torch.mul(buf[:, :, 0], buf[:, :, 0], out=buf[:, :, 1])
        torch.sub(clean, kc, out=buf[:, :, 2])
        torch.mul(buf[:, :, 2], buf[:, :, 2], out=buf[:, :, 3])
        torch.abs(d, out=buf[:, :, 4])
        torch.sign(d, out=buf[:, :, 5])
        torch.abs(buf[:, :, 5], out=buf[:, :, 6])
        for o in range(O):
            self.stage[o].view(self.C, -1).addmm_(Wo[o], buf[:, o].reshape(B, -1))
        # Per-pair scalars over the whole vector (and per head for per-head hooks), float64.
        H = self.g.n_heads
        if H:
            dd_h = torch.linalg.vector_norm(d.view(B, O, L, H, -1), dim=-1).to(F64) ** 2
            cc_h = torch.linalg.vector_norm(clean.reshape(B, O, L, H, -1), dim=-1).to(F64) ** 2
            xx_h = torch.linalg.vector_norm(cor.reshape(B, O, L, H, -1), dim=-1).to(F64) ** 2
            dd, cc, xx = dd_h.sum(-1), cc_h.sum(-1), xx_h.sum(-1)
        else:
            dd = torch.linalg.vector_norm(d, dim=-1).to(F64) ** 2
            cc = torch.linalg.vector_norm(clean, dim=-1).to(F64) ** 2
            xx = torch.linalg.vector_norm(cor, dim=-1).to(F64) ** 2
        vals = self._scalars(dd, cc, xx)
        v = torch.stack([vals[k][0] for k in SCALARS], 1)  # [B, 3, O, L]
        mk = torch.stack([vals[k][1] for k in SCALARS], 1) * m3[:, None]
        self.scalars.update(torch.where(mk > 0, v, torch.zeros_like(v)), cat, mk, onehot=W)
        if H:
            hv = self._scalars(dd_h, cc_h, xx_h)
            v = torch.stack([hv[k][0] for k in HEAD_SCALARS], 1)  # [B, 2, O, L, H]
            mk = torch.stack([hv[k][1] for k in HEAD_SCALARS], 1) * m3[:, None, :, :, None]
            self.heads.update(torch.where(mk > 0, v, torch.zeros_like(v)), cat, mk, onehot=W)
        if slots is not None:
            rows = d.index_select(0, items).to(self.sample_delta.dtype)
            if self.host_sample:
                self._queue_sample(rows, slots_cpu if slots_cpu is not None else slots.cpu())
            else:
                self.sample_delta.index_copy_(0, slots, rows)
            for k in ("rel_l2", "cos"):
                v, ok = vals[k]
                v = torch.where(ok > 0, v, torch.full_like(v, float("nan")))
                self.sample_scalars[k].index_copy_(0, slots, v.index_select(0, items).float())

    # Copies in flight before the Python thread waits for the oldest (pinned buffers of a batch's sampled rows).
    max_sample_queue = 4

    def _queue_sample(self, rows: torch.Tensor, slots_cpu: torch.Tensor) -> None:
        if rows.device.type == "cuda":
            host = torch.empty(rows.shape, dtype=rows.dtype, pin_memory=True)
            host.copy_(rows, non_blocking=True)
            done = torch.cuda.Event()
            done.record(torch.cuda.current_stream(rows.device))
        else:  # host_sample on a CPU model (tests): the same queue, nothing to wait for
            host, done = rows, None
        self._sample_queue.append((done, host, slots_cpu))
        self.drain_sample(wait=False)

    def drain_sample(self, wait: bool = True) -> None:
        """Write arrived rows into the host sample, oldest first (a later batch may overwrite a slot).
        ``wait=False`` stops at the first copy still in flight, unless too many are queued."""
        q = self._sample_queue
        while q:
            done, host, slots = q[0]
            if done is not None and not done.query():
                if not wait and len(q) <= self.max_sample_queue:
                    return
                done.synchronize()
            self.sample_delta.index_copy_(0, slots, host)
            q.pop(0)

    @staticmethod
    def _scalars(dd, cc, xx):
        """‖Δ‖, ‖Δ‖/‖a_clean‖ and cos(a_clean, a_corrupt) = (‖c‖² + ‖x‖² - ‖Δ‖²) / (2‖c‖‖x‖), with validity."""
        ok_c = (cc > 0).to(F64)
        ok_cx = ((cc > 0) & (xx > 0)).to(F64)
        rel = dd.sqrt() / cc.clamp_min(1e-300).sqrt()
        cos = ((cc + xx - dd) / (2 * (cc * xx).clamp_min(1e-300).sqrt())).clamp(-1, 1)
        return {"l2": (dd.sqrt(), torch.ones_like(dd)), "rel_l2": (rel, ok_c), "cos": (cos, ok_cx)}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Call :meth:`flush` first."""
        self.drain_sample()
        s = self.g.suffix
        out = {f"{s}/feat": self.feat, f"{s}/shift": self.shift, f"{s}/shift_set": self.shift_set}
        out.update(self.scalars.state_dict(f"{s}/scalars/"))
        if self.heads is not None:
            out.update(self.heads.state_dict(f"{s}/head_scalars/"))
        out[f"{s}/sample_delta"] = self.sample_delta
        for k, v in self.sample_scalars.items():
            out[f"{s}/sample_{k}"] = v
        return out

    def load_state_dict(self, d: dict[str, torch.Tensor]) -> None:
        s = self.g.suffix
        dev = self.sample_delta.device
        self.feat = d[f"{s}/feat"].to(dev, F64).clone()
        self.stage = self.feat if self.wd == F64 else torch.zeros_like(self.feat, dtype=self.wd)
        self.shift = d[f"{s}/shift"].to(dev, F64).clone()
        self._shift_w = self.shift.to(self.wd)
        self._sync_shift()
        self.shift_set = d[f"{s}/shift_set"].to("cpu", torch.bool).clone()
        self.scalars = PowerSums.from_state_dict(d, f"{s}/scalars/", dev)
        if self.heads is not None:
            self.heads = PowerSums.from_state_dict(d, f"{s}/head_scalars/", dev)
        self._sample_queue = []
        self.sample_delta = d[f"{s}/sample_delta"].to(dev).clone()
        for k in self.sample_scalars:
            self.sample_scalars[k] = d[f"{s}/sample_{k}"].to(dev).clone()


@contextlib.contextmanager
def exact_fp32_matmul():
    """Full-precision float32 matrix products inside (TF32 would round the staged sums to ~1e-3)."""
    old = torch.get_float32_matmul_precision()
    if old != "highest":
        torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        if old != "highest":
            torch.set_float32_matmul_precision(old)


class DiffAccumulator:
    """The whole streaming state: one :class:`_GroupAcc` per hook group, counts, the pair sample, pair rows."""

    def __init__(self, cfg: DiffConfig, groups: list[HookGroup], device, sample_dtype=torch.float16,
                 n_pairs: int | None = None, host_sample: bool | None = None):
        self.cfg = cfg
        self.groups = groups
        self.device = torch.device(device)
        self.C = max(1, len(cfg.categories))
        self.O = len(cfg.offsets)
        # A sample slot per pair at most: with fewer pairs than sample_size every pair is kept
        # anyway, and a full-size buffer would cost memory, checkpoint and transfer time for nothing.
        S = min(cfg.sample_size, n_pairs) if n_pairs else cfg.sample_size
        self.cat_index = {c: i for i, c in enumerate(cfg.categories)}
        # The pair sample in host memory on a GPU (see _GroupAcc); host_sample=True forces it (tests).
        self.host_sample = self.device.type == "cuda" if host_sample is None else bool(host_sample)
        self.acc = {g.suffix: _GroupAcc(g, self.C, self.O, S, self.device, sample_dtype, self.host_sample)
                    for g in groups}
        shared: dict = {}
        for a in self.acc.values():
            a.shared_buffers = shared
        self.count = torch.zeros((self.C, self.O), dtype=F64, device=self.device)
        self.sample = BottomK.empty(S)
        self.sample_valid = torch.zeros((S, self.O), dtype=torch.bool, device=self.device)
        self.sample_cat = torch.full((S,), -1, dtype=torch.long, device=self.device)
        self.sample_ids: list[str | None] = [None] * S
        self.rows: list[dict] = []
        self.done: set[str] = set()
        self.model_entry: dict = {}
        self.flush_every = 8
        self.flush_pairs = 256
        self._since_flush = 0
        self._pairs_since_flush = 0
        self._pending: list[tuple[list[AlignedPair], dict[str, torch.Tensor], set[int]]] = []

    def flush(self) -> None:
        """Staged sums into the float64 totals (shifts re-centred). No host sync."""
        for a in self.acc.values():
            a.flush(self.count)
        self._since_flush = 0
        self._pairs_since_flush = 0

    def convert_pending(self) -> None:
        """Pending pair metrics (device tensors) into rows: one host transfer for many batches."""
        if self._pending:
            rows = metric_rows([(ps, m) for ps, m, _ in self._pending], self.cfg.offsets)
            flags = [i in ins for ps, _, ins in self._pending for i in range(len(ps))]
            pairs = [a for ps, _, _ in self._pending for a in ps]
            for a, r, f in zip(pairs, rows, flags):
                self.rows.append({**pair_info(a), **r, "in_sample": f})
            self._pending = []

    def category_index(self, a: AlignedPair) -> int:
        if not self.cfg.categories:
            return 0
        return self.cat_index[self.cfg.category_of(a.category)]

    def update(self, pairs: Sequence[AlignedPair], acts: dict[str, torch.Tensor], ix_valid: torch.Tensor,
               rows: list[dict] | dict[str, torch.Tensor], valid_cpu: torch.Tensor | None = None) -> None:
        with exact_fp32_matmul():
            self._update(pairs, acts, ix_valid, rows, valid_cpu)

    def _update(self, pairs, acts, ix_valid, rows, valid_cpu) -> None:
        """Add one batch: gathered activations ``[2B, O, L, *rest]`` per hook group, validity ``[B, O]``
        (on the device; ``valid_cpu``: the same on the CPU, to spare a device sync), and the pairs'
        metrics: :func:`pair_metric_tensors` (kept on the device until the next flush) or finished rows."""
        B = len(pairs)
        cat_cpu = torch.tensor([self.category_index(a) for a in pairs], dtype=torch.long)
        cat = cat_cpu.to(self.device, non_blocking=True)
        valid_cpu = ix_valid.cpu() if valid_cpu is None else valid_cpu
        seen = (group_onehot(cat_cpu, self.C) @ valid_cpu.to(F64)).T > 0  # [O, C]
        first = next(iter(self.acc.values())).shift_set if self.acc else torch.zeros_like(seen)
        new_shift = [(int(o), int(c)) for o, c in torch.nonzero(seen & ~first).tolist()]
        vf = ix_valid.to(F64)  # [B, O]
        W = group_onehot(cat, self.C)  # [C, B]
        Wo64 = W[None] * vf.T[:, None, :]  # [O, C, B]
        self.count += Wo64.sum(-1).T
        m3 = vf[:, :, None]
        keys = [item_key(self.cfg.seed, a.id) for a in pairs]
        slots_l, items_l = self.sample.offer(keys)
        slots = items = slots_cpu = None
        if slots_l:
            slots_cpu = torch.tensor(slots_l, dtype=torch.long)
            slots = slots_cpu.to(self.device, non_blocking=True)
            items = torch.tensor(items_l, dtype=torch.long, device=self.device)
            self.sample_valid.index_copy_(0, slots, ix_valid.index_select(0, items))
            self.sample_cat.index_copy_(0, slots, cat.index_select(0, items))
            for s_, i in zip(slots_l, items_l):
                self.sample_ids[s_] = pairs[i].id
        Wo_w = {}
        for g in self.groups:
            X = acts.pop(g.suffix)  # dropped as soon as it is reduced
            if X.shape[0] != 2 * B:
                raise RuntimeError(f"{g.suffix}: {X.shape[0]} rows for {B} pairs")
            a = self.acc[g.suffix]
            if a.wd not in Wo_w:
                Wo_w[a.wd] = Wo64.to(a.wd)
            a.update(X, cat, W, Wo_w[a.wd], m3, new_shift, slots, items, slots_cpu)
        in_sample = set(items_l)
        if isinstance(rows, dict):
            self._pending.append((list(pairs), rows, in_sample))
        else:
            for i, (a, r) in enumerate(zip(pairs, rows)):
                self.rows.append({**pair_info(a), **r, "in_sample": i in in_sample})
        self.done.update(a.id for a in pairs)
        self._since_flush += 1
        self._pairs_since_flush += B
        # float32 staging sums hold at most ~flush_pairs terms before they go into float64
        if self._since_flush >= self.flush_every or self._pairs_since_flush >= self.flush_pairs:
            self.flush()
        if sum(len(ps) for ps, _, _ in self._pending) >= 4096:
            self.convert_pending()

    # -- checkpoint state
    def state_dict(self) -> dict[str, torch.Tensor]:
        self.flush()
        out = {"count": self.count, "sample/keys": self.sample.keys, "sample/valid": self.sample_valid,
               "sample/category": self.sample_cat}
        empty = ~torch.isfinite(self.sample.keys)
        for a in self.acc.values():
            out.update(a.state_dict())
            if a.host_sample and bool(empty.any()):  # host samples start uninitialised
                a.sample_delta[empty] = 0
        return out

    def meta(self, complete: bool) -> dict:
        self.convert_pending()
        # Rows of pairs that left the sample keep in_sample=True from when they entered; fix that here.
        ids = set(i for i in self.sample_ids if i is not None)
        for r in self.rows:
            r["in_sample"] = r["id"] in ids
        return {"config": asdict(self.cfg), "groups": [g.to_dict() for g in self.groups],
                "done": sorted(self.done), "sample_ids": self.sample_ids, "rows": self.rows,
                "model": self.model_entry, "complete": complete, "format": 1}

    def load(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        self.count = tensors["count"].to(self.device, F64).clone()
        self.sample = BottomK.from_state_dict(tensors, "sample/")
        self.sample_valid = tensors["sample/valid"].to(self.device).clone()
        self.sample_cat = tensors["sample/category"].to(self.device).clone()
        for a in self.acc.values():
            a.load_state_dict(tensors)
        self.sample_ids = list(meta["sample_ids"])
        self.rows = list(meta["rows"])
        self.done = set(meta["done"])

    def result(self, model_entry: dict | None = None, timing: dict | None = None, complete: bool = True) -> DiffResult:
        if model_entry:
            self.model_entry = model_entry
        # Tensors first made inside inference mode (a few shifts) are cloned into normal ones.
        t = {k: (v.clone() if v.is_inference() else v).detach().cpu() for k, v in self.state_dict().items()}
        return DiffResult(self.meta(complete=complete), t, self.model_entry, timing or {})


# --------------------------------------------------------------------------- results


class DiffResult:
    """The statistics of a diff run, with DataFrame accessors.

    ``layers``, ``dims``, ``candidates``, ``contrasts``, ``heads``, ``pairs`` and
    ``summary`` are computed from the accumulated state on first access (see the
    module docstring for the definitions); :meth:`cell_stats` gives the arrays of one
    hook and category; :meth:`save` writes the run folder files, :meth:`load` reads them.
    """

    def __init__(self, meta: dict, tensors: dict[str, torch.Tensor], model: dict | None = None,
                 timing: dict | None = None):
        self.meta = meta
        self.tensors = tensors
        self.model = model or {}
        self.timing = timing or {}
        c = dict(meta["config"])
        self.config = DiffConfig(**c)
        self.groups = [HookGroup.from_dict(g) for g in meta["groups"]]
        self._cache: dict[Any, Any] = {}

    # ---- basic views
    @property
    def offsets(self) -> list[int]:
        return self.config.offsets

    @property
    def categories(self) -> list[str]:
        """``all`` first, then each category with its own statistics."""
        return ["all", *self.config.categories]

    @property
    def hooks(self) -> list[str]:
        return [g.suffix for g in self.groups]

    def group(self, hook: str) -> HookGroup:
        for g in self.groups:
            if g.suffix == hook:
                return g
        raise EclensError(f"hook {hook!r} is not in this run (hooks: {', '.join(self.hooks)})")

    @property
    def pairs(self) -> pd.DataFrame:
        if "pairs" not in self._cache:
            df = pd.DataFrame(self.meta["rows"])
            if not df.empty:
                ids = set(i for i in self.meta["sample_ids"] if i is not None)
                df["in_sample"] = df["id"].isin(ids)
            self._cache["pairs"] = df
        return self._cache["pairs"]

    @property
    def n_pairs(self) -> int:
        return len(self.meta["rows"])

    def _cat_rows(self, category: str) -> int | None:
        """Index of the category's state row; None for ``all``."""
        if category == "all":
            return None
        try:
            return self.config.categories.index(category)
        except ValueError:
            raise EclensError(f"category {category!r} not in this run ({', '.join(self.categories)})") from None

    def _ps(self, key: str) -> PowerSums:
        return PowerSums.from_state_dict(self.tensors, key + "/")

    def _moments(self, key: str, category: str, feature: int) -> Moments:
        """Moments of one per-pair scalar (cell ``(F, O, L[, H])``), as ``[L, O(, H)]``."""
        ck = ("scalar_moments", key)
        if ck not in self._cache:
            self._cache[ck] = self._ps(key).moments()
        mom = self._cache[ck]
        r = self._cat_rows(category)
        m = mom.reduce(0) if r is None else Moments(mom.count[r], mom.mean[r], mom.m2[r])
        m = Moments(m.count[feature], m.mean[feature], m.m2[feature])
        return Moments(*(t.transpose(0, 1) for t in (m.count, m.mean, m.m2)))

    def _feat(self, hook: str, category: str) -> torch.Tensor:
        """Feature sums ``[O, F, L, D]`` of one category (or all)."""
        f = self.tensors[f"{hook}/feat"]
        r = self._cat_rows(category)
        return f.sum(1) if r is None else f[:, r]

    def _feat_moments(self, hook: str, category: str, which: int) -> Moments:
        """Moments of Δ (``which=0``) or of the clean activation (``which=1``), arrays ``[L, O, D]``."""
        key = ("feat_moments", hook, which)
        if key not in self._cache:
            f = self.tensors[f"{hook}/feat"]  # [O, C, F, L, D]
            K = self.tensors[f"{hook}/shift"][which].to(F64)  # [O, C, L, D]: each category has its own shift
            n = self.tensors["count"].T[:, :, None, None]  # [O, C, 1, 1]
            nn = n.clamp_min(1)
            s1, s2 = f[:, :, 2 * which], f[:, :, 2 * which + 1]
            self._cache[key] = Moments(n, K + s1 / nn, (s2 - s1 * s1 / nn).clamp_min(0))
        mom = self._cache[key]
        n = mom.count
        r = self._cat_rows(category)
        m = mom.reduce(1) if r is None else Moments(n[:, r], mom.mean[:, r], mom.m2[:, r])
        return Moments(m.count.transpose(0, 1), m.mean.transpose(0, 1), m.m2.transpose(0, 1))

    def _feat_sum(self, hook: str, category: str, name: str) -> torch.Tensor:
        return self._feat(hook, category)[:, FEATURES.index(name)].transpose(0, 1)

    def counts(self, category: str = "all") -> torch.Tensor:
        """Pairs per offset ``[O]``."""
        c = self.tensors["count"]
        r = self._cat_rows(category)
        return c.sum(0) if r is None else c[r]

    def _sample_members(self, category: str) -> torch.Tensor:
        cat = self.tensors["sample/category"]
        keys = self.tensors["sample/keys"]
        ok = torch.isfinite(keys) & (cat >= 0)
        r = self._cat_rows(category)
        if r is not None:
            ok &= cat == r
        return torch.nonzero(ok).flatten()

    def cell_stats(self, hook: str, category: str = "all") -> dict[str, torch.Tensor]:
        """Arrays ``[L, O, D]`` (``[L, O]`` for per-layer values) of one hook and category."""
        key = (hook, category)
        if key in self._cache:
            return self._cache[key]
        g = self.group(hook)
        cfg = self.config
        dm = self._feat_moments(hook, category, 0)
        cm_all = self._feat_moments(hook, "all", 1)
        cm = cm_all if category == "all" else self._feat_moments(hook, category, 1)
        n = self.counts(category)  # [O]
        n3 = n[None, :, None]
        nn = n3.clamp_min(1)
        sigma = cm_all.std  # normaliser: the whole dataset's clean spread
        nan = torch.tensor(float("nan"), dtype=F64)
        with np.errstate(all="ignore"):
            sig_ok = sigma > 0
            inv = torch.where(sig_ok, 1 / sigma.clamp_min(1e-300), nan)
        out: dict[str, torch.Tensor] = {"n": n}
        out["mean_delta"] = torch.where(n3 > 0, dm.mean, nan)
        out["std_delta"] = dm.std
        out["mean_abs_delta"] = torch.where(n3 > 0, self._feat_sum(hook, category, "delta_abs") / nn, nan)
        out["mean_clean"] = torch.where(n3 > 0, cm.mean, nan)
        out["sigma_clean"] = sigma
        # Root mean square of the clean activation (the massive-activation criterion): from the moments.
        n_all = self.counts("all")[None, :, None]
        rms_all = (cm_all.m2 / n_all.clamp_min(1) + cm_all.mean ** 2).sqrt()
        out["rms_clean"] = torch.where(n3 > 0, (cm.m2 / nn + cm.mean ** 2).sqrt(), nan)
        out["z_mean"] = out["mean_delta"] * inv
        out["absz_mean"] = out["mean_abs_delta"] * inv
        ss = self._feat_sum(hook, category, "delta_sign")
        nz = self._feat_sum(hook, category, "delta_nonzero")
        out["frac_pos"] = torch.where(n3 > 0, (nz + ss) / 2 / nn, nan)
        out["frac_neg"] = torch.where(n3 > 0, (nz - ss) / 2 / nn, nan)
        out["sign_consistency"] = torch.maximum(out["frac_pos"], out["frac_neg"])
        med = rms_all.median(dim=-1, keepdim=True).values
        out["rms_ratio"] = torch.where(n_all > 0, rms_all / med.clamp_min(1e-30), nan)
        out["massive"] = (out["rms_ratio"] > cfg.massive_ratio) & (n_all > 0)
        # Sample-based: quantiles of |Δ|/σ, fraction under the threshold, leave-one-out cosines.
        mem = self._sample_members(category)
        sd = self.tensors[f"{hook}/sample_delta"].index_select(0, mem).to(F64).permute(0, 2, 1, 3)  # [s, L, O, D]
        sv = self.tensors["sample/valid"].index_select(0, mem)  # [s, O]
        valid4 = sv[:, None, :, None]
        out["n_sample"] = sv.sum(0).to(F64)  # [O]
        z = sd.abs() * inv
        qs = masked_quantiles(z, valid4 & ~torch.isnan(z), QUANTILES)
        for q, v in zip(QUANTILES, qs):
            out["absz_median" if q == 0.5 else f"absz_q{int(round(q * 100)):02d}"] = v
        under = ((z < cfg.threshold) & valid4).to(F64).sum(0)
        ns = sv.sum(0).to(F64)[None, :, None]
        out["frac_under"] = torch.where((ns > 0) & sig_ok, under / ns.clamp_min(1), nan)
        out["reachable"] = (nz.sum(-1) > 0)  # [L, O]
        # Per-layer exact scalars.
        for k in SCALARS:
            mom = self._moments(f"{hook}/scalars", category, SCALARS.index(k))
            out[f"{k}_mean"] = torch.where(mom.count > 0, mom.mean, nan)
            out[f"{k}_std"] = mom.std
        mean = out["mean_delta"]
        e_sq = (dm.m2 / nn + dm.mean ** 2).sum(-1)  # mean ||Δ||^2 over pairs
        out["dir_norm"] = torch.where(n[None] > 0, (mean ** 2).sum(-1).sqrt(), nan)
        out["dir_consistency"] = torch.where(e_sq > 0, (mean ** 2).sum(-1) / e_sq.clamp_min(1e-300), nan)
        # Leave-one-out cosine of each sampled pair with the exact sum of the others.
        S = dm.mean * n3  # [L, O, D] sum of Δ over the category's pairs
        dot = (sd * S).sum(-1)  # [s, L, O]
        dd = (sd * sd).sum(-1)
        ss2 = (S * S).sum(-1)
        rest2 = (ss2 - 2 * dot + dd).clamp_min(0)
        loo = (dot - dd) / (dd.sqrt() * rest2.sqrt()).clamp_min(1e-300)
        # Where the others' sum is tiny next to this pair's Δ the cosine is float16 rounding noise: skip it.
        lv = sv[:, None, :] & (dd > 0) & (rest2 > 1e-4 * dd) & (n[None, None] > 1)
        lq = masked_quantiles(loo, lv, (0.1, 0.5, 0.9))
        cnt = lv.sum(0).to(F64)
        out["loo_cos_mean"] = torch.where(cnt > 0, torch.where(lv, loo, 0).sum(0) / cnt.clamp_min(1), nan)
        out["loo_cos_q10"], out["loo_cos_median"], out["loo_cos_q90"] = lq
        rl = self.tensors[f"{hook}/sample_rel_l2"].index_select(0, mem).to(F64).transpose(1, 2)
        out["rel_l2_median"] = masked_quantiles(rl, sv[:, None, :] & torch.isfinite(rl), (0.5,))[0]
        if g.n_heads:
            for k in ("rel_l2", "cos"):
                mom = self._moments(f"{hook}/head_scalars", category, HEAD_SCALARS.index(k))
                out[f"head_{k}_mean"] = torch.where(mom.count > 0, mom.mean, nan)
                out[f"head_{k}_std"] = mom.std
        self._cache[key] = out
        return out

    # ---- tables
    def _dim_frame(self, hook: str, category: str, offsets: Sequence[int] | None = None) -> pd.DataFrame:
        g = self.group(hook)
        st = self.cell_stats(hook, category)
        offs = self.offsets
        oi = list(range(len(offs))) if offsets is None else [offs.index(o) for o in offsets]
        L, D = len(g.layers), g.width
        cols = ["mean_delta", "std_delta", "mean_abs_delta", "mean_clean", "sigma_clean", "rms_clean", "rms_ratio",
                "z_mean",
                "absz_mean", "frac_pos", "frac_neg", "sign_consistency", "absz_median", "absz_q10", "absz_q25",
                "absz_q75", "absz_q90", "frac_under"]
        frames = []
        dims = np.arange(D)
        head = np.array([_head_of(g, int(d)) for d in dims]) if g.kind in ("head", "head_dim") else np.full(D, -1)
        for o in oi:
            data = {"category": category, "hook": hook,
                    "layer": np.repeat(np.array(g.layers), D), "offset": offs[o],
                    "position_kind": position_kind(offs[o]), "dim": np.tile(dims, L), "unit": g.kind,
                    "head": np.tile(head, L),
                    "n": int(st["n"][o]), "n_sample": int(st["n_sample"][o])}
            for c in cols:
                data[c] = st[c][:, o, :].reshape(-1).numpy()
            data["massive"] = st["massive"][:, o, :].reshape(-1).numpy()
            frames.append(pd.DataFrame(data))
        return pd.concat(frames, ignore_index=True)

    def dims_for(self, category: str = "all", offset: int | None = None, hook: str | None = None) -> pd.DataFrame:
        """One row per (hook, layer, offset, dim) for ``category`` (one offset or all)."""
        hooks = [hook] if hook else self.hooks
        offs = None if offset is None else [offset]
        return pd.concat([self._dim_frame(h, category, offs) for h in hooks], ignore_index=True)

    @property
    def dims(self) -> pd.DataFrame:
        """``all`` at every offset, and each category at offset 0 (what ``dims.parquet`` holds)."""
        if "dims" not in self._cache:
            parts = [self.dims_for("all")]
            parts += [self.dims_for(c, 0) for c in self.config.categories]
            self._cache["dims"] = pd.concat(parts, ignore_index=True)
        return self._cache["dims"]

    @property
    def layers(self) -> pd.DataFrame:
        if "layers" not in self._cache:
            rows = []
            for cat in self.categories:
                for h in self.hooks:
                    g = self.group(h)
                    st = self.cell_stats(h, cat)
                    mass = st["massive"]
                    cand = self._candidate_masks(h, cat)
                    for li, layer in enumerate(g.layers):
                        for oi, off in enumerate(self.offsets):
                            keep = ~mass[li, oi]
                            r = {"category": cat, "hook": h, "layer": layer, "offset": off,
                                 "position_kind": position_kind(off), "n": int(st["n"][oi]),
                                 "n_sample": int(st["n_sample"][oi]), "reachable": bool(st["reachable"][li, oi])}
                            for k in ("rel_l2_mean", "rel_l2_std", "rel_l2_median", "cos_mean", "cos_std", "l2_mean",
                                      "l2_std", "dir_norm", "dir_consistency", "loo_cos_mean", "loo_cos_median",
                                      "loo_cos_q10", "loo_cos_q90"):
                                r[k] = float(st[k][li, oi])
                            for k, name in (("absz_mean", "absz_mean"), ("absz_median", "absz_median"),
                                            ("frac_under", "frac_under_mean"),
                                            ("sign_consistency", "sign_consistency_mean")):
                                v = st[k][li, oi][keep]
                                v = v[torch.isfinite(v)]
                                r[name] = float(v.mean()) if v.numel() else math.nan
                            r["n_massive"] = int(mass[li, oi].sum())
                            rr = st["rms_ratio"][li, oi]
                            ok = torch.isfinite(rr)
                            r["rms_ratio_max"] = float(rr[ok].max()) if ok.any() else math.nan
                            r["rms_ratio_dim"] = int(torch.where(ok, rr, -1).argmax()) if ok.any() else -1
                            r["n_stable"] = int(cand["stable"][li, oi].sum())
                            r["n_responsive"] = int(cand["responsive"][li, oi].sum())
                            rows.append(r)
            self._cache["layers"] = pd.DataFrame(rows)
        return self._cache["layers"]

    @property
    def heads(self) -> pd.DataFrame:
        """Per-head relative L2 and cosine for per-head hooks (``attn.hook_q/k/v/z``); empty otherwise."""
        if "heads" not in self._cache:
            rows = []
            for cat in self.categories:
                for g in self.groups:
                    if not g.n_heads:
                        continue
                    st = self.cell_stats(g.suffix, cat)
                    for li, layer in enumerate(g.layers):
                        for oi, off in enumerate(self.offsets):
                            for h in range(g.n_heads):
                                rows.append({"category": cat, "hook": g.suffix, "layer": layer, "offset": off,
                                             "position_kind": position_kind(off), "head": h, "n": int(st["n"][oi]),
                                             "rel_l2_mean": float(st["head_rel_l2_mean"][li, oi, h]),
                                             "rel_l2_std": float(st["head_rel_l2_std"][li, oi, h]),
                                             "cos_mean": float(st["head_cos_mean"][li, oi, h]),
                                             "cos_std": float(st["head_cos_std"][li, oi, h])})
            self._cache["heads"] = pd.DataFrame(rows)
        return self._cache["heads"]

    def _candidate_masks(self, hook: str, category: str) -> dict[str, torch.Tensor]:
        key = ("cand", hook, category)
        if key in self._cache:
            return self._cache[key]
        cfg = self.config
        st = self.cell_stats(hook, category)
        enough = ((st["n"] >= cfg.min_pairs) & (st["n_sample"] >= cfg.min_pairs))[None, :, None]
        base = enough & (st["sigma_clean"] > 0) & ~st["massive"] & st["reachable"][..., None]
        stable = base & (st["frac_under"] >= cfg.stable_frac)
        resp = base & (st["absz_median"] >= cfg.responsive_z) & (st["sign_consistency"] >= cfg.responsive_sign)
        out = {"stable": stable, "responsive": resp}
        self._cache[key] = out
        return out

    @property
    def candidates(self) -> pd.DataFrame:
        """Stable and responsive dimensions (rule in the module docstring), ranked per (category, hook, layer, offset)."""
        if "candidates" in self._cache:
            return self._cache["candidates"]
        cfg = self.config
        rows = []
        cols = ("n", "n_sample", "absz_median", "absz_q10", "absz_q90", "frac_under", "sign_consistency", "absz_mean",
                "mean_delta", "mean_abs_delta", "sigma_clean", "frac_pos", "frac_neg")
        for cat in self.categories:
            for h in self.hooks:
                g = self.group(h)
                st = self.cell_stats(h, cat)
                masks = self._candidate_masks(h, cat)
                for kind, score, asc in (("stable", "absz_q90", True), ("responsive", "absz_median", False)):
                    m = masks[kind]
                    for li, oi in zip(*np.nonzero(m.any(-1).numpy())):
                        dims = torch.nonzero(m[li, oi]).flatten()
                        sc = st[score][li, oi, dims]
                        order = torch.argsort(sc if asc else -sc, stable=True)[: cfg.max_candidates]
                        for rank, j in enumerate(order.tolist(), start=1):
                            d = int(dims[j])
                            off = self.offsets[oi]
                            r = {"category": cat, "hook": h, "layer": g.layers[li], "offset": off,
                                 "position_kind": position_kind(off), "dim": d, "unit": g.kind,
                                 "head": _head_of(g, d), "kind": kind, "rank": rank,
                                 "n_passing": int(len(dims))}
                            for c in cols:
                                v = st[c]
                                r[c] = float(v[oi]) if v.ndim == 1 else float(v[li, oi, d])
                            rows.append(r)
        df = pd.DataFrame(rows)
        if not df.empty:
            df["n"] = df["n"].astype(int)
            df["n_sample"] = df["n_sample"].astype(int)
        self._cache["candidates"] = df
        return df

    @property
    def contrasts(self) -> pd.DataFrame:
        """Per-dimension Mann–Whitney U tests between category groups with BH q-values (every test)."""
        if "contrasts" not in self._cache:
            self._cache["contrasts"] = self._compute_contrasts()
        return self._cache["contrasts"]

    def _compute_contrasts(self) -> pd.DataFrame:
        from scipy.stats import mannwhitneyu

        cfg = self.config
        cols = ["contrast", "group_a", "group_b", "measure", "hook", "layer", "offset", "dim", "unit", "head", "n_a",
                "n_b", "median_a", "median_b", "effect", "u", "p", "q", "significant"]
        if not cfg.categories:
            return pd.DataFrame(columns=cols)
        cat = self.tensors["sample/category"]
        keys = self.tensors["sample/keys"]
        ok = torch.isfinite(keys) & (cat >= 0)
        group_of = [c.split("/", 1)[0] for c in cfg.categories]
        names = sorted(set(group_of))
        gidx = torch.tensor([names.index(x) for x in group_of] + [-1], dtype=torch.long)
        sgroup = torch.where(ok, gidx[cat.clamp_min(0)], torch.full_like(cat, -1))
        frames = []
        for off in cfg.contrast_offsets:
            if off not in self.offsets:
                continue
            oi = self.offsets.index(off)
            valid = self.tensors["sample/valid"][:, oi] & (sgroup >= 0)
            for ia in range(len(names)):
                for ib in range(ia + 1, len(names)):
                    ma = torch.nonzero(valid & (sgroup == ia)).flatten()
                    mb = torch.nonzero(valid & (sgroup == ib)).flatten()
                    if len(ma) < cfg.min_group or len(mb) < cfg.min_group:
                        continue
                    for g in self.groups:
                        sigma = self.cell_stats(g.suffix, "all")["sigma_clean"][:, oi, :]  # [L, D]
                        inv = torch.where(sigma > 0, 1 / sigma.clamp_min(1e-300), torch.tensor(float("nan"),
                                                                                             dtype=F64))
                        sd = self.tensors[f"{g.suffix}/sample_delta"][:, oi].to(F64) * inv  # [S, L, D]
                        for measure in ("abs", "signed"):
                            x = sd.abs() if measure == "abs" else sd
                            xa = x.index_select(0, ma).reshape(len(ma), -1).numpy()
                            xb = x.index_select(0, mb).reshape(len(mb), -1).numpy()
                            good = np.isfinite(xa).all(0) & np.isfinite(xb).all(0)
                            u = np.full(xa.shape[1], np.nan)
                            p = np.full(xa.shape[1], np.nan)
                            if good.any():
                                with np.errstate(all="ignore"):
                                    res = mannwhitneyu(xa[:, good], xb[:, good], alternative="two-sided", axis=0)
                                u[good], p[good] = res.statistic, res.pvalue
                            L, D = len(g.layers), g.width
                            dims = np.tile(np.arange(D), L)
                            frames.append(pd.DataFrame({
                                "contrast": f"{names[ia]} vs {names[ib]}", "group_a": names[ia], "group_b": names[ib],
                                "measure": measure, "hook": g.suffix, "layer": np.repeat(np.array(g.layers), D),
                                "offset": off, "dim": dims, "unit": g.kind,
                                "head": [_head_of(g, int(d)) for d in dims] if g.kind in ("head", "head_dim") else -1,
                                "n_a": len(ma), "n_b": len(mb), "median_a": np.median(xa, 0),
                                "median_b": np.median(xb, 0),
                                # rank-biserial correlation: P(a > b) - P(a < b)
                                "effect": 2 * u / (len(ma) * len(mb)) - 1, "u": u, "p": p}))
        if not frames:
            return pd.DataFrame(columns=cols)
        df = pd.concat(frames, ignore_index=True)
        df["q"] = np.nan
        for _measure, idx in df.groupby("measure").groups.items():
            df.loc[idx, "q"] = bh_qvalues(df.loc[idx, "p"].to_numpy())
        df["significant"] = df["q"] <= cfg.alpha
        return df[cols]

    @property
    def summary(self) -> dict:
        if "summary" in self._cache:
            return self._cache["summary"]
        cfg = self.config
        pairs = self.pairs
        cand = self.candidates
        layers = self.layers
        s: dict[str, Any] = {
            "n_pairs": self.n_pairs,
            "categories": {c: int(v) for c, v in pairs["category"].value_counts().sort_index().items()}
            if not pairs.empty else {},
            "hooks": self.hooks,
            "n_hook_points": sum(len(g.names) for g in self.groups),
            "offsets": self.offsets,
            "sample_size": cfg.sample_size,
            "n_sample": int(torch.isfinite(self.tensors["sample/keys"]).sum()),
            "threshold": cfg.threshold,
            "rule": {"stable": f"frac(|Δ|/σ < {cfg.threshold}) >= {cfg.stable_frac}",
                     "responsive": f"median |Δ|/σ >= {cfg.responsive_z} and sign consistency >= "
                                   f"{cfg.responsive_sign}",
                     "min_pairs": cfg.min_pairs, "massive_ratio": cfg.massive_ratio, "excludes_massive": True},
        }
        if not cand.empty:
            c = cand[cand["category"] == "all"]
            s["n_candidates"] = {k: int((c["kind"] == k).sum()) for k in ("stable", "responsive")}
            s["n_candidates_by_category"] = {
                cat: {k: int(((cand["category"] == cat) & (cand["kind"] == k)).sum()) for k in ("stable", "responsive")}
                for cat in self.categories}
        else:
            s["n_candidates"] = {"stable": 0, "responsive": 0}
        if not pairs.empty:
            for col in ("logprob_diff", "token_logprob_diff", "kl_0", "kl_mean"):
                if col in pairs:
                    s[f"mean_{col}"] = float(pd.to_numeric(pairs[col], errors="coerce").mean())
        la = layers[(layers["category"] == "all") & (layers["offset"] == 0)]
        top = {}
        for h, d in la.groupby("hook"):
            d = d.dropna(subset=["rel_l2_mean"])
            if not d.empty:
                r = d.loc[d["rel_l2_mean"].idxmax()]
                top[h] = {"layer": int(r["layer"]), "rel_l2_mean": float(r["rel_l2_mean"])}
        s["max_rel_l2_at_p"] = top
        massive = {}
        for g in self.groups:
            st = self.cell_stats(g.suffix, "all")
            m = st["massive"]
            if bool(m.any()):
                massive[g.suffix] = sorted({int(d) for d in torch.nonzero(m)[:, 2].tolist()})
        s["massive_dims"] = massive
        con = self.contrasts
        s["contrasts"] = {
            "n_tests": {k: int(v) for k, v in con.dropna(subset=["p"]).groupby("measure").size().items()},
            "n_significant": {k: int(v) for k, v in con[con["significant"] == True]  # noqa: E712
                              .groupby("measure").size().items()},
            "alpha": cfg.alpha,
        }
        s["timing"] = self.timing
        self._cache["summary"] = s
        return s

    # ---- files
    def manifest_step(self, files: list[str], *, batch_size: int | None, seconds: float | None,
                      from_cache: str | None = None, **extra: Any) -> dict:
        """The manifest's ``steps.diff`` entry, the same from ``ec diff``, ``ec run`` and the study."""
        return {"hooks": self.config.hooks, "offsets": self.offsets, "categories": self.categories,
                "by_category": self.config.by_category, "sample_size": self.config.sample_size,
                "seed": self.config.seed, "rule": self.summary["rule"], **extra, "batch_size": batch_size,
                "from_cache": from_cache, "n_pairs": self.n_pairs, "timing": self.timing, "seconds": seconds,
                "outputs": files}

    def save(self, run: str | Path, *, stats: bool = True) -> list[str]:
        """Write every output of the diff step into ``run`` (atomically); returns the file names."""
        from .runs import save_tensors, write_json, write_table

        run = Path(run)
        files = []
        if stats:
            save_stats(run, self.tensors, self.meta)
            files.append(STATS_FILE)
        write_table(self.layers, run / "layers.csv")
        write_table(self.dims, run / "dims.parquet")
        write_table(self.candidates, run / "candidates.csv")
        con = self.contrasts
        write_table(con, run / "contrasts.parquet")
        write_table(_contrasts_csv(con), run / "contrasts.csv")
        write_table(self.pairs, run / "pairs.csv")
        files += ["layers.csv", "dims.parquet", "candidates.csv", "contrasts.parquet", "contrasts.csv", "pairs.csv"]
        if any(g.n_heads for g in self.groups):
            write_table(self.heads, run / "heads.csv")
            files.append("heads.csv")
        mean_dirs = {}
        for g in self.groups:
            mean_dirs[f"{g.suffix}/mean_delta"] = self.cell_stats(g.suffix, "all")["mean_delta"].float()
            mean_dirs[f"{g.suffix}/sigma_clean"] = self.cell_stats(g.suffix, "all")["sigma_clean"].float()
        save_tensors(mean_dirs, run / "diff_directions.safetensors",
                     metadata={"layers": json.dumps({g.suffix: g.layers for g in self.groups}),
                               "offsets": json.dumps(self.offsets)})
        files.append("diff_directions.safetensors")
        write_json(run / "summary.json", self.summary)
        files.append("summary.json")
        return files

    @classmethod
    def load(cls, run: str | Path) -> DiffResult:
        """Read a run's ``diff_stats.safetensors``; tables are recomputed from it on access."""
        run = Path(run)
        tensors, meta = load_stats(run)
        if not meta.get("complete"):
            raise EclensError(f"{run / STATS_FILE}: the diff run is not complete; rerun `ec diff` to resume it")
        from .runs import read_manifest

        man = read_manifest(run)
        step = (man.get("steps") or {}).get("diff") or {}
        # Tables are recomputed lazily from the statistics (deterministic; the files are for other tools).
        res = cls(meta, tensors, man.get("model") or {}, step.get("timing") or {})
        return res


def _head_of(g: HookGroup, d: int) -> int:
    if g.kind == "head_dim":
        return d // int(np.prod(g.rest[1:]))
    if g.kind == "head":
        return d
    return -1


def _contrasts_csv(con: pd.DataFrame, per_contrast: int = 200) -> pd.DataFrame:
    """Significant tests plus the ``per_contrast`` smallest p-values of each contrast and measure."""
    if con.empty:
        return con
    n_tests = con.dropna(subset=["p"]).groupby("measure").size()
    df = con.dropna(subset=["p"]).sort_values("p", kind="stable")
    top = df.groupby(["contrast", "measure"], sort=False).head(per_contrast)
    keep = pd.concat([df[df["significant"]], top]).drop_duplicates().sort_values(["measure", "q", "p"], kind="stable")
    keep = keep.copy()
    keep["n_tests"] = keep["measure"].map(n_tests).astype(int)
    return keep


# --------------------------------------------------------------------------- stats file


def save_stats(run: Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    from .runs import save_tensors

    save_tensors(tensors, Path(run) / STATS_FILE, metadata={META_KEY: json.dumps(meta, default=_json_default)})


def _json_default(o):
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(type(o).__name__)


def load_stats(run: str | Path, device="cpu") -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors import safe_open

    path = Path(run) / STATS_FILE
    if not path.exists():
        raise EclensError(f"{path}: no diff statistics here; run `ec diff` first")
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            meta = json.loads((f.metadata() or {})[META_KEY])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (KeyError, json.JSONDecodeError, OSError, Exception) as e:  # noqa: BLE001 - any corruption
        raise EclensError(f"{path}: unreadable diff statistics ({type(e).__name__}); delete it and rerun `ec diff`") \
            from None
    return tensors, meta


# --------------------------------------------------------------------------- the streaming loop


class _Interrupt:
    """The first Ctrl-C stops the loop at the next batch boundary (after a checkpoint); the second aborts."""

    def __init__(self):
        self.requested = False
        self._old = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._old = signal.getsignal(signal.SIGINT)

            def handler(sig, frame):
                if self.requested:
                    raise KeyboardInterrupt
                self.requested = True

            signal.signal(signal.SIGINT, handler)
        return self

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
        return False


def resolve_categories(pairs: Sequence[AlignedPair], by_category: str | bool | Sequence[str]) -> tuple[str, list[str]]:
    """``(grouping, category labels)``; a list of labels fixes the rows (shards of one dataset must share them)."""
    if isinstance(by_category, (list, tuple)):
        labels = sorted(set(by_category))
        by = "top" if labels and all("/" not in c for c in labels) and any("/" in a.category for a in pairs) \
            else "full"
        key = (lambda c: c.split("/", 1)[0]) if by == "top" else (lambda c: c)
        missing = sorted({key(a.category) for a in pairs} - set(labels))
        if missing:
            raise EclensError(f"category {missing[0]!r} of the pairs is not among the given categories")
        return by, labels
    by = {True: "full", False: "none"}.get(by_category, by_category) if isinstance(by_category, bool) else by_category
    if by not in ("full", "top", "none"):
        raise EclensError(f"unknown category grouping {by_category!r}: use full, top or none")
    if by == "none":
        return by, []
    key = (lambda c: c.split("/", 1)[0]) if by == "top" else (lambda c: c)
    return by, sorted({key(a.category) for a in pairs})


def expand_hook_spec(spec: str | Sequence[str] | None) -> str | list[str] | None:
    """Allow ``default`` and ``all`` inside a comma-separated list (``default,mlp.hook_post``)."""
    if spec is None or spec in ("default", "all") or (not isinstance(spec, str) and not spec):
        return None if not spec else spec
    items = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    from .hooks import ALL_HOOKS

    out: list[str] = []
    for it in items:
        out.extend(DEFAULT_HOOKS if it == "default" else ALL_HOOKS if it == "all" else [it])
    return out


def progress_bar(enabled: bool, label: str = "diff"):
    """A rich progress bar on stderr (pairs/s, time left), or a null context when not ``enabled``."""
    if not enabled:
        return contextlib.nullcontext(None)
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        ProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.text import Text

    class Rate(ProgressColumn):
        def render(self, task):
            sp = task.finished_speed or task.speed
            return Text(f"{sp:.1f} pairs/s" if sp else "… pairs/s", style="progress.data.speed")

    from rich.console import Console

    prog = Progress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), Rate(), TimeElapsedColumn(),
                    TimeRemainingColumn(), console=Console(stderr=True), transient=False)
    return prog


# DiffConfig fields that run_diff takes as its own keywords; the rest are the candidate rule.
_SETUP_FIELDS = ("hooks", "max_offset", "include_last", "categories", "by_category", "sample_size", "seed")


def run_diff(
    model,
    aligned_pairs: Sequence[AlignedPair],
    hooks: str | Sequence[str] | None = None,
    max_offset: int = 3,
    batch_size: int = 16,
    categories: bool | str = True,
    *,
    include_last: bool = True,
    sample_size: int = 512,
    seed: int = 0,
    run: str | Path | None = None,
    checkpoint_every: int = 50,
    progress: bool = False,
    max_batches: int | None = None,
    config: DiffConfig | None = None,
    **rule: Any,
) -> DiffResult:
    """Stream the pairs through ``model`` and return the statistics (see the module docstring).

    ``categories``: ``True``/``"full"`` (each category), ``"top"`` (first path
    component), ``False``/``"none"`` (only ``all``), or the list of category labels
    (so that shards of one dataset, run separately, can be merged with :func:`merge_results`). ``run``: a folder to
    checkpoint into every ``checkpoint_every`` batches and to resume from (the
    caller writes the tables with :meth:`DiffResult.save`). ``max_batches`` stops
    after that many batches (leaving a resumable checkpoint); ``rule`` overrides the
    candidate-rule fields of :class:`DiffConfig` (``threshold``, ``stable_frac``, ...).
    ``config``: a :class:`DiffConfig` that gives all of these at once (then ``hooks``, ``max_offset``,
    ``categories``, ``include_last``, ``sample_size``, ``seed`` and ``rule`` are taken from it).
    """
    if config is not None:
        if set(rule) - {"sample_dtype", "host_sample"}:
            raise TypeError("run_diff(): give the candidate rule in config or as keywords, not both")
        hooks, max_offset, include_last = config.hooks, config.max_offset, config.include_last
        sample_size, seed = config.sample_size, config.seed
        categories = list(config.categories) or config.by_category
        rule = {**{f: getattr(config, f) for f in DiffConfig.__dataclass_fields__ if f not in _SETUP_FIELDS}, **rule}
    if not aligned_pairs:
        raise EclensError("no valid pairs to diff")
    # Span pairs need offsets taken from each side's own span end: not supported here yet.
    require_single(aligned_pairs, "ec diff")
    ids = [a.id for a in aligned_pairs]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise EclensError(f"duplicate pair id {dup!r}; give each pair its own id")
    names = select_hooks(model, expand_hook_spec(hooks))
    groups = hook_groups(model, names)
    by, cats = resolve_categories(aligned_pairs, categories)
    unknown = set(rule) - {f for f in DiffConfig.__dataclass_fields__} - {"sample_dtype", "host_sample"}
    if unknown:
        raise TypeError(f"run_diff() got unexpected keyword(s): {', '.join(sorted(unknown))}")
    sample_dtype = rule.pop("sample_dtype", torch.float16)
    host_sample = rule.pop("host_sample", None)
    cfg = DiffConfig(hooks=names, max_offset=max_offset, include_last=include_last, categories=cats, by_category=by,
                     sample_size=sample_size, seed=seed, **rule)
    if max_offset < 0:
        raise EclensError("--max-offset must be 0 or more")
    device = _device(model)
    from .model import manifest_model_entry

    acc = DiffAccumulator(cfg, groups, device, sample_dtype, n_pairs=len(aligned_pairs), host_sample=host_sample)
    acc.model_entry = manifest_model_entry(model)
    if run is not None and (Path(run) / STATS_FILE).exists():
        _resume(acc, Path(run), cfg, set(ids))
    todo = [a for a in aligned_pairs if a.id not in acc.done]
    t0 = time.perf_counter()
    n_done0 = len(acc.done)
    gat = _Gatherer(groups, device)
    pid = pad_id(model)
    n_batches = 0
    complete = not todo
    prog = progress_bar(progress and bool(todo))
    with prog as pr, _Interrupt() as intr, torch.inference_mode(), model.hooks(fwd_hooks=gat.hooks()):
        task = pr.add_task("diff", total=len(aligned_pairs), completed=n_done0) if pr is not None else None
        for batch in iter_batches(todo, batch_size, pid, device):
            ix = aligned_index([a.position for a in batch.pairs], [a.length for a in batch.pairs], cfg.offsets,
                               device, batch.tokens.shape[1])
            gat.index = ix
            logits = model(batch.tokens)
            acts = gat.collect()
            rows = pair_metric_tensors(logits, batch.tokens, [a.position for a in batch.pairs],
                                       [a.length for a in batch.pairs])
            del logits
            acc.update(batch.pairs, acts, ix.valid, rows, ix.valid_cpu)
            del acts
            n_batches += 1
            if task is not None:
                pr.update(task, advance=batch.size)
            finished = len(acc.done) == len(aligned_pairs)
            stop = intr.requested or (max_batches is not None and n_batches >= max_batches)
            if run is not None and not finished and (stop or n_batches % checkpoint_every == 0):
                save_stats(Path(run), {k: v for k, v in acc.state_dict().items()}, acc.meta(complete=False))
            if intr.requested:
                raise KeyboardInterrupt
            if stop:
                break
        complete = len(acc.done) == len(aligned_pairs)
    elapsed = time.perf_counter() - t0
    n_new = len(acc.done) - n_done0
    timing = {"seconds": round(elapsed, 3), "pairs": n_new, "pairs_per_second": round(n_new / elapsed, 3)
              if elapsed > 0 and n_new else None, "batch_size": batch_size, "resumed_from": n_done0}
    if not complete and run is not None:
        save_stats(Path(run), acc.state_dict(), acc.meta(complete=False))
    return acc.result(None, timing, complete=complete)


def _resume(acc: DiffAccumulator, run: Path, cfg: DiffConfig, ids: set[str]) -> None:
    tensors, meta = load_stats(run, acc.device)
    m, me = meta.get("model") or {}, acc.model_entry
    if m and (m.get("name") != me.get("name") or m.get("weights_hash") != me.get("weights_hash")):
        raise EclensError(f"{run / STATS_FILE}: made with model {m.get('name')!r} (weights "
                          f"{str(m.get('weights_hash'))[:12]}), not {me.get('name')!r}; use another --out folder")
    old = DiffConfig(**meta["config"])
    if old.numbers_key() != cfg.numbers_key():
        diff = [k for k, v in cfg.numbers_key().items() if old.numbers_key().get(k) != v]
        raise EclensError(f"{run / STATS_FILE}: made with other settings ({', '.join(diff)}); rerun with the same "
                          "options, or use another --out folder")
    extra = set(meta["done"]) - ids
    if extra:
        raise EclensError(f"{run / STATS_FILE}: holds {len(extra)} pair(s) not in this dataset (e.g. "
                          f"{sorted(extra)[0]!r}); use another --out folder")
    acc.load(tensors, meta)


def merge_results(a: DiffResult, b: DiffResult) -> DiffResult:
    """The statistics of the union of two runs on disjoint pairs (shards, processes, machines).

    Sums add; power sums with different shifts are merged through their moments
    (Chan et al.) and re-expressed about the merged mean; the two samples merge into
    the ``sample_size`` pairs with the smallest keys, exactly as one run would have kept.
    """
    if a.config.numbers_key() != b.config.numbers_key():
        raise EclensError("cannot merge diff results made with different settings")
    if set(a.meta["done"]) & set(b.meta["done"]):
        raise EclensError("cannot merge diff results that share pairs")
    if (a.model.get("weights_hash"), a.model.get("name")) != (b.model.get("weights_hash"), b.model.get("name")):
        raise EclensError("cannot merge diff results of different models")
    ta, tb = a.tensors, b.tensors
    out: dict[str, torch.Tensor] = {"count": ta["count"] + tb["count"]}
    nb = tb["count"].T[:, :, None, None]  # [O, C, 1, 1]
    for g in a.groups:
        s_ = g.suffix
        fa, fb = ta[f"{s_}/feat"], tb[f"{s_}/feat"].clone()
        Ka, Kb = ta[f"{s_}/shift"], tb[f"{s_}/shift"]
        seta, setb = ta[f"{s_}/shift_set"].bool(), tb[f"{s_}/shift_set"].bool()
        K = torch.where(seta[None, :, :, None, None], Ka, Kb)  # [2, O, C, L, D]
        for which in (0, 1):
            # Re-express b's power sums about the merged shift: exact algebra.
            dk = Kb[which] - K[which]  # [O, C, L, D]
            s1, s2 = fb[:, :, 2 * which], fb[:, :, 2 * which + 1]
            fb[:, :, 2 * which + 1] = s2 + 2 * dk * s1 + nb * dk * dk
            fb[:, :, 2 * which] = s1 + nb * dk
            dka = Ka[which] - K[which]  # zero where a had its own shift
            na = ta["count"].T[:, :, None, None]
            fa = fa.clone()
            s1, s2 = fa[:, :, 2 * which], fa[:, :, 2 * which + 1]
            fa[:, :, 2 * which + 1] = s2 + 2 * dka * s1 + na * dka * dka
            fa[:, :, 2 * which] = s1 + na * dka
        out[f"{s_}/feat"] = fa + fb
        out[f"{s_}/shift"] = K
        out[f"{s_}/shift_set"] = seta | setb
        ps_keys = [f"{s_}/scalars"] + ([f"{s_}/head_scalars"] if g.n_heads else [])
        for key in ps_keys:
            pa = PowerSums.from_state_dict(ta, key + "/")
            pb = PowerSums.from_state_dict(tb, key + "/")
            if torch.equal(pa.shift, pb.shift):
                m = pa.merge_(pb)
            else:
                m = PowerSums.from_moments(pa.moments().merge(pb.moments()))
            out.update(m.state_dict(key + "/"))
    # Samples: keep the smallest keys of the union.
    keys = torch.cat([ta["sample/keys"], tb["sample/keys"]])
    S = a.config.sample_size
    order = torch.argsort(keys, stable=True)[:S]
    out["sample/keys"] = keys[order]
    for key in ("sample/valid", "sample/category"):
        out[key] = torch.cat([ta[key], tb[key]])[order]
    for g in a.groups:
        for k in ("sample_delta", "sample_rel_l2", "sample_cos"):
            key = f"{g.suffix}/{k}"
            out[key] = torch.cat([ta[key], tb[key]])[order]
    ids = a.meta["sample_ids"] + b.meta["sample_ids"]
    meta = dict(a.meta)
    meta.update(done=sorted(set(a.meta["done"]) | set(b.meta["done"])), sample_ids=[ids[i] for i in order.tolist()],
                rows=a.meta["rows"] + b.meta["rows"], complete=bool(a.meta.get("complete") and b.meta.get("complete")))
    inside = set(i for i in meta["sample_ids"] if i is not None)
    meta["rows"] = [{**r, "in_sample": r["id"] in inside} for r in meta["rows"]]
    return DiffResult(meta, out, a.model, {})


def stream_batches(pairs: Sequence[AlignedPair], batch_size: int, model) -> Iterable:
    """The batches ``run_diff`` uses (sorted by length), for callers that drive their own loop."""
    return iter_batches(pairs, batch_size, pad_id(model), _device(model))


__all__ = ["DiffConfig", "DiffResult", "DiffAccumulator", "HookGroup", "run_diff", "merge_results", "hook_groups",
           "pair_metrics", "pair_metric_tensors", "metric_rows", "aligned_index", "load_stats", "save_stats",
           "prepare_run_pairs", "save_check", "DEFAULT_HOOKS"]
