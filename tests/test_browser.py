"""The browser sweep: headless chromium (Debian's, driven by Playwright) over every route of the
web UI and every section of the report, on a small real run that holds a `<script>` sentence.

Each page fails on what a person would see wrong (tests/_sweep.py). Screenshots go to the folder
``ECLENS_SCREENSHOTS`` names, else a temporary one (printed); `python scripts/screenshots.py`
refreshes the README's from them. A missing chromium or playwright skips locally and fails
under CI=true (`bash scripts/setup.sh --browser` installs chromium).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from urllib.parse import quote

import pytest

from _sweep import ARGS, CHROMIUM, Sweeper, Watch, check_page, wait_drawn
from _viewruns import RUN_NAME, XSS_CLEAN, XSS_ID, real_run  # noqa: F401 - session fixture
from conftest import require
from eclens.tables import read_table_file
from eclens.web.server import make_server, url_of

pytestmark = pytest.mark.browser
REPORT_SECTIONS = ["glance", "dataset", "layers", "candidates", "causal", "contrasts", "examples", "manifest"]


@pytest.fixture(scope="module")
def browser():
    require(CHROMIUM.exists(), f"{CHROMIUM} not found: install it with `bash scripts/setup.sh --browser` "
            "(apt-get install -y chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        require(False, "the playwright package is not installed: pip install -e '.[dev]'")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    d = Path(os.environ.get("ECLENS_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    d.mkdir(parents=True, exist_ok=True)
    print(f"\nscreenshots: {d}")
    return d


@pytest.fixture(scope="module")
def ui(real_run):  # noqa: F811
    # The server's own model loader (the run's manifest names the embedded model): no stand-in.
    srv = make_server(real_run.runs_dir, "127.0.0.1", 0, quiet=True)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield url_of(srv)
    srv.shutdown()
    srv.server_close()


@pytest.mark.slow
def test_sweep_web_ui(browser, ui, shots, real_run):  # noqa: F811
    import json
    import urllib.request

    ov = json.loads(urllib.request.urlopen(ui + "api/runs/" + quote(RUN_NAME, safe="")).read())
    exact = ov["exact_pairs"][0]
    q = quote(RUN_NAME, safe="")
    routes = [("web-runs", "#/"), ("web-overview", f"#/run/{q}"), ("web-pairs", f"#/run/{q}/pairs"),
              ("web-pair", f"#/run/{q}/pair/{quote(exact, safe='')}"),
              ("web-pair-script", f"#/run/{q}/pair/{quote(XSS_ID, safe='')}"),
              ("web-layers", f"#/run/{q}/layers"), ("web-candidates", f"#/run/{q}/candidates"),
              ("web-causal", f"#/run/{q}/causal"), ("web-contrasts", f"#/run/{q}/contrasts")]
    ctx = browser.new_context(viewport={"width": 1280, "height": 900})
    sw = Sweeper(ctx, shots)
    pages = {name: sw.open(name, ui + hash_) for name, hash_ in routes}
    assert not sw.problems(), sw.problems()

    # The hostile run name and sentence are text: nothing was made from them, nothing ran.
    p = pages["web-pair-script"]
    assert p.locator("p.sent").first.inner_text().endswith(XSS_CLEAN)
    assert p.evaluate("document.querySelectorAll('main script, main img').length") == 0

    # Long tables are paged and sorted by the server: one page of rows in the page, and a click
    # on a header asks the server for the rows in that order.
    c = pages["web-candidates"]
    total = len(real_run_candidates(real_run))
    assert c.locator(".tablewrap tbody tr").count() == min(100, total)
    assert f"of {total}" in c.inner_text("main")
    w = Watch().attach(c)
    with c.expect_response(lambda r: "sort=absz_median" in r.url and "desc=0" in r.url):
        c.get_by_role("columnheader", name="absz_median", exact=True).click()
    wait_drawn(c)
    vals = c.evaluate("""() => { const th = Array.from(document.querySelectorAll('thead th'));
        const i = th.findIndex(t => t.textContent === 'absz_median');
        return Array.from(document.querySelectorAll('tbody tr')).map(r => parseFloat(r.children[i].textContent)); }""")
    assert vals == sorted(vals) and vals[0] == pytest.approx(real_run_candidates(real_run)["absz_median"].min(),
                                                            rel=1e-3)
    assert check_page(c) == [] and w.errors == []
    ctx.close()


def real_run_candidates(real_run):  # noqa: F811

    return read_table_file(real_run.path / "candidates.parquet")


@pytest.mark.slow
def test_sweep_report(browser, real_run, shots):  # noqa: F811
    ctx = browser.new_context(offline=True, viewport={"width": 1280, "height": 1000})
    requested: list[str] = []

    def guard(route):
        if route.request.url.startswith("file:"):
            route.continue_()
        else:
            requested.append(route.request.url)
            route.abort()

    ctx.route("**/*", guard)
    sw = Sweeper(ctx, shots)
    page = sw.open("report", (real_run.path / "report.html").as_uri(), sections=REPORT_SECTIONS)
    assert not sw.problems(), sw.problems()
    assert page.locator("#boot-error").is_hidden()
    assert page.evaluate("document.querySelectorAll('main img').length") == 0
    assert XSS_CLEAN in page.inner_text("#examples")  # shown as text, never run
    glance = page.inner_text("#glance")
    assert "nats" in glance and "% of the activation's norm" in glance
    assert requested == []
    ctx.close()


BROKEN = """<!doctype html><html><head><title>broken</title></head><body data-ready="#/">
<h2>[object HTMLHeadingElement],[object HTMLTableElement]</h2>
<p>restored undefined of the gap</p>
<p>{"metric":"logit_diff","n_rows":960}</p>
<table><tr><td>a</td><td></td></tr><tr><td>a<br>b<br>c<br>d<br>e<br>f<br>g</td><td>x</td></tr></table>
<div class="plot" id="empty"></div>
<script>Plotly.newPlot(document.getElementById('empty'), [], {}); console.error('boom');</script>
</body></html>"""

CLEAN = """<!doctype html><html><head><title>clean</title></head><body data-ready="#/">
<p>A null result: no set beats its random controls; the effect is — (missing).</p>
<table><tr><td>a</td><td>—</td></tr></table>
<div class="plot" id="ok"></div>
<script>Plotly.newPlot(document.getElementById('ok'), [{y: [1, 2, 3]}], {});</script>
</body></html>"""


# the sweep's own check: it guards the two sweeps above (both slow), so it runs with them (~5 s with chromium's start)
@pytest.mark.slow
def test_sweep_catches_a_broken_page(browser, tmp_path):
    from eclens import viz

    (tmp_path / "plotly.js").write_text(viz.plotly_bundle(), encoding="utf-8")
    for name, html in (("broken", BROKEN), ("clean", CLEAN)):
        (tmp_path / f"{name}.html").write_text(
            html.replace("<head>", '<head><script src="plotly.js"></script>'), encoding="utf-8")
    ctx = browser.new_context()
    sw = Sweeper(ctx, tmp_path)
    sw.open("broken", (tmp_path / "broken.html").as_uri())
    sw.open("clean", (tmp_path / "clean.html").as_uri())
    found = sw.found["broken"]
    for want in ("an object rendered as text", "the literal 'undefined'", "a JSON object in running text",
                 "cell: empty", "row: ", "plot: figure 1: no data", "console: boom"):
        assert any(want in p for p in found), (want, found)
    assert sw.found["clean"] == [], sw.found["clean"]
    assert (tmp_path / "broken.png").stat().st_size > 0
    ctx.close()
