"""README.md of the study, generated from ``results/`` only (edit this script, not the README).

Every number in the answer comes from ``results/hypotheses.csv``; ``headline_numbers`` lists them
with the file and row they come from, and the suite checks that each appears in the README. The other
sections quote the tables ``run_study.py`` copies into ``results/`` (one file each, named beside it).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
from figures import GRAMMAR, read_result

NAMES = {"H1": "errors fade faster than twins", "H2": "better than ignoring the error token",
         "H3": "error-invariant units beyond chance", "H4": "an error signal beyond token identity",
         "H5": "some layers do the correcting", "H6": "chosen units matter, for errors more than twins"}
ANSWER = ("H1", "H2", "H3", "H4")
COMMAND = ".venv/bin/python experiments/error_correction_v2/run_study.py --blimp ../shared/data/blimp"
LLAMA_COMMAND = ("HF_HUB_OFFLINE=0 .venv/bin/python experiments/error_correction_v2/run_study.py "
                 "--models meta-llama/Meta-Llama-3-8B --device cuda --dtype bfloat16 --blimp BLIMP_FOLDER "
                 "--out study-llama3-8b")

# Checked against ../error_correction_smollm2/results/ (the first edition's own files); PLAN.md lists them too.
CORRECTIONS = [
    "\"On 9 pairs\": both `p+2` stable sets ran on 6 (`n_pairs` in `results/causal_sets.csv`).",
    "\"Mean over the dataset\": mean-ablation uses the mean over the test pairs' sentences.",
    "The massive rule is described as mean |a| >= 100x the layer's median; the code uses the RMS.",
    "`kl_gap_moved` is KL(clean || ablated) / KL(clean || corrupt): divergence from clean, not movement "
    "towards corrupt.",
    "The strongest \"stable set that matters\" (resid_post L4 `p+2`) lies in a cell the study calls trivial "
    "(relative L2 0.093 < 0.1); the one non-trivial stable set tested is null.",
    "The showcased most stable dimension at `p` (mlp.hook_post L2 #90) is massive at L2's other positions.",
    "GPT-2's 0.830 is the unweighted paradigm mean of BLiMP's own `models_summary.jsonl`.",
    "\"Grammar errors move the model less than meaning changes\": relative to the change at `p`, the change "
    "reaching the last token is the same for grammar and meaning (0.323 vs 0.327 of the `p`, L29 change; "
    "`results/layers_by_category.csv`): the input's size, not the model, drives that headline.",
]


def fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    v = float(v)
    return f"{v:.0f}" if v.is_integer() and (abs(v) >= 1 or v == 0) else f"{v:+.2f}"


def interval(r) -> str:
    return f"{fmt(r['estimate'])} [{fmt(r['low'])}, {fmt(r['high'])}]"


def headline_numbers(results: Path) -> list[tuple[str, str, str]]:
    """(formatted number, file, row) for every number in the answer."""
    hyp = pd.read_csv(results / "hypotheses.csv")
    out = []
    for r in hyp[hyp["hypothesis"].isin(ANSWER)].to_dict("records"):
        for col in ("estimate", "low", "high"):
            out.append((fmt(r[col]), "results/hypotheses.csv", f"{r['model']} {r['hypothesis']} {col}"))
    return out


def random_lines(results: Path) -> str:
    """How the random-weight copies' per-category recovery indices compare (H7's chance condition)."""
    b = read_result(results, "baseline_random_measure.csv")
    if b is None or "weights" not in b.columns:
        return "the random-weight copies' recovery was not measured"
    r = b[(b["measure"] == "recovery_index_last") & b["category"].isin(GRAMMAR)]
    parts = []
    for w in ("trained", "random"):
        s = r[r["weights"] == w]
        above = int((s["low"] > 0).sum())
        below = int((s["high"] < 0).sum())
        parts.append(f"{w} weights: median index {fmt(s['estimate'].median())} over the {len(s)} (model, "
                     f"category) cells, {above} with the interval above 0 and {below} below")
    return "; ".join(parts) + " (`results/baseline_random_measure.csv`)"


def answer(hyp: pd.DataFrame, results: Path) -> list[str]:
    def per_model(h: str) -> str:
        rows = hyp[hyp["hypothesis"] == h].to_dict("records")
        return "; ".join(f"{r['model']}: {r['verdict']}, {interval(r)}" for r in rows)

    def verdicts(h: str) -> set:
        return set(hyp.loc[hyp["hypothesis"] == h, "verdict"])

    v1, v2 = verdicts("H1"), verdicts("H2")
    if v1 == {"supported"}:
        lead = "Both models correct errors in the sense tested: errors fade faster than acceptable changes of the same word"
    elif "supported" in v1:
        lead = "Errors fade faster than acceptable changes of the same word in some models but not all"
    elif v1 == {"refuted"} and (hyp.loc[hyp["hypothesis"] == "H1", "low"] > 0).all():
        lead = ("Neither model corrects errors in the sense tested: pooled over the grammar categories, an error's "
                "effect on the predictions persists longer than that of an acceptable change of the same word")
    elif v1 == {"refuted"}:
        lead = ("Neither model corrects errors in the sense tested: pooled over the grammar categories, an error's "
                "effect on the predictions does not fade faster than that of an acceptable change of the same word")
    else:
        lead = "Whether errors fade faster than acceptable changes could not be decided"
    if v2 == {"supported"}:
        second = "Yet both models end closer to the clean sentence's predictions than if they had ignored the error token"
    elif v2 == {"refuted"}:
        second = "Ignoring the error token would have served both models better than what they do"
    else:
        second = "Against ignoring the error token the models differ or the test is undecided"
    inv = hyp.loc[hyp["hypothesis"].isin(["H3", "H4"]), "verdict"]
    if (inv == "supported").all():
        third = "Both models register errors"
    elif (inv == "supported").any():
        third = "The models register errors by some measures, not all"
    else:
        third = "That the models register errors is not shown"
    third += (": error-invariant cells beyond a label-permutation null, and a probe for 'error' at the detecting "
              "token that must beat a control task")
    return [
        f"1. **{lead}** (H1: recovery index at the last token, pooled grammar errors vs their twins, "
        f"< 0 = errors fade faster; {per_model('H1')}). Chance, for comparison: {random_lines(results)}.",
        f"2. **{second}** (H2: clean continuation's log-prob, error run minus the worse ignore run, nats; "
        f"{per_model('H2')}).",
        f"3. **{third}** (H3: cells with error/twin ratio < 0.5 at BH q < 0.05, [permutation null min, max]; "
        f"{per_model('H3')}. H4: probe accuracy at the best layer [95 %]; {per_model('H4')}).",
    ]


def cell(col: str, v, digits: int | None = None) -> str:
    """p-values, thresholds and seconds as such; other numbers signed with two decimals (``digits``: unsigned,
    that many)."""
    if not isinstance(v, float) or math.isnan(v):
        return fmt(v) if isinstance(v, float) else str(v).replace("|", "/")
    if col == "p_perm" or col.endswith(("_p", "_p_matched", "_q")) or col.startswith("p_") or col == "threshold":
        return f"{v:.3g}"
    if col == "seconds":
        return f"{v:.1f}"
    return f"{v:.{digits}f}" if digits is not None else fmt(v)


def table(df: pd.DataFrame, cols: list[str], digits: int | None = None) -> list[str]:
    cols = [c for c in cols if c in df.columns]
    cols = (["model"] if "model" in cols else []) + [c for c in cols if c != "model"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in df[cols].itertuples(index=False):
        lines.append("| " + " | ".join(cell(c, v, digits) for c, v in zip(cols, r)) + " |")
    return lines


def section(results: Path, title: str, name: str, cols: list[str] | None, intro: str, query=None) -> list[str]:
    t = read_result(results, name)
    if t is None or t.empty:
        return []
    if query is not None:
        t = query(t)
    return ["", f"## {title}", "", f"{intro} (`results/{name}`)", "", *table(t, cols or list(t.columns))]


def steps_done(doc: dict) -> dict:
    """The study's steps but this one (its seconds are recorded after the README is written)."""
    return {k: v for k, v in doc["steps"].items() if k != "readme"}


def wall_time(results: Path, doc: dict) -> list[str]:
    total = sum(v["seconds"] for v in steps_done(doc).values())
    lines = [f"Wall time of the study's steps (`results/study.json`): **{total / 60:.1f} min** on a "
             f"{doc['config']['device'].upper()} ({doc.get('machine', '2-core')}), every attempt counted"
             + (" except a pair generation done before steps summed their attempts (the `pairs` step's 0 s)."
                if doc["steps"].get("pairs", {}).get("seconds", 1) == 0 else ".")]
    rs = read_result(results, "run_steps.csv")
    if rs is not None:
        per = rs.groupby(["model", "pairs"])["seconds"].sum()
        lines.append("The runs' own step times (`results/run_steps.csv`, from each run's `manifest.json`): "
                     + "; ".join(f"{m} {p} {s / 60:.1f} min" for (m, p), s in per.items()) + ".")
        runs = {k: v["seconds"] for k, v in doc["steps"].items() if k.startswith("run:")}
        for (m, p), s in per.items():
            st = runs.get(f"run:{m}")
            if p == "templates" and st is not None and s > st:
                lines.append(f"{m}'s template run records {s - st:.0f} s more than the study's step: steps done by "
                             "an earlier attempt (PLAN.md, amendment 3), to be added to the total.")
    return lines


def write_readme(out: Path, confound: str) -> Path:
    results = out / "results"
    hyp = pd.read_csv(results / "hypotheses.csv")
    doc = json.loads((results / "study.json").read_text())
    cfg = doc["config"]
    L = ["# Does a small LM correct errors, or only register them? (study, second edition)", "",
         "<!-- Generated by write_readme.py from results/: edit that script, not this file. -->", "",
         "The plan ([PLAN.md](PLAN.md)) was committed before the full run; every verdict below applies its "
         "rules, with its amendments (each committed before the run it applies to). Anything chosen after "
         "seeing data is labelled exploratory. This study replaces the first edition "
         "([../error_correction_smollm2](../error_correction_smollm2/README.md)); its corrections are listed below."]
    if cfg.get("smoke"):
        L += ["", "**Smoke run: tiny random-weight models and a handful of pairs. These numbers test the plumbing "
              "and mean nothing about language models.**"]
    L += ["", "## The answer", "", *answer(hyp, results), "",
          "What would have made it different: errors fading faster than twins (H1 supported) together with a "
          "positive gap to the ignore run (H2) would read as correction; H1 refuted or inconclusive reads as "
          "registering the error without undoing it, whatever H3 and H4 say; intervals too wide to decide read "
          "as cannot tell. The random-weight copies decide whether a pattern belongs to the trained model or to "
          "the pairs' design.", "",
          "## Every hypothesis, per model (`results/hypotheses.csv`)", ""]
    hyp = hyp.assign(name=hyp["hypothesis"].map(NAMES), value=[interval(r) for r in hyp.to_dict("records")])
    L += table(hyp, ["model", "hypothesis", "name", "value", "verdict", "detail"])
    rep = read_result(results, "replication.csv")
    if rep is not None:
        L += ["", "## What replicates across models (H7, `results/replication.csv`)", "", confound, ""]
        L += table(rep, list(rep.columns))
    L += section(results, "Trained vs random weights", "baseline_random_measure.csv",
                 ["model", "weights", "measure", "category", "estimate", "low", "high", "n_clusters"],
                 "Recovery index at the last token per category, the 2x2 error effect and the probe peak, for each "
                 "trained model and its random-weight copy (same architecture, seed 0). A number the random copy "
                 "reaches as well says nothing about training")
    L += section(results, "Candidate counts against chance", "baseline_random.csv", None,
                 "Stable and responsive candidates of the diff's rules, trained vs random weights")
    L += section(results, "Recovery index per category (secondary, no verdict of its own)", "recovery_index.csv",
                 ["model", "category", "estimate", "low", "high", "n_clusters", "note"],
                 "At the last token; < 0: errors fade faster than their twins",
                 lambda t: t[(t["offset"].astype(str) == "last") & (t["measure"] == "recovery_index")]
                 if "measure" in t.columns else t[t["offset"].astype(str) == "last"])
    L += section(results, "The 2x2 designs", "recovery_2x2.csv",
                 ["model", "category", "term", "estimate", "low", "high", "p_perm", "n_clusters"],
                 "Log KL decay to the last token, cluster effects adjusted for the KL at detect: the error effect "
                 "(error vs twin) and its interaction with the cell",
                 lambda t: t[(t["outcome"] == "decay_last") & t["term"].isin(["error_effect", "error_x_cell"])])
    L += section(results, "The error direction per layer (H3, reported without a verdict)", "invariance_directions.csv",
                 ["model", "hook", "layer", "offset", "split_half_cos", "heldout_projection"],
                 "Mean error Δ minus mean twin Δ, estimated on each half of the clusters: the halves' cosine and the "
                 "held-out projection, at the last layer of each hook and offset",
                 lambda t: t[t["layer"] == t.groupby(["model", "hook"])["layer"].transform("max")])
    L += section(results, "Natural typos (span pairs)", "typos_recovery_index.csv",
                 ["model", "category", "estimate", "low", "high", "n_clusters", "note"],
                 "Codespell misspellings aligned as spans, recovery index at the last token",
                 lambda t: t[t["offset"].astype(str) == "last"])
    L += section(results, "Candidate sets on held-out clusters (H6)", "patch_dims.csv", None,
                 "Chosen on half A of the clusters, tested on half B against uniform and matched controls "
                 "(metric-prefixed columns: the set's effect, its p against uniform and against matched controls)",
                 lambda t: t[[c for c in t.columns if c in ("model", "set", "n_pairs", "interaction", "interaction_low",
                                                           "interaction_high", "verdict")
                              or c.endswith(("_effect", "_p", "_p_matched"))]])
    L += section(results, "Layer skipping (H5, descriptive intervals)", "patch_skip.csv",
                 ["model", "layer", "component", "d_kl_diff", "d_kl_diff_low", "d_kl_diff_high", "verdict"],
                 "Per (layer, component), skipped in error and twin runs: KL at the last token, errors minus twins; "
                 "the rows whose 95 % interval excludes 0 (H5 uses Bonferroni-adjusted intervals instead)",
                 lambda t: t[~t["broken"].astype(bool) & ((t["d_kl_diff_low"] > 0) | (t["d_kl_diff_high"] < 0))])
    L += section(results, "Layer exchange (descriptive)", "patch_exchange.csv", None,
                 "The error run with one layer's attention or MLP write taken from the twin run: `moved` is the share "
                 "of the error-twin gap in downstream KL that the exchange closes (1: all of it), median over pairs; "
                 "the five largest per model",
                 lambda t: t.groupby(["model", "layer", "component"], as_index=False)
                 .agg(moved_median=("moved", "median"), n_pairs=("moved", "size"))
                 .sort_values("moved_median", ascending=False).groupby("model").head(5)
                 .sort_values(["model", "moved_median"], ascending=[True, False]))
    L += section(results, "Attribution against full exact sweeps", "patch_attribution_check.csv", None,
                 "How well attribution patching ranks components, checked against the exact step's full sweeps")
    L += section(results, "Threshold sensitivity", "sensitivity.csv", None,
                 "Stable candidates over all pairs (every hook together) as the stable rule's threshold on |Δ|/σ "
                 "moves; `default` marks the run's own",
                 lambda t: t[(t["category"] == "all") & (t["swap_direction"] == "all") & (t["kind"] == "stable")]
                 .groupby(["model", "value", "default"], as_index=False)["n_candidates"].sum()
                 .rename(columns={"value": "threshold"}))
    blimp = sorted(results.glob("blimp_*.csv"))
    if blimp:
        t = pd.concat([pd.read_csv(p) for p in blimp], ignore_index=True)
        L += ["", "## BLiMP accuracy", "",
              "Unweighted mean over paradigms with cluster intervals (cluster: paradigm and differing words); GPT-2 "
              "from BLiMP's own `models_summary.jsonl`. BLiMP has no twins: it feeds accuracy only "
              "(`results/blimp_*.csv`).", ""]
        L += table(t[t["UID"] == "overall"], ["model", "n", "n_clusters", "accuracy", "low", "high", "gpt2",
                                              "bos_policy"], digits=3)
    figs = doc.get("figures") or {}
    shown = {k: v for k, v in figs.items() if not str(v).startswith("skipped")}
    if figs:
        L += ["", "## Figures", ""]
        L += [f"- [{k}](figures/{v})" for k, v in shown.items()]
        L += [f"- {k}: {v}" for k, v in figs.items() if k not in shown]
    L += ["", "## Corrections to the first edition", "",
          "Checked against the first edition's own files in `../error_correction_smollm2/results/`:", ""]
    L += [f"- {c}" for c in CORRECTIONS]
    L += ["", "## What was run", "", f"Models: {', '.join(cfg['models'])}, and a random-weight copy of each. "
          f"{confound}", "", "Sizes: " + ", ".join(
              f"{k} {cfg[k]}" for k in ("n_templates", "n_typos", "blimp_per_paradigm", "measure_clusters",
                                        "measure_permutations", "skip_pairs", "max_sets", "n_controls", "dims_pairs",
                                        "exact_pairs", "attribution_pairs") if k in cfg) + ".", "",
          "| step | seconds |", "|---|---|"]
    L += [f"| {k} | {v['seconds']} |" for k, v in steps_done(doc).items()]
    L += ["", *wall_time(results, doc), "", f"Command (resumable: a rerun skips what is done): `{COMMAND}`."]
    est = read_result(results, "llama3_8b_estimate.csv")
    L += ["", "## On Meta-Llama-3-8B with a GPU", "", f"`{LLAMA_COMMAND}`", ""]
    if est is not None and not est.empty:
        L += [f"**Estimate, not a measurement**: the template run would take about {est['seconds'].sum() / 60:.1f} "
              "min of model time on one H200, from the tool's pass counts for these pairs and settings with "
              "Llama-3-8B's 32 layers, priced at the rates measured for a Llama-3-8B-shaped model on an H200 "
              "(`experiments/gpu_benchmarks.md`; model loading, about 16 GB per command, not included; "
              "`results/llama3_8b_estimate.csv`, `llama_estimate.py`).", ""]
        L += table(est, ["step", "passes", "price", "seconds"])
    path = out / "README.md"
    path.write_text("\n".join(L) + "\n", encoding="utf-8")
    return path
