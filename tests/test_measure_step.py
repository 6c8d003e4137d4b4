"""The measure step (recovery, selective invariance, probe) as the product runs it: files, roles, no twins,
span pairs, `ec measure`. The statistics themselves are tested on planted models in test_recovery,
test_invariance and test_probe."""

from __future__ import annotations

import json
from dataclasses import replace

import pandas as pd
import pytest

from _designpairs import design_pairs
from eclens.measure_step import COLUMNS, FILES, MeasureConfig, choose_clusters, measure_role, measure_step
from eclens.pairs import MinimalPair, align, write_jsonl
from eclens.runs import RunData

CFG = MeasureConfig(max_clusters=None, n_boot=200, n_permutations=1, max_offset=3)


@pytest.fixture(scope="module")
def pairs(tiny):
    return design_pairs(tiny.tokenizer, n_clusters=8)


def test_step_writes_every_file(tiny, pairs, tmp_path):
    out = measure_step(tmp_path, tiny, pairs, CFG, progress=False)
    assert out.status == "done" and out.files == list(FILES)
    for f in FILES:
        assert (tmp_path / f).is_file(), f
    rd = RunData(tmp_path)
    rec = rd.recovery
    assert list(rec.columns) == list(COLUMNS["recovery.csv"])
    # one row per pair and position p..last
    assert len(rec) == sum(a.length - a.position for a in pairs)
    assert set(rec["role"]) == {"error", "twin"} and set(rec["design_role"]) == {"error", "twin"}
    idx = rd.recovery_index
    ri = idx[idx["measure"] == "recovery_index"]
    assert list(ri["offset"].astype(str)) == ["1", "2", "3", "last"] and (ri["n_clusters"] == 8).all()
    assert (ri["note"] == "vs twins (paired within clusters)").all()
    assert {"ignore_mean_gap", "ignore_delete_cost"} <= set(idx["measure"])
    gap = idx[idx["measure"] == "ignore_mean_gap"].iloc[0]
    assert gap["note"].split(":")[0] in ("corrects", "no power", "no correction", "inconclusive", "too few clusters")
    cells = pd.read_parquet(tmp_path / "invariance.parquet")
    assert list(cells.columns) == list(COLUMNS["invariance.parquet"]) and len(cells)
    probe = rd.probe
    assert list(probe["layer"]) == list(range(-1, tiny.cfg.n_layers))
    assert (probe["items"] == "errors and twins (token identity not held fixed)").all()
    s = rd.measure
    inv = s["invariance_summary"]
    assert inv["reached"] == len(cells) and len(inv["null_invariant"]) == 1
    assert inv["invariant"] == int((cells["class"] == "invariant").sum())
    # one headline line with the index, the ignore verdicts, the counts beside the null and the probe
    head = out.headline
    assert "\n" not in head and head.startswith("recovery index at the last token")
    assert "permutation null" in head and "probe: peak" in head
    assert ("layer 0 at chance" in head) == bool(s["probe"]["at_chance"])
    man = json.loads((tmp_path / "manifest.json").read_text())
    assert man["steps"]["measure"]["headline"] == head


def test_pairs_without_twins_write_headers_only(tiny, pairs, tmp_path):
    old = [replace(a, pair=replace(a.pair, role=None, cluster=None)) for a in pairs if a.pair.role == "error"]
    out = measure_step(tmp_path, tiny, old, CFG, progress=False)
    assert out.status == "empty" and "no twins among the 8 pairs" in out.headline and "\n" not in out.headline
    rd = RunData(tmp_path)
    for name, cols in COLUMNS.items():
        df = pd.read_parquet(tmp_path / name) if name.endswith(".parquet") else pd.read_csv(tmp_path / name)
        assert list(df.columns) == list(cols) and df.empty, name
    assert rd.measure["status"] == "empty"
    from eclens.measure_view import measure_panel

    assert "no twins" in measure_panel(rd).sentences[0]


def test_span_pairs_are_measured_from_the_span_end(tiny, tmp_path):
    """Span pairs (issue 16) are measured, not refused: recovery rows run from the span end, where the clean and
    the changed sentence are read at their own positions."""
    p = MinimalPair("s1", "The dog sat near the table.", "The dgo sat near the table.", "typo", cluster="c1",
                    role="error")
    t = MinimalPair("s1t", "The dog sat near the table.", "The cat sat near the table.", "typo", cluster="c1",
                    role="twin", twin_kind="acceptable", twin_of="s1")
    a, b = (align(x, tiny.tokenizer, mode="span") for x in (p, t))
    assert a.mode == "span"
    out = measure_step(tmp_path, tiny, [a, b], CFG, progress=False)
    assert out.status == "done", out.headline
    rec = pd.read_csv(tmp_path / "recovery.csv")
    err = rec[rec["id"] == "s1"]
    assert len(err) and (err["t_changed"] - err["t"] == a.corrupt_end - a.clean_end).all()


def test_roles_and_cluster_choice(pairs):
    cell = replace(pairs[0], pair=replace(pairs[0].pair, role="subj_sg:verb_pl", meta={"cell_error": True}))
    meaning = replace(pairs[0], pair=replace(pairs[0].pair, role=None, category="meaning/subject"))
    bare = replace(pairs[0], pair=replace(pairs[0].pair, role=None))
    assert [measure_role(x) for x in (cell, meaning, bare, pairs[1])] == ["error", "comparison", "error", "twin"]
    three = choose_clusters(pairs, 3, seed=0)
    assert len({a.pair.cluster_id for a in three}) == 3 and len(three) == 6  # whole clusters
    assert choose_clusters(pairs, 3, seed=0) == three and choose_clusters(pairs, None) == list(pairs)


def test_ec_measure_cli(tmp_path, capsys):
    from eclens.cli import main
    from eclens.model import load_tokenizer, save_tiny_model

    model = save_tiny_model(tmp_path / "m", n_layers=2, seed=0)
    run = tmp_path / "run"
    run.mkdir()
    write_jsonl(run / "pairs.jsonl", design_pairs(load_tokenizer(str(model)), n_clusters=6))
    argv = ["measure", str(run), "--model", str(model), "--clusters", "4", "--n-boot", "100", "--permutations", "1",
            "--no-invariance", "--quiet"]
    assert main(argv) == 0
    got = capsys.readouterr().out
    assert "recovery index at the last token" in got and "wrote recovery.csv" in got
    rec = pd.read_csv(run / "recovery.csv")
    assert rec["cluster"].nunique() == 4
    assert pd.read_parquet(run / "invariance.parquet").empty  # --no-invariance: its header, no rows
    assert main(["measure", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert "no pairs.jsonl" in err and len(err.strip().splitlines()) == 1
