"""Writing a diff run's results and reading its state back (:meth:`DiffResult.save`, :meth:`DiffResult.load`).

Results (what the report, the web UI and the later steps read) go into the run folder at the precision
:data:`eclens.tables.PRECISION` declares: ``layers.parquet``, ``dims.parquet``, ``candidates.parquet``,
``contrasts.parquet``, ``sensitivity.csv``, ``pairs.csv``, ``heads.csv``, ``diff_directions.safetensors``,
``summary.json``. The state (accumulators and pair sample, :data:`STATS_FILE`) goes into ``RUN/state/``
(:mod:`eclens.state`): only a resume or a merge reads it, and ``ec run``/``ec diff`` delete it when the run
completes unless ``--keep-state``.
"""

from __future__ import annotations

import json
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import EclensError
from .config import STATS_FILE
from .stats_io import load_stats, start_save_stats

if TYPE_CHECKING:
    from .result import DiffResult

# The diff step's results, in the order they are written.
RESULT_FILES = ("layers.parquet", "dims.parquet", "candidates.parquet", "contrasts.parquet", "sensitivity.csv",
                "pairs.csv")


def save_result(res: DiffResult, run: str | Path, *, stats: bool = True, progress: bool = False) -> list[str]:
    """Write every output of the diff step into ``run`` (atomically): the state (``stats``) in the background
    while the tables are computed and written, and whole before this returns (so a kill after the step is
    recorded always finds it, and a kill before resumes from it once written); returns the result files (the
    state is not one). ``progress``: a bar on stderr, a step per hook's tables and one for the files (after the
    streaming bar ends, this is a third of ``ec diff`` at 225 pairs on a 2-core CPU, seconds with nothing on
    screen)."""
    from ..progress import TaskBar

    run = Path(run)
    wait = start_save_stats(run, res.tensors, res.meta) if stats else (lambda: None)
    try:
        with TaskBar(progress, len(res.hooks) + 1, "diff tables") as bar:
            files = _write_tables(res, run, bar)
    finally:
        wait()  # the state is whole on disk before the step can be recorded as done
    return files


def _write_tables(res: DiffResult, run: Path, bar) -> list[str]:
    from ..runs import save_tensors, write_json, write_table

    n_built = 0

    def hook_built() -> None:
        nonlocal n_built
        n_built += 1
        bar.advance()

    res.build_tables(on_hook=hook_built)
    bar.advance(len(res.hooks) - n_built)  # built before (read one by one): nothing left to do for them
    files = list(RESULT_FILES)
    # The files are written by two threads (Arrow's conversions, zstd and the disk release the GIL) while this
    # one makes the directions and the summary: written one after the other, they were a tenth of the step.
    with ThreadPoolExecutor(2) as pool:
        def write(table, name: str) -> Future:
            return pool.submit(lambda: write_table(table() if callable(table) else table, run / name))

        jobs = [write(lambda: res.dims_stored, "dims.parquet")]  # the largest first: its table is made there too
        jobs += [write(t, name) for t, name in ((res.layers, "layers.parquet"), (res.candidates, "candidates.parquet"),
                                                (res.sensitivity, "sensitivity.csv"), (res.pairs, "pairs.csv"))]
        if any(g.n_heads for g in res.groups):
            jobs.append(write(res.heads, "heads.csv"))
            files.append("heads.csv")
        jobs.append(write(res.contrasts, "contrasts.parquet"))
        mean_dirs = {}
        for g in res.groups:
            st = res.cell_stats(g.suffix, "all")
            mean_dirs[f"{g.suffix}/mean_delta"] = st["mean_delta"].float()
            mean_dirs[f"{g.suffix}/sigma_clean"] = st["sigma_clean"].float()
        save_tensors(mean_dirs, run / "diff_directions.safetensors",
                     metadata={"layers": json.dumps({g.suffix: g.layers for g in res.groups}),
                               "offsets": json.dumps(res.offsets)})
        write_json(run / "summary.json", res.summary)
        for f in jobs:
            f.result()  # a write's error, raised here once every write has ended
    bar.advance()
    return files + ["diff_directions.safetensors", "summary.json"]


def load_result(cls: type[DiffResult], run: str | Path) -> DiffResult:
    """A run's diff from its state (``RUN/state/diff_stats.safetensors``); the tables are recomputed from it
    on access. A state deleted when the run completed is the one-line error saying so (its tables are in
    the run folder: :class:`eclens.RunData` reads them)."""
    from ..runs import read_manifest
    from ..state import deleted_hint

    run = Path(run)
    if not (run / STATS_FILE).exists():
        hint = deleted_hint(run)
        if hint:
            raise EclensError(hint)
    tensors, meta = load_stats(run)
    if not meta.get("complete"):
        raise EclensError(f"{run / STATS_FILE}: the diff run is not complete; rerun `ec diff` to resume it")
    man = read_manifest(run)
    step = (man.get("steps") or {}).get("diff") or {}
    return cls(meta, tensors, man.get("model") or {}, step.get("timing") or {})


__all__ = ["RESULT_FILES", "load_result", "save_result"]
