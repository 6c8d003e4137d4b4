"""``ec run``: the whole study with defaults, resumable.

Steps, each writing the run-folder files of ``docs/run-folder.md`` atomically:

1. ``pairs``   — template pairs (:func:`eclens.sources.templates.generate_templates`) or
   a user's pairs file, aligned under the model's tokenizer: ``pairs.jsonl``,
   ``rejected.jsonl``, ``check.csv``;
2. ``diff``    — :func:`eclens.diff.run_diff` over every valid pair (its own checkpoint
   resumes an interrupted pass, from ``state/``): ``layers.parquet``, ``dims.parquet``, ``candidates.parquet``, ...;
3. ``measure`` — recovery, selective invariance and the error-signal probe
   (:func:`eclens.measure_step.measure_step`): ``recovery.csv``, ``recovery_index.csv``,
   ``invariance.parquet``, ``probe.csv``, ``measure.json``, ...;
4. ``exact``   — exact patching maps (both directions) for a few pairs, spread over the
   categories: ``patch_exact.csv``;
5. ``dims``    — the top candidate dimension sets patched against random sets of the
   same size: ``patch_dims.csv``, ``patch_dims_controls.csv``;
6. ``attribution`` — attribution patching on a subset, its top components verified
   by exact patching: ``patch_attribution.csv``;
7. ``report``  — ``report.html``;

then ``RUN/state`` (the diff's accumulators: only a resume or a merge reads them) is deleted unless
``keep_state`` (``ec run --keep-state``), and its size is said (:mod:`eclens.state`).

Each step is a function of :mod:`eclens.steps` (the same that ``ec diff``, ``ec patch`` and
``ec report`` call); this module only chains them with :func:`run_steps`, the one resume
engine (the study in ``experiments/`` chains its own list with it).

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
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from .errors import EclensError
from .steps import StepOutcome, choose_sets, dims_metric, spread_pairs  # noqa: F401 - the library's names for ec run

STEPS = ("pairs", "diff", "measure", "exact", "dims", "attribution", "report")


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
    split: int | None = 0               # dims: choose sets on half A of the clusters, test on half B (None: no split)
    skip_pairs: int = 0                 # layer skipping on this many error pairs (+ their twins); 0: no skip step
    baseline: str | None = None         # "random": diff + candidate rules again on random:NAME, counts side by side
    measure_clusters: int | None = 10   # clusters per category the measure step uses (None: all)
    measure_permutations: int = 3       # the measure step's permutation null (invariance; the probe 2x)
    span: bool = False                  # align in span mode: keep pairs that differ in one span of tokens

    def step_params(self, step: str) -> dict:
        keys = {
            "pairs": ("pairs_file", "n_per_category", "seed"),
            "diff": ("hooks", "seed", "min_pairs"),
            "measure": ("measure_clusters", "measure_permutations", "seed"),
            "exact": ("exact_pairs", "patch_hooks", "seed"),
            "dims": ("dims_pairs", "max_sets", "top_k", "n_controls", "metric", "seed", "split"),
            "skip": ("skip_pairs", "seed"),
            "baseline": ("baseline", "hooks", "seed", "min_pairs"),
            "attribution": ("attribution_pairs", "verify_top", "metric", "seed", "patch_hooks"),
            "report": ("report_examples",),
        }[step]
        out = {k: (list(v) if isinstance(v, tuple) else v) for k, v in ((k, getattr(self, k)) for k in keys)}
        if step == "pairs" and self.span:  # only when set: run folders made before span mode keep their key
            out["span"] = True
        return out


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


@dataclass
class Step:
    """One step for :func:`run_steps`: ``fn(run, model, pairs, progress=..., log=...)`` returns a
    :class:`~eclens.steps.StepOutcome` (the pairs step's ``value``: the aligned pairs the later steps get).
    ``params`` decide whether a recorded result still holds; a ``fixed`` step's params may not change in
    a run folder (a rerun with others is refused rather than mixed)."""

    name: str
    fn: Callable[..., StepOutcome]
    params: dict
    fixed: bool = False


def _key(prev: str, params: dict) -> str:
    return hashlib.sha256((prev + json.dumps(params, sort_keys=True, default=str)).encode()).hexdigest()[:16]


def run_steps(run: str | Path, model, steps: Sequence[Step], *, config: dict | None = None,
              log: Callable[[str], None] = print, progress: bool = True, manifest: dict | None = None,
              keep_state: bool = False, plan: Callable[[list], list[str]] | None = None) -> RunResult:
    """Run (or resume) ``steps`` in order into ``run`` with ``model``; returns what each step did.

    The first step makes the pairs; each later step gets them (read from ``RUN/pairs.jsonl`` when the
    pairs step was skipped). ``config``: recorded with the state; ``manifest``: fields for a new manifest.
    Once every step is done, ``RUN/state`` (what only a resume or a merge reads) is deleted unless
    ``keep_state`` (:func:`eclens.state.finish_state`: the very last act, after the report).
    ``plan``: called once with the pairs before the second step; its lines (the planned cost) are logged
    (``log`` prints under ``--quiet`` too: only progress bars are quiet).
    """
    from .model import model_id, weights_hash
    from .pairs import load_aligned
    from .runs import check_manifest_model, open_run, read_manifest, record_step

    run = Path(run)
    check_manifest_model(run, model_id(model), weights_hash(model))
    state = (read_manifest(run).get("steps") or {}).get("run") or {}
    for st in steps:
        old = (state.get("params") or {}).get(st.name)
        if st.fixed and old is not None and old != st.params:
            changed = [k for k, v in st.params.items() if old.get(k) != v]
            raise EclensError(f"{run}: made from other {st.name} ({', '.join(f'{k}={old.get(k)!r}' for k in changed)}); "
                              "use another --out folder, or delete this one")
    open_run(run, model, **(manifest or {}))
    done: dict[str, str] = dict(state.get("done") or {})
    result = RunResult(run)
    prev = ""
    pairs: list | None = None
    n = len(steps)
    for i, st in enumerate(steps, start=1):
        if i == 2 and plan is not None:
            if pairs is None:
                pairs = load_aligned(run / "pairs.jsonl")
            for line in plan(pairs):
                log(line)
        key = _key(prev, st.params)
        prev = key
        files = (state.get("files") or {}).get(st.name) or []
        if done.get(st.name) == key and all((run / f).exists() for f in files):
            log(f"[{i}/{n}] {st.name}: done earlier, skipped")
            result.steps.append(StepResult(st.name, "skipped", 0.0, files,
                                           (state.get("headlines") or {}).get(st.name, "")))
            continue
        log(f"[{i}/{n}] {st.name}: running")
        if pairs is None and i > 1:
            pairs = load_aligned(run / "pairs.jsonl")
        t0 = time.perf_counter()
        out = st.fn(run, model, pairs or [], progress=progress, log=log)
        if i == 1:
            pairs = out.value
        secs = round(time.perf_counter() - t0, 2)
        log(f"[{i}/{n}] {st.name}: {out.headline} ({secs:.1f} s)")
        result.steps.append(StepResult(st.name, out.status, secs, out.files, out.headline))
        # Later steps depend on this one: forget them, then record this one.
        for later in steps[i:]:
            done.pop(later.name, None)
        done[st.name] = key
        state = (read_manifest(run).get("steps") or {}).get("run") or {}
        record = {"config": config if config is not None else state.get("config"), "done": done}
        for field_, value in (("params", st.params), ("files", out.files), ("headlines", out.headline),
                              ("seconds", secs)):
            record[field_] = {**(state.get(field_) or {}), st.name: value}
        state = record
        record_step(run, "run", state)
    result.report = run / "report.html" if (run / "report.html").exists() else None
    from .state import finish_state

    finish_state(run, keep=keep_state, log=log)
    return result


def pipeline_steps(cfg: RunConfig, *, keep_state: bool = True) -> list[Step]:
    """``ec run``'s steps, as library step functions with ``cfg``'s settings (``keep_state=False``: the run's
    state is deleted when it completes, so the diff does not write its complete state: :func:`diff_step`)."""
    from .diff import DiffConfig
    from .steps import (
        AttributionConfig,
        DimsConfig,
        ExactConfig,
        attribution_step,
        diff_step,
        dims_step,
        exact_step,
        pairs_step,
        report_step,
        run_candidates,
    )

    rule = {"min_pairs": cfg.min_pairs} if cfg.min_pairs is not None else {}
    diff_cfg = DiffConfig(hooks=cfg.hooks, seed=cfg.seed, **rule)
    exact_cfg = ExactConfig(hooks=list(cfg.patch_hooks), direction="both", metric=cfg.metric,
                            batch_size=cfg.patch_batch_size, n_pairs=cfg.exact_pairs, seed=cfg.seed)
    dims_cfg = DimsConfig(method="patch", direction="denoise", metric=cfg.metric, auto_metric=True,
                          n_controls=cfg.n_controls, seed=cfg.seed, batch_size=cfg.patch_batch_size,
                          n_pairs=cfg.dims_pairs, record={"top_k": cfg.top_k, "max_sets": cfg.max_sets},
                          split=cfg.split, diff=diff_cfg, choose=lambda cand: choose_sets(cand, cfg.max_sets, cfg.top_k))
    attr_cfg = AttributionConfig(hooks=list(cfg.patch_hooks), direction="denoise", metric=cfg.metric,
                                 verify_top=cfg.verify_top, seed=cfg.seed, batch_size=cfg.patch_batch_size,
                                 n_pairs=cfg.attribution_pairs)
    from .measure_step import MeasureConfig, measure_step

    measure_cfg = MeasureConfig(max_clusters=cfg.measure_clusters, seed=cfg.seed,
                                n_permutations=cfg.measure_permutations)
    fns = {
        "pairs": lambda run, model, pairs, progress, log: pairs_step(
            run, model, cfg.pairs_file, n_per_category=cfg.n_per_category, seed=cfg.seed,
            manifest={"seed": cfg.seed}, mode="span" if cfg.span else "single"),
        "diff": lambda run, model, pairs, progress, log: diff_step(run, model, pairs, diff_cfg,
                                                                   batch_size=cfg.batch_size, progress=progress,
                                                                   write_state=keep_state),
        "measure": lambda run, model, pairs, progress, log: measure_step(run, model, pairs, measure_cfg,
                                                                         progress=progress, log=log),
        "exact": lambda run, model, pairs, progress, log: exact_step(run, model, pairs, exact_cfg,
                                                                     progress=progress),
        "dims": lambda run, model, pairs, progress, log: dims_step(
            run, model, pairs, lambda r: run_candidates(r, cfg.max_sets, cfg.top_k), dims_cfg, progress=progress,
            log=log),
        "attribution": lambda run, model, pairs, progress, log: attribution_step(run, model, pairs, attr_cfg,
                                                                                 progress=progress),
        "report": lambda run, model, pairs, progress, log: report_step(run, model, n_examples=cfg.report_examples),
    }
    for name in ("exact", "dims", "attribution"):
        fns[name] = _single_token(fns[name], name)
    steps = [Step(name, fns[name], cfg.step_params(name), fixed=name == "pairs") for name in STEPS]
    if cfg.skip_pairs > 0:  # opt-in (a sweep of every layer and component): before the report, which reads it
        from .steps import SkipStepConfig, skip_step

        skip_cfg = SkipStepConfig(n_pairs=cfg.skip_pairs, seed=cfg.seed, batch_size=cfg.patch_batch_size)
        at = next((i for i, st in enumerate(steps) if st.name == "report"), len(steps))
        steps.insert(at, Step("skip", _single_token(lambda run, model, pairs, progress, log: skip_step(
            run, model, pairs, skip_cfg, progress=progress), "skip"), cfg.step_params("skip")))
    if cfg.baseline is not None:
        if cfg.baseline != "random":
            raise EclensError(f"unknown baseline {cfg.baseline!r}: use random")
        from .baseline import baseline_step

        at = next((i for i, st in enumerate(steps) if st.name == "report"), len(steps))
        steps.insert(at, Step("baseline", lambda run, model, pairs, progress, log: baseline_step(
            run, model, pairs, diff_config=diff_cfg, seed=cfg.seed, batch_size=cfg.batch_size, progress=progress,
            measure_config=replace(measure_cfg, invariance=False)),
            cfg.step_params("baseline")))
    return steps


def _single_token(fn: Callable[..., StepOutcome], step: str) -> Callable[..., StepOutcome]:
    """``fn`` on the run's single-token pairs only (exact patching, the candidate sets' tests, attribution and
    layer skipping swap activations position by position): the span pairs left out are said in one line, and a
    run with none left records the step as empty with that line."""
    from .spans import single_token_subset

    def run_on_single(run, model, pairs, progress, log):
        keep, note = single_token_subset(pairs, step)
        if note:
            log(f"      {note}")
        if pairs and not keep:
            return StepOutcome("empty", [], note)
        return fn(run, model, keep, progress=progress, log=log)

    return run_on_single


def run_pipeline(run: str | Path, model, config: RunConfig | None = None, *,
                 log: Callable[[str], None] = print, progress: bool = True, keep_state: bool = False) -> RunResult:
    """Run (or resume) every step into ``run`` with ``model``; returns what each step did (``keep_state``:
    keep ``RUN/state`` once the run completes)."""
    from .budget import plan_lines

    cfg = config or RunConfig()
    steps = pipeline_steps(cfg, keep_state=keep_state)
    return run_steps(run, model, steps, config=asdict(cfg), log=log, progress=progress, manifest={"seed": cfg.seed},
                     keep_state=keep_state, plan=lambda pairs: plan_lines(cfg, model, pairs, [st.name for st in steps]))
