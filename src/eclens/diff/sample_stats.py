"""The pair-sample numbers of :meth:`DiffResult.cell_stats`, computed a few layers at a time.

The sample of one group in float64 is ``[s, L, O, D]`` — 354 MB for 512 pairs of one SmolLM2-135M hook —
and the quantiles sort a copy of ``|Δ|/σ`` (values and int64 indices): taken whole, one call held
about 2 GB of temporaries. Every number here is per (layer, offset, dimension) or per (pair, layer,
offset), so layer chunks give the same numbers with a bounded peak (and faster, in cache).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Bool, Float

from ..stats import F64, masked_quantiles
from .config import QUANTILES

CHUNK_ELEMENTS = 1 << 23  # float64 values of the sample per chunk (64 MB)


def sample_stats(sd: Float[torch.Tensor, "s O L D"], sv: Bool[torch.Tensor, "s O"], inv: Float[torch.Tensor, "L O D"],
                 S: Float[torch.Tensor, "L O D"], threshold: float, grid: Sequence[float] | None
                 ) -> dict[str, torch.Tensor]:
    """Of the sampled Δ ``sd`` (any float dtype) with validity ``sv``: quantiles (:data:`QUANTILES`) of
    ``|Δ|·inv`` over the valid pairs (``q`` ``[len(QUANTILES), L, O, D]``), how many are under ``threshold``
    (``under`` ``[L, O, D]``) and under each value of ``grid`` (``below`` ``[T, L, O, D]``, when given),
    and per pair ``Δ·S`` and ``‖Δ‖²`` (``dot``, ``dd`` ``[s, L, O]``)."""
    s, O, L, D = sd.shape  # noqa: E741
    step = max(1, CHUNK_ELEMENTS // max(1, s * O * D))
    valid4 = sv[:, None, :, None]
    parts: dict[str, list[torch.Tensor]] = {"q": [], "under": [], "below": [], "dot": [], "dd": []}
    for a in range(0, L, step):
        b = min(L, a + step)
        x = sd[:, :, a:b].to(F64).permute(0, 2, 1, 3)  # [s, l, O, D]
        z = x.abs() * inv[a:b]
        parts["q"].append(masked_quantiles(z, valid4 & ~torch.isnan(z), QUANTILES))
        under = ((z < threshold) & valid4).to(F64).sum(0)
        parts["under"].append(under)
        if grid is not None:
            parts["below"].append(torch.stack([under if t == threshold else ((z < t) & valid4).to(F64).sum(0)
                                               for t in grid]))
        del z
        parts["dot"].append((x * S[a:b]).sum(-1))
        parts["dd"].append((x * x).sum(-1))
    out = {"q": torch.cat(parts["q"], 1), "under": torch.cat(parts["under"], 0), "dot": torch.cat(parts["dot"], 1),
           "dd": torch.cat(parts["dd"], 1)}
    if grid is not None:
        out["below"] = torch.cat(parts["below"], 1)
    return out
