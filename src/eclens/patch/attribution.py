"""Attribution patching (AtP): ``(a_src - a_base) . d metric / d a`` from one backward pass."""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial

import numpy as np
import pandas as pd
import torch

from ..errors import EclensError
from ..hooks import (
    EXACT_HOOKS,
    HEAD_HOOK,
    iter_batches,
    pad_id,
    parse_hooks,
)
from ..metrics import DEFAULT_MIN_DELTA, METRICS, prepare_pair
from ..model import model_device
from ..pairs import AlignedPair
from ..progress import TaskBar
from .engine import (
    Prepared,
    Rows,
    cache_get,
    check_pairs,
    head_table,
    parse_direction,
    position_kind,
    run_rows,
)


def attribution_patch(
    model,
    pairs: Sequence[AlignedPair],
    hooks: str | Sequence[str] | None = EXACT_HOOKS,
    heads: bool = False,
    direction: str = "denoise",
    metric: str = "logit_diff",
    batch_size: int = 8,
    verify_top: int = 0,
    seed: int = 0,
    exact_batch_size: int = 64,
    min_delta: float = DEFAULT_MIN_DELTA,
    progress: bool = False,
    return_dims: bool = False,
):
    """Attribution patching: ``(a_src - a_base) . d metric / d a`` at the base run.

    One forward and one backward pass per batch of pairs (gradients only for the hooked
    activations, through zero "probe" tensors added at each hook point; the weights'
    gradients are never computed). The base run is the corrupt run for ``denoise`` and
    the clean run for ``noise``. One row per (pair, direction, hook, layer, position[,
    head]) with ``attribution`` (the estimate of ``m_patched - m_base`` for ``metric``)
    and ``rank`` (by ``|attribution|`` within the pair and direction).

    ``verify_top=K`` runs exact patching on the ``K`` top-ranked rows of each pair and
    direction plus ``K`` rows drawn at random from the rest (seeded), so the comparison
    spans the whole range rather than only the top. Verified rows get ``exact`` (the
    exact ``m_patched - m_base``), ``exact_restored`` and ``verify_group`` (top /
    random); :func:`attribution_summary` reports Spearman correlation and top-K overlap
    (within each pair's verified rows, the share of attribution's top K that are also
    exact patching's top K).

    With ``return_dims=True`` also returns ``{f"{direction}/{hook}": [pairs, layers, F]}``:
    per-dimension scores at the changed position ``p``.
    """
    check_pairs(pairs)
    if metric not in METRICS:
        raise EclensError(f"unknown metric {metric!r}: use {', '.join(METRICS)}")
    suffixes = parse_hooks(hooks, model) if hooks else []
    if heads:
        suffixes.append(HEAD_HOOK)
    if not suffixes:
        raise EclensError("nothing to attribute: give --hooks or --heads")
    if verify_top < 0:
        raise EclensError("--verify-top must be >= 0")
    dirs = parse_direction(direction)
    n_layers = model.cfg.n_layers
    names = [f"blocks.{L}.{s}" for s in suffixes for L in range(n_layers)]
    wanted = set(names)
    dev = model_device(model)
    tok = model.tokenizer
    bos = bool(model.cfg.default_prepend_bos)
    frames, dims_out = [], {}
    rng = np.random.default_rng([seed, 7])
    pair_index = {p.id: i for i, p in enumerate(pairs)}
    ld_pos: dict[str, int] = {}  # where each pair's logit difference is read (what it can see)
    with TaskBar(progress, len(pairs), f"attribution ({metric})") as bar:
        for batch in iter_batches(pairs, batch_size, pad_id(model), dev, sort_by_length=False):
            B = batch.size
            with torch.no_grad():
                logits, cache = model.run_with_cache(batch.tokens, names_filter=lambda n: n in wanted)
            ctxs = [prepare_pair(p, logits[i], logits[B + i], tok, bos) for i, p in enumerate(batch.pairs)]
            ld_pos.update({p.id: c.ld_position for p, c in zip(batch.pairs, ctxs)})
            acts = {n: cache_get(cache, model, n) for n in names}
            del logits, cache
            batch_frames = []
            for d in dirs:
                base_rows = slice(B, 2 * B) if d == "denoise" else slice(0, B)
                src_rows = slice(0, B) if d == "denoise" else slice(B, 2 * B)
                ok = [math.isfinite((c.corrupt if d == "denoise" else c.clean)[metric]) for c in ctxs]
                grads = _attribution_grads(model, batch.tokens[base_rows], ctxs, ok, names, metric)
                for n, g in zip(names, grads):
                    L, suffix = int(n.split(".")[1]), n.split(".", 2)[2]
                    delta = (acts[n][src_rows] - acts[n][base_rows]).float()
                    prod = delta * g
                    # heads: sum over d_head; other hooks: over all features
                    per = prod.sum(-1) if suffix == HEAD_HOOK else prod.reshape(B, prod.shape[1], -1).sum(-1)[..., None]
                    per = per.cpu().numpy()
                    if return_dims:
                        flat = prod.reshape(B, prod.shape[1], -1)
                        key = f"{d}/{suffix}"
                        if key not in dims_out:
                            dims_out[key] = torch.full((len(pairs), n_layers, flat.shape[-1]), float("nan"))
                        for i, pair in enumerate(batch.pairs):
                            if ok[i]:
                                dims_out[key][pair_index[pair.id], L] = flat[i, pair.position].cpu()
                    H = per.shape[-1]
                    for i, pair in enumerate(batch.pairs):
                        T = pair.length
                        vals = per[i, :T].reshape(-1) if ok[i] else np.full(T * H, np.nan)
                        batch_frames.append(pd.DataFrame({
                            "pair_id": pair.id, "category": pair.category, "direction": d, "hook": suffix,
                            "layer": L, "position": np.repeat(np.arange(T), H),
                            "head": np.tile(np.arange(H), T) if suffix == HEAD_HOOK else -1,
                            "attribution": vals,
                        }))
            bdf = pd.concat(batch_frames, ignore_index=True)
            bdf["exact"] = np.nan
            bdf["exact_restored"] = np.nan
            bdf["verify_group"] = ""
            if verify_top:
                for i, pair in enumerate(batch.pairs):
                    _verify_pair(model, pair, ctxs[i], acts, i, B, bdf, metric, verify_top, rng,
                                 exact_batch_size, min_delta)
            frames.append(bdf)
            bar.advance(B)
    df = _finish_attribution(pd.concat(frames, ignore_index=True), pairs, tok, metric, ld_pos)
    return (df, dims_out) if return_dims else df


def _attribution_grads(model, tokens, ctxs, ok, names, metric) -> list[torch.Tensor]:
    """d(sum of the metric over the batch)/d(activation) at each hook, for the rows in ``tokens``."""
    probes: dict[str, torch.Tensor] = {}

    def probe(act, hook, key):
        # A zero leaf added to the activation: its gradient is the activation's gradient, and
        # nothing else (weights, inputs) needs one.
        z = torch.zeros_like(act, requires_grad=True)
        probes[key] = z
        return act + z

    with torch.enable_grad():
        out = model.run_with_hooks(tokens, fwd_hooks=[(n, partial(probe, key=n)) for n in names])
        terms = [ctx.evaluate(out[i : i + 1])[metric][0] for i, ctx in enumerate(ctxs) if ok[i]]
        if not terms:
            return [torch.zeros_like(probes[n], dtype=torch.float32) for n in names]
        grads = torch.autograd.grad(torch.stack(terms).sum(), [probes[n] for n in names], allow_unused=True)
    return [torch.zeros_like(probes[n], dtype=torch.float32) if g is None else g.detach().float()
            for n, g in zip(names, grads)]


def _verify_pair(model, pair, ctx, acts, i, B, bdf, metric, K, rng, exact_batch_size, min_delta) -> None:
    """Exact patching for the top-K rows by |attribution| and K random others (fills ``bdf`` in place)."""
    T = pair.length
    chosen_idx, top_idx = [], []
    for _, g in bdf[bdf["pair_id"] == pair.id].groupby("direction", sort=False):
        g = g[g["position"] >= pair.position].dropna(subset=["attribution"])  # before p: exact no-ops
        if g.empty:
            continue
        top = g["attribution"].abs().sort_values(ascending=False, kind="stable").index[:K]
        rest = g.index.difference(top).to_numpy()
        extra = rng.choice(rest, size=min(K, len(rest)), replace=False) if len(rest) else rest
        chosen_idx += [*top, *extra]
        top_idx += list(top)
    if not chosen_idx:
        return
    chosen = bdf.loc[chosen_idx]
    needed = sorted({f"blocks.{L}.{h}" for h, L in zip(chosen["hook"], chosen["layer"])})
    both = {n: torch.stack([acts[n][i, :T], acts[n][B + i, :T]]) for n in needed}
    shapes = {n: tuple(a.shape[2:]) for n, a in both.items()}
    prep = Prepared(pair, ctx, torch.tensor([pair.clean_ids, pair.corrupt_ids]),
                    {n: a.reshape(2, T, -1) for n, a in both.items()}, shapes)
    items = []
    for d, h, L, t, hd in zip(chosen["direction"], chosen["hook"], chosen["layer"], chosen["position"],
                              chosen["head"]):
        base, src = (1, 0) if d == "denoise" else (0, 1)
        items.append((base, f"blocks.{L}.{h}", src, int(t), int(hd)))
    tables = {n: head_table(shapes[n]) for n in needed if n.endswith(HEAD_HOOK)}
    res = run_rows(model, prep, Rows.build(items), prep.acts, tables, exact_batch_size)
    base_vals = np.where(chosen["direction"].to_numpy() == "denoise", ctx.corrupt[metric], ctx.clean[metric])
    bdf.loc[chosen_idx, "exact"] = res[metric] - base_vals
    bdf.loc[chosen_idx, "exact_restored"] = (ctx.restored(metric, res[metric], min_delta)
                                             if ctx.valid(metric, min_delta) else np.nan)
    bdf.loc[chosen_idx, "verify_group"] = "random"
    bdf.loc[top_idx, "verify_group"] = "top"


def _finish_attribution(df: pd.DataFrame, pairs, tokenizer, metric: str, ld_pos: dict) -> pd.DataFrame:
    by_id = {p.id: p for p in pairs}
    df["rank"] = (df.assign(_a=df["attribution"].abs()).groupby(["pair_id", "direction"])["_a"]
                  .rank(ascending=False, method="first").astype("Int64"))
    df["verified"] = df["exact"].notna()
    p = df["pair_id"].map(lambda i: by_id[i].position).to_numpy()
    T = df["pair_id"].map(lambda i: by_id[i].length).to_numpy()
    pos = df["position"].to_numpy()
    df.insert(6, "offset", pd.array([int(t - q) if t >= q else None for t, q in zip(pos, p)], dtype="Int64"))
    df.insert(7, "position_kind", [position_kind(int(t), int(q), int(n)) for t, q, n in zip(pos, p, T)])
    toks = {pid: [tokenizer.decode([i]) for i in pr.clean_ids] for pid, pr in by_id.items()}
    df.insert(8, "token", [toks[pid][int(t)] for pid, t in zip(df["pair_id"], pos)])
    df.insert(df.columns.get_loc("attribution"), "metric", metric)
    # Whether the metric can see the position at all: logit_diff is read at its target position (a patch
    # after it cannot move it), logprob at p..T-2, kl at p..T-1; before p the two runs do not differ.
    hi = {"logit_diff": df["pair_id"].map(ld_pos).to_numpy(), "logprob": T - 2, "kl": T - 1}[metric]
    df["visible"] = (pos >= p) & (pos <= hi)
    return df.reset_index(drop=True)
