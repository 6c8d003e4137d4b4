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
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float, Int

from .errors import EclensError
from .hooks import iter_batches, pad_id
from .metrics import DEFAULT_MIN_DELTA, METRICS, PairMetrics, prepare_pair
from .model import model_device
from .pairs import AlignedPair, require_single

EXACT_HOOKS = ("hook_resid_pre", "hook_attn_out", "hook_mlp_out", "hook_resid_post")
HEAD_HOOK = "attn.hook_z"
DIRECTIONS = ("denoise", "noise")
ABLATIONS = ("zero", "mean", "resample", "patch")
HOOK_ALIASES = {
    "resid_pre": "hook_resid_pre", "attn_out": "hook_attn_out", "mlp_out": "hook_mlp_out",
    "resid_post": "hook_resid_post", "resid_mid": "hook_resid_mid", "z": HEAD_HOOK, "hook_z": HEAD_HOOK,
    "mlp_post": "mlp.hook_post", "mlp_pre": "mlp.hook_pre",
}


# ----------------------------------------------------------------------------- helpers


def hook_suffix(name: str, model=None) -> str:
    """``resid_pre`` / ``hook_resid_pre`` / ``blocks.3.hook_resid_pre`` -> ``hook_resid_pre`` (checked on ``model``)."""
    s = name.strip()
    if s.startswith("blocks."):
        parts = s.split(".", 2)
        s = parts[2] if len(parts) == 3 else s
    s = HOOK_ALIASES.get(s, s)
    if model is not None and f"blocks.0.{s}" not in model.hook_dict:
        raise EclensError(f"unknown hook {name!r}: use resid_pre, attn_out, mlp_out, resid_post or a per-layer "
                          "hook name from `ec model info`")
    return s


# Attention patterns are [batch, head, query, key]: their position axis is not axis 1, so a
# per-position patch of them means something else; they are not patched here.
NOT_PATCHABLE = ("attn.hook_pattern", "attn.hook_attn_scores")


def _check_patchable(suffix: str) -> str:
    if suffix in NOT_PATCHABLE:
        raise EclensError(f"hook {suffix!r} is an attention pattern ([batch, head, query, key]); patch "
                          "attn.hook_z (--heads) or attn_out instead")
    return suffix


def parse_hooks(spec: str | Sequence[str] | None, model=None) -> list[str]:
    if spec is None:
        return list(EXACT_HOOKS)
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out = [_check_patchable(hook_suffix(h, model)) for h in items if h.strip()]
    if not out:
        raise EclensError("--hooks is empty; use e.g. resid_pre,attn_out,mlp_out,resid_post")
    return list(dict.fromkeys(out))


def parse_direction(direction: str) -> list[str]:
    if direction == "both":
        return list(DIRECTIONS)
    if direction not in DIRECTIONS:
        raise EclensError(f"unknown direction {direction!r}: use denoise, noise or both")
    return [direction]


def _check_pairs(pairs: Sequence[AlignedPair]) -> None:
    if not pairs:
        raise EclensError("no valid pairs to patch; check the pairs file with `ec pairs check`")
    # Exact patching swaps activations position by position: a span pair has no such correspondence.
    require_single(pairs, "patching")


def position_kind(t: int, p: int, T: int) -> str:
    if t < p:
        return "before"
    if t == p:
        return "changed"
    return "last" if t == T - 1 else "after"


def _resolve_position(pair: AlignedPair, offset: int) -> int | None:
    """Position of ``offset`` in ``pair`` (``-1`` = last token), or ``None`` past its end."""
    t = pair.length - 1 if offset == -1 else pair.position + offset
    return t if 0 <= t < pair.length and (offset == -1 or offset >= 0) else None


def bh_qvalues(p: Sequence[float]) -> np.ndarray:
    """Benjamini-Hochberg q-values (NaNs stay NaN and do not count as tests)."""
    p = np.asarray(p, dtype=float)
    q = np.full_like(p, np.nan)
    ok = ~np.isnan(p)
    m = int(ok.sum())
    if m == 0:
        return q
    pv = p[ok]
    order = np.argsort(pv)
    ranked = pv[order] * m / np.arange(1, m + 1)
    ranked = np.minimum.accumulate(ranked[::-1])[::-1]
    out = np.empty(m)
    out[order] = np.minimum(ranked, 1.0)
    q[ok] = out
    return q


class _Progress:
    """A rich progress bar when asked for, a no-op otherwise (library calls stay quiet)."""

    def __init__(self, enabled: bool, total: int, description: str):
        self.bar = None
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TimeElapsedColumn(), transient=False)
            self.task = self.bar.add_task(description, total=total)

    def __enter__(self):
        if self.bar is not None:
            self.bar.__enter__()
        return self

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.advance(self.task, n)

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.__exit__(*exc)


# ----------------------------------------------------------------------- preparation


@dataclass
class Prepared:
    """One pair ready to patch: its metrics context and the cached activations of both runs.

    ``acts[name]`` is ``[2, T, F]``: row 0 the clean run, row 1 the corrupt run, features
    flattened (``attn.hook_z`` is ``heads x d_head``).
    """

    pair: AlignedPair
    metrics: PairMetrics
    tokens: Int[torch.Tensor, "2 seq"]
    acts: dict[str, Float[torch.Tensor, "2 seq feat"]]
    shapes: dict[str, tuple[int, ...]]  # per-position shape of each hook's activation


def _cache_get(cache, model, name: str) -> torch.Tensor:
    try:
        return cache[name]
    except KeyError:  # the cache may hold the hook under its alias
        hp = model.hook_dict[name]
        for k in cache.keys():
            if model.hook_dict.get(k) is hp:
                return cache[k]
        raise


def prepare(
    model, pairs: Sequence[AlignedPair], names: Iterable[str] = (), batch_size: int = 8
) -> Iterator[Prepared]:
    """Run clean and corrupt sentences in batches, caching only ``names``; yield one :class:`Prepared` per pair."""
    names = list(dict.fromkeys(names))
    wanted = set(names)
    for n in names:
        if n not in model.hook_dict:
            raise EclensError(f"hook {n!r} does not exist in this model; see `ec model info`")
    dev = model_device(model)
    tok = model.tokenizer
    bos = bool(model.cfg.default_prepend_bos)
    for batch in iter_batches(pairs, batch_size, pad_id(model), dev, sort_by_length=False):
        with torch.no_grad():
            logits, cache = model.run_with_cache(batch.tokens, names_filter=lambda n: n in wanted)
        B = batch.size
        for i, pair in enumerate(batch.pairs):
            T = pair.length
            ctx = prepare_pair(pair, logits[i], logits[B + i], tok, bos)
            acts, shapes = {}, {}
            for n in names:
                a = _cache_get(cache, model, n)
                both = torch.stack([a[i, :T], a[B + i, :T]])
                shapes[n] = tuple(both.shape[2:])
                acts[n] = both.reshape(2, T, -1).clone()
            toks = torch.stack([batch.tokens[i, :T], batch.tokens[B + i, :T]])
            yield Prepared(pair, ctx, toks, acts, shapes)
        del logits, cache


# ---------------------------------------------------------------------------- engine


@dataclass
class Rows:
    """Patched runs of one pair, column-wise.

    ``base``: 0 runs the clean input, 1 the corrupt input. ``hook``: full hook name.
    ``bank``: index into that hook's value bank ``[K, T, F]``. ``pos``: the patched
    position (-1: all positions). ``units``: index into the hook's feature-mask table
    ``[S, F]`` (-1: every feature).
    """

    base: np.ndarray
    hook: np.ndarray
    bank: np.ndarray
    pos: np.ndarray
    units: np.ndarray

    def __len__(self) -> int:
        return len(self.base)

    @staticmethod
    def build(items: list[tuple[int, str, int, int, int]]) -> Rows:
        if not items:
            return Rows(*(np.zeros(0, dtype=int) for _ in range(2)), np.zeros(0, dtype=int),
                        np.zeros(0, dtype=int), np.zeros(0, dtype=int))
        base, hook, bank, pos, units = zip(*items)
        return Rows(np.asarray(base), np.asarray(hook, dtype=object), np.asarray(bank), np.asarray(pos),
                    np.asarray(units))


def _patch_hook(act: torch.Tensor, hook, rows: torch.Tensor, mask: torch.Tensor, value: torch.Tensor):
    # One vectorised write for every row of this chunk patched at this hook point.
    shape = act.shape
    flat = act.reshape(shape[0], shape[1], -1)
    if rows.device != flat.device:  # a model spread over GPUs (--device-map) keeps later layers elsewhere
        rows, mask, value = rows.to(flat.device), mask.to(flat.device), value.to(flat.device)
    flat[rows] = torch.where(mask, value.to(flat.dtype), flat[rows])
    return flat.view(shape)


def run_rows(
    model,
    prep: Prepared,
    rows: Rows,
    banks: dict[str, Float[torch.Tensor, "k seq feat"]],
    unit_tables: dict[str, Bool[torch.Tensor, "s feat"]] | None = None,
    batch_size: int = 64,
) -> dict[str, np.ndarray]:
    """Run every row of ``rows`` (chunks of ``batch_size`` copies per forward pass); metrics per row."""
    unit_tables = unit_tables or {}
    R = len(rows)
    out = {m: np.full(R, np.nan) for m in METRICS}
    if R == 0:
        return out
    dev = model_device(model)
    T = prep.pair.length
    ar = torch.arange(T, device=dev)
    tokens2 = prep.tokens.to(dev)
    banks = {h: b.to(dev) for h, b in banks.items()}
    tables = {h: t.to(dev) for h, t in unit_tables.items()}
    for s in range(0, R, batch_size):
        e = min(R, s + batch_size)
        toks = tokens2[torch.as_tensor(rows.base[s:e], device=dev)]
        fwd = []
        hooks_here = rows.hook[s:e]
        for h in dict.fromkeys(hooks_here.tolist()):
            sel = np.nonzero(hooks_here == h)[0]
            pos = torch.as_tensor(rows.pos[s:e][sel], device=dev)
            mask = ((pos[:, None] < 0) | (ar[None, :] == pos[:, None]))[:, :, None]  # [n, T, 1]
            units = rows.units[s:e][sel]
            if (units >= 0).any():
                F = banks[h].shape[-1]
                um = torch.ones(len(sel), F, dtype=torch.bool, device=dev)
                has = torch.as_tensor(np.nonzero(units >= 0)[0], device=dev)
                um[has] = tables[h][torch.as_tensor(units[units >= 0], device=dev)]
                mask = mask & um[:, None, :]
            value = banks[h][torch.as_tensor(rows.bank[s:e][sel], device=dev)]
            fwd.append((h, partial(_patch_hook, rows=torch.as_tensor(sel, device=dev), mask=mask, value=value)))
        with torch.no_grad():
            logits = model.run_with_hooks(toks, fwd_hooks=fwd)
            vals = prep.metrics.evaluate(logits)
        for m in METRICS:
            out[m][s:e] = vals[m].float().cpu().numpy()
        del logits
    return out


def _head_table(shape: tuple[int, ...]) -> Bool[torch.Tensor, "heads feat"]:
    n_heads, d_head = shape[0], int(np.prod(shape[1:]))
    return torch.eye(n_heads, dtype=torch.bool).repeat_interleave(d_head, dim=1)


def _metric_columns(rec: dict, values: dict[str, np.ndarray], ctx: PairMetrics, min_delta: float) -> None:
    for m in METRICS:
        v = values[m]
        rec[m] = v
        rec[f"{m}_restored"] = ctx.restored(m, v, min_delta) if ctx.valid(m, min_delta) else np.full(len(v), np.nan)
        rec[f"{m}_clean"] = ctx.clean[m]
        rec[f"{m}_corrupt"] = ctx.corrupt[m]


def _component_frame(prep: Prepared, direction: np.ndarray, hook: np.ndarray, layer: np.ndarray,
                     pos: np.ndarray, head: np.ndarray, tokenizer) -> dict:
    pair = prep.pair
    p, T = pair.position, pair.length
    toks = [tokenizer.decode([i]) for i in pair.clean_ids] if tokenizer is not None else [str(i) for i in
                                                                                           pair.clean_ids]
    offset = pd.array([int(t - p) if t >= p else None for t in pos], dtype="Int64")
    return {
        "pair_id": pair.id, "category": pair.category, "direction": direction, "hook": hook, "layer": layer,
        "position": pos, "offset": offset, "position_kind": [position_kind(int(t), p, T) for t in pos],
        "token": [toks[int(t)] for t in pos], "head": head,
    }


# ----------------------------------------------------------------------- exact patching


def exact_patch(
    model,
    pairs: Sequence[AlignedPair],
    hooks: str | Sequence[str] | None = EXACT_HOOKS,
    direction: str = "both",
    heads: bool = False,
    layers: Sequence[int] | None = None,
    batch_size: int = 64,
    prep_batch_size: int = 8,
    min_delta: float = DEFAULT_MIN_DELTA,
    progress: bool = False,
    skip_noops: bool = True,
) -> pd.DataFrame:
    """Exact activation patching per (pair, direction, hook, layer, position[, head]).

    Returns one row per patched run with columns ``pair_id, category, direction, hook,
    layer, position, offset, position_kind, token, head`` (``-1`` unless ``heads``) and,
    per metric ``m`` of :data:`eclens.metrics.METRICS`: ``m`` (the patched run's value),
    ``m_restored``, ``m_clean``, ``m_corrupt``. ``offset`` is ``position - p`` (empty
    before ``p``). With ``heads=True``, ``attn.hook_z`` is patched one head at a time.

    ``skip_noops``: positions before ``p`` hold the same activations in both runs, so
    their rows take the base run's values without a forward pass (``False`` runs them).
    """
    _check_pairs(pairs)
    suffixes = parse_hooks(hooks, model) if hooks else []
    if not suffixes and not heads:
        raise EclensError("nothing to patch: give --hooks or --heads")
    dirs = parse_direction(direction)
    n_layers = model.cfg.n_layers
    layers = list(range(n_layers)) if layers is None else [int(x) for x in layers]
    for x in layers:
        if not 0 <= x < n_layers:
            raise EclensError(f"layer {x} out of range: the model has {n_layers} layers (0..{n_layers - 1})")
    if batch_size < 1:
        raise EclensError("--batch-size must be at least 1")
    targets = [(s, L) for s in suffixes for L in layers]
    if heads:
        targets += [(HEAD_HOOK, L) for L in layers]
    names = [f"blocks.{L}.{s}" for s, L in targets]
    frames = []
    with _Progress(progress, len(pairs), "exact patching") as bar:
        for prep in prepare(model, pairs, names, prep_batch_size):
            p, T = prep.pair.position, prep.pair.length
            items, meta = [], []  # rows to run, and (direction, hook, layer, position, head) of every output row
            for d in dirs:
                base, src = (1, 0) if d == "denoise" else (0, 1)
                for s, L in targets:
                    name = f"blocks.{L}.{s}"
                    n_units = prep.shapes[name][0] if s == HEAD_HOOK else 1
                    for t in range(T):
                        for u in range(n_units):
                            head = u if s == HEAD_HOOK else -1
                            run_it = t >= p or not skip_noops
                            meta.append((d, s, L, t, head, run_it))
                            if run_it:
                                items.append((base, name, src, t, u if s == HEAD_HOOK else -1))
            rows = Rows.build(items)
            banks = {n: prep.acts[n] for n in names}
            tables = {n: _head_table(prep.shapes[n]) for n in names if n.endswith(HEAD_HOOK)}
            res = run_rows(model, prep, rows, banks, tables, batch_size)
            ran = np.array([m[5] for m in meta])
            dir_arr = np.array([m[0] for m in meta], dtype=object)
            values = {}
            for m in METRICS:
                v = np.empty(len(meta))
                v[ran] = res[m]
                # a patch before p is a no-op: the base run's value (clean for noising, corrupt for denoising)
                v[~ran] = np.where(dir_arr[~ran] == "denoise", prep.metrics.corrupt[m], prep.metrics.clean[m])
                values[m] = v
            rec = _component_frame(prep, dir_arr, np.array([m[1] for m in meta], dtype=object),
                                   np.array([m[2] for m in meta]), np.array([m[3] for m in meta]),
                                   np.array([m[4] for m in meta]), model.tokenizer)
            _metric_columns(rec, values, prep.metrics, min_delta)
            frames.append(pd.DataFrame(rec))
            bar.advance()
    return pd.concat(frames, ignore_index=True)


def pair_baselines(model, pairs: Sequence[AlignedPair], batch_size: int = 8) -> pd.DataFrame:
    """One row per pair: targets, ``pref_clean``, sentence log-probs and each metric's clean/corrupt values."""
    _check_pairs(pairs)
    return pd.DataFrame([prep.metrics.baseline_row(model.tokenizer)
                         for prep in prepare(model, pairs, (), batch_size)])


def patch_all_positions(model, pair: AlignedPair, hook: str, layer: int, direction: str = "denoise") -> dict:
    """Patch every position of one (hook, layer) at once; returns the metrics and the pair's references.

    Patching ``hook_resid_pre`` of layer 0 at every position turns the corrupt run into
    the clean run, so every ``*_restored`` must be exactly 1 (a check of the plumbing).
    """
    name = f"blocks.{layer}.{hook_suffix(hook, model)}"
    prep = next(prepare(model, [pair], [name]))
    base, src = (1, 0) if direction == "denoise" else (0, 1)
    res = run_rows(model, prep, Rows.build([(base, name, src, -1, -1)]), {name: prep.acts[name]})
    out = {m: float(res[m][0]) for m in METRICS}
    out.update({f"{m}_restored": float(prep.metrics.restored(m, out[m])) for m in METRICS})
    out.update({f"{m}_clean": prep.metrics.clean[m] for m in METRICS})
    out.update({f"{m}_corrupt": prep.metrics.corrupt[m] for m in METRICS})
    return out


def exact_tensors(df: pd.DataFrame, pair_ids: Sequence[str], n_layers: int, column: str) -> dict[str, torch.Tensor]:
    """``exact/{direction}/{hook}/{column}`` -> ``[pairs, layers, max_len]`` (``[..., heads]`` for hook_z), NaN-padded."""
    out = {}
    index = {pid: i for i, pid in enumerate(pair_ids)}
    T = int(df["position"].max()) + 1 if len(df) else 0
    for (d, h), g in df.groupby(["direction", "hook"], sort=False):
        pi = g["pair_id"].map(index).to_numpy()
        if h == HEAD_HOOK:
            H = int(g["head"].max()) + 1
            arr = np.full((len(pair_ids), n_layers, T, H), np.nan, dtype=np.float32)
            arr[pi, g["layer"].to_numpy(), g["position"].to_numpy(), g["head"].to_numpy()] = g[column].to_numpy()
        else:
            arr = np.full((len(pair_ids), n_layers, T), np.nan, dtype=np.float32)
            arr[pi, g["layer"].to_numpy(), g["position"].to_numpy()] = g[column].to_numpy()
        out[f"exact/{d}/{h}/{column}"] = torch.from_numpy(arr)
    return out


# ------------------------------------------------------------------ dimension sets


@dataclass
class DimSet:
    """A set of feature indices at one (hook, layer) and one position (``offset`` from ``p``; -1 = last)."""

    hook: str
    layer: int
    dims: list[int]
    offset: int = 0
    kind: str | None = None
    label: str | None = None

    def __post_init__(self):
        self.dims = sorted({int(d) for d in self.dims})
        if self.label is None:
            kind = f"/{self.kind}" if self.kind else ""
            self.label = f"{self.hook}/L{self.layer}/o{self.offset}{kind}/k{len(self.dims)}"

    @property
    def name(self) -> str:
        return f"blocks.{self.layer}.{self.hook}"


@dataclass
class DimsResult:
    """``table``: one row per (set, direction); ``controls``: one row per random control set;
    ``per_pair``: the candidate set's metrics per pair."""

    table: pd.DataFrame
    controls: pd.DataFrame
    per_pair: pd.DataFrame = field(default_factory=pd.DataFrame)


def _control_sets(dims: list[int], n_features: int, n_controls: int, rng: np.random.Generator) -> np.ndarray:
    rest = np.setdiff1d(np.arange(n_features), np.asarray(dims, dtype=int))
    k = len(dims)
    if len(rest) < k:
        raise EclensError(f"a set of {k} dimensions leaves only {len(rest)} others of {n_features}: "
                          "too few for random controls of the same size; use a smaller --top-k")
    return np.stack([rng.choice(rest, size=k, replace=False) for _ in range(n_controls)]) if n_controls else \
        np.zeros((0, k), dtype=int)


def _empirical(effect: float, controls: np.ndarray) -> tuple[float, float, float, float]:
    """control mean, control std, z, two-sided empirical p = (b+1)/(n+1)."""
    c = controls[~np.isnan(controls)]
    if math.isnan(effect) or len(c) == 0:
        return float("nan"), float("nan"), float("nan"), float("nan")
    mean = float(c.mean())
    std = float(c.std(ddof=1)) if len(c) > 1 else float("nan")
    z = (effect - mean) / std if std and std > 0 else float("nan")
    b = int((np.abs(c) >= abs(effect)).sum())
    return mean, std, z, (b + 1) / (len(c) + 1)


def dims_interventions(
    model,
    pairs: Sequence[AlignedPair],
    sets: Sequence[DimSet],
    method: str = "patch",
    n_controls: int = 100,
    seed: int = 0,
    direction: str = "denoise",
    metric: str = "logit_diff",
    alpha: float = 0.05,
    batch_size: int = 64,
    prep_batch_size: int = 8,
    min_delta: float = DEFAULT_MIN_DELTA,
    progress: bool = False,
    dist=None,
    control_sets: Sequence[Sequence[Sequence[int]]] | None = None,
) -> DimsResult:
    """Intervene on each dimension set and on ``n_controls`` random sets of the same size.

    ``method``: ``zero`` (set the dims to 0), ``mean`` (to their mean over every
    sentence of ``pairs``, clean and corrupt, at the same position kind), ``resample``
    (to their values in another pair's sentence at the same position kind; one donor per
    pair, shared by the set and its controls so only the choice of dims differs), or
    ``patch`` (the other run's values: clean into corrupt for ``denoise``, corrupt into
    clean for ``noise``). The base run is the corrupt run for ``denoise`` and the clean
    run for ``noise``. Controls are the same for every pair (seeded by ``seed`` and the
    set's index). ``metric`` picks the column that decides ``significant`` (q < alpha).
    ``control_sets``: per set, the caller's own control sets (e.g. dims matched in spread) instead of
    random ones; each set needs as many, and that number is ``n_controls``.
    """
    if control_sets is not None:
        if len(control_sets) != len(sets) or len({len(c) for c in control_sets}) > 1:
            raise EclensError("control_sets: give one list of control sets per set, the same number for each")
        n_controls = len(control_sets[0]) if control_sets else n_controls
    _check_pairs(pairs)
    if method not in ABLATIONS:
        raise EclensError(f"unknown ablation {method!r}: use {', '.join(ABLATIONS)}")
    if metric not in METRICS:
        raise EclensError(f"unknown metric {metric!r}: use {', '.join(METRICS)}")
    if not sets:
        raise EclensError("no dimension sets to test")
    if n_controls < 1:
        raise EclensError("--n-controls must be at least 1 (random controls are what make the test)")
    if method == "resample" and len(pairs) < 2:
        raise EclensError("resample-ablation needs at least 2 pairs (values come from other pairs)")
    if dist is not None and dist.active and method == "resample":
        raise EclensError("resample-ablation draws donors from every pair, so it cannot be sharded: "
                          "run it without torchrun (zero, mean and patch shard exactly)")
    dirs = parse_direction(direction)
    n_layers = model.cfg.n_layers
    sets = [DimSet(_check_patchable(hook_suffix(s.hook, model)), s.layer, s.dims, s.offset, s.kind, s.label)
            for s in sets]
    for s in sets:
        if not 0 <= s.layer < n_layers:
            raise EclensError(f"set {s.label}: layer {s.layer} out of range (0..{n_layers - 1})")
        if not s.dims:
            raise EclensError(f"set {s.label}: no dimensions")
        if s.offset < -1:
            raise EclensError(f"set {s.label}: offset {s.offset} must be >= 0, or -1 for the last token")
    names = list(dict.fromkeys(s.name for s in sets))

    # Pass 1: references per pair and the activations at each set's position (all that a
    # single-position intervention needs), so pass 2 runs on tokens alone.
    preps: list[Prepared] = []
    at: dict[tuple[int, int], Float[torch.Tensor, "2 feat"]] = {}  # (pair index, set index) -> [clean, corrupt]
    with _Progress(progress, len(pairs), "caching pairs") as bar:
        for i, prep in enumerate(prepare(model, pairs, names, prep_batch_size)):
            for j, s in enumerate(sets):
                t = _resolve_position(prep.pair, s.offset)
                if t is not None:
                    at[i, j] = prep.acts[s.name][:, t].clone()
            preps.append(Prepared(prep.pair, prep.metrics, prep.tokens, {}, prep.shapes))
            bar.advance()
    n_feat = {s.name: int(np.prod(preps[0].shapes[s.name])) for s in sets}
    for s in sets:
        bad = [d for d in s.dims if not 0 <= d < n_feat[s.name]]
        if bad:
            raise EclensError(f"set {s.label}: dimension(s) {bad[:5]} out of range for {s.name} "
                              f"(0..{n_feat[s.name] - 1})")

    # Unit tables per hook: the candidate set then its controls, for every set at that hook.
    if control_sets is not None:
        controls = [np.asarray([sorted({int(d) for d in c}) for c in control_sets[j]], dtype=int).reshape(n_controls, -1)
                    for j in range(len(sets))]
        for j, s in enumerate(sets):
            if controls[j].shape[1] != len(s.dims) or ((controls[j] < 0) | (controls[j] >= n_feat[s.name])).any():
                raise EclensError(f"set {s.label}: each control set needs {len(s.dims)} distinct dimensions "
                                  f"in 0..{n_feat[s.name] - 1}")
    else:
        controls = [_control_sets(s.dims, n_feat[s.name], n_controls, np.random.default_rng([seed, j]))
                    for j, s in enumerate(sets)]
    tables: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    first_unit = []
    for j, s in enumerate(sets):
        masks = torch.zeros(1 + n_controls, n_feat[s.name], dtype=torch.bool)
        masks[0, s.dims] = True
        masks[torch.arange(1, 1 + n_controls).repeat_interleave(len(s.dims)),
              torch.as_tensor(controls[j].reshape(-1))] = True
        first_unit.append(sum(len(t) for t in tables[s.name]))
        tables[s.name].append(masks)
    unit_tables = {n: torch.cat(t) for n, t in tables.items()}

    # Mean / resample values per (set, pair), over both runs of every pair at that position kind.
    rng = np.random.default_rng([seed, 10_007])
    donors = {}
    if method == "resample":
        for i in range(len(preps)):
            others = [k for k in range(len(preps)) if k != i]
            donors[i] = (int(rng.choice(others)), int(rng.integers(2)))
    means = {}
    if method == "mean":
        for j in range(len(sets)):
            vals = [at[i, j] for i in range(len(preps)) if (i, j) in at]
            if dist is not None and dist.active:
                # the dataset mean over every rank's shard: all-reduce the sum and the count
                from .distributed import all_reduce_sum

                tot = torch.cat(vals).double().sum(0) if vals else torch.zeros(n_feat[sets[j].name], dtype=torch.float64)
                cnt = torch.tensor([float(2 * len(vals))], dtype=torch.float64)
                tot, cnt = all_reduce_sum(tot, dist), all_reduce_sum(cnt, dist)
                if cnt.item() > 0:
                    means[j] = (tot / cnt).float()
            elif vals:
                means[j] = torch.cat(vals).double().mean(0).float()

    cand: dict[tuple[int, str], list[dict]] = {}  # (set, direction) -> per-pair rows
    ctrl: dict[tuple[int, str], list[np.ndarray]] = {}  # -> per-pair [n_controls, metrics] changes
    with _Progress(progress, len(preps), f"{method} on {len(sets)} set(s) x {n_controls} controls") as bar:
        for i, prep in enumerate(preps):
            items, keys, bank_rows = [], [], {n: [] for n in names}
            T = prep.pair.length
            for j, s in enumerate(sets):
                if (i, j) not in at:
                    continue
                t = _resolve_position(prep.pair, s.offset)
                for d in dirs:
                    base, other = (1, 0) if d == "denoise" else (0, 1)
                    if method == "patch":
                        v = at[i, j][other]
                    elif method == "zero":
                        v = torch.zeros_like(at[i, j][0])
                    elif method == "mean":
                        v = means[j].to(at[i, j].dtype)
                    else:
                        k, run = donors[i]
                        if (k, j) not in at:  # the donor is too short for this offset: take the next one that fits
                            k = next((kk for kk in range(len(preps)) if kk != i and (kk, j) in at), None)
                            if k is None:
                                continue
                        v = at[k, j][run]
                    bank = torch.zeros(T, n_feat[s.name], dtype=v.dtype)
                    bank[t] = v
                    b_idx = len(bank_rows[s.name])
                    bank_rows[s.name].append(bank)
                    for c in range(1 + n_controls):
                        items.append((base, s.name, b_idx, t, first_unit[j] + c))
                    keys.append((j, d))
            if not items:
                bar.advance()
                continue
            banks = {n: torch.stack(b) for n, b in bank_rows.items() if b}
            res = run_rows(model, prep, Rows.build(items), banks, {n: unit_tables[n] for n in banks}, batch_size)
            stride = 1 + n_controls
            for r, (j, d) in enumerate(keys):
                base_vals = prep.metrics.corrupt if d == "denoise" else prep.metrics.clean
                sl = slice(r * stride, (r + 1) * stride)
                change = np.stack([res[m][sl] - base_vals[m] for m in METRICS], axis=1)  # [1+n, metrics]
                row = {"pair_id": prep.pair.id, "category": prep.pair.category, "set": sets[j].label,
                       "direction": d}
                for k, m in enumerate(METRICS):
                    row[m] = res[m][sl][0]
                    row[f"{m}_change"] = change[0, k]
                    row[f"{m}_restored"] = (float(prep.metrics.restored(m, float(res[m][sl][0]), min_delta))
                                            if prep.metrics.valid(m, min_delta) else float("nan"))
                cand.setdefault((j, d), []).append(row)
                ctrl.setdefault((j, d), []).append(change[1:])
            bar.advance()

    if dist is not None and dist.active:
        # every rank's per-pair rows, in rank order: the summary below is then the one-process summary
        from .distributed import all_gather

        parts = all_gather((cand, ctrl), dist)
        cand, ctrl = {}, {}
        for c_part, k_part in parts:
            for key, rows in c_part.items():
                cand.setdefault(key, []).extend(rows)
            for key, arrs in k_part.items():
                ctrl.setdefault(key, []).extend(arrs)
    table_rows, control_rows = [], []
    for j, s in enumerate(sets):
        for d in dirs:
            rows_ = cand.get((j, d), [])
            rec = {"set": s.label, "hook": s.hook, "layer": s.layer, "offset": s.offset, "kind": s.kind,
                   "size": len(s.dims), "method": method, "direction": d, "n_pairs": len(rows_),
                   "n_controls": n_controls}
            if rows_:
                per = pd.DataFrame(rows_)
                ctrl_eff = np.nanmean(np.stack(ctrl[j, d]), axis=0) if len(rows_) else None  # [n, metrics]
            for k, m in enumerate(METRICS):
                if not rows_:
                    rec.update({f"{m}_effect": np.nan, f"{m}_restored": np.nan, f"{m}_control_mean": np.nan,
                                f"{m}_control_std": np.nan, f"{m}_z": np.nan, f"{m}_p": np.nan})
                    continue
                eff = float(np.nanmean(per[f"{m}_change"])) if per[f"{m}_change"].notna().any() else float("nan")
                restored = per[f"{m}_restored"]
                mean, std, z, p = _empirical(eff, ctrl_eff[:, k])
                rec.update({f"{m}_effect": eff,
                            f"{m}_restored": float(restored.mean()) if restored.notna().any() else np.nan,
                            f"{m}_n_valid": int(restored.notna().sum()),
                            f"{m}_control_mean": mean, f"{m}_control_std": std, f"{m}_z": z, f"{m}_p": p})
            rec["dims"] = " ".join(map(str, s.dims))
            table_rows.append(rec)
            if rows_:
                for c in range(n_controls):
                    crow = {"set": s.label, "hook": s.hook, "layer": s.layer, "offset": s.offset,
                            "direction": d, "control": c, "dims": " ".join(map(str, sorted(controls[j][c])))}
                    for k, m in enumerate(METRICS):
                        crow[f"{m}_effect"] = float(ctrl_eff[c, k])
                    control_rows.append(crow)
    table = pd.DataFrame(table_rows)
    for m in METRICS:
        table[f"{m}_q"] = bh_qvalues(table[f"{m}_p"].to_numpy())
    table["significant"] = table[f"{metric}_q"] < alpha
    table["verdict"] = np.where(table["significant"], "effect beyond random controls",
                                np.where(table["n_pairs"] > 0, "null: not beyond random controls", "no pairs"))
    per_pair = pd.DataFrame([r for v in cand.values() for r in v])
    return DimsResult(table, pd.DataFrame(control_rows), per_pair)


def dims_intervention(
    model,
    pairs: Sequence[AlignedPair],
    hook: str,
    layer: int,
    dims: Sequence[int],
    method: str = "patch",
    n_controls: int = 100,
    seed: int = 0,
    offset: int = 0,
    direction: str = "denoise",
    **kwargs,
) -> DimsResult:
    """:func:`dims_interventions` for one set of dimensions at ``hook`` and ``layer``."""
    s = DimSet(hook, int(layer), list(dims), offset)
    return dims_interventions(model, pairs, [s], method=method, n_controls=n_controls, seed=seed,
                              direction=direction, **kwargs)


CANDIDATE_COLUMNS = ("hook", "layer", "offset", "dim", "kind", "rank")


def candidate_sets(
    candidates: pd.DataFrame | str,
    kind: str | None = None,
    top_k: int = 10,
    category: str | None = "all",
    max_sets: int | None = None,
) -> list[DimSet]:
    """Dimension sets from ``ec diff``'s ``candidates.csv``: the ``top_k`` best-ranked dims of each
    (hook, layer, offset, kind) group, at most ``max_sets``.

    Groups are ordered strongest first within each kind (stable: lowest ``absz_q90`` of
    the set, responsive: highest ``absz_median``, where those columns exist; else file
    order) and the kinds are interleaved, so a limited budget tests both claims.
    Attention-pattern hooks are skipped (see :data:`NOT_PATCHABLE`).
    """
    from pathlib import Path

    src = str(candidates) if not isinstance(candidates, pd.DataFrame) else "candidates"
    if not isinstance(candidates, pd.DataFrame):
        path = Path(candidates)
        if not path.exists():
            raise EclensError(f"{path}: no candidates file; run `ec diff` first or pass --candidates")
        try:
            candidates = pd.read_csv(path)
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
            raise EclensError(f"{path}: not a readable CSV ({e}); rerun `ec diff`") from None
    missing = [c for c in CANDIDATE_COLUMNS if c not in candidates.columns]
    if missing:
        raise EclensError(f"{src}: missing column(s) {', '.join(missing)} (has {', '.join(candidates.columns)}); "
                          "it must come from `ec diff`")
    if top_k < 1:
        raise EclensError("--top-k must be at least 1")
    df = candidates
    if category is not None and "category" in df.columns:
        if category not in set(df["category"]):
            raise EclensError(f"{src}: no candidates for category {category!r} "
                              f"(has {', '.join(sorted(map(str, set(df['category']))))})")
        df = df[df["category"] == category]
    if kind is not None:
        if kind not in set(df["kind"]):
            raise EclensError(f"{src}: no {kind!r} candidates (kinds: {', '.join(sorted(map(str, set(df['kind']))))})")
        df = df[df["kind"] == kind]
    if df.empty:
        raise EclensError(f"{src}: no candidates to test")
    df = df[~df["hook"].isin(NOT_PATCHABLE)]
    if df.empty:
        raise EclensError(f"{src}: only attention-pattern candidates, which are not patched; "
                          "use candidates of other hooks")
    by_kind: dict[str, list[tuple[float, int, DimSet]]] = {}
    for i, ((h, L, off, k), g) in enumerate(df.groupby(["hook", "layer", "offset", "kind"], sort=False)):
        g = g.sort_values("rank", kind="stable")
        top = g.drop_duplicates("dim").head(top_k)
        if k == "stable" and "absz_q90" in g.columns:
            strength = float(top["absz_q90"].mean())
        elif k == "responsive" and "absz_median" in g.columns:
            strength = -float(top["absz_median"].mean())
        else:
            strength = 0.0
        by_kind.setdefault(str(k), []).append(
            (strength, i, DimSet(str(h), int(L), top["dim"].astype(int).tolist(), int(off), str(k))))
    queues = [[s for *_, s in sorted(v, key=lambda x: (x[0], x[1]))] for v in by_kind.values()]
    sets = []
    while any(queues):
        for q in queues:
            if q:
                sets.append(q.pop(0))
    return sets[:max_sets] if max_sets else sets


# --------------------------------------------------------------------- attribution


def attribution_patch(
    model,
    pairs: Sequence[AlignedPair],
    hooks: str | Sequence[str] | None = EXACT_HOOKS,
    heads: bool = False,
    direction: str = "denoise",
    metric: str = "logit_diff",
    batch_size: int = 8,
    verify_top: int = 0,
    seed: int = 0,
    exact_batch_size: int = 64,
    min_delta: float = DEFAULT_MIN_DELTA,
    progress: bool = False,
    return_dims: bool = False,
):
    """Attribution patching: ``(a_src - a_base) . d metric / d a`` at the base run.

    One forward and one backward pass per batch of pairs (gradients only for the hooked
    activations, through zero "probe" tensors added at each hook point; the weights'
    gradients are never computed). The base run is the corrupt run for ``denoise`` and
    the clean run for ``noise``. One row per (pair, direction, hook, layer, position[,
    head]) with ``attribution`` (the estimate of ``m_patched - m_base`` for ``metric``)
    and ``rank`` (by ``|attribution|`` within the pair and direction).

    ``verify_top=K`` runs exact patching on the ``K`` top-ranked rows of each pair and
    direction plus ``K`` rows drawn at random from the rest (seeded), so the comparison
    spans the whole range rather than only the top. Verified rows get ``exact`` (the
    exact ``m_patched - m_base``), ``exact_restored`` and ``verify_group`` (top /
    random); :func:`attribution_summary` reports Spearman correlation and top-K overlap
    (within each pair's verified rows, the share of attribution's top K that are also
    exact patching's top K).

    With ``return_dims=True`` also returns ``{f"{direction}/{hook}": [pairs, layers, F]}``:
    per-dimension scores at the changed position ``p``.
    """
    _check_pairs(pairs)
    if metric not in METRICS:
        raise EclensError(f"unknown metric {metric!r}: use {', '.join(METRICS)}")
    suffixes = parse_hooks(hooks, model) if hooks else []
    if heads:
        suffixes.append(HEAD_HOOK)
    if not suffixes:
        raise EclensError("nothing to attribute: give --hooks or --heads")
    if verify_top < 0:
        raise EclensError("--verify-top must be >= 0")
    dirs = parse_direction(direction)
    n_layers = model.cfg.n_layers
    names = [f"blocks.{L}.{s}" for s in suffixes for L in range(n_layers)]
    wanted = set(names)
    dev = model_device(model)
    tok = model.tokenizer
    bos = bool(model.cfg.default_prepend_bos)
    frames, dims_out = [], {}
    rng = np.random.default_rng([seed, 7])
    pair_index = {p.id: i for i, p in enumerate(pairs)}
    with _Progress(progress, len(pairs), f"attribution ({metric})") as bar:
        for batch in iter_batches(pairs, batch_size, pad_id(model), dev, sort_by_length=False):
            B = batch.size
            with torch.no_grad():
                logits, cache = model.run_with_cache(batch.tokens, names_filter=lambda n: n in wanted)
            ctxs = [prepare_pair(p, logits[i], logits[B + i], tok, bos) for i, p in enumerate(batch.pairs)]
            acts = {n: _cache_get(cache, model, n) for n in names}
            del logits, cache
            batch_frames = []
            for d in dirs:
                base_rows = slice(B, 2 * B) if d == "denoise" else slice(0, B)
                src_rows = slice(0, B) if d == "denoise" else slice(B, 2 * B)
                ok = [math.isfinite((c.corrupt if d == "denoise" else c.clean)[metric]) for c in ctxs]
                grads = _attribution_grads(model, batch.tokens[base_rows], ctxs, ok, names, metric)
                for n, g in zip(names, grads):
                    L, suffix = int(n.split(".")[1]), n.split(".", 2)[2]
                    delta = (acts[n][src_rows] - acts[n][base_rows]).float()
                    prod = delta * g
                    # heads: sum over d_head; other hooks: over all features
                    per = prod.sum(-1) if suffix == HEAD_HOOK else prod.reshape(B, prod.shape[1], -1).sum(-1)[..., None]
                    per = per.cpu().numpy()
                    if return_dims:
                        flat = prod.reshape(B, prod.shape[1], -1)
                        key = f"{d}/{suffix}"
                        if key not in dims_out:
                            dims_out[key] = torch.full((len(pairs), n_layers, flat.shape[-1]), float("nan"))
                        for i, pair in enumerate(batch.pairs):
                            if ok[i]:
                                dims_out[key][pair_index[pair.id], L] = flat[i, pair.position].cpu()
                    H = per.shape[-1]
                    for i, pair in enumerate(batch.pairs):
                        T = pair.length
                        vals = per[i, :T].reshape(-1) if ok[i] else np.full(T * H, np.nan)
                        batch_frames.append(pd.DataFrame({
                            "pair_id": pair.id, "category": pair.category, "direction": d, "hook": suffix,
                            "layer": L, "position": np.repeat(np.arange(T), H),
                            "head": np.tile(np.arange(H), T) if suffix == HEAD_HOOK else -1,
                            "attribution": vals,
                        }))
            bdf = pd.concat(batch_frames, ignore_index=True)
            bdf["exact"] = np.nan
            bdf["exact_restored"] = np.nan
            bdf["verify_group"] = ""
            if verify_top:
                for i, pair in enumerate(batch.pairs):
                    _verify_pair(model, pair, ctxs[i], acts, i, B, bdf, metric, verify_top, rng,
                                 exact_batch_size, min_delta)
            frames.append(bdf)
            bar.advance(B)
    df = _finish_attribution(pd.concat(frames, ignore_index=True), pairs, tok, metric)
    return (df, dims_out) if return_dims else df


def _attribution_grads(model, tokens, ctxs, ok, names, metric) -> list[torch.Tensor]:
    """d(sum of the metric over the batch)/d(activation) at each hook, for the rows in ``tokens``."""
    probes: dict[str, torch.Tensor] = {}

    def probe(act, hook, key):
        # A zero leaf added to the activation: its gradient is the activation's gradient, and
        # nothing else (weights, inputs) needs one.
        z = torch.zeros_like(act, requires_grad=True)
        probes[key] = z
        return act + z

    with torch.enable_grad():
        out = model.run_with_hooks(tokens, fwd_hooks=[(n, partial(probe, key=n)) for n in names])
        terms = [ctx.evaluate(out[i : i + 1])[metric][0] for i, ctx in enumerate(ctxs) if ok[i]]
        if not terms:
            return [torch.zeros_like(probes[n], dtype=torch.float32) for n in names]
        grads = torch.autograd.grad(torch.stack(terms).sum(), [probes[n] for n in names], allow_unused=True)
    return [torch.zeros_like(probes[n], dtype=torch.float32) if g is None else g.detach().float()
            for n, g in zip(names, grads)]


def _verify_pair(model, pair, ctx, acts, i, B, bdf, metric, K, rng, exact_batch_size, min_delta) -> None:
    """Exact patching for the top-K rows by |attribution| and K random others (fills ``bdf`` in place)."""
    T = pair.length
    chosen_idx, top_idx = [], []
    for _, g in bdf[bdf["pair_id"] == pair.id].groupby("direction", sort=False):
        g = g[g["position"] >= pair.position].dropna(subset=["attribution"])  # before p: exact no-ops
        if g.empty:
            continue
        top = g["attribution"].abs().sort_values(ascending=False, kind="stable").index[:K]
        rest = g.index.difference(top).to_numpy()
        extra = rng.choice(rest, size=min(K, len(rest)), replace=False) if len(rest) else rest
        chosen_idx += [*top, *extra]
        top_idx += list(top)
    if not chosen_idx:
        return
    chosen = bdf.loc[chosen_idx]
    needed = sorted({f"blocks.{L}.{h}" for h, L in zip(chosen["hook"], chosen["layer"])})
    both = {n: torch.stack([acts[n][i, :T], acts[n][B + i, :T]]) for n in needed}
    shapes = {n: tuple(a.shape[2:]) for n, a in both.items()}
    prep = Prepared(pair, ctx, torch.tensor([pair.clean_ids, pair.corrupt_ids]),
                    {n: a.reshape(2, T, -1) for n, a in both.items()}, shapes)
    items = []
    for d, h, L, t, hd in zip(chosen["direction"], chosen["hook"], chosen["layer"], chosen["position"],
                              chosen["head"]):
        base, src = (1, 0) if d == "denoise" else (0, 1)
        items.append((base, f"blocks.{L}.{h}", src, int(t), int(hd)))
    tables = {n: _head_table(shapes[n]) for n in needed if n.endswith(HEAD_HOOK)}
    res = run_rows(model, prep, Rows.build(items), prep.acts, tables, exact_batch_size)
    base_vals = np.where(chosen["direction"].to_numpy() == "denoise", ctx.corrupt[metric], ctx.clean[metric])
    bdf.loc[chosen_idx, "exact"] = res[metric] - base_vals
    bdf.loc[chosen_idx, "exact_restored"] = (ctx.restored(metric, res[metric], min_delta)
                                             if ctx.valid(metric, min_delta) else np.nan)
    bdf.loc[chosen_idx, "verify_group"] = "random"
    bdf.loc[top_idx, "verify_group"] = "top"


def _finish_attribution(df: pd.DataFrame, pairs, tokenizer, metric: str) -> pd.DataFrame:
    by_id = {p.id: p for p in pairs}
    df["rank"] = (df.assign(_a=df["attribution"].abs()).groupby(["pair_id", "direction"])["_a"]
                  .rank(ascending=False, method="first").astype("Int64"))
    df["verified"] = df["exact"].notna()
    p = df["pair_id"].map(lambda i: by_id[i].position).to_numpy()
    T = df["pair_id"].map(lambda i: by_id[i].length).to_numpy()
    pos = df["position"].to_numpy()
    df.insert(6, "offset", pd.array([int(t - q) if t >= q else None for t, q in zip(pos, p)], dtype="Int64"))
    df.insert(7, "position_kind", [position_kind(int(t), int(q), int(n)) for t, q, n in zip(pos, p, T)])
    toks = {pid: [tokenizer.decode([i]) for i in pr.clean_ids] for pid, pr in by_id.items()}
    df.insert(8, "token", [toks[pid][int(t)] for pid, t in zip(df["pair_id"], pos)])
    df.insert(df.columns.get_loc("attribution"), "metric", metric)
    return df.reset_index(drop=True)


def attribution_summary(df: pd.DataFrame, k: int | None = None) -> dict:
    """Spearman correlation (scipy) of attribution with exact patching over verified rows,
    pooled and per pair (median), and the top-K overlap within each pair's verified rows."""
    from scipy.stats import spearmanr

    v = df[df["verified"]] if "verified" in df.columns else df.iloc[0:0]
    out: dict = {"n_rows": int(len(df)), "n_verified": int(len(v))}
    if len(v) < 3:
        out.update(spearman=None, spearman_median_pair=None, topk_overlap=None)
        return out
    # A constant column (e.g. every verified effect 0) has no rank correlation: None, not scipy's warning and NaN.
    varies = v["exact"].nunique() > 1 and v["attribution"].nunique() > 1
    out["spearman"] = float(spearmanr(v["attribution"], v["exact"]).statistic) if varies else None
    per, overlaps = [], []
    for _, g in v.groupby(["pair_id", "direction"]):
        if len(g) >= 3 and g["exact"].nunique() > 1 and g["attribution"].nunique() > 1:
            per.append(float(spearmanr(g["attribution"], g["exact"]).statistic))
        kk = k or int((g["verify_group"] == "top").sum())
        if kk:
            top_a = set(g["attribution"].abs().sort_values(ascending=False).head(kk).index)
            top_e = set(g["exact"].abs().sort_values(ascending=False).head(kk).index)
            overlaps.append(len(top_a & top_e) / kk)
    out["spearman_median_pair"] = float(np.median(per)) if per else None
    out["topk_overlap"] = float(np.mean(overlaps)) if overlaps else None
    return out


def topk_overlap(a: Sequence[float], b: Sequence[float], k: int) -> float:
    """Share of the ``k`` largest ``|a|`` that are among the ``k`` largest ``|b|``."""
    a, b = np.abs(np.asarray(a, dtype=float)), np.abs(np.asarray(b, dtype=float))
    ta = set(np.argsort(-a, kind="stable")[:k].tolist())
    tb = set(np.argsort(-b, kind="stable")[:k].tolist())
    return len(ta & tb) / k


def exact_summary(df: pd.DataFrame, metric: str = "logit_diff", top: int = 10) -> dict:
    """Headline numbers of an exact sweep: mean restored per (direction, hook, layer, position kind), the top cells."""
    col = f"{metric}_restored"
    out: dict = {"metric": metric, "n_rows": int(len(df)),
                 "n_pairs": int(df["pair_id"].nunique()) if len(df) else 0}
    nan_pairs = df.groupby("pair_id")[col].apply(lambda s: bool(s.isna().all()))
    out["pairs_without_ratio"] = int(nan_pairs.sum())
    g = (df[df["position_kind"] != "before"]
         .groupby(["direction", "hook", "layer", "position_kind", "head"])[col].mean().reset_index())
    g = g.dropna(subset=[col])
    out["top"] = g.reindex(g[col].abs().sort_values(ascending=False).index).head(top).to_dict(orient="records")
    return out

