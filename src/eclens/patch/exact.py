"""Exact activation patching: every (hook, layer, position[, head]) of each pair."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch

from ..errors import EclensError
from ..hooks import (
    EXACT_HOOKS,
    HEAD_HOOK,
    hook_suffix,
    parse_hooks,
)
from ..metrics import DEFAULT_MIN_DELTA, METRICS
from ..pairs import AlignedPair
from ..progress import TaskBar
from .engine import (
    Rows,
    check_pairs,
    component_frame,
    head_table,
    metric_columns,
    parse_direction,
    prepare,
    run_rows,
)


def exact_patch(
    model,
    pairs: Sequence[AlignedPair],
    hooks: str | Sequence[str] | None = EXACT_HOOKS,
    direction: str = "both",
    heads: bool = False,
    layers: Sequence[int] | None = None,
    batch_size: int = 64,
    prep_batch_size: int = 8,
    min_delta: float = DEFAULT_MIN_DELTA,
    progress: bool = False,
    skip_noops: bool = True,
) -> pd.DataFrame:
    """Exact activation patching per (pair, direction, hook, layer, position[, head]).

    Returns one row per patched run with columns ``pair_id, category, direction, hook,
    layer, position, offset, position_kind, token, head`` (``-1`` unless ``heads``) and,
    per metric ``m`` of :data:`eclens.metrics.METRICS`: ``m`` (the patched run's value),
    ``m_restored``, ``m_clean``, ``m_corrupt``. ``offset`` is ``position - p`` (empty
    before ``p``). With ``heads=True``, ``attn.hook_z`` is patched one head at a time.

    ``skip_noops``: positions before ``p`` hold the same activations in both runs, so
    their rows take the base run's values without a forward pass (``False`` runs them).
    """
    check_pairs(pairs)
    suffixes = parse_hooks(hooks, model) if hooks else []
    if not suffixes and not heads:
        raise EclensError("nothing to patch: give --hooks or --heads")
    dirs = parse_direction(direction)
    n_layers = model.cfg.n_layers
    layers = list(range(n_layers)) if layers is None else [int(x) for x in layers]
    for x in layers:
        if not 0 <= x < n_layers:
            raise EclensError(f"layer {x} out of range: the model has {n_layers} layers (0..{n_layers - 1})")
    if batch_size < 1:
        raise EclensError("--batch-size must be at least 1")
    targets = [(s, L) for s in suffixes for L in layers]
    if heads:
        targets += [(HEAD_HOOK, L) for L in layers]
    names = [f"blocks.{L}.{s}" for s, L in targets]
    frames = []
    with TaskBar(progress, len(pairs), "exact patching") as bar:
        for prep in prepare(model, pairs, names, prep_batch_size):
            p, T = prep.pair.position, prep.pair.length
            items, meta = [], []  # rows to run, and (direction, hook, layer, position, head) of every output row
            for d in dirs:
                base, src = (1, 0) if d == "denoise" else (0, 1)
                for s, L in targets:
                    name = f"blocks.{L}.{s}"
                    n_units = prep.shapes[name][0] if s == HEAD_HOOK else 1
                    for t in range(T):
                        for u in range(n_units):
                            head = u if s == HEAD_HOOK else -1
                            run_it = t >= p or not skip_noops
                            meta.append((d, s, L, t, head, run_it))
                            if run_it:
                                items.append((base, name, src, t, u if s == HEAD_HOOK else -1))
            rows = Rows.build(items)
            banks = {n: prep.acts[n] for n in names}
            tables = {n: head_table(prep.shapes[n]) for n in names if n.endswith(HEAD_HOOK)}
            res = run_rows(model, prep, rows, banks, tables, batch_size)
            ran = np.array([m[5] for m in meta])
            dir_arr = np.array([m[0] for m in meta], dtype=object)
            values = {}
            for m in METRICS:
                v = np.empty(len(meta))
                v[ran] = res[m]
                # a patch before p is a no-op: the base run's value (clean for noising, corrupt for denoising)
                v[~ran] = np.where(dir_arr[~ran] == "denoise", prep.metrics.corrupt[m], prep.metrics.clean[m])
                values[m] = v
            rec = component_frame(prep, dir_arr, np.array([m[1] for m in meta], dtype=object),
                                   np.array([m[2] for m in meta]), np.array([m[3] for m in meta]),
                                   np.array([m[4] for m in meta]), model.tokenizer)
            metric_columns(rec, values, prep.metrics, min_delta)
            frames.append(pd.DataFrame(rec))
            bar.advance()
    return pd.concat(frames, ignore_index=True)


def pair_baselines(model, pairs: Sequence[AlignedPair], batch_size: int = 8) -> pd.DataFrame:
    """One row per pair: targets, ``pref_clean``, sentence log-probs and each metric's clean/corrupt values."""
    check_pairs(pairs)
    return pd.DataFrame([prep.metrics.baseline_row(model.tokenizer)
                         for prep in prepare(model, pairs, (), batch_size)])


def patch_all_positions(model, pair: AlignedPair, hook: str, layer: int, direction: str = "denoise") -> dict:
    """Patch every position of one (hook, layer) at once; returns the metrics and the pair's references.

    Patching ``hook_resid_pre`` of layer 0 at every position turns the corrupt run into
    the clean run, so every ``*_restored`` must be exactly 1 (a check of the plumbing).
    """
    name = f"blocks.{layer}.{hook_suffix(hook, model)}"
    prep = next(prepare(model, [pair], [name]))
    base, src = (1, 0) if direction == "denoise" else (0, 1)
    res = run_rows(model, prep, Rows.build([(base, name, src, -1, -1)]), {name: prep.acts[name]})
    out = {m: float(res[m][0]) for m in METRICS}
    out.update({f"{m}_restored": float(prep.metrics.restored(m, out[m])) for m in METRICS})
    out.update({f"{m}_clean": prep.metrics.clean[m] for m in METRICS})
    out.update({f"{m}_corrupt": prep.metrics.corrupt[m] for m in METRICS})
    return out


def exact_tensors(df: pd.DataFrame, pair_ids: Sequence[str], n_layers: int, column: str) -> dict[str, torch.Tensor]:
    """``exact/{direction}/{hook}/{column}`` -> ``[pairs, layers, max_len]`` (``[..., heads]`` for hook_z), NaN-padded."""
    out = {}
    index = {pid: i for i, pid in enumerate(pair_ids)}
    T = int(df["position"].max()) + 1 if len(df) else 0
    for (d, h), g in df.groupby(["direction", "hook"], sort=False):
        pi = g["pair_id"].map(index).to_numpy()
        if h == HEAD_HOOK:
            H = int(g["head"].max()) + 1
            arr = np.full((len(pair_ids), n_layers, T, H), np.nan, dtype=np.float32)
            arr[pi, g["layer"].to_numpy(), g["position"].to_numpy(), g["head"].to_numpy()] = g[column].to_numpy()
        else:
            arr = np.full((len(pair_ids), n_layers, T), np.nan, dtype=np.float32)
            arr[pi, g["layer"].to_numpy(), g["position"].to_numpy()] = g[column].to_numpy()
        out[f"exact/{d}/{h}/{column}"] = torch.from_numpy(arr)
    return out
