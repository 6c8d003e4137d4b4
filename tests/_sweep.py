"""The browser sweep: what a person would see wrong on a page, found in headless chromium.

``check_page(page, root)`` is the reusable check; ``Sweeper.open`` opens one page, waits
until it has drawn, checks it, and screenshots it into a folder the caller names. Later
views join the sweep by adding a route to the list the web-UI sweep test builds (or a
section id to the report's list). A page fails on:

- visible text ``[object ``, a literal ``undefined``/``NaN``/``null`` (missing values read
  "—"; "null result"/"null hypothesis" are words, not a leaked value), a JSON object or a
  Python dict in running text;
- a table cell that is empty or reads None/nan (missing values read "—");
- a console error or an uncaught exception;
- a plotly figure with no data, or a figure that was never drawn;
- a table row taller than 4 line-heights.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]
TIMEOUT_S = 120.0  # a per-pair view runs the model on a shared 2-core CPU

TEXT_RULES = [
    (re.compile(r"\[object "), "an object rendered as text"),
    (re.compile(r"(?<![\w.-])undefined(?![\w-])"), "the literal 'undefined'"),
    (re.compile(r"(?<![\w.-])NaN(?![\w-])"), "the literal 'NaN'"),
    (re.compile(r"(?<![\w.-])null(?![\w-])(?!\s+(?:result|hypothesis|hypotheses|finding))"), "the literal 'null'"),
    (re.compile(r"\{\s*\"[^\"\n]{0,80}\"\s*:"), "a JSON object in running text"),
    (re.compile(r"\{\s*'[^'\n]{0,80}'\s*:"), "a Python dict in running text"),
]

# Runs in the page: everything the checks need, in one round trip. Plots and circuitsvis views
# are left out of the text and table checks (their own markup is not ours).
PROBE_JS = r"""(root) => {
  const r = document.querySelector(root);
  if (!r) return {missing: true};
  r.querySelectorAll('details').forEach((d) => { d.open = true; });  // folded content is checked too
  const foreign = (e) => e.closest('.js-plotly-plot, .cv, .plot');
  const visible = (e) => { const b = e.getBoundingClientRect(); return b.width > 0 && b.height > 0; };
  let text = r.innerText;
  r.querySelectorAll('.js-plotly-plot, .cv').forEach((e) => { const t = e.innerText; if (t) text = text.split(t).join(' '); });
  const cells = [], rows = [];
  r.querySelectorAll('td').forEach((td) => {
    if (foreign(td) || !visible(td)) return;
    const t = td.innerText.trim();
    if (t === '' || t === 'None' || t === 'nan') cells.push((td.closest('tr').innerText || '').slice(0, 120));
  });
  r.querySelectorAll('tr').forEach((tr) => {
    if (foreign(tr) || !visible(tr)) return;
    const c = tr.cells[0] || tr;
    const cs = getComputedStyle(c);
    const lh = parseFloat(cs.lineHeight) || parseFloat(cs.fontSize) * 1.2;
    const h = tr.getBoundingClientRect().height;
    if (h > 4 * lh) rows.push({h: Math.round(h), lh: Math.round(lh), text: tr.innerText.slice(0, 120)});
  });
  // plotly.py sends numpy arrays as typed-array specs ({dtype, bdata}); plotly.js decodes them itself
  const filled = (v) => v && ((v.length || 0) > 0 || (typeof v.bdata === 'string' && v.bdata.length > 0));
  const hasValues = (t) => ['x', 'y', 'z', 'values', 'r'].some((k) => filled(t[k]));
  const plots = [];
  r.querySelectorAll('.plot').forEach((d, i) => {
    const title = (((d.layout || {}).title || {}).text) || ('figure ' + (i + 1));
    if (!d.classList.contains('js-plotly-plot')) plots.push(title + ': never drawn');
    else if (!(d.data && d.data.some(hasValues))) plots.push(title + ': no data');
  });
  return {text, cells, rows, plots};
}"""

READY_JS = r"""() => {
  const ready = document.body.getAttribute('data-ready') !== null || document.body.getAttribute('data-rendered') === 'true';
  const plots = Array.from(document.querySelectorAll('.plot'));
  const cvs = Array.from(document.querySelectorAll('.cv'));
  const busy = Array.from(document.querySelectorAll('p.muted')).some((p) => p.textContent.startsWith('computing'));
  return ready && !busy && plots.every((d) => d.classList.contains('js-plotly-plot')) && cvs.every((d) => d.children.length > 0);
}"""


def check_text(text: str) -> list[str]:
    """The text rules on a page's visible text (the part of the sweep that needs no browser)."""
    out = []
    for rx, what in TEXT_RULES:
        for m in rx.finditer(text):
            a, b = max(0, m.start() - 50), min(len(text), m.end() + 50)
            out.append(f"text: {what}: …{text[a:b]!r}…")
            break
    return out


def check_page(page, root: str = "body") -> list[str]:
    """Everything wrong that a person would see under ``root`` of a page that has finished drawing."""
    got = page.evaluate(PROBE_JS, root)
    if got.get("missing"):
        return [f"{root}: not on the page"]
    out = check_text(got["text"])
    out += [f"cell: empty or None/nan in row {c!r}" for c in got["cells"][:5]]
    out += [f"row: {r['h']} px tall (line height {r['lh']} px): {r['text']!r}" for r in got["rows"][:5]]
    out += [f"plot: {p}" for p in got["plots"]]
    return out


def wait_drawn(page, timeout_s: float = TIMEOUT_S) -> bool:
    """Poll from Python (the UI's Content-Security-Policy forbids the eval that wait_for_function uses)."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if page.evaluate(READY_JS):
            page.wait_for_timeout(300)  # plotly draws in the animation frame after newPlot
            return True
        page.wait_for_timeout(200)
    return False


@dataclass
class Watch:
    """Console errors, uncaught exceptions and dialogs (an alert() would mean injected script ran)."""

    errors: list[str] = field(default_factory=list)
    dialogs: list[str] = field(default_factory=list)

    def attach(self, page) -> Watch:
        page.on("console", lambda m: self.errors.append(f"console: {m.text}") if m.type == "error" else None)
        page.on("pageerror", lambda e: self.errors.append(f"pageerror: {e}"))
        page.on("dialog", self._dialog)
        return self

    def _dialog(self, d) -> None:
        self.dialogs.append(f"dialog: {d.message}")
        d.dismiss()


@dataclass
class Sweeper:
    """Opens pages one by one in a browser context, checks each and screenshots it to ``shots``."""

    context: object
    shots: Path
    found: dict[str, list[str]] = field(default_factory=dict)

    def open(self, name: str, url: str, sections: list[str] | None = None) -> object:
        """Open ``url``, wait for it to draw, record its problems under ``name`` (and under
        ``name#section`` for each section id), screenshot it; returns the page (still open)."""
        page = self.context.new_page()
        w = Watch().attach(page)
        page.goto(url, timeout=TIMEOUT_S * 1000)
        problems = [] if wait_drawn(page) else [f"not drawn within {TIMEOUT_S:.0f} s"]
        page.screenshot(path=str(self.shots / f"{name}.png"))  # as a person first sees it (the checks unfold details)
        if sections:
            for sid in sections:
                loc = page.locator(f"#{sid}")
                self.found[f"{name}#{sid}"] = check_page(page, f"#{sid}")
                if loc.count():
                    loc.screenshot(path=str(self.shots / f"{name}-{sid}.png"))
            page.evaluate("window.scrollTo(0, 0)")
        else:
            problems += check_page(page)
        self.found[name] = problems + w.errors + w.dialogs
        return page

    def problems(self) -> str:
        return "\n".join(f"{k}: {p}" for k, v in self.found.items() for p in v)
