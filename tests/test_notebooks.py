"""The notebooks in notebooks/ run top to bottom in a real Jupyter kernel (nbclient + ipykernel),
their plotly and circuitsvis cells give rich output, and the circuitsvis view of one executed
notebook, exported to HTML, renders in headless chromium.

Each notebook runs once per session with ECLENS_NB_SMALL=1 (its size switch); the executed
notebooks and their run times are shared by the tests below. `pytest -m notebooks` runs them.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

from conftest import require

pytestmark = pytest.mark.notebooks
ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
SECONDS: dict[str, float] = {}
PLOTLY_MIME = ("application/vnd.plotly.v1+json", "text/html")


def _script():
    spec = importlib.util.spec_from_file_location("notebook_screenshot", ROOT / "scripts" / "notebook_screenshot.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="session")
def nbtools():
    for m in ("nbclient", "ipykernel", "nbformat", "nbconvert"):
        require(importlib.util.find_spec(m) is not None, f"{m} is not installed: pip install -e '.[dev]'")
    return _script()


@pytest.fixture(scope="session")
def executed(nbtools, tmp_path_factory):
    """name -> executed notebook (each run once, lazily, in its own temporary folder)."""
    done: dict[str, object] = {}

    def get(name: str):
        if name not in done:
            nb, secs = nbtools.execute(ROOT / "notebooks" / name, tmp_path_factory.mktemp(name.split(".")[0]))
            SECONDS[name] = round(secs, 1)
            slow = sorted(nbtools.cell_seconds(nb), reverse=True)[:3]
            print(f"\n{name}: executed in {secs:.1f} s; slowest cells: "
                  + "; ".join(f"{t:.1f} s {src!r}" for t, src in slow))
            done[name] = nb
        return done[name]

    yield get
    if SECONDS:
        print("\nnotebook run times (s, ECLENS_NB_SMALL=1):", json.dumps(SECONDS))


def test_the_three_notebooks_are_committed_without_outputs():
    assert [p.name for p in NOTEBOOKS] == ["01_quick_start.ipynb", "02_one_pair.ipynb", "03_causal_tests.ipynb"]
    for p in NOTEBOOKS:
        nb = json.loads(p.read_text(encoding="utf-8"))
        for c in nb["cells"]:
            c["source"] = "".join(c["source"]) if isinstance(c["source"], list) else c["source"]
            if c["cell_type"] == "code":
                assert c["outputs"] == [] and c["execution_count"] is None, p.name
                # public API only: no private name (`._x`, `import _x`, `, _x`)
                assert not re.search(r"(\.|\bimport\s+|,\s*)_[A-Za-z]", c["source"]), (p.name, c["source"])
        assert "ECLENS_NB_SMALL" in "".join(c["source"] for c in nb["cells"]), p.name


def _outputs(cell) -> list[dict]:
    return [o for o in cell.outputs if o.get("output_type") in ("display_data", "execute_result")]


@pytest.mark.slow
@pytest.mark.parametrize("name", [p.name for p in NOTEBOOKS])
def test_notebook_runs_and_gives_rich_output(executed, name):
    nb = executed(name)  # a failing cell raises CellExecutionError naming it
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count for c in code), name
    assert not [o for c in code for o in c.outputs if o.get("output_type") == "error"], name
    plots = [c for c in code if "plotly" in c.metadata.get("tags", [])]
    views = [c for c in code if "circuitsvis" in c.metadata.get("tags", [])]
    assert plots, f"{name} has no plotly cell"
    for c in plots:
        figs = [o for o in _outputs(c) if "application/vnd.plotly.v1+json" in o["data"]
                or "plotly" in o["data"].get("text/html", "").lower()]
        assert figs, f"{name}: plotly cell gave no figure: {c.source[:80]!r} -> {[list(o['data']) for o in _outputs(c)]}"
        for o in figs:
            if "application/vnd.plotly.v1+json" in o["data"]:
                assert o["data"]["application/vnd.plotly.v1+json"]["data"], "a figure without traces"
    for c in views:
        html = [o["data"]["text/html"] for o in _outputs(c) if "text/html" in o["data"]]
        assert len(html) == 1 and "CircuitsVis.render(" in html[0], f"{name}: {c.source[:80]!r}"
        assert any(k in html[0] for k in ("CircuitsVis.AttentionHeads", "CircuitsVis.ColoredTokens")), name
    if name.startswith("02"):
        assert len(views) == 3  # clean heads, corrupt heads, KL tokens
        texts = [o["data"].get("text/html", "") for c in views for o in _outputs(c)]
        assert sum("CircuitsVis.AttentionHeads" in t for t in texts) == 2
        assert sum("CircuitsVis.ColoredTokens" in t for t in texts) == 1


@pytest.mark.slow
@pytest.mark.browser
def test_exported_notebook_renders_circuitsvis_in_chromium(executed, nbtools, tmp_path):
    require(nbtools.CHROMIUM.exists(), f"{nbtools.CHROMIUM} not found: bash scripts/setup.sh --browser")
    require(importlib.util.find_spec("playwright") is not None, "playwright is not installed: pip install -e '.[dev]'")
    html = nbtools.export_html(executed("02_one_pair.ipynb"), tmp_path / "one_pair.html")
    seen = nbtools.screenshot(html, tmp_path / "one_pair.png")
    assert seen["views"] == 3, seen  # both attention-heads views and the KL tokens drew into their containers
    assert seen["visible"] and seen["box"]["width"] > 100 and seen["box"]["height"] > 50, seen
    assert seen["cv_elements"] > 20, seen
    assert seen["canvas_heights"] and max(seen["canvas_heights"]) > 150, seen  # the zoomed head's pattern drew
    assert not seen["errors"], seen["errors"]
    assert (tmp_path / "one_pair.png").stat().st_size > 5_000

