"""``ec diff`` and ``ec cache``."""

from __future__ import annotations

import time
from pathlib import Path

import typer
from rich.table import Table

from ._common import (
    DeviceMapOpt,
    DeviceOpt,
    DtypeOpt,
    Load4Opt,
    Load8Opt,
    ModelOpt,
    aligned_pairs,
    console,
    load,
    out,
    preflight_pairs,
)

app = typer.Typer()  # its commands are registered on `ec` by eclens.cli

HooksOpt = typer.Option(None, "--hooks", help="default (resid_pre, attn_out, resid_mid, mlp_out, resid_post), all, "
                        "or comma-separated names/globs, e.g. 'default,mlp.hook_post,attn.hook_z'")
OutOpt = typer.Option(None, "--out", "-o", help="run folder (default: PAIRS if it is a run folder, else runs/<name>)")
BatchOpt = typer.Option(16, "--batch-size", "-b", help="pairs per forward pass (2x sentences)")
FormatOpt = typer.Option(None, "--format", help="pairs file format: jsonl, csv or json (default: by suffix)")


def _run_folder(pairs: Path | None, out_dir: Path | None) -> Path:
    if out_dir is not None:
        return out_dir
    if pairs is not None and pairs.is_dir():
        return pairs
    if pairs is None:
        raise typer.BadParameter("give --out")
    return Path("runs") / pairs.stem


def _say_check(res) -> None:
    from .pairs import print_check

    print_check(res, show=3)


def _model_entry(run: Path, m) -> dict:
    """The model's manifest entry, after refusing a run folder made with another model."""
    from ..model import manifest_model_entry
    from ..runs import check_manifest_model

    entry = manifest_model_entry(m)
    check_manifest_model(run, entry["name"], entry["weights_hash"])
    return entry


def _open_pairs_run(pairs: Path, raw, out_dir: Path | None, fmt, model: str, device: str, dtype: str, device_map,
                    load_in_8bit: bool, load_in_4bit: bool, mode: str = "single"):
    """What `ec diff` and `ec cache` do before their pass, once the caller has checked the pairs file
    (``raw``: :func:`check_pairs_file`'s result, before its own heavy imports): join torchrun, lock the run
    folder, load the model and align the pairs once. Returns (ctx, run, model, manifest entry, pairs)."""
    from .. import distributed as D

    ctx = D.init(device)  # under torchrun: this process's rank and the world size
    device = D.local_device(device, ctx)
    run = _run_folder(pairs, out_dir)
    from ..lock import lock_run

    lock_run(run)  # before the model loads, so a second writer is refused at once
    m = load(model, device, dtype, device_map, load_in_8bit, load_in_4bit)
    entry = _model_entry(run, m)
    aligned = aligned_pairs(m, pairs, run, ctx, fmt=fmt, raw=raw, say=_say_check,
                            manifest={"model": entry, "world_size": ctx.world_size}, mode=mode)
    return ctx, run, m, entry, aligned


def check_pairs_file(pairs: Path, fmt):
    """The raw pairs of a pairs file (None for a run folder), or its one-line error: before the model loads
    and before torch is imported, so a bad file fails in about a second."""
    if not pairs.exists():
        from ..errors import EclensError

        raise EclensError(f"{pairs}: no such file or folder")
    return preflight_pairs(pairs, fmt)


@app.command("diff")
def diff(
    pairs: Path = typer.Argument(None, help="a pairs file (.jsonl/.csv/.json) or a run folder holding pairs.jsonl"),
    model: str = ModelOpt,
    out_dir: Path = OutOpt,
    hooks: str = HooksOpt,
    max_offset: int = typer.Option(3, "--max-offset", "-k", help="offsets p+1..p+K after the changed token"),
    last: bool = typer.Option(True, "--last/--no-last", help="also compare the last token"),
    batch_size: int = BatchOpt,
    by_category: str = typer.Option("full", "--by-category", help="full (each category), top (first path "
                                    "component, e.g. grammar) or none"),
    sample_size: int = typer.Option(512, "--sample", help="pairs kept for quantiles, cosines and contrasts"),
    threshold: float = typer.Option(0.1, "--threshold", help="'small' normalised change |Δ|/σ for frac_under"),
    stable_frac: float = typer.Option(0.9, "--stable-frac", help="stable: fraction of pairs under the threshold"),
    responsive_z: float = typer.Option(1.0, "--responsive-z", help="responsive: median |Δ|/σ at least this"),
    responsive_sign: float = typer.Option(0.8, "--responsive-sign", help="responsive: sign consistency at least"),
    checkpoint_every: int = typer.Option(None, "--checkpoint-every", min=1, help="save a resumable checkpoint every N "
                                         "batches (default: every 5 minutes of streaming; Ctrl-C and SIGTERM "
                                         "always save one)"),
    anchor: str = typer.Option("p", "--anchor", help="where offset 0 sits: p (the changed token) or detect (where the "
                               "error becomes detectable; p for pairs without a detect word)"),
    from_cache: Path = typer.Option(None, "--from-cache", help="compute from a run's activation cache (ec cache) "
                                    "instead of the model"),
    fmt: str = FormatOpt,
    seed: int = typer.Option(0, "--seed", help="seed of the pair sample"),
    span: bool = typer.Option(False, "--span", help="align in span mode: also pairs that differ in one span of "
                              "tokens (misspellings), read from each sentence's own span end"),
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    device_map: str = DeviceMapOpt,
    load_in_8bit: bool = Load8Opt,
    load_in_4bit: bool = Load4Opt,
    keep_state: bool = typer.Option(False, "--keep-state", help="keep RUN/state (the accumulators, which only a "
                                    "resume or a merge reads) once the diff completes"),
) -> None:
    """Stream position-aligned, normalised activation differences; write layers, dims, candidates, contrasts, sensitivity."""
    raw = check_pairs_file(pairs, fmt) if pairs is not None and from_cache is None else None
    from ..diff import STATS_FILE, DiffConfig
    from ..state import finish_state
    from ..steps import diff_step, save_diff

    if anchor not in ("p", "detect"):
        raise typer.BadParameter(f"--anchor must be p or detect, got {anchor!r}")
    rule = dict(threshold=threshold, stable_frac=stable_frac, responsive_z=responsive_z,
                responsive_sign=responsive_sign, anchor=anchor)
    if from_cache is not None:
        from ..cache import diff_from_cache, open_cache

        run = out_dir or from_cache
        store = open_cache(from_cache)
        console.print(f"computing from {store!r}")
        res = diff_from_cache(from_cache, max_offset=max_offset, include_last=last, categories=by_category,
                              sample_size=sample_size, seed=seed, progress=True, **rule)
        model_entry = store.index.get("model") or {}
        if run.resolve() != from_cache.resolve():
            from ..runs import check_manifest_model

            check_manifest_model(run, model_entry.get("name"), model_entry.get("weights_hash"))
        save_diff(run, res, batch_size=res.timing.get("batch_size"), from_cache=str(from_cache),
                  manifest={"model": model_entry}, write_state=keep_state, progress=True)
        print_summary(res, run)
        finish_state(run, keep=keep_state, log=console.print)
        return
    if pairs is None:
        raise typer.BadParameter("give a PAIRS file or run folder, or --from-cache RUN")
    ctx, run, m, entry, aligned = _open_pairs_run(pairs, raw, out_dir, fmt, model, device, dtype, device_map,
                                                   load_in_8bit, load_in_4bit, "span" if span else "single")
    from .. import distributed as D
    cfg = DiffConfig(hooks=hooks, max_offset=max_offset, include_last=last, by_category=by_category,
                     sample_size=sample_size, seed=seed, **rule)
    try:
        done = diff_step(run, m, aligned, cfg, batch_size=batch_size, checkpoint_every=checkpoint_every,
                         ctx=ctx if ctx.active else None, progress=True, write_state=keep_state)
    except KeyboardInterrupt:
        # click would turn this into "Aborted!"; say what was kept instead.
        console.print(f"interrupted: the statistics so far are saved in {run / STATS_FILE}; "
                      "rerun the same command to resume")
        raise typer.Exit(130) from None
    finally:
        D.shutdown(ctx)
    if done.status == "worker":  # only rank 0 writes
        return
    res = done.value
    if res.timing.get("resumed_from"):
        console.print(f"resumed: {res.timing['resumed_from']} pairs were already done")
    print_summary(res, run)
    if res.meta.get("complete"):  # the last act: the tables are written, only a resume would read the state
        finish_state(run, keep=keep_state, log=console.print)


def print_summary(res, run: Path) -> None:
    s = res.summary
    t = Table(title=f"ec diff: {s['n_pairs']} pairs, {s['n_hook_points']} hook points → {run}")
    t.add_column("hook")
    at = "p" if res.config.anchor == "p" else "detect"
    t.add_column(f"layer of max ‖Δ‖/‖a‖ at {at}", justify="right")
    t.add_column("max ‖Δ‖/‖a‖ [95% CI]", justify="right")
    t.add_column("stable", justify="right")
    t.add_column("responsive (per direction)", justify="right")
    cand = res.candidates
    for h, v in s["max_rel_l2_at_p"].items():
        c = cand[(cand["hook"] == h) & (cand["category"] == "all")] if not cand.empty else cand
        ns = int(((c["kind"] == "stable") & (c["swap_direction"] == "all")).sum()) if not c.empty else 0
        nr = int((cand[cand["hook"] == h]["kind"] == "responsive").sum()) if not cand.empty else 0
        t.add_row(h, str(v["layer"]), f"{v['rel_l2_mean']:.3f} [{v['rel_l2_mean_lo']:.3f}, "
                  f"{v['rel_l2_mean_hi']:.3f}]", str(ns), str(nr))
    out.print(t)
    by_dir = s.get("n_responsive_by_direction") or {}
    if len(by_dir) > 1:
        out.print("responsive candidates per swap direction (the rule is applied per direction): " + "; ".join(
            f"{d}: {n}" for d, n in by_dir.items()))
    con = s.get("contrasts") or {}
    if con.get("n_tests"):
        parts = [f"{k}: {con['n_significant'].get(k, 0)} of {n}" for k, n in con["n_tests"].items()]
        out.print(f"category contrasts (layer effects, cluster permutation), BH q < {con['alpha']}: "
                  + "; ".join(parts))
    else:
        out.print("contrasts: none (needs two category groups with enough sampled pairs)")
    if s.get("massive_dims"):
        out.print("massive-activation dims: " + "; ".join(f"{h}: {v[:8]}" for h, v in s["massive_dims"].items()))
    t = res.timing
    if t.get("pairs_per_second"):
        out.print(f"{t['pairs']} pairs in {t['seconds']:.1f}s ({t['pairs_per_second']:.1f} pairs/s)")


@app.command("cache")
def cache(
    pairs: Path = typer.Argument(..., help="a pairs file (.jsonl/.csv/.json) or a run folder holding pairs.jsonl"),
    model: str = ModelOpt,
    out_dir: Path = OutOpt,
    hooks: str = HooksOpt,
    positions: str = typer.Option(None, "--positions", help="changed (p only), after (p to the last token; default) "
                                  "or all"),
    for_tl: bool = typer.Option(False, "--for-tl", help="also store what TransformerLens's tools read (embedding, "
                                "layer-norm scales) at every position: store.activation_cache(pair, side)"),
    store_dtype: str = typer.Option(None, "--store-dtype", help="float32, float16 or bfloat16 (default: --dtype)"),
    shard_size: int = typer.Option(256, "--shard-size", help="pairs per shard file (a multiple of --batch-size "
                                   "makes `ec diff --from-cache` equal streaming bit for bit)"),
    batch_size: int = BatchOpt,
    fmt: str = FormatOpt,
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    device_map: str = DeviceMapOpt,
    load_in_8bit: bool = Load8Opt,
    load_in_4bit: bool = Load4Opt,
) -> None:
    """Write the raw activations of both sentences as safetensors shards (resumable); read with eclens.open_cache."""
    raw = check_pairs_file(pairs, fmt)
    from ..cache import write_cache
    from ..runs import record_step

    ctx, run, m, entry, aligned = _open_pairs_run(pairs, raw, out_dir, fmt, model, device, dtype, device_map,
                                                   load_in_8bit, load_in_4bit)
    from .. import distributed as D
    t0 = time.perf_counter()
    try:
        store = write_cache(m, aligned, run, hooks=hooks, positions=positions, store_dtype=store_dtype or dtype,
                            shard_size=shard_size, batch_size=batch_size, progress=ctx.is_main, ctx=ctx,
                            for_tl=for_tl)
    except KeyboardInterrupt:
        console.print(f"interrupted: finished shards are kept in {run / 'cache'}; rerun the same command to resume")
        raise typer.Exit(130) from None
    finally:
        D.shutdown(ctx)
    if not ctx.is_main:
        return
    size = sum(f.stat().st_size for f in store.folder.glob("shard-*.safetensors"))
    record_step(run, "cache", {"hooks": store.hooks, "positions": store.positions, "for_tl": for_tl,
                               "store_dtype": store.dtype,
                                          "shard_size": shard_size, "batch_size": batch_size, "n_pairs": len(store),
                                          "world_size": ctx.world_size, "bytes": size,
                                          "seconds": round(time.perf_counter() - t0, 3),
                                          "outputs": ["cache/index.json", "cache/shard-*.safetensors"]})
    out.print(f"cached {len(store)} pairs, {len(store.hooks)} hook points, positions={store.positions}, "
              f"{store.dtype}: {size / 2**20:.1f} MiB in {store.folder}")
