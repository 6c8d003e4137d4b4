"""A corpus of bad inputs through every command that reads pairs.

One table: input cases x commands (``ec pairs check``, ``ec generate`` resuming an
existing ``--out`` file, ``ec cache``, ``ec diff``, ``ec patch``, ``ec run --pairs``).
Every cell is either a clean report (exit 0; rejected pairs counted by reason) or a
one-line ``error: FILE[:LINE]: ...`` with exit 2, no traceback and no output file
left behind. The CLI runs in-process (``eclens.cli.main``); two cells also run as
subprocesses, to see exactly what reaches a user's terminal.

The model is a 2-layer random-weight Llama saved as a local folder, with SmolLM2's
tokenizer and a 64-token context (so "longer than the model's context" is cheap).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from eclens.cli import main
from eclens.diff import STATS_FILE

CMDS = ("check", "generate", "cache", "diff", "patch", "run")
N_CTX = 64
VALID = [  # single-token changes under SmolLM2's tokenizer
    ("The dog runs.", "The dog run.", "grammar/agreement"),
    ("The cat sits.", "The cat sit.", "grammar/agreement"),
    ("The bird walks every day.", "The horse walks every day.", "meaning/subject"),
]


def rec(i: int, clean: str, corrupt: str, category: str = "grammar/agreement", **extra) -> dict:
    return {"id": f"p{i}", "clean": clean, "corrupt": corrupt, "category": category, **extra}


def valid_records(start: int = 0) -> list[dict]:
    return [rec(start + i, c, x, cat) for i, (c, x, cat) in enumerate(VALID)]


def jsonl(records: list) -> bytes:
    return "".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n"
                   for r in records).encode("utf-8")


LONG = " ".join(["word"] * (N_CTX + 10)) + "."


# ----------------------------------------------------------------------- outcomes


@dataclass(frozen=True)
class Err:
    """Exit 2, one line ``error: FILE[:LINE]: ...`` containing ``msg``; nothing written."""

    line: int | None
    msg: str


@dataclass(frozen=True)
class Ok:
    """Exit 0; ``valid`` pairs kept, ``rejected`` counted by reason in the outputs."""

    valid: int
    rejected: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Skip:
    why: str


@dataclass
class Case:
    name: str
    content: bytes
    expect: dict  # command -> Err | Ok | Skip; "*" is the default
    suffix: str = ".jsonl"

    def outcome(self, cmd: str):
        return self.expect.get(cmd, self.expect.get("*"))


# The resume file of `ec generate` is the generator's own log: every line in it must be a
# valid pair under the target tokenizer, so a rejectable pair there is an error naming its line.
NOT_SINGLE = "not a single-token change under this tokenizer"
ALL_REJECTED = "none of the"
HEAVY = ("cache", "patch", "run")  # cells that run the model are kept for the cases that differ

CASES = [
    Case("empty file", b"", {"*": Err(None, "file is empty"), "generate": Ok(0)}),
    Case("whitespace-only file", b"\n  \n\t\n", {"*": Err(None, "file is empty"), "generate": Ok(0)}),
    Case("invalid JSON at line 3", jsonl([*valid_records()[:2], '{"id": "p9", "clean": "The dog runs.",',
                                          valid_records()[2]]),
         {"*": Err(3, "invalid JSON")}),
    Case("UTF-8 BOM", b"\xef\xbb\xbf" + jsonl(valid_records()), {"*": Ok(3), "patch": Skip("as diff")}),
    Case("non-UTF-8 bytes at line 2", jsonl(valid_records()[:1]) + b'{"clean": "caf\xe9", "corrupt": "x"}\n',
         {"*": Err(2, "not UTF-8")}),
    Case("missing field", jsonl([valid_records()[0], {"id": "p1", "clean": "The cat sits."}]),
         {"*": Err(2, "missing field 'corrupt'")}),
    Case("extra field", jsonl([valid_records()[0], rec(1, "The cat sits.", "The cat sit.", label=1)]),
         {"*": Err(2, "unknown field(s) 'label'")}),
    Case("wrong type: number", jsonl([valid_records()[0], rec(1, 42, "The cat sit.")]),
         {"*": Err(2, "field 'clean' must be a string, got int")}),
    Case("wrong type: list record", jsonl([valid_records()[0], ["The cat sits.", "The cat sit."]]),
         {"*": Err(2, "expected a JSON object, got list")}),
    Case("wrong type: meta", jsonl([valid_records()[0], rec(1, "The cat sits.", "The cat sit.", meta="x")]),
         {"*": Err(2, "field 'meta' must be an object")}),
    Case("empty and whitespace-only sentences",
         jsonl([*valid_records(), rec(7, "", "The dog run."), rec(8, "The dog runs.", "   \t")]),
         {"*": Ok(3, {"empty": 2}), "generate": Err(4, NOT_SINGLE), "cache": Skip("as diff"),
          "run": Skip("as diff")}),
    Case("identical sentences", jsonl([*valid_records(), rec(7, "The dog runs.", "The dog runs.")]),
         {"*": Ok(3, {"identical": 1}), "generate": Err(4, NOT_SINGLE), "cache": Skip("as diff"),
          "run": Skip("as diff")}),
    Case("longer than the model's context", jsonl([*valid_records(), rec(7, LONG, LONG[:-1] + "!")]),
         {"*": Ok(3, {"too_long": 1}), "generate": Err(4, NOT_SINGLE), "cache": Skip("as diff"),
          "run": Skip("as diff")}),
    Case("every pair rejected",
         jsonl([rec(0, "", "The dog run."), rec(1, "The dog runs.", "The dog runs."),
                rec(2, "The cat sat on the mat.", "A cat sat on a mat.")]),
         {"*": Err(None, ALL_REJECTED), "generate": Err(1, NOT_SINGLE)}),
    Case("Japanese and emoji",
         jsonl([rec(0, "日本語の文です。", "日本語の本です。", "meaning/noun"),
                rec(1, "猫が座った。", "犬が座った。", "meaning/subject"),
                rec(2, "I love 🍕 today.", "I love 🍔 today.", "meaning/object"),
                rec(3, "Café au lait 😀 is good.", "Café au lait 😀 is bad.", "meaning/adjective")]),
         {"*": Ok(3, {"multiple_differences": 1}), "generate": Err(2, NOT_SINGLE), "run": Skip("as UTF-8 BOM")}),
    Case("duplicate ids", jsonl([*valid_records(), rec(1, "The man walks.", "The man walk.")]),
         {"*": Err(4, "duplicate pair id 'p1' (first at line 2)")}),
    Case("CSV: row with extra fields", b"id,clean,corrupt\na,The dog runs.,The dog run.\nb,x,y,z\n",
         {"*": Err(3, "more fields than the header"), "generate": Skip("resume files are JSONL")},
         suffix=".csv"),
    Case("study JSON: pair without sentence2",
         json.dumps({"diff_token_type": {"grammar": {"agreement": {"sentence_pairs": [
             {"sentence1": "The dog runs.", "sentence2": "The dog run."}, {"sentence1": "The cat sleeps."}]}}}}
                    ).encode(),
         {"*": Err(None, "sentence_pairs[1]: needs string fields"), "generate": Skip("resume files are JSONL")},
         suffix=".json"),
]
for _c in CASES:  # model-running cells only where the case takes a path of its own
    if isinstance(_c.outcome("diff"), Ok) and _c.name not in ("UTF-8 BOM", "Japanese and emoji",
                                                               "empty and whitespace-only sentences"):
        for _cmd in HEAVY:
            _c.expect.setdefault(_cmd, Skip("as diff"))


# ----------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tok():
    from eclens.model import load_tokenizer

    return load_tokenizer("smollm2-135m")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tok):
    """A random-weight 2-layer Llama with SmolLM2's tokenizer and a 64-token context, as a local folder."""
    from eclens.model import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama-ctx64"), vocab_from=tok, max_positions=N_CTX)


@pytest.fixture(scope="module")
def llm():
    from llm_server import LLMServer

    srv = LLMServer().start()
    yield srv
    srv.stop()


def argv_for(cmd: str, src: Path, out: Path, model: Path, llm_url: str) -> list[str]:
    m = ["--model", str(model)]
    if cmd == "check":
        return ["pairs", "check", str(src), *m, "--out", str(out / "aligned.jsonl"),
                "--rejected", str(out / "rejected.jsonl")]
    if cmd == "generate":
        return ["generate", "--source", "openai", "--out", str(src), *m, "--n", "2", "--categories", "typo",
                "--llm-model", "test-model", "--base-url", llm_url, "--pairs-per-request", "2",
                "--concurrency", "1", "--retry-base", "0.01"]
    if cmd == "cache":
        return ["cache", str(src), *m, "--out", str(out), "--hooks", "hook_resid_post"]
    if cmd == "diff":
        return ["diff", str(src), *m, "--out", str(out), "--hooks", "hook_resid_post", "--sample", "8"]
    if cmd == "patch":
        return ["patch", str(src), *m, "--out", str(out), "--hooks", "resid_pre", "--direction", "denoise"]
    if cmd == "run":
        return ["run", "--pairs", str(src), *m, "--out", str(out), "--hooks", "hook_resid_post",
                "--min-pairs", "1", "--exact-pairs", "1", "--dims-pairs", "2", "--max-sets", "1",
                "--n-controls", "4", "--attribution-pairs", "1", "--verify-top", "1", "--quiet"]
    raise AssertionError(cmd)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_unchanged(folder: Path, before: dict[str, bytes]) -> None:
    """Every file as it was. ``checksums.json`` may gain records of files rewritten byte for byte (the
    pairs a refused command re-checked before refusing), but keeps every record it had."""
    after = snapshot(folder)
    rec = "checksums.json"
    assert {k: v for k, v in after.items() if k != rec} == {k: v for k, v in before.items() if k != rec}
    if rec in before:
        old, new = json.loads(before[rec])["files"], json.loads(after[rec])["files"]
        assert all(new.get(k) == v for k, v in old.items()), "checksums.json lost or changed a record"
        assert all(after[k] == before[k] for k in new if k not in old and k in before)


def assert_whole_files(folder: Path) -> None:
    """No temporary file left behind, and every JSON/JSONL/CSV/safetensors output parses."""
    import pandas as pd
    from safetensors import safe_open

    assert not [p for p in folder.rglob("*.tmp")], "temporary file left behind"
    for p in folder.rglob("*"):
        if p.suffix == ".json":
            json.loads(p.read_text(encoding="utf-8"))
        elif p.suffix == ".jsonl":
            for line in p.read_text(encoding="utf-8-sig").splitlines():
                if line.strip():
                    json.loads(line)
        elif p.suffix == ".csv" and p.stat().st_size > 1:
            pd.read_csv(p)
        elif p.suffix == ".safetensors":
            with safe_open(str(p), framework="pt") as f:
                for k in f.keys():
                    f.get_tensor(k)


def reasons_in(path: Path) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        r = json.loads(line)["reason"]
        out[r] = out.get(r, 0) + 1
    return out


def n_lines(path: Path) -> int:
    return len(path.read_text(encoding="utf-8").splitlines())


# ----------------------------------------------------------------------- the table

# Only the cells that run: a Skip outcome means another cell already covers that path.
CELLS = [(c, cmd) for c in CASES for cmd in CMDS if not isinstance(c.outcome(cmd), Skip)]


@pytest.mark.parametrize("case, cmd", CELLS, ids=[f"{c.name}-{cmd}" for c, cmd in CELLS])
def test_bad_input_matrix(case: Case, cmd: str, tiny_dir, llm, tmp_path, capsys):
    want = case.outcome(cmd)
    src = tmp_path / f"pairs{case.suffix}"
    src.write_bytes(case.content)
    out = tmp_path / "out"
    if cmd == "check":
        out.mkdir()
    before = snapshot(tmp_path)
    rc = main(argv_for(cmd, src, out, tiny_dir, llm.base_url))
    cap = capsys.readouterr()
    assert "Traceback" not in cap.err + cap.out
    if isinstance(want, Err):
        assert rc == 2, (rc, cap.err[-2000:])
        last = cap.err.strip().splitlines()[-1]
        where = f"{src}:{want.line}: " if want.line is not None else f"{src}: "
        assert last.startswith(f"error: {where}"), last
        assert want.msg in last, last
        # Nothing written: the tree is exactly as before (the input itself untouched).
        assert snapshot(tmp_path) == before, "an error left output behind"
        return
    assert rc == 0, (rc, cap.err[-3000:])
    assert_whole_files(tmp_path)
    if cmd == "check":
        assert f"{want.valid} valid of {want.valid + sum(want.rejected.values())} pairs" in cap.out
        assert n_lines(out / "aligned.jsonl") == want.valid
        assert reasons_in(out / "rejected.jsonl") == want.rejected
    elif cmd == "generate":
        got = src.read_bytes()
        assert got.startswith(case.content.removeprefix(b"\xef\xbb\xbf")) or got.startswith(case.content)
        recs = [json.loads(x) for x in got.decode("utf-8-sig").splitlines() if x.strip()]
        assert sum(r["category"] == "typo" for r in recs) == 2  # topped up to --n for the asked category
        assert json.loads(src.with_suffix(".report.json").read_text())["complete"]
    else:
        assert n_lines(out / "pairs.jsonl") == want.valid
        rej = out / "rejected.jsonl"
        assert (reasons_in(rej) if rej.stat().st_size else {}) == want.rejected
        man = json.loads((out / "manifest.json").read_text())
        assert man["dataset"]["n_valid"] == want.valid
        expect_file = {"cache": "cache/index.json", "diff": "layers.parquet", "patch": "patch_exact.csv",
                       "run": "report.html"}[cmd]
        assert (out / expect_file).is_file()
        n_rej = sum(want.rejected.values())
        said = {"diff": f"{want.valid} valid of {want.valid + n_rej} pairs",
                "cache": f"{want.valid} valid of {want.valid + n_rej} pairs",
                "patch": f"{n_rej} of {want.valid + n_rej} pairs rejected" if n_rej else "",
                "run": f"{want.valid} valid pairs in"}[cmd]
        said_all = " ".join((cap.out + cap.err).split())
        assert said in said_all, said
        if cmd == "run":
            assert f"categories, {n_rej} rejected" in said_all


# ----------------------------------------------------------------------- as a user sees it


# one child process (~4 s of imports) each; `ec run` reads the file the same way, so it is in the slow set only
@pytest.mark.parametrize("cmd", ["diff", pytest.param("run", marks=pytest.mark.slow)])
def test_subprocess_error_is_one_line_without_traceback(cmd, tiny_dir, tmp_path):
    """What reaches the terminal: exactly one line on stderr, exit 2, nothing written."""
    src = tmp_path / "bad.jsonl"
    src.write_bytes(jsonl(valid_records()[:1]) + b'{"clean": "caf\xe9", "corrupt": "x"}\n')
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    r = subprocess.run([sys.executable, "-m", "eclens", *argv_for(cmd, src, out, tiny_dir, "")],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2
    assert re.fullmatch(rf"error: {re.escape(str(src))}:2: not UTF-8 \(byte \d+\); save the file as UTF-8",
                        r.stderr.strip()), r.stderr
    assert not out.exists()


# Every command that reads a pairs file, on one bad file, in one child process (this one has imported torch).
EARLY = ("import sys\nfrom eclens.cli import main\nbad, out = sys.argv[1:]\n"
         "for argv in (['diff', bad], ['cache', bad, '--out', out], ['patch', bad, '--out', out],\n"
         "             ['run', '--pairs', bad, '--out', out], ['pairs', 'check', bad]):\n"
         "    print(argv[0], main(argv), 'torch' in sys.modules, flush=True)\n")


def test_a_bad_pairs_file_fails_before_torch_is_imported(tmp_path):
    """The one-line error comes before torch, transformers and scipy are imported (2-3 s of a 3-s wait on this
    machine before), so a typo in a file is a second's round trip, and nothing is written."""
    src = tmp_path / "bad.jsonl"
    src.write_bytes(jsonl(valid_records()[:1]) + b'{"id": "x", "clean": "The cat sat."}\n')
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    r = subprocess.run([sys.executable, "-c", EARLY, str(src), str(out)], capture_output=True, text=True, env=env,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split("\n")[:-1] == [f"{c} 2 False" for c in ("diff", "cache", "patch", "run", "pairs")]
    lines = r.stderr.strip().splitlines()
    assert lines == [f"error: {src}:2: missing field 'corrupt'"] * 5, r.stderr
    assert not out.exists()


# ----------------------------------------------------------------------- 100,000 pairs


# `ec` in a child process that reports its own peak memory at exit. VmHWM (Linux) is the
# high-water mark of this process image; ru_maxrss survives exec, so a child forked from a
# pytest process that holds a model would report the parent's peak instead.
MEASURED = ("import resource, sys\nfrom eclens.cli import main\nrc = main(sys.argv[1:])\n"
            "try:\n    kib = next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM:'))\n"
            "except OSError:\n    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            "print('MAXRSS_KIB', kib, file=sys.stderr)\nsys.exit(rc)")


@pytest.mark.slow  # ~25-40 s: tokenizing 200,000 sentences on a shared 2-core CPU
def test_pairs_check_100k_pairs_time_and_memory(tiny_dir, tmp_path):
    """`ec pairs check` on 100,000 pairs needs only the tokenizer: bounded time and memory."""
    words = ["dog", "cat", "bird", "horse", "man", "girl", "boy", "child", "car", "tree", "fish", "cow"]
    src = tmp_path / "big.jsonl"
    with open(src, "w", encoding="utf-8") as fh:
        for i in range(100_000):
            a, b = words[i % 12], words[(i // 12) % 12]
            fh.write(json.dumps({"id": f"p{i}", "clean": f"The {a} saw the {b} number {i} today.",
                                 "corrupt": f"The {a} saw a {b} number {i} today.", "category": f"c{i % 7}"}) + "\n")
        fh.write(json.dumps({"id": "bad", "clean": "The dog runs.", "corrupt": "The dog runs."}) + "\n")
    out = tmp_path / "aligned.jsonl"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", MEASURED, "pairs", "check", str(src), "--model", str(tiny_dir),
                        "--out", str(out), "--show", "1"], capture_output=True, text=True, env=env, timeout=600)
    seconds = time.perf_counter() - t0
    rss_mib = int(r.stderr.rsplit("MAXRSS_KIB ", 1)[1].split()[0]) / 1024
    print(f"ec pairs check, 100,001 pairs: {seconds:.1f} s, peak RSS {rss_mib:.0f} MiB")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "100000 valid of 100001 pairs" in r.stdout
    assert "loaded" not in r.stderr  # the model's weights are never loaded for a check
    assert n_lines(out) == 100_000
    assert seconds < 300 and rss_mib < 2048


# ----------------------------------------------------------------------- corrupt files on disk


@pytest.fixture(scope="module")
def small_pairs_file(tmp_path_factory) -> Path:
    words = ["dog", "man", "girl", "boy", "child", "car", "tree", "fish"]
    recs = [rec(i, f"The {w} runs.", f"The {w} run.", "a" if i % 2 else "b") for i, w in enumerate(words)]
    p = tmp_path_factory.mktemp("small") / "pairs.jsonl"
    p.write_bytes(jsonl(recs))
    return p


def one_line_error(rc: int, err: str, *needles: str) -> str:
    assert rc == 2, err[-2000:]
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: "), last
    for n in needles:
        assert n in last, (n, last)
    return last


def truncate(path: Path, keep: float = 0.5) -> None:
    os.truncate(path, int(path.stat().st_size * keep))


def test_truncated_cache_shard_is_refused_then_rewritten(tiny_dir, small_pairs_file, tmp_path, capsys):
    from eclens.cache import open_cache
    from eclens.errors import EclensError

    run = tmp_path / "run"
    argv = ["cache", str(small_pairs_file), "--model", str(tiny_dir), "--out", str(run), "--shard-size", "2",
            "--batch-size", "2", "--hooks", "hook_resid_post"]
    assert main(argv) == 0
    shard = run / "cache" / "shard-00001.safetensors"
    good = shard.read_bytes()
    truncate(shard)
    capsys.readouterr()
    # Reading it: one line naming the shard, nothing written.
    rc = main(["diff", "--from-cache", str(run)])
    one_line_error(rc, capsys.readouterr().err, str(shard), "rerun `ec cache`")
    assert not (run / "layers.parquet").exists() and not (run / STATS_FILE).exists()
    store = open_cache(run)
    with pytest.raises(EclensError, match="shard-00001"):
        store.get("blocks.0.hook_resid_post", store.pairs[2].id)
    # Resuming the cache: refused, never skipped as if whole.
    rc = main(argv)
    one_line_error(rc, capsys.readouterr().err, str(shard))
    assert shard.stat().st_size < len(good)
    # Deleted as the message says, the same command rewrites it, bit for bit.
    shard.unlink()
    assert main(argv) == 0
    assert shard.read_bytes() == good
    capsys.readouterr()
    assert main(["diff", "--from-cache", str(run)]) == 0


def test_corrupt_cache_index_is_refused(tiny_dir, small_pairs_file, tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["cache", str(small_pairs_file), "--model", str(tiny_dir), "--out", str(run), "--shard-size", "4",
            "--hooks", "hook_resid_post"]
    assert main(argv) == 0
    index = run / "cache" / "index.json"
    truncate(index)
    capsys.readouterr()
    one_line_error(main(argv), capsys.readouterr().err, str(index))
    one_line_error(main(["diff", "--from-cache", str(run)]), capsys.readouterr().err, str(index))


@pytest.mark.parametrize("complete", [True, False], ids=["finished", "checkpoint"])
def test_truncated_diff_statistics_are_refused(complete, tiny_dir, small_pairs_file, tmp_path, capsys):
    from eclens.diff import DiffResult
    from eclens.errors import EclensError

    run = tmp_path / "run"
    argv = ["diff", str(small_pairs_file), "--model", str(tiny_dir), "--out", str(run), "--hooks",
            "hook_resid_post", "--batch-size", "2", "--checkpoint-every", "1", "--keep-state"]
    if complete:
        assert main(argv) == 0
    else:
        from eclens.diff import prepare_run_pairs, run_diff
        from eclens.model import load_model

        m = load_model(str(tiny_dir))
        aligned, _ = prepare_run_pairs(m, small_pairs_file, run)
        from eclens.model import manifest_model_entry
        from eclens.runs import update_manifest

        run_diff(m, aligned, hooks="hook_resid_post", batch_size=2, run=run, max_batches=2)
        update_manifest(run, model=manifest_model_entry(m), world_size=1)  # as `ec diff` records it
    stats_file = run / STATS_FILE
    truncate(stats_file)
    before = snapshot(run)
    capsys.readouterr()
    one_line_error(main(argv), capsys.readouterr().err, str(stats_file), "delete it")
    assert_unchanged(run, before)
    with pytest.raises(EclensError, match="unreadable|corrupt"):  # the checksum sees a cut-short file first
        DiffResult.load(run)


OTHER_MODEL = {"name": "meta-llama/Meta-Llama-3-8B", "weights_hash": "0123456789abcdef"}


@pytest.mark.parametrize("cmd", ["cache", "diff", "patch", "run"])
@pytest.mark.parametrize("what", ["another model", "another eclens version"])
def test_run_folder_of_another_model_or_version_is_refused(what, cmd, tiny_dir, small_pairs_file, tmp_path,
                                                           capsys):
    from eclens.runs import update_manifest

    run = tmp_path / "run"
    man = update_manifest(run, model=OTHER_MODEL) if what == "another model" else update_manifest(run)
    if what == "another eclens version":
        (run / "manifest.json").write_text(json.dumps({**man, "eclens_version": "0.0.1"}), encoding="utf-8")
    before = snapshot(run)
    rc = main(argv_for(cmd, small_pairs_file, run, tiny_dir, ""))
    needle = "Meta-Llama-3-8B" if what == "another model" else "made by eclens 0.0.1"
    one_line_error(rc, capsys.readouterr().err, str(run / "manifest.json"), needle, "another --out")
    assert_unchanged(run, before)  # nothing mixed in


def test_cache_and_statistics_of_another_model_without_a_manifest(tiny_dir, small_pairs_file, tmp_path, capsys):
    """The cache index and the diff statistics carry their model too: refused even if the manifest is gone."""
    run = tmp_path / "run"
    base = ["--model", str(tiny_dir), "--out", str(run), "--hooks", "hook_resid_post"]
    assert main(["cache", str(small_pairs_file), *base]) == 0
    assert main(["diff", str(small_pairs_file), *base, "--keep-state"]) == 0
    index = run / "cache" / "index.json"
    doc = json.loads(index.read_text())
    doc["model"] = OTHER_MODEL
    index.write_text(json.dumps(doc))
    from safetensors.torch import load_file, save_file

    stats_file = run / STATS_FILE
    from safetensors import safe_open

    with safe_open(str(stats_file), framework="pt") as f:
        meta = dict(f.metadata())
    key = next(k for k in meta if "model" in meta[k])
    inner = json.loads(meta[key])
    inner["model"] = OTHER_MODEL
    inner["complete"] = False
    meta[key] = json.dumps(inner)
    save_file(load_file(str(stats_file)), str(stats_file), metadata=meta)
    (run / "manifest.json").unlink()
    # files copied in from another run come without its records (with them, the checksum refuses them first)
    for rec in run.rglob("checksums*.json"):
        rec.unlink()
    capsys.readouterr()
    one_line_error(main(["cache", str(small_pairs_file), *base]), capsys.readouterr().err, str(index),
                   "Meta-Llama-3-8B")
    one_line_error(main(["diff", str(small_pairs_file), *base]), capsys.readouterr().err, str(stats_file),
                   "Meta-Llama-3-8B")
