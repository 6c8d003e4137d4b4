"""Streaming, mergeable statistics (in the spirit of baukit's ``runningstats``).

Everything here keeps a fixed amount of memory however many items stream through,
and every accumulator can be merged with another one built on a disjoint part of
the data, so shards computed by different processes, machines or resumed runs
combine into the statistics of the whole.

* :class:`PowerSums` — what the streaming loop updates: the count, and the sums
  of ``x - K`` and ``(x - K)^2`` per cell, in float64, about a per-cell shift ``K``
  fixed at the first update. One update adds a batch into its groups' rows with
  one matrix product by the one-hot group matrix (:func:`group_add`; on the CPU
  ``index_add_`` is ~100x slower), and two accumulators with the same shift
  merge by plain addition, so ``torch.distributed.all_reduce(SUM)`` merges ranks
  once they agree on ``K`` (:meth:`PowerSums.set_shift`). The shift keeps the sums
  of squares from cancelling catastrophically (a "massive" dimension has a mean of
  hundreds and a spread of one); with ``K`` near the mean the relative error of the
  variance is ~1e-15.
* :class:`Moments` — the finished view ``(count, mean, M2)``, with Chan et al.'s
  pairwise merge (associative and commutative up to rounding) for combining
  accumulators with different shifts, and :meth:`Moments.reduce` to merge along an
  axis (categories into "all").
* :class:`BottomK` — a uniform sample without replacement of at most ``capacity``
  items: each item gets a pseudo-random key from a hash of its id, and the sample is
  the ``capacity`` items with the smallest keys (bottom-k sampling). Unlike
  Vitter's sequential reservoir it does not depend on the order or batching of the
  stream, survives a resume unchanged, and two samples merge exactly (keep the
  smallest keys of the union).
* :func:`masked_quantiles` — quantiles along the item axis of a sample where some
  items are missing (NaN), with the same linear interpolation as ``torch.quantile``
  (:func:`sorted_valid` then :func:`sorted_quantiles`, when counts below thresholds are wanted too).

All tensors accumulate in float64 on the device they are created on (CPU or CUDA).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float, Int

F64 = torch.float64


def group_onehot(groups: Int[torch.Tensor, " n"], n_groups: int, dtype=F64) -> Float[torch.Tensor, "g n"]:
    return torch.nn.functional.one_hot(groups.long(), n_groups).to(dtype).T.contiguous()


def group_add(state: Float[torch.Tensor, "g *cell"], onehot: Float[torch.Tensor, "g n"],
              x: Float[torch.Tensor, "n *cell"]) -> None:
    """``state[g] += sum of x[i] over items i of group g``, as one matrix product.

    On the CPU ``index_add_`` along the first axis of a float64 tensor is ~100x slower
    than this GEMM (measured: 115 ms vs 0.6 ms for 4 items of 86k values).
    """
    state.view(state.shape[0], -1).addmm_(onehot, x.reshape(x.shape[0], -1))


@dataclass
class Moments:
    """Count, mean and sum of squared deviations (M2) per cell.

    ``count`` broadcasts against ``mean`` (e.g. one count per (group, offset) shared
    by every layer and dimension).
    """

    count: torch.Tensor
    mean: torch.Tensor
    m2: torch.Tensor

    @classmethod
    def zeros(cls, shape: Sequence[int], count_shape: Sequence[int] | None = None, device=None) -> Moments:
        cs = tuple(shape) if count_shape is None else tuple(count_shape)
        return cls(torch.zeros(cs, dtype=F64, device=device), torch.zeros(tuple(shape), dtype=F64, device=device),
                   torch.zeros(tuple(shape), dtype=F64, device=device))

    @classmethod
    def from_batch(
        cls,
        x: Float[torch.Tensor, "n *cell"],
        mask: Bool[torch.Tensor, "n *mcell"] | None = None,
        groups: Int[torch.Tensor, " n"] | None = None,
        n_groups: int = 1,
    ) -> Moments:
        """Two-pass moments of one batch, per group (a leading group axis) when ``groups`` is given."""
        x = x.to(F64)
        n = x.shape[0]
        m = torch.ones((n,) + (1,) * (x.ndim - 1), dtype=F64, device=x.device) if mask is None else mask.to(F64)
        g = torch.zeros(n, dtype=torch.long, device=x.device) if groups is None else groups.long()
        G = n_groups if groups is not None else 1
        count = torch.zeros((G,) + m.shape[1:], dtype=F64, device=x.device).index_add_(0, g, m)
        s = torch.zeros((G,) + x.shape[1:], dtype=F64, device=x.device).index_add_(0, g, x * m)
        mean = s / count.clamp_min(1)
        dev = (x - mean[g]) * m
        m2 = torch.zeros_like(s).index_add_(0, g, dev * dev)
        out = cls(count, mean, m2)
        return out if groups is not None else cls(count[0], mean[0], m2[0])

    def merge(self, other: Moments) -> Moments:
        """Chan, Golub & LeVeque (1979): the moments of the union of two disjoint sets."""
        na, nb = self.count, other.count
        n = na + nb
        wb = torch.where(n > 0, nb / n.clamp_min(1e-300), torch.zeros_like(n))
        delta = other.mean - self.mean
        mean = self.mean + delta * wb
        m2 = self.m2 + other.m2 + delta * delta * (na * wb)
        return Moments(n, mean, m2)

    def update(self, x, mask=None, groups=None, n_groups: int = 1) -> Moments:
        """Merge a batch in place and return self."""
        new = self.merge(Moments.from_batch(x, mask, groups, n_groups))
        self.count, self.mean, self.m2 = new.count, new.mean, new.m2
        return self

    def reduce(self, dim: int = 0) -> Moments:
        """Merge along ``dim`` (exact parallel formula; e.g. per-category moments into "all")."""
        cnt = self.count.expand_as(self.mean) if self.count.shape != self.mean.shape else self.count
        n = cnt.sum(dim)
        mean = (cnt * self.mean).sum(dim) / n.clamp_min(1)
        dev = self.mean - mean.unsqueeze(dim)
        m2 = self.m2.sum(dim) + (cnt * dev * dev).sum(dim)
        cdim = dim if dim >= 0 else self.mean.ndim + dim
        return Moments(self.count.sum(cdim), mean, m2)

    @property
    def var(self) -> torch.Tensor:
        """Sample variance (ddof=1); NaN where fewer than two items."""
        n = self.count
        return torch.where(n > 1, self.m2 / (n - 1).clamp_min(1), torch.full_like(self.m2, float("nan")))

    @property
    def std(self) -> torch.Tensor:
        return self.var.sqrt()

    def state_dict(self, prefix: str = "") -> dict[str, torch.Tensor]:
        return {f"{prefix}count": self.count, f"{prefix}mean": self.mean, f"{prefix}m2": self.m2}

    @classmethod
    def from_state_dict(cls, d: dict[str, torch.Tensor], prefix: str = "", device=None) -> Moments:
        return cls(*(d[f"{prefix}{k}"].to(device=device, dtype=F64).clone() for k in ("count", "mean", "m2")))


@dataclass
class PowerSums:
    """Shifted power sums per group row: ``n``, ``Σ(x-K)``, ``Σ(x-K)^2``.

    ``s1``/``s2`` have shape ``(G, *cell)``, ``count`` ``(G, *mcell)`` (broadcastable),
    ``shift`` ``cell`` (shared by all groups) or ``(G, *cell)`` (after :meth:`from_moments`). Converting to :class:`Moments` is exact
    algebra: ``mean = K + s1/n``, ``M2 = s2 - s1^2/n``.
    """

    count: torch.Tensor
    s1: torch.Tensor
    s2: torch.Tensor
    shift: torch.Tensor
    shift_set: bool = False

    @classmethod
    def zeros(cls, n_groups: int, cell: Sequence[int], mcell: Sequence[int] | None = None, device=None) -> PowerSums:
        cell = tuple(cell)
        mcell = cell if mcell is None else tuple(mcell)
        z = torch.zeros((n_groups, *cell), dtype=F64, device=device)
        return cls(torch.zeros((n_groups, *mcell), dtype=F64, device=device), z, z.clone(),
                   torch.zeros(cell, dtype=F64, device=device))

    def set_shift(self, shift: torch.Tensor) -> None:
        """Fix the shift before the first update (e.g. rank 0's, broadcast to every rank)."""
        if bool(self.count.any()):
            raise RuntimeError("set_shift after data was added would change the sums' meaning")
        self.shift = shift.to(device=self.s1.device, dtype=F64).clone()
        self.shift_set = True

    def update(
        self,
        x: Float[torch.Tensor, "n *cell"],
        groups: Int[torch.Tensor, " n"],
        mask: Float[torch.Tensor, "n *mcell"] | None = None,
        counts: Float[torch.Tensor, "g *mcell"] | None = None,
        onehot: Float[torch.Tensor, "g n"] | None = None,
    ) -> torch.Tensor:
        """Add a batch (float64 ``x``; ``mask`` 0/1 float64, broadcastable). Returns ``x - K`` (masked).

        ``counts``: the batch's per-group counts and ``onehot``: :func:`group_onehot` of
        ``groups``, when the caller already has them (one per batch for many accumulators).
        """
        if not self.shift_set:
            # The first batch's mean is a good shift: the later means stay within a few spreads of it.
            if mask is None:
                self.shift = x.mean(0)
            else:
                w = mask.expand_as(x)
                tot = w.sum(0)
                self.shift = torch.where(tot > 0, (x * w).sum(0) / tot.clamp_min(1), torch.zeros_like(tot))
            self.shift_set = True
        W = group_onehot(groups, self.s1.shape[0]) if onehot is None else onehot
        # The shift is shared by every group (``cell``) or, after a merge, per group (``(G, *cell)``).
        xc = x - (self.shift[groups] if self.shift.ndim == self.s1.ndim else self.shift)
        if mask is not None:
            xc = xc * mask
        group_add(self.s1, W, xc)
        group_add(self.s2, W, xc * xc)
        if counts is not None:
            self.count += counts
        else:
            m = torch.ones((x.shape[0],) + (1,) * (self.count.ndim - 1), dtype=F64, device=x.device) \
                if mask is None else mask
            group_add(self.count, W, m.expand((x.shape[0],) + tuple(self.count.shape[1:])))
        return xc

    def merge_(self, other: PowerSums) -> PowerSums:
        """Add another accumulator with the same shift (a rank, a shard, a resumed run)."""
        if not torch.equal(self.shift, other.shift):
            raise ValueError("PowerSums with different shifts: merge their .moments() with Moments.merge")
        self.count += other.count
        self.s1 += other.s1
        self.s2 += other.s2
        return self

    @classmethod
    def from_moments(cls, m: Moments) -> PowerSums:
        """Power sums about the mean itself (``s1 = 0``, ``s2 = M2``): exact, and mergeable by addition again."""
        return cls(m.count.clone(), torch.zeros_like(m.mean), m.m2.clone(), m.mean.clone(), shift_set=True)

    def moments(self) -> Moments:
        n = self.count
        nn = n.clamp_min(1)
        mean = self.shift + self.s1 / nn
        m2 = (self.s2 - self.s1 * self.s1 / nn).clamp_min(0)
        return Moments(n, mean, m2)

    def state_dict(self, prefix: str = "") -> dict[str, torch.Tensor]:
        return {f"{prefix}count": self.count, f"{prefix}s1": self.s1, f"{prefix}s2": self.s2,
                f"{prefix}shift": self.shift, f"{prefix}shift_set": torch.tensor(int(self.shift_set))}

    @classmethod
    def from_state_dict(cls, d: dict[str, torch.Tensor], prefix: str = "", device=None) -> PowerSums:
        t = [d[f"{prefix}{k}"].to(device=device, dtype=F64).clone() for k in ("count", "s1", "s2", "shift")]
        return cls(*t, shift_set=bool(int(d[f"{prefix}shift_set"])))


def item_key(seed: int, item_id: str) -> float:
    """A pseudo-random key in [0, 1) from ``(seed, id)``: the same item always gets the same key."""
    h = hashlib.blake2b(f"{seed}\x1f{item_id}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") / 2.0**64


@dataclass
class BottomK:
    """Which items a bottom-k sample keeps, and in which slot; payloads live with the caller.

    ``keys[slot]`` is ``inf`` for an empty slot. :meth:`offer` returns, for a batch of
    item keys, the slots to (over)write and which batch items go there.
    """

    capacity: int
    keys: torch.Tensor  # float64 [capacity], CPU

    @classmethod
    def empty(cls, capacity: int) -> BottomK:
        return cls(capacity, torch.full((capacity,), float("inf"), dtype=F64))

    @property
    def size(self) -> int:
        return int(torch.isfinite(self.keys).sum())

    @property
    def threshold(self) -> float:
        """Items with keys at or above this cannot enter."""
        return float(self.keys.max()) if self.capacity else float("-inf")

    def offer(self, batch_keys: Sequence[float]) -> tuple[list[int], list[int]]:
        """Admit batch items whose keys rank among the ``capacity`` smallest; returns ``(slots, items)``."""
        if self.capacity == 0:
            return [], []
        bk = torch.tensor(list(batch_keys), dtype=F64)
        allk = torch.cat([self.keys, bk])
        keep = torch.zeros(allk.numel(), dtype=torch.bool)
        order = torch.argsort(allk, stable=True)[: self.capacity]
        keep[order] = True
        keep &= torch.isfinite(allk)
        items = [int(i) for i in torch.nonzero(keep[self.capacity:]).flatten()]
        free = [int(s) for s in torch.nonzero(~keep[: self.capacity]).flatten()]
        slots = free[: len(items)]
        for s, i in zip(slots, items):
            self.keys[s] = bk[i]
        return slots, items

    def state_dict(self, prefix: str = "") -> dict[str, torch.Tensor]:
        return {f"{prefix}keys": self.keys}

    @classmethod
    def from_state_dict(cls, d: dict[str, torch.Tensor], prefix: str = "") -> BottomK:
        k = d[f"{prefix}keys"].to("cpu", F64)
        return cls(int(k.numel()), k.clone())


def sorted_valid(x: Float[torch.Tensor, "n *cell"], valid: Bool[torch.Tensor, "n *mcell"]
                 ) -> tuple[Float[torch.Tensor, "*cell n"], torch.Tensor]:
    """The items of each cell sorted along a new last axis, missing ones (not ``valid``, or NaN) as ``+inf``
    at the end, and the count of valid items per cell (``[*cell]``).

    On the CPU the sort is NumPy's (values only, along a contiguous axis): ``torch.sort`` along the item
    axis took about ten times as long, and it was most of ``ec diff``'s finishing time.
    """
    v = valid.expand_as(x) if valid.shape != x.shape else valid
    v = v & ~torch.isnan(x)
    inf = torch.tensor(float("inf"), dtype=x.dtype, device=x.device)
    # contiguous: a new tensor (the where above made one), sorted in place, no third copy
    xs = sort_last_(torch.where(v, x, inf).movedim(0, -1).contiguous())
    return xs, v.sum(0)


def sort_last_(xs: torch.Tensor) -> torch.Tensor:
    """``xs`` sorted along its last axis: in place with NumPy on the CPU (``xs`` contiguous; ``torch.sort`` along
    that axis took about ten times as long), by ``torch.sort`` elsewhere (then a new tensor). NaN sorts last."""
    if xs.device.type == "cpu":
        xs.numpy().sort(axis=-1)
        return xs
    return torch.sort(xs, dim=-1).values


def sorted_quantiles(xs: Float[torch.Tensor, "*cell n"], k: torch.Tensor, qs: Sequence[float]
                     ) -> Float[torch.Tensor, "q *cell"]:
    """Quantiles of :func:`sorted_valid`'s output (linear interpolation, as ``torch.quantile``); NaN where a
    cell has no valid item."""
    nan = torch.tensor(float("nan"), dtype=xs.dtype, device=xs.device)
    if xs.shape[-1] == 0:
        return nan.expand(len(qs), *xs.shape[:-1]).clone()
    # every quantile at once: positions [*cell, q], two gathers
    q = torch.tensor(list(qs), dtype=xs.dtype, device=xs.device)
    pos = (k - 1).clamp_min(0).to(xs.dtype).unsqueeze(-1) * q
    lo = pos.floor()
    frac = pos - lo
    lo = lo.long()
    a = xs.gather(-1, lo)
    b = xs.gather(-1, (lo + (frac > 0).long()).clamp_max(xs.shape[-1] - 1))
    r = torch.where(frac == 0, a, a + (b - a) * frac)  # inf - inf would be NaN where lo == hi
    r = torch.where((k > 0).unsqueeze(-1), r, nan)
    return r.movedim(-1, 0)


def masked_quantiles(
    x: Float[torch.Tensor, "n *cell"], valid: Bool[torch.Tensor, "n *mcell"], qs: Sequence[float]
) -> Float[torch.Tensor, "q *cell"]:
    """Quantiles along axis 0 over the valid items only (linear interpolation, as ``torch.quantile``).

    ``valid`` broadcasts against ``x``; NaN items count as missing; cells with no valid item give NaN.
    Works on tensors of any size (``torch.quantile`` refuses more than 2^24 elements).
    """
    xs, k = sorted_valid(x, valid)
    return sorted_quantiles(xs, k, qs)


def bh_qvalues(p) -> object:
    """Benjamini–Hochberg adjusted p-values (q-values) over a flat array; NaN p-values stay NaN."""
    import numpy as np
    from scipy.stats import false_discovery_control

    p = np.asarray(p, dtype=float)
    q = np.full_like(p, np.nan)
    ok = np.isfinite(p)
    if ok.any():
        q[ok] = false_discovery_control(p[ok], method="bh")
    return q
