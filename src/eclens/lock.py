"""One writer at a time on a run folder (issue 21).

Every command that writes a run folder takes :func:`lock_run` before its first write (the run-folder
module does it where a writer checks the folder: :func:`eclens.runs.check_manifest_model`, which
``ec run``/``ec diff``/``ec patch`` and the step engine all call first). The lock is an ``fcntl.flock`` on
``RUN/.eclens.lock``, a file holding the holder's pid and command line. A second writer does not wait: it
exits at once with a one-line error naming the holder. Readers (``ec serve``, ``ec report``'s reading,
:class:`eclens.runs.RunData`) never touch the lock.

A lock left by a killed process (SIGKILL, power loss) needs no cleaning: the kernel drops an flock
when the last descriptor of its file closes, which happens when the process dies, so the next writer
takes the lock and overwrites the dead holder's pid. The lock is held for the rest of the process
(:func:`release_all` drops it early; ``eclens.cli.main`` calls it on the way out). Under ``torchrun`` only
rank 0 takes it: the other ranks of the same job write only their own shard folders.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from .errors import EclensError

LOCK_FILE = ".eclens.lock"


@dataclass
class _Held:
    fd: int
    path: Path
    made_folder: bool


_HELD: dict[Path, _Held] = {}


def holder(run: str | os.PathLike) -> str:
    """What the lock file of ``run`` says about its holder (``pid N: command``), or ``""``."""
    try:
        return (Path(run) / LOCK_FILE).read_text(encoding="utf-8").strip()
    except OSError:
        return ""


def lock_run(run: str | os.PathLike) -> None:
    """Take the writer's lock on ``run`` (created if missing) for this process; re-entrant. Another
    live writer: :class:`EclensError` at once, naming its pid and command."""
    if os.environ.get("RANK", "0") != "0":
        return
    run = Path(run)
    key = run.resolve()
    if key in _HELD:
        return
    if run.exists() and not run.is_dir():
        raise EclensError(f"{run}: exists and is not a folder; choose another --out")
    made = not run.exists()
    run.mkdir(parents=True, exist_ok=True)
    path = run / LOCK_FILE
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            who = holder(run) or "pid unknown"
            raise EclensError(f"{run}: another eclens command is writing this run folder ({who}); wait for it "
                              "to finish, stop it, or use another --out") from None
        # The holder we waited on may have removed the file before we locked it: then lock the new one.
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    cmd = " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()}: {cmd}\n".encode())
    _HELD[key] = _Held(fd, path, made)


def release_all() -> None:
    """Drop every lock this process holds (the lock file goes; a folder this process created and left
    empty goes too, so a refused command leaves nothing behind)."""
    for key, h in list(_HELD.items()):
        with contextlib.suppress(OSError):
            os.unlink(h.path)  # while still holding it: a waiter that opened it re-checks the inode
        os.close(h.fd)
        if h.made_folder:
            with contextlib.suppress(OSError):
                h.path.parent.rmdir()  # only if empty
        del _HELD[key]
