"""`ec cache`: activations on disk, read lazily; `ec diff --from-cache` equals streaming."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from eclens.cache import diff_from_cache, open_cache, write_cache
from eclens.diff import run_diff
from eclens.errors import EclensError
from eclens.hooks import iter_batches, pad_id
from eclens.pairs import MinimalPair, check_with_model, write_jsonl
from eclens.tables import read_table_file

SENTENCES = [
    ("The keys to the cabinet are here.", "The keys to the cabinet is here.", "grammar/agreement"),
    ("The cat sits on the mat.", "The cat sit on the mat.", "grammar/agreement"),
    ("My brother plays the guitar every evening after dinner.",
     "My brother play the guitar every evening after dinner.", "grammar/agreement"),
    ("The children were happy.", "The children was happy.", "grammar/agreement"),
    ("She visited the old museum in Paris yesterday.", "She visited the old museum in London yesterday.",
     "meaning/location"),
    ("The dog chased the ball.", "The cat chased the ball.", "meaning/subject"),
    ("He walked to the station", "He walked to the school", "meaning/location"),
    ("A small bird sang in the tall tree this morning.", "A small bird sang in the old tree this morning.",
     "meaning/adjective"),
]
HOOKS = [f"blocks.{layer}.{h}" for layer in (0, 1, 15, 29)
         for h in ("hook_resid_pre", "hook_attn_out", "hook_resid_mid", "hook_mlp_out", "hook_resid_post",
                   "mlp.hook_post", "attn.hook_z", "attn.hook_pattern")]


def make_pairs(model):
    res = check_with_model([MinimalPair(f"p{i}", c, x, cat) for i, (c, x, cat) in enumerate(SENTENCES)], model)
    return res.valid


def tensors_equal(a: dict, b: dict) -> list[str]:
    assert set(a) == set(b)
    return [k for k in a if not torch.equal(a[k].nan_to_num(123.0), b[k].nan_to_num(123.0))]


@pytest.mark.slow
def test_from_cache_equals_streaming(model, tmp_path):
    pairs = make_pairs(model)
    stream = run_diff(model, pairs, hooks=HOOKS, max_offset=2, batch_size=4, sample_size=64)
    store = write_cache(model, pairs, tmp_path, hooks=HOOKS, positions="after", shard_size=4, batch_size=4)
    assert store.complete and len(store) == len(pairs) and store.dtype == "float32"
    cached = diff_from_cache(tmp_path, max_offset=2, sample_size=64)
    # Same batches, same floats: the statistics are identical, not merely close.
    assert tensors_equal(stream.tensors, cached.tensors) == []
    pd.testing.assert_frame_equal(stream.pairs, cached.pairs, check_exact=True)  # logits made at the same rows
    pd.testing.assert_frame_equal(stream.layers, cached.layers)
    pd.testing.assert_frame_equal(stream.candidates, cached.candidates)


def test_the_cache_makes_logits_only_where_the_pair_metrics_read(tiny, tmp_path, monkeypatch):
    """As the stream: the unembedding gets the packed rows (the clean sentence's, the changed one's from its
    first changed token), and the pairs' log-probs are the stream's."""
    import eclens.diff as D
    from eclens.diff.logprobs import packed_rows, span_rows

    pairs = make_pairs(tiny)
    seen = []
    real = D.pair_metrics

    def spy(logits, tokens, batch_pairs, offsets, index=None):
        want = packed_rows(span_rows(batch_pairs), [a.length for a in batch_pairs], tokens.shape[1])[0]
        seen.append(tuple(logits.shape[:2]) == (1, len(want)) and index is not None
                    and torch.equal(index[0].cpu(), want))
        return real(logits, tokens, batch_pairs, offsets, index=index)

    monkeypatch.setattr(D, "pair_metrics", spy)
    write_cache(tiny, pairs, tmp_path, positions="after", shard_size=4, batch_size=4)
    assert seen and all(seen)
    stream = run_diff(tiny, pairs, max_offset=2, batch_size=4, sample_size=64)
    cached = diff_from_cache(tmp_path, max_offset=2, sample_size=64)
    pd.testing.assert_frame_equal(stream.pairs, cached.pairs, check_exact=True)


def test_lazy_reader_returns_what_the_model_computed(tiny, tmp_path):
    pairs = make_pairs(tiny)
    hooks = ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_post", "blocks.1.attn.hook_z",
             "blocks.0.attn.hook_pattern"]
    store = write_cache(tiny, pairs, tmp_path, hooks=hooks, positions="all", shard_size=3, batch_size=3)
    assert repr(store).startswith("ActivationStore(")
    assert store.shapes["blocks.1.attn.hook_z"] == (tiny.cfg.n_heads, tiny.cfg.d_head)
    again = open_cache(tmp_path)  # a fresh reader opens shards only when asked
    assert again._handles == {}
    for b in iter_batches(pairs, 8, pad_id(tiny)):
        _, cache = tiny.run_with_cache(b.tokens, names_filter=lambda n: n in hooks)
        for i, a in enumerate(b.pairs):
            assert list(again.stored_positions(a.id)) == list(range(a.length))
            for h in hooks[:3]:
                c = again.get(h, a.id, "clean")
                x = again.get(h, a.id, "corrupt")
                assert torch.allclose(c, cache[h][i, : a.length], atol=1e-5)
                assert torch.allclose(x, cache[h][b.size + i, : a.length], atol=1e-5)
                assert torch.allclose(again.get(h, a.id), x - c)
            pat = again.get("blocks.0.attn.hook_pattern", a.id, "clean")  # [positions, heads, max_len]
            ref = cache["blocks.0.attn.hook_pattern"][i, :, : a.length, : a.length].permute(1, 0, 2)
            assert torch.allclose(pat[:, :, : a.length], ref, atol=1e-6)
    assert a.id in again and "nope" not in again
    with pytest.raises(EclensError):
        again.get("blocks.0.hook_mlp_out", pairs[0].id)
    with pytest.raises(EclensError):
        again.get(hooks[0], "nope")


def test_cache_resumes_shard_by_shard(tiny, tmp_path):
    pairs = make_pairs(tiny)
    one = tmp_path / "one"
    write_cache(tiny, pairs, one, positions="after", shard_size=3, batch_size=3)
    part = tmp_path / "part"
    s = write_cache(tiny, pairs, part, positions="after", shard_size=3, batch_size=3, max_shards=1)
    assert not s.complete and len(s) == 3
    first = part / "cache" / "shard-00000.safetensors"
    stamp = first.stat().st_mtime_ns
    with pytest.raises(EclensError, match="incomplete"):
        diff_from_cache(part)
    with pytest.raises(EclensError, match="other settings"):
        write_cache(tiny, pairs, part, positions="all", shard_size=3, batch_size=3)
    s = write_cache(tiny, pairs, part, positions="after", shard_size=3, batch_size=3)
    assert s.complete and len(s) == len(pairs)
    assert first.stat().st_mtime_ns == stamp  # the finished shard was not redone
    a, b = diff_from_cache(one), diff_from_cache(part)
    assert tensors_equal(a.tensors, b.tensors) == []
    from eclens import tiny_model

    other = tiny_model(n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, d_mlp=128, seed=3)
    with pytest.raises(EclensError, match="model"):
        write_cache(other, pairs, part, positions="after", shard_size=3, batch_size=3)


def test_changed_only_cache_gives_offset_zero(tiny, tmp_path):
    pairs = make_pairs(tiny)
    s = write_cache(tiny, pairs, tmp_path, positions="changed", shard_size=4, batch_size=4)
    assert [list(s.stored_positions(a.id)) for a in pairs] == [[a.position] for a in pairs]
    with pytest.raises(EclensError, match="only the changed position"):
        diff_from_cache(tmp_path)
    res = diff_from_cache(tmp_path, max_offset=0, include_last=False)
    stream = run_diff(tiny, pairs, max_offset=0, include_last=False, batch_size=4)
    assert res.offsets == [0]
    assert tensors_equal(res.tensors, stream.tensors) == []


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tokenizer):
    from eclens.model import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama-cache"), vocab_from=tokenizer, max_positions=256)


def test_cli_cache_then_diff_from_cache(tiny_dir, tmp_path, capsys):
    from eclens.cli import main

    raw = tmp_path / "raw.jsonl"
    write_jsonl(raw, [{"id": f"q{i}", "clean": c, "corrupt": x, "category": cat}
                      for i, (c, x, cat) in enumerate(SENTENCES)])
    run = tmp_path / "run"
    common = ["--model", str(tiny_dir), "--batch-size", "4", "--hooks", "default,attn.hook_pattern"]
    assert main(["cache", str(raw), "--out", str(run), "--shard-size", "4", *common]) == 0, capsys.readouterr().err
    man = json.loads((run / "manifest.json").read_text())
    assert man["steps"]["cache"]["positions"] == "after" and man["steps"]["cache"]["n_pairs"] == len(SENTENCES)
    assert (run / "cache" / "index.json").exists() and (run / "pairs.jsonl").exists()
    assert main(["diff", "--from-cache", str(run)]) == 0, capsys.readouterr().err
    ref = tmp_path / "ref"
    assert main(["diff", str(raw), "--out", str(ref), *common]) == 0, capsys.readouterr().err
    a = read_table_file(run / "layers.parquet")
    b = read_table_file(ref / "layers.parquet")
    pd.testing.assert_frame_equal(a, b)
    man = json.loads((run / "manifest.json").read_text())
    assert man["steps"]["diff"]["from_cache"] == str(run)
