"""Run folders (``docs/run-folder.md``): the one place that opens, writes and reads them.

* opening a run (:func:`open_run`: refuse another model's folder, record the model),
  aligning and writing its pairs once (:func:`prepare_run_pairs`, :func:`save_check`);
* the manifest and its step records (:func:`update_manifest`, :func:`record_step`,
  :func:`record_patch`), and files several steps share (:func:`merge_json`,
  :func:`merge_tensors`);
* atomic writes: every file goes through :func:`atomic_write` (a temporary file in the same
  folder, fsync, then ``os.replace``), so an interrupted run never leaves a half-written
  output behind; the file gets the mode the umask gives a plain ``open``;
* :class:`RunData`, the lazy reader that the report, the web server and the study use.
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
from collections.abc import Iterator, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import pandas as pd

from .errors import EclensError
from .integrity import verify_file

MANIFEST = "manifest.json"


def jsonl_lines(text: str) -> list[str]:
    """The lines of JSONL text, split at ``\n`` only (a trailing ``\r`` dropped): a JSON string may hold
    U+0085, U+2028 and other characters at which ``str.splitlines`` would cut a record in two."""
    return [ln[:-1] if ln.endswith("\r") else ln for ln in text.split("\n")]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, need: int | None = None, checksum: bool | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it over ``path`` on success only.

    The temporary name holds the writer's process id (``.NAME.PID.RANDOM.tmp``), so the
    next successful write of ``path`` removes what a killed writer (SIGKILL, power loss)
    left behind, and never a live writer's file.

    ``checksum``: record the file's digest in its folder's ``checksums.json``
    (:mod:`eclens.integrity`; default: tensor files, and any file of a run folder). A write that fails
    for lack of space or permission removes its temporary file, leaves ``path`` as it was and raises the
    one-line :class:`EclensError` naming the folder and ``need`` (the bytes it needed; default: what was
    written before it failed, or the size of the file it replaces).
    """
    from . import integrity

    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    except OSError as e:
        code = integrity.disk_error(e)
        if code is None:
            raise
        raise integrity.disk_full_error(path, code, need or _size(path)) from None
    tmp_path = Path(tmp)
    if checksum is None:
        checksum = integrity.recording(path)
    record = None
    try:
        yield tmp_path
        with open(tmp_path, "rb") as fh:
            os.fsync(fh.fileno())
        # mkstemp makes 0600 (and a writer may recreate the file); the result gets the mode a plain open()
        # gives, 0644 under umask 022, so that colleagues on a shared server can read it.
        os.chmod(tmp_path, 0o666 & ~_umask())
        if checksum:
            record = integrity.expect(path, tmp_path)
        os.replace(tmp_path, path)
        if record is not None:
            integrity.settle(path, record)
    except BaseException as e:
        written = _size(tmp_path)
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        code = integrity.disk_error(e)
        if code is None:
            raise
        raise integrity.disk_full_error(path, code, need or max(written, _size(path))) from None
    remove_stale_temps(path)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


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
    raw = data.encode("utf-8") if isinstance(data, str) else data
    with atomic_path(path, need=len(raw)) as tmp:
        if isinstance(data, str):
            tmp.write_text(data, encoding="utf-8")
        else:
            tmp.write_bytes(data)
    return Path(path)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write(path, json.dumps(obj, indent=2, sort_keys=False, default=json_default) + "\n")


def json_default(o: Any) -> Any:
    """For ``json.dumps``: numpy and torch scalars as numbers, arrays as lists, paths as strings."""
    if hasattr(o, "item"):
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


# The columns of the run tables that can come out with no rows (too few pairs for the candidate rule, no
# category contrast): a frame built from no rows has no columns either, and a CSV without a header cannot be
# read back (pandas: EmptyDataError), so such a frame is written with its header from here.
TABLE_COLUMNS: dict[str, tuple[str, ...]] = {
    "candidates": ("category", "hook", "layer", "offset", "position_kind", "dim", "unit", "head", "kind", "rank",
                   "n_passing", "n", "n_sample", "absz_median", "absz_q10", "absz_q90", "frac_under",
                   "sign_consistency", "absz_mean", "mean_delta", "mean_abs_delta", "sigma_clean", "frac_pos",
                   "frac_neg"),
}


def table_with_header(df, path: str | os.PathLike):
    """``df``, or, when it has no columns, an empty frame with the columns of ``path``'s table
    (:data:`TABLE_COLUMNS`); a columnless frame for a table without known columns is a bug, refused."""
    if len(df.columns):
        return df
    stem = Path(path).name.split(".", 1)[0]
    if stem not in TABLE_COLUMNS:
        raise ValueError(f"{path}: a table with no columns and none known for it (add them to "
                         "eclens.runs.TABLE_COLUMNS); a file without a header cannot be read back")
    return pd.DataFrame(columns=list(TABLE_COLUMNS[stem]))


def write_table(df, path: str | os.PathLike) -> Path:
    """Write a DataFrame as CSV or Parquet (by suffix), atomically; a table with no rows keeps its header
    (:func:`table_with_header`), so every table a run writes can be read back. Parquet is written at the
    precision :data:`eclens.tables.PRECISION` declares for the file."""
    path = Path(path)
    if not isinstance(df, pd.DataFrame):  # an Arrow table already at the file's precision (eclens.tables.stored_table)
        with atomic_path(path, need=int(df.nbytes) + 4096) as tmp:
            from .tables import write_parquet

            write_parquet(df, tmp)
        return path
    df = table_with_header(df, path)
    # About what the file takes: a CSV writes each number as ~2.5x its 8 bytes, Parquet about its bytes.
    need = int(df.memory_usage(index=False, deep=False).sum() * (1 if path.suffix == ".parquet" else 2.5)) + 4096
    with atomic_path(path, need=need) as tmp:
        if path.suffix == ".parquet":  # at the declared precision (eclens.tables.PRECISION)
            from .tables import narrow, write_parquet

            write_parquet(narrow(df, path.name), tmp)
        else:
            df.to_csv(tmp, index=False)
    return path


def save_tensors(tensors: dict, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
    """Save a dict of tensors as safetensors, atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    clean = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    need = sum(v.numel() * v.element_size() for v in clean.values()) + 1024 + len(json.dumps(metadata or {}))
    with atomic_path(path, need=need) as tmp:
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
    """Refuse to mix results of another model, or of another eclens version, into a run folder. Every writer
    calls this before its first write, so it also takes the writer's lock (:func:`eclens.lock.lock_run`)."""
    from .lock import lock_run

    if Path(run).exists() and not Path(run).is_dir():
        raise EclensError(f"{run}: exists and is not a folder; choose another --out")
    lock_run(run)
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


# ------------------------------------------------------------------- opening and writing a run


def open_run(run: str | os.PathLike, model, **manifest: Any) -> Path:
    """Create ``run`` (or reopen it) for ``model``: refuse a folder made with another model or eclens version,
    and record the model in a new manifest (``manifest``: further fields to record)."""
    from .model import manifest_model_entry

    run = Path(run)
    if run.exists() and not run.is_dir():
        raise EclensError(f"{run}: exists and is not a folder; choose another --out")
    entry = manifest_model_entry(model)
    check_manifest_model(run, entry["name"], entry["weights_hash"])
    run.mkdir(parents=True, exist_ok=True)
    if not read_manifest(run).get("model"):
        manifest = {"model": entry, **manifest}
    if manifest:
        update_manifest(run, **manifest)
    return run


def save_check(run: str | os.PathLike, res, source, dataset: dict, **manifest: Any) -> None:
    """Write a pairs check into ``run`` (``pairs.jsonl``, ``rejected.jsonl``, ``check.csv``, the manifest's
    ``dataset``); with no valid pair, the one-line error instead and nothing written."""
    from .pairs import write_jsonl

    if not res.valid:
        raise res.none_valid_error(source)
    run = Path(run)
    write_jsonl(run / "pairs.jsonl", res.valid)
    write_jsonl(run / "rejected.jsonl", res.rejected)
    write_table(res.by_category(), run / "check.csv")
    update_manifest(run, dataset={**dataset, "n_pairs": res.n_total, "n_valid": len(res.valid)}, **manifest)


def prepare_run_pairs(model, source: str | os.PathLike, run: str | os.PathLike, fmt: str | None = None,
                      raw: Sequence | None = None, manifest: dict | None = None, mode: str = "single"):
    """Aligned pairs for a run: from a run folder's ``pairs.jsonl``, or a raw pairs file aligned now.

    A raw file (``raw``: its pairs, when the caller has read them already) is checked with
    :func:`eclens.pairs.check_with_model`; ``pairs.jsonl``, ``rejected.jsonl`` and ``check.csv`` are
    written into ``run`` and the manifest gets its ``dataset`` entry; a file without one valid pair is
    the one-line error and nothing is written (``manifest``: further fields to record; ``mode``: the alignment
    mode, ``span`` to keep pairs that differ in one span of tokens). Returns ``(aligned_pairs, check_result_or_None)``.
    """
    from .pairs import check_with_model, load_aligned, load_pairs, write_jsonl

    source, run = Path(source), Path(run)
    if source.is_dir():
        p = source / "pairs.jsonl"
        if not p.exists():
            raise EclensError(f"{source}: a folder without pairs.jsonl; give a pairs file or a run folder made by "
                              "`ec generate`/`ec pairs`/`ec diff`")
        aligned = load_aligned(p)
        if source.resolve() != run.resolve():
            write_jsonl(run / "pairs.jsonl", aligned)
        if manifest:
            update_manifest(run, **manifest)
        return aligned, None
    if not source.exists():
        raise EclensError(f"{source}: no such run folder or pairs file")
    res = check_with_model(raw if raw is not None else load_pairs(source, fmt=fmt), model, mode=mode)
    save_check(run, res, source, {"path": str(source), "sha256": file_sha256(source)}, **(manifest or {}))
    return res.valid, res


def record_step(run: str | os.PathLike, name: str, entry: dict) -> None:
    """Record a finished step as ``manifest.json["steps"][name]``."""
    update_manifest(run, steps={name: entry})


def record_patch(run: str | os.PathLike, mode: str, entry: dict, summary: dict) -> None:
    """Record one patching mode: its summary under ``patch_summary.json[mode]`` and its parameters,
    seconds and files under ``manifest.json["steps"]["patch"][mode]`` (other modes are kept)."""
    run = Path(run)
    merge_json(run / "patch_summary.json", mode, summary)
    steps = (read_manifest(run).get("steps") or {}).get("patch") or {}
    steps[mode] = entry
    update_manifest(run, steps={"patch": steps})


def merge_json(path: str | os.PathLike, key: str, value: Any) -> None:
    """Set ``key`` of the JSON object in ``path`` (created if missing or unreadable), atomically."""
    path = Path(path)
    doc = {}
    if path.exists():
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            doc = {}
    doc[key] = value
    write_json(path, doc)


def merge_tensors(path: str | os.PathLike, tensors: dict, meta: dict) -> None:
    """Merge ``tensors`` into the safetensors file ``path``: tensors under another first name component
    (``exact_…``, ``attribution_dims/…``) are kept, those under the same one are replaced."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    old, old_meta = {}, {}
    if path.exists():
        verify_file(path)
        old = load_file(str(path))
        with safe_open(str(path), framework="pt") as fh:
            old_meta = fh.metadata() or {}
    prefixes = {k.split("/", 1)[0] for k in tensors}
    old = {k: v for k, v in old.items() if k.split("/", 1)[0] not in prefixes}  # a rerun replaces its mode
    old.update(tensors)
    old_meta.update({k: json.dumps(v) if not isinstance(v, str) else v for k, v in meta.items()})
    save_tensors(old, path, metadata=old_meta)


# ------------------------------------------------------------------- reading a run

# Column names the readers look for (eclens.viz uses the same; kept here so reading a run needs no plotly).
DEFAULT_HOOK = "hook_resid_post"
DIM_COLS = ("absz_median", "abs_z_median", "absz_mean", "abs_z_mean", "z_abs_median", "z_abs_mean")
PAIR_COLS = ("pair_id", "pair", "id")


class RunData:
    """Lazy, read-only access to the files of one run folder (``docs/run-folder.md``).

    Each property is ``None`` when its file is missing (the step has not run); a file
    that exists but cannot be read raises :class:`EclensError` naming it.
    """

    def __init__(self, path: str | os.PathLike, root: str | os.PathLike | None = None):
        self.path = Path(path)
        # With ``root`` (the web server's RUNS_DIR), a file that resolves outside it
        # (a symlink pointing elsewhere) counts as missing: nothing outside is ever read.
        self.root = Path(root).resolve() if root is not None else None
        if not self.path.is_dir():
            raise EclensError(f"{self.path}: no such run folder; make one with `ec run --out {self.path}`")

    @property
    def name(self) -> str:
        return self.path.name

    def file(self, name: str) -> Path | None:
        """``name`` in the run folder, or None; a table asked for by its CSV or Parquet name is found under
        either (:func:`eclens.tables.table_file`: folders from before and after issue 20 read alike)."""
        from .tables import table_file

        p = self.path / name
        if not p.is_file() and name.endswith((".csv", ".parquet")):
            p = table_file(self.path, name) or p
        if not p.is_file():
            return None
        if self.root is not None and not p.resolve().is_relative_to(self.root):
            return None
        return p

    def _table(self, name: str) -> pd.DataFrame | None:
        p = self.file(name)
        if p is None:
            return None
        verify_file(p)
        try:
            from .tables import read_table_file

            return read_table_file(p)
        except Exception as e:  # noqa: BLE001 - any parse failure is the same user-facing problem
            raise EclensError(f"{p}: cannot read ({type(e).__name__}: {e}); rerun the step that wrote it") from None

    def _json(self, name: str) -> Any:
        p = self.file(name)
        if p is None:
            return None
        verify_file(p)
        try:
            return json.loads(p.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise EclensError(f"{p}: not valid JSON ({e}); rerun the step that wrote it") from None

    def _jsonl(self, name: str) -> list[dict] | None:
        p = self.file(name)
        if p is None:
            return None
        verify_file(p)
        out = []
        for i, line in enumerate(jsonl_lines(p.read_text(encoding="utf-8")), start=1):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise EclensError(f"{p}:{i}: not valid JSON ({e.msg}); rerun the step that wrote it") from None
        return out

    @cached_property
    def manifest(self) -> dict:
        return self._json("manifest.json") or {} if self.root is not None else read_manifest(self.path)

    @cached_property
    def pairs(self) -> list[dict] | None:
        return self._jsonl("pairs.jsonl")

    @cached_property
    def rejected(self) -> list[dict] | None:
        return self._jsonl("rejected.jsonl")

    @cached_property
    def check(self) -> pd.DataFrame | None:
        return self._table("check.csv")

    @cached_property
    def layers(self) -> pd.DataFrame | None:
        return self._table("layers.parquet")

    @cached_property
    def dims(self) -> pd.DataFrame | None:
        """All of ``dims.parquet`` (large: one row per category, hook, layer, offset and dimension);
        figures read a slice with :meth:`dims_slice`."""
        return self._table("dims.parquet")

    DIM_VIEW_COLUMNS = ("category", "hook", "layer", "offset", "dim", "massive", *DIM_COLS)

    def dims_slice(self, *, category: str = "all", hook: str | None = None, offset: int = 0) -> pd.DataFrame | None:
        """Rows of ``dims.parquet`` for one category, hook (default: resid_post or the last) and offset,
        read with parquet filters so a wide model's file is never loaded whole."""
        p = self.file("dims.parquet")
        if p is None:
            return None
        import pyarrow.parquet as pq

        verify_file(p)
        try:
            pf = pq.ParquetFile(p)
            names = set(pf.schema_arrow.names)
            if hook is None and "hook" in names:
                hooks = pq.read_table(p, columns=["hook"]).column("hook").unique().to_pylist()
                hook = DEFAULT_HOOK if DEFAULT_HOOK in hooks else (hooks[-1] if hooks else None)
            filters = [(k, "==", v) for k, v in (("category", category), ("hook", hook), ("offset", offset))
                       if v is not None and k in names]
            from .tables import DERIVED, read_table_file

            cols = [c for c in self.DIM_VIEW_COLUMNS if c in names or c in DERIVED and set(DERIVED[c]) <= names]
            return read_table_file(p, columns=cols, filters=filters or None)
        except Exception as e:  # noqa: BLE001 - any parse failure is the same user-facing problem
            raise EclensError(f"{p}: cannot read ({type(e).__name__}: {e}); rerun `ec diff`") from None

    def massive_dims(self, dims: pd.DataFrame) -> list[int] | None:
        """Massive-activation dimensions of the slice's hook, at any layer or offset (``summary.json``)."""
        if dims is None or dims.empty or "hook" not in dims.columns:
            return None
        found = ((self.summary or {}).get("massive_dims") or {}).get(str(dims["hook"].iloc[0]))
        return [int(d) for d in found] if found is not None else None

    def dims_hooks(self) -> list[str]:
        p = self.file("dims.parquet")
        if p is None:
            return []
        import pyarrow.parquet as pq

        verify_file(p)
        return sorted(pq.read_table(p, columns=["hook"]).column("hook").unique().to_pylist())

    @cached_property
    def candidates(self) -> pd.DataFrame | None:
        return self._table("candidates.parquet")

    @cached_property
    def contrasts(self) -> pd.DataFrame | None:
        return self._table("contrasts.parquet")

    @cached_property
    def pair_metrics(self) -> pd.DataFrame | None:
        return self._table("pairs.csv")

    @cached_property
    def summary(self) -> dict | None:
        return self._json("summary.json")

    @cached_property
    def patch_exact(self) -> pd.DataFrame | None:
        return self._table("patch_exact.csv")

    @cached_property
    def patch_dims(self) -> pd.DataFrame | None:
        return self._table("patch_dims.csv")

    @cached_property
    def patch_controls(self) -> pd.DataFrame | None:
        return self._table("patch_dims_controls.csv")

    @cached_property
    def patch_attribution(self) -> pd.DataFrame | None:
        return self._table("patch_attribution.csv")

    @cached_property
    def patch_summary(self) -> dict | None:
        return self._json("patch_summary.json")

    # the measure step (eclens.measure_step)
    @cached_property
    def recovery(self) -> pd.DataFrame | None:
        return self._table("recovery.csv")

    @cached_property
    def recovery_curves(self) -> pd.DataFrame | None:
        return self._table("recovery_curves.csv")

    @cached_property
    def recovery_index(self) -> pd.DataFrame | None:
        return self._table("recovery_index.csv")

    @cached_property
    def probe(self) -> pd.DataFrame | None:
        return self._table("probe.csv")

    @cached_property
    def measure(self) -> dict | None:
        return self._json("measure.json")

    @cached_property
    def pairs_by_id(self) -> dict[str, dict]:
        return {str(p["id"]): p for p in (self.pairs or [])}

    def aligned(self, pair_id: str):
        """The :class:`~eclens.pairs.AlignedPair` of ``pair_id`` (for per-pair computations)."""
        from .pairs import AlignedPair, MinimalPair

        d = self.pairs_by_id.get(str(pair_id))
        if d is None:
            raise EclensError(f"{self.path / 'pairs.jsonl'}: no pair with id {pair_id!r}")
        mp = MinimalPair(str(d["id"]), d["clean"], d["corrupt"], d.get("category", "uncategorized"),
                         d.get("source", "user"), d.get("meta") or {})
        return AlignedPair(mp, list(d["clean_ids"]), list(d["corrupt_ids"]), int(d["position"]),
                           d.get("clean_token", ""), d.get("corrupt_token", ""))

    def categories(self) -> list[str]:
        return sorted({str(p.get("category", "")) for p in (self.pairs or [])})

    def exact_pair_ids(self) -> list[str]:
        df = self.patch_exact
        if df is None:
            return []
        col = next((c for c in PAIR_COLS if c in df.columns), None)
        return list(dict.fromkeys(df[col].astype(str))) if col else []

    def pair_tokens(self, pair_id: str) -> list[str] | None:
        """Clean token strings of a pair without the model: from ``patch_exact.csv`` (one row per
        position holds its token) or a ``tokens`` column of ``pairs.csv``, if either has them."""
        ex = self.patch_exact
        if ex is not None and {"pair_id", "position", "token"} <= set(ex.columns):
            rows = ex[ex["pair_id"].astype(str) == str(pair_id)].drop_duplicates("position").sort_values("position")
            if len(rows) and list(rows["position"]) == list(range(len(rows))):
                return [str(t) if isinstance(t, str) else "" for t in rows["token"]]
        df = self.pair_metrics
        if df is None or "tokens" not in df.columns:
            return None
        col = next((c for c in PAIR_COLS if c in df.columns), None)
        row = df[df[col].astype(str) == str(pair_id)] if col else df.iloc[0:0]
        if row.empty:
            return None
        raw = row["tokens"].iloc[0]
        try:
            toks = json.loads(raw) if isinstance(raw, str) else list(raw)
        except json.JSONDecodeError:
            toks = str(raw).split("|")
        return [str(t) for t in toks]
