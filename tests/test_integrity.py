"""Checksummed run folders (issue 21, eclens.integrity): every shard, statistics, tensor and table file
has its digest recorded when written; readers refuse a flipped byte inside a file of the right length by
name, with how to recover; `ec verify RUN` says what is intact, corrupt or missing; a rerun after deleting
the corrupt file resumes. The run is a 2-layer random-weight Llama: `ec cache`, `ec diff`, `ec patch`."""

from __future__ import annotations

import shutil

import pytest

from eclens import integrity
from eclens.cli import main
from eclens.errors import EclensError
from eclens.pairs import write_jsonl

SENTENCES = [("The dog runs.", "The dog run.", "grammar/agreement"),
             ("The cat sits.", "The cat sit.", "grammar/agreement"),
             ("The boy eats.", "The boy eat.", "grammar/agreement"),
             ("The bird walks every day.", "The horse walks every day.", "meaning/subject")]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from eclens.model import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny-integrity"), max_positions=64)


@pytest.fixture(scope="module")
def made_run(tiny_dir, tmp_path_factory):
    """One run folder with cache shards, diff statistics and a patch tensor file (made once)."""
    tmp = tmp_path_factory.mktemp("integrity")
    raw = tmp / "raw.jsonl"
    write_jsonl(raw, [{"id": f"q{i}", "clean": c, "corrupt": x, "category": k} for i, (c, x, k) in enumerate(SENTENCES)])
    run = tmp / "run"
    common = ["--model", str(tiny_dir), "--batch-size", "2"]
    assert main(["cache", str(raw), "--out", str(run), "--shard-size", "2", *common]) == 0
    assert main(["diff", str(raw), "--out", str(run), *common, "--keep-state"]) == 0
    assert main(["patch", str(run), "--mode", "exact", "--model", str(tiny_dir), "--max-pairs", "1",
                 "--hooks", "resid_pre"]) == 0
    return run


@pytest.fixture
def run(made_run, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(made_run, dst, ignore=shutil.ignore_patterns(".eclens.lock"))
    integrity._VERIFIED.clear()  # the copy is a new file; this only keeps the test independent of order
    return dst


def flip(path, at: float = 0.5) -> None:
    b = bytearray(path.read_bytes())
    i = int(len(b) * at)
    b[i] ^= 0x01
    path.write_bytes(bytes(b))


@pytest.mark.slow  # the run fixture: `ec cache`, `ec diff` and `ec patch` on the tiny model, ~25 s on 2 loaded cores
def test_every_data_file_is_recorded_and_verifies(run, capsys):
    recs = integrity.records(run)
    for name in ("diff_directions.safetensors", "patch.safetensors", "layers.parquet",
                 "dims.parquet", "candidates.parquet", "patch_exact.csv", "pairs.jsonl"):
        assert name in recs and (run / name).is_file(), name
        assert recs[name][0]["digest"].startswith(integrity.algorithm() + ":")
    assert "diff_stats.safetensors" in integrity.records(run / "state")  # the state, in its own folder
    assert {"shard-00000.safetensors", "shard-00001.safetensors"} <= set(integrity.records(run / "cache"))
    capsys.readouterr()
    assert main(["verify", str(run)]) == 0
    out = capsys.readouterr().out
    assert "0 corrupt, 0 missing" in out
    assert all(c.status in ("intact", "unrecorded") for c in integrity.verify_run(run))


@pytest.mark.slow
@pytest.mark.parametrize("name,reader", [
    ("cache/shard-00001.safetensors", "cache"),
    ("state/diff_stats.safetensors", "stats"),
    ("patch.safetensors", "patch"),
    ("layers.parquet", "table"),
])
def test_a_flipped_byte_is_refused_by_name_and_a_rerun_resumes(run, tiny_dir, name, reader, capsys):
    target = run / name
    size = target.stat().st_size
    flip(target)
    assert target.stat().st_size == size  # the right length: only the digest can tell
    with pytest.raises(EclensError) as e:
        if reader == "cache":
            from eclens.cache import open_cache

            st = open_cache(run)
            st.get(st.hooks[0], 2)  # pair 2 lives in shard 1
        elif reader == "stats":
            from eclens.diff import load_stats

            load_stats(run)
        elif reader == "patch":
            from eclens.runs import merge_tensors

            merge_tensors(run / "patch.safetensors", {}, {})
        else:
            from eclens.runs import RunData

            _ = RunData(run).layers
    msg = str(e.value)
    assert str(target) in msg and "corrupt" in msg and "delete it and rerun" in msg and "\n" not in msg
    capsys.readouterr()
    assert main(["verify", str(run)]) == 1
    text = capsys.readouterr().out
    assert "corrupt" in text and target.name in text and "1 corrupt" in text
    # Recovery as the message says: delete it, rerun the command that wrote it.
    target.unlink()
    if reader == "stats":  # the state is no result: a deleted one is not missing
        assert main(["verify", str(run)]) == 0
    else:
        assert main(["verify", str(run)]) == 1 and "1 missing" in capsys.readouterr().out
    raw = run.parent / "raw.jsonl"
    write_jsonl(raw, [{"id": f"q{i}", "clean": c, "corrupt": x, "category": k}
                      for i, (c, x, k) in enumerate(SENTENCES)])
    common = ["--model", str(tiny_dir), "--batch-size", "2"]
    if reader == "cache":
        assert main(["cache", str(raw), "--out", str(run), "--shard-size", "2", *common]) == 0
    elif reader == "patch":
        assert main(["patch", str(run), "--mode", "exact", "--model", str(tiny_dir), "--max-pairs", "1",
                     "--hooks", "resid_pre"]) == 0
    else:
        assert main(["diff", str(raw), "--out", str(run), *common]) == 0
    capsys.readouterr()
    assert main(["verify", str(run)]) == 0, capsys.readouterr().out


@pytest.mark.slow
def test_a_cut_short_file_and_a_broken_index_are_reported(run, capsys):
    p = run / "diff_directions.safetensors"
    p.write_bytes(p.read_bytes()[:-10])
    (run / "cache" / "checksums.json").write_text("{not json")
    checks = {c.path.name: c for c in integrity.verify_run(run)}
    assert checks["diff_directions.safetensors"].status == "corrupt"
    assert "cut short" in checks["diff_directions.safetensors"].detail
    assert checks["checksums.json"].status == "corrupt"
    assert main(["verify", str(run)]) == 1


@pytest.mark.slow
def test_verification_is_once_per_file_per_process(run, monkeypatch):
    calls = []
    real = integrity.file_digest
    monkeypatch.setattr(integrity, "file_digest", lambda p, n=None: calls.append(p) or real(p, n))
    for _ in range(3):
        integrity.verify_file(run / "dims.parquet")
    assert len(calls) == 1
    flip(run / "dims.parquet")  # a new version (mtime, maybe size) is checked again
    with pytest.raises(EclensError):
        integrity.verify_file(run / "dims.parquet")


def test_a_rename_pending_accepts_old_and_new(tmp_path):
    """A kill between the rename and the final record leaves a folder that verifies either way."""
    import torch

    from eclens.runs import save_tensors

    p = tmp_path / "x.safetensors"
    save_tensors({"a": torch.zeros(3)}, p)
    old = p.read_bytes()
    tmp = tmp_path / ".x.tmp"
    save_tensors({"a": torch.ones(3)}, tmp)
    integrity.expect(p, tmp)  # recorded as pending, not yet renamed
    assert integrity.check_file(p).status == "intact"
    p.write_bytes(tmp.read_bytes())  # renamed, killed before settle
    assert integrity.check_file(p).status == "intact"
    assert old != p.read_bytes()


def test_old_runs_without_checksums_still_read(tmp_path):
    import pandas as pd

    from eclens.runs import RunData

    pd.DataFrame({"layer": [0], "x": [1.0]}).to_csv(tmp_path / "layers.csv", index=False)
    assert RunData(tmp_path).layers is not None
    assert [c.status for c in integrity.verify_run(tmp_path)] == ["unrecorded"]


def test_a_flipped_byte_in_a_stats_file_is_refused_without_a_model(tmp_path):
    """The fast tier's check: a statistics file written through the library, one bit flipped."""
    import torch

    from eclens.diff import load_stats
    from eclens.diff.stats_io import save_stats

    save_stats(tmp_path, {"count": torch.arange(1000, dtype=torch.float64)}, {"complete": True})
    assert load_stats(tmp_path)[1] == {"complete": True}
    p = tmp_path / "state" / "diff_stats.safetensors"
    flip(p, 0.9)  # inside the tensor data: safetensors itself would read it as another number
    with pytest.raises(EclensError, match=r"diff_stats.safetensors: corrupt .* delete it and rerun `ec diff"):
        load_stats(tmp_path)
    assert [c.status for c in integrity.verify_run(tmp_path)] == ["corrupt"]


def test_a_reader_racing_a_writer_is_not_told_corrupt(tmp_path):
    """Readers take no lock: the record they read may be one version behind the file they hash."""
    import torch

    from eclens.runs import save_tensors

    p = tmp_path / "x.safetensors"
    save_tensors({"a": torch.zeros(8)}, p)
    stale = integrity.records(tmp_path)["x.safetensors"]
    save_tensors({"a": torch.ones(8)}, p)  # a new version and its record, after the reader looked
    assert integrity.check_file(p, stale).status == "intact"
    flip(p, 0.95)
    assert integrity.check_file(p, stale).status == "corrupt"
