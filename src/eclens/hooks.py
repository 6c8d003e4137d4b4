"""The hook vocabulary, hook groups and position-aligned batches of pairs.

One grammar for ``--hooks`` in ``ec diff``, ``ec cache`` and ``ec patch``: comma-separated
items, each ``default``, ``all``, an alias (``resid_pre``, ``z``, ``mlp_post``: :data:`HOOK_ALIASES`),
a per-layer suffix (``hook_resid_pre``, ``mlp.hook_post``), a full name (``blocks.3.hook_resid_pre``)
or a glob (``attn.hook_*``). :func:`expand_hook_spec` + :func:`select_hooks` turn it into hook
names (diff, cache); :func:`parse_hooks` into the patchable per-layer suffixes (patch).

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

import numpy as np
import torch
from jaxtyping import Int

from .errors import EclensError
from .model import model_device
from .pairs import AlignedPair

DEFAULT_HOOKS = ("hook_resid_pre", "hook_attn_out", "hook_resid_mid", "hook_mlp_out", "hook_resid_post")
# `--hooks all`: every residual, attention (q, k, v, z per head, pattern) and MLP (pre, post per neuron) hook.
ALL_HOOKS = (
    *DEFAULT_HOOKS,
    "attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_z", "attn.hook_pattern",
    "mlp.hook_pre", "mlp.hook_post",
)
HOOK_ALIASES = {
    "resid_pre": "hook_resid_pre", "attn_out": "hook_attn_out", "mlp_out": "hook_mlp_out",
    "resid_post": "hook_resid_post", "resid_mid": "hook_resid_mid", "z": "attn.hook_z", "hook_z": "attn.hook_z",
    "mlp_post": "mlp.hook_post", "mlp_pre": "mlp.hook_pre",
}
# What ``ec patch`` patches by default, and the per-head hook it patches with --heads.
EXACT_HOOKS = ("hook_resid_pre", "hook_attn_out", "hook_mlp_out", "hook_resid_post")
HEAD_HOOK = "attn.hook_z"
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
    """Clean rows ``0..B-1`` and corrupt rows ``B..2B-1`` of one right-padded tensor (``lengths``: the clean
    sentences'; a span pair's corrupt sentence may be longer or shorter)."""

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
    # each side its own length: a span pair's sentences may differ in length (span mode)
    T = max(max(len(p.clean_ids), len(p.corrupt_ids)) for p in pairs)
    B = len(pairs)
    toks = torch.full((2 * B, T), int(pad_id), dtype=torch.long)
    for i, p in enumerate(pairs):
        toks[i, : len(p.clean_ids)] = torch.tensor(p.clean_ids)
        toks[B + i, : len(p.corrupt_ids)] = torch.tensor(p.corrupt_ids)
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


def pad_rows(rows: Sequence[Sequence[int]], pad: int) -> Int[torch.Tensor, "rows seq"]:
    """Token id rows of different lengths as one right-padded ``[len(rows), longest]`` tensor."""
    T = max(len(r) for r in rows)
    toks = torch.full((len(rows), T), pad, dtype=torch.long)
    for i, r in enumerate(rows):
        toks[i, : len(r)] = torch.tensor(r)
    return toks


# Units of a hook's flattened dimensions (see :func:`unit_kind`).
HEAD_HOOKS = ("attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_z", "attn.hook_result")
PATTERN_HOOKS = ("attn.hook_pattern", "attn.hook_attn_scores")
NEURON_HOOKS = ("mlp.hook_pre", "mlp.hook_post", "mlp.hook_pre_linear")
# Attention patterns are [batch, head, query, key]: their position axis is not axis 1, so a
# per-position patch of them means something else; they are not patched.
NOT_PATCHABLE = PATTERN_HOOKS


@dataclass
class HookGroup:
    """All selected hooks with one suffix (``hook_resid_pre`` of every layer), reduced together."""

    suffix: str
    names: list[str]
    layers: list[int]
    kind: str  # resid | neuron | head_dim | head | other
    rest: tuple[int, ...]  # activation shape after (batch, pos) (pattern: (heads,))

    @property
    def width(self) -> int:
        return int(np.prod(self.rest)) if self.rest else 1

    @property
    def n_heads(self) -> int:
        return self.rest[0] if self.kind == "head_dim" else 0

    def to_dict(self) -> dict:
        return {"suffix": self.suffix, "names": self.names, "layers": self.layers, "kind": self.kind,
                "rest": list(self.rest)}

    @classmethod
    def from_dict(cls, d: dict) -> HookGroup:
        return cls(d["suffix"], list(d["names"]), [int(x) for x in d["layers"]], d["kind"], tuple(d["rest"]))


def unit_kind(suffix: str, rest: tuple[int, ...]) -> str:
    if suffix in PATTERN_HOOKS:
        return "head"
    if suffix in HEAD_HOOKS and len(rest) == 2:
        return "head_dim"
    if suffix in NEURON_HOOKS:
        return "neuron"
    if suffix.startswith("hook_") or suffix in ("attn.hook_out", "mlp.hook_out"):
        return "resid"
    return "other"


# The unembedding's input: a run may cut its rows to those its pair metrics read (logits only there)
UNEMBED_IN = "unembed.hook_in"


def packs_logits(model) -> bool:
    """Whether ``model`` has :data:`UNEMBED_IN`, where a run cuts the unembedding's rows (:func:`take_rows`)."""
    return UNEMBED_IN in getattr(model, "hook_dict", {})


def take_rows(act: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``act`` ``[B, T, ...]`` flattened over (batch, position) and cut to ``rows``, as ``[1, N, ...]``: hooked on
    :data:`UNEMBED_IN`, the unembedding makes logits only at those rows. ``rows`` moves to ``act``'s device where
    a model spread over devices put the unembedding elsewhere."""
    if rows.device != act.device:
        rows = rows.to(act.device)
    return act.flatten(0, 1).index_select(0, rows)[None]
PROBE_TOKENS = 6  # distinct tokens: one hook point's activation equals another's only where the model makes it so


def probe_activations(model, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """Each hook's activation in one forward pass over :data:`PROBE_TOKENS` distinct tokens (copies, kilobytes
    each), by the name asked for (the bridge's hook point has its own, e.g. ``blocks.0.hook_out``): the shapes
    :func:`hook_groups` reads and the tensors :func:`eclens.diff.aliases.find_aliases` compares, from one pass
    (a pass through the bridge costs ~60 ms for SmolLM2-135M whatever the input, a percent of a 225-pair run)."""
    seen: dict[str, torch.Tensor] = {}

    def keep(name: str):
        def fn(act, hook):
            seen[name] = act.detach().clone()
        return fn

    vocab = int(getattr(model.cfg, "d_vocab", 0) or 0) or PROBE_TOKENS + 2
    toks = (torch.arange(1, PROBE_TOKENS + 1) % vocab)[None].to(model_device(model))
    with torch.inference_mode(), model.hooks(fwd_hooks=[(n, keep(n)) for n in names]):
        model(toks)
    return seen


def hook_groups(model, names: Sequence[str], acts: dict[str, torch.Tensor] | None = None) -> list[HookGroup]:
    """Group hook names by suffix, each activation's shape read from ``acts`` (:func:`probe_activations`, made
    here when None)."""
    if acts is None:
        acts = probe_activations(model, names)
    rests = {}
    for n in names:
        if n not in acts:
            raise EclensError(f"hook {n} did not fire in a forward pass; choose another with --hooks")
        s = tuple(acts[n].shape)
        if split_hook(n)[1] in PATTERN_HOOKS:
            rests[n] = (s[1],)
        else:
            if len(s) < 2 or s[1] != PROBE_TOKENS:
                shown = [s[0], "positions", *s[2:]] if len(s) >= 2 else list(s)
                raise EclensError(f"hook {n} has shape {shown}, not (batch, position, ...); it cannot be compared "
                                  "position by position")
            rests[n] = tuple(s[2:])
    return groups_from_shapes(names, rests)


def groups_from_shapes(names: Sequence[str], rests: dict[str, tuple[int, ...]]) -> list[HookGroup]:
    """Group hook names by suffix, given each activation's shape after (batch, position)."""
    groups: dict[str, HookGroup] = {}
    for n in names:
        layer, suffix = split_hook(n)
        rest = tuple(rests[n])
        g = groups.get(suffix)
        if g is None:
            g = groups[suffix] = HookGroup(suffix, [], [], unit_kind(suffix, rest), rest)
        elif g.rest != rest:
            raise EclensError(f"hook {n} has shape {list(rest)} but other layers of {suffix} have {list(g.rest)}")
        g.names.append(n)
        g.layers.append(-1 if layer is None else layer)
    return list(groups.values())


def head_of(g: HookGroup, d: int) -> int:
    if g.kind == "head_dim":
        return d // int(np.prod(g.rest[1:]))
    if g.kind == "head":
        return d
    return -1



def expand_hook_spec(spec: str | Sequence[str] | None) -> str | list[str] | None:
    """Allow ``default``, ``all`` and the aliases inside a comma-separated list (``default,mlp_post``)."""
    if spec is None or spec in ("default", "all") or (not isinstance(spec, str) and not spec):
        return None if not spec else spec
    items = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    out: list[str] = []
    for it in items:
        out.extend(DEFAULT_HOOKS if it == "default" else ALL_HOOKS if it == "all" else [HOOK_ALIASES.get(it, it)])
    return out


def hook_suffix(name: str, model=None) -> str:
    """``resid_pre`` / ``hook_resid_pre`` / ``blocks.3.hook_resid_pre`` -> ``hook_resid_pre`` (checked on ``model``)."""
    s = name.strip()
    if s.startswith("blocks."):
        parts = s.split(".", 2)
        s = parts[2] if len(parts) == 3 else s
    s = HOOK_ALIASES.get(s, s)
    if model is not None and f"blocks.0.{s}" not in model.hook_dict:
        raise EclensError(f"unknown hook {name!r}: use resid_pre, attn_out, mlp_out, resid_post or a per-layer "
                          "hook name from `ec model info`")
    return s


def check_patchable(suffix: str) -> str:
    if suffix in NOT_PATCHABLE:
        raise EclensError(f"hook {suffix!r} is an attention pattern ([batch, head, query, key]); patch "
                          "attn.hook_z (--heads) or attn_out instead")
    return suffix


def parse_hooks(spec: str | Sequence[str] | None, model=None) -> list[str]:
    """The per-layer hook suffixes ``ec patch`` patches, in the order given (``None``: :data:`EXACT_HOOKS`).

    Items as for ``--hooks`` everywhere; ``default`` is :data:`EXACT_HOOKS`, and ``all`` or a glob
    (which need ``model``) bring the patchable per-layer hooks it matches."""
    if spec is None:
        return list(EXACT_HOOKS)
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for h in (x.strip() for x in items):
        if not h:
            continue
        if h == "default":
            out.extend(EXACT_HOOKS)
        elif h == "all" or any(c in h for c in "*?["):
            if model is None:
                raise EclensError(f"--hooks {h!r} needs the model to expand")
            suffixes = [split_hook(n) for n in select_hooks(model, expand_hook_spec(h))]
            out.extend(sf for layer, sf in suffixes if layer is not None and sf not in NOT_PATCHABLE)
        else:
            out.append(check_patchable(hook_suffix(h, model)))
    if not out:
        raise EclensError("--hooks is empty; use e.g. resid_pre,attn_out,mlp_out,resid_post")
    return list(dict.fromkeys(out))
