"""The self-contained report of a real run: sections, size, no network, escaping."""

from __future__ import annotations

import re

import pytest

from _viewruns import RUN_NAME, XSS_CATEGORY, XSS_CLEAN, real_run  # noqa: F401 - session fixture
from eclens.cli import main
from eclens.errors import EclensError
from eclens.report import RunData, build_report, glance
from eclens.summaries import contrasts_note


@pytest.fixture(scope="module")
def report_html(real_run):  # noqa: F811
    return (real_run.path / "report.html").read_text(encoding="utf-8")


def test_report_has_every_section_and_is_small(real_run, report_html):  # noqa: F811
    for sid in ("glance", "dataset", "layers", "candidates", "recovery", "causal", "contrasts", "examples",
                "manifest"):
        assert f'<section id="{sid}">' in report_html
    size = (real_run.path / "report.html").stat().st_size
    assert size < 4e6, f"report is {size / 1e6:.1f} MB"
    # plotly.js and circuitsvis are inlined once each, compressed; nothing is fetched
    assert report_html.count('id="lib-plotly"') == 1 and report_html.count('id="lib-circuitsvis"') == 1
    assert not re.search(r"<script[^>]+src=", report_html)
    assert "cdn.plot.ly" not in report_html and "unpkg.com" not in report_html
    assert not re.search(r"<link[^>]+href=\"?https?:", report_html)
    # figures and views are data for one boot script
    assert report_html.count('class="plot"') >= 8 and report_html.count('class="cv"') >= 3


def test_report_recovery_section(report_html):
    sec = report_html.split('<section id="recovery">', 1)[1].split("</section>", 1)[0]
    for words in ("Recovery index per category", "Ignore baseline", "error-invariant", "permutation null",
                  "Probe per layer", "Layer-0 check"):
        assert words in sec, words
    assert sec.count('class="plot"') == 2  # the recovery curves and the probe curve
    assert not re.search(r"\b(None|nan|NaN|undefined)\b", re.sub(r"<script.*?</script>", "", sec, flags=re.S))


def test_report_escapes_untrusted_text(report_html):
    assert XSS_CLEAN not in report_html
    assert "&lt;script&gt;alert(1)&lt;/script&gt; is here." in report_html
    assert XSS_CATEGORY not in report_html and "&lt;b onmouseover=alert(3)&gt;" in report_html
    assert RUN_NAME not in report_html and "demo&lt;img src=x onerror=alert(1)&gt;" in report_html
    # inside the JSON data blocks no "<" survives, so none can close its script element
    for block in re.findall(r'<script type="application/json" id="[^"]+">(.*?)</script>', report_html, re.S):
        assert "<" not in block


def test_glance_states_null_results(real_run):  # noqa: F811
    lines = glance(RunData(real_run.path))
    text = " ".join(lines)
    n_valid = len(real_run.pairs_file.read_text(encoding="utf-8").splitlines()) - 1  # one is rejected
    assert f"{n_valid} minimal pairs in 3 categories were run through smollm2-135m; 1 more was rejected" in text
    assert "change consistently little (stable)" in text and "Spearman ρ" in text
    assert " nats" in text and "% of the activation's norm" in text  # numbers carry units
    assert not re.search(r"\b(None|nan|NaN|null|undefined)\b(?! result)", text) and "{" not in text
    con = RunData(real_run.path).summary["contrasts"]
    if not sum((con.get("n_significant") or {}).values()):
        assert "a null result" in text


def test_contrasts_note_says_what_the_table_holds(real_run):  # noqa: F811
    rd = RunData(real_run.path)
    note = contrasts_note(rd)
    con = rd.summary["contrasts"]
    n_tests, n_sig = sum(con["n_tests"].values()), sum((con.get("n_significant") or {}).values())
    assert f"{n_tests} category contrasts were tested, one per (group pair, measure, hook, layer, offset)" in note
    assert f"{n_sig} are significant" in note
    n_rows_sig = int((rd.contrasts["q"] <= con["alpha"]).sum())
    assert f"The table holds {len(rd.contrasts)} rows" in note and f"({n_rows_sig} of them with q ≤" in note


def test_summaries_never_print_none_nan_or_json():
    from eclens.summaries import patch_blocks

    ps = {"dims": {"metric": "kl", "n_sets": 1, "n_pairs": 2, "n_controls": 8, "verdict": "null: no set beats it",
                   "sets": [{"set": "s", "direction": "denoise", "n_pairs": 2, "kl_effect": float("nan"),
                             "kl_control_mean": None, "kl_z": None, "kl_p": 0.5, "kl_q": 0.5, "verdict": "none"}]},
          "exact": {"metric": "logit_diff", "n_rows": 4, "n_pairs": 1, "top": [
              {"direction": "noise", "hook": "h", "layer": 1, "position_kind": "changed", "head": 3,
               "logit_diff_restored": None}]},
          "attribution": {"n_rows": 3, "n_verified": 3, "spearman": None},
          "future_mode": {"score": 1.5, "per_cell": [1, 2], "note": None}}
    blocks = {b.title: b for b in patch_blocks(ps)}
    text = " ".join(" ".join(b.sentences) + (b.table.to_csv() if b.table is not None else "") for b in blocks.values())
    assert not re.search(r"\b(None|nan|NaN|null)\b(?! result)", text) and "{" not in text
    assert blocks["Candidate dimension sets vs random sets"].sentences[0] == "A null result: no set beats it."
    assert list(blocks["Exact activation patching"].table["restored"]) == ["—"]
    assert "effect (nats)" in blocks["Candidate dimension sets vs random sets"].table.columns
    assert list(blocks["Patching: future_mode"].table["quantity"]) == ["score", "note"]


def test_report_without_model_and_uncompressed(real_run, tmp_path):  # noqa: F811
    out = build_report(real_run.path, tmp_path / "r.html", pair_views=False, compress=False)
    html = out.read_text(encoding="utf-8")
    assert "Per-pair activation views are not included" in html
    assert 'id="lib-plotly"' not in html and "gzip-base64" not in html
    assert html.count("</script>") == html.count("<script")  # every inline bundle stays one element
    # no attention views without the model, so the circuitsvis bundle is left out
    assert "var CircuitsVis=" not in html


def test_ec_report_cli(real_run, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "cli.html"
    assert main(["report", str(real_run.path), "--out", str(out), "--no-pair-views", "--examples", "2"]) == 0
    assert out.is_file() and f"report: {out}" in capsys.readouterr().out
    assert out.read_text(encoding="utf-8").count('class="pair"') == 2


def test_report_bad_input(tmp_path, capsys):
    with pytest.raises(EclensError, match="no such run folder"):
        build_report(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(EclensError, match="not a run folder"):
        build_report(tmp_path / "empty")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "manifest.json").write_text("{not json", encoding="utf-8")
    assert main(["report", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "manifest.json" in err and "Traceback" not in err


def test_tokens_without_the_model_come_from_the_exact_map(real_run, tokenizer):  # noqa: F811
    rd = RunData(real_run.path)
    pid = rd.exact_pair_ids()[0]
    want = [tokenizer.decode([i]) for i in rd.pairs_by_id[pid]["clean_ids"]]
    assert rd.pair_tokens(pid) == want
