"""Headless chromium (Debian's, driven by Playwright) against the web UI and the report file.

Skips cleanly where /usr/bin/chromium or the playwright package is missing
(`bash scripts/setup.sh --browser` installs chromium). Takes the README screenshots
(docs/web-ui.png, docs/report.png).
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from _viewruns import RUN_NAME, XSS_CLEAN, XSS_ID, real_run  # noqa: F401 - session fixture
from eclens.web.server import make_server, url_of

pytestmark = pytest.mark.browser
CHROMIUM = Path("/usr/bin/chromium")
DOCS = Path(__file__).resolve().parents[1] / "docs"
ARGS = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]
TIMEOUT = 90_000  # ms: the pair view runs the model on a shared 2-core CPU


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} not found: install it with `bash scripts/setup.sh --browser` "
                    "(apt-get install -y chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the playwright package is not installed: pip install -e '.[dev]'")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=ARGS)
        yield b
        b.close()


class Watch:
    """Console errors, uncaught exceptions and dialogs (an alert() would mean injected script ran)."""

    def __init__(self, page):
        self.errors: list[str] = []
        self.dialogs: list[str] = []
        page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: self.errors.append(f"pageerror: {e}"))
        page.on("dialog", self._dialog)

    def _dialog(self, d):
        self.dialogs.append(d.message)
        d.dismiss()


def wait_js(page, expr: str, timeout_ms: int = TIMEOUT) -> None:
    """Poll a JS expression from Python: Playwright's wait_for_function evaluates strings with
    eval, which the UI's Content-Security-Policy (rightly) forbids; page.evaluate is exempt."""
    import time

    end = time.monotonic() + timeout_ms / 1000
    while not page.evaluate(expr):
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {expr}")
        page.wait_for_timeout(200)


def plots_have_data(page, at_least: int = 1) -> None:
    wait_js(page, f"""(() => {{ const p = Array.from(document.querySelectorAll('.js-plotly-plot'));
                     return p.length >= {at_least} && p.every(d => d.data && d.data.length > 0); }})()""")


@pytest.fixture(scope="module")
def ui(real_run, model):  # noqa: F811
    srv = make_server(real_run.runs_dir, "127.0.0.1", 0, model_loader=lambda rd: model, quiet=True)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield url_of(srv)
    srv.shutdown()
    srv.server_close()


def test_web_ui_run_pair_and_tables(browser, ui):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    w = Watch(page)
    page.goto(ui)
    page.get_by_role("cell", name=RUN_NAME, exact=True).click()
    page.wait_for_selector(f"h2:text-is('{RUN_NAME}')", timeout=TIMEOUT)
    # the hostile run name is text: no <img> element was made from it
    assert page.evaluate("document.querySelectorAll('img').length") == 0

    page.get_by_role("link", name="Layers").click()
    plots_have_data(page, 3)

    page.get_by_role("link", name="Candidates").click()
    page.wait_for_selector(".tablewrap tbody tr", timeout=TIMEOUT)
    page.get_by_role("columnheader", name="absz_median", exact=True).click()
    vals = page.evaluate("""() => { const th = Array.from(document.querySelectorAll('thead th'));
        const i = th.findIndex(t => t.textContent === 'absz_median');
        return Array.from(document.querySelectorAll('tbody tr')).slice(0, 50)
               .map(r => parseFloat(r.children[i].textContent)); }""")
    assert vals == sorted(vals)
    assert page.get_by_role("link", name="download CSV").get_attribute("href").endswith("/candidates.csv")

    page.get_by_role("link", name="Pairs").click()
    page.get_by_placeholder("search sentences or id").fill("alert(1")
    wait_js(page, "document.querySelectorAll('tbody tr').length === 1")
    page.get_by_role("cell", name=XSS_ID, exact=True).click()
    plots_have_data(page, 2)
    wait_js(page, "Array.from(document.querySelectorAll('.cv')).every(d => d.children.length > 0)")
    assert page.locator("p.sent").first.inner_text().endswith(XSS_CLEAN)
    assert page.evaluate("document.querySelectorAll('main script').length") == 0
    page.wait_for_timeout(300)
    page.screenshot(path=str(DOCS / "web-ui.png"))

    # another layer for the attention view
    page.get_by_label("layer").select_option("5")
    wait_js(page, "location.hash.endsWith('/5')")
    plots_have_data(page, 2)
    assert w.dialogs == [] and w.errors == [], (w.dialogs, w.errors)
    page.close()


def test_report_renders_offline(browser, real_run):  # noqa: F811
    ctx = browser.new_context(offline=True, viewport={"width": 1280, "height": 1000})
    requested: list[str] = []

    def guard(route):
        if route.request.url.startswith("file:"):
            route.continue_()
        else:
            requested.append(route.request.url)
            route.abort()

    ctx.route("**/*", guard)
    page = ctx.new_page()
    w = Watch(page)
    page.goto((real_run.path / "report.html").as_uri())
    page.wait_for_selector("body[data-rendered=true]", timeout=TIMEOUT)
    n_plots = page.evaluate("document.querySelectorAll('.plot').length")
    plots_have_data(page, n_plots)
    wait_js(page, "Array.from(document.querySelectorAll('.cv')).every(d => d.children.length > 0)")
    assert page.locator("#boot-error").is_hidden()
    assert page.evaluate("document.querySelectorAll('main img').length") == 0
    body = page.inner_text("#examples")
    assert XSS_CLEAN in body  # shown as text, never run
    page.locator("#layers").scroll_into_view_if_needed()
    page.evaluate("window.scrollTo(0, 0)")
    page.screenshot(path=str(DOCS / "report.png"))
    assert requested == [] and w.dialogs == [] and w.errors == [], (requested, w.dialogs, w.errors)
    ctx.close()
