"""The analysis steps of a run, each computed, written and recorded once.

Every step takes a run folder, the model, the run's aligned pairs and a config dataclass,
writes its files of ``docs/run-folder.md`` atomically, records itself in the manifest
(:func:`eclens.runs.record_step`, :func:`eclens.runs.record_patch`) and returns a
:class:`StepOutcome`. ``ec diff``, ``ec patch``, ``ec report``, ``ec run``
(:func:`eclens.pipeline.run_pipeline`) and the study in ``experiments/`` all call these,
so a table means the same thing whichever of them wrote it.

Under ``torchrun`` (``ctx``: an :func:`eclens.distributed.init` context) every rank
computes its shard and only rank 0 writes; the other ranks get ``status == "worker"``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .diff import DiffConfig
from .errors import EclensError
from .roles import cluster_of
from .runs import RunData, merge_tensors, prepare_run_pairs, record_patch, write_table


@dataclass
class StepOutcome:
    status: str          # done | empty (nothing to do: recorded as such) | worker (a torchrun rank > 0: wrote nothing)
    files: list[str]
    headline: str
    value: Any = None    # the step's result: the aligned pairs, the DiffResult, the tables ...


def _worker() -> StepOutcome:
    return StepOutcome("worker", [], "")


# ----------------------------------------------------------------------------- pairs


def pairs_step(run: str | Path, model, source: str | Path | None = None, *, n_per_category: int = 25,
               seed: int = 0, fmt: str | None = None, raw: Sequence | None = None,
               manifest: dict | None = None, mode: str = "single") -> StepOutcome:
    """Align the run's pairs under ``model`` and write ``pairs.jsonl``, ``rejected.jsonl``, ``check.csv``.

    ``source``: a pairs file (``raw``: its pairs, if already read), a run folder (its ``pairs.jsonl``), or
    ``None`` for template pairs (``n_per_category``, ``seed``). ``manifest``: further fields to record.
    ``mode``: ``single`` (default) or ``span`` (also pairs that differ in one span of tokens, e.g. misspellings).
    """
    manifest = manifest or {}
    import hashlib
    import json

    from .pairs import check_with_model
    from .runs import save_check

    run = Path(run)
    if source is None:
        from .sources.templates import generate_templates

        raw = generate_templates(model.tokenizer, n_per_category=n_per_category, seed=seed,
                                 prepend_bos=bool(model.cfg.default_prepend_bos))
        blob = "\n".join(json.dumps(p.to_dict(), sort_keys=True, ensure_ascii=False) for p in raw)
        dataset = {"path": f"templates(n_per_category={n_per_category}, seed={seed})",
                   "sha256": hashlib.sha256(blob.encode()).hexdigest()}
        res = check_with_model(raw, model, mode=mode)
        save_check(run, res, dataset["path"], dataset, **manifest)
        aligned = res.valid
    else:
        aligned, res = prepare_run_pairs(model, source, run, fmt, raw=raw, manifest=manifest, mode=mode)
    if res is None:
        return StepOutcome("done", ["pairs.jsonl"], f"{len(aligned)} aligned pairs from {Path(source) / 'pairs.jsonl'}",
                           aligned)
    cats = len({a.category for a in res.valid})
    head = f"{len(res.valid)} valid pairs in {cats} categories, {len(res.rejected)} rejected"
    return StepOutcome("done", ["pairs.jsonl", "rejected.jsonl", "check.csv"], head, res.valid)


def _draw_key(seed: int, key: str) -> int:
    import hashlib

    return int.from_bytes(hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8,
                                          key=f"pairs{seed}".encode()).digest(), "little")


def spread_pairs(pairs: Sequence, n: int | None, seed: int = 0) -> list:
    """``n`` test pairs drawn at random, stratified by category and cluster; ``None``: every pair, in order.

    Categories are taken in turn, in a seeded order (so fewer pairs than categories do not always go to the
    first names of the alphabet); within a category its clusters in turn, so a
    second pair of one cluster comes only after every cluster has given one; the order of clusters and of
    the pairs in a cluster is a draw seeded by ``seed`` (a hash of the seed and the cluster or pair id).
    Never by length: the first study's choice of the shortest pairs made ``p+1`` the final full stop of
    every tested pair. The order depends on the set of pairs, not on their order in the input, so
    ``spread_pairs(spread_pairs(ps, len(ps)), k) == spread_pairs(ps, k)`` (a pairs file written in drawn
    order and cut with ``--max-pairs k`` tests the same pairs).
    """
    from .roles import cluster_of

    if n is None:
        return list(pairs)
    by_cat: dict[str, dict[str, list]] = {}
    for a in pairs:
        by_cat.setdefault(a.category, {}).setdefault(cluster_of(a), []).append(a)
    queues: dict[str, list] = {}
    for cat, clusters in by_cat.items():
        order = sorted(clusters, key=lambda c: (_draw_key(seed, f"c\x1f{c}"), c))
        lists = [sorted(clusters[c], key=lambda a: (_draw_key(seed, f"p\x1f{a.id}"), a.id)) for c in order]
        flat: list = []
        while any(lists):
            for lst in lists:
                if lst:
                    flat.append(lst.pop(0))
        queues[cat] = flat
    out: list = []
    cats = sorted(queues, key=lambda c: (_draw_key(seed, f"k\x1f{c}"), c))
    while len(out) < n and any(queues.values()):
        for cat in cats:
            if queues[cat] and len(out) < n:
                out.append(queues[cat].pop(0))
    return out


# ------------------------------------------------------------------------------ diff


def diff_step(run: str | Path, model, pairs: Sequence, config: DiffConfig | None = None, *, batch_size: int = 16,
              checkpoint_every: int | None = None, ctx=None, progress: bool = True, write_state: bool = True
              ) -> StepOutcome:
    """:func:`eclens.diff.run_diff` over ``pairs`` (resuming the run's checkpoint), its tables written
    (:func:`save_diff`). Under torchrun every rank streams its shard and rank 0 merges and writes.

    ``write_state=False``: the caller deletes ``RUN/state`` once the run completes (``ec run`` and ``ec diff``
    without ``--keep-state``), so the complete state is not written at all (0.87 GB for the default run, as long
    to write as the tables take to compute). A kill while the tables are computed then resumes from the last
    checkpoint, as a kill during the stream does (``checkpoint_every`` batches, or by default
    :data:`eclens.diff.stream.CHECKPOINT_SECONDS` of streaming, at most)."""
    from . import distributed as D
    from .diff import resolve_categories, resolve_cells, run_diff

    run = Path(run)
    cfg = config or DiffConfig()
    if ctx is not None and ctx.active:  # every rank must keep the same category rows, whatever its shard holds
        mode, labels = resolve_categories(pairs, list(cfg.categories) or cfg.by_category)
        cfg = replace(cfg, categories=labels if mode != "none" else [],
                      by_category=cfg.by_category if mode != "none" else "none")
        cfg = replace(cfg, cells=cfg.cells or resolve_cells(pairs, cfg))
        res = run_diff(model, D.shard(pairs, ctx), batch_size=batch_size, run=run / "state" / f"rank{ctx.rank}of{ctx.world_size}",
                       checkpoint_every=checkpoint_every, progress=ctx.is_main, config=cfg)
        res = D.merge_diff(res, ctx)
        if not ctx.is_main:
            return _worker()
    else:
        res = run_diff(model, pairs, batch_size=batch_size, run=run, checkpoint_every=checkpoint_every,
                       progress=progress, config=cfg)
    files = save_diff(run, res, batch_size=batch_size, write_state=write_state, progress=progress)
    s = res.summary
    res.release_arrays()  # the tables are written: the arrays behind them would stay resident through later steps
    nc = s.get("n_candidates") or {}
    con = s.get("contrasts") or {}
    nsig = sum((con.get("n_significant") or {}).values())
    # responsive is judged per swap direction: over all categories, each direction's count
    per_dir = s.get("n_responsive_by_direction") or {}
    resp = (f"{sum(per_dir.values())} responsive (per swap direction)") if len(per_dir) > 1 else \
        f"{nc.get('responsive', 0)} responsive"
    head = (f"{nc.get('stable', 0)} stable and {resp} candidates (all pairs); "
            f"{nsig} significant category contrasts")
    return StepOutcome("done", files, head, res)


def save_diff(run: str | Path, res, *, batch_size: int | None, from_cache: str | None = None,
              manifest: dict | None = None, write_state: bool = True, progress: bool = False) -> list[str]:
    """Write a :class:`~eclens.diff.DiffResult` into ``run`` and record the ``diff`` step (``manifest``:
    further fields to record with it); returns the files. ``write_state``: also write the state
    (:func:`diff_step`); its size is recorded either way, for :func:`eclens.state.finish_state` to say.
    ``progress``: a bar while the tables are computed and written."""
    from .runs import update_manifest

    files = res.save(run, stats=write_state, progress=progress)
    step = res.manifest_step(files, batch_size=batch_size, seconds=res.timing.get("seconds"),
                             from_cache=from_cache, contrast_offsets=res.config.contrast_offsets,
                             state={"written": write_state, "bytes": res.state_bytes()})
    update_manifest(run, **(manifest or {}), steps={"diff": step})
    return files


# ----------------------------------------------------------------------------- exact


@dataclass
class ExactConfig:
    hooks: Sequence[str] | str | None = ("hook_resid_pre", "hook_attn_out", "hook_mlp_out", "hook_resid_post")
    direction: str = "both"              # denoise | noise | both
    heads: bool = False                  # also patch attention heads one at a time
    layers: list[int] | None = None      # None: every layer
    metric: str = "logit_diff"           # ranks the summary's top cells
    batch_size: int = 64
    n_pairs: int | None = None           # None: every pair given; else spread_pairs(pairs, n_pairs, seed)
    seed: int = 0                        # the draw of the test pairs


def exact_step(run: str | Path, model, pairs: Sequence, config: ExactConfig | None = None, *, ctx=None,
               progress: bool = True) -> StepOutcome:
    """Exact patching maps: ``patch_exact.csv``, ``patch_baselines.csv``, ``patch.safetensors``."""
    from . import distributed as D
    from . import patch as P
    from .metrics import METRICS

    run, cfg, t0 = Path(run), config or ExactConfig(), time.perf_counter()
    active = ctx is not None and ctx.active
    all_pairs = spread_pairs(pairs, cfg.n_pairs, cfg.seed)
    mine = D.shard(all_pairs, ctx) if active else all_pairs
    hooks = P.parse_hooks(cfg.hooks, model) if cfg.hooks else []
    df = P.exact_patch(model, mine, hooks=hooks, direction=cfg.direction, heads=cfg.heads, layers=cfg.layers,
                       batch_size=cfg.batch_size, progress=progress and (ctx is None or ctx.is_main))
    base = P.pair_baselines(model, mine)
    if active:  # every pair is patched independently: the ranks' rows, back in pair order
        import pandas as pd

        order = {p.id: i for i, p in enumerate(all_pairs)}
        parts = D.all_gather((df, base), ctx)
        df = pd.concat([d for d, _ in parts], ignore_index=True)
        df = df.iloc[df["pair_id"].map(order).argsort(kind="stable")].reset_index(drop=True)
        base = pd.concat([b for _, b in parts], ignore_index=True)
        base = base.iloc[base["pair_id"].map(order).argsort(kind="stable")].reset_index(drop=True)
        if not ctx.is_main:
            return _worker()
    ids = [a.id for a in all_pairs]
    write_table(df, run / "patch_exact.csv")
    write_table(base, run / "patch_baselines.csv")
    tensors = {}
    for m in METRICS:
        tensors.update(P.exact_tensors(df, ids, model.cfg.n_layers, f"{m}_restored"))
    merge_tensors(run / "patch.safetensors", tensors, {"exact_pair_ids": ids})
    summary = P.exact_summary(df, cfg.metric)
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    files = ["patch_exact.csv", "patch_baselines.csv", "patch.safetensors"]
    _record(run, "exact", {"hooks": hooks, "heads": cfg.heads, "direction": cfg.direction, "metric": cfg.metric,
                           "layers": cfg.layers, "batch_size": cfg.batch_size, "pairs": ids,
                           **_draw_record(cfg.n_pairs, cfg.seed)}, t0, files, summary, ctx)
    top = (summary.get("top") or [{}])[0]
    col = f"{cfg.metric}_restored"
    head = f"maps for {len(ids)} pairs ({len(df)} patched runs)"
    if top and col in top:
        head += (f"; strongest: {top['direction']} {top['hook']} L{top['layer']} at {top['position_kind']} "
                 f"restores {top[col]:.2f}")
    return StepOutcome("done", files, head, df)


def _draw_record(n_pairs: int | None, seed: int) -> dict:
    """How the test pairs were chosen, for the manifest."""
    if n_pairs is None:
        return {"pair_draw": "every pair given"}
    return {"pair_draw": "random, stratified by category then cluster (spread_pairs)", "pair_seed": seed}


def _record(run: Path, mode: str, params: dict, t0: float, files: list[str], summary: dict, ctx) -> None:
    params = {"mode": mode, **params, "world_size": ctx.world_size if ctx is not None else 1}
    record_patch(run, mode, {"params": params, "seconds": round(time.perf_counter() - t0, 2),
                             "files": [*files, "patch_summary.json"]}, summary)


# ------------------------------------------------------------------------------ dims


@dataclass
class DimsConfig:
    method: str = "patch"                # zero | mean | resample | patch
    direction: str = "denoise"           # denoise | noise | both
    metric: str = "logit_diff"           # decides `significant`
    auto_metric: bool = False            # sets after p are judged by kl when metric is logit_diff (dims_metric)
    n_controls: int = 100
    alpha: float = 0.05
    seed: int = 0
    batch_size: int = 64
    n_pairs: int | None = None           # None: every pair given; else spread_pairs over the pairs of each test
    # Per set kind, the test that fits its claim: kind -> (method, direction), instead of method/direction.
    tests: dict[str, tuple[str, str]] | None = None
    record: dict = field(default_factory=dict)  # further parameters to record (how the sets were chosen)
    # Held-out selection (issue 19): the seed of the cluster halves; None: choose and test on the same pairs.
    split: int | None = None
    choose: Callable[[Any], Sequence] | None = None  # under a split: candidates frame of half A -> the sets
    diff: DiffConfig | None = None       # the diff of half A (None: DiffConfig())
    matched: bool = True                 # also controls matched on sigma and the selection statistic
    n_perm: int = 1000                   # label permutations for the interaction p


# A set to test: a DimSet (tested on every pair) or (DimSet, category of the pairs to test it on, None: all).
SetSpec = Any
SetChooser = Callable[[Path], Sequence[SetSpec]]


def dims_metric(sets, metric: str) -> str:
    """``logit_diff`` is read at the changed token, so a patch after it cannot move it; sets
    after ``p`` are judged by the downstream KL, which reads every position from ``p`` on."""
    return metric if metric != "logit_diff" or all(s.offset == 0 for s in sets) else "kl"


def choose_sets(cand, max_sets: int, top_k: int) -> list:
    """``ec run``'s set chooser: the candidate sets worth a causal test, over all pairs: one (hook, layer,
    offset) group per set, groups at the changed token first (offset 0: every metric reads at or after it),
    then the nearest later offsets; within an offset groups with ``top_k`` candidates before
    smaller ones, and the most consistent first —
    stable by the lowest mean ``absz_q90`` of its ``top_k`` best dims, responsive by the
    highest mean ``absz_median`` — alternating kinds so both claims get a test."""
    from .patch import DimSet

    if cand.empty or not {"kind", "hook", "layer", "offset", "dim", "rank"} <= set(cand.columns):
        return []
    pool = cand[cand["category"] == "all"] if "category" in cand.columns else cand
    if "swap_direction" not in pool.columns:
        pool = pool.assign(swap_direction="all")
    ranked: dict[str, list] = {}
    for kind, score, asc in (("stable", "absz_q90", True), ("responsive", "absz_median", False)):
        groups = []
        # one swap direction per set: signed (responsive) candidates exist per direction only, and dims of
        # opposite directions in one set would cancel
        keys = ["hook", "layer", "offset", "swap_direction"]
        for (h, L, off, sd), d in pool[pool["kind"] == kind].groupby(keys, sort=True):
            d = d.sort_values("rank").drop_duplicates("dim").head(top_k)
            val = float(d[score].mean()) if score in d.columns else float(d["rank"].mean())
            off_key = int(off) if int(off) >= 0 else 10**6  # the last token after every p+k
            label = None if sd == "all" else f"{h}/L{int(L)}/o{int(off)}/{kind}[{sd}]/k{len(d)}"
            # full sets of top_k dims before groups with fewer candidates
            groups.append(((off_key, len(d) < top_k, val if asc else -val, str(h), int(L), str(sd)),
                           DimSet(str(h), int(L), d["dim"].astype(int).tolist(), int(off), kind, label)))
        ranked[kind] = [g for _, g in sorted(groups, key=lambda x: x[0])]
    sets: list = []
    while len(sets) < max_sets and any(ranked.values()):
        for kind in ("stable", "responsive"):
            if ranked[kind] and len(sets) < max_sets:
                sets.append(ranked[kind].pop(0))
    return sets


def run_candidates(run: str | Path, max_sets: int, top_k: int) -> list:
    """:func:`choose_sets` over ``RUN/candidates.parquet`` (an empty table: no sets)."""
    import pandas as pd

    from .tables import read_table_file, table_file

    path = table_file(run, "candidates")
    cand = read_table_file(path) if path is not None and path.stat().st_size > 1 else pd.DataFrame()
    return choose_sets(cand, max_sets, top_k)


DIMS_FILES = ("patch_dims.csv", "patch_dims_controls.csv")


def _dims_null(run: Path, cfg: DimsConfig, t0: float, ctx, params: dict, verdict: str, **extra) -> StepOutcome:
    """A dims step with nothing to test: a null verdict recorded, and the tables of earlier sets removed (they
    would describe something this step no longer tests)."""
    for f in DIMS_FILES:
        (run / f).unlink(missing_ok=True)
    summary = {"metric": cfg.metric, "n_sets": 0, "n_tests": 0, "n_significant": 0, **extra, "verdict": verdict}
    _record(run, "dims", params, t0, [], summary, ctx)
    return StepOutcome("empty", [], verdict, None)


def dims_step(run: str | Path, model, pairs: Sequence, sets: Sequence[SetSpec] | SetChooser,
              config: DimsConfig | None = None, *, ctx=None, progress: bool = True,
              log: Callable[[str], None] | None = None) -> StepOutcome:
    """Each dimension set against random sets of the same size at its hook, layer and position:
    ``patch_dims.csv``, ``patch_dims_controls.csv``.

    ``sets``: the sets (:data:`SetSpec`), or a chooser called with the run folder. Sets that share a test
    (method, direction) and their pairs share one :func:`eclens.patch.dims_interventions` call (seeded
    ``seed + i`` for the ``i``-th call); with per-kind ``tests`` or per-category pairs, each row also says
    which pairs (``pairs_category``) and which metric (``decided_by``) decided it.
    """
    import pandas as pd

    from . import patch as P
    from .diff.config import direction_label
    from .roles import is_error_of, role_of, twin_of
    from .selection import halves, run_stats, select_half, set_cells, set_direction

    run, cfg, t0 = Path(run), config or DimsConfig(), time.perf_counter()
    test_pool, split_info, stats = list(pairs), {}, {}
    if cfg.split is not None and (callable(sets) or not sets):
        # choose on half A's clusters, test on half B's (a diff of half A: see eclens.selection's seam)
        half_a, half_b = halves(pairs, cfg.split)
        n_a, n_b = (sum(is_error_of(a) for a in h) for h in (half_a, half_b))
        if not n_a or not n_b:
            return _dims_null(run, cfg, t0, ctx, {**cfg.record, "split": cfg.split},
                              f"null: --split {cfg.split} leaves {n_a} error pairs to choose on and {n_b} to test "
                              "on; nothing to test (use more pairs or clusters)",
                              split={"split": cfg.split, "n_select_pairs": n_a, "n_test_pairs": n_b})
        # A second diff of half A's *error* pairs. The run's own per-half state rows (DiffResult.for_half) cannot
        # stand in: they are kept per category and swap direction, not per role, so their "all" rows pool half
        # A's twins and meaning changes with its errors (and ranking every category's rows cost ~800 s and 5 GB
        # on the default run, against ~150 s for this diff).
        sel = select_half(model, half_a, cfg.diff, progress=progress)
        how = "diff of half A's error pairs"
        if log is not None:
            log(f"      candidates chosen on half A: {how}")
        cand = sel.candidates
        chosen = cfg.choose(cand) if cfg.choose is not None else choose_sets(cand, 2, 10)
        stats = set_cells(sel.dims_for("all"), [s if isinstance(s, P.DimSet) else s[0] for s in chosen])
        test_pool = half_b
        split_info = {"split": cfg.split, "selection": how,
                      "n_select_pairs": sum(is_error_of(a) for a in half_a),
                      "n_select_clusters": len({cluster_of(a) for a in half_a}),
                      "n_test_clusters": len({cluster_of(a) for a in half_b})}
    else:
        chosen = sets(run) if callable(sets) else sets
        if cfg.matched:
            stats = run_stats(run, [s if isinstance(s, P.DimSet) else s[0] for s in chosen])
        if cfg.split is not None:
            split_info = {"split": cfg.split, "selection": "sets given by hand: tested on every pair"}
    specs = [(s, None) if isinstance(s, P.DimSet) else (s[0], s[1]) for s in chosen]
    files = list(DIMS_FILES)
    if not specs:
        return _dims_null(run, cfg, t0, ctx, {**cfg.record, **split_info},
                          "null: diff found no candidate dimensions over "
                          + ("half A's error pairs" if split_info else "all pairs") + ", so there is nothing to test",
                          **({"split": split_info} if split_info else {}))
    calls: dict[tuple, list] = {}
    for s, cat in specs:
        method, direction = (cfg.tests or {}).get(s.kind, (cfg.method, cfg.direction)) if cfg.tests else \
            (cfg.method, cfg.direction)
        # a set chosen on one swap direction's pairs is tested on (held-out) pairs of that direction only; a set
        # given with its category (the study's per-category sets) is tested on that category's pairs
        calls.setdefault((method, direction, cat, set_direction(s) if cat is None else None), []).append(s)
    tagged = cfg.tests is not None or any(cat is not None for _, cat in specs)
    by_swap = any(k[3] is not None for k in calls)
    tables, controls, used, metrics, skipped = [], [], {}, [], []
    for i, ((method, direction, cat, swap), ss) in enumerate(calls.items()):
        pool = [a for a in test_pool if (cat is None or a.category == cat) and is_error_of(a)
                and (swap is None or direction_label(a) == swap)]  # "none": pairs whose record names none
        if not pool and (cat is not None or swap is not None) and (len(calls) > 1 or swap is not None):
            # one category's (or swap direction's) sets without error pairs to test them on (e.g. its errors
            # were all span pairs): the other tests still stand; the summary lists what was skipped
            what = " ".join(x for x in (cat, f"[{swap}]" if swap else None) if x)
            skipped.append(what)
            if log is not None:
                log(f"      no error pairs to test in {what}; its sets are skipped")
            continue
        if not pool:
            raise EclensError(f"no error pairs to test{' in category ' + cat if cat else ''}"
                              + (f" in the test half of --split {cfg.split}; use more pairs" if split_info else ""))
        chosen_pairs = spread_pairs(pool, cfg.n_pairs, cfg.seed)
        m = dims_metric(ss, cfg.metric) if cfg.auto_metric else cfg.metric
        if m != cfg.metric and log is not None:
            log(f"      no {cfg.metric}-visible candidates at the changed token; judging sets after it by {m}")
        ids = {a.id for a in chosen_pairs}
        twins = [a for a in test_pool if role_of(a) == "twin" and twin_of(a) in ids]
        # under torchrun every rank runs its shard and gets the whole result (causal_test's ``dist``)
        res = P.causal_test(model, chosen_pairs, ss, twins=twins, stats=stats if cfg.matched else None,
                            method=method, direction=direction, metric=m, n_controls=cfg.n_controls,
                            seed=cfg.seed + i, alpha=cfg.alpha, n_perm=cfg.n_perm, batch_size=cfg.batch_size,
                            progress=progress and (ctx is None or ctx.is_main), dist=ctx)
        if ctx is not None and not ctx.is_main:
            continue
        t = res.table.assign(pairs_category=cat or "all", decided_by=m) if tagged else res.table
        if by_swap:  # which pairs tested the set: its own swap direction's, or every direction's
            t = t.assign(pairs_swap_direction=swap or "all")
        tables.append(t)
        controls.append(res.controls)
        metrics.append(m)
        used[f"{method}:{direction}:{cat or 'all'}" + (f"[{swap}]" if swap else "")] = [a.id for a in chosen_pairs]
    if ctx is not None and not ctx.is_main:
        return _worker()
    if not tables and skipped:  # e.g. sets chosen on a direction only comparison (meaning) pairs have
        return _dims_null(run, cfg, t0, ctx, {**cfg.record, **split_info},
                          "null: no error pairs to test the chosen sets on (" + ", ".join(skipped) + ")",
                          n_sets=len(specs), skipped_categories=skipped, **({"split": split_info} if split_info else {}))
    if not tables:
        raise EclensError("no error pairs to test in any category" + (f" in the test half of --split {cfg.split}"
                                                                       if split_info else "") + "; use more pairs")
    table = pd.concat(tables, ignore_index=True) if len(tables) > 1 else tables[0]
    write_table(table, run / files[0])
    write_table(pd.concat(controls, ignore_index=True) if len(controls) > 1 else controls[0], run / files[1])
    n_sig = int(table["significant"].sum())
    m = metrics[0] if len(set(metrics)) == 1 else "/".join(dict.fromkeys(metrics))
    q = f"BH q < {cfg.alpha}" + (" per call" if len(calls) > 1 else "")
    # The verdict names the metric when the step chose it (auto_metric), the pair count when it chose the pairs.
    on = f" on {m}" if cfg.auto_metric else ""
    methods = list(dict.fromkeys(k[0] for k in calls))
    summary = {
        "method": methods[0] if len(methods) == 1 else " / ".join(f"{v[0]} ({k})" for k, v in cfg.tests.items()),
        "metric": m, "alpha": cfg.alpha, "n_controls": cfg.n_controls, "n_sets": len(specs),
        "n_tests": int(len(table)), "n_significant": n_sig,
        "verdict": (f"{n_sig} of {len(table)} set tests beat their random controls{on} ({q})" if n_sig else
                    f"null: no set beats its random controls{on} at {q} ({len(table)} tests)"),
    }
    if skipped:
        summary["skipped_categories"] = skipped
    if cfg.n_pairs is not None:
        summary["n_pairs"] = len(next(iter(used.values()))) if len(used) == 1 else {k: len(v) for k, v in used.items()}
    if len(set(metrics)) == 1:
        extra = [c for c in (f"{m}_p_matched", f"{m}_q_matched", "match_sigma", "match_stat", f"{m}_sees",
                             "interaction", "interaction_low", "interaction_high", "interaction_p",
                             "pairs_swap_direction")
                 if c in table.columns]
        summary["sets"] = table[["set", "direction", "n_pairs", f"{m}_effect", f"{m}_control_mean", f"{m}_z",
                                 f"{m}_p", f"{m}_q", *extra, "verdict"]].to_dict(orient="records")
    if split_info:
        summary["split"] = split_info
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    params = {"ablation": summary["method"], "metric": m, "n_controls": cfg.n_controls, "alpha": cfg.alpha,
              "seed": cfg.seed, "sets": [s.label for s, _ in specs],
              "pairs": next(iter(used.values())) if len(used) == 1 else used, **_draw_record(cfg.n_pairs, cfg.seed),
              **cfg.record}
    if cfg.tests:
        params["tests"] = {k: list(v) for k, v in cfg.tests.items()}
    else:
        params["direction"] = cfg.direction
    params.update(split_info or {"split": None})
    params["controls"] = "uniform + matched (sigma, selection statistic)" if cfg.matched else "uniform"
    _record(run, "dims", params, t0, files, summary, ctx)
    return StepOutcome("done", files, summary["verdict"], table)


# ------------------------------------------------------------------------ attribution


@dataclass
class AttributionConfig:
    hooks: Sequence[str] | str | None = ("hook_resid_pre", "hook_attn_out", "hook_mlp_out", "hook_resid_post")
    heads: bool = False
    direction: str = "denoise"
    metric: str = "logit_diff"
    verify_top: int = 0                  # exact-patch the top K (+K random) components per pair
    seed: int = 0
    batch_size: int = 64                 # patched copies per forward pass in the verification
    n_pairs: int | None = None           # None: every pair given; else spread_pairs(pairs, n_pairs)


def attribution_step(run: str | Path, model, pairs: Sequence, config: AttributionConfig | None = None, *,
                     progress: bool = True) -> StepOutcome:
    """Attribution patching (gradient x activation difference), top components verified by exact
    patching: ``patch_attribution.csv`` and ``attribution_dims/*`` in ``patch.safetensors``."""
    from . import patch as P

    run, cfg, t0 = Path(run), config or AttributionConfig(), time.perf_counter()
    chosen = spread_pairs(pairs, cfg.n_pairs, cfg.seed)
    # The pairs the exact step swept in full join the draw, so attribution is also checked against every
    # component's exact effect there, not only inside the top it chose itself.
    exact = RunData(run).patch_exact if run.is_dir() else None
    swept = set(exact["pair_id"].astype(str)) if exact is not None and len(exact) else set()
    have = {a.id for a in chosen}
    chosen = chosen + [a for a in pairs if a.id in swept and a.id not in have]
    hooks = P.parse_hooks(cfg.hooks, model) if cfg.hooks else []
    df, dim_scores = P.attribution_patch(model, chosen, hooks=hooks, heads=cfg.heads, direction=cfg.direction,
                                         metric=cfg.metric, verify_top=cfg.verify_top, seed=cfg.seed,
                                         exact_batch_size=cfg.batch_size, progress=progress, return_dims=True)
    write_table(df, run / "patch_attribution.csv")
    ids = [a.id for a in chosen]
    merge_tensors(run / "patch.safetensors", {f"attribution_dims/{k}": v for k, v in dim_scores.items()},
                  {"attribution_pair_ids": ids})
    summary = P.attribution_summary(df, cfg.verify_top or None)
    files = ["patch_attribution.csv", "patch.safetensors"]
    k = 10
    check = P.sweep_agreement(df, exact if exact is not None else df.iloc[0:0], cfg.metric, k)
    if len(check):
        write_table(check, run / "patch_attribution_check.csv")
        files.append("patch_attribution_check.csv")
        top = check[check["scope"] == "all"].iloc[0]
        summary["sweep"] = {"n_pairs": int(top["n_pairs"]), "n_components": int(top["n_components"]),
                            "spearman": top["spearman"], "spearman_median_pair": top["spearman_median_pair"],
                            "topk_recall": top[f"top{k}_recall"], "k": k,
                            "by_position": {r.position_kind: r.spearman for r in check.itertuples()
                                            if r.scope == "position"}}
    summary.update(metric=cfg.metric, verify_top=cfg.verify_top, seconds=round(time.perf_counter() - t0, 2))
    _record(run, "attribution", {"hooks": hooks, "heads": cfg.heads, "direction": cfg.direction,
                                 "metric": cfg.metric, "verify_top": cfg.verify_top, "seed": cfg.seed,
                                 "batch_size": cfg.batch_size, "pairs": ids, **_draw_record(cfg.n_pairs, cfg.seed)},
            t0, files, summary, None)
    rho = summary.get("spearman")
    head = f"{len(df)} components scored on {len(chosen)} pairs"
    if rho is not None:
        head += f"; Spearman with exact patching {rho:.2f} over {summary['n_verified']} verified"
    sw = summary.get("sweep")
    if sw:
        def f2(v):
            return "n/a" if v is None or v != v else f"{v:.2f}"
        head += (f"; against the full exact sweep of {sw['n_pairs']} pairs: Spearman {f2(sw['spearman'])}, "
                 f"top-{sw['k']} recall {f2(sw['topk_recall'])} over {sw['n_components']} visible components")
    return StepOutcome("done", files, head, df)


# ------------------------------------------------------------------------------ skip


@dataclass
class SkipStepConfig:
    layers: list[int] | None = None      # None: every layer
    components: tuple[str, ...] = ("block", "attn", "mlp")
    n_pairs: int | None = None           # error pairs drawn (spread_pairs); their twins come with them
    seed: int = 0
    break_kl: float = 1.0                # nats: median clean-run KL above which a skip is excluded
    min_clusters: int = 8                # clusters with an error and its twin needed for a verdict
    exchange: bool = True                # also layer exchange (error run <- twin run, per layer)
    batch_size: int = 64


def skip_step(run: str | Path, model, pairs: Sequence, config: SkipStepConfig | None = None, *,
              progress: bool = True) -> StepOutcome:
    """Layer skipping (and exchange where pairs have twins): ``patch_skip.csv`` (one row per layer and
    component), ``patch_skip_pairs.csv`` (per pair), ``patch_exchange.csv``."""
    from . import patch as P
    from .roles import is_error_of, role_of, twin_of

    run, cfg, t0 = Path(run), config or SkipStepConfig(), time.perf_counter()
    errors = [a for a in pairs if is_error_of(a)]  # 2x2 error cells are error pairs too
    chosen = spread_pairs(errors, cfg.n_pairs, cfg.seed)
    ids = {a.id for a in chosen}
    twins = [a for a in pairs if role_of(a) == "twin" and twin_of(a) in ids]
    tested = chosen + twins
    scfg = P.SkipConfig(layers=tuple(cfg.layers) if cfg.layers is not None else None,
                        components=tuple(cfg.components), batch_size=cfg.batch_size, break_kl=cfg.break_kl,
                        min_clusters=cfg.min_clusters)
    res = P.layer_skip(model, tested, scfg, progress=progress)
    write_table(res.table, run / "patch_skip.csv")
    write_table(res.per_pair, run / "patch_skip_pairs.csv")
    files = ["patch_skip.csv", "patch_skip_pairs.csv"]
    summary = dict(res.summary)
    if cfg.exchange and twins:
        ex = P.layer_exchange(model, tested, cfg.layers, batch_size=cfg.batch_size)
        write_table(ex, run / "patch_exchange.csv")
        files.append("patch_exchange.csv")
        summary["exchange_moved_median"] = {f"L{L}/{c}": float(g["moved"].median())
                                            for (L, c), g in ex.groupby(["layer", "component"])}
    elif not twins:
        summary["note"] = "no twins among the pairs: skip effects per role only, no error-vs-twin comparison"
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    _record(run, "skip", {"layers": cfg.layers, "components": list(cfg.components), "break_kl": cfg.break_kl,
                          "pairs": [a.id for a in tested], **_draw_record(cfg.n_pairs, cfg.seed)},
            t0, files, summary, None)
    spec = summary["error_specific"]
    head = (f"{len(res.table)} skips on {len(chosen)} error pairs and {len(twins)} twins; "
            f"{len(summary['excluded'])} excluded (break the clean run); "
            + (f"error-specific recovery: {', '.join(spec)}" if spec else "null: no layer helps errors more than twins"))
    return StepOutcome("done", files, head, res)


# ---------------------------------------------------------------------------- report


def report_step(run: str | Path, model=None, *, n_examples: int = 4, out: str | Path | None = None,
                layer: int | None = None, pair_views: bool = True, compress: bool = True) -> StepOutcome:
    """``report.html`` (or ``out``): every table and figure of the run in one self-contained file
    (:func:`eclens.report.build_report`)."""
    from .report import build_report

    path = build_report(run, out, model=model, n_examples=n_examples, layer=layer, pair_views=pair_views,
                        compress=compress)
    return StepOutcome("done", [path.name], f"{path} ({path.stat().st_size / 1e6:.1f} MB)", path)


__all__ = ["SkipStepConfig", "skip_step", "StepOutcome", "pairs_step", "diff_step", "save_diff", "exact_step", "dims_step", "attribution_step",
           "report_step", "ExactConfig", "DimsConfig", "AttributionConfig", "choose_sets", "run_candidates",
           "dims_metric", "spread_pairs"]
