"""scripts/gpu_check.py --smoke runs on the CPU so the GPU script cannot rot."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # a child process that imports torch and runs every smoke benchmark: ~13 s on 2 idle cores
def test_gpu_check_smoke(tmp_path):
    out = tmp_path / "smoke.json"
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--smoke", "--profile", "--out", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    for section in ("forward", "diff", "diff_profile", "patch"):
        assert "error" not in res[section], (section, res[section])
    d = res["diff"]
    assert d["short"]["pairs"] == 8 and d["long"]["pairs"] == 16
    assert d["long"]["diff_pairs_per_s"] > 0 and d["short"]["device_sample_diff_s"] > 0
    assert d["diff_throughput_ratio"] == d["long"]["diff_throughput_ratio"] > 0
    assert res["patch"]["patched_runs"] > 0
    assert all(row["tokens_per_s"] > 0 for row in res["forward"].values())
