#!/usr/bin/env python
"""The study, second edition: does a small LM correct errors, or only register them?

PLAN.md (committed before any run) states the hypotheses and decision rules; this script runs what
they need and ``hypotheses.py`` applies the rules. One command, resumable (every step is an ``ec``
command that resumes itself, or a small table that is rewritten):

    .venv/bin/python experiments/error_correction_v2/run_study.py --blimp ../shared/data/blimp

Steps, per real model (``--models``, default SmolLM2-135M-Instruct and Gemma-3-270M):
1. ``pairs``: template pairs v2 valid under every model's tokenizer (``ec generate --tokenizers``),
   and natural typos from codespell's misspellings (span pairs).
2. ``run:MODEL``: ``ec run`` on the template pairs at the study's sizes, with the layer-skip step
   and the random-weight baseline (``--baseline random``), into ``runs/MODEL``.
3. ``typos:MODEL``: ``ec run --span`` on the natural typos (diff, recovery, invariance; the
   patching steps take single-token pairs only and say how many they left out).
4. ``blimp:MODEL``: BLiMP accuracy per paradigm with cluster intervals (cluster: the paradigm
   and the pair of differing words), beside BLiMP's own GPT-2 results.
5. ``compare``: ``ec compare`` of the template runs (depth-normalised layers, shared pair ids).
6. ``analysis``: PLAN.md's rules on each run (``results/hypotheses.csv``), replication across
   models (``results/replication.csv``), and the headline tables the write-up quotes.
7. ``figures``: PNG figures from ``results/`` in ``figures/``, and each template run's ``report.html``.
8. ``readme``: README.md generated from ``results/`` by ``write_readme.py``.

``--smoke`` runs every step on two tiny random-weight models and a handful of pairs (the suite
runs it), each ``ec`` command in this process through ``eclens.cli.main``; the real study runs each in
a process of its own. Wall times per step go to ``results/study.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pandas as pd  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import hypotheses as H  # noqa: E402

from eclens.runs import write_json, write_table  # noqa: E402

# Per-model tables of the template runs copied into results/ (a "model" column added): what the README and the
# figures quote, so that every number traces to a file in results/ (runs/ is not kept in git).
COLLECT = ("recovery_index", "recovery_curves", "recovery_2x2", "probe", "invariance_directions", "patch_skip",
           "patch_exchange", "patch_dims", "patch_attribution_check", "baseline_random", "baseline_random_measure",
           "sensitivity")
CONFOUND = ("Gemma-3-270M is a base model and SmolLM2-135M-Instruct an instruct model: every difference "
            "between them may come from instruction tuning as well as from the family.")


@dataclass
class StudyConfig:
    models: list[str] = field(default_factory=lambda: ["smollm2-135m", "gemma3-270m"])
    n_templates: int = 100          # template error pairs per category (each with its twin)
    n_typos: int = 200              # codespell typo pairs
    blimp: str | None = None        # BLiMP folder (skipped when absent)
    blimp_per_paradigm: int = 50    # PLAN.md amendment 3 (was 100)
    measure_clusters: int = 30      # clusters per category of the measure step (PLAN.md amendment 3; was all)
    typo_clusters: int = 50
    measure_permutations: int = 20
    skip_pairs: int = 24
    max_sets: int = 4
    n_controls: int = 100
    dims_pairs: int = 12            # PLAN.md amendment 3 (was 16)
    exact_pairs: int = 4
    attribution_pairs: int = 16
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    smoke: bool = False

    def slug(self, model: str) -> str:
        return Path(model).name.replace(":", "_")


def smoke_config(out: Path, blimp: str | None) -> StudyConfig:
    """Two tiny random-weight Llamas with the embedded tokenizer: every step, a few seconds each."""
    from eclens.model import save_tiny_model

    models = []
    for seed in (0, 1):
        folder = out / "models" / f"tiny-{seed}"
        if not (folder / "config.json").exists():
            save_tiny_model(folder, seed=seed, max_positions=256)
        models.append(str(folder))
    return StudyConfig(models=models, n_templates=3, n_typos=12, blimp=blimp, blimp_per_paradigm=6,
                       measure_permutations=2, skip_pairs=2, max_sets=2, n_controls=5, dims_pairs=2, exact_pairs=1,
                       attribution_pairs=2, smoke=True)


class Study:
    def __init__(self, out: Path, cfg: StudyConfig):
        self.out, self.cfg = out, cfg
        self.results = out / "results"
        self.results.mkdir(parents=True, exist_ok=True)
        self.doc_path = self.results / "study.json"
        self.doc = json.loads(self.doc_path.read_text()) if self.doc_path.exists() else {}
        self.doc["config"] = asdict(cfg)
        self.doc["machine"] = f"{os.cpu_count()}-core"
        self.doc.setdefault("steps", {})

    def ec(self, *args: str) -> None:
        """An ``ec`` command of this environment; its own resume makes a rerun cheap."""
        ec = str(Path(sys.executable).parent / "ec")
        cmd = [ec, *args]
        print("$ " + " ".join(cmd), flush=True)
        if self.cfg.smoke:
            # The same command line through the same entry point, in this process: a command's imports (torch,
            # transformers, TransformerLens) take 7-9 s on a 2-core machine, half of the smoke study's time. The
            # real study keeps each command in a process of its own, which returns a model's memory when it ends.
            from eclens.cli import main

            rc = main(list(args))
        else:
            rc = subprocess.run(cmd, text=True).returncode
        if rc != 0:
            sys.exit(f"study: `{' '.join(cmd)}` failed (exit {rc}); fix it and rerun: finished steps resume")

    def step(self, name: str, fn) -> None:
        t0 = time.perf_counter()
        print(f"== {name}", flush=True)
        fn()
        # seconds spent on the step over every attempt: a resumed step adds what it took this time
        before = self.doc["steps"].get(name, {}).get("seconds", 0.0)
        self.doc["steps"][name] = {"seconds": round(before + time.perf_counter() - t0, 1),
                                   "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        write_json(self.doc_path, self.doc)

    # ---------------------------------------------------------------------------------------- steps

    def pairs(self) -> None:
        c, d = self.cfg, self.out / "pairs"
        d.mkdir(exist_ok=True)
        toks = ",".join(c.models)
        ref = ["--reference", "none"] if c.smoke else []
        if not (d / "templates.jsonl").exists():
            self.ec("generate", "--source", "templates", "--n", str(c.n_templates), "--seed", str(c.seed),
                    "--model", c.models[0], "--tokenizers", toks, *ref, "--out", str(d / "templates.jsonl"))
        if not (d / "typos.jsonl").exists():
            self.ec("generate", "--source", "codespell", "--n", str(c.n_typos), "--seed", str(c.seed),
                    "--model", c.models[0], "--tokenizers", toks, "--out", str(d / "typos.jsonl"))

    def common(self, model: str) -> list[str]:
        c = self.cfg
        return ["--model", model, "--device", c.device, "--dtype", c.dtype, "--seed", str(c.seed), "--quiet"]

    def run(self, model: str) -> None:
        c = self.cfg
        self.ec("run", "--pairs", str(self.out / "pairs" / "templates.jsonl"), "--out", str(self.run_dir(model)),
                *self.common(model), "--measure-clusters", str(c.measure_clusters),
                "--measure-permutations", str(c.measure_permutations), "--skip-pairs", str(c.skip_pairs),
                "--baseline", "random", "--max-sets", str(c.max_sets),
                "--n-controls", str(c.n_controls), "--dims-pairs", str(c.dims_pairs),
                "--exact-pairs", str(c.exact_pairs), "--attribution-pairs", str(c.attribution_pairs))

    def typos(self, model: str) -> None:
        c = self.cfg
        self.ec("run", "--pairs", str(self.out / "pairs" / "typos.jsonl"), "--span",
                "--out", str(self.typo_dir(model)), *self.common(model),
                "--measure-clusters", str(c.typo_clusters), "--measure-permutations", str(c.measure_permutations),
                "--max-sets", "1", "--exact-pairs", "1", "--attribution-pairs", "1")

    def blimp(self, model: str) -> None:
        from blimp_accuracy import accuracy_table

        c = self.cfg
        path = self.results / f"blimp_{c.slug(model)}.csv"
        if path.exists():
            return
        write_table(accuracy_table(model, c.blimp, c.blimp_per_paradigm, device=c.device, dtype=c.dtype,
                                   max_files=3 if c.smoke else None), path)

    def compare(self) -> None:
        runs = [str(self.run_dir(m)) for m in self.cfg.models]
        if len(runs) > 1:
            self.ec("compare", *runs, "--out", str(self.results / "compare.html"))

    def analysis(self) -> None:
        tables = []
        for m in self.cfg.models:
            run = self.run_dir(m)
            tables.append(H.decide(self.cfg.slug(m), run))
        hyp = pd.concat(tables, ignore_index=True)
        write_table(hyp, self.results / "hypotheses.csv")
        write_table(H.replication(hyp), self.results / "replication.csv")
        for stem in COLLECT:
            self.collect(stem, self.run_dir, self.results / f"{stem}.csv")
        self.collect("recovery_index", self.typo_dir, self.results / "typos_recovery_index.csv")
        steps = []
        for m in self.cfg.models:
            for kind, run in (("templates", self.run_dir(m)), ("typos", self.typo_dir(m))):
                mf = run / "manifest.json"
                if mf.exists():
                    secs = json.loads(mf.read_text()).get("steps", {}).get("run", {}).get("seconds", {})
                    steps += [{"model": self.cfg.slug(m), "pairs": kind, "step": k, "seconds": v}
                              for k, v in secs.items()]
        if steps:
            write_table(pd.DataFrame(steps), self.results / "run_steps.csv")
        from llama_estimate import estimate  # Llama-3-8B on an H200, from the first model's pass counts

        est = estimate(self.run_dir(self.cfg.models[0]), HERE.parent)
        if not est.empty:
            write_table(est, self.results / "llama3_8b_estimate.csv")

    def collect(self, stem: str, run_of, path: Path) -> None:
        """The table ``stem`` of every model's run (``run_of(model)``), a ``model`` column added, as one file."""
        got = []
        for m in self.cfg.models:
            t = H.read(run_of(m), stem)
            if t is not None:
                got.append(t.assign(model=self.cfg.slug(m)))
        if got:
            write_table(pd.concat(got, ignore_index=True), path)

    def figures(self) -> None:
        """PNG figures from results/, and each template run's report beside them."""
        import shutil

        from figures import write_figures

        info = write_figures(self.out)
        for m in self.cfg.models:
            rep = self.run_dir(m) / "report.html"
            if rep.exists():
                shutil.copyfile(rep, self.out / "figures" / f"report_{self.cfg.slug(m)}.html")
                info[f"report_{self.cfg.slug(m)}"] = f"report_{self.cfg.slug(m)}.html"
        self.doc["figures"] = info

    def readme(self) -> None:
        from write_readme import write_readme

        write_readme(self.out, CONFOUND)

    def run_dir(self, model: str) -> Path:
        return self.out / "runs" / self.cfg.slug(model)

    def typo_dir(self, model: str) -> Path:
        return self.out / "runs" / f"{self.cfg.slug(model)}-typos"

    def all(self) -> None:
        self.step("pairs", self.pairs)
        for m in self.cfg.models:
            self.step(f"run:{self.cfg.slug(m)}", lambda m=m: self.run(m))
            self.step(f"typos:{self.cfg.slug(m)}", lambda m=m: self.typos(m))
            if self.cfg.blimp and Path(self.cfg.blimp).is_dir():
                self.step(f"blimp:{self.cfg.slug(m)}", lambda m=m: self.blimp(m))
        self.step("compare", self.compare)
        self.step("analysis", self.analysis)
        self.step("figures", self.figures)
        self.step("readme", self.readme)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=HERE, help="study folder (default: this folder)")
    ap.add_argument("--blimp", default=None, help="BLiMP folder of *.jsonl (e.g. ../shared/data/blimp)")
    ap.add_argument("--models", default=None, help="comma-separated models (default: smollm2-135m,gemma3-270m)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--smoke", action="store_true", help="two tiny random models, a few pairs: every step, fast")
    a = ap.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    cfg = smoke_config(a.out, a.blimp) if a.smoke else StudyConfig(blimp=a.blimp)
    if a.models:
        cfg.models = [m.strip() for m in a.models.split(",") if m.strip()]
    cfg.device, cfg.dtype = a.device, a.dtype
    Study(a.out, cfg).all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
