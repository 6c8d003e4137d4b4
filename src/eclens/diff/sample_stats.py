"""The pair-sample numbers of :meth:`DiffResult.cell_stats`, computed a few layers at a time.

The sample of one group in float64 is ``[s, L, O, D]`` — 354 MB for 512 pairs of one SmolLM2-135M hook —
and the quantiles sort a copy of ``|Δ|/σ``: taken whole, one call held about 2 GB of temporaries.
Every number here is per (layer, offset, dimension) or per (pair, layer,
offset), so layer chunks give the same numbers with a bounded peak (and faster, in cache).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Bool, Float, Int

from ..stats import F64, sort_last_, sorted_quantiles
from .config import QUANTILES

CHUNK_ELEMENTS = 1 << 23  # float64 values of the sample per chunk (64 MB)


def sample_stats(sd: Float[torch.Tensor, "r O L D"], rows: Int[torch.Tensor, " s"], sv: Bool[torch.Tensor, "s O"],
                 inv: Float[torch.Tensor, "L O D"], S: Float[torch.Tensor, "L O D"], threshold: float,
                 grid: Sequence[float] | None) -> dict[str, torch.Tensor]:
    """Of the sampled Δ ``sd[rows]`` (any float dtype; rows taken a chunk at a time, so the group's sample is
    never copied whole) with validity ``sv``: quantiles (:data:`QUANTILES`) of
    ``|Δ|·inv`` over the valid pairs (``q`` ``[len(QUANTILES), L, O, D]``), how many are under ``threshold``
    (``under`` ``[L, O, D]``) and under each value of ``grid`` (``below`` ``[T, L, O, D]``, when given),
    and per pair ``Δ·S`` and ``‖Δ‖²`` (``dot``, ``dd`` ``[s, L, O]``)."""
    O, L, D = sd.shape[1:]  # noqa: E741
    s = len(rows)
    step = max(1, CHUNK_ELEMENTS // max(1, s * O * D))
    missing = ~sv.T[None, :, None, :]  # [1, O, 1, s]: the pair has no value at that offset
    n_valid = sv.sum(0).to(torch.long)[None, :, None]  # [1, O, 1]
    parts: dict[str, list[torch.Tensor]] = {"q": [], "under": [], "below": [], "dot": [], "dd": []}
    ts = [threshold] + ([] if grid is None else [float(t) for t in grid])
    inf = float("inf")
    for a in range(0, L, step):
        b = min(L, a + step)
        # Each pass here is memory-bound float64 work, so there are few: Δ in float64, pair-minor [l, O, s, D]
        # (one copy, D contiguous on both sides) for the dot products; |Δ|/σ pair-major [l, O, D, s] for the sort.
        xh = sd[:, :, a:b].index_select(0, rows)  # [s, O, l, D], the sample's dtype
        x = torch.empty((b - a, O, s, D), dtype=F64)
        x.copy_(xh.permute(2, 1, 0, 3))
        parts["dot"].append(torch.matmul(x, S[a:b, :, :, None])[..., 0].permute(2, 0, 1))  # [s, l, O]
        parts["dd"].append((torch.linalg.vector_norm(x, dim=-1) ** 2).permute(2, 0, 1))
        z = torch.empty((b - a, O, D, s), dtype=F64)  # contiguous: the sort runs along its last axis
        torch.abs(x.transpose(2, 3), out=z).mul_(inv[a:b, :, :, None])
        del x
        # Missing items sort last as +inf, so "number of items < t" is the count of valid |Δ|/σ under t; the
        # count per cell is the offset's valid pairs, none where σ = 0 (inv NaN), unless a Δ is NaN itself.
        nan_inv = torch.isnan(inv[a:b])
        if bool(torch.isnan(xh).any()):
            bad = missing | torch.isnan(z)
            k = (~bad).sum(-1)
        else:
            bad = missing | nan_inv[..., None]
            k = torch.where(nan_inv, 0, n_valid)
        z.masked_fill_(bad, inf)
        z = sort_last_(z)
        parts["q"].append(sorted_quantiles(z, k, QUANTILES))
        tv = torch.tensor(ts, dtype=z.dtype).expand(*z.shape[:-1], len(ts)).contiguous()
        below = torch.searchsorted(z, tv).to(F64).movedim(-1, 0)  # [T + 1, l, O, D]
        parts["under"].append(below[0])
        if grid is not None:
            parts["below"].append(below[1:])
        del z, tv
    out = {"q": torch.cat(parts["q"], 1), "under": torch.cat(parts["under"], 0), "dot": torch.cat(parts["dot"], 1),
           "dd": torch.cat(parts["dd"], 1)}
    if grid is not None:
        out["below"] = torch.cat(parts["below"], 1)
    return out
