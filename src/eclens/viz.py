"""Figures and views: plotly figures over a run's tables, per-pair views computed
with the model, and circuitsvis views that work in notebooks and in files.

Every figure function takes DataFrames in the shape the run folder stores them
(``docs/run-folder.md``) and returns a ``plotly.graph_objects.Figure``; nothing here
writes files. Text that comes from users (sentences, tokens, categories) is
HTML-escaped before it becomes a plotly label, because plotly renders a subset of
HTML in labels.
"""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from importlib.resources import files
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from jaxtyping import Float

from .errors import EclensError
from .runs import DEFAULT_HOOK, DIM_COLS, PAIR_COLS  # noqa: F401 - the readers' names, re-exported for figures

# Column names accepted for each quantity, first match wins; the diff and patch steps
# own the exact names, so figures take what is there rather than one spelling.
REL_L2_COLS = ("rel_l2_mean", "rel_l2_median", "rel_l2")
_PLOT_FONT = dict(family="system-ui, -apple-system, Segoe UI, Roboto, sans-serif", size=12)


# ----------------------------------------------------------------------- helpers


def esc(text: Any) -> str:
    """Escape text for plotly labels and HTML (plotly renders a subset of HTML tags)."""
    return html.escape(str(text), quote=True)


def token_label(tok: str) -> str:
    """A token as a readable, escaped axis label (leading spaces and newlines made visible)."""
    t = str(tok).replace("\n", "\\n").replace("\t", "\\t")
    if t.startswith(" "):
        t = "\u2423" + t[1:]
    return esc(t)


def offset_label(offset: int) -> str:
    o = int(offset)
    return "last" if o == -1 else "p" if o == 0 else f"p+{o}"


def pick_column(df: pd.DataFrame, candidates: Sequence[str], what: str, given: str | None = None) -> str:
    """The column to plot: ``given`` if set, else the first of ``candidates`` present."""
    if given is not None:
        if given not in df.columns:
            raise EclensError(f"no column {given!r} for {what}; columns: {', '.join(map(str, df.columns))}")
        return given
    for c in candidates:
        if c in df.columns:
            return c
    raise EclensError(f"no column for {what} (looked for {', '.join(candidates)}); "
                      f"columns: {', '.join(map(str, df.columns))}")


def _filter(df: pd.DataFrame, **eq: Any) -> pd.DataFrame:
    if "swap_direction" in df.columns and "swap_direction" not in eq:  # the pooled rows unless asked
        df = df[df["swap_direction"].astype(str) == "all"]
    for k, v in eq.items():
        if v is not None and k in df.columns:
            df = df[df[k] == v]
    return df


def _choose_hook(df: pd.DataFrame, hook: str | None) -> str | None:
    if "hook" not in df.columns:
        return None
    hooks = list(dict.fromkeys(df["hook"].astype(str)))
    if hook is not None:
        if hook not in hooks:
            raise EclensError(f"hook {hook!r} not in this table; it has {', '.join(hooks)}")
        return hook
    return DEFAULT_HOOK if DEFAULT_HOOK in hooks else hooks[-1] if hooks else None


def _layout(fig: go.Figure, title: str, **kw: Any) -> go.Figure:
    fig.update_layout(title=dict(text=title, x=0.01, xanchor="left"), font=_PLOT_FONT, template="plotly_white",
                      margin=dict(l=60, r=20, t=50, b=50), **kw)
    return fig


def _layer_axis(fig: go.Figure, n_layers: int, axis: str = "y", **kw: Any) -> None:
    """Integer layer ticks (plotly would put 0.5 steps on a 2-layer model)."""
    upd = fig.update_yaxes if axis == "y" else fig.update_xaxes
    upd(title="layer", tickmode="linear", dtick=max(1, round(n_layers / 15)), **kw)


def _empty(title: str, message: str) -> go.Figure:
    fig = go.Figure()
    fig.add_annotation(text=esc(message), showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper")
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return _layout(fig, title, height=200)


def numeric_metric_columns(df: pd.DataFrame, exclude: Sequence[str] = ()) -> list[str]:
    keys = {"layer", "position", "offset", "head", "dim", "rank", "length", "n", "count", "seed", *exclude}
    return [c for c in df.columns if c not in keys and pd.api.types.is_numeric_dtype(df[c])
            and not pd.api.types.is_bool_dtype(df[c])]


# ----------------------------------------------------------------- aggregate views


def layer_offset_heatmap(layers: pd.DataFrame, *, hook: str | None = None, category: str = "all",
                         value: str | None = None, title: str | None = None) -> go.Figure:
    """Layer × offset heatmap of the relative L2 change ‖Δ‖/‖a‖ for one hook and category.

    Reads ``layers.parquet`` rows (category, hook, layer, offset, value). Offset ``0`` is
    the changed token, ``k`` the ``k``-th token after it and ``-1`` the last token:
    the picture shows how a one-token change spreads along the sentence and through depth.
    """
    value = pick_column(layers, REL_L2_COLS, "the relative L2 change", value)
    hook = _choose_hook(layers, hook)
    df = _filter(layers, category=category, hook=hook)
    title = title or f"Relative L2 change by layer and offset — {hook or ''} [{category}]"
    if df.empty:
        return _empty(title, f"no rows for category {category!r} and hook {hook!r}")
    piv = df.pivot_table(index="layer", columns="offset", values=value, aggfunc="mean").sort_index()
    cols = sorted((c for c in piv.columns if int(c) >= 0), key=int) + [c for c in piv.columns if int(c) == -1]
    piv = piv[cols]
    n = None
    if "n" in df.columns:
        n = df.pivot_table(index="layer", columns="offset", values="n", aggfunc="max").reindex(
            index=piv.index, columns=cols).to_numpy()
    fig = go.Figure(go.Heatmap(
        z=piv.to_numpy(), x=[offset_label(c) for c in cols], y=piv.index.tolist(), colorscale="Viridis",
        customdata=n, colorbar=dict(title=esc(value)),
        hovertemplate="layer %{y}, %{x}<br>" + esc(value) + " = %{z:.4g}"
        + ("<br>pairs: %{customdata}" if n is not None else "") + "<extra></extra>",
    ))
    fig.update_xaxes(title="position relative to the changed token p", type="category")
    _layer_axis(fig, len(piv.index))
    return _layout(fig, esc(title), height=max(320, 14 * len(piv.index) + 120))


def category_curves(layers: pd.DataFrame, *, hook: str | None = None, offset: int = 0, value: str | None = None,
                    title: str | None = None) -> go.Figure:
    """One curve per category: the change at ``offset`` through the layers."""
    value = pick_column(layers, REL_L2_COLS, "the relative L2 change", value)
    hook = _choose_hook(layers, hook)
    df = _filter(layers, hook=hook, offset=offset)
    title = title or f"{value} at {offset_label(offset)} by layer and category — {hook or ''}"
    if df.empty:
        return _empty(title, f"no rows for hook {hook!r} at offset {offset}")
    fig = go.Figure()
    cats = sorted(df["category"].astype(str).unique(), key=lambda c: (c != "all", c))
    for cat in cats:
        d = df[df["category"] == cat].groupby("layer", as_index=False)[value].mean().sort_values("layer")
        fig.add_trace(go.Scatter(
            x=d["layer"], y=d[value], mode="lines+markers", name=esc(cat),
            line=dict(width=3 if cat == "all" else 1.5, color="black" if cat == "all" else None),
            hovertemplate=esc(cat) + "<br>layer %{x}: %{y:.4g}<extra></extra>",
        ))
    _layer_axis(fig, int(df["layer"].nunique()), axis="x")
    fig.update_yaxes(title=esc(value))
    return _layout(fig, esc(title), height=420, legend=dict(font=dict(size=10)))


def layer_dim_heatmap(dims: pd.DataFrame, *, hook: str | None = None, category: str = "all", offset: int = 0,
                      value: str | None = None, massive: Sequence[int] | None = None, sort: str = "max",
                      max_dims: int = 1024, title: str | None = None) -> go.Figure:
    """Layer × dimension heatmap of the normalised change |Δ|/spread (``dims.parquet``).

    Dimensions can be re-sorted in the figure (buttons: by index, by the largest value
    over layers, by the mean over layers); massive-activation dimensions are marked in
    a strip above the map (from ``massive`` or a boolean ``massive`` column). Models
    with more than ``max_dims`` dimensions keep the ``max_dims`` with the largest values.
    """
    value = pick_column(dims, DIM_COLS, "the normalised |Δ|", value)
    hook = _choose_hook(dims, hook)
    df = _filter(dims, category=category, hook=hook, offset=offset)
    title = title or f"Normalised |Δ| by layer and dimension at {offset_label(offset)} — {hook or ''} [{category}]"
    if df.empty:
        return _empty(title, f"no rows for category {category!r}, hook {hook!r}, offset {offset}")
    piv = df.pivot_table(index="layer", columns="dim", values=value, aggfunc="mean").sort_index()
    if piv.empty:  # every value missing (e.g. an offset past the last token of every pair)
        return _empty(title, f"no values for category {category!r}, hook {hook!r}, offset {offset}")
    if massive is None and "massive" in df.columns:
        massive = sorted(int(d) for d in df.loc[df["massive"].astype(bool), "dim"].unique())
    massive_set = {int(d) for d in (massive or ())}
    z = piv.to_numpy(dtype=float)
    dim_ids = np.array([int(d) for d in piv.columns])
    with np.errstate(all="ignore"):
        col_max = np.nan_to_num(np.nanmax(z, axis=0), nan=-np.inf)
        col_mean = np.nan_to_num(np.nanmean(z, axis=0), nan=-np.inf)
    if len(dim_ids) > max_dims:
        keep = np.sort(np.argsort(-col_max, kind="stable")[:max_dims])
        z, dim_ids, col_max, col_mean = z[:, keep], dim_ids[keep], col_max[keep], col_mean[keep]
    orders = {
        "index": np.argsort(dim_ids, kind="stable"),
        "max": np.argsort(-col_max, kind="stable"),
        "mean": np.argsort(-col_mean, kind="stable"),
    }
    if sort not in orders:
        raise EclensError(f"unknown sort {sort!r}: use one of {', '.join(orders)}")
    layers_ = piv.index.tolist()
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, row_heights=[0.05, 0.95], vertical_spacing=0.01)

    def strip_of(order):
        return [[1.0 if int(d) in massive_set else None for d in dim_ids[order]]]

    def short(a):  # 3 significant digits keep the button copies small
        return [[None if not np.isfinite(v) else float(f"{v:.3g}") for v in row] for row in a]

    # Columns sit at x = 0..D-1 in the chosen order; customdata carries the dimension id
    # for the hover. Each button swaps in z and customdata in its order.
    xs = list(range(len(dim_ids)))
    first = orders[sort]
    cd_of = {k: np.tile(dim_ids[o], (len(layers_), 1)).tolist() for k, o in orders.items()}
    fig.add_trace(go.Heatmap(z=strip_of(first), x=xs, y=["massive"], customdata=[dim_ids[first].tolist()],
                             showscale=False, colorscale=[[0, "#d62728"], [1, "#d62728"]], zmin=0, zmax=1,
                             hovertemplate="dim %{customdata}: massive activation<extra></extra>"), row=1, col=1)
    fig.add_trace(go.Heatmap(z=short(z[:, first]), x=xs, y=layers_, customdata=cd_of[sort],
                             colorscale="Viridis", colorbar=dict(title=esc(value)),
                             hovertemplate="layer %{y}, dim %{customdata}<br>" + esc(value)
                             + " = %{z:.3g}<extra></extra>"), row=2, col=1)
    buttons = []
    for name in ("max", "mean", "index"):
        o = orders[name]
        buttons.append(dict(label=f"sort: {name}", method="restyle",
                            args=[{"z": [strip_of(o), short(z[:, o])],
                                   "customdata": [[dim_ids[o].tolist()], cd_of[name]]}, [0, 1]]))
    buttons.sort(key=lambda btn: btn["label"] != f"sort: {sort}")
    # Top left, under the title: the modebar owns the top right corner.
    fig.update_layout(updatemenus=[dict(type="buttons", direction="right", x=0.0, xanchor="left", y=1.02,
                                        yanchor="bottom", buttons=buttons, showactive=True, pad=dict(b=4))])
    fig.update_xaxes(title=f"dimension (sorted; {len(massive_set)} massive marked in red)", showticklabels=False,
                     row=2, col=1)
    fig.update_xaxes(showticklabels=False, row=1, col=1)
    _layer_axis(fig, len(layers_), row=2, col=1)
    fig = _layout(fig, esc(title), height=max(400, 14 * len(layers_) + 190))
    fig.update_layout(margin=dict(t=95))
    return fig


def control_distribution(effect: float, controls: Sequence[float], *, p_value: float | None = None,
                         metric: str = "effect", title: str | None = None) -> go.Figure:
    """A candidate intervention's effect against the distribution of the same
    intervention on random dimension sets of the same size (empirical p-value)."""
    ctrl = np.asarray([c for c in controls if c is not None and np.isfinite(c)], dtype=float)
    if p_value is None and len(ctrl):
        # One-sided in the direction of the effect, with the +1 correction (never p = 0).
        more = np.sum(np.abs(ctrl) >= abs(effect))
        p_value = float((more + 1) / (len(ctrl) + 1))
    title = title or f"Candidate vs {len(ctrl)} random controls"
    fig = go.Figure()
    fig.add_trace(go.Histogram(x=ctrl, name="random sets", marker_color="#9aa5b1", nbinsx=min(40, max(5, len(ctrl)))))
    fig.add_vline(x=float(effect), line=dict(color="#d62728", width=3),
                  annotation_text=f"candidate {float(effect):.4g}" + (f" (p={p_value:.3g})" if p_value is not None
                                                                       else ""),
                  annotation_position="top")
    fig.update_xaxes(title=esc(metric))
    fig.update_yaxes(title="random sets")
    return _layout(fig, esc(title), height=300, showlegend=False, bargap=0.05)


PATCH_METRICS = ("logit_diff_restored", "kl_restored", "logprob_restored", "logit_diff", "kl", "logprob")


def patching_heatmap(exact: pd.DataFrame, *, pair_id: str | None = None, direction: str = "denoise",
                     hook: str | None = None, metric: str | None = None, head: int = -1,
                     tokens: Sequence[str] | None = None, changed: int | None = None,
                     title: str | None = None) -> go.Figure:
    """Layer × position map of an exact activation-patching effect for one pair.

    Rows of ``patch_exact.csv`` (pair_id, direction, hook, layer, position[, head],
    metrics). ``metric`` defaults to the first of :data:`PATCH_METRICS` with values for
    this pair (the fraction of the clean–corrupt gap restored, when the gap is large
    enough to divide by). ``head=-1`` selects whole-hook rows. ``tokens`` label the x
    axis; the changed position is outlined.
    """
    pcol = next((c for c in PAIR_COLS if c in exact.columns), None)
    df = exact
    if pcol is not None:
        if pair_id is None:
            pair_id = str(df[pcol].iloc[0]) if len(df) else None
        df = df[df[pcol].astype(str) == str(pair_id)]
    if "head" in df.columns:
        df = df[df["head"] == head]
    hook = _choose_hook(df, hook) if len(df) else hook
    df = _filter(df, direction=direction, hook=hook)
    if metric is None:
        metric = next((m for m in PATCH_METRICS if m in df.columns and df[m].notna().any()), None)
        metric = metric or next(iter(numeric_metric_columns(df)), None)
    title = title or f"Patching ({direction}, {hook or ''}) — {metric}"
    if df.empty or metric is None:
        return _empty(title, f"no exact patching rows for pair {pair_id!r}, {direction}, {hook!r}")
    piv = df.pivot_table(index="layer", columns="position", values=metric, aggfunc="mean",
                         dropna=False).sort_index()
    pos = [int(p) for p in piv.columns]
    if tokens is not None:
        xt = [f"{p}: {token_label(tokens[p])}" if p < len(tokens) else str(p) for p in pos]
    else:
        xt = [str(p) for p in pos]
    z = piv.to_numpy(dtype=float)
    zmax = float(np.nanmax(np.abs(z))) if np.isfinite(z).any() else 1.0
    fig = go.Figure(go.Heatmap(
        z=z, x=xt, y=piv.index.tolist(), colorscale="RdBu", zmid=0, zmin=-zmax, zmax=zmax,
        colorbar=dict(title=esc(metric)),
        hovertemplate="layer %{y}, position %{x}<br>" + esc(metric) + " = %{z:.4g}<extra></extra>",
    ))
    if changed is not None and changed in pos:
        i = pos.index(changed)
        fig.add_shape(type="rect", x0=i - 0.5, x1=i + 0.5, y0=min(piv.index) - 0.5, y1=max(piv.index) + 0.5,
                      line=dict(color="black", width=2))
    fig.update_xaxes(title="position: token", type="category", tickangle=-45)
    _layer_axis(fig, len(piv.index))
    return _layout(fig, esc(title), height=max(320, 14 * len(piv.index) + 160))


def attribution_scatter(attr: pd.DataFrame, *, attribution: str | None = None, exact: str | None = None,
                        color: str = "hook", title: str | None = None) -> go.Figure:
    """Attribution-patching estimate against the exact patching effect, per component.

    Points on the diagonal mean the linear (gradient × Δ) estimate is faithful; the
    title carries the Spearman rank correlation over the verified components.
    """
    a = pick_column(attr, ("attribution", "attr", "score", "attribution_score"), "the attribution score",
                    attribution)
    e = pick_column(attr, ("exact", "exact_score", "exact_effect"), "the exact score", exact)
    df = attr[attr["verified"].astype(bool)] if "verified" in attr.columns else attr
    df = df.dropna(subset=[a, e])
    title = title or "Attribution patching vs exact patching"
    if df.empty:
        return _empty(title, "no component has both an attribution and an exact score")
    from scipy.stats import spearmanr

    varies = len(df) > 2 and df[a].nunique() > 1 and df[e].nunique() > 1
    rho = float(spearmanr(df[a], df[e]).statistic) if varies else float("nan")
    fig = go.Figure()
    groups = df.groupby(df[color].astype(str)) if color in df.columns else [("components", df)]
    for name, d in groups:
        hover = [f"{esc(r.get('hook', ''))} L{r.get('layer', '')} pos {r.get('position', '')}"
                 for r in d.to_dict("records")]
        fig.add_trace(go.Scatter(x=d[a], y=d[e], mode="markers", name=esc(name), text=hover, marker=dict(size=6),
                                 hovertemplate="%{text}<br>attribution %{x:.4g}<br>exact %{y:.4g}<extra></extra>"))
    lo = float(np.nanmin([df[a].min(), df[e].min()]))
    hi = float(np.nanmax([df[a].max(), df[e].max()]))
    fig.add_trace(go.Scatter(x=[lo, hi], y=[lo, hi], mode="lines", line=dict(dash="dot", color="gray"),
                             name="y = x", hoverinfo="skip"))
    fig.update_xaxes(title=f"attribution estimate ({esc(a)})")
    fig.update_yaxes(title=f"exact effect ({esc(e)})")
    return _layout(fig, esc(f"{title} — Spearman ρ = {rho:.3f} over {len(df)} components"), height=420)


# --------------------------------------------------------------- per-pair views


@dataclass
class PairView:
    """What the per-pair views need, from one forward pass over the clean and corrupt sentence.

    ``diffs``: one row per (hook, layer, position): ``rel_l2`` = ‖Δ‖/‖a_clean‖ and
    ``cosine`` between clean and corrupt activations. ``kl``: per position, KL of the
    clean next-token distribution from the corrupt one (zero before the change).
    ``attention``: layer -> (clean, corrupt) patterns ``[heads, query, key]``.
    """

    pair_id: str
    category: str
    clean: str
    corrupt: str
    position: int
    clean_tokens: list[str]
    corrupt_tokens: list[str]
    diffs: pd.DataFrame
    kl: list[float]
    attention: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.pair_id, "category": self.category, "clean": self.clean, "corrupt": self.corrupt,
            "position": self.position, "clean_tokens": self.clean_tokens, "corrupt_tokens": self.corrupt_tokens,
            "kl": self.kl, "diffs": self.diffs.to_dict("list"),
            "attention": {str(k): {"clean": np.round(c, 4).tolist(), "corrupt": np.round(x, 4).tolist()}
                          for k, (c, x) in self.attention.items()},
        }


def _kl_per_position(logits: Float[Any, "two seq vocab"]) -> np.ndarray:
    import torch

    lp = torch.log_softmax(logits.float(), dim=-1)
    kl = (lp[0].exp() * (lp[0] - lp[1])).sum(-1)
    return kl.clamp_min(0).cpu().numpy()


def pair_view(model, pair, *, hooks: Sequence[str] = (DEFAULT_HOOK,), attention_layers: Sequence[int] = ()) -> PairView:
    """Per-layer, per-position differences, downstream KL and attention patterns for one aligned pair.

    One forward pass over the two sentences (right-padded: a span pair's may differ in length),
    caching only the requested hooks, so it is cheap enough to run on demand. Rows are the clean
    sentence's positions; a span pair's changed sentence is read at the aligned position (after the
    span: the same token, from its own span end; inside it: the changed span's token at that place,
    its last one where the clean span is longer).
    """
    import torch

    from .pairs import token_strings

    n_layers = int(model.cfg.n_layers)
    for L in attention_layers:
        if not 0 <= int(L) < n_layers:
            raise EclensError(f"layer {L} out of range: the model has layers 0..{n_layers - 1}")
    want = {f"blocks.{L}.{h}" for L in range(n_layers) for h in hooks}
    want |= {f"blocks.{int(L)}.attn.hook_pattern" for L in attention_layers}
    dev = next(model.parameters()).device
    nc, nx = len(pair.clean_ids), len(pair.corrupt_ids)
    toks = torch.full((2, max(nc, nx)), int(pair.clean_ids[-1]), dtype=torch.long)
    toks[0, :nc], toks[1, :nx] = torch.tensor(pair.clean_ids), torch.tensor(pair.corrupt_ids)
    start, shift = int(pair.position), int(pair.corrupt_end) - int(pair.clean_end)
    xs = torch.tensor([t if t < start else t + shift if t >= pair.clean_end - 1 else min(t, pair.corrupt_end - 1)
                       for t in range(nc)], device=dev)  # the changed sentence's position of each clean one
    with torch.no_grad():
        logits, cache = model.run_with_cache(toks.to(dev), names_filter=lambda n: n in want)
    logits = torch.stack([logits[0, :nc], logits[1, xs]])
    rows = []
    for h in hooks:
        for L in range(n_layers):
            name = f"blocks.{L}.{h}"
            if name not in cache:
                raise EclensError(f"hook {name} was not cached; see `ec model info` for hook names")
            a = cache[name].float()
            a = a.reshape(a.shape[0], a.shape[1], -1)  # per-head hooks [2, seq, heads, d] flatten to [2, seq, heads*d]
            a = torch.stack([a[0, :nc], a[1, xs]])
            d = a[1] - a[0]
            rel = (d.norm(dim=-1) / a[0].norm(dim=-1).clamp_min(1e-8)).cpu().numpy()
            cos = torch.nn.functional.cosine_similarity(a[0], a[1], dim=-1).cpu().numpy()
            for t in range(a.shape[1]):
                rows.append((h, L, t, float(rel[t]), float(cos[t])))
    diffs = pd.DataFrame(rows, columns=["hook", "layer", "position", "rel_l2", "cosine"])
    att = {}
    for L in attention_layers:
        pat = cache[f"blocks.{int(L)}.attn.hook_pattern"].float().cpu().numpy()
        att[int(L)] = (pat[0][:, :nc, :nc], pat[1][:, :nx, :nx])
    tok = model.tokenizer
    return PairView(pair.id, pair.category, pair.pair.clean, pair.pair.corrupt, int(pair.position),
                    token_strings(tok, pair.clean_ids), token_strings(tok, pair.corrupt_ids), diffs,
                    [float(x) for x in _kl_per_position(logits)], att)


def pair_diff_heatmap(view: PairView, *, hook: str | None = None, title: str | None = None) -> go.Figure:
    """Layer × position relative L2 change for one pair, tokens on the x axis."""
    hook = _choose_hook(view.diffs, hook)
    df = _filter(view.diffs, hook=hook)
    piv = df.pivot_table(index="layer", columns="position", values="rel_l2").sort_index()
    xt = [f"{p}: {token_label(view.clean_tokens[p])}" + (f" → {token_label(view.corrupt_tokens[p])}"
                                                          if p == view.position else "")
          for p in piv.columns]
    fig = go.Figure(go.Heatmap(z=piv.to_numpy(), x=xt, y=piv.index.tolist(), colorscale="Viridis",
                               colorbar=dict(title="‖Δ‖/‖a‖"),
                               hovertemplate="layer %{y}, %{x}<br>‖Δ‖/‖a‖ = %{z:.4g}<extra></extra>"))
    fig.update_xaxes(title="position: clean token", type="category", tickangle=-45)
    _layer_axis(fig, len(piv.index))
    return _layout(fig, esc(title or f"Relative L2 change of {hook} for pair {view.pair_id}"),
                   height=max(320, 14 * len(piv.index) + 160))


def pair_layer_curve(view: PairView, *, hook: str | None = None) -> go.Figure:
    """Relative L2 change through the layers at the changed position, the next one and the last one."""
    hook = _choose_hook(view.diffs, hook)
    df = _filter(view.diffs, hook=hook)
    fig = go.Figure()
    last = len(view.clean_tokens) - 1
    for pos, name in ((view.position, "changed p"), (view.position + 1, "p+1"), (last, "last")):
        d = df[df["position"] == pos].sort_values("layer")
        if d.empty or (name == "last" and pos <= view.position + 1 and pos != view.position):
            continue
        fig.add_trace(go.Scatter(x=d["layer"], y=d["rel_l2"], mode="lines+markers",
                                 name=f"{name} ({token_label(view.clean_tokens[pos])})"))
    _layer_axis(fig, int(df["layer"].nunique()), axis="x")
    fig.update_yaxes(title="‖Δ‖/‖a‖")
    return _layout(fig, esc(f"Relative L2 change by layer — {hook}"), height=340)


# ------------------------------------------------------------------ circuitsvis


@lru_cache(maxsize=1)
def circuitsvis_bundle() -> str:
    """circuitsvis's browser bundle (defines the global ``CircuitsVis``), safe to inline in a <script>."""
    import circuitsvis

    path = Path(circuitsvis.__file__).parent / "dist" / "cdn" / "iife.js"
    if not path.exists():
        raise EclensError(f"circuitsvis bundle missing at {path}: reinstall circuitsvis")
    # The bundle holds "</script>" in a string literal; "<\/script>" is the same string in JS
    # and does not end the enclosing HTML script element.
    return path.read_text(encoding="utf-8").replace("</script", "<\\/script")


def plotly_bundle() -> str:
    from plotly.offline import get_plotlyjs

    return get_plotlyjs()


def finite(obj: Any) -> Any:
    """NaN and infinities (run files may hold them, e.g. an undefined ratio) as JSON null."""
    import math

    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    if isinstance(obj, np.generic):
        return finite(obj.item())
    return obj


def script_json(obj: Any) -> str:
    """JSON that is safe inside an HTML <script> element (no "</script>", "<!--" or line separators)."""
    s = json.dumps(finite(obj), ensure_ascii=False, default=_json_default, allow_nan=False)
    return (s.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
            .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def figure_json(fig: go.Figure) -> dict:
    """A figure as a plain dict (data, layout) ready for ``Plotly.newPlot``; NaN becomes null."""
    return json.loads(fig.to_json())


@dataclass
class CircuitsView:
    """A circuitsvis component with its props.

    In a notebook it renders as rich output (self-contained, like circuitsvis's own
    views); :meth:`fragment` gives a div + script that expects ``CircuitsVis`` to be
    loaded once on the page (the report inlines the bundle once for all views).
    """

    component: str
    props: dict[str, Any]
    height: int = 0

    def fragment(self, element_id: str) -> str:
        return (f'<div id="{esc(element_id)}" class="cv"></div>'
                f"<script>CircuitsVis.render({script_json(element_id)}, CircuitsVis.{self.component}, "
                f"{script_json(self.props)});</script>")

    def standalone_html(self) -> str:
        """A complete HTML page with the bundle inlined: opens with no network."""
        return ("<!doctype html><html><head><meta charset='utf-8'><title>eclens view</title></head><body>"
                f"<script>{circuitsvis_bundle()}</script>{self.fragment('cv-main')}</body></html>")

    def _repr_html_(self) -> str:
        import uuid

        return f"<script>{circuitsvis_bundle()}</script>{self.fragment('cv-' + uuid.uuid4().hex[:12])}"

    def save(self, path: str | Path) -> Path:
        from .runs import atomic_write

        return atomic_write(path, self.standalone_html())


def attention_view(tokens: Sequence[str], pattern: Float[np.ndarray, "heads query key"],
                   head_names: Sequence[str] | None = None) -> CircuitsView:
    """circuitsvis ``attention_heads`` for one sentence's pattern at one layer."""
    pattern = np.asarray(pattern, dtype=float)
    if pattern.ndim != 3 or pattern.shape[1] != len(tokens) or pattern.shape[2] != len(tokens):
        raise EclensError(f"attention pattern of shape {pattern.shape} does not match {len(tokens)} tokens")
    names = list(head_names) if head_names is not None else [f"head {h}" for h in range(pattern.shape[0])]
    return CircuitsView("AttentionHeads", {"attention": np.round(pattern, 4).tolist(), "tokens": list(tokens),
                                           "attentionHeadNames": names, "maskUpperTri": True})


def kl_tokens_view(tokens: Sequence[str], kl: Sequence[float]) -> CircuitsView:
    """circuitsvis ``colored_tokens``: each token coloured by the KL of the next-token
    distribution between clean and corrupt (how far the change reaches downstream)."""
    if len(tokens) != len(kl):
        raise EclensError(f"{len(tokens)} tokens but {len(kl)} KL values")
    vals = [float(x) for x in kl]
    return CircuitsView("ColoredTokens", {"tokens": list(tokens), "values": vals, "minValue": 0.0,
                                          "maxValue": max(vals) if vals and max(vals) > 0 else 1.0})


def pair_attention_views(view: PairView, layer: int) -> tuple[CircuitsView, CircuitsView]:
    """Clean and corrupt attention-heads views of one pair at ``layer`` (needs ``attention_layers`` in :func:`pair_view`)."""
    if layer not in view.attention:
        raise EclensError(f"no attention pattern for layer {layer}; pass attention_layers=[{layer}] to pair_view")
    c, x = view.attention[layer]
    return attention_view(view.clean_tokens, c), attention_view(view.corrupt_tokens, x)


def static_file(name: str) -> Path:
    """A file shipped in ``eclens/web/static``."""
    return Path(str(files("eclens") / "web" / "static" / name))
