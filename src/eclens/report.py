"""The run report: one self-contained HTML file that opens with no network.

plotly.js and the circuitsvis bundle are inlined once each (gzip + base64 by
default, unpacked in the browser with ``DecompressionStream``; ``compress=False``
inlines them as plain scripts for old browsers). Every figure and view is stored as
JSON in a ``<script type="application/json">`` element and drawn by one boot script,
so user text never reaches HTML unescaped: sentences, tokens, categories and run
names are escaped where they are HTML and ``script_json``-encoded where they are data.
"""

from __future__ import annotations

import base64
import gzip
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import pandas as pd

from . import viz
from .errors import EclensError
from .runs import RunData, atomic_write
from .summaries import MISSING, cell, contrasts_note, glance, patch_blocks, verdict_text

REPORT = "report.html"
esc = viz.esc


# ------------------------------------------------------------------- run folder


def model_for_run(run: RunData, model=None):
    """The run's model: ``model`` if its weights match the manifest, else load it by the manifest's name.

    Returns ``(model, None)`` or ``(None, reason)``; per-pair views are optional in a
    report, so a missing model is a note, not an error.
    """
    from .model import load_model, weights_hash

    m = run.manifest.get("model") or {}
    want = m.get("weights_hash")
    if model is None:
        name = m.get("name")
        if not name:
            return None, "the manifest names no model"
        try:
            model = load_model(name, device=m.get("device", "cpu") if _device_ok(m.get("device")) else "cpu",
                               dtype=m.get("dtype", "float32"))
        except EclensError as e:
            return None, f"could not load the run's model {name!r}: {e}"
    if want and weights_hash(model) != want:
        return None, f"the model's weights do not match the run's (weights hash {want})"
    return model, None


def _device_ok(device: str | None) -> bool:
    if not device or not device.startswith("cuda"):
        return True
    import torch

    return torch.cuda.is_available()


# ------------------------------------------------------------------- HTML pieces


@dataclass
class _Page:
    parts: list[str] = field(default_factory=list)
    n: int = 0

    def add(self, s: str) -> None:
        self.parts.append(s)

    def figure(self, fig) -> None:
        self.n += 1
        fid = f"fig-{self.n}"
        self.add(f'<div class="plot" data-src="{fid}"></div>'
                 f'<script type="application/json" id="{fid}">{viz.script_json(viz.figure_json(fig))}</script>')

    def view(self, v: viz.CircuitsView, caption: str = "") -> None:
        self.n += 1
        vid = f"cv-{self.n}"
        self.add(f'<figure class="cvbox">{f"<figcaption>{esc(caption)}</figcaption>" if caption else ""}'
                 f'<div class="cv" id="{vid}-el" data-component="{esc(v.component)}" data-src="{vid}"></div>'
                 f'<script type="application/json" id="{vid}">{viz.script_json(v.props)}</script></figure>')


def html_table(df: pd.DataFrame, *, max_rows: int = 30, floatfmt: str = "{:.4g}", cls: str = "") -> str:
    """A DataFrame as an escaped HTML table (every cell escaped: cells may hold user text)."""
    if df is None or df.empty:
        return '<p class="muted">(no rows)</p>'
    head = "".join(f"<th>{esc(c)}</th>" for c in df.columns)
    rows = []
    for rec in df.head(max_rows).itertuples(index=False):
        cells = []
        for col, v in zip(df.columns, rec, strict=True):
            if col == "verdict" and isinstance(v, str):
                v = verdict_text(v)  # the writers' terse "null: …" as the sentence it stands for
            if isinstance(v, float):
                txt = MISSING if pd.isna(v) else floatfmt.format(v)
                cells.append(f'<td class="num">{esc(txt)}</td>')
            elif isinstance(v, (int,)) and not isinstance(v, bool):
                cells.append(f'<td class="num">{v}</td>')
            else:
                txt = str(cell(v)) if v is not None and v != "" else MISSING
                if len(txt) > 120:  # long lists (e.g. a set's dimensions): the whole text on hover
                    cells.append(f'<td title="{esc(txt)}">{esc(txt[:117])}…</td>')
                else:
                    cells.append(f"<td>{esc(txt)}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    more = f'<p class="muted">showing {max_rows} of {len(df)} rows</p>' if len(df) > max_rows else ""
    return f'<div class="tablewrap"><table class="{esc(cls)}"><thead><tr>{head}</tr></thead><tbody>' \
           + "".join(rows) + f"</tbody></table></div>{more}"


def kv_table(d: dict) -> str:
    rows = "".join(f"<tr><th>{esc(k)}</th><td>{esc(_fmt(v))}</td></tr>" for k, v in d.items())
    return f'<table class="kv"><tbody>{rows}</tbody></table>'


def _fmt(v: Any) -> str:
    v = cell(v)
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def tokens_html(tokens: list[str], position: int, other: list[str] | None = None) -> str:
    """Tokens as escaped spans, the changed one highlighted (with its replacement when given)."""
    out = []
    for i, t in enumerate(tokens):
        label = esc(t.replace("\n", "\\n")).replace(" ", "&#9251;", 1) if t.startswith(" ") else esc(t)
        if i == position:
            alt = f'<span class="tok-alt">{esc(other[i])}</span>' if other is not None else ""
            out.append(f'<span class="tok tok-p" title="position {i}">{label}{alt}</span>')
        else:
            out.append(f'<span class="tok" title="position {i}">{label}</span>')
    return '<div class="tokens">' + "".join(out) + "</div>"


CSS = """
:root{--fg:#1d232a;--muted:#66707a;--line:#dde2e6;--accent:#1f5fae;--bg:#fff;--soft:#f5f7f9}
*{box-sizing:border-box}body{margin:0;font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;color:var(--fg);background:var(--bg)}
header{padding:18px 28px;border-bottom:1px solid var(--line);background:var(--soft)}h1{margin:0 0 4px;font-size:22px}
nav{padding:8px 28px;border-bottom:1px solid var(--line);position:sticky;top:0;background:#fff;z-index:5}
nav a{margin-right:14px;color:var(--accent);text-decoration:none}main{padding:8px 28px 60px;max-width:1400px}
section{margin:26px 0}h2{font-size:18px;border-bottom:2px solid var(--line);padding-bottom:4px}h3{font-size:15px;margin:18px 0 6px}
.muted{color:var(--muted)}.note{background:#fff8e1;border-left:4px solid #f0b400;padding:8px 12px;margin:10px 0}
table{border-collapse:collapse;font-size:12.5px}th,td{border-bottom:1px solid var(--line);padding:3px 8px;text-align:left;vertical-align:top}
td.num{text-align:right;font-variant-numeric:tabular-nums}thead th{background:var(--soft);position:sticky;top:0}
.tablewrap{max-height:460px;overflow:auto;border:1px solid var(--line);margin:6px 0}.tablewrap td{white-space:nowrap}
table.kv th{width:220px;color:var(--muted);font-weight:500}
.tokens{font-family:ui-monospace,SFMono-Regular,Menlo,monospace;font-size:13px;margin:6px 0;line-height:2}
.tok{border:1px solid var(--line);border-radius:3px;padding:1px 3px;margin:0 1px;white-space:pre}
.tok-p{background:#ffe0e0;border-color:#d62728}.tok-alt{color:#d62728;margin-left:4px}.tok-alt::before{content:"\\2192 "}
.pair{border:1px solid var(--line);border-radius:6px;padding:10px 14px;margin:14px 0}
.sent{font-size:14px;margin:2px 0}.sent b{display:inline-block;width:64px;color:var(--muted);font-weight:500}
.grid2{display:grid;grid-template-columns:1fr 1fr;gap:14px}.grid2>div{min-width:0;overflow-x:auto}.cvbox{margin:8px 0}figcaption{color:var(--muted);font-size:12px}
.plot{min-height:200px}#boot-error{display:none}
"""

BOOT_JS = r"""
(function () {
  "use strict";
  function showError(msg) {
    var el = document.getElementById("boot-error");
    el.textContent = msg; el.style.display = "block";
  }
  async function unpack(id) {
    var el = document.getElementById(id);
    if (!el) return;
    if (typeof DecompressionStream === "undefined") {
      throw new Error("this browser lacks DecompressionStream; rebuild the report with `ec report RUN --no-compress`");
    }
    var bin = atob(el.textContent.trim());
    var bytes = new Uint8Array(bin.length);
    for (var i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
    var stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("gzip"));
    var code = await new Response(stream).text();
    var s = document.createElement("script");
    s.textContent = code;  // runs synchronously in global scope on insertion
    document.head.appendChild(s);
  }
  function data(id) { return JSON.parse(document.getElementById(id).textContent); }
  function draw() {
    document.querySelectorAll(".plot[data-src]").forEach(function (div) {
      var fig = data(div.getAttribute("data-src"));
      Plotly.newPlot(div, fig.data, fig.layout || {}, {responsive: true, displaylogo: false});
    });
    document.querySelectorAll(".cv[data-src]").forEach(function (div) {
      var comp = CircuitsVis[div.getAttribute("data-component")];
      CircuitsVis.render(div.id, comp, data(div.getAttribute("data-src")));
    });
    document.body.setAttribute("data-rendered", "true");
  }
  (async function () {
    try {
      await unpack("lib-plotly");
      await unpack("lib-circuitsvis");
      draw();
    } catch (e) { showError("could not draw the figures: " + e.message); }
  })();
})();
"""


@lru_cache(maxsize=2)
def _packed(which: str) -> str:
    code = viz.plotly_bundle() if which == "plotly" else viz.circuitsvis_bundle()
    return base64.b64encode(gzip.compress(code.encode("utf-8"), 9, mtime=0)).decode("ascii")


def _lib_blocks(compress: bool, need_cv: bool) -> str:
    libs = [("lib-plotly", "plotly")] + ([("lib-circuitsvis", "circuitsvis")] if need_cv else [])
    out = []
    for lid, which in libs:
        if compress:
            b64 = _packed(which)
            out.append(f'<script type="application/gzip-base64" id="{lid}">{b64}</script>')
        else:
            # "<\/script" means the same in JS strings and regexes and does not close the element.
            code = viz.plotly_bundle() if which == "plotly" else viz.circuitsvis_bundle()
            out.append("<script>" + code.replace("</script", "<\\/script") + "</script>")
    return "\n".join(out)


# ------------------------------------------------------------------- sections


def _section(page: _Page, sid: str, title: str) -> None:
    page.add(f'<section id="{sid}"><h2>{esc(title)}</h2>')


def _missing(page: _Page, what: str, cmd: str) -> None:
    page.add(f'<p class="note">{esc(what)} not found in this run: run <code>{esc(cmd)}</code>.</p>')


def _manifest_section(page: _Page, run: RunData) -> None:
    man = run.manifest
    _section(page, "manifest", "Run")
    if not man:
        _missing(page, "manifest.json", f"ec run --out {run.path}")
        page.add("</section>")
        return
    top = {k: man.get(k) for k in ("eclens_version", "created", "command", "seed", "world_size") if k in man}
    page.add(kv_table(top))
    if man.get("model"):
        page.add("<h3>Model</h3>" + kv_table(man["model"]))
    if man.get("dataset"):
        page.add("<h3>Dataset</h3>" + kv_table(man["dataset"]))
    steps = dict(man.get("steps") or {})
    run_state = steps.pop("run", None)
    if steps:
        rows = []
        # `ec patch` records one entry per mode under "patch"; show them as steps of their own.
        flat: list[tuple[str, Any]] = []
        for name, st in steps.items():
            if name == "patch" and isinstance(st, dict) and all(isinstance(v, dict) for v in st.values()):
                flat += [(f"patch/{mode}", v) for mode, v in st.items()]
            else:
                flat.append((name, st))
        for name, st in flat:
            st = st if isinstance(st, dict) else {"value": st}
            secs = st.get("seconds", (st.get("timing") or {}).get("seconds") if isinstance(st.get("timing"), dict)
                          else None)
            params = st.get("params", {k: v for k, v in st.items()
                                       if k not in ("seconds", "timing", "outputs", "files", "rule")})
            rows.append({"step": name, "seconds": secs if secs is not None else MISSING,
                         "parameters": _params_text(params),
                         "files": ", ".join(st.get("outputs") or st.get("files") or [])})
        page.add("<h3>Steps</h3>" + html_table(pd.DataFrame(rows)))
    if isinstance(run_state, dict) and run_state.get("headlines"):
        rows = [{"step": k, "seconds": (run_state.get("seconds") or {}).get(k, MISSING),
                 "result": verdict_text(v)}
                for k, v in run_state["headlines"].items()]
        page.add("<h3>ec run</h3>" + html_table(pd.DataFrame(rows)))
    if man.get("versions"):
        page.add("<h3>Versions</h3>" + kv_table(man["versions"]))
    page.add("</section>")


def _params_text(params: Any) -> str:
    """A step's parameters as ``name=value`` text (lists of many items shortened), never JSON."""
    if not isinstance(params, dict):
        return str(cell(params))
    out = []
    for k, v in params.items():
        if isinstance(v, dict):
            out.append(f"{k}: {_params_text(v)}")
            continue
        if isinstance(v, (list, tuple)) and len(v) > 6:
            v = [*v[:5], f"… {len(v) - 5} more"]
        out.append(f"{k}={cell(v)}")
    return "; ".join(out)


def _glance_section(page: _Page, run: RunData) -> None:
    lines = glance(run)
    if lines:
        page.add('<section id="glance"><h2>At a glance</h2><ul>'
                 + "".join(f"<li>{esc(x)}</li>" for x in lines) + "</ul></section>")


def _dataset_section(page: _Page, run: RunData) -> None:
    _section(page, "dataset", "Dataset")
    n_valid = len(run.pairs or [])
    n_rej = len(run.rejected or [])
    page.add(f"<p>{n_valid} valid pairs, {n_rej} rejected.</p>")
    if run.check is not None:
        page.add("<h3>By category and rejection reason</h3>" + html_table(run.check, max_rows=200))
    elif run.pairs:
        counts = pd.Series([p.get("category", "") for p in run.pairs]).value_counts().rename_axis("category")
        page.add(html_table(counts.reset_index(name="valid")))
    else:
        _missing(page, "pairs.jsonl", f"ec run --out {run.path}")
    if run.rejected:
        rows = [{"reason": r.get("reason"), "detail": r.get("detail"), "category": r.get("category"),
                 "clean": r.get("clean"), "corrupt": r.get("corrupt")} for r in run.rejected[:10]]
        page.add("<h3>Rejected pairs (first 10)</h3>" + html_table(pd.DataFrame(rows)))
    page.add("</section>")


def _layer_section(page: _Page, run: RunData) -> None:
    _section(page, "layers", "Layer view")
    if run.layers is None:
        _missing(page, "layers.parquet", f"ec diff {run.path}")
        page.add("</section>")
        return
    page.add("<p>Relative L2 change ‖Δ‖/‖a‖ of the activations, per layer and position relative to the changed "
             "token p (p+k: k tokens later; last: the last token), averaged over pairs.</p>")
    hooks = list(dict.fromkeys(run.layers["hook"].astype(str))) if "hook" in run.layers.columns else [None]
    from .hooks import DEFAULT_HOOKS

    shown = [h for h in hooks if h in DEFAULT_HOOKS] or hooks[:5]
    for h in shown:
        page.figure(viz.layer_offset_heatmap(run.layers, hook=h))
    if len(hooks) > len(shown):
        page.add(f'<p class="muted">Also in layers.parquet: {esc(", ".join(h for h in hooks if h not in shown))}</p>')
    if "category" in run.layers.columns and run.layers["category"].nunique() > 1:
        page.add("<h3>By category</h3>")
        offs = set(run.layers["offset"].astype(int)) if "offset" in run.layers.columns else {0}
        for off in [o for o in (0, -1) if o in offs]:
            page.figure(viz.category_curves(run.layers, offset=off))
    dims = run.dims_slice()
    if dims is not None:
        page.add("<h3>Dimensions</h3><p>Normalised |Δ| (|Δ| divided by the dimension's spread over the clean "
                 "activations) per layer and dimension at the changed token; use the buttons to sort.</p>")
        page.figure(viz.layer_dim_heatmap(dims, massive=run.massive_dims(dims)))
    page.add("</section>")


def _candidates_section(page: _Page, run: RunData) -> None:
    _section(page, "candidates", "Candidates")
    df = run.candidates
    if df is None:
        _missing(page, "candidates.parquet", f"ec diff {run.path}")
        page.add("</section>")
        return
    s = run.summary or {}
    if s:
        flat = {k: v for k, v in s.items() if not isinstance(v, (dict, list))}
        if flat:
            page.add(kv_table(flat))
    if "kind" in df.columns:
        for kind, title in (("stable", "Stable: change consistently little"),
                            ("responsive", "Responsive: change consistently much")):
            d = df[df["kind"] == kind]
            if "category" in d.columns and (d["category"] == "all").any():
                d = d[d["category"] == "all"]
            # most consistent first: stable by the 90th percentile of |Δ|/σ, responsive by its median
            score = "absz_q90" if kind == "stable" else "absz_median"
            if score in d.columns:
                d = d.sort_values(score, ascending=kind == "stable", kind="stable")
            page.add(f"<h3>{esc(title)} ({len(d)})</h3>" + html_table(d, max_rows=25))
    else:
        page.add(html_table(df, max_rows=40))
    page.add("</section>")


def _causal_section(page: _Page, run: RunData) -> None:
    _section(page, "causal", "Causal confirmation")
    if run.patch_dims is None and run.patch_exact is None and run.patch_attribution is None:
        _missing(page, "patch results", f"ec patch {run.path}")
        page.add("</section>")
        return
    for block in patch_blocks(run.patch_summary):
        page.add(f"<h3>{esc(block.title)}</h3>" + "".join(f"<p>{esc(x)}</p>" for x in block.sentences))
        if block.table is not None:
            page.add(html_table(block.table, max_rows=20))
    if run.patch_dims is not None:
        page.add("<h3>All candidate-set tests (patch_dims.csv)</h3>"
                 "<p>Each row patches or ablates a candidate set of dimensions and compares the effect with the "
                 "same intervention on random sets of the same size in the same layer (empirical p-value).</p>")
        page.add(html_table(run.patch_dims, max_rows=40))
        for fig in control_figures(run, limit=6):
            page.figure(fig)
    if run.patch_attribution is not None:
        page.add("<h3>Attribution vs exact patching</h3>")
        try:
            page.figure(viz.attribution_scatter(run.patch_attribution))
        except EclensError as e:
            page.add(f'<p class="note">{esc(e)}</p>')
    page.add("</section>")


def patch_metric(run: RunData) -> str:
    """The metric the patch step tested candidates with (``patch_summary.json``), default logit_diff."""
    ps = run.patch_summary or {}
    m = ps.get("metric") or (ps.get("dims") or {}).get("metric") if isinstance(ps, dict) else None
    return str(m) if m else "logit_diff"


def control_figures(run: RunData, limit: int = 6, metric: str | None = None) -> list:
    """One figure per candidate set (and direction) in ``patch_dims.csv``: its effect
    against the distribution of the same intervention on random sets of the same size."""
    dims, ctrl = run.patch_dims, run.patch_controls
    if dims is None or ctrl is None or dims.empty or ctrl.empty:
        return []
    metric = metric or patch_metric(run)
    eff, pcol = f"{metric}_effect", f"{metric}_p"
    if eff not in dims.columns or eff not in ctrl.columns:
        metric = next((c[:-7] for c in dims.columns if c.endswith("_effect") and c in ctrl.columns), None)
        if metric is None:
            return []
        eff, pcol = f"{metric}_effect", f"{metric}_p"
    keys = [k for k in ("set", "direction") if k in dims.columns and k in ctrl.columns]
    if not keys:
        return []
    figs = []
    for rec in dims.head(limit).to_dict("records"):
        sel = ctrl
        for k in keys:
            sel = sel[sel[k].astype(str) == str(rec[k])]
        label = " · ".join(str(rec[k]) for k in ("set", "kind", "method", "direction") if k in rec)
        figs.append(viz.control_distribution(float(rec[eff]), sel[eff].to_numpy(dtype=float),
                                             p_value=float(rec[pcol]) if pcol in rec and pd.notna(rec[pcol])
                                             else None, metric=f"mean change in {metric}", title=label))
    return figs


def _recovery_section(page: _Page, run: RunData) -> None:
    from .measure_view import measure_panel

    _section(page, "recovery", "Recovery")
    panel = measure_panel(run)
    if panel is None:
        _missing(page, "the measure step's results (measure.json)", f"ec measure {run.path}")
    else:
        page.add("".join(f"<p>{esc(x)}</p>" for x in panel.sentences))
        for title, df in panel.tables:
            page.add(f"<h3>{esc(title)}</h3>" + html_table(df, max_rows=40))
        for caption, fig in panel.figures:
            page.add(f'<p class="muted">{esc(caption)}</p>')
            page.figure(fig)
    page.add("</section>")


def _contrasts_section(page: _Page, run: RunData) -> None:
    _section(page, "contrasts", "Category contrasts")
    df = run.contrasts
    if df is None:
        _missing(page, "contrasts.parquet", f"ec diff {run.path}")
        page.add("</section>")
        return
    page.add(f"<p>{esc(contrasts_note(run, shown=min(30, len(df))))}</p>")
    qcol = next((c for c in ("q", "q_value", "qvalue") if c in df.columns), None)
    if qcol:
        df = df.sort_values(qcol, kind="stable")
    page.add(html_table(df, max_rows=30))
    page.add("</section>")


def choose_attention_layer(run: RunData, n_layers: int) -> int:
    """The layer whose attention output changes most one token after the change (where the
    change is read by later positions), from ``layers.parquet``; the middle layer without it."""
    df = run.layers
    if df is not None and {"hook", "offset", "layer", "category"} <= set(df.columns):
        try:
            col = viz.pick_column(df, viz.REL_L2_COLS, "relative L2")
            d = df[(df["hook"] == "hook_attn_out") & (df["offset"] == 1) & (df["category"] == "all")]
            if "swap_direction" in d.columns:
                d = d[d["swap_direction"].astype(str) == "all"]
            d = d[d[col].notna()]  # no token after the change (it is the last): no value at offset 1
            if not d.empty:
                return int(d.loc[d[col].idxmax(), "layer"])
        except EclensError:
            pass
    return n_layers // 2


def example_pair_ids(run: RunData, n: int) -> list[str]:
    """Pairs with an exact patching map first, then one per category in turn."""
    chosen = [p for p in run.exact_pair_ids() if p in run.pairs_by_id][:n]
    by_cat: dict[str, list[str]] = {}
    for p in run.pairs or []:
        by_cat.setdefault(str(p.get("category")), []).append(str(p["id"]))
    while len(chosen) < n and any(by_cat.values()):
        for cat in sorted(by_cat):
            if by_cat[cat] and len(chosen) < n:
                pid = by_cat[cat].pop(0)
                if pid not in chosen:
                    chosen.append(pid)
    return chosen


def _examples_section(page: _Page, run: RunData, model, model_note: str | None, n_examples: int,
                      layer: int | None) -> bool:
    _section(page, "examples", "Example pairs")
    if not run.pairs:
        _missing(page, "pairs.jsonl", f"ec run --out {run.path}")
        page.add("</section>")
        return False
    used_cv = False
    if model is None:
        page.add(f'<p class="note">Per-pair activation views are not included: {esc(model_note or "no model")}.</p>')
    else:
        n_layers = int(model.cfg.n_layers)
        layer = choose_attention_layer(run, n_layers) if layer is None else layer
        page.add(f"<p>Activation views computed with the run's model; attention heads shown at layer {layer} "
                 "(the layer whose attention output changes most one token after the change).</p>")
    metrics = run.pair_metrics
    mcol = next((c for c in viz.PAIR_COLS if metrics is not None and c in metrics.columns), None)
    for pid in example_pair_ids(run, n_examples):
        d = run.pairs_by_id[pid]
        page.add('<div class="pair">')
        page.add(f"<h3>{esc(d.get('category'))} · <span class='muted'>{esc(pid)}</span></h3>")
        page.add(f"<p class='sent'><b>clean</b>{esc(d['clean'])}</p><p class='sent'><b>corrupt</b>"
                 f"{esc(d['corrupt'])}</p>")
        view = None
        if model is not None:
            view = viz.pair_view(model, run.aligned(pid), attention_layers=[layer])
            page.add(tokens_html(view.clean_tokens, view.position, view.corrupt_tokens))
        else:
            toks = run.pair_tokens(pid)
            if toks:
                page.add(tokens_html(toks, int(d["position"])))
        if metrics is not None and mcol:
            row = metrics[metrics[mcol].astype(str) == pid]
            if not row.empty:
                # the per-position KL list is drawn as coloured tokens below
                page.add(kv_table({k: v for k, v in row.iloc[0].items() if k not in (mcol, "tokens", "kl")}))
        if run.patch_exact is not None and pid in run.exact_pair_ids():
            toks = view.clean_tokens if view else run.pair_tokens(pid)
            page.add('<div class="grid2">')
            for direction in ("denoise", "noise"):
                page.add("<div>")
                page.figure(viz.patching_heatmap(run.patch_exact, pair_id=pid, direction=direction, tokens=toks,
                                                 changed=int(d["position"])))
                page.add("</div>")
            page.add("</div>")
        if view is not None:
            page.figure(viz.pair_diff_heatmap(view))
            page.view(viz.kl_tokens_view(view.clean_tokens, view.kl),
                      "clean tokens coloured by KL(clean ‖ corrupt) of the next-token distribution")
            cv_clean, cv_corrupt = viz.pair_attention_views(view, layer)
            page.add('<div class="grid2"><div>')
            page.view(cv_clean, f"attention heads, layer {layer}, clean")
            page.add("</div><div>")
            page.view(cv_corrupt, f"attention heads, layer {layer}, corrupt")
            page.add("</div></div>")
            used_cv = True
        page.add("</div>")
    page.add("</section>")
    return used_cv


# ------------------------------------------------------------------- assembly


def build_report(run: str | os.PathLike, out: str | os.PathLike | None = None, *, model=None,
                 pair_views: bool = True, n_examples: int = 4, layer: int | None = None,
                 compress: bool = True) -> Path:
    """Write ``RUN/report.html`` (or ``out``): manifest, dataset, layer view, candidates,
    recovery (the measure step), causal confirmation, contrasts and example pairs, from whatever steps the run has.

    ``model``: the run's model for per-pair views (loaded from the manifest when
    ``None`` and ``pair_views``); ``compress``: gzip the inlined libraries (about
    2.5 MB instead of 6 MB; needs a browser with ``DecompressionStream``).
    """
    rd = RunData(run)
    if not rd.manifest and rd.pairs is None:
        raise EclensError(f"{rd.path}: not a run folder (no manifest.json or pairs.jsonl); "
                          f"make one with `ec run --out {rd.path}`")
    note = "switched off (--no-pair-views)"
    if pair_views and rd.pairs:
        model, note = model_for_run(rd, model)
    else:
        model = None
    html_doc = render_report(rd, model=model, model_note=note, n_examples=n_examples, layer=layer,
                             compress=compress)
    dest = Path(out) if out is not None else rd.path / REPORT
    return atomic_write(dest, html_doc)


def render_report(rd: RunData, *, model=None, model_note: str | None = None, n_examples: int = 4,
                  layer: int | None = None, compress: bool = True) -> str:
    page = _Page()
    _glance_section(page, rd)
    _dataset_section(page, rd)
    _layer_section(page, rd)
    _candidates_section(page, rd)
    _recovery_section(page, rd)
    _causal_section(page, rd)
    _contrasts_section(page, rd)
    used_cv = _examples_section(page, rd, model, model_note, n_examples, layer)
    _manifest_section(page, rd)
    man = rd.manifest
    model_name = (man.get("model") or {}).get("name", "")
    nav = "".join(f'<a href="#{s}">{t}</a>' for s, t in (
        ("glance", "At a glance"), ("dataset", "Dataset"), ("layers", "Layers"), ("candidates", "Candidates"),
        ("recovery", "Recovery"), ("causal", "Causal"), ("contrasts", "Contrasts"), ("examples", "Examples"), ("manifest", "Run")))
    return (
        "<!doctype html>\n<html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>eclens report — {esc(rd.name)}</title><style>{CSS}</style></head><body>"
        f"<header><h1>eclens report — {esc(rd.name)}</h1><div class='muted'>model {esc(model_name)} · "
        f"created {esc(man.get('created', ''))} · eclens {esc(man.get('eclens_version', ''))}</div></header>"
        f"<nav>{nav}</nav><main><p id='boot-error' class='note'></p>{''.join(page.parts)}</main>"
        f"{_lib_blocks(compress, used_cv)}<script>{BOOT_JS}</script></body></html>\n"
    )


# The page pieces under public names, for other self-contained pages (``ec compare``).
Page = _Page
lib_blocks = _lib_blocks


def report_size_note(path: str | os.PathLike) -> str:
    return f"{Path(path).stat().st_size / 1e6:.1f} MB"


__all__ = ["RunData", "build_report", "render_report", "html_table", "model_for_run", "REPORT",
           "example_pair_ids", "choose_attention_layer", "control_figures", "Page", "lib_blocks", "CSS",
           "BOOT_JS"]
