"""The second embedded model, Gemma-3-270M (base; opt-in install). One session-scoped model:
loading it peaks at ~7 GB, so every test here is slow and they share it."""

from __future__ import annotations

import pytest
import torch

from conftest import gemma_installed, require

pytestmark = pytest.mark.slow


def test_tokenizer_alone_prepends_bos():
    require(gemma_installed(), "gemma3-270m is not installed: bash scripts/setup.sh --gemma")
    from eclens.model import context_length, load_tokenizer, tokenizer_prepends_bos

    tok = load_tokenizer("gemma3-270m")
    assert tokenizer_prepends_bos(tok) and tok.bos_token_id == 2 and len(tok) == 262_144
    assert tok("The keys are here.")["input_ids"][0] == 2
    assert context_length("gemma3-270m") == 32_768


def test_gemma_shape_bos_and_params(gemma):
    from eclens.model import count_params, manifest_model_entry, model_info

    info = model_info(gemma)
    assert (info.n_layers, info.d_model, info.n_heads, info.n_kv_heads, info.d_head, info.d_mlp, info.d_vocab) == \
        (18, 640, 4, 1, 256, 2048, 262_144)
    assert info.architecture == "Gemma3ForCausalLM" and info.prepend_bos is True
    assert count_params(gemma) == 268_098_176  # tied unembedding counted once (435.9 M counted it twice)
    e = manifest_model_entry(gemma)
    assert e["variant"] == "base" and e["prepend_bos"] is True and e["source"] == "embedded"
    assert gemma.to_tokens("The cat")[0, 0].item() == 2


def test_gemma_verify_passes_and_knows_paris(gemma):
    from transformers import AutoModelForCausalLM

    from eclens.gguf_models import EMBEDDED_MODELS, embedded_dir
    from eclens.verify import verify_bridge

    ref = AutoModelForCausalLM.from_pretrained(embedded_dir(EMBEDDED_MODELS["gemma3-270m"]), dtype=torch.float32)
    res = verify_bridge(gemma, ref)
    assert res.passed, res.headline()
    assert res.residual_identity_rel < 1e-5 and res.logprob_max_abs < 1e-3
    # a base model: "The capital of France is" continues with " the" (p 0.19); this prompt is unambiguous
    probs = gemma("Paris is the capital of")[0, -1].softmax(-1)
    top = int(probs.argmax())
    assert gemma.tokenizer.decode([top]) == " France" and probs[top].item() > 0.5
