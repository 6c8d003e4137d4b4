"""A run's state: what only a resume or a merge reads, kept apart from its results (issue 20).

``RUN/state/`` holds the diff's accumulators and pair sample (``state/diff_stats.safetensors``, with its
own ``checksums.json``) and, under ``torchrun``, each rank's shard (``state/rankRofW/``). It is large
(1.6 GB for the default ``ec run``; the results are tens of MB) and nothing that runs after the run
completes reads it: the report, the web UI, ``ec compare`` and the later steps read the tables.

:func:`finish_state` is the last act of a completed ``ec run``, ``ec diff`` or study: it deletes the
folder (unless ``keep``), records ``manifest.json["state"]`` (``kept``, ``bytes``) and says the size. A
run that was not to keep it never wrote its complete state (:func:`eclens.steps.diff_step`): then the size
it would have had is said and recorded (``written: false``), and any checkpoint left from the stream deleted.
Deleting is a rename to ``RUN/.state.deleting`` and then the removal of that folder's data files before
its checksum index: a kill at any moment leaves either the whole state (the run resumes as before) or
none that a reader would take for it, and the next :func:`finish_state` (or :func:`clean_trash`) removes
what is left. ``ec verify`` stays clean: the results never list a state file.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

from .integrity import human

STATE_DIR = "state"
TRASH = ".state.deleting"
KEEP_HINT = "rerun with --keep-state to keep it"


def state_dir(run: str | os.PathLike) -> Path:
    return Path(run) / STATE_DIR


def folder_bytes(folder: str | os.PathLike) -> int:
    """Bytes of the files under ``folder`` (0 if there is none)."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def state_bytes(run: str | os.PathLike) -> int:
    return folder_bytes(state_dir(run))


def clean_trash(run: str | os.PathLike) -> None:
    """Remove what a killed deletion left (``RUN/.state.deleting``): data files first, checksum indexes
    last, so that whatever a kill leaves is either recorded or gone."""
    trash = Path(run) / TRASH
    if not trash.exists():
        return
    files = [p for p in trash.rglob("*") if p.is_file()]
    for p in sorted(files, key=lambda p: p.name.startswith("checksums")):
        p.unlink(missing_ok=True)
    shutil.rmtree(trash, ignore_errors=True)


def finish_state(run: str | os.PathLike, *, keep: bool = False,
                 log: Callable[[str], None] | None = print) -> dict | None:
    """The end of a completed run: delete ``RUN/state`` unless ``keep``, record it in the manifest and say
    its size through ``log``; returns the record (None when there was no state)."""
    from .runs import read_manifest, update_manifest

    run = Path(run)
    clean_trash(run)
    folder = state_dir(run)
    if not folder.is_dir():
        man = read_manifest(run)
        unwritten = ((man.get("steps") or {}).get("diff") or {}).get("state") or {}
        if unwritten.get("written") is not False:
            return None
        n = int(unwritten.get("bytes") or 0)  # not kept, so never written (eclens.steps.diff_step)
        record = {"kept": False, "written": False, "bytes": n}
        if (man.get("state") or {}) == record:  # said when the run completed
            return None
        if log:
            log(f"state not written: {human(n)} (the accumulators a resume or a merge reads; {KEEP_HINT})")
        update_manifest(run, state=record)
        return record
    n = folder_bytes(folder)
    if keep:
        if log:
            log(f"state kept: {folder} ({human(n)}; only a resume or a merge reads it; delete it when done)")
    else:
        os.replace(folder, run / TRASH)  # one rename: from here no reader finds a half-deleted state
        clean_trash(run)
        if log:
            log(f"state deleted: {human(n)} ({folder}: the accumulators a resume or a merge reads; "
                f"{KEEP_HINT})")
    record = {"kept": keep, "bytes": n}
    update_manifest(run, state=record)
    return record


def deleted_hint(run: str | os.PathLike) -> str | None:
    """The one line to give when ``run``'s state is asked for and was deleted (None: it never was)."""
    from .runs import read_manifest

    rec = read_manifest(run).get("state") or {}
    if rec.get("kept") is False and not state_dir(run).is_dir():
        fate = "not written" if rec.get("written") is False else "deleted when it completed"
        return (f"{state_dir(run)}: the run's state ({human(rec.get('bytes') or 0)}) was {fate}; its tables are "
                f"in {run}; {KEEP_HINT}")
    return None


__all__ = ["KEEP_HINT", "STATE_DIR", "clean_trash", "deleted_hint", "finish_state", "folder_bytes", "state_bytes",
           "state_dir"]
