"""Pair designs: record fields, the design report, templates v2 ("How it is checked" in issue 16),
--tokenizers, and the LLM generator's twins."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from eclens.designs import design_report, is_error
from eclens.errors import PairFileError
from eclens.pairs import (
    AlignedPair,
    MinimalPair,
    align,
    check_pairs,
    load_aligned,
    load_csv,
    load_jsonl,
    write_jsonl,
)

ERROR_CATS = ("grammar/agreement", "grammar/tense", "grammar/article", "grammar/preposition", "grammar/anaphor",
              "typo")


@pytest.fixture(scope="module")
def tok():
    from eclens.model import load_tokenizer

    return load_tokenizer("smollm2-135m")


def test_design_fields_round_trip_jsonl_csv_and_aligned(tok, tmp_path):
    e = MinimalPair("e1", "She gave me an old book.", "She gave me a old book.", "grammar/article", cluster="f1",
                    role="error", swap_direction="an->a", detect=4)
    t = MinimalPair("t1", "She gave me an old book.", "She gave me the old book.", "grammar/article", cluster="f1",
                    role="twin", twin_kind="acceptable", twin_of="e1")
    write_jsonl(tmp_path / "p.jsonl", [e, t])
    assert load_jsonl(tmp_path / "p.jsonl") == [e, t]
    # CSV: design columns become fields (detect an int), other columns stay meta
    (tmp_path / "p.csv").write_text("clean,corrupt,cluster,role,twin_kind,twin_of,detect,note\n"
                                    f"{e.clean},{e.corrupt},f1,error,,,4,x\n{t.clean},{t.corrupt},f1,twin,acceptable,"
                                    "e1,,y\n")
    a, b = load_csv(tmp_path / "p.csv")
    assert (a.detect, a.role, a.meta, b.twin_kind, b.detect) == (4, "error", {"note": "x"}, "acceptable", None)
    # the run's own pairs.jsonl (aligned) round-trips with detect converted to a token position
    al = [align(p, tok) for p in (e, t)]
    assert al[0].detect_position == al[0].position + 1 and al[1].detect_position is None
    write_jsonl(tmp_path / "pairs.jsonl", al)
    assert load_aligned(tmp_path / "pairs.jsonl") == al
    # old files (no design fields) load and write unchanged: one cluster per pair, no twins
    old = '{"id": "x", "clean": "The cat sits.", "corrupt": "The cat sit.", "category": "c", "source": "user", ' \
          '"meta": {}}\n'
    (tmp_path / "old.jsonl").write_text(old)
    (p,) = load_jsonl(tmp_path / "old.jsonl")
    assert p.cluster_id == "x" and p.role is None and json.dumps(p.to_dict()) + "\n" == old


@pytest.mark.parametrize("rec, why", [
    ({"twin_kind": "similar"}, "twin_kind"), ({"detect": -1}, "detect"), ({"detect": "two"}, "detect"),
    ({"role": "twin"}, "needs 'twin_kind'"), ({"typo_kind": "swap"}, "typo_kind"), ({"cluster": 3}, "cluster"),
])
def test_bad_design_fields_are_one_line_errors(tmp_path, rec, why):
    f = tmp_path / "bad.jsonl"
    f.write_text(json.dumps({"clean": "a b", "corrupt": "a c", **rec}) + "\n")
    with pytest.raises(PairFileError, match=rf"bad.jsonl:1: .*{why}"):
        load_jsonl(f)


def test_detect_before_the_change_is_rejected_not_silently_p(tok):
    r = align(MinimalPair("x", "She gave me an old book.", "She gave me a old book.", detect=1), tok)
    assert r.reason == "bad_detect"


def test_design_report_counts_partners_and_clusters():
    ps = [MinimalPair("e1", "a", "b", cluster="c", role="error"), MinimalPair("t1", "a", "c", cluster="c",
          role="twin", twin_kind="neutral", twin_of="e1"), MinimalPair("t2", "a", "d", role="twin",
          twin_kind="acceptable", twin_of="gone"), MinimalPair("e2", "x", "y", role="error")]
    r = design_report(ps)
    assert r.twins_without_partner == ["t2"] and r.errors_without_twin == ["e2"]
    assert r.cluster_sizes == {1: 2, 2: 1} and r.n_clusters == 3
    assert any("1 without a partner" in line for line in r.lines())


# ------------------------------------------------------------------ templates v2, as issue 16 checks it


@pytest.fixture(scope="module")
def made(tok, tmp_path_factory):
    """One real `ec generate --source templates --n 200` (reference model SmolLM2; its scores are cached)."""
    from eclens.cli import main

    out = tmp_path_factory.mktemp("tpl") / "pairs.jsonl"
    assert main(["generate", "--source", "templates", "--n", "200", "--out", str(out)]) == 0
    pairs = load_jsonl(out)
    return pairs, {p.id: a for p in pairs for a in [align(p, tok, mode="span")]}


@pytest.mark.slow  # the reference model scores ~3,000 sentences on first use (cached afterwards)
def test_templates_every_error_pair_has_its_twin(made):
    pairs, aligned = made
    assert all(isinstance(a, AlignedPair) for a in aligned.values())
    by_id = {p.id: p for p in pairs}
    for cat in ERROR_CATS:
        errors = [p for p in pairs if p.category == cat and is_error(p)]
        twins = [p for p in pairs if p.category == cat and p.is_twin]
        assert len(errors) >= 200, cat
        assert {t.twin_of for t in twins} == {e.id for e in errors}, cat  # each error has its twin
        for t in twins:
            e = by_id[t.twin_of]
            assert t.clean == e.clean and t.cluster == e.cluster and t.twin_kind in ("neutral", "acceptable")
            assert aligned[t.id].position == aligned[e.id].position  # the same word replaced
    rep = design_report(pairs)
    assert not rep.twins_without_partner and not rep.errors_without_twin
    # 2x2 designs: agreement and anaphor; the same verb/reflexive tokens occur in error and acceptable cells
    for cat in ("grammar/agreement", "grammar/anaphor"):
        cells = Counter(p.role for p in pairs if p.category == cat and not p.is_twin)
        assert len(cells) == 2 and set(cells.values()) == {100}, cells
        clusters = Counter(p.cluster for p in pairs if p.category == cat and not p.is_twin)
        assert set(clusters.values()) == {2}
        for c in list(clusters)[:20]:
            x, y = [p for p in pairs if p.cluster == c and not p.is_twin]
            assert x.meta["clean_word"] == y.meta["corrupt_word"] and y.meta["clean_word"] == x.meta["corrupt_word"]


@pytest.mark.slow
def test_templates_combinations_kinds_directions_detect(made):
    pairs, aligned = made
    for cat in ERROR_CATS + ("meaning/subject", "meaning/location", "meaning/adjective"):
        units = [p for p in pairs if p.category == cat and not p.is_twin]
        combos = {(p.meta["clean_word"], p.meta["corrupt_word"], p.meta["head"]) for p in units}
        assert len(combos) >= 40, (cat, len(combos))
        dirs = Counter(p.swap_direction for p in units if p.swap_direction)
        if dirs:
            assert len(dirs) == 2 and 0.4 <= min(dirs.values()) / sum(dirs.values()) <= 0.6, (cat, dirs)
    kinds = Counter(p.typo_kind for p in pairs if p.category == "typo" and not p.is_twin)
    assert set(kinds) == {"deletion", "insertion", "transposition", "substitution", "split"}
    assert min(kinds.values()) >= 30
    from eclens.sources.typos import classify

    for p in pairs:
        if p.typo_kind:
            assert classify(p.meta["clean_word"], p.meta["corrupt_word"]) == p.typo_kind
    # detect recorded where the error shows after p: every article error, tense errors with a trailing adverbial
    arts = [p for p in pairs if p.category == "grammar/article" and is_error(p)]
    assert all(aligned[p.id].detect_position == aligned[p.id].position + 1 for p in arts)
    late = [p for p in pairs if p.category == "grammar/tense" and is_error(p) and p.detect is not None]
    assert late and all(aligned[p.id].detect_position > aligned[p.id].position for p in late)
    assert all(p.detect is None for p in pairs if p.category == "grammar/tense" and is_error(p)
               and p.meta["template"].endswith(("_front", "perfect")))


@pytest.mark.slow
def test_templates_reference_scores_and_size_match_recorded(made):
    pairs, _ = made
    assert all(p.meta["reference"] == "smollm2-135m" and isinstance(p.meta["ref_logprob"], float) for p in pairs)
    twins = [p for p in pairs if p.is_twin]
    assert all("size_ratio" in p.meta for p in twins)
    matched = sum(p.meta["size_matched"] for p in twins)
    assert 0 < matched < len(twins)  # reported, not assumed
    # the odd sentences of v1 are gone
    text = " ".join(p.clean for p in pairs)
    assert "Her farmer" not in text and "old insect" not in text


def test_tokenizers_keeps_pairs_valid_under_every_tokenizer(tok, tmp_path):
    """A second, coarser tokenizer (a small BPE trained here) rejects many pairs SmolLM2 accepts; with both,
    every kept pair is valid under each."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from eclens.sources.templates import generate_templates_with_stats

    base, _ = generate_templates_with_stats(tok, 60, seed=5, categories=["grammar/article", "meaning/subject"])
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    # Trained on both sentences of every pair, small: frequent words become tokens, rarer ones are split.
    bpe.train_from_iterator([x for p in base for x in (p.clean, p.corrupt)], trainers.BpeTrainer(vocab_size=700,
                            special_tokens=["<unk>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    folder = tmp_path / "tok"
    PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>").save_pretrained(folder)
    from eclens.model import load_tokenizer

    other = load_tokenizer(str(folder))
    alone = check_pairs(base, other)
    assert alone.rejected  # the coarse tokenizer really disagrees
    both, stats = generate_templates_with_stats(tok, 60, seed=5, categories=["grammar/article", "meaning/subject"],
                                                extra_tokenizers=[(other, False)])
    for t in (tok, other):
        assert not check_pairs(both, t).rejected
    assert (stats["rejected_different_length"] + stats["rejected_multiple_differences"]).sum() > 0


def test_openai_generator_writes_twins_and_detect(tok, tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from eclens.sources.openai_gen import LLMConfig, generate_openai
    from llm_server import LLMServer

    srv = LLMServer().start()
    srv.twins = True
    try:
        rep = generate_openai(tmp_path / "o.jsonl", tok, LLMConfig(model="m", base_url=srv.base_url, n_per_category=6,
                                                                   categories=["grammar/article"]), api_key="k")
    finally:
        srv.stop()
    pairs = load_jsonl(tmp_path / "o.jsonl")
    assert rep.complete and rep.stats["grammar/article"].twins == 6
    errors = [p for p in pairs if p.role == "error"]
    twins = {p.twin_of: p for p in pairs if p.is_twin}
    assert len(errors) == 6 and set(twins) == {e.id for e in errors}
    for e in errors:
        a = align(e, tok)
        assert a.detect_position == a.position + 1  # the noun after the changed adjective
        assert align(twins[e.id], tok).position == a.position
