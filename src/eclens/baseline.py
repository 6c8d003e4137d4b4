"""The random-weight baseline of ``ec run --baseline random`` (DESIGN.md, "Baselines").

The same pairs and the same diff (candidate rules included) on ``random:NAME@SEED`` — the real model's
architecture and tokenizer with freshly initialised weights — and the candidate counts beside the real
model's: a count that a random network reaches as easily is not evidence about the trained one.
``baseline_random.csv``: one row per (model, kind, hook) with ``n_candidates`` and ``n_cells`` (distinct
hook/layer/offset cells holding a candidate), over all pairs (category ``all``).

With a measure configuration (``ec run --baseline random`` passes the run's, without the invariance
part), recovery and the error-signal probe run on the random model too, on the same measured clusters:
``baseline_random_measure.csv`` holds, per weights (``trained`` from the run's ``measure.json``,
``random`` measured here), the recovery index at the last token and the 2x2 error effect per category
and the probe's peak accuracy, each with its cluster-bootstrap interval — a recovery or a probe that a
random network shows as well is a property of the tokens and the architecture, not of training. Both
tables go into ``summary.json`` (``baseline_random``) and the report's glance.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pandas as pd

from .errors import EclensError

COLUMNS = ["model", "weights", "kind", "hook", "n_candidates", "n_cells"]
MEASURE_COLUMNS = ["model", "weights", "measure", "category", "estimate", "low", "high", "n_clusters", "note"]


def measure_rows(summary: dict | None, model: str, weights: str) -> list[dict]:
    """The comparable headline numbers of a measure summary (``measure.json``): recovery index at the last
    token and the 2x2 error effect per category, the probe's peak accuracy."""
    s = summary or {}
    rec = s.get("recovery") or {}
    base = {"model": model, "weights": weights}
    rows = [{**base, "measure": "recovery_index_last", "category": r["category"], "estimate": r.get("index"),
             "low": r.get("low"), "high": r.get("high"), "n_clusters": r.get("n_clusters"),
             "note": f"vs {r.get('comparison')}"} for r in rec.get("index_last") or []]
    rows += [{**base, "measure": "2x2_error_effect_last", "category": r["category"], "estimate": r.get("estimate"),
              "low": r.get("low"), "high": r.get("high"), "n_clusters": r.get("n_clusters"),
              "note": f"permutation p {r.get('p_perm')}"} for r in rec.get("interaction_2x2") or []]
    pr = s.get("probe") or {}
    if pr.get("peak_acc") is not None:
        rows.append({**base, "measure": "probe_peak_acc", "category": "all", "estimate": pr["peak_acc"],
                     "low": pr.get("peak_low"), "high": pr.get("peak_high"), "n_clusters": pr.get("n_clusters"),
                     "note": f"layer {pr.get('peak_layer')}; null 95 % {pr.get('peak_null_q95')}; {pr.get('items')}"})
    return rows


def _measure_compare(run: Path, rnd, rnd_name: str, name: str, pairs: Sequence, cfg, progress: bool):
    """Recovery and the probe on the random model; the table beside the trained model's ``measure.json``."""
    from .measure_step import measure, read_measure

    res = measure(rnd, list(pairs), cfg, progress=progress)
    table = pd.DataFrame(measure_rows(read_measure(run), name, "trained") + measure_rows(res.summary, rnd_name,
                                                                                         "random"),
                         columns=MEASURE_COLUMNS)
    return table, res.summary


def _measure_head(t: pd.DataFrame) -> str:
    def get(w, m):
        return t[(t["weights"] == w) & (t["measure"] == m)]

    parts = []
    pk = {w: get(w, "probe_peak_acc") for w in ("trained", "random")}
    if all(len(v) for v in pk.values()):
        parts.append("probe peak " + " vs ".join(f"{float(v['estimate'].iloc[0]):.2f}" for v in pk.values()))
    ri = {w: get(w, "recovery_index_last") for w in ("trained", "random")}
    if all(len(v) for v in ri.values()):
        parts.append("median recovery index " + " vs ".join(
            f"{float(pd.to_numeric(v['estimate'], errors='coerce').median()):+.2f}" for v in ri.values()))
    return "; ".join(parts)


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
                  loader: Callable | None = None, progress: bool = False, measure_config=None):
    """Diff ``pairs`` on ``random:<model>@<seed>`` and write ``baseline_random.csv`` beside the real counts
    (the run's ``candidates.parquet``); with ``measure_config`` also recovery and the probe
    (``baseline_random_measure.csv``). ``loader``: how to load a model name (default :func:`eclens.load_model`)."""
    from .diff import run_diff
    from .model import load_model, model_id
    from .runs import merge_json, record_step, write_table
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
    files = ["baseline_random.csv"]
    tot = table[table["hook"] == "(any)"].set_index(["weights", "kind"])["n_candidates"]
    head = ("candidates, trained vs random weights: "
            + ", ".join(f"{k} {int(tot.get(('trained', k), 0))} vs {int(tot.get(('random', k), 0))}"
                        for k in ("stable", "responsive")))
    summary = {"model": rnd_name, "candidates": json.loads(table.to_json(orient="records"))}
    if measure_config is not None:
        mt, _ = _measure_compare(run, rnd, rnd_name, name, pairs, measure_config, progress)
        write_table(mt, run / "baseline_random_measure.csv")
        files.append("baseline_random_measure.csv")
        summary["measure"] = json.loads(mt.to_json(orient="records"))
        extra = _measure_head(mt)
        head += f"; {extra}" if extra else ""
    if (run / "summary.json").exists():
        merge_json(run / "summary.json", "baseline_random", summary)
    record_step(run, "baseline", {"model": rnd_name, "seconds": round(time.perf_counter() - t0, 2),
                                  "files": files, "headline": head})
    return StepOutcome("done", files, head, table)


__all__ = ["MEASURE_COLUMNS", "baseline_step", "candidate_counts", "measure_rows"]
