"""A bounded load test of `ec serve` over loopback: the JSON API, pages and assets.

Starts ``ec serve RUNS_DIR --port 0 --no-model`` as a child process on 127.0.0.1 (or
uses ``--url`` of a server already running on a loopback address; anything else is
refused), finds the run-specific URLs through the API, then sends ``--requests``
requests from ``--concurrency`` threads (stdlib ``http.client``, one connection per
request, as the server speaks HTTP/1.0) and reports the error count and latency
quantiles, overall and per endpoint. Deliberate path-traversal probes are part of the
mix and count as errors unless they get a 404.

    python scripts/load_test.py RUNS_DIR --requests 2000 --concurrency 50
    python scripts/load_test.py --demo --requests 2000 --concurrency 50 --json load.json

``--demo`` first makes a small real run (template pairs, then `ec run`'s steps with the
tiny random-weight model) in a temporary folder, so the script needs no run of yours.
"""

from __future__ import annotations

import argparse
import http.client
import ipaddress
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import quote, urlsplit

TRAVERSAL_PROBES = [  # each must be a 404
    "/../../etc/passwd",
    "/static/..%2f..%2fpyproject.toml",
    "/static/%252e%252e%252fpyproject.toml",
    "/api/runs/%2e%2e/manifest.json",
    "/api/runs/%2Fetc/candidates",
    "/runs/..%5c..%5cetc/report.html",
]


# ----------------------------------------------------------------------------- server


def is_loopback_url(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class Served:
    url: str
    proc: subprocess.Popen | None
    banner: str
    log: Path | None

    def stop(self) -> str:
        """Stop the child server; returns its request log/stderr."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        return self.log.read_text(encoding="utf-8", errors="replace") if self.log else ""


def start_server(runs_dir: Path, timeout: float = 120.0) -> Served:
    """``ec serve RUNS_DIR --port 0 --no-model`` in a child process; waits for its banner."""
    log = Path(tempfile.mkstemp(prefix="ec-serve-", suffix=".log")[1])
    env = {**os.environ, "COLUMNS": "400", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "eclens", "serve", str(runs_dir), "--port", "0", "--no-model"],
                            stdout=subprocess.PIPE, stderr=open(log, "w"), text=True, env=env)  # noqa: SIM115
    lines: list[str] = []
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if "JSON API" in line:
            break
    banner = "".join(lines)
    m = re.search(r"(http://\S+?/)(?:\s|$)", banner)
    if not m:
        proc.kill()
        raise RuntimeError(f"`ec serve` did not start:\n{banner}\n{log.read_text()[-3000:]}")
    # Drain stdout in the background so the child never blocks on a full pipe.
    threading.Thread(target=proc.stdout.read, daemon=True).start()
    return Served(m.group(1), proc, banner, log)


# ---------------------------------------------------------------------------- requests


def fetch(base: str, path: str, timeout: float = 60.0) -> tuple[int, bytes, dict]:
    u = urlsplit(base)
    c = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    try:
        c.request("GET", path)
        r = c.getresponse()
        body = r.read()
        return r.status, body, dict(r.getheaders())
    finally:
        c.close()


def discover(base: str, max_runs: int = 3) -> list[tuple[str, str, int]]:
    """``(endpoint label, path, expected status)`` over the API, pages and assets of up to ``max_runs`` runs."""
    targets = [("page /", "/", 200), ("static app.js", "/static/app.js", 200),
               ("static style.css", "/static/style.css", 200), ("favicon", "/favicon.ico", 200),
               ("api runs", "/api/runs", 200)]
    status, body, _ = fetch(base, "/api/runs")
    if status != 200:
        raise RuntimeError(f"/api/runs answered {status}")
    n = 0
    for run in json.loads(body)["runs"]:
        q = quote(run["name"], safe="")
        r = f"/api/runs/{q}"
        st, b, _ = fetch(base, r)
        if run.get("error") or st != 200:  # an unreadable run: listed with its error, not load-tested
            continue
        n += 1
        if n > max_runs:
            break
        ov = json.loads(b)
        targets.append(("api run overview", r, 200))
        targets.append(("api pairs", f"{r}/pairs?limit=50", 200))
        targets.append(("api pairs search", f"{r}/pairs?q=the&limit=20", 200))
        st, b, _ = fetch(base, f"{r}/pairs?limit=1")
        pairs = json.loads(b).get("pairs", []) if st == 200 else []
        if pairs:
            targets.append(("api one pair", f"{r}/pairs/{quote(str(pairs[0]['id']), safe='')}", 200))
        for t in ov.get("tables", []):
            targets.append((f"api table {t}", f"{r}/{t}?limit=200", 200))
            targets.append(("api table csv", f"{r}/{t}.csv", 200))
        if "layers" in ov.get("tables", []):
            targets.append(("api figure layer_offset", f"{r}/figures/layer_offset", 200))
            targets.append(("api figure category_curves", f"{r}/figures/category_curves", 200))
        if ov.get("has_report"):
            targets.append(("page report.html", f"/runs/{q}/report.html", 200))
    targets += [("traversal probe", p, 404) for p in TRAVERSAL_PROBES]
    return targets


@dataclass
class LoadResult:
    url: str
    requests: int
    concurrency: int
    errors: int
    seconds: float
    requests_per_second: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    bytes: int
    endpoints: dict = field(default_factory=dict)
    error_samples: list = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [f"{self.requests} requests at concurrency {self.concurrency} against {self.url}: "
               f"{self.errors} errors, {self.seconds:.1f} s ({self.requests_per_second:.0f} req/s), "
               f"latency p50 {self.p50_ms:.1f} ms, p90 {self.p90_ms:.1f} ms, p99 {self.p99_ms:.1f} ms, "
               f"max {self.max_ms:.1f} ms, {self.bytes / 2**20:.1f} MiB received"]
        w = max((len(k) for k in self.endpoints), default=10)
        out.append(f"{'endpoint':<{w}}  {'n':>5}  {'errors':>6}  {'p50 ms':>8}  {'p99 ms':>8}")
        for k, v in sorted(self.endpoints.items()):
            out.append(f"{k:<{w}}  {v['n']:>5}  {v['errors']:>6}  {v['p50_ms']:>8.1f}  {v['p99_ms']:>8.1f}")
        out += [f"error: {e}" for e in self.error_samples]
        return out


def quantile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


def run_load(base: str, targets: list[tuple[str, str, int]], n_requests: int = 2000, concurrency: int = 50,
             timeout: float = 60.0) -> LoadResult:
    """Send ``n_requests`` (round-robin over ``targets``) from ``concurrency`` threads; loopback only."""
    if not is_loopback_url(base):
        raise SystemExit(f"{base}: the load test only runs against a loopback address (127.0.0.1, ::1, localhost)")
    if n_requests < 1 or concurrency < 1:
        raise SystemExit("--requests and --concurrency must be at least 1")
    lat: list[float] = [0.0] * n_requests
    ok: list[bool] = [False] * n_requests
    size: list[int] = [0] * n_requests
    errs: list[str] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        label, path, want = targets[i % len(targets)]
        t0 = time.perf_counter()
        try:
            status, body, _ = fetch(base, path, timeout)
            good = status == want
            why = None if good else f"{path}: HTTP {status} (want {want}) {body[:120]!r}"
        except Exception as e:  # noqa: BLE001 - every failure is counted, none stops the test
            status, body, good, why = 0, b"", False, f"{path}: {type(e).__name__}: {e}"
        lat[i] = time.perf_counter() - t0
        ok[i] = good
        size[i] = len(body)
        if why:
            with lock:
                errs.append(why)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        list(pool.map(one, range(n_requests)))
    seconds = time.perf_counter() - t0
    per: dict[str, dict] = defaultdict(lambda: {"lat": [], "errors": 0})
    for i in range(n_requests):
        label = targets[i % len(targets)][0]
        per[label]["lat"].append(lat[i])
        per[label]["errors"] += 0 if ok[i] else 1
    endpoints = {k: {"n": len(v["lat"]), "errors": v["errors"], "p50_ms": 1e3 * quantile(v["lat"], 0.5),
                     "p99_ms": 1e3 * quantile(v["lat"], 0.99)} for k, v in per.items()}
    return LoadResult(base, n_requests, concurrency, ok.count(False), seconds, n_requests / seconds,
                      1e3 * quantile(lat, 0.5), 1e3 * quantile(lat, 0.9), 1e3 * quantile(lat, 0.99),
                      1e3 * max(lat), sum(size), endpoints, errs[:10])


# ---------------------------------------------------------------------------- demo run


def make_demo_run(folder: Path, extra_pairs: list[dict] | None = None, n_per_category: int = 3) -> Path:
    """A small real run made by `ec run`'s steps with the tiny random-weight model.

    ``extra_pairs``: records added to the template pairs (e.g. hostile sentences for escaping tests).
    """
    import torch

    from eclens import tiny_model
    from eclens.pairs import write_jsonl
    from eclens.pipeline import RunConfig, run_pipeline
    from eclens.sources.templates import generate_templates

    torch.set_grad_enabled(False)
    model = tiny_model()
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    pairs = [p.to_dict() for p in generate_templates(model.tokenizer, n_per_category=n_per_category, seed=0)]
    src = folder.parent / f".{folder.name}.pairs.jsonl"
    write_jsonl(src, pairs + list(extra_pairs or []))
    cfg = RunConfig(pairs_file=str(src), hooks="hook_resid_post,hook_attn_out", min_pairs=2, exact_pairs=1,
                    dims_pairs=4, max_sets=2, n_controls=8, attribution_pairs=2, verify_top=2)
    run_pipeline(folder, model, cfg, log=lambda s: None, progress=False)
    src.unlink()
    return folder


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs_dir", nargs="?", type=Path, help="folder of run folders to serve")
    ap.add_argument("--url", help="a running `ec serve` on a loopback address (instead of starting one)")
    ap.add_argument("--demo", action="store_true", help="make a small demo run in a temporary folder and serve it")
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=50)
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
    ap.add_argument("--json", type=Path, help="also write the result here")
    args = ap.parse_args(argv)
    served = None
    tmp = None
    try:
        if args.url:
            base = args.url if args.url.endswith("/") else args.url + "/"
            if not is_loopback_url(base):
                ap.error(f"--url {args.url}: loopback addresses only")
        else:
            runs = args.runs_dir
            if args.demo:
                tmp = tempfile.TemporaryDirectory(prefix="eclens-load-")
                runs = Path(tmp.name)
                t0 = time.perf_counter()
                make_demo_run(runs / "demo")
                print(f"made a demo run in {runs / 'demo'} ({time.perf_counter() - t0:.1f} s)")
            if runs is None:
                ap.error("give RUNS_DIR, --demo or --url")
            served = start_server(runs)
            base = served.url
            print(served.banner.strip())
        targets = discover(base)
        print(f"{len(targets)} endpoints ({sum(1 for t in targets if t[2] == 404)} traversal probes expecting 404)")
        res = run_load(base, targets, args.requests, args.concurrency, args.timeout)
        for line in res.lines():
            print(line)
        if args.json:
            args.json.write_text(json.dumps(asdict(res), indent=2) + "\n", encoding="utf-8")
        if served is not None:
            log = served.stop()
            served = None
            n_tb = log.count("Traceback")
            print(f"server log: {len(log.splitlines())} lines, {n_tb} tracebacks")
            if n_tb:
                print(log[-3000:])
                return 1
        return 1 if res.errors else 0
    finally:
        if served is not None:
            served.stop()
        if tmp is not None:
            tmp.cleanup()


if __name__ == "__main__":
    sys.exit(main())
