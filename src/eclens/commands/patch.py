"""``ec patch``: exact activation patching, dimension-set interventions, attribution patching."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from ._common import DeviceOpt, DtypeOpt, ModelOpt, console, out

app = typer.Typer()  # its commands are registered on `ec` by eclens.cli

MODES = ("exact", "dims", "attribution", "skip")


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


def open_patch_run(source: Path, out_dir: Path | None, m, raw=None, ctx=None) -> tuple[Path, list]:
    """The run folder and its aligned pairs: ``RUN/pairs.jsonl``, or a raw pairs file aligned and written
    into ``--out`` once (``raw``: its pairs, already read). Refuses another model's run folder."""
    from ..errors import EclensError
    from ..model import manifest_model_entry
    from ..runs import check_manifest_model, read_manifest
    from ._common import aligned_pairs

    if not source.exists():
        raise EclensError(f"{source}: no such run folder or pairs file")
    if source.is_dir():
        if not (source / "pairs.jsonl").exists():
            raise EclensError(f"{source}: no pairs.jsonl in this run folder; pass a pairs file instead "
                              "(ec patch pairs.jsonl --out RUN)")
        run = out_dir or source
    elif out_dir is None:
        raise EclensError(f"{source} is a pairs file: give --out RUN, the folder to write results into")
    else:
        run = out_dir
    entry = manifest_model_entry(m)
    for folder in dict.fromkeys((source, run) if source.is_dir() else (run,)):
        check_manifest_model(folder, entry["name"], entry["weights_hash"])
    new = {} if read_manifest(run).get("model") else {"model": entry}

    def say(chk) -> None:
        if chk.rejected:
            console.print(f"[yellow]{len(chk.rejected)} of {chk.n_total} pairs rejected[/yellow] "
                          f"(reasons in {run / 'rejected.jsonl'})")

    return run, aligned_pairs(m, source, run, ctx, raw=raw, manifest=new, say=say)


@app.command("patch")
def patch(
    source: Path = typer.Argument(..., help="a run folder (with pairs.jsonl) or a raw pairs file"),
    mode: str = typer.Option("exact", "--mode", help="exact | dims | attribution | skip"),
    hooks: str = typer.Option("resid_pre,attn_out,mlp_out,resid_post", "--hooks",
                              help="hook points (per layer); for --dims exactly one"),
    heads: bool = typer.Option(False, "--heads", help="also patch attention heads one at a time (attn.hook_z)"),
    layers: str = typer.Option(None, "--layers", help="only these layers, e.g. 0-5,12 (default all)"),
    direction: str = typer.Option("both", "--direction", help="denoise | noise | both"),
    metric: str = typer.Option("logit_diff", "--metric",
                               help="logit_diff | logprob | kl: ranks results, drives attribution and significance"),
    candidates: Path = typer.Option(None, "--candidates", help="candidates.parquet (or .csv) from `ec diff` (default RUN/candidates.parquet)"),
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
    test_pairs: int = typer.Option(None, "--test-pairs",
                                   help="dims/skip: test on N pairs drawn at random, stratified by category and "
                                        "cluster (seeded by --seed; default every pair)"),
    split: int = typer.Option(None, "--split", help="dims: choose candidate sets on one half of the clusters "
                              "(a diff of that half) and test them on the other; the value seeds the halves"),
    components: str = typer.Option("block,attn,mlp", "--components", help="skip: block, attn and/or mlp"),
    break_kl: float = typer.Option(1.0, "--break-kl", help="skip: a skip whose median clean-run KL exceeds this "
                                   "many nats breaks the clean run and is excluded"),
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
    from ..tables import table_file
    from ._common import load, preflight_pairs

    if mode not in MODES:
        raise EclensError(f"unknown --mode {mode!r}: use exact, dims, attribution or skip")
    if direction not in ("denoise", "noise", "both"):
        raise EclensError(f"unknown --direction {direction!r}: use denoise, noise or both")
    if not source.exists():
        raise EclensError(f"{source}: no such run folder or pairs file")
    if source.is_file() and out_dir is None:
        raise EclensError(f"{source} is a pairs file: give --out RUN, the folder to write results into")
    folder = source if source.is_dir() else out_dir
    cpath = candidates or table_file(folder, "candidates") or folder / "candidates.parquet"
    if mode == "dims" and dims is None and split is None and not cpath.exists():
        raise EclensError(f"{cpath}: no candidates file; run `ec diff` first, pass --candidates FILE, "
                          "or test one set with --dims")
    raw = preflight_pairs(source)  # before torch is imported (by ..metrics): a bad file fails in about a second
    from ..metrics import METRICS

    if metric not in METRICS:
        raise EclensError(f"unknown --metric {metric!r}: use {', '.join(METRICS)}")
    from .. import distributed as D
    from .. import steps as S

    ctx = D.init(device)  # under torchrun: shard the pairs over ranks, rank 0 writes
    if ctx.active and mode in ("attribution", "skip"):
        raise EclensError("under torchrun, ec patch shards --mode dims and --mode exact; "
                          "run --mode attribution and --mode skip in one process")
    device = D.local_device(device, ctx)
    m = load(model, device, dtype)
    run, pairs = open_patch_run(source, out_dir, m, raw, ctx)
    if max_pairs is not None:
        if max_pairs < 1:
            raise EclensError("--max-pairs must be at least 1")
        pairs = pairs[:max_pairs]
    from .. import patch as P

    hook_list = P.parse_hooks(hooks, m) if hooks else []
    layer_list = _parse_layers(layers, m.cfg.n_layers)
    dist = ctx if ctx.active else None
    try:
        if mode == "exact":
            done = S.exact_step(run, m, pairs, S.ExactConfig(hooks=hook_list, direction=direction, heads=heads,
                                                             layers=layer_list, metric=metric,
                                                             batch_size=batch_size), ctx=dist)
            if done.status == "done":
                _print_exact(read_summary(run)["exact"])
        elif mode == "dims":
            record = {"top_k": top_k, "kind": kind, "max_sets": max_sets}
            choose = None
            if dims:
                if len(hook_list) != 1 or layer is None:
                    raise EclensError("--dims needs exactly one --hooks entry and --layer")
                sets = [P.DimSet(hook_list[0], layer, _parse_dims(dims), offset, "manual")]
            elif split is not None:
                sets = []

                def choose(cand):  # half A may have no candidates: a stated null, not an error
                    if cand.empty or (kind is not None and kind not in set(cand["kind"])):
                        return []
                    return P.candidate_sets(cand, kind=kind, top_k=top_k, max_sets=max_sets)
            else:
                sets = P.candidate_sets(str(cpath), kind=kind, top_k=top_k, max_sets=max_sets)
                record["candidates"] = str(cpath)
            done = S.dims_step(run, m, pairs, sets, S.DimsConfig(
                method=ablation, direction=direction, metric=metric, n_controls=n_controls, alpha=alpha, seed=seed,
                batch_size=batch_size, n_pairs=test_pairs, record=record, split=split, choose=choose), ctx=dist)
            if done.status == "done":
                _print_dims(done.value, metric, read_summary(run)["dims"]["verdict"])
        elif mode == "skip":
            comps = tuple(c.strip() for c in components.split(",") if c.strip())
            done = S.skip_step(run, m, pairs, S.SkipStepConfig(layers=layer_list, components=comps, n_pairs=test_pairs,
                                                               seed=seed, break_kl=break_kl, batch_size=batch_size))
            _print_skip(done.value.table, read_summary(run)["skip"])
        else:
            done = S.attribution_step(run, m, pairs, S.AttributionConfig(
                hooks=hook_list, heads=heads, direction=direction, metric=metric, verify_top=verify_top, seed=seed,
                batch_size=batch_size))
            _print_attribution(done.value, read_summary(run)["attribution"])
    finally:
        D.shutdown(ctx)
    if done.status == "done":
        console.print(f"wrote {', '.join([*done.files, 'patch_summary.json'])} to {run}")


def read_summary(run: Path) -> dict:
    from ..runs import RunData

    return RunData(run).patch_summary or {}


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
    t = Table(title=f"dimension sets vs uniform and matched controls ({metric}; interaction: errors minus twins)")
    for c in ("set", "direction", "pairs", "effect", "uniform", "p", "q", "matched p", "match σ/stat", "sees",
              "interaction [95%]", "p_int", "verdict"):
        t.add_column(c)

    def f(x, fmt=".3g") -> str:
        return "" if x is None or x != x else format(x, fmt)

    for d in table.to_dict(orient="records"):
        t.add_row(str(d["set"]), str(d["direction"]), str(d["n_pairs"]), f(d[f"{metric}_effect"], ".4g"),
                  f"{f(d[f'{metric}_control_mean'])}±{f(d[f'{metric}_control_std'], '.2g')}", f(d[f"{metric}_p"]),
                  f(d[f"{metric}_q"]), f(d.get(f"{metric}_p_matched")),
                  f"{f(d.get('match_sigma'), '.2f')}/{f(d.get('match_stat'), '.2f')}", f(d.get(f"{metric}_sees"), ".2f"),
                  (f"{f(d.get('interaction'))} [{f(d.get('interaction_low'))}, {f(d.get('interaction_high'))}]"
                   if d.get("interaction") == d.get("interaction") and "interaction" in d else "no twins"),
                  f(d.get("interaction_p")), str(d["verdict"]))
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


def _print_skip(table, summary: dict) -> None:
    t = Table(title=f"layer skipping: d_kl = log KL(clean_skip||changed_skip)/KL(clean||changed) after detect "
                    f"({summary['n_errors']} errors, {summary['n_twins']} twins; excluded when the median clean-run "
                    f"KL > {summary['break_kl']})")
    for c in ("layer", "part", "clean KL", "d_kl error", "d_kl twin", "error - twin", "verdict"):
        t.add_column(c)

    def iv(r, k):
        return f"{r[k]:.3g} [{r[k + '_low']:.3g}, {r[k + '_high']:.3g}]"

    for r in table.to_dict(orient="records"):
        t.add_row(str(r["layer"]), r["component"], f"{r['clean_kl_median']:.3g}", iv(r, "d_kl_error"),
                  iv(r, "d_kl_twin"), iv(r, "d_kl_diff"), r["verdict"])
    out.print(t)
