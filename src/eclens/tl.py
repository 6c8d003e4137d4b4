"""TransformerLens interop: a cached pair as a ``transformer_lens.ActivationCache``.

TransformerLens's analysis tools (``accumulated_resid``, ``decompose_resid``,
``logit_attrs``, ``apply_ln_to_stack``, ``logit_lens``) read ``[batch, pos, ...]``
activations of every position, plus hooks ``ec diff`` never needs: the embedding
(``hook_embed``, and ``hook_pos_embed`` where the model has one that fires) and the
layer-norm scales (``blocks.L.ln1/ln2.hook_scale``, ``ln_final.hook_scale``) that
``apply_ln_to_stack`` divides by. ``ec cache --for-tl`` stores those at every
position; :func:`activation_cache` rebuilds one sentence of one pair from such a
cache as a batch of one, keyed by every alias the model's hook points answer to.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING

import torch

from .errors import EclensError
from .hooks import split_hook

if TYPE_CHECKING:
    from .cache import ActivationStore

# What TL's residual-stream tools read (resid_mid: accumulated_resid(incl_mid=True); the scales: apply_ln).
TL_CANDIDATES = (
    "hook_embed", "hook_pos_embed",
    "blocks.*.hook_resid_pre", "blocks.*.hook_attn_out", "blocks.*.hook_resid_mid", "blocks.*.hook_mlp_out",
    "blocks.*.hook_resid_post", "blocks.*.ln1.hook_scale", "blocks.*.ln2.hook_scale", "ln_final.hook_scale",
)
PATTERN_SUFFIXES = ("attn.hook_pattern", "attn.hook_attn_scores")
_FIRED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its TL hooks


def tl_hooks(model) -> list[str]:
    """The hook names ``--for-tl`` adds for ``model``: the candidates that fire in a forward pass.

    Rotary models register ``hook_pos_embed`` but never fire it (TL's own ``run_with_cache``
    has no such key, so ``decompose_resid`` leaves it out); a one-token probe finds out.
    """
    import fnmatch

    if model in _FIRED:  # one probe per model (hooking every hook point costs a second or more)
        return list(_FIRED[model])
    names = [n for n in model.hook_dict if any(fnmatch.fnmatchcase(n, p) for p in TL_CANDIDATES)]
    dev = next(model.parameters()).device
    first: dict[int, str] = {}  # aliases share one HookPoint: hook it once
    for n in names:
        first.setdefault(id(model.hook_dict[n]), n)
    hp_fired: set[int] = set()

    def seen(key: int):
        def fn(act, hook):
            hp_fired.add(key)

        return fn

    with torch.inference_mode(), model.hooks(fwd_hooks=[(n, seen(k)) for k, n in first.items()]):
        model(torch.zeros((1, 1), dtype=torch.long, device=dev))
    _FIRED[model] = [n for n in names if id(model.hook_dict[n]) in hp_fired]
    return list(_FIRED[model])


def missing_for_tl(store: ActivationStore, model) -> str | None:
    """Why ``store`` cannot give TL caches (one line), or ``None``."""
    if store.positions != "all":
        return (f"{store.folder}: the cache holds positions={store.positions}, but TransformerLens's tools need "
                "every position; rerun `ec cache --for-tl` into another --out folder")
    have = _aliases_of(model, store.hooks)
    lacking = [n for n in tl_hooks(model) if n not in have]
    if lacking:
        more = f" and {len(lacking) - 3} more" if len(lacking) > 3 else ""
        return (f"{store.folder}: the cache lacks {', '.join(lacking[:3])}{more}, which TransformerLens's tools "
                "read; rerun `ec cache --for-tl` into another --out folder")
    return None


def _aliases_of(model, names) -> set[str]:
    by_id: dict[int, list[str]] = {}
    for n, hp in model.hook_dict.items():
        by_id.setdefault(id(hp), []).append(n)
    out = set(names)
    for n in names:
        hp = model.hook_dict.get(n)
        if hp is not None:
            out.update(by_id[id(hp)])
    return out


def check_model(store: ActivationStore, model) -> None:
    """Refuse a model whose weights are not the ones the cache was written with."""
    from .model import weights_hash

    want = (store.index.get("model") or {}).get("weights_hash")
    if want and weights_hash(model) != want:
        raise EclensError(f"{store.folder}: the cache was written with other weights (hash {want}); pass the run's "
                          "model, or model=None to load it by the cache's model name")


def run_model(store: ActivationStore):
    """Load the model named in the cache's index (checked against its weights hash)."""
    from .model import load_model

    m = store.index.get("model") or {}
    if not m.get("name"):
        raise EclensError(f"{store.folder}: the cache index names no model; pass model=")
    model = load_model(m["name"], dtype=m.get("dtype", "float32"))
    check_model(store, model)
    return model


def activation_cache(store: ActivationStore, pair: str | int, side: str, model):
    """One sentence of one cached pair as ``transformer_lens.ActivationCache`` (batch of one).

    Activations come back in the model's parameter dtype on its device (a float16 store is
    widened: TL's tools multiply them by the model's weights); attention patterns are
    ``[1, heads, query, key]`` as TL caches them.
    """
    from transformer_lens.ActivationCache import ActivationCache

    if side not in ("clean", "corrupt"):
        raise EclensError(f"side={side!r}: use clean or corrupt")
    why = missing_for_tl(store, model)
    if why:
        raise EclensError(why)
    n_tokens = store.locate(pair).pair.length
    p = next(model.parameters())
    by_id: dict[int, list[str]] = {}
    for n, hp in model.hook_dict.items():
        by_id.setdefault(id(hp), []).append(n)
    out: dict[str, torch.Tensor] = {}
    for name in store.hooks:
        t = store.get(name, pair, side).to(p.device, p.dtype)
        if split_hook(name)[1] in PATTERN_SUFFIXES:  # stored [query, heads, max_len]
            t = t[:, :, :n_tokens].transpose(0, 1)
        t = t.unsqueeze(0)
        hp = model.hook_dict.get(name)
        for alias in by_id[id(hp)] if hp is not None else [name]:
            out[alias] = t
    return ActivationCache(out, model, has_batch_dim=True)
