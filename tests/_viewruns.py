"""One small real run, made once per test session by `ec run` on the embedded model.

The views tests (viz, report, web, browser, run) all read it. It is a real run: real
template pairs plus two hostile ones (a sentence that is a script tag, a category
that is an HTML tag) and a hostile run-folder name, so the escaping tests check what
the real writers produced, not a hand-made folder.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

RUN_NAME = "demo<img src=x onerror=alert(1)>"
XSS_CLEAN = "<script>alert(1)</script> is here."
XSS_CORRUPT = "<script>alert(2)</script> is here."
XSS_CATEGORY = "<b onmouseover=alert(3)>typo</b>"
XSS_ID = "xss-1"
CATEGORIES = ["grammar/agreement", "meaning/subject"]


@dataclass
class RealRun:
    runs_dir: Path
    path: Path
    pairs_file: Path
    argv: list[str]
    returncode: int
    stdout: str
    stderr: str
    seconds: float


_CACHE: dict[str, RealRun] = {}


def write_pairs_file(tokenizer, path: Path) -> Path:
    from eclens.sources.templates import generate_templates

    pairs = generate_templates(tokenizer, n_per_category=5, seed=0, categories=CATEGORIES)
    recs = [p.to_dict() for p in pairs]
    recs.append({"id": XSS_ID, "clean": XSS_CLEAN, "corrupt": XSS_CORRUPT, "category": XSS_CATEGORY,
                 "source": "test"})
    # One pair the tokenizer rejects, so the report's rejection table has a row.
    recs.append({"id": "rejected-1", "clean": "The cat sat.", "corrupt": "The cats were sitting.",
                 "category": "grammar/agreement", "source": "test"})
    path.write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
    return path


def run_argv(pairs_file: Path, out: Path) -> list[str]:
    return ["run", "--pairs", str(pairs_file), "--out", str(out),
            "--hooks", "hook_resid_post,hook_attn_out", "--min-pairs", "3",
            "--patch-hooks", "hook_resid_pre", "--exact-pairs", "1",
            "--dims-pairs", "4", "--max-sets", "2", "--n-controls", "10",
            "--attribution-pairs", "3", "--verify-top", "3", "--split", "-1", "--measure-clusters", "2",
            "--measure-permutations", "1", "--quiet"]


def get_real_run(tmp_path_factory, tokenizer) -> RealRun:
    """Make the run once per session (a subprocess: `ec run` exactly as a user runs it). Under xdist the
    workers share one: the first to ask makes it under the session's common temporary folder while the
    others wait on a lock, then read it (each worker making its own was a minute of both cores)."""
    if "run" in _CACHE:
        return _CACHE["run"]
    reuse = os.environ.get("ECLENS_VIEWS_RUNS")
    if not reuse and os.environ.get("PYTEST_XDIST_WORKER"):
        import fcntl

        shared = tmp_path_factory.getbasetemp().parent
        with open(shared / "views-run.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
            if not (shared / "views-run.done").exists():
                rr = _make_run(shared / "views-runs", tokenizer)
                (shared / "views-run.done").write_text(str(rr.returncode))
                _CACHE["run"] = rr
                return rr
        reuse = str(shared / "views-runs")
    if reuse:  # a folder where this same `ec run` already finished (see run_argv), e.g. on a loaded machine
        runs = Path(reuse)
        out = runs / RUN_NAME
        ok = (out / "report.html").is_file()
        logs = [(runs.parent / f"views-run.{k}").read_text() if (runs.parent / f"views-run.{k}").is_file() else ""
                for k in ("stdout", "stderr")]  # what that `ec run` printed, for the tests that read it
        _CACHE["run"] = RealRun(runs, out, runs.parent / "views-pairs.jsonl",
                                run_argv(runs.parent / "views-pairs.jsonl", out), 0 if ok else 1, logs[0],
                                logs[1] if ok else f"{reuse}: no finished run {out}\n{logs[1][-3000:]}", 0.0)
        return _CACHE["run"]
    _CACHE["run"] = _make_run(tmp_path_factory.mktemp("runs"), tokenizer)
    return _CACHE["run"]


def _make_run(runs: Path, tokenizer) -> RealRun:
    """`ec run` into ``runs``; the pairs file and what it printed (``views-run.stdout``/``.stderr``) beside it."""
    runs.mkdir(parents=True, exist_ok=True)
    pairs_file = write_pairs_file(tokenizer, runs.parent / "views-pairs.jsonl")
    out = runs / RUN_NAME
    argv = run_argv(pairs_file, out)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "160"}
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", "eclens", *argv], capture_output=True, text=True, env=env,
                              timeout=600)
        code, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as e:  # recorded, so every test that needs the run fails at once
        code, stdout, stderr = -9, "", f"timed out after 600 s\n{(e.stderr or b'')[-2000:]!r}"
    (runs.parent / "views-run.stdout").write_text(stdout)
    (runs.parent / "views-run.stderr").write_text(stderr)
    return RealRun(runs, out, pairs_file, argv, code, stdout, stderr, time.perf_counter() - t0)


@pytest.fixture(scope="session")
def real_run(tmp_path_factory, tokenizer) -> RealRun:
    rr = get_real_run(tmp_path_factory, tokenizer)
    if rr.returncode != 0:
        pytest.fail(f"`ec run` failed (exit {rr.returncode}):\n{rr.stderr[-3000:]}")
    return rr
