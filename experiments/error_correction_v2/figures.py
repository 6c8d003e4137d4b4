"""The study's figures, built from ``results/`` only and written as PNG into ``figures/``.

Plotly figures rendered by headless chromium (``Plotly.toImage``, the plotly bundle eclens ships); no
browser is ever downloaded. Without chromium or playwright the figures are skipped with the reason (the
README says so) and the study goes on.
"""

from __future__ import annotations

import base64
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
GRAMMAR = ("grammar/agreement", "grammar/anaphor", "grammar/article", "grammar/preposition", "grammar/tense")
COLORS = {"error": "#c0392b", "twin": "#2c7fb8", "trained": "#222222", "random": "#999999"}
OFFSETS = ["1", "2", "3", "4", "last"]


def read_result(results: Path, name: str) -> pd.DataFrame | None:
    """A table of ``results/`` (``None`` when that step wrote none)."""
    p = results / name
    return pd.read_csv(p) if p.exists() else None


def error_bars(y, low, high, thickness: float | None = None) -> dict:
    """Plotly asymmetric error bars from an estimate and its interval (``thickness``: plotly's default if None)."""
    bars = dict(type="data", symmetric=False, array=high - y, arrayminus=y - low)
    return bars if thickness is None else {**bars, "thickness": thickness}


def recovery_curves(results: Path) -> go.Figure | None:
    """Median KL(clean ‖ run) by offset after the change, errors vs twins, per model and grammar category."""
    t = read_result(results, "recovery_curves.csv")
    if t is None or t.empty:
        return None
    models = list(dict.fromkeys(t["model"]))
    cats = [c for c in GRAMMAR if c in set(t["category"])]
    fig = make_subplots(rows=len(models), cols=len(cats), shared_yaxes=True, vertical_spacing=0.12,
                        subplot_titles=[f"{m} · {c.split('/')[-1]}" for m in models for c in cats])
    for i, m in enumerate(models, 1):
        for j, c in enumerate(cats, 1):
            for role in ("error", "twin"):
                s = t[(t["model"] == m) & (t["category"] == c) & (t["run"] == role)]
                s = s.assign(o=s["offset"].astype(str)).set_index("o").reindex([o for o in OFFSETS]).dropna(
                    subset=["kl_median"])
                fig.add_trace(go.Scatter(
                    x=list(s.index), y=s["kl_median"], mode="lines+markers", name=role, legendgroup=role,
                    showlegend=(i == 1 and j == 1), line=dict(color=COLORS[role]),
                    error_y=error_bars(s["kl_median"], s["low"], s["high"], 1)), row=i, col=j)
            fig.update_yaxes(type="log", row=i, col=j)
    fig.update_xaxes(title_text="tokens after the change", row=len(models))
    fig.update_yaxes(title_text="median KL(clean ‖ run), nats", col=1)
    fig.update_layout(title="Recovery curves: errors vs twins (median over clusters, 95 % cluster intervals)",
                      width=260 * len(cats) + 120, height=330 * len(models) + 80, template="plotly_white")
    return fig


def recovery_index(results: Path) -> go.Figure | None:
    """The recovery index at the last token per grammar category, trained models and their random copies."""
    t = read_result(results, "recovery_index.csv")
    if t is None or t.empty:
        return None
    t = t[(t["offset"].astype(str) == "last") & t["category"].isin(GRAMMAR)]
    fig = go.Figure()
    for m in dict.fromkeys(t["model"]):
        s = t[t["model"] == m]
        fig.add_trace(go.Scatter(x=[c.split("/")[-1] for c in s["category"]], y=s["estimate"], mode="markers",
                                 name=m, marker=dict(size=10), error_y=error_bars(s["estimate"], s["low"], s["high"])))
    b = read_result(results, "baseline_random_measure.csv")
    if b is not None and {"weights", "measure", "category"} <= set(b.columns):
        r = b[(b["weights"] == "random") & (b["measure"] == "recovery_index_last") & b["category"].isin(GRAMMAR)]
        for m in dict.fromkeys(r["model"]):
            s = r[r["model"] == m]
            fig.add_trace(go.Scatter(x=[c.split("/")[-1] for c in s["category"]], y=s["estimate"], mode="markers",
                                     name=f"random:{m}", marker=dict(size=9, symbol="x"),
                                     error_y=error_bars(s["estimate"], s["low"], s["high"])))
    fig.add_hline(y=0, line=dict(color="gray", dash="dot"))
    fig.update_layout(title="Recovery index at the last token (< 0: errors fade faster than twins)",
                      yaxis_title="log KL ratio, errors minus twins", width=820, height=460,
                      template="plotly_white", scattermode="group")
    return fig


def probe(results: Path) -> go.Figure | None:
    """Probe accuracy by depth-normalised layer, with the control task and the permutation null."""
    t = read_result(results, "probe.csv")
    if t is None or t.empty:
        return None
    t = t[t["layer"] >= 0]
    fig = go.Figure()
    for m in dict.fromkeys(t["model"]):
        s = t[t["model"] == m].sort_values("layer")
        x = (s["layer"] + 1) / (s["layer"].max() + 1)
        fig.add_trace(go.Scatter(x=x, y=s["acc"], mode="lines+markers", name=f"{m} probe",
                                 error_y=error_bars(s["acc"], s["low"], s["high"], 1)))
        fig.add_trace(go.Scatter(x=x, y=s["control_acc"], mode="lines", name=f"{m} control task",
                                 line=dict(dash="dash")))
        fig.add_trace(go.Scatter(x=x, y=s["null_q95"], mode="lines", name=f"{m} null 95 %", line=dict(dash="dot")))
    fig.update_layout(title="Probe for 'error' on 2x2 cells at detect, by depth", xaxis_title="layer / n_layers",
                      yaxis_title="cross-validated accuracy", width=820, height=460, template="plotly_white")
    return fig


def skip(results: Path) -> go.Figure | None:
    """Skipping one layer's block, attention or MLP: its effect on the last-token KL, errors minus twins (the
    per-layer 95 % intervals of the skip step, not PLAN.md's Bonferroni-adjusted ones)."""
    t = read_result(results, "patch_skip.csv")
    if t is None or t.empty or "d_kl_diff" not in t.columns:
        return None
    models = list(dict.fromkeys(t["model"]))
    fig = make_subplots(rows=1, cols=len(models), shared_yaxes=True, subplot_titles=models)
    for j, m in enumerate(models, 1):
        s = t[(t["model"] == m) & ~t["broken"].astype(bool)]
        for comp in dict.fromkeys(s["component"]):
            c = s[s["component"] == comp].sort_values("layer")
            fig.add_trace(go.Scatter(x=c["layer"], y=c["d_kl_diff"], mode="lines+markers", name=str(comp),
                                     legendgroup=str(comp), showlegend=j == 1,
                                     error_y=error_bars(c["d_kl_diff"], c["d_kl_diff_low"], c["d_kl_diff_high"], 1)),
                          row=1, col=j)
        fig.update_xaxes(title_text="layer skipped", row=1, col=j)
    fig.add_hline(y=0, line=dict(color="gray", dash="dot"))
    fig.update_yaxes(title_text="Δ KL at the last token, errors minus twins (nats)", col=1)
    fig.update_layout(title="Layer skipping: does removing a layer hurt errors more than twins?",
                      width=520 * len(models), height=460, template="plotly_white")
    return fig


def blimp(results: Path) -> go.Figure | None:
    """BLiMP accuracy per paradigm for each model against BLiMP's own GPT-2 results."""
    files = sorted(results.glob("blimp_*.csv"))
    if not files:
        return None
    t = pd.concat([pd.read_csv(p) for p in files], ignore_index=True)
    t = t[t["UID"] != "overall"]
    fig = go.Figure()
    for m in dict.fromkeys(t["model"]):
        s = t[t["model"] == m]
        fig.add_trace(go.Scatter(x=s["gpt2"], y=s["accuracy"], mode="markers", name=m, text=s["UID"],
                                 error_y=error_bars(s["accuracy"], s["low"], s["high"], 0.6)))
    fig.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", line=dict(dash="dot", color="gray"), name="y = x"))
    fig.update_layout(title="BLiMP accuracy per paradigm (95 % cluster intervals) vs GPT-2 (models_summary.jsonl)",
                      xaxis_title="GPT-2", yaxis_title="this model", width=760, height=560, template="plotly_white")
    return fig


BUILDERS = {"recovery_curves": recovery_curves, "recovery_index": recovery_index, "probe": probe, "skip": skip,
            "blimp_accuracy": blimp}


def export_png(figs: dict[str, go.Figure], folder: Path) -> dict[str, str]:
    """Each figure as ``folder/NAME.png``; ``{name: file name or 'skipped: why'}``."""
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
    folder.mkdir(parents=True, exist_ok=True)
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
                w, h = int(lay.get("width") or 900), int(lay.get("height") or 450)
                url = page.evaluate("([spec, w, h]) => Plotly.toImage({data: spec.data, layout: spec.layout},"
                                    " {format: 'png', width: w, height: h, scale: 1})", [spec, w, h])
                atomic_write(folder / f"{name}.png", base64.b64decode(url.split(",", 1)[1]))
                out[name] = f"{name}.png"
        finally:
            browser.close()
    return out


def write_figures(out: Path) -> dict[str, str]:
    """Every figure whose tables exist, as PNG in ``out/figures``."""
    results = out / "results"
    figs = {}
    for name, build in BUILDERS.items():
        fig = build(results)
        if fig is not None:
            figs[name] = fig
    return export_png(figs, out / "figures")
