import json
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eclens.errors import PairFileError
from eclens.pairs import (
    AlignedPair,
    MinimalPair,
    Rejection,
    align,
    check_pairs,
    encode,
    load_aligned,
    load_csv,
    load_jsonl,
    load_pairs,
    load_study_json,
    write_jsonl,
)


def P(clean, corrupt, cat="t"):
    return MinimalPair("x", clean, corrupt, cat)


def test_valid_pair(tokenizer):
    r = align(P("The cat sits on the mat.", "The cat sit on the mat."), tokenizer)
    assert isinstance(r, AlignedPair)
    assert r.clean_ids[r.position] != r.corrupt_ids[r.position]
    assert r.clean_token == " sits" and r.corrupt_token == " sit"
    assert r.position == 2 and r.length == len(r.corrupt_ids)


@pytest.mark.parametrize(
    "clean, corrupt, reason",
    [
        ("", "The cat.", "empty"),
        ("The cat.", "   ", "empty"),
        ("The cat sat.", "The cat sat.", "identical"),
        ("The cat sat.", "The elephant-shaped cat sat.", "different_length"),
        ("The cat sat on the mat.", "A cat sat on a mat.", "multiple_differences"),
    ],
)
def test_rejection_reasons(tokenizer, clean, corrupt, reason):
    r = align(P(clean, corrupt), tokenizer)
    assert isinstance(r, Rejection) and r.reason == reason


def test_multiple_differences_counts(tokenizer):
    r = align(P("The cat sat on the mat.", "A cat sat on a mat."), tokenizer)
    assert r.label == "multiple_differences(2)" and r.clean_tokens and r.corrupt_tokens


def test_too_long(tokenizer):
    r = align(P("word " * 50, "word " * 49 + "dog "), tokenizer, max_len=20)
    assert r.reason == "too_long" and r.detail > 20


def test_multi_token_word_changes_one_token(tokenizer):
    # A multi-token word whose pieces differ in one token only is still a valid pair: under the SmolLM2
    # tokenizer " Dostoevsky" / " Dostoyevsky" are " D|ost|o|ev|sky" / " D|ost|oy|ev|sky".
    clean, corrupt = "She read Dostoevsky yesterday.", "She read Dostoyevsky yesterday."
    a, b = encode(tokenizer, clean), encode(tokenizer, corrupt)
    word = encode(tokenizer, " Dostoevsky")
    assert len(word) == 5 and len(a) == len(b) and sum(x != y for x, y in zip(a, b)) == 1  # the premise
    r = align(P(clean, corrupt), tokenizer)
    assert isinstance(r, AlignedPair)
    start = len(encode(tokenizer, "She read"))
    assert r.position == start + 2 and (r.clean_token, r.corrupt_token) == ("o", "oy")
    # and a word that is several tokens in one sentence and one in the other is rejected by length
    r2 = align(P("The cat sat.", "The Xylophonist sat."), tokenizer)
    assert isinstance(r2, Rejection) and r2.reason == "different_length"


def test_leading_space_variants(tokenizer):
    # " cat" and "cat" are different tokens: the leading space belongs to the token,
    # so a leading-space variant is a one-token change at position 0.
    r = align(P("cat sat", " cat sat"), tokenizer)
    assert isinstance(r, AlignedPair) and r.position == 0
    assert (r.clean_token, r.corrupt_token) == ("cat", " cat")
    r2 = align(P("A cat sat", "A dog sat"), tokenizer)
    assert isinstance(r2, AlignedPair) and r2.clean_token == " cat" and r2.corrupt_token == " dog"


def test_japanese(tokenizer):
    r = align(P("猫が座った。", "犬が座った。"), tokenizer)
    # 猫 and 犬 are three UTF-8 bytes each, split into byte-level tokens of which two differ: the
    # pair is counted as a two-token change, as the token ids say
    a, b = encode(tokenizer, "猫が座った。"), encode(tokenizer, "犬が座った。")
    assert len(a) == len(b) and sum(x != y for x, y in zip(a, b)) == 2
    assert isinstance(r, Rejection) and r.reason == "multiple_differences" and r.detail == 2
    assert encode(tokenizer, "猫が座った。")  # tokenizes without error
    same = align(P("猫が座った。", "猫が座った。"), tokenizer)
    assert same.reason == "identical"


def test_bos_on_and_off(tokenizer):
    off = encode(tokenizer, "The cat")
    on = encode(tokenizer, "The cat", prepend_bos=True)
    assert on[0] == tokenizer.bos_token_id and on[1:] == off
    r = align(P("The cat sat", "The dog sat"), tokenizer, prepend_bos=True)
    assert r.position == 2


_WORDS = st.text(alphabet=st.characters(codec="utf-8", categories=("L", "N", "P", "Zs")), min_size=1, max_size=40)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sentence=_WORDS, where=st.integers(min_value=0, max_value=10**6), tok_id=st.integers(min_value=0, max_value=49151))
def test_property_single_substitution_found(tokenizer, sentence, where, tok_id):
    ids = encode(tokenizer, sentence)
    if not ids:
        return
    i = where % len(ids)
    new = list(ids)
    new[i] = tok_id
    if new == ids:
        return
    corrupt = tokenizer.decode(new)
    clean = tokenizer.decode(ids)
    # only substitutions that survive a decode/encode round trip are well defined
    if encode(tokenizer, corrupt) != new or encode(tokenizer, clean) != ids:
        return
    r = align(P(clean, corrupt), tokenizer)
    if not clean.strip() or not corrupt.strip():
        assert isinstance(r, Rejection) and r.reason == "empty"
        return
    assert isinstance(r, AlignedPair) and r.position == i


# ------------------------------------------------------------------ loaders


def test_jsonl_roundtrip(tmp_path):
    pairs = [MinimalPair("a", "The cat sits.", "The cat sit.", "grammar/agreement", "test", {"k": 1}),
             MinimalPair("b", "A dog runs.", "A dog run.", "grammar/agreement")]
    f = write_jsonl(tmp_path / "p.jsonl", pairs)
    assert load_pairs(f) == pairs


def test_jsonl_defaults_and_ids(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"clean": "a b", "corrupt": "a c"}\n\n{"clean": "x y", "corrupt": "x z", "category": "c"}\n')
    ps = load_jsonl(f)
    assert [p.category for p in ps] == ["uncategorized", "c"] and len({p.id for p in ps}) == 2


def test_jsonl_utf8_bom(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_bytes(b"\xef\xbb\xbf" + json.dumps({"clean": "a b", "corrupt": "a c"}).encode() + b"\n")
    assert load_jsonl(f)[0].clean == "a b"


@pytest.mark.parametrize(
    "content, line, message",
    [
        ('{"clean": "a", "corrupt": "b"}\n{"clean": "a", \n', 2, "invalid JSON"),
        ('{"clean": "a"}\n', 1, "missing field 'corrupt'"),
        ('{"clean": "a", "corrupt": 3}\n', 1, "must be a string"),
        ('{"clean": "a", "corrupt": "b", "colour": 1}\n', 1, "unknown field"),
        ('["a", "b"]\n', 1, "expected a JSON object"),
        ('{"id": "1", "clean": "a", "corrupt": "b"}\n{"id": "1", "clean": "c", "corrupt": "d"}\n', 2, "duplicate pair id"),
    ],
)
def test_jsonl_errors_name_line(tmp_path, content, line, message):
    f = tmp_path / "bad.jsonl"
    f.write_text(content)
    with pytest.raises(PairFileError) as e:
        load_jsonl(f)
    assert str(e.value).startswith(f"{f}:{line}: ") and message in str(e.value)
    assert "\n" not in str(e.value)


def test_empty_and_binary_files(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n")
    with pytest.raises(PairFileError, match="empty"):
        load_jsonl(empty)
    binary = tmp_path / "bin.jsonl"
    binary.write_bytes(b'{"clean": "a", "corrupt": "b"}\n{"clean": "\xff\xfe"}\n')
    with pytest.raises(PairFileError, match=r"bin.jsonl:2: not UTF-8"):
        load_jsonl(binary)
    with pytest.raises(PairFileError, match="no such file"):
        load_pairs(tmp_path / "missing.jsonl")


def test_csv_loader_with_column_mapping(tmp_path):
    f = tmp_path / "p.csv"
    f.write_text('good,bad,kind,note\n"The cat sits, happily.",The cat sit.,grammar,x\nA dog.,A cat.,meaning,y\n')
    ps = load_csv(f, clean_col="good", corrupt_col="bad", category_col="kind")
    assert [p.category for p in ps] == ["grammar", "meaning"]
    assert ps[0].clean == "The cat sits, happily." and ps[0].meta == {"note": "x"}
    with pytest.raises(PairFileError, match=r"p.csv:1: no column 'clean'"):
        load_csv(f)
    bad = tmp_path / "bad.csv"
    bad.write_text("clean,corrupt\na,b\nc,d,e\n")
    with pytest.raises(PairFileError, match=r"bad.csv:3: row has more fields"):
        load_csv(bad)


def test_study_json_format(tmp_path):
    doc = {"metadata": {"model": "gpt"}, "diff_token_type": {
        "grammar": {"agreement": {"sentence_pairs": [{"sentence1": "He runs.", "sentence2": "He run."}]}},
        "meaning": {"subject": {"sentence_pairs": [{"sentence1": "A cat.", "sentence2": "A dog."},
                                                   {"sentence1": "A man.", "sentence2": "A boy."}]}}}}
    f = tmp_path / "study.json"
    f.write_text(json.dumps(doc))
    ps = load_pairs(f)
    assert [p.category for p in ps] == ["grammar/agreement", "meaning/subject", "meaning/subject"]
    assert ps[0].clean == "He runs." and ps[0].corrupt == "He run."
    bad = tmp_path / "bad.json"
    bad.write_text('{"diff_token_type": {"g": {"a": {"sentence_pairs": [{"sentence1": 1}]}}}}')
    with pytest.raises(PairFileError, match="sentence_pairs\\[0\\]"):
        load_study_json(bad)
    broken = tmp_path / "broken.json"
    broken.write_text('{\n"diff_token_type": \n}')
    with pytest.raises(PairFileError, match=r"broken.json:3: invalid JSON"):
        load_study_json(broken)


def test_check_pairs_and_aligned_roundtrip(tokenizer, tmp_path):
    ps = [MinimalPair("1", "The cat sits.", "The cat sit.", "g"), MinimalPair("2", "A b", "A b", "g"),
          MinimalPair("3", "The cat sat.", "The dog sat.", "m")]
    res = check_pairs(ps, tokenizer)
    assert len(res.valid) == 2 and res.by_reason()["identical"] == 1
    df = res.by_category()
    assert df.set_index("category").loc["g", "valid"] == 1 and df["total"].sum() == 3
    f = write_jsonl(tmp_path / "a.jsonl", res.valid)
    back = load_aligned(f)
    assert [(a.id, a.position, a.clean_ids) for a in back] == [(a.id, a.position, a.clean_ids) for a in res.valid]


def _ec(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "eclens", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_cli_bad_file_one_line_no_traceback(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"clean": "a", "corrupt": "b"}\nnot json\n')
    r = _ec("pairs", "check", str(f), "--out", str(tmp_path / "out.jsonl"))
    assert r.returncode == 2
    assert r.stderr.strip() == f"error: {f}:2: invalid JSON (Expecting value, column 1)"
    assert not (tmp_path / "out.jsonl").exists()


def test_cli_pairs_check(tmp_path, capsys):
    # in this process (a child process costs ~5 s of imports): the terminal's view of `ec` is
    # test_cli_bad_file_one_line_no_traceback's
    from eclens.cli import main

    f = tmp_path / "p.jsonl"
    write_jsonl(f, [MinimalPair("1", "The cat sits.", "The cat sit.", "grammar/agreement"),
                    MinimalPair("2", "The cat sat on the mat.", "A cat sat on a mat.", "grammar/article")])
    rc = main(["pairs", "check", str(f), "--out", str(tmp_path / "ok.jsonl"), "--rejected", str(tmp_path / "rej.jsonl")])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "1 valid of 2 pairs" in out.out and "multiple_differences(2)" in out.out
    assert len(load_aligned(tmp_path / "ok.jsonl")) == 1
    assert json.loads((tmp_path / "rej.jsonl").read_text())["reason"] == "multiple_differences"


def test_jsonl_strings_may_hold_characters_that_splitlines_breaks_at(tmp_path):
    """U+0085, U+2028 and U+001C are line boundaries for str.splitlines but legal raw inside a JSON string (found
    by test_fuzz.test_blimp_records: a record cut in two read as invalid JSON)."""
    f = tmp_path / "p.jsonl"
    recs = [{"id": "a", "clean": "The cat runs.", "corrupt": "The cat run.", "category": "grammar/agreement",
             "meta": {"note": "x\x85y\u2028z\x1cw"}},
            {"id": "b", "clean": "A dog.", "corrupt": "An dog.", "category": "grammar/article"}]
    f.write_text("".join(json.dumps(r, ensure_ascii=False) + "\r\n" for r in recs), encoding="utf-8")
    ps = load_pairs(f)
    assert [p.id for p in ps] == ["a", "b"] and ps[0].meta["note"] == "x\x85y\u2028z\x1cw"
