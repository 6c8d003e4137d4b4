"""Issue 20, storage: results apart from state, state deleted when a run completes (or kept), the tables at
their declared precision, and every reader working from the tables once the state is gone."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from eclens.diff import STATS_FILE, DiffConfig, DiffResult, run_diff
from eclens.errors import EclensError
from eclens.integrity import verify_run
from eclens.pairs import write_jsonl
from eclens.runs import RunData, read_manifest
from eclens.state import STATE_DIR, TRASH, clean_trash, finish_state
from eclens.tables import DERIVED, F16_ATOL, F16_RTOL, F32_RTOL, PRECISION, narrow, read_table_file
from test_diff import make_pairs, small_pairs


@pytest.fixture(scope="module")
def diff_run(tiny, tmp_path_factory):
    """A diff of 24 pairs with the tiny model, saved into a run folder: (result in memory, folder)."""
    pairs = make_pairs(tiny, small_pairs(tiny.tokenizer))
    res = run_diff(tiny, pairs, batch_size=8, sample_size=16, categories=sorted({a.category for a in pairs}),
                   min_pairs=2)
    run = tmp_path_factory.mktemp("storage") / "run"
    res.save(run)
    return res, run


def _close(got: pd.Series, want: pd.Series, rtol: float, atol: float, name: str) -> None:
    g, w = got.to_numpy(np.float64), want.to_numpy(np.float64)
    assert np.array_equal(np.isnan(g), np.isnan(w)), name
    ok = ~np.isnan(w)
    err = np.abs(g[ok] - w[ok])
    assert (err <= rtol * np.abs(w[ok]) + atol).all(), (name, float(err.max()))


def test_tables_read_back_within_the_declared_precision(diff_run):
    res, run = diff_run
    spec = PRECISION["dims.parquet"]
    dims = read_table_file(run / "dims.parquet")
    want = res.dims
    assert set(dims.columns) == set(want.columns) and len(dims) == len(want)
    raw = pd.read_parquet(run / "dims.parquet")
    assert not set(spec["derived"]) & set(raw.columns)  # derived columns are not stored
    sigma = want["sigma_clean"].to_numpy(np.float64)
    for c in want.columns:
        if c in spec["float16"]:
            assert raw[c].dtype == np.float16, c
            _close(dims[c], want[c], F16_RTOL, F16_ATOL, c)
        elif c in spec["float32"]:
            assert raw[c].dtype == np.float32, c
            _close(dims[c], want[c], F32_RTOL, 0.0, c)
        elif c in DERIVED:
            # the float16 error of its input (relative, plus the subnormal step over σ), and float32's of σ
            with np.errstate(divide="ignore"):
                atol = np.where(sigma > 0, F16_ATOL / sigma, 0.0)
            g, w = dims[c].to_numpy(np.float64), want[c].to_numpy(np.float64)
            assert np.array_equal(np.isnan(g), np.isnan(w)), c
            ok = ~np.isnan(w)
            assert (np.abs(g - w)[ok] <= (F16_RTOL + 2 * F32_RTOL) * np.abs(w[ok]) + atol[ok]).all(), c
        else:
            assert (dims[c].to_numpy() == want[c].to_numpy()).all(), c
    cand = read_table_file(run / "candidates.parquet")
    assert len(cand) == len(res.candidates) > 0
    for c in res.candidates.columns:
        if pd.api.types.is_float_dtype(res.candidates[c]):
            _close(cand[c], res.candidates[c], F32_RTOL, 0.0, c)
        else:
            assert (cand[c].to_numpy() == res.candidates[c].to_numpy()).all(), c
    # tables without a declared change come back exactly
    pd.testing.assert_frame_equal(read_table_file(run / "layers.parquet"), res.layers, check_dtype=False)
    pd.testing.assert_frame_equal(pd.read_parquet(run / "contrasts.parquet"), res.contrasts, check_dtype=False)
    assert not (run / "layers.csv").exists() and not (run / "candidates.csv").exists()


def test_narrow_keeps_values_beyond_float16_at_float32():
    df = pd.DataFrame({"mean_clean": [1.0, 7.0e4], "mean_delta": [1e-3, np.nan], "z_mean": [0.1, 0.2]})
    out = narrow(df, "dims.parquet")
    assert out["mean_clean"].dtype == np.float32 and out["mean_clean"].iloc[1] == 7.0e4
    assert out["mean_delta"].dtype == np.float16 and np.isnan(out["mean_delta"].iloc[1])
    assert "z_mean" not in out  # derived: not stored


def test_stored_table_equals_the_narrowed_frame_across_blocks():
    """dims.parquet's table made block by block holds what narrow() makes of the whole frame: a float16 column
    with a value beyond float16's range in one block only is float32 in every block."""
    from eclens.diff.tables import frame
    from eclens.tables import stored_block, stored_table

    rng = np.random.default_rng(0)
    blocks = [{"category": c, "hook": "h", "layer": np.arange(n), "n": n, "mean_clean": rng.normal(size=n) * scale,
               "mean_delta": rng.normal(size=n), "sigma_clean": rng.uniform(0.1, 2, n), "z_mean": rng.normal(size=n)}
              for c, n, scale in (("all", 5, 1.0), ("a", 3, 1e5), ("all", 4, 1.0))]
    got = stored_table([stored_block(b, "dims.parquet") for b in blocks], "dims.parquet").to_pandas()
    want = narrow(frame(blocks), "dims.parquet")
    pd.testing.assert_frame_equal(got, want, check_exact=True)
    assert got["mean_clean"].dtype == np.float32 and got["mean_delta"].dtype == np.float16 and "z_mean" not in got


@pytest.mark.parametrize("values,lengths", [(["hook_resid_pre"], [17280]), (["a", "bé", "", "日本"], [3, 0, 2, 5]),
                                             (["x", "x"], [0, 0]), ([], [])])
def test_repeated_strings_is_the_expanded_list_as_arrow_strings(values, lengths):
    """Built from its buffers: the same array (type, values, valid) as Arrow makes of the expanded Python list,
    multi-byte characters and empty strings included."""
    import pyarrow as pa

    from eclens.tables import repeated_strings

    got = repeated_strings(values, lengths)
    got.validate(full=True)
    assert got.equals(pa.array([v for v, k in zip(values, lengths) for _ in range(k)], type=pa.large_string()))


def test_storage_estimate_flushes_where_the_accumulator_does():
    """scripts/estimate_storage.py (plain arithmetic, no eclens import) keeps its own copy of the pairs per state
    row after which the feature sums become float64: it must be the accumulator's."""
    import importlib.util

    from eclens.diff.accumulate import DiffAccumulator

    path = Path(__file__).resolve().parents[1] / "scripts" / "estimate_storage.py"
    spec = importlib.util.spec_from_file_location("estimate_storage", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.FLUSH_PAIRS == DiffAccumulator.flush_pairs


def test_readers_find_old_csv_tables(tmp_path):
    """A run folder from before issue 20 (candidates.csv, layers.csv) reads as before."""
    pd.DataFrame({"layer": [0, 1], "rel_l2_mean": [0.5, 0.25]}).to_csv(tmp_path / "layers.csv", index=False)
    rd = RunData(tmp_path)
    assert rd.file("layers.parquet") == tmp_path / "layers.csv"
    assert list(rd.layers["rel_l2_mean"]) == [0.5, 0.25]
    assert rd.candidates is None


def _pipeline(tiny, run: Path, pairs_file: Path, keep: bool, log):
    from eclens.diff import DiffConfig
    from eclens.pipeline import Step, run_steps
    from eclens.steps import diff_step, pairs_step, report_step

    cfg = DiffConfig(hooks="hook_resid_post", sample_size=16, min_pairs=2)
    steps = [Step("pairs", lambda r, m, p, progress, log: pairs_step(r, m, pairs_file), {}, fixed=True),
             Step("diff", lambda r, m, p, progress, log: diff_step(r, m, p, cfg, batch_size=8, progress=False,
                                                                   write_state=keep), {}),
             Step("report", lambda r, m, p, progress, log: report_step(r, m, pair_views=False), {})]
    return run_steps(run, tiny, steps, log=log, progress=False, keep_state=keep)


def _pairs_file(tiny, tmp_path):
    pf = tmp_path / "pairs.jsonl"
    write_jsonl(pf, [{"id": f"r{i}", "clean": c, "corrupt": x, "category": cat}
                     for i, (c, x, cat) in enumerate(small_pairs(tiny.tokenizer, 12))])
    return pf


def test_state_deleted_when_the_run_completes_and_readers_use_the_tables(tiny, tmp_path):
    pf, run, lines = _pairs_file(tiny, tmp_path), tmp_path / "run", []
    _pipeline(tiny, run, pf, False, lines.append)
    assert not (run / STATE_DIR).exists() and not (run / TRASH).exists()
    rec = read_manifest(run)["state"]
    # not to be kept, so never written; the size it would have had is said and recorded
    assert rec == {"kept": False, "written": False, "bytes": read_manifest(run)["steps"]["diff"]["state"]["bytes"]}
    assert rec["bytes"] > 100_000
    assert any(ln.startswith("state not written:") and "--keep-state" in ln for ln in lines)
    assert [c.status for c in verify_run(run) if c.status != "intact"] == []
    rd = RunData(run)
    assert rd.layers is not None and rd.candidates is not None and rd.dims_slice() is not None
    assert (run / "report.html").stat().st_size > 0
    with pytest.raises(EclensError, match="was not written.*--keep-state") as e:
        DiffResult.load(run)
    assert "\n" not in str(e.value)
    # a rerun finds every step done (the state is no result) and changes nothing
    lines.clear()
    res = _pipeline(tiny, run, pf, False, lines.append)
    assert [s.status for s in res.steps] == ["skipped"] * 3 and not any("state" in ln for ln in lines)


@pytest.mark.slow  # three small diffs (~9 s alone); the deletion test runs the same engine in the fast subset
def test_the_tables_bar_counts_each_hook_and_the_files(tiny, tmp_path, capsys):
    """After the streaming bar, ``diff_step(progress=True)`` shows the finishing work (a third of ec diff at 225
    pairs on 2 cores): one step per hook's tables and one for the files, all done; quiet without progress."""
    from eclens.pairs import check_with_model, load_pairs
    from eclens.steps import diff_step

    pairs = check_with_model(load_pairs(_pairs_file(tiny, tmp_path)), tiny).valid
    hooks = "hook_resid_pre,hook_resid_post,hook_mlp_out"
    capsys.readouterr()
    done = diff_step(tmp_path / "quiet", tiny, pairs, DiffConfig(hooks=hooks), progress=False, write_state=False)
    assert "diff tables" not in capsys.readouterr().err
    n = len(done.value.hooks)
    assert n == 3
    diff_step(tmp_path / "run", tiny, pairs, DiffConfig(hooks=hooks), progress=True, write_state=False)
    err = capsys.readouterr().err
    assert "diff tables" in err and f"{n + 1}/{n + 1}" in err, err
    calls: list[int] = []  # a step as each hook is done, not all at the end
    run_diff(tiny, pairs, hooks=hooks).build_tables(on_hook=lambda: calls.append(1))
    assert len(calls) == n


@pytest.mark.slow  # a second small pipeline (17 s on 2 cores at load 18; the deletion test covers the engine)
def test_keep_state_keeps_it_and_says_its_size(tiny, tmp_path):
    pf, run, lines = _pairs_file(tiny, tmp_path), tmp_path / "run", []
    _pipeline(tiny, run, pf, True, lines.append)
    assert (run / STATS_FILE).is_file() and read_manifest(run)["state"]["kept"] is True
    assert any(ln.startswith("state kept:") for ln in lines)
    assert DiffResult.load(run).n_pairs == 12
    assert [c.status for c in verify_run(run) if c.status != "intact"] == []


def test_a_failure_while_the_tables_are_built_resumes_from_the_last_checkpoint(tiny, tmp_path, monkeypatch):
    """Without --keep-state the complete state is never written: a run that dies computing the tables resumes
    from the stream's last checkpoint (only the batches after it streamed again) and ends with the tables of
    a run that never failed."""
    from eclens.diff import DiffConfig
    from eclens.steps import diff_step

    pairs = make_pairs(tiny, small_pairs(tiny.tokenizer))  # 24 pairs, 6 batches of 4
    cfg = DiffConfig(hooks="hook_resid_post", sample_size=16, min_pairs=2)
    want = diff_step(tmp_path / "clean", tiny, pairs, cfg, batch_size=4, progress=False, write_state=False).value
    assert not (tmp_path / "clean" / STATE_DIR).exists()
    run = tmp_path / "run"

    def die(self, on_hook=None):
        raise RuntimeError("killed while the tables were built")

    monkeypatch.setattr(DiffResult, "build_tables", die)
    with pytest.raises(RuntimeError, match="killed"):
        diff_step(run, tiny, pairs, cfg, batch_size=4, checkpoint_every=4, progress=False, write_state=False)
    monkeypatch.undo()
    from eclens.diff.stats_io import load_stats

    _, meta = load_stats(run)
    assert meta["complete"] is False and len(meta["done"]) == 16  # the checkpoint after batch 4 of 6
    got = diff_step(run, tiny, pairs, cfg, batch_size=4, progress=False, write_state=False).value
    assert got.timing["resumed_from"] == 16
    for name in ("layers", "candidates", "sensitivity"):  # float32 batch sums flushed at other batches: ~1e-8
        pd.testing.assert_frame_equal(getattr(got, name), getattr(want, name), check_exact=False, rtol=1e-6)
    lines: list[str] = []
    assert finish_state(run, log=lines.append)["kept"] is False  # the checkpoint is deleted, and said
    assert not (run / STATE_DIR).exists() and lines[0].startswith("state deleted:")


def test_a_kill_mid_delete_leaves_a_clean_folder(diff_run, tmp_path):
    """Killed after the rename, before (or while) the files went: the folder verifies, and the next
    finish_state removes the rest."""
    import shutil

    _, src = diff_run
    run = tmp_path / "run"
    shutil.copytree(src, run)
    def wrong():  # what `ec verify` fails on, and anything it says about the half-deleted state
        return [c for c in verify_run(run) if c.status in ("corrupt", "missing")
                or (TRASH in c.path.parts and c.status != "intact")]

    (run / STATE_DIR).rename(run / TRASH)  # the rename done, nothing removed yet
    assert wrong() == []
    next(p for p in (run / TRASH).rglob("*.safetensors")).unlink()  # one data file removed, the index not
    assert wrong() == []
    assert finish_state(run, log=None) is None and not (run / TRASH).exists()
    clean_trash(run)  # nothing left: a no-op
