"""Streaming, position-aligned, normalised activation differences (``ec diff``).

For every pair, the clean and the corrupt sentence run in one batch (clean rows
``0..B-1``, corrupt rows ``B..2B-1``; :mod:`eclens.hooks`). A forward hook on each
selected hook point gathers only the aligned positions every pair needs — the
changed position ``p`` (offset 0), ``p+1..p+K`` (offsets ``1..K``, where inside the
sentence) and the last token (offset ``-1``) — and drops the rest of the
activation. After the forward pass the gathered activations of all layers of one
hook are reduced together: ``Δ = corrupt - clean`` and the clean activation update
streaming accumulators (:mod:`eclens.stats`), per category, on the model's device. Memory does not grow with the number of pairs; padded positions are
never read (positions are clamped to each sentence's own length and masked).

What is accumulated, per (category, hook, layer, offset, dimension) — exactly:

* count, mean and M2 of Δ (mean Δ, spread of Δ) and of the clean activation
  (its mean and its spread σ, the normaliser), as shifted power sums; the sum of
  |Δ|; the sum of sign(Δ) and the number of non-zero Δ (sign consistency). The root
  mean square of the clean activation (the massive-activation criterion) follows
  from its moments;
* per (category, hook, layer, offset), for each pair: ‖Δ‖, the relative L2
  ‖Δ‖/‖a_clean‖ and the cosine of the clean and corrupt activation vectors (count,
  mean, M2); for per-head hooks (``attn.hook_q/k/v/z``) the last two per head.

Precision: the per-batch work is float32 and the totals float64 (see
:class:`GroupAccumulator`); exact statistics agree with a float64 brute force from
``run_with_cache`` to ~1e-7 relative. Memory: the totals are ``O x C x 7 x L x D``
float64 per hook, plus the pair sample below — fixed, whatever the number of pairs.

What is sampled: a uniform sample of at most ``sample_size`` pairs (bottom-k on a
hash of the pair id: independent of batch size, order and resumes) keeps each
sampled pair's Δ at every gathered position (float16) and its per-layer scalars.
Everything that needs the normaliser σ (known only at the end) or the final mean
direction comes from this sample, with σ and the mean direction taken from the
exact accumulators: the quantiles (median, q10/q25/q75/q90) of the normalised
change ``|Δ|/σ``, the fraction of pairs with ``|Δ|/σ < threshold``, the
leave-one-out cosine of each pair's Δ with the mean Δ of the others
(``cos(δ_i, S - δ_i)``, ``S`` the exact sum) and the per-dimension category
contrasts. Why a sample rather than a sketch: a fixed-bin histogram of ``|Δ|/σ``
needs σ before the data, a log-binned histogram of raw ``|Δ|`` needs hundreds of
bins per cell (more memory than the sample), and per-pair values are needed anyway
for the rank tests of the contrasts and the cosine distribution. With at most
``sample_size`` pairs these numbers are exact (up to float16 rounding, ~5e-4
relative); beyond, they are estimates from a uniform sample, and ``n_sample``
says from how many pairs.

Normalisation: σ of a (hook, layer, offset, dimension) is the standard deviation
(ddof=1) of the *clean* activation of that dimension at that aligned position over
all pairs (category ``all``), so categories are measured on one scale. ``absz``
is ``|Δ|/σ``; dims with σ = 0 (e.g. the embedding of a token every sentence shares)
give NaN. **Massive activations** (Sun et al. 2024): a dimension is flagged when the
root mean square of its clean activation is at least ``massive_ratio`` (100) times
the median dimension's at one aligned position of a (hook, layer) — and then at every
aligned position of that layer (a dimension massive at ``p+1`` dominates ‖a‖ at ``p`` too;
flagged per cell, SmolLM2's L2 #90 slipped through as "stable") — RMS rather than mean |a|
because it follows exactly from the accumulated moments; ``layers.parquet`` reports the
largest ratio and its dimension (``rms_ratio_max``, ``rms_ratio_dim``) so outliers
under the threshold stay visible (on a handful of test sentences SmolLM2-135M's dimension 507 sat at 30-130x at the
aligned positions, above 100x only at ``p+1`` of the early layers; the 1000x values of
Sun et al. are at the first token, which is not an aligned position). Flagged
dimensions are reported, and left out of the candidates, the per-layer averages
of ``absz`` and the second relative-L2 norm: ``rel_l2_rms`` = sqrt(Σ_d E[Δ_d²] / Σ_d E[a_d²])
over all dimensions and ``rel_l2_rms_nomassive`` without the flagged ones (exact, from the
per-dimension sums; the per-pair ``rel_l2_mean`` keeps every dimension, since which ones are
massive is known only at the end).

**Groups**: the state has one row per (category, swap direction, split half) cell
(:attr:`DiffConfig.rows`; the direction ``none`` for pairs whose record names none; the half
``bootstrap.split_half(cluster, seed)``). A category, a direction, a half and ``all`` are
exact merges of rows, so nothing is stored twice and every group merges across shards.
Tables have a ``swap_direction`` column: ``all`` pools the category's directions, and where
it holds two or more its signed statistics (sign consistency, mean Δ in the candidates, the
direction cosines and ``dir_consistency`` in ``layers.parquet``) are NaN and the responsive rule
is not applied — opposite directions cancel in them — while each direction has its own rows.
:meth:`DiffResult.for_half` (``candidates_for_half``) restricts everything, σ included, to
one half of the clusters: choose on half 0, test on half 1.

**Anchor**: ``anchor="p"`` counts offsets from the changed token; ``anchor="detect"`` from
the token where the error becomes detectable (``roles.detect_of``; ``p`` without a detect
word). Per-pair log-probs and KL still start at ``p``.

**Span pairs** (``align(..., mode="span")``): offset 0 is the span's last token on each side, offset
``k`` the ``k``-th token after it, read in each sentence at its own position (:func:`pair_index`,
:mod:`eclens.spans`); a single-token pair reads both at ``p + k`` as before. The KL list of
``pairs.csv`` then starts at the span end, and ``*_token_logprob`` is the whole span's log-prob.

**Intervals**: ``rel_l2_mean_lo``/``_hi`` in ``layers.parquet`` and the headline numbers in
``summary.json`` are percentile cluster-bootstrap intervals (``n_boot`` replicates) over the
sampled pairs' per-pair relative L2 (all pairs up to ``sample_size``).

**Threshold sensitivity** (``sensitivity.csv``): every passing dimension counted over a grid
of each rule threshold (``threshold``; ``responsive_z``; ``responsive_sign``), the others at
their set values, per (category, swap direction, hook).

**Candidate rule** (per category and ``all``, hook, layer and offset; a dimension
needs ``n >= min_pairs`` pairs in the exact count and in the sample, σ > 0, a
reachable position — Δ not identically zero, as at ``hook_resid_pre`` of layer 0
after ``p`` — and not massive):

* *stable*: ``frac_under >= stable_frac`` (0.9), i.e. in at least 90 % of the
  pairs the change is under ``threshold`` (0.1) of the dimension's spread; ranked by
  ``absz_q90`` ascending;
* *responsive*: ``absz_median >= responsive_z`` (1.0: half of the pairs move it by
  at least its whole spread) and sign consistency ``>= responsive_sign`` (0.8: at
  least 80 % of the pairs move it the same way); ranked by ``absz_median``
  descending.

At most ``max_candidates`` per (category, hook, layer, offset, kind) are listed.

**Directions**: the residual stream has no privileged basis, so per (hook, layer,
offset) we also report the mean-Δ direction (``dir_norm`` = ‖mean Δ‖, exact) and how
consistently pairs follow it: ``dir_consistency`` = ‖mean Δ‖² / mean‖Δ‖² (exact; 1 when
all pairs move the same way, about 1/n for random directions) and the distribution
of the leave-one-out cosines (sample). The unit of a dimension is in ``unit``:
``resid`` (residual-stream and attention/MLP output dimensions), ``neuron``
(``mlp.hook_pre``/``hook_post``), ``head_dim`` (``attn.hook_q/k/v/z``, with
``head``), ``head`` (``attn.hook_pattern``: the attention each head pays from the
aligned position to the changed token ``p``).

**Contrasts** (``contrasts.parquet``): categories are grouped by the first path component
(``grammar/agreement`` -> ``grammar``); for every two groups with at least ``min_group``
sampled pairs, one effect per (measure, hook, layer, offset in ``contrast_offsets``): the
difference of the groups' mean per-pair ``rel_l2`` or mean ``|Δ|/σ`` over the layer's
non-massive dimensions, with a cluster-bootstrap interval, a p-value from permuting the group
labels across clusters (``n_perm``) and Benjamini–Hochberg q-values per measure
(:mod:`eclens.diff.contrasts`; the per-dimension tests counted one effect many times over
pairs that share frames).

Per pair (``pairs.csv``): teacher-forced log-probs of both sentences, the log-prob
of the clean and of the corrupt token at ``p`` (both read from the clean run's
prediction at ``p-1``: the prefixes are identical), and ``KL(P_clean || P_corrupt)``
of the next-token distributions at every position from ``p`` on.

Key layout of ``state/diff_stats.safetensors`` (``H`` a hook suffix such as
``hook_resid_pre``; ``C`` categories, ``L`` the hook's layers, ``O`` offsets, ``D``
its flattened width; all float64 unless noted):

* ``count``: ``[C, O]`` pairs with that aligned position (``C`` here and below: the state rows,
  :attr:`DiffConfig.rows`, two per (category, swap direction) cell);
* ``{H}/feat`` ``[O, C, 7, L, D]``: sums of ``Δ - K_Δ``, ``(Δ - K_Δ)^2``, ``a - K_a``,
  ``(a - K_a)^2`` (``a`` the clean activation), ``|Δ|``, ``sign(Δ)``, ``[Δ != 0]``
  (:data:`FEATURES`; float32 while no state row has passed ``DiffAccumulator.flush_pairs`` pairs: the
  staged float32 sums themselves, which readers convert to float64); ``{H}/shift`` ``[2, O, C, L, D]``:
  the shifts ``K_Δ, K_a``;
  ``{H}/shift_set`` ``[O, C]`` (bool). ``mean = K + s1/n``, ``M2 = s2 - s1^2/n``;
* ``{H}/scalars/{count,s1,s2,shift,shift_set}``: power sums
  (:class:`eclens.stats.PowerSums`) ``[C, 3, O, L]`` of ‖Δ‖, ‖Δ‖/‖a‖ and cos(a_clean,
  a_corrupt) (:data:`SCALARS`); ``{H}/head_scalars/...`` ``[C, 2, O, L, heads]`` of the
  per-head relative L2 and cosine, for per-head hooks;
* ``sample/keys`` ``[S]`` (float64; ``inf`` = empty slot), ``sample/category`` ``[S]``
  (int64, the pair's state row), ``sample/valid`` ``[S, O]`` (bool), ``{H}/sample_delta`` ``[S, O, L, D]``
  (float16), ``{H}/sample_{rel_l2,cos}`` ``[S, O, L]`` (float32);
* an aliased hook (:mod:`~eclens.diff.aliases`: ``hook_resid_post`` of layer ``l`` is ``hook_resid_pre`` of
  ``l + 1``, where a probe forward pass finds them equal) holds only its other layers (the last at least):
  its ``L`` above is those, and :meth:`DiffResult.cell_stats` and :meth:`DiffResult.hook_sample` read the
  rest from the source hook;
* metadata ``eclens_diff``: JSON with the configuration (hooks and their layers,
  offsets, categories, thresholds), the aliases, the processed pair ids, the sampled pair ids, the
  per-pair rows and ``complete``. The file is the checkpoint too: it is rewritten
  atomically every ``checkpoint_every`` batches (by default every
  :data:`~eclens.diff.stream.CHECKPOINT_SECONDS` of streaming, and at Ctrl-C or SIGTERM), and a rerun
  resumes from it.

The package holds one idea a module: :mod:`~eclens.diff.config` (what determines the numbers),
:mod:`~eclens.diff.gather` (the aligned positions), :mod:`~eclens.diff.aliases` (hook points read once),
:mod:`~eclens.diff.logprobs` (per-pair rows),
:mod:`~eclens.diff.accumulate` (the streaming state), :mod:`~eclens.diff.result` and
:mod:`~eclens.diff.contrasts` (the tables), :mod:`~eclens.diff.stats_io` (the stats file),
:mod:`~eclens.diff.stream` (the loop) and :mod:`~eclens.diff.merge` (shards). The hook groups live in
:mod:`eclens.hooks`.
"""

from ..hooks import (
    DEFAULT_HOOKS,
    HEAD_HOOKS,
    NEURON_HOOKS,
    PATTERN_HOOKS,
    HookGroup,
    expand_hook_spec,
    hook_groups,
)
from ..progress import progress_bar
from ..runs import prepare_run_pairs, save_check  # their home is the run-folder module
from .accumulate import FEATURES, HEAD_SCALARS, SCALARS, DiffAccumulator, GroupAccumulator, exact_fp32_matmul
from .config import (
    META_KEY,
    QUANTILES,
    STATS_FILE,
    DiffConfig,
    anchor_position,
    pooled_rows,
    position_kind,
    resolve_categories,
    resolve_cells,
)
from .contrasts import compute_contrasts
from .gather import AlignedIndex, Gatherer, aligned_index, pair_index
from .logprobs import metric_rows, pair_info, pair_metric_tensors, pair_metrics
from .merge import merge_results
from .result import DiffResult
from .stats_io import load_stats, save_stats
from .stream import run_diff, stream_batches

__all__ = ["DiffConfig", "DiffResult", "DiffAccumulator", "HookGroup", "run_diff", "merge_results", "hook_groups",
           "pair_metrics", "pair_metric_tensors", "metric_rows", "aligned_index", "pair_index", "load_stats",
           "save_stats",
           "prepare_run_pairs", "save_check", "DEFAULT_HOOKS",
           # also importable from here, as before the split
           "HEAD_HOOKS", "NEURON_HOOKS", "PATTERN_HOOKS", "expand_hook_spec", "progress_bar", "FEATURES",
           "HEAD_SCALARS", "SCALARS", "GroupAccumulator", "exact_fp32_matmul", "META_KEY", "QUANTILES", "STATS_FILE",
           "position_kind", "resolve_categories", "compute_contrasts", "AlignedIndex", "Gatherer",
           "pair_info", "stream_batches", "resolve_cells", "anchor_position", "pooled_rows"]
