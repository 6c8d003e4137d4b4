"""`ec serve`: the JSON API over a real run, path safety, read-only, headers."""

from __future__ import annotations

import csv
import http.client
import io
import json
import os
import threading
from urllib.parse import quote

import pytest

from _viewruns import RUN_NAME, XSS_CLEAN, XSS_ID, real_run  # noqa: F401 - session fixture
from eclens.errors import EclensError
from eclens.tables import read_table_file
from eclens.web.server import NotFound, make_server, safe_segment, url_of

Q = quote(RUN_NAME, safe="")


@pytest.fixture(scope="module")
def server(real_run, tmp_path_factory):  # noqa: F811
    root = real_run.runs_dir
    # Things that must stay invisible: a file next to RUNS_DIR, a symlinked run pointing
    # outside it, and a run whose table is a symlink to a file outside it.
    outside = tmp_path_factory.mktemp("outside")
    (outside / "secret.csv").write_text("secret,1\nleak,2\n", encoding="utf-8")
    (outside / "manifest.json").write_text("{}", encoding="utf-8")
    (root.parent / "next-to-runs.txt").write_text("secret", encoding="utf-8")
    link_run = root / "linked-out"
    if not link_run.exists():
        os.symlink(outside, link_run)
    leaky = root / "leaky"
    leaky.mkdir(exist_ok=True)
    (leaky / "manifest.json").write_text("{}", encoding="utf-8")
    if not (leaky / "candidates.csv").exists():
        os.symlink(outside / "secret.csv", leaky / "candidates.csv")
    # the server's own loader: the run's manifest names the embedded model, checked by weights hash
    srv = make_server(root, "127.0.0.1", 0, quiet=True)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def get(srv, path, method="GET", headers=None):
    host, port = srv.server_address[:2]
    c = http.client.HTTPConnection(host, port, timeout=120)
    c.request(method, path, headers=headers or {})
    r = c.getresponse()
    body = r.read()
    c.close()
    return r.status, dict(r.getheaders()), body


def get_json(srv, path):
    status, headers, body = get(srv, path)
    assert status == 200, (path, status, body[:300])
    assert headers["Content-Type"].startswith("application/json")
    return json.loads(body)


def test_runs_and_overview(server, real_run):  # noqa: F811
    runs = get_json(server, "/api/runs")["runs"]
    names = [r["name"] for r in runs]
    assert RUN_NAME in names and "leaky" in names and "linked-out" not in names
    r = next(r for r in runs if r["name"] == RUN_NAME)
    n_valid = len((real_run.path / "pairs.jsonl").read_text(encoding="utf-8").splitlines())
    assert r["n_pairs"] == n_valid and r["n_rejected"] == 1 and r["has_report"]
    ov = get_json(server, f"/api/runs/{Q}")
    assert ov["manifest"]["model"]["n_layers"] == 30
    assert set(ov["hooks"]) == {"hook_resid_post", "hook_attn_out"}
    assert {"candidates", "layers", "patch_dims", "patch_exact"} <= set(ov["tables"])
    assert ov["has_dims"] and len(ov["exact_pairs"]) == 1


def test_pairs_filter_and_search(server, real_run):  # noqa: F811
    recs = [json.loads(line) for line in (real_run.path / "pairs.jsonl").read_text(encoding="utf-8").splitlines()]
    all_ = get_json(server, f"/api/runs/{Q}/pairs")
    assert all_["total"] == len(recs)
    agr = get_json(server, f"/api/runs/{Q}/pairs?category=grammar%2Fagreement")
    n_agr = sum(r["category"] == "grammar/agreement" for r in recs)
    assert n_agr and agr["total"] == n_agr and {p["category"] for p in agr["pairs"]} == {"grammar/agreement"}
    hit = get_json(server, f"/api/runs/{Q}/pairs?q=ALERT%281")
    assert [p["id"] for p in hit["pairs"]] == [XSS_ID]
    page = get_json(server, f"/api/runs/{Q}/pairs?limit=4&offset=8")
    assert len(page["pairs"]) == min(4, len(recs) - 8) and page["total"] == len(recs)
    status, _, body = get(server, f"/api/runs/{Q}/pairs?limit=abc")
    assert status == 400 and b"not an integer" in body


def test_one_pair_with_views(server, real_run):  # noqa: F811
    d = get_json(server, f"/api/runs/{Q}/pairs/{XSS_ID}?layer=2")
    assert d["pair"]["clean"] == XSS_CLEAN and d["layer"] == 2 and d["n_layers"] == 30
    T = d["pair"]["length"]
    assert len(d["clean_tokens"]) == T and len(d["kl"]) == T
    att = d["attention"]["clean"]
    assert len(att["attention"]) == 9 and len(att["attention"][0]) == T and att["tokens"] == d["clean_tokens"]
    assert len(d["figures"]["diff"]["data"]) == 1
    exact_id = get_json(server, f"/api/runs/{Q}")["exact_pairs"][0]
    e = get_json(server, f"/api/runs/{Q}/pairs/{exact_id}")
    assert {"patch_denoise", "patch_noise", "diff", "curve"} <= set(e["figures"])
    assert get(server, f"/api/runs/{Q}/pairs/nope")[0] == 404
    assert get(server, f"/api/runs/{Q}/pairs/{XSS_ID}?layer=30")[0] == 400


def test_candidates_json_and_csv(server, real_run):  # noqa: F811
    want = read_table_file(real_run.path / "candidates.parquet")
    j = get_json(server, f"/api/runs/{Q}/candidates?limit=100000")
    assert j["total"] == len(want) and j["columns"] == list(want.columns)
    st = get_json(server, f"/api/runs/{Q}/candidates?kind=stable&hook=hook_attn_out")
    assert st["total"] == int(((want["kind"] == "stable") & (want["hook"] == "hook_attn_out")).sum())
    status, headers, body = get(server, f"/api/runs/{Q}/candidates.csv?kind=responsive")
    assert status == 200 and headers["Content-Type"].startswith("text/csv")
    assert "attachment" in headers["Content-Disposition"] and "<" not in headers["Content-Disposition"]
    rows = list(csv.DictReader(io.StringIO(body.decode())))
    assert len(rows) == int((want["kind"] == "responsive").sum()) and {r["kind"] for r in rows} == {"responsive"}


def test_long_tables_are_paged_and_sorted_by_the_server(server, real_run):  # noqa: F811
    want = read_table_file(real_run.path / "candidates.parquet")
    first = get_json(server, f"/api/runs/{Q}/candidates")
    assert first["total"] == len(want) and len(first["rows"]) == min(100, len(want)) and first["start"] == 0
    by = want.sort_values("absz_median", ascending=False, kind="stable")
    page = get_json(server, f"/api/runs/{Q}/candidates?sort=absz_median&desc=1&start=5&limit=7")
    assert [r["dim"] for r in page["rows"]] == list(by["dim"].iloc[5:12])
    assert [r["absz_median"] for r in page["rows"]] == pytest.approx(list(by["absz_median"].iloc[5:12]))
    asc = get_json(server, f"/api/runs/{Q}/candidates?kind=stable&sort=absz_q90&limit=3")
    st = want[want["kind"] == "stable"].sort_values("absz_q90", kind="stable")
    assert asc["total"] == len(st) and [r["absz_q90"] for r in asc["rows"]] == pytest.approx(list(st["absz_q90"][:3]))
    at1 = get_json(server, f"/api/runs/{Q}/candidates?offset=1&limit=100000")  # a column filter, not paging
    assert at1["total"] == int((want["offset"] == 1).sum()) and {r["offset"] for r in at1["rows"]} <= {1}
    status, _, body = get(server, f"/api/runs/{Q}/candidates?sort=nope")
    assert status == 400 and b"no column 'nope'" in body


def test_overview_says_it_in_words(server, real_run):  # noqa: F811
    ov = get_json(server, f"/api/runs/{Q}")
    assert ov["glance"] and all(isinstance(x, str) and "{" not in x for x in ov["glance"])
    blocks = {b["title"]: b for b in ov["causal_summary"]}
    ex = blocks["Exact activation patching"]
    assert ex["table"]["columns"] == ["direction", "hook", "layer", "position", "head", "restored"]
    assert all(r["restored"].endswith(" %") for r in ex["table"]["rows"])
    assert "Candidate dimension sets vs random sets" in blocks
    assert "The table holds" in ov["contrasts_note"]


def test_figures(server, real_run):  # noqa: F811
    for name in ("layer_offset", "category_curves", "layer_dims", "attribution"):
        fig = get_json(server, f"/api/runs/{Q}/figures/{name}?hook=hook_resid_post")
        assert fig["data"], name
    assert get_json(server, f"/api/runs/{Q}/figures/controls")["figures"]
    assert get(server, f"/api/runs/{Q}/figures/nope")[0] == 404


def test_recovery_tab(server, real_run):  # noqa: F811
    ov = get_json(server, f"/api/runs/{Q}")
    assert ov["has_measure"] and {"recovery_index", "probe"} <= set(ov["tables"])
    d = get_json(server, f"/api/runs/{Q}/measure")
    titles = [t["title"] for t in d["tables"]]
    assert titles[0].startswith("Recovery index per category") and "Probe per layer" in titles
    assert any("error-invariant" in x for x in d["sentences"]) and len(d["figures"]) == 2
    assert all(f["figure"]["data"] for f in d["figures"])
    status, headers, body = get(server, f"/api/runs/{Q}/recovery_index.csv")
    assert status == 200 and body.decode().startswith("category,measure,offset,estimate,low,high")
    assert any("Recovery index at the last token" in x for x in ov["glance"])


def test_static_assets_and_report(server):
    for path, ctype in (("/", "text/html"), ("/static/app.js", "text/javascript"), ("/favicon.ico", "image/svg"),
                        ("/static/plotly.min.js", "text/javascript"), ("/static/circuitsvis.js", "text/javascript")):
        status, headers, body = get(server, path)
        assert status == 200 and headers["Content-Type"].startswith(ctype), path
        assert headers["X-Content-Type-Options"] == "nosniff"
        assert "script-src 'self'" in headers["Content-Security-Policy"]
    status, headers, body = get(server, f"/runs/{Q}/report.html")
    assert status == 200 and b"eclens report" in body and "connect-src 'none'" in headers["Content-Security-Policy"]


@pytest.mark.parametrize("path", [
    "/../../etc/passwd",
    "/static/../../pyproject.toml",
    "/static/..%2f..%2fpyproject.toml",
    "/static/%2e%2e%2f%2e%2e%2fpyproject.toml",
    "/static/%252e%252e%252fpyproject.toml",
    "/static/%25252e%25252e%25252fpyproject.toml",
    "/static//etc/passwd",
    "//etc/passwd",
    "/static/%2Fetc%2Fpasswd",
    "/api/runs/..",
    "/api/runs/%2e%2e",
    "/api/runs/%2e%2e/next-to-runs.txt",
    "/api/runs/..%2fnext-to-runs.txt/candidates",
    "/api/runs/%252e%252e/candidates",
    "/api/runs/%2Ftmp/candidates",
    "/api/runs/.hidden",
    "/api/runs/..%5c..%5cetc",
    "/api/runs/a%00b",
    "/runs/../next-to-runs.txt",
    "/runs/%2e%2e/report.html",
    "/api/runs/linked-out",
    "/api/runs/linked-out/candidates.csv",
    "/api/runs/leaky/candidates.csv",
    "/api/runs/leaky/candidates",
    "/api/runs/no-such-run",
    "/static/server.py",
    "/api/nope",
])
def test_paths_outside_runs_dir_are_404(server, path):
    status, _, body = get(server, path)
    assert status == 404, (path, body[:200])
    assert b"secret" not in body and b"leak" not in body and b"root:" not in body


def test_read_only_and_host_checked(server):
    for method in ("POST", "PUT", "DELETE"):
        status, headers, _ = get(server, "/api/runs", method=method)
        assert status == 405 and headers["Allow"] == "GET, HEAD"
    status, _, _ = get(server, "/api/runs", headers={"Host": "evil.example:5000"})
    assert status == 421
    status, _, body = get(server, "/api/runs", method="HEAD")
    assert status == 200 and body == b""


def test_safe_segment():
    assert safe_segment("run%20one") == "run one"
    assert safe_segment("demo%3Cimg%3E") == "demo<img>"
    for bad in ("..", "%2e%2e", "%252e%252e", "a%2fb", "a%5cb", ".git", "", "%00"):
        with pytest.raises(NotFound):
            safe_segment(bad)


def test_make_server_bad_input(tmp_path):
    with pytest.raises(EclensError, match="no such folder"):
        make_server(tmp_path / "missing", "127.0.0.1", 0)
    srv = make_server(tmp_path, "127.0.0.1", 0, quiet=True)
    try:
        with pytest.raises(EclensError, match="cannot listen"):
            make_server(tmp_path, "127.0.0.1", srv.server_address[1])
        assert url_of(srv).startswith("http://127.0.0.1:")
    finally:
        srv.server_close()


def test_ec_serve_says_it_binds_loopback(tmp_path):
    import subprocess
    import sys
    import time

    proc = subprocess.Popen([sys.executable, "-m", "eclens", "serve", str(tmp_path), "--port", "0", "--no-model"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "COLUMNS": "200"})
    try:
        lines = []
        end = time.monotonic() + 60
        while time.monotonic() < end:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "JSON API" in line:
                break
        text = "".join(lines)
        assert "serving 0 run(s)" in text and "http://127.0.0.1:" in text
        assert "bound to loopback only" in text
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.slow
def test_ec_serve_loads_the_runs_own_model(tmp_path):
    """`ec serve` without --no-model: the per-pair view loads the model the manifest names (a saved
    tiny model folder here) and refuses one whose weights differ from the run's."""
    import shutil
    import subprocess
    import sys
    import time

    import torch

    from eclens.model import load_model, save_tiny_model
    from eclens.pairs import write_jsonl
    from eclens.pipeline import RunConfig, run_pipeline
    from eclens.sources.templates import generate_templates

    torch.set_grad_enabled(False)
    folder = save_tiny_model(tmp_path / "tiny-llama", max_positions=64)
    model = load_model(str(folder))
    pairs = generate_templates(model.tokenizer, n_per_category=2, seed=0, categories=["grammar/agreement"])
    write_jsonl(tmp_path / "pairs.jsonl", [p.to_dict() for p in pairs])
    runs = tmp_path / "runs"
    cfg = RunConfig(pairs_file=str(tmp_path / "pairs.jsonl"), hooks="hook_resid_post", min_pairs=1, exact_pairs=1,
                    dims_pairs=2, max_sets=1, n_controls=4, attribution_pairs=1, verify_top=1, report_examples=1)
    run_pipeline(runs / "tiny", model, cfg, log=lambda s: None, progress=False)
    # the same run with another model's weights hash: its views must be refused, not drawn
    shutil.copytree(runs / "tiny", runs / "other-weights")
    man = json.loads((runs / "other-weights" / "manifest.json").read_text())
    man["model"]["weights_hash"] = "0123456789abcdef"
    (runs / "other-weights" / "manifest.json").write_text(json.dumps(man))
    pid = pairs[0].id

    proc = subprocess.Popen([sys.executable, "-m", "eclens", "serve", str(runs), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "COLUMNS": "200"})
    try:
        url, end = None, time.monotonic() + 120
        while time.monotonic() < end and url is None:
            line = proc.stdout.readline()
            if not line:
                break
            url = next((w for w in line.split() if w.startswith("http://127.0.0.1:")), None)
        assert url, "ec serve printed no URL"
        threading.Thread(target=proc.stdout.read, daemon=True).start()
        host, port = url.split("//")[1].rstrip("/").split(":")
        srv = type("S", (), {"server_address": (host, int(port))})

        d = get_json(srv, f"/api/runs/tiny/pairs/{quote(pid, safe='')}?layer=1")
        assert "views_error" not in d, d.get("views_error")
        assert d["layer"] == 1 and d["n_layers"] == 2 and len(d["kl"]) == d["pair"]["length"]
        assert len(d["attention"]["clean"]["attention"]) == 4  # heads of the tiny model
        assert d["figures"]["diff"]["data"]
        bad = get_json(srv, f"/api/runs/other-weights/pairs/{quote(pid, safe='')}")
        assert "do not match" in bad["views_error"] and "attention" not in bad
    finally:
        proc.terminate()
        proc.wait(timeout=30)
