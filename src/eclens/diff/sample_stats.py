"""The pair-sample numbers of :meth:`DiffResult.cell_stats`, computed a few layers at a time.

The quantiles and threshold counts of ``|Δ|/σ`` are order statistics of ``|Δ|`` itself: ``z = |Δ|·(1/σ)`` is
a non-decreasing function of ``|Δ|`` in float64 (rounding is monotone), so sorting ``|Δ|`` sorts ``z``. The
sample holds ``Δ`` in float16, and a non-negative float sorts as its bit pattern read as a signed integer, so
each cell's pairs are sorted as 16-bit integers (a quarter of the time of a float64 sort, an eighth of the
bytes) and only the few picked values are turned into ``z``, each exactly as ``|Δ|·(1/σ)`` in float64: the
numbers are the ones a float64 sort of ``z`` gives, bit for bit. Every number here is per (layer, offset,
dimension) or per (pair, layer, offset), so layer chunks give the same numbers with a bounded peak.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from jaxtyping import Bool, Float, Int

from ..blas import one_blas_thread
from ..stats import F64, sort_last_, sorted_quantiles
from .config import QUANTILES

CHUNK_ELEMENTS = 1 << 21  # values of the sample per chunk (in float64, 16 MB: under glibc's mmap threshold, reused)
_BITS = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32,
         torch.float64: torch.int64}


def _inf_bits(ftype: torch.dtype) -> int:
    """The bit pattern of +inf in ``ftype``, read as its integer type (:data:`_BITS`)."""
    return int(torch.tensor(float("inf"), dtype=ftype).view(_BITS[ftype]))


def _scratch(work: dict | None, name: str, shape: tuple[int, ...], dtype: torch.dtype, device) -> torch.Tensor:
    """An uninitialised ``shape`` array: a view of ``work``'s buffer ``name`` when it is large enough (then
    grown), so that chunk after chunk and call after call write the same pages. Fresh pages cost a page fault
    each (the kernel zeroes them): a new 16 MB block per chunk was half a million faults per diff run."""
    n = math.prod(shape)
    if work is None:
        return torch.empty(shape, dtype=dtype, device=device)
    buf = work.get(name)
    if buf is None or buf.numel() < n or buf.dtype != dtype or buf.device != torch.device(device):
        buf = work[name] = torch.empty(n, dtype=dtype, device=device)
    return buf[:n].view(shape)


def sample_stats(sd: Float[torch.Tensor, "r O L D"], rows: Int[torch.Tensor, " s"], sv: Bool[torch.Tensor, "s O"],
                 inv: Float[torch.Tensor, "L O D"], S: Float[torch.Tensor, "L O D"],
                 bound: Int[torch.Tensor, "L O D"], ranks: Sequence[int] | None = None, work: dict | None = None
                 ) -> dict[str, torch.Tensor]:
    """Of the sampled Δ ``sd[rows]`` (any float dtype; rows taken a chunk at a time, so the group's sample is
    never copied whole) with validity ``sv``: quantiles (:data:`QUANTILES`) of
    ``|Δ|·inv`` over the valid pairs (``q`` ``[len(QUANTILES), L, O, D]``), how many are under a threshold
    (``bound``: its :func:`threshold_bounds`; ``under`` ``[L, O, D]``), and per pair ``Δ·S`` and ``‖Δ‖²``
    (``dot``, ``dd`` ``[s, L, O]``). ``ranks``: per offset a rank ``m`` (1-based); ``ranked`` ``[L, O, D]`` is
    then each cell's ``m``-th smallest ``|Δ|·inv`` (+inf past the valid values, NaN where that value is a NaN
    ``Δ``; -inf where ``m`` is 0): at least ``m`` values are under a threshold ``t`` exactly when it is under
    ``t``, so one number per cell says the count test of every threshold. A NaN ``Δ`` is left out of its cell;
    a cell whose ``inv`` is NaN (σ = 0) has NaN quantiles and zero counts. ``work``: a dict in which to keep the
    chunk buffers for the next call (:func:`_scratch`)."""
    O, L, D = sd.shape[1:]  # noqa: E741
    s = len(rows)
    dev = sd.device
    step = max(1, CHUNK_ELEMENTS // max(1, s * O * D))
    gone = torch.nonzero(~sv)  # (pair, offset) without a value: few (offsets past a sentence's end)
    n_valid = sv.sum(0).tolist()  # [O]
    itype = _BITS[sd.dtype]
    inf_bits = _inf_bits(sd.dtype)
    # the outputs made once and filled a chunk at a time (a list of parts and a concatenation made each twice)
    out = {"q": torch.empty((len(QUANTILES), L, O, D), dtype=F64, device=dev),
           "under": torch.empty((L, O, D), dtype=F64, device=dev),
           "dot": torch.empty((s, L, O), dtype=F64, device=dev), "dd": torch.empty((s, L, O), dtype=F64, device=dev)}
    if ranks is not None:
        out["ranked"] = torch.empty((L, O, D), dtype=F64, device=dev)
    for a in range(0, L, step):
        b = min(L, a + step)
        xh = torch.index_select(sd[:, :, a:b], 0, rows, out=_scratch(work, "xh", (s, O, b - a, D), sd.dtype, dev))
        # Δ in float64, pair-minor [l, O, s, D] (D contiguous on both sides) for the dot products
        x = _scratch(work, "x", (b - a, O, s, D), F64, dev)
        x.copy_(xh.permute(2, 1, 0, 3))
        if dev.type == "cpu":  # numpy's stacked matrix-vector products: a quarter of torch.matmul's time here
            with one_blas_thread():  # (free inside the table build, which holds it: tables.all_tables)
                dot = torch.from_numpy(np.matmul(x.numpy(), S[a:b, :, :, None].numpy()))
        else:
            dot = torch.matmul(x, S[a:b, :, :, None])
        out["dot"][:, a:b] = dot[..., 0].permute(2, 0, 1)  # [s, l, O]
        out["dd"][:, a:b] = (torch.linalg.vector_norm(x, dim=-1) ** 2).permute(2, 0, 1)
        # |Δ|'s bits, pair-major [l, O, D, s]; a missing pair sorts as +inf, after every valid value and
        # before every NaN (whose bits, sign cleared by abs, exceed +inf's)
        xh.abs_()
        if len(gone):  # +inf, as whole rows of xh (a mask over u, broadcast over every value, cost ten times more)
            xh[gone[:, 0], gone[:, 1]] = float("inf")
        u = _scratch(work, "u", (b - a, O, D, s), itype, dev)
        u.copy_(xh.view(itype).permute(2, 1, 3, 0))
        u = sort_last_(u)
        iv = inv[a:b]
        ok = iv > 0  # False where σ = 0 (inv NaN)
        nan_count = None
        if s and bool((u[..., -1] > inf_bits).any()):  # NaN bits sort last: a cell has one if its last has
            nan_count = (u > inf_bits).sum(-1)
        _quantiles(u, sd.dtype, iv, ok, n_valid, nan_count, out["q"][:, a:b])
        out["under"][a:b] = torch.searchsorted(u, bound[a:b, ..., None])[..., 0]  # values under the bound
        if ranks is not None:
            _ranked(u, sd.dtype, iv, ok, ranks, out["ranked"][a:b])
    return out


def stable_rank(n: int, frac: float) -> int:
    """The least count ``m`` of ``n`` pairs with ``m / n >= frac`` in float64 (the test a fraction of the pairs
    under a threshold meets, as :meth:`DiffResult.cell_stats`'s ``frac_under`` is compared); ``n + 1`` where no
    count meets it and 1 where ``n`` is 0 (no pair: every value missing, +inf)."""
    if n == 0:
        return 1
    m = min(n + 1, max(0, math.ceil(frac * n)))
    while m > 0 and (m - 1) / n >= frac:  # float rounding of frac·n: step to the exact least count
        m -= 1
    while m <= n and not m / n >= frac:
        m += 1
    return m


def _ranked(u: torch.Tensor, ftype: torch.dtype, inv: torch.Tensor, ok: torch.Tensor, ranks: Sequence[int],
            out: torch.Tensor) -> None:
    """Write into ``out`` ``[l, O, D]`` the ``z`` of each cell's ``ranks[o]``-th smallest sorted value (missing
    pairs sort as +inf after the valid values, NaN ``Δ`` after them), -inf where the rank is 0, NaN where
    not ``ok``."""
    s = u.shape[-1]
    vals = u.view(ftype)
    for o, m in enumerate(ranks):
        if m == 0:
            out[:, o].fill_(-math.inf)
        elif m > s:
            out[:, o].fill_(math.inf)
        else:
            torch.mul(vals[:, o, :, m - 1], inv[:, o], out=out[:, o])
    if not bool(ok.all()):
        out.masked_fill_(~ok, math.nan)


def _z(bits: torch.Tensor, ftype: torch.dtype, inv: torch.Tensor) -> torch.Tensor:
    """``|Δ|·inv`` in float64 of sorted bit patterns (as the float64 sort of ``z`` holds them)."""
    return bits.view(ftype).to(F64) * inv


def _quantiles(u: torch.Tensor, ftype: torch.dtype, inv: torch.Tensor, ok: torch.Tensor, n_valid: list[int],
               nan_count: torch.Tensor | None, out: torch.Tensor) -> None:
    """Write into ``out`` :data:`QUANTILES` ``[Q, l, O, D]`` of ``z`` over each cell's first ``k`` sorted values
    (linear interpolation, as ``torch.quantile``); ``k`` is the offset's valid pairs less the cell's NaN ``Δ``,
    0 where not ``ok`` (then NaN)."""
    nan = float("nan")
    if nan_count is not None:  # k differs between cells (rare: a NaN Δ): every value as z, positions per cell
        k = torch.tensor(n_valid, device=u.device)[None, :, None] - nan_count
        out.copy_(sorted_quantiles(_z(u, ftype, inv[..., None]), torch.where(ok, k, 0), QUANTILES))
        return
    # k is the offset's count in every cell with σ > 0: per (offset, quantile) the one or two columns of the
    # sorted values, turned into z straight into ``out`` (one gather of every position and its float64 copies
    # were most of the cost of a small group)
    s = u.shape[-1]
    if s == 0:  # no sampled pair
        out.fill_(nan)
        return
    vals = u.view(ftype)
    for o, k in enumerate(n_valid):
        if k == 0:
            out[:, :, o].fill_(nan)
            continue
        iv = inv[:, o]
        for j, q in enumerate(QUANTILES):
            p = (k - 1) * q
            i = int(p // 1)
            f = p - i
            za = out[j, :, o]
            torch.mul(vals[:, o, :, i], iv, out=za)  # |Δ|·inv in float64, as _z
            if f > 0:  # za + (zb - za)·f; where f = 0, za itself (inf - inf would be NaN)
                zb = torch.mul(vals[:, o, :, min(i + 1, s - 1)], iv)
                za.copy_(zb.sub_(za).mul_(f).add_(za))
    if not bool(ok.all()):
        out.masked_fill_(~ok, nan)


def threshold_bounds(inv: Float[torch.Tensor, "L O D"], ts: Sequence[float], ftype: torch.dtype
                     ) -> Int[torch.Tensor, "L O D T"]:
    """Per cell and threshold ``t``, the bit pattern of the least non-negative ``v`` of ``ftype`` (the sample's
    dtype) whose ``v·inv`` (float64) is at least ``t``: the sorted values under it are exactly those with
    ``z < t``. 0 where ``inv`` is NaN (σ = 0: no value counts). Starts from ``t/inv`` rounded to ``ftype`` and
    steps to the exact boundary (a step or two: float64 rounding moves it far less than a step of ``ftype``).
    The same for every group of a hook (``inv`` is the whole dataset's)."""
    itype = _BITS[ftype]
    inf_bits = _inf_bits(ftype)
    t = torch.tensor([float(x) for x in ts], dtype=F64, device=inv.device)
    inv = inv[..., None]
    ok = (inv > 0).expand(*inv.shape[:-1], len(t))
    c = torch.where(ok, t / inv, 0).to(ftype).view(itype).to(torch.int64).clamp(0, inf_bits)

    def at_least(c: torch.Tensor) -> torch.Tensor:
        return _z(c.to(itype), ftype, inv) >= t

    while True:  # step down while the value below still reaches t
        down = ok & (c > 0) & at_least(c - 1)
        if not bool(down.any()):
            break
        c -= down.to(torch.int64)
    while True:  # step up while this value is under t (+inf's bits always reach it)
        up = ok & ~at_least(c)
        if not bool(up.any()):
            break
        c += up.to(torch.int64)
    return c.to(itype).contiguous()
