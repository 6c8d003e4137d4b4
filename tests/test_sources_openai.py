"""The LLM generator with the real `openai` client against a real HTTP server on 127.0.0.1
(tests/llm_server.py) that answers with valid pairs, invalid pairs, malformed JSON,
429s and 500s."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from eclens.errors import EclensError, PairFileError
from eclens.pairs import check_pairs, load_jsonl
from eclens.sources.openai_gen import LLMConfig, generate_openai, parse_pairs, resolve_api_key

sys.path.insert(0, str(Path(__file__).parent))
from llm_server import LLMServer, pair_for  # noqa: E402

KEY = "sk-eclens-test-7f3a9c1e5b2d-DO-NOT-LEAK"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tok():
    from eclens.model import load_tokenizer

    return load_tokenizer("smollm2-135m")


@pytest.fixture
def server():
    srv = LLMServer(require_key=KEY).start()
    yield srv
    srv.stop()


def _cfg(srv: LLMServer, **kw) -> LLMConfig:
    base = dict(model="test-model", base_url=srv.base_url, n_per_category=10, categories=["typo"],
                pairs_per_request=5, concurrency=1, retry_base_s=0.01)
    base.update(kw)
    return LLMConfig(**base)


def _assert_no_key(folder: Path, *texts: str, skip: tuple[str, ...] = ()) -> None:
    needle = KEY.encode()
    files = [f for f in folder.rglob("*") if f.is_file() and f.name not in skip]
    assert files, "expected written files to check"
    for f in files:
        assert needle not in f.read_bytes(), f"API key written to {f}"
    for t in texts:
        assert KEY not in t, "API key in captured output"


def _lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


def test_fills_categories_with_valid_pairs(tok, server, tmp_path, capsys):
    out = tmp_path / "llm.jsonl"
    seen = []
    rep = generate_openai(out, tok, _cfg(server, n_per_category=12, categories=["typo", "grammar/tense"],
                                         concurrency=3), api_key=KEY, progress=lambda c, h, t: seen.append((c, h, t)))
    assert rep.complete and rep.structured == "json_schema"
    pairs = load_jsonl(out)
    assert Counter(p.category for p in pairs) == {"typo": 12, "grammar/tense": 12}
    assert len({(p.clean, p.corrupt) for p in pairs}) == 24
    res = check_pairs(pairs, tok)
    assert len(res.valid) == 24 and all(a.position >= 1 for a in res.valid)
    assert all(p.source == "openai" and p.meta["generator"] == "test-model" for p in pairs)
    df = rep.by_category().set_index("category")
    assert (df["valid"] == 12).all() and (df["total"] == 12).all()
    assert (df["returned"] >= df["valid"]).all() and (df["requested"] >= df["returned"]).all()
    assert (df["prompt_tokens"] > 0).all() and (df["completion_tokens"] > 0).all()
    assert df["requests"].sum() == len(server.requests) == rep.requests
    assert all(r["response_format"] == "json_schema" for r in server.requests)
    assert ("typo", 12, 12) in seen
    saved = json.loads(out.with_suffix(".report.json").read_text())
    assert saved["complete"] and saved["base_url"] == server.base_url and saved["categories"]["typo"]["valid"] == 12
    cap = capsys.readouterr()
    _assert_no_key(tmp_path, cap.out, cap.err)


def test_tops_up_after_invalid_malformed_and_duplicate_answers(tok, server, tmp_path):
    server.script = ["invalid", "malformed", "mixed", "invalid"]
    out = tmp_path / "llm.jsonl"
    rep = generate_openai(out, tok, _cfg(server, n_per_category=10), api_key=KEY)
    s = rep.stats["typo"]
    assert rep.complete and s.valid == 10 and len(load_jsonl(out)) == 10
    assert server.behaviours[:4] == ["invalid", "malformed", "mixed", "invalid"]
    assert s.requests == len(server.requests) >= 6  # four useless answers, then top-up rounds
    assert s.bad_responses == 1
    for reason in ("different_length", "multiple_differences", "identical", "duplicate", "malformed"):
        assert s.rejected[reason] >= 1, reason
    assert s.returned == s.valid + s.surplus + sum(s.rejected.values())
    assert not check_pairs(load_jsonl(out), tok).rejected


def test_retries_429_and_500_with_backoff(tok, server, tmp_path):
    server.script = ["429", "429", "500", "valid", "500"]
    rep = generate_openai(tmp_path / "o.jsonl", tok, _cfg(server, n_per_category=10), api_key=KEY)
    s = rep.stats["typo"]
    assert rep.complete and s.valid == 10
    assert s.retries == 4 and s.failed_requests == 0
    assert server.behaviours[:5] == ["429", "429", "500", "valid", "500"]


def test_server_that_keeps_failing_gives_one_line_error(tok, server, tmp_path):
    server.default = "500"
    out = tmp_path / "o.jsonl"
    with pytest.raises(EclensError) as e:
        generate_openai(out, tok, _cfg(server, max_retries=1, concurrency=2), api_key=KEY)
    msg = str(e.value)
    assert "\n" not in msg and "500" in msg and "rerun to resume" in msg and KEY not in msg
    assert not out.exists()  # no pair was made, so no half-made output
    saved = json.loads(out.with_suffix(".report.json").read_text())
    assert saved["categories"]["typo"]["failed_requests"] >= 3 and not saved["complete"]


def test_falls_back_when_the_server_refuses_json_schema(tok, server, tmp_path):
    server.reject_schema = True
    rep = generate_openai(tmp_path / "o.jsonl", tok, _cfg(server, n_per_category=5), api_key=KEY)
    assert rep.complete and rep.structured == "json_object"
    fmts = [r["response_format"] for r in server.requests]
    assert fmts[0] == "json_schema" and fmts[1:] and set(fmts[1:]) == {"json_object"}


def test_tolerant_parsing_of_fenced_lists_with_other_keys(tok, server, tmp_path):
    server.default = "fenced"
    rep = generate_openai(tmp_path / "o.jsonl", tok, _cfg(server, n_per_category=6), api_key=KEY)
    assert rep.complete and rep.stats["typo"].bad_responses == 0


def test_parse_pairs_cases():
    a, b = pair_for(0, 0), pair_for(0, 1)
    assert parse_pairs(json.dumps({"pairs": [a, b]})) == [a, b]
    assert parse_pairs(json.dumps([a])) == [a]
    assert parse_pairs(json.dumps({"items": [a]})) == [a]
    assert parse_pairs("Sure:\n" + json.dumps({"pairs": [a]}) + "\nanything else?") == [a]
    cut = json.dumps({"pairs": [a, b]})[:-30]  # cut off by a token limit: the complete object survives
    assert parse_pairs(cut) == [a]
    assert parse_pairs("no JSON here") == [] and parse_pairs("") == [] and parse_pairs(None) == []


def test_budget_spent_reports_the_shortfall(tok, server, tmp_path, capsys):
    server.default = "invalid"
    out = tmp_path / "o.jsonl"
    rep = generate_openai(out, tok, _cfg(server, max_requests=3), api_key=KEY)
    assert not rep.complete and rep.requests == 3 == len(server.requests)
    assert rep.stats["typo"].missing == 10 and not out.exists()

    from eclens.cli import main

    os.environ["OPENAI_API_KEY"] = KEY
    try:
        rc = main(["generate", "--source", "openai", "--out", str(out), "--n", "4", "--categories", "typo",
                   "--llm-model", "test-model", "--base-url", server.base_url, "--max-requests", "2",
                   "--pairs-per-request", "3", "--concurrency", "1"])
    finally:
        del os.environ["OPENAI_API_KEY"]
    cap = capsys.readouterr()
    err_line = [x for x in cap.err.splitlines() if x.startswith("error:")]
    assert rc == 2 and len(err_line) == 1 and "budget (2) spent" in err_line[0] and "typo by 4" in err_line[0]
    assert "typo: rejected " in cap.out and "diff len 2" in cap.out and "multi diff 2" in cap.out
    _assert_no_key(tmp_path, cap.out, cap.err)


def test_rejected_key_is_never_repeated(tok, tmp_path, capsys):
    srv = LLMServer(require_key="sk-the-right-one").start()  # its 401 body echoes the Authorization header
    try:
        with pytest.raises(EclensError) as e:
            generate_openai(tmp_path / "o.jsonl", tok, _cfg(srv), api_key=KEY)
    finally:
        srv.stop()
    msg = str(e.value)
    assert "authentication failed" in msg and "401" in msg and "***" in msg and KEY not in msg
    cap = capsys.readouterr()
    _assert_no_key(tmp_path, cap.out, cap.err, msg)


def test_key_sources(monkeypatch, tmp_path, tok):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.chdir(tmp_path)
    assert resolve_api_key() is None
    (tmp_path / ".env").write_text(f"# local secrets\nOPENAI_API_KEY={KEY}\n")
    assert resolve_api_key() == KEY
    assert "OPENAI_API_KEY" not in os.environ  # read, not exported to child processes
    monkeypatch.setenv("OPENAI_API_KEY", "sk-from-env")
    assert resolve_api_key() == "sk-from-env" and resolve_api_key("sk-explicit") == "sk-explicit"
    monkeypatch.delenv("OPENAI_API_KEY")
    (tmp_path / ".env").unlink()
    with pytest.raises(EclensError, match="no API key: set OPENAI_API_KEY"):
        generate_openai(tmp_path / "o.jsonl", tok, LLMConfig("gpt-4o-mini", n_per_category=1, categories=["typo"]))
    srv = LLMServer().start()  # a local server without keys
    try:
        assert generate_openai(tmp_path / "o.jsonl", tok, _cfg(srv, n_per_category=2)).complete
    finally:
        srv.stop()


def test_resume_file_problems(tok, server, tmp_path):
    out = tmp_path / "r.jsonl"
    generate_openai(out, tok, _cfg(server, n_per_category=3), api_key=KEY)
    first = _lines(out)
    # A torn last record (what a kill during a write leaves) is removed and reported; the rest is kept.
    with open(out, "a", encoding="utf-8") as fh:
        fh.write('{"id": "x", "clean": "The ca')
    rep = generate_openai(out, tok, _cfg(server, n_per_category=5), api_key=KEY)
    assert rep.dropped_partial_line and rep.stats["typo"].existing == 3 and rep.stats["typo"].valid == 2
    assert _lines(out)[:3] == first and len(load_jsonl(out)) == 5
    # Nothing to do: no request at all.
    n = len(server.requests)
    assert generate_openai(out, tok, _cfg(server, n_per_category=5), api_key=KEY).requests == 0
    assert len(server.requests) == n
    # A broken line in the middle is the user's to fix: one line naming file and line.
    lines = _lines(out)
    out.write_text("\n".join([lines[0], "{broken", *lines[1:]]) + "\n")
    with pytest.raises(PairFileError, match=rf"^{out}:2: invalid JSON"):
        generate_openai(out, tok, _cfg(server), api_key=KEY)
    # A pair that is not a single-token change here: the file was made for another tokenizer.
    rec = json.loads(lines[0]) | {"corrupt": "Something else entirely."}
    out.write_text(json.dumps(rec) + "\n")
    with pytest.raises(PairFileError, match=rf"^{out}:1: .*another --model"):
        generate_openai(out, tok, _cfg(server), api_key=KEY)


@pytest.mark.slow  # two CLI subprocesses, each loading transformers: ~11 s idle, 20-35 s on a busy 2-core box
def test_resume_after_sigkill_loses_and_repeats_nothing(server, tmp_path):
    """Kill `ec generate --source openai` with SIGKILL mid-run, rerun, and check the file."""
    (tmp_path / ".env").write_text(f"OPENAI_API_KEY={KEY}\n")  # the key reaches the CLI only via .env
    out = tmp_path / "pairs.jsonl"
    env = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"}
    env.update(HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT / "src"), COLUMNS="120")
    cmd = [sys.executable, "-m", "eclens", "generate", "--source", "openai", "--out", str(out), "--n", "30",
           "--categories", "typo,grammar/tense", "--pairs-per-request", "3", "--concurrency", "2",
           "--llm-model", "test-model", "--base-url", server.base_url, "--retry-base", "0.01"]
    server.delay = 0.25
    server.script = ["429"]  # a retry in flight as well
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if out.exists() and out.read_bytes().count(b"\n") >= 12:
            break
        if proc.poll() is not None:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    o1, e1 = proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL, e1.decode()[-2000:]
    before = out.read_bytes()
    complete_before = before[: before.rfind(b"\n") + 1].decode().splitlines()
    assert 12 <= len(complete_before) < 60  # killed part way

    server.delay = 0.0
    server.reset_counters()  # the server now repeats the pairs it sent before the kill
    run2 = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, timeout=180)
    o2, e2 = run2.stdout.decode(), run2.stderr.decode()
    assert run2.returncode == 0, e2[-2000:]
    final = _lines(out)
    assert final[: len(complete_before)] == complete_before  # nothing lost, nothing rewritten
    recs = [json.loads(x) for x in final]
    assert Counter(r["category"] for r in recs) == {"typo": 30, "grammar/tense": 30}
    assert len({(r["clean"], r["corrupt"]) for r in recs}) == 60 and len({r["id"] for r in recs}) == 60
    rep = json.loads(out.with_suffix(".report.json").read_text())
    cats = rep["categories"]
    assert sum(c["existing"] for c in cats.values()) == len(complete_before)
    assert sum(c["rejected_duplicate"] for c in cats.values()) > 0  # the repeats were recognised
    assert "typo: rejected " in o2 and "dup " in o2
    _assert_no_key(tmp_path, o1.decode(), e1.decode(), o2, e2, skip=(".env",))
