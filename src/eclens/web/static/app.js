// eclens web UI: a small hash-routed single page over the read-only JSON API.
// Every piece of data reaches the page through textContent (el() below), never
// innerHTML, so sentences and names from the runs are shown as text, never run.
"use strict";

const main = document.getElementById("main");
const crumbs = document.getElementById("crumbs");

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "on") for (const [ev, fn] of Object.entries(v)) e.addEventListener(ev, fn);
    else if (k === "class") e.className = v;
    else e.setAttribute(k, v);
  }
  return add(e, ...children);
}

// Append children (nested arrays flattened; null/undefined/false skipped). Element.append
// would turn an array into the text "[object HTMLElement],…", so every page uses this.
function add(parent, ...children) {
  for (const c of children.flat(Infinity)) {
    if (c === undefined || c === null || c === false) continue;
    parent.appendChild(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return parent;
}

const enc = encodeURIComponent;

async function api(path) {
  const r = await fetch("/api/" + path, {headers: {Accept: "application/json"}});
  let body;
  try { body = await r.json(); } catch (e) { body = {error: r.statusText}; }
  if (!r.ok) throw new Error(body.error || r.statusText);
  return body;
}

const MISSING = "\u2014";  // how a missing value reads: never "null", "undefined" or "NaN"

// A value as a person reads it: numbers to 4 significant digits, lists comma-separated,
// objects as "key value; …" (never JSON), missing as an em dash.
function fmt(v) {
  if (v === null || v === undefined || v === "") return MISSING;
  if (typeof v === "number") return !Number.isFinite(v) ? MISSING : Number.isInteger(v) ? String(v) : v.toPrecision(4);
  if (typeof v === "boolean") return v ? "yes" : "no";
  if (Array.isArray(v)) return v.length ? v.map(fmt).join(", ") : MISSING;
  if (typeof v === "object") return Object.entries(v).map(([k, x]) => `${k} ${fmt(x)}`).join("; ") || MISSING;
  return String(v);
}

// A table cell: long text is cut to one line, the whole of it on hover, so no row grows tall.
function td(v, column) {
  let text = fmt(v);
  // the writers' terse verdict "null: …" reads as the sentence it stands for
  if (column === "verdict" && /^null:\s*/i.test(text)) text = text.replace(/^null:\s*/i, "a null result: ");
  const long = text.length > 60;
  return el("td", {class: typeof v === "number" ? "num" : long ? "long" : null, title: long ? text : null}, text);
}

let plotCount = 0;
function plot(fig) {
  const div = el("div", {class: "plot", id: "plot-" + (++plotCount)});
  // Draw after the div is in the document so plotly can measure its width.
  requestAnimationFrame(() => Plotly.newPlot(div, fig.data, fig.layout || {}, {responsive: true, displaylogo: false}));
  return div;
}

let cvCount = 0;
function cview(component, props) {
  const div = el("div", {class: "cv", id: "cv-" + (++cvCount)});
  requestAnimationFrame(() => CircuitsVis.render(div.id, CircuitsVis[component], props));
  return div;
}

function note(text) { return el("p", {class: "note"}, text); }

function kv(obj) {
  const rows = Object.entries(obj || {}).filter(([, v]) => v !== null && v !== undefined)
    .map(([k, v]) => el("tr", {}, el("th", {}, k), td(v)));
  return el("table", {class: "kv"}, el("tbody", {}, rows));
}

// A sortable table: click a header to sort by it (numbers numerically).
function table(columns, rows, opts) {
  opts = opts || {};
  let sortCol = null, asc = true;
  const tbody = el("tbody");
  const ths = columns.map((c) => el("th", {on: {click: () => sortBy(c)}}, c));
  function fill() {
    tbody.replaceChildren(...rows.slice(0, opts.limit || 2000).map((r) => {
      const tr = el("tr", {class: opts.onRow ? "click" : null},
        columns.map((c) => td(r[c], c)));
      if (opts.onRow) tr.addEventListener("click", () => opts.onRow(r));
      return tr;
    }));
  }
  function sortBy(c) {
    asc = sortCol === c ? !asc : true;
    sortCol = c;
    rows = rows.slice().sort((a, b) => {
      const x = a[c], y = b[c];
      if (x === y) return 0;
      if (x === null || x === undefined) return 1;
      if (y === null || y === undefined) return -1;
      const r = (typeof x === "number" && typeof y === "number") ? x - y : String(x).localeCompare(String(y));
      return asc ? r : -r;
    });
    ths.forEach((th, i) => th.className = columns[i] === c ? (asc ? "sorted-asc" : "sorted-desc") : "");
    fill();
  }
  fill();
  const wrap = el("div", {class: "tablewrap"}, el("table", {}, el("thead", {}, el("tr", {}, ths)), tbody));
  if (rows.length > (opts.limit || 2000)) wrap.appendChild(el("p", {class: "muted"}, `showing ${opts.limit || 2000} of ${rows.length}`));
  return wrap;
}

function tokens(toks, position, other) {
  return el("div", {class: "tokens"}, toks.map((t, i) => i === position
    ? el("span", {class: "tok tok-p", title: "position " + i}, t, other ? el("span", {class: "tok-alt"}, "\u2192 " + other[i]) : null)
    : el("span", {class: "tok", title: "position " + i}, t)));
}

function select(label, options, value, onChange) {
  const s = el("select", {on: {change: () => onChange(s.value)}},
    options.map(([v, text]) => el("option", {value: v}, text)));
  s.value = value;
  return el("label", {}, label + " ", s);
}

function setCrumbs(...parts) {
  crumbs.replaceChildren(...parts.flatMap((p, i) => [i ? " / " : " ", typeof p === "string" ? p : p]));
}

// ------------------------------------------------------------------ pages

async function runsPage() {
  setCrumbs();
  const data = await api("runs");
  const rows = data.runs.map((r) => ({run: r.name, model: r.model, pairs: r.n_pairs, rejected: r.n_rejected,
    steps: r.steps.join(", "), created: r.created, problem: r.error}));
  const cols = ["run", "model", "pairs", "rejected", "steps", "created"];
  if (rows.some((r) => r.problem)) cols.push("problem");  // an unreadable run says why
  main.replaceChildren(el("h2", {}, "Runs"),
    rows.length ? table(cols, rows,
      {onRow: (r) => { location.hash = "#/run/" + enc(r.run); }})
      : note("No runs in this folder yet: make one with `ec run --out RUNS_DIR/NAME`."));
}

const TABS = [["overview", "Overview"], ["pairs", "Pairs"], ["layers", "Layers"], ["candidates", "Candidates"],
  ["recovery", "Recovery"], ["causal", "Causal"], ["contrasts", "Contrasts"]];

async function runPage(name, tab) {
  const info = await api("runs/" + enc(name));
  setCrumbs(el("a", {href: "#/run/" + enc(name)}, name));
  const nav = el("nav", {class: "tabs"}, TABS.map(([t, label]) =>
    el("a", {href: `#/run/${enc(name)}/${t}`, class: t === tab ? "active" : null}, label)));
  const body = el("div");
  main.replaceChildren(el("h2", {}, name), nav, body);
  await ({overview: overviewTab, pairs: pairsTab, layers: layersTab, candidates: candidatesTab,
    recovery: recoveryTab, causal: causalTab, contrasts: contrastsTab}[tab] || overviewTab)(name, info, body);
}

function overviewTab(name, info, body) {
  const m = info.manifest || {};
  add(body,
    info.has_report ? el("p", {}, el("a", {href: `/runs/${enc(name)}/report.html`, target: "_blank", rel: "noopener"}, "open the report")) : null,
    info.glance && info.glance.length ? [el("h3", {}, "At a glance"), el("ul", {class: "glance"}, info.glance.map((x) => el("li", {}, x)))] : null,
    el("h3", {}, "Run"), kv({created: m.created, command: m.command, seed: m.seed, pairs: info.n_pairs, rejected: info.n_rejected,
      steps: info.steps.join(", ")}),
    el("h3", {}, "Model"), kv(m.model),
    info.check ? [el("h3", {}, "Pairs by category and rejection reason"), table(info.check.columns, info.check.rows)] : null,
  );
}

async function pairsTab(name, info, body) {
  let category = "", q = "", offset = 0;
  const list = el("div");
  const search = el("input", {type: "search", placeholder: "search sentences or id", size: 30});
  let timer = null;
  search.addEventListener("input", () => { clearTimeout(timer); timer = setTimeout(() => { q = search.value; offset = 0; load(); }, 250); });
  add(body, el("div", {class: "controls"},
    select("category", [["", "all categories"], ...info.categories.map((c) => [c, c])], "", (v) => { category = v; offset = 0; load(); }),
    el("label", {}, "search ", search)), list);
  async function load() {
    const d = await api(`runs/${enc(name)}/pairs?category=${enc(category)}&q=${enc(q)}&offset=${offset}&limit=200`);
    const rows = d.pairs.map((p) => ({id: p.id, category: p.category, clean: p.clean, corrupt: p.corrupt,
      change: `${p.clean_token} \u2192 ${p.corrupt_token}`, position: p.position, patched: p.has_patch ? "yes" : ""}));
    list.replaceChildren(el("p", {class: "muted"}, `${d.total} pairs` + (d.total > rows.length ? ` (showing ${offset + 1}\u2013${offset + rows.length})` : "")),
      table(["id", "category", "clean", "corrupt", "change", "position", "patched"], rows,
        {onRow: (r) => { location.hash = `#/run/${enc(name)}/pair/${enc(r.id)}`; }}),
      el("div", {class: "controls"},
        offset > 0 ? el("button", {on: {click: () => { offset = Math.max(0, offset - 200); load(); }}}, "previous") : null,
        offset + rows.length < d.total ? el("button", {on: {click: () => { offset += 200; load(); }}}, "next") : null));
  }
  await load();
}

async function layersTab(name, info, body) {
  if (!info.tables.includes("layers")) { add(body, note("layers.parquet not found: run `ec diff` on this run.")); return; }
  let hook = info.hooks.includes("hook_resid_post") ? "hook_resid_post" : info.hooks[0] || "";
  let category = "all";
  const figs = el("div");
  add(body, el("div", {class: "controls"},
    select("hook", info.hooks.map((h) => [h, h]), hook, (v) => { hook = v; draw(); }),
    select("category", [["all", "all"], ...info.categories.map((c) => [c, c])], "all", (v) => { category = v; draw(); })), figs);
  async function draw() {
    const qs = `hook=${enc(hook)}&category=${enc(category)}`;
    const parts = [plot(await api(`runs/${enc(name)}/figures/layer_offset?${qs}`)),
      plot(await api(`runs/${enc(name)}/figures/category_curves?${qs}&offset=0`))];
    if (info.has_dims) parts.push(plot(await api(`runs/${enc(name)}/figures/layer_dims?${qs}&offset=0`)));
    figs.replaceChildren(...parts);
  }
  await draw();
}

// A long table paged and sorted by the server (offset/limit/sort): the page holds one page of rows.
async function tableTab(name, body, table_, filters, intro) {
  const state = {}, PAGE = 100;
  let offset = 0, sort = "", desc = false;
  const holder = el("div");
  const link = el("a", {}, "download CSV");
  const controls = el("div", {class: "controls"}, filters.map(([key, options]) =>
    select(key, [["", "all"], ...options.map((o) => [o, o])], "", (v) => { state[key] = v; offset = 0; load(); })), link);
  add(body, intro ? el("p", {}, intro) : null, controls, holder);
  async function load() {
    const qs = Object.entries(state).filter(([, v]) => v).map(([k, v]) => `${k}=${enc(v)}`).join("&");
    link.setAttribute("href", `/api/runs/${enc(name)}/${table_}.csv${qs ? "?" + qs : ""}`);
    const page = `start=${offset}&limit=${PAGE}` + (sort ? `&sort=${enc(sort)}&desc=${desc ? 1 : 0}` : "");
    const d = await api(`runs/${enc(name)}/${table_}?${qs ? qs + "&" : ""}${page}`);
    const ths = d.columns.map((c) => el("th", {class: c === sort ? (desc ? "sorted-desc" : "sorted-asc") : null,
      title: "sort by " + c, on: {click: () => { desc = c === sort ? !desc : false; sort = c; offset = 0; load(); }}}, c));
    const rows = d.rows.map((r) => el("tr", {}, d.columns.map((c) => td(r[c], c))));
    const shown = d.total ? `rows ${offset + 1}\u2013${offset + d.rows.length} of ${d.total}` : "no rows";
    holder.replaceChildren(el("p", {class: "muted"}, shown + (sort ? ` \u00b7 sorted by ${sort}${desc ? " (descending)" : ""}` : " \u00b7 click a column to sort")),
      el("div", {class: "tablewrap"}, el("table", {}, el("thead", {}, el("tr", {}, ths)), el("tbody", {}, rows))),
      el("div", {class: "controls"},
        offset > 0 ? el("button", {on: {click: () => { offset = Math.max(0, offset - PAGE); load(); }}}, "previous") : null,
        offset + d.rows.length < d.total ? el("button", {on: {click: () => { offset += PAGE; load(); }}}, "next") : null));
  }
  await load();
}

async function candidatesTab(name, info, body) {
  if (!info.tables.includes("candidates")) { add(body, note("candidates.parquet not found: run `ec diff` on this run.")); return; }
  await tableTab(name, body, "candidates", [["kind", ["stable", "responsive"]], ["category", ["all", ...info.categories]],
    ["hook", info.hooks]], "Stable: change consistently little across pairs; responsive: change consistently much. Click a column to sort.");
}

async function contrastsTab(name, info, body) {
  if (!info.tables.includes("contrasts")) { add(body, note("contrasts.parquet not found: run `ec diff` on this run.")); return; }
  await tableTab(name, body, "contrasts", [["hook", info.hooks]], info.contrasts_note);
}

// The measure step: recovery index, ignore baseline, invariance counts vs null, probe (as in the report).
async function recoveryTab(name, info, body) {
  if (!info.has_measure) { add(body, note("measure.json not found: run `ec measure` on this run.")); return; }
  const d = await api(`runs/${enc(name)}/measure`);
  add(body, d.sentences.map((x) => el("p", {}, x)));
  for (const t of d.tables) add(body, el("h3", {}, t.title), table(t.table.columns, t.table.rows));
  for (const f of d.figures) add(body, el("p", {class: "muted"}, f.caption), plot(f.figure));
}

async function causalTab(name, info, body) {
  const has = (t) => info.tables.includes(t);
  if (!has("patch_dims") && !has("patch_attribution") && !has("patch_exact")) {
    add(body, note("No patching results: run `ec patch` on this run.")); return;
  }
  for (const b of info.causal_summary || []) {
    add(body, el("h3", {}, b.title), b.sentences.map((x) => el("p", {}, x)), b.table ? table(b.table.columns, b.table.rows) : null);
  }
  if (has("patch_dims")) {
    add(body, el("h3", {}, "All candidate-set tests (patch_dims.csv)"));
    await tableTab(name, body, "patch_dims", [], null);
    const c = await api(`runs/${enc(name)}/figures/controls`);
    add(body, c.figures.map(plot));
  }
  if (has("patch_attribution")) {
    add(body, el("h3", {}, "Attribution vs exact patching"));
    try { add(body, plot(await api(`runs/${enc(name)}/figures/attribution`))); } catch (e) { add(body, note(e.message)); }
  }
  if (info.exact_pairs.length) {
    add(body, el("h3", {}, "Pairs with an exact patching map"), el("ul", {}, info.exact_pairs.map((p) =>
      el("li", {}, el("a", {href: `#/run/${enc(name)}/pair/${enc(p)}`}, p)))));
  }
}

async function pairPage(name, id, layer) {
  setCrumbs(el("a", {href: "#/run/" + enc(name)}, name), el("a", {href: `#/run/${enc(name)}/pairs`}, "pairs"), id);
  main.replaceChildren(el("p", {class: "muted"}, "computing the pair's activations…"));
  const d = await api(`runs/${enc(name)}/pairs/${enc(id)}` + (layer !== null ? `?layer=${layer}` : ""));
  const p = d.pair;
  const out = [el("h2", {}, `${p.category} \u00b7 ${p.id}`),
    el("p", {class: "sent"}, el("b", {}, "clean"), p.clean),
    el("p", {class: "sent"}, el("b", {}, "corrupt"), p.corrupt)];
  if (d.clean_tokens) out.push(tokens(d.clean_tokens, p.position, d.corrupt_tokens));
  if (d.metrics) {
    const {kl, ...rest} = d.metrics;  // the per-position KL list is drawn below as coloured tokens
    out.push(el("details", {}, el("summary", {}, "Metrics of this pair (pairs.csv)"), kv(rest)));
  }
  if (d.views_error) out.push(note("Activation views unavailable: " + d.views_error));
  const f = d.figures || {};
  if (f.diff) out.push(el("h3", {}, "Per-layer, per-position difference"), plot(f.diff), plot(f.curve));
  if (f.patch_denoise || f.patch_noise) {
    out.push(el("h3", {}, "Patching map"), el("div", {class: "grid2"},
      f.patch_denoise ? el("div", {}, plot(f.patch_denoise)) : null, f.patch_noise ? el("div", {}, plot(f.patch_noise)) : null));
  }
  if (d.kl_tokens) out.push(el("h3", {}, "Tokens coloured by downstream KL(clean \u2016 corrupt)"), cview("ColoredTokens", d.kl_tokens));
  if (d.attention) {
    const layers = Array.from({length: d.n_layers}, (_, i) => [String(i), String(i)]);
    out.push(el("h3", {}, "Attention heads"),
      el("div", {class: "controls"}, select("layer", layers, String(d.layer), (v) => { location.hash = `#/run/${enc(name)}/pair/${enc(id)}/${v}`; })),
      el("div", {class: "grid2"}, el("div", {}, el("p", {class: "muted"}, "clean"), cview("AttentionHeads", d.attention.clean)),
        el("div", {}, el("p", {class: "muted"}, "corrupt"), cview("AttentionHeads", d.attention.corrupt))));
  }
  main.replaceChildren(...out);
}

async function route() {
  const parts = location.hash.replace(/^#\/?/, "").split("/").filter((s) => s.length).map(decodeURIComponent);
  try {
    if (!parts.length) await runsPage();
    else if (parts[0] === "run" && parts.length >= 4 && parts[2] === "pair") await pairPage(parts[1], parts[3], parts.length > 4 ? Number(parts[4]) : null);
    else if (parts[0] === "run" && parts.length >= 2) await runPage(parts[1], parts[2] || "overview");
    else await runsPage();
  } catch (e) {
    main.replaceChildren(note("Error: " + e.message), el("p", {}, el("a", {href: "#/"}, "back to the runs")));
  }
  document.body.setAttribute("data-ready", location.hash || "#/");
}

window.addEventListener("hashchange", route);
route();
