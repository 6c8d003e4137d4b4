"""`ec run` prints its planned cost before the heavy steps (issue 19, "Budget"), under --quiet too."""

from __future__ import annotations

from dataclasses import replace

from eclens.budget import plan, plan_lines, time_forward
from eclens.pipeline import RunConfig, Step, run_steps
from eclens.steps import StepOutcome
from test_interaction import two_by_two


def test_plan_counts_follow_the_settings(tiny):
    pairs = two_by_two(tiny.tokenizer)
    steps = ["diff", "measure", "exact", "dims", "attribution"]
    cfg = RunConfig(measure_clusters=None)
    p = plan(cfg, pairs, tiny.cfg.n_layers, steps)
    assert p["diff"] == 2 * len(pairs) and p["measure"] == 8 * len(pairs)
    # the 2x2 error cells are error pairs: the dims tests have pairs to run on
    assert p["dims"] == cfg.max_sets * cfg.dims_pairs * (1 + 2 * cfg.n_controls) * 2
    more = plan(replace(cfg, n_controls=2 * cfg.n_controls, baseline="random"), pairs, tiny.cfg.n_layers,
                [*steps, "baseline"])
    assert more["dims"] > p["dims"] and more["baseline"] == p["diff"] + p["measure"]
    assert time_forward(tiny, pairs) > 0


def test_run_steps_logs_the_plan_before_the_second_step_even_quiet(tiny, tmp_path):
    pairs = two_by_two(tiny.tokenizer, 2)
    said = []

    def make(run, model, ps, progress, log):
        return StepOutcome("done", [], "pairs made", pairs)

    def second(run, model, ps, progress, log):
        said.append("second ran")
        return StepOutcome("done", [], "ok", None)

    steps = [Step("pairs", make, {}), Step("diff", second, {})]
    run_steps(tmp_path, tiny, steps, log=said.append, progress=False,
              plan=lambda ps: plan_lines(RunConfig(), tiny, ps, ["diff"]))
    i = next(k for k, s in enumerate(said) if s.startswith("planned cost:"))
    assert f"{len(pairs)} pairs" in said[i] and said[i + 1].startswith("  diff: ")
    assert i < said.index("second ran")
