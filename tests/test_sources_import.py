"""BLiMP and CSV importers (real BLiMP files where present, and files the tests write),
and `ec pairs check` on the output of every source."""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest

from eclens.errors import EclensError, PairFileError
from eclens.pairs import REASONS, check_pairs, load_jsonl, write_jsonl
from eclens.sources.blimp import import_blimp, read_blimp_file
from eclens.sources.csvimport import import_csv

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="module")
def tok():
    from eclens.model import load_tokenizer

    return load_tokenizer("smollm2-135m")


def _raw(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ----------------------------------------------------------------------------- BLiMP, real data

REAL = ("anaphor_gender_agreement", "passive_1", "adjunct_island", "determiner_noun_agreement_1")


def test_blimp_real_paradigms(blimp_dir, tok):
    files = [blimp_dir / f"{u}.jsonl" for u in REAL]
    pairs, rep = import_blimp(files, tok)
    assert len(pairs) == 4000 and len({p.id for p in pairs}) == 4000
    rep = rep.set_index("UID")
    assert sorted(rep.index) == sorted(REAL)
    assert (rep["total"] == 1000).all()
    assert (rep[["valid", *REASONS]].sum(axis=1) == rep["total"]).all()
    # What the data is: himself/herself are single tokens, so every gender-agreement pair
    # survives; adjunct islands reorder words, so none does.
    assert rep.loc["anaphor_gender_agreement", "valid"] == 1000
    assert rep.loc["adjunct_island", "valid"] == 0
    assert rep.loc["adjunct_island", "multiple_differences"] == 1000
    assert 0 < rep.loc["passive_1", "valid"] < 1000
    assert bool(rep.loc["anaphor_gender_agreement", "one_prefix"]) and not bool(rep.loc["passive_1", "one_prefix"])
    # The report agrees with an independent check of the same pairs.
    res = check_pairs(pairs, tok)
    assert len(res.valid) == int(rep["valid"].sum())
    by_uid = Counter(a.pair.meta["UID"] for a in res.valid)
    for uid in REAL:
        assert by_uid.get(uid, 0) == rep.loc[uid, "valid"]
    # Field mapping, checked against the raw records.
    raw = {(r["UID"], str(r["pairID"])): r for f in files for r in _raw(f)}
    for p in pairs:
        r = raw[(p.meta["UID"], p.meta["pairID"])]
        assert (p.clean, p.corrupt) == (r["sentence_good"], r["sentence_bad"])
        assert p.category == f"blimp/{r['linguistics_term']}/{r['UID']}"
        assert p.source == "blimp" and p.meta["field"] == r["field"]
        if r["one_prefix_method"]:
            assert (p.meta["prefix"], p.meta["target_clean"], p.meta["target_corrupt"]) == (
                r["one_prefix_prefix"], r["one_prefix_word_good"], r["one_prefix_word_bad"])
            assert p.clean.startswith(p.meta["prefix"] + " " + p.meta["target_clean"])
        else:
            assert "target_clean" not in p.meta


def test_blimp_whole_folder_and_filters(blimp_dir, tok):
    pairs, rep = import_blimp(blimp_dir)  # no tokenizer: mapping only, all 67 paradigms
    assert len(rep) == 67 and (rep["total"] == 1000).all() and len(pairs) == 67000
    assert "valid" not in rep.columns
    assert len({p.category for p in pairs}) == 67
    assert sum("target_clean" in p.meta for p in pairs) == 1000 * int(rep["one_prefix"].sum())
    some = [blimp_dir / "passive_1.jsonl", blimp_dir / "anaphor_gender_agreement.jsonl"]
    valid, rep2 = import_blimp(some, tok, only_valid=True)
    assert len(valid) == int(rep2["valid"].sum())
    assert not check_pairs(valid, tok).rejected
    capped, _ = import_blimp(some, tok, only_valid=True, max_per_paradigm=7)
    assert Counter(p.meta["UID"] for p in capped) == {"passive_1": 7, "anaphor_gender_agreement": 7}
    with pytest.raises(EclensError, match="already read"):
        import_blimp([some[0], some[0]], tok)


# ----------------------------------------------------------------------- BLiMP, written file


def _blimp_record(i: int, good: str, bad: str, *, one_prefix: tuple[str, str, str] | None = None) -> dict:
    r = {"sentence_good": good, "sentence_bad": bad, "field": "morphology", "linguistics_term": "toy_term",
         "UID": "toy_paradigm", "simple_LM_method": True, "one_prefix_method": one_prefix is not None,
         "two_prefix_method": False, "lexically_identical": True, "pairID": str(i)}
    if one_prefix:
        r.update(one_prefix_prefix=one_prefix[0], one_prefix_word_good=one_prefix[1],
                 one_prefix_word_bad=one_prefix[2])
    return r


def test_blimp_small_written_file(tmp_path, tok):
    f = tmp_path / "toy_paradigm.jsonl"
    recs = [
        _blimp_record(0, "The dogs near the gate are barking.", "The dogs near the gate is barking.",
                      one_prefix=("The dogs near the gate", "are", "is")),
        _blimp_record(1, "Who did Mary see?", "Who did Mary see Bill?"),
        _blimp_record(2, "She saw herself.", "She saw themselves quickly."),
    ]
    f.write_text("\n".join(json.dumps(r) for r in recs) + "\n\n")  # a trailing blank line is fine
    pairs, rep = import_blimp(f, tok)
    assert [p.id for p in pairs] == ["blimp-toy_paradigm-0", "blimp-toy_paradigm-1", "blimp-toy_paradigm-2"]
    p0 = pairs[0]
    assert p0.category == "blimp/toy_term/toy_paradigm"
    assert p0.meta == {"pairID": "0", "field": "morphology", "UID": "toy_paradigm", "linguistics_term": "toy_term",
                       "lexically_identical": True, "prefix": "The dogs near the gate", "target_clean": "are",
                       "target_corrupt": "is"}
    row = rep.iloc[0]
    assert (row["total"], row["valid"], row["different_length"]) == (3, 1, 2)
    assert row["valid_frac"] == pytest.approx(1 / 3, abs=1e-3)
    out = tmp_path / "out.jsonl"
    write_jsonl(out, pairs)
    assert load_jsonl(out) == pairs  # the standard record round-trips


@pytest.mark.parametrize("content,line,message", [
    ('{"sentence_good": "A b.", "sentence_bad": "A c."}\n', 1, "missing BLiMP field"),
    (json.dumps(_blimp_record(0, "A b.", "A c.")) + "\n{not json\n", 2, "invalid JSON"),
    (json.dumps(_blimp_record(0, "A b.", "A c.")) + "\n[1, 2]\n", 2, "expected a JSON object"),
    (json.dumps({**_blimp_record(0, "A b.", "A c."), "sentence_bad": 3}) + "\n", 1, "'sentence_bad' must be"),
    ("\n\n", None, "file is empty"),
])
def test_blimp_bad_input_names_file_and_line(tmp_path, content, line, message):
    f = tmp_path / "bad.jsonl"
    f.write_text(content)
    with pytest.raises(PairFileError) as e:
        read_blimp_file(f)
    msg = str(e.value)
    assert message in msg and "\n" not in msg
    assert msg.startswith(f"{f}:{line}:" if line else f"{f}:")


def test_blimp_bad_paths(tmp_path):
    with pytest.raises(PairFileError, match="no such file"):
        import_blimp(tmp_path / "missing.jsonl")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(EclensError, match="no \\*.jsonl"):
        import_blimp(tmp_path / "empty_dir")


def test_cli_import_blimp(tmp_path, capsys, blimp_dir):
    from eclens.cli import main

    out, rep = tmp_path / "b.jsonl", tmp_path / "b.csv"
    rc = main(["pairs", "import", "blimp", str(blimp_dir / "passive_1.jsonl"),
               str(blimp_dir / "anaphor_gender_agreement.jsonl"), "--out", str(out), "--only-valid",
               "--report", str(rep)])
    assert rc == 0
    table = pd.read_csv(rep)
    assert set(table["UID"]) == {"passive_1", "anaphor_gender_agreement"}
    assert len(load_jsonl(out)) == int(table["valid"].sum())
    text = capsys.readouterr().out
    assert f"2 paradigms: {int(table['valid'].sum())} of 2000 pairs are single-token changes" in text
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{oops\n")
    rc = main(["pairs", "import", "blimp", str(bad), "--out", str(tmp_path / "never.jsonl")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith(f"error: {bad}:1: invalid JSON") and "\n" not in err
    assert not (tmp_path / "never.jsonl").exists()


# -------------------------------------------------------------------------------------- CSV


def test_csv_import_with_named_columns(tmp_path, tok, capsys):
    f = tmp_path / "mine.csv"
    f.write_text(
        "key,good,bad,kind,note\n"
        "k1,The cat is asleep.,The cat are asleep.,agreement,first\n"
        "k2,\"She said, quietly, that it was late.\",\"She said, quietly, that it is late.\",tense,\n"
        "k3,I like green tea.,I like very green tea.,,no category\n"
    )
    pairs, rep = import_csv(f, clean_col="good", corrupt_col="bad", category_col="kind", id_col="key",
                            category="mixed", tokenizer=tok)
    assert [p.id for p in pairs] == ["k1", "k2", "k3"]
    assert [p.category for p in pairs] == ["agreement", "tense", "mixed"]
    assert pairs[1].clean == "She said, quietly, that it was late."
    assert pairs[0].meta == {"note": "first"} and pairs[0].source == "csv"
    rep = rep.set_index("category")
    assert rep.loc["agreement", "valid"] == 1 and rep.loc["mixed", "different_length"] == 1
    valid, _ = import_csv(f, clean_col="good", corrupt_col="bad", category_col="kind", id_col="key",
                          tokenizer=tok, only_valid=True)
    assert [p.id for p in valid] == ["k1", "k2"]

    from eclens.cli import main

    out = tmp_path / "mine.jsonl"
    rc = main(["pairs", "import", "csv", str(f), "--clean-col", "good", "--corrupt-col", "bad", "--category-col",
               "kind", "--id-col", "key", "--out", str(out)])
    assert rc == 0 and [p.id for p in load_jsonl(out)] == ["k1", "k2", "k3"]
    capsys.readouterr()
    rc = main(["pairs", "import", "csv", str(f), "--clean-col", "good", "--corrupt-col", "bad", "--category-col",
               "type", "--out", str(tmp_path / "never.jsonl")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith(f"error: {f}:1: no column 'type'") and "--category-col" in err
    assert "\n" not in err and not (tmp_path / "never.jsonl").exists()


def test_csv_bad_rows_and_tsv(tmp_path, tok):
    f = tmp_path / "ragged.csv"
    f.write_text("clean,corrupt\nA cat.,A dog.\nA b.,A c.,extra\n")
    with pytest.raises(PairFileError, match=rf"^{f}:3: row has more fields"):
        import_csv(f)
    t = tmp_path / "pairs.tsv"
    t.write_text("clean\tcorrupt\tcategory\nThe cat is here.\tThe cat are here.\tagreement\n")
    pairs, rep = import_csv(t, tokenizer=tok)  # tab by suffix, 'category' column picked up by name
    assert pairs[0].category == "agreement" and int(rep["valid"].sum()) == 1
    e = tmp_path / "header_only.csv"
    e.write_text("clean,corrupt\n")
    with pytest.raises(PairFileError, match="no rows under the header"):
        import_csv(e)


# ------------------------------------------------------------------ every source, one checker


def test_pairs_check_reads_every_source(tmp_path, tok, blimp_dir, model):
    """Templates, LLM, BLiMP and CSV output all load with `ec pairs check`'s loader and check
    under the real model (its bridge tokenizer, BOS setting and context length)."""
    from eclens.pairs import check_with_model, load_pairs
    from eclens.sources.openai_gen import LLMConfig, generate_openai
    from eclens.sources.templates import generate_templates
    from llm_server import LLMServer

    tp = generate_templates(tok, 3, categories=["typo", "grammar/article"])  # error pairs and their twins
    assert sum(p.role == "twin" for p in tp) == 6
    write_jsonl(tmp_path / "t.jsonl", tp)
    srv = LLMServer().start()
    try:
        generate_openai(tmp_path / "o.jsonl", tok, LLMConfig("test-model", base_url=srv.base_url, n_per_category=3,
                                                             categories=["typo"], pairs_per_request=3),
                        api_key="sk-local")
    finally:
        srv.stop()
    bp, _ = import_blimp(blimp_dir / "passive_1.jsonl", tok, max_per_paradigm=20)
    write_jsonl(tmp_path / "b.jsonl", bp)
    (tmp_path / "c.csv").write_text("clean,corrupt\nThe cat is here.,The cat are here.\n")
    cp, _ = import_csv(tmp_path / "c.csv")
    write_jsonl(tmp_path / "c.jsonl", cp)
    merged = [p for name in "tobc" for p in load_jsonl(tmp_path / f"{name}.jsonl")]
    assert Counter(p.source for p in merged) == {"templates": len(tp), "openai": 3, "blimp": 20, "csv": 1}
    write_jsonl(tmp_path / "all.jsonl", merged)
    n_valid_blimp = len(check_pairs(bp, tok).valid)
    assert 0 < n_valid_blimp < 20
    # typo pairs are span-aligned: the single-token check keeps only the typos that stay one token long
    n_valid_tp = len(check_pairs(tp, tok).valid)
    assert 0 < n_valid_tp <= len(tp)
    res = check_with_model(load_pairs(tmp_path / "all.jsonl"), model)
    assert Counter(a.pair.source for a in res.valid) == {"templates": n_valid_tp, "openai": 3, "blimp": n_valid_blimp,
                                                          "csv": 1}
    want_rejected = {"blimp"} | ({"templates"} if n_valid_tp < len(tp) else set())
    assert {r.pair.source for r in res.rejected} == want_rejected
