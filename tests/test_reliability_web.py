"""`ec serve` under attack and under load: path traversal (encoded, double-encoded, absolute,
symlinks out of RUNS_DIR), script injection through sentences, categories, ids and run
names, the loopback binding, and a bounded load test (scripts/load_test.py) with zero errors.

The run is real: `ec run`'s steps with the tiny random-weight model over template pairs
plus hostile ones, in a run folder with a hostile name; the server is `ec serve` in a
child process, exactly as a user starts it.
"""

from __future__ import annotations

import html
import http.client
import importlib.util
import json
import os
import sys
from pathlib import Path
from urllib.parse import quote

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("load_test", ROOT / "scripts" / "load_test.py")
load_test = importlib.util.module_from_spec(_spec)
sys.modules["load_test"] = load_test  # dataclasses look their module up there
_spec.loader.exec_module(load_test)

RUN = "run\"'><img src=x onerror=alert('run')>"
XSS_CLEAN = "</script><script>alert(1)</script> is here."   # a single-token change: 1 -> 2
XSS_CORRUPT = "</script><script>alert(2)</script> is here."
XSS_CATEGORY = "<svg onload=alert('cat')>"
XSS_ID = "\"><img src=x onerror=alert('id')>"
SECRET = "TOP-SECRET-OUTSIDE-RUNS-DIR"
HOSTILE_STRINGS = [XSS_CLEAN, XSS_CORRUPT, XSS_CATEGORY, XSS_ID, RUN, "<script>alert(", "<img src=x", "<svg onload"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("web")
    root = base / "runs"
    load_test.make_demo_run(root / RUN, extra_pairs=[
        {"id": XSS_ID, "clean": XSS_CLEAN, "corrupt": XSS_CORRUPT, "category": XSS_CATEGORY, "source": "test"}],
        n_per_category=2)
    # Outside RUNS_DIR: files that must never be served, and ways that point at them.
    outside = base / "outside"
    outside.mkdir()
    for name in ("manifest.json", "pairs.jsonl", "candidates.csv", "report.html", "secret.txt"):
        body = {"manifest.json": json.dumps({"secret": SECRET}),
                "pairs.jsonl": json.dumps({"id": SECRET, "clean": SECRET, "corrupt": SECRET}) + "\n"}.get(
                    name, f"{SECRET}\n")
        (outside / name).write_text(body, encoding="utf-8")
    (base / "next-to-runs.txt").write_text(SECRET, encoding="utf-8")
    os.symlink(outside, root / "escape-link")                 # a run folder that is a link out
    leaky = root / "leaky"                                    # a run whose files are links out
    leaky.mkdir()
    (leaky / "manifest.json").write_text("{}", encoding="utf-8")
    for name in ("pairs.jsonl", "candidates.csv", "report.html"):
        os.symlink(outside / name, leaky / name)
    broken = root / "broken"                                  # a run whose manifest was cut short
    broken.mkdir()
    (broken / "manifest.json").write_text('{"eclens_version": "0.1', encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def served(runs):
    srv = load_test.start_server(runs)
    yield srv
    log = srv.stop()
    assert "Traceback" not in log, log[-3000:]


def request(served, path: str, method: str = "GET", headers: dict | None = None):
    host, port = served.url.split("//")[1].rstrip("/").rsplit(":", 1)
    c = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        c.request(method, path, headers=headers or {})  # sent as given: http.client does not normalise paths
        r = c.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        c.close()


# ---------------------------------------------------------------------------- binding


def test_binds_loopback_and_says_so(served):
    assert served.url.startswith("http://127.0.0.1:")
    assert "bound to loopback only" in served.banner
    port = int(served.url.rstrip("/").rsplit(":", 1)[1])
    tcp = Path("/proc/net/tcp")
    if tcp.exists():  # the listening socket's local address is 127.0.0.1, not 0.0.0.0
        listening = [ln.split()[1] for ln in tcp.read_text().splitlines()[1:] if ln.split()[3] == "0A"]
        assert f"0100007F:{port:04X}" in listening and f"00000000:{port:04X}" not in listening
    # A request naming another host (DNS rebinding) is refused.
    status, _, _ = request(served, "/api/runs", headers={"Host": "attacker.example"})
    assert status == 421


def test_load_test_refuses_other_hosts():
    with pytest.raises(SystemExit, match="loopback"):
        load_test.run_load("http://10.1.2.3:5000/", [("x", "/", 200)], 1, 1)
    assert load_test.is_loopback_url("http://[::1]:80/") and not load_test.is_loopback_url("http://example.com/")


# ---------------------------------------------------------------------------- traversal

TRAVERSAL = [
    "/../../etc/passwd",
    "/static/../../../pyproject.toml",
    "/static/..%2f..%2f..%2fpyproject.toml",
    "/static/%2e%2e%2f%2e%2e%2fpyproject.toml",
    "/static/%252e%252e%252f%252e%252e%252fpyproject.toml",          # double-encoded
    "/static/%25252e%25252e%25252fpyproject.toml",                    # triple-encoded
    "/static/%c0%ae%c0%ae%c0%afpyproject.toml",                       # overlong UTF-8 dots
    "/static/..%5c..%5cpyproject.toml",
    "/static/.%2e/.%2e/pyproject.toml",
    "/api/runs/%2e%2e/next-to-runs.txt",
    "/api/runs/%252e%252e/candidates",
    "/api/runs/..%2f..%2fnext-to-runs.txt/candidates",
    "/runs/%2e%2e/next-to-runs.txt",
    "/runs/%2e%2e%2foutside/report.html",
    # absolute paths
    "//etc/passwd",
    "/static//etc/passwd",
    "/static/%2Fetc%2Fpasswd",
    "/api/runs/%2Fetc%2Fpasswd/candidates",
    "/api/runs/%2F..%2Foutside/candidates.csv",
    "http://127.0.0.1/../../etc/passwd",                              # absolute-form request target
    # symlinks out of RUNS_DIR
    "/api/runs/escape-link",
    "/api/runs/escape-link/candidates.csv",
    "/api/runs/escape-link/pairs",
    "/runs/escape-link/report.html",
    "/api/runs/leaky/candidates",
    "/api/runs/leaky/candidates.csv",
    "/runs/leaky/report.html",
]


@pytest.mark.parametrize("path", TRAVERSAL)
def test_traversal_is_404_and_leaks_nothing(served, path):
    status, headers, body = request(served, path)
    assert status == 404, (path, status, body[:200])
    assert SECRET.encode() not in body and b"root:" not in body and b"[project]" not in body
    assert headers["content-type"].startswith("application/json")


def test_symlinked_runs_are_invisible_and_linked_files_unread(served):
    status, _, body = request(served, "/api/runs")
    assert status == 200 and SECRET.encode() not in body
    runs = {r["name"]: r for r in json.loads(body)["runs"]}
    assert "escape-link" not in runs and RUN in runs
    assert runs["leaky"]["n_pairs"] == 0 and not runs["leaky"]["has_report"]
    status, _, body = request(served, "/api/runs/leaky/pairs")
    assert status == 200 and json.loads(body)["total"] == 0 and SECRET.encode() not in body


# ---------------------------------------------------------------------------- injection


def test_hostile_text_is_json_data_never_markup(served):
    q = quote(RUN, safe="")
    status, headers, body = request(served, f"/api/runs/{q}/pairs?limit=1000")
    assert status == 200
    assert headers["content-type"] == "application/json; charset=utf-8"
    assert headers["x-content-type-options"] == "nosniff"
    assert "script-src 'self'" in headers["content-security-policy"] and "unsafe-inline" not in \
        headers["content-security-policy"].split("script-src", 1)[1].split(";", 1)[0]
    pairs = {p["id"]: p for p in json.loads(body)["pairs"]}
    # The data arrives intact (as text) ...
    assert pairs[XSS_ID]["clean"] == XSS_CLEAN and pairs[XSS_ID]["category"] == XSS_CATEGORY
    # ... and one pair's page data too.
    status, headers, body = request(served, f"/api/runs/{q}/pairs/{quote(XSS_ID, safe='')}")
    assert status == 200 and headers["content-type"].startswith("application/json")
    assert json.loads(body)["pair"]["corrupt"] == XSS_CORRUPT


def test_pages_hold_no_data_and_the_ui_never_parses_it_as_html(served):
    for path in ("/", "/static/app.js"):
        status, _, body = request(served, path)
        assert status == 200
        text = body.decode("utf-8")
        assert not [s for s in HOSTILE_STRINGS if s in text]
    js = (ROOT / "src" / "eclens" / "web" / "static" / "app.js").read_text(encoding="utf-8")
    code = "\n".join(ln for ln in js.splitlines() if not ln.strip().startswith("//"))
    for sink in (".innerHTML", ".outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
        assert sink not in code, f"app.js uses {sink}: data could become markup"


def test_report_page_escapes_hostile_text(served):
    status, headers, body = request(served, f"/runs/{quote(RUN, safe='')}/report.html")
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert "connect-src 'none'" in headers["content-security-policy"]
    text = body.decode("utf-8")
    leaked = [s for s in HOSTILE_STRINGS if s in text]
    assert not leaked, leaked
    assert html.escape(XSS_CATEGORY) in text or html.escape(XSS_CATEGORY, quote=False) in text


def test_downloads_and_errors_do_not_reflect_markup(served):
    q = quote(RUN, safe="")
    status, headers, body = request(served, f"/api/runs/{q}/candidates.csv")
    assert status == 200 and headers["content-type"].startswith("text/csv")
    disp = headers["content-disposition"]
    assert disp.startswith('attachment; filename="') and not set(disp[22:-1]) & set("<>\"'\r\n;/\\")
    for path in (f"/api/runs/{quote('<script>alert(1)</script>', safe='')}",
                 f"/api/runs/{q}/pairs?limit=%3Cscript%3Ealert(1)%3C/script%3E",
                 f"/api/runs/{q}/pairs?offset=-1<img>"):
        status, headers, body = request(served, path)
        assert status in (400, 404) and headers["content-type"].startswith("application/json"), path
        assert headers["x-content-type-options"] == "nosniff"


# ---------------------------------------------------------------------------- load


def test_load_300_requests_at_20_concurrent(served):
    targets = load_test.discover(served.url)
    labels = {t[0] for t in targets}
    assert {"api runs", "api pairs", "api one pair", "api table candidates", "page report.html",
            "api figure layer_offset", "traversal probe"} <= labels
    res = load_test.run_load(served.url, targets, n_requests=300, concurrency=20)
    print("\n".join(res.lines()))
    assert res.requests == 300 and res.errors == 0, res.error_samples
    # every kind of request was made and answered as it should (traversal probes with 404)
    assert set(res.endpoints) == labels and all(v["n"] >= 300 // len(targets) and v["errors"] == 0
                                                for v in res.endpoints.values()), res.endpoints
    # a full listen backlog shows as SYN retries (1, 3, 7, 15 s; measured max 55 s at 50 clients)
    # and a hung handler as the 60 s client timeout; measured here on a 2-core box at load
    # average 17: p99 2.2 s, max 2.8 s
    assert res.max_ms < 15_000, res.lines()


def test_listen_backlog_takes_a_burst_of_clients(tmp_path):
    """socketserver's default backlog of 5 made the 6th simultaneous client wait for a SYN retry
    (1, 3, 7, ... s): measured p99 4.4 s and max 55 s at 50 concurrent before, 1.0 s / 1.8 s after."""
    import socket as so

    from eclens.web.server import make_server

    srv = make_server(tmp_path, "127.0.0.1", 0, quiet=True)
    try:
        assert srv.request_queue_size >= min(128, so.SOMAXCONN)
    finally:
        srv.server_close()


def test_one_unreadable_run_does_not_hide_the_others(served):
    status, _, body = request(served, "/api/runs")
    assert status == 200
    runs = {r["name"]: r for r in json.loads(body)["runs"]}
    assert RUN in runs and "leaky" in runs and "error" not in runs[RUN]
    assert "manifest.json: not valid JSON" in runs["broken"]["error"] and runs["broken"]["steps"] == []
    status, headers, body = request(served, "/api/runs/broken")
    assert status == 422 and headers["content-type"].startswith("application/json")
    assert "manifest.json: not valid JSON" in json.loads(body)["error"]
