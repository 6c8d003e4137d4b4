"""``ec compare``: runs of different models on the same pairs, side by side."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from ._common import console, out

app = typer.Typer()  # its commands are registered on `ec` by eclens.cli


@app.command("compare")
def compare(
    runs: list[Path] = typer.Argument(..., help="two or more run folders (e.g. one per model, same pairs)"),
    out_path: Path = typer.Option(None, "--out", help="folder or .html file (default: compare-A-vs-B/compare.html "
                                  "next to the first run)"),
    no_compress: bool = typer.Option(False, "--no-compress", help="inline plotly uncompressed"),
) -> None:
    """Compare runs on depth-normalised layers (layer / n_layers): relative change, candidate shares,
    behaviour on the pairs valid in every run, recovery; a self-contained HTML page."""
    from ..compare import compare_runs, summary_table

    dest = out_path or runs[0].parent / ("compare-" + "-vs-".join(r.name for r in runs))
    with console.status("comparing runs"):
        page = compare_runs(runs, dest, compress=not no_compress)
        df = summary_table(runs)
    t = Table(title="runs compared")
    for c in df.columns:
        t.add_column(str(c))
    for rec in df.itertuples(index=False):
        t.add_row(*[f"{v:.4g}" if isinstance(v, float) else str(v) for v in rec])
    out.print(t)
    out.print(f"wrote {page}")
