"""The 2x2 recovery estimand (eclens.interaction): a planted error effect is found with its sign, a planted
cell-specific one in the interaction term; without a plant, nothing — even where errors register more
strongly at detect and the outcome depends on that (the KL(0) covariate adjusts it)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from eclens.bootstrap import BootstrapConfig
from eclens.interaction import fit_2x2, headline_rows, interaction_table

CELLS = ("subj_pl:verb_sg", "subj_sg:verb_pl")


def table(effect=0.0, cell_effect=0.0, n_clusters=30, seed=0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for c in range(n_clusters):
        frame = rng.normal(0, 2)  # a cluster effect far larger than the plant: only within-frame comparisons see it
        for k, cell in enumerate(CELLS):
            for role in ("error", "twin"):
                e = role == "error"
                kl0 = np.exp(rng.normal(1.0 if e else -1.0, 0.5))  # errors register more strongly at detect
                y = frame - 0.8 * np.log(kl0) + rng.normal(0, 0.3)  # and a larger change decays more
                y += effect * e + cell_effect * e * (k == 0)
                rows.append({"id": f"{c}{cell}{role}", "category": "grammar/agreement", "cluster": f"c{c}",
                             "role": role, "cell": cell, "couple": f"{c}{cell}", "kl0_changed": kl0, "decay_last": y})
    return pd.DataFrame(rows)


BOOT = BootstrapConfig(n_boot=400, seed=1)


def terms(df):
    return {r["term"]: r for r in fit_2x2(df, "decay_last", BOOT, n_perm=400)}


def test_unplanted_finds_nothing_despite_the_detect_confound():
    for seed in range(3):
        t = terms(table(seed=seed))
        for name in ("error_effect", "error_x_cell"):
            assert t[name]["low"] < 0 < t[name]["high"] and t[name]["p_perm"] > 0.01, (seed, name, t[name])
        assert abs(t["log_kl0"]["estimate"] + 0.8) < 0.15  # the covariate carries the confound
    # the unadjusted paired difference would have "found" a faster decay of errors
    df = table()
    d = df.groupby(["couple", "role"])["decay_last"].first().unstack()
    assert (d["error"] - d["twin"]).mean() < -1


def test_planted_error_effect_is_found_with_its_sign():
    t = terms(table(effect=-0.6))
    e = t["error_effect"]
    assert e["high"] < 0 and e["p_perm"] < 0.01 and abs(e["estimate"] + 0.6) < 0.2
    x = t["error_x_cell"]
    assert x["low"] < 0 < x["high"]


def test_planted_cell_specific_effect_is_the_interaction():
    t = terms(table(cell_effect=-1.0))
    # cell coded +1/2 for the first (sorted) cell: b_int = effect(first) - effect(second) = -1, b_err its mean
    assert t["error_x_cell"]["high"] < 0 and t["error_x_cell"]["p_perm"] < 0.01
    assert abs(t["error_x_cell"]["estimate"] + 1.0) < 0.3 and abs(t["error_effect"]["estimate"] + 0.5) < 0.2


def test_table_and_headline_rows_and_too_few_clusters():
    out = interaction_table(table(effect=-0.6).drop(columns=["cell", "couple"]),
                            table()[["id", "cell", "couple"]], ["decay_last", "missing"], BOOT, 200)
    assert set(out["term"]) == {"error_effect", "error_x_cell", "cell", "log_kl0"} and set(out["outcome"]) == {"decay_last"}
    h = headline_rows(out)
    assert len(h) == 1 and h[0]["high"] < 0 and h[0]["cells"] == " / ".join(CELLS)
    small = terms(table(n_clusters=2))
    assert np.isnan(small["error_effect"]["estimate"])


def two_by_two(tokenizer, n_clusters=6):
    """Per cluster two error cells (``a:x`` clean dog -> zebra, ``b:y`` clean cat -> horse), each with a twin."""
    import itertools

    from eclens.pairs import MinimalPair, align

    out = []
    for c, (adj, noun) in enumerate(list(itertools.product((" big", " small", " old"), (" table", " river")))[:n_clusters]):
        frame = "The{A}{X} sat near the{B} for a long time."
        for cell, (clean, err, twin) in (("a:x", (" dog", " zebra", " cat")), ("b:y", (" lion", " tiger", " horse"))):
            eid = f"c{c}-{cell}"
            for pid, word, role in ((eid, err, cell), (f"{eid}-twin", twin, "twin")):
                meta = {"design": "2x2", "cell_error": True} if role != "twin" else {}
                p = MinimalPair(pid, frame.format(A=adj, X=clean, B=noun), frame.format(A=adj, X=word, B=noun),
                                "grammar/agreement", "test", meta, cluster=f"c{c}", role=role,
                                twin_kind="acceptable" if role == "twin" else None,
                                twin_of=eid if role == "twin" else None)
                out.append(align(p, tokenizer))
    return out


def test_measure_writes_the_2x2_table_and_headline(tiny, tmp_path):
    from eclens.measure_step import MeasureConfig, measure_step

    cfg = MeasureConfig(max_clusters=None, n_boot=100, invariance=False, probe=False, max_offset=2)
    out = measure_step(tmp_path, tiny, two_by_two(tiny.tokenizer), cfg, progress=False)
    t = pd.read_csv(tmp_path / "recovery_2x2.csv")
    assert set(t["outcome"]) == {"decay_1", "decay_2", "decay_last", "suffix_changed"}
    row = t[(t["term"] == "error_effect") & (t["outcome"] == "decay_last")].iloc[0]
    assert row["n_clusters"] == 6 and row["n_couples"] == 12 and row["cells"] == "a:x / b:y"
    assert "2x2 error effect" in out.headline
    assert out.value.summary["recovery"]["interaction_2x2"][0]["category"] == "grammar/agreement"
