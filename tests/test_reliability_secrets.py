"""Secrets: with ``OPENAI_API_KEY`` set, no byte of it reaches a file a run writes, the
terminal or the logs, not even when a server echoes it back (in a 401, in a long error
that eclens shortens, inside the generated text), or the base URL is wrong.

`ec` runs in-process (``eclens.cli.main``) against the real local test server
(tests/llm_server.py) with the real ``openai`` client; the openai/httpx loggers are
captured at DEBUG level.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from eclens.cli import main
from llm_server import LLMServer

KEY = "sk-rel-9c2f4e6a8b1d3f5a7c9e0b2d4f6a8c1e"
WINDOW = 10  # no 10-character piece of the key may appear either (a shortened message must not keep half)


def pieces(key: str = KEY) -> list[str]:
    return [key[i:i + WINDOW] for i in range(3, len(key) - WINDOW + 1)]  # skip the generic "sk-" prefix


def assert_no_secret(folder: Path, *texts: str) -> None:
    files = [f for f in folder.rglob("*") if f.is_file()]
    for f in files:
        data = f.read_bytes()
        leaked = [p for p in pieces() if p.encode() in data]
        assert not leaked, f"key piece {leaked[0]!r} written to {f}"
    for t in texts:
        leaked = [p for p in pieces() if p in t]
        assert not leaked, f"key piece {leaked[0]!r} in output: {t[:300]!r}"


class EchoServer(LLMServer):
    """The test server, plus careless behaviours that echo the Authorization header back."""

    def __init__(self, echo: str, **kw):
        super().__init__(**kw)
        self.echo = echo

    def handle(self, path, headers, raw):
        auth = headers.get("Authorization") or headers.get("authorization") or ""
        if self.echo == "long401":
            # The key straddles the 300 characters eclens keeps of an error message (the client's
            # message is "Error code: 401 - " and the server's message).
            head = len("Error code: 401 - ") + len("invalid header Bearer ")
            msg = "x" * (300 - head - len(KEY) // 2) + f"invalid header {auth}"
            return 401, {}, {"error": {"message": msg, "type": "invalid_request_error"}}
        if self.echo == "500":
            return 500, {}, {"error": {"message": f"upstream failed for {auth}", "type": "server_error"}}
        status, h, payload = super().handle(path, headers, raw)
        if self.echo == "content" and status == 200:
            doc = json.loads(payload["choices"][0]["message"]["content"])
            doc["pairs"].insert(0, {"clean": f"The key is {auth} here.", "corrupt": f"The key was {auth} here.",
                                 "clean_word": "is", "corrupt_word": "was"})
            payload["choices"][0]["message"]["content"] = json.dumps(doc)
        return status, h, payload


@pytest.fixture
def env_key(monkeypatch, tmp_path):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.chdir(tmp_path)  # a .env elsewhere must not matter
    return KEY


def gen_argv(out: Path, base_url: str, *extra: str) -> list[str]:
    return ["generate", "--source", "openai", "--out", str(out), "--n", "4", "--categories", "typo,grammar/tense",
            "--llm-model", "test-model", "--base-url", base_url, "--pairs-per-request", "4",
            "--retry-base", "0.01", "--max-retries", "1", "--concurrency", "2", *extra]


def test_successful_run_writes_and_logs_no_key(env_key, tmp_path, capsys, caplog):
    caplog.set_level(logging.DEBUG)
    srv = LLMServer(require_key=KEY).start()
    try:
        rc = main(gen_argv(tmp_path / "pairs.jsonl", srv.base_url))
    finally:
        srv.stop()
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert len((tmp_path / "pairs.jsonl").read_text().splitlines()) == 8
    assert (tmp_path / "pairs.report.json").is_file()
    assert caplog.records, "expected the client's debug logs to be captured"
    assert_no_secret(tmp_path, cap.out, cap.err, caplog.text)


@pytest.mark.parametrize("echo", ["401", "long401", "500"])
def test_server_that_echoes_the_key_in_errors(echo, env_key, tmp_path, capsys, caplog):
    caplog.set_level(logging.DEBUG)
    srv = (LLMServer(require_key="sk-another-key") if echo == "401" else EchoServer(echo)).start()
    try:
        rc = main(gen_argv(tmp_path / "pairs.jsonl", srv.base_url))
    finally:
        srv.stop()
    cap = capsys.readouterr()
    assert rc == 2
    last = cap.err.strip().splitlines()[-1]
    assert last.startswith("error: http://127.0.0.1:") and "***" in last, last
    assert "Traceback" not in cap.err
    assert_no_secret(tmp_path, cap.out, cap.err, caplog.text)


def test_key_echoed_inside_generated_text_is_never_written(env_key, tmp_path, capsys, caplog):
    caplog.set_level(logging.DEBUG)
    srv = EchoServer("content").start()
    try:
        rc = main(gen_argv(tmp_path / "pairs.jsonl", srv.base_url))
    finally:
        srv.stop()
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert_no_secret(tmp_path, cap.out, cap.err, caplog.text)


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:9/v1",                 # nothing listens
    "ftp://127.0.0.1/v1",                    # a scheme the client cannot speak
    "not a url at all",
    f"http://user:{KEY}@127.0.0.1:9/v1",     # credentials pasted into the URL
    f"http://127.0.0.1:9/v1?api_key={KEY}",
])
def test_invalid_base_url(url, env_key, tmp_path, capsys):
    out = tmp_path / "pairs.jsonl"
    rc = main(gen_argv(out, url, "--max-retries", "0", "--timeout", "5"))
    cap = capsys.readouterr()
    assert rc == 2
    lines = cap.err.strip().splitlines()
    assert lines[-1].startswith("error: ") and "Traceback" not in cap.err, cap.err
    assert not out.exists()  # no pair was made, so no pairs file
    assert_no_secret(tmp_path, cap.out, cap.err)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A random-weight 2-layer Llama with SmolLM2's tokenizer, as a local model folder."""
    from eclens.model import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"), max_positions=64)


def test_model_steps_with_the_key_set_write_no_key(env_key, tiny_dir, tmp_path, capsys):
    """`ec pairs check` and `ec diff` never read the key and record nothing of the environment."""
    from eclens.pairs import write_jsonl

    src = tmp_path / "p.jsonl"
    write_jsonl(src, [{"id": f"p{i}", "clean": f"The {w} runs.", "corrupt": f"The {w} run.", "category": "g"}
                      for i, w in enumerate(["dog", "man", "girl"])])
    rc = main(["pairs", "check", str(src), "--model", str(tiny_dir), "--out", str(tmp_path / "a.jsonl")])
    assert rc == 0
    rc = main(["diff", str(src), "--model", str(tiny_dir), "--out", str(tmp_path / "run"), "--hooks",
               "hook_resid_post"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert (tmp_path / "run" / "manifest.json").is_file() and (tmp_path / "run" / "layers.parquet").is_file()
    assert_no_secret(tmp_path, cap.out, cap.err)
