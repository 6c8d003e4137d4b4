"""The streaming loop of ``ec diff``: :func:`run_diff` (checkpointed, resumable, interruptible)."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import EclensError
from ..hooks import (
    expand_hook_spec,
    hook_groups,
    iter_batches,
    packs_logits,
    pad_id,
    probe_activations,
    select_hooks,
)
from ..model import model_device
from ..pairs import AlignedPair
from ..progress import progress_bar
from .accumulate import DiffAccumulator
from .aliases import Alias, find_aliases
from .config import STATS_FILE, DiffConfig, resolve_categories, resolve_cells
from .gather import Gatherer, pair_index
from .logprobs import packed_rows, pair_metric_tensors, span_rows
from .result import DiffResult
from .stats_io import load_stats, save_stats

# Without checkpoint_every, a checkpoint once the stream has run this long since the last one. A checkpoint
# writes the whole state (0.87 GB for SmolLM2's default hooks, ~7-9 GB for Llama-3-8B's): every 50 batches
# that was a few percent of a CPU run and could be a third of a GPU run. Ctrl-C and SIGTERM lose nothing
# (a checkpoint at the next batch boundary); only a hard kill loses up to this much streaming.
CHECKPOINT_SECONDS = 300.0


class _Interrupt:
    """The first Ctrl-C or SIGTERM stops the loop at the next batch boundary (after a checkpoint); a second
    aborts."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested = False
        self._old: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            def handler(sig, frame):
                if self.requested:
                    raise KeyboardInterrupt
                self.requested = True

            for sig in self.SIGNALS:
                self._old[sig] = signal.getsignal(sig)
                signal.signal(sig, handler)
        return self

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False


_SETUP_FIELDS = ("hooks", "max_offset", "include_last", "categories", "by_category", "sample_size", "seed")


def run_diff(
    model,
    aligned_pairs: Sequence[AlignedPair],
    hooks: str | Sequence[str] | None = None,
    max_offset: int = 3,
    batch_size: int = 16,
    categories: bool | str = True,
    *,
    include_last: bool = True,
    sample_size: int = 512,
    seed: int = 0,
    run: str | Path | None = None,
    checkpoint_every: int | None = None,
    progress: bool = False,
    max_batches: int | None = None,
    config: DiffConfig | None = None,
    **rule: Any,
) -> DiffResult:
    """Stream the pairs through ``model`` and return the statistics (see the module docstring).

    ``categories``: ``True``/``"full"`` (each category), ``"top"`` (first path
    component), ``False``/``"none"`` (only ``all``), or the list of category labels
    (so that shards of one dataset, run separately, can be merged with :func:`merge_results`). ``run``: a folder to
    checkpoint into every ``checkpoint_every`` batches (None: once :data:`CHECKPOINT_SECONDS` of streaming have
    passed since the last checkpoint) and to resume from (the caller writes the tables with :meth:`DiffResult.save`). ``max_batches`` stops
    after that many batches (leaving a resumable checkpoint); ``rule`` overrides the
    candidate-rule fields of :class:`DiffConfig` (``threshold``, ``stable_frac``, ...).
    ``config``: a :class:`DiffConfig` that gives all of these at once (then ``hooks``, ``max_offset``,
    ``categories``, ``include_last``, ``sample_size``, ``seed`` and ``rule`` are taken from it).
    """
    if config is not None:
        if set(rule) - {"sample_dtype", "host_sample"}:
            raise TypeError("run_diff(): give the candidate rule in config or as keywords, not both")
        hooks, max_offset, include_last = config.hooks, config.max_offset, config.include_last
        sample_size, seed = config.sample_size, config.seed
        categories = list(config.categories) or config.by_category
        rule = {**{f: getattr(config, f) for f in DiffConfig.__dataclass_fields__ if f not in _SETUP_FIELDS}, **rule}
    if not aligned_pairs:
        raise EclensError("no valid pairs to diff")
    ids = [a.id for a in aligned_pairs]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise EclensError(f"duplicate pair id {dup!r}; give each pair its own id")
    names = select_hooks(model, expand_hook_spec(hooks))
    acts = probe_activations(model, names)  # one pass: the shapes, and the tensors the aliases compare
    groups = hook_groups(model, names, acts)
    by, cats = resolve_categories(aligned_pairs, categories)
    unknown = set(rule) - {f for f in DiffConfig.__dataclass_fields__} - {"sample_dtype", "host_sample"}
    if unknown:
        raise TypeError(f"run_diff() got unexpected keyword(s): {', '.join(sorted(unknown))}")
    sample_dtype = rule.pop("sample_dtype", torch.float16)
    host_sample = rule.pop("host_sample", None)
    cells = rule.pop("cells", None) or []
    cfg = DiffConfig(hooks=names, max_offset=max_offset, include_last=include_last, categories=cats, by_category=by,
                     sample_size=sample_size, seed=seed, **rule)
    cfg.cells = cells or resolve_cells(aligned_pairs, cfg)
    if max_offset < 0:
        raise EclensError("--max-offset must be 0 or more")
    device = model_device(model)
    from ..model import manifest_model_entry

    ckpt = load_stats(Path(run), device) if run is not None and (Path(run) / STATS_FILE).exists() else None
    # a checkpoint keeps the layout it was made with (one made before aliases holds every layer)
    aliases = [Alias.from_dict(d) for d in ckpt[1].get("aliases", [])] if ckpt else find_aliases(model, groups, acts)
    del acts  # on a GPU, a few MB of probe activations the run does not need
    acc = DiffAccumulator(cfg, groups, device, sample_dtype, n_pairs=len(aligned_pairs), host_sample=host_sample,
                          aliases=aliases)
    acc.model_entry = manifest_model_entry(model)
    if ckpt:
        _resume(acc, *ckpt, Path(run), cfg, set(ids))
    todo = [a for a in aligned_pairs if a.id not in acc.done]
    t0 = time.perf_counter()
    n_done0 = len(acc.done)
    # the layers the state holds (an aliased layer is read once), and logits only where the metrics read them
    gat = Gatherer(acc.groups, device, pack_logits=packs_logits(model))
    pid = pad_id(model)
    n_batches = 0
    complete = not todo
    prog = progress_bar(progress and bool(todo))
    last_save = time.perf_counter()
    with prog as pr, _Interrupt() as intr, torch.inference_mode(), model.hooks(fwd_hooks=gat.hooks()):
        task = pr.add_task("diff", total=len(aligned_pairs), completed=n_done0) if pr is not None else None
        for batch in iter_batches(todo, batch_size, pid, device):
            feed_batch(model, gat, acc, batch)
            n_batches += 1
            if task is not None:
                pr.update(task, advance=batch.size)
            finished = len(acc.done) == len(aligned_pairs)
            stop = intr.requested or (max_batches is not None and n_batches >= max_batches)
            due = (n_batches % checkpoint_every == 0) if checkpoint_every else \
                time.perf_counter() - last_save >= CHECKPOINT_SECONDS
            if run is not None and not finished and (stop or due):
                save_stats(Path(run), {k: v for k, v in acc.state_dict().items()}, acc.meta(complete=False))
                last_save = time.perf_counter()
            if intr.requested:
                raise KeyboardInterrupt
            if stop:
                break
        complete = len(acc.done) == len(aligned_pairs)
    elapsed = time.perf_counter() - t0
    n_new = len(acc.done) - n_done0
    timing = {"seconds": round(elapsed, 3), "pairs": n_new, "pairs_per_second": round(n_new / elapsed, 3)
              if elapsed > 0 and n_new else None, "batch_size": batch_size, "resumed_from": n_done0}
    if not complete and run is not None:
        save_stats(Path(run), acc.state_dict(), acc.meta(complete=False))
    return acc.result(None, timing, complete=complete)


def feed_batch(model, gat: Gatherer, acc: DiffAccumulator, batch) -> None:
    """One batch of :func:`run_diff`'s stream into ``acc``: the forward pass with ``gat``'s hooks registered by
    the caller (inside inference mode), the aligned activations and the pairs' log-probs and KL."""
    cfg = acc.cfg
    # each side read from its own span end (the same positions for single-token pairs)
    ix = pair_index(batch.pairs, cfg.offsets, acc.device, batch.tokens.shape[1], anchor=cfg.anchor)
    gat.index = ix
    spans, lengths = span_rows(batch.pairs), [a.length for a in batch.pairs]
    idx, first = packed_rows(spans, lengths, batch.tokens.shape[1])  # the logits' rows the metrics read
    idx = idx.to(acc.device, non_blocking=True)
    if gat.pack_logits:
        gat.logit_rows = idx
    logits = model(batch.tokens)
    acts = gat.collect()
    rows = pair_metric_tensors(logits, batch.tokens, [a.position for a in batch.pairs], lengths, spans=spans,
                               packed=gat.pack_logits, index=(idx, first))
    del logits
    acc.update(batch.pairs, acts, ix.valid, rows, ix.valid_cpu)


def _resume(acc: DiffAccumulator, tensors: dict[str, torch.Tensor], meta: dict, run: Path, cfg: DiffConfig,
            ids: set[str]) -> None:
    m, me = meta.get("model") or {}, acc.model_entry
    if m and (m.get("name") != me.get("name") or m.get("weights_hash") != me.get("weights_hash")):
        raise EclensError(f"{run / STATS_FILE}: made with model {m.get('name')!r} (weights "
                          f"{str(m.get('weights_hash'))[:12]}), not {me.get('name')!r}; use another --out folder")
    old = DiffConfig(**meta["config"])
    if old.numbers_key() != cfg.numbers_key():
        diff = [k for k, v in cfg.numbers_key().items() if old.numbers_key().get(k) != v]
        raise EclensError(f"{run / STATS_FILE}: made with other settings ({', '.join(diff)}); rerun with the same "
                          "options, or use another --out folder")
    extra = set(meta["done"]) - ids
    if extra:
        raise EclensError(f"{run / STATS_FILE}: holds {len(extra)} pair(s) not in this dataset (e.g. "
                          f"{sorted(extra)[0]!r}); use another --out folder")
    acc.load(tensors, meta)


def stream_batches(pairs: Sequence[AlignedPair], batch_size: int, model) -> Iterable:
    """The batches ``run_diff`` uses (sorted by length), for callers that drive their own loop."""
    return iter_batches(pairs, batch_size, pad_id(model), model_device(model))
