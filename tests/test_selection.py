"""Held-out selection (issue 19): half A's candidates from the diff's per-half rows (``DiffResult.for_half``)
equal those of a diff run on half A's pairs alone; sets chosen per swap direction name their direction."""

from __future__ import annotations

import pandas as pd
import pytest

from eclens.bootstrap import split_half
from eclens.diff import run_diff
from eclens.patch import DimSet
from eclens.roles import cluster_of, is_error_of, role_of
from eclens.selection import set_direction
from eclens.steps import choose_sets
from test_diff_directions import KW, UNITS, Plant, direction_pairs, plant_up, responsive

KW = {**KW, "n_boot": 20, "n_perm": 20}  # candidates do not depend on the replicate counts


@pytest.fixture(scope="module")
def planted(tiny):
    pairs = direction_pairs(tiny.tokenizer)
    return pairs, Plant(tiny, "blocks.0.hook_resid_post", plant_up(pairs))


def _norm(df: pd.DataFrame) -> pd.DataFrame:
    return df.sort_values(list(df.columns[:6])).reset_index(drop=True)


@pytest.mark.slow  # three diffs of the tiny model (~140 s at load 17 on 2 cores)
def test_half_a_of_the_run_diff_equals_a_diff_of_half_a(planted):
    pairs, model = planted
    whole = run_diff(model, pairs, **KW)
    half_a = [a for a in pairs if split_half(cluster_of(a), 0) == 0]
    assert 0 < len(half_a) < len(pairs)
    alone = run_diff(model, half_a, **KW)
    got, want = whole.for_half(0).candidates, alone.candidates
    assert len(want) and set(want["kind"]) >= {"responsive"}
    pd.testing.assert_frame_equal(_norm(got), _norm(want), check_exact=False, rtol=1e-6, atol=1e-9)
    # the chosen sets are the same, and the planted units are what the responsive set of `up` holds
    sets_got, sets_want = choose_sets(got, 4, 10), choose_sets(want, 4, 10)
    assert [(s.label, s.dims) for s in sets_got] == [(s.label, s.dims) for s in sets_want]
    # half A finds exactly the plant (beyond what the unplanted model's word changes move by themselves)
    base = run_diff(model.model, pairs, **KW).for_half(0)
    assert not {u for _, u in responsive(base, "test/x", "up")} & set(UNITS)
    gained = responsive(whole.for_half(0), "test/x", "up") - responsive(base, "test/x", "up")
    assert {u for _, u in gained} == set(UNITS)
    assert responsive(whole.for_half(0), "test/x", "down") == responsive(base, "test/x", "down")
    # issue 17: the summary's means and relative changes carry cluster-bootstrap intervals around their estimate
    sm = whole.summary
    for col in ("logprob_diff", "kl_0"):
        lo, hi = sm[f"mean_{col}_ci"]
        assert lo <= sm[f"mean_{col}"] <= hi and lo < hi
    top = sm["max_rel_l2_at_p"]["hook_resid_post"]
    for k in ("rel_l2_mean", "rel_l2_rms", "rel_l2_rms_nomassive"):
        assert top[f"{k}_lo"] <= top[k] <= top[f"{k}_hi"] and top[f"{k}_lo"] < top[f"{k}_hi"], (k, top)
    assert "no interval" in sm["interval_notes"]["counts"]


def test_set_direction_and_2x2_error_cells(tiny):
    assert set_direction(DimSet("hook_resid_post", 1, [3], 0, "responsive", "hook_resid_post/L1/o0/responsive[sg->pl]/k1")) == "sg->pl"
    assert set_direction(DimSet("hook_resid_post", 1, [3], 0, "stable")) is None
    assert set_direction(DimSet("hook_resid_post", 1, [3], 0, "stable", "hook_resid_post/L1/o0/stable[all]/k1")) is None
    from eclens.pairs import MinimalPair, align

    rec = MinimalPair("x", "The dog runs fast.", "The dog run fast.", "grammar/agreement", "t",
                      {"design": "2x2", "cell_error": True}, cluster="c", role="subj_sg:verb_pl")
    a = align(rec, tiny.tokenizer)
    assert role_of(a) == "subj_sg:verb_pl" and is_error_of(a)
    twin = MinimalPair("y", "The dog runs fast.", "The dog ran fast.", "grammar/agreement", "t", {}, cluster="c",
                       role="twin", twin_kind="acceptable", twin_of="x")
    assert not is_error_of(align(twin, tiny.tokenizer))


def test_a_direction_chosen_set_is_tested_on_its_own_direction(tiny, tmp_path):
    import json

    from eclens.model import manifest_model_entry
    from eclens.runs import update_manifest
    from eclens.steps import DimsConfig, dims_step

    pairs = direction_pairs(tiny.tokenizer, n_clusters=6)
    update_manifest(tmp_path, model=manifest_model_entry(tiny))
    sets = [DimSet("hook_resid_pre", 1, [3, 7], 0, "responsive", "hook_resid_pre/L1/o0/responsive[up]/k2"),
            DimSet("hook_resid_pre", 1, [4, 9], 0, "stable")]
    out = dims_step(tmp_path, tiny, pairs, sets, DimsConfig(n_controls=3, n_perm=20, matched=False, n_pairs=4),
                    progress=False)
    t = out.value
    by_set = dict(zip(t["set"], t["pairs_swap_direction"]))
    assert by_set == {sets[0].label: "up", sets[1].label: "all"}
    used = json.loads((tmp_path / "manifest.json").read_text())["steps"]["patch"]["dims"]["params"]["pairs"]
    up = next(v for k, v in used.items() if k.endswith("[up]"))
    assert up and all(i.endswith("-up") for i in up)
    assert any(i.endswith("-down") for k, v in used.items() if not k.endswith("[up]") for i in v)


def test_sets_of_a_direction_without_error_pairs_are_a_stated_null(tiny, tmp_path):
    from eclens.model import manifest_model_entry
    from eclens.runs import update_manifest
    from eclens.steps import DimsConfig, dims_step

    pairs = direction_pairs(tiny.tokenizer, n_clusters=4)
    update_manifest(tmp_path, model=manifest_model_entry(tiny))
    s = DimSet("hook_resid_pre", 1, [3, 7], 0, "responsive", "hook_resid_pre/L1/o0/responsive[sideways]/k2")
    out = dims_step(tmp_path, tiny, pairs, [s], DimsConfig(n_controls=3, n_perm=20, matched=False), progress=False)
    assert out.status == "empty" and out.headline.startswith("null: no error pairs") and "[sideways]" in out.headline
