"""Random kills (issue 21): `ec run --n 3` killed with SIGKILL at seeded moments spread over all its
steps (the report included), rerun to the end, must give the same tables as an uninterrupted run.

    python scripts/kill_test.py [--points 20] [--seed 21] [--work DIR] [--model DIR]

The model is a 2-layer random-weight Llama with the embedded model's tokenizer (made in DIR unless
--model is given), with small patching settings so that one run takes about half a minute on 2 CPU
cores. An uninterrupted `ec run` (a child process, timed, noting when each step finished) is the
reference. Point i of n kills a fresh run inside step ``STEPS[i % 6]`` (its start counted from the
moment the step before it is recorded done, or from the process start for the first step, whose
time includes the imports and the model load) at a seeded uniform fraction of that step's duration
in the reference; so the points cover every step, the report included, whatever the machine's load.
Each killed run is rerun with the same command to the end and compared with scripts/compare_runs.py
(rtol 1e-4: a resumed diff may fall on other batch boundaries; the checkpoint, ``state/`` (deleted
when the run completes; ``diff_stats.safetensors`` in folders from before), is left out, its raw power
sums depend on when checkpoints fell), and `ec verify` must
pass. Prints one line per point and a last line ``matched K of N``; exits 1 unless all matched.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUN_ARGS = ["--n", "3", "--hooks", "hook_resid_post", "--min-pairs", "1", "--exact-pairs", "1", "--dims-pairs", "2",
            "--max-sets", "1", "--n-controls", "4", "--attribution-pairs", "2", "--verify-top", "1", "--quiet"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
       "PYTHONPATH": str(ROOT / "src")}


def ec(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "eclens", *args]


def steps_done(run: Path) -> list[str]:
    try:
        man = json.loads((run / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return []
    return list(((man.get("steps") or {}).get("run") or {}).get("done") or
                [k for k, v in ((man.get("steps") or {}).get("run") or {}).items() if isinstance(v, dict)])


def timed_reference(cmd: list[str], run: Path) -> tuple[float, float, dict[str, float]]:
    """Run to the end; (moment the run folder appeared, end, moment each step was first seen done)."""
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    start, seen = None, {}
    while p.poll() is None:
        now = time.monotonic() - t0
        if start is None and (run / "manifest.json").exists():
            start = now
        for s in steps_done(run):
            seen.setdefault(s, now)
        time.sleep(0.05)
    err = p.stderr.read()
    if p.returncode != 0:
        raise SystemExit(f"reference run failed ({p.returncode}): {err[-2000:]}")
    return start or 0.0, time.monotonic() - t0, seen


STEPS = ("pairs", "diff", "exact", "dims", "attribution", "report")


def kill_at(cmd: list[str], after: str | None, delay: float, run: Path) -> tuple[bool, list[str], float]:
    """Start ``cmd``; ``delay`` seconds after step ``after`` is recorded done (after the start when None),
    SIGKILL it. Returns (was it still running, steps done by then, seconds since the start)."""
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    since = t0 if after is None else None
    while p.poll() is None:
        now = time.monotonic()
        if since is None and after in steps_done(run):
            since = now
        if since is not None and now - since >= delay:
            break
        time.sleep(0.01)
    running = p.poll() is None
    done = steps_done(run)
    if running:
        p.send_signal(signal.SIGKILL)
    p.communicate()
    return running, done, time.monotonic() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--points", type=int, default=20)
    ap.add_argument("--seed", type=int, default=21)
    ap.add_argument("--work", type=Path, default=Path("/tmp/eclens-kill-test"))
    ap.add_argument("--model", type=Path, default=None, help="model folder (default: a tiny random Llama)")
    ap.add_argument("--keep", action="store_true", help="keep each point's run folder")
    args = ap.parse_args()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    model = args.model
    if model is None:
        model = work / "tiny"
        if not (model / "config.json").exists():
            sys.path.insert(0, str(ROOT / "src"))
            from eclens.model import load_tokenizer, save_tiny_model

            save_tiny_model(model, vocab_from=load_tokenizer("smollm2-135m"), max_positions=128)
    base = [*RUN_ARGS, "--model", str(model)]
    ref = work / "ref"
    shutil.rmtree(ref, ignore_errors=True)
    start, end, seen = timed_reference(ec(["run", "--out", str(ref), *base]), ref)
    print(f"reference: {end:.1f} s (run folder at {start:.1f} s); steps done at "
          + ", ".join(f"{k} {v:.1f}" for k, v in seen.items()), flush=True)
    rng = random.Random(args.seed)
    n, matched, t_all = args.points, 0, time.monotonic()
    marks = [0.0, *[seen[s] for s in STEPS]]  # when each step began and ended in the reference
    for i in range(n):
        k = i % len(STEPS)
        delay = (marks[k + 1] - marks[k]) * rng.random()
        run = work / f"run{i:02d}"
        shutil.rmtree(run, ignore_errors=True)
        cmd = ec(["run", "--out", str(run), *base])
        running, done, moment = kill_at(cmd, STEPS[k - 1] if k else None, delay, run)
        r = subprocess.run(cmd, env=ENV, capture_output=True, text=True)
        ok = r.returncode == 0
        why = "" if ok else f"rerun failed ({r.returncode}): {r.stderr.strip().splitlines()[-1:]}"
        if ok:
            c = subprocess.run([sys.executable, str(ROOT / "scripts" / "compare_runs.py"), str(ref), str(run),
                                "--rtol", "1e-4", "--skip", "diff_stats.safetensors"], capture_output=True, text=True)
            v = subprocess.run(ec(["verify", str(run)]), env=ENV, capture_output=True, text=True)
            ok = c.returncode == 0 and v.returncode == 0
            why = "" if ok else ("tables differ: " + " | ".join(ln for ln in c.stdout.splitlines()
                                                               if ln.startswith(("DIFF", "MISS")))[:300]
                                 if c.returncode else f"ec verify: {v.stdout.strip().splitlines()[-1:]}")
        matched += ok
        state = f"killed after steps [{', '.join(done)}]" if running else "finished before the kill"
        print(f"point {i + 1:2d}/{n}: in {STEPS[k]} (+{delay:.1f} s), kill at {moment:5.1f} s, {state}: {'same' if ok else 'DIFFERS ' + why}",
              flush=True)
        if not args.keep and ok:
            shutil.rmtree(run, ignore_errors=True)
    print(f"matched {matched} of {n} ({time.monotonic() - t_all:.0f} s)")
    return 0 if matched == n else 1


if __name__ == "__main__":
    sys.exit(main())
