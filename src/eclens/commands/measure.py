"""``ec measure``: recovery, selective invariance and the error-signal probe on a run's pairs."""

from __future__ import annotations

from pathlib import Path

import typer

from ._common import DeviceOpt, DtypeOpt, console, load, out

app = typer.Typer()  # its commands are registered on `ec` by eclens.cli


@app.command("measure")
def measure(
    run: Path = typer.Argument(..., help="a run folder holding pairs.jsonl (made by `ec run`, `ec diff`, ...)"),
    model: str = typer.Option(None, "--model", "-m", help="the run's model (default: the one its manifest names)"),
    clusters: int = typer.Option(10, "--clusters", help="clusters per category to measure (0: all)"),
    permutations: int = typer.Option(3, "--permutations", help="permutation-null draws (invariance; the probe 2x)"),
    n_boot: int = typer.Option(1000, "--n-boot", help="cluster-bootstrap replicates of the summaries"),
    invariance: bool = typer.Option(True, "--invariance/--no-invariance", help="measure selective invariance"),
    probe: bool = typer.Option(True, "--probe/--no-probe", help="measure the error-signal probe"),
    seed: int = typer.Option(0, "--seed", help="seed of the cluster choice, bootstrap and permutations"),
    batch_size: int = typer.Option(16, "--batch-size", help="pairs per forward pass"),
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bars"),
) -> None:
    """Error correction measured: recovery index per category with cluster-bootstrap intervals against twins and
    the ignore baseline, error-invariant / error-specific cells against a permutation null, the probe per layer.
    Writes recovery.csv, recovery_index.csv, invariance.parquet, probe.csv, measure.json into RUN."""
    from ..errors import EclensError
    from ..lock import lock_run
    from ..measure_step import MeasureConfig, measure_step
    from ..pairs import load_aligned
    from ..runs import check_manifest_model, read_manifest

    for name, v in (("--clusters", clusters + 1), ("--permutations", permutations), ("--n-boot", n_boot),
                    ("--batch-size", batch_size)):
        if v < 1:
            raise EclensError(f"{name} must be at least {1 if name != '--clusters' else 0}")
    if not (run / "pairs.jsonl").is_file():
        raise EclensError(f"{run}: no pairs.jsonl; give a run folder made by `ec run`, `ec diff` or `ec pairs check`")
    pairs = load_aligned(run / "pairs.jsonl")  # a bad file fails now, not after the model loads
    if not pairs:
        raise EclensError(f"{run / 'pairs.jsonl'}: no pairs; rerun the step that made it")
    name = model or (read_manifest(run).get("model") or {}).get("name") or "smollm2-135m"
    lock_run(run)  # before the model loads, so a second writer is refused at once
    m = load(name, device, dtype)
    from ..model import model_id, weights_hash

    check_manifest_model(run, model_id(m), weights_hash(m))
    cfg = MeasureConfig(max_clusters=clusters or None, seed=seed, invariance=invariance, probe=probe, n_boot=n_boot,
                        n_permutations=permutations, batch_size=batch_size)
    done = measure_step(run, m, pairs, cfg, progress=not quiet, log=lambda s: console.print(s, markup=False))
    out.print(done.headline)
    if done.status == "done":
        out.print(f"wrote {', '.join(done.files)} in {run}")
