"""Per-pair teacher-forced log-probs and next-token KL: the rows of ``pairs.csv``."""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np
import torch
from jaxtyping import Float

from ..pairs import AlignedPair, aligned_position
from ..roles import cluster_of, detect_of, swap_direction_of


def span_rows(pairs: Sequence[AlignedPair]) -> list[tuple[int, int, int, int]]:
    """``(start, clean_end, corrupt_end, corrupt length)`` of each pair, for :func:`pair_metric_tensors`."""
    return [(int(a.position), int(a.clean_end), int(a.corrupt_end), len(a.corrupt_ids)) for a in pairs]


def packed_rows(spans: Sequence[tuple[int, int, int, int]], lengths: Sequence[int], seq_len: int
                ) -> tuple[torch.Tensor, list[int]]:
    """The rows of a batch's flattened ``[2B·T]`` logits that :func:`pair_metric_tensors` reads, pair after pair:
    the clean sentence's every position, then the changed sentence's from its first changed token on (before
    it both sentences are the same tokens, so the clean run's logits serve: a fifth of the rows of template
    pairs, and the unembedding, a sixth of SmolLM2-135M's forward pass, need not make them). Returns the row
    indices and each pair's first row among them."""
    B, T = len(spans), seq_len
    idx: list[int] = []
    first = []
    for i, ((st, _, _, nx), n) in enumerate(zip(spans, lengths)):
        first.append(len(idx))
        idx += range(i * T, i * T + n)
        idx += range((B + i) * T + st, (B + i) * T + nx)
    return torch.tensor(idx, dtype=torch.long), first


def pair_metric_tensors(logits: Float[torch.Tensor, "two_b seq vocab"], tokens: torch.Tensor,
                        positions: Sequence[int], lengths: Sequence[int],
                        spans: Sequence[tuple[int, int, int, int]] | None = None, packed: bool = False,
                        index: tuple[torch.Tensor, list[int]] | None = None) -> dict[str, torch.Tensor]:
    """Per-pair log-probs and KL, as tensors on the logits' device (no host sync).

    ``clean_logprob``/``corrupt_logprob`` ``[B]``: teacher-forced log-prob of each sentence;
    ``clean_token_logprob``/``corrupt_token_logprob`` ``[B]``: log p of the clean and of the
    corrupt token at ``p`` under the clean run's prediction at ``p-1`` (the prefixes are
    identical) — for a span pair the whole span's log-prob (its first token so, the rest under
    each side's own run); ``kl`` ``[sum(len - end + 1)]``: KL(P_clean || P_corrupt) at each offset
    from the span end (``p`` for a single-token pair) to the last token, read on each side at its own
    position, pair after pair. ``spans``: :func:`span_rows` (``None``: single-token pairs at ``positions``).
    ``packed``: ``logits`` are only the rows :func:`packed_rows` names (``[1, N, vocab]``, as the stream's
    unembedding makes them); otherwise the batch's ``[2B, T, vocab]``, whose rows are taken so. ``index``:
    :func:`packed_rows` of these pairs, where the caller made it already (the stream, for its unembedding).
    """
    B = len(positions)
    T = tokens.shape[1]
    dev = logits.device
    if spans is None:
        spans = [(int(p), int(p) + 1, int(p) + 1, int(n)) for p, n in zip(positions, lengths)]
    idx, first = index if index is not None else packed_rows(spans, lengths, T)
    idx = idx.to(dev, non_blocking=True)
    first = [*first, len(idx)]
    rows = logits.reshape(-1, logits.shape[-1]) if packed else logits.flatten(0, 1).index_select(0, idx)
    tok = tokens.to(dev, non_blocking=True).reshape(-1)[idx]  # each row's own token
    out: dict[str, list[torch.Tensor]] = {name: [] for name in ("clean_logprob", "corrupt_logprob", "kl",
                                                                "clean_token_logprob", "corrupt_token_logprob")}
    # Log-softmax over the vocabulary (one fused pass; faster on the CPU than logsumexp, and the KL reuses it),
    # a few pairs' rows at a time on the CPU: they stay in cache and their memory is reused, where one block
    # of every row (190 MB for 32 SmolLM2 pairs) ran half as fast. One block on a GPU.
    per = (8 << 20) // max(1, rows.shape[-1] * 4)
    s = 0
    while s < B:
        e = s + 1 if dev.type == "cpu" else B
        while e < B and first[e + 1] - first[s] <= per:
            e += 1
        lp = torch.log_softmax(rows[first[s]:first[e]].float(), dim=-1)  # [r, V]
        g = {k: v.to(dev, non_blocking=True) for k, v in _block_rows(spans[s:e], lengths[s:e], first[s:e + 1]).items()}
        tb = tok[first[s]:first[e]]
        for side in ("clean", "corrupt"):
            for what, key in (("logprob", side), ("token_logprob", f"{side}_span")):
                v = lp[g[f"{key}_row"], tb[g[f"{key}_tok"]]]
                out[f"{side}_{what}"].append(torch.zeros(e - s, dtype=v.dtype, device=dev)
                                             .index_add_(0, g[f"{key}_pair"], v))
        lc, lx = lp[g["kl_clean"]], lp[g["kl_corrupt"]]
        out["kl"].append((lc.exp() * (lc - lx)).sum(-1))
        del lp, lc, lx
        s = e
    return {key: torch.cat(v).reshape(-1) for key, v in out.items()}


def _block_rows(spans: Sequence[tuple[int, int, int, int]], lengths: Sequence[int], first: Sequence[int]
                ) -> dict[str, torch.Tensor]:
    """Which rows of a block of :func:`packed_rows` (local to the block) each metric reads, pair by pair, and
    the rows whose own token it scores: the sentences' teacher-forced tokens (``t+1`` read at ``t``), each
    side's span tokens (the first under the clean run's prediction, the rest under its own), the KL rows from
    each side's span end on. Before the span the changed sentence's rows are the clean run's (same tokens)."""
    r0 = first[0]
    out: dict[str, list[int]] = {f"{k}_{w}": [] for k in ("clean", "corrupt", "clean_span", "corrupt_span")
                                 for w in ("row", "tok", "pair")}
    out["kl_clean"], out["kl_corrupt"] = [], []
    for i, ((st, ce, xe, nx), n) in enumerate(zip(spans, lengths)):
        b = first[i] - r0
        crow = [b + t for t in range(n)]  # the clean run's row at each position
        xrow = [b + t if t < st else b + n + t - st for t in range(nx)]  # the changed run's
        for key, rows, m in (("clean", crow, n), ("corrupt", xrow, nx)):
            out[f"{key}_row"] += rows[:m - 1]
            out[f"{key}_tok"] += rows[1:m]
            out[f"{key}_pair"] += [i] * (m - 1)
        for key, rows, end in (("clean_span", crow, ce), ("corrupt_span", xrow, xe)):
            # nothing predicts the first token (st = 0): its value is dropped by metric_rows
            out[f"{key}_row"] += [crow[max(st - 1, 0)]] + rows[st:end - 1]
            out[f"{key}_tok"] += rows[st:end]
            out[f"{key}_pair"] += [i] * (end - st)
        out["kl_clean"] += crow[ce - 1:n]  # offsets 0 (the span end) .. the last token
        out["kl_corrupt"] += xrow[xe - 1:nx]
    return {k: torch.tensor(v, dtype=torch.long) for k, v in out.items()}


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
                 offsets: Sequence[int], index: tuple[torch.Tensor, list[int]] | None = None) -> list[dict]:
    """:func:`pair_metric_tensors` of one batch as ``pairs.csv`` rows (log-probs, per-offset KL, the KL list).
    ``index``: the batch's :func:`packed_rows`, when ``logits`` are only those rows (``[1, N, vocab]``)."""
    m = pair_metric_tensors(logits, tokens, [a.position for a in pairs], [a.length for a in pairs],
                            spans=span_rows(pairs), packed=index is not None, index=index)
    return metric_rows([(pairs, m)], offsets)


def pair_info(a: AlignedPair) -> dict:
    return {"id": a.id, "category": a.category, "source": a.pair.source, "position": a.position,
            "length": a.length, "clean_token": a.clean_token, "corrupt_token": a.corrupt_token,
            "cluster": cluster_of(a), "swap_direction": swap_direction_of(a) or "none", "detect_position": detect_of(a),
            "mode": a.mode, "clean_end": a.clean_end, "corrupt_end": a.corrupt_end}
