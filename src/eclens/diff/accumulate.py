"""The streaming state of a diff run: one :class:`GroupAccumulator` per hook group inside a
:class:`DiffAccumulator`. Both follow one protocol, as baukit's ``runningstats`` does: ``update`` (a batch),
``merge`` (another accumulator's state, exact algebra) and ``state_dict``/``load_state_dict``."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Bool, Float, Int

from ..bootstrap import split_half
from ..errors import EclensError
from ..hooks import (
    HookGroup,
)
from ..pairs import AlignedPair
from ..roles import cluster_of
from ..stats import (
    F64,
    BottomK,
    PowerSums,
    group_onehot,
    item_key,
)
from .aliases import Alias, stored_group
from .config import ALL, DiffConfig, direction_label
from .logprobs import metric_rows, pair_info

if TYPE_CHECKING:
    from .result import DiffResult


FEATURES = ("delta_s1", "delta_s2", "clean_s1", "clean_s2", "delta_abs", "delta_sign", "delta_nonzero")
SCALARS = ("l2", "rel_l2", "cos")
HEAD_SCALARS = ("rel_l2", "cos")


def recentre(feat: Float[torch.Tensor, "O C F L D"], n: Float[torch.Tensor, "O C 1 1"],
             old: Float[torch.Tensor, "2 O C L D"], new: Float[torch.Tensor, "2 O C L D"]) -> None:
    """Re-express in place the shifted power sums in ``feat`` (features ``2w``, ``2w+1`` about shift ``w``)
    about ``new`` instead of ``old``, for ``n`` terms — exact algebra, the one the flush and the merge share:
    ``Σ(x-K') = Σ(x-K) + n(K-K')``, ``Σ(x-K')² = Σ(x-K)² + 2(K-K')Σ(x-K) + n(K-K')²``."""
    for w in (0, 1):
        dk = old[w] - new[w]
        s1, s2 = feat[:, :, 2 * w], feat[:, :, 2 * w + 1]
        s2 += 2 * dk * s1 + n * dk * dk
        s1 += n * dk


class GroupAccumulator:
    """The accumulators of one hook group.

    ``feat`` ``[O, C, F, L, D]`` (float64) holds, per offset, category, feature, layer and
    dimension, the sums of :data:`FEATURES` over pairs: ``Δ - K_Δ`` and its square,
    ``clean - K_clean`` and its square (shifted power sums, :class:`eclens.stats.PowerSums`
    algebra, shifts in ``shift`` ``[2, O, C, L, D]``, set per cell from the first batch that
    has it), ``|Δ|``, ``sign(Δ)`` and ``[Δ != 0]``.

    Speed: the streaming pass is bound by memory traffic, so a batch is reduced a chunk of
    layers at a time (one layer on the CPU: its features fit in the core's cache; all
    layers at once on a GPU, where kernel launches cost more than traffic). A chunk's
    features go into a ``[O, B, F, lc, D]`` buffer and are added to their state rows in one
    operation, no Python loop over pairs: a scatter-add on the CPU (a pair invalid at an
    offset goes to the spare row ``C``), the one-hot row matrix times the validity mask on a
    GPU. The buffer and the staged sums (``stage``, chunk-major ``[L/lc, O, C + 1, F·lc·D]``)
    are float32 — exact subtraction about
    a float32 shift per (offset, row, layer, dimension), squares and sums of at most ~256
    terms (``DiffAccumulator.flush_pairs``; TF32 is switched off for these products) — and
    go into the float64 totals at every flush. The statistics agree with a float64 brute
    force to ~1e-7 relative (see the tests).
    """

    # Features per chunk that stay in a CPU core's cache (float32 elements of the [O, B, F, lc, D] buffer).
    cpu_chunk_elems = 1 << 19

    def __init__(self, g: HookGroup, C: int, n_off: int, S: int, device, sample_dtype=torch.float16,
                 host_sample: bool = False):
        L, D, O = len(g.layers), g.width, n_off  # noqa: E741
        self.g = g
        self.C, self.O, self.L, self.D = C, O, L, D
        device = torch.device(device)
        self.device = device
        self.wd = torch.float32
        self.lc = L  # layers per chunk, fixed by the first batch (_chunk)
        # The float64 totals are made at the first flush (the first batch's sums, no zero pass before).
        self.feat: torch.Tensor | None = None
        self.stage: torch.Tensor | None = None
        self.staged = False  # the stage holds sums not yet in feat (a flush without is free)
        self.stale = False  # the stage holds sums already in feat: zero it before the next batch adds to it
        # Shifts per (offset, row): set from the first batch where the row has the offset, then fixed (the
        # float64 algebra of DiffResult re-expresses every row about one shift; merges do the same).
        self.shift = torch.zeros((2, O, C, L, D), dtype=F64, device=device)
        self.shift_set = torch.zeros((O, C), dtype=torch.bool)
        self._shift_ch: torch.Tensor | None = None
        # Per-pair scalars (SCALARS), one accumulator with a feature axis: fewer, larger operations.
        self.scalars = PowerSums.zeros(C, (len(SCALARS), O, L), None, device)
        H = g.n_heads
        self.heads = PowerSums.zeros(C, (len(HEAD_SCALARS), O, L, H), None, device) if H else None
        # The pair sample is the largest part of the state (float16 [S, O, L, D]: 3.4 GB for Llama-3-8B's
        # default hooks). On a GPU it lives in host memory, filled by asynchronous copies of each batch's
        # sampled rows from pinned buffers: a device copy would cost its allocation plus one blocking
        # device-to-host transfer of the whole sample at the end of every call. Unfilled slots are
        # zeroed only when the state is read (DiffAccumulator.state_dict), not page by page up front.
        self.host_sample = host_sample
        self.sample_delta = (torch.empty((S, O, L, D), dtype=sample_dtype) if host_sample
                             else torch.zeros((S, O, L, D), dtype=sample_dtype, device=device))
        self._sample_queue: list[tuple[Any, torch.Tensor, torch.Tensor]] = []
        self.sample_scalars = {k: torch.full((S, O, L), float("nan"), dtype=torch.float32, device=device)
                               for k in ("rel_l2", "cos")}
        self.shared_buffers: dict = {}

    def _chunk(self, B: int) -> int:
        """Layers per chunk: all on a GPU; on the CPU the most that keep a chunk's features in cache (a divisor of L)."""
        if self.device.type != "cpu":
            return self.L
        per_layer = self.O * B * len(FEATURES) * self.D
        lc = max(1, min(self.L, self.cpu_chunk_elems // max(per_layer, 1)))
        while self.L % lc:
            lc -= 1
        return lc

    def _new_stage(self, lc: int) -> None:
        nch = self.L // lc
        self.lc = lc
        with torch.inference_mode(False):  # the state must stay a normal tensor (it is updated outside the loop too)
            self.stage = torch.zeros((nch, self.O, self.C + 1, len(FEATURES) * lc * self.D), dtype=self.wd,
                                     device=self.device)
        self._sync_shift()

    def _sync_shift(self) -> None:
        """The work-dtype shifts chunk- and row-major ``[2, L/lc, C, O, lc, D]``: a pair's shift for a chunk is one
        contiguous row."""
        nch, lc = self.L // self.lc, self.lc
        if not bool(self.shift_set.any()):  # the first stage of a run: every shift still 0 (no 28 MB copy per group)
            self._shift_ch = torch.zeros((2, nch, self.C, self.O, lc, self.D), dtype=self.wd, device=self.device)
            return
        sh = self.shift.to(self.wd).view(2, self.O, self.C, nch, lc, self.D)
        self._shift_ch = sh.permute(0, 3, 2, 1, 4, 5).contiguous()

    def _stage_as_feat(self) -> torch.Tensor:
        """The staged sums as a ``[O, C, F, L/lc, lc, D]`` view (strided)."""
        st = self.stage[:, :, :self.C].unflatten(-1, (len(FEATURES), self.lc, self.D))  # row C: invalid offsets' sums
        return st.permute(1, 2, 3, 0, 4, 5)  # [O, C, F, nch, lc, D]

    def _buffer(self, B: int, lc: int) -> torch.Tensor:
        # One buffer for all groups of the same shape (they are reduced one after the other).
        key = (B, self.O, lc, self.D, self.wd, self.device)
        buf = self.shared_buffers.get(key)
        if buf is None:
            for k in [k for k in self.shared_buffers if k[0] != B]:  # a new batch size: drop the old ones
                del self.shared_buffers[k]
            buf = self.shared_buffers[key] = torch.empty((self.O, B, len(FEATURES), lc, self.D), dtype=self.wd,
                                                         device=self.device)
        return buf

    def flush(self, final: bool = False) -> None:
        """Add the staged sums to the float64 totals. The first flush keeps them in the stage's dtype: they are
        that dtype's numbers, so a run that flushes once (up to :attr:`DiffAccumulator.flush_pairs` pairs per
        state row, e.g. ``ec run``'s 225) never makes the float64 copy, half the pages the kernel zeroes (its
        readers convert: :func:`eclens.diff.row_sums.weighted_sums`, :meth:`merge_state`, :meth:`load_state_dict`).
        ``final`` (no batch follows): such a first flush hands the stage itself over as the totals, a strided
        view, instead of copying it into new pages (~0.1 s and ~100 MB per hook group for SmolLM2-135M's 40
        state rows); a later batch makes a new stage, and the next flush copies the view into float64 totals."""
        O, C, L, D = self.O, self.C, self.L, self.D  # noqa: E741
        if self.feat is None:
            if self.stage is not None and final and self.staged and 1 in (self.lc, L // self.lc):
                self.feat = self._stage_as_feat().flatten(3, 4)  # [O, C, F, L, D], a view (one of the two is 1)
                self.stage, self.staged, self.stale = None, False, False
                return
            with torch.inference_mode(False):  # a normal tensor, as the stage
                self.feat = (torch.zeros((O, C, len(FEATURES), L, D), dtype=F64, device=self.device)
                             if self.stage is None else
                             torch.empty((O, C, len(FEATURES), L, D), dtype=self.wd, device=self.device))
            if self.stage is not None:
                self.feat.view(O, C, len(FEATURES), L // self.lc, self.lc, D).copy_(self._stage_as_feat())
        elif self.stage is not None and self.staged:
            if self.feat.dtype != F64 or not self.feat.is_contiguous():  # a handed-over stage: copied once
                with torch.inference_mode(False):
                    self.feat = self.feat.to(F64, memory_format=torch.contiguous_format)
            self.feat.view(O, C, len(FEATURES), L // self.lc, self.lc, D).add_(self._stage_as_feat())
        if self.stage is not None and self.staged:
            self.stale = True  # zeroed by the next batch, if one comes (the last flush of a run needs none)
        self.staged = False

    def _set_shifts(self, xl: torch.Tensor, Wo: torch.Tensor, new_shift: list[tuple[int, int]]) -> None:
        """Shift the (offset, row) cells seen for the first time about their pairs' mean in this batch, in the work
        dtype, so that ``x - K`` is exact near ``K``. ``xl``: the batch layer-major ``[L, 2B, O, D]``."""
        B = xl.shape[1] // 2
        nch, lc = self.L // self.lc, self.lc
        for o in sorted({o for o, _ in new_shift}):
            cells = [c for oo, c in new_shift if oo == o]
            w = Wo[o, cells]  # [k, B]
            clean = xl[:, :B, o].to(self.wd)  # [L, B, D]
            k = torch.stack([torch.einsum("kb,lbd->kld", w, xl[:, B:, o].to(self.wd) - clean),
                             torch.einsum("kb,lbd->kld", w, clean)], 1) / w.sum(1)[:, None, None, None]
            # k [cells, 2, L, D], float32 as the staged sums, into each cell's row (one copy, not one per cell)
            idx = torch.tensor(cells, dtype=torch.long, device=self.device)
            self.shift[:, o].index_copy_(1, idx, k.transpose(0, 1).to(F64))
            self._shift_ch[:, :, :, o].index_copy_(2, idx, k.view(len(cells), 2, nch, lc, self.D).permute(1, 2, 0, 3, 4))
            self.shift_set[o, cells] = True

    def update(self, X: Float[torch.Tensor, "two_b O L *rest"], cat: Int[torch.Tensor, " b"],
               W: Float[torch.Tensor, "C b"], Wo: Float[torch.Tensor, "O C b"], m3: Float[torch.Tensor, "b O 1"],
               new_shift: list[tuple[int, int]], slots: torch.Tensor | None, items: torch.Tensor | None,
               slots_cpu: torch.Tensor | None = None) -> None:
        """``X`` ``[2B, O, L, *rest]``; ``W`` one-hot ``[C, B]`` (float64), ``Wo`` ``[O, C, B]`` = ``W`` x validity
        (work dtype), ``m3`` validity ``[B, O, 1]`` (float64); ``new_shift``: the (offset, category) cells
        seen for the first time; ``slots``/``items``: which batch items enter which sample slots."""
        B = X.shape[0] // 2
        O, L, D = self.O, self.L, self.D  # noqa: E741
        # Layer-major [L, 2B, O, D]: the gatherer's own layout (a view of its buffer, no copy).
        xl = X.reshape(2 * B, O, L, D).movedim(2, 0)
        if not xl.is_contiguous():
            xl = xl.contiguous()
        if self.stage is None:
            self._new_stage(self._chunk(B))
        elif self.stale:
            self.stage.zero_()
        self.stale = False
        self.staged = True
        if new_shift:
            self._set_shifts(xl, Wo, new_shift)
        lc = self.lc
        buf = self._buffer(B, lc)
        H = self.g.n_heads
        norms = torch.empty((L, 3, B, O), dtype=self.wd, device=self.device)  # ‖Δ‖, ‖clean‖, ‖changed‖
        norms_h = torch.empty((L, 3, B, O, H), dtype=self.wd, device=self.device) if H else None
        d_, dk, dk2, ck, ck2 = (buf[:, :, i] for i in (4, 0, 1, 2, 3))  # [O, B, lc, D] views
        # The sampled pairs' Δ [k, O, L, D], taken chunk by chunk from Δ while it is in cache.
        smp = None if slots is None else torch.empty((len(items), O, L, D), dtype=self.sample_delta.dtype,
                                                     device=self.device)
        every = (smp is not None and self.device.type == "cpu" and len(items) == B  # (no device sync on a GPU)
                 and bool((items == torch.arange(B)).all()))
        if self.device.type == "cpu":
            # Each (offset, pair) adds its features to its state row, or to the spare row C where the offset is
            # invalid: a scatter-add does B rows of work where the one-hot product did C·B (it is FLOP-bound on a
            # CPU); on a GPU the product has FLOPs to spare and, unlike atomic scatters, a fixed summation order.
            ok = Wo.sum(1) > 0  # [O, B]
            dest = torch.arange(O, device=cat.device)[:, None] * (self.C + 1) + torch.where(ok, cat, self.C)
            dest = dest.reshape(-1)
        for j in range(L // lc):
            xc = xl[j * lc:(j + 1) * lc]  # [lc, 2B, O, D]
            if xc.dtype != self.wd:
                xc = xc.to(self.wd)
            clean, cor = xc[:, :B].permute(2, 1, 0, 3), xc[:, B:].permute(2, 1, 0, 3)  # [O, B, lc, D]
            kd = self._shift_ch[0, j].index_select(0, cat).transpose(0, 1)  # [O, B, lc, D]
            kc = self._shift_ch[1, j].index_select(0, cat).transpose(0, 1)
            torch.sub(cor, clean, out=d_)
            torch.sub(d_, kd, out=dk)
            torch.mul(dk, dk, out=dk2)
            torch.sub(clean, kc, out=ck)
            torch.mul(ck, ck, out=ck2)
            sl = slice(j * lc, (j + 1) * lc)
            if H:
                torch.linalg.vector_norm(d_.unflatten(-1, (H, -1)), dim=-1, out=norms_h[sl, 0].permute(2, 1, 0, 3))
                torch.linalg.vector_norm(xc.unflatten(-1, (H, -1)), dim=-1, out=norms_h[sl, 1:].view(lc, 2 * B, O, H))
            else:
                torch.linalg.vector_norm(d_, dim=-1, out=norms[sl, 0].permute(2, 1, 0))
                torch.linalg.vector_norm(xc, dim=-1, out=norms[sl, 1:].view(lc, 2 * B, O))
            if smp is not None:
                smp[:, :, sl].copy_((d_ if every else d_.index_select(1, items)).transpose(0, 1))
            torch.sign(d_, out=buf[:, :, 5])
            torch.abs(buf[:, :, 5], out=buf[:, :, 6])
            d_.abs_()
            if self.device.type == "cpu":
                self.stage[j].view(O * (self.C + 1), -1).index_add_(0, dest, buf.view(O * B, -1))
            else:
                self.stage[j][:, :self.C].baddbmm_(Wo, buf.view(O, B, -1))
        # Per-pair scalars over the whole vector (and per head for per-head hooks), float64.
        if H:
            nh = norms_h.to(F64) ** 2  # [L, 3, B, O, H]
            dd_h, cc_h, xx_h = (nh[:, i].permute(1, 2, 0, 3) for i in range(3))  # [B, O, L, H]
            dd, cc, xx = dd_h.sum(-1), cc_h.sum(-1), xx_h.sum(-1)
        else:
            n2 = norms.to(F64) ** 2  # [L, 3, B, O]
            dd, cc, xx = (n2[:, i].permute(1, 2, 0) for i in range(3))  # [B, O, L]
        vals = self._scalars(dd, cc, xx)
        v = torch.stack([vals[k][0] for k in SCALARS], 1)  # [B, 3, O, L]
        mk = torch.stack([vals[k][1] for k in SCALARS], 1) * m3[:, None]
        self.scalars.update(torch.where(mk > 0, v, torch.zeros_like(v)), cat, mk, onehot=W)
        if H:
            hv = self._scalars(dd_h, cc_h, xx_h)
            v = torch.stack([hv[k][0] for k in HEAD_SCALARS], 1)  # [B, 2, O, L, H]
            mk = torch.stack([hv[k][1] for k in HEAD_SCALARS], 1) * m3[:, None, :, :, None]
            self.heads.update(torch.where(mk > 0, v, torch.zeros_like(v)), cat, mk, onehot=W)
        if slots is not None:
            if self.host_sample:
                self._queue_sample(smp, slots_cpu if slots_cpu is not None else slots.cpu())
            else:
                self.sample_delta.index_copy_(0, slots, smp)
            for k in ("rel_l2", "cos"):
                v, ok = vals[k]
                v = torch.where(ok > 0, v, torch.full_like(v, float("nan")))
                self.sample_scalars[k].index_copy_(0, slots, v.index_select(0, items).float())

    # Copies in flight before the Python thread waits for the oldest (pinned buffers of a batch's sampled rows).
    max_sample_queue = 4

    def _queue_sample(self, rows: torch.Tensor, slots_cpu: torch.Tensor) -> None:
        if rows.device.type == "cuda":
            host = torch.empty(rows.shape, dtype=rows.dtype, pin_memory=True)
            host.copy_(rows, non_blocking=True)
            done = torch.cuda.Event()
            done.record(torch.cuda.current_stream(rows.device))
        else:  # host_sample on a CPU model (tests): the same queue, nothing to wait for
            host, done = rows, None
        self._sample_queue.append((done, host, slots_cpu))
        self.drain_sample(wait=False)

    def drain_sample(self, wait: bool = True) -> None:
        """Write arrived rows into the host sample, oldest first (a later batch may overwrite a slot).
        ``wait=False`` stops at the first copy still in flight, unless too many are queued."""
        q = self._sample_queue
        while q:
            done, host, slots = q[0]
            if done is not None and not done.query():
                if not wait and len(q) <= self.max_sample_queue:
                    return
                done.synchronize()
            self.sample_delta.index_copy_(0, slots, host)
            q.pop(0)

    @staticmethod
    def merge_state(ta: dict[str, torch.Tensor], tb: dict[str, torch.Tensor], g: HookGroup) -> dict[str, torch.Tensor]:
        """The totals of two states (:meth:`state_dict`, after a flush) on disjoint pairs: both feature sums
        re-expressed about one shift (``a``'s where it has one) and added, the per-pair scalars merged.
        The pair sample is the caller's (:func:`merge_states`): it is shared by all groups."""
        s_ = g.suffix
        na, nb = ta["count"].T[:, :, None, None], tb["count"].T[:, :, None, None]  # [O, C, 1, 1]
        Ka, Kb = ta[f"{s_}/shift"], tb[f"{s_}/shift"]
        seta, setb = ta[f"{s_}/shift_set"].bool(), tb[f"{s_}/shift_set"].bool()
        K = torch.where(seta[None, :, :, None, None], Ka, Kb)  # [2, O, C, L, D]
        fa, fb = ta[f"{s_}/feat"].to(F64, copy=True), tb[f"{s_}/feat"].to(F64, copy=True)  # either may be float32
        recentre(fb, nb, Kb, K)
        recentre(fa, na, Ka, K)  # adds zeros where a had its own shift
        out = {f"{s_}/feat": fa + fb, f"{s_}/shift": K, f"{s_}/shift_set": seta | setb}
        ps_keys = [f"{s_}/scalars"] + ([f"{s_}/head_scalars"] if g.n_heads else [])
        for key in ps_keys:
            pa = PowerSums.from_state_dict(ta, key + "/")
            pb = PowerSums.from_state_dict(tb, key + "/")
            if torch.equal(pa.shift, pb.shift):
                m = pa.merge_(pb)
            else:
                m = PowerSums.from_moments(pa.moments().merge(pb.moments()))
            out.update(m.state_dict(key + "/"))
        return out

    @staticmethod
    def _scalars(dd, cc, xx):
        """‖Δ‖, ‖Δ‖/‖a_clean‖ and cos(a_clean, a_corrupt) = (‖c‖² + ‖x‖² - ‖Δ‖²) / (2‖c‖‖x‖), with validity."""
        ok_c = (cc > 0).to(F64)
        ok_cx = ((cc > 0) & (xx > 0)).to(F64)
        rel = dd.sqrt() / cc.clamp_min(1e-300).sqrt()
        cos = ((cc + xx - dd) / (2 * (cc * xx).clamp_min(1e-300).sqrt())).clamp(-1, 1)
        return {"l2": (dd.sqrt(), torch.ones_like(dd)), "rel_l2": (rel, ok_c), "cos": (cos, ok_cx)}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Call :meth:`flush` first."""
        self.drain_sample()
        s = self.g.suffix
        out = {f"{s}/feat": self.feat, f"{s}/shift": self.shift, f"{s}/shift_set": self.shift_set}
        out.update(self.scalars.state_dict(f"{s}/scalars/"))
        if self.heads is not None:
            out.update(self.heads.state_dict(f"{s}/head_scalars/"))
        out[f"{s}/sample_delta"] = self.sample_delta
        for k, v in self.sample_scalars.items():
            out[f"{s}/sample_{k}"] = v
        return out

    def load_state_dict(self, d: dict[str, torch.Tensor]) -> None:
        s = self.g.suffix
        dev = self.sample_delta.device
        self.feat = d[f"{s}/feat"].to(dev, F64, memory_format=torch.contiguous_format, copy=True)
        self.stage = None  # made by the next batch
        self.staged = False
        self.shift = d[f"{s}/shift"].to(dev, F64).clone()
        self.shift_set = d[f"{s}/shift_set"].to("cpu", torch.bool).clone()
        self.scalars = PowerSums.from_state_dict(d, f"{s}/scalars/", dev)
        if self.heads is not None:
            self.heads = PowerSums.from_state_dict(d, f"{s}/head_scalars/", dev)
        self._sample_queue = []
        self.sample_delta = d[f"{s}/sample_delta"].to(dev).clone()
        for k in self.sample_scalars:
            self.sample_scalars[k] = d[f"{s}/sample_{k}"].to(dev).clone()


@contextlib.contextmanager
def exact_fp32_matmul():
    """Full-precision float32 matrix products inside (TF32 would round the staged sums to ~1e-3)."""
    old = torch.get_float32_matmul_precision()
    if old != "highest":
        torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        if old != "highest":
            torch.set_float32_matmul_precision(old)


class DiffAccumulator:
    """The whole streaming state: one :class:`GroupAccumulator` per hook group, counts, the pair sample, pair rows."""

    def __init__(self, cfg: DiffConfig, groups: list[HookGroup], device, sample_dtype=torch.float16,
                 n_pairs: int | None = None, host_sample: bool | None = None, aliases: Sequence[Alias] = ()):
        """``groups``: the hook groups of the tables; ``aliases``: their layers read from another group's
        (:mod:`eclens.diff.aliases`), which this state does not hold."""
        self.cfg = cfg
        self.table_groups = groups
        self.aliases = list(aliases)
        by_hook = {a.hook: a for a in self.aliases}
        self.groups = [stored_group(g, by_hook.get(g.suffix)) for g in groups]  # what the state holds
        groups = self.groups
        self.device = torch.device(device)
        # State rows: one per (category, swap direction, half) cell (cfg.rows); categories, directions, halves
        # and ``all`` are merges of rows (exact algebra), so every group is mergeable and none is stored twice.
        self.row_index = {r: i for i, r in enumerate(cfg.rows)}
        self.C = len(self.row_index)
        self.O = len(cfg.offsets)
        # A sample slot per pair at most: with fewer pairs than sample_size every pair is kept
        # anyway, and a full-size buffer would cost memory, checkpoint and transfer time for nothing.
        S = min(cfg.sample_size, n_pairs) if n_pairs else cfg.sample_size
        self.cat_index = {c: i for i, c in enumerate(cfg.categories)}
        # The pair sample in host memory on a GPU (see GroupAccumulator); host_sample=True forces it (tests).
        self.host_sample = self.device.type == "cuda" if host_sample is None else bool(host_sample)
        self.acc = {g.suffix: GroupAccumulator(g, self.C, self.O, S, self.device, sample_dtype, self.host_sample)
                    for g in groups}
        shared: dict = {}
        for a in self.acc.values():
            a.shared_buffers = shared
        self.count = torch.zeros((self.C, self.O), dtype=F64, device=self.device)
        self.sample = BottomK.empty(S)
        self.sample_valid = torch.zeros((S, self.O), dtype=torch.bool, device=self.device)
        self.sample_cat = torch.full((S,), -1, dtype=torch.long, device=self.device)
        self.sample_ids: list[str | None] = [None] * S
        self.rows: list[dict] = []
        self.done: set[str] = set()
        self.model_entry: dict = {}
        self._row_terms = torch.zeros(self.C, dtype=torch.long)  # pairs per state row since the last flush
        self._pending: list[tuple[list[AlignedPair], dict[str, torch.Tensor], set[int]]] = []

    # A staged float32 sum holds at most flush_pairs terms: one per pair of its state row since the flush
    # (counted per row, not per batch: with a few dozen rows most runs flush only at the end, where a flush
    # every eight batches rewrote the float64 totals seven times in a 2,000-pair stream).
    flush_pairs = 256

    def flush(self, final: bool = False) -> None:
        """Staged sums into the float64 totals. No host sync. ``final``: no batch follows
        (:meth:`GroupAccumulator.flush`)."""
        for a in self.acc.values():
            a.flush(final)
        self._row_terms.zero_()

    def convert_pending(self) -> None:
        """Pending pair metrics (device tensors) into rows: one host transfer for many batches."""
        if self._pending:
            rows = metric_rows([(ps, m) for ps, m, _ in self._pending], self.cfg.offsets)
            flags = [i in ins for ps, _, ins in self._pending for i in range(len(ps))]
            pairs = [a for ps, _, _ in self._pending for a in ps]
            for a, r, f in zip(pairs, rows, flags):
                self.rows.append({**pair_info(a), **r, "in_sample": f})
            self._pending = []

    def category_index(self, a: AlignedPair) -> int:
        """The pair's state row (see :attr:`DiffConfig.rows`)."""
        cfg = self.cfg
        cat = cfg.category_of(a.category) if cfg.categories else ALL
        if not cfg.cells:
            return self.cat_index[cat] if cfg.categories else 0
        key = (cat, direction_label(a), split_half(cluster_of(a), cfg.seed))
        try:
            return self.row_index[key]
        except KeyError:
            raise EclensError(f"pair {a.id!r}: category {cat!r} with swap direction {key[1]!r} is not among the "
                              "run's cells; resolve the cells on the whole dataset (resolve_cells)") from None

    def update(self, pairs: Sequence[AlignedPair], acts: dict[str, Float[torch.Tensor, "two_b O L *rest"]],
               ix_valid: Bool[torch.Tensor, "b O"],
               rows: list[dict] | dict[str, torch.Tensor], valid_cpu: torch.Tensor | None = None) -> None:
        with exact_fp32_matmul():
            self._update(pairs, acts, ix_valid, rows, valid_cpu)

    def _update(self, pairs, acts, ix_valid, rows, valid_cpu) -> None:
        """Add one batch: gathered activations ``[2B, O, L, *rest]`` per hook group, validity ``[B, O]``
        (on the device; ``valid_cpu``: the same on the CPU, to spare a device sync), and the pairs'
        metrics: :func:`pair_metric_tensors` (kept on the device until the next flush) or finished rows."""
        B = len(pairs)
        cat_cpu = torch.tensor([self.category_index(a) for a in pairs], dtype=torch.long)
        cat = cat_cpu.to(self.device, non_blocking=True)
        valid_cpu = ix_valid.cpu() if valid_cpu is None else valid_cpu
        seen = (group_onehot(cat_cpu, self.C) @ valid_cpu.to(F64)).T > 0  # [O, C]
        first = next(iter(self.acc.values())).shift_set if self.acc else torch.zeros_like(seen)
        new_shift = [(int(o), int(c)) for o, c in torch.nonzero(seen & ~first).tolist()]
        vf = ix_valid.to(F64)  # [B, O]
        W = group_onehot(cat, self.C)  # [C, B]
        Wo64 = W[None] * vf.T[:, None, :]  # [O, C, B]
        self.count += Wo64.sum(-1).T
        m3 = vf[:, :, None]
        keys = [item_key(self.cfg.seed, a.id) for a in pairs]
        slots_l, items_l = self.sample.offer(keys)
        slots = items = slots_cpu = None
        if slots_l:
            slots_cpu = torch.tensor(slots_l, dtype=torch.long)
            slots = slots_cpu.to(self.device, non_blocking=True)
            items = torch.tensor(items_l, dtype=torch.long, device=self.device)
            self.sample_valid.index_copy_(0, slots, ix_valid.index_select(0, items))
            self.sample_cat.index_copy_(0, slots, cat.index_select(0, items))
            for s_, i in zip(slots_l, items_l):
                self.sample_ids[s_] = pairs[i].id
        Wo_w = {}
        for g in self.groups:
            X = acts.pop(g.suffix)  # dropped as soon as it is reduced
            if X.shape[0] != 2 * B:
                raise RuntimeError(f"{g.suffix}: {X.shape[0]} rows for {B} pairs")
            a = self.acc[g.suffix]
            if a.wd not in Wo_w:
                Wo_w[a.wd] = Wo64.to(a.wd)
            a.update(X, cat, W, Wo_w[a.wd], m3, new_shift, slots, items, slots_cpu)
        in_sample = set(items_l)
        if isinstance(rows, dict):
            self._pending.append((list(pairs), rows, in_sample))
        else:
            for i, (a, r) in enumerate(zip(pairs, rows)):
                self.rows.append({**pair_info(a), **r, "in_sample": i in in_sample})
        self.done.update(a.id for a in pairs)
        self._row_terms += torch.bincount(cat_cpu, minlength=self.C)
        if int(self._row_terms.max()) + B > self.flush_pairs:  # the next batch could take a row past the bound
            self.flush()
        if sum(len(ps) for ps, _, _ in self._pending) >= 4096:
            self.convert_pending()

    # -- checkpoint state
    def state_dict(self) -> dict[str, torch.Tensor]:
        self.flush()
        out = {"count": self.count, "sample/keys": self.sample.keys, "sample/valid": self.sample_valid,
               "sample/category": self.sample_cat}
        empty = ~torch.isfinite(self.sample.keys)
        for a in self.acc.values():
            out.update(a.state_dict())
            if a.host_sample and bool(empty.any()):  # host samples start uninitialised
                a.sample_delta[empty] = 0
        return out

    def meta(self, complete: bool) -> dict:
        self.convert_pending()
        # Rows of pairs that left the sample keep in_sample=True from when they entered; fix that here.
        ids = set(i for i in self.sample_ids if i is not None)
        for r in self.rows:
            r["in_sample"] = r["id"] in ids
        aliases = {"aliases": [a.to_dict() for a in self.aliases]} if self.aliases else {}
        return {"config": asdict(self.cfg), "groups": [g.to_dict() for g in self.table_groups], **aliases,
                "done": sorted(self.done), "sample_ids": self.sample_ids, "rows": self.rows,
                "model": self.model_entry, "complete": complete, "format": 1}

    def load(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        if "groups" in meta and [Alias.from_dict(d) for d in meta.get("aliases") or []] != self.aliases:
            raise EclensError("this state holds other layers than the accumulator (its aliases differ); make the "
                              "accumulator with the state's: DiffAccumulator(..., aliases=result.aliases.values())")
        self.count = tensors["count"].to(self.device, F64).clone()
        self.sample = BottomK.from_state_dict(tensors, "sample/")
        self.sample_valid = tensors["sample/valid"].to(self.device).clone()
        self.sample_cat = tensors["sample/category"].to(self.device).clone()
        for a in self.acc.values():
            a.load_state_dict(tensors)
        self.sample_ids = list(meta["sample_ids"])
        self.rows = list(meta["rows"])
        self.done = set(meta["done"])

    def merge(self, other: DiffAccumulator) -> None:
        """Take in ``other``'s pairs (disjoint from these), exactly as one run over both would have."""
        if set(self.done) & set(other.done):
            raise EclensError("cannot merge diff accumulators that share pairs")
        if self.aliases != other.aliases:
            raise EclensError("cannot merge diff accumulators that hold different layers (aliases)")
        other.convert_pending()
        self.convert_pending()
        state, order = merge_states(self.state_dict(), other.state_dict(), self.groups, self.cfg.sample_size)
        ids = self.sample_ids + other.sample_ids
        self.load(state, {"sample_ids": [ids[i] for i in order.tolist()], "rows": self.rows + other.rows,
                          "done": sorted(self.done | other.done)})
        inside = set(i for i in self.sample_ids if i is not None)
        for r in self.rows:
            r["in_sample"] = r["id"] in inside

    def result(self, model_entry: dict | None = None, timing: dict | None = None, complete: bool = True) -> DiffResult:
        if model_entry:
            self.model_entry = model_entry
        self.flush(final=True)
        # Tensors first made inside inference mode (a few shifts) are cloned into normal ones.
        t = {k: (v.clone() if v.is_inference() else v).detach().cpu() for k, v in self.state_dict().items()}
        from .result import DiffResult

        return DiffResult(self.meta(complete=complete), t, self.model_entry, timing or {})


def merge_states(ta: dict[str, torch.Tensor], tb: dict[str, torch.Tensor], groups: Sequence[HookGroup],
                 sample_size: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The state of the union of two :class:`DiffAccumulator` states on disjoint pairs, and which sample
    slots (of ``a``'s then ``b``'s) it keeps: the ``sample_size`` smallest keys, as one run would have kept."""
    out: dict[str, torch.Tensor] = {"count": ta["count"] + tb["count"]}
    for g in groups:
        out.update(GroupAccumulator.merge_state(ta, tb, g))
    keys = torch.cat([ta["sample/keys"], tb["sample/keys"]])
    order = torch.argsort(keys, stable=True)[:sample_size]
    out["sample/keys"] = keys[order]
    for key in ("sample/valid", "sample/category"):
        out[key] = torch.cat([ta[key], tb[key]])[order]
    for g in groups:
        for k in ("sample_delta", "sample_rel_l2", "sample_cos"):
            key = f"{g.suffix}/{k}"
            out[key] = torch.cat([ta[key], tb[key]])[order]
    return out, order
