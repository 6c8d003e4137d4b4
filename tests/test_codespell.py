"""Typo kinds and the codespell source of natural typos."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from eclens.sources.typos import KINDS, candidates, classify, misspell


@pytest.mark.parametrize("right, wrong, kind", [
    ("umbrella", "umbrela", "deletion"), ("across", "accross", "insertion"), ("receive", "recieve", "transposition"),
    ("garden", "gaeden", "substitution"), ("garden", "gar den", "split"), ("garden", "gmrden", "other"),
    ("garden", "garpen", "other"), ("a lot", "alot", "other"), ("house", "huose", "transposition"),
])
def test_classify(right, wrong, kind):
    assert classify(right, wrong) == kind


def test_every_kind_makes_misspellings_of_its_own_kind():
    rng = random.Random(0)
    for kind in KINDS:
        c = candidates("garden", kind)
        assert c and all(classify("garden", w) == kind for w in c), kind
        w = misspell(rng, "garden", kind, {"garden", "harden"})
        assert w and classify("garden", w) == kind and w.replace(" ", "") != "harden"


def test_codespell_source_is_real_seeded_and_twinned():
    from eclens.sources.codespell import codespell_pairs, entries, spelling_variants

    assert len(entries()) > 30000  # the real dictionary, not a sample
    assert ("recieve", "receive") in set(entries())
    assert spelling_variants()["colour"] == "color"
    a, b = codespell_pairs(300, seed=1), codespell_pairs(300, seed=1)
    assert a == b and codespell_pairs(300, seed=2) != a
    errors = [p for p in a if p.role == "error"]
    twins = {p.twin_of: p for p in a if p.role == "twin"}
    assert len(errors) == 300 and len(twins) >= 295
    for e in errors:
        assert classify(e.meta["clean_word"], e.meta["corrupt_word"]) == e.typo_kind
        t = twins.get(e.id)
        if t:
            assert t.clean == e.clean and t.cluster == e.cluster and t.twin_kind in ("neutral", "acceptable")
    kinds = Counter(e.typo_kind for e in errors)
    assert {"deletion", "insertion", "transposition", "substitution", "other"} <= set(kinds)


def test_cli_codespell_yield_table(tmp_path, capsys):
    from eclens.cli import main
    from eclens.pairs import load_jsonl

    out = tmp_path / "cs.jsonl"
    assert main(["generate", "--source", "codespell", "--n", "60", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "span_valid" in text and "transposition" in text
    pairs = load_jsonl(out)
    assert {p.role for p in pairs} == {"error", "twin"} and all(p.category == "typo/codespell" for p in pairs)
