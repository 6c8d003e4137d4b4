"""Long input (issue 21): `ec pairs check` on 200,000 pairs, and `ec diff`'s peak memory on 20,000
pairs against 2,000 (target: within 10 %).

    python scripts/bench_long_input.py                    # both
    python scripts/bench_long_input.py --skip-diff        # only the 200k pairs check
    python scripts/bench_long_input.py --diff-model smollm2-135m   # diff with the embedded model

The pairs are the template pairs (``eclens.sources.templates``, the embedded model's tokenizer, 9
categories) repeated with a varying sentence prefix and fresh ids until there are N, so every length
and category of the templates recurs and no two pairs are the same text. Each `ec` command runs as a
child process; its wall time and peak resident set size come from ``os.wait4`` (the child's own
``ru_maxrss``: the model, the tokenizer and everything else resident, as a user would see it).
`ec diff` runs by default on a 2-layer random-weight Llama (the memory eclens adds per pair, not the
model's, is what scales; ``--diff-model`` changes it), with the default hooks and checkpointing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT / "src")}
PREFIXES = ["", "Yesterday, ", "Today, ", "In the end, ", "As expected, ", "Once again, ", "Meanwhile, ",
            "At home, ", "Later, ", "Suddenly, ", "Of course, ", "In fact, ", "Still, ", "Again, ", "Sometimes, "]


def make_pairs(n: int, path: Path) -> int:
    """Write ``n`` pairs to ``path`` (JSONL); returns how many template pairs they vary."""
    sys.path.insert(0, str(ROOT / "src"))
    from eclens.model import load_tokenizer
    from eclens.sources.templates import generate_templates

    base = generate_templates(load_tokenizer("smollm2-135m"), n_per_category=100, seed=0)
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(n):
            p = base[i % len(base)]
            pre = PREFIXES[(i // len(base)) % len(PREFIXES)]
            rep = i // (len(base) * len(PREFIXES))
            pre = pre + ("Well, " * rep)  # beyond 15 prefixes, a longer one: still distinct text
            c = p.clean if not pre else pre + p.clean[0].lower() + p.clean[1:]
            x = p.corrupt if not pre else pre + p.corrupt[0].lower() + p.corrupt[1:]
            fh.write(json.dumps({"id": f"L{i:06d}", "clean": c, "corrupt": x, "category": p.category}) + "\n")
    return len(base)


def measure(cmd: list[str]) -> tuple[int, float, float, str]:
    """(exit code, wall seconds, peak RSS in MB, last lines of stderr) of ``cmd`` as a child process."""
    t0 = time.monotonic()
    with tempfile.TemporaryFile("w+") as err:
        p = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=err, text=True)
        _, status, ru = os.wait4(p.pid, 0)
        wall = time.monotonic() - t0
        p.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        tail = "\n".join(err.read().strip().splitlines()[-3:])
    return p.returncode, wall, ru.ru_maxrss / 1024, tail


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-check", type=int, default=200_000)
    ap.add_argument("--n-diff", type=int, nargs=2, default=[2_000, 20_000], metavar=("SMALL", "LARGE"))
    ap.add_argument("--diff-model", default=None, help="model for ec diff (default: a tiny random Llama)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--skip-diff", action="store_true")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "eclens-long-input")
    args = ap.parse_args()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    ok = True
    if not args.skip_check:
        f = work / f"pairs-{args.n_check}.jsonl"
        nb = make_pairs(args.n_check, f)
        print(f"{args.n_check} pairs from {nb} template pairs: {f.stat().st_size / 1e6:.1f} MB", flush=True)
        rc, wall, rss, tail = measure([sys.executable, "-m", "eclens", "pairs", "check", str(f),
                                       "--out", str(work / "valid.jsonl"), "--rejected", str(work / "rejected.jsonl")])
        n_valid = sum(1 for _ in open(work / "valid.jsonl", encoding="utf-8")) if rc == 0 else 0
        print(f"ec pairs check, {args.n_check} pairs: exit {rc}, {wall:.1f} s wall "
              f"({args.n_check / wall:.0f} pairs/s), peak RSS {rss:.0f} MB, {n_valid} valid", flush=True)
        ok &= rc == 0
        if rc:
            print(tail)
    if not args.skip_diff:
        model = args.diff_model
        if model is None:
            model = str(work / "tiny")
            if not (Path(model) / "config.json").exists():
                sys.path.insert(0, str(ROOT / "src"))
                from eclens.model import load_tokenizer, save_tiny_model

                save_tiny_model(model, vocab_from=load_tokenizer("smollm2-135m"), max_positions=256)
        peaks = {}
        for n in args.n_diff:
            f = work / f"diff-pairs-{n}.jsonl"
            make_pairs(n, f)
            out = work / f"diff-{n}"
            subprocess.run(["rm", "-rf", str(out)], check=True)
            rc, wall, rss, tail = measure([sys.executable, "-m", "eclens", "diff", str(f), "--out", str(out),
                                           "--model", model, "--batch-size", str(args.batch_size)])
            print(f"ec diff, {n} pairs: exit {rc}, {wall:.1f} s wall ({n / wall:.1f} pairs/s), peak RSS {rss:.0f} MB",
                  flush=True)
            ok &= rc == 0
            if rc:
                print(tail)
            peaks[n] = rss
        small, large = args.n_diff
        if small in peaks and large in peaks:
            ratio = peaks[large] / peaks[small]
            print(f"peak memory {large} / {small} pairs: {ratio:.3f} (target <= 1.10)")
            ok &= ratio <= 1.10
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
