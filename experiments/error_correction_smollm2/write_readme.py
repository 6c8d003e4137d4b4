"""Generate the study's ``README.md`` from the files ``run_study.py`` wrote in ``results/``.

Every number in the write-up is read from ``results/*.json|csv`` here; the interpretive
sentences are either computed from those numbers or guarded by a check on them
(:func:`claim`): a sentence whose premise no longer holds after a rerun is replaced by a
note saying so, rather than left to disagree with the tables.

    .venv/bin/python experiments/error_correction_smollm2/run_study.py --readme-only
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pandas as pd

from eclens.runs import atomic_write

ALPHA = 0.05
OFFSET_NAMES = {0: "p", -1: "last"}


# ------------------------------------------------------------------------------ helpers


def fmt(x: Any, digits: int = 3) -> str:
    """A number for prose and tables: 3 significant digits, thousands separators, integers as integers."""
    if x is None:
        return "–"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return f"{x:,}"
    try:
        v = float(x)
    except (TypeError, ValueError):
        return str(x)
    if math.isnan(v):
        return "–"
    if v == 0:
        return "0"
    if abs(v) >= 1000 or (v.is_integer() and abs(v) < 1e15):
        return f"{v:,.0f}"
    if abs(v) < 10 ** -digits:
        return f"{v:.1e}"
    return f"{v:.{digits}g}"


def pct(x: Any) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * float(x):.1f} %"


def off(o: Any) -> str:
    o = int(o)
    return OFFSET_NAMES.get(o, f"p+{o}")


def hook_name(h: str) -> str:
    h = str(h)
    return h[5:] if h.startswith("hook_") else h


def table(df: pd.DataFrame, cols: dict[str, str] | None = None, formats: dict[str, Any] | None = None,
          max_rows: int = 40) -> str:
    """A GitHub markdown table (no tabulate dependency)."""
    if df is None or df.empty:
        return "_(no rows)_\n"
    cols = cols or {c: c for c in df.columns}
    formats = formats or {}
    head = "| " + " | ".join(c.replace("|", "\\|") for c in cols.values()) + " |"
    sep = "|" + "|".join("---" for _ in cols) + "|"
    lines = [head, sep]
    for r in df.head(max_rows).to_dict("records"):
        cells = []
        for c in cols:
            v = r.get(c)
            f = formats.get(c)
            if v is None or (isinstance(v, float) and math.isnan(v)):
                cells.append("–")
            else:
                cells.append(f(v) if f else fmt(v) if isinstance(v, (int, float)) else str(v))
        lines.append("| " + " | ".join(x.replace("|", "\\|") for x in cells) + " |")
    if len(df) > max_rows:
        lines.append(f"\n_({len(df) - max_rows} more rows in the CSV)_")
    return "\n".join(lines) + "\n"


def model_names(s: dict) -> tuple[str, str]:
    """(short, full) name of the studied model for the prose: the embedded model by its family name."""
    name = (s.get("model") or {}).get("name") or "the model"
    if name == "smollm2-135m":
        return "SmolLM2", "SmolLM2-135M-Instruct"
    return f"`{name}`", f"`{name}`"


def claim(ok: bool, text: str, what: str) -> str:
    """Interpretive prose that holds only while its premise does."""
    if ok:
        return text
    return (f"_(An interpretive paragraph about {what} was written for an earlier result and no longer matches "
            "the numbers; the tables above are authoritative.)_")


def read_table(path: Path) -> pd.DataFrame:
    """A results table (CSV or Parquet: a run folder's table under either name), or an empty frame when the
    file is missing or empty (a step that found nothing)."""
    from eclens.tables import read_table_file, table_file

    path = table_file(path.parent, path.name) or path
    if not path.exists() or path.stat().st_size <= 1:
        return pd.DataFrame()
    if path.suffix == ".parquet":
        return read_table_file(path)
    try:
        return pd.read_csv(path)
    except pd.errors.EmptyDataError:
        return pd.DataFrame()


def fig(study: dict, name: str, alt: str) -> str:
    p = (study.get("figures") or {}).get(name)
    if not p or str(p).startswith("skipped"):
        return f"_(figure `{name}` not rendered: {p or 'no data'})_\n"
    return f"![{alt}]({p})\n"


# ------------------------------------------------------------------------------ sections


def section_run(s: dict, root: Path) -> str:
    t = s.get("timing_full_run") or s["timing"]
    la = t.get("load_average") or {}
    load = (f" (1-minute load average {fmt(la['start'])} when it started, {fmt(la['end'])} when it ended)"
            if la.get("start") is not None and la.get("end") is not None else "")
    steps = t["steps"]
    rows = []
    for k, v in steps.items():
        rows.append({"step": k, "seconds": v.get("seconds"), "status": v.get("status")})
    cfg = s["config"]
    mode = "smoke" if cfg.get("smoke") else "full"
    ran = ("every step ran from scratch" if t["all_steps_ran"] else
           "some steps were skipped because an earlier run had done them (see the table); a fresh run takes longer")
    return f"""## Running it

```bash
# the whole study on the embedded model (CPU), from the repository root
.venv/bin/python experiments/error_correction_smollm2/run_study.py --blimp ../shared/data/blimp

# a smoke version (a few pairs per category, few controls, 2 BLiMP paradigms of 5 pairs; the test suite runs it)
.venv/bin/python experiments/error_correction_smollm2/run_study.py --smoke --out /tmp/study-smoke

# unchanged, on Llama-3-8B, for users with the weights and a GPU
python experiments/error_correction_smollm2/run_study.py --blimp BLIMP_FOLDER \\
    --model meta-llama/Meta-Llama-3-8B --device cuda --dtype bfloat16
```

Every size is a flag (`--n-per-category`, `--blimp-pairs`, `--blimp-accuracy-n`, `--n-controls`,
`--max-sets`, `--dims-pairs`, `--attribution-pairs`, `--verify-top`, `--hooks`, ...; `--help` lists them);
`--readme-only` regenerates this file from `results/`. Seeds are fixed (`--seed`, default 0).
The Llama-3-8B command has not been run here (no weights or hub access on this machine); it uses the same code
path with another model name, and the template pairs are regenerated under that model's tokenizer. The test suite
runs the smoke version unchanged on another model too (a random-weight Llama saved as a local folder, `--model PATH`;
`tests/test_study.py`).

**This run** ({mode}): {fmt(t['total_seconds'])} s wall time in all ({fmt(t['total_seconds'] / 60, 2)} minutes)
on a {s.get('cpu_count')}-core CPU{load}, {s.get('torch_threads')} torch threads,
`OMP_WAIT_POLICY={s.get('omp_wait_policy')}`; {ran}. (The script sets `OMP_WAIT_POLICY=PASSIVE` unless it is set:
OpenMP threads that spin while they wait take the CPU from each other and from other jobs on a shared machine.)

{table(pd.DataFrame(rows), {"step": "step", "seconds": "seconds", "status": "status"})}
"""


def section_setup(s: dict, root: Path) -> str:
    f = s["findings"]
    cfg = s["config"]
    m = s["model"]
    ds = read_table(root / "results" / "datasets.csv")
    tpl = ds[ds["dataset"] == "templates"] if not ds.empty else ds
    bl = ds[ds["dataset"] == "blimp"] if not ds.empty else ds
    y = f.get("blimp_yield") or {}
    rule = ((f.get("diff") or {}).get("templates") or {}).get("rule") or {}
    hooks = ((f.get("diff") or {}).get("templates") or {}).get("hooks") or []
    return f"""## What was run

- **Model**: `{m.get('name')}` ({m.get('architecture', '')}; {m.get('n_layers')} layers, d_model {m.get('d_model')},
  d_mlp {m.get('d_mlp')}, {m.get('n_heads')} heads), {m.get('dtype')} on {m.get('device')}; weights hash
  `{str(m.get('weights_hash', ''))[:12]}`.
- **Template pairs** (`eclens.sources.templates`, seed {cfg['seed']}): {fmt(cfg['n_per_category'])} per category,
  {fmt((f['datasets'].get('templates') or {}).get('n_valid'))} valid single-token pairs in all.
- **BLiMP single-token pairs**: of {fmt(y.get('total_pairs'))} BLiMP pairs in {fmt(y.get('paradigms_read'))} paradigm
  files, {fmt(y.get('single_token_pairs'))} differ in exactly one token under this tokenizer, in
  {fmt(y.get('paradigms_with_single_token_pairs'))} paradigms; a seeded sample of {fmt(y.get('selected'))} spread
  evenly over those paradigms (`results/blimp_yield.csv`), grouped by `linguistics_term`.
- **Diff** (`ec diff`): hooks {', '.join(f'`{h}`' for h in hooks)} at every layer; positions `p` (the changed
  token), `p+1..p+3` and the last token; normalised change `|Δ|/σ` with σ the dimension's spread over the clean
  sentences. *Stable*: {rule.get('stable', '')}; *responsive*: {rule.get('responsive', '')}; a dimension needs
  {rule.get('min_pairs', '')} pairs; massive dimensions (mean |a| ≥ {rule.get('massive_ratio', '')}× the median
  dimension's) are reported apart and never candidates.
- **Causal tests** (`ec patch`): up to {cfg['max_sets']} candidate sets (kinds alternating, up to {cfg['top_k']}
  dims each, chosen as section 4 explains) on {cfg['dims_pairs']} pairs, each against {cfg['n_controls']} random sets
  of the same size at the same hook, layer and position (and each stable set against {cfg.get('matched_controls')}
  σ-matched ones); exact patching maps on {cfg['exact_pairs']} pairs; attribution patching on
  {cfg['attribution_pairs']} pairs with its top {cfg['verify_top']} components (and as many random ones) checked by
  exact patching.

Template pairs per category:

{table(tpl, {"category": "category", "total": "generated", "valid": "valid"})}
BLiMP pairs per phenomenon (diff):

{table(bl, {"category": "category", "valid": "pairs"})}"""


def section_layers(s: dict, root: Path) -> str:
    f = s["findings"]
    R = root / "results"
    counts = read_table(R / "candidate_counts.csv")
    lay = (f.get("layers") or {}).get("templates") or {}
    rows = []
    for hook, offs in lay.items():
        for o, e in sorted(offs.items(), key=lambda kv: (int(kv[0]) < 0, int(kv[0]))):
            rows.append({"hook": hook_name(hook), "position": off(o), "pairs": e.get("n_pairs"),
                         "peak ‖Δ‖/‖a‖ (layer)": f"{fmt(e.get('peak_rel_l2'))} (L{e.get('peak_layer')})",
                         "stable dims": e.get("n_stable"), "most stable at": (f"L{e['most_stable_layer']} "
                                                                            f"({e['most_stable_count']})"
                                                                            if "most_stable_layer" in e else "–"),
                         "responsive dims": e.get("n_responsive"),
                         "most responsive at": (f"L{e['most_responsive_layer']} ({e['most_responsive_count']})"
                                                if "most_responsive_layer" in e else "–")})
    tab = pd.DataFrame(rows)
    cons = read_table(R / "candidate_consistency.csv")
    cand = f.get("candidates") or {}
    tc = cand.get("templates") or {}
    bc = cand.get("blimp") or {}
    cross = cand.get("across_datasets") or {}
    tops = read_table(R / "candidates_top.csv")
    resp = tops[(tops["dataset"] == "templates") & (tops["kind"] == "responsive")] if not tops.empty else tops
    resp = resp.sort_values("absz_median", ascending=False).head(12) if not resp.empty else resp
    stab = tops[(tops["dataset"] == "templates") & (tops["kind"] == "stable") & (tops["offset"] == 0)] \
        if not tops.empty else tops
    stab = stab.sort_values("absz_q90").head(12) if not stab.empty else stab
    at_p_resp = counts[(counts["dataset"] == "templates") & (counts["category"] == "all") & (counts["offset"] == 0)
                       & (counts["kind"] == "responsive")]["n_dims"].sum() if not counts.empty else 0
    at_p_stab = counts[(counts["dataset"] == "templates") & (counts["category"] == "all") & (counts["offset"] == 0)
                       & (counts["kind"] == "stable")]["n_dims"].sum() if not counts.empty else 0
    cons_t = cons[cons["dataset"] == "templates"] if not cons.empty else cons
    cons_x = cons[cons["dataset"].astype(str).str.contains("&")] if not cons.empty else cons
    return f"""## 1. Which layers and dimensions are stable or responsive

Over all template pairs the rule finds **{fmt(tc.get('stable'))} stable** and **{fmt(tc.get('responsive'))}
responsive** (hook, layer, position, dimension) cells; at the changed token itself {fmt(int(at_p_stab))} stable and
{fmt(int(at_p_resp))} responsive. On the BLiMP pairs: {fmt(bc.get('stable'))} stable, {fmt(bc.get('responsive'))}
responsive. Per hook and position (category `all`; `results/layers_all.csv`, `results/candidate_counts.csv`):

{table(tab)}
{stable_text(s)}
Strongest responsive dimensions (templates, all pairs; `results/candidates_top.csv`):

{table(resp, {"hook": "hook", "layer": "layer", "offset": "position", "dim": "dim", "absz_median": "median |Δ|/σ",
              "sign_consistency": "sign consistency", "frac_under": "share < 0.1σ"},
       {"offset": off, "hook": hook_name, "layer": lambda v: str(int(v)), "dim": lambda v: str(int(v))})}
Most stable dimensions at the changed token (templates, all pairs):

{table(stab, {"hook": "hook", "layer": "layer", "dim": "dim", "absz_q90": "90th pct |Δ|/σ",
              "frac_under": "share < 0.1σ", "sigma_clean": "σ (clean)"},
       {"hook": hook_name, "layer": lambda v: str(int(v)), "dim": lambda v: str(int(v))})}
**Are they the same dimensions in every category?** Of the cells listed for all pairs, the share that the rule
also lists in at least half of the categories (`results/candidate_consistency.csv`; per-category lists hold at most
the 50 best per cell):

{table(cons_t, {"hook": "hook", "kind": "kind", "n_all": "listed (all pairs)", "median_categories": "median categories",
                "frac_in_half_of_categories": "in ≥ half of the categories", "frac_in_no_category": "in none"},
       {"hook": hook_name, "frac_in_half_of_categories": pct, "frac_in_no_category": pct})}
**And across datasets?** Templates versus BLiMP, the same (hook, layer, position, dim, kind) among the listed cells:
stable Jaccard {fmt((cross.get('stable') or {}).get('jaccard'))} ({fmt((cross.get('stable') or {}).get('n_both'))}
shared), responsive Jaccard {fmt((cross.get('responsive') or {}).get('jaccard'))}
({fmt((cross.get('responsive') or {}).get('n_both'))} shared).

{table(cons_x, {"hook": "hook", "kind": "kind", "n_all": "shared cells", "jaccard_across_datasets": "Jaccard"},
       {"hook": hook_name})}
{fig(s, 'candidates_by_layer', 'candidate dimensions per layer')}
{fig(s, 'dims_heatmap', 'median normalised change per dimension and layer')}
{fig(s, 'layers_by_category', 'relative L2 change at p per category')}
"""


def section_directions(s: dict, root: Path) -> str:
    lc = read_table(root / "results" / "layers_by_category.csv")
    if lc.empty or "loo_cos_median" not in lc:
        return ""
    d = lc[(lc["hook"] == "hook_resid_post")]
    if d.empty:
        return ""
    L = int(d["layer"].max())
    pick = sorted({round(i * L / 5) for i in range(6)})
    parts = []
    for o in (0, -1):
        x = d[(d["offset"] == o) & d["layer"].isin(pick)]
        if x.empty:
            continue
        piv = x.pivot_table(index=["dataset", "category"], columns="layer", values="loo_cos_median").reset_index()
        piv.columns = ["dataset", "category", *[f"L{int(c)}" for c in piv.columns[2:]]]
        piv = piv.assign(_k=piv["category"] != "all").sort_values(["dataset", "_k", "category"]).drop(columns="_k")
        parts.append(f"At {'the changed token `p`' if o == 0 else 'the last token'}:\n\n{table(piv, max_rows=60)}")
    return ("### Directions, not just dimensions\n\nThe residual stream has no privileged basis, so the same question "
            "is asked of directions: the median over pairs of the cosine between a pair's Δ of `resid_post` and the "
            "mean Δ of the *other* pairs of its category (leave-one-out; 1 = every pair moves the same way, about 0 "
            "for unrelated directions, and near −1 when the category's changes cancel out — the mean Δ is near zero "
            "because pairs change the same two tokens in both directions, so the others' sum points against each "
            "pair; `results/layers_by_category.csv`, which also has `dir_consistency`).\n\n"
            + "\n".join(parts))


def section_massive(s: dict, root: Path) -> str:
    m = read_table(root / "results" / "massive_dims.csv")
    if m.empty:
        return "## 2. Massive dimensions\n\nNo dimension passed the massive-activation criterion.\n"
    resid = m[~m["hook"].isin(["mlp.hook_post", "attn.hook_z"])]
    neur = m[m["hook"].isin(["mlp.hook_post", "attn.hook_z"])]
    ncount = neur.groupby(["dataset", "hook"]).size().rename("dims").reset_index() if not neur.empty else neur
    stable_like = resid.dropna(subset=["absz_median_at_massive", "others_absz_median"]) if not resid.empty else resid
    calmer = int((stable_like["absz_median_at_massive"] < stable_like["others_absz_median"]).sum()) \
        if not stable_like.empty else 0
    n = len(stable_like)
    if n == 0:
        quiet_text = "No massive dimension has a finite normalised change to compare."
    else:
        quiet_text = (f"Where massive, {calmer} of {n} of these (dataset, hook, dim) rows change *less* (a smaller "
                      "median |Δ|/σ) than the other dimensions at the same cells, and "
                      f"{n - calmer} change more. ")
        if calmer == n:
            quiet_text += ("Relative to their own spread they are quieter than ordinary dimensions while their "
                           "absolute size dwarfs them, so a raw |Δ| would rank them first for the wrong reason — "
                           "the reason eclens normalises and reports them apart.")
        elif calmer == 0:
            quiet_text += ("Even relative to their own spread they move more than ordinary dimensions: they are "
                           "not inert constants here.")
        else:
            quiet_text += "They do not behave as one class: see the table."
    return f"""## 2. Massive dimensions

A dimension is *massive* at a (hook, layer, position) when its mean |activation| over the clean sentences is at
least 100× the median dimension's (Sun et al., 2024). They are excluded from the candidates and from the layer
averages, and reported here (`results/massive_dims.csv`). Residual-stream-width hooks:

{table(resid, {"dataset": "dataset", "hook": "hook", "dim": "dim", "n_cells_massive": "cells massive",
               "layers": "layers", "positions": "positions", "rms_ratio_max": "max ratio to median dim",
               "absz_median_at_massive": "median |Δ|/σ where massive", "others_absz_median": "other dims, same cells",
               "frac_under_at_massive": "share < 0.1σ", "sign_consistency_at_massive": "sign consistency"},
       {"hook": hook_name, "dim": lambda v: str(int(v))})}
{quiet_text}

MLP neurons and attention-head dimensions that pass the same criterion (counts; details in the CSV):

{table(ncount)}
{fig(s, 'massive_dims', 'massive dimensions by layer')}
"""


def section_contrasts(s: dict, root: Path) -> str:
    R = root / "results"
    top = read_table(R / "contrasts_top.csv")
    con = (s["findings"].get("contrasts") or {}).get("rows") or []
    t = pd.DataFrame(con)
    if t.empty:
        return "## 3. Grammar versus meaning\n\nNo contrast could be tested (too few pairs per group).\n"
    t["pairs (a, b)"] = [f"{a}, {b}" for a, b in zip(t["n_a"], t["n_b"])]
    t["where most (hook, layer, dims)"] = [", ".join(map(str, x)) if isinstance(x, list) else "–"
                                           for x in t.get("top_hook_layer", [None] * len(t))]
    gm = t[t["contrast"] == "grammar vs meaning"]
    lines = []
    for r in gm.to_dict("records"):
        lines.append(f"at {'the changed token' if r['position'] == 'p' else 'the last token'} ({r['measure']}): "
                     f"{fmt(r['n_significant'])} of {fmt(r['n_tests'])} ({pct(r['frac_significant'])})")
    null = [r for r in gm.to_dict("records") if r["n_significant"] == 0]
    verdict = ("**Grammar versus meaning, dimensions with BH q ≤ 0.05:** " + "; ".join(lines) + "."
               if lines else "No grammar-versus-meaning contrast could be tested.")
    if null:
        verdict += (" Null where the count is 0: " + ", ".join(f"{r['measure']} at {r['position']}" for r in null)
                    + " — no dimension changes differently for grammar errors and meaning changes there.")
    return f"""## 3. Grammar versus meaning

Per (hook, layer, dimension), a two-sided Mann–Whitney U test compares the normalised change of two groups of
categories (`grammar/*`, `meaning/*`, `typo`), on its size (`abs`: |Δ|/σ) and on its direction (`signed`: Δ/σ),
at the changed token `p` and at the last token; Benjamini–Hochberg q-values over every test of a measure (all
contrasts, positions, hooks, layers and dimensions at once). Effect: rank-biserial correlation, positive when group a
changes more (`results/contrasts_summary.csv`, `results/contrasts_by_layer.csv`). Pairs: the diff's uniform sample
(at most 512 pairs), so the groups hold what that sample holds.

{verdict}

One caution on reading the changed token: grammar pairs swap function words and inflections (*is/are*, *a/an*,
*in/on*, *himself/herself*), meaning pairs swap content words and typos produce rare word pieces, so a contrast at
`p` also says *which kind of token* changed, not only how the model treats errors. The last token, which every pair
has and where the whole sentence has been read, is the cleaner comparison.

{table(t, {"contrast": "contrast", "measure": "measure", "position": "at", "pairs (a, b)": "pairs (a, b)",
           "n_tests": "tests", "n_significant": "q ≤ 0.05", "frac_significant": "share", "min_q": "min q",
           "where most (hook, layer, dims)": "where most (hook, layer, count)",
           "share_higher_in_a": "share larger in a", "median_abs_effect": "median |effect|"},
       {"share_higher_in_a": pct, "frac_significant": pct})}
Most significant dimensions per contrast, measure and position (`results/contrasts_top.csv`):

{table(top, {"contrast": "contrast", "measure": "measure", "position": "at", "hook": "hook", "layer": "layer",
             "dim": "dim", "median_a": "median a", "median_b": "median b", "effect": "effect", "q": "q"},
       {"hook": hook_name, "layer": lambda v: str(int(v)), "dim": lambda v: str(int(v))}, max_rows=24)}
{fig(s, 'contrasts_by_layer', 'significant contrast dimensions per layer')}
"""


def section_causal(s: dict, root: Path) -> str:
    c = read_table(root / "results" / "causal_sets.csv")
    f = s["findings"].get("causal") or {}
    if c.empty:
        return ("## 4. Do the candidates matter? Candidate sets versus random sets\n\n"
                "No candidate set was tested (the diff found no candidates): null by absence.\n")
    def label(r):
        return f"{r['kind']} {hook_name(r['hook'])} L{r['layer']} {off(r['offset'])}"

    rows, rows_m = [], []
    for r in c.to_dict("records"):
        rows.append({"test": r["test"], "set": label(r), "pairs from": r["pairs_category"], "dims": r["size"],
                     "Δ KL": r["kl_effect"], "random mean": r["kl_control_mean"],
                     "× random": r["kl_ratio_to_controls"], "p": r["kl_p"], "q": r["kl_q_all"],
                     "KL gap moved": r.get("kl_gap_moved"),
                     "Δ logit diff": r["logit_diff_effect"] if pd.notna(r["logit_diff_p"]) else None,
                     "random mean ": r["logit_diff_control_mean"] if pd.notna(r["logit_diff_p"]) else None,
                     "p ": r["logit_diff_p"], "q ": r["logit_diff_q_all"]})
        if r["kind"] == "stable":
            rows_m.append({"set": label(r), "σ / layer's median": r.get("sigma_ratio"),
                           "rms |a| / layer's median": r.get("size_ratio"), "Δ KL": r["kl_effect"],
                           "σ-matched mean": r.get("kl_matched_mean"),
                           "matched σ / set's σ": r.get("matched_sigma_ratio"),
                           "p (σ-matched)": r.get("kl_p_matched"), "q (σ-matched)": r.get("kl_q_matched")})
    tm = pd.DataFrame(rows_m)
    t = pd.DataFrame(rows)
    n_beats, n_tests = f.get("n_beats", 0), f.get("n_tests", 0)
    beats = c[(c["logit_diff_beats_controls"] == True) | (c["kl_beats_controls"] == True)]  # noqa: E712
    if n_beats == 0:
        verdict = (f"**Null result: none of the {fmt(n_tests)} tests ({f.get('n_sets')} sets; KL for every set, the "
                   f"logit difference for sets at `p`) beats its random controls after Benjamini–Hochberg over all "
                   f"of them (q < {ALPHA}).** The candidate dimensions, chosen for how consistently they change (or "
                   "do not), are not shown to matter more for the model's predictions than random dimensions of "
                   "the same layer and position.")
    else:
        def how(r):
            g = r.get("kl_gap_moved")
            if g is None or not math.isfinite(g):
                return r["test"]
            if r["method"] == "patch":
                return f"{r['test']}; moves the KL {'towards' if g > 0 else 'away from'} the clean run"
            return f"{r['test']}; moves the KL {'towards' if g > 0 else 'away from'} the corrupt run"

        names = "; ".join(f"{r['kind']} {hook_name(r['hook'])} L{r['layer']} {off(r['offset'])} ({how(r)})"
                          for r in beats.to_dict("records"))
        verdict = (f"**{fmt(n_beats)} of {fmt(n_tests)} tests differ from their random controls (two-sided) after "
                   f"Benjamini–Hochberg over all of them (q < {ALPHA}):** {names}. Every other test is null.")
    nm, nbm = f.get("n_matched_tests", 0), f.get("n_beats_matched", 0)
    if not nm:
        matched_text = "no stable set was tested against matched sets"
    elif nbm == 0:
        matched_text = f"none of the {fmt(nm)} beats its σ-matched controls (null)"
    else:
        bm = c[(c.get("kl_beats_matched") == True) | (c.get("logit_diff_beats_matched") == True)]  # noqa: E712
        matched_text = (f"{fmt(nbm)} of {fmt(nm)} beat their σ-matched controls ("
                        + "; ".join(f"{hook_name(r['hook'])} L{r['layer']} {off(r['offset'])}"
                                    for r in bm.to_dict("records")) + ")")
    return f"""## 4. Do the candidates matter? Candidate sets versus random sets

Which sets: not simply the best-ranked cells. A dimension that does not change at `p+k` of an early layer is
"stable" only because the change has not reached that position yet, and one that changes at `p` of layer 0 is
"responsive" only because the input token differs. So the **stable** sets (over all pairs) come from the cells where
the *rest of the layer moves most* (dimensions that stay put while their layer changes; one set per hook), and the
**responsive** sets come from each category's own candidates (over all pairs the categories' signs disagree),
positions after `p` first (the change's effect carried forward), one set per category, each tested on pairs of
that category. Each set holds up to {s['config']['top_k']} dimensions of one hook, layer and position.

Each set gets the intervention that tests its claim, on {f.get('n_pairs')} pairs, compared with the same
intervention on {f.get('n_controls')} random sets of the same size at the same hook, layer and position:

- **stable → ablate**: replace the set by its mean over the dataset in the *clean* run: does the model use what
  stays put? The change is `metric(ablated) − metric(clean)`;
- **responsive → restore**: patch the set's clean values into the *corrupt* run: do these dimensions carry the
  change's effect? The change is `metric(patched) − metric(corrupt)`.

Metrics: KL(clean ‖ run) of the next-token distributions from `p` on, and, for sets at `p` only, the logit
difference between the clean and the corrupt run's top next tokens at `p` (read at `p`, so a set after `p` cannot
move it). Two-sided empirical p = (b+1)/(n+1) with b the random sets whose |change| is at least the candidate's;
**q: Benjamini–Hochberg over every test in this table** (`results/causal_sets.csv`, which also has the per-call
q-values). `|Δ KL| / random`: the candidate's |change| over the random sets' mean |change| (1 = like a random set).
The smallest possible p with {f.get('n_controls')} controls is {fmt(1 / (f.get('n_controls', 1) + 1))}.
The random sets are drawn uniformly from the layer, so the last two columns say how the set's dimensions compare
with the layer's median dimension at that position: their spread σ over the clean sentences and their root mean
square size. The stable rule (|Δ|/σ small) favours dimensions with a large σ, and ablating a large or
high-variance dimension moves more than ablating a typical one, so an ablation effect beyond random sets is a claim
about *those dimensions*, not yet about stability as such, unless these ratios are near 1. So each stable set is
also ablated against {f.get('n_matched')} **σ-matched** random sets (each of its dimensions swapped for one of the 20
dimensions of the same cell nearest in σ, massive ones excluded; `patch_dims_matched.csv` in the run folder), with
Benjamini–Hochberg over those {fmt(f.get('n_matched_tests'))} tests: {matched_text}.

{verdict}

Against uniform random sets (KL in nats; "KL gap moved": the share of the clean–corrupt KL the intervention moves —
towards clean for a restore, towards corrupt for an ablation):

{table(t, formats={"dims": lambda v: str(int(v)), "KL gap moved": pct})}
What the stable sets are, and the σ-matched test:

{table(tm)}
{fig(s, 'causal_sets', 'candidate sets versus random sets')}
"""


def section_attribution(s: dict, root: Path) -> str:
    a = read_table(root / "results" / "attribution_vs_exact.csv")
    f = s["findings"].get("attribution") or {}
    if a.empty:
        return "## 5. Attribution patching versus exact patching\n\nNot run.\n"
    al = (f.get("by_hook") or {}).get("all") or {}
    return f"""## 5. Attribution patching versus exact patching

Attribution patching (gradient × Δ, one backward pass) scored {fmt(f.get('n_components'))} components
(hook × layer × position) on {f.get('n_pairs')} pairs for the {f.get('metric')} metric; for each pair its top
{f.get('verify_top')} components and {f.get('verify_top')} random others were exactly patched
({fmt(f.get('n_verified'))} verified). Spearman correlation of the estimate with the exact effect over the verified
components: **{fmt(al.get('spearman'))}** pooled, {fmt(al.get('spearman_median_pair'))} median per pair; top-K
overlap {fmt(al.get('topk_overlap'))} (`results/attribution_vs_exact.csv`):

{table(a, {"hook": "components", "n_verified": "verified", "spearman": "Spearman (pooled)",
           "spearman_median_pair": "Spearman (median per pair)", "topk_overlap": "top-K overlap"},
       {"hook": hook_name})}
{fig(s, 'attribution_vs_exact', 'attribution vs exact patching')}
"""


def section_decay(s: dict, root: Path) -> str:
    R = root / "results"
    kl = read_table(R / "decay_kl.csv")
    f = s["findings"].get("decay") or {}
    lay = ((s["findings"].get("layers") or {}).get("templates") or {}).get("hook_resid_post") or {}
    rows = []
    for o, e in sorted(lay.items(), key=lambda kv: (int(kv[0]) < 0, int(kv[0]))):
        rows.append({"position": off(o), "pairs": e.get("n_pairs"), "peak layer": e.get("peak_layer"),
                     "peak ‖Δ‖/‖a‖": e.get("peak_rel_l2"), "at the last layer": e.get("last_layer_rel_l2"),
                     "mean over layers": e.get("mean_rel_l2")})
    lt = pd.DataFrame(rows)
    k = kl[(kl["group"] == "all")] if not kl.empty else kl
    piv = pd.DataFrame()
    if not k.empty:
        k = k[k["n"] >= 10] if (k["n"] >= 10).any() else k
        piv = k.pivot_table(index="dataset", columns="offset", values="kl_mean").reset_index()
        piv.columns = ["dataset", *[off(c) for c in piv.columns[1:]]]
        n = k.pivot_table(index="dataset", columns="offset", values="n").reset_index()
        n.columns = ["dataset", *[off(c) for c in n.columns[1:]]]
        piv = pd.concat([piv.assign(what="mean KL (nats)"), n.assign(what="pairs")], ignore_index=True)
        piv = piv[["dataset", "what", *[c for c in piv.columns if c not in ("dataset", "what")]]]
    grp = kl[(kl["group"] != "all") & (kl["offset"].isin([0, 1, 2, 3]))] if not kl.empty else kl
    gp = grp.pivot_table(index=["dataset", "group"], columns="offset", values="kl_mean").reset_index() \
        if not grp.empty else grp
    if not gp.empty:
        gp.columns = ["dataset", "group", *[off(c) for c in gp.columns[2:]]]
    t = f.get("templates") or {}
    exd = (f.get("exact") or {}).get("denoise/hook_resid_pre") or {}
    a0, aL = exd.get("kl_restored_at_p_first_layer"), exd.get("kl_restored_at_p_last_layer")
    left = pct(1 - aL) if aL is not None else "–"
    return f"""## 6. How the one-token perturbation decays

**Along the sequence, in the predictions.** Mean KL(clean ‖ corrupt) of the next-token distribution at position
`p+k` (diff's per-pair values; `results/decay_kl.csv`): on the template pairs {fmt(t.get('kl_mean_at_p'))} nats at
`p`, {fmt(t.get('kl_mean_at_p+1'))} at `p+1`, {fmt(t.get('kl_mean_at_p+2'))} at `p+2`, {fmt(t.get('kl_mean_at_p+3'))}
at `p+3` and {fmt(t.get('kl_mean_at_last'))} at the last token. Offsets with fewer than 10 pairs are left out.

{table(piv)}
By group of categories (templates) and for BLiMP:

{table(gp)}
**Through the layers, in the residual stream.** Relative L2 change ‖Δ‖/‖a‖ of `resid_post` (templates, all pairs;
`results/layers_all.csv`):

{table(lt)}
**Causally.** Exact patching of one position of `resid_pre`, clean→corrupt, on {f.get('exact_pairs', 0)} pairs
(`results/decay_exact_patching.csv`), measured by the downstream KL (the mean over the predictions from `p` on, so
the prediction at `p`, the largest, weighs most). Patching `p` at layer L restores the prediction at `p` and
whatever later positions read from `p` at layers ≥ L, but not what they had already read below L. It restores
{pct(a0)} of the downstream KL at layer 0 and {pct(aL)} at the last layer: the remaining {left} is the share of the
change's downstream effect that had moved off the changed token, into later positions, by then. Patching the last
token restores {pct(exd.get('kl_restored_at_last_last_layer'))} at the last layer: its own prediction's share. (The
logit difference is read at `p`, so patching `p` restores all of it at every layer; it says nothing about the
spread.)

{fig(s, 'decay_kl', 'KL by position after the change')}
{fig(s, 'decay_layers_offsets', 'relative L2 change by layer and position')}
{fig(s, 'decay_exact', 'exact patching restoration by layer, at p and after p')}
{fig(s, 'patching_map', 'exact patching map of one pair')}
"""


def section_blimp(s: dict, root: Path) -> str:
    R = root / "results"
    terms = read_table(R / "blimp_accuracy_terms.csv")
    f = s["findings"].get("blimp_accuracy") or {}
    if terms.empty:
        return "## 7. BLiMP check\n\nNot run.\n"
    t = terms.copy()
    t["95 % CI"] = [f"{fmt(a)}–{fmt(b)}" for a, b in zip(t["ci_low"], t["ci_high"])]
    return f"""## 7. BLiMP check: is this model a competent English speaker?

Accuracy = the share of pairs where the model gives the good sentence a higher total log-probability than the bad
one (`eclens.evaluate.blimp_accuracy`, conditioning on a document-start token), on the **first
{f.get('n_per_paradigm')} pairs of each of {f.get('paradigms')} paradigms** (n = {fmt(f.get('n'))}), with Wilson 95 %
intervals. GPT-2's numbers are the published ones (Warstadt et al., 2020; `blimp-results/models_summary.jsonl`),
on all 1,000 pairs per paradigm; they are context, not a paired comparison.

**Overall: {fmt(f.get('accuracy'))} (95 % CI {fmt(f.get('ci_low'))}–{fmt(f.get('ci_high'))})** versus GPT-2's
published {fmt(f.get('gpt2_published_overall'))} ({fmt(f.get('gpt2_same_paradigms'))} averaged over the same
paradigms). Per paradigm, GPT-2's figure lies above this model's interval in {f.get('paradigms_below_gpt2_ci')}
paradigms and below it in {f.get('paradigms_above_gpt2_ci')}; the median difference (this model − GPT-2) is
{fmt(f.get('median_diff_vs_gpt2'))} (`results/blimp_accuracy.csv`).

{table(t, {"linguistics_term": "phenomenon (the data's linguistics_term)", "paradigms": "paradigms", "n": "n",
           "accuracy": "accuracy", "95 % CI": "95 % CI", "gpt2_paradigm_mean": "GPT-2, same paradigms",
           "gpt2_published": "GPT-2, published term figure"})}
GPT-2's published per-phenomenon figures group some paradigms differently from the data files'
`linguistics_term` (e.g. `s-selection`), so "same paradigms" — the mean of GPT-2's per-paradigm numbers over the
paradigms in the row — is the like-for-like column.

{fig(s, 'blimp_accuracy', 'BLiMP accuracy per paradigm versus GPT-2')}
"""


def section_limits(s: dict) -> str:
    m = s["model"]
    if m.get("name") == "smollm2-135m":
        one = (f"- **One small model.** `{m.get('name')}` has 135M parameters and ships as a 4-bit (Q4_1) GGUF that "
               "eclens\n  dequantizes to float32: the weights are a quantized approximation of the released model, and "
               "nothing here says\n  what a larger model (e.g. Llama-3-8B) does — run the command above for that.")
    else:
        one = (f"- **One model.** `{m.get('name')}` ({m.get('n_layers')} layers, d_model {m.get('d_model')}, "
               f"{m.get('dtype')} on {m.get('device')}): nothing here says what another model does.")
    return f"""## Limits

{one}
- **English only**, and narrow English: template sentences from a few hundred frames, and the BLiMP pairs that happen
  to be single-token changes under this tokenizer (lexical and morphological paradigms, not word-order ones).
- **Single-token changes only**: a change of one token at one position, aligned position by position; phenomena
  that need insertions, deletions or multi-token words are out of scope.
- **Candidates are statistical**: "stable" and "responsive" are thresholds on normalised change over pairs; quantiles
  come from a sample of at most 512 pairs per run; the causal tests use {s['config']['dims_pairs']} pairs and
  {s['config']['n_controls']} random sets per set (the smallest possible p is 1/{s['config']['n_controls'] + 1}), so
  small effects can be missed. The residual stream has no privileged basis; the per-dimension view is a choice
  (directions are in the run folders' `diff_directions.safetensors`).
- **BLiMP accuracy** uses the first {s['config']['blimp_accuracy_n']} pairs of each paradigm, not all 1,000, so its
  intervals are wide per paradigm; GPT-2's numbers are from the paper, not rerun here.
"""


def section_files(root: Path) -> str:
    R = root / "results"
    names = sorted(p.name for p in R.glob("*") if p.is_file()) if R.exists() else []
    return ("## Files\n\n`results/` (every number above comes from these; `study.json` holds the configuration, "
            "timings and headline numbers): " + ", ".join(f"`{n}`" for n in names) + ".\n\n"
            "`figures/`: the PNGs above (plotly figures rendered in headless chromium). "
            "`results/report.html`: eclens's self-contained HTML report of the template run (open it in a browser; "
            "no network needed). `runs/` (not committed, hundreds of MB): the full run folders "
            "(`runs/templates`, `runs/blimp`) with the raw statistics and every table; rerunning the script "
            "resumes from them.\n")


def _row(rows: list[dict], **eq) -> dict:
    return next((r for r in rows if all(r.get(k) == v for k, v in eq.items())), {})


def stable_text(s: dict) -> str:
    f = s["findings"]
    b = f.get("stable_breakdown") or {}
    h = f.get("stable_heads") or {}
    if not b.get("total"):
        return ""
    txt = (f"**Most of these stable dimensions are stable for a trivial reason.** Of the {fmt(b['total'])} stable "
           f"dimensions over all template pairs, {fmt(b['barely_reached'])} ({pct(b['barely_reached'] / b['total'])}) "
           "sit at positions and layers the change has barely reached — where the residual stream's relative change "
           "‖Δ‖/‖a‖ is below 0.1, typically a position after `p` in an early layer: only attention moves information "
           "along the sentence, so nothing there has had the chance to change")
    if h.get("n_heads"):
        txt += (f"; {fmt(b['whole_stable_heads'])} belong to {h['n_heads']} whole attention heads "
                f"({', '.join(h['heads'])}) that never change at any position")
    txt += (f"; {fmt(b['elsewhere'])} remain ({fmt(b['at_p_elsewhere'])} of them at the changed token itself).")
    if h.get("n_heads"):
        a1, ap = h.get("attn_to_first_token"), h.get("attn_to_changed_token")
        txt += (f" The unchanging heads put {pct(a1)} of their attention, from `p` on, on the sentence's first "
                f"token and {pct(ap)} on the changed token, over {h.get('n_sentences')} clean sentences (the other "
                f"heads of their layer: {pct(h.get('others_same_layer_attn_to_first_token'))} on the first token; "
                "`results/stable_heads.csv`).")
        if a1 is not None and ap is not None and a1 > 0.95 and ap < 0.01:
            txt += (" They attend to an attention sink that is the same token in both sentences, so their output "
                    "cannot change: inherited stability, not a correction of the error.")
    return txt + "\n"


def headline(s: dict) -> str:
    f = s["findings"]
    c = f.get("causal") or {}
    b = f.get("blimp_accuracy") or {}
    br = f.get("stable_breakdown") or {}
    con = [r for r in ((f.get("contrasts") or {}).get("rows") or []) if r["contrast"] == "grammar vs meaning"
           and r["measure"] == "abs"]
    gm = "; ".join(f"{fmt(r['n_significant'])} of {fmt(r['n_tests'])} dims at {r['position']}" for r in con) \
        or "not tested"
    cand = (f.get("candidates") or {}).get("templates") or {}
    dec = (f.get("decay") or {}).get("templates") or {}
    lay = (((f.get("layers") or {}).get("templates") or {}).get(MAIN) or {})
    # Every verdict in bold follows from the numbers next to it, for whatever model the script ran.
    n_st, n_rs = cand.get("stable") or 0, cand.get("responsive") or 0
    if not n_st:
        stable = ("- **Stable dimensions: none (null).** No (hook, layer, position, dimension) cell passes the stable "
                  "rule over all template pairs (section 1).")
    else:
        trivial = br.get("total") and (br["barely_reached"] + (br.get("whole_stable_heads") or 0)) > br["total"] / 2
        stable = (f"- **Stable dimensions exist{', but mostly trivially' if trivial else ''}.** {fmt(n_st)} (hook, "
                  "layer, position, dimension) cells pass the stable rule over all template pairs"
                  + (f"; {pct(br['barely_reached'] / br['total'])} of them sit where the change has not yet arrived "
                     f"and {fmt(br.get('whole_stable_heads'))} in attention heads that only read the first token; "
                     f"{fmt(br.get('elsewhere'))} remain" if br.get("total") else "") + " (section 1).")
    cc = read_table(Path(s["_root"]) / "results" / "candidate_counts.csv")
    cats = list(((f.get("datasets") or {}).get("templates") or {}).get("categories") or {})
    own = sorted(set(cc[(cc["dataset"] == "templates") & (cc["category"] != "all") & (cc["kind"] == "responsive")
                        & (cc["n_dims"] > 0)]["category"])) if not cc.empty else []
    if n_rs:
        responsive = (f"- **Responsive dimensions exist:** {fmt(n_rs)} cells pass the responsive rule over all template "
                      "pairs (section 1).")
    else:
        responsive = ("- **No dimension responds consistently to every kind of change**: none passes the responsive "
                      "rule over all pairs; " + (f"{len(own)} of {len(cats)} categories have their own"
                                                 if own else "nor within any single category (null)")
                      + " (section 1).")
    first, last = _first_last(s, "1")
    k0, k3 = dec.get("kl_mean_at_p"), dec.get("kl_mean_at_p+3")
    kl_verb = "falls" if k0 is not None and k3 is not None and k3 < k0 else "goes"
    grows = "grows" if first is not None and last is not None and last > first else "falls"
    lines = [
        stable,
        responsive,
        (f"- **Causal tests: null.** None of {fmt(c.get('n_tests'))} set-versus-random tests survives "
         f"Benjamini–Hochberg (q < {ALPHA})" if c.get("n_tests") and not c.get("n_beats") else
         f"- **Causal tests:** {fmt(c.get('n_beats'))} of {fmt(c.get('n_tests'))} set-versus-random tests survive "
         f"Benjamini–Hochberg (q < {ALPHA}); {fmt(c.get('n_beats_matched'))} of {fmt(c.get('n_matched_tests'))} "
         "stable-set tests also beat σ-matched random sets") + " (section 4).",
        f"- **Grammar vs meaning** (size of the change, BH q ≤ {ALPHA}): {gm} (section 3).",
        f"- **Decay:** along the sentence the next-token KL {kl_verb} from {fmt(dec.get('kl_mean_at_p'))} nats at the "
        f"changed token to {fmt(dec.get('kl_mean_at_p+3'))} three tokens later and {fmt(dec.get('kl_mean_at_last'))} "
        f"at the last token; through the layers the residual change at `p+1` {grows} from "
        f"{fmt(first)} to {fmt(last)} (‖Δ‖/‖a‖, first to last layer) "
        "(section 6)." if lay else "",
        f"- **BLiMP:** {fmt(b.get('accuracy'))} (95 % CI {fmt(b.get('ci_low'))}–{fmt(b.get('ci_high'))}) on "
        f"{fmt(b.get('n'))} pairs, versus GPT-2's published {fmt(b.get('gpt2_published_overall'))} (section 7).",
    ]
    return "\n".join(x for x in lines if x)


MAIN = "hook_resid_post"


def _first_last(s: dict, off: str) -> tuple:
    """``resid_post`` relative L2 change at an offset: (first layer, last layer), from ``layers_all.csv``."""
    la = read_table(Path(s["_root"]) / "results" / "layers_all.csv")
    if la.empty:
        return None, None
    d = la[(la["dataset"] == "templates") & (la["hook"] == MAIN) & (la["offset"] == int(off))].sort_values("layer")
    if d.empty:
        return None, None
    return float(d["rel_l2_mean"].iloc[0]), float(d["rel_l2_mean"].iloc[-1])


def discussion(s: dict, root: Path) -> str:
    """Interpretive prose, each paragraph guarded by the numbers it relies on (:func:`claim`)."""
    f = s["findings"]
    if s["config"].get("smoke"):
        return ""
    c = read_table(root / "results" / "causal_sets.csv")
    br = f.get("stable_breakdown") or {}
    con = (f.get("contrasts") or {}).get("rows") or []
    gm_last = _row(con, contrast="grammar vs meaning", measure="abs", position="last")
    dec = (f.get("decay") or {}).get("templates") or {}
    p1 = _first_last(s, "1")
    last = _first_last(s, "-1")
    at_p = _first_last(s, "0")
    paras = []
    # 1. the answer on stability
    cons = read_table(root / "results" / "candidate_consistency.csv")
    ct = cons[cons["dataset"] == "templates"] if not cons.empty else cons
    cx = cons[cons["dataset"].astype(str).str.contains("&")] if not cons.empty else cons
    recur = (len(ct) > 0 and (ct["frac_in_half_of_categories"] > 0.5).all() and len(cx) > 0
             and (cx[cx["kind"] == "stable"]["jaccard_across_datasets"] > 0.1).sum() >= 3)
    ok = (bool(br.get("total")) and br["barely_reached"] / br["total"] > 0.8 and br["elsewhere"] < 1000
          and bool(recur))
    paras.append(claim(ok, (
        "**Short answer: consistent, yes; error-correcting, not shown.** The model does have dimensions whose "
        "normalised change is consistently tiny, and the same ones recur across categories and, in part, across "
        "datasets — but almost all of them are stable because the change has not reached them yet, or because they "
        "belong to heads that only read the first token. What remains after removing those is a few hundred cells."),
        "stable dimensions being mostly trivial"))
    # 2. causal: stable sets
    st = c[c["kind"] == "stable"] if not c.empty else c
    beats_both = st[(st["kl_beats_controls"] == True) & (st["kl_beats_matched"] == True)] \
        if not st.empty and "kl_beats_matched" in st else st.iloc[0:0]  # noqa: E712
    big = bool(len(beats_both)) and (beats_both["sigma_ratio"] > 3).all()
    poor_match = bool(len(beats_both)) and (beats_both["matched_sigma_ratio"] < 0.8).all()
    ordinary = st[(st["sigma_ratio"] < 1.5)] if len(st) else st
    ordinary_null = bool(len(ordinary)) and not (ordinary["kl_beats_controls"] == True).any()  # noqa: E712
    paras.append(claim(big and poor_match and ordinary_null, (
        f"**The stable sets that matter are the layer's biggest dimensions.** Ablating {len(beats_both)} of the "
        f"{len(st)} stable sets moves the predictions far more than random sets do, even σ-matched ones — but their "
        "dimensions have several times the spread and size of the layer's median dimension, and even the matched "
        f"sets fall short of their σ (there are few dimensions that large). So these tests show that {model_names(s)[0]} relies "
        "on a few large, high-variance dimensions that the one-token change leaves alone; they do not show that "
        "stability itself marks an error-correcting feature. The stable sets whose dimensions are of ordinary "
        "size are null."), "the stable sets' ablation results"))
    # 3. causal: responsive sets
    rs = c[c["kind"] == "responsive"] if not c.empty else c
    small = bool(len(rs)) and (rs["kl_gap_moved"].abs() < 0.05).all()
    sig_r = int((rs["kl_beats_controls"] == True).sum()) if len(rs) else 0  # noqa: E712
    sig_rows = rs[rs["kl_beats_controls"] == True] if len(rs) else rs  # noqa: E712
    toward = int((sig_rows["kl_gap_moved"] > 0).sum()) if len(sig_rows) else 0
    paras.append(claim(small and sig_r > 0, (
        f"**Responsive dimensions carry a detectable but tiny share of the change.** Patching the clean values of a "
        f"category's responsive set into the corrupt run differs from patching random sets in {sig_r} of {len(rs)} "
        f"tests ({toward} of them towards the clean run"
        + ("" if toward == sig_r else
           f"; {'the other makes' if sig_r - toward == 1 else 'the others make'} the corrupt run diverge further, "
           "as patching a few units out of their context can")
        + "), yet moves at most "
        f"{pct(rs['kl_gap_moved'].abs().max())} of the clean–corrupt KL gap: the effect of a one-token "
        "change is spread over many dimensions, not concentrated in a handful of error detectors."),
        "the responsive sets' restoration results"))
    # 4. grammar vs meaning
    gm_last_signed = _row(con, contrast="grammar vs meaning", measure="signed", position="last")
    ok = (bool(gm_last) and (gm_last.get("share_higher_in_a") or 1) < 0.1 and gm_last.get("n_significant", 0) > 0
          and (gm_last_signed.get("frac_significant") or 1) < (gm_last.get("frac_significant") or 0))
    paras.append(claim(ok, (
        "**Grammar errors move the model less than meaning changes, not more.** At the last token, where every "
        f"pair has been read whole, {pct(gm_last.get('frac_significant'))} of the dimensions change by a different "
        f"amount for grammar errors than for meaning changes (BH q ≤ {ALPHA}), and in "
        f"{pct(1 - (gm_last.get('share_higher_in_a') or 0))} of those the meaning change moves them more. If the "
        "model kept a dedicated, large error signal, grammar errors would stand out; instead a changed word of "
        "content reshapes the sentence's representation more than a slip of agreement, tense or article does. "
        "This does not rule out a small or distributed error signal — the signed contrasts, which ask whether the "
        "two kinds of change push dimensions in different directions, are significant for fewer dimensions."),
        "grammar versus meaning"))
    # 5. decay
    ok = (None not in p1 and None not in last and None not in at_p and p1[1] > p1[0] and last[1] > last[0]
          and (dec.get("kl_mean_at_p+3") or 9) < (dec.get("kl_mean_at_p") or 0) / 5)
    paras.append(claim(ok, (
        "**The perturbation is carried forward, not erased.** At the changed token the residual-stream change is "
        f"largest at layer 0 ({fmt(at_p[0])}) and stays large ({fmt(at_p[1])} at the last layer); at the next "
        f"position it grows with depth ({fmt(p1[0])} → {fmt(p1[1])}), and at the last token too "
        f"({fmt(last[0])} → {fmt(last[1])}): attention copies the change forward and later layers amplify it. The "
        f"predictions recover with distance — the next-token KL falls from {fmt(dec.get('kl_mean_at_p'))} to "
        f"{fmt(dec.get('kl_mean_at_p+3'))} nats within three tokens — but the representation keeps the change. "
        "That is what a model that *registers* the error looks like, rather than one that corrects it away."),
        "the decay of the perturbation"))
    return "## What it adds up to\n\n" + "\n\n".join(paras) + "\n"


def render(root: Path) -> str:
    s = json.loads((root / "results" / "study.json").read_text(encoding="utf-8"))
    s["_root"] = str(root)
    cfg = s["config"]
    smoke = ("\n> **This is a smoke run** (a handful of pairs, few controls): its numbers test the plumbing, not the "
             "science.\n" if cfg.get("smoke") else "")
    parts = [
        f"# Does {model_names(s)[0]} have consistent error-correction dimensions?\n",
        "<!-- Generated by write_readme.py from results/ — edit that script, not this file. -->\n" + smoke,
        "When one token of a sentence changes — a grammar error, a typo, a different word — which layers and which "
        "dimensions of a language model's activations change *consistently little* (candidates for robust, "
        "error-correcting features) and which change *consistently much* (error detectors), and does intervening on "
        f"them change what the model does? This study asks it of {model_names(s)[1]} with eclens.\n",
        "## Findings at a glance\n\n" + headline(s) + "\n",
        discussion(s, root),
        section_setup(s, root),
        section_layers(s, root),
        section_directions(s, root),
        section_massive(s, root),
        section_contrasts(s, root),
        section_causal(s, root),
        section_attribution(s, root),
        section_decay(s, root),
        section_blimp(s, root),
        section_limits(s),
        section_run(s, root),
        section_files(root),
    ]
    return "\n".join(p for p in parts if p)


def write_readme(root: str | Path) -> Path:
    root = Path(root)
    return atomic_write(root / "README.md", render(root))


if __name__ == "__main__":
    import sys

    print(write_readme(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent))
