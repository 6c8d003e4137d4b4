"""`ec compare`: two real (tiny-model) runs of the same pairs, one of which rejects a pair the
other accepts; the page in headless chromium."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from eclens.cli import main
from eclens.model import save_tiny_model

LONG = ("The old man who lived in the small house at the end of the long and winding road near the river "
        "bank said that the keys to the cabinet are here.")


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    from eclens.model import load_tokenizer
    from eclens.sources.templates import generate_templates

    tokenizer = load_tokenizer("smollm2-135m")
    root = tmp_path_factory.mktemp("cmp")
    pairs = generate_templates(tokenizer, n_per_category=6, seed=0,  # 12 pairs: diff needs 10 for candidates
                               categories=["grammar/agreement", "meaning/subject"])
    recs = [p.to_dict() for p in pairs]
    # valid under both tokenizers' rules, but too long for the short-context model B
    recs.append({"id": "long-1", "clean": LONG, "corrupt": LONG.replace("keys", "key"),
                 "category": "grammar/agreement", "source": "test"})
    pf = root / "pairs.jsonl"
    pf.write_text("".join(json.dumps(r) + "\n" for r in recs))
    a = save_tiny_model(root / "model-a", n_layers=2, seed=0)
    b = save_tiny_model(root / "model-b", n_layers=4, seed=1, max_positions=24)
    runs = []
    for name, m in (("A", a), ("B", b)):
        run = root / name  # the steps whose tables ec compare reads: diff, and exact patching
        assert main(["diff", str(pf), "--out", str(run), "--model", str(m),
                     "--hooks", "default", "--sample", "64"]) == 0
        assert main(["patch", str(run), "--mode", "exact", "--model", str(m), "--hooks", "resid_pre",
                     "--max-pairs", "1", "--direction", "denoise"]) == 0
        # recovery and the probe (the panels on recovery.csv and probe.csv); invariance is not compared
        assert main(["measure", str(run), "--model", str(m), "--n-boot", "100", "--permutations", "1",
                     "--no-invariance", "--quiet"]) == 0
        runs.append(run)
    return runs


@pytest.mark.slow
def test_compare_page(two_runs, capsys):
    a, b = two_runs
    out = a.parent / "cmp-out"
    assert main(["compare", str(a), str(b), "--out", str(out)]) == 0
    page = (out / "compare.html").read_text()
    stdout = capsys.readouterr().out
    assert "compare.html" in stdout
    # the pair valid in A and too long for B is listed with B's reason; the rest is shared
    assert "long-1" in page and "rejected: too_long" in page
    n_a = sum(1 for _ in open(a / "pairs.jsonl"))
    assert f"{n_a - 1} pairs are valid in every run" in page
    for sid in ("runs", "pairs", "behaviour", "layers", "candidates", "recovery", "recovery_kl", "probe"):
        assert f'<section id="{sid}">' in page
    assert "layer / n_layers" in page


@pytest.mark.slow
def test_missing_table_is_skipped_and_said(two_runs, tmp_path):
    import shutil

    a, b = two_runs
    b2 = tmp_path / "B-no-patch"
    shutil.copytree(b, b2)
    (b2 / "patch_exact.csv").unlink()
    out = tmp_path / "page.html"
    assert main(["compare", str(a), str(b2), "--out", str(out)]) == 0
    page = out.read_text()
    assert '<section id="recovery">' not in page
    assert "skipped — Recovery by depth: missing patch_exact.csv" in page


def test_compare_refuses_bad_input(tmp_path, capsys):
    assert main(["compare", str(tmp_path)]) != 0
    assert main(["compare", str(tmp_path), str(tmp_path / "nope")]) != 0
    err = capsys.readouterr().err
    assert "not a run folder" in err or "at least two" in err


@pytest.mark.slow
def test_confound_stated(two_runs, tmp_path):
    import shutil

    from eclens.compare import compare_runs
    from eclens.gguf_models import CONFOUND

    runs = []
    for run, variant in zip(two_runs, ("base", "instruct")):
        dst = tmp_path / run.name
        shutil.copytree(run, dst)
        man = json.loads((dst / "manifest.json").read_text())
        man["model"]["variant"] = variant
        (dst / "manifest.json").write_text(json.dumps(man))
        runs.append(dst)
    page = compare_runs(runs, tmp_path / "c.html").read_text()
    assert "Confound" in page and CONFOUND.split(":")[0] in page


@pytest.mark.browser
@pytest.mark.slow
def test_compare_page_in_chromium(two_runs, tmp_path):
    from conftest import require
    from test_browser import ARGS, CHROMIUM

    require(CHROMIUM.exists(), f"{CHROMIUM} not found: bash scripts/setup.sh --browser")
    from playwright.sync_api import sync_playwright

    from eclens.compare import compare_runs

    page_path = compare_runs(two_runs, tmp_path / "compare.html")
    errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=ARGS)
        page = browser.new_page()
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.goto(Path(page_path).as_uri())
        page.wait_for_selector("body[data-rendered=true]", timeout=60_000)
        n_plots = page.evaluate("document.querySelectorAll('.js-plotly-plot').length")
        traces = page.evaluate("Array.from(document.querySelectorAll('.js-plotly-plot')).map(d => d.data.length)")
        browser.close()
    assert not errors, errors
    assert n_plots >= 5 and all(t >= 2 for t in traces)
