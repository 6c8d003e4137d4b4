"""The random-weight baseline of ``ec run --baseline random`` (DESIGN.md, "Baselines").

The same pairs and the same diff (candidate rules included) on ``random:NAME@SEED`` — the real model's
architecture and tokenizer with freshly initialised weights — and the candidate counts beside the real
model's: a count that a random network reaches as easily is not evidence about the trained one.
``baseline_random.csv``: one row per (model, kind, hook) with ``n_candidates`` and ``n_cells`` (distinct
hook/layer/offset cells holding a candidate), over all pairs (category ``all``).

Recovery and the probe on the random model belong to their own steps (they are not run here).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pandas as pd

from .errors import EclensError

COLUMNS = ["model", "weights", "kind", "hook", "n_candidates", "n_cells"]


def candidate_counts(cand: pd.DataFrame, model: str, weights: str) -> pd.DataFrame:
    """``n_candidates`` and ``n_cells`` per (kind, hook) of a ``candidates.parquet`` frame (category ``all``)."""
    if cand.empty:
        return pd.DataFrame([{"model": model, "weights": weights, "kind": k, "hook": "(any)", "n_candidates": 0,
                              "n_cells": 0} for k in ("stable", "responsive")], columns=COLUMNS)
    c = cand[cand["category"] == "all"] if "category" in cand.columns else cand
    rows = []
    for kind in ("stable", "responsive"):
        k = c[c["kind"] == kind]
        rows.append({"model": model, "weights": weights, "kind": kind, "hook": "(any)", "n_candidates": len(k),
                     "n_cells": int(k.groupby(["hook", "layer", "offset"]).ngroups) if len(k) else 0})
        for h, g in k.groupby("hook"):
            rows.append({"model": model, "weights": weights, "kind": kind, "hook": h, "n_candidates": len(g),
                         "n_cells": int(g.groupby(["layer", "offset"]).ngroups)})
    return pd.DataFrame(rows, columns=COLUMNS)


def baseline_step(run: str | Path, model, pairs: Sequence, *, diff_config=None, seed: int = 0, batch_size: int = 16,
                  loader: Callable | None = None, progress: bool = False):
    """Diff ``pairs`` on ``random:<model>@<seed>`` and write ``baseline_random.csv`` beside the real counts
    (the run's ``candidates.parquet``). ``loader``: how to load a model name (default :func:`eclens.load_model`)."""
    from .diff import run_diff
    from .model import load_model, model_id
    from .runs import record_step, write_table
    from .steps import StepOutcome
    from .tables import read_table_file, table_file

    run, t0 = Path(run), time.perf_counter()
    name = model_id(model)
    real_path = table_file(run, "candidates")
    if real_path is None:
        raise EclensError(f"{run}: no candidates.parquet; the baseline compares with the run's diff, run it first")
    real = read_table_file(real_path) if real_path.stat().st_size > 1 else pd.DataFrame()
    rnd_name = f"random:{name}@{seed}"
    rnd = (loader or load_model)(rnd_name)
    if rnd.tokenizer.get_vocab() != model.tokenizer.get_vocab():
        raise EclensError(f"{rnd_name}: its tokenizer differs from the real model's, so the pairs do not carry over")
    res = run_diff(rnd, list(pairs), batch_size=batch_size, progress=progress, config=diff_config)
    table = pd.concat([candidate_counts(real, name, "trained"), candidate_counts(res.candidates, rnd_name, "random")],
                      ignore_index=True)
    write_table(table, run / "baseline_random.csv")
    tot = table[table["hook"] == "(any)"].set_index(["weights", "kind"])["n_candidates"]
    head = ("candidates, trained vs random weights: "
            + ", ".join(f"{k} {int(tot.get(('trained', k), 0))} vs {int(tot.get(('random', k), 0))}"
                        for k in ("stable", "responsive")))
    record_step(run, "baseline", {"model": rnd_name, "seconds": round(time.perf_counter() - t0, 2),
                                  "files": ["baseline_random.csv"], "headline": head})
    return StepOutcome("done", ["baseline_random.csv"], head, table)


__all__ = ["baseline_step", "candidate_counts"]
