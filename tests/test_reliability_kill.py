"""Random kills (issue 21): `ec run --n 3` killed with SIGKILL at seeded moments, then rerun to the
end, gives the same tables as an uninterrupted run (scripts/compare_runs.py, rtol 1e-4: a resumed diff
may fall on other batch boundaries; the checkpoint, state/, is deleted when the run completes) and a folder
that `ec verify` passes. Two kill points, one after the other on the same folder (the second kills the
resumed run); scripts/kill_test.py is the 20-point version. Fixtures of test_reliability_interrupt.
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from eclens.cli import main
from test_reliability_interrupt import ENV, every_file_parses, signal_when, tiny_dir, tok  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
RUN_ARGS = ["--n", "3", "--hooks", "hook_resid_post", "--min-pairs", "1", "--exact-pairs", "1", "--dims-pairs", "2",
            "--max-sets", "1", "--n-controls", "4", "--attribution-pairs", "2", "--verify-top", "1", "--quiet"]


@pytest.mark.slow  # an in-process `ec run`, two killed child runs and the resumed one: ~90 s on 2 loaded cores
def test_ec_run_killed_twice_at_seeded_moments_equals_uninterrupted(tiny_dir, tmp_path, capsys):  # noqa: F811
    args = [*RUN_ARGS, "--model", str(tiny_dir)]
    ref, run = tmp_path / "ref", tmp_path / "run"
    t0 = time.monotonic()
    assert main(["run", "--out", str(ref), *args]) == 0
    t_ref = time.monotonic() - t0
    rng = random.Random(21)
    cmd = [sys.executable, "-m", "eclens", "run", "--out", str(run), *args]
    for lo, hi in ((0.1, 0.5), (0.2, 0.9)):  # seeded moments: early (pairs/diff), then later in the resumed run
        delay = t_ref * rng.uniform(lo, hi)
        began: list[float] = []

        def ready(delay=delay, began=began):
            if not began and (run / ".eclens.lock").exists():  # the child took the writer's lock: it has begun
                began.append(time.monotonic())
            return bool(began) and time.monotonic() - began[0] >= delay

        rc, err, running = signal_when(cmd, ready, signal.SIGKILL, timeout=300)
        assert rc in (-signal.SIGKILL, 0), err[-2000:]
        every_file_parses(run)
    capsys.readouterr()
    assert main(["run", "--out", str(run), *args]) == 0  # the same command, to the end
    assert main(["verify", str(run)]) == 0, capsys.readouterr().out
    assert not list(run.rglob("*.tmp"))
    assert not (run / "state").exists() and not (run / ".state.deleting").exists()  # deleted as the last act
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "compare_runs.py"), str(ref), str(run), "--rtol", "1e-4",
                        "--skip", "diff_stats.safetensors"], capture_output=True, text=True, env=ENV)
    assert r.returncode == 0, r.stdout[-3000:]
