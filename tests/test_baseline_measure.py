"""`--baseline random` measures recovery and the probe on the random-weight model too, beside the trained
model's (issue 19), and puts both into summary.json."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from eclens.baseline import baseline_step
from eclens.diff import DiffConfig
from eclens.measure_step import MeasureConfig, measure_step
from eclens.model import tiny_model
from test_interaction import two_by_two


@pytest.mark.slow  # two measure steps and a diff of the tiny model (~2 min at load 17 on 2 cores)
def test_baseline_measures_recovery_and_probe_beside_the_trained(tiny, tmp_path):
    pairs = two_by_two(tiny.tokenizer, 6)
    cfg = MeasureConfig(max_clusters=None, n_boot=100, n_permutations=1, invariance=False, max_offset=2)
    measure_step(tmp_path, tiny, pairs, cfg, progress=False)
    (tmp_path / "candidates.csv").write_text("")
    (tmp_path / "summary.json").write_text("{}")
    out = baseline_step(tmp_path, tiny, pairs, diff_config=DiffConfig(hooks="resid_pre", min_pairs=1), seed=3,
                        loader=lambda name: tiny_model(n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, d_mlp=128,
                                                       seed=7),
                        measure_config=cfg)
    assert out.files == ["baseline_random.csv", "baseline_random_measure.csv"]
    t = pd.read_csv(tmp_path / "baseline_random_measure.csv")
    for m in ("recovery_index_last", "2x2_error_effect_last", "probe_peak_acc"):
        assert set(t[t["measure"] == m]["weights"]) == {"trained", "random"}, m
    s = json.loads((tmp_path / "summary.json").read_text())["baseline_random"]
    assert {r["weights"] for r in s["measure"]} == {"trained", "random"} and s["candidates"]
    assert "probe peak" in out.headline
