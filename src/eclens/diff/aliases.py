"""Hook points that hold the same tensor, streamed and reduced once.

``blocks.{l}.hook_resid_post`` is the tensor ``blocks.{l+1}.hook_resid_pre`` reads: nothing happens between
two blocks. With both hooks selected (the default hooks do), a run would gather, accumulate, store and
reduce 29 of SmolLM2-135M's 150 hook layers twice: a fifth of the accumulation, of the state and of the
per-layer statistics of the table build. An :class:`Alias` says which layers of a hook are read from another
hook's; the state holds only the hook's other layers (its last one at least), and
:meth:`eclens.diff.DiffResult.cell_stats` puts the two together, so every table is the one a run over
both copies gives, to float64 rounding (each statistic is per layer; on SmolLM2-135M's 415 benchmark pairs
``dims``, ``candidates``, ``contrasts`` and the directions were identical, and six ``layers`` columns made
from the per-pair power sums, whose products have other shapes, within 1.3e-13 relative).

An alias is only made where a probe forward pass finds the two hooks' tensors equal, so an architecture
that changes the residual stream between blocks keeps both copies.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch

from ..hooks import HookGroup, probe_activations

# (hook, the hook that reads the same tensor, its layer less this hook's)
CANDIDATES = (("hook_resid_post", "hook_resid_pre", 1),)


@dataclass(frozen=True)
class Alias:
    """Layers ``layers`` of ``hook`` are ``source``'s layers ``layer + shift``."""

    hook: str
    source: str
    shift: int
    layers: tuple[int, ...]

    def to_dict(self) -> dict:
        return {"hook": self.hook, "source": self.source, "shift": self.shift, "layers": list(self.layers)}

    @classmethod
    def from_dict(cls, d: dict) -> Alias:
        return cls(str(d["hook"]), str(d["source"]), int(d["shift"]), tuple(int(x) for x in d["layers"]))


def find_aliases(model, groups: Sequence[HookGroup], acts: dict[str, torch.Tensor] | None = None) -> list[Alias]:
    """The :data:`CANDIDATES` among ``groups`` whose tensors in a probe forward pass of ``model``
    (:func:`eclens.hooks.probe_activations`; ``acts``: one made already) are equal, layer by layer
    (:func:`aliases_where_equal`)."""
    def probe(names: list[str]) -> dict[str, torch.Tensor]:
        got = probe_activations(model, names) if acts is None else acts
        return {n: got[n] for n in names if n in got}

    return aliases_where_equal(groups, probe)


def aliases_where_equal(groups: Sequence[HookGroup], probe: Callable[[list[str]], dict[str, torch.Tensor]]
                        ) -> list[Alias]:
    """The :data:`CANDIDATES` among ``groups``, each with the layers whose two hook points ``probe`` (hook
    names -> their tensors for one input) finds equal. The hook keeps one layer of its own at least (a state
    group with no layer would be a special case in every reader)."""
    by = {g.suffix: g for g in groups}
    pairs = []  # (candidate index, hook layer, hook name, source name)
    found: list[tuple[str, str, int]] = []
    for hook, source, shift in CANDIDATES:
        if hook in by and source in by:
            g, s = by[hook], by[source]
            for layer, name in zip(g.layers, g.names):
                if layer + shift in s.layers:
                    pairs.append((len(found), layer, name, s.names[s.layers.index(layer + shift)]))
            found.append((hook, source, shift))
    if not pairs:
        return []
    seen = probe(sorted({n for _, _, a, b in pairs for n in (a, b)}))
    out = []
    for i, (hook, source, shift) in enumerate(found):
        layers = [layer for j, layer, a, b in pairs if j == i and a in seen and b in seen
                  and torch.equal(seen[a], seen[b])]
        if len(layers) == len(by[hook].layers):
            layers = layers[:-1]
        if layers:
            out.append(Alias(hook, source, shift, tuple(layers)))
    return out


def stored_group(g: HookGroup, alias: Alias | None) -> HookGroup:
    """The layers of ``g`` a state holds: those not read from the alias's source."""
    if alias is None:
        return g
    keep = [i for i, layer in enumerate(g.layers) if layer not in alias.layers]
    return replace(g, names=[g.names[i] for i in keep], layers=[g.layers[i] for i in keep])


def layer_runs(g: HookGroup, alias: Alias, source: HookGroup) -> list[tuple[slice, bool, slice]]:
    """How ``g``'s layer axis is made: runs ``(slice of g's layers, from the source?, slice of that state's
    layers)``, contiguous where the layers are (a copy per run, one or two for the usual selections)."""
    own = stored_group(g, alias).layers
    where = [(True, source.layers.index(layer + alias.shift)) if layer in alias.layers else (False, own.index(layer))
             for layer in g.layers]
    runs: list[tuple[slice, bool, slice]] = []
    i = 0
    while i < len(where):
        j = i + 1
        while j < len(where) and where[j][0] == where[i][0] and where[j][1] == where[j - 1][1] + 1:
            j += 1
        runs.append((slice(i, j), where[i][0], slice(where[i][1], where[j - 1][1] + 1)))
        i = j
    return runs


def assemble(runs: Sequence[tuple[slice, bool, slice]], source: torch.Tensor, own: torch.Tensor, dim: int
             ) -> torch.Tensor:
    """A tensor over the aliased hook's layers (axis ``dim``) from the source's and its own state's."""
    n = max(r.stop for r, _, _ in runs)
    shape = list(own.shape)
    shape[dim] = n
    out = torch.empty(shape, dtype=own.dtype, device=own.device)
    for r, from_source, s in runs:
        idx = (slice(None),) * dim
        out[idx + (r,)] = (source if from_source else own)[idx + (s,)]
    return out


def over_layers(own: torch.Tensor, source: torch.Tensor | None, runs: Sequence[tuple[slice, bool, slice]],
                offset_index: int | None = None, layer_index: int | None = None) -> torch.Tensor:
    """A per-pair state array (``[S, O, L, ...]``) over every layer of a hook (an alias's from ``own`` and its
    ``source``'s by :func:`layer_runs`; ``source`` None: ``own`` is whole), at one offset and one layer (indices
    into the offsets and the hook's layers) when given: only the array that holds that layer is read."""
    if offset_index is not None:  # the offset first: the layers are then axis 1
        own, source = own[:, offset_index], (None if source is None else source[:, offset_index])
    axis = 1 if offset_index is not None else 2
    if source is None:
        return own if layer_index is None else own.select(axis, layer_index)
    if layer_index is None:
        return assemble(runs, source, own, axis)
    r, from_source, s = next(run for run in runs if run[0].start <= layer_index < run[0].stop)
    return (source if from_source else own).select(axis, s.start + layer_index - r.start)


__all__ = ["Alias", "CANDIDATES", "aliases_where_equal", "assemble", "find_aliases", "layer_runs", "over_layers", "stored_group"]
