"""Execute a notebook in a real Jupyter kernel, export it to HTML and screenshot its first
circuitsvis view in headless chromium.

    python scripts/notebook_screenshot.py                      # notebooks/02_one_pair.ipynb -> docs/notebook.png
    python scripts/notebook_screenshot.py NOTEBOOK --out PNG [--full]

It refreshes the README's notebook screenshot (a tracked file) only when run by hand;
tests/test_notebooks.py uses the same functions with a temporary folder. Needs the dev
extras (nbclient, ipykernel, nbformat, nbconvert, playwright) and /usr/bin/chromium.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
# What a circuitsvis view has drawn once it rendered: its container holds elements (it starts empty).
CV_DRAWN = "Array.from(document.querySelectorAll('.cv')).filter(d => d.children.length > 0).length"


def execute(path: str | os.PathLike, cwd: str | os.PathLike, small: bool = True, timeout: int = 600):
    """Run every cell of ``path`` with a fresh ``python3`` kernel in ``cwd``; returns ``(notebook, seconds)``.

    A failing cell raises ``nbclient.exceptions.CellExecutionError`` naming the cell.
    """
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(str(path), as_version=4)
    env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"), "TOKENIZERS_PARALLELISM": "false"}
    env.pop("ECLENS_NB_SMALL", None)
    if small:
        env["ECLENS_NB_SMALL"] = "1"
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(cwd)}})
    t0 = time.perf_counter()
    client.execute(env=env)  # the kernel subprocess gets this environment (PYTHONPATH included)
    return nb, time.perf_counter() - t0


def cell_seconds(nb) -> list[tuple[float, str]]:
    """``(seconds, first line)`` of each executed code cell, from nbclient's timing metadata."""
    from datetime import datetime

    out = []
    for c in nb.cells:
        t = c.get("metadata", {}).get("execution", {})
        if c.cell_type == "code" and "iopub.execute_input" in t and "shell.execute_reply" in t:
            a, b = (datetime.fromisoformat(t[k].replace("Z", "+00:00")) for k in ("iopub.execute_input",
                                                                                  "shell.execute_reply"))
            out.append(((b - a).total_seconds(), c.source.splitlines()[0][:60] if c.source else ""))
    return out


def export_html(nb, out: str | os.PathLike) -> Path:
    """The executed notebook as one HTML file (nbconvert's lab template); circuitsvis views carry their bundle."""
    from nbconvert import HTMLExporter

    body, _ = HTMLExporter().from_notebook_node(nb)
    out = Path(out)
    out.write_text(body, encoding="utf-8")
    return out


def screenshot(html: str | os.PathLike, png: str | os.PathLike | None = None, full_page: bool = False,
               timeout_ms: int = 60_000) -> dict:
    """Open ``html`` in headless chromium, wait until a circuitsvis view has drawn, and report what is seen:
    ``views`` (views drawn), ``visible`` (the first one's drawing is visible), ``box`` (its size),
    ``canvas_heights`` (of the charts it drew: the zoomed attention pattern), ``errors``."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 1300})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            # The exported page asks a CDN for require.js/MathJax; there is no network here, and nothing
            # eclens shows needs them: refuse every non-file request at once rather than wait for it.
            page.route("**/*", lambda r: r.continue_() if r.request.url.startswith("file:") else r.abort())
            page.goto(Path(html).resolve().as_uri(), wait_until="load", timeout=timeout_ms)
            end = time.monotonic() + timeout_ms / 1000
            while page.evaluate(CV_DRAWN) == 0:
                if time.monotonic() > end:
                    break
                page.wait_for_timeout(200)
            views = page.evaluate(CV_DRAWN)
            drawn = page.locator(".cv > *").first
            visible = views > 0 and drawn.is_visible()
            box = canvases = None
            if visible:
                # Bring the first view to the top and let its charts finish their animation before looking.
                page.evaluate("document.querySelector('.cv').scrollIntoView()")
                page.wait_for_timeout(1500)
                box = page.locator(".cv").first.bounding_box()
                canvases = page.evaluate("Array.from(document.querySelector('.cv').querySelectorAll('canvas'))"
                                         ".map(c => c.getBoundingClientRect().height)")
                if png is not None:
                    if full_page:
                        page.screenshot(path=str(png), full_page=True)
                    else:
                        vh = page.viewport_size["height"]
                        page.screenshot(path=str(png), clip={"x": box["x"], "y": max(box["y"], 0), "width": box["width"],
                                                             "height": min(box["height"], vh - max(box["y"], 0))})
            return {"views": views, "visible": visible, "box": box, "canvas_heights": canvases, "errors": errors,
                    "cv_elements": page.evaluate("document.querySelectorAll('.cv *').length")}
        finally:
            browser.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("notebook", nargs="?", default=str(ROOT / "notebooks" / "02_one_pair.ipynb"))
    ap.add_argument("--out", default=str(ROOT / "docs" / "notebook.png"))
    ap.add_argument("--full", action="store_true", help="screenshot the whole page, not the first view")
    ap.add_argument("--html", help="also keep the exported HTML here")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        nb, secs = execute(args.notebook, tmp)
        html = export_html(nb, args.html or Path(tmp) / "notebook.html")
        seen = screenshot(html, args.out, full_page=args.full)
    if not seen["visible"]:
        print(f"no circuitsvis view rendered in {html}: {seen}", file=sys.stderr)
        return 1
    print(f"executed {args.notebook} in {secs:.1f}s; {seen['views']} circuitsvis views rendered; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
