"""Forward hooks that gather only the aligned positions of each activation (see :mod:`eclens.diff`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Int

from ..errors import EclensError
from ..hooks import (
    PATTERN_HOOKS,
    UNEMBED_IN,
    HookGroup,
    take_rows,
)
from ..pairs import aligned_position


@dataclass
class AlignedIndex:
    """Where every pair of a batch is read: rows ``[2B, 1]``, positions ``[2B, O]`` (clamped; each side its own
    for a span pair), validity ``[B, O]``."""

    rows: torch.Tensor
    pos: torch.Tensor
    key: torch.Tensor  # [2B, 1] the changed position (a span's last token), for attention patterns
    valid: torch.Tensor  # bool [B, O], on the device
    valid_cpu: torch.Tensor
    all_valid: bool
    flat: torch.Tensor  # [2B * O] row index into the activation flattened over (batch, position)


def aligned_index(positions: Sequence[int], lengths: Sequence[int], offsets: Sequence[int], device,
                  seq_len: int | None = None, anchors: Sequence[int] | None = None) -> AlignedIndex:
    """Both sides read at the same positions (single-token pairs): ``positions``: the changed tokens ``p``
    (attention patterns look at them); ``anchors``: where offset 0 sits (``p`` when not given; the detect
    position under ``--anchor detect``). :func:`pair_index` reads each side from its own span end."""
    p = torch.tensor(list(positions), dtype=torch.long)
    n = torch.tensor(list(lengths), dtype=torch.long)
    a = p if anchors is None else torch.tensor(list(anchors), dtype=torch.long)
    return _index(torch.cat([a, a]), torch.cat([n, n]), torch.cat([p, p]), offsets, device, seq_len)


def pair_index(pairs: Sequence, offsets: Sequence[int], device, seq_len: int | None = None,
               anchor: str = "p") -> AlignedIndex:
    """Where every pair of a batch is read, each side from its own span end (:mod:`eclens.spans`): offset ``k``
    is ``end - 1 + k`` on the clean side and ``corrupt_end - 1 + k`` on the changed one (the same position for a
    single-token pair), shifted by the detect offset under ``anchor="detect"``; attention patterns look at the
    span's last token of their own side."""
    from ..spans import side_anchor, side_length

    rows = [(side_anchor(a, s, anchor), side_length(a, s), side_anchor(a, s)) for s in ("clean", "corrupt")
            for a in pairs]
    anc, n, key = (torch.tensor(list(c), dtype=torch.long) for c in zip(*rows))
    return _index(anc, n, key, offsets, device, seq_len)


def _index(anc: Int[torch.Tensor, " two_b"], n: Int[torch.Tensor, " two_b"], key: Int[torch.Tensor, " two_b"],
           offsets: Sequence[int], device, seq_len: int | None) -> AlignedIndex:
    """The index from per-row anchors, lengths and attention keys (clean rows, then changed rows)."""
    pos = torch.stack([aligned_position(anc, n, k) for k in offsets], 1)  # [2B, O]
    B = len(anc) // 2
    # a pair's offset is valid when it lies inside both sentences (after a span they have the same length left)
    ok = pos < n[:, None]
    valid = ok[:B] & ok[B:]
    pos = torch.minimum(pos, (n - 1)[:, None])  # never read a padded position
    T = int(seq_len if seq_len is not None else n.max())
    flat = (torch.arange(2 * B)[:, None] * T + pos).reshape(-1)
    rows = torch.arange(2 * B, device=device)[:, None]
    return AlignedIndex(rows, pos.to(device, non_blocking=True), key[:, None].to(device, non_blocking=True),
                        valid.to(device, non_blocking=True), valid, bool(valid.all()),
                        flat.to(device, non_blocking=True))


class Gatherer:
    """Forward hooks that keep only the aligned positions of each activation.

    Each hook copies its rows straight into slot ``l`` of one buffer per hook group,
    ``[L, 2B*O, *rest]`` (no per-hook tensors to stack afterwards); :meth:`collect`
    returns a ``[2B, O, L, *rest]`` view of it.
    """

    def __init__(self, groups: list[HookGroup], device, pack_logits: bool = False):
        self.groups = groups
        self.device = torch.device(device)
        self.index: AlignedIndex | None = None
        # ``pack_logits``: the unembedding makes logits only at ``logit_rows`` (of the flattened [2B·T] positions;
        # :func:`eclens.diff.logprobs.packed_rows`), ``[1, N, vocab]``: a fifth of the rows of template pairs
        self.pack_logits = pack_logits
        self.logit_rows: torch.Tensor | None = None
        self.bufs: dict[str, torch.Tensor | None] = {g.suffix: None for g in groups}
        self.filled: dict[str, list[bool]] = {g.suffix: [False] * len(g.names) for g in groups}

    def hooks(self) -> list[tuple[str, Callable]]:
        out = []
        for g in self.groups:
            for slot, name in enumerate(g.names):
                out.append((name, self._make(g, slot, g.suffix in PATTERN_HOOKS)))
        if self.pack_logits:
            out.append((UNEMBED_IN, self._pack))
        return out

    def _pack(self, act, hook):
        return take_rows(act, self.logit_rows)

    def _buffer(self, g: HookGroup, rows: int, dtype: torch.dtype) -> torch.Tensor:
        buf = self.bufs[g.suffix]
        shape = (len(g.names), rows, *g.rest)
        if buf is None or tuple(buf.shape) != shape or buf.dtype != dtype:
            buf = self.bufs[g.suffix] = torch.empty(shape, dtype=dtype, device=self.device)
        return buf

    def _make(self, g: HookGroup, slot: int, pattern: bool):
        filled = self.filled[g.suffix]

        def fn(act, hook):
            ix = self.index
            buf = self._buffer(g, ix.flat.numel(), act.dtype)
            if pattern:  # [2B, H, q, k] -> [2B, O, H]: attention from each aligned position to p
                buf[slot].copy_(act[ix.rows, :, ix.pos, ix.key].reshape(buf.shape[1:]))
            elif act.device == self.device:
                # [2B, T, *rest] -> [2B*O, *rest]: whole rows of the (batch*position) matrix, into the buffer
                torch.index_select(act.flatten(0, 1), 0, ix.flat, out=buf[slot])
            else:
                buf[slot].copy_(act.flatten(0, 1).index_select(0, ix.flat.to(act.device)), non_blocking=True)
            filled[slot] = True
            return None

        return fn

    def collect(self) -> dict[str, torch.Tensor]:
        out = {}
        two_b, n_off = self.index.pos.shape
        for g in self.groups:
            f = self.filled[g.suffix]
            if not all(f):
                raise EclensError(f"hook {g.names[f.index(False)]} did not fire in the forward pass")
            buf = self.bufs[g.suffix]
            L = buf.shape[0]
            out[g.suffix] = buf.view(L, two_b, n_off, *g.rest).movedim(0, 2)  # [2B, O, L, *rest] (a view)
            f[:] = [False] * len(f)  # in place: the hooks hold this list
        return out
