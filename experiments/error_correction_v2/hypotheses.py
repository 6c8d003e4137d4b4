"""The decision rules of PLAN.md, applied to one run folder each: one row per hypothesis with the
estimate, its interval, the verdict (supported / refuted / inconclusive), the rule and the files read.

Nothing here chooses a threshold: every number below is PLAN.md's. Each function reads the tables a
run wrote (``ec run``'s measure, skip and dims steps) and recomputes only what PLAN.md asks for that the
run does not report as such (the grammar categories pooled; Bonferroni-adjusted skip intervals).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from eclens.bootstrap import BootstrapConfig, cluster_bootstrap
from eclens.recovery import RecoveryConfig, ignore_comparison, recovery_index
from eclens.tables import read_table_file, table_file

SUPPORTED, REFUTED, INCONCLUSIVE = "supported", "refuted", "inconclusive"
POOLED = "grammar (pooled)"
EQUIVALENCE = 0.1          # H1: an index inside ±0.1 counts as no difference
MIN_IGNORE_COST = 0.05     # H2: nats ignoring must cost for the test to have power
ALPHA = 0.05
SKIP_WIDTH = 0.5           # H5: nats; narrower adjusted intervals make a null a refutation
COLUMNS = ["model", "hypothesis", "estimand", "estimate", "low", "high", "verdict", "detail", "source"]


def read(run: Path, stem: str) -> pd.DataFrame | None:
    """A run's table by name, whichever format the run wrote it in (:func:`eclens.tables.table_file`);
    ``None`` when the step did not run."""
    p = table_file(run, stem)
    return None if p is None else read_table_file(p)


def _row(model: str, h: str, estimand: str, est=math.nan, low=math.nan, high=math.nan, verdict=INCONCLUSIVE,
         detail: str = "", source: str = "") -> dict:
    return dict(zip(COLUMNS, [model, h, estimand, est, low, high, verdict, detail, source]))


def pooled_pairs(run: Path) -> pd.DataFrame | None:
    """The grammar categories' recovery rows as one category; clusters keep their category, so frames of two
    categories that share a name stay two clusters."""
    df = read(run, "recovery_pairs")
    if df is None:
        return None
    g = df[df["category"].astype(str).str.startswith("grammar/")].copy()
    g["cluster"] = g["category"].astype(str) + "|" + g["cluster"].astype(str)
    g["category"] = POOLED
    return g


def h1_recovery(model: str, run: Path) -> dict:
    est = "recovery index at the last token, pooled grammar errors vs twins (median over clusters)"
    g = pooled_pairs(run)
    if g is None or g.empty:
        return _row(model, "H1", est, detail="no recovery table: the measure step did not run", source="-")
    t = recovery_index(g, RecoveryConfig())
    r = t[t["offset"] == "last"]
    if r.empty or not np.isfinite(r["low"].iloc[0]):
        return _row(model, "H1", est, detail="no error/twin clusters to pair", source="recovery_pairs")
    r = r.iloc[0]
    if r["high"] < 0:
        v, why = SUPPORTED, "interval below 0: errors fade faster than twins"
    elif r["low"] > 0:
        v, why = REFUTED, "interval above 0: errors persist more than twins"
    elif r["low"] >= -EQUIVALENCE and r["high"] <= EQUIVALENCE:
        v, why = REFUTED, f"interval inside ±{EQUIVALENCE}: no difference worth the name"
    else:
        v, why = INCONCLUSIVE, "interval spans 0 and is wider than the equivalence margin"
    return _row(model, "H1", est, r["index"], r["low"], r["high"], v,
                f"{why}; {int(r['n_clusters'])} clusters, {r['comparison']}", "recovery_pairs")


def h2_ignore(model: str, run: Path) -> dict:
    est = "suffix log-prob gap, error minus ignore run (both ignore baselines), pooled grammar errors"
    g = pooled_pairs(run)
    if g is None or g.empty:
        return _row(model, "H2", est, detail="no recovery table", source="-")
    t = ignore_comparison(g, RecoveryConfig()).set_index("ignore")
    if not {"ignore_mean", "ignore_delete"} <= set(t.index):
        return _row(model, "H2", est, detail="an ignore baseline is missing", source="recovery_pairs")
    powered = all(t.loc[k, "cost"] >= MIN_IGNORE_COST and t.loc[k, "cost_low"] > 0 for k in t.index)
    lows, highs = t["gap_low"], t["gap_high"]
    if not powered:
        v, why = INCONCLUSIVE, "no power: ignoring the token costs too little"
    elif (lows > 0).all():
        v, why = SUPPORTED, "both gaps above 0: the error run ends closer to clean than either ignore run"
    elif (highs < 0).any():
        v, why = REFUTED, "a gap below 0: ignoring the token would do better"
    else:
        v, why = INCONCLUSIVE, "a gap's interval spans 0"
    worst = t.loc[lows.idxmin()]
    detail = "; ".join(f"{k}: gap {t.loc[k, 'gap']:+.2f} [{t.loc[k, 'gap_low']:+.2f}, {t.loc[k, 'gap_high']:+.2f}], "
                       f"cost {t.loc[k, 'cost']:.2f}" for k in t.index)
    return _row(model, "H2", est, worst["gap"], worst["gap_low"], worst["gap_high"], v, f"{why} ({detail})",
                "recovery_pairs")


def h3_invariance(model: str, run: Path) -> dict:
    est = "error-invariant cells (ratio < 0.5, BH q < 0.05) vs the within-cluster permutation null"
    p = Path(run) / "measure.json"
    inv = json.loads(p.read_text()).get("invariance_summary") if p.exists() else None
    if not inv:
        return _row(model, "H3", est, detail="no invariance summary: the measure step did not run it", source="-")
    count, null = int(inv["invariant"]), [int(x) for x in inv.get("null_invariant", [])]
    if not null:
        return _row(model, "H3", est, count, detail="no permutation null was drawn", source="measure.json")
    p_perm = (1 + sum(n >= count for n in null)) / (len(null) + 1)
    q95 = float(np.quantile(null, 0.95))
    if count > max(null) and p_perm < ALPHA:
        v, why = SUPPORTED, f"above every permutation (p = {p_perm:.3f})"
    elif count <= q95:
        v, why = REFUTED, f"not above the null's 95th percentile ({q95:g})"
    else:
        v, why = INCONCLUSIVE, f"above the null's 95th percentile but p = {p_perm:.3f} (too few permutations?)"
    return _row(model, "H3", est, count, min(null), max(null), v,
                f"{why}; {len(null)} permutations, {inv['reached']} reached cells; error-specific: "
                f"{inv.get('specific')} vs null max {inv.get('null_specific_max')}", "measure.json")


def probe_pass(probe: pd.DataFrame) -> pd.DataFrame:
    """Layers whose accuracy's lower bound beats the control task and whose accuracy beats the permutation null."""
    p = probe[probe["layer"] >= 0]
    return p[(p["low"] > p["control_acc"]) & (p["acc"] > p["null_q95"])]


def random_probe_peak(run: Path) -> pd.Series | None:
    """The random-weight copy's probe peak (``baseline_random_measure``: ``ec run --baseline random``)."""
    t = read(run, "baseline_random_measure")
    if t is None:
        return None
    r = t[(t["weights"] == "random") & (t["measure"] == "probe_peak_acc")]
    return None if r.empty else r.iloc[0]


def h4_probe(model: str, run: Path) -> dict:
    est = "probe accuracy at detect on 2x2 cells: lower bound above the control task and above the null"
    probe = read(run, "probe")
    if probe is None or probe.empty:
        return _row(model, "H4", est, detail="no probe table (no 2x2 cells?)", source="-")
    best = probe[probe["layer"] >= 0].sort_values("acc", ascending=False).iloc[0]
    passing = probe_pass(probe)
    at_chance = bool(probe["layer0_at_chance"].iloc[0]) if "layer0_at_chance" in probe else True
    # The baseline keeps only the random copy's peak (no per-layer control task): it "passes" when its peak's
    # lower bound clears the control-task accuracy the trained model's best layer had to clear.
    peak = random_probe_peak(run)
    rnd = None if peak is None else int(float(peak["low"]) > float(best["control_acc"]))
    if not at_chance:
        v, why = INCONCLUSIVE, "void: layer 0 is not at chance, so the design does not hold token identity fixed"
    elif rnd:
        v, why = INCONCLUSIVE, (f"void: the random-weight copy's probe peak {float(peak['estimate']):.2f} "
                                f"[{float(peak['low']):.2f}, {float(peak['high']):.2f}] clears the control task too")
    elif len(passing):
        v, why = SUPPORTED, f"layers {', '.join(map(str, passing['layer'].astype(int)))} pass"
    else:
        v, why = REFUTED, "no layer's lower bound exceeds its control-task accuracy"
    why += "" if rnd is not None else "; the random-weight probe is not in this run"
    return _row(model, "H4", est, best["acc"], best["low"], best["high"], v,
                f"{why}; best layer {int(best['layer'])}: control {best['control_acc']:.2f}, null q95 "
                f"{best['null_q95']:.2f}", "probe")


def h5_skip(model: str, run: Path) -> dict:
    est = "skip effect on last-token KL, errors minus twins, Bonferroni-adjusted cluster intervals"
    per, table = read(run, "patch_skip_pairs"), read(run, "patch_skip")
    if per is None or table is None or per.empty:
        return _row(model, "H5", est, detail="no skip step in this run", source="-")
    ok = table[~table["broken"].astype(bool)][["layer", "component"]]
    m = len(ok)
    if not m or not {"error", "twin"} <= set(per["role"]):
        return _row(model, "H5", est, detail="no usable skips, or no twins", source="patch_skip_pairs")
    cfg = BootstrapConfig(n_boot=2000, level=1 - ALPHA / m)
    rows = []
    for L, comp in ok.itertuples(index=False):
        sub = per[(per["layer"] == L) & (per["component"] == comp)]
        g = sub.groupby(["cluster", "role"])["d_kl"].mean().unstack()
        if not {"error", "twin"} <= set(g.columns):
            continue
        d = (g["error"] - g["twin"]).dropna()
        if len(d) < 2:
            continue
        iv = cluster_bootstrap(d.to_numpy(), list(d.index), "mean", cfg)
        rows.append((int(L), str(comp), iv.estimate, iv.low, iv.high))
    if not rows:
        return _row(model, "H5", est, detail="fewer than 2 paired clusters per skip", source="patch_skip_pairs")
    r = pd.DataFrame(rows, columns=["layer", "component", "est", "low", "high"])
    up = r[r["low"] > 0]
    top = (up if len(up) else r).sort_values("est", ascending=False).iloc[0]
    width = float((r["high"] - r["low"]).median())
    if len(up):
        v, why = SUPPORTED, "above 0: " + ", ".join(f"L{a} {b}" for a, b in zip(up["layer"], up["component"]))
    elif width < SKIP_WIDTH:
        v, why = REFUTED, f"no interval above 0, median width {width:.2f} nats < {SKIP_WIDTH}"
    else:
        v, why = INCONCLUSIVE, f"no interval above 0, but the intervals are wide (median {width:.2f} nats)"
    return _row(model, "H5", est, top["est"], top["low"], top["high"], v,
                f"{why}; {len(r)} skips tested at level {cfg.level:.4f}; shown: L{top['layer']} {top['component']}",
                "patch_skip_pairs")


def h6_sets(model: str, run: Path) -> dict:
    est = "candidate sets on held-out clusters vs matched controls, and their error-minus-twin interaction"
    t = read(run, "patch_dims")
    if t is None or t.empty:
        return _row(model, "H6", est, detail="no set was tested (none chosen, or no dims step)", source="-")
    inter = t["interaction_low"].gt(0) | t["interaction_high"].lt(0) if "interaction_low" in t else False
    good = t[t["significant"].astype(bool) & inter]
    null_m = t["verdict"].astype(str).str.startswith(("null", "beats uniform controls only"))
    if len(good):
        v, why, show = SUPPORTED, f"{len(good)} of {len(t)} sets", good.iloc[0]
    elif null_m.all():
        v, why, show = REFUTED, f"all {len(t)} sets null against matched controls", t.iloc[0]
    else:
        v, why, show = INCONCLUSIVE, "a set beats its controls but its interaction interval spans 0", t.iloc[0]
    cols = ("interaction", "interaction_low", "interaction_high")
    vals = [show[c] if c in show else math.nan for c in cols]
    return _row(model, "H6", est, *vals, v, f"{why}; shown: {show['set']}", "patch_dims")


def decide(model: str, run: Path) -> pd.DataFrame:
    run = Path(run)
    rows = [h1_recovery(model, run), h2_ignore(model, run), h3_invariance(model, run),
            h4_probe(model, run), h5_skip(model, run), h6_sets(model, run)]
    return pd.DataFrame(rows, columns=COLUMNS)


def replication(table: pd.DataFrame) -> pd.DataFrame:
    """H7: per hypothesis, whether every real model reached the same verdict."""
    out = []
    for h, g in table.groupby("hypothesis", sort=True):
        verdicts = dict(zip(g["model"], g["verdict"]))
        same = len(set(verdicts.values())) == 1
        out.append({"hypothesis": h, **{f"verdict_{m}": v for m, v in verdicts.items()},
                    "replicates": same and next(iter(verdicts.values())) != INCONCLUSIVE})
    return pd.DataFrame(out)
