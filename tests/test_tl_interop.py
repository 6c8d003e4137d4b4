"""A cached pair as a TransformerLens ActivationCache: TL's own tools on it equal a live run_with_cache."""

from __future__ import annotations

import pytest
import torch

from eclens.cache import write_cache
from eclens.errors import EclensError
from eclens.pairs import MinimalPair, check_with_model
from eclens.tl import tl_hooks

SENTENCES = [
    ("The keys to the cabinet are here.", "The keys to the cabinet is here.", "grammar/agreement"),
    ("The dog chased the ball.", "The cat chased the ball.", "meaning/subject"),
]
# Batching with padding reorders float32 reductions over 30 layers: the live and the cached
# forward pass agree to this fraction of the tensor's largest value (measured ~6e-6).
F32_NOISE = 3e-5


def pairs_of(model):
    return check_with_model([MinimalPair(f"p{i}", c, x, cat) for i, (c, x, cat) in enumerate(SENTENCES)],
                            model).valid


@pytest.mark.slow
@pytest.mark.parametrize("store_dtype", ["float32", "float16"])
def test_tl_tools_on_a_cached_pair_equal_a_live_run(model, tmp_path, store_dtype):
    pairs = pairs_of(model)
    store = write_cache(model, pairs, tmp_path, hooks="hook_resid_post", for_tl=True, store_dtype=store_dtype,
                        batch_size=2)
    assert store.positions == "all"
    eps = torch.finfo(getattr(torch, store_dtype)).eps  # one rounding of each stored value
    keep = set(tl_hooks(model))
    for a in pairs:
        for side, ids in (("clean", a.clean_ids), ("corrupt", a.corrupt_ids)):
            cached = store.activation_cache(a.id, side, model=model)
            _, live = model.run_with_cache(torch.tensor([ids]), names_filter=lambda n: n in keep)
            # Logit lens: every layer's residual stream through the final norm.
            got, want = cached.accumulated_resid(apply_ln=True), live.accumulated_resid(apply_ln=True)
            assert got.shape == want.shape == (model.cfg.n_layers + 1, 1, a.length, model.cfg.d_model)
            tol = (eps + F32_NOISE) * want.abs().max()
            assert (got - want).abs().max() <= tol, (side, (got - want).abs().max().item(), tol.item())
            # Direct logit attribution of the changed token (clean vs corrupt) from the prediction before it,
            # by embed + each attention and MLP output, scaled by the cached final-norm scale.
            q = a.position - 1
            good, bad = torch.tensor([a.clean_ids[a.position]]), torch.tensor([a.corrupt_ids[a.position]])
            got_stack, labels = cached.decompose_resid(return_labels=True)
            want_stack = live.decompose_resid()
            assert labels[0] == "embed" and len(labels) == 1 + 2 * model.cfg.n_layers
            got = cached.logit_attrs(got_stack[:, :, q], good, bad, pos_slice=q)
            want = live.logit_attrs(want_stack[:, :, q], good, bad, pos_slice=q)
            scaled = live.apply_ln_to_stack(want_stack[:, :, q], layer=-1, pos_slice=q)
            direction = (model.tokens_to_residual_directions(good) - model.tokens_to_residual_directions(bad))
            # Each stored component and the stored scale are rounded once: a bound per component.
            bound = 2 * eps * (scaled.abs() * direction.abs()).sum(-1) + F32_NOISE * want.abs().max()
            assert ((got - want).abs() <= bound).all(), (side, (got - want).abs().max().item())
            # The total is the difference of the final logits (the decomposition is complete).
            logits = model(torch.tensor([ids]))[0, q]
            total = logits[good] - logits[bad]
            assert torch.allclose(want.sum(), total.squeeze(), atol=1e-3 * (1 + total.abs().item()))


def test_a_cache_without_what_tl_needs_is_refused(tiny, tmp_path):
    pairs = pairs_of(tiny)
    default = write_cache(tiny, pairs, tmp_path / "after")
    with pytest.raises(EclensError, match=r"positions=after.*every position.*--for-tl") as e:
        default.activation_cache(pairs[0].id, "clean", model=tiny)
    assert "\n" not in str(e.value)
    every = write_cache(tiny, pairs, tmp_path / "all", positions="all")
    with pytest.raises(EclensError, match=r"lacks hook_embed.*--for-tl"):
        every.activation_cache(pairs[0].id, "clean", model=tiny)
    with pytest.raises(EclensError, match="--for-tl stores every position"):
        write_cache(tiny, pairs, tmp_path / "bad", positions="after", for_tl=True)


def test_tl_cache_shapes_aliases_and_model_check(tiny, tmp_path):
    from eclens import tiny_model

    pairs = pairs_of(tiny)
    store = write_cache(tiny, pairs, tmp_path, hooks="default,attn.hook_pattern", for_tl=True,
                        store_dtype="float16")
    a = pairs[1]
    c = store.activation_cache(a.id, "corrupt", model=tiny)
    _, live = tiny.run_with_cache(torch.tensor([a.corrupt_ids]))
    for key in ("hook_embed", "blocks.1.attn.hook_pattern", "blocks.0.ln1.hook_scale", "ln_final.hook_scale",
                "blocks.0.hook_attn_out", "blocks.0.attn.hook_out"):  # the last: an alias of hook_attn_out
        assert c[key].shape == live[key].shape and c[key].dtype == torch.float32, key
        assert torch.allclose(c[key], live[key], rtol=2e-3, atol=1e-3), key
    with pytest.raises(EclensError, match="side="):
        store.activation_cache(a.id, "both", model=tiny)
    with pytest.raises(EclensError, match="other weights"):
        store.activation_cache(a.id, "clean", model=tiny_model(seed=1))


def test_diff_from_a_tl_cache_leaves_the_tl_extras_out(tiny, tmp_path):
    import pandas as pd

    from eclens.cache import diff_from_cache
    from eclens.diff import run_diff

    pairs = pairs_of(tiny)
    store = write_cache(tiny, pairs, tmp_path, for_tl=True, shard_size=2, batch_size=2)
    assert "hook_embed" in store.hooks and "ln_final.hook_scale" in store.hooks
    cached = diff_from_cache(tmp_path, max_offset=1, sample_size=64)
    stream = run_diff(tiny, pairs, max_offset=1, batch_size=2, sample_size=64)
    assert sorted(cached.layers["hook"].unique()) == sorted(stream.layers["hook"].unique())
    pd.testing.assert_frame_equal(cached.layers, stream.layers)
