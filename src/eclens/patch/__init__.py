"""Causal tests: batched exact activation patching, dimension-set interventions with
random controls, and attribution patching.

**Batched exact patching.** For one pair, a sweep over (hook, layer, position[, head])
is hundreds of patched runs that share one input. Instead of one forward pass per
patch (TransformerLens's ``patching`` module), we stack up to ``batch_size`` patched
copies of the base input in one batch. Each row ``r`` carries one patch: hook ``h_r``,
position ``t_r``, an optional feature mask (a head, a set of dimensions) and a value.
One forward hook per hook point writes the rows assigned to it with index tensors and
``torch.where`` (no Python loop over rows). The source activations of the clean and
the corrupt run are cached once per pair (``run_with_cache`` with a names filter).

Positions before the changed position ``p`` carry identical activations in the clean
and the corrupt run (a causal model has not seen ``p`` yet), so patching them is a
no-op: those rows get the base run's values without a forward pass.

TransformerBridge's ``start_at_layer`` would let a patch at layer ``L`` skip layers
``< L``, but the bridge implements it by feeding the residual through the HF model as
``inputs_embeds`` and swapping it in at block ``L`` — every block still runs — so it
saves nothing here; each chunk is one full forward pass.

**Directions.** ``denoise``: the clean activation into the corrupt run. ``noise``: the
corrupt activation into the clean run. Metrics and ``*_restored`` are defined in
:mod:`eclens.metrics` (0 = corrupt run, 1 = clean run, in both directions).

**Dimension sets.** For a set of dimensions at one (hook, layer) and one position
(offset from ``p``; ``-1`` = last token) we zero-, mean- or resample-ablate them in the
base run, or patch just them from the other run, and compare the effect with the same
intervention on ``n_controls`` random sets of the same size from the same hook and
layer (drawn uniformly without replacement from the dimensions outside the set). The
effect of a set is the mean over pairs of ``m_intervened - m_base``. Two-sided
empirical p-value: ``(b + 1) / (n + 1)`` with ``b`` the number of controls with
``|effect| >= |candidate effect|``; Benjamini-Hochberg q-values across all sets (and
directions) tested in one call.

**Attribution patching** (Nanda 2023; AtP, Kramár et al. 2024):
``(a_src - a_base) . d metric / d a`` at the base run, for every (hook, layer,
position[, head]) and per dimension at ``p``, from one forward and one backward pass
per batch of pairs. It estimates ``m_patched - m_base`` of exact patching.
The package holds one idea a module: :mod:`~eclens.patch.engine` (preparation, batched patched
copies), :mod:`~eclens.patch.exact`, :mod:`~eclens.patch.dims`, :mod:`~eclens.patch.attribution` and
:mod:`~eclens.patch.summaries`, :mod:`~eclens.patch.skip` (layer skipping and exchange) and
:mod:`~eclens.patch.causal` (matched controls, interaction, metric visibility). Which hooks can be patched, and the ``--hooks`` grammar, are
:mod:`eclens.hooks`'.
"""

from ..hooks import EXACT_HOOKS, HEAD_HOOK, HOOK_ALIASES, NOT_PATCHABLE, hook_suffix, parse_hooks
from ..stats import bh_qvalues  # the one BH implementation (patch had its own; same numbers)
from .attribution import attribution_patch
from .causal import causal_test, interaction, matched_controls, sees, sees_share
from .dims import CANDIDATE_COLUMNS, DimSet, DimsResult, candidate_sets, dims_intervention, dims_interventions
from .engine import ABLATIONS, DIRECTIONS, Prepared, Rows, parse_direction, position_kind, prepare, run_rows
from .exact import exact_patch, exact_tensors, pair_baselines, patch_all_positions
from .skip import COMPONENTS, SkipConfig, SkipResult, layer_exchange, layer_skip, run_skipped
from .summaries import attribution_summary, exact_summary, sweep_agreement, topk_overlap

__all__ = ["ABLATIONS", "CANDIDATE_COLUMNS", "COMPONENTS", "SkipConfig", "SkipResult", "causal_test", "interaction",
           "layer_exchange", "layer_skip", "matched_controls", "run_skipped", "sees", "sees_share", "DIRECTIONS", "EXACT_HOOKS", "HEAD_HOOK", "HOOK_ALIASES", "NOT_PATCHABLE",
           "DimSet", "DimsResult", "Prepared", "Rows", "attribution_patch", "attribution_summary", "sweep_agreement", "bh_qvalues",
           "candidate_sets", "dims_intervention", "dims_interventions", "exact_patch", "exact_summary",
           "exact_tensors", "hook_suffix", "pair_baselines", "parse_direction", "parse_hooks", "patch_all_positions",
           "position_kind", "prepare", "run_rows", "topk_overlap"]
