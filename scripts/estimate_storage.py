"""ESTIMATE (from shapes, not measured): the size of an ``ec run`` folder's results and of its state.

    python scripts/estimate_storage.py [--layers 32 --d-model 4096 --pairs 4000]   # Llama-3-8B shaped
    python scripts/estimate_storage.py --smollm2                                     # the default run, to check

State (``RUN/state``, written only with ``--keep-state``) is exact arithmetic on the
accumulator shapes of ``eclens.diff`` (key layout in its docstring), per diff hook ``H``:
``{H}/feat`` [O, C, 7, L, D] (float32 while no state row has passed ``DiffAccumulator.flush_pairs`` = 256 pairs,
the stage's own numbers; float64 after: taken here as pairs / C <= 256, rows balanced), ``{H}/shift`` [2, O, C, L, D] float64 and ``{H}/sample_delta``
[S, O, L, D] float16, with ``O`` offsets, ``C`` state rows (two split halves per (category, swap direction)
cell), ``L`` layers, ``D`` the hook's width, ``S = min(pairs, sample_size)``. ``hook_resid_post`` holds its
last layer only (its others are ``hook_resid_pre``'s next layers: ``eclens.diff.aliases``), so the default
hooks hold ``4L + 1`` hook layers, not ``5L``.

Results are row counts from the same shapes times bytes per row measured on the default ``ec run``
(smollm2-135m, 358 pairs; this branch's storage: ``dims.parquet`` float16/float32 zstd, see
``eclens.tables``); tables whose size does not follow the shapes (patching, measure step, report) are
taken as measured there, scaled by the layer count where they hold one row per layer.
"""

from __future__ import annotations

import argparse

# Measured on the default `ec run` (smollm2-135m: 30 layers, d_model 576, 5 diff hooks, 5 offsets,
# 9 categories, 15 (category, direction) cells -> 30 groups, C = 40 state rows, 358 pairs): bytes per row.
DIMS_BYTES_PER_ROW = 27.9        # dims.parquet: 33.73 MB / 1,209,600 rows
CAND_BYTES_PER_ROW = 26.6        # candidates.parquet (float32): 4.66 MB / 175,267 rows
CAND_FILL = 175267 / (30 * 5 * 30 * 5 * 2 * 50)  # share of the max_candidates slots filled (7.8 %)
LAYERS_BYTES_PER_ROW = 106.7     # layers.parquet (float64): 2.48 MB / 23,250 rows
PAIRS_BYTES_PER_PAIR = 480.0     # pairs.csv + pairs.jsonl
INV_BYTES_PER_ROW = 34.7         # invariance.parquet (measure step): 1.78 MB / 51,324 rows, one per (layer, 3 offsets, dim)
FLUSH_PAIRS = 256                # eclens.diff.accumulate.DiffAccumulator.flush_pairs
FIXED_MB = 3.7 + 2.5             # report.html (plotly inlined), patch and other measure files


def estimate(layers: int, d_model: int, pairs: int, hooks: int = 5, offsets: int = 5, categories: int = 9,
             groups: int = 30, state_rows: int = 40, sample_size: int = 512, max_candidates: int = 50,
             aliased: bool = True) -> dict:
    S = min(pairs, sample_size)
    cell = offsets * layers * d_model
    feat_bytes = 4 if pairs / state_rows <= FLUSH_PAIRS else 8
    # with resid_pre and resid_post among the hooks, resid_post's layers but the last are resid_pre's (aliases)
    stored_cells = cell * hooks - (offsets * (layers - 1) * d_model if aliased and hooks >= 2 else 0)
    state = stored_cells * (state_rows * 7 * feat_bytes + 2 * state_rows * 8 + S * 2)
    state += pairs * 600  # the metadata's per-pair rows (JSON)
    dims_rows = (offsets + categories) * hooks * layers * d_model
    cand_rows = groups * hooks * layers * offsets * 2 * max_candidates * CAND_FILL
    layer_rows = groups * hooks * layers * offsets
    results = {
        "dims.parquet": dims_rows * DIMS_BYTES_PER_ROW,
        "candidates.parquet": cand_rows * CAND_BYTES_PER_ROW,
        "layers.parquet": layer_rows * LAYERS_BYTES_PER_ROW,
        "diff_directions.safetensors": 2 * hooks * cell * 4,
        "pairs": pairs * PAIRS_BYTES_PER_PAIR,
        "invariance.parquet": layers * 3 * d_model * INV_BYTES_PER_ROW,
        "report, measure and patch files": FIXED_MB * 1e6 * layers / 30,
    }
    return {"state": state, "results": results, "results_total": sum(results.values())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--d-model", type=int, default=4096)
    ap.add_argument("--pairs", type=int, default=4000)
    ap.add_argument("--smollm2", action="store_true", help="the default run's shapes (30 layers, 576, 358 pairs)")
    a = ap.parse_args()
    if a.smollm2:
        a.layers, a.d_model, a.pairs = 30, 576, 358
    e = estimate(a.layers, a.d_model, a.pairs)
    print(f"ESTIMATE from shapes: {a.layers} layers, d_model {a.d_model}, {a.pairs} pairs, default hooks and "
          "categories")
    for k, v in e["results"].items():
        print(f"  results  {k:34s} {v / 1e6:10.1f} MB")
    print(f"  results  {'total':34s} {e['results_total'] / 1e6:10.1f} MB")
    print(f"  state    {'state/ (only with --keep-state)':34s} {e['state'] / 1e9:10.2f} GB")


if __name__ == "__main__":
    main()
