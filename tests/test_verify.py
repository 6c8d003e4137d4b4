"""`ec model verify` and the load-time check: the bridge's hooks and log-probs against plain
transformers, on a tiny random model (plumbing, a broken hook) and the embedded model."""

from __future__ import annotations

import pytest
import torch

from eclens.cli import main
from eclens.model import load_model, manifest_model_entry, save_tiny_model, tiny_hf_model
from eclens.verify import ACT_TOL, verify_bridge


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny", n_layers=3, seed=3)


def _break(bridge, name="blocks.1.hook_mlp_out"):
    # A hook that reports (and passes on) a wrong tensor: what an adapter bug would look like.
    bridge.add_hook(name, lambda x, hook: x + 0.5 * x.abs().mean(), is_permanent=True)
    return bridge


def test_user_model_copied_and_verified():
    hf, tok = tiny_hf_model(n_layers=2, seed=5)
    before = {k: v.clone() for k, v in hf.state_dict().items()}
    bridge = load_model(hf, tokenizer=tok, verify="never")
    # compatibility mode folded norms into the bridge's weights, not into the user's model
    after = hf.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    res = verify_bridge(bridge, hf)
    assert res.passed, res.headline()
    assert len(res.rows) == 2 * 5 and res.logprob_max_abs < 1e-4
    assert res.table()["rel"].max() < ACT_TOL / 10
    # and the other way round: in place when asked, the user's model is the bridge's
    bridge2 = load_model(hf, tokenizer=tok, copy_model=False, verify="never")
    changed = hf.state_dict()  # TransformerLens rewires and processes the user's own object
    assert set(changed) != set(before) or any(not torch.equal(before[k], changed[k]) for k in before)
    assert manifest_model_entry(bridge2)["source"] == "user"


def test_user_bridge_used_or_copied(tiny):
    assert load_model(tiny, verify="never") is tiny  # already in compatibility mode: nothing to do
    with pytest.raises(Exception, match="pass its tokenizer"):
        load_model(tiny_hf_model(n_layers=1)[0])


def test_broken_hook_is_named():
    hf, tok = tiny_hf_model(n_layers=3, seed=2)
    bridge = _break(load_model(hf, tokenizer=tok, verify="never"))
    res = verify_bridge(bridge, hf)
    assert not res.passed
    assert res.failing[0] == "blocks.1.hook_mlp_out"
    assert "blocks.0.hook_resid_post" not in res.failing  # upstream of the break: still right
    assert "FAIL" in res.headline() and "blocks.1.hook_mlp_out" in res.headline()


def test_cli_verify_passes_and_fails(tiny_dir, capsys, monkeypatch):
    assert main(["model", "verify", "--model", str(tiny_dir)]) == 0
    o = capsys.readouterr().out
    assert "PASS" in o and "mlp_out" in o

    import eclens.model as M

    real = M.load_model
    monkeypatch.setattr(M, "load_model", lambda *a, **k: _break(real(*a, **k), "blocks.2.hook_attn_out"))
    code = main(["model", "verify", "--model", str(tiny_dir)])
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after transformers' own progress bars
    assert code != 0
    assert last.startswith("error: FAIL") and "blocks.2.hook_attn_out differs" in last


def test_first_load_is_verified_into_the_manifest(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("ECLENS_CACHE", str(tmp_path))
    m = load_model(str(tiny_dir))
    v = manifest_model_entry(m)["verify"]
    assert v["passed"] is True and v["fresh"] is True and v["max_rel_diff"] < ACT_TOL
    m2 = load_model(str(tiny_dir))  # verified before: the record, not a second check
    assert manifest_model_entry(m2)["verify"]["fresh"] is False
    assert load_model(str(tiny_dir), verify="never").__dict__.get("eclens_verify") is None


@pytest.mark.slow
def test_embedded_model_passes(model):
    from transformers import AutoModelForCausalLM

    from eclens.model import _embedded_hf_dir

    ref = AutoModelForCausalLM.from_pretrained(_embedded_hf_dir(), dtype=torch.float32)
    res = verify_bridge(model, ref)
    assert res.passed, res.headline()
    assert res.residual_identity_rel < 1e-5 and res.logprob_max_abs < 1e-3
