"""``state/diff_stats.safetensors``: the statistics and the checkpoint of a diff run (:mod:`eclens.state`)."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from pathlib import Path

import torch

from ..errors import EclensError
from ..integrity import verify_file
from .config import META_KEY, STATS_FILE

LEGACY_STATS_FILE = "diff_stats.safetensors"


def save_stats(run: Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    _write(run, tensors, _metadata(meta))


def _metadata(meta: dict) -> dict[str, str]:
    from ..runs import json_default

    return {META_KEY: json.dumps(meta, default=json_default)}


def _write(run: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    from ..runs import save_tensors

    save_tensors(tensors, Path(run) / STATS_FILE, metadata=metadata)


def start_save_stats(run: Path, tensors: dict[str, torch.Tensor], meta: dict) -> Callable[[], None]:
    """:func:`save_stats` in a background thread; returns ``wait``, which returns once the state is written and
    raises what the writing raised. The file (gigabytes, bound by the disk) is written while the caller
    computes the tables: the writer holds no lock Python needs. The metadata is serialised here, so the
    caller may go on using ``meta``; ``tensors`` must not change until ``wait`` returns."""
    md = _metadata(meta)
    failed: list[BaseException] = []

    def write() -> None:
        try:
            _write(run, tensors, md)
        except BaseException as e:  # noqa: BLE001 - handed to the caller by wait()
            failed.append(e)

    th = threading.Thread(target=write, name="eclens-save-state", daemon=False)
    th.start()

    def wait() -> None:
        th.join()
        if failed:
            raise failed[0]

    return wait


def load_stats(run: str | Path, device="cpu") -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors import safe_open

    path = Path(run) / STATS_FILE
    if not path.exists() and (Path(run) / LEGACY_STATS_FILE).exists():
        path = Path(run) / LEGACY_STATS_FILE  # a run folder from before RUN/state (issue 20)
    if not path.exists():
        raise EclensError(f"{path}: no diff statistics here; run `ec diff` first")
    verify_file(path)  # a flipped byte inside a file of the right length reads as numbers: refuse it by name
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            meta = json.loads((f.metadata() or {})[META_KEY])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (KeyError, json.JSONDecodeError, OSError, Exception) as e:  # noqa: BLE001 - any corruption
        raise EclensError(f"{path}: unreadable diff statistics ({type(e).__name__}); delete it and rerun `ec diff`") \
            from None
    return tensors, meta
