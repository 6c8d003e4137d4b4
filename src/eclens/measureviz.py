"""Figures of the error-correction measurements: recovery curves and the probe curve (plotly)."""

from __future__ import annotations

import math

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

RUN_COLORS = {"error": "#d62728", "twin": "#1f77b4", "ignore_mean": "#7f7f7f", "ignore_delete": "#bcbd22"}


def recovery_figure(curves: pd.DataFrame, title: str = "Recovery: KL(clean ‖ run) after detect") -> go.Figure:
    """One panel per category: median KL per offset after detect (``last`` = the last token) for each run, with
    the cluster-bootstrap intervals as error bars; log y axis."""
    cats = sorted(curves["category"].unique())
    cols = min(3, max(1, len(cats)))
    rows = max(1, math.ceil(len(cats) / cols))
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=cats, shared_yaxes=True)
    shown: set[str] = set()
    for i, cat in enumerate(cats):
        sub = curves[curves["category"] == cat]
        for run, df in sub.groupby("run", sort=False):
            fig.add_trace(go.Scatter(
                x=df["offset"].astype(str), y=df["kl_median"], mode="lines+markers", name=run,
                legendgroup=run, showlegend=run not in shown, line=dict(color=RUN_COLORS.get(run)),
                error_y=dict(type="data", symmetric=False, array=df["high"] - df["kl_median"],
                             arrayminus=df["kl_median"] - df["low"]),
                hovertemplate=f"{cat} · {run}<br>offset %{{x}}<br>median KL %{{y:.3g}}<extra></extra>",
            ), row=i // cols + 1, col=i % cols + 1)
            shown.add(run)
    fig.update_yaxes(type="log")
    fig.update_xaxes(title_text="offset after detect")
    fig.update_layout(title=title, height=280 * rows, template="plotly_white")
    return fig


def probe_figure(curves: dict[str, pd.DataFrame], title: str = "Error signal: probe accuracy per layer") -> go.Figure:
    """Probe accuracy per layer (intervals as a band) for each named curve, with each one's permutation-null 95th
    percentile dotted; layer -1 is the embedding."""
    fig = go.Figure()
    for name, c in curves.items():
        fig.add_trace(go.Scatter(x=c["layer"], y=c["high"], mode="lines", line=dict(width=0), showlegend=False,
                                 hoverinfo="skip", legendgroup=name))
        fig.add_trace(go.Scatter(x=c["layer"], y=c["low"], mode="lines", line=dict(width=0), fill="tonexty",
                                 showlegend=False, hoverinfo="skip", legendgroup=name))
        fig.add_trace(go.Scatter(x=c["layer"], y=c["acc"], mode="lines+markers", name=name, legendgroup=name))
        fig.add_trace(go.Scatter(x=c["layer"], y=c["null_q95"], mode="lines", line=dict(dash="dot"),
                                 name=f"{name}: permutation null 95 %", legendgroup=name))
    fig.update_layout(title=title, xaxis_title="layer (-1 = embedding)", yaxis_title="CV accuracy (by cluster)",
                      template="plotly_white", yaxis_range=[0.3, 1.02])
    return fig


def sensitivity_figure(sens: pd.DataFrame, category: str = "all",
                       title: str = "Threshold sensitivity: candidates over each rule's threshold") -> go.Figure:
    """``sensitivity.csv`` as one panel per rule threshold: the number of candidate dimensions (all hooks) against
    the threshold, one line per swap direction of ``category`` (``all`` pools them: stable only); the run's own
    setting is marked. Counts that swing by orders of magnitude around the setting say the rule decides the answer."""
    params = [p for p in ("threshold", "responsive_z", "responsive_sign") if p in set(sens["parameter"])]
    fig = make_subplots(rows=1, cols=max(1, len(params)), subplot_titles=[
        {"threshold": "stable: |Δ|/σ under", "responsive_z": "responsive: median |Δ|/σ at least",
         "responsive_sign": "responsive: sign consistency at least"}[p] for p in params])
    sub = sens[sens["category"] == category]
    for i, p in enumerate(params):
        d = sub[sub["parameter"] == p].groupby(["swap_direction", "value"], as_index=False) \
            .agg(n=("n_candidates", "sum"), default=("default", "any"))
        for direction, g in d.groupby("swap_direction", sort=True):
            g = g.sort_values("value")
            fig.add_trace(go.Scatter(
                x=g["value"], y=g["n"], mode="lines+markers", name=str(direction), legendgroup=str(direction),
                showlegend=i == 0, marker=dict(size=[11 if x else 6 for x in g["default"]],
                                               symbol=["diamond" if x else "circle" for x in g["default"]]),
                hovertemplate=f"{direction}<br>{p} %{{x}}<br>%{{y}} candidates<extra></extra>"), row=1, col=i + 1)
    fig.update_yaxes(type="log", title_text="candidate dimensions", row=1, col=1)
    fig.update_layout(title=f"{title} [{category}]", height=340, template="plotly_white")
    return fig
