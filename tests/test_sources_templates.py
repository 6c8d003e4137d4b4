"""The offline template generator, on the embedded model's real tokenizer (without the reference model:
tests/test_pairs_design.py checks the full `ec generate` with it)."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from eclens.errors import EclensError
from eclens.pairs import check_pairs, load_jsonl, write_jsonl
from eclens.sources import CATEGORIES
from eclens.sources import templates as T


@pytest.fixture(scope="module")
def tok():
    from eclens.model import load_tokenizer

    return load_tokenizer("smollm2-135m")


@pytest.fixture(scope="module")
def default_set(tok):
    return T.generate_templates_with_stats(tok, n_per_category=200, seed=0)


def test_every_category_yields_200_distinct_valid_pairs(tok, default_set):
    pairs, stats = default_set
    assert set(CATEGORIES) == {"grammar/agreement", "grammar/tense", "grammar/article", "grammar/preposition",
                               "grammar/anaphor", "typo", "meaning/subject", "meaning/location", "meaning/adjective"}
    counts = Counter(p.category for p in pairs if not p.is_twin)  # n counts error (or meaning) pairs
    assert counts == {c: 200 for c in CATEGORIES}
    assert len({p.id for p in pairs}) == len(pairs)
    for cat in CATEGORIES:
        assert len({(p.clean, p.corrupt) for p in pairs if p.category == cat and not p.is_twin}) == 200, cat
    # Independently of the generator's own bookkeeping: every pair is a single-token change (typos: one span).
    res = check_pairs([p for p in pairs if p.category != "typo"], tok)
    typos = check_pairs([p for p in pairs if p.category == "typo"], tok, mode="span")
    assert len(res.valid) == len(pairs) - 400 and not res.rejected and not typos.rejected
    for a in res.valid + typos.valid:
        assert a.position >= 1, a.pair  # never the first token: there is a prefix to predict it from
        # the changed token is exactly the word pair the record says changed
        assert a.clean_token.strip() == a.pair.meta["clean_word"], a.pair
        assert a.corrupt_token.strip() == a.pair.meta["corrupt_word"], a.pair
        assert a.pair.source == "templates" and a.pair.meta["template"].count("/") == 1
    assert list(stats["pairs"]) == [200] * 9


def test_pairs_are_varied_not_near_duplicates(tok, default_set):
    pairs, stats = default_set
    res = check_pairs([p for p in pairs if not p.is_twin], tok, mode="span")
    for cat in CATEGORIES:
        mine = [a for a in res.valid if a.category == cat]
        positions = Counter(a.position for a in mine)
        lengths = {a.length for a in mine}
        assert len(positions) >= 5, (cat, positions)
        assert max(positions.values()) <= 0.6 * len(mine), (cat, positions)  # not one fixed slot
        assert len(lengths) >= 6, (cat, lengths)
        assert len({a.pair.clean for a in mine}) >= 150, cat  # mostly different sentences, not one frame
        assert len({a.pair.meta["template"] for a in mine}) >= 5, cat
        # the change is mostly mid-sentence: something other than punctuation follows it
        after = [a.clean_ids[a.clean_end:] for a in mine]
        mid = sum(any(ch.isalnum() for ch in tok.decode(rest)) for rest in after)
        assert mid >= 0.8 * len(mine), (cat, mid)
    row = stats.set_index("category")
    assert (row["combinations"] >= 40).all()


def test_same_seed_is_byte_identical_and_seeds_differ(tok, tmp_path, default_set):
    again = T.generate_templates(tok, n_per_category=200, seed=0)
    write_jsonl(tmp_path / "a.jsonl", default_set[0])
    write_jsonl(tmp_path / "b.jsonl", again)
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    other = T.generate_templates(tok, n_per_category=200, seed=1)
    write_jsonl(tmp_path / "c.jsonl", other)
    assert (tmp_path / "c.jsonl").read_bytes() != (tmp_path / "a.jsonl").read_bytes()
    # A category's pairs do not depend on which other categories are generated with it.
    typo_only = T.generate_templates(tok, n_per_category=200, seed=0, categories=["typo"])
    assert typo_only == [p for p in default_set[0] if p.category == "typo"]


def test_category_selection_and_bad_inputs(tok):
    got = T.generate_templates(tok, n_per_category=6, categories=["grammar", "meaning/location"])
    assert [c for c in dict.fromkeys(p.category for p in got)] == [
        "grammar/agreement", "grammar/tense", "grammar/article", "grammar/preposition", "grammar/anaphor",
        "meaning/location"]
    with pytest.raises(EclensError, match="unknown category 'grammer'"):
        T.generate_templates(tok, 5, categories=["grammer"])
    with pytest.raises(EclensError, match="at least 1"):
        T.generate_templates(tok, 0)


def test_exhausted_space_is_a_clear_error(tok, monkeypatch):
    # With a draw limit far below what 5000 anaphor pairs need, the generator must stop
    # with a message (category, how many it made, what to do), not loop or return fewer.
    monkeypatch.setattr(T, "MAX_DRAWS_PER_PAIR", 0)
    with pytest.raises(EclensError, match=r"only \d+ distinct valid grammar/anaphor pairs.*--n"):
        T.generate_templates(tok, 5000, categories=["grammar/anaphor"])


def test_prepend_bos_keeps_changes_off_bos(tok):
    pairs = T.generate_templates(tok, 30, categories=["meaning/subject", "grammar/article"], prepend_bos=True)
    res = check_pairs(pairs, tok, prepend_bos=True)
    assert len(res.valid) == 90
    assert all(a.clean_ids[0] == tok.bos_token_id and a.position >= 2 for a in res.valid)


def test_cli_generate_templates(tmp_path, capsys):
    from eclens.cli import main

    out = tmp_path / "pairs.jsonl"
    rc = main(["generate", "--out", str(out), "--n", "25", "--categories", "typo,meaning/adjective", "--seed", "3",
               "--reference", "none"])
    assert rc == 0
    pairs = load_jsonl(out)
    assert Counter((p.category, p.role) for p in pairs) == {("typo", "error"): 25, ("typo", "twin"): 25,
                                                             ("meaning/adjective", None): 25}
    assert all(p.source == "templates" for p in pairs)
    first = json.loads(out.read_text().splitlines()[0])
    assert set(first) >= {"id", "clean", "corrupt", "category", "source", "meta", "cluster", "role", "typo_kind"}
    assert "wrote 75 pairs" in capsys.readouterr().err
    rc = main(["generate", "--out", str(tmp_path / "x.jsonl"), "--categories", "nonsense"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: unknown category 'nonsense'") and "\n" not in err
    assert not (tmp_path / "x.jsonl").exists()
