"""``ec model verify``: the bridge's hooks and log-probs against plain transformers."""

from __future__ import annotations

import json

import typer
from rich.table import Table

from ._common import DeviceOpt, DtypeOpt, ModelOpt, console, out
from .model import model_app  # `ec model verify` sits beside `ec model info`


@model_app.command("verify")
def verify(
    model: str = ModelOpt,
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    as_json: bool = typer.Option(False, "--json", help="print every (hook, layer) row as JSON"),
) -> None:
    """Per hook of the default set and per layer, the bridge's activations against the Hugging Face
    model's own hidden states, the residual identity, and log-probs against plain transformers.
    Exits non-zero naming the first hook that differs."""
    from ..errors import EclensError
    from ..verify import result_dict, verify_model

    with console.status(f"verifying {model} on {device} ({dtype})"):
        res = verify_model(model, device=device, dtype=dtype)
    if as_json:
        out.print_json(json.dumps(result_dict(res), default=float))
    else:
        df = res.table()
        wide = df.pivot(index="layer", columns="kind", values="rel")
        t = Table(title=f"{res.model}: max |bridge − transformers| / max |transformers| per hook and layer")
        t.add_column("layer", justify="right")
        for c in wide.columns:
            t.add_column(c.removeprefix("hook_"), justify="right")
        for layer, row in wide.iterrows():
            bad = set(df[(df.layer == layer) & ~df.passed].kind)
            t.add_row(str(layer), *[("[red]" if c in bad else "") + f"{v:.1e}" for c, v in row.items()])
        out.print(t)
        out.print(f"log-probs: max |Δ| {res.logprob_max_abs:.2e} (tolerance 1e-3 nats); residual identity "
                  f"resid_pre + attn_out + mlp_out = resid_post: worst {res.residual_identity_rel:.2e}; "
                  f"{res.n_tokens} tokens, {res.seconds:.1f}s")
    if not res.passed:
        raise EclensError(res.headline())
    out.print(res.headline())
