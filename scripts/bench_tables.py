"""Time the finishing work's table build alone: :func:`eclens.diff.tables.all_tables` on one streamed result.

``ec diff``'s end-to-end ratio (``bench_diff.py --e2e``) moves with the forward pass, whose time on a shared
CPU varies by more than a change to the table build saves; this times only the build. It streams ``--pairs``
pairs once (the embedded model, the default settings), then builds every table ``--repeats`` times from
a fresh :class:`eclens.DiffResult` of that state, and prints each build's wall and CPU seconds and their
medians. It times the ``eclens`` that Python finds (to compare another checkout's, put its ``src/`` first on
``PYTHONPATH``; alternate the two runs).

    python scripts/bench_tables.py                      # 225 pairs, 3 builds
    PYTHONPATH=OTHER_CHECKOUT/src python scripts/bench_tables.py --repeats 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import eclens  # noqa: E402  (before bench_diff, which puts this checkout's src/ first on the path)

sys.path.insert(1, str(Path(__file__).resolve().parent))
import bench_diff  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=225)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()

    from eclens.diff import DiffConfig, DiffResult, run_diff
    from eclens.diff.tables import all_tables

    model = eclens.load_model("smollm2-135m", device="cpu", dtype="float32")
    pairs, source = bench_diff.make_pairs(model.tokenizer, args.pairs)
    res = run_diff(model, pairs[: args.pairs], batch_size=args.batch_size, config=DiffConfig())
    rows = []
    for r in range(args.repeats):
        fresh = DiffResult(res.meta, dict(res.tensors), res.model, res.timing)
        t, c = time.perf_counter(), time.process_time()
        all_tables(fresh)
        rows.append((time.perf_counter() - t, time.process_time() - c))
        print(f"  build {r + 1}: {rows[-1][0]:.2f} s wall, {rows[-1][1]:.2f} s CPU", flush=True)
    print(f"eclens from {Path(eclens.__file__).parent}")
    print(f"{len(res.meta['rows'])} pairs ({source}), {torch.get_num_threads()} torch threads: table build median "
          f"{statistics.median(w for w, _ in rows):.2f} s wall, {statistics.median(c for _, c in rows):.2f} s CPU")
    return 0


if __name__ == "__main__":
    sys.exit(main())
