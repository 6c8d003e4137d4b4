"""Layer skipping and layer exchange (DESIGN.md, "Method, second edition").

**Layer skip.** A block's output replaced by its input (``component="block"``: ``resid_post := resid_pre``),
or one of its two writes to the residual stream removed (``"attn"``: ``hook_attn_out := 0``, ``"mlp"``:
``hook_mlp_out := 0``), so the residual passes that layer (or that half of it) unchanged. Each pair's
clean sentence and its changed sentence (an error, or a twin) are run with the same skip, and we compare

* ``kl_after``: mean over positions ``t >= detect`` of KL(P_clean_skip,t ‖ P_changed_skip,t), with
  ``kl_after_base`` the same without the skip;
* ``lp_after``: the changed run's log-prob of the clean continuation from ``detect`` on minus the clean
  run's (both under the skip; 0 = the changed run predicts the clean continuation as well as the clean
  run does); ``lp_after_base`` without the skip.

The skip's effect on recovery, per pair: ``d_kl = log((kl_after + floor) / (kl_after_base + floor))``
(positive: without this layer the changed run stays further from the clean one, so the layer helped the
model recover) and ``d_lp = lp_after - lp_after_base`` (negative: the layer helped). Errors are compared
with twins: a layer that corrects errors helps errors more than twins, ``d_kl(err) - d_kl(twin) > 0``.
Per cluster the error pairs' mean minus the twins' mean; a cluster bootstrap over the clusters that
have both gives the interval. Pairs without twins get the per-role intervals only (the table says so).

**Breaking the clean run.** A skip that changes the clean run itself a lot (``clean_kl``: mean over
every position of KL(P_clean,t ‖ P_clean_skip,t)) compares two broken runs, not recovery. A skip whose
median ``clean_kl`` over pairs exceeds ``break_kl`` (default 1 nat: more than a typical error's
downstream divergence in the embedded model) is reported with ``broken = True`` and excluded from the
verdicts (its effects are still in the table, for reading, not for judging).

**Layer exchange.** The error run with one layer's attention or MLP write to the residual stream
(``hook_attn_out`` / ``hook_mlp_out``) at every position taken from its twin's run (positions before ``p``
are the same in both): exact patching with the engine's :func:`~eclens.patch.engine.run_rows`. ``kl_exchanged`` against ``kl_error`` and ``kl_twin`` (downstream
KL from ``p`` against the clean run); ``moved`` = (kl_error - kl_exchanged) / (kl_error - kl_twin), the share
of the error→twin gap that layer's state carries.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int

from ..bootstrap import BootstrapConfig, cluster_bootstrap
from ..errors import EclensError
from ..metrics import log_probs
from ..model import model_device
from ..pairs import AlignedPair
from ..progress import TaskBar
from ..roles import cluster_of, detect_of, role_of, single_token_only, twin_of
from .engine import Rows, prepare, run_rows

COMPONENTS = ("block", "attn", "mlp")


@dataclass(frozen=True)
class SkipConfig:
    layers: tuple[int, ...] | None = None     # None: every layer
    components: tuple[str, ...] = COMPONENTS
    batch_size: int = 64                       # skipped runs per forward pass (clean and changed in turn)
    kl_floor: float = 1e-4                     # nats, on both KLs of d_kl (a twin that barely registers)
    break_kl: float = 1.0                      # nats: median clean-run KL above which a skip "breaks" the run
    min_clusters: int = 8                      # clusters with both an error and a twin needed for a verdict
    boot: BootstrapConfig = field(default_factory=lambda: BootstrapConfig(n_boot=1000))


@dataclass
class SkipResult:
    per_pair: pd.DataFrame   # one row per (pair, layer, component)
    table: pd.DataFrame      # one row per (layer, component): errors, twins, their difference
    summary: dict


def _check(model, cfg: SkipConfig) -> list[tuple[int, str]]:
    n = model.cfg.n_layers
    layers = list(range(n)) if cfg.layers is None else [int(x) for x in cfg.layers]
    for x in layers:
        if not 0 <= x < n:
            raise EclensError(f"layer {x} out of range: the model has {n} layers (0..{n - 1})")
    for c in cfg.components:
        if c not in COMPONENTS:
            raise EclensError(f"unknown skip component {c!r}: use {', '.join(COMPONENTS)}")
    if cfg.batch_size < 2:
        raise EclensError("the skip batch size must be at least 2 (a clean and a changed run)")
    return [(L, c) for L in layers for c in cfg.components]


def skip_hooks(skips: Sequence[tuple[int, str] | None], device) -> list[tuple[str, object]]:
    """Forward hooks that skip, in batch row ``r``, ``skips[r]`` (``(layer, component)``; ``None``: no skip)."""
    by: dict[tuple[int, str], list[int]] = {}
    for r, s in enumerate(skips):
        if s is not None:
            by.setdefault((int(s[0]), s[1]), []).append(r)
    hooks: list[tuple[str, object]] = []
    saved: dict[int, torch.Tensor] = {}
    for (L, comp), rows in by.items():
        idx = torch.as_tensor(rows, device=device)
        if comp == "block":
            def keep(act, hook, idx=idx, L=L):
                saved[L] = act[idx.to(act.device)].clone()  # this layer's input, for the rows that skip it
                return act

            def put(act, hook, idx=idx, L=L):
                act[idx.to(act.device)] = saved.pop(L).to(act.device, act.dtype)
                return act

            hooks += [(f"blocks.{L}.hook_resid_pre", keep), (f"blocks.{L}.hook_resid_post", put)]
        else:
            def zero(act, hook, idx=idx):
                act[idx.to(act.device)] = 0
                return act

            hooks.append((f"blocks.{L}.hook_{'attn_out' if comp == 'attn' else 'mlp_out'}", zero))
    return hooks


def run_skipped(model, tokens: Int[torch.Tensor, "batch seq"],
                skips: Sequence[tuple[int, str] | None]) -> Float[torch.Tensor, "batch seq vocab"]:
    """Logits of ``tokens`` with row ``r`` skipping ``skips[r]``."""
    dev = model_device(model)
    with torch.no_grad():
        return model.run_with_hooks(tokens.to(dev), fwd_hooks=skip_hooks(skips, dev))


def _kl(ref: torch.Tensor, run: torch.Tensor) -> torch.Tensor:
    """KL(ref ‖ run) per position from log-probs ``[..., V]``."""
    return (ref.exp() * (ref - run)).sum(-1)


def _pair_rows(model, a: AlignedPair, configs: list[tuple[int, str]], batch_size: int) -> list[dict]:
    """Every skip of ``configs`` (and no skip) on one pair's clean and changed sentences."""
    T, d = a.length, detect_of(a)
    toks = torch.tensor([a.clean_ids, a.corrupt_ids], dtype=torch.long)
    nxt = torch.tensor(a.clean_ids[d + 1:], dtype=torch.long)  # the clean continuation after detect
    allc: list[tuple[int, str] | None] = [None, *configs]
    per_chunk = max(1, batch_size // 2)
    out: list[dict] = []
    base_clean = None
    for s in range(0, len(allc), per_chunk):
        cs = allc[s:s + per_chunk]
        batch = toks.repeat(len(cs), 1)
        skips = [c for c in cs for _ in range(2)]
        lp = log_probs(run_skipped(model, batch, skips)[:, :T]).double()
        clean, changed = lp[0::2], lp[1::2]
        if base_clean is None:
            base_clean = clean[0]
        kl_after = _kl(clean[:, d:], changed[:, d:]).mean(-1)
        if d < T - 1:
            gi = nxt.to(lp.device).view(1, -1, 1).expand(len(cs), -1, 1)
            lp_after = (changed[:, d:T - 1].gather(-1, gi) - clean[:, d:T - 1].gather(-1, gi)).squeeze(-1).sum(-1)
        else:
            lp_after = torch.full((len(cs),), float("nan"), dtype=torch.float64)
        clean_kl = _kl(base_clean.unsqueeze(0), clean).mean(-1)
        for k, c in enumerate(cs):
            out.append({"layer": -1 if c is None else c[0], "component": "none" if c is None else c[1],
                        "kl_after": float(kl_after[k]), "lp_after": float(lp_after[k]),
                        "clean_kl": float(clean_kl[k])})
    return out


def _interval(values: np.ndarray, clusters: list, cfg: SkipConfig) -> tuple[float, float, float, int]:
    if len(values) == 0:
        return math.nan, math.nan, math.nan, 0
    iv = cluster_bootstrap(values, clusters, "mean", cfg.boot)
    return iv.estimate, iv.low, iv.high, iv.n_clusters


def _paired(sub: pd.DataFrame, col: str, cfg: SkipConfig) -> tuple[float, float, float, int]:
    """Error mean minus twin mean per cluster (clusters with both), bootstrapped over clusters."""
    g = sub.groupby(["cluster", "role"])[col].mean().unstack()
    if "error" not in g.columns or "twin" not in g.columns:
        return math.nan, math.nan, math.nan, 0
    diff = (g["error"] - g["twin"]).dropna()
    return _interval(diff.to_numpy(), list(diff.index), cfg)


def skip_table(per_pair: pd.DataFrame, cfg: SkipConfig = SkipConfig()) -> pd.DataFrame:
    """One row per (layer, component) from :func:`layer_skip`'s per-pair rows."""
    rows = []
    has_twins = bool((per_pair["role"] == "twin").any()) and bool((per_pair["role"] == "error").any())
    for (L, comp), sub in per_pair.groupby(["layer", "component"], sort=True):
        rec: dict = {"layer": int(L), "component": comp, "n_pairs": int(len(sub)),
                     "clean_kl_median": float(sub["clean_kl"].median())}
        rec["broken"] = bool(rec["clean_kl_median"] > cfg.break_kl)
        for col in ("d_kl", "d_lp"):
            for role in ("error", "twin"):
                r = sub[sub["role"] == role]
                v = r[col].to_numpy(dtype=float)
                keep = ~np.isnan(v)
                est, lo, hi, g = _interval(v[keep], list(r["cluster"][keep]), cfg)
                rec.update({f"{col}_{role}": est, f"{col}_{role}_low": lo, f"{col}_{role}_high": hi})
                rec[f"n_clusters_{role}"] = g
            est, lo, hi, g = _paired(sub, col, cfg)
            rec.update({f"{col}_diff": est, f"{col}_diff_low": lo, f"{col}_diff_high": hi})
            rec["n_clusters_paired"] = g
        if rec["broken"]:
            v = f"excluded: the skip alone breaks the clean run (median KL {rec['clean_kl_median']:.3g} > {cfg.break_kl})"
        elif not has_twins:
            v = "no twins: errors only, no comparison"
        elif rec["n_clusters_paired"] < max(2, cfg.min_clusters) or math.isnan(rec["d_kl_diff_low"]):
            # a percentile interval over a handful of clusters is far too narrow to judge by
            v = (f"too few clusters with both errors and twins ({rec['n_clusters_paired']} < {cfg.min_clusters}) "
                 "for a verdict")
        elif rec["d_kl_diff_low"] > 0:
            v = "the layer helps errors recover more than twins"
        elif rec["d_kl_diff_high"] < 0:
            v = "the layer helps twins recover more than errors"
        else:
            v = "null: no error-specific recovery"
        rec["verdict"] = v
        rows.append(rec)
    return pd.DataFrame(rows)


def layer_skip(model, pairs: Sequence[AlignedPair], cfg: SkipConfig = SkipConfig(),
               progress: bool = False) -> SkipResult:
    """Skip each (layer, component) of ``cfg`` in every pair's clean and changed run; see the module docstring."""
    if not pairs:
        raise EclensError("layer skipping needs at least one valid pair")
    single_token_only(pairs, "layer skipping")
    configs = _check(model, cfg)
    for a in pairs:
        if not a.position <= detect_of(a) < a.length:
            raise EclensError(f"pair {a.id!r}: detect {detect_of(a)} is outside p..last ({a.position}..{a.length - 1})")
    frames = []
    with TaskBar(progress, len(pairs), f"layer skipping ({len(configs)} skips)") as bar:
        for a in pairs:
            rows = pd.DataFrame(_pair_rows(model, a, configs, cfg.batch_size))
            base = rows.iloc[0]
            rows = rows.iloc[1:].copy()
            rows["kl_after_base"], rows["lp_after_base"] = base["kl_after"], base["lp_after"]
            rows["d_kl"] = np.log((rows["kl_after"] + cfg.kl_floor) / (base["kl_after"] + cfg.kl_floor))
            rows["d_lp"] = rows["lp_after"] - base["lp_after"]
            for k, v in (("pair_id", a.id), ("category", a.category), ("cluster", cluster_of(a)), ("role", role_of(a)),
                         ("detect", detect_of(a)), ("length", a.length)):
                rows.insert(0, k, v)
            frames.append(rows)
            bar.advance()
    per_pair = pd.concat(frames, ignore_index=True)
    table = skip_table(per_pair, cfg)
    ok = table[~table["broken"]]
    summary = {
        "n_pairs": len(pairs), "n_errors": int(sum(role_of(a) == "error" for a in pairs)),
        "n_twins": int(sum(role_of(a) == "twin" for a in pairs)), "break_kl": cfg.break_kl,
        "excluded": [f"L{r.layer}/{r.component}" for r in table[table["broken"]].itertuples()],
        "error_specific": [f"L{r.layer}/{r.component}" for r in ok.itertuples()
                           if r.verdict.startswith("the layer helps errors")],
    }
    return SkipResult(per_pair, table, summary)


# --------------------------------------------------------------------------- layer exchange


def layer_exchange(model, pairs: Sequence[AlignedPair], layers: Sequence[int] | None = None,
                   components: Sequence[str] = ("attn", "mlp"), batch_size: int = 64) -> pd.DataFrame:
    """Per error pair with a twin in ``pairs``, per layer and component: the error run with that component's
    write to the residual stream (``hook_attn_out`` / ``hook_mlp_out``, every position) taken from the twin's
    run, scored by downstream KL against the clean run. (Exchanging the residual stream itself would make
    the rest of the error run the twin run at any layer: ``moved`` would be 1 everywhere.)"""
    single_token_only(pairs, "layer exchange")
    n = model.cfg.n_layers
    layers = list(range(n)) if layers is None else [int(x) for x in layers]
    for c in components:
        if c not in ("attn", "mlp"):
            raise EclensError(f"unknown exchange component {c!r}: use attn or mlp")
    by_id = {a.id: a for a in pairs}
    couples = [(by_id[twin_of(t)], t) for t in pairs if role_of(t) == "twin" and twin_of(t) in by_id]
    couples = [(e, t) for e, t in couples if e.clean_ids == t.clean_ids and e.position == t.position]
    if not couples:
        return pd.DataFrame()
    targets = [(L, c, f"blocks.{L}.hook_{'attn_out' if c == 'attn' else 'mlp_out'}") for L in layers
               for c in components]
    names = [nm for *_, nm in targets]
    rows = []
    for e, t in couples:
        pe, pt = prepare(model, [e, t], names)
        # the twin's run (row 1 of its Prepared) is the value bank: patched into the error run (base 1)
        banks = {nm: pt.acts[nm][1:2] for nm in names}
        res = run_rows(model, pe, Rows.build([(1, nm, 0, -1, -1) for nm in names]), banks, batch_size=batch_size)
        k_err, k_twin = pe.metrics.corrupt["kl"], pt.metrics.corrupt["kl"]
        gap = k_err - k_twin
        for i, (L, comp, _) in enumerate(targets):
            k = float(res["kl"][i])
            rows.append({"pair_id": e.id, "twin_id": t.id, "cluster": cluster_of(e), "category": e.category,
                         "layer": L, "component": comp, "kl_error": k_err, "kl_twin": k_twin, "kl_exchanged": k,
                         "moved": (k_err - k) / gap if abs(gap) > 1e-6 else math.nan})
    return pd.DataFrame(rows)


__all__ = ["COMPONENTS", "SkipConfig", "SkipResult", "layer_exchange", "layer_skip", "run_skipped", "skip_hooks",
           "skip_table"]
