"""Hook selection and position-aligned batches of pairs.

Batches put the clean sentences of ``B`` pairs in rows ``0..B-1`` and their corrupt
twins in rows ``B..2B-1`` of one right-padded token tensor. With right padding a
causal model's activations at real positions never see the padding, so no
attention mask is needed and results do not depend on batch composition; code that
reads activations must still only read positions ``< length``.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Int

from .errors import EclensError
from .pairs import AlignedPair

DEFAULT_HOOKS = ("hook_resid_pre", "hook_attn_out", "hook_resid_mid", "hook_mlp_out", "hook_resid_post")
# `--hooks all`: every residual, attention (q, k, v, z per head, pattern) and MLP (pre, post per neuron) hook.
ALL_HOOKS = (
    *DEFAULT_HOOKS,
    "attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_z", "attn.hook_pattern",
    "mlp.hook_pre", "mlp.hook_post",
)
_LAYER_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")


def split_hook(name: str) -> tuple[int | None, str]:
    """``blocks.3.hook_resid_pre`` -> ``(3, "hook_resid_pre")``; global hooks get layer ``None``."""
    m = _LAYER_RE.match(name)
    return (int(m.group(1)), m.group(2)) if m else (None, name)


def _canonical_names(model) -> dict[str, str]:
    """Map every hook name to one canonical name per tensor (aliases are read once).

    The bridge registers the same HookPoint under several names
    (``hook_attn_out`` and ``attn.hook_out``); prefer the HookedTransformer name.
    """
    groups: dict[int, list[str]] = {}
    for name, hp in model.hook_dict.items():
        groups.setdefault(id(hp), []).append(name)
    preferred = set(ALL_HOOKS)
    canon = {}
    for names in groups.values():
        best = sorted(names, key=lambda n: (split_hook(n)[1] not in preferred, len(n), n))[0]
        for n in names:
            canon[n] = best
    return canon


def select_hooks(model, spec: str | Sequence[str] | None = None) -> list[str]:
    """Hook names for ``spec``: ``None``/``"default"``, ``"all"``, or comma-separated globs / names.

    Globs without a ``blocks.`` prefix match per-layer suffixes (``mlp.hook_post``
    means that hook in every layer). Order is layer-major; aliases collapse to one name.
    """
    canon = _canonical_names(model)
    if spec is None or spec == "default":
        patterns = [f"blocks.*.{h}" for h in DEFAULT_HOOKS]
    elif spec == "all":
        patterns = [f"blocks.*.{h}" for h in ALL_HOOKS]
    else:
        items = spec.split(",") if isinstance(spec, str) else list(spec)
        patterns = []
        for it in (s.strip() for s in items):
            if not it:
                continue
            patterns.append(it if it.startswith("blocks.") or it in canon or "*" in it.split(".")[0]
                            else f"blocks.*.{it}")
    chosen: set[str] = set()
    for pat in patterns:
        hits = [n for n in canon if fnmatch.fnmatchcase(n, pat)]
        if not hits:
            raise EclensError(f"hook pattern {pat!r} matches no hook point; see `ec model info` for names")
        chosen.update(canon[n] for n in hits)

    def order(n: str):
        layer, rest = split_hook(n)
        pos = ALL_HOOKS.index(rest) if rest in ALL_HOOKS else len(ALL_HOOKS)
        return (layer if layer is not None else 10**6, pos, rest)

    return sorted(chosen, key=order)


@dataclass
class PairBatch:
    """Clean rows ``0..B-1`` and corrupt rows ``B..2B-1`` of one right-padded tensor."""

    pairs: list[AlignedPair]
    tokens: Int[torch.Tensor, "two_b seq"]
    lengths: Int[torch.Tensor, " b"]
    positions: Int[torch.Tensor, " b"]

    @property
    def size(self) -> int:
        return len(self.pairs)

    @property
    def clean(self) -> Int[torch.Tensor, "b seq"]:
        return self.tokens[: self.size]

    @property
    def corrupt(self) -> Int[torch.Tensor, "b seq"]:
        return self.tokens[self.size :]


def make_batch(pairs: Sequence[AlignedPair], pad_id: int, device: str | torch.device = "cpu") -> PairBatch:
    if not pairs:
        raise ValueError("empty batch")
    T = max(p.length for p in pairs)
    B = len(pairs)
    toks = torch.full((2 * B, T), int(pad_id), dtype=torch.long)
    for i, p in enumerate(pairs):
        toks[i, : p.length] = torch.tensor(p.clean_ids)
        toks[B + i, : p.length] = torch.tensor(p.corrupt_ids)
    lengths = torch.tensor([p.length for p in pairs], dtype=torch.long)
    positions = torch.tensor([p.position for p in pairs], dtype=torch.long)
    return PairBatch(list(pairs), toks.to(device), lengths.to(device), positions.to(device))


def iter_batches(
    pairs: Sequence[AlignedPair],
    batch_size: int,
    pad_id: int,
    device: str | torch.device = "cpu",
    sort_by_length: bool = True,
) -> Iterator[PairBatch]:
    """Batches of pairs; sorted by length first so little compute is spent on padding."""
    if batch_size < 1:
        raise EclensError("--batch-size must be at least 1")
    order = sorted(range(len(pairs)), key=lambda i: pairs[i].length) if sort_by_length else range(len(pairs))
    order = list(order)
    for s in range(0, len(order), batch_size):
        yield make_batch([pairs[i] for i in order[s : s + batch_size]], pad_id, device)


def pad_id(model) -> int:
    tok = model.tokenizer
    return int(tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
