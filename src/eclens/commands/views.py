"""``ec report``, ``ec serve`` and ``ec run`` (the whole pipeline)."""

from __future__ import annotations

from pathlib import Path

import typer

from ._common import DeviceOpt, DtypeOpt, ModelOpt, console, out

app = typer.Typer()  # its commands are registered on `ec` by eclens.cli


@app.command("report")
def report(
    run: Path = typer.Argument(..., help="run folder"),
    out_file: Path = typer.Option(None, "--out", "-o", help="where to write the HTML (default RUN/report.html)"),
    examples: int = typer.Option(4, "--examples", help="how many example pairs to show"),
    layer: int = typer.Option(None, "--layer", help="layer of the attention views (default: where attention "
                              "output changes most one token after the change)"),
    pair_views: bool = typer.Option(True, "--pair-views/--no-pair-views",
                                    help="compute per-pair activation and attention views with the run's model"),
    compress: bool = typer.Option(True, "--compress/--no-compress",
                                  help="gzip the inlined plotly.js and circuitsvis (2.5 MB instead of 6 MB; needs a "
                                  "browser from 2023 or later)"),
) -> None:
    """One self-contained HTML report of a run (opens with no network)."""
    from ..report import report_size_note
    from ..steps import report_step

    with console.status(f"building the report of {run}"):
        path = report_step(run, n_examples=examples, out=out_file, layer=layer, pair_views=pair_views,
                           compress=compress).value
    out.print(f"report: {path} ({report_size_note(path)})")


@app.command("serve")
def serve(
    runs_dir: Path = typer.Argument(Path("runs"), help="folder holding run folders"),
    host: str = typer.Option("127.0.0.1", "--host", help="address to bind (loopback by default)"),
    port: int = typer.Option(5000, "--port", help="TCP port (0: any free port)"),
    model: bool = typer.Option(True, "--model/--no-model",
                               help="load each run's model on first use for per-pair views"),
) -> None:
    """A read-only web UI and JSON API to browse runs, pairs, figures and candidates."""
    from ..web.server import is_loopback, make_server, url_of

    srv = make_server(runs_dir, host, port, load_models=model)
    n = len(srv.eclens_app.run_names())
    out.print(f"serving {n} run(s) from {srv.eclens_app.root} at {url_of(srv)}")
    if is_loopback(host):
        out.print("bound to loopback only: other machines cannot connect (use --host 0.0.0.0 to share)")
    else:
        out.print(f"[yellow]bound to {host}: reachable from other machines; read-only, no authentication[/yellow]")
    out.print("JSON API under /api/runs; press Ctrl-C to stop")
    try:
        srv.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        srv.server_close()


@app.command("run")
def run(
    pairs: Path = typer.Option(None, "--pairs", help="pairs file (.jsonl, .csv, study .json); default: template pairs"),
    out_dir: Path = typer.Option(None, "--out", "-o", help="run folder (default runs/templates-n<N>-seed<S> or "
                                 "runs/<pairs file name>); rerun the same command to resume"),
    model: str = ModelOpt,
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    n_per_category: int = typer.Option(25, "--n", help="template pairs per category (9 categories)"),
    seed: int = typer.Option(0, "--seed", help="seed for templates, samples and random controls"),
    hooks: str = typer.Option(None, "--hooks", help="diff hooks: default, all, or comma-separated names/globs"),
    batch_size: int = typer.Option(16, "--batch-size", help="pairs per forward pass in diff"),
    min_pairs: int = typer.Option(None, "--min-pairs", help="pairs a dimension needs to be a candidate "
                                  "(default: diff's, 10)"),
    patch_hooks: str = typer.Option("hook_resid_pre", "--patch-hooks",
                                    help="hooks of the exact patching maps and attribution, comma-separated"),
    exact_pairs: int = typer.Option(2, "--exact-pairs", help="pairs that get a full exact patching map"),
    dims_pairs: int = typer.Option(8, "--dims-pairs", help="pairs the candidate sets are tested on"),
    max_sets: int = typer.Option(2, "--max-sets", help="candidate dimension sets to test"),
    top_k: int = typer.Option(10, "--top-k", help="dimensions per candidate set"),
    n_controls: int = typer.Option(50, "--n-controls", help="random dimension sets per tested set"),
    attribution_pairs: int = typer.Option(16, "--attribution-pairs", help="pairs for attribution patching"),
    verify_top: int = typer.Option(5, "--verify-top", help="attribution components exact-verified per pair"),
    metric: str = typer.Option("logit_diff", "--metric", help="logit_diff | logprob | kl"),
    split: int = typer.Option(0, "--split", help="seed of the cluster halves: dims sets are chosen on half A "
                              "(a diff of its error pairs) and tested on half B; -1: choose and test on all pairs"),
    skip_pairs: int = typer.Option(0, "--skip-pairs", help="layer skipping (every layer; block, attention, MLP) "
                                   "on N error pairs and their twins; 0: no skip step"),
    baseline: str = typer.Option(None, "--baseline", help="random: diff, candidate rules, recovery and the probe "
                                 "again on random:MODEL (same architecture, random weights), beside the real model's"),
    measure_clusters: int = typer.Option(10, "--measure-clusters", help="clusters per category the measure step "
                                         "uses (0: all)"),
    measure_permutations: int = typer.Option(3, "--measure-permutations", help="the measure step's permutation "
                                             "null draws (invariance; the probe twice as many)"),
    keep_state: bool = typer.Option(False, "--keep-state", help="keep RUN/state (the diff's accumulators, "
                                    "which only a resume or a merge reads) once the run completes"),
    span: bool = typer.Option(False, "--span", help="align in span mode: also keep pairs that differ in one "
                              "contiguous span of tokens (misspellings); patching steps use the single-token ones"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bars"),
) -> None:
    """The whole study: pairs -> check -> diff -> measure (recovery, invariance, probe) -> patch (candidates
    vs random controls, exact maps, attribution) -> report. Resumable: finished steps are skipped on a rerun."""
    from rich.table import Table

    from ..errors import EclensError
    from ._common import load, preflight_pairs

    for name, v in (("--n", n_per_category), ("--batch-size", batch_size), ("--exact-pairs", exact_pairs),
                    ("--dims-pairs", dims_pairs), ("--max-sets", max_sets), ("--top-k", top_k),
                    ("--n-controls", n_controls), ("--attribution-pairs", attribution_pairs),
                    ("--measure-permutations", measure_permutations)):
        if v < 1:
            raise EclensError(f"{name} must be at least 1")
    if measure_clusters < 0:
        raise EclensError("--measure-clusters must be at least 0 (0: all)")
    if pairs is not None and not pairs.is_file():
        raise EclensError(f"{pairs}: no such pairs file")
    if baseline not in (None, "random"):
        raise EclensError(f"unknown --baseline {baseline!r}: use random")
    if out_dir is None:
        out_dir = Path("runs") / (pairs.stem if pairs else f"templates-n{n_per_category}-seed{seed}")
    # the file before torch, transformers and scipy are imported: a bad one fails in about a second, not four
    raw = preflight_pairs(pairs)
    from ..metrics import METRICS
    from ..pipeline import RunConfig, run_pipeline

    if metric not in METRICS:
        raise EclensError(f"unknown --metric {metric!r}: use {', '.join(METRICS)}")
    cfg = RunConfig(pairs_file=str(pairs) if pairs else None, n_per_category=n_per_category, seed=seed,
                    hooks=hooks, batch_size=batch_size, min_pairs=min_pairs,
                    patch_hooks=tuple(h.strip() for h in patch_hooks.split(",") if h.strip()), exact_pairs=exact_pairs, dims_pairs=dims_pairs,
                    max_sets=max_sets, top_k=top_k, n_controls=n_controls, attribution_pairs=attribution_pairs,
                    verify_top=verify_top, metric=metric, split=None if split < 0 else split,
                    skip_pairs=max(0, skip_pairs), baseline=baseline,
                    measure_clusters=measure_clusters or None, measure_permutations=measure_permutations,
                    span=span)
    console.print(f"run folder: {out_dir}")
    from ..lock import lock_run

    lock_run(out_dir)  # before the model loads, so a second writer is refused at once
    m = load(model, device, dtype)
    if raw is not None:
        from ..pairs import check_with_model

        chk = check_with_model(raw, m, mode="span" if span else "single")
        if not chk.valid:  # before the run folder is made, so a failed start leaves nothing behind
            raise chk.none_valid_error(pairs)
    res = run_pipeline(out_dir, m, cfg, log=lambda s: console.print(s, markup=False), progress=not quiet,
                       keep_state=keep_state)
    t = Table(title=f"ec run: {out_dir}")
    for c in ("step", "status", "seconds", "result"):
        t.add_column(c, justify="right" if c == "seconds" else "left")
    for s in res.steps:
        t.add_row(s.step, s.status, f"{s.seconds:.1f}", s.headline)
    out.print(t)
    if res.report is not None:
        out.print(f"report: {res.report}")
    out.print(f"browse: ec serve {out_dir.parent}")
