"""The planned cost of ``ec run``, printed before the heavy steps start (issue 19, "Budget").

Each step's work is counted in *sentence forward passes* (one sentence through the model; a backward
pass counts as two), from the run's pairs and settings; one timed forward batch of the run's own
sentences (:func:`time_forward`) turns them into seconds. What is not a forward pass — the diff's
per-dimension accumulation over every hook, the measure step's bootstrap and probe fits, the patching
controls' bookkeeping — enters through a per-step overhead factor (``OVERHEAD``), set from the steps'
measured seconds on the embedded model (README, "Cost"): the estimate is a plan, not a promise, and the
step table at the end says what each step took.

The counts (N pairs, E error pairs, C measured clusters' pairs, L layers, T mean tokens):

- diff: ``2 N`` (clean and changed; every hook read in the same pass);
- measure: recovery ``4 C`` (clean, changed, two ignore runs), invariance ``2 C`` (its permutation null
  reuses the stored statistics), the probe ``2 C``;
- exact: ``exact_pairs x |patch_hooks| x L x (T - p) x 2`` patched runs (both directions) + ``2`` each;
- dims: ``max_sets x dims_pairs x (1 + 2 n_controls) x 2`` (uniform and matched controls, error and
  twin runs) — the twin runs double it;
- attribution: ``attribution_pairs x (2 + 2 + 2 verify_top x 2)`` (two forwards, a backward, the
  verified components exact-patched with as many random ones);
- baseline (``--baseline random``): the diff and measure counts again.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

# Seconds of other work per second of forward passes, per step (negative: the step's passes are batched more
# cheaply than the timed one): fitted on the default `ec run` of the embedded model on an idle 2-core CPU
# (2026-12-02, 45.6 ms per sentence: diff 106 s, measure 50 s, exact 21 s, dims 73 s, attribution 12 s for 358
# pairs; 4 min 41 s in all). The baseline's is scaled from a loaded run (baseline = 1.76x diff + measure) and
# skip's set like exact's (the same patching engine): both are estimates until measured idle.
OVERHEAD = {"diff": 2.26, "measure": -0.24, "exact": -0.39, "dims": -0.51, "attribution": -0.33, "baseline": 1.77,
            "skip": -0.39}


def time_forward(model, pairs: Sequence, batch: int = 8, repeats: int = 2) -> float:
    """Seconds per sentence forward pass: the fastest of ``repeats`` timed batches of the run's clean sentences
    (after a warm-up; the fastest, because other jobs on the machine only ever add time)."""
    from .hooks import pad_id, pad_rows

    rows = [a.clean_ids for a in list(pairs)[:batch]] or [[0] * 12]
    toks = pad_rows(rows, pad_id(model))
    dev = next(model.parameters()).device
    best = float("inf")
    with torch.no_grad():
        model(toks[:1].to(dev))  # warm-up: first-call allocations are not the steady cost
        for _ in range(max(1, repeats)):
            t0 = time.perf_counter()
            model(toks.to(dev))
            if dev.type == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
    return best / len(rows)


def plan(cfg, pairs: Sequence, n_layers: int, steps: Sequence[str]) -> dict[str, int]:
    """Sentence forward passes per step of ``steps`` (module docstring) for ``cfg`` (a ``RunConfig``)."""
    from .measure_step import choose_clusters
    from .roles import is_error_of

    pairs = list(pairs)
    n = len(pairs)
    measured = len(choose_clusters(pairs, cfg.measure_clusters, cfg.seed)) if pairs else 0
    mean_after = (sum(a.length - a.position for a in pairs) / n) if n else 0.0
    out = {"diff": 2 * n,
           "measure": 4 * measured + 2 * measured + 2 * measured,
           "exact": int(cfg.exact_pairs * len(cfg.patch_hooks) * n_layers * max(1.0, mean_after) * 2
                        + 2 * cfg.exact_pairs),
           "dims": cfg.max_sets * min(cfg.dims_pairs, sum(map(is_error_of, pairs))) * (1 + 2 * cfg.n_controls) * 2,
           "attribution": cfg.attribution_pairs * (4 + 4 * cfg.verify_top)}
    if getattr(cfg, "skip_pairs", 0):
        out["skip"] = 2 * cfg.skip_pairs * n_layers * 3 * 2
    if getattr(cfg, "baseline", None):
        out["baseline"] = out["diff"] + out["measure"]
    return {k: int(v) for k, v in out.items() if k in steps}


def plan_lines(cfg, model, pairs: Sequence, steps: Sequence[str]) -> list[str]:
    """The planned cost as lines to print: passes and estimated seconds per step, and the total."""
    sec = time_forward(model, pairs)
    passes = plan(cfg, pairs, int(model.cfg.n_layers), steps)
    est = {k: v * sec * (1 + OVERHEAD.get(k, 1.0)) for k, v in passes.items()}
    total = sum(est.values())
    lines = [f"planned cost: {len(pairs)} pairs, {sec * 1e3:.1f} ms per sentence forward pass (timed on this "
             f"machine now); estimated {total / 60:.1f} min in all (a plan from pass counts; the table at the end "
             "gives each step's seconds)"]
    lines += [f"  {k}: {v:,} forward passes, ~{est[k]:.0f} s" for k, v in passes.items()]
    return lines


__all__ = ["OVERHEAD", "plan", "plan_lines", "time_forward"]
