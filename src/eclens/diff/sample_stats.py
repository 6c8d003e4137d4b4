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

from ..stats import F64, sorted_quantiles, sorted_valid
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
    valid4 = sv[:, None, :, None]
    parts: dict[str, list[torch.Tensor]] = {"q": [], "under": [], "below": [], "dot": [], "dd": []}
    ts = [threshold] + ([] if grid is None else [float(t) for t in grid])
    for a in range(0, L, step):
        b = min(L, a + step)
        x = sd[:, :, a:b].index_select(0, rows).to(F64).permute(0, 2, 1, 3)  # [s, l, O, D]
        # One sort per chunk gives the quantiles and, by binary search, the counts under every threshold:
        # missing items sort last as +inf, so "number of items < t" is the count of valid |Δ|/σ under t.
        zs, k = sorted_valid(x.abs() * inv[a:b], valid4)  # [l, O, D, s]
        parts["q"].append(sorted_quantiles(zs, k, QUANTILES))
        tv = torch.tensor(ts, dtype=zs.dtype).expand(*zs.shape[:-1], len(ts)).contiguous()
        below = torch.searchsorted(zs, tv).to(F64).movedim(-1, 0)  # [T + 1, l, O, D]
        parts["under"].append(below[0])
        if grid is not None:
            parts["below"].append(below[1:])
        del zs, tv
        parts["dot"].append((x * S[a:b]).sum(-1))
        parts["dd"].append((x * x).sum(-1))
    out = {"q": torch.cat(parts["q"], 1), "under": torch.cat(parts["under"], 0), "dot": torch.cat(parts["dot"], 1),
           "dd": torch.cat(parts["dd"], 1)}
    if grid is not None:
        out["below"] = torch.cat(parts["below"], 1)
    return out
