"""Sums over sets of state rows about one shift: what every group's moments are made from
(:meth:`eclens.diff.DiffResult.cell_stats`)."""

from __future__ import annotations

import torch
from jaxtyping import Float

from ..stats import F64


def weighted_sums(f: Float[torch.Tensor, "O C F L D"], K: Float[torch.Tensor, "2 O C L D"],
                  k0: Float[torch.Tensor, "2 O L D"], count: Float[torch.Tensor, "C O"], W: Float[torch.Tensor, "G C"],
                  out: torch.Tensor | None = None) -> Float[torch.Tensor, "O G F X"]:
    """``[O, G, 7, L·D]``: per row set (weights ``W`` ``[G, C]``) the sums of Δ and of Δ² and of the clean
    activation and its square about ``k0`` (features 0-3; each row's own sums ``f`` are about its shift ``K``),
    and the unshifted feature sums (``delta_abs``, ``delta_sign``, ``delta_nonzero``). Each row's sums are
    recentred with recentre()'s algebra and rounding, a layer at a time, then summed over the rows by one matrix
    product per layer: ~5 MB of working arrays at 40 state rows, reused layer after layer (a whole hook at once
    was ~500 MB of fresh pages per hook, most of the finishing time's page faults), and a layer's sums made by
    the same calls whatever layers the state holds: an alias's own layers (:mod:`eclens.diff.aliases`) give
    its source's numbers bit for bit (with three layers a product, SmolLM2-135M's mean directions differed in
    the last bits of some float32 values). ``f`` may be a strided view of the stream's stage. ``out``: a buffer
    of that shape to fill (a forgotten hook's: the same pages again, not fresh ones)."""
    O, C, F, L, D = f.shape  # noqa: E741
    X = L * D
    Kv = K.view(2, O, C, X)
    k0 = k0.view(2, O, X)
    cnt = count.T.to(F64)  # [O, C]
    shape = (O, W.shape[0], F, X)
    if out is None or tuple(out.shape) != shape:
        out = torch.empty(shape, dtype=F64)
    fc = torch.empty((C, F, D), dtype=F64)
    for o in range(O):
        n = cnt[o][:, None]
        for layer in range(L):
            x0, x1 = layer * D, (layer + 1) * D
            fc.copy_(f[o, :, :, layer])
            dks = Kv[:, o, :, x0:x1].to(F64) - k0[:, o, None, x0:x1]  # [2, C, x]
            for w in (0, 1):
                dk, s1 = dks[w], fc[:, 2 * w]
                t = torch.mul(dk, s1).mul_(2)  # 2·dk·s1: scaling by 2 is exact in either order
                ndk = n * dk
                t += ndk * dk
                fc[:, 2 * w + 1] += t
                s1 += ndk
            out[o, :, :, x0:x1] = torch.matmul(W, fc.view(C, -1)).view(-1, F, x1 - x0)
    return out
