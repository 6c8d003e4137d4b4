"""The study script (experiments/error_correction_smollm2/run_study.py) end to end, smoke-sized, on the
embedded model and the real BLiMP files: every result file, the write-up generated from them, the BLiMP
accuracy cross-checked by hand, the causal table against its controls, the figures, and bad input."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from conftest import require

STUDY = Path(__file__).resolve().parents[1] / "experiments" / "error_correction_smollm2"
CHROMIUM = Path("/usr/bin/chromium")


def _module(name: str):
    if str(STUDY) not in sys.path:
        sys.path.insert(0, str(STUDY))
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, STUDY / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, blimp_dir):
    """The smoke run exactly as a user runs it: the script in a fresh interpreter (its own model load)."""
    rs = _module("run_study")
    out = tmp_path_factory.mktemp("study")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(STUDY / "run_study.py"), "--smoke", "--blimp", str(blimp_dir),
                           "--out", str(out), "--quiet"], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    print(f"smoke study took {time.perf_counter() - t0:.1f} s")
    doc = json.loads((out / "results" / "study.json").read_text(encoding="utf-8"))
    return rs, out, doc


@pytest.mark.slow
def test_smoke_study_writes_every_result(smoke):
    rs, out, doc = smoke
    R = out / "results"
    for f in ("study.json", "datasets.csv", "blimp_yield.csv", "layers_all.csv", "layers_by_category.csv",
              "candidate_counts.csv", "candidate_consistency.csv", "massive_dims.csv", "contrasts_summary.csv",
              "causal_sets.csv", "attribution_vs_exact.csv", "decay_kl.csv", "decay_exact_patching.csv",
              "blimp_accuracy.csv", "blimp_accuracy_terms.csv", "report.html"):
        assert (R / f).is_file(), f"results/{f} missing"
    assert (out / "README.md").is_file()
    steps = doc["timing"]["steps"]
    assert set(steps) >= {"load_model", "templates", "blimp_diff", "blimp_accuracy", "analysis", "figures"}
    assert all(v["status"] == "done" for v in steps.values()), steps
    assert set(steps["templates"]["steps"]) == {"pairs", "diff", "exact", "sets", "matched", "attribution", "report"}
    assert doc["config"]["smoke"] and doc["config"]["n_per_category"] == rs.SMOKE["n_per_category"]
    # Every template category, a few pairs each; BLiMP pairs grouped by phenomenon.
    ds = pd.read_csv(R / "datasets.csv")
    tpl = ds[ds["dataset"] == "templates"]
    # n error pairs per category, plus their twins (and 2x2 cells) where the design has them
    assert tpl["category"].nunique() == 9 and (tpl["valid"] >= rs.SMOKE["n_per_category"]).all()
    bl = ds[ds["dataset"] == "blimp"]
    assert bl["valid"].sum() == rs.SMOKE["blimp_pairs"] and bl["category"].str.startswith("blimp/").all()
    # The diff ran per category and overall, at p, later positions and the last token.
    lay = pd.read_csv(R / "layers_by_category.csv")
    assert {"all", "grammar/agreement", "meaning/subject", "typo"} <= set(lay["category"])
    la = pd.read_csv(R / "layers_all.csv")
    assert set(la["offset"]) == {0, 1, 2, 3, -1} and la["layer"].nunique() == 30
    # The KL of the changed prediction is real and positive where the change is.
    kl = pd.read_csv(R / "decay_kl.csv")
    at_p = kl[(kl["dataset"] == "templates") & (kl["group"] == "all") & (kl["offset"] == 0)]
    assert at_p["n"].iloc[0] == int(tpl["valid"].sum()) and at_p["kl_mean"].iloc[0] > 0  # errors and twins


@pytest.mark.slow
def test_readme_numbers_come_from_the_results(smoke):
    rs, out, doc = smoke
    wr = _module("write_readme")
    text = (out / "README.md").read_text(encoding="utf-8")
    assert "smoke run" in text
    terms = pd.read_csv(out / "results" / "blimp_accuracy_terms.csv")
    o = terms[terms["linguistics_term"] == "overall"].iloc[0]
    assert f"Overall: {wr.fmt(o['accuracy'])} (95 % CI {wr.fmt(o['ci_low'])}–{wr.fmt(o['ci_high'])})" in text
    assert f"{wr.fmt(doc['timing']['total_seconds'])} s wall time" in text
    causal = pd.read_csv(out / "results" / "causal_sets.csv")
    for r in causal.to_dict("records"):
        assert f"| {r['test']} | {r['kind']} " in text
    n_tests = int(causal["kl_p"].notna().sum() + causal["logit_diff_p"].notna().sum())
    assert f"none of the {n_tests} tests" in text  # the smoke run is null: 5 controls cannot reach q < 0.05
    # --readme-only regenerates the same file from results/
    before = text
    assert rs.main(["--readme-only", "--out", str(out)]) == 0
    assert (out / "README.md").read_text(encoding="utf-8") == before


@pytest.mark.slow
def test_blimp_accuracy_checked_by_hand(smoke, model, blimp_dir):
    from scipy.stats import binomtest

    from eclens.evaluate import load_reference_results, read_blimp_paradigm, sentence_logprobs

    rs, out, _ = smoke
    acc = pd.read_csv(out / "results" / "blimp_accuracy.csv")
    files = sorted(blimp_dir.glob("*.jsonl"))[:2]
    assert list(acc["UID"]) == [f.stem for f in files] and (acc["n"] == 5).all()
    rows = read_blimp_paradigm(files[1], 5)
    lp = sentence_logprobs(model, [r["good"] for r in rows] + [r["bad"] for r in rows])
    correct = sum(g > b for g, b in zip(lp[:5], lp[5:]))
    r = acc[acc["UID"] == files[1].stem].iloc[0]
    assert r["correct"] == correct and r["accuracy"] == pytest.approx(correct / 5)
    for r in acc.to_dict("records"):
        ci = binomtest(int(r["correct"]), int(r["n"])).proportion_ci(method="wilson")
        assert (r["ci_low"], r["ci_high"]) == pytest.approx((ci.low, ci.high), abs=1e-9)
    ref = load_reference_results(blimp_dir.parent / "blimp-results" / "models_summary.jsonl")
    gpt2 = ref[ref["UID"] != "overall"].set_index("UID")["gpt2"]
    assert list(acc["gpt2"]) == pytest.approx([gpt2[u] for u in acc["UID"]])
    terms = pd.read_csv(out / "results" / "blimp_accuracy_terms.csv")
    o = terms[terms["linguistics_term"] == "overall"].iloc[0]
    assert o["n"] == 10 and o["correct"] == acc["correct"].sum()
    assert o["gpt2_published"] == pytest.approx(0.830, abs=5e-4)


@pytest.mark.slow
def test_causal_sets_against_their_controls(smoke):
    rs, out, doc = smoke
    causal = pd.read_csv(out / "results" / "causal_sets.csv")
    # each set gets the intervention that tests its claim: stable -> mean-ablate in the clean run,
    # responsive -> patch clean values into the corrupt run
    assert len(causal) == causal["set"].nunique() and 1 <= len(causal) <= rs.SMOKE["max_sets"]
    want = {"stable": ("mean", "noise"), "responsive": ("patch", "denoise")}
    assert all((r["method"], r["direction"]) == want[r["kind"]] for r in causal.to_dict("records"))
    assert (causal["n_controls"] == rs.SMOKE["n_controls"]).all()
    for m in ("logit_diff", "kl"):
        ok = causal[f"{m}_p"].notna()
        # BH over the whole table never lowers a p-value, and "beats" means q < 0.05
        assert (causal.loc[ok, f"{m}_q_all"] >= causal.loc[ok, f"{m}_p"] - 1e-12).all()
        assert (causal[f"{m}_beats_controls"] == (causal[f"{m}_q_all"] < 0.05)).all()
        # with 5 controls the smallest empirical p is 1/6: nothing can pass BH at 0.05
        assert (causal.loc[ok, f"{m}_p"] >= 1 / 6 - 1e-12).all()
    assert doc["findings"]["causal"]["n_beats"] == 0
    # stable sets are also ablated against sigma-matched random sets: the same candidate effect, its own controls
    matched = pd.read_csv(out / "runs" / "templates" / "patch_dims_matched.csv")
    stable = causal[causal["kind"] == "stable"]
    assert set(matched["set"]) == set(stable["set"])
    for r in matched[matched["metric"] == "kl"].to_dict("records"):
        s = stable[stable["set"] == r["set"]].iloc[0]
        assert r["effect"] == pytest.approx(s["kl_effect"], rel=1e-4, abs=1e-9)  # deterministic rerun
        assert r["n_matched"] == rs.SMOKE["matched_controls"] and r["p_matched"] >= 1 / 4 - 1e-12
    ctrl = pd.read_csv(out / "runs" / "templates" / "patch_dims_controls.csv")
    if "control_kind" in ctrl.columns:  # uniform controls, and as many matched ones where a set has them
        assert set(ctrl["control_kind"]) <= {"uniform", "matched"}
        ctrl = ctrl[ctrl["control_kind"] == "uniform"]
    assert ctrl.groupby("set").size().eq(rs.SMOKE["n_controls"]).all()
    assert set(ctrl["set"]) == set(causal["set"])


@pytest.fixture
def png_tools():
    # checked before `smoke` runs (fixture order), so a missing tool is reported without the long run
    require(importlib.util.find_spec("playwright") is not None, "playwright not installed (pip install -e '.[dev]')")
    require(CHROMIUM.exists(), "no /usr/bin/chromium (bash scripts/setup.sh --browser)")


@pytest.mark.slow
def test_figures_are_real_pngs(png_tools, smoke):
    _, out, doc = smoke
    figs = doc["figures"]
    assert {"decay_kl", "causal_sets", "blimp_accuracy", "dims_heatmap"} <= set(figs)
    for name, rel in figs.items():
        data = (out / rel).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n", name
        assert 5_000 < len(data) < 1_000_000, (name, len(data))


def test_missing_blimp_folder_is_one_line_and_writes_nothing(tmp_path, capsys):
    rs = _module("run_study")
    out = tmp_path / "study"
    assert rs.main(["--smoke", "--blimp", str(tmp_path / "nope"), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "nope" in err and "--blimp" in err
    assert not out.exists()


@pytest.mark.slow
def test_the_script_runs_unchanged_on_another_model(tmp_path, blimp_dir):
    """`--model PATH` (here a random-weight 2-layer Llama saved as a Hugging Face folder, standing in for
    Meta-Llama-3-8B) takes the same path: its own tokenizer's pairs, its own sizes, a write-up that names it
    and makes no claim its numbers do not support."""
    from eclens.model import save_tiny_model

    folder = save_tiny_model(tmp_path / "other-llama", max_positions=256)
    out = tmp_path / "study"
    proc = subprocess.run([sys.executable, str(STUDY / "run_study.py"), "--smoke", "--blimp", str(blimp_dir),
                           "--model", str(folder), "--out", str(out), "--no-png", "--quiet"],
                          capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads((out / "results" / "study.json").read_text(encoding="utf-8"))
    assert doc["model"]["n_layers"] == 2 and doc["model"]["d_model"] == 64
    text = (out / "README.md").read_text(encoding="utf-8")
    assert text.startswith(f"# Does `{folder}` have") and "SmolLM2" not in text and "135M" not in text
    n_stable = doc["findings"]["candidates"]["templates"]["stable"]
    assert ("**Stable dimensions: none (null).**" in text) == (n_stable == 0)
