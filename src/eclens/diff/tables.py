"""The per-row tables of a diff run (``layers``, ``candidates``, ``sensitivity``, ``heads``), built from
:meth:`DiffResult.cell_stats` arrays by whole-array operations.

One (category, swap direction, hook) block of a table is one set of ``[L, O]`` (``[L, O, D]``) arrays
flattened layer-major, as the row loops these replace wrote them: the default hooks of SmolLM2-135M over
a few dozen groups are tens of thousands of rows, and Python work per row (a tensor index per number)
was most of the finishing time of ``ec diff``. The numbers and the row order are the row loops'.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float

from ..blas import one_blas_thread
from ..hooks import head_of
from ..tables import DERIVED, join_chunks, repeated_strings, stored_block, stored_chunk
from .config import position_kind
from .contrasts import compute_contrasts

DIMS_FILE = "dims.parquet"
MAX_WORKERS = 4  # each holds a group's arrays (~15 MB per hook for SmolLM2-135M, ~0.3 GB for an 8B model)

if TYPE_CHECKING:
    from .result import DiffResult

LAYER_STATS = ("rel_l2_mean", "rel_l2_std", "rel_l2_median", "cos_mean", "cos_std", "l2_mean", "l2_std", "dir_norm",
               "dir_consistency", "loo_cos_mean", "loo_cos_median", "loo_cos_q10", "loo_cos_q90", "rel_l2_rms",
               "rel_l2_rms_nomassive")
# (cell_stats key, layers column): means over the layer's non-massive dimensions with a finite value
LAYER_DIM_MEANS = (("absz_mean", "absz_mean"), ("absz_median", "absz_median"), ("frac_under", "frac_under_mean"),
                   ("sign_consistency", "sign_consistency_mean"))
# layers columns that pool opposite swap directions in a mixed group: NaN there
LAYER_SIGNED = ("dir_norm", "dir_consistency", "loo_cos_mean", "loo_cos_median", "loo_cos_q10", "loo_cos_q90",
                "sign_consistency_mean")
CAND_STATS = ("n", "n_sample", "absz_median", "absz_q10", "absz_q90", "frac_under", "sign_consistency", "absz_mean",
              "mean_delta", "mean_abs_delta", "sigma_clean", "frac_pos", "frac_neg")
CAND_SIGNED = ("sign_consistency", "mean_delta", "frac_pos", "frac_neg")


def frame(blocks: list[dict]) -> pd.DataFrame:
    """One DataFrame of blocks of columns (arrays of one length per block, or scalars repeated over it): one
    construction for the whole table, where a frame per block cost more than the numbers (string columns)."""
    if not blocks:
        return pd.DataFrame()
    lengths = [next(len(v) for v in b.values() if isinstance(v, np.ndarray)) for b in blocks]
    cols = {}
    for k in blocks[0]:
        if all(isinstance(b[k], str) for b in blocks):
            cols[k] = _repeated_strings([b[k] for b in blocks], lengths)
            continue
        parts = [b[k] if isinstance(b[k], np.ndarray) else np.full(n, b[k], dtype=object if isinstance(b[k], str)
                                                                     else None) for b, n in zip(blocks, lengths)]
        cols[k] = np.concatenate(parts)
    return pd.DataFrame(cols)


def _repeated_strings(values: list[str], lengths: list[int]):
    """A string column of ``values[i]`` repeated ``lengths[i]`` times, in pandas' default string dtype: made by
    Arrow from one code per row (an object array of millions of Python strings took ~0.8 s per column to
    convert, the dims table has four)."""
    dtype = pd.Series(["x"]).dtype
    if getattr(dtype, "storage", None) != "pyarrow":  # pandas without Arrow strings: its own conversion
        return np.repeat(np.array(values, dtype=object), lengths)
    return pd.array(repeated_strings(values, lengths), dtype=dtype)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


def dim_means(x: Float[torch.Tensor, "L O D"], keep: Bool[torch.Tensor, "L O D"]) -> Float[np.ndarray, "L O"]:
    """Mean over the last axis of the finite values where ``keep`` (NaN where none)."""
    ok = keep & torch.isfinite(x)
    cnt = ok.sum(-1)
    s = torch.where(ok, x, torch.zeros((), dtype=x.dtype)).sum(-1)
    return _np(torch.where(cnt > 0, s / cnt.clamp_min(1), torch.full_like(s, math.nan)))


def layers_table(res: DiffResult) -> pd.DataFrame:
    """:attr:`DiffResult.layers`: one row per (category, swap direction, hook, layer, offset)."""
    return frame([layers_block(res, h, cat, dr) for cat, dr in res.stat_groups() for h in res.hooks])


def layers_block(res: DiffResult, h: str, cat: str, dr: str) -> dict:
    """The :func:`layers_table` rows of one hook and group, as columns."""
    offs = np.array(res.offsets)
    kinds = np.array([position_kind(o) for o in res.offsets], dtype=object)
    O = len(offs)  # noqa: E741
    g = res.group(h)
    L = len(g.layers)
    st = res.cell_stats(h, cat, dr)
    iv = res.layer_intervals(h, cat, dr)
    mass = st["massive"]
    cand = res.candidate_masks(h, cat, dr)
    data: dict = {"category": cat, "swap_direction": dr, "hook": h,
                  "layer": np.repeat(np.asarray(g.layers, dtype=np.int64), O), "offset": np.tile(offs, L),
                  "position_kind": np.tile(kinds, L),
                  "n": np.tile(_np(st["n"]).astype(np.int64), L),
                  "n_sample": np.tile(_np(st["n_sample"]).astype(np.int64), L),
                  "reachable": _np(st["reachable"]).reshape(-1).astype(bool)}
    for k in LAYER_STATS:
        data[k] = _np(st[k]).astype(np.float64).reshape(-1)
    data["rel_l2_mean_lo"] = np.asarray(iv["rel_l2_mean_lo"], dtype=np.float64).reshape(-1)
    data["rel_l2_mean_hi"] = np.asarray(iv["rel_l2_mean_hi"], dtype=np.float64).reshape(-1)
    for k, name in LAYER_DIM_MEANS:
        data[name] = dim_means(st[k], ~mass).reshape(-1)
    if res.mixed(cat, dr):
        for k in LAYER_SIGNED:
            data[k] = np.full(L * O, math.nan)
    data["n_massive"] = _np(mass.sum(-1)).astype(np.int64).reshape(-1)
    rr = st["rms_ratio"]
    ok = torch.isfinite(rr)
    has = ok.any(-1)
    mx = torch.where(ok, rr, torch.full_like(rr, -math.inf)).max(-1).values
    data["rms_ratio_max"] = _np(torch.where(has, mx, torch.full_like(mx, math.nan))).reshape(-1)
    data["rms_ratio_dim"] = _np(torch.where(has, torch.where(ok, rr, torch.full_like(rr, -1)).argmax(-1),
                                            torch.full_like(has, -1, dtype=torch.long))).reshape(-1)
    data["n_stable"] = _np(cand["stable"].sum(-1)).astype(np.int64).reshape(-1)
    data["n_responsive"] = _np(cand["responsive"].sum(-1)).astype(np.int64).reshape(-1)
    return data


def ranked(mask: Bool[np.ndarray, "L O D"], score: Float[np.ndarray, "L O D"], ascending: bool, top: int
           ) -> tuple[np.ndarray, ...]:
    """The first ``top`` passing dimensions of each (layer, offset) by ``score`` (a stable sort: ties keep the
    dimension order; NaN last), as flat arrays ``(layer index, offset index, dim, rank, n_passing)``. Only the
    passing cells are sorted (a few percent of the cells, where sorting every row took most of the time)."""
    li, oi, d = np.nonzero(mask)  # (layer, offset)-major, dims ascending within each
    key = score[li, oi, d]
    order = np.lexsort((key if ascending else -key, oi, li))  # stable: ties keep the dimension order
    li, oi, d = li[order], oi[order], d[order]
    n_pass = mask.sum(-1)
    cell = li * mask.shape[1] + oi
    start = np.searchsorted(cell, cell, side="left")  # each passing dim's first row of its (layer, offset)
    k = np.arange(len(cell)) - start
    keep = k < top
    return li[keep], oi[keep], d[keep], k[keep] + 1, n_pass[li[keep], oi[keep]]


def candidates_table(res: DiffResult) -> pd.DataFrame:
    """:attr:`DiffResult.candidates`: the ranked stable and responsive dimensions of every group."""
    return candidates_frame([b for cat, dr in res.stat_groups() for h in res.hooks
                             for b in candidate_blocks(res, h, cat, dr)])


def candidates_frame(blocks: list[dict]) -> pd.DataFrame:
    if not blocks:
        return pd.DataFrame()
    df = frame(blocks)
    df["n"] = df["n"].astype(int)
    df["n_sample"] = df["n_sample"].astype(int)
    return df


def candidate_blocks(res: DiffResult, h: str, cat: str, dr: str) -> list[dict]:
    """The :func:`candidates_table` rows of one hook and group (a block per kind that has any)."""
    cfg = res.config
    mixed = res.mixed(cat, dr)
    g = res.group(h)
    st = res.cell_stats(h, cat, dr)
    masks = res.candidate_masks(h, cat, dr)
    heads = np.array([head_of(g, d) for d in range(g.width)], dtype=np.int64)
    out = []
    for kind, score, asc in (("stable", "absz_q90", True), ("responsive", "absz_median", False)):
        m = _np(masks[kind])
        if not m.any():
            continue
        li, oi, d, rank, n_pass = ranked(m, _np(st[score]), asc, cfg.max_candidates)
        offs = np.asarray(res.offsets, dtype=np.int64)[oi]
        data: dict = {"category": cat, "swap_direction": dr, "hook": h,
                      "layer": np.asarray(g.layers, dtype=np.int64)[li], "offset": offs,
                      "position_kind": np.array([position_kind(int(o)) for o in offs], dtype=object),
                      "dim": d.astype(np.int64), "unit": g.kind, "head": heads[d], "kind": kind,
                      "rank": rank.astype(np.int64), "n_passing": n_pass.astype(np.int64)}
        for c in CAND_STATS:
            v = _np(st[c]).astype(np.float64)
            data[c] = np.full(len(li), math.nan) if (mixed and c in CAND_SIGNED) else \
                v[oi] if v.ndim == 1 else v[li, oi, d]
        out.append(data)
    return out


def sensitivity_table(res: DiffResult) -> pd.DataFrame:
    """:attr:`DiffResult.sensitivity`: candidate counts over a grid of each rule's threshold (the counts of
    :meth:`DiffResult.candidate_masks` at each grid value, every value of a grid in one comparison)."""
    return pd.DataFrame([r for cat, dr in res.stat_groups() for h in res.hooks
                         for r in sensitivity_rows(res, h, cat, dr)])


def sensitivity_rows(res: DiffResult, h: str, cat: str, dr: str) -> list[dict]:
    """The :func:`sensitivity_table` rows of one hook and group."""
    cfg = res.config
    grids = {p: res.grid(p) for p in ("threshold", "responsive_z", "responsive_sign")}
    st = res.cell_stats(h, cat, dr)
    base = res.rule_base(h, cat, dr)
    counts: list[tuple[str, str, list[float], torch.Tensor]] = []
    if dr == "all":  # stable is unsigned: its pooled groups say it (candidate_masks' test, every value at once)
        stable = base & (st["stable_z"] < torch.tensor(grids["threshold"], dtype=torch.float64)[:, None, None, None])
        counts.append(("stable", "threshold", grids["threshold"], stable.flatten(1).sum(1)))
    med, sc = st["absz_median"], st["sign_consistency"]
    mixed = res.mixed(cat, dr)
    for param, v, over in (("responsive_z", grids["responsive_z"], med),
                           ("responsive_sign", grids["responsive_sign"], sc)):
        if mixed:  # none where directions are pooled
            counts.append(("responsive", param, v, torch.zeros(len(v), dtype=torch.long)))
            continue
        t = torch.tensor(v, dtype=over.dtype)[:, None, None, None]
        other = (sc >= cfg.responsive_sign) if param == "responsive_z" else (med >= cfg.responsive_z)
        resp = (base & other)[None] & (over[None] >= t)
        counts.append(("responsive", param, v, resp.flatten(1).sum(1)))
    return [{"category": cat, "swap_direction": dr, "hook": h, "kind": kind, "parameter": param, "value": v,
             "default": bool(math.isclose(v, getattr(cfg, param))), "n_candidates": int(c)}
            for kind, param, values, n in counts for v, c in zip(values, n.tolist())]


def heads_table(res: DiffResult) -> pd.DataFrame:
    """:attr:`DiffResult.heads`: per-head relative L2 and cosine of the per-head hooks."""
    frames = [heads_block(res, g.suffix, cat) for cat in res.categories for g in res.groups if g.n_heads]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def heads_block(res: DiffResult, h: str, cat: str) -> pd.DataFrame:
    """The :func:`heads_table` rows of one per-head hook and category."""
    offs = np.asarray(res.offsets, dtype=np.int64)
    kinds = np.array([position_kind(o) for o in res.offsets], dtype=object)
    g = res.group(h)
    st = res.cell_stats(h, cat)
    L, O, H = len(g.layers), len(offs), g.n_heads  # noqa: E741
    li, oi, hh = (a.reshape(-1) for a in np.meshgrid(np.arange(L), np.arange(O), np.arange(H), indexing="ij"))
    return pd.DataFrame({
        "category": cat, "hook": h, "layer": np.asarray(g.layers, dtype=np.int64)[li],
        "offset": offs[oi], "position_kind": kinds[oi], "head": hh.astype(np.int64),
        "n": _np(st["n"]).astype(np.int64)[oi],
        **{f"{k}_{s}": _np(st[f"head_{k}_{s}"]).astype(np.float64).reshape(-1)
           for k in ("rel_l2", "cos") for s in ("mean", "std")}})


DIM_COLUMNS = ("mean_delta", "std_delta", "mean_abs_delta", "mean_clean", "sigma_clean", "rms_clean", "rms_ratio",
               "z_mean", "absz_mean", "frac_pos", "frac_neg", "sign_consistency", "absz_median", "absz_q10",
               "absz_q25", "absz_q75", "absz_q90", "frac_under")


def dims_columns(res: DiffResult, h: str, cat: str, offsets: Sequence[int] | None = None, stored: bool = False
                 ) -> list[dict]:
    """One row per (layer, offset, dim) of one hook and category (every offset, or ``offsets``), as
    :func:`frame` blocks (one per offset): a table of many is one frame, not a concatenation of frames (whose
    string columns cost more than the numbers). ``stored``: the columns ``dims.parquet`` stores, as
    :func:`eclens.tables.stored_block` gives them."""
    g = res.group(h)
    st = res.cell_stats(h, cat)
    offs = res.offsets
    oi = list(range(len(offs))) if offsets is None else [offs.index(o) for o in offsets]
    L, D = len(g.layers), g.width
    blocks = []
    dims = np.arange(D)
    head = np.array([head_of(g, int(d)) for d in dims]) if g.kind in ("head", "head_dim") else np.full(D, -1)
    for o in oi:
        data = {"category": cat, "hook": h,
                "layer": np.repeat(np.array(g.layers), D), "offset": offs[o],
                "position_kind": position_kind(offs[o]), "dim": np.tile(dims, L), "unit": g.kind,
                "head": np.tile(head, L),
                "n": int(st["n"][o]), "n_sample": int(st["n_sample"][o])}
        for c in DIM_COLUMNS:
            if not (stored and c in DERIVED):  # the file derives these on reading
                data[c] = st[c][:, o, :].reshape(-1).numpy()
        data["massive"] = st["massive"][:, o, :].reshape(-1).numpy()
        blocks.append(stored_block(data, DIMS_FILE) if stored else data)
    return blocks


def dims_stored(res: DiffResult, parts: dict | None = None):
    """``dims.parquet``'s table (:attr:`DiffResult.dims` at the declared precision, an Arrow table; an empty
    frame when it has no rows) from the :func:`dims_chunks` of each (category, hook), ``parts`` (made here when
    None), in :attr:`DiffResult.dims`'s row order."""
    if parts is None:
        parts = {(c, h): dims_chunks(res, h, c) for c in res.categories for h in res.hooks}
    chunks = [b for c in res.categories for h in res.hooks for b in parts.get((c, h), ())]
    return join_chunks(chunks) if chunks else pd.DataFrame()


def dims_chunks(res: DiffResult, h: str, cat: str) -> list[dict]:
    """The rows ``dims.parquet`` holds of one hook and category (every offset for ``all``, the first for the
    others) as Arrow blocks (:func:`eclens.tables.stored_chunk`)."""
    return [stored_chunk(b, DIMS_FILE) for b in dims_columns(res, h, cat, None if cat == "all" else [0], stored=True)]


def all_tables(res: DiffResult, workers: int | None = None, on_hook: Callable[[], None] | None = None) -> dict:
    """``layers``, ``candidates``, ``sensitivity``, ``heads`` (the tables above, the same rows in the same
    order), ``contrasts`` (:func:`eclens.diff.contrasts.compute_contrasts`) and ``dims_parts``
    (:func:`dims_stored`'s blocks) in one pass over the hooks, each hook's arrays forgotten once its rows are
    built (:meth:`DiffResult.forget_hook`): kept for every table, they were gigabytes, and the pages the kernel
    zeroed for them (a million page faults at 225 pairs) took as long as the numbers.

    The work runs on ``workers`` threads (default: torch's intra-op threads, at most :data:`MAX_WORKERS`), each
    with one torch thread: a task is one hook's groups that share their state rows (they read the same
    numbers, forgotten when the task ends), after the hook's whole-dataset statistics (its sums, σ and
    bounds, which every group reads: :meth:`DiffResult.prepare_hook`), made by a task queued while the previous hook's groups run. The arrays
    of a group are too small for one torch call to use more than one core well, and the groups are
    independent; each number is made by the same calls on the same arrays whatever the thread, so the tables
    do not depend on ``workers``. ``on_hook``: called (on this thread) as each hook's rows are done."""
    groups = res.stat_groups()
    blocks: dict[tuple[str, str, str], tuple[dict, list[dict], list[dict]]] = {}
    dims: dict[tuple[str, str], list[dict]] = {}
    heads: dict[tuple[str, str], pd.DataFrame] = {}
    by_rows: dict = {}  # the groups of each row set, in order
    for cat, dr in groups:
        by_rows.setdefault(res.rows_of(cat, dr), []).append((cat, dr))
    threads = torch.get_num_threads()
    n = max(1, min(workers or threads, MAX_WORKERS))

    # an alias's rows are made in its source's tasks, while the source's arrays it reads are at hand
    with_alias = {h: [h] for h in res.hooks if h not in res.aliases}
    for a in res.aliases.values():
        with_alias[a.source].append(a.hook)

    def rows_task(h: str, members: list[tuple[str, str]]) -> None:
        for hh in with_alias[h]:
            for cat, dr in members:
                blocks[cat, dr, hh] = (layers_block(res, hh, cat, dr), candidate_blocks(res, hh, cat, dr),
                                       sensitivity_rows(res, hh, cat, dr))
                if dr == "all":
                    dims[cat, hh] = dims_chunks(res, hh, cat)
                    if res.group(hh).n_heads:
                        heads[cat, hh] = heads_block(res, hh, cat)
        # 15 MB per group for SmolLM2-135M: kept for the whole hook, the groups' arrays grew the heap by half a
        # GB per hook, and the kernel zeroed every fresh page (most of the finishing's faults)
        for hh in with_alias[h]:
            res.forget_group(hh, *members[-1])

    def shared_task(h: str) -> None:
        for hh in with_alias[h]:
            res.prepare_hook(hh)

    hooks = list(with_alias)
    # numpy's products in the groups on one thread each, as torch's: the limit set once here, not per product
    with one_blas_thread():
        pool = ThreadPoolExecutor(n, initializer=torch.set_num_threads, initargs=(1,))
        try:
            if hooks:  # the first hook's here, on every torch thread: nothing else could run yet
                shared_task(hooks[0])
            shared = contrasts = None
            for i, h in enumerate(hooks):
                if shared is not None:
                    shared.result()
                if i + 1 < len(hooks):  # the next hook's, queued first: made while this one's groups run (no core idle)
                    shared = pool.submit(shared_task, hooks[i + 1])
                else:  # the contrasts read every hook's whole-dataset statistics (made now) and the sample: made
                    # beside the last hook's groups, not after them on a core left alone
                    contrasts = pool.submit(compute_contrasts, res)
                tasks = [pool.submit(rows_task, h, m) for m in by_rows.values()]
                for f in tasks:
                    f.result()
                for hh in with_alias[h]:
                    res.forget_hook(hh)
                    if on_hook is not None:
                        on_hook()
        finally:
            pool.shutdown(cancel_futures=True)  # after an error, the queued tasks do not run
            res.forget_scratch()  # the workers' buffers (tens of MB each)
            torch.set_num_threads(threads)  # MKL's thread count is process-wide: the workers' setting reached it
    order = [(cat, dr, h) for cat, dr in groups for h in res.hooks]  # the tables' row order: groups, then hooks
    head_parts = [heads[c, h] for c in res.categories for h in res.hooks if (c, h) in heads]
    return {"layers": frame([blocks[k][0] for k in order]),
            "candidates": candidates_frame([b for k in order for b in blocks[k][1]]),
            "sensitivity": pd.DataFrame([r for k in order for r in blocks[k][2]]),
            "dims_parts": dims, "contrasts": contrasts.result() if contrasts else compute_contrasts(res),
            "heads": pd.concat(head_parts, ignore_index=True) if head_parts else pd.DataFrame()}
