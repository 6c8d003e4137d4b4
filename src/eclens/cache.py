"""``ec cache``: the raw activations of both sentences of every pair, on disk.

For users who want the activations themselves (``ec diff`` does not need them: it
streams). Layout, under ``RUN/cache/``:

* ``index.json`` — format, hook names and their per-position shapes, ``positions``
  (``changed``: ``p`` only; ``after``: ``p`` to the last token; ``all``: every
  token), storage dtype, ``shard_size``, the model entry, the aligned pairs in
  storage order (sorted by length, as ``ec diff`` batches them), ``tl_extra_hooks`` (the
  hooks ``--for-tl`` added to the asked-for ones, which ``ec diff --from-cache`` leaves
  out), and the list of finished shards. It is rewritten atomically after every shard, so an interrupted
  ``ec cache`` resumes at the first unfinished shard.
* ``shard-00000.safetensors``, ... — ``shard_size`` pairs each. For each pair the
  stored positions are one contiguous run ``pos_start .. pos_start + n_rows - 1``;
  rows of all pairs are concatenated: ``rows`` ``[n+1]`` (int64) gives pair ``i``'s
  rows ``rows[i]:rows[i+1]``, ``pos_start`` ``[n]`` its first stored position.
  ``{hook}/clean`` and ``{hook}/corrupt`` are ``[n_rows_total, *shape]`` (for
  ``attn.hook_pattern``: ``[n_rows_total, heads, max_len]``, the attention of the
  stored query position over all keys, zero-padded). Metadata ``pairs``: the ids
  and the per-pair log-prob/KL rows of ``ec diff``'s ``pairs.csv``.

:func:`open_cache` reads it lazily (one tensor slice at a time); ``ec diff
--from-cache RUN`` (:func:`diff_from_cache`) computes the same statistics as the
streaming run from it — bit for bit when the cache was written with the model's
dtype and a ``shard_size`` that is a multiple of the diff's ``batch_size`` (then
every batch holds the same pairs, so every activation is the same float).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import EclensError
from .hooks import (
    PATTERN_HOOKS,
    UNEMBED_IN,
    iter_batches,
    packs_logits,
    pad_id,
    select_hooks,
    split_hook,
    take_rows,
)
from .integrity import check_file, verify_file
from .model import DTYPES
from .pairs import AlignedPair, aligned_from_dict, aligned_position, require_single
from .runs import save_tensors, write_json

CACHE_DIR = "cache"
INDEX = "index.json"
POSITIONS = ("changed", "after", "all")


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")


def _row_span(a: AlignedPair, positions: str) -> tuple[int, int]:
    """First stored position and number of stored positions of a pair."""
    if positions == "changed":
        return a.position, 1
    if positions == "after":
        return a.position, a.length - a.position
    return 0, a.length


class _RowGatherer:
    """Forward hooks that keep each pair's stored positions (flattened over pairs), and where the model has the
    hook point (``pack_logits``), cut the unembedding's input to the rows the pair metrics read
    (``logit_rows``), as the stream does (:class:`eclens.diff.gather.Gatherer`): the same log-probs, bit for bit,
    without the logits of the changed sentence's prefix."""

    def __init__(self, names: list[str], patterns: set[str], store_dtype: torch.dtype, pack_logits: bool = False):
        self.names = names
        self.patterns = patterns
        self.store_dtype = store_dtype
        self.out: dict[str, torch.Tensor] = {}
        self.rows = self.pos = None
        self.T = 0
        self.pack_logits = pack_logits
        self.logit_rows: torch.Tensor | None = None

    def hooks(self):
        out = [(n, self._make(n)) for n in self.names]
        if self.pack_logits:
            out.append((UNEMBED_IN, self._pack))
        return out

    def _pack(self, act, hook):
        return take_rows(act, self.logit_rows)

    def _make(self, name: str):
        pattern = name in self.patterns

        def fn(act, hook):
            if pattern:  # [2B, H, q, k] -> [N, H, k]
                g = act[self.rows, :, self.pos, :]
            else:
                g = act[self.rows, self.pos]
            self.out[name] = g.to("cpu", self.store_dtype)
            return None

        return fn


def write_cache(
    model,
    aligned_pairs: Sequence[AlignedPair],
    run: str | Path,
    hooks: str | Sequence[str] | None = None,
    positions: str | None = None,
    store_dtype: str | torch.dtype | None = None,
    shard_size: int = 256,
    batch_size: int = 16,
    progress: bool = False,
    max_shards: int | None = None,
    ctx=None,
    for_tl: bool = False,
) -> ActivationStore:
    """Write (or resume writing) ``RUN/cache``; returns the lazily-read store.

    ``positions``: ``changed``, ``after`` (default) or ``all``. ``for_tl``: also store what
    TransformerLens's tools read (:mod:`eclens.tl`: the embedding and layer-norm scale hooks) at
    every position, so that :meth:`ActivationStore.activation_cache` can rebuild a pair's cache.

    ``max_shards`` stops after writing that many shards (a later call resumes).
    ``ctx`` (:class:`eclens.distributed.Dist`, under ``torchrun``): every rank passes all the
    pairs; the unfinished shards are dealt round-robin over the ranks, each rank writes its
    own shard files and records them in ``index.rank{R}.json`` (a partial index, rewritten
    after every shard), and rank 0 merges the partial indexes into ``index.json`` at the end
    and at the start of any later run, whatever its world size, so an interrupted
    distributed run resumes like a single-process one.
    """
    from . import distributed as D
    from .diff import pair_info, pair_metrics
    from .diff.logprobs import packed_rows, span_rows
    from .hooks import expand_hook_spec
    from .model import manifest_model_entry, model_device

    ctx = ctx or D.Dist()

    if for_tl and positions not in (None, "all"):
        raise EclensError(f"--for-tl stores every position; drop --positions {positions}")
    positions = positions or ("all" if for_tl else "after")
    if positions not in POSITIONS:
        raise EclensError(f"unknown --positions {positions!r}: use changed, after or all")
    if shard_size < 1:
        raise EclensError("--shard-size must be at least 1")
    if not aligned_pairs:
        raise EclensError("no valid pairs to cache")
    # The cache stores both sentences at one set of positions (and Δ between them): a span has none.
    require_single(aligned_pairs, "ec cache")
    names = select_hooks(model, expand_hook_spec(hooks))
    extra: list[str] = []
    if for_tl:
        from .tl import tl_hooks

        asked = set(names)
        names = select_hooks(model, [*names, *tl_hooks(model)])
        extra = [n for n in names if n not in asked]  # `ec diff --from-cache` leaves these out by default
    param_dtype = next(model.parameters()).dtype
    sdt = param_dtype if store_dtype in (None, "model") else DTYPES.get(store_dtype, store_dtype) \
        if isinstance(store_dtype, str) else store_dtype
    if not isinstance(sdt, torch.dtype):
        raise EclensError(f"unknown storage dtype {store_dtype!r}: use float32, float16 or bfloat16")
    folder = Path(run) / CACHE_DIR
    order = sorted(range(len(aligned_pairs)), key=lambda i: aligned_pairs[i].length)
    pairs = [aligned_pairs[i] for i in order]
    model_entry = manifest_model_entry(model)
    params = {"hooks": names, "positions": positions, "store_dtype": _dtype_name(sdt), "shard_size": shard_size,
              "pair_ids": [a.id for a in pairs]}
    index: dict[str, Any] | None = None
    ipath = folder / INDEX
    # Whether the cache exists, seen by every rank before the first barrier: rank 0 writes a new index.json
    # right after it, and a rank that looked later took it for an old one and skipped the next barrier (one
    # barrier short, it left while rank 0 waited in its last one: the torchrun test hung or "Connection
    # closed by peer").
    existed = ipath.exists()
    if ctx.is_main and existed:
        index = _fold_partials(folder, _read_index(ipath))  # shards an interrupted torchrun run left in partials
    D.barrier(ctx)  # the others read index.json only after rank 0 folded the partials into it
    if index is None and existed:
        index = _read_index(ipath)
    if index is not None:
        old = {k: index.get(k) for k in params}
        if old != params:
            diff = [k for k in params if old[k] != params[k]]
            raise EclensError(f"{ipath}: a cache with other settings ({', '.join(diff)}) is here; use the same "
                              "options or another --out folder")
        m = index.get("model") or {}
        if m.get("name") != model_entry["name"] or m.get("weights_hash") != model_entry["weights_hash"]:
            raise EclensError(f"{ipath}: cache was made with model {m.get('name')!r}, not {model_entry['name']!r}; "
                              "use another --out folder")
    else:
        index = {"format": 1, **params, "model": model_entry, "pairs": [a.to_dict() for a in pairs],
                 "shapes": {}, "shards": [], "complete": False, "batch_size": batch_size, "tl_extra_hooks": extra}
        if ctx.active:
            if ctx.is_main:  # written before any shard, so that an interrupted run resumes with its settings
                write_json(ipath, index)
            D.barrier(ctx)
    dev = model_device(model)
    patterns = {n for n in names if split_hook(n)[1] in PATTERN_HOOKS}
    gat = _RowGatherer(names, patterns, sdt, pack_logits=packs_logits(model))
    pid = pad_id(model)
    n_shards = (len(pairs) + shard_size - 1) // shard_size
    # A finished shard must still read whole: one cut short (disk full, an interrupted copy) is
    # refused, never skipped as done; one the user deleted is written again.
    index["shards"] = [s for s in index["shards"] if (folder / s["file"]).is_file()]
    for s in index["shards"]:
        why = shard_problem(folder / s["file"])
        if why:
            raise EclensError(f"{folder / s['file']}: unreadable cache shard ({why}); delete it and rerun the same "
                              "`ec cache` command to write it again")
    done = {s["index"] for s in index["shards"]}
    D.barrier(ctx)  # every rank has read the same finished shards before any rank writes one
    todo = [k for k in range(n_shards) if k not in done][ctx.rank::ctx.world_size]
    # Under torchrun a rank records its shards in its own partial index: index.json has one writer.
    mine: dict[str, Any] = {"format": 1, "rank": ctx.rank, "world_size": ctx.world_size, "shards": [],
                            "shapes": {}}
    ppath = folder / f"index.rank{ctx.rank}.json"
    from .progress import progress_bar

    prog = progress_bar(progress and len(todo) > 0)
    t0 = time.perf_counter()
    with prog as pr, torch.inference_mode(), model.hooks(fwd_hooks=gat.hooks()):
        n_todo = sum(len(pairs[k * shard_size:(k + 1) * shard_size]) for k in todo)
        task = pr.add_task("cache" if not ctx.active else f"cache (rank 0 of {ctx.world_size})", total=n_todo) \
            if pr is not None else None
        written = 0
        for k in todo:
            if max_shards is not None and written >= max_shards:
                break
            written += 1
            shard = pairs[k * shard_size:(k + 1) * shard_size]
            parts: dict[str, dict[str, list[torch.Tensor]]] = {n: {"clean": [], "corrupt": []} for n in names}
            rows_meta: list[dict] = []
            starts, counts = [], []
            Tmax = max(a.length for a in shard)
            for batch in iter_batches(shard, batch_size, pid, dev):
                B = batch.size
                spans = [_row_span(a, positions) for a in batch.pairs]
                r = torch.cat([torch.full((n,), i, dtype=torch.long) for i, (_, n) in enumerate(spans)])
                p = torch.cat([torch.arange(s, s + n, dtype=torch.long) for s, n in spans])
                gat.rows = torch.cat([r, r + B]).to(dev)
                gat.pos = torch.cat([p, p]).to(dev)
                lidx = packed_rows(span_rows(batch.pairs), [a.length for a in batch.pairs], batch.tokens.shape[1]) \
                    if gat.pack_logits else None
                if lidx is not None:
                    gat.logit_rows = lidx[0].to(dev, non_blocking=True)
                logits = model(batch.tokens)
                N = len(r)
                for n in names:
                    t = gat.out.pop(n, None)
                    if t is None:
                        raise EclensError(f"hook {n} did not fire in the forward pass")
                    if n in patterns and t.shape[-1] < Tmax:
                        t = torch.nn.functional.pad(t, (0, Tmax - t.shape[-1]))
                    parts[n]["clean"].append(t[:N])
                    parts[n]["corrupt"].append(t[N:])
                mets = pair_metrics(logits, batch.tokens, batch.pairs, [0],
                                    index=(gat.logit_rows, lidx[1]) if lidx is not None else None)
                del logits
                for a, mrow, (s, n) in zip(batch.pairs, mets, spans):
                    rows_meta.append({**pair_info(a), **mrow})
                    starts.append(s)
                    counts.append(n)
                if pr is not None:
                    pr.update(task, advance=B)
            tensors: dict[str, torch.Tensor] = {
                "rows": torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=torch.long),
                "pos_start": torch.tensor(starts, dtype=torch.long),
            }
            for n in names:
                for which in ("clean", "corrupt"):
                    tensors[f"{n}/{which}"] = torch.cat(parts[n][which])
                if n not in index["shapes"]:
                    t = tensors[f"{n}/clean"]
                    index["shapes"][n] = mine["shapes"][n] = list(t.shape[1:2]) if n in patterns \
                        else list(t.shape[1:])
            fname = f"shard-{k:05d}.safetensors"
            save_tensors(tensors, folder / fname, metadata={"pairs": json.dumps(rows_meta)})
            entry = {"index": k, "file": fname, "n_pairs": len(shard), "first": k * shard_size}
            if ctx.active:
                mine["shards"].append(entry)
                write_json(ppath, mine)
                continue
            index["shards"].append(entry)
            index["shards"].sort(key=lambda s: s["index"])
            index["complete"] = len(index["shards"]) == n_shards
            index["seconds"] = round(index.get("seconds", 0.0) + time.perf_counter() - t0, 3)
            t0 = time.perf_counter()
            write_json(ipath, index)
    D.barrier(ctx)  # every rank's shards and partial index are on disk
    if ctx.is_main:
        if ctx.active:
            index["seconds"] = round(index.get("seconds", 0.0) + time.perf_counter() - t0, 3)
            index["world_size"] = ctx.world_size
        index = _fold_partials(folder, index)
        if not index["complete"]:
            index["complete"] = len(index["shards"]) == n_shards
            write_json(ipath, index)
    D.barrier(ctx)
    return open_cache(run)


def _partials(folder: Path) -> list[Path]:
    return sorted(folder.glob("index.rank*.json"))


def _fold_partials(folder: Path, index: dict, write: bool = True) -> dict:
    """Move the shards recorded in ``index.rank*.json`` (by ranks of a ``torchrun`` run) into ``index.json``;
    one writer (rank 0 or a single process). Shards whose file is gone are dropped (written again).
    ``write=False``: only the merged view, for a reader of a run still in progress or interrupted."""
    parts = _partials(folder)
    if not parts:
        return index
    index = {**index, "shards": list(index["shards"]), "shapes": dict(index["shapes"])}
    have = {s["index"] for s in index["shards"]}
    for p in parts:
        try:
            part = json.loads(p.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError, OSError):
            continue  # a partial index is rewritten atomically; one that does not read adds nothing
        for s in part.get("shards", []):
            if s["index"] not in have and (folder / s["file"]).is_file():
                index["shards"].append(s)
                have.add(s["index"])
        for n, shape in (part.get("shapes") or {}).items():
            index["shapes"].setdefault(n, shape)
    index["shards"].sort(key=lambda s: s["index"])
    n_shards = (len(index["pairs"]) + int(index["shard_size"]) - 1) // int(index["shard_size"])
    index["complete"] = len(index["shards"]) == n_shards
    if not write:
        return index
    write_json(folder / INDEX, index)
    for p in parts:  # only after index.json holds their shards
        p.unlink(missing_ok=True)
    return index


@dataclass
class CachedPair:
    """Where one pair's rows live."""

    pair: AlignedPair
    shard: int
    row0: int
    n_rows: int
    pos_start: int


class ActivationStore:
    """Lazy reader of ``RUN/cache`` (see the module docstring); :func:`open_cache` makes one."""

    def __init__(self, folder: Path, index: dict):
        self.folder = folder
        self.index = index
        self.pairs = [aligned_from_dict(d) for d in index["pairs"]]
        self._by_id = {a.id: i for i, a in enumerate(self.pairs)}
        self._handles: dict[int, Any] = {}
        self._shard_rows: dict[int, torch.Tensor] = {}
        self._shard_meta: dict[int, list[dict]] = {}

    def __repr__(self) -> str:
        return (f"ActivationStore({self.folder}, {len(self)} pairs, {len(self.hooks)} hooks, "
                f"positions={self.positions}, dtype={self.dtype}{'' if self.complete else ', incomplete'})")

    def __len__(self) -> int:
        return sum(s["n_pairs"] for s in self.index["shards"])

    def __contains__(self, pair_id: str) -> bool:
        i = self._by_id.get(pair_id)
        return i is not None and self._shard_of(i) in self._done_shards

    @property
    def hooks(self) -> list[str]:
        return list(self.index["hooks"])

    @property
    def positions(self) -> str:
        return self.index["positions"]

    @property
    def dtype(self) -> str:
        return self.index["store_dtype"]

    @property
    def complete(self) -> bool:
        return bool(self.index.get("complete"))

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v) for k, v in self.index["shapes"].items()}

    @property
    def _done_shards(self) -> set[int]:
        return {s["index"] for s in self.index["shards"]}

    def _shard_of(self, i: int) -> int:
        return i // int(self.index["shard_size"])

    def _handle(self, k: int):
        from safetensors import safe_open

        if k not in self._handles:
            if k not in self._done_shards:
                raise EclensError(f"{self.folder}: shard {k} was not written yet; rerun `ec cache` to finish it")
            fname = next(s["file"] for s in self.index["shards"] if s["index"] == k)
            verify_file(self.folder / fname)  # once per shard per process: a flipped byte is refused by name
            try:
                f = safe_open(str(self.folder / fname), framework="pt", device="cpu")
                rows, pos_start = f.get_tensor("rows"), f.get_tensor("pos_start")
                meta = json.loads((f.metadata() or {})["pairs"])
            except Exception as e:  # noqa: BLE001 - missing, cut short or not a shard: the same advice
                raise EclensError(f"{self.folder / fname}: unreadable cache shard ({_short(e)}); delete it and rerun "
                                  "`ec cache` (the same command) to write it again") from None
            self._handles[k] = f
            self._shard_rows[k] = rows
            self._pos_start = getattr(self, "_pos_start", {})
            self._pos_start[k] = pos_start
            self._shard_meta[k] = meta
        return self._handles[k]

    def locate(self, pair: str | int) -> CachedPair:
        i = self._by_id.get(pair) if isinstance(pair, str) else int(pair)
        if i is None or not 0 <= i < len(self.pairs):
            raise EclensError(f"pair {pair!r} is not in this cache")
        k = self._shard_of(i)
        self._handle(k)
        j = i - k * int(self.index["shard_size"])
        rows = self._shard_rows[k]
        return CachedPair(self.pairs[i], k, int(rows[j]), int(rows[j + 1] - rows[j]), int(self._pos_start[k][j]))

    def get(self, hook: str, pair: str | int, which: str = "delta") -> torch.Tensor:
        """Activations ``[n_positions, *shape]`` of one pair at its stored positions (``clean``, ``corrupt`` or ``delta``)."""
        if hook not in self.index["hooks"]:
            raise EclensError(f"hook {hook!r} is not in this cache (hooks: {', '.join(self.hooks[:6])}, ...)")
        if which not in ("clean", "corrupt", "delta"):
            raise EclensError(f"which={which!r}: use clean, corrupt or delta")
        c = self.locate(pair)
        f = self._handle(c.shard)

        def read(w):
            return f.get_slice(f"{hook}/{w}")[c.row0:c.row0 + c.n_rows]

        if which == "delta":
            return read("corrupt").float() - read("clean").float()
        return read(which)

    def activation_cache(self, pair: str | int, side: str = "clean", model=None):
        """One sentence (``clean`` or ``corrupt``) of a pair as a ``transformer_lens.ActivationCache``
        (batch of one) for the run's model, so that TL's ``accumulated_resid``, ``decompose_resid``,
        ``logit_attrs``... work on it. Needs a cache written with ``--for-tl``; ``model=None``
        loads the model the cache was written with (once per store)."""
        from . import tl

        if model is None:
            if getattr(self, "_model", None) is None:
                self._model = tl.run_model(self)
            model = self._model
        elif id(model) != getattr(self, "_checked", None):
            tl.check_model(self, model)
            self._checked = id(model)
        return tl.activation_cache(self, pair, side, model)

    def stored_positions(self, pair: str | int) -> range:
        c = self.locate(pair)
        return range(c.pos_start, c.pos_start + c.n_rows)

    def pair_rows(self, k: int) -> list[dict]:
        self._handle(k)
        return self._shard_meta[k]

    def iter_shards(self) -> Iterator[tuple[int, list[AlignedPair], dict[str, torch.Tensor]]]:
        """``(shard index, pairs, tensors)`` one shard at a time (the only one in memory)."""
        size = int(self.index["shard_size"])
        for s in self.index["shards"]:
            k = s["index"]
            f = self._handle(k)
            tensors = {key: f.get_tensor(key) for key in f.keys()}
            yield k, self.pairs[k * size:k * size + s["n_pairs"]], tensors
            self._handles.pop(k, None)

    def close(self) -> None:
        self._handles.clear()


def open_cache(run: str | Path) -> ActivationStore:
    """Open ``RUN/cache`` (or a cache folder itself) for lazy reading."""
    run = Path(run)
    folder = run if (run / INDEX).exists() else run / CACHE_DIR
    ipath = folder / INDEX
    if not ipath.exists():
        raise EclensError(f"{run}: no activation cache here (no {CACHE_DIR}/{INDEX}); run `ec cache` first")
    return ActivationStore(folder, _fold_partials(folder, _read_index(ipath), write=False))


def _read_index(ipath: Path) -> dict:
    try:
        index = json.loads(ipath.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EclensError(f"{ipath}: not valid JSON ({getattr(e, 'msg', e)}); delete the cache folder and rerun "
                          "`ec cache`") from None
    if not isinstance(index, dict) or index.get("format") != 1 or not isinstance(index.get("shards"), list):
        raise EclensError(f"{ipath}: not an eclens cache index (format 1); delete the cache folder and rerun "
                          "`ec cache`")
    return index


def _short(e: Exception) -> str:
    return " ".join(f"{type(e).__name__}: {e}".split())[:200]


def shard_problem(path: Path) -> str | None:
    """Why a cache shard cannot be read (missing, cut short, not a shard), or ``None``: reads only its header."""
    from safetensors import safe_open

    c = check_file(path)
    if c.status == "corrupt":
        return f"corrupt: {c.detail}"
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            json.loads((f.metadata() or {})["pairs"])
            if not {"rows", "pos_start"} <= set(f.keys()):
                return "no rows/pos_start tensors"
    except Exception as e:  # noqa: BLE001 - any failure to read is the answer
        return _short(e)
    return None


def _cached_aliases(store: ActivationStore, groups: list) -> list:
    """The aliases (:mod:`eclens.diff.aliases`) the cache's first shard shows: the two hook points' cached
    activations equal, as a run's probe forward pass finds them."""
    from .diff.aliases import aliases_where_equal

    if not store.index["shards"]:
        return []
    f = store._handle(store.index["shards"][0]["index"])
    keys = set(f.keys())

    def probe(names: list[str]) -> dict[str, torch.Tensor]:
        return {n: torch.cat([f.get_tensor(f"{n}/{w}").flatten() for w in ("clean", "corrupt")]) for n in names
                if f"{n}/clean" in keys and f"{n}/corrupt" in keys}

    return aliases_where_equal(groups, probe)


def diff_from_cache(
    run: str | Path,
    max_offset: int = 3,
    batch_size: int | None = None,
    categories: bool | str = True,
    *,
    include_last: bool = True,
    hooks: Sequence[str] | None = None,
    sample_size: int = 512,
    seed: int = 0,
    progress: bool = False,
    **rule: Any,
):
    """The statistics of :func:`eclens.diff.run_diff`, computed from a cache instead of the model.

    Batches follow the cache's own order and ``batch_size`` (default: the one it was
    written with), so a float32 cache reproduces the streaming numbers exactly.
    """
    from .diff import (
        DiffAccumulator,
        DiffConfig,
        DiffResult,
        anchor_position,
        resolve_categories,
        resolve_cells,
    )
    from .hooks import groups_from_shapes

    store = open_cache(run)
    if not store.complete:
        raise EclensError(f"{store.folder}: the cache is incomplete; rerun `ec cache` to finish it first")
    extra = set(store.index.get("tl_extra_hooks") or [])
    names = list(hooks) if hooks else [n for n in store.hooks if n not in extra]
    missing = [n for n in names if n not in store.hooks]
    if missing:
        raise EclensError(f"hook {missing[0]} is not in the cache; recache with it in --hooks")
    offsets_needed = max_offset > 0 or include_last
    if store.positions == "changed" and offsets_needed:
        raise EclensError(f"{store.folder}: the cache holds only the changed position; use --max-offset 0 "
                          "--no-last, or recache with --positions after")
    by, cats = resolve_categories(store.pairs, categories)
    sample_dtype = rule.pop("sample_dtype", torch.float16)
    cfg = DiffConfig(hooks=names, max_offset=max_offset, include_last=include_last, categories=cats, by_category=by,
                     sample_size=sample_size, seed=seed, **rule)
    cfg.cells = cfg.cells or resolve_cells(store.pairs, cfg)
    shapes = store.shapes
    glist = groups_from_shapes(names, {n: tuple(shapes[n]) for n in names})
    acc = DiffAccumulator(cfg, glist, "cpu", sample_dtype, n_pairs=len(store.pairs), aliases=_cached_aliases(store, glist))
    bs = int(batch_size or store.index.get("batch_size") or 16)
    offs = cfg.offsets
    t0 = time.perf_counter()
    from .progress import progress_bar

    with progress_bar(progress) as pr:
        task = pr.add_task("diff", total=len(store)) if pr is not None else None
        for k, pairs, tensors in store.iter_shards():
            rows_all = tensors["rows"]
            pstart = tensors["pos_start"]
            meta = {r["id"]: r for r in store.pair_rows(k)}
            local = list(range(len(pairs)))
            for s in range(0, len(local), bs):
                idx = local[s:s + bs]
                bp = [pairs[i] for i in idx]
                B = len(bp)
                gather = torch.zeros((B, len(offs)), dtype=torch.long)
                valid = torch.zeros((B, len(offs)), dtype=torch.bool)
                for j, i in enumerate(idx):
                    a = pairs[i]
                    r0, nr, p0 = int(rows_all[i]), int(rows_all[i + 1] - rows_all[i]), int(pstart[i])
                    for o, off in enumerate(offs):
                        t = aligned_position(anchor_position(a, cfg.anchor), a.length, off)
                        ok = t < a.length and p0 <= t < p0 + nr
                        if off < 0 and not (p0 <= t < p0 + nr):
                            raise EclensError(f"{store.folder}: the last token of pair {a.id} is not cached; "
                                              "use --no-last or recache with --positions after")
                        valid[j, o] = ok
                        gather[j, o] = r0 + (min(t, p0 + nr - 1) - p0)
                acts = {}
                for g in acc.groups:  # the layers the state holds (an aliased layer is read once)
                    per_layer = []
                    for n in g.names:
                        c = tensors[f"{n}/clean"]
                        x = tensors[f"{n}/corrupt"]
                        if g.suffix in PATTERN_HOOKS:
                            key = torch.tensor([a.position for a in bp])[:, None, None].expand(B, len(offs), 1)
                            cg = c[gather].gather(-1, key[..., None].expand(B, len(offs), c.shape[1], 1)).squeeze(-1)
                            xg = x[gather].gather(-1, key[..., None].expand(B, len(offs), x.shape[1], 1)).squeeze(-1)
                        else:
                            cg, xg = c[gather], x[gather]
                        per_layer.append(torch.cat([cg, xg]))
                    acts[g.suffix] = torch.stack(per_layer, dim=2)  # [2B, O, L, *rest]
                rows = [{k2: v for k2, v in meta[a.id].items() if k2 not in
                         ("id", "category", "source", "position", "length", "clean_token", "corrupt_token",
                          "cluster", "swap_direction", "detect_position")}
                        for a in bp]
                rows = [_fill_kl(r, a, offs) for r, a in zip(rows, bp)]
                acc.update(bp, acts, valid, rows)
                if pr is not None:
                    pr.update(task, advance=B)
    elapsed = time.perf_counter() - t0
    timing = {"seconds": round(elapsed, 3), "pairs": len(store), "from_cache": str(store.folder),
              "pairs_per_second": round(len(store) / elapsed, 3) if elapsed > 0 else None, "batch_size": bs}
    res: DiffResult = acc.result(store.index.get("model") or {}, timing)
    return res


def _fill_kl(row: dict, a: AlignedPair, offsets: Sequence[int]) -> dict:
    """The cache keeps the full KL list; rebuild the per-offset columns the diff asked for."""
    import math

    kls = json.loads(row["kl"])
    out = {k: v for k, v in row.items() if not (k.startswith("kl_") and k not in ("kl_mean", "kl_max"))}
    head = {k: v for k, v in out.items() if k not in ("kl_mean", "kl_max", "kl")}
    for k in offsets:
        t = aligned_position(a.position, a.length, k)
        head[f"kl_{k}" if k >= 0 else "kl_last"] = kls[t - a.position] if t < a.length else math.nan
    head["kl_mean"] = out["kl_mean"]
    head["kl_max"] = out["kl_max"]
    head["kl"] = out["kl"]
    return head
