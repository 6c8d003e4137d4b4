"""``ec serve``: a read-only web UI and JSON API over a folder of runs.

Standard library only (``http.server.ThreadingHTTPServer``). Safety rules:

- binds loopback by default; on loopback it also checks the ``Host`` header, so a
  web page elsewhere cannot reach it through DNS rebinding;
- serves nothing outside ``RUNS_DIR``: a run is a direct subfolder named by one URL
  segment; a segment that decodes (once, twice or three times) to ``.``, ``..`` or
  something holding ``/``, ``\\`` or NUL is a 404; run folders and files are resolved
  and must lie inside ``RUNS_DIR`` (symlinks pointing out are a 404); files are only
  ever the fixed names of the run-folder contract and the packaged static assets;
- every response carries a strict Content-Security-Policy (scripts only from this
  server, no inline scripts) and ``nosniff``; pages build the DOM with ``textContent``,
  so sentences from the data are shown as text, never run;
- only GET and HEAD.

Per-pair views (per-layer/position differences, attention patterns, downstream KL)
are computed on demand with the run's model, loaded lazily once per model (weights
checked against the run's manifest) and guarded by a lock; results are cached.
"""

from __future__ import annotations

import json
import sys
import threading
import traceback
from collections import OrderedDict
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import pandas as pd

from .. import viz
from ..errors import EclensError
from ..report import REPORT, RunData, control_figures
from ..summaries import contrasts_note, glance, patch_blocks

STATIC = Path(__file__).parent / "static"
STATIC_FILES = {  # name -> (file in static/ or a generator, content type)
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}
CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; "
       "font-src 'self' data:; connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; "
       "form-action 'none'")
LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}
TABLES = {  # API name -> (RunData attribute, file name for messages)
    "candidates": ("candidates", "candidates.parquet"),
    "contrasts": ("contrasts", "contrasts.parquet"),
    "layers": ("layers", "layers.parquet"),
    "check": ("check", "check.csv"),
    "pair_metrics": ("pair_metrics", "pairs.csv"),
    "patch_dims": ("patch_dims", "patch_dims.csv"),
    "patch_controls": ("patch_controls", "patch_dims_controls.csv"),
    "patch_attribution": ("patch_attribution", "patch_attribution.csv"),
    "patch_exact": ("patch_exact", "patch_exact.csv"),
    "recovery_index": ("recovery_index", "recovery_index.csv"),
    "recovery_curves": ("recovery_curves", "recovery_curves.csv"),
    "probe": ("probe", "probe.csv"),
}


class NotFound(Exception):
    pass


class BadRequest(Exception):
    pass


def safe_segment(seg: str) -> str:
    """One URL path segment, decoded once; 404 for anything that could leave its folder.

    Decodes up to three times to catch double- and triple-encoded ``../``; the name
    used is the once-decoded one (so ``%252e`` is never a dot).
    """
    once = unquote(seg)
    probe = once
    for _ in range(3):
        if probe in ("", ".", "..") or any(c in probe for c in ("/", "\\", "\x00")) or probe.startswith("."):
            raise NotFound(seg)
        nxt = unquote(probe)
        if nxt == probe:
            break
        probe = nxt
    return once


class RunsApp:
    """The server's state: the runs folder, cached run data, lazily loaded models and per-pair views."""

    def __init__(self, runs_dir: str | Path, *, model_loader: Callable[[RunData], Any] | None = None,
                 load_models: bool = True):
        root = Path(runs_dir).expanduser()
        if not root.is_dir():
            raise EclensError(f"{root}: no such folder; point `ec serve` at the folder that holds your runs "
                              "(e.g. runs/)")
        self.root = root.resolve()
        self.load_models = load_models
        self.model_loader = model_loader or self._default_loader
        self._runs: dict[str, tuple[float, RunData]] = {}
        self._models: dict[str, Any] = {}
        self._model_errors: dict[str, str] = {}
        self._views: OrderedDict[tuple, Any] = OrderedDict()
        self._lock = threading.RLock()       # guards the caches
        self._compute = threading.Lock()     # one model computation at a time (torch is not re-entrant here)

    # ---------------------------------------------------------------- runs
    def run_names(self) -> list[str]:
        out = []
        for p in sorted(self.root.iterdir()):
            if p.name.startswith(".") or not p.is_dir():
                continue
            if p.resolve().parent != self.root:
                continue  # a symlink to a folder outside RUNS_DIR is not a run here
            if (p / "manifest.json").is_file() or (p / "pairs.jsonl").is_file():
                out.append(p.name)
        return out

    def run(self, name: str) -> RunData:
        path = self.root / name
        if not path.is_dir() or path.resolve().parent != self.root:
            raise NotFound(name)
        if not ((path / "manifest.json").is_file() or (path / "pairs.jsonl").is_file()):
            raise NotFound(name)
        # Reload when a step finishes while the server runs (files are replaced atomically).
        stamp = max((f.stat().st_mtime for f in path.iterdir() if f.is_file()), default=0.0)
        with self._lock:
            hit = self._runs.get(name)
            if hit and hit[0] == stamp:
                return hit[1]
            rd = RunData(path, root=self.root)
            self._runs[name] = (stamp, rd)
            return rd

    def run_summary(self, name: str) -> dict:
        rd = self.run(name)
        man = rd.manifest
        steps = man.get("steps") or {}
        return {
            "name": name,
            "created": man.get("created"),
            "model": (man.get("model") or {}).get("name"),
            "n_pairs": len(rd.pairs or []),
            "n_rejected": len(rd.rejected or []),
            "steps": list(steps),
            "has_report": rd.file(REPORT) is not None,
        }

    def _summary_or_error(self, name: str) -> dict:
        # One unreadable run (a manifest cut short, a hand-edited file) must not hide the others.
        try:
            return self.run_summary(name)
        except EclensError as e:
            return {"name": name, "created": None, "model": None, "n_pairs": None, "n_rejected": None,
                    "steps": [], "has_report": False, "error": str(e)}

    # -------------------------------------------------------------- models
    def _default_loader(self, rd: RunData):
        from ..report import model_for_run

        m, why = model_for_run(rd)
        if m is None:
            raise EclensError(why)
        return m

    def model_for(self, rd: RunData):
        m = rd.manifest.get("model") or {}
        key = f"{m.get('name')}|{m.get('weights_hash')}"
        with self._compute:
            if key in self._models:
                return self._models[key]
            if key in self._model_errors:
                raise EclensError(self._model_errors[key])
            if not self.load_models:
                raise EclensError("per-pair views are off (ec serve --no-model)")
            try:
                import torch

                torch.set_grad_enabled(False)
                model = self.model_loader(rd)
            except EclensError as e:
                self._model_errors[key] = str(e)
                raise
            self._models[key] = model
            return model

    def pair_view(self, rd: RunData, pair_id: str, layer: int | None):
        pair = rd.aligned(pair_id)
        model = self.model_for(rd)
        from ..report import choose_attention_layer

        n_layers = int(model.cfg.n_layers)
        layer = choose_attention_layer(rd, n_layers) if layer is None else layer
        if not 0 <= layer < n_layers:
            raise BadRequest(f"layer must be in 0..{n_layers - 1}")
        key = (str(rd.path), rd.manifest.get("created"), pair_id, layer)
        with self._lock:
            if key in self._views:
                self._views.move_to_end(key)
                return self._views[key], layer, n_layers
        with self._compute:
            view = viz.pair_view(model, pair, attention_layers=[layer])
        with self._lock:
            self._views[key] = view
            while len(self._views) > 64:
                self._views.popitem(last=False)
        return view, layer, n_layers

    # ----------------------------------------------------------------- API
    def api(self, parts: list[str], query: dict[str, str]) -> tuple[Any, str]:
        """Dispatch ``/api/...``; returns (payload, content type). JSON unless a .csv is asked for."""
        if parts == ["runs"]:
            return {"runs": [self._summary_or_error(n) for n in self.run_names()]}, "json"
        if len(parts) < 2 or parts[0] != "runs":
            raise NotFound("/".join(parts))
        rd = self.run(parts[1])
        rest = parts[2:]
        if not rest:
            return self.overview(parts[1], rd), "json"
        head = rest[0]
        if head == "pairs" and len(rest) == 1:
            return self.pairs(rd, query), "json"
        if head == "pairs" and len(rest) == 2:
            return self.pair(rd, rest[1], query), "json"
        if head == "measure" and len(rest) == 1:
            return self.measure(rd), "json"
        if head == "figures" and len(rest) == 2:
            return self.figure(rd, rest[1], query), "json"
        if len(rest) == 1:
            name, csv = (head[:-4], True) if head.endswith(".csv") else (head, False)
            if name in TABLES:
                df = self.table(rd, name)
                df = _filter_table(df, query)
                if csv:
                    return df.to_csv(index=False), "csv"
                return table_page(df, query), "json"
        raise NotFound("/".join(parts))

    def table(self, rd: RunData, name: str) -> pd.DataFrame:
        attr, fname = TABLES[name]
        df = getattr(rd, attr)
        if df is None:
            raise NotFound(f"{rd.name}/{fname}")
        return df

    def overview(self, name: str, rd: RunData) -> dict:
        check = rd.check
        return {
            **self.run_summary(name),
            "manifest": rd.manifest,
            "summary": rd.summary,
            "patch_summary": rd.patch_summary,
            # what the page shows: sentences and small tables, never the raw JSON above
            "glance": glance(rd),
            "causal_summary": [{"title": b.title, "sentences": b.sentences,
                                "table": table_json(b.table) if b.table is not None else None}
                               for b in patch_blocks(rd.patch_summary)],
            "contrasts_note": contrasts_note(rd) if rd.contrasts is not None else None,
            "categories": rd.categories(),
            "check": table_json(check) if check is not None else None,
            "tables": [t for t, (attr, _) in TABLES.items() if getattr(rd, attr) is not None],
            "hooks": sorted(set(rd.layers["hook"].astype(str))) if rd.layers is not None and "hook" in rd.layers
            else [],
            "exact_pairs": rd.exact_pair_ids(),
            "has_dims": rd.file("dims.parquet") is not None,
            "has_measure": rd.file("measure.json") is not None,
            "n_layers": (rd.manifest.get("model") or {}).get("n_layers"),
        }

    def measure(self, rd: RunData) -> dict:
        """The Recovery tab: the measure step's sentences, tables and figures (what the report's section shows)."""
        from ..measure_view import measure_panel

        panel = measure_panel(rd)
        if panel is None:
            raise NotFound(f"{rd.name}/measure.json")
        return {"sentences": panel.sentences,
                "tables": [{"title": t, "table": table_json(df)} for t, df in panel.tables],
                "figures": [{"caption": c, "figure": viz.figure_json(f)} for c, f in panel.figures]}

    def pairs(self, rd: RunData, query: dict[str, str]) -> dict:
        items = rd.pairs or []
        cat = query.get("category") or ""
        q = (query.get("q") or "").strip().lower()
        if cat:
            items = [p for p in items if str(p.get("category")) == cat]
        if q:
            items = [p for p in items if q in str(p.get("clean", "")).lower() or q in str(p.get("corrupt", "")).lower()
                     or q in str(p.get("id", "")).lower()]
        total = len(items)
        offset = _int(query.get("offset"), 0, 0, 10**9)
        limit = _int(query.get("limit"), 100, 1, 1000)
        exact = set(rd.exact_pair_ids())
        keep = ("id", "category", "clean", "corrupt", "position", "length", "clean_token", "corrupt_token")
        rows = [{**{k: p.get(k) for k in keep}, "has_patch": str(p.get("id")) in exact}
                for p in items[offset: offset + limit]]
        return {"total": total, "offset": offset, "limit": limit, "pairs": rows}

    def pair(self, rd: RunData, pair_id: str, query: dict[str, str]) -> dict:
        d = rd.pairs_by_id.get(pair_id)
        if d is None:
            raise NotFound(pair_id)
        layer = query.get("layer")
        layer_i = _int(layer, 0, -1, 10**6) if layer not in (None, "") else None
        out: dict[str, Any] = {"pair": {k: d.get(k) for k in ("id", "category", "source", "clean", "corrupt",
                                                                "position", "length", "clean_token",
                                                                "corrupt_token", "meta")}}
        metrics = rd.pair_metrics
        if metrics is not None:
            col = next((c for c in viz.PAIR_COLS if c in metrics.columns), None)
            row = metrics[metrics[col].astype(str) == pair_id] if col else metrics.iloc[0:0]
            out["metrics"] = _records(row.drop(columns=[c for c in ("tokens",) if c in row]))[0] if len(row) else None
        tokens = rd.pair_tokens(pair_id)
        figs: dict[str, Any] = {}
        try:
            view, layer_i, n_layers = self.pair_view(rd, pair_id, layer_i)
            tokens = view.clean_tokens
            out.update(clean_tokens=view.clean_tokens, corrupt_tokens=view.corrupt_tokens, kl=view.kl,
                       layer=layer_i, n_layers=n_layers)
            figs["diff"] = viz.figure_json(viz.pair_diff_heatmap(view))
            figs["curve"] = viz.figure_json(viz.pair_layer_curve(view))
            clean_v, corrupt_v = viz.pair_attention_views(view, layer_i)
            out["attention"] = {"clean": clean_v.props, "corrupt": corrupt_v.props}
            out["kl_tokens"] = viz.kl_tokens_view(view.clean_tokens, view.kl).props
        except EclensError as e:
            out["views_error"] = str(e)
            out["clean_tokens"] = tokens
        if rd.patch_exact is not None and pair_id in rd.exact_pair_ids():
            for direction in ("denoise", "noise"):
                figs[f"patch_{direction}"] = viz.figure_json(viz.patching_heatmap(
                    rd.patch_exact, pair_id=pair_id, direction=direction, tokens=tokens, changed=int(d["position"])))
        out["figures"] = figs
        return out

    def figure(self, rd: RunData, name: str, query: dict[str, str]) -> dict:
        hook = query.get("hook") or None
        category = query.get("category") or "all"
        offset = _int(query.get("offset"), 0, -1, 10**6)
        if name == "layer_offset":
            fig = viz.layer_offset_heatmap(self.table(rd, "layers"), hook=hook, category=category)
        elif name == "category_curves":
            fig = viz.category_curves(self.table(rd, "layers"), hook=hook, offset=offset)
        elif name == "layer_dims":
            dims = rd.dims_slice(category=category, hook=hook, offset=offset)
            if dims is None:
                raise NotFound(f"{rd.name}/dims.parquet")
            fig = viz.layer_dim_heatmap(dims, hook=hook, category=category, offset=offset,
                                        sort=query.get("sort") or "max", massive=rd.massive_dims(dims))
        elif name == "attribution":
            fig = viz.attribution_scatter(self.table(rd, "patch_attribution"))
        elif name == "controls":
            return {"figures": [viz.figure_json(f) for f in control_figures(rd, limit=12)]}
        else:
            raise NotFound(name)
        return viz.figure_json(fig)


def _int(v: str | None, default: int, lo: int, hi: int) -> int:
    if v in (None, ""):
        return default
    try:
        i = int(v)
    except ValueError:
        raise BadRequest(f"not an integer: {v!r}") from None
    if not lo <= i <= hi:
        raise BadRequest(f"{i} out of range {lo}..{hi}")
    return i


def _records(df: pd.DataFrame) -> list[dict]:
    return json.loads(df.to_json(orient="records", force_ascii=False))


def table_json(df: pd.DataFrame, limit: int = 5000) -> dict:
    return {"columns": [str(c) for c in df.columns], "total": len(df), "rows": _records(df.head(limit))}


def table_page(df: pd.DataFrame, query: dict[str, str]) -> dict:
    """One page of a table, sorted server-side (``sort``: a column, ``desc=1``; ``start``: the first
    row, ``limit``: how many), so the browser never holds more rows than it shows. (``offset`` is
    a column of these tables and filters by it, as ``layer`` does.)"""
    sort = query.get("sort") or ""
    desc = query.get("desc") in ("1", "true")
    if sort:
        if sort not in df.columns:
            raise BadRequest(f"no column {sort!r} to sort by")
        df = df.sort_values(sort, ascending=not desc, kind="stable", na_position="last")
    start = _int(query.get("start"), 0, 0, 10**9)
    limit = _int(query.get("limit"), 100, 1, 100000)
    page = df.iloc[start: start + limit]
    return {"columns": [str(c) for c in df.columns], "total": len(df), "start": start, "limit": limit,
            "sort": sort or None, "desc": desc, "rows": _records(page)}


def _filter_table(df: pd.DataFrame, query: dict[str, str]) -> pd.DataFrame:
    for col in ("category", "kind", "hook", "direction"):
        v = query.get(col)
        if v and col in df.columns:
            df = df[df[col].astype(str) == v]
    for col in ("layer", "offset"):
        v = query.get(col)
        if v not in (None, "") and col in df.columns:
            df = df[df[col] == _int(v, 0, -1, 10**6)]
    return df


class Handler(BaseHTTPRequestHandler):
    server_version = "eclens"
    sys_version = ""
    app: RunsApp  # set on the subclass made by make_server
    check_host: bool = True
    quiet: bool = False

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        if not self.quiet:
            sys.stderr.write(f"{self.address_string()} - {format % args}\n")

    def do_HEAD(self) -> None:  # noqa: N802 - stdlib naming
        self._handle(head=True)

    def do_GET(self) -> None:  # noqa: N802
        self._handle(head=False)

    def _method_not_allowed(self) -> None:
        self._send(HTTPStatus.METHOD_NOT_ALLOWED, b'{"error": "read-only: GET and HEAD only"}',
                   "application/json", extra={"Allow": "GET, HEAD"})

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _method_not_allowed  # noqa: N815

    def _send(self, status: int, body: bytes, ctype: str, *, head: bool = False, extra: dict | None = None,
              csp: bool = True) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("Cache-Control", "no-store")
        if csp:
            self.send_header("Content-Security-Policy", CSP)
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _json(self, status: int, obj: Any, head: bool = False) -> None:
        body = json.dumps(viz.finite(obj), ensure_ascii=False, default=viz._json_default,
                          allow_nan=False).encode("utf-8")
        self._send(status, body, "application/json; charset=utf-8", head=head)

    def _host_ok(self) -> bool:
        if not self.check_host:
            return True
        host = (self.headers.get("Host") or "").strip().lower()
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        return name in LOOPBACK

    def _handle(self, head: bool) -> None:
        try:
            if not self._host_ok():
                self._json(HTTPStatus.MISDIRECTED_REQUEST, {"error": "unexpected Host header"}, head)
                return
            split = urlsplit(self.path)
            raw = split.path
            if not raw.startswith("/") or "\\" in raw or "\x00" in raw:
                raise NotFound(raw)
            segs = raw.split("/")[1:]
            if segs and segs[-1] == "":
                segs = segs[:-1]  # "/" and a trailing slash; an empty segment elsewhere ("//") is a 404
            parts = [safe_segment(s) for s in segs]
            query = {k: v[-1] for k, v in parse_qs(split.query, keep_blank_values=True).items()}
            self._route(parts, query, head)
        except NotFound:
            self._json(HTTPStatus.NOT_FOUND, {"error": "not found"}, head)
        except BadRequest as e:
            self._json(HTTPStatus.BAD_REQUEST, {"error": str(e)}, head)
        except EclensError as e:
            self._json(HTTPStatus.UNPROCESSABLE_ENTITY, {"error": str(e)}, head)
        except (BrokenPipeError, ConnectionResetError):
            pass
        except Exception as e:  # noqa: BLE001 - a bug must not kill the server; it is logged with its traceback
            traceback.print_exc(file=sys.stderr)
            self._json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"internal error: {type(e).__name__}"}, head)

    def _route(self, parts: list[str], query: dict[str, str], head: bool) -> None:
        if not parts:
            return self._static("index.html", head)
        if parts == ["favicon.ico"]:
            return self._static("favicon.svg", head)
        if parts[0] == "static" and len(parts) == 2:
            return self._static(parts[1], head)
        if parts[0] == "api":
            payload, kind = self.app.api(parts[1:], query)
            if kind == "csv":
                name = f"{parts[2]}-{parts[-1]}" if len(parts) > 3 else parts[-1]
                safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
                return self._send(HTTPStatus.OK, payload.encode("utf-8"), "text/csv; charset=utf-8", head=head,
                                  extra={"Content-Disposition": f'attachment; filename="{safe}"'})
            return self._json(HTTPStatus.OK, payload, head)
        if parts[0] == "runs" and len(parts) == 3 and parts[2] == REPORT:
            rd = self.app.run(parts[1])
            f = rd.file(REPORT)
            if f is None:
                raise NotFound(REPORT)
            # The report is self-contained and draws with inline scripts; it gets its own, looser policy.
            return self._send(HTTPStatus.OK, f.read_bytes(), "text/html; charset=utf-8", head=head, csp=False,
                              extra={"Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline' "
                                     "'unsafe-eval'; style-src 'unsafe-inline'; img-src data: blob:; "
                                     "font-src data:; connect-src 'none'"})
        raise NotFound("/".join(parts))

    def _static(self, name: str, head: bool) -> None:
        if name == "plotly.min.js":
            body, ctype = _plotly_js(), "text/javascript; charset=utf-8"
        elif name == "circuitsvis.js":
            body, ctype = _circuitsvis_js(), "text/javascript; charset=utf-8"
        elif name in STATIC_FILES:
            body, ctype = (STATIC / name).read_bytes(), STATIC_FILES[name]
        else:
            raise NotFound(name)
        self._send(HTTPStatus.OK, body, ctype, head=head)


_bundles: dict[str, bytes] = {}


def _plotly_js() -> bytes:
    if "plotly" not in _bundles:
        _bundles["plotly"] = viz.plotly_bundle().encode("utf-8")
    return _bundles["plotly"]


def _circuitsvis_js() -> bytes:
    if "cv" not in _bundles:
        _bundles["cv"] = viz.circuitsvis_bundle().encode("utf-8")
    return _bundles["cv"]


def is_loopback(host: str) -> bool:
    import ipaddress

    if host in ("localhost",):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def make_server(runs_dir: str | Path, host: str = "127.0.0.1", port: int = 5000, *,
                model_loader: Callable[[RunData], Any] | None = None, load_models: bool = True,
                quiet: bool = False) -> ThreadingHTTPServer:
    """A ready-to-serve server (``port=0`` picks a free port: ``server.server_address[1]``)."""
    app = RunsApp(runs_dir, model_loader=model_loader, load_models=load_models)
    handler = type("EclensHandler", (Handler,), {"app": app, "check_host": is_loopback(host), "quiet": quiet})
    import socket

    # socketserver's default listen backlog is 5: with more clients connecting at once the
    # kernel drops their SYNs and they retry after 1, 3, 7, ... s (measured: p99 4.4 s, max 55 s
    # at 50 concurrent). A full-size backlog lets the threads take them as they come.
    attrs = {"request_queue_size": socket.SOMAXCONN}
    if ":" in host:
        attrs["address_family"] = socket.AF_INET6
    cls = type("EclensHTTPServer", (ThreadingHTTPServer,), attrs)
    try:
        srv = cls((host, port), handler)
    except OSError as e:
        raise EclensError(f"cannot listen on {host}:{port} ({e.strerror}); choose another --port") from None
    srv.daemon_threads = True
    srv.eclens_app = app
    return srv


def url_of(srv: ThreadingHTTPServer) -> str:
    host, port = srv.server_address[:2]
    shown = f"[{host}]" if ":" in str(host) else host
    return f"http://{shown}:{port}/"
