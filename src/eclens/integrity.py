"""Checksummed run folders and writes that fail cleanly (issue 21).

Digests. Every tensor file a run writes (cache shards, ``state/diff_stats.safetensors``, the patch and
direction tensors) and every table of a run folder gets its digest recorded, when it is written, in
``checksums.json`` of the folder that holds it (``RUN/checksums.json``, ``RUN/cache/checksums.json``).
The hash is xxhash's XXH3-128 (``scripts/bench_hash.py`` on the 2-core dev machine: 0.07 s/GB in memory,
0.14 s/GB reading a file back, against 1.1 and 1.4 s/GB for sha256 and 2.5 for blake2b); without the
``xxhash`` package sha256 is used, and each digest names its algorithm, so either reads the other's.

A digest is recorded in two writes around the rename of the file (:func:`expect`, then
:func:`settle`): while the rename is pending both the old and the new content are accepted, so a
process killed between the rename and the record leaves a folder that still verifies.

Readers call :func:`verify_file` before they open a file: once per file per process (a cache keyed on
path, inode, size and mtime); a file whose size or digest differs from the record is refused with one
line naming it and how to recover (delete it, rerun: the step resumes). A file without a record (an
older run, a file written by hand) is read as before. ``ec verify RUN`` (:func:`verify_run`) checks a
whole folder.

Disk errors. :func:`disk_error` recognises a full disk, a full quota and a folder that cannot be
written, whichever library raised it (Python's ``OSError``, or safetensors' and pyarrow's errors that
only carry the OS message); :func:`disk_full_error` turns it into the one-line
:class:`~eclens.errors.EclensError` naming the folder and the bytes the write needed.
Under ``torchrun`` each rank other than 0 records in ``checksums.rankN.json``, so an index has one writer.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path

from .errors import EclensError

CHECKSUMS = "checksums.json"
_CHUNK = 1 << 20
_LOCK = threading.Lock()  # the cache writer and the diff checkpoint may record from two threads
_VERIFIED: dict[tuple, str] = {}  # (path, inode, size, mtime_ns) -> digest, for this process


# ------------------------------------------------------------------------------------ digests


def algorithm() -> str:
    try:
        import xxhash  # noqa: F401
    except ImportError:
        return "sha256"
    return "xxh3_128"


def _hasher(name: str):
    if name == "xxh3_128":
        import xxhash

        return xxhash.xxh3_128()
    if name in ("sha256", "blake2b"):
        return hashlib.new(name)
    raise EclensError(f"unknown checksum algorithm {name!r}: written by a newer eclens? Upgrade eclens")


def file_digest(path: str | os.PathLike, name: str | None = None) -> str:
    """``ALGORITHM:HEX`` of the file's bytes (``name``: the algorithm; default :func:`algorithm`)."""
    name = name or algorithm()
    h = _hasher(name)
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            h.update(chunk)
    return f"{name}:{h.hexdigest()}"


def index_name() -> str:
    rank = os.environ.get("RANK", "0")
    return CHECKSUMS if rank == "0" else f"checksums.rank{rank}.json"


def _read_index(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return {}
    files = doc.get("files") if isinstance(doc, dict) else None
    return files if isinstance(files, dict) else {}


def records(folder: str | os.PathLike) -> dict[str, list[dict]]:
    """Every accepted ``{"size", "digest"}`` per file name of ``folder`` (from all its checksum indexes)."""
    folder = Path(folder)
    out: dict[str, list[dict]] = {}
    try:
        names = sorted(n for n in os.listdir(folder) if n.startswith("checksums") and n.endswith(".json"))
    except OSError:
        return out
    for n in names:
        for fname, entry in _read_index(folder / n).items():
            acc = entry.get("accept") if isinstance(entry, dict) else None
            if isinstance(acc, list):
                out.setdefault(fname, []).extend(a for a in acc if isinstance(a, dict))
    return out


def _write_index(folder: Path, files: dict) -> None:
    from .runs import write_json

    write_json(folder / index_name(), {"format": 1, "files": dict(sorted(files.items()))})


def expect(path: Path, tmp: Path) -> dict:
    """Before ``tmp`` is renamed over ``path``: accept the new content besides the current record."""
    new = {"size": tmp.stat().st_size, "digest": file_digest(tmp)}
    with _LOCK:
        files = _read_index(path.parent / index_name())
        old = (files.get(path.name) or {}).get("accept") or []
        files[path.name] = {"accept": [new, *[a for a in old if a != new]][:3]}
        _write_index(path.parent, files)
    return new


def settle(path: Path, new: dict) -> None:
    """After the rename: only the new content is accepted."""
    with _LOCK:
        files = _read_index(path.parent / index_name())
        files[path.name] = {"accept": [new]}
        _write_index(path.parent, files)


def recording(path: Path) -> bool:
    """Whether writes to ``path`` get a digest: tensor files always, other files in a run folder (one with a
    manifest) or in a folder that has a checksum index already."""
    if path.name.startswith(("checksums", "manifest.json", ".")) or path.suffix == ".tmp":
        return False
    if path.suffix == ".safetensors":
        return True
    return (path.parent / "manifest.json").exists() or (path.parent / CHECKSUMS).exists()


# ------------------------------------------------------------------------------------ reading


def rerun_hint(path: Path) -> str:
    """The command whose rerun writes ``path`` again."""
    name = path.name
    if path.parent.name == "cache" or name.startswith("shard-"):
        return "ec cache"
    if name.startswith("patch") or name.startswith("recovery"):
        return "ec patch (or ec run)"
    if name in ("check.csv",):
        return "ec run"
    return "ec diff (or ec run)"


@dataclass
class FileCheck:
    path: Path
    status: str  # intact | corrupt | missing | unrecorded
    detail: str = ""
    key: tuple | None = None  # (path, inode, size, mtime) of the version checked


def check_file(path: str | os.PathLike, accepted: list[dict] | None = None) -> FileCheck:
    """Compare ``path`` with its record (``accepted``: the records, default the folder's).

    Readers never take the writer's lock, so a writer may record and rename a new version between our
    reading the record and hashing the file: a mismatch is confirmed only once a second look finds the
    same record and the same file."""
    path = Path(path)
    for _ in range(3):
        if accepted is None:
            accepted = records(path.parent).get(path.name) or []
        c = _check_once(path, accepted)
        if c.status != "corrupt":
            return c
        again = records(path.parent).get(path.name) or []
        if again == accepted and _stat_key(path) == c.key:
            break
        accepted = again
    return c


def _stat_key(path: Path) -> tuple | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns)


def _check_once(path: Path, accepted: list[dict]) -> FileCheck:
    key = _stat_key(path)
    if key is None:
        return FileCheck(path, "missing", "recorded but not on disk")
    if not accepted:
        return FileCheck(path, "unrecorded", "no checksum recorded")
    size = key[2]
    sizes = {int(a.get("size", -1)) for a in accepted}
    if size not in sizes:
        want = ", ".join(str(s) for s in sorted(sizes))
        return FileCheck(path, "corrupt", f"{size} bytes, {want} recorded (cut short or overwritten)", key)
    known = _VERIFIED.get(key)
    if known is not None and any(a.get("digest") == known for a in accepted):
        return FileCheck(path, "intact")
    for algo in dict.fromkeys(str(a.get("digest", "")).split(":", 1)[0] for a in accepted if a.get("size") == size):
        got = file_digest(path, algo)
        if any(a.get("digest") == got for a in accepted):
            _VERIFIED[key] = got
            return FileCheck(path, "intact")
    return FileCheck(path, "corrupt", "its bytes differ from the checksum recorded when it was written", key)


def verify_file(path: str | os.PathLike) -> None:
    """Refuse a file whose bytes differ from its recorded digest (once per file version per process)."""
    path = Path(path)
    c = check_file(path)
    if c.status == "corrupt":
        raise EclensError(f"{path}: corrupt ({c.detail}); delete it and rerun `{rerun_hint(path)}`: "
                          "the step resumes")


def verify_run(run: str | os.PathLike) -> list[FileCheck]:
    """Every recorded file under ``run`` (intact, corrupt or missing), every file the manifest or the cache
    index names that is not on disk (missing), and the run's other data files (unrecorded)."""
    run = Path(run)
    if not run.is_dir():
        raise EclensError(f"{run}: no such run folder")
    out: dict[Path, FileCheck] = {}
    needed = _needed_files(run)
    folders = sorted({p.parent for p in run.rglob("checksums*.json")} | {run})
    for folder in folders:
        for name, acc in sorted(records(folder).items()):
            p = folder / name
            c = check_file(p, acc)
            if c.status == "missing" and p not in needed:
                continue  # recorded, then deleted by the step that owns it: nothing reads it
            out[p] = c
    for p in sorted(needed):
        if p not in out and not p.exists():
            out[p] = FileCheck(p, "missing", "named by the run's manifest or index but not on disk")
    for p in sorted(run.rglob("*")):
        if (p.is_file() and p not in out and p.suffix in (".safetensors", ".csv", ".parquet")
                and not p.name.startswith(".")):
            out[p] = FileCheck(p, "unrecorded", "no checksum recorded (written before checksums or by hand)")
    for idx in sorted(run.rglob("checksums*.json")):
        try:
            json.loads(idx.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            out[idx] = FileCheck(idx, "corrupt", f"the checksum index itself is not valid JSON ({e})")
    return sorted(out.values(), key=lambda c: str(c.path))


def _needed_files(run: Path) -> set[Path]:
    """Files the manifest's step records (``files``/``outputs``) and the cache index name."""
    need: set[Path] = set()
    try:
        man = json.loads((run / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        man = {}

    def walk(x):
        if isinstance(x, dict):
            for k, v in x.items():
                if k in ("files", "outputs") and isinstance(v, list):
                    need.update(run / f for f in v if isinstance(f, str) and "/" not in f and f.strip())
                else:
                    walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)

    walk(man.get("steps") or {})
    for idx in run.rglob("index.json"):
        try:
            doc = json.loads(idx.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            continue
        for s in doc.get("shards", []) if isinstance(doc, dict) else []:
            if isinstance(s, dict) and isinstance(s.get("file"), str):
                need.add(idx.parent / s["file"])
    return need


# ------------------------------------------------------------------------------------ disk errors

DISK_ERRNOS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "the disk quota is exceeded",
               errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
               errno.EPERM: "permission denied"}
_TEXTS = {"no space left": errno.ENOSPC, "quota exceeded": errno.EDQUOT, "read-only file system": errno.EROFS,
          "storagefull": errno.ENOSPC, "permission denied": errno.EACCES}


def disk_error(e: BaseException) -> int | None:
    """The errno of a write that failed for lack of space or permission, whichever library raised it."""
    for x in (e, e.__cause__, e.__context__):
        if isinstance(x, OSError) and x.errno in DISK_ERRNOS:
            return x.errno
    if not isinstance(e, Exception) or isinstance(e, EclensError):
        return None
    text = str(e).lower()
    m = re.search(r"(?:os error|errno|code:)\s*(\d+)", text)
    if m and int(m.group(1)) in DISK_ERRNOS:
        return int(m.group(1))
    return next((v for k, v in _TEXTS.items() if k in text), None)


def human(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def free_bytes(folder: Path) -> int | None:
    with contextlib.suppress(OSError):
        st = os.statvfs(folder)
        return st.f_bavail * st.f_frsize
    return None


def disk_full_error(path: str | os.PathLike, code: int, need: int | None) -> EclensError:
    """The one-line error of a write to ``path`` that failed with ``code`` and needed about ``need`` bytes."""
    path = Path(path)
    folder = path.parent
    what = DISK_ERRNOS.get(code, os.strerror(code))
    free = free_bytes(folder)
    size = f"about {human(need)}" if need else "an unknown number of bytes"
    room = f", {human(free)} free" if free is not None and code in (errno.ENOSPC, errno.EDQUOT) else ""
    fix = ("free some space (or use another --out)" if code in (errno.ENOSPC, errno.EDQUOT)
           else "make the folder writable (or use another --out)")
    return EclensError(f"{folder}: cannot write {path.name}: {what} (it needs {size}{room}); {fix} and rerun "
                       "the same command: finished work is kept and the step resumes")
