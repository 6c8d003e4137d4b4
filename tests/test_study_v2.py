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
            "readme"} <= steps
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
    assert len(nums) == 18  # H1-H3 x estimate, low, high x 2 models
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
