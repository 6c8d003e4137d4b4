"""Check a loaded bridge against the plain transformers model it wraps (``ec model verify``).

Every analysis in eclens reads TransformerLens hooks, so a hook that reports the wrong tensor —
an adapter bug for a new architecture, a weight-processing step gone wrong — would silently
corrupt every result. Per hook of the default set and per layer we compare the bridge's
activation with the transformers model's own: ``hidden_states`` (resid_pre, resid_post), the
input of the layer's pre-MLP norm (resid_mid), and their differences (attn_out, mlp_out); then
the bridge's own residual identity resid_pre + attn_out + mlp_out = resid_post, and log-probs.

Folded layer norms leave the residual stream unchanged; centring (LayerNorm models only) shifts
it by a per-position mean, which we remove from both sides before comparing. Tolerances: the
two models compute the same float32 function in a different order, so differences are
rounding, ~1e-6 of the activation's scale; 1e-3 of the scale leaves wide room for that and
none for a wrong tensor (which differs by order 1).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd
import torch

from .errors import EclensError
from .hooks import DEFAULT_HOOKS

SENTENCES = (
    "The keys to the cabinet are on the table.",
    "Once upon a time, there was a little girl who lived in a village.",
    "The capital of France is",
)
ACT_TOL = 1e-3      # max |bridge - transformers| / max |transformers|, per hook and layer
LOGPROB_TOL = 1e-3  # max |Δ log p| (nats) over positions and vocabulary
# Small models only are checked at load: the check holds a second copy of the weights for a moment.
AUTO_MAX_PARAMS = 2_000_000_000


@dataclass
class VerifyResult:
    model: str
    rows: list[dict]                  # one per (hook, layer): max_abs, scale, rel, passed
    logprob_max_abs: float
    residual_identity_rel: float      # worst layer of the bridge's own resid_pre + attn_out + mlp_out vs resid_post
    n_tokens: int
    seconds: float
    failing: list[str] = field(default_factory=list)   # hook names in forward order

    @property
    def passed(self) -> bool:
        return not self.failing

    def table(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows)

    def summary(self) -> dict:
        """A few numbers for a run manifest."""
        df = self.table()
        worst = df.loc[df["rel"].idxmax()] if len(df) else None
        return {
            "passed": self.passed,
            "max_rel_diff": float(df["rel"].max()) if len(df) else None,
            "worst_hook": str(worst["hook"]) if worst is not None else None,
            "logprob_max_abs": self.logprob_max_abs,
            "residual_identity_rel": self.residual_identity_rel,
            "n_sentences": len(SENTENCES), "n_tokens": self.n_tokens,
            "tolerances": {"act_rel": ACT_TOL, "logprob": LOGPROB_TOL},
            "failing": self.failing[:5],
        }

    def headline(self) -> str:
        s = self.summary()
        if self.passed:
            return (f"PASS {self.model}: {len(self.rows)} hook activations within {ACT_TOL:g} of transformers "
                    f"(worst {s['max_rel_diff']:.2e} at {s['worst_hook']}), log-probs within "
                    f"{self.logprob_max_abs:.2e}, residual identity {self.residual_identity_rel:.2e}")
        return (f"FAIL {self.model}: {self.failing[0]} differs from transformers"
                + (f" (and {len(self.failing) - 1} more hooks)" if len(self.failing) > 1 else "")
                + f"; log-probs max diff {self.logprob_max_abs:.2e}")


def _layers(hf, n_layers: int) -> torch.nn.ModuleList:
    base = getattr(hf, "base_model", hf)
    for mod in [getattr(base, "layers", None), getattr(base, "h", None), *base.modules()]:
        if isinstance(mod, torch.nn.ModuleList) and len(mod) == n_layers:
            return mod
    raise EclensError(f"verify: cannot find the {n_layers} decoder layers of {type(hf).__name__}")


def _mid_module(layer):
    """The module whose input is resid_mid (the residual stream between attention and MLP)."""
    for name in ("pre_feedforward_layernorm", "post_attention_layernorm", "ln_2"):
        # Gemma's post_attention_layernorm normalises the attention output, not the stream
        if name == "post_attention_layernorm" and hasattr(layer, "pre_feedforward_layernorm"):
            continue
        if hasattr(layer, name):
            return getattr(layer, name)
    return None


def _hf_states(hf, ids: torch.Tensor, n_layers: int) -> dict[str, torch.Tensor]:
    """The transformers model's residual stream per layer: resid_pre/resid_post from its own
    ``hidden_states``; resid_mid from the pre-MLP norm's input; attn_out and mlp_out as differences."""
    layers = _layers(hf, n_layers)
    got: dict[str, torch.Tensor] = {}
    handles = []
    for i, layer in enumerate(layers):
        mid = _mid_module(layer)
        if mid is not None:
            handles.append(mid.register_forward_pre_hook(
                lambda _m, args, i=i: got.__setitem__(f"mid{i}", args[0].detach())))
        # hidden_states[-1] is normed by the final norm in transformers: take the last layer's output
        handles.append(layer.register_forward_hook(
            lambda _m, _a, out, i=i: got.__setitem__(f"out{i}", (out[0] if isinstance(out, tuple) else out).detach())))
    try:
        with torch.no_grad():
            o = hf(ids.to(next(hf.parameters()).device), output_hidden_states=True)
    finally:
        for h in handles:
            h.remove()
    hs = o.hidden_states
    states = {"logprobs": o.logits.float().log_softmax(-1)}
    for i in range(n_layers):
        pre = hs[i]
        post = hs[i + 1] if i + 1 < n_layers else got[f"out{i}"]
        states[f"blocks.{i}.hook_resid_pre"] = pre
        states[f"blocks.{i}.hook_resid_post"] = post
        if f"mid{i}" in got:
            mid = got[f"mid{i}"]
            states[f"blocks.{i}.hook_resid_mid"] = mid
            states[f"blocks.{i}.hook_attn_out"] = mid - pre
            states[f"blocks.{i}.hook_mlp_out"] = post - mid
    return states


def _centred(model) -> bool:
    cfg = model.cfg
    return bool(getattr(cfg, "normalization_type", None) in ("LN", "LNPre")
                and getattr(model, "compatibility_mode", False))


def verify_bridge(model, reference, sentences=SENTENCES, hooks=DEFAULT_HOOKS, name: str | None = None) -> VerifyResult:
    """Compare ``model`` (a bridge) with ``reference`` (the unprocessed transformers model it was
    built from: a separate copy, since compatibility mode edits the bridge's weights in place)."""
    from .model import model_id

    t0 = time.perf_counter()
    n = model.cfg.n_layers
    reference.eval()
    want = [f"blocks.{i}.{h}" for i in range(n) for h in hooks]
    worst: dict[str, list[float]] = {k: [0.0, 0.0] for k in want}   # max_abs, scale
    lp_max, ident, n_tok = 0.0, 0.0, 0
    centre = _centred(model)
    for s in sentences:
        ids = model.to_tokens(s)
        n_tok += ids.shape[1]
        with torch.no_grad():
            logits, cache = model.run_with_cache(ids, names_filter=lambda nm: nm in set(want))
        ref = _hf_states(reference, ids, n)
        lp = logits.float().log_softmax(-1)
        lp_max = max(lp_max, (lp - ref["logprobs"].to(lp.device)).abs().max().item())
        for k in want:
            if k not in ref:
                continue
            a, b = cache[k].float(), ref[k].float().to(cache[k].device)
            if centre:
                a, b = a - a.mean(-1, keepdim=True), b - b.mean(-1, keepdim=True)
            worst[k][0] = max(worst[k][0], (a - b).abs().max().item())
            worst[k][1] = max(worst[k][1], b.abs().max().item())
        for i in range(n):
            parts = [f"blocks.{i}.hook_{h}" for h in ("resid_pre", "attn_out", "mlp_out", "resid_post")]
            if all(p in cache.cache_dict for p in parts):
                pre, att, mlp, post = (cache[p].float() for p in parts)
                ident = max(ident, ((pre + att + mlp - post).abs().max() / post.abs().max().clamp_min(1e-12)).item())
    rows, failing = [], []
    for k in want:
        layer, hook = int(k.split(".")[1]), k.split(".", 2)[2]
        max_abs, scale = worst[k]
        has_ref = scale > 0
        rel = max_abs / scale if has_ref else float("nan")
        ok = (rel <= ACT_TOL) if has_ref else True
        rows.append({"hook": k, "kind": hook, "layer": layer, "max_abs": max_abs, "scale": scale, "rel": rel,
                     "reference": has_ref, "passed": ok})
        if not ok:
            failing.append(k)
    if lp_max > LOGPROB_TOL:
        failing.append("logits (log-probs)")
    if ident > ACT_TOL:
        failing.append("residual identity resid_pre + attn_out + mlp_out = resid_post")
    return VerifyResult(name or model_id(model), rows, lp_max, ident, n_tok, time.perf_counter() - t0, failing)


def verify_model(name: str, *, device: str = "cpu", dtype: str = "float32") -> VerifyResult:
    """Load ``name`` (as :func:`eclens.load_model` does) and a separate transformers copy of it, and
    compare them (:func:`verify_bridge`); the record is kept so later loads skip the check."""
    from .model import load_model, resolve_source, torch_dtype_of

    model = load_model(name, device=device, dtype=dtype, verify="never")
    reference = resolve_source(str(name), torch_dtype_of(dtype), None, None, None).hf
    if reference is None:
        raise EclensError(f"verify: {name} is loaded by TransformerLens from the hub; use a local folder")
    res = verify_bridge(model, reference.to(device), name=str(name))
    _save_record(model, res)
    return res


def _record_path(model) -> Path:
    from .model import cache_root, weights_hash

    p = next(model.parameters())
    compat = "compat" if getattr(model, "compatibility_mode", False) else "raw"
    return cache_root() / "verified" / f"{weights_hash(model)}-{str(p.dtype)[6:]}-{p.device.type}-{compat}.json"


def _save_record(model, res: VerifyResult) -> dict:
    from .runs import write_json

    summary = dict(res.summary(), model=res.model, when=time.strftime("%Y-%m-%dT%H:%M:%S"),
                   seconds=round(res.seconds, 2))
    path = _record_path(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, summary)
    return summary


def verify_on_first_load(model, reference_factory) -> None:
    """At load: if this model (by weights hash, dtype, device, mode) was verified before, attach that
    record; else verify it now against ``reference_factory()`` and keep the record. Either way the
    figures reach the run manifest through :func:`eclens.model.manifest_model_entry`. A failure does
    not stop the load (``ec model verify`` is the strict check); the manifest says it failed."""
    if (getattr(model, "eclens_n_params", None) or 0) > AUTO_MAX_PARAMS:
        return
    path = _record_path(model)
    if path.exists():
        try:
            model.eclens_verify = dict(json.loads(path.read_text()), fresh=False)
            return
        except (OSError, ValueError):
            pass  # unreadable record: check again
    reference = reference_factory()
    if reference is None:
        return
    res = verify_bridge(model, reference.to(next(model.parameters()).device), name=getattr(model, "eclens_name", None))
    model.eclens_verify = dict(_save_record(model, res), fresh=True)


def result_dict(res: VerifyResult) -> dict:
    return asdict(res) | {"passed": res.passed}
