"""``ec compare``: runs of different models on the same pairs, side by side.

Models differ in depth, so every curve is drawn against depth-normalised layers
(``layer / n_layers``: 0 is the first layer's input, values near 1 the last layers). Pairs are
matched by id; a pair valid under one tokenizer and not another is listed, and per-pair numbers
use the pairs valid in every run (the intersection). Tables the runs store aggregated over their
own valid pairs (``layers.parquet``, ``candidates.parquet``) cannot be restricted to the intersection;
the page says how large it is against each run's own set.

Each panel is a :class:`Panel` naming the run files it needs; a panel whose file is missing from
any run is skipped and listed as such on the page. The measure step's recovery curves (recomputed
from ``recovery.csv`` on the shared pairs) and probe curves (on depth) are panels too; later tables
(causal tests) plug in by adding a panel to :data:`PANELS`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .errors import EclensError
from .gguf_models import CONFOUND, EMBEDDED_MODELS
from .hooks import DEFAULT_HOOKS
from .report import BOOT_JS, CSS, Page, html_table, lib_blocks
from .runs import RunData, atomic_write
from .viz import esc


def pooled_rows(df: pd.DataFrame) -> pd.DataFrame:
    """A diff table's rows that pool every swap direction (all rows of tables written before the column)."""
    return df if "swap_direction" not in df.columns else df[df["swap_direction"].astype(str) == "all"]

COLORS = ("#1f5fae", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf", "#7f7f7f")
PAGE = "compare.html"


@dataclass
class Compared:
    """The runs being compared, with their labels, depths and pair sets."""

    runs: list[RunData]
    labels: list[str]
    n_layers: list[int]
    valid: list[set[str]]
    common: set[str]
    notes: list[str] = field(default_factory=list)


@dataclass
class Panel:
    """One section of the page, drawn from ``files`` (all must be in every run)."""

    sid: str
    title: str
    files: tuple[str, ...]
    draw: Callable[[Page, Compared], None]


def _variant(m: dict) -> str | None:
    """base / instruct: recorded since eclens knew two embedded models; older runs of an embedded
    model get it from the model's name."""
    spec = EMBEDDED_MODELS.get(str(m.get("name")))
    return m.get("variant") or (spec.variant if spec else None)


def _label(rd: RunData) -> str:
    m = rd.manifest.get("model") or {}
    name = str(m.get("name") or "?")
    if os.sep in name and Path(name).exists():  # a local folder or file: its name, not the whole path
        name = Path(name).name
    extra = []
    if m.get("random_init"):
        extra.append("random weights")
    if _variant(m):
        extra.append(_variant(m))
    return f"{rd.name} ({name}{', ' + ', '.join(extra) if extra else ''})"


def _n_layers(rd: RunData) -> int:
    m = rd.manifest.get("model") or {}
    if m.get("n_layers"):
        return int(m["n_layers"])
    lay = rd.layers
    if lay is not None and len(lay):
        return int(lay["layer"].max()) + 1
    raise EclensError(f"{rd.path}: no model entry in manifest.json and no layers.parquet: cannot place its layers")


def load_compared(runs: list[str | os.PathLike]) -> Compared:
    if len(runs) < 2:
        raise EclensError("ec compare needs at least two run folders")
    rds = []
    for r in runs:
        p = Path(r)
        if not p.is_dir() or not ((p / "manifest.json").exists() or (p / "pairs.jsonl").exists()):
            raise EclensError(f"{p}: not a run folder (no manifest.json or pairs.jsonl)")
        rds.append(RunData(p))
    labels = [_label(rd) for rd in rds]
    if len(set(labels)) < len(labels):
        labels = [f"{i + 1}: {lab}" for i, lab in enumerate(labels)]
    valid = [{str(p["id"]) for p in (rd.pairs or [])} for rd in rds]
    common = set.intersection(*valid) if all(valid) else set()
    return Compared(rds, labels, [_n_layers(rd) for rd in rds], valid, common)


def _depth(layer, n_layers: int):
    return layer / n_layers


# ------------------------------------------------------------------- panels


def _runs_panel(page: Page, c: Compared) -> None:
    rows = []
    for rd, lab, n, v in zip(c.runs, c.labels, c.n_layers, c.valid):
        m = rd.manifest.get("model") or {}
        ver = m.get("verify") or {}
        rows.append({"run": lab, "model": m.get("name", ""), "architecture": m.get("architecture", ""),
                     "variant": _variant(m) or "", "random weights": "yes" if m.get("random_init") else "no",
                     "layers": n, "d_model": m.get("d_model", ""), "parameters": m.get("n_params", ""),
                     "prepend BOS": m.get("prepend_bos", ""), "valid pairs": len(v),
                     "verified": ("pass" if ver.get("passed") else "FAIL") if ver else ""})
    page.add(html_table(pd.DataFrame(rows)))
    variants = {_variant(rd.manifest.get("model") or {}) for rd in c.runs}
    if {"base", "instruct"} <= variants:
        page.add(f'<p class="note"><b>Confound:</b> {esc(CONFOUND)} A difference between these runs need not '
                 "come from the model family.</p>")
    if any((rd.manifest.get("model") or {}).get("random_init") for rd in c.runs):
        page.add('<p class="note">Runs marked <i>random weights</i> use the named architecture with freshly '
                 "initialised weights: a chance baseline. What they share with a trained model comes from the "
                 "architecture and the data, not from training.</p>")


def _pairs_panel(page: Page, c: Compared) -> None:
    union = set.union(*c.valid) if c.valid else set()
    rows = []
    for pid in sorted(union - c.common):
        row = {"pair": pid}
        for lab, v, rd in zip(c.labels, c.valid, c.runs):
            row[lab] = "valid" if pid in v else _rejection(rd, pid)
        rows.append(row)
    own = ", ".join(f"{lab}: {len(v)}" for lab, v in zip(c.labels, c.valid))
    page.add(f"<p>{len(c.common)} pairs are valid in every run (the intersection; per-pair numbers below use "
             f"only these). Valid pairs per run: {esc(own)}. {len(union - c.common)} pairs are valid in some runs "
             "and not in others: <i>rejected</i> by that run's tokenizer (its reason), or <i>absent</i> from that "
             "run's pairs altogether (e.g. a run made from fewer pairs):</p>")
    page.add(html_table(pd.DataFrame(rows), max_rows=200) if rows else '<p class="muted">(none)</p>')
    if any(len(v) != len(c.common) for v in c.valid):
        c.notes.append("layers.parquet and candidates.parquet aggregate each run's own valid pairs, which differ from "
                       f"the intersection ({len(c.common)} pairs): {own}.")


def _rejection(rd: RunData, pid: str) -> str:
    for r in rd.rejected or []:
        if str(r.get("id", (r.get("pair") or {}).get("id", ""))) == pid:
            return f"rejected: {r.get('reason', '?')}"
    return "absent"


def _curves(c: Compared, df_of: Callable[[RunData], pd.DataFrame | None], value: str, hooks, title: str,
            ytitle: str, offset: int | None = 0) -> go.Figure:
    fig = make_subplots(rows=1, cols=len(hooks), shared_yaxes=True, subplot_titles=[h.removeprefix("hook_")
                                                                                      for h in hooks])
    for i, (rd, lab, n) in enumerate(zip(c.runs, c.labels, c.n_layers)):
        df = df_of(rd)
        if df is None:
            continue
        for j, h in enumerate(hooks):
            d = df[df["hook"] == h]
            if offset is not None and "offset" in d:
                d = d[d["offset"] == offset]
            d = d.groupby("layer", as_index=False)[value].mean().sort_values("layer")
            fig.add_trace(go.Scatter(x=_depth(d["layer"], n), y=d[value], mode="lines+markers", name=lab,
                                     legendgroup=lab, showlegend=j == 0, line={"color": COLORS[i % len(COLORS)]},
                                     hovertemplate=f"{esc(lab)}<br>layer %{{customdata}} / {n}<br>%{{y:.4g}}",
                                     customdata=d["layer"]), row=1, col=j + 1)
    fig.update_xaxes(title_text="layer / n_layers", range=[0, 1])
    fig.update_yaxes(title_text=ytitle, col=1)
    fig.update_layout(title=title, height=380, margin={"t": 70, "l": 60, "r": 20, "b": 50},
                      legend={"orientation": "h", "y": -0.2})
    return fig


def _hooks_in(c: Compared, df_of, col="hook") -> list[str]:
    have = [set(df[col]) for df in (df_of(rd) for rd in c.runs) if df is not None]
    common = set.intersection(*have) if have else set()
    return [h for h in DEFAULT_HOOKS if h in common] or sorted(common)[:5]


def _layers_all(rd: RunData) -> pd.DataFrame | None:
    lay = rd.layers
    return None if lay is None else pooled_rows(lay[lay["category"] == "all"])


def _layers_panel(page: Page, c: Compared) -> None:
    hooks = _hooks_in(c, _layers_all)
    page.add("<p>Mean relative change ‖Δ‖/‖a_clean‖ over each run's valid pairs, category <code>all</code>, "
             "at the changed position and at the last token.</p>")
    page.figure(_curves(c, _layers_all, "rel_l2_mean", hooks, "relative change at the changed position",
                        "‖Δ‖ / ‖a‖", offset=0))
    page.figure(_curves(c, _layers_all, "rel_l2_mean", hooks, "relative change at the last token",
                        "‖Δ‖ / ‖a‖", offset=-1))


def _shares(rd: RunData, d_model: int) -> pd.DataFrame | None:
    lay = _layers_all(rd)
    if lay is None:
        return None
    # candidates sit at any aligned position (stable ones mostly after the change): the share of
    # d_model per (hook, layer), averaged over the positions the change can reach
    lay = lay[lay["reachable"].astype(bool)].copy()
    lay["stable_share"] = lay["n_stable"] / d_model
    lay["responsive_share"] = lay["n_responsive"] / d_model
    return lay


def _candidates_panel(page: Page, c: Compared) -> None:
    rows = []
    for rd, lab in zip(c.runs, c.labels):
        cand = rd.candidates
        d = int((rd.manifest.get("model") or {}).get("d_model") or 0)
        cand = cand[cand["category"] == "all"] if cand is not None and "category" in cand else cand
        lay = _layers_all(rd)
        tested = (lay["reachable"].astype(bool).sum() * d) if lay is not None and d else 0
        for kind in ("stable", "responsive"):
            n = int((cand["kind"] == kind).sum()) if cand is not None and len(cand) else 0
            col = f"n_{kind}"
            passing = int(lay[col].sum()) if lay is not None and col in lay else 0
            rows.append({"run": lab, "kind": kind, "candidates (capped)": n, "passing the rule": passing,
                         "share of tested dims": passing / tested if tested else float("nan")})
    page.add("<p>Candidates of category <code>all</code>: the number listed in candidates.parquet (at most 50 per "
             "hook, layer, offset and kind), the number of dimensions passing the rule before that cap, and "
             "that number as a share of the reachable (hook, layer, offset, dimension) points tested — a "
             "share, so models of different width compare.</p>")
    page.add(html_table(pd.DataFrame(rows)))
    hooks = _hooks_in(c, _layers_all)
    for kind in ("stable", "responsive"):
        page.figure(_curves(c, lambda rd: _shares(rd, int((rd.manifest.get("model") or {}).get("d_model") or 1)),
                            f"{kind}_share", hooks, f"share of dimensions passing the {kind} rule (mean over reachable positions)",
                            "share of d_model", offset=None))


def _pairs_metrics_panel(page: Page, c: Compared) -> None:
    metrics = ["logprob_diff", "token_logprob_diff", "kl_0", "kl_mean"]
    rows, frames = [], []
    for rd, lab in zip(c.runs, c.labels):
        pm = rd.pair_metrics
        if pm is None:
            continue
        pm = pm[pm["id"].astype(str).isin(c.common)]
        frames.append((lab, pm))
        for cat, g in [("all", pm), *sorted(pm.groupby("category"))]:
            rows.append({"run": lab, "category": cat, "pairs": len(g),
                         **{m: float(g[m].mean()) for m in metrics if m in g}})
    page.add(f"<p>Behaviour on the {len(c.common)} pairs valid in every run: mean log-prob change of the "
             "sentence (corrupt − clean), of the changed token, and KL of the next-token distribution at the "
             "changed position and averaged after it.</p>")
    page.add(html_table(pd.DataFrame(rows), max_rows=100))
    fig = go.Figure()
    for i, (lab, pm) in enumerate(frames):
        g = pm.groupby("category")["kl_0"].mean()
        fig.add_trace(go.Bar(x=list(g.index), y=list(g.values), name=lab, marker_color=COLORS[i % len(COLORS)]))
    fig.update_layout(title="KL at the changed position, per category (intersection)", barmode="group",
                      height=360, yaxis_title="mean KL (nats)", legend={"orientation": "h", "y": -0.3})
    page.figure(fig)


def _recovery(rd: RunData) -> pd.DataFrame | None:
    ex = rd.patch_exact
    if ex is None or "logit_diff_restored" not in ex:
        return None
    ex = ex[(ex["direction"] == "denoise") & (ex["position_kind"] == "changed")]
    if "head" in ex:
        ex = ex[ex["head"] < 0]
    return ex.rename(columns={"logit_diff_restored": "restored"})


def _recovery_panel(page: Page, c: Compared) -> None:
    hooks = _hooks_in(c, lambda rd: _recovery(rd))
    page.add("<p>Exact activation patching (denoise: the clean activation into the corrupt run) at the changed "
             "position: mean fraction of the logit difference restored, over each run's patched pairs.</p>")
    page.figure(_curves(c, _recovery, "restored", hooks, "recovery when patching one layer at the changed position",
                        "fraction restored", offset=None))


def _recovery_kl(c: Compared) -> list[tuple[str, object]]:
    """Each run's recovery summaries recomputed from its ``recovery.csv`` on the pairs valid in every run."""
    from .bootstrap import BootstrapConfig
    from .recovery import RecoveryConfig, recovery_curves, summarize

    out = []
    for rd, lab in zip(c.runs, c.labels):
        pos = rd.recovery
        if pos is None or pos.empty:
            out.append((lab, None))
            continue
        pos = pos[pos["id"].astype(str).isin(c.common)]
        max_off = int(((rd.measure or {}).get("recovery") or {}).get("max_offset") or 4)
        cfg = RecoveryConfig(max_offset=max_off, boot=BootstrapConfig(n_boot=500))
        if pos.empty:
            out.append((lab, None))
            continue
        res = summarize(pos, cfg)
        pooled = recovery_curves(pos[pos["role"].isin(["error", "twin"])].assign(category="all"), cfg)
        out.append((lab, (res, pooled)))
    return out


def _recovery_kl_panel(page: Page, c: Compared) -> None:
    from .measure_view import interval

    got = _recovery_kl(c)
    page.add(f"<p>Recovery on the {len(c.common)} pairs valid in every run (recomputed from each run's "
             "recovery.csv): median KL(clean ‖ run) of the next-token distribution per token after the error's "
             "detect position, errors (solid) and their twins (dashed), all error categories pooled; and per "
             "category the recovery index at the last token (log KL decay of errors minus twins; negative: errors "
             "fade faster), cluster-bootstrap median with a 95 % interval. Token offsets, not layers: the same "
             "sentences in every run.</p>")
    rows: dict[str, dict] = {}
    fig = go.Figure()
    for i, (lab, r) in enumerate(got):
        if r is None:
            c.notes.append(f"{lab}: no recovery rows on the shared pairs")
            continue
        res, pooled = r
        for run, dash in (("error", "solid"), ("twin", "dash")):
            d = pooled[pooled["run"] == run]
            fig.add_trace(go.Scatter(x=d["offset"].astype(str), y=d["kl_median"], mode="lines+markers",
                                     name=f"{lab} · {run}s", line={"color": COLORS[i % len(COLORS)], "dash": dash},
                                     error_y={"type": "data", "symmetric": False, "array": d["high"] - d["kl_median"],
                                              "arrayminus": d["kl_median"] - d["low"]}))
        last = res.index[res.index["offset"] == "last"]
        for rec in last.itertuples(index=False):
            rows.setdefault(rec.category, {"category": rec.category})[lab] = interval(rec.index, rec.low, rec.high, 2)
    fig.update_yaxes(type="log", title_text="median KL (nats)")
    fig.update_xaxes(title_text="tokens after detect")
    fig.update_layout(title="recovery after the error (pooled error categories)", height=380,
                      legend={"orientation": "h", "y": -0.25})
    page.figure(fig)
    page.add(html_table(pd.DataFrame(list(rows.values())), max_rows=50))


def _probe_panel(page: Page, c: Compared) -> None:
    page.add("<p>Error-signal probe per layer (cross-validated by cluster, each run's own probe items), on "
             "depth-normalised layers: the embedding at 0, the output of block L at (L + 1) / n_layers. Bands: "
             "cluster-bootstrap 95 % intervals; dotted: the within-cluster permutation null's 95th percentile.</p>")
    fig = go.Figure()
    for i, (rd, lab, n) in enumerate(zip(c.runs, c.labels, c.n_layers)):
        pr = rd.probe
        if pr is None or pr.empty:
            c.notes.append(f"{lab}: probe.csv has no rows (no probe items)")
            continue
        x = (pr["layer"] + 1) / n
        col = COLORS[i % len(COLORS)]
        fig.add_trace(go.Scatter(x=x, y=pr["high"], mode="lines", line={"width": 0}, showlegend=False,
                                 hoverinfo="skip"))
        fig.add_trace(go.Scatter(x=x, y=pr["low"], mode="lines", line={"width": 0}, fill="tonexty",
                                 fillcolor="rgba(0,0,0,0.08)", showlegend=False, hoverinfo="skip"))
        fig.add_trace(go.Scatter(x=x, y=pr["acc"], mode="lines+markers", name=lab, line={"color": col},
                                 customdata=pr["layer"], hovertemplate=f"{esc(lab)}<br>layer %{{customdata}}"
                                 "<br>accuracy %{y:.3f}<extra></extra>"))
        fig.add_trace(go.Scatter(x=x, y=pr["null_q95"], mode="lines", name=f"{lab}: null 95 %",
                                 line={"color": col, "dash": "dot"}))
    fig.update_xaxes(title_text="depth (layer + 1) / n_layers", range=[0, 1])
    fig.update_layout(title="error-signal probe by depth", yaxis_title="CV accuracy", yaxis_range=[0.3, 1.02],
                      height=380, legend={"orientation": "h", "y": -0.25})
    page.figure(fig)


PANELS: list[Panel] = [
    Panel("runs", "Runs", ("manifest.json",), _runs_panel),
    Panel("pairs", "Pairs", ("pairs.jsonl",), _pairs_panel),
    Panel("behaviour", "Behaviour on shared pairs", ("pairs.csv",), _pairs_metrics_panel),
    Panel("layers", "Relative change by depth", ("layers.parquet",), _layers_panel),
    Panel("candidates", "Candidate shares", ("layers.parquet", "candidates.parquet", "summary.json"), _candidates_panel),
    Panel("recovery", "Recovery by depth", ("patch_exact.csv",), _recovery_panel),
    Panel("recovery_kl", "Recovery after an error", ("recovery.csv",), _recovery_kl_panel),
    Panel("probe", "Error signal by depth", ("probe.csv",), _probe_panel),
]


def render_compare(c: Compared, *, compress: bool = True) -> str:
    page = Page()
    skipped = []
    nav = []
    for panel in PANELS:
        missing = [f"{f} ({lab})" for f in panel.files for rd, lab in zip(c.runs, c.labels) if rd.file(f) is None]
        if missing:
            skipped.append(f"{panel.title}: missing {', '.join(missing)}")
            continue
        nav.append(f'<a href="#{panel.sid}">{esc(panel.title)}</a>')
        page.add(f'<section id="{panel.sid}"><h2>{esc(panel.title)}</h2>')
        panel.draw(page, c)
        page.add("</section>")
    tail = ""
    if c.notes or skipped:
        items = "".join(f"<li>{esc(n)}</li>" for n in c.notes) + "".join(
            f"<li>skipped — {esc(s)}</li>" for s in skipped)
        tail = f'<section id="notes"><h2>Notes</h2><ul>{items}</ul></section>'
        nav.append('<a href="#notes">Notes</a>')
    title = "eclens compare — " + " vs ".join(rd.name for rd in c.runs)
    return (
        "<!doctype html>\n<html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>{esc(title)}</title><style>{CSS}</style></head><body>"
        f"<header><h1>{esc(title)}</h1><div class='muted'>layers drawn at depth layer / n_layers; "
        f"pairs matched by id</div></header><nav>{''.join(nav)}</nav><main><p id='boot-error' class='note'></p>"
        f"{''.join(page.parts)}{tail}</main>{lib_blocks(compress, False)}<script>{BOOT_JS}</script></body></html>\n"
    )


def compare_runs(runs: list[str | os.PathLike], out: str | os.PathLike, *, compress: bool = True) -> Path:
    """Write the comparison page of ``runs`` to ``out`` (a folder: ``out/compare.html``, or an .html path)."""
    c = load_compared(runs)
    dest = Path(out)
    if dest.suffix != ".html":
        dest = dest / PAGE
    dest.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(dest, render_compare(c, compress=compress))


def summary_table(runs: list[str | os.PathLike]) -> pd.DataFrame:
    """One row per run: model, valid pairs, candidates per kind and the headline behaviour numbers."""
    c = load_compared(runs)
    rows = []
    for rd, lab, v in zip(c.runs, c.labels, c.valid):
        s = rd.summary or {}
        cand = rd.candidates
        cand = cand[cand["category"] == "all"] if cand is not None and "category" in cand else None
        rows.append({"run": lab, "valid pairs": len(v), "shared pairs": len(c.common),
                     "stable": int((cand["kind"] == "stable").sum()) if cand is not None else None,
                     "responsive": int((cand["kind"] == "responsive").sum()) if cand is not None else None,
                     "mean KL at p": s.get("mean_kl_0"), "mean Δ log p": s.get("mean_logprob_diff")})
    return pd.DataFrame(rows)


__all__ = ["compare_runs", "render_compare", "load_compared", "summary_table", "PANELS", "Panel"]
