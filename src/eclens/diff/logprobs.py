"""Per-pair teacher-forced log-probs and next-token KL: the rows of ``pairs.csv``."""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np
import torch
from jaxtyping import Float, Int

from ..pairs import AlignedPair, aligned_position
from ..roles import cluster_of, detect_of, swap_direction_of


def span_rows(pairs: Sequence[AlignedPair]) -> list[tuple[int, int, int, int]]:
    """``(start, clean_end, corrupt_end, corrupt length)`` of each pair, for :func:`pair_metric_tensors`."""
    return [(int(a.position), int(a.clean_end), int(a.corrupt_end), len(a.corrupt_ids)) for a in pairs]


def pair_metric_tensors(logits: Float[torch.Tensor, "two_b seq vocab"], tokens: torch.Tensor,
                        positions: Sequence[int], lengths: Sequence[int],
                        spans: Sequence[tuple[int, int, int, int]] | None = None) -> dict[str, torch.Tensor]:
    """Per-pair log-probs and KL, as tensors on the logits' device (no host sync).

    ``clean_logprob``/``corrupt_logprob`` ``[B]``: teacher-forced log-prob of each sentence;
    ``clean_token_logprob``/``corrupt_token_logprob`` ``[B]``: log p of the clean and of the
    corrupt token at ``p`` under the clean run's prediction at ``p-1`` (the prefixes are
    identical) — for a span pair the whole span's log-prob (its first token so, the rest under
    each side's own run); ``kl`` ``[sum(len - end + 1)]``: KL(P_clean || P_corrupt) at each offset
    from the span end (``p`` for a single-token pair) to the last token, read on each side at its own
    position, pair after pair (only those rows of the vocabulary-sized log-probs are read again).
    ``spans``: :func:`span_rows` (``None``: single-token pairs at ``positions``).
    """
    B = len(positions)
    T = tokens.shape[1]
    dev = logits.device
    tok = tokens.to(dev)
    if spans is None:
        spans = [(int(p), int(p) + 1, int(p) + 1, int(n)) for p, n in zip(positions, lengths)]
    st, ce, xe, nx = (torch.tensor(c, dtype=torch.long) for c in zip(*spans))
    n_cpu = torch.tensor(list(lengths), dtype=torch.long)
    ar = torch.arange(T - 1)[None]
    tmask = {"clean": ar < (n_cpu - 1)[:, None], "corrupt": ar < (nx - 1)[:, None]}  # predictions inside
    cnt = n_cpu - ce + 1  # KL rows per pair: offsets 0 (the span end) .. the last token
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
        j = torch.arange(int(c.sum())) - torch.repeat_interleave(c.cumsum(0) - c, c)  # offset from the span end
        tc, tx = ce[s:e][ri] - 1 + j, xe[s:e][ri] - 1 + j
        ri, tc, tx = (x.to(dev, non_blocking=True) for x in (ri, tc, tx))
        lp = {}
        for side, o in (("clean", 0), ("corrupt", B)):
            lp[side] = torch.log_softmax(logits[o + s:o + e].float(), dim=-1)  # [k, T, V]
            tl = lp[side][:, :-1].gather(-1, tok[o + s:o + e, 1:, None]).squeeze(-1)
            out[f"{side}_logprob"].append((tl * tmask[side][s:e].to(dev, non_blocking=True)).sum(-1))
        for side, o, end in (("clean", 0, ce), ("corrupt", B, xe)):
            out[f"{side}_token_logprob"].append(_span_logprob(lp, side, tok[o + s:o + e], st[s:e], end[s:e]))
        lc, lx = lp["clean"][ri, tc], lp["corrupt"][ri, tx]
        out["kl"].append((lc.exp() * (lc - lx)).sum(-1))
        del lp, lc, lx
    return {key: torch.cat(v).reshape(-1) for key, v in out.items()}


def _span_logprob(lp: dict[str, torch.Tensor], side: str, tok: Int[torch.Tensor, "k seq"],
                  start: Int[torch.Tensor, " k"], end: Int[torch.Tensor, " k"]) -> Float[torch.Tensor, " k"]:
    """log p of ``side``'s changed tokens ``[start, end)``: the first under the clean run's prediction at
    ``start - 1`` (the prefixes are identical), the rest under ``side``'s own run."""
    dev = tok.device
    m = end - start
    ri = torch.repeat_interleave(torch.arange(len(m)), m)
    t = start[ri] + torch.arange(int(m.sum())) - torch.repeat_interleave(m.cumsum(0) - m, m)
    first = t == start[ri]
    ri, t, first = ri.to(dev), t.to(dev), first.to(dev)
    pred = (t - 1).clamp_min(0)  # nothing predicts the first token: its value is dropped by metric_rows
    nxt = tok[ri, t][:, None]
    v = torch.where(first, lp["clean"][ri, pred].gather(-1, nxt).squeeze(-1),
                    lp[side][ri, pred].gather(-1, nxt).squeeze(-1))
    return torch.zeros(len(m), dtype=v.dtype, device=dev).index_add_(0, ri, v)


def metric_rows(batches: Sequence[tuple[Sequence[AlignedPair], dict[str, torch.Tensor]]],
                offsets: Sequence[int]) -> list[dict]:
    """Rows of ``pairs.csv`` from :func:`pair_metric_tensors` of several batches (one host transfer per column)."""
    if not batches:
        return []
    pairs = [a for ps, _ in batches for a in ps]
    cols = {k: torch.cat([m[k].reshape(-1) for _, m in batches]).double().cpu().numpy()
            for k in batches[0][1]}
    p = np.array([a.position for a in pairs])
    e = np.array([a.clean_end - 1 for a in pairs])  # offset 0: the span end (p for a single-token pair)
    n = np.array([a.length for a in pairs])
    cnt = n - e
    start = np.concatenate([[0], np.cumsum(cnt)[:-1]])
    kl_all = cols.pop("kl")
    out = {k: cols[k] for k in ("clean_logprob", "corrupt_logprob")}
    out["logprob_diff"] = cols["corrupt_logprob"] - cols["clean_logprob"]
    for k in ("clean_token_logprob", "corrupt_token_logprob"):
        out[k] = np.where(p > 0, cols[k], np.nan)  # nothing predicts the first token
    out["token_logprob_diff"] = out["corrupt_token_logprob"] - out["clean_token_logprob"]
    for k in offsets:
        t = aligned_position(e, n, k)
        ok = t < n
        out[f"kl_{k}" if k >= 0 else "kl_last"] = np.where(ok, kl_all[start + np.where(ok, t - e, 0)], np.nan)
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
    m = pair_metric_tensors(logits, tokens, [a.position for a in pairs], [a.length for a in pairs],
                            spans=span_rows(pairs))
    return metric_rows([(pairs, m)], offsets)


def pair_info(a: AlignedPair) -> dict:
    return {"id": a.id, "category": a.category, "source": a.pair.source, "position": a.position,
            "length": a.length, "clean_token": a.clean_token, "corrupt_token": a.corrupt_token,
            "cluster": cluster_of(a), "swap_direction": swap_direction_of(a) or "none", "detect_position": detect_of(a),
            "mode": a.mode, "clean_end": a.clean_end, "corrupt_end": a.corrupt_end}
