"""Run folders: atomic writes, manifests, dataset hashes.

Every file a step writes goes through :func:`atomic_write` (write to a temporary
file in the same folder, fsync, then ``os.replace``), so an interrupted run never
leaves a half-written output behind.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import platform
import re
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import EclensError

MANIFEST = "manifest.json"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it over ``path`` on success only.

    The temporary name holds the writer's process id (``.NAME.PID.RANDOM.tmp``), so the
    next successful write of ``path`` removes what a killed writer (SIGKILL, power loss)
    left behind, and never a live writer's file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise
    remove_stale_temps(path)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists (another user's), or cannot tell: keep its files
    return True


def remove_stale_temps(path: str | os.PathLike) -> list[Path]:
    """Delete the temporary files of ``path`` whose writer process is gone; returns them."""
    if os.name == "nt":  # os.kill(pid, 0) does not probe a process there
        return []
    path = Path(path)
    pat = re.compile(rf"\.{re.escape(path.name)}\.(\d+)\.[^.]+\.tmp")
    gone = []
    try:
        names = [n for n in os.listdir(path.parent) if n.startswith(f".{path.name}.") and n.endswith(".tmp")]
    except OSError:
        return []
    for name in names:
        m = pat.fullmatch(name)
        if m and int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1))):
            with contextlib.suppress(FileNotFoundError):
                (path.parent / name).unlink()
                gone.append(path.parent / name)
    return gone


def atomic_write(path: str | os.PathLike, data: str | bytes) -> Path:
    """Write text or bytes to ``path`` atomically."""
    with atomic_path(path) as tmp:
        if isinstance(data, str):
            tmp.write_text(data, encoding="utf-8")
        else:
            tmp.write_bytes(data)
    return Path(path)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def write_table(df, path: str | os.PathLike) -> Path:
    """Write a DataFrame as CSV or Parquet (by suffix), atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        if path.suffix == ".parquet":
            df.to_parquet(tmp, index=False)
        else:
            df.to_csv(tmp, index=False)
    return path


def save_tensors(tensors: dict, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
    """Save a dict of tensors as safetensors, atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    clean = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(clean, str(tmp), metadata=metadata)
    return path


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for pkg in ("eclens", "torch", "transformer-lens", "transformers", "numpy"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def read_manifest(run: str | os.PathLike) -> dict:
    path = Path(run) / MANIFEST
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise EclensError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}); delete the run folder and rerun") from None


def update_manifest(run: str | os.PathLike, **fields: Any) -> dict:
    """Merge ``fields`` into the run's manifest (``steps`` is merged one level deep)."""
    run = Path(run)
    man = read_manifest(run)
    if not man:
        man = {
            "eclens_version": versions()["eclens"],
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "versions": versions(),
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            "steps": {},
        }
    steps = fields.pop("steps", None)
    man.update(fields)
    if steps:
        man.setdefault("steps", {}).update(steps)
    write_json(run / MANIFEST, man)
    return man


def check_manifest_model(run: str | os.PathLike, model_id: str, weights_hash: str | None) -> None:
    """Refuse to mix results of another model, or of another eclens version, into a run folder."""
    man = read_manifest(run)
    made_by, this = man.get("eclens_version"), versions()["eclens"]
    if made_by is not None and made_by != this:
        raise EclensError(f"{Path(run) / MANIFEST}: run was made by eclens {made_by}, this is eclens {this}; its "
                          "files may differ in format or method: use another --out folder")
    m = man.get("model") or {}
    if m and (m.get("name") != model_id or (weights_hash and m.get("weights_hash") not in (None, weights_hash))):
        raise EclensError(
            f"{Path(run) / MANIFEST}: run was made with model {m.get('name')!r} "
            f"(weights {str(m.get('weights_hash'))[:12]}), not {model_id!r}; use another --out folder"
        )
