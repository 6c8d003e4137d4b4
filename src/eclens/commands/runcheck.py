"""``ec verify RUN``: every file of a run folder against the checksum recorded when it was written."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from ._common import out

app = typer.Typer()

STYLE = {"intact": "green", "corrupt": "bold red", "missing": "bold red", "unrecorded": "dim"}


@app.command("verify")
def verify_run_cmd(
    run: Path = typer.Argument(..., help="run folder (made by ec run / ec diff / ec cache / ec patch)"),
    show_all: bool = typer.Option(False, "--all", help="list intact files too (default: a count)"),
) -> None:
    """Check a whole run folder: each shard, statistics, tensor and table file against the checksum
    recorded when it was written. Prints what is intact, corrupt or missing; exits 1 if anything is
    corrupt or missing (delete a corrupt file and rerun the command that wrote it: the step resumes)."""
    from ..integrity import human, rerun_hint, verify_run

    checks = verify_run(run)
    counts = {k: sum(c.status == k for c in checks) for k in STYLE}
    t = Table(title=f"ec verify: {run}")
    shown = [c for c in checks if show_all or c.status in ("corrupt", "missing")]
    # File names whole (a test or a script greps them); the detail column wraps instead.
    t.add_column("file", no_wrap=True, min_width=max([len(str(c.path.relative_to(run))) for c in shown] or [4]))
    t.add_column("status", no_wrap=True)
    t.add_column("bytes", justify="right", no_wrap=True)
    t.add_column("detail", overflow="fold")
    for c in shown:
        size = human(c.path.stat().st_size) if c.path.exists() else "-"
        detail = c.detail
        if c.status in ("corrupt", "missing"):
            detail += f"; delete it and rerun `{rerun_hint(c.path)}`" if c.status == "corrupt" \
                else f"; rerun `{rerun_hint(c.path)}`"
        t.add_row(str(c.path.relative_to(run)), f"[{STYLE[c.status]}]{c.status}[/]", size, detail)
    if t.row_count:
        out.print(t)
    out.print(", ".join(f"{n} {k}" for k, n in counts.items()) + f" ({len(checks)} files)")
    if counts["corrupt"] or counts["missing"]:
        raise typer.Exit(1)
