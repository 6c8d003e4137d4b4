"""Compare every table of two run folders: same files, same columns, same values.

    python scripts/compare_runs.py BEFORE AFTER [--rtol 1e-4]

CSV, Parquet, JSON and JSONL files and the tensors of safetensors files are compared;
numbers within ``rtol`` (relative to the larger magnitude, with an absolute floor of
``rtol * 1e-3`` for values near zero), everything else exactly. Timing fields (``seconds``,
``timing``, ``created``, ``pairs_per_second``, ...) and ``manifest.json`` / ``report.html`` /
checkpoints are skipped (they record when and how, not what). Prints one line per file
with the largest relative difference; exits 1 if any file differs.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd

# checksums.json: digests of files whose timing fields differ from run to run (eclens.integrity)
SKIP_FILES = {"manifest.json", "report.html", "checksums.json"}
TIMING_KEYS = {"seconds", "timing", "created", "pairs_per_second", "elapsed", "time", "wall_seconds"}


def _rel(a: float, b: float, floor: float) -> float:
    if (isinstance(a, float) and math.isnan(a)) and (isinstance(b, float) and math.isnan(b)):
        return 0.0
    if a == b:
        return 0.0
    return abs(a - b) / max(abs(a), abs(b), floor)


def compare_values(a, b, path: str, floor: float, out: list) -> float:
    """Walk two JSON-like values; returns the largest relative difference, notes mismatches in ``out``."""
    if isinstance(a, dict) and isinstance(b, dict):
        worst = 0.0
        for k in sorted(set(a) | set(b)):
            if k in TIMING_KEYS:
                continue
            if k not in a or k not in b:
                out.append(f"{path}.{k}: only in {'after' if k in b else 'before'}")
                continue
            worst = max(worst, compare_values(a[k], b[k], f"{path}.{k}", floor, out))
        return worst
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            out.append(f"{path}: {len(a)} vs {len(b)} items")
            return math.inf
        return max([compare_values(x, y, f"{path}[{i}]", floor, out) for i, (x, y) in enumerate(zip(a, b))] or [0.0])
    num = (int, float)
    if isinstance(a, num) and isinstance(b, num) and not isinstance(a, bool) and not isinstance(b, bool):
        return _rel(float(a), float(b), floor)
    if a != b:
        out.append(f"{path}: {a!r} vs {b!r}")
        return math.inf
    return 0.0


def compare_frames(a: pd.DataFrame, b: pd.DataFrame, floor: float, out: list) -> float:
    if list(a.columns) != list(b.columns):
        out.append(f"columns differ: only before {sorted(set(a.columns) - set(b.columns))}, "
                   f"only after {sorted(set(b.columns) - set(a.columns))}")
        common = [c for c in a.columns if c in b.columns]
        a, b = a[common], b[common]
    if len(a) != len(b):
        out.append(f"{len(a)} vs {len(b)} rows")
        return math.inf
    worst = 0.0
    for c in a.columns:
        x, y = a[c], b[c]
        if pd.api.types.is_numeric_dtype(x) and pd.api.types.is_numeric_dtype(y) and not pd.api.types.is_bool_dtype(x):
            xv, yv = x.to_numpy(dtype=float), y.to_numpy(dtype=float)
            both_nan = np.isnan(xv) & np.isnan(yv)
            if (np.isnan(xv) != np.isnan(yv)).any():
                out.append(f"{c}: NaN in different rows")
                worst = math.inf
            d = np.abs(xv - yv) / np.maximum(np.maximum(np.abs(xv), np.abs(yv)), floor)
            d = d[~both_nan]
            if len(d):
                worst = max(worst, float(np.nanmax(d)))
        else:
            xs, ys = x.astype(str).to_numpy(), y.astype(str).to_numpy()
            # Missing on both sides is equal, whatever form it takes (NaN in one table, None in another).
            differ = (xs != ys) & ~(x.isna().to_numpy() & y.isna().to_numpy())
            bad = int(differ.sum())
            if bad:
                i = int(np.argmax(differ))
                out.append(f"{c}: {bad} cells differ (first row {i}: {xs[i]!r} vs {ys[i]!r})")
                worst = math.inf
    return worst


def read(path: Path):
    if path.suffix == ".csv":
        return pd.read_csv(path) if path.stat().st_size > 1 else pd.DataFrame()
    if path.suffix == ".parquet":
        return pd.read_parquet(path)
    if path.suffix == ".json":
        return json.loads(path.read_text(encoding="utf-8"))
    if path.suffix == ".jsonl":
        return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return {k: v.double().numpy() for k, v in load_file(str(path)).items()}
    return None


def compare_file(a: Path, b: Path, rtol: float) -> tuple[float, list[str]]:
    floor = rtol * 1e-3
    out: list[str] = []
    x, y = read(a), read(b)
    if isinstance(x, pd.DataFrame):
        return compare_frames(x, y, floor, out), out
    if a.suffix == ".safetensors":
        worst = 0.0
        for k in sorted(set(x) | set(y)):
            if k not in x or k not in y:
                out.append(f"tensor {k}: only in {'after' if k in y else 'before'}")
                worst = math.inf
            elif x[k].shape != y[k].shape:
                out.append(f"tensor {k}: shape {x[k].shape} vs {y[k].shape}")
                worst = math.inf
            else:
                xv, yv = x[k], y[k]
                ok = ~(np.isnan(xv) & np.isnan(yv))
                d = np.abs(xv - yv)[ok] / np.maximum(np.maximum(np.abs(xv), np.abs(yv))[ok], floor)
                worst = max(worst, float(d.max()) if d.size else 0.0)
        return worst, out
    return compare_values(x, y, a.name, floor, out), out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("before", type=Path)
    ap.add_argument("after", type=Path)
    ap.add_argument("--rtol", type=float, default=1e-4)
    ap.add_argument("--skip", action="append", default=[], help="a file name to leave out (repeatable)")
    args = ap.parse_args(argv)
    exts = {".csv", ".parquet", ".json", ".jsonl", ".safetensors"}
    names = lambda d: {p.name for p in d.iterdir() if p.is_file() and p.suffix in exts}  # noqa: E731
    before, after = names(args.before), names(args.after)
    skip = SKIP_FILES | set(args.skip)
    failed = False
    for n in sorted(before - after):
        print(f"MISSING after: {n}")
        failed = True
    for n in sorted(after - before):
        print(f"NEW after:     {n}")
    for n in sorted(before & after):
        if n in skip:
            print(f"skipped        {n}")
            continue
        worst, notes = compare_file(args.before / n, args.after / n, args.rtol)
        bad = worst > args.rtol or bool(notes)
        failed |= bad
        print(f"{'DIFFERS' if bad else 'same   '}        {n}: max rel diff {worst:.3g}")
        for line in notes[:8]:
            print(f"                 {line}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
