"""The patching engine: pairs prepared once (both runs cached), then batches of patched copies
(:func:`run_rows`), and the shared pieces of the tables."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float, Int

from ..errors import EclensError
from ..hooks import (
    iter_batches,
    pad_id,
)
from ..metrics import METRICS, PairMetrics, prepare_pair
from ..model import model_device
from ..pairs import AlignedPair, aligned_position, require_single

DIRECTIONS = ("denoise", "noise")
ABLATIONS = ("zero", "mean", "resample", "patch")


def parse_direction(direction: str) -> list[str]:
    if direction == "both":
        return list(DIRECTIONS)
    if direction not in DIRECTIONS:
        raise EclensError(f"unknown direction {direction!r}: use denoise, noise or both")
    return [direction]


def check_pairs(pairs: Sequence[AlignedPair]) -> None:
    if not pairs:
        raise EclensError("no valid pairs to patch; check the pairs file with `ec pairs check`")
    # Exact patching swaps activations position by position: a span pair has no such correspondence.
    require_single(pairs, "patching")


def position_kind(t: int, p: int, T: int) -> str:
    if t < p:
        return "before"
    if t == p:
        return "changed"
    return "last" if t == T - 1 else "after"


def resolve_position(pair: AlignedPair, offset: int) -> int | None:
    """Position of ``offset`` in ``pair`` (``-1`` = last token), or ``None`` past its end."""
    t = aligned_position(pair.position, pair.length, offset)
    return t if 0 <= t < pair.length and (offset == -1 or offset >= 0) else None




@dataclass
class Prepared:
    """One pair ready to patch: its metrics context and the cached activations of both runs.

    ``acts[name]`` is ``[2, T, F]``: row 0 the clean run, row 1 the corrupt run, features
    flattened (``attn.hook_z`` is ``heads x d_head``).
    """

    pair: AlignedPair
    metrics: PairMetrics
    tokens: Int[torch.Tensor, "2 seq"]
    acts: dict[str, Float[torch.Tensor, "2 seq feat"]]
    shapes: dict[str, tuple[int, ...]]  # per-position shape of each hook's activation


def cache_get(cache, model, name: str) -> torch.Tensor:
    try:
        return cache[name]
    except KeyError:  # the cache may hold the hook under its alias
        hp = model.hook_dict[name]
        for k in cache.keys():
            if model.hook_dict.get(k) is hp:
                return cache[k]
        raise


def prepare(
    model, pairs: Sequence[AlignedPair], names: Iterable[str] = (), batch_size: int = 8
) -> Iterator[Prepared]:
    """Run clean and corrupt sentences in batches, caching only ``names``; yield one :class:`Prepared` per pair."""
    names = list(dict.fromkeys(names))
    wanted = set(names)
    for n in names:
        if n not in model.hook_dict:
            raise EclensError(f"hook {n!r} does not exist in this model; see `ec model info`")
    dev = model_device(model)
    tok = model.tokenizer
    bos = bool(model.cfg.default_prepend_bos)
    for batch in iter_batches(pairs, batch_size, pad_id(model), dev, sort_by_length=False):
        with torch.no_grad():
            logits, cache = model.run_with_cache(batch.tokens, names_filter=lambda n: n in wanted)
        B = batch.size
        for i, pair in enumerate(batch.pairs):
            T = pair.length
            ctx = prepare_pair(pair, logits[i], logits[B + i], tok, bos)
            acts, shapes = {}, {}
            for n in names:
                a = cache_get(cache, model, n)
                both = torch.stack([a[i, :T], a[B + i, :T]])
                shapes[n] = tuple(both.shape[2:])
                acts[n] = both.reshape(2, T, -1).clone()
            toks = torch.stack([batch.tokens[i, :T], batch.tokens[B + i, :T]])
            yield Prepared(pair, ctx, toks, acts, shapes)
        del logits, cache




@dataclass
class Rows:
    """Patched runs of one pair, column-wise.

    ``base``: 0 runs the clean input, 1 the corrupt input. ``hook``: full hook name.
    ``bank``: index into that hook's value bank ``[K, T, F]``. ``pos``: the patched
    position (-1: all positions). ``units``: index into the hook's feature-mask table
    ``[S, F]`` (-1: every feature).
    """

    base: np.ndarray
    hook: np.ndarray
    bank: np.ndarray
    pos: np.ndarray
    units: np.ndarray

    def __len__(self) -> int:
        return len(self.base)

    @staticmethod
    def build(items: list[tuple[int, str, int, int, int]]) -> Rows:
        if not items:
            return Rows(*(np.zeros(0, dtype=int) for _ in range(2)), np.zeros(0, dtype=int),
                        np.zeros(0, dtype=int), np.zeros(0, dtype=int))
        base, hook, bank, pos, units = zip(*items)
        return Rows(np.asarray(base), np.asarray(hook, dtype=object), np.asarray(bank), np.asarray(pos),
                    np.asarray(units))


def _patch_hook(act: torch.Tensor, hook, rows: torch.Tensor, mask: torch.Tensor, value: torch.Tensor):
    # One vectorised write for every row of this chunk patched at this hook point.
    shape = act.shape
    flat = act.reshape(shape[0], shape[1], -1)
    if rows.device != flat.device:  # a model spread over GPUs (--device-map) keeps later layers elsewhere
        rows, mask, value = rows.to(flat.device), mask.to(flat.device), value.to(flat.device)
    flat[rows] = torch.where(mask, value.to(flat.dtype), flat[rows])
    return flat.view(shape)


def run_rows(
    model,
    prep: Prepared,
    rows: Rows,
    banks: dict[str, Float[torch.Tensor, "k seq feat"]],
    unit_tables: dict[str, Bool[torch.Tensor, "s feat"]] | None = None,
    batch_size: int = 64,
) -> dict[str, np.ndarray]:
    """Run every row of ``rows`` (chunks of ``batch_size`` copies per forward pass); metrics per row."""
    unit_tables = unit_tables or {}
    R = len(rows)
    out = {m: np.full(R, np.nan) for m in METRICS}
    if R == 0:
        return out
    dev = model_device(model)
    T = prep.pair.length
    ar = torch.arange(T, device=dev)
    tokens2 = prep.tokens.to(dev)
    banks = {h: b.to(dev) for h, b in banks.items()}
    tables = {h: t.to(dev) for h, t in unit_tables.items()}
    for s in range(0, R, batch_size):
        e = min(R, s + batch_size)
        toks = tokens2[torch.as_tensor(rows.base[s:e], device=dev)]
        fwd = []
        hooks_here = rows.hook[s:e]
        for h in dict.fromkeys(hooks_here.tolist()):
            sel = np.nonzero(hooks_here == h)[0]
            pos = torch.as_tensor(rows.pos[s:e][sel], device=dev)
            mask = ((pos[:, None] < 0) | (ar[None, :] == pos[:, None]))[:, :, None]  # [n, T, 1]
            units = rows.units[s:e][sel]
            if (units >= 0).any():
                F = banks[h].shape[-1]
                um = torch.ones(len(sel), F, dtype=torch.bool, device=dev)
                has = torch.as_tensor(np.nonzero(units >= 0)[0], device=dev)
                um[has] = tables[h][torch.as_tensor(units[units >= 0], device=dev)]
                mask = mask & um[:, None, :]
            value = banks[h][torch.as_tensor(rows.bank[s:e][sel], device=dev)]
            fwd.append((h, partial(_patch_hook, rows=torch.as_tensor(sel, device=dev), mask=mask, value=value)))
        with torch.no_grad():
            logits = model.run_with_hooks(toks, fwd_hooks=fwd)
            vals = prep.metrics.evaluate(logits)
        for m in METRICS:
            out[m][s:e] = vals[m].float().cpu().numpy()
        del logits
    return out


def head_table(shape: tuple[int, ...]) -> Bool[torch.Tensor, "heads feat"]:
    n_heads, d_head = shape[0], int(np.prod(shape[1:]))
    return torch.eye(n_heads, dtype=torch.bool).repeat_interleave(d_head, dim=1)


def metric_columns(rec: dict, values: dict[str, np.ndarray], ctx: PairMetrics, min_delta: float) -> None:
    for m in METRICS:
        v = values[m]
        rec[m] = v
        rec[f"{m}_restored"] = ctx.restored(m, v, min_delta) if ctx.valid(m, min_delta) else np.full(len(v), np.nan)
        rec[f"{m}_clean"] = ctx.clean[m]
        rec[f"{m}_corrupt"] = ctx.corrupt[m]


def component_frame(prep: Prepared, direction: np.ndarray, hook: np.ndarray, layer: np.ndarray,
                     pos: np.ndarray, head: np.ndarray, tokenizer) -> dict:
    pair = prep.pair
    p, T = pair.position, pair.length
    toks = [tokenizer.decode([i]) for i in pair.clean_ids] if tokenizer is not None else [str(i) for i in
                                                                                           pair.clean_ids]
    offset = pd.array([int(t - p) if t >= p else None for t in pos], dtype="Int64")
    return {
        "pair_id": pair.id, "category": pair.category, "direction": direction, "hook": hook, "layer": layer,
        "position": pos, "offset": offset, "position_kind": [position_kind(int(t), p, T) for t in pos],
        "token": [toks[int(t)] for t in pos], "head": head,
    }
