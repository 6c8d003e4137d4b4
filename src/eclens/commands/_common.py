"""Options and helpers shared by the CLI commands."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

console = Console(stderr=True)
out = Console()

ModelOpt = typer.Option("smollm2-135m", "--model", "-m", help="smollm2-135m, a hub name, a local HF folder or .gguf")
DeviceOpt = typer.Option("cpu", "--device", help="cpu, cuda or cuda:N")
DtypeOpt = typer.Option("float32", "--dtype", help="float32, float16 or bfloat16")
DeviceMapOpt = typer.Option(None, "--device-map", help="'auto' to spread a large model over GPUs")
Load8Opt = typer.Option(False, "--load-in-8bit", help="8-bit weights via bitsandbytes (CUDA only)")
Load4Opt = typer.Option(False, "--load-in-4bit", help="4-bit weights via bitsandbytes (CUDA only)")


def load(model: str, device: str = "cpu", dtype: str = "float32", device_map: str | None = None,
         load_in_8bit: bool = False, load_in_4bit: bool = False):
    """Load a model with a status spinner; the CLI's single entry to :func:`eclens.load_model`."""
    from ..errors import EclensError
    from ..model import load_model

    if load_in_8bit and load_in_4bit:
        raise EclensError("choose one of --load-in-8bit and --load-in-4bit")
    quantize = "8bit" if load_in_8bit else "4bit" if load_in_4bit else None
    with console.status(f"loading {model} on {device_map or device} ({dtype})"):
        m = load_model(model, device=device, dtype=dtype, device_map=device_map, quantize=quantize)
    console.print(f"[dim]loaded {model} in {m.eclens_load_seconds:.1f}s[/dim]")
    return m


def load_pairs_arg(path: Path, fmt: str | None = None):
    from ..pairs import load_pairs

    return load_pairs(path, fmt=fmt)


def preflight_pairs(path: Path | None, fmt: str | None = None):
    """Read a raw pairs file *before* a model loads: a bad file fails in a fraction of a second with
    its one-line error and nothing written. Returns the pairs, or ``None`` for no file / a run folder."""
    if path is None or not path.is_file():
        return None
    return load_pairs_arg(path, fmt)


def aligned_pairs(m, source: Path, run: Path, ctx=None, *, fmt: str | None = None, raw=None,
                  manifest: dict | None = None, say=None, mode: str = "single") -> list:
    """The run's aligned pairs, aligned and written once (:func:`eclens.runs.prepare_run_pairs`, by rank 0
    under torchrun; the other ranks read what it wrote). ``say(check)`` reports a fresh check."""
    from .. import distributed as D
    from ..errors import EclensError
    from ..pairs import check_with_model, load_aligned
    from ..runs import prepare_run_pairs

    main = ctx is None or ctx.is_main
    if main:
        aligned, chk = prepare_run_pairs(m, source, run, fmt, raw=raw, manifest=manifest, mode=mode)
        if chk is not None and say is not None:
            say(chk)
    elif raw is not None:  # fail with rank 0 on a file without one valid pair rather than wait for it
        chk = check_with_model(raw, m, mode=mode)
        if not chk.valid:
            raise chk.none_valid_error(source)
    if ctx is not None:
        D.barrier(ctx)
    if not main:
        aligned = load_aligned(run / "pairs.jsonl")
    if not aligned:
        raise EclensError(f"{source}: no valid pairs under this model's tokenizer (see {run / 'rejected.jsonl'})")
    return aligned
