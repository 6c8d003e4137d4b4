"""The stream's pair metrics from packed logits (only the rows they read) equal those of the whole logits."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from eclens.diff import run_diff
from eclens.diff.logprobs import packed_rows, pair_metrics
from eclens.hooks import iter_batches, pad_id
from eclens.pairs import AlignedPair, MinimalPair, check_with_model

COLUMNS = ["clean_logprob", "corrupt_logprob", "clean_token_logprob", "corrupt_token_logprob", "kl_0", "kl_mean",
           "kl_max", "kl_last"]


def _pairs(model):
    single = [MinimalPair(f"s{i}", f"The {w} runs fast today.", f"The {w} run fast today.", "grammar/agreement")
              for i, w in enumerate(["dog", "cat", "bird", "man", "girl", "boy"])]
    span = [MinimalPair("x0", "The committee approved it.", "The comittee approved it.", "typo"),
            MinimalPair("x1", "She received a gift.", "She recieved a gift.", "typo"),
            MinimalPair("x2", "We definitely need time.", "We definately need time.", "typo")]
    out = check_with_model(single, model).valid + check_with_model(span, model, mode="span").valid
    assert len(out) == 9
    return out


def test_packed_rows_read_the_changed_sentence_from_its_first_changed_token():
    # two pairs, T = 6: clean lengths 5 and 4; spans start at 2 and 1, changed lengths 6 and 4
    idx, first = packed_rows([(2, 3, 4, 6), (1, 2, 2, 4)], [5, 4], 6)
    assert idx.tolist() == [0, 1, 2, 3, 4, 14, 15, 16, 17, 6, 7, 8, 9, 19, 20, 21] and first == [0, 9]


def test_the_stream_metrics_from_packed_logits_equal_the_whole_logits(tiny):
    pairs = _pairs(tiny)
    assert any(a.clean_end - a.position > 1 or a.corrupt_end != a.clean_end for a in pairs)  # spans of other lengths
    got = run_diff(tiny, pairs, hooks="blocks.0.hook_resid_post", batch_size=4, sample_size=8).pairs.set_index("id")
    rows = []
    with torch.inference_mode():
        for b in iter_batches(pairs, 4, pad_id(tiny), "cpu"):
            rows += [{"id": a.id, **r} for a, r in zip(b.pairs, pair_metrics(tiny(b.tokens), b.tokens, b.pairs,
                                                                               [0, -1]))]
    want = pd.DataFrame(rows).set_index("id").loc[got.index]
    # the changed sentence's prefix is read from the clean run's rows (the same tokens): equal to float32 rounding
    pd.testing.assert_frame_equal(got[COLUMNS], want[COLUMNS], rtol=1e-5, atol=1e-5)
    for i in got.index:  # every offset's KL, from the span end to the last token
        g, w = json.loads(got.loc[i, "kl"]), json.loads(want.loc[i, "kl"])
        assert len(g) == len(w) and np.allclose(g, w, rtol=1e-5, atol=1e-6), i


@pytest.mark.parametrize("pack", [True, False])
def test_identical_sentences_give_zero_either_way(tiny, pack, monkeypatch):
    if not pack:  # the stream then makes every row's logits, as for a model without the unembedding's hook
        monkeypatch.setattr("eclens.diff.stream.packs_logits", lambda model: False)
    same = [AlignedPair(MinimalPair(f"same{i}", a.pair.clean, a.pair.clean, a.category), a.clean_ids,
                        list(a.clean_ids), a.position, a.clean_token, a.clean_token) for i, a in enumerate(_pairs(tiny)[:4])]
    df = run_diff(tiny, same, hooks="blocks.0.hook_resid_post", batch_size=2).pairs
    assert (df["logprob_diff"] == 0).all() and (df["kl_mean"] == 0).all()
