"""Dimension-set interventions against random control sets of the same size."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float

from ..errors import EclensError
from ..hooks import (
    NOT_PATCHABLE,
    check_patchable,
    hook_suffix,
)
from ..metrics import DEFAULT_MIN_DELTA, METRICS
from ..pairs import AlignedPair
from ..progress import TaskBar
from ..stats import bh_qvalues
from .engine import (
    ABLATIONS,
    Prepared,
    Rows,
    check_pairs,
    parse_direction,
    prepare,
    resolve_position,
    run_rows,
)


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
    if pairs or dist is None or not dist.active:  # a rank's shard may be empty (fewer pairs than ranks)
        check_pairs(pairs)
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
    sets = [DimSet(check_patchable(hook_suffix(s.hook, model)), s.layer, s.dims, s.offset, s.kind, s.label)
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
    with TaskBar(progress, len(pairs), "caching pairs") as bar:
        for i, prep in enumerate(prepare(model, pairs, names, prep_batch_size)):
            for j, s in enumerate(sets):
                t = resolve_position(prep.pair, s.offset)
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
                from ..distributed import all_reduce_sum

                tot = torch.cat(vals).double().sum(0) if vals else torch.zeros(n_feat[sets[j].name], dtype=torch.float64)
                cnt = torch.tensor([float(2 * len(vals))], dtype=torch.float64)
                tot, cnt = all_reduce_sum(tot, dist), all_reduce_sum(cnt, dist)
                if cnt.item() > 0:
                    means[j] = (tot / cnt).float()
            elif vals:
                means[j] = torch.cat(vals).double().mean(0).float()

    cand: dict[tuple[int, str], list[dict]] = {}  # (set, direction) -> per-pair rows
    ctrl: dict[tuple[int, str], list[np.ndarray]] = {}  # -> per-pair [n_controls, metrics] changes
    with TaskBar(progress, len(preps), f"{method} on {len(sets)} set(s) x {n_controls} controls") as bar:
        for i, prep in enumerate(preps):
            items, keys, bank_rows = [], [], {n: [] for n in names}
            T = prep.pair.length
            for j, s in enumerate(sets):
                if (i, j) not in at:
                    continue
                t = resolve_position(prep.pair, s.offset)
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
        from ..distributed import all_gather

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
    """Dimension sets from ``ec diff``'s ``candidates.parquet`` (or a CSV of the same columns): the ``top_k`` best-ranked dims of each
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
        from ..tables import read_table_file

        try:
            candidates = read_table_file(path)
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError, ValueError) as e:
            raise EclensError(f"{path}: not a readable table ({type(e).__name__}: {e}); rerun `ec diff`") from None
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
