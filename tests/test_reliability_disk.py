"""A full disk (issue 21): a write that fails with ENOSPC, EDQUOT or EROFS leaves the run as it was (no
temporary file, every file loads and verifies), the command exits with one line naming the folder and
the bytes it needed, and the same command rerun with space resumes and equals an uninterrupted run.

By fault injection (the N-th ``fsync`` of a run's atomic writes fails, as a write to a full disk does)
at seeded points across the steps, and on a real size-limited tmpfs where this machine lets us mount
one (root, ``mount -t tmpfs``; skipped with the reason otherwise).
"""

from __future__ import annotations

import errno
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from eclens.cli import main
from eclens.pairs import write_jsonl

ROOT = Path(__file__).resolve().parents[1]
SENTENCES = [("The dog runs.", "The dog run.", "grammar/agreement"),
             ("The cat sits.", "The cat sit.", "grammar/agreement"),
             ("The boy eats.", "The boy eat.", "grammar/agreement"),
             ("The girl sleeps.", "The girl sleep.", "grammar/agreement"),
             ("The bird walks every day.", "The horse walks every day.", "meaning/subject"),
             ("The man walks every day.", "The child walks every day.", "meaning/subject")]
RUN_ARGS = ["--n", "3", "--hooks", "hook_resid_post", "--min-pairs", "1", "--exact-pairs", "1", "--dims-pairs", "2",
            "--max-sets", "1", "--n-controls", "4", "--attribution-pairs", "2", "--verify-top", "1", "--quiet"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from eclens.model import load_tokenizer, save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny-disk"), vocab_from=load_tokenizer("smollm2-135m"),
                           max_positions=128)


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("disk-pairs") / "raw.jsonl"
    write_jsonl(p, [{"id": f"q{i}", "clean": c, "corrupt": x, "category": k} for i, (c, x, k) in enumerate(SENTENCES)])
    return p


class FailingDisk:
    """``os.fsync`` fails with ``code`` at its ``at``-th call (counting from 1); ``at=None`` only counts."""

    def __init__(self, at: int | None, code: int = errno.ENOSPC):
        self.at, self.code, self.calls, self.real = at, code, 0, os.fsync

    def __call__(self, fd):
        self.calls += 1
        if self.calls == self.at:
            raise OSError(self.code, os.strerror(self.code))
        return self.real(fd)


def one_line_error(err: str, run: Path) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    line = lines[0]
    assert str(run) in line and "needs about" in line and "rerun the same command" in line, line
    return line


def loads_and_verifies(run: Path) -> None:
    """The state the failed write left: no temporary file, every table reads, nothing corrupt."""
    from eclens import integrity
    from eclens.runs import RunData

    assert not list(run.rglob("*.tmp")), list(run.rglob("*.tmp"))
    if not run.exists():
        return
    bad = [c for c in integrity.verify_run(run) if c.status == "corrupt"]
    assert not bad, bad
    d = RunData(run)
    for name in ("pairs", "check", "layers", "candidates", "pair_metrics", "summary", "patch_exact",
                 "patch_attribution", "patch_summary", "manifest"):
        getattr(d, name)


def same_tables(a: Path, b: Path) -> None:
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "compare_runs.py"), str(a), str(b), "--rtol", "1e-4",
                        "--skip", "diff_stats.safetensors"], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:]


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES])
def test_a_failed_write_keeps_the_old_file_and_says_the_bytes(tmp_path, monkeypatch, code):
    import json

    from eclens.errors import EclensError
    from eclens.runs import write_json

    target = tmp_path / "summary.json"
    write_json(target, {"old": 1})
    monkeypatch.setattr(os, "fsync", FailingDisk(1, code))
    with pytest.raises(EclensError) as e:
        write_json(target, {"new": "x" * 5000})
    monkeypatch.undo()
    msg = str(e.value)
    assert msg.startswith(f"{tmp_path}: cannot write summary.json: ") and "needs about 5.0 KB" in msg
    assert "\n" not in msg and json.loads(target.read_text()) == {"old": 1}
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.slow  # five `ec diff` on the tiny model: ~35 s on the loaded 2-core machine
def test_diff_on_a_full_disk_keeps_the_run_and_resumes(tiny_dir, raw, tmp_path, monkeypatch, capsys):
    """`ec diff` whose 5th, 9th, 12th write fails (inside the diff outputs), then rerun with space."""
    common = ["--model", str(tiny_dir), "--batch-size", "2"]
    ref, run = tmp_path / "ref", tmp_path / "run"
    assert main(["diff", str(raw), "--out", str(ref), *common]) == 0
    capsys.readouterr()
    for at, code in ((5, errno.ENOSPC), (9, errno.EDQUOT), (12, errno.EROFS)):
        disk = FailingDisk(at, code)
        monkeypatch.setattr(os, "fsync", disk)
        assert main(["diff", str(raw), "--out", str(run), *common]) == 2
        monkeypatch.setattr(os, "fsync", disk.real)
        line = one_line_error(capsys.readouterr().err, run)
        assert {errno.ENOSPC: "no space left", errno.EDQUOT: "quota", errno.EROFS: "read-only"}[code] in line
        loads_and_verifies(run)
    assert main(["diff", str(raw), "--out", str(run), *common]) == 0  # with space again
    loads_and_verifies(run)
    same_tables(ref, run)


@pytest.mark.slow  # a counting run and four failing ones of `ec run` (~25 s each on the loaded 2-core machine)
def test_ec_run_on_a_full_disk_at_seeded_writes_across_the_steps(tiny_dir, tmp_path, monkeypatch, capsys):
    args = [*RUN_ARGS, "--model", str(tiny_dir)]
    ref = tmp_path / "ref"
    count = FailingDisk(None)
    monkeypatch.setattr(os, "fsync", count)
    assert main(["run", "--out", str(ref), *args]) == 0
    monkeypatch.setattr(os, "fsync", count.real)
    n = count.calls
    assert n > 20
    rng = random.Random(21)
    points = sorted(rng.randrange(1 + q * n // 4, (q + 1) * n // 4) for q in range(4))  # one per quarter
    run, fired = tmp_path / "run", 0
    for at in points:  # one folder, each failure resumed by the next attempt, as a user would
        disk = FailingDisk(at)
        monkeypatch.setattr(os, "fsync", disk)
        rc = main(["run", "--out", str(run), *args])
        monkeypatch.setattr(os, "fsync", disk.real)
        err = capsys.readouterr().err
        if disk.calls >= at:  # the resumed run writes less than the first: a late point may not be reached
            assert rc == 2, err[-2000:]
            one_line_error(err, run)
            fired += 1
        loads_and_verifies(run)
    assert fired >= 2  # the first two always are: each resumed run still writes more than a quarter
    assert main(["run", "--out", str(run), *args]) == 0
    loads_and_verifies(run)
    same_tables(ref, run)


def test_a_disk_error_outside_the_atomic_writes_is_one_line_too(tmp_path, monkeypatch, capsys):
    """Any write (a lock file, a library's own file) that fails for space: one line, no traceback."""
    from eclens import integrity

    def full(run):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x.bin"))

    monkeypatch.setattr(integrity, "verify_run", full)
    assert main(["verify", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {tmp_path}: cannot write x.bin: no space left")


def _mount_tmpfs(where: Path, size: int) -> str | None:
    """Mount a tmpfs of ``size`` bytes at ``where``; the reason it cannot, or None."""
    if os.name != "posix" or os.geteuid() != 0:
        return "mounting a tmpfs needs root"
    where.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True,
                       text=True)
    return None if r.returncode == 0 else f"mount -t tmpfs failed here: {r.stderr.strip() or r.returncode}"


def _resize(where: Path, size: int) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(where)], check=True, capture_output=True)


@pytest.mark.slow  # three `ec run`s (~25 s each on the loaded 2-core machine)
def test_ec_run_on_a_real_tmpfs_too_small(tiny_dir, tmp_path, capsys):
    args = [*RUN_ARGS, "--model", str(tiny_dir)]
    ref = tmp_path / "ref"
    assert main(["run", "--out", str(ref), *args]) == 0
    need = sum(p.stat().st_size for p in ref.rglob("*") if p.is_file())
    mnt = tmp_path / "small"
    why = _mount_tmpfs(mnt, need // 2)  # half of what the run writes: it fails part way
    if why:
        pytest.skip(why)
    try:
        run = mnt / "run"
        capsys.readouterr()
        assert main(["run", "--out", str(run), *args]) == 2
        line = one_line_error(capsys.readouterr().err, run)
        assert "no space left" in line
        loads_and_verifies(run)
        _resize(mnt, need * 3)  # the user frees space (atomic writes need the old and the new copy at once)
        assert main(["run", "--out", str(run), *args]) == 0
        loads_and_verifies(run)
        same_tables(ref, run)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
