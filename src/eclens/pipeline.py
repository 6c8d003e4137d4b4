"""``ec run``: the whole study with defaults, resumable.

Steps, each writing the run-folder files of ``docs/run-folder.md`` atomically:

1. ``pairs``   — template pairs (:func:`eclens.sources.templates.generate_templates`) or
   a user's pairs file, aligned under the model's tokenizer: ``pairs.jsonl``,
   ``rejected.jsonl``, ``check.csv``;
2. ``diff``    — :func:`eclens.diff.run_diff` over every valid pair (its own checkpoint
   resumes an interrupted pass): ``layers.csv``, ``dims.parquet``, ``candidates.csv``, ...;
3. ``exact``   — exact patching maps (both directions) for a few pairs, spread over the
   categories: ``patch_exact.csv``;
4. ``dims``    — the top candidate dimension sets patched against random sets of the
   same size: ``patch_dims.csv``, ``patch_dims_controls.csv``;
5. ``attribution`` — attribution patching on a subset, its top components verified
   by exact patching: ``patch_attribution.csv``;
6. ``report``  — ``report.html``.

Resuming: ``manifest.json["steps"]["run"]`` records, per finished step, a key made of
its parameters and the key of the step before; a rerun skips a step whose key and
output files are unchanged and redoes it (and everything after) otherwise. A run
folder made from other pairs (another source, number per category, seed or model)
is refused rather than mixed.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import EclensError

STEPS = ("pairs", "diff", "exact", "dims", "attribution", "report")


@dataclass
class RunConfig:
    """Settings of ``ec run``. Defaults keep the whole job within ~10 minutes on a 2-core CPU
    with the embedded model (measured; see the README)."""

    pairs_file: str | None = None       # None: template pairs
    n_per_category: int = 25            # template pairs per category (9 categories)
    seed: int = 0
    hooks: str | None = None            # diff hooks (None: residual, attention and MLP outputs)
    batch_size: int = 16                # pairs per forward pass in diff
    min_pairs: int | None = None        # diff's candidate rule: pairs a dimension needs (None: diff's default)
    exact_pairs: int = 2                # pairs with a full exact patching map
    patch_hooks: tuple[str, ...] = ("hook_resid_pre",)  # exact maps; attribution also scores these
    dims_pairs: int = 8                 # pairs the candidate sets are tested on
    max_sets: int = 2                   # candidate sets tested (stable and responsive in turn)
    top_k: int = 10                     # dimensions per candidate set
    n_controls: int = 50                # random sets per tested set: p >= 1/51, so with 2 sets one can reach BH q < 0.05
    attribution_pairs: int = 16
    verify_top: int = 5                 # attribution components exact-verified per pair (+ as many random)
    metric: str = "logit_diff"
    patch_batch_size: int = 64
    report_examples: int = 4

    def step_params(self, step: str) -> dict:
        keys = {
            "pairs": ("pairs_file", "n_per_category", "seed"),
            "diff": ("hooks", "seed", "min_pairs"),
            "exact": ("exact_pairs", "patch_hooks"),
            "dims": ("dims_pairs", "max_sets", "top_k", "n_controls", "metric", "seed"),
            "attribution": ("attribution_pairs", "verify_top", "metric", "seed", "patch_hooks"),
            "report": ("report_examples",),
        }[step]
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in ((k, getattr(self, k)) for k in keys)}


@dataclass
class StepResult:
    step: str
    status: str          # done | skipped (finished earlier) | empty (nothing to do: reported as such)
    seconds: float
    files: list[str]
    headline: str


@dataclass
class RunResult:
    run: Path
    steps: list[StepResult] = field(default_factory=list)
    report: Path | None = None

    def table(self):
        import pandas as pd

        return pd.DataFrame([asdict(s) for s in self.steps])


def _key(prev: str, params: dict) -> str:
    return hashlib.sha256((prev + json.dumps(params, sort_keys=True, default=str)).encode()).hexdigest()[:16]


def spread_pairs(pairs: Sequence, n: int, shortest: bool = True) -> list:
    """``n`` pairs taken from the categories in turn (shortest sentences first: patching cost
    grows with the tokens after the change), deterministic."""
    by_cat: dict[str, list] = {}
    for a in pairs:
        by_cat.setdefault(a.category, []).append(a)
    for v in by_cat.values():
        if shortest:
            v.sort(key=lambda a: (a.length - a.position, a.length, a.id))
    out: list = []
    # Categories whose best pair is cheapest go first, so n=1 takes the cheapest pair overall.
    cats = sorted(by_cat, key=lambda c: ((by_cat[c][0].length - by_cat[c][0].position) if shortest else 0, c))
    while len(out) < n and any(by_cat.values()):
        for cat in cats:
            if by_cat[cat] and len(out) < n:
                out.append(by_cat[cat].pop(0))
    return out


def run_pipeline(run: str | Path, model, config: RunConfig | None = None, *,
                 log: Callable[[str], None] = print, progress: bool = True) -> RunResult:
    """Run (or resume) every step into ``run`` with ``model``; returns what each step did."""
    from .model import manifest_model_entry, model_id, weights_hash
    from .runs import check_manifest_model, read_manifest, update_manifest

    cfg = config or RunConfig()
    run = Path(run)
    if run.exists() and not run.is_dir():
        raise EclensError(f"{run}: exists and is not a folder; choose another --out")
    run.mkdir(parents=True, exist_ok=True)
    wh = weights_hash(model)
    check_manifest_model(run, model_id(model), wh)
    man = read_manifest(run)
    state = (man.get("steps") or {}).get("run") or {}
    old_pairs = (state.get("params") or {}).get("pairs")
    if old_pairs is not None and old_pairs != cfg.step_params("pairs"):
        changed = [k for k, v in cfg.step_params("pairs").items() if old_pairs.get(k) != v]
        raise EclensError(f"{run}: made from other pairs ({', '.join(f'{k}={old_pairs.get(k)!r}' for k in changed)}); "
                          "use another --out folder, or delete this one")
    if not man.get("model"):
        update_manifest(run, model=manifest_model_entry(model), seed=cfg.seed)
    done: dict[str, str] = dict(state.get("done") or {})
    result = RunResult(run)
    prev = ""
    pairs: list = []
    for i, step in enumerate(STEPS, start=1):
        params = cfg.step_params(step)
        key = _key(prev, params)
        prev = key
        files = (state.get("files") or {}).get(step) or []
        if done.get(step) == key and all((run / f).exists() for f in files):
            log(f"[{i}/{len(STEPS)}] {step}: done earlier, skipped")
            result.steps.append(StepResult(step, "skipped", 0.0, files, (state.get("headlines") or {}).get(step, "")))
            if step == "pairs":
                from .pairs import load_aligned

                pairs = load_aligned(run / "pairs.jsonl")
            continue
        log(f"[{i}/{len(STEPS)}] {step}: running")
        t0 = time.perf_counter()
        fn = _STEP_FUNCS[step]
        status, files, headline, extra = fn(run, model, cfg, pairs, progress=progress, log=log)
        if step == "pairs":
            pairs = extra
        secs = round(time.perf_counter() - t0, 2)
        log(f"[{i}/{len(STEPS)}] {step}: {headline} ({secs:.1f} s)")
        result.steps.append(StepResult(step, status, secs, files, headline))
        # Later steps depend on this one: forget them, then record this one.
        for later in STEPS[i:]:
            done.pop(later, None)
        done[step] = key
        state = (read_manifest(run).get("steps") or {}).get("run") or {}
        st_files = dict(state.get("files") or {})
        st_files[step] = files
        heads = dict(state.get("headlines") or {})
        heads[step] = headline
        secs_all = dict(state.get("seconds") or {})
        secs_all[step] = secs
        params_all = dict(state.get("params") or {})
        params_all[step] = params
        state = {"config": asdict(cfg), "params": params_all, "done": done, "files": st_files, "headlines": heads,
                 "seconds": secs_all}
        update_manifest(run, steps={"run": state})
    result.report = run / "report.html" if (run / "report.html").exists() else None
    return result


# ----------------------------------------------------------------------- steps


def _step_pairs(run: Path, model, cfg: RunConfig, _pairs, *, progress: bool, log) -> tuple:
    from .diff import save_check
    from .pairs import check_with_model, load_pairs
    from .runs import file_sha256

    if cfg.pairs_file:
        src = Path(cfg.pairs_file)
        raw = load_pairs(src)
        dataset = {"path": str(src), "sha256": file_sha256(src)}
    else:
        from .sources.templates import generate_templates

        raw = generate_templates(model.tokenizer, n_per_category=cfg.n_per_category, seed=cfg.seed,
                                 prepend_bos=bool(model.cfg.default_prepend_bos))
        blob = "\n".join(json.dumps(p.to_dict(), sort_keys=True, ensure_ascii=False) for p in raw)
        dataset = {"path": f"templates(n_per_category={cfg.n_per_category}, seed={cfg.seed})",
                   "sha256": hashlib.sha256(blob.encode()).hexdigest()}
    res = check_with_model(raw, model)
    save_check(run, res, dataset["path"], dataset, seed=cfg.seed)
    cats = len({a.category for a in res.valid})
    head = f"{len(res.valid)} valid pairs in {cats} categories, {len(res.rejected)} rejected"
    return "done", ["pairs.jsonl", "rejected.jsonl", "check.csv"], head, res.valid


def _step_diff(run: Path, model, cfg: RunConfig, pairs, *, progress: bool, log) -> tuple:
    from .diff import run_diff
    from .runs import update_manifest

    rule = {"min_pairs": cfg.min_pairs} if cfg.min_pairs is not None else {}
    res = run_diff(model, pairs, hooks=cfg.hooks, batch_size=cfg.batch_size, seed=cfg.seed, run=run,
                   progress=progress, **rule)
    files = res.save(run)
    s = res.summary
    update_manifest(run, steps={"diff": res.manifest_step(files, batch_size=cfg.batch_size,
                                                          seconds=res.timing.get("seconds"))})
    nc = s.get("n_candidates") or {}
    con = s.get("contrasts") or {}
    nsig = sum((con.get("n_significant") or {}).values())
    head = (f"{nc.get('stable', 0)} stable and {nc.get('responsive', 0)} responsive candidates (all pairs); "
            f"{nsig} significant category contrasts")
    return "done", files, head, None


def _record_patch(run: Path, mode: str, params: dict, seconds: float, files: list[str], summary: dict) -> None:
    # Same files and manifest layout as `ec patch` (eclens.commands.patch).
    from .commands.patch import _merge_json, _record_step

    _merge_json(run / "patch_summary.json", mode, summary)
    _record_step(run, mode, {"params": params, "seconds": round(seconds, 2), "files": [*files, "patch_summary.json"]})


def _step_exact(run: Path, model, cfg: RunConfig, pairs, *, progress: bool, log) -> tuple:
    from . import patch as P
    from .commands.patch import _save_tensors
    from .metrics import METRICS
    from .runs import write_table

    t0 = time.perf_counter()
    chosen = spread_pairs(pairs, cfg.exact_pairs)
    hooks = list(cfg.patch_hooks)
    df = P.exact_patch(model, chosen, hooks=hooks, direction="both", batch_size=cfg.patch_batch_size,
                       progress=progress)
    base = P.pair_baselines(model, chosen)
    write_table(df, run / "patch_exact.csv")
    write_table(base, run / "patch_baselines.csv")
    ids = [a.id for a in chosen]
    tensors = {}
    for m in METRICS:
        tensors.update(P.exact_tensors(df, ids, model.cfg.n_layers, f"{m}_restored"))
    _save_tensors(run, tensors, {"exact_pair_ids": ids})
    summary = P.exact_summary(df, cfg.metric)
    files = ["patch_exact.csv", "patch_baselines.csv", "patch.safetensors"]
    _record_patch(run, "exact", {"mode": "exact", "hooks": hooks, "direction": "both", "metric": cfg.metric,
                                 "pairs": ids}, time.perf_counter() - t0, files, summary)
    top = (summary.get("top") or [{}])[0]
    col = f"{cfg.metric}_restored"
    head = f"maps for {len(ids)} pairs ({len(df)} patched runs)"
    if top and col in top:
        head += (f"; strongest: {top['direction']} {top['hook']} L{top['layer']} at {top['position_kind']} "
                 f"restores {top[col]:.2f}")
    return "done", files, head, None


def _step_dims(run: Path, model, cfg: RunConfig, pairs, *, progress: bool, log) -> tuple:
    import pandas as pd

    from . import patch as P
    from .runs import write_table

    t0 = time.perf_counter()
    cand = pd.read_csv(run / "candidates.csv") if (run / "candidates.csv").stat().st_size > 1 else pd.DataFrame()
    sets = choose_sets(cand, cfg.max_sets, cfg.top_k)
    if not sets:
        summary = {"metric": cfg.metric, "n_sets": 0, "n_tests": 0, "n_significant": 0,
                   "verdict": "null: diff found no candidate dimensions over all pairs, so there is nothing to test"}
        _record_patch(run, "dims", {"mode": "dims"}, time.perf_counter() - t0, [], summary)
        return "empty", [], summary["verdict"], None
    chosen = spread_pairs(pairs, cfg.dims_pairs)
    m = dims_metric(sets, cfg.metric)
    if m != cfg.metric:
        log(f"      no {cfg.metric}-visible candidates at the changed token; judging sets after it by {m}")
    res = P.dims_interventions(model, chosen, sets, method="patch", n_controls=cfg.n_controls, seed=cfg.seed,
                               direction="denoise", metric=m, batch_size=cfg.patch_batch_size,
                               progress=progress)
    write_table(res.table, run / "patch_dims.csv")
    write_table(res.controls, run / "patch_dims_controls.csv")
    t = res.table
    n_sig = int(t["significant"].sum())
    summary = {
        "method": "patch", "metric": m, "alpha": 0.05, "n_controls": cfg.n_controls, "n_sets": len(sets),
        "n_tests": int(len(t)), "n_significant": n_sig, "n_pairs": len(chosen),
        "verdict": (f"{n_sig} of {len(t)} set tests beat their random controls on {m} (BH q < 0.05)" if n_sig else
                    f"null: no set beats its random controls on {m} at BH q < 0.05 ({len(t)} tests)"),
        "sets": t[["set", "direction", "n_pairs", f"{m}_effect", f"{m}_control_mean", f"{m}_z", f"{m}_p", f"{m}_q",
                   "verdict"]].to_dict(orient="records"),
    }
    files = ["patch_dims.csv", "patch_dims_controls.csv"]
    _record_patch(run, "dims", {"mode": "dims", "ablation": "patch", "direction": "denoise", "metric": m,
                                "n_controls": cfg.n_controls, "top_k": cfg.top_k, "max_sets": cfg.max_sets,
                                "pairs": [a.id for a in chosen], "seed": cfg.seed},
                  time.perf_counter() - t0, files, summary)
    return "done", files, summary["verdict"], None


def choose_sets(cand, max_sets: int, top_k: int) -> list:
    """The candidate sets worth a causal test, over all pairs: one (hook, layer, offset) group
    per set, groups at the changed token first (offset 0: every metric reads at or after it),
    then the nearest later offsets; within an offset groups with ``top_k`` candidates before
    smaller ones, and the most consistent first —
    stable by the lowest mean ``absz_q90`` of its ``top_k`` best dims, responsive by the
    highest mean ``absz_median`` — alternating kinds so both claims get a test."""
    from .patch import DimSet

    if cand.empty or not {"kind", "hook", "layer", "offset", "dim", "rank"} <= set(cand.columns):
        return []
    pool = cand[cand["category"] == "all"] if "category" in cand.columns else cand
    ranked: dict[str, list] = {}
    for kind, score, asc in (("stable", "absz_q90", True), ("responsive", "absz_median", False)):
        groups = []
        for (h, L, off), d in pool[pool["kind"] == kind].groupby(["hook", "layer", "offset"], sort=True):
            d = d.sort_values("rank").drop_duplicates("dim").head(top_k)
            val = float(d[score].mean()) if score in d.columns else float(d["rank"].mean())
            off_key = int(off) if int(off) >= 0 else 10**6  # the last token after every p+k
            # full sets of top_k dims before groups with fewer candidates
            groups.append(((off_key, len(d) < top_k, val if asc else -val, str(h), int(L)),
                           DimSet(str(h), int(L), d["dim"].astype(int).tolist(), int(off), kind)))
        ranked[kind] = [g for _, g in sorted(groups, key=lambda x: x[0])]
    sets: list = []
    while len(sets) < max_sets and any(ranked.values()):
        for kind in ("stable", "responsive"):
            if ranked[kind] and len(sets) < max_sets:
                sets.append(ranked[kind].pop(0))
    return sets


def dims_metric(sets, metric: str) -> str:
    """``logit_diff`` is read at the changed token, so a patch after it cannot move it; sets
    after ``p`` are judged by the downstream KL, which reads every position from ``p`` on."""
    return metric if metric != "logit_diff" or all(s.offset == 0 for s in sets) else "kl"


def _step_attribution(run: Path, model, cfg: RunConfig, pairs, *, progress: bool, log) -> tuple:
    from . import patch as P
    from .commands.patch import _save_tensors
    from .runs import write_table

    t0 = time.perf_counter()
    chosen = spread_pairs(pairs, cfg.attribution_pairs)
    df, dim_scores = P.attribution_patch(model, chosen, hooks=list(cfg.patch_hooks), direction="denoise",
                                         metric=cfg.metric, verify_top=cfg.verify_top, seed=cfg.seed,
                                         exact_batch_size=cfg.patch_batch_size, progress=progress, return_dims=True)
    write_table(df, run / "patch_attribution.csv")
    _save_tensors(run, {f"attribution_dims/{k}": v for k, v in dim_scores.items()},
                  {"attribution_pair_ids": [a.id for a in chosen]})
    summary = P.attribution_summary(df, cfg.verify_top or None)
    summary.update(metric=cfg.metric, verify_top=cfg.verify_top)
    files = ["patch_attribution.csv", "patch.safetensors"]
    _record_patch(run, "attribution", {"mode": "attribution", "hooks": list(cfg.patch_hooks), "direction": "denoise",
                                       "metric": cfg.metric, "verify_top": cfg.verify_top,
                                       "pairs": [a.id for a in chosen]}, time.perf_counter() - t0, files, summary)
    rho = summary.get("spearman")
    head = f"{len(df)} components scored on {len(chosen)} pairs"
    if rho is not None:
        head += f"; Spearman with exact patching {rho:.2f} over {summary['n_verified']} verified"
    return "done", files, head, None


def _step_report(run: Path, model, cfg: RunConfig, pairs, *, progress: bool, log) -> tuple:
    from .report import build_report

    path = build_report(run, model=model, n_examples=cfg.report_examples)
    return "done", [path.name], f"{path} ({path.stat().st_size / 1e6:.1f} MB)", None


_STEP_FUNCS: dict[str, Callable[..., tuple[str, list[str], str, Any]]] = {
    "pairs": _step_pairs, "diff": _step_diff, "exact": _step_exact, "dims": _step_dims,
    "attribution": _step_attribution, "report": _step_report,
}
