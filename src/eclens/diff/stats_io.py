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
    start_save_stats(run, tensors, meta, background=False)()


def start_save_stats(run: Path, tensors: dict[str, torch.Tensor], meta: dict, *, background: bool = True
                     ) -> Callable[[], None]:
    """Start writing the state (atomically) and return ``wait``, which returns once it is written and raises
    what the writing raised. In the background the file (gigabytes, bound by the disk) is written while the
    caller computes the tables: the writer holds no lock Python needs. The metadata is serialised here, so
    the caller may go on using ``meta``; ``tensors`` must not change until ``wait`` returns."""
    from ..runs import json_default, save_tensors

    path, md = Path(run) / STATS_FILE, {META_KEY: json.dumps(meta, default=json_default)}
    if not background:
        save_tensors(tensors, path, metadata=md)
        return lambda: None
    failed: list[BaseException] = []

    def write() -> None:
        try:
            save_tensors(tensors, path, metadata=md)
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
