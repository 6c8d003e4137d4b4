"""``ec patch``: exact activation patching, dimension-set interventions, attribution patching."""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer
from rich.table import Table

from ..cli import app
from ._common import DeviceOpt, DtypeOpt, ModelOpt, console, out

MODES = ("exact", "dims", "attribution")


def _parse_layers(spec: str | None, n_layers: int) -> list[int] | None:
    from ..errors import EclensError

    if not spec:
        return None
    layers: list[int] = []
    try:
        for part in spec.split(","):
            part = part.strip()
            if "-" in part:
                a, b = part.split("-", 1)
                layers += list(range(int(a), int(b) + 1))
            elif part:
                layers.append(int(part))
    except ValueError:
        raise EclensError(f"--layers {spec!r}: use comma-separated layers or ranges, e.g. 0-5,12") from None
    bad = [x for x in layers if not 0 <= x < n_layers]
    if bad:
        raise EclensError(f"--layers: layer {bad[0]} out of range (the model has layers 0..{n_layers - 1})")
    return sorted(set(layers))


def _parse_dims(spec: str) -> list[int]:
    from ..errors import EclensError

    try:
        dims = [int(x) for x in spec.replace(" ", "").split(",") if x]
    except ValueError:
        raise EclensError(f"--dims {spec!r}: use comma-separated integers, e.g. 12,40,311") from None
    if not dims:
        raise EclensError("--dims is empty")
    return dims


def open_run(source: Path, out_dir: Path | None, model, max_pairs: int | None, raw=None):
    """The run folder and its aligned pairs: from ``RUN/pairs.jsonl``, or a raw pairs file aligned now
    (``pairs.jsonl``, ``rejected.jsonl`` and ``check.csv`` written into ``--out``; ``raw``: its pairs,
    already read). A raw file without one valid pair is an error before anything is written."""
    from ..errors import EclensError
    from ..model import manifest_model_entry, model_id, weights_hash
    from ..pairs import check_with_model, load_aligned, load_pairs, write_jsonl
    from ..runs import check_manifest_model, file_sha256, update_manifest, write_table

    if not source.exists():
        raise EclensError(f"{source}: no such run folder or pairs file")
    if source.is_dir():
        run = out_dir or source
        pairs_file = source / "pairs.jsonl"
        if not pairs_file.exists():
            raise EclensError(f"{source}: no pairs.jsonl in this run folder; pass a pairs file instead "
                              "(ec patch pairs.jsonl --out RUN)")
        wh = weights_hash(model)
        check_manifest_model(source, model_id(model), wh)
        pairs = load_aligned(pairs_file)
        if run != source:
            check_manifest_model(run, model_id(model), wh)
            write_jsonl(run / "pairs.jsonl", pairs)
        n_total = len(pairs)
        dataset = None
    else:
        if out_dir is None:
            raise EclensError(f"{source} is a pairs file: give --out RUN, the folder to write results into")
        run = out_dir
        check_manifest_model(run, model_id(model), weights_hash(model))
        if raw is None:
            raw = load_pairs(source)
        res = check_with_model(raw, model)
        if not res.valid:
            raise res.none_valid_error(source)
        run.mkdir(parents=True, exist_ok=True)
        write_jsonl(run / "pairs.jsonl", res.valid)
        write_jsonl(run / "rejected.jsonl", res.rejected)
        write_table(res.by_category(), run / "check.csv")
        pairs = res.valid
        n_total = res.n_total
        dataset = {"path": str(source), "sha256": file_sha256(source), "n_pairs": res.n_total,
                   "n_valid": len(res.valid)}
        if res.rejected:
            console.print(f"[yellow]{len(res.rejected)} of {res.n_total} pairs rejected[/yellow] "
                          f"(reasons in {run / 'rejected.jsonl'})")
    if not pairs:
        raise EclensError(f"{source}: no valid pairs (of {n_total}); see `ec pairs check`")
    if max_pairs is not None:
        if max_pairs < 1:
            raise EclensError("--max-pairs must be at least 1")
        pairs = pairs[:max_pairs]
    fields: dict = {}
    from ..runs import read_manifest

    man = read_manifest(run)
    if not man.get("model"):
        fields["model"] = manifest_model_entry(model)
    if dataset is not None:
        fields["dataset"] = dataset
    if fields:
        update_manifest(run, **fields)
    return run, pairs


def _save_tensors(run: Path, tensors: dict, meta: dict) -> None:
    """Merge into ``patch.safetensors`` (other modes' tensors are kept)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from ..runs import save_tensors

    path = run / "patch.safetensors"
    old, old_meta = {}, {}
    if path.exists():
        old = load_file(str(path))
        with safe_open(str(path), framework="pt") as fh:
            old_meta = fh.metadata() or {}
    prefixes = {k.split("/", 1)[0] for k in tensors}
    old = {k: v for k, v in old.items() if k.split("/", 1)[0] not in prefixes}  # a rerun replaces its mode
    old.update(tensors)
    old_meta.update({k: json.dumps(v) if not isinstance(v, str) else v for k, v in meta.items()})
    save_tensors(old, path, metadata=old_meta)


def _merge_json(path: Path, key: str, value: dict) -> None:
    from ..runs import write_json

    doc = {}
    if path.exists():
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            doc = {}
    doc[key] = value
    write_json(path, doc)


def _record_step(run: Path, mode: str, entry: dict) -> None:
    from ..runs import read_manifest, update_manifest

    steps = (read_manifest(run).get("steps") or {}).get("patch") or {}
    steps[mode] = entry
    update_manifest(run, steps={"patch": steps})


@app.command("patch")
def patch(
    source: Path = typer.Argument(..., help="a run folder (with pairs.jsonl) or a raw pairs file"),
    mode: str = typer.Option("exact", "--mode", help="exact | dims | attribution"),
    hooks: str = typer.Option("resid_pre,attn_out,mlp_out,resid_post", "--hooks",
                              help="hook points (per layer); for --dims exactly one"),
    heads: bool = typer.Option(False, "--heads", help="also patch attention heads one at a time (attn.hook_z)"),
    layers: str = typer.Option(None, "--layers", help="only these layers, e.g. 0-5,12 (default all)"),
    direction: str = typer.Option("both", "--direction", help="denoise | noise | both"),
    metric: str = typer.Option("logit_diff", "--metric",
                               help="logit_diff | logprob | kl: ranks results, drives attribution and significance"),
    candidates: Path = typer.Option(None, "--candidates", help="candidates.csv from `ec diff` (default RUN/candidates.csv)"),
    kind: str = typer.Option(None, "--kind", help="stable | responsive: which candidates to test (default both)"),
    top_k: int = typer.Option(10, "--top-k", help="dims per candidate set (best-ranked in each hook/layer/offset)"),
    max_sets: int = typer.Option(10, "--max-sets", help="test at most this many candidate sets (best first)"),
    dims: str = typer.Option(None, "--dims", help="test this set instead of candidates, e.g. 12,40,311 "
                             "(with one --hooks, --layer and --offset)"),
    layer: int = typer.Option(None, "--layer", help="layer of the --dims set"),
    offset: int = typer.Option(0, "--offset", help="position of the --dims set: p + offset; -1 = last token"),
    n_controls: int = typer.Option(100, "--n-controls", help="random dimension sets per tested set"),
    ablation: str = typer.Option("patch", "--ablation", help="zero | mean | resample | patch"),
    alpha: float = typer.Option(0.05, "--alpha", help="false discovery rate for the dims sets (BH)"),
    verify_top: int = typer.Option(0, "--verify-top", help="attribution: exact-patch the top K (+K random) per pair"),
    max_pairs: int = typer.Option(None, "--max-pairs", help="use only the first N valid pairs"),
    batch_size: int = typer.Option(64, "--batch-size", help="patched copies per forward pass"),
    out_dir: Path = typer.Option(None, "--out", "-o", help="run folder to write (default: the given run)"),
    model: str = ModelOpt,
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    seed: int = typer.Option(0, "--seed", help="seed for random controls, donors and verification samples"),
) -> None:
    """Causal tests: which activations, heads and dimension sets restore clean behaviour in the corrupt run
    (denoise) or break it in the clean run (noise)."""
    from ..errors import EclensError
    from ..metrics import METRICS
    from ..runs import write_table
    from ._common import load, preflight_pairs

    if mode not in MODES:
        raise EclensError(f"unknown --mode {mode!r}: use exact, dims or attribution")
    if metric not in METRICS:
        raise EclensError(f"unknown --metric {metric!r}: use {', '.join(METRICS)}")
    if direction not in ("denoise", "noise", "both"):
        raise EclensError(f"unknown --direction {direction!r}: use denoise, noise or both")
    if not source.exists():
        raise EclensError(f"{source}: no such run folder or pairs file")
    if source.is_file() and out_dir is None:
        raise EclensError(f"{source} is a pairs file: give --out RUN, the folder to write results into")
    cpath = candidates or (source if source.is_dir() else out_dir) / "candidates.csv"
    if mode == "dims" and dims is None and not cpath.exists():
        raise EclensError(f"{cpath}: no candidates file; run `ec diff` first, pass --candidates FILE, "
                          "or test one set with --dims")
    raw = preflight_pairs(source)
    from .. import distributed as D

    ctx = D.init(device)  # under torchrun: shard the pairs over ranks, rank 0 writes
    if ctx.active and mode == "attribution":
        raise EclensError("under torchrun, ec patch shards --mode dims and --mode exact; "
                          "run --mode attribution in one process")
    device = D.local_device(device, ctx)
    m = load(model, device, dtype)
    if ctx.is_main:
        run, pairs = open_run(source, out_dir, m, max_pairs, raw)
    D.barrier(ctx)
    if not ctx.is_main:  # read what rank 0 wrote
        run, pairs = open_run(out_dir or source, None, m, max_pairs)
    all_pairs, pairs = pairs, D.shard(pairs, ctx)
    from .. import patch as P

    hook_list = P.parse_hooks(hooks, m) if hooks else []
    layer_list = _parse_layers(layers, m.cfg.n_layers)
    ids = [p.id for p in pairs]
    t0 = time.perf_counter()
    params = {"mode": mode, "hooks": hook_list, "heads": heads, "direction": direction, "metric": metric,
              "seed": seed, "n_pairs": len(all_pairs), "batch_size": batch_size}
    if mode == "exact":
        df = P.exact_patch(m, pairs, hooks=hook_list, direction=direction, heads=heads, layers=layer_list,
                           batch_size=batch_size, progress=ctx.is_main)
        base = P.pair_baselines(m, pairs)
        if ctx.active:  # every pair is patched independently: the ranks' rows, back in pair order
            import pandas as pd

            order = {p.id: i for i, p in enumerate(all_pairs)}
            parts = D.all_gather((df, base), ctx)
            df = pd.concat([d for d, _ in parts], ignore_index=True)
            df = df.iloc[df["pair_id"].map(order).argsort(kind="stable")].reset_index(drop=True)
            base = pd.concat([b for _, b in parts], ignore_index=True)
            base = base.iloc[base["pair_id"].map(order).argsort(kind="stable")].reset_index(drop=True)
            ids = [p.id for p in all_pairs]
            if not ctx.is_main:
                D.shutdown(ctx)
                return
        write_table(df, run / "patch_exact.csv")
        write_table(base, run / "patch_baselines.csv")
        tensors = {}
        for m_name in METRICS:
            tensors.update(P.exact_tensors(df, ids, m.cfg.n_layers, f"{m_name}_restored"))
        _save_tensors(run, tensors, {"exact_pair_ids": ids})
        summary = P.exact_summary(df, metric)
        summary["seconds"] = round(time.perf_counter() - t0, 2)
        files = ["patch_exact.csv", "patch_baselines.csv", "patch.safetensors"]
        _print_exact(summary)
    elif mode == "dims":
        if dims:
            if len(hook_list) != 1 or layer is None:
                raise EclensError("--dims needs exactly one --hooks entry and --layer")
            sets = [P.DimSet(hook_list[0], layer, _parse_dims(dims), offset, "manual")]
        else:
            sets = P.candidate_sets(str(cpath), kind=kind, top_k=top_k, max_sets=max_sets)
            params["candidates"] = str(cpath)
        res = P.dims_interventions(m, pairs, sets, method=ablation, n_controls=n_controls, seed=seed,
                                   direction=direction, metric=metric, alpha=alpha, batch_size=batch_size,
                                   progress=ctx.is_main, dist=ctx)
        if not ctx.is_main:
            D.shutdown(ctx)
            return
        write_table(res.table, run / "patch_dims.csv")
        write_table(res.controls, run / "patch_dims_controls.csv")
        t = res.table
        n_sig = int(t["significant"].sum())
        summary = {
            "method": ablation, "metric": metric, "alpha": alpha, "n_controls": n_controls,
            "n_sets": len(sets), "n_tests": int(len(t)), "n_significant": n_sig,
            "verdict": (f"{n_sig} of {len(t)} set tests beat their random controls (BH q < {alpha})" if n_sig else
                        f"null: no set beats its random controls at BH q < {alpha} ({len(t)} tests)"),
            "sets": t[["set", "direction", "n_pairs", f"{metric}_effect", f"{metric}_control_mean",
                       f"{metric}_z", f"{metric}_p", f"{metric}_q", "verdict"]].to_dict(orient="records"),
            "seconds": round(time.perf_counter() - t0, 2),
        }
        params.update(ablation=ablation, n_controls=n_controls, top_k=top_k, kind=kind, alpha=alpha)
        files = ["patch_dims.csv", "patch_dims_controls.csv"]
        _print_dims(t, metric, summary["verdict"])
    else:
        t_attr = time.perf_counter()
        df, dim_scores = P.attribution_patch(m, pairs, hooks=hook_list, heads=heads, direction=direction,
                                             metric=metric, verify_top=verify_top, seed=seed,
                                             exact_batch_size=batch_size, progress=True, return_dims=True)
        write_table(df, run / "patch_attribution.csv")
        tensors = {f"attribution_dims/{k}": v for k, v in dim_scores.items()}
        _save_tensors(run, tensors, {"attribution_pair_ids": ids})
        summary = P.attribution_summary(df, verify_top or None)
        summary.update(metric=metric, verify_top=verify_top, seconds=round(time.perf_counter() - t_attr, 2))
        params["verify_top"] = verify_top
        files = ["patch_attribution.csv", "patch.safetensors"]
        _print_attribution(df, summary)
    files.append("patch_summary.json")
    _merge_json(run / "patch_summary.json", mode, summary)
    params["world_size"] = ctx.world_size
    _record_step(run, mode, {"params": params, "seconds": round(time.perf_counter() - t0, 2), "files": files})
    D.shutdown(ctx)
    console.print(f"wrote {', '.join(files)} to {run}")


def _print_exact(summary: dict) -> None:
    t = Table(title=f"exact patching: top cells by mean {summary['metric']}_restored "
                    f"({summary['n_pairs']} pairs, {summary['pairs_without_ratio']} without a usable ratio)")
    for c in ("direction", "hook", "layer", "position", "head", "restored"):
        t.add_column(c)
    for r in summary["top"]:
        t.add_row(r["direction"], r["hook"], str(r["layer"]), r["position_kind"], str(r["head"]),
                  f"{r[summary['metric'] + '_restored']:.3f}")
    out.print(t)


def _print_dims(table, metric: str, verdict: str) -> None:
    t = Table(title=f"dimension sets vs random controls ({metric})")
    for c in ("set", "direction", "pairs", "effect", "controls", "z", "p", "q", "verdict"):
        t.add_column(c)
    for r in table.itertuples(index=False):
        d = r._asdict()
        t.add_row(str(d["set"]), str(d["direction"]), str(d["n_pairs"]), f"{d[f'{metric}_effect']:.4g}",
                  f"{d[f'{metric}_control_mean']:.3g}±{d[f'{metric}_control_std']:.2g}", f"{d[f'{metric}_z']:.2f}",
                  f"{d[f'{metric}_p']:.3g}", f"{d[f'{metric}_q']:.3g}", str(d["verdict"]))
    out.print(t)
    out.print(verdict)


def _print_attribution(df, summary: dict) -> None:
    top = df.sort_values("rank").groupby(["pair_id", "direction"]).head(3)
    t = Table(title=f"attribution ({summary['metric']}): top 3 per pair")
    for c in ("pair", "direction", "hook", "layer", "position", "head", "attribution", "exact"):
        t.add_column(c)
    for r in top.head(30).itertuples(index=False):
        t.add_row(str(r.pair_id), r.direction, r.hook, str(r.layer), r.position_kind, str(r.head),
                  f"{r.attribution:.4g}", "" if r.exact != r.exact else f"{r.exact:.4g}")
    out.print(t)
    if summary.get("spearman") is not None:
        out.print(f"verified {summary['n_verified']} rows: Spearman {summary['spearman']:.3f} "
                  f"(median per pair {summary['spearman_median_pair']}), top-K overlap {summary['topk_overlap']}")
