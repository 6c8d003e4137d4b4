"""``ec model info``."""

from __future__ import annotations

import json
from dataclasses import asdict

import typer
from rich.table import Table

from ._common import DeviceMapOpt, DeviceOpt, DtypeOpt, Load4Opt, Load8Opt, ModelOpt, load, out

model_app = typer.Typer(help="Load and describe models.", no_args_is_help=True)  # `ec model`, added by eclens.cli


@model_app.command("info")
def info(
    model: str = ModelOpt,
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    device_map: str = DeviceMapOpt,
    load_in_8bit: bool = Load8Opt,
    load_in_4bit: bool = Load4Opt,
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
) -> None:
    """Architecture, sizes, dtype, device, hook points per layer, load time and a weights hash."""
    from ..model import model_info

    m = load(model, device, dtype, device_map, load_in_8bit, load_in_4bit)
    info = model_info(m)
    if as_json:
        out.print_json(json.dumps(asdict(info)))
        return
    t = Table(title=f"{info.name}", show_header=False)
    for key in ("architecture", "n_layers", "d_model", "n_heads", "n_kv_heads", "d_head", "d_mlp", "d_vocab",
                "n_ctx", "n_params", "dtype", "device", "prepend_bos", "load_seconds", "weights_hash"):
        t.add_row(key, str(getattr(info, key)))
    t.add_row("hooks per layer", f"{len(info.hooks_per_layer)}: " + ", ".join(info.hooks_per_layer))
    t.add_row("global hooks", ", ".join(info.global_hooks))
    out.print(t)
