"""An estimate (not a measurement) of the study's template run on Meta-Llama-3-8B with one H200.

The work is counted as the tool counts it before every run (:func:`eclens.budget.plan`: sentence forward
passes per step, from the run's own pairs and settings), with Llama-3-8B's 32 layers. Each kind of pass
is then priced at what was *measured* for a Llama-3-8B-shaped model (random weights, bf16, 64-token
sequences) on an H200 by ``scripts/gpu_check.py`` (``experiments/gpu_check_h200_run*.json``; the slower
of the two runs):

- diff (and the baseline's diff): ``ec diff``'s whole-call rate, pairs per second;
- exact, dims, skip, attribution: the exact patching rate, patched runs per second;
- measure (and the baseline's measure): the plain forward rate in tokens per second, times the mean
  tokens per sentence of the run's pairs, with the step's CPU overhead factor (``eclens.budget.OVERHEAD``).

The study's sentences are shorter (about a dozen tokens) than the benchmark's 64, and Llama-3's tokenizer
splits them differently from SmolLM2's: the per-pass prices are those of longer sequences, so the
estimate leans high for the passes and ignores model loading (16 GB per command, four commands).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pandas as pd

GPU_FILES = ("gpu_check_h200_run1.json", "gpu_check_h200_run2.json")
LLAMA_LAYERS = 32
PATCHING = ("exact", "dims", "skip", "attribution")


def rates(experiments: Path) -> dict[str, float]:
    """The slower run's rates: diff pairs/s, patched runs/s, forward tokens/s."""
    docs = [json.loads((experiments / f).read_text()) for f in GPU_FILES if (experiments / f).exists()]
    if not docs:
        return {}
    diff = min(d["diff"]["diff_pairs_per_s"] for d in docs)
    patch = min(d["patch"]["patched_runs_per_s"] for d in docs)
    fwd = min(d["diff"]["plain_pairs_per_s"] * 2 * d["seq"] for d in docs)  # two sentences per pair
    return {"diff_pairs_per_s": diff, "patched_runs_per_s": patch, "forward_tokens_per_s": fwd}


def estimate(run: Path, experiments: Path) -> pd.DataFrame:
    """One row per step of the run (passes, price, seconds), from the run's manifest and pairs."""
    from eclens.budget import OVERHEAD, plan
    from eclens.pairs import load_aligned

    r = rates(experiments)
    man = json.loads((run / "manifest.json").read_text())["steps"]["run"]
    cfg = SimpleNamespace(**{**man["config"], "patch_hooks": tuple(man["config"]["patch_hooks"])})
    pairs = load_aligned(run / "pairs.jsonl")
    if not r or not pairs:
        return pd.DataFrame()
    tokens = sum(a.length for a in pairs) / len(pairs)
    steps = [s for s in man["done"] if s not in ("pairs", "report")]
    passes = plan(cfg, pairs, LLAMA_LAYERS, steps)
    rows = []
    for step, n in passes.items():
        if step == "diff":
            sec, price = (n / 2) / r["diff_pairs_per_s"], f"{r['diff_pairs_per_s']:.1f} pairs/s (ec diff)"
        elif step in PATCHING:
            sec, price = n / r["patched_runs_per_s"], f"{r['patched_runs_per_s']:.0f} patched runs/s"
        elif step == "baseline":
            d, m = 2 * len(pairs), n - 2 * len(pairs)
            sec = (d / 2) / r["diff_pairs_per_s"] + m * tokens / r["forward_tokens_per_s"] * (1 + OVERHEAD["measure"])
            price = "diff rate + forward rate"
        else:
            sec = n * tokens / r["forward_tokens_per_s"] * (1 + OVERHEAD.get(step, 0.0))
            price = f"{r['forward_tokens_per_s']:,.0f} tokens/s x (1 + overhead {OVERHEAD.get(step, 0.0):+.2f})"
        rows.append({"step": step, "passes": int(n), "price": price, "seconds": round(sec, 1)})
    return pd.DataFrame(rows)
