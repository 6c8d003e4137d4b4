"""The second-edition study (experiments/error_correction_v2) end to end on two tiny random-weight models,
its decision rules on planted tables, and the README's headline numbers traced to results/."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

STUDY = Path(__file__).resolve().parents[1] / "experiments" / "error_correction_v2"
BLIMP = Path(__file__).resolve().parents[2] / "shared" / "data" / "blimp"


def _module(name: str):
    sys.path.insert(0, str(STUDY))
    spec = importlib.util.spec_from_file_location(name, STUDY / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("study_v2")
    args = [sys.executable, str(STUDY / "run_study.py"), "--smoke", "--out", str(out)]
    if BLIMP.is_dir():
        args += ["--blimp", str(BLIMP)]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


@pytest.mark.slow
def test_smoke_study_runs_every_step_and_decides_every_hypothesis(smoke):
    doc = json.loads((smoke / "results" / "study.json").read_text())
    steps = set(doc["steps"])
    assert {"pairs", "run:tiny-0", "run:tiny-1", "typos:tiny-0", "typos:tiny-1", "compare", "analysis",
            "figures", "readme"} <= steps
    for name in ("recovery_curves", "probe", "patch_skip", "run_steps", "llama3_8b_estimate", "typos_recovery_index"):
        t = pd.read_csv(smoke / "results" / f"{name}.csv")
        assert len(t) and ("model" in t.columns or name == "llama3_8b_estimate"), name
    est = pd.read_csv(smoke / "results" / "llama3_8b_estimate.csv")
    assert {"diff", "measure", "exact", "dims", "skip", "baseline"} <= set(est["step"]) and (est["seconds"] > 0).all()
    hyp = pd.read_csv(smoke / "results" / "hypotheses.csv")
    assert set(hyp["hypothesis"]) == {"H1", "H2", "H3", "H4", "H5", "H6"}
    assert set(hyp["verdict"]) <= {"supported", "refuted", "inconclusive"}
    assert (smoke / "results" / "compare.html").stat().st_size > 10_000
    readme = (smoke / "README.md").read_text()
    assert "Smoke run" in readme and "## The answer" in readme


@pytest.mark.slow
def test_every_headline_number_of_the_readme_is_in_results(smoke):
    wr = _module("write_readme")
    readme = (smoke / "README.md").read_text()
    answer = readme.split("## The answer", 1)[1].split("##", 1)[0]
    nums = wr.headline_numbers(smoke / "results")
    assert len(nums) == 24  # H1-H4 x estimate, low, high x 2 models
    for text, file, row in nums:
        assert (smoke / file).exists(), file
        assert text in answer, (text, row)


def _recovery_pairs(effect: float, n_clusters: int = 30, seed: int = 0) -> pd.DataFrame:
    """Per-pair decay rows: errors' log decay at the last token ``effect`` below their twins' (plus noise)."""
    rng = np.random.default_rng(seed)
    rows = []
    for c in range(n_clusters):
        base = rng.normal(-1, 0.5)
        for role, shift in (("error", effect), ("twin", 0.0)):
            d = base + shift + rng.normal(0, 0.05)
            rows.append({"id": f"{c}{role}", "category": "grammar/agreement", "cluster": f"f{c}", "role": role,
                         "p": 2, "detect": 2, "length": 8, "suffix_changed": -1.0 + rng.normal(0, 0.1),
                         "suffix_ignore_mean": -3.0, "suffix_ignore_delete": -3.5,
                         **{f"decay_{k}": d for k in ("1", "2", "3", "4", "last")}})
    return pd.DataFrame(rows)


@pytest.mark.parametrize("effect,verdict", [(-0.8, "supported"), (0.8, "refuted"), (0.0, "refuted")])
def test_h1_rule_finds_the_planted_recovery_and_nothing_else(tmp_path, effect, verdict):
    """Planted: errors fade faster (supported), slower (refuted), or the same (refuted: inside ±0.1)."""
    H = _module("hypotheses")
    _recovery_pairs(effect).to_csv(tmp_path / "recovery_pairs.csv", index=False)
    r = H.h1_recovery("m", tmp_path)
    assert r["verdict"] == verdict, r
    assert abs(r["estimate"] - effect) < 0.1


def test_h3_rule_against_the_permutation_null(tmp_path):
    H = _module("hypotheses")
    inv = {"reached": 1000, "invariant": 12, "specific": 0, "null_invariant": [0] * 20, "null_specific_max": 0}
    (tmp_path / "measure.json").write_text(json.dumps({"invariance_summary": inv}))
    assert H.h3_invariance("m", tmp_path)["verdict"] == "supported"
    inv["null_invariant"] = [15] * 20
    (tmp_path / "measure.json").write_text(json.dumps({"invariance_summary": inv}))
    assert H.h3_invariance("m", tmp_path)["verdict"] == "refuted"
    inv["null_invariant"] = [0, 0, 0]  # above the null but three permutations cannot reach p < 0.05
    (tmp_path / "measure.json").write_text(json.dumps({"invariance_summary": inv}))
    assert H.h3_invariance("m", tmp_path)["verdict"] == "inconclusive"


@pytest.mark.slow
def test_figures_are_pngs_and_the_reports_sit_beside_them(smoke):
    from conftest import require

    require(Path("/usr/bin/chromium").exists(), "chromium not installed (bash scripts/setup.sh --browser)")
    doc = json.loads((smoke / "results" / "study.json").read_text())
    figs = doc["figures"]
    for name in ("recovery_curves", "recovery_index", "probe", "skip", "report_tiny-0", "report_tiny-1"):
        assert name in figs and not figs[name].startswith("skipped"), (name, figs.get(name))
        path = smoke / "figures" / figs[name]
        head = path.read_bytes()[:16]
        assert head[:8] == b"\x89PNG\r\n\x1a\n" if path.suffix == ".png" else head.lower().startswith(b"<!doctype"), name
    readme = (smoke / "README.md").read_text()
    assert "figures/recovery_curves.png" in readme and "## Corrections to the first edition" in readme
    assert "Estimate, not a measurement" in readme


def test_the_committed_readme_quotes_its_results(tmp_path):
    """The study as committed: every number of its answer is in results/hypotheses.csv, and the README is what
    write_readme.py makes of results/ now (no hand edits, no stale numbers)."""
    import shutil

    wr = _module("write_readme")
    readme = (STUDY / "README.md").read_text()
    answer = readme.split("## The answer", 1)[1].split("##", 1)[0]
    nums = wr.headline_numbers(STUDY / "results")
    assert len(nums) == 24
    for text, _file, row in nums:
        assert text in answer, (text, row)
    shutil.copytree(STUDY / "results", tmp_path / "results")
    again = wr.write_readme(tmp_path, _module("run_study").CONFOUND).read_text()
    assert again == readme


@pytest.mark.parametrize("smoke_mode", [False, True])
def test_study_runs_an_ec_command_in_a_child_process_or_in_this_one(tmp_path, capfd, smoke_mode):
    """The real study runs each `ec` command in a child process, the smoke run through the CLI's entry point in
    its own: both run the command, and a failed one stops the study with a line naming it."""
    rs = _module("run_study")
    study = rs.Study(tmp_path, rs.StudyConfig(models=["m"], smoke=smoke_mode))
    study.ec("model", "info", "--help")
    assert "--load-in-8bit" in capfd.readouterr().out  # the command's own help, from either process
    with pytest.raises(SystemExit, match=r"`.*ec model info --no-such-option` failed \(exit 2\)"):
        study.ec("model", "info", "--no-such-option")
