"""Interruptions: `ec generate`, `ec cache` and `ec diff` stopped part way with SIGINT (Ctrl-C)
and then SIGKILL, then rerun, finish with the same results as an uninterrupted run, and no
file is ever half-written: after every stop every file parses, and once a step finishes
no temporary file is left behind (not even one a SIGKILL cut off before its rename).

The interrupted runs are `ec` child processes, as a user runs them; the uninterrupted
reference and the final rerun run in-process (``eclens.cli.main``). The model is a
2-layer random-weight Llama saved as a local folder; the LLM is tests/llm_server.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
import torch

from eclens.cli import main
from eclens.diff import STATS_FILE
from eclens.pairs import write_jsonl
from llm_server import LLMServer

ROOT = Path(__file__).resolve().parents[1]
N = 24  # pairs
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "COLUMNS": "160",
       "PYTHONPATH": str(ROOT / "src")}


@pytest.fixture(scope="module")
def tok():
    from eclens.model import load_tokenizer

    return load_tokenizer("smollm2-135m")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tok):
    from eclens.model import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"), vocab_from=tok, max_positions=128)


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory, tok) -> Path:
    """24 distinct single-token pairs of a few lengths and two categories."""
    from eclens.pairs import MinimalPair, check_pairs

    nouns = ["dog", "cat", "bird", "horse", "man", "girl", "boy", "child", "car", "tree", "fish", "cow"]
    recs = []
    for i in range(N):
        w, tail = nouns[i % 12], " every single day" * ((i // 12) % 3)
        v, x = [("runs", "run"), ("walks", "walk")][(i // 36) % 2]
        recs.append(MinimalPair(f"r{i:02d}", f"The {w} {v}{tail}.", f"The {w} {x}{tail}.",
                                "grammar/agreement" if i % 2 else "meaning/x"))
    assert len(check_pairs(recs, tok).valid) == N
    p = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    write_jsonl(p, recs)
    return p


# ------------------------------------------------------------------------------ helpers


def signal_when(cmd: list[str], ready: Callable[[], bool], sig: int, cwd: Path | None = None,
                timeout: float = 180) -> tuple[int, str, bool]:
    """Run ``cmd``; once ``ready()`` holds, send ``sig``. Returns (exit code, stderr, still running when signalled)."""
    # A shell that starts pytest in the background (`cmd &`) leaves SIGINT ignored, and an ignored signal stays
    # ignored across exec: Python then installs no KeyboardInterrupt handler. The child gets the default back.
    proc = subprocess.Popen(cmd, cwd=cwd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            if ready():
                break
        except Exception:  # noqa: BLE001 - a file being replaced right now; look again
            pass
        time.sleep(0.02)
    running = proc.poll() is None
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err, running


def every_file_parses(folder: Path) -> None:
    """No half-written file: every JSON, JSONL, CSV, Parquet and safetensors file reads whole."""
    from safetensors import safe_open

    for p in sorted(folder.rglob("*")):
        if not p.is_file() or p.name.endswith(".tmp"):
            continue
        if p.suffix == ".json":
            json.loads(p.read_text(encoding="utf-8"))
        elif p.suffix == ".jsonl":
            for line in p.read_text(encoding="utf-8").splitlines():
                json.loads(line)
        elif p.suffix == ".csv" and p.stat().st_size > 1:
            pd.read_csv(p)
        elif p.suffix == ".parquet":
            pd.read_parquet(p)
        elif p.suffix == ".safetensors":
            with safe_open(str(p), framework="pt") as f:
                for k in f.keys():
                    f.get_tensor(k)


def no_temp_files(folder: Path) -> None:
    left = [p for p in folder.rglob("*.tmp")]
    assert not left, f"temporary files left behind: {left}"


def stats(run: Path) -> tuple[dict, dict]:
    from eclens.diff import load_stats

    return load_stats(run)


def assert_same_tensors(a: dict, b: dict, exact: bool = False) -> None:
    assert set(a) == set(b)
    for k in a:
        x, y = a[k], b[k]
        assert x.shape == y.shape and x.dtype == y.dtype, k
        if exact or not x.is_floating_point():
            assert torch.equal(x.nan_to_num(-7.0), y.nan_to_num(-7.0)), k
        else:
            torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-8, equal_nan=True, msg=k)


def assert_same_table(a: Path, b: Path, keys: list[str]) -> None:
    from eclens.tables import read_table_file

    x, y = read_table_file(a), read_table_file(b)
    assert list(x.columns) == list(y.columns) and len(x) == len(y), a.name
    keys = [k for k in keys if k in x.columns]
    x = x.sort_values(keys).reset_index(drop=True)
    y = y.sort_values(keys).reset_index(drop=True)
    pd.testing.assert_frame_equal(x, y, check_exact=False, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------ ec diff


@pytest.mark.slow  # two `ec` child processes (~10 s of imports each) plus two in-process runs
def test_diff_interrupted_twice_equals_uninterrupted(tiny_dir, pairs_file, tmp_path, capsys):
    args = ["--model", str(tiny_dir), "--batch-size", "1", "--hooks", "hook_resid_post,attn.hook_z",
            "--sample", "16"]
    ref, run = tmp_path / "ref", tmp_path / "run"
    args += ["--keep-state"]  # the state is compared below
    assert main(["diff", str(pairs_file), "--out", str(ref), *args]) == 0
    # A checkpoint after every pair, so the stops land part way (it changes no number).
    args += ["--checkpoint-every", "1"]
    cmd = [sys.executable, "-m", "eclens", "diff", str(pairs_file), "--out", str(run), *args]
    stats_file = run / STATS_FILE

    def done_more_than(n):
        return lambda: stats_file.exists() and len(stats(run)[1]["done"]) > n

    rc, err, running = signal_when(cmd, done_more_than(4), signal.SIGINT)
    assert running, "finished before the signal: make the job bigger"
    assert rc == 130 and "interrupted" in err and "Traceback" not in err, err[-2000:]
    every_file_parses(run)
    no_temp_files(run)  # Ctrl-C: the loop stops at a batch boundary and cleans up
    n1 = len(stats(run)[1]["done"])
    assert 4 < n1 < N and not stats(run)[1]["complete"]

    rc, err, running = signal_when(cmd, done_more_than(n1 + 4), signal.SIGKILL)
    assert running and rc == -signal.SIGKILL
    every_file_parses(run)  # the old checkpoint or the new one, never half of one
    n2 = len(stats(run)[1]["done"])
    assert n1 < n2 < N

    capsys.readouterr()
    assert main(["diff", str(pairs_file), "--out", str(run), *args]) == 0  # the same command again
    assert f"resumed: {n2} pairs" in capsys.readouterr().err
    no_temp_files(run)
    every_file_parses(run)
    (ta, ma), (tb, mb) = stats(ref), stats(run)
    assert ma["complete"] and mb["complete"] and sorted(ma["done"]) == sorted(mb["done"])
    # The float64 totals take float32 staged sums at every checkpoint (rounded once per flush), so the raw
    # state depends on when checkpoints fell; counts, the pair sample and every statistic do not.
    assert_same_tensors({k: v for k, v in ta.items() if k == "count" or k.startswith("sample")},
                        {k: v for k, v in tb.items() if k == "count" or k.startswith("sample")}, exact=True)
    assert ma["sample_ids"] == mb["sample_ids"]
    keys = ["category", "hook", "layer", "offset"]
    assert_same_table(ref / "layers.parquet", run / "layers.parquet", keys)
    assert_same_table(ref / "pairs.csv", run / "pairs.csv", ["id"])
    da, db = pd.read_parquet(ref / "dims.parquet"), pd.read_parquet(run / "dims.parquet")
    pd.testing.assert_frame_equal(da.sort_values([*keys, "dim"]).reset_index(drop=True),
                                  db.sort_values([*keys, "dim"]).reset_index(drop=True),
                                  check_exact=False, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------ ec cache


@pytest.mark.slow  # two `ec` child processes
def test_cache_interrupted_twice_equals_uninterrupted(tiny_dir, pairs_file, tmp_path):
    args = ["--model", str(tiny_dir), "--batch-size", "2", "--shard-size", "2", "--positions", "all",
            "--hooks", "hook_resid_post,attn.hook_pattern"]
    ref, run = tmp_path / "ref", tmp_path / "run"
    assert main(["cache", str(pairs_file), "--out", str(ref), *args]) == 0
    cmd = [sys.executable, "-m", "eclens", "cache", str(pairs_file), "--out", str(run), *args]
    index = run / "cache" / "index.json"

    def shards():
        return len(json.loads(index.read_text())["shards"]) if index.exists() else 0

    rc, err, running = signal_when(cmd, lambda: shards() > 2, signal.SIGINT)
    assert running, "finished before the signal: make the job bigger"
    assert rc == 130 and "interrupted" in err and "Traceback" not in err, err[-2000:]
    every_file_parses(run)
    no_temp_files(run)
    k1 = shards()
    assert 2 < k1 < N // 2

    rc, err, running = signal_when(cmd, lambda: shards() > k1 + 2, signal.SIGKILL)
    assert running and rc == -signal.SIGKILL
    every_file_parses(run)
    k2 = shards()
    assert k1 < k2 < N // 2

    assert main(["cache", str(pairs_file), "--out", str(run), *args]) == 0  # the same command again
    no_temp_files(run)
    every_file_parses(run)
    a = json.loads((ref / "cache" / "index.json").read_text())
    b = json.loads(index.read_text())
    assert b["complete"] and len(b["shards"]) == N // 2
    a.pop("seconds"), b.pop("seconds")
    assert a == b
    from safetensors import safe_open
    from safetensors.torch import load_file

    for s in a["shards"]:
        fa, fb = ref / "cache" / s["file"], run / "cache" / s["file"]
        assert_same_tensors(load_file(str(fa)), load_file(str(fb)), exact=True)
        with safe_open(str(fa), framework="pt") as x, safe_open(str(fb), framework="pt") as y:
            assert x.metadata() == y.metadata()


# ------------------------------------------------------------------------------ ec generate


@pytest.mark.slow  # two `ec` child processes
def test_generate_interrupted_twice_equals_uninterrupted(tmp_path):
    """The LLM server hands out the same deterministic pairs from the start on every run, as a
    model repeats itself: the resumed file must end up with exactly the pairs of an uninterrupted run.
    (One request at a time: with several in flight, which answer fills the last places is a race.)"""
    args = ["--source", "openai", "--n", "24", "--categories", "typo", "--pairs-per-request", "2",
            "--concurrency", "1", "--llm-model", "test-model", "--retry-base", "0.01", "--max-requests", "200"]
    srv = LLMServer().start()
    try:
        ref = tmp_path / "ref.jsonl"
        assert main(["generate", "--out", str(ref), "--base-url", srv.base_url, *args]) == 0
        out = tmp_path / "run" / "pairs.jsonl"
        out.parent.mkdir()
        cmd = [sys.executable, "-m", "eclens", "generate", "--out", str(out), "--base-url", srv.base_url, *args]

        def lines_at_least(n):
            return lambda: out.exists() and out.read_bytes().count(b"\n") >= n

        srv.reset_counters()
        srv.delay = 0.15
        rc, err, running = signal_when(cmd, lines_at_least(4), signal.SIGINT, cwd=out.parent)
        assert running and rc == 130 and "interrupted" in err and "Traceback" not in err, err[-2000:]
        every_file_parses(out.parent)
        n1 = len(out.read_text().splitlines())
        assert 4 <= n1 < 24

        srv.reset_counters()
        rc, err, running = signal_when(cmd, lines_at_least(n1 + 4), signal.SIGKILL, cwd=out.parent)
        assert running and rc == -signal.SIGKILL
        n2 = out.read_bytes().count(b"\n")
        assert n1 + 4 <= n2 < 24

        srv.reset_counters()
        srv.delay = 0.0
        assert main(["generate", "--out", str(out), "--base-url", srv.base_url, *args]) == 0
    finally:
        srv.stop()
    every_file_parses(out.parent)
    no_temp_files(out.parent)
    assert sorted(out.read_text().splitlines()) == sorted(ref.read_text().splitlines())
    rep = json.loads(out.with_suffix(".report.json").read_text())
    assert rep["complete"] and rep["categories"]["typo"]["existing"] == n2


# ------------------------------------------------------------------------------ atomic writes


KILLED_WRITER = """
import os, signal, sys
from eclens.runs import atomic_path
with atomic_path(sys.argv[1]) as tmp:
    tmp.write_text('{"half": ')
    os.kill(os.getpid(), signal.SIGKILL)  # killed before the rename
"""


def test_a_killed_writer_leaves_the_old_file_and_its_temp_is_cleaned(tmp_path):
    from eclens.runs import write_json

    target = tmp_path / "summary.json"
    write_json(target, {"old": 1})
    r = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(target)], env=ENV, capture_output=True, timeout=60)
    assert r.returncode == -signal.SIGKILL
    assert json.loads(target.read_text()) == {"old": 1}  # the old file, whole
    left = list(tmp_path.glob(".summary.json.*.tmp"))
    assert len(left) == 1 and left[0].read_text() == '{"half": '
    # A live writer's temp file (this process) is never touched; the dead one's is.
    mine = tmp_path / f".summary.json.{os.getpid()}.abcdefgh.tmp"
    mine.write_text("in progress")
    write_json(target, {"new": 2})
    assert json.loads(target.read_text()) == {"new": 2}
    assert not left[0].exists() and mine.exists()
