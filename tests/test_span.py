"""Span alignment: pairs whose tokenizations differ in one contiguous span of different lengths."""

from __future__ import annotations

from difflib import SequenceMatcher

import pytest

from eclens.errors import EclensError
from eclens.pairs import AlignedPair, MinimalPair, Rejection, align, load_aligned, write_jsonl
from eclens.spans import Span, diff_span


@pytest.fixture(scope="module")
def tokenizer():
    from eclens.model import load_tokenizer

    return load_tokenizer("smollm2-135m")


def P(clean, corrupt, **kw):
    return MinimalPair("x", clean, corrupt, "t", **kw)


def test_diff_span_on_id_lists():
    assert diff_span([1, 2, 3, 4], [1, 9, 8, 7, 4]) == Span(1, 3, 4)
    assert diff_span([1, 2, 3], [1, 2, 3]) == "identical"
    assert diff_span([1, 2, 3], [1, 2, 5, 3]) == "insertion"
    assert diff_span([1, 2, 3, 4, 5], [1, 6, 3, 7, 5]) == "multiple_spans"  # token 3 is shared inside


def test_umbrella_is_one_span_and_offsets_follow_each_side(tokenizer):
    a = align(P("She forgot her umbrella at home.", "She forgot her umbrela at home.", detect=4), tokenizer,
              mode="span")
    assert isinstance(a, AlignedPair) and a.is_span
    assert a.clean_end - a.position == 1 and a.corrupt_end - a.position == 3  # " umbrella" vs " umb","rel","a"
    assert a.clean_token == " umbrella" and a.corrupt_token == " umbrela"
    at_c, at_k = a.position_at(1, "clean"), a.position_at(1, "corrupt")
    assert tokenizer.decode([a.clean_ids[at_c]]) == tokenizer.decode([a.corrupt_ids[at_k]]) == " at"
    assert a.detect_position == at_k and a.detect_offset == 1
    assert a.position_at(99, "clean") is None
    with pytest.raises(EclensError):
        a.position_at(-1)
    # Single-token mode rejects it; a single-token change is still "single" in span mode.
    assert align(a.pair, tokenizer).reason == "different_length"
    s = align(P("The cat sits on the mat.", "The cat sit on the mat."), tokenizer, mode="span")
    assert s.mode == "single" and s.position == 2
    assert align(P("The cat sat on the mat.", "A cat sat on a mat."), tokenizer, mode="span").reason == \
        "multiple_spans"


def test_span_records_round_trip_and_are_refused_by_exact_steps(tokenizer, tmp_path):
    a = align(P("We walked across the bridge.", "We walked accross the bridge.", cluster="c1", role="error",
                typo_kind="insertion"), tokenizer, mode="span")
    write_jsonl(tmp_path / "pairs.jsonl", [a])
    (b,) = load_aligned(tmp_path / "pairs.jsonl")
    assert b == a and b.pair.cluster == "c1" and b.pair.typo_kind == "insertion"
    # A span record whose ids do not match its span is refused with the line.
    bad = tmp_path / "bad.jsonl"
    bad.write_text((tmp_path / "pairs.jsonl").read_text().replace('"corrupt_end": ', '"corrupt_end": 1'))
    with pytest.raises(EclensError, match=r"bad.jsonl:1: .*differ in"):
        load_aligned(bad)
    from eclens.patch import exact_patch, layer_exchange, layer_skip

    # Exact patching, layer exchange and layer skipping swap activations position by position: one line each.
    for fn, step in ((exact_patch, "patching"), (layer_exchange, "layer exchange"), (layer_skip, "layer skipping")):
        with pytest.raises(EclensError, match=rf"^{step} needs single-token pairs.*span-aligned") as e:
            fn(None, [a])
        assert "\n" not in str(e.value)


def _one_replace(x: list[int], y: list[int]) -> bool:
    ops = [op for op in SequenceMatcher(None, x, y, autojunk=False).get_opcodes() if op[0] != "equal"]
    return len(ops) == 1 and ops[0][0] == "replace"


def test_held_out_natural_typos_kept_exactly_when_difflib_sees_one_span(tokenizer):
    """Codespell's real misspellings in sentences: span mode keeps a pair exactly when an independent
    alignment (difflib over the token ids) finds one replaced block."""
    from eclens.pairs import encode
    from eclens.sources.codespell import codespell_pairs

    errors = [p for p in codespell_pairs(400, seed=7) if p.role == "error"]
    # ... and pairs with two separate changes, which must be refused by both
    doubles = [P(p.clean, p.corrupt.replace(".", " again.").replace("The ", "A ", 1)) for p in errors[:40]]
    multi = kept = 0
    for p in errors + doubles:
        r = align(p, tokenizer, mode="span")
        ids = encode(tokenizer, p.clean), encode(tokenizer, p.corrupt)
        assert isinstance(r, AlignedPair) == _one_replace(*ids), (p.clean, p.corrupt)
        if isinstance(r, AlignedPair):
            kept += 1
            multi += r.is_span
        else:
            assert isinstance(r, Rejection)
    assert multi >= 300  # most natural typos change the number of tokens
    assert kept >= 0.9 * len(errors)


def test_check_cli_span_yield(tmp_path, capsys):
    from eclens.cli import main

    f = tmp_path / "p.jsonl"
    write_jsonl(f, [MinimalPair("a", "She forgot her umbrella at home.", "She forgot her umbrela at home."),
                    MinimalPair("b", "The cat sits here.", "The cat sit here.")])
    assert main(["pairs", "check", str(f), "--span"]) == 0
    out = capsys.readouterr().out
    assert "span mode: 2 of 2 valid (1 single-token, 1 multi-token spans)" in out
    assert "no twins in this file" in out
    assert main(["pairs", "check", str(f)]) == 0
    assert "1 valid of 2" in capsys.readouterr().out
