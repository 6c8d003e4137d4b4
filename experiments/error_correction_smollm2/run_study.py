#!/usr/bin/env python
"""The study: does SmolLM2 have consistent error-correction dimensions?

One command runs the whole study on the embedded model with fixed seeds:

    .venv/bin/python experiments/error_correction_smollm2/run_study.py --blimp ../shared/data/blimp

and, unchanged, on Llama-3-8B for users with the weights and a GPU:

    python experiments/error_correction_smollm2/run_study.py --blimp BLIMP \\
        --model meta-llama/Meta-Llama-3-8B --device cuda --dtype bfloat16

Steps (each records its wall time in ``results/study.json``):

1. ``templates`` — :func:`eclens.pipeline.run_pipeline` (what ``ec run`` does) on the
   template pairs of every category: alignment, ``ec diff`` per category and overall,
   exact patching maps, the top candidate sets of each kind (stable, responsive) patched
   clean→corrupt against random sets of the same size, attribution patching checked
   against exact patching, and the HTML report. Run folder: ``runs/templates``.
2. ``ablation`` — the same candidate sets mean-ablated in the clean run, against the
   same kind of random controls (does the model *use* them?).
3. ``blimp_diff`` — BLiMP's single-token pairs (a seeded sample spread over the
   paradigms, categories ``blimp/<linguistics_term>``) through ``ec diff``.
   Run folder: ``runs/blimp``.
4. ``blimp_accuracy`` — :func:`eclens.evaluate.blimp_accuracy` on the first N pairs of
   each paradigm, with binomial 95 % intervals, beside GPT-2's published numbers.
5. ``analysis`` — the small result tables in ``results/`` (every number the write-up uses).
6. ``figures`` — PNG figures (plotly rendered in headless chromium) and the report copy.
7. ``readme`` — ``README.md`` generated from ``results/`` (:mod:`write_readme`).

Steps 1–4 resume: a rerun with the same settings skips what is done (``runs/``).
``--smoke`` runs everything on a handful of pairs (the test suite runs it).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from functools import partial
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# OpenMP threads that spin while waiting steal the CPU from each other when the machine is shared: measured
# here, 2 spinning threads ran a batch 5-7x slower than 1 thread under load, passive ones as fast or faster.
# (Set before torch is imported: OpenMP reads it once.)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from write_readme import read_table  # noqa: E402

from eclens.errors import EclensError  # noqa: E402
from eclens.runs import atomic_write, read_manifest, write_json  # noqa: E402
from eclens.runs import write_table as write_run_table  # noqa: E402
from eclens.tables import read_table_file, table_file  # noqa: E402


def write_table(df: pd.DataFrame, path: Path) -> Path:
    """:func:`eclens.runs.write_table`; an analysis that found nothing to tabulate (a frame without
    columns, e.g. no stable heads on a random-weight model) writes a header-only table with one column,
    ``none``, so the file still reads back as "no rows"."""
    if not len(df.columns):
        df = pd.DataFrame(columns=["none"])
    return write_run_table(df, path)

METRICS_SHOWN = ("logit_diff", "kl")
MAIN_HOOK = "hook_resid_post"
ALPHA = 0.05
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


# ------------------------------------------------------------------------ configuration


@dataclass
class StudyConfig:
    """Everything that determines the numbers. Defaults fit an idle 2-core CPU in ~20 minutes."""

    blimp: str = "../shared/data/blimp"
    model: str = "smollm2-135m"
    device: str = "cpu"
    dtype: str = "float32"
    seed: int = 0
    n_per_category: int = 100          # template pairs per category
    # diff: the residual stream (resid_post; resid_pre of layer L+1 is the same tensor), attention and MLP outputs,
    # MLP neurons and per-head attention outputs
    hooks: str = "hook_resid_post,hook_attn_out,hook_mlp_out,mlp.hook_post,attn.hook_z"
    batch_size: int = 16
    min_pairs: int | None = None       # diff's candidate rule (None: its default, 10)
    blimp_pairs: int = 300             # single-token BLiMP pairs for the diff, spread over paradigms
    blimp_accuracy_n: int = 100        # first N pairs of each paradigm scored for accuracy
    blimp_paradigms: int | None = None  # None: every paradigm file
    exact_pairs: int = 3
    patch_hooks: tuple[str, ...] = ("hook_resid_pre", "hook_attn_out", "hook_mlp_out")
    dims_pairs: int = 9                # one pair per category for the set tests
    max_sets: int = 6                  # candidate sets (kinds interleaved: 3 stable, 3 responsive)
    top_k: int = 10
    n_controls: int = 100
    matched_controls: int = 50         # σ-matched random sets per stable set (a second, stricter control)
    attribution_pairs: int = 4
    verify_top: int = 10
    report_examples: int = 3
    threads: int = 0                   # torch CPU threads (0: torch's default)
    png: bool = True
    smoke: bool = False

    def numbers(self) -> dict:
        d = asdict(self)
        d.pop("png")
        d.pop("threads")
        return d


SMOKE = dict(n_per_category=3, hooks="hook_resid_post", min_pairs=3, batch_size=16,
             blimp_pairs=10, blimp_accuracy_n=5, blimp_paradigms=2, exact_pairs=1, patch_hooks=("hook_resid_pre",),
             dims_pairs=2, max_sets=2, top_k=5, n_controls=5, matched_controls=3, attribution_pairs=2,
             verify_top=3, report_examples=1)


@dataclass
class Study:
    """Paths and state of one study folder (``--out``)."""

    root: Path
    cfg: StudyConfig
    timing: dict[str, dict] = field(default_factory=dict)
    log_lines: list[str] = field(default_factory=list)
    quiet: bool = False
    keep_state: bool = False  # keep each run's state/ (the diff accumulators) once its steps complete

    @property
    def results(self) -> Path:
        return self.root / "results"

    @property
    def figures(self) -> Path:
        return self.root / "figures"

    @property
    def runs(self) -> Path:
        return self.root / "runs"

    @property
    def templates_run(self) -> Path:
        return self.runs / "templates"

    @property
    def blimp_run(self) -> Path:
        return self.runs / "blimp"

    def log(self, msg: str) -> None:
        self.log_lines.append(msg)
        if not self.quiet:
            print(msg, file=sys.stderr, flush=True)

    # Resume bookkeeping for the study's own steps (run_pipeline keeps its own).
    def _state_path(self) -> Path:
        return self.runs / "study_state.json"

    def state(self) -> dict:
        p = self._state_path()
        if not p.exists():
            return {}
        try:
            return json.loads(p.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            return {}

    def done(self, step: str, key: str, files: list[Path]) -> bool:
        return self.state().get(step) == key and all(f.exists() for f in files)

    def mark(self, step: str, key: str) -> None:
        st = self.state()
        st[step] = key
        write_json(self._state_path(), st)


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


class _Timer:
    def __init__(self, study: Study, step: str):
        self.study, self.step = study, step

    def __enter__(self):
        self.t0 = time.perf_counter()
        self.study.log(f"[study] {self.step}: running")
        return self

    def __exit__(self, *exc):
        secs = round(time.perf_counter() - self.t0, 1)
        prev = self.study.timing.get(self.step, {})
        status = "failed" if exc[0] else prev.get("status", "done")
        self.study.timing[self.step] = {**prev, "seconds": secs, "status": status}
        self.study.log(f"[study] {self.step}: {status} in {secs:.1f} s")
        return False


def _skipped(study: Study, step: str) -> None:
    study.timing[step] = {"seconds": 0.0, "status": "skipped (done earlier)"}


# ------------------------------------------------------------------------------ steps


def _run_config(cfg: StudyConfig, pairs_file: str | None = None):
    from eclens.pipeline import RunConfig

    return RunConfig(pairs_file=pairs_file, n_per_category=cfg.n_per_category, seed=cfg.seed, hooks=cfg.hooks,
                     batch_size=cfg.batch_size, min_pairs=cfg.min_pairs, exact_pairs=cfg.exact_pairs,
                     patch_hooks=tuple(cfg.patch_hooks), dims_pairs=cfg.dims_pairs, max_sets=cfg.max_sets,
                     top_k=cfg.top_k, n_controls=cfg.n_controls, attribution_pairs=cfg.attribution_pairs,
                     verify_top=cfg.verify_top, metric="logit_diff", report_examples=cfg.report_examples)


CONTRAST_OFFSETS = [0, -1]  # the changed token, and the last token (the whole sentence read)


def diff_config(rc):
    """``ec run``'s diff settings, plus category contrasts at the last token as well as at ``p``: at ``p``
    the contrast also reflects *which kind of token* changed."""
    from eclens.diff import DiffConfig

    rule = {"min_pairs": rc.min_pairs} if rc.min_pairs is not None else {}
    return DiffConfig(hooks=rc.hooks, seed=rc.seed, contrast_offsets=CONTRAST_OFFSETS, **rule)


def diff_step(run: Path, model, pairs, *, rc, progress: bool, log):
    from eclens.steps import diff_step as run_diff_step

    return run_diff_step(run, model, pairs, diff_config(rc), batch_size=rc.batch_size, progress=progress)


def choose_study_sets(run: Path, top_k: int, max_sets: int) -> list[tuple[Any, str | None]]:
    """The candidate sets to test, as ``(DimSet, category of the pairs to test it on or None for all)``.

    Not simply the best-ranked cells: a dimension that does not change at ``p+k`` of an early layer is stable
    only because the change has not reached that position yet, and one that changes at ``p`` of layer 0 is
    responsive only because the input token differs. So:

    * **stable** (over all pairs): cells ranked by how much the *rest* of their layer moves there (the
      layer's mean median |Δ|/σ from ``layers.parquet``): dims that stay put while their layer changes; at most
      one set per hook, so the sets span the model's parts;
    * **responsive** (per category: over all pairs, signs disagree between categories, so few or none pass):
      cells after ``p`` first (the change's effect carried forward along the sentence: the last token, then
      ``p+1`` ...), then ``p``; ranked by the mean median |Δ|/σ of the set; one set per category, categories
      taken in turn, each tested on pairs of its own category.

    Cells with at least ``min(top_k, 5)`` passing dims come first of each kind (a 1-dim set has little power).
    """
    from eclens.patch import NOT_PATCHABLE, DimSet

    cand = read_table(run / "candidates.parquet")
    lay = read_table(run / "layers.parquet")
    if cand.empty:
        return []
    cand = cand[~cand["hook"].isin(NOT_PATCHABLE)]
    # the pooled rows only: per-swap-direction rows are tests of their own, chosen elsewhere
    if "swap_direction" in cand.columns:
        cand = cand[cand["swap_direction"] == "all"]
    if "swap_direction" in lay.columns:
        lay = lay[lay["swap_direction"] == "all"]
    groups = ["category", "hook", "layer", "offset"]
    min_size = min(top_k, 5)
    out_stable, out_resp = [], []
    st = cand[(cand["kind"] == "stable") & (cand["category"] == "all")]
    if not st.empty:
        move = lay.set_index(groups)["absz_median"] if not lay.empty else pd.Series(dtype=float)
        scored = []
        for key, g in st.groupby(groups):
            g = g.sort_values("rank").drop_duplicates("dim").head(top_k)
            scored.append((float(move.get(key, np.nan)), key, g))
        # Sets of at least min_size dims first (a test of 1-2 dims has little power), then by movement.
        scored.sort(key=lambda x: (len(x[2]) < min_size, -x[0] if np.isfinite(x[0]) else np.inf))
        seen_hooks: set[str] = set()
        for score, (_cat, h, L, o), g in scored:
            if h in seen_hooks or not np.isfinite(score):
                continue
            seen_hooks.add(h)
            out_stable.append((DimSet(h, int(L), g["dim"].astype(int).tolist(), int(o), "stable",
                                      f"{h}/L{int(L)}/o{int(o)}/stable[all]/k{len(g)}"), None))
    rs = cand[cand["kind"] == "responsive"]
    if not rs.empty:
        by_cat: dict[str, list] = {}
        for (cat, h, L, o), g in rs.groupby(groups):
            g = g.sort_values("rank").drop_duplicates("dim").head(top_k)
            pref = 0 if o == -1 else int(o) if o > 0 else 100  # last token, p+1, p+2, ..., then p
            by_cat.setdefault(cat, []).append(((len(g) < min_size, pref, -float(g["absz_median"].mean())),
                                               (cat, h, L, o), g))
        for v in by_cat.values():
            v.sort(key=lambda x: x[0])
        # categories whose best set is strongest go first
        cats = sorted(by_cat, key=lambda c: by_cat[c][0][0])
        for cat in cats:
            _, (c, h, L, o), g = by_cat[cat][0]
            out_resp.append((DimSet(h, int(L), g["dim"].astype(int).tolist(), int(o), "responsive",
                                    f"{h}/L{int(L)}/o{int(o)}/responsive[{c}]/k{len(g)}"),
                             None if c == "all" else c))
    sets: list = []
    while len(sets) < max_sets and (out_stable or out_resp):
        for q in (out_stable, out_resp):
            if q and len(sets) < max_sets:
                sets.append(q.pop(0))
    return sets


TEST_OF_KIND = {
    # stable dims: does the model use what stays put? Replace them by their dataset mean in the clean run.
    "stable": ("mean", "noise", "ablate: mean in clean run"),
    # responsive dims: do they carry the change's effect? Patch their clean values into the corrupt run.
    "responsive": ("patch", "denoise", "restore: patch clean→corrupt"),
}


def sets_step(run: Path, model, pairs, *, rc, progress: bool, log):
    """Each chosen set (:func:`choose_study_sets`) against ``n_controls`` random sets of the same size at the same
    hook, layer and position, with the intervention that tests its claim (:data:`TEST_OF_KIND`), on the pairs of
    its category: the library's dims step (``patch_dims.csv``, ``patch_dims_controls.csv``, ``patch_summary.json``)
    with the study's set chooser and tests."""
    from eclens.steps import DimsConfig, dims_step

    cfg = DimsConfig(tests={k: v[:2] for k, v in TEST_OF_KIND.items()}, metric="logit_diff", auto_metric=True,
                     n_controls=rc.n_controls, seed=rc.seed, batch_size=rc.patch_batch_size, n_pairs=rc.dims_pairs,
                     record={"top_k": rc.top_k, "max_sets": rc.max_sets, "chooser": "choose_study_sets"})
    out = dims_step(run, model, pairs, lambda r: choose_study_sets(r, rc.top_k, rc.max_sets), cfg, progress=progress)
    if out.status == "done":
        out.headline = f"{out.value['set'].nunique()} sets tested against {rc.n_controls} random sets each"
    return out


def matched_sets(s, cell: pd.DataFrame, n: int, rng: np.random.Generator, neighbours: int = 20) -> list:
    """``n`` random sets of the size of ``s`` whose dims match the spread σ of ``s``'s dims one by one: each of
    its dims is replaced by one of its ``neighbours`` nearest dims in log σ (outside ``s``, not massive).

    The stable rule (|Δ|/σ small) favours large-σ dims, and uniform random sets rarely hold one; these controls
    ask whether a stable set matters more than *equally variable* dims, not just more than typical ones.
    """
    from eclens.patch import DimSet

    pool = cell[~cell["dim"].isin(s.dims) & (cell["sigma_clean"] > 0) & ~cell["massive"].astype(bool)]
    if len(pool) < len(s.dims) + neighbours:
        return []
    logs = np.log(pool["sigma_clean"].to_numpy())
    pdims = pool["dim"].to_numpy()
    sig = cell.set_index("dim")["sigma_clean"]
    near = []
    for d in s.dims:
        sd = float(sig.get(d, np.nan))
        if not sd > 0:
            return []
        near.append(pdims[np.argsort(np.abs(logs - math.log(sd)), kind="stable")[:neighbours]])
    out = []
    for j in range(n):
        chosen: list[int] = []
        for cand in near:
            free = [int(x) for x in cand if int(x) not in chosen]
            chosen.append(int(rng.choice(free)))
        out.append(DimSet(s.hook, s.layer, chosen, s.offset, "matched", f"{s.label}/matched{j}"))
    return out


MATCHED_COLUMNS = ["set", "metric", "effect", "n_matched", "matched_sigma_ratio", "matched_mean", "matched_std",
                   "p_matched"]


def matched_step(run: Path, model, pairs, *, rc, progress: bool, log, n_matched: int) -> pd.DataFrame:
    """The stable sets' ablation again, against σ-matched random sets (:func:`matched_sets`) as the controls."""

    from eclens import patch as P
    from eclens.patch import DimSet
    from eclens.steps import spread_pairs

    t = read_table(run / "patch_dims.csv")
    if t.empty or n_matched < 1:
        return pd.DataFrame()
    rows = []
    for i, r in enumerate(t[t["kind"] == "stable"].to_dict("records")):
        s = DimSet(r["hook"], int(r["layer"]), [int(x) for x in str(r["dims"]).split()], int(r["offset"]),
                   "stable", r["set"])
        cell = read_table_file(run / "dims.parquet", columns=["dim", "sigma_clean", "massive"], filters=[
            ("category", "==", "all"), ("hook", "==", s.hook), ("layer", "==", s.layer),
            ("offset", "==", s.offset)])
        ms = matched_sets(s, cell, n_matched, np.random.default_rng([rc.seed, 77, i]))
        if not ms:
            log(f"[study] {s.label}: too few dims of similar spread for matched controls; skipped")
            continue
        cat = r.get("pairs_category", "all")
        # exactly the pairs the dims step tested this set on (its seeded, stratified draw, recorded)
        used = (((read_manifest(run).get("steps") or {}).get("patch") or {}).get("dims") or {}) \
            .get("params", {}).get("pairs")
        if isinstance(used, dict):
            used = used.get(f"{r['method']}:{r['direction']}:{cat or 'all'}")
        if used:
            by_id = {a.id: a for a in pairs}
            chosen = [by_id[i] for i in used if i in by_id]
        else:
            pool = [a for a in pairs if cat in (None, "all") or a.category == cat]
            chosen = spread_pairs(pool, rc.dims_pairs, rc.seed)
        res = P.dims_interventions(model, chosen, [s], method=r["method"], seed=rc.seed, direction=r["direction"],
                                   metric=r.get("decided_by", "kl"), batch_size=rc.patch_batch_size,
                                   progress=progress, control_sets=[[x.dims for x in ms]])
        tab, ctl = res.table.iloc[0], res.controls
        # How well the matching worked: the matched sets' σ over the candidate set's (1 = perfect). Outlier dims
        # have few neighbours of similar σ, so their matched sets fall short.
        sig = cell.set_index("dim")["sigma_clean"]
        own = float(np.median([sig[d] for d in s.dims]))
        match_ratio = float(np.median([np.median([sig[d] for d in x.dims]) / own for x in ms])) if own > 0 \
            else np.nan
        for m in METRICS_SHOWN:
            n_ok = int(np.isfinite(ctl[f"{m}_effect"].to_numpy(dtype=float)).sum()) if len(ctl) else 0
            rows.append({"set": s.label, "metric": m, "effect": float(tab[f"{m}_effect"]), "n_matched": n_ok,
                         "matched_sigma_ratio": match_ratio, "matched_mean": float(tab[f"{m}_control_mean"]),
                         "matched_std": float(tab[f"{m}_control_std"]), "p_matched": float(tab[f"{m}_p"])})
    out = pd.DataFrame(rows, columns=MATCHED_COLUMNS)
    write_table(out, run / "patch_dims_matched.csv")
    return out


def _matched_step(run: Path, model, pairs, *, rc, progress: bool, log, n_matched: int):
    from eclens.steps import StepOutcome

    out = matched_step(run, model, pairs, rc=rc, progress=progress, log=log, n_matched=n_matched)
    if out.empty:
        write_table(out, run / "patch_dims_matched.csv")
    return StepOutcome("done", ["patch_dims_matched.csv"], f"{out['set'].nunique() if len(out) else 0} stable sets "
                       f"against {n_matched} σ-matched random sets each")


def step_templates(study: Study, model) -> None:
    """The template run: ``ec run``'s steps (:mod:`eclens.steps`) chained by its resume engine
    (:func:`eclens.pipeline.run_steps`), with the study's diff contrasts, set chooser and tests, and the
    σ-matched controls as one more step."""
    from eclens.pipeline import Step, run_steps
    from eclens.steps import (
        AttributionConfig,
        ExactConfig,
        attribution_step,
        exact_step,
        pairs_step,
        report_step,
    )

    cfg, run = study.cfg, study.templates_run
    rc = _run_config(cfg)
    exact_cfg = ExactConfig(hooks=list(cfg.patch_hooks), direction="both", batch_size=rc.patch_batch_size,
                            n_pairs=cfg.exact_pairs)
    attr_cfg = AttributionConfig(hooks=list(cfg.patch_hooks), direction="denoise", verify_top=cfg.verify_top,
                                 seed=cfg.seed, batch_size=rc.patch_batch_size, n_pairs=cfg.attribution_pairs)
    fns = {
        "pairs": lambda run, model, pairs, progress, log: pairs_step(
            run, model, n_per_category=cfg.n_per_category, seed=cfg.seed, manifest={"seed": cfg.seed}),
        "diff": partial(diff_step, rc=rc),
        "exact": lambda run, model, pairs, progress, log: exact_step(run, model, pairs, exact_cfg, progress=progress),
        "sets": partial(sets_step, rc=rc),
        "matched": partial(_matched_step, rc=rc, n_matched=cfg.matched_controls),
        "attribution": lambda run, model, pairs, progress, log: attribution_step(run, model, pairs, attr_cfg,
                                                                                 progress=progress),
        "report": lambda run, model, pairs, progress, log: report_step(run, model, n_examples=cfg.report_examples),
    }
    params = {"pairs": ("n_per_category", "seed"), "diff": ("hooks", "batch_size", "min_pairs", "seed"),
              "exact": ("exact_pairs", "patch_hooks"), "sets": ("dims_pairs", "max_sets", "top_k", "n_controls", "seed"),
              "matched": ("matched_controls",), "attribution": ("attribution_pairs", "verify_top", "patch_hooks", "seed"),
              "report": ("report_examples",)}
    steps = [Step(name, fns[name], {k: getattr(cfg, k) for k in keys}) for name, keys in params.items()]
    res = run_steps(run, model, steps, config=cfg.numbers(), log=lambda m: study.log(f"[study] templates {m}"),
                    progress=not study.quiet, manifest={"seed": cfg.seed}, keep_state=study.keep_state)
    info = {s.step: {"status": "skipped (done earlier)" if s.status == "skipped" else s.status, "seconds": s.seconds}
            for s in res.steps}
    skipped = all(v["status"].startswith("skipped") for v in info.values())
    study.timing["templates"] = {"status": "skipped (done earlier)" if skipped else "done", "steps": info}


def _file_hash(path: Path) -> str:
    from eclens.runs import file_sha256

    return file_sha256(path)[:16]


def blimp_files(cfg: StudyConfig) -> list[Path]:
    d = Path(cfg.blimp)
    if not d.is_dir():
        raise EclensError(f"{d}: no BLiMP folder; pass --blimp FOLDER (the *.jsonl paradigm files, e.g. "
                          "../shared/data/blimp)")
    files = sorted(d.glob("*.jsonl"))
    if not files:
        raise EclensError(f"{d}: no *.jsonl BLiMP paradigm files in this folder; pass --blimp FOLDER")
    return files


def select_blimp_pairs(cfg: StudyConfig, tokenizer, prepend_bos: bool) -> tuple[list, pd.DataFrame]:
    """A seeded sample of single-token BLiMP pairs spread evenly over the paradigms that have any.

    Returns ``(pairs, yield_report)``; categories become ``blimp/<linguistics_term>`` so the
    diff has per-phenomenon rows with enough pairs each.
    """
    from eclens.pairs import MinimalPair
    from eclens.sources.blimp import import_blimp

    files = blimp_files(cfg)
    reports, by_uid = [], {}
    for f in files:
        # One file at a time: the smoke run stops after the paradigms it needs.
        pairs, rep = import_blimp(f, tokenizer, prepend_bos=prepend_bos, only_valid=True)
        reports.append(rep)
        if pairs:
            by_uid[pairs[0].meta["UID"]] = pairs
        if cfg.blimp_paradigms and len(by_uid) >= cfg.blimp_paradigms:
            break
    report = pd.concat(reports, ignore_index=True)
    if not by_uid:
        raise EclensError(f"{cfg.blimp}: no BLiMP pair is a single-token change under this model's tokenizer")
    rng = random.Random(cfg.seed)
    queues = {}
    for uid in sorted(by_uid):
        q = list(by_uid[uid])
        rng.shuffle(q)
        queues[uid] = q
    chosen: list = []
    while len(chosen) < cfg.blimp_pairs and any(queues.values()):
        for uid in sorted(queues):
            if queues[uid] and len(chosen) < cfg.blimp_pairs:
                chosen.append(queues[uid].pop())
    out = [MinimalPair(p.id, p.clean, p.corrupt, f"blimp/{p.meta['linguistics_term']}", p.source, p.meta)
           for p in chosen]
    sel = pd.Series([p.meta["UID"] for p in out]).value_counts()
    report["selected"] = report["UID"].map(sel).fillna(0).astype(int)
    return out, report


def step_blimp_diff(study: Study, model) -> None:
    """A seeded BLiMP sample (:func:`select_blimp_pairs`), aligned and diffed by the library's pairs and diff
    steps, chained by the same resume engine as the template run."""
    from eclens.pairs import write_jsonl
    from eclens.pipeline import Step, run_steps
    from eclens.steps import pairs_step

    cfg, run = study.cfg, study.blimp_run
    rc = _run_config(cfg)
    yield_csv = study.results / "blimp_yield.csv"

    def blimp_pairs(run: Path, model, _pairs, *, progress: bool, log):
        pairs, report = select_blimp_pairs(cfg, model.tokenizer, bool(model.cfg.default_prepend_bos))
        write_table(report, yield_csv)
        src = run / "input_pairs.jsonl"
        write_jsonl(src, pairs)
        out = pairs_step(run, model, src, manifest={"seed": cfg.seed})
        # the yield table lives with the study's results; a rerun redoes this step when it is gone
        out.files += ["input_pairs.jsonl", os.path.relpath(yield_csv, run)]
        return out

    keys = ("blimp", "seed", "blimp_pairs", "blimp_paradigms")
    steps = [Step("pairs", blimp_pairs, {k: getattr(cfg, k) for k in keys}),
             Step("diff", partial(diff_step, rc=rc), {k: getattr(cfg, k) for k in ("hooks", "batch_size", "min_pairs",
                                                                                    "seed")})]
    res = run_steps(run, model, steps, config=cfg.numbers(), log=lambda m: study.log(f"[study] blimp {m}"),
                    progress=not study.quiet, manifest={"seed": cfg.seed}, keep_state=study.keep_state)
    if all(s.status == "skipped" for s in res.steps):
        _skipped(study, "blimp_diff")


def wilson(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson score 95 % interval for a binomial proportion (good at p near 0 or 1 and small n)."""
    if n == 0:
        return math.nan, math.nan
    p = k / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return max(0.0, mid - half), min(1.0, mid + half)


def step_blimp_accuracy(study: Study, model) -> None:
    from eclens.evaluate import blimp_accuracy, load_reference_results
    from eclens.model import model_id

    cfg = study.cfg
    out, out_t = study.results / "blimp_accuracy.csv", study.results / "blimp_accuracy_terms.csv"
    key = _key("blimp_accuracy", cfg.blimp_accuracy_n, cfg.blimp_paradigms, cfg.blimp, model_id(model))
    if study.done("blimp_accuracy", key, [out, out_t]):
        _skipped(study, "blimp_accuracy")
        return
    files = blimp_files(cfg)
    folder = Path(cfg.blimp)
    if cfg.blimp_paradigms:
        # blimp_accuracy reads a folder: give it one with just the first N paradigm files (links).
        folder = study.runs / "blimp_subset"
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.glob("*.jsonl"):
            old.unlink()
        for f in files[: cfg.blimp_paradigms]:
            (folder / f.name).symlink_to(f.resolve())
    acc = blimp_accuracy(model, folder, n_per_paradigm=cfg.blimp_accuracy_n)
    ci = [wilson(int(k), int(n)) for k, n in zip(acc["correct"], acc["n"])]
    acc["ci_low"] = [c[0] for c in ci]
    acc["ci_high"] = [c[1] for c in ci]
    ref_path = Path(cfg.blimp).parent / "blimp-results" / "models_summary.jsonl"
    ref = load_reference_results(ref_path) if ref_path.exists() else None
    if ref is not None:
        per = ref[ref["UID"] != "overall"].set_index("UID")
        acc["gpt2"] = acc["UID"].map(per["gpt2"])
    else:
        acc["gpt2"] = np.nan
    terms = []
    groups = [*((t, g) for t, g in acc.groupby("linguistics_term", sort=True)), ("overall", acc)]
    for term, g in groups:
        k, n = int(g["correct"].sum()), int(g["n"].sum())
        lo, hi = wilson(k, n)
        row = {"linguistics_term": term, "paradigms": int(len(g)), "n": n, "correct": k, "accuracy": k / n,
               "ci_low": lo, "ci_high": hi,
               # GPT-2's published figures average paradigms of 1,000 pairs each (Warstadt et al., 2020)
               "gpt2_paradigm_mean": float(g["gpt2"].mean()) if g["gpt2"].notna().any() else np.nan}
        if ref is not None:
            r = ref[(ref["UID"] == "overall") & (ref["linguistics_term"] == term)]
            row["gpt2_published"] = float(r["gpt2"].iloc[0]) if len(r) else np.nan
        terms.append(row)
    write_table(acc, out)
    write_table(pd.DataFrame(terms), out_t)
    study.mark("blimp_accuracy", key)


# ----------------------------------------------------------------------------- analysis


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def _f(x) -> float | None:
    """A JSON-safe float (NaN -> None)."""
    if x is None:
        return None
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


LAYER_COLS = ("n", "rel_l2_mean", "rel_l2_median", "cos_mean", "absz_median", "absz_mean", "frac_under_mean",
              "sign_consistency_mean", "dir_consistency", "loo_cos_median", "n_massive", "rms_ratio_max",
              "rms_ratio_dim", "n_stable", "n_responsive")


def analyse_layers(runs: dict[str, Path]) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """Per-layer profiles (category all at every offset; every category at p) and their headline numbers."""
    alls, cats, find = [], [], {}
    for name, run in runs.items():
        lay = read_table(run / "layers.parquet")
        if lay.empty:
            continue
        if "swap_direction" in lay.columns:  # the pooled rows (per-direction rows are in the run's own table)
            lay = lay[lay["swap_direction"].astype(str) == "all"]
        cols = [c for c in LAYER_COLS if c in lay.columns]
        a = lay[lay["category"] == "all"][["hook", "layer", "offset", *cols]].copy()
        a.insert(0, "dataset", name)
        alls.append(a)
        keep = ("n", "rel_l2_mean", "absz_median", "n_stable", "n_responsive", "dir_consistency", "loo_cos_median")
        c = lay[lay["offset"].isin([0, -1])][["category", "hook", "layer", "offset",
                                              *[x for x in keep if x in lay.columns]]].copy()
        c.insert(0, "dataset", name)
        cats.append(c)
        f: dict = {}
        for hook, g in a.groupby("hook"):
            hf: dict = {}
            for off, go_ in g.groupby("offset"):
                go_ = go_.dropna(subset=["rel_l2_mean"])
                if go_.empty:
                    continue
                peak = go_.loc[go_["rel_l2_mean"].idxmax()]
                last = go_.loc[go_["layer"].idxmax()]
                hf[str(int(off))] = {"peak_layer": int(peak["layer"]), "peak_rel_l2": _f(peak["rel_l2_mean"]),
                                     "last_layer_rel_l2": _f(last["rel_l2_mean"]),
                                     "mean_rel_l2": _f(go_["rel_l2_mean"].mean()),
                                     "n_stable": int(go_["n_stable"].sum()),
                                     "n_responsive": int(go_["n_responsive"].sum()),
                                     "n_pairs": int(go_["n"].max())}
                for kind in ("stable", "responsive"):
                    col = f"n_{kind}"
                    if go_[col].max() > 0:
                        top = go_.loc[go_[col].idxmax()]
                        hf[str(int(off))][f"most_{kind}_layer"] = int(top["layer"])
                        hf[str(int(off))][f"most_{kind}_count"] = int(top[col])
            f[hook] = hf
        find[name] = f
    return (pd.concat(alls, ignore_index=True) if alls else pd.DataFrame(),
            pd.concat(cats, ignore_index=True) if cats else pd.DataFrame(), find)


def analyse_candidates(runs: dict[str, Path]) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, dict]:
    """Counts per hook/offset/kind, the strongest candidates, and how consistent they are across
    categories and across the two datasets."""
    counts, tops, cons = [], [], []
    cands: dict[str, pd.DataFrame] = {}
    find: dict = {}
    for name, run in runs.items():
        c = read_table(run / "candidates.parquet")
        cands[name] = c
        if c.empty:
            find[name] = {"stable": 0, "responsive": 0}
            continue
        # n_passing: every dim that passed the rule in the cell (the table lists at most max_candidates of them)
        cell = c.drop_duplicates(["category", "hook", "layer", "offset", "kind"])
        cnt = (cell.groupby(["category", "hook", "offset", "kind"])
               .agg(n_cells=("layer", "size"), n_dims=("n_passing", "sum")).reset_index())
        cnt.insert(0, "dataset", name)
        counts.append(cnt)
        a = c[c["category"] == "all"]
        find[name] = {k: int(cell[(cell["category"] == "all") & (cell["kind"] == k)]["n_passing"].sum())
                      for k in ("stable", "responsive")}
        for (_hook, kind), g in a.groupby(["hook", "kind"]):
            score, asc = ("absz_q90", True) if kind == "stable" else ("absz_median", False)
            t = g.sort_values(score, ascending=asc, kind="stable").head(30)
            t = t[["category", "hook", "layer", "offset", "dim", "unit", "head", "kind", "rank", "n", "absz_median",
                   "absz_q90", "frac_under", "sign_consistency", "mean_delta", "sigma_clean"]].copy()
            t.insert(0, "dataset", name)
            tops.append(t)
        # Across categories: of the dims listed for "all", the share also listed in at least half of the
        # categories that have enough pairs for the rule at that hook and offset.
        sub = c[c["category"] != "all"]
        n_cats = sub["category"].nunique()
        if n_cats:
            keycols = ["hook", "layer", "offset", "dim", "kind"]
            per = sub.groupby(keycols)["category"].nunique().rename("n_categories").reset_index()
            m = a.merge(per, on=keycols, how="left").fillna({"n_categories": 0})
            for (hook, kind), g in m.groupby(["hook", "kind"]):
                cons.append({"dataset": name, "hook": hook, "kind": kind, "n_all": int(len(g)),
                             "n_categories_total": int(n_cats),
                             "median_categories": _f(g["n_categories"].median()),
                             "frac_in_half_of_categories": _f((g["n_categories"] >= n_cats / 2).mean()),
                             "frac_in_no_category": _f((g["n_categories"] == 0).mean())})
    # Across datasets: templates vs BLiMP, same (hook, layer, offset, dim, kind) among the listed "all" candidates.
    cross = {}
    if len(cands) == 2 and all(not v.empty for v in cands.values()):
        (na, ca), (nb, cb) = cands.items()
        keycols = ["hook", "layer", "offset", "dim", "kind"]
        sa = set(map(tuple, ca[ca["category"] == "all"][keycols].to_numpy().tolist()))
        sb = set(map(tuple, cb[cb["category"] == "all"][keycols].to_numpy().tolist()))
        for kind in ("stable", "responsive"):
            ka = {x for x in sa if x[4] == kind}
            kb = {x for x in sb if x[4] == kind}
            inter = ka & kb
            cross[kind] = {"n_" + na: len(ka), "n_" + nb: len(kb), "n_both": len(inter),
                           "jaccard": _f(len(inter) / len(ka | kb)) if ka | kb else None}
            for hook in sorted({x[0] for x in ka | kb}):
                ha, hb = {x for x in ka if x[0] == hook}, {x for x in kb if x[0] == hook}
                cons.append({"dataset": f"{na}&{nb}", "hook": hook, "kind": kind, "n_all": len(ha & hb),
                             "n_categories_total": None, "median_categories": None,
                             "frac_in_half_of_categories": None, "frac_in_no_category": None,
                             "jaccard_across_datasets": _f(len(ha & hb) / len(ha | hb)) if ha | hb else None})
    find["across_datasets"] = cross
    return (pd.concat(counts, ignore_index=True) if counts else pd.DataFrame(),
            pd.concat(tops, ignore_index=True) if tops else pd.DataFrame(), pd.DataFrame(cons), find)


def _ranges(xs) -> str:
    """``[0, 1, 2, 5, 7, 8]`` -> ``"0-2, 5, 7-8"``."""
    xs = sorted(set(int(x) for x in xs))
    out, i = [], 0
    while i < len(xs):
        j = i
        while j + 1 < len(xs) and xs[j + 1] == xs[j] + 1:
            j += 1
        out.append(str(xs[i]) if i == j else f"{xs[i]}-{xs[j]}")
        i = j + 1
    return ", ".join(out)


def _offset_name(o) -> str:
    o = int(o)
    return "p" if o == 0 else "last" if o == -1 else f"p+{o}"


MASSIVE_COLUMNS = ["dataset", "hook", "dim", "n_cells_massive", "layers", "positions", "rms_ratio_max",
                   "mean_clean_at_max", "layer_at_max", "position_at_max", "absz_median_at_massive",
                   "others_absz_median", "frac_under_at_massive", "sign_consistency_at_massive"]


def analyse_massive(runs: dict[str, Path]) -> tuple[pd.DataFrame, dict]:
    """How the massive-activation dimensions behave: where they are massive, how large, and how much they move
    (normalised) compared with the other dimensions at the same cells."""

    rows, find = [], {}
    for name, run in runs.items():
        p = run / "dims.parquet"
        if not p.exists():
            continue
        cols = ["category", "hook", "layer", "offset", "dim", "massive", "rms_ratio", "mean_clean",
                "absz_median", "sign_consistency", "frac_under"]
        d = read_table_file(p, columns=cols, filters=[("category", "==", "all")])
        ref = (d[~d["massive"]].groupby(["hook", "layer", "offset"])["absz_median"].median()
               .rename("others_absz_median"))
        m = d[d["massive"]].join(ref, on=["hook", "layer", "offset"])
        for (hook, dim), g in m.groupby(["hook", "dim"]):
            top = g.loc[g["rms_ratio"].idxmax()]
            rows.append({"dataset": name, "hook": hook, "dim": int(dim), "n_cells_massive": int(len(g)),
                         "layers": _ranges(g["layer"]),
                         "positions": " ".join(_offset_name(o) for o in sorted(set(g["offset"].astype(int)),
                                                                               key=lambda o: (o < 0, o))),
                         "rms_ratio_max": _f(top["rms_ratio"]), "mean_clean_at_max": _f(top["mean_clean"]),
                         "layer_at_max": int(top["layer"]), "position_at_max": _offset_name(top["offset"]),
                         "absz_median_at_massive": _f(g["absz_median"].median()),
                         "others_absz_median": _f(g["others_absz_median"].median()),
                         "frac_under_at_massive": _f(g["frac_under"].median()),
                         "sign_consistency_at_massive": _f(g["sign_consistency"].median())})
        sub = [r for r in rows if r["dataset"] == name]
        find[name] = {"n": len(sub), "by_hook": {h: sorted(r["dim"] for r in sub if r["hook"] == h)
                                                 for h in sorted({r["hook"] for r in sub})}}
    return pd.DataFrame(rows, columns=MASSIVE_COLUMNS), find


def analyse_stable_heads(run: Path, model, n_sentences: int = 64, share: float = 0.9) -> tuple[pd.DataFrame, dict]:
    """Whole attention heads whose output does not change at any aligned position (at least ``share`` of their
    ``attn.hook_z`` dims pass the stable share ``frac_under >= 0.9``), and where they look: their mean attention,
    from the changed token on, to the first token and to the changed token, on clean template sentences."""
    import torch

    from eclens.pairs import load_aligned
    from eclens.steps import spread_pairs

    p = run / "dims.parquet"
    if not p.exists() or model is None:
        return pd.DataFrame(), {}
    try:
        d = read_table_file(p, columns=["hook", "layer", "offset", "head", "frac_under"],
                          filters=[("category", "==", "all"), ("hook", "==", "attn.hook_z")])
    except Exception:  # noqa: BLE001 - no attn.hook_z in this run (e.g. the smoke hooks)
        return pd.DataFrame(), {}
    if d.empty:
        return pd.DataFrame(), {}
    d["stable"] = d["frac_under"] >= 0.9
    g = d.groupby(["layer", "head", "offset"])["stable"].mean().unstack()
    whole = g[(g >= share).all(axis=1)]
    if whole.empty:
        return pd.DataFrame(), {"n_heads": 0}
    pairs = spread_pairs(load_aligned(run / "pairs.jsonl"), n_sentences)
    layers = sorted({int(L) for L, _ in whole.index})
    names = [f"blocks.{L}.attn.hook_pattern" for L in layers]
    to_first: dict[int, list] = {L: [] for L in layers}
    to_p: dict[int, list] = {L: [] for L in layers}
    dev = next(model.parameters()).device
    with torch.inference_mode():
        for a in pairs:
            toks = torch.tensor([a.clean_ids], device=dev)
            _, cache = model.run_with_cache(toks, names_filter=lambda n: n in names)
            for L, n in zip(layers, names):
                pat = cache[n][0].float()  # [head, q, k]
                q = slice(a.position, a.length)
                to_first[L].append(pat[:, q, 0].mean(-1).cpu())
                to_p[L].append(pat[:, q, a.position].mean(-1).cpu())
    rows = []
    for L in layers:
        f1 = torch.stack(to_first[L]).mean(0)
        fp = torch.stack(to_p[L]).mean(0)
        for h in range(len(f1)):
            rows.append({"layer": L, "head": h, "whole_head_stable": (L, h) in whole.index,
                         "stable_share_min": _f(g.loc[(L, h)].min()) if (L, h) in g.index else None,
                         "attn_to_first_token": float(f1[h]), "attn_to_changed_token": float(fp[h]),
                         "n_sentences": len(pairs)})
    df = pd.DataFrame(rows)
    st = df[df["whole_head_stable"]]
    others = df[~df["whole_head_stable"]]
    find = {"n_heads": int(len(st)), "heads": [f"L{r['layer']}.H{r['head']}" for r in st.to_dict("records")],
            "attn_to_first_token": _f(st["attn_to_first_token"].mean()),
            "attn_to_changed_token": _f(st["attn_to_changed_token"].mean()),
            "others_same_layer_attn_to_first_token": _f(others["attn_to_first_token"].mean()) if len(others)
            else None, "n_sentences": len(pairs)}
    return df, find


def stable_breakdown(la: pd.DataFrame, heads: dict, d_head: int | None) -> dict:
    """Where the stable dims of the template run (all pairs) sit: in cells the change has barely reached (the
    residual stream's relative change there below 0.1), in whole heads that never change, or elsewhere."""
    t = la[(la["dataset"] == "templates")] if not la.empty else la
    if t.empty or "n_stable" not in t:
        return {}
    rel = t[t["hook"] == MAIN_HOOK].set_index(["layer", "offset"])["rel_l2_mean"]
    sink = {}
    for h in heads.get("heads", []):
        L = int(h.split(".")[0][1:])
        sink[L] = sink.get(L, 0) + 1
    out = {"total": 0, "barely_reached": 0, "whole_stable_heads": 0, "elsewhere": 0, "at_p_elsewhere": 0}
    for r in t[t["n_stable"] > 0].to_dict("records"):
        n = int(r["n_stable"])
        out["total"] += n
        if float(rel.get((r["layer"], r["offset"]), np.nan)) < 0.1:
            out["barely_reached"] += n
            continue
        if r["hook"] == "attn.hook_z" and r["layer"] in sink and d_head:
            k = min(n, sink[int(r["layer"])] * d_head)
            out["whole_stable_heads"] += k
            n -= k
        out["elsewhere"] += n
        if r["offset"] == 0:
            out["at_p_elsewhere"] += n
    return out


def analyse_contrasts(run: Path) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, dict]:
    """Grammar / meaning / typo contrasts: one effect (difference of group means) per measure, hook, layer and
    offset, with a cluster-bootstrap interval and a cluster-permutation p (BH over every row of a measure)."""
    p = run / "contrasts.parquet"
    if not p.exists():
        return pd.DataFrame(), pd.DataFrame(), pd.DataFrame(), {}
    con = pd.read_parquet(p)
    if con.empty:
        return pd.DataFrame(), pd.DataFrame(), pd.DataFrame(), {"n_tests": 0}
    con = con.dropna(subset=["p"])
    con["significant"] = con["q"] <= ALPHA
    con["position"] = con["offset"].map(_offset_name)
    keys = ["contrast", "measure", "position"]
    summ = (con.groupby([*keys, "hook"])
            .agg(n_tests=("p", "size"), n_significant=("significant", "sum"), min_q=("q", "min"),
                 n_a=("n_a", "max"), n_b=("n_b", "max")).reset_index())
    summ["frac_significant"] = summ["n_significant"] / summ["n_tests"]
    by_layer = (con.groupby([*keys, "hook", "layer"])
                .agg(n_tests=("p", "size"), n_significant=("significant", "sum")).reset_index())
    top = (con[con["significant"]].sort_values("q", kind="stable").groupby(keys).head(10)
           [[*keys, "hook", "layer", "n_a", "n_b", "mean_a", "mean_b", "effect", "effect_lo", "effect_hi", "p",
             "q"]])
    find: dict = {"alpha": ALPHA, "rows": []}
    for (contrast, measure, pos), g in con.groupby(keys):
        sig = g[g["significant"]]
        e = {"contrast": contrast, "measure": measure, "position": pos, "n_tests": int(len(g)),
             "n_significant": int(len(sig)), "frac_significant": _f(len(sig) / len(g)), "min_q": _f(g["q"].min()),
             "n_a": int(g["n_a"].max()), "n_b": int(g["n_b"].max())}
        if len(sig):
            bl = sig.groupby(["hook", "layer"]).size().sort_values(ascending=False)
            e["top_hook_layer"] = [str(bl.index[0][0]), int(bl.index[0][1]), int(bl.iloc[0])]
            e["share_higher_in_a"] = _f((sig["effect"] > 0).mean())
            e["median_abs_effect"] = _f(sig["effect"].abs().median())
        find["rows"].append(e)
    return summ, by_layer, top, find


def test_label(method: str) -> str:
    return next((lab for m, _d, lab in TEST_OF_KIND.values() if m == method), str(method))


def analyse_causal(run: Path) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """The candidate sets against their random controls, with BH over every test shown (sets x metrics)."""
    from eclens.stats import bh_qvalues

    t, c = read_table(run / "patch_dims.csv"), read_table(run / "patch_dims_controls.csv")
    if t.empty:
        return pd.DataFrame(), pd.DataFrame(), {"n_sets": 0, "n_tests": 0, "n_beats": 0}
    rows = []
    for r in t.to_dict("records"):
        row = {"test": test_label(r["method"]), "set": r["set"], "kind": r.get("kind"),
               "pairs_category": r.get("pairs_category", "all"), "hook": r["hook"], "layer": int(r["layer"]),
               "offset": int(r["offset"]), "size": int(r["size"]), "dims": str(r["dims"]), "method": r["method"],
               "direction": r["direction"], "n_pairs": int(r["n_pairs"]), "n_controls": int(r["n_controls"])}
        for m in METRICS_SHOWN:
            for k in ("effect", "control_mean", "control_std", "z", "p", "q", "restored"):
                row[f"{m}_{k}"] = r.get(f"{m}_{k}")
        # The share of the clean-vs-corrupt gap the intervention moves: towards clean for a restore (restored),
        # towards corrupt for an ablation in the clean run (1 - restored).
        kr = r.get("kl_restored")
        row["kl_gap_moved"] = (kr if r["direction"] == "denoise" else 1 - kr) if kr is not None and \
            np.isfinite(kr) else np.nan
        rows.append(row)
    df = pd.DataFrame(rows)
    # A logit difference is read at p: a set after p cannot move it (its p is 1 by construction), so only
    # the KL is a test there. q over every remaining test in the table: the family the claims are made over.
    for m in METRICS_SHOWN:
        if m == "logit_diff":
            df.loc[df["offset"] != 0, [f"{m}_{k}" for k in ("z", "p", "q")]] = np.nan
    pcols = [f"{m}_p" for m in METRICS_SHOWN]
    flat = df[pcols].to_numpy(dtype=float).reshape(-1)
    q_all = np.asarray(bh_qvalues(flat), dtype=float).reshape(len(df), len(pcols))
    for i, m in enumerate(METRICS_SHOWN):
        df[f"{m}_q_all"] = q_all[:, i]
        df[f"{m}_beats_controls"] = df[f"{m}_q_all"] < ALPHA
        df[f"{m}_ratio_to_controls"] = np.nan
    if not c.empty:
        for (label, direction), g in c.groupby(["set", "direction"]):
            i = df.index[(df["set"] == label) & (df["direction"] == direction)]
            for m in METRICS_SHOWN:
                denom = g[f"{m}_effect"].abs().mean()
                if len(i) and denom > 0:
                    df.loc[i, f"{m}_ratio_to_controls"] = df.loc[i, f"{m}_effect"].abs() / denom
    # Random sets are drawn uniformly from the layer, but the stable rule (|Δ|/σ small) favours dims with a large
    # spread σ, and ablating a high-variance or large dim does more: say how the set compares with its layer.
    dims_pq = run / "dims.parquet"
    df["sigma_ratio"] = np.nan
    df["size_ratio"] = np.nan
    if dims_pq.exists():

        for i, r in df.iterrows():
            cell = read_table_file(dims_pq, columns=["dim", "sigma_clean", "rms_ratio"], filters=[
                ("category", "==", "all"), ("hook", "==", r["hook"]), ("layer", "==", int(r["layer"])),
                ("offset", "==", int(r["offset"]))])
            if cell.empty:
                continue
            mine = cell[cell["dim"].isin([int(x) for x in r["dims"].split()])]
            med = cell["sigma_clean"].median()
            if med > 0:
                df.loc[i, "sigma_ratio"] = mine["sigma_clean"].median() / med
            df.loc[i, "size_ratio"] = mine["rms_ratio"].median()  # rms |a| over the cell's median dim's
    # The stricter control for stable sets: σ-matched random sets (matched_step), BH over those tests.
    mt = read_table(run / "patch_dims_matched.csv")
    df["matched_sigma_ratio"] = np.nan
    if not mt.empty and "matched_sigma_ratio" in mt:
        df["matched_sigma_ratio"] = df["set"].map(mt.drop_duplicates("set").set_index("set")["matched_sigma_ratio"]
                                                  ).astype(float)
    for m in METRICS_SHOWN:
        for k in ("matched_mean", "p_matched", "q_matched"):
            df[f"{m}_{k}"] = np.nan
        if mt.empty:
            continue
        g = mt[mt["metric"] == m].set_index("set")
        has = df["set"].isin(g.index) & df[f"{m}_p"].notna()
        if has.any():
            df.loc[has, f"{m}_matched_mean"] = df.loc[has, "set"].map(g["matched_mean"]).astype(float)
            df.loc[has, f"{m}_p_matched"] = df.loc[has, "set"].map(g["p_matched"]).astype(float)
    mflat = df[[f"{m}_p_matched" for m in METRICS_SHOWN]].to_numpy(dtype=float)
    mq = np.asarray(bh_qvalues(mflat.reshape(-1)), dtype=float).reshape(mflat.shape)
    for i, m in enumerate(METRICS_SHOWN):
        df[f"{m}_q_matched"] = mq[:, i]
        df[f"{m}_beats_matched"] = df[f"{m}_q_matched"] < ALPHA
    n_tests = int(np.isfinite(flat).sum())
    find: dict = {"n_sets": int(df["set"].nunique()), "n_tests": n_tests,
                  "n_matched_tests": int(np.isfinite(mflat).sum()),
                  "n_beats_matched": int(sum(df[f"{m}_beats_matched"].sum() for m in METRICS_SHOWN)),
                  "n_matched": int(mt["n_matched"].max()) if not mt.empty else 0,
                  "n_beats": int(sum(df[f"{m}_beats_controls"].sum() for m in METRICS_SHOWN)),
                  "n_controls": int(df["n_controls"].max()), "n_pairs": int(df["n_pairs"].max()), "by_test": {}}
    for test, g in df.groupby("test", sort=False):
        find["by_test"][test] = {m: {"n_beats": int(g[f"{m}_beats_controls"].sum()),
                                     "n": int(g[f"{m}_p"].notna().sum()),
                                     "min_q_all": _f(g[f"{m}_q_all"].min()), "min_p": _f(g[f"{m}_p"].min())}
                                 for m in METRICS_SHOWN}
    return df, c, find


def analyse_attribution(run: Path) -> tuple[pd.DataFrame, dict]:
    from eclens.patch import attribution_summary

    att = read_table(run / "patch_attribution.csv")
    if att.empty:
        return pd.DataFrame(), {}
    ps = _read_json(run / "patch_summary.json").get("attribution", {})
    k = ps.get("verify_top") or None
    rows = [{"hook": "all", **attribution_summary(att, k)}]
    for hook, g in att.groupby("hook"):
        rows.append({"hook": hook, **attribution_summary(g, k)})
    # Where patches at p are excluded: attribution's known weak spot is the residual stream at p.
    later = att[att["position_kind"] != "changed"]
    rows.append({"hook": "all, positions after p", **attribution_summary(later, k)})
    df = pd.DataFrame(rows)
    for c in ("spearman", "spearman_median_pair", "topk_overlap"):
        if c not in df:
            df[c] = np.nan
    find = {"n_pairs": int(att["pair_id"].nunique()), "n_components": int(len(att)),
            "n_verified": int(att["verified"].sum()), "verify_top": k, "metric": ps.get("metric"),
            "by_hook": {r["hook"]: {x: _f(r.get(x)) for x in ("spearman", "spearman_median_pair", "topk_overlap",
                                                                 "n_verified")} for r in rows}}
    return df, find


def analyse_decay(runs: dict[str, Path], max_k: int = 8) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """How the one-token perturbation decays: next-token KL at p+k (diff's pairs.csv) and exact
    patching restoration per layer at p versus later positions."""
    rows, find = [], {}
    for name, run in runs.items():
        pr = read_table(run / "pairs.csv")
        if pr.empty or "kl" not in pr:
            continue
        kls = [json.loads(s) for s in pr["kl"]]
        cats = pr["category"].astype(str)
        groups = [c.split("/", 1)[0] for c in cats] if name == "templates" else ["blimp"] * len(cats)
        for grp in ["all", *sorted(set(groups))]:
            idx = [i for i, g in enumerate(groups) if grp == "all" or g == grp]
            for k in [*range(max_k + 1), -1]:
                vals = [kls[i][k] if k >= 0 and k < len(kls[i]) else (kls[i][-1] if k == -1 else None)
                        for i in idx]
                vals = np.array([v for v in vals if v is not None], dtype=float)
                if not len(vals):
                    continue
                rows.append({"dataset": name, "group": grp, "offset": k, "n": int(len(vals)),
                             "kl_mean": float(vals.mean()), "kl_median": float(np.median(vals)),
                             "kl_q90": float(np.quantile(vals, 0.9))})
        d = pd.DataFrame([r for r in rows if r["dataset"] == name and r["group"] == "all"])
        if not d.empty:
            k0 = d[d["offset"] == 0]
            f = {"kl_mean_at_p": _f(k0["kl_mean"].iloc[0]) if len(k0) else None}
            for k in (1, 2, 3, -1):
                dk = d[d["offset"] == k]
                if len(dk):
                    f[f"kl_mean_at_{'last' if k == -1 else f'p+{k}'}"] = _f(dk["kl_mean"].iloc[0])
                    f[f"n_at_{'last' if k == -1 else f'p+{k}'}"] = int(dk["n"].iloc[0])
            find[name] = f
    kl = pd.DataFrame(rows)
    ex = read_table(runs["templates"] / "patch_exact.csv") if "templates" in runs else pd.DataFrame()
    exact = pd.DataFrame()
    if not ex.empty:
        ex = ex[(ex["position_kind"] != "before") & (ex["head"] == -1)].copy()
        o = pd.to_numeric(ex["offset"], errors="coerce")
        ex["where"] = np.select([ex["position_kind"] == "changed", ex["position_kind"] == "last", o == 1],
                                ["p", "last", "p+1"], "p+2 .. last-1")
        # KL reads every position from p on, so it shows where along the sequence the change's effect sits;
        # the logit difference is read at p alone (patching p restores it fully at every layer).
        exact = (ex.groupby(["direction", "hook", "layer", "where"])
                 .agg(n_pairs=("pair_id", "nunique"), kl_restored=("kl_restored", "mean"),
                      logit_diff_restored=("logit_diff_restored", "mean")).reset_index())
        f = {}
        for (d_, h), g in exact.groupby(["direction", "hook"]):
            piv = g.pivot_table(index="layer", columns="where", values="kl_restored")
            e: dict = {}
            if "p" in piv:
                e["kl_restored_at_p_first_layer"] = _f(piv["p"].iloc[0])
                e["kl_restored_at_p_last_layer"] = _f(piv["p"].iloc[-1])
                below = piv.index[piv["p"] < 0.5]
                e["first_layer_p_below_half"] = int(below.min()) if len(below) else None
                if "last" in piv:
                    over = piv.index[piv["last"] > piv["p"]]
                    e["first_layer_last_beats_p"] = int(over.min()) if len(over) else None
                    e["kl_restored_at_last_last_layer"] = _f(piv["last"].iloc[-1])
            f[f"{d_}/{h}"] = e
        find["exact"] = f
        find["exact_pairs"] = int(ex["pair_id"].nunique())
    return kl, exact, find


def analyse(study: Study, model_entry: dict, model=None) -> dict:
    """Write the small result tables of ``results/`` and return the findings for ``study.json``."""
    R = study.results
    runs = {"templates": study.templates_run, "blimp": study.blimp_run}
    runs = {k: v for k, v in runs.items() if table_file(v, "layers") is not None}
    find: dict = {}
    # datasets
    ds = []
    for name, run in runs.items():
        c = read_table(run / "check.csv")
        if not c.empty:
            c.insert(0, "dataset", name)
            ds.append(c)
    datasets = pd.concat(ds, ignore_index=True) if ds else pd.DataFrame()
    write_table(datasets, R / "datasets.csv")
    find["datasets"] = {name: {"n_valid": int(g["valid"].sum()), "n_total": int(g["total"].sum()),
                               "categories": {r["category"]: int(r["valid"]) for r in g.to_dict("records")}}
                        for name, g in datasets.groupby("dataset")} if not datasets.empty else {}
    y = read_table(R / "blimp_yield.csv")
    if not y.empty:
        find["blimp_yield"] = {"paradigms_read": int(len(y)), "paradigms_with_single_token_pairs": int((y["valid"] > 0)
                                                                                                     .sum()),
                               "single_token_pairs": int(y["valid"].sum()), "total_pairs": int(y["total"].sum()),
                               "selected": int(y["selected"].sum())}
    for name, run in runs.items():
        s = _read_json(run / "summary.json")
        find.setdefault("diff", {})[name] = {k: s.get(k) for k in ("n_pairs", "n_sample", "rule", "hooks",
                                                                   "n_candidates", "massive_dims", "contrasts",
                                                                   "mean_kl_0", "mean_logprob_diff")}
    la, lc, f = analyse_layers(runs)
    write_table(la, R / "layers_all.csv")
    write_table(lc, R / "layers_by_category.csv")
    find["layers"] = f
    counts, tops, cons, f = analyse_candidates(runs)
    write_table(counts, R / "candidate_counts.csv")
    write_table(tops, R / "candidates_top.csv")
    write_table(cons, R / "candidate_consistency.csv")
    find["candidates"] = f
    mass, f = analyse_massive(runs)
    write_table(mass, R / "massive_dims.csv")
    find["massive"] = f
    if "templates" in runs:
        summ, by_layer, top, f = analyse_contrasts(runs["templates"])
        write_table(summ, R / "contrasts_summary.csv")
        write_table(by_layer, R / "contrasts_by_layer.csv")
        write_table(top, R / "contrasts_top.csv")
        find["contrasts"] = f
        causal, controls, f = analyse_causal(runs["templates"])
        write_table(causal, R / "causal_sets.csv")
        find["causal"] = f
        heads, f = analyse_stable_heads(runs["templates"], model)
        write_table(heads, R / "stable_heads.csv")
        find["stable_heads"] = f
        d_head = int(model.cfg.d_head) if model is not None and getattr(model.cfg, "d_head", None) else None
        find["stable_breakdown"] = stable_breakdown(la, f, d_head)
        att, f = analyse_attribution(runs["templates"])
        write_table(att, R / "attribution_vs_exact.csv")
        find["attribution"] = f
    kl, exact, f = analyse_decay(runs)
    write_table(kl, R / "decay_kl.csv")
    write_table(exact, R / "decay_exact_patching.csv")
    find["decay"] = f
    acc = read_table(R / "blimp_accuracy_terms.csv")
    if not acc.empty:
        o = acc[acc["linguistics_term"] == "overall"].iloc[0]
        per = read_table(R / "blimp_accuracy.csv")
        diff = (per["accuracy"] - per["gpt2"]).dropna()
        find["blimp_accuracy"] = {
            "n_per_paradigm": study.cfg.blimp_accuracy_n, "paradigms": int(o["paradigms"]), "n": int(o["n"]),
            "accuracy": _f(o["accuracy"]), "ci_low": _f(o["ci_low"]), "ci_high": _f(o["ci_high"]),
            "gpt2_published_overall": _f(o.get("gpt2_published")),
            "gpt2_same_paradigms": _f(o.get("gpt2_paradigm_mean")),
            "paradigms_below_gpt2_ci": int((per["ci_high"] < per["gpt2"]).sum()),
            "paradigms_above_gpt2_ci": int((per["ci_low"] > per["gpt2"]).sum()),
            "median_diff_vs_gpt2": _f(diff.median()) if len(diff) else None}
    return find


# ------------------------------------------------------------------------------ figures


def build_figures(study: Study) -> dict[str, Any]:
    """The write-up's figures as plotly figures (viz's where one fits), from the run folders and results/."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    from eclens import viz
    from eclens.report import RunData

    R, T = study.results, study.templates_run
    figs: dict[str, Any] = {}
    lay = read_table(T / "layers.parquet")
    if not lay.empty:
        figs["decay_layers_offsets"] = viz.layer_offset_heatmap(
            lay, hook=MAIN_HOOK, title="Relative L2 change ‖Δ‖/‖a‖ of resid_post by layer and position (templates)")
        figs["layers_by_category"] = viz.category_curves(
            lay, hook=MAIN_HOOK, offset=0, title="‖Δ‖/‖a‖ of resid_post at the changed token, per category")
    if not lay.empty and "n_stable" in lay:
        fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.12, subplot_titles=(
            "stable, all pairs: by position (all hooks)", "responsive, per category (all hooks and positions)"))
        a = lay[lay["category"] == "all"]
        for off_, g in sorted(a.groupby("offset"), key=lambda kv: (kv[0] < 0, kv[0])):
            g = g.groupby("layer")["n_stable"].sum()
            fig.add_trace(go.Scatter(x=g.index, y=g.values, mode="lines+markers", marker=dict(size=4),
                                     name=f"stable at {viz.offset_label(off_)}", legendgroup="s"), row=1, col=1)
        r = lay[lay["category"] != "all"]
        for cat, g in r.groupby("category"):
            g = g.groupby("layer")["n_responsive"].sum()
            if g.sum() == 0:
                continue
            fig.add_trace(go.Scatter(x=g.index, y=g.values, mode="lines+markers", marker=dict(size=4),
                                     name=f"responsive: {viz.esc(cat)}", legendgroup="r"), row=1, col=2)
        fig.update_xaxes(title="layer")
        fig.update_yaxes(title="dimensions passing the rule", type="log", row=1, col=1)
        fig.update_yaxes(type="log", row=1, col=2)
        figs["candidates_by_layer"] = viz._layout(fig, "Candidate dimensions per layer (templates)", height=440,
                                                  width=1100, legend=dict(font=dict(size=9)))
    rd = RunData(T) if T.exists() else None
    if rd is not None and rd.file("dims.parquet"):
        dims = rd.dims_slice(category="all", hook=MAIN_HOOK, offset=0)
        figs["dims_heatmap"] = viz.layer_dim_heatmap(
            dims, hook=MAIN_HOOK, massive=rd.massive_dims(dims), max_dims=576,
            title="Median |Δ|/σ per dimension of resid_post at p (templates; massive dims in red)")
    mass = read_table(R / "massive_dims.csv")
    if not mass.empty and rd is not None:

        m = mass[(mass["dataset"] == "templates") & (mass["hook"] == MAIN_HOOK)]
        dims_m = m.sort_values("rms_ratio_max", ascending=False)["dim"].astype(int).tolist()[:2]
        if dims_m:
            d = read_table_file(T / "dims.parquet", columns=["category", "hook", "layer", "offset", "dim", "rms_ratio",
                                                           "absz_median", "massive"],
                              filters=[("category", "==", "all"), ("hook", "==", MAIN_HOOK)])
            fig = make_subplots(rows=len(dims_m), cols=2, vertical_spacing=0.16,
                                subplot_titles=[t for dm in dims_m for t in
                                                (f"dim {dm}: mean |a| / median dim's", f"dim {dm}: median |Δ|/σ "
                                                 "(dotted: median of the other dims)")])
            palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd"]
            offs = sorted(d["offset"].unique(), key=lambda o: (o < 0, o))
            for i, dm in enumerate(dims_m, start=1):
                for j, o in enumerate(offs):
                    col = palette[j % len(palette)]
                    g = d[(d["dim"] == dm) & (d["offset"] == o)].sort_values("layer")
                    fig.add_trace(go.Scatter(x=g["layer"], y=g["rms_ratio"], name=viz.offset_label(o),
                                             legendgroup=str(o), showlegend=i == 1, line=dict(color=col)),
                                  row=i, col=1)
                    fig.add_trace(go.Scatter(x=g["layer"], y=g["absz_median"], name=viz.offset_label(o),
                                             legendgroup=str(o), showlegend=False, line=dict(color=col)),
                                  row=i, col=2)
                    oth = d[(d["offset"] == o) & ~d["massive"] & (d["dim"] != dm)].groupby("layer")["absz_median"] \
                        .median()
                    fig.add_trace(go.Scatter(x=oth.index, y=oth.values, showlegend=False, legendgroup=str(o),
                                             line=dict(color=col, dash="dot", width=1)), row=i, col=2)
                fig.add_hline(y=100, line=dict(color="gray", dash="dash"), row=i, col=1)
                fig.update_yaxes(type="log", row=i, col=1)
            fig.update_xaxes(title="layer")
            figs["massive_dims"] = viz._layout(
                fig, "Massive dimensions of resid_post (templates): size and normalised change, per position",
                height=330 * len(dims_m) + 80, width=1000)
    cbl = read_table(R / "contrasts_by_layer.csv")
    if not cbl.empty:
        cbl = cbl[cbl["measure"] == "abs"]
    if not cbl.empty and {"p", "last"} & set(cbl["position"]):
        contrasts = list(dict.fromkeys(cbl["contrast"]))
        positions = [x for x in ("p", "last") if x in set(cbl["position"])]
        fig = make_subplots(rows=len(contrasts), cols=len(positions), shared_yaxes=True, vertical_spacing=0.12,
                            subplot_titles=[f"{c} — at {x}" for c in contrasts for x in positions])
        palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b"]
        hooks = sorted(set(cbl["hook"]))
        for i, c in enumerate(contrasts, start=1):
            for j, x in enumerate(positions, start=1):
                for k, h in enumerate(hooks):
                    g = cbl[(cbl["contrast"] == c) & (cbl["position"] == x) & (cbl["hook"] == h)].sort_values("layer")
                    fig.add_trace(go.Scatter(x=g["layer"], y=g["n_significant"] / g["n_tests"], mode="lines",
                                             name=h, legendgroup=h, showlegend=(i == 1 and j == 1),
                                             line=dict(color=palette[k % len(palette)])), row=i, col=j)
            fig.update_yaxes(title="share of dims, q ≤ 0.05", row=i, col=1)
        fig.update_xaxes(title="layer", row=len(contrasts))
        figs["contrasts_by_layer"] = viz._layout(
            fig, "Category contrasts of |Δ|/σ: share of dimensions with BH q ≤ 0.05, per layer",
            height=260 * len(contrasts) + 120, width=1000)
    causal = read_table(R / "causal_sets.csv")
    ctrl = read_table(T / "patch_dims_controls.csv")
    if not causal.empty and not ctrl.empty:
        shown = [m for m in METRICS_SHOWN if causal[f"{m}_p"].notna().any()]
        fig = make_subplots(rows=1, cols=len(shown), subplot_titles=[
            f"{m} (mean change over pairs)" for m in shown], horizontal_spacing=0.08)
        for j, m in enumerate(shown, start=1):
            for r in causal.to_dict("records"):
                if pd.isna(r[f"{m}_p"]):
                    continue
                lab = (f"{r['kind']} {r['hook'].replace('hook_', '')} L{r['layer']} {viz.offset_label(r['offset'])}"
                       + (f" [{r['pairs_category']}]" if r["pairs_category"] != "all" else "")
                       + (" (ablate)" if r["method"] == "mean" else " (restore)"))
                g = ctrl[(ctrl["set"] == r["set"]) & (ctrl["direction"] == r["direction"])]
                fig.add_trace(go.Box(y=g[f"{m}_effect"], name=lab, marker_color="#9aa5b1", boxpoints="all",
                                     jitter=0.4, pointpos=0, marker=dict(size=3), line=dict(width=1),
                                     showlegend=False), row=1, col=j)
                sig = bool(r[f"{m}_q_all"] < ALPHA) if pd.notna(r[f"{m}_q_all"]) else False
                fig.add_trace(go.Scatter(x=[lab], y=[r[f"{m}_effect"]], mode="markers", showlegend=False,
                                         marker=dict(symbol="diamond", size=13, line=dict(width=1, color="white"),
                                                     color="#d62728" if sig else "#1f77b4")), row=1, col=j)
            fig.update_yaxes(title=f"change in {m}", row=1, col=j)
        fig.update_xaxes(tickangle=-35, tickfont=dict(size=9))
        figs["causal_sets"] = viz._layout(
            fig, "Candidate sets (diamonds; red = beats random sets at BH q < 0.05) vs random sets (grey)",
            height=560, width=560 * len(shown) + 100)
    att = read_table(T / "patch_attribution.csv")
    if not att.empty and att["verified"].any():
        figs["attribution_vs_exact"] = viz.attribution_scatter(att, title="Attribution patching vs exact patching")
    kl = read_table(R / "decay_kl.csv")
    if not kl.empty:
        fig = go.Figure()
        for (ds, grp), g in kl.groupby(["dataset", "group"]):
            if ds == "blimp" and grp != "all":  # one group: the same curve as "all"
                continue
            n0 = g.loc[g["offset"] == 0, "n"].max()
            # Later offsets exist only in longer sentences: keep those with at least a quarter of the pairs.
            g = g[(g["offset"] >= 0) & (g["n"] >= max(3, 0.25 * n0))].sort_values("offset")
            fig.add_trace(go.Scatter(x=g["offset"], y=g["kl_mean"], mode="lines+markers", name=f"{ds}: {grp}",
                                     line=dict(width=3 if grp == "all" else 1.5)))
        fig.update_xaxes(title="k: next-token distribution at position p + k")
        fig.update_yaxes(title="mean KL(clean ‖ corrupt), nats", type="log")
        figs["decay_kl"] = viz._layout(fig, "How far the one-token change moves the predictions downstream",
                                       height=420)
    ex = read_table(R / "decay_exact_patching.csv")
    if not ex.empty:
        fig = go.Figure()
        order = {"p": 0, "p+1": 1, "p+2 .. last-1": 2, "last": 3}
        g0 = ex[(ex["direction"] == "denoise") & (ex["hook"] == "hook_resid_pre")]
        for w, g in sorted(g0.groupby("where"), key=lambda kv: order.get(kv[0], 9)):
            fig.add_trace(go.Scatter(x=g["layer"], y=g["kl_restored"], mode="lines+markers",
                                     name=f"patch at {w}"))
        fig.update_xaxes(title="layer of the resid_pre patch")
        fig.update_yaxes(title="downstream KL restored (0 corrupt, 1 clean)")
        n = int(g0["n_pairs"].max()) if len(g0) else 0
        figs["decay_exact"] = viz._layout(
            fig, f"Exact patching clean→corrupt of one position of resid_pre ({n} pairs): where the effect sits",
            height=420)
    ex_full = read_table(T / "patch_exact.csv")
    if not ex_full.empty and rd is not None:
        pid = str(ex_full["pair_id"].iloc[0])
        pair = rd.pairs_by_id.get(pid)
        figs["patching_map"] = viz.patching_heatmap(
            ex_full, pair_id=pid, direction="denoise", hook="hook_resid_pre", metric="logit_diff_restored",
            tokens=rd.pair_tokens(pid), changed=int(pair["position"]) if pair else None,
            title=f"Exact patching map, one pair ({pair['category'] if pair else pid}): resid_pre, clean→corrupt")
    acc = read_table(R / "blimp_accuracy.csv")
    if not acc.empty:
        fig = go.Figure()
        for term, g in acc.groupby("linguistics_term"):
            fig.add_trace(go.Scatter(
                x=g["gpt2"], y=g["accuracy"], mode="markers", name=viz.esc(term), text=g["UID"],
                error_y=dict(type="data", symmetric=False, array=g["ci_high"] - g["accuracy"],
                             arrayminus=g["accuracy"] - g["ci_low"], thickness=1, width=0),
                hovertemplate="%{text}<br>GPT-2 %{x:.3f}<br>model %{y:.3f}<extra></extra>"))
        fig.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", line=dict(dash="dot", color="gray"),
                                 name="y = x", hoverinfo="skip"))
        fig.update_xaxes(title="GPT-2 (published, 1,000 pairs per paradigm)", range=[0, 1.02])
        fig.update_yaxes(title=f"this model (first {int(acc['n'].max())} pairs, Wilson 95% CI)", range=[0, 1.02])
        import plotly.express as px

        figs["blimp_accuracy"] = viz._layout(fig, "BLiMP accuracy per paradigm", height=560, width=820,
                                             legend=dict(font=dict(size=9)), colorway=px.colors.qualitative.Dark24)
    return figs


def export_png(figs: dict[str, Any], folder: Path, *, width: int = 960) -> dict[str, str]:
    """Render each plotly figure to PNG in headless chromium (Plotly.toImage); never downloads a browser.

    Returns ``{name: path or reason}``; without chromium or playwright the figures are skipped
    with the reason, and the study goes on.
    """
    from eclens import viz
    from eclens.runs import atomic_write

    if not figs:
        return {}
    if not CHROMIUM.exists():
        return {n: f"skipped: {CHROMIUM} not found (apt-get install -y chromium)" for n in figs}
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        return {n: "skipped: python package playwright not installed" for n in figs}
    import base64

    out: dict[str, str] = {}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.set_content("<!doctype html><html><head><meta charset='utf-8'><script>" + viz.plotly_bundle()
                             + "</script></head><body></body></html>")
            for name, fig in figs.items():
                spec = viz.figure_json(fig)
                lay = spec.get("layout", {})
                w, h = int(lay.get("width") or width), int(lay.get("height") or 450)
                url = page.evaluate(
                    "([spec, w, h]) => Plotly.toImage({data: spec.data, layout: spec.layout},"
                    " {format: 'png', width: w, height: h, scale: 1})", [spec, w, h])
                data = base64.b64decode(url.split(",", 1)[1])
                path = folder / f"{name}.png"
                atomic_write(path, data)
                out[name] = str(path)
        finally:
            browser.close()
    return out


def step_figures(study: Study) -> dict:
    figs = build_figures(study)
    info: dict[str, Any] = {"figures": {}}
    if study.cfg.png:
        study.figures.mkdir(parents=True, exist_ok=True)
        res = export_png(figs, study.figures)
        info["figures"] = {k: (os.path.relpath(v, study.root) if not v.startswith("skipped") else v)
                           for k, v in res.items()}
    else:
        info["figures"] = {k: "skipped: --no-png" for k in figs}
    rep = study.templates_run / "report.html"
    if rep.exists():
        size = rep.stat().st_size
        info["report_mb"] = round(size / 1e6, 2)
        dest = study.results / "report.html"
        with open(rep, "rb") as fh:
            atomic_write(dest, fh.read())
        info["report"] = os.path.relpath(dest, study.root)
    return info


# ------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> tuple[StudyConfig, argparse.Namespace]:
    d = StudyConfig()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blimp", default=d.blimp, help="folder of BLiMP *.jsonl paradigm files (default %(default)s)")
    ap.add_argument("--out", default=str(HERE), help="study folder: results/, figures/, runs/, README.md "
                    "(default: this script's folder)")
    ap.add_argument("--model", default=d.model)
    ap.add_argument("--device", default=d.device)
    ap.add_argument("--dtype", default=d.dtype)
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--smoke", action="store_true", help="a few pairs per category, few controls, 2 BLiMP "
                    "paradigms of 5 pairs (the test suite's run)")
    for f in fields(StudyConfig):
        if f.name in ("blimp", "model", "device", "dtype", "seed", "smoke", "png"):
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.name == "threads":
            ap.add_argument(flag, type=int, default=None, help="torch CPU threads (default: torch's own)")
            continue
        if f.name == "patch_hooks":
            ap.add_argument(flag, default=None, help=f"comma-separated (default {','.join(d.patch_hooks)})")
        elif f.name == "hooks":
            ap.add_argument(flag, default=None, help=f"diff hooks (default {d.hooks})")
        else:
            ap.add_argument(flag, type=int, default=None, help=f"default {getattr(d, f.name)}")
    ap.add_argument("--no-png", action="store_true", help="skip the PNG figures")
    ap.add_argument("--readme-only", action="store_true", help="only regenerate README.md from results/")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--keep-state", action="store_true", help="keep each run's state/ (the diff accumulators, "
                    "which only a resume or a merge reads) once its steps complete")
    a = ap.parse_args(argv)
    cfg = StudyConfig(blimp=a.blimp, model=a.model, device=a.device, dtype=a.dtype, seed=a.seed, smoke=a.smoke,
                      png=not a.no_png)
    if a.smoke:
        for k, v in SMOKE.items():
            setattr(cfg, k, v)
    for f in fields(StudyConfig):
        v = getattr(a, f.name, None)
        if f.name in ("blimp", "model", "device", "dtype", "seed", "smoke", "png") or v is None:
            continue
        setattr(cfg, f.name, tuple(x.strip() for x in v.split(",") if x.strip()) if f.name == "patch_hooks" else v)
    for name in ("n_per_category", "blimp_pairs", "blimp_accuracy_n", "exact_pairs", "dims_pairs", "max_sets",
                 "top_k", "n_controls", "attribution_pairs", "matched_controls"):
        if getattr(cfg, name) < 1:
            raise EclensError(f"--{name.replace('_', '-')} must be at least 1")
    return cfg, a


def run_study(cfg: StudyConfig, out: str | Path, *, model=None, quiet: bool = False, keep_state: bool = False) -> dict:
    """Run every step into ``out``; returns the ``study.json`` document."""
    import torch

    t_start = time.perf_counter()
    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else None  # other jobs slow a timed run
    study = Study(Path(out).resolve(), cfg, quiet=quiet, keep_state=keep_state)
    blimp_files(cfg)  # fail early, before minutes of work, on a wrong --blimp
    study.results.mkdir(parents=True, exist_ok=True)
    study.runs.mkdir(parents=True, exist_ok=True)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    threads_before = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _run_study(study, cfg, model, t_start, load_start)
    finally:
        torch.set_num_threads(threads_before)


def _run_study(study: Study, cfg: StudyConfig, model, t_start: float, load_start: float | None = None) -> dict:
    import torch

    from_cli = model is None
    from eclens.model import manifest_model_entry
    from eclens.runs import versions

    with _Timer(study, "load_model"):
        if model is None:
            from eclens import load_model

            model = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype)
        torch.set_grad_enabled(False)
    with _Timer(study, "templates"):
        step_templates(study, model)
    with _Timer(study, "blimp_diff"):
        step_blimp_diff(study, model)
    with _Timer(study, "blimp_accuracy"):
        step_blimp_accuracy(study, model)
    with _Timer(study, "analysis"):
        entry = manifest_model_entry(model)
        findings = analyse(study, entry, model)
    with _Timer(study, "figures"):
        figs = step_figures(study)
    total = round(time.perf_counter() - t_start, 1)
    statuses = [str(v.get("status", "")) for v in study.timing.values()]
    statuses += [str(x.get("status", "")) for x in (study.timing.get("templates", {}).get("steps") or {}).values()]
    all_ran = not any(x.startswith("skipped") for x in statuses)
    load_end = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    timing = {"total_seconds": total, "all_steps_ran": all_ran, "steps": study.timing,
              "load_average": {"start": load_start, "end": load_end}}
    # A rerun that skips finished steps keeps the timing of the last run that did everything (same settings).
    prev = _read_json(study.results / "study.json")
    full = timing if all_ran else (prev.get("timing_full_run") if prev.get("config") == cfg.numbers() else None)
    doc = {
        "study": "does SmolLM2 have consistent error-correction dimensions?",
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if from_cli else None,
        "config": cfg.numbers(),
        "model": entry,
        "versions": versions(),
        "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "cpu_count": os.cpu_count(),
        "timing": timing,
        "timing_full_run": full,
        "findings": findings,
        **figs,
    }
    write_json(study.results / "study.json", doc)
    with _Timer(study, "readme"):
        from write_readme import write_readme

        write_readme(study.root)
    return doc


def main(argv: list[str] | None = None) -> int:
    try:
        cfg, a = parse_args(argv)
        if a.readme_only:
            from write_readme import write_readme

            print(write_readme(Path(a.out).resolve()))
            return 0
        doc = run_study(cfg, a.out, quiet=a.quiet, keep_state=a.keep_state)
    except EclensError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    t = doc["timing"]
    print(f"study finished in {t['total_seconds']:.0f} s; results in {Path(a.out).resolve() / 'results'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
