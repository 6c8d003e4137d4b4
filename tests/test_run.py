"""`ec run` end to end on the embedded model (a dozen pairs, few controls), resuming, bad input."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest

from _viewruns import XSS_ID, real_run  # noqa: F401 - session fixture
from eclens.cli import main
from eclens.errors import EclensError
from eclens.pipeline import STEPS, RunConfig, run_pipeline, spread_pairs
from eclens.tables import read_table_file

CONTRACT = ("manifest.json", "pairs.jsonl", "rejected.jsonl", "check.csv", "layers.parquet", "dims.parquet",
            "candidates.parquet", "contrasts.parquet", "sensitivity.csv", "pairs.csv", "summary.json", "patch_exact.csv", "patch_dims.csv",
            "patch_dims_controls.csv", "patch_attribution.csv", "patch_summary.json", "report.html")


def _config(run) -> RunConfig:
    cfg = json.loads((run / "manifest.json").read_text())["steps"]["run"]["config"]
    cfg["patch_hooks"] = tuple(cfg["patch_hooks"])
    return RunConfig(**cfg)


def test_ec_run_end_to_end(real_run):  # noqa: F811
    print(f"`ec {' '.join(real_run.argv)}` took {real_run.seconds:.1f} s")
    for f in CONTRACT:
        assert (real_run.path / f).is_file(), f"{f} missing"
    # progress for every step, then the summary table and the report path
    for i, step in enumerate(STEPS, start=1):
        assert f"[{i}/{len(STEPS)}] {step}:" in real_run.stderr
    for step in STEPS:
        assert step in real_run.stdout
    assert f"report: {real_run.path / 'report.html'}" in real_run.stdout
    man = json.loads((real_run.path / "manifest.json").read_text())
    assert set(man["steps"]["run"]["done"]) == set(STEPS)
    # The pairs file: template pairs (with their twins), the <script> pair and one the tokenizer rejects.
    n_pairs = len(real_run.pairs_file.read_text(encoding="utf-8").splitlines())
    assert man["dataset"]["n_pairs"] == n_pairs and man["dataset"]["n_valid"] == n_pairs - 1
    assert man["model"]["n_layers"] == 30
    check = pd.read_csv(real_run.path / "check.csv")
    assert check["total"].sum() == n_pairs and check["valid"].sum() == n_pairs - 1
    # the patch steps ran what was asked: one exact map (both directions), 2 sets x 10 controls, 3 attribution pairs
    exact = pd.read_csv(real_run.path / "patch_exact.csv")
    assert exact["pair_id"].nunique() == 1 and set(exact["direction"]) == {"denoise", "noise"}
    assert set(exact["hook"]) == {"hook_resid_pre"} and exact["layer"].nunique() == 30
    dims = pd.read_csv(real_run.path / "patch_dims.csv")
    ctrl = pd.read_csv(real_run.path / "patch_dims_controls.csv")
    assert len(dims) == 2 and (dims["n_controls"] == 10).all()
    # 10 uniform controls per set, and as many matched on sigma and the selection statistic where the cell has
    # dims to match (issue 19); --split -1 (in run_argv) keeps this small run's sets tested on all its pairs
    assert (ctrl["control_kind"] == "uniform").sum() == 20
    assert ctrl.groupby(["set", "control_kind"]).size().isin([10]).all()
    attr = pd.read_csv(real_run.path / "patch_attribution.csv")
    assert attr["pair_id"].nunique() == 3 and attr["verified"].any()
    # the measure step: recovery per pair and position, its headline line in the progress and the table
    rec = pd.read_csv(real_run.path / "recovery.csv")
    assert len(rec) and {"error", "twin"} <= set(rec["role"])
    i = STEPS.index("measure") + 1
    assert f"[{i}/{len(STEPS)}] measure: recovery index at the last token" in real_run.stderr
    for f in ("recovery_index.csv", "invariance.parquet", "probe.csv", "measure.json"):
        assert (real_run.path / f).is_file(), f
    assert "invariance_summary" in json.loads((real_run.path / "summary.json").read_text())


def test_rerun_skips_every_finished_step(real_run, model):  # noqa: F811
    before = {f: (real_run.path / f).stat().st_mtime_ns for f in CONTRACT if f != "manifest.json"}
    res = run_pipeline(real_run.path, model, _config(real_run.path), log=lambda s: None, progress=False)
    assert [s.status for s in res.steps] == ["skipped"] * len(STEPS)
    after = {f: (real_run.path / f).stat().st_mtime_ns for f in before}
    assert before == after


def test_changed_setting_redoes_that_step_and_later_only(real_run, model, tmp_path):  # noqa: F811
    run = tmp_path / "copy"
    shutil.copytree(real_run.path, run)
    cfg = _config(run)
    cfg.report_examples = 1
    res = run_pipeline(run, model, cfg, log=lambda s: None, progress=False)
    assert [s.status for s in res.steps] == ["skipped"] * (len(STEPS) - 1) + ["done"]
    html = (run / "report.html").read_text(encoding="utf-8")
    assert html.count('class="pair"') == 1


def test_other_pairs_are_refused(real_run, model):  # noqa: F811
    cfg = _config(real_run.path)
    cfg.pairs_file = None
    with pytest.raises(EclensError, match="made from other pairs"):
        run_pipeline(real_run.path, model, cfg, log=lambda s: None, progress=False)


def test_spread_pairs_takes_categories_in_turn(real_run):  # noqa: F811
    from eclens.pairs import load_aligned

    pairs = load_aligned(real_run.path / "pairs.jsonl")
    three = spread_pairs(pairs, 3)
    assert len({a.category for a in three}) == 3
    # Test pairs are a seeded random draw, stratified by category and cluster (issue 19): the first study's
    # "shortest first" made p+1 the final full stop of every tested pair, so the draw no longer follows length;
    # it is a function of the set of pairs (input order does not matter) and of the seed.
    assert [a.id for a in spread_pairs(pairs[::-1], 3)] == [a.id for a in three]
    assert spread_pairs(pairs, 1, seed=0)[0].id == three[0].id
    assert XSS_ID in {a.id for a in pairs}


@pytest.mark.parametrize("argv, msg", [
    (["run", "--pairs", "/nonexistent/pairs.jsonl"], "no such pairs file"),
    (["run", "--n", "0"], "--n must be at least 1"),
    (["run", "--metric", "accuracy"], "unknown --metric"),
])
def test_bad_input_is_one_line(argv, msg, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert msg in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_choose_sets_prefers_the_changed_token_and_both_kinds(real_run):  # noqa: F811
    from eclens.pipeline import choose_sets, dims_metric

    cand = read_table_file(real_run.path / "candidates.parquet")
    sets = choose_sets(cand, 4, 10)
    allc = cand[cand["category"] == "all"]
    offs = [s.offset if s.offset >= 0 else 10**6 for s in sets]
    for kind in ("stable", "responsive"):
        ks = [s for s in sets if s.kind == kind]
        # within a kind, nearer offsets first; each set is the group's best-ranked dims
        assert [s.offset if s.offset >= 0 else 10**6 for s in ks] == sorted(s.offset if s.offset >= 0 else 10**6
                                                                          for s in ks)
        for s in ks:
            g = allc[(allc["kind"] == kind) & (allc["hook"] == s.hook) & (allc["layer"] == s.layer)
                     & (allc["offset"] == s.offset)]
            # one swap direction per set (named in the label when it is not the pooled one)
            sd = s.label.split("[", 1)[1].split("]", 1)[0] if "[" in s.label else "all"
            if "swap_direction" in g.columns:
                g = g[g["swap_direction"] == sd]
            assert s.dims == sorted(g.sort_values("rank")["dim"].drop_duplicates().head(10).astype(int).tolist())
        if ks and ((allc["kind"] == kind) & (allc["offset"] == 0)).any():
            assert ks[0].offset == 0  # the changed token first
    assert [s.kind for s in sets[:2]] == ["stable", "responsive"] or len({s.kind for s in sets}) == 1
    assert dims_metric(sets, "logit_diff") == ("logit_diff" if all(o == 0 for o in offs) else "kl")
    assert dims_metric(sets, "logprob") == "logprob"
    assert choose_sets(cand.iloc[0:0], 2, 10) == []
