"""One writer at a time on a run folder (issue 21; eclens.lock).

A process holding the writer's lock (taken through the library, as every writing command takes it)
makes `ec diff` into the same folder exit at once with a one-line error naming the holder's pid and
command; readers never touch the lock; after the holder is SIGKILLed (the kernel drops its flock) the
next `ec diff` takes the lock over and finishes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from eclens.lock import LOCK_FILE, lock_run, release_all
from eclens.runs import RunData

HOLD = ("import sys, time; from eclens.lock import lock_run; lock_run(sys.argv[1]); print('held', flush=True); "
        "sys.stdin.read()")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from eclens.model import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny-lock"), max_positions=64)


def _holder(run: Path) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def _ec_diff(pairs: Path, run: Path, model: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "eclens", "diff", str(pairs), "--model", str(model), "--out", str(run)],
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow  # two `ec diff` processes and a model load each: ~160 s on the loaded 2-core machine
def test_second_writer_is_refused_and_a_killed_holders_lock_is_taken_over(tiny_dir, tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"id": f"p{i}", "clean": c, "corrupt": x, "category": "grammar/agreement"})
                             + "\n" for i, (c, x) in enumerate([("The dog runs.", "The dog run."),
                                                                  ("The cat sits.", "The cat sit.")])))
    run = tmp_path / "run"
    h = _holder(run)
    try:
        assert f"pid {h.pid}:" in (run / LOCK_FILE).read_text()
        RunData(run)  # a reader neither takes nor waits for the lock
        t0 = time.perf_counter()
        r = _ec_diff(pairs, run, tiny_dir)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2, r.stderr[-2000:]
        assert lines[-1].startswith(f"error: {run}: another eclens command is writing") and f"pid {h.pid}: " in lines[-1]
        assert "Traceback" not in r.stderr and not (run / "manifest.json").exists()
        refused_s = time.perf_counter() - t0
    finally:
        h.send_signal(signal.SIGKILL)
        h.wait()
    assert (run / LOCK_FILE).exists()  # the dead holder's file stays; its flock went with the process
    r = _ec_diff(pairs, run, tiny_dir)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (run / "candidates.parquet").exists() and not (run / LOCK_FILE).exists()
    print(f"refused after {refused_s:.1f} s (interpreter start and imports; before the model loads)")


def test_lock_is_reentrant_in_one_process_and_refuses_another(tmp_path):
    run = tmp_path / "run"
    lock_run(run)
    lock_run(run)  # the step engine and the command both take it
    try:
        r = subprocess.run([sys.executable, "-c", "import sys; from eclens.lock import lock_run; lock_run(sys.argv[1])",
                            str(run)], capture_output=True, text=True, timeout=120)
        assert r.returncode != 0 and f"pid {os.getpid()}: " in r.stderr
    finally:
        release_all()
    assert not run.exists()  # made by the lock and left empty: removed with it
