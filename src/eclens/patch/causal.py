"""Causal tests that can fail (issue 19): matched controls, the error-minus-twin interaction, and which
metric can see which position.

**Controls.** Each tested set is compared with ``n`` *uniform* random sets of its size (dims drawn
uniformly from the rest of its hook and layer) and ``n`` *matched* sets: each of the set's dims is
replaced by one of its ``neighbours`` nearest dims (not in the set, not massive, σ > 0) in the plane of
(log σ, selection statistic rank), with both coordinates scaled to ranks in ``[0, 1]``. The selection
statistic is the one the set was chosen by (``absz_q90`` for stable sets, ``absz_median`` otherwise),
computed on the selection half when there is a split. A set chosen *because* its dims move can then
only beat controls whose dims move as much: the match ratios (median control σ / set σ, median control
statistic / set statistic) say how close the match came (1 = exact).

**Interaction.** A set's effect in the error runs minus its effect in the twin runs (the same
intervention on the twins of the tested error pairs). Per cluster the error pairs' mean change minus
the twins'; the estimate is the mean over clusters with both, the interval a cluster bootstrap, and
the p-value a permutation test that shuffles the error / twin labels within each cluster
(``(b + 1) / (n + 1)``, two-sided).

**Visibility.** ``logit_diff`` is read at its target position ``q`` (``p`` for most pairs): an
intervention at a later position cannot move it. ``logprob`` sums predictions ``p..T-2``: it cannot see
the last token. ``kl`` averages ``p..T-1``: it sees every position from ``p`` on. :func:`sees` gives the
rule; tables carry ``{metric}_sees`` (the share of pairs whose metric can see the set's position), and a
metric that sees it in no pair judges nothing (its p-values are left empty).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence

import numpy as np
import pandas as pd

from ..bootstrap import BootstrapConfig, cluster_bootstrap
from ..errors import EclensError
from ..metrics import METRICS, meta_targets
from ..pairs import AlignedPair
from .engine import resolve_position

SELECTION_STAT = {"stable": "absz_q90", "responsive": "absz_median"}


def metric_position(pair: AlignedPair, metric: str, tokenizer=None, prepend_bos: bool = False) -> tuple[int, int]:
    """``(first, last)`` positions an intervention can be at and still move ``metric`` for ``pair``."""
    p, T = pair.position, pair.length
    if metric == "logit_diff":
        mt = meta_targets(pair, tokenizer, prepend_bos) if tokenizer is not None else None
        q = mt[0] if mt is not None and mt[0] >= p else p
        return p, q
    if metric == "logprob":
        return p, T - 2
    if metric == "kl":
        return p, T - 1
    raise EclensError(f"unknown metric {metric!r}: use {', '.join(METRICS)}")


def sees(pair: AlignedPair, metric: str, position: int, tokenizer=None, prepend_bos: bool = False) -> bool:
    """Whether an intervention at ``position`` can move ``metric`` of ``pair`` (see the module docstring)."""
    lo, hi = metric_position(pair, metric, tokenizer, prepend_bos)
    return lo <= position <= hi


def sees_share(pairs: Sequence[AlignedPair], offset: int, metric: str, tokenizer=None, prepend_bos: bool = False) -> float:
    """Share of ``pairs`` whose ``metric`` can see position ``p + offset`` (``-1``: the last token)."""
    ok = []
    for a in pairs:
        t = resolve_position(a, offset)
        if t is not None:
            ok.append(sees(a, metric, t, tokenizer, prepend_bos))
    return float(np.mean(ok)) if ok else math.nan


# ------------------------------------------------------------------------------ controls


def uniform_controls(dims: Sequence[int], n_features: int, n: int, rng: np.random.Generator) -> list[list[int]]:
    """``n`` sets of ``len(dims)`` dims drawn uniformly without replacement from the others."""
    rest = np.setdiff1d(np.arange(n_features), np.asarray(dims, dtype=int))
    if len(rest) < len(dims):
        raise EclensError(f"a set of {len(dims)} dims leaves only {len(rest)} others: too few for controls")
    return [sorted(rng.choice(rest, size=len(dims), replace=False).tolist()) for _ in range(n)]


def matched_controls(dims: Sequence[int], cell: pd.DataFrame, stat: str, n: int, rng: np.random.Generator,
                     neighbours: int = 10) -> tuple[list[list[int]], float, float]:
    """``n`` sets matched dim by dim on σ and on ``stat`` (columns ``dim``, ``sigma_clean``, ``stat``,
    optional ``massive`` of one hook/layer/offset cell); returns them with the σ and statistic match ratios.
    ``([], nan, nan)`` when the cell lacks the columns or has too few other dims."""
    if cell.empty or not {"dim", "sigma_clean", stat} <= set(cell.columns):
        return [], math.nan, math.nan
    cell = cell.drop_duplicates("dim").set_index("dim")
    own = [d for d in dims if d in cell.index]
    if len(own) < len(dims):
        return [], math.nan, math.nan
    massive = cell["massive"].astype(bool) if "massive" in cell.columns else pd.Series(False, index=cell.index)
    pool = cell[~cell.index.isin(list(dims)) & (cell["sigma_clean"] > 0) & ~massive
                & cell[stat].notna()]
    k = min(neighbours, len(pool))
    if k < 1 or len(pool) < len(dims):
        return [], math.nan, math.nan
    # Both coordinates as ranks in [0, 1] over the cell, so neither scale dominates the distance.
    allc = cell[cell["sigma_clean"] > 0]
    sr = np.log(allc["sigma_clean"]).rank(pct=True)
    tr = allc[stat].rank(pct=True)
    pdims = pool.index.to_numpy()
    ps, pt = sr.reindex(pdims).to_numpy(), tr.reindex(pdims).to_numpy()
    near = []
    for d in dims:
        if d not in sr.index or pd.isna(tr.get(d)):
            return [], math.nan, math.nan
        dist = (ps - sr[d]) ** 2 + (pt - tr[d]) ** 2
        near.append(pdims[np.argsort(dist, kind="stable")[:max(k, len(dims))]])
    out = []
    for _ in range(n):
        chosen: list[int] = []
        for cand in near:
            free = [int(x) for x in cand if int(x) not in chosen]
            chosen.append(int(rng.choice(free)))
        out.append(sorted(chosen))
    sig, st = cell["sigma_clean"], cell[stat]
    own_sig, own_st = float(np.median(sig[list(dims)])), float(np.median(st[list(dims)]))
    sig_ratio = float(np.median([np.median(sig[c]) for c in out])) / own_sig if own_sig > 0 else math.nan
    st_ratio = float(np.median([np.median(st[c]) for c in out])) / own_st if own_st != 0 else math.nan
    return out, sig_ratio, st_ratio


def empirical(effect: float, controls: np.ndarray) -> tuple[float, float, float, float]:
    """control mean, control std, z, two-sided empirical p = (b+1)/(n+1) (as :mod:`eclens.patch.dims`)."""
    c = controls[~np.isnan(controls)]
    if math.isnan(effect) or len(c) == 0:
        return math.nan, math.nan, math.nan, math.nan
    mean = float(c.mean())
    std = float(c.std(ddof=1)) if len(c) > 1 else math.nan
    z = (effect - mean) / std if std and std > 0 else math.nan
    return mean, std, z, (int((np.abs(c) >= abs(effect)).sum()) + 1) / (len(c) + 1)


# --------------------------------------------------------------------------- interaction


def _cluster_contrast(values: np.ndarray, is_err: np.ndarray, codes: np.ndarray, G: int) -> float:
    se = np.bincount(codes, weights=values * is_err, minlength=G)
    ne = np.bincount(codes, weights=is_err.astype(float), minlength=G)
    st = np.bincount(codes, weights=values * ~is_err, minlength=G)
    nt = np.bincount(codes, weights=(~is_err).astype(float), minlength=G)
    both = (ne > 0) & (nt > 0)
    if not both.any():
        return math.nan
    return float(np.mean(se[both] / ne[both] - st[both] / nt[both]))


def interaction(values: Sequence[float], roles: Sequence[str], clusters: Sequence[Hashable], n_perm: int = 1000,
                seed: int = 0, boot: BootstrapConfig = BootstrapConfig(n_boot=1000)) -> dict:
    """Errors' mean minus twins' mean per cluster, averaged over clusters with both: estimate, cluster-bootstrap
    interval and within-cluster label-permutation p (see the module docstring)."""
    v = np.asarray(values, dtype=float)
    r = np.asarray(roles)
    keep = ~np.isnan(v) & np.isin(r, ["error", "twin"])
    v, r = v[keep], r[keep]
    cl = [c for c, k in zip(clusters, keep) if k]
    index: dict = {}
    codes = np.array([index.setdefault(c, len(index)) for c in cl], dtype=int)
    G = len(index)
    is_err = r == "error"
    est = _cluster_contrast(v, is_err, codes, G) if G else math.nan
    out = {"interaction": est, "interaction_low": math.nan, "interaction_high": math.nan,
           "interaction_p": math.nan, "n_clusters_interaction": 0}
    if math.isnan(est):
        return out
    per = pd.DataFrame({"v": v, "e": is_err, "c": codes}).groupby(["c", "e"])["v"].mean().unstack()
    diff = (per[True] - per[False]).dropna()
    out["n_clusters_interaction"] = int(len(diff))
    if len(diff) >= 2:
        iv = cluster_bootstrap(diff.to_numpy(), list(diff.index), "mean", boot)
        out["interaction_low"], out["interaction_high"] = iv.low, iv.high
    rng = np.random.default_rng([seed, 31])
    groups = [np.nonzero(codes == g)[0] for g in range(G)]
    b = 0
    for _ in range(n_perm):
        lab = is_err.copy()
        for idx in groups:
            lab[idx] = lab[rng.permutation(idx)]
        s = _cluster_contrast(v, lab, codes, G)
        b += int(abs(s) >= abs(est) - 1e-12)
    out["interaction_p"] = (b + 1) / (n_perm + 1)
    return out


# ---------------------------------------------------------------------------- the test


def causal_test(model, pairs: Sequence[AlignedPair], sets: Sequence, *, twins: Sequence[AlignedPair] = (),
                stats: dict | None = None, method: str = "patch", direction: str = "denoise",
                metric: str = "kl", n_controls: int = 50, seed: int = 0, alpha: float = 0.05, n_perm: int = 1000,
                batch_size: int = 64, progress: bool = False, neighbours: int = 10, dist=None):
    """Each set of ``sets`` on ``pairs`` against uniform and matched controls, with its interaction.

    ``twins``: the twins of ``pairs`` (the same sets run on them give the interaction; none: its columns
    are empty and ``interaction_note`` says why). ``stats``: per set label, the cell frame of the selection
    statistics (columns ``dim``, ``sigma_clean``, ``absz_median``, ``absz_q90``, ``massive``) for the
    matched controls; a set without one gets uniform controls only. Returns a
    :class:`~eclens.patch.dims.DimsResult` whose table adds, per metric, ``{m}_p_uniform``,
    ``{m}_p_matched`` (and their ``_q``), ``{m}_sees``, the match ratios ``match_sigma``,
    ``match_stat`` and the interaction columns. ``significant``: ``metric`` sees the set, and its q
    beats ``alpha`` against the uniform controls and (where there are some) the matched ones.

    ``dist`` (a torchrun context): every rank runs its shard of ``pairs`` and ``twins`` and gets the whole
    result; the controls are drawn from the seed alone, and the gathered per-pair rows are put back in
    one-process order, so 1 and N ranks give the same table (matched controls and interaction included).
    """
    from ..roles import cluster_of, role_of
    from ..stats import bh_qvalues
    from .dims import DimSet, dims_interventions

    if metric not in METRICS:
        raise EclensError(f"unknown metric {metric!r}: use {', '.join(METRICS)}")
    sets = [s if isinstance(s, DimSet) else DimSet(*s) for s in sets]
    if not sets:
        raise EclensError("no dimension sets to test")
    tok, bos = model.tokenizer, bool(model.cfg.default_prepend_bos)
    stats = stats or {}
    ctrl_sets, ratios = [], []
    for j, s in enumerate(sets):
        name = f"blocks.{s.layer}.{s.hook}"
        if name not in model.hook_dict:
            raise EclensError(f"set {s.label}: hook {name!r} does not exist in this model")
        n_feat = _n_features(model, name)
        rng = np.random.default_rng([seed, j, 3])
        uni = uniform_controls(s.dims, n_feat, n_controls, rng)
        stat = SELECTION_STAT.get(str(s.kind), "absz_median")
        cell = stats.get(s.label, pd.DataFrame())
        mat, rs, rt = matched_controls(s.dims, cell, stat, n_controls, rng, neighbours)
        ratios.append((len(mat) > 0, rs, rt, stat))
        ctrl_sets.append(uni + (mat if mat else uni))  # without matched sets the second half repeats the first
    active = dist is not None and dist.active
    if active:
        from ..distributed import shard
    mine = shard(pairs, dist) if active else pairs
    res = dims_interventions(model, mine, sets, method=method, n_controls=2 * n_controls, seed=seed,
                             direction=direction, metric=metric, alpha=alpha, batch_size=batch_size,
                             progress=progress, control_sets=ctrl_sets, dist=dist)
    if active:
        res = type(res)(res.table, res.controls, _in_pair_order(res.per_pair, pairs))
    table, controls = res.table.copy(), res.controls
    for k, row in table.iterrows():
        j = next(i for i, s in enumerate(sets) if s.label == row["set"])
        has_m, rs, rt, stat = ratios[j]
        table.loc[k, ["matched", "match_sigma", "match_stat", "selection_stat"]] = [has_m, rs, rt, stat]
        c = controls[(controls["set"] == row["set"]) & (controls["direction"] == row["direction"])]
        for m in METRICS:
            eff = float(row[f"{m}_effect"])
            v = c.sort_values("control")[f"{m}_effect"].to_numpy(dtype=float)
            mean, std, z, p = empirical(eff, v[:n_controls])
            table.loc[k, [f"{m}_control_mean", f"{m}_control_std", f"{m}_z", f"{m}_p_uniform"]] = [mean, std, z, p]
            mm, ms, mz, mp = empirical(eff, v[n_controls:]) if has_m else (math.nan,) * 4
            table.loc[k, [f"{m}_matched_mean", f"{m}_matched_std", f"{m}_p_matched"]] = [mm, ms, mp]
            share = sees_share(pairs, sets[j].offset, m, tok, bos)
            table.loc[k, f"{m}_sees"] = share
            if not share > 0:  # nothing judged by a metric that cannot see the position
                table.loc[k, [f"{m}_p_uniform", f"{m}_p_matched"]] = [math.nan, math.nan]
    table["n_controls"] = n_controls
    for m in METRICS:
        table[f"{m}_p"] = table[f"{m}_p_uniform"]
        table[f"{m}_q"] = bh_qvalues(table[f"{m}_p_uniform"].to_numpy(dtype=float))
        table[f"{m}_q_matched"] = bh_qvalues(table[f"{m}_p_matched"].to_numpy(dtype=float))
    controls = controls.assign(control_kind=np.where(controls["control"] < n_controls, "uniform", "matched"))
    controls.loc[controls["control"] >= n_controls, "control"] -= n_controls
    controls = controls.merge(table[["set", "direction", "matched"]], on=["set", "direction"], how="left")
    controls = controls[(controls["control_kind"] == "uniform") | controls["matched"].astype(bool)]
    controls = controls.drop(columns="matched").reset_index(drop=True)

    # The interaction: the same sets on the twins, error change minus twin change per cluster.
    per = res.per_pair.assign(role=[role_of(a) for a in _by_id(pairs, res.per_pair["pair_id"])],
                              cluster=[cluster_of(a) for a in _by_id(pairs, res.per_pair["pair_id"])])
    if twins:
        tw = dims_interventions(model, shard(twins, dist) if active else twins, sets, method=method, n_controls=1,
                                seed=seed, direction=direction, metric=metric, batch_size=batch_size,
                                progress=progress, control_sets=[c[:1] for c in ctrl_sets], dist=dist).per_pair
        if active:
            tw = _in_pair_order(tw, twins)
        tw = tw.assign(role="twin", cluster=[cluster_of(a) for a in _by_id(twins, tw["pair_id"])])
        per = pd.concat([per, tw], ignore_index=True)
    for k, row in table.iterrows():
        sub = per[(per["set"] == row["set"]) & (per["direction"] == row["direction"])]
        if not twins or not (sub["role"] == "twin").any():
            table.loc[k, "interaction_note"] = "no twins among the tested pairs: no interaction"
            continue
        it = interaction(sub[f"{metric}_change"], sub["role"], sub["cluster"], n_perm=n_perm, seed=seed)
        for key, val in it.items():
            table.loc[k, key] = val
        table.loc[k, "interaction_note"] = f"{metric}: error change minus twin change, per cluster"
    judged = table[f"{metric}_sees"] > 0
    beat_u = table[f"{metric}_q"] < alpha
    beat_m = (table[f"{metric}_q_matched"] < alpha) | ~table["matched"].astype(bool)
    table["significant"] = judged & beat_u & beat_m
    table["verdict"] = np.select(
        [~judged, table["n_pairs"] == 0, table["significant"], beat_u & ~beat_m],
        [f"not judged: {metric} cannot see this position", "no pairs",
         "effect beyond uniform and matched controls", "beats uniform controls only, not matched ones"],
        "null: not beyond controls")
    return type(res)(table, controls, per)


def _n_features(model, name: str) -> int:
    import torch

    cache: dict = {}

    def grab(act, hook):
        cache["shape"] = tuple(act.shape[2:])
        return act

    with torch.no_grad():
        model.run_with_hooks(torch.zeros(1, 1, dtype=torch.long, device=next(model.parameters()).device),
                             fwd_hooks=[(name, grab)])
    return int(np.prod(cache["shape"]))


def _in_pair_order(per: pd.DataFrame, pairs: Sequence[AlignedPair]) -> pd.DataFrame:
    """Gathered per-pair rows (rank by rank) in one-process order: grouped by (set, direction) as first
    seen, then in the order of ``pairs``; the interaction's permutation stream depends on that order."""
    if per.empty:
        return per
    index = {a.id: i for i, a in enumerate(pairs)}
    group = pd.Series(list(zip(per["set"], per["direction"])), index=per.index)
    first = {g: k for k, g in enumerate(dict.fromkeys(group))}
    key = pd.DataFrame({"g": group.map(first), "i": per["pair_id"].map(index)}, index=per.index)
    return per.loc[key.sort_values(["g", "i"], kind="stable").index].reset_index(drop=True)


def _by_id(pairs: Sequence[AlignedPair], ids) -> list[AlignedPair]:
    index = {a.id: a for a in pairs}
    return [index[i] for i in ids]


__all__ = ["SELECTION_STAT", "empirical", "interaction", "matched_controls", "causal_test", "metric_position", "sees", "sees_share",
           "uniform_controls"]
