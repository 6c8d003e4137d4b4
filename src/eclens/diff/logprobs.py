"""Per-pair teacher-forced log-probs and next-token KL: the rows of ``pairs.csv``."""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np
import torch
from jaxtyping import Float

from ..pairs import AlignedPair, aligned_position
from ..roles import cluster_of, detect_of, swap_direction_of


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
        t = aligned_position(p, n, k)
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
            "length": a.length, "clean_token": a.clean_token, "corrupt_token": a.corrupt_token,
            "cluster": cluster_of(a), "swap_direction": swap_direction_of(a) or "none", "detect_position": detect_of(a)}
