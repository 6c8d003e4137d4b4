"""Recovery: does the model's behaviour return to the clean run after an error, faster than after a twin?

Per pair, four runs of one batch: the clean sentence, the changed one (the error, or the twin),
and two *ignore baselines* of the changed sentence — the changed token's embedding replaced by
the mean embedding over the vocabulary (a hook on ``hook_embed``), and the changed token deleted.
At every position ``t`` from ``p`` to the last we record KL(P_clean,t ‖ P_run,t) of the next-token
distributions (the deleted run is read at ``t - 1``, which predicts the same next token) and the
log-prob the run gives the clean sentence's next token minus the clean run's. Positions are also
stated as offsets after ``detect`` (``offset = t - detect``).

**Span pairs** (a misspelling of another number of tokens): ``p`` is the span's last token on each
side (:mod:`eclens.spans`), rows run from it to the last token, the clean run read at ``t`` and the
changed runs at ``t_changed`` (the same token after the span); the mean embedding replaces every token
of the span and the deleted run loses the whole span, so it is read at the token before the span plus
the offset. Positions inside a span have no counterpart and are not rows.

**Recovery index** (DESIGN.md) per cluster and offset ``k`` after detect::

    R(k) = mean_err log(KL(k) / KL(0)) − mean_twin log(KL(k) / KL(0))

negative = errors fade faster than twins (relative to how strongly each registered at detect,
which is what makes a large error and a small twin comparable). Per category: the median of
``R`` over clusters with a cluster-bootstrap percentile interval. We keep the median (robust to
the heavy tails of log KL ratios) and a floor of ``kl_floor`` nats on every KL, so a twin that
barely registers cannot dominate through ``log(0)``. Where a category has twins in the same
clusters (every error category of the template pairs: each error pair, 2x2 error cells included,
has a twin in its cluster) the index is paired within clusters, adjusted for the change at detect
by the normalisation only. For the 2x2 designs (agreement, anaphor) the main estimand is the
interaction, estimated with cluster effects and adjusted for KL at detect as a covariate:
:mod:`eclens.interaction` (``recovery_2x2.csv``). Where a category has no twins (BLiMP, pair
files without designs), the comparison is unpaired: the error clusters' median log decay minus
that of the comparison categories (``meaning/*``), replicates drawn independently per group; the
tables say which comparison each row used.

**Ignore baseline comparison** on error pairs: ``cost`` = clean − ignore suffix log-prob of the
clean continuation from detect on (what ignoring the token costs), ``gap`` = error − ignore
(positive = the error run predicts the clean continuation better than ignoring the token would:
correction beyond ignoring). Where ignoring barely moves the run (``cost`` below
``min_ignore_cost`` or its interval touching 0) the test has no power, and the verdict says so.
"""

from __future__ import annotations

import fnmatch
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float

from .bootstrap import BootstrapConfig, Interval, cluster_bootstrap, cluster_replicates, percentile_interval
from .errors import EclensError
from .hooks import pad_id, pad_rows
from .pairs import AlignedPair
from .roles import cluster_of, detect_of, role_of
from .runs import write_json, write_table

RUNS = ("changed", "ignore_mean", "ignore_delete")
IGNORE = ("ignore_mean", "ignore_delete")


@dataclass(frozen=True)
class RecoveryConfig:
    batch_size: int = 16
    max_offset: int = 4  # offsets 0..max_offset after detect are summarised, plus the last token
    kl_floor: float = 1e-4  # nats
    comparison: str = "meaning/*"  # categories compared with where a category has no twins (unpaired)
    min_ignore_cost: float = 0.05  # nats: ignoring the token must cost at least this for the test to have power
    boot: BootstrapConfig = field(default_factory=lambda: BootstrapConfig(n_boot=1000))


def mean_embedding(model) -> Float[torch.Tensor, " d_model"]:
    """The mean of the embedding matrix over the vocabulary (what ``hook_embed`` gives for an average token)."""
    return model.W_E.detach().float().mean(0)


def _tokens(pairs: Sequence[AlignedPair], pad: int) -> tuple[torch.Tensor, list[list[int]]]:
    """``[4B, T]``: clean, changed, changed (its changed tokens' embeddings replaced in the hook), changed minus
    its changed tokens (a span pair loses its whole span)."""
    rows = [a.clean_ids for a in pairs] + [a.corrupt_ids for a in pairs] * 2
    rows += [a.corrupt_ids[: a.position] + a.corrupt_ids[a.corrupt_end:] for a in pairs]
    return pad_rows(rows, pad), rows


def batch_rows(logits: Float[torch.Tensor, "four_b seq vocab"], pairs: Sequence[AlignedPair]) -> pd.DataFrame:
    """Rows of ``recovery.csv`` from the logits of one :func:`_tokens` batch: pair × aligned position from the
    change's last token (``p``; a span pair's span end, :mod:`eclens.spans`) to the last token. ``t`` is the
    clean sentence's position, ``t_changed`` the changed one's (they differ after a span of another length);
    the deleted run is read at the token before the change plus the same offset (it predicts the same token)."""
    B = len(pairs)
    dev = logits.device
    p = torch.tensor([a.position for a in pairs])
    n = torch.tensor([a.length for a in pairs])
    ce = torch.tensor([int(a.clean_end) for a in pairs])
    xe = torch.tensor([int(a.corrupt_end) for a in pairs])
    cnt = n - ce + 1
    ri = torch.repeat_interleave(torch.arange(B), cnt)
    k = torch.arange(int(cnt.sum())) - torch.repeat_interleave(cnt.cumsum(0) - cnt, cnt)  # offset from the end
    ti, tx, td = ce[ri] - 1 + k, xe[ri] - 1 + k, p[ri] - 1 + k
    last = ti == n[ri] - 1
    # the clean next token at t (a dummy at the last position, whose value is dropped)
    rl = [pairs[i] for i in ri.tolist()]
    nxt = torch.tensor([a.clean_ids[t + 1] if t + 1 < a.length else 0 for a, t in zip(rl, ti.tolist())])
    # log-softmax in float64 over only the rows read (few rows; a KL of several nats keeps its digits)
    lc = torch.log_softmax(logits[ri.to(dev), ti.to(dev)].double(), -1)
    pc = lc.exp()
    nxt_d = nxt.to(dev)[:, None]
    lp_c = lc.gather(-1, nxt_d).squeeze(-1)
    src = {"changed": (B + ri, tx), "ignore_mean": (2 * B + ri, tx), "ignore_delete": (3 * B + ri, td.clamp_min(0))}
    cols: dict[str, np.ndarray] = {}
    for name, (rows, pos) in src.items():
        lx = torch.log_softmax(logits[rows.to(dev), pos.to(dev)].double(), -1)
        kl = (pc * (lc - lx)).sum(-1).double().cpu()
        lpd = (lx.gather(-1, nxt_d).squeeze(-1) - lp_c).double().cpu()
        lpd[last] = float("nan")  # the last token has no next token
        if name == "ignore_delete":  # nothing predicts the first token of a sentence that lost its first tokens
            kl[td < 0] = float("nan")
            lpd[td < 0] = float("nan")
        cols[f"kl_{name}"], cols[f"lp_{name}"] = kl.numpy(), lpd.numpy()
    from .spans import side_anchor

    df = pd.DataFrame({
        "id": [a.id for a in rl], "category": [a.category for a in rl],
        "cluster": [cluster_of(a) for a in rl], "role": [role_of(a) for a in rl],
        "p": p[ri].numpy(), "detect": [side_anchor(a, "clean", "detect") for a in rl], "length": n[ri].numpy(),
        "t": ti.numpy(), "last": last.numpy(),
    })
    df.insert(8, "offset", df["t"] - df["detect"])
    df.insert(9, "t_changed", tx.numpy())
    for key, v in cols.items():
        df[key] = v
    return df


def pair_recovery(model, pairs: Sequence[AlignedPair], cfg: RecoveryConfig = RecoveryConfig(),
                  progress=None) -> pd.DataFrame:
    """``recovery.csv``: per pair and position ``t = p..last``, the KL and next-token log-prob difference of
    the changed run and of both ignore runs against the clean run (columns ``kl_*``, ``lp_*``)."""
    if not pairs:
        raise EclensError("recovery needs at least one valid pair")
    for a in pairs:
        first = int(a.corrupt_end) - 1  # p, or a span pair's span end: where its aligned positions start
        if not first <= detect_of(a) < len(a.corrupt_ids):
            raise EclensError(f"pair {a.id!r}: detect {detect_of(a)} is outside p..last ({first}.."
                              f"{len(a.corrupt_ids) - 1})")
    pad = pad_id(model)
    emb = mean_embedding(model)
    order = sorted(range(len(pairs)), key=lambda i: pairs[i].length)
    rows: list[pd.DataFrame] = []
    with torch.no_grad():
        for s in range(0, len(order), cfg.batch_size):
            chunk = [pairs[i] for i in order[s:s + cfg.batch_size]]
            toks, _ = _tokens(chunk, pad)
            B = len(chunk)
            # the mean embedding at every changed token of the third block's rows (a span pair's whole span)
            rr = torch.cat([torch.full((a.corrupt_end - a.position,), 2 * B + i) for i, a in enumerate(chunk)])
            pp = torch.cat([torch.arange(a.position, a.corrupt_end) for a in chunk])

            def embed_hook(act, hook, rr=rr, pp=pp):
                act[rr.to(act.device), pp.to(act.device)] = emb.to(act.device, act.dtype)
                return act

            dev = next(model.parameters()).device
            logits = model.run_with_hooks(toks.to(dev), fwd_hooks=[("hook_embed", embed_hook)])
            rows.append(batch_rows(logits, chunk))
            if progress is not None:
                progress(B)
    return pd.concat(rows, ignore_index=True)


# --------------------------------------------------------------------------- per-pair summaries


def pair_table(positions: pd.DataFrame, cfg: RecoveryConfig = RecoveryConfig()) -> pd.DataFrame:
    """Per pair: the suffix log-prob difference from detect on (``suffix_*``, nats; the clean continuation's
    log-prob under the run minus under the clean run), KL at detect and at the last token, and the log decay
    ``decay_k = log(KL(k)/KL(0))`` of the changed run for ``k = 1..max_offset`` and ``last``."""
    after = positions[positions["offset"] >= 0]
    g = after.groupby("id", sort=False)
    out = g[["category", "cluster", "role", "p", "detect", "length"]].first()
    for name in RUNS:
        out[f"suffix_{name}"] = g[f"lp_{name}"].sum(min_count=1)
        out[f"klmean_{name}"] = g[f"kl_{name}"].mean()
    k0 = after[after["offset"] == 0].set_index("id")
    last = after[after["last"]].set_index("id")
    floor = cfg.kl_floor
    for name in RUNS:
        out[f"kl0_{name}"] = k0[f"kl_{name}"]
        out[f"kllast_{name}"] = last[f"kl_{name}"]
    base = np.log(np.maximum(out["kl0_changed"], floor))
    for k in range(1, cfg.max_offset + 1):
        kk = after[after["offset"] == k].set_index("id")["kl_changed"].reindex(out.index)
        out[f"decay_{k}"] = np.log(np.maximum(kk, floor)) - base
    out["decay_last"] = np.where(out["length"] - 1 > out["detect"],
                                 np.log(np.maximum(out["kllast_changed"], floor)) - base, np.nan)
    return out.reset_index()


def offset_labels(cfg: RecoveryConfig) -> list[str]:
    return [str(k) for k in range(1, cfg.max_offset + 1)] + ["last"]


def _is_comparison(cat: str, cfg: RecoveryConfig) -> bool:
    return fnmatch.fnmatchcase(cat, cfg.comparison)


def recovery_index(pairs_df: pd.DataFrame, cfg: RecoveryConfig = RecoveryConfig()) -> pd.DataFrame:
    """Per error category and offset: the recovery index with a cluster-bootstrap interval (module docstring)."""
    rows = []
    cmp_pairs = pairs_df[pairs_df["category"].map(lambda c: _is_comparison(c, cfg))]
    for cat, df in pairs_df.groupby("category", sort=True):
        if _is_comparison(cat, cfg):
            continue
        err, twin = df[df["role"] == "error"], df[df["role"] == "twin"]
        paired = set(err["cluster"]) & set(twin["cluster"])
        for lab in offset_labels(cfg):
            col = f"decay_{lab}"
            if paired:
                e = err[err["cluster"].isin(paired)].groupby("cluster")[col].mean()
                t = twin[twin["cluster"].isin(paired)].groupby("cluster")[col].mean()
                idx = (e - t).dropna()
                iv = cluster_bootstrap(idx.to_numpy(), list(idx.index), "median", cfg.boot)
                how = "twins (paired within clusters)"
            elif len(cmp_pairs):
                iv = _unpaired(err, cmp_pairs, col, cfg)
                how = f"{cfg.comparison} (unpaired)"
            else:
                iv = Interval(math.nan, math.nan, math.nan, cfg.boot.level, "percentile", 0, 0)
                how = "none"
            rows.append({"category": cat, "offset": lab, "index": iv.estimate, "low": iv.low, "high": iv.high,
                         "n_clusters": iv.n_clusters, "comparison": how})
    return pd.DataFrame(rows)


def _unpaired(err: pd.DataFrame, cmp: pd.DataFrame, col: str, cfg: RecoveryConfig) -> Interval:
    e = err.groupby("cluster")[col].mean().dropna()
    c = cmp.groupby("cluster")[col].mean().dropna()
    est_e, rep_e, ge, ne = cluster_replicates(e.to_numpy(), list(e.index), "median", cfg.boot)
    cb = BootstrapConfig(cfg.boot.n_boot, cfg.boot.level, "percentile", cfg.boot.seed + 1)
    est_c, rep_c, gc, nc = cluster_replicates(c.to_numpy(), list(c.index), "median", cb)
    return percentile_interval(est_e - est_c, rep_e - rep_c, min(ge, gc), ne + nc, cfg.boot)


def recovery_curves(positions: pd.DataFrame, cfg: RecoveryConfig = RecoveryConfig()) -> pd.DataFrame:
    """Per category, run and offset after detect (0..max_offset, ``last``): median KL with a cluster-bootstrap
    interval. Runs: each role's changed run, and the error pairs' two ignore runs."""
    after = positions[positions["offset"] >= 0].copy()
    after["lab"] = after["offset"].astype(str)
    last = after[after["last"]].assign(lab="last")
    keep = after[after["offset"] <= cfg.max_offset]
    data = pd.concat([keep, last], ignore_index=True)
    rows = []
    labels = [str(k) for k in range(cfg.max_offset + 1)] + ["last"]
    for (cat, role), df in data.groupby(["category", "role"], sort=True):
        runs = [("changed", role)] + ([(r, r) for r in IGNORE] if role == "error" else [])
        for col, name in runs:
            for lab in labels:
                sub = df[df["lab"] == lab]
                iv = cluster_bootstrap(sub[f"kl_{col}"].to_numpy(), list(sub["cluster"]), "median", cfg.boot)
                rows.append({"category": cat, "run": name, "offset": lab, "kl_median": iv.estimate, "low": iv.low,
                             "high": iv.high, "n_clusters": iv.n_clusters})
    return pd.DataFrame(rows)


def ignore_comparison(pairs_df: pd.DataFrame, cfg: RecoveryConfig = RecoveryConfig()) -> pd.DataFrame:
    """Per category and ignore run, on error pairs: ``cost`` (clean − ignore) and ``gap`` (error − ignore) of the
    clean continuation's suffix log-prob from detect on (medians, cluster-bootstrap intervals) and a verdict."""
    rows = []
    err = pairs_df[(pairs_df["role"] == "error") & pairs_df["suffix_changed"].notna()]
    for cat, df in err.groupby("category", sort=True):
        for ign in IGNORE:
            sub = df[df[f"suffix_{ign}"].notna()]
            cost = cluster_bootstrap((-sub[f"suffix_{ign}"]).to_numpy(), list(sub["cluster"]), "median", cfg.boot)
            gap = cluster_bootstrap((sub["suffix_changed"] - sub[f"suffix_{ign}"]).to_numpy(), list(sub["cluster"]),
                                    "median", cfg.boot)
            rows.append({"category": cat, "ignore": ign, "cost": cost.estimate, "cost_low": cost.low,
                         "cost_high": cost.high, "gap": gap.estimate, "gap_low": gap.low, "gap_high": gap.high,
                         "n_clusters": gap.n_clusters, "verdict": verdict(cost, gap, cfg)})
    return pd.DataFrame(rows)


def verdict(cost: Interval, gap: Interval, cfg: RecoveryConfig) -> str:
    if not (math.isfinite(cost.low) and math.isfinite(gap.low)):
        return "too few clusters"
    if cost.estimate < cfg.min_ignore_cost or cost.low <= 0:
        return (f"no power: ignoring the token costs only {cost.estimate:.3g} nats [{cost.low:.3g}, {cost.high:.3g}], "
                f"so the error run cannot end measurably closer to clean than the ignore run")
    if gap.low > 0:
        return "corrects: the error run ends closer to the clean run than the ignore run does"
    if gap.high < 0:
        return "no correction: the error run ends further from the clean run than the ignore run does"
    half = (gap.high - gap.low) / 2
    return f"inconclusive: the gap's interval contains 0 (it can resolve gaps of about ±{half:.2g} nats)"


@dataclass
class RecoveryResult:
    positions: pd.DataFrame  # recovery.csv
    pairs: pd.DataFrame
    curves: pd.DataFrame
    index: pd.DataFrame
    ignore: pd.DataFrame
    cfg: RecoveryConfig

    def summary(self) -> dict:
        def recs(df: pd.DataFrame) -> list[dict]:
            return json.loads(df.to_json(orient="records"))

        return {"index": recs(self.index), "ignore": recs(self.ignore), "curves": recs(self.curves),
                "kl_floor": self.cfg.kl_floor, "level": self.cfg.boot.level,
                "n_pairs": int(len(self.pairs)), "n_clusters": int(self.pairs["cluster"].nunique())}

    def headline(self) -> str:
        last = self.index[self.index["offset"] == "last"]
        if last.empty:
            return "recovery: no error category"
        parts = [f"{r.category} {r.index:+.2f} [{r.low:+.2f}, {r.high:+.2f}]" for r in last.itertuples()]
        return "recovery index at the last token (negative = errors fade faster): " + "; ".join(parts)

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        write_table(self.positions, folder / "recovery.csv")
        write_table(self.pairs, folder / "recovery_pairs.csv")
        write_json(folder / "recovery.json", self.summary())


def measure_recovery(model, pairs: Sequence[AlignedPair], cfg: RecoveryConfig = RecoveryConfig(),
                     progress=None) -> RecoveryResult:
    """Run :func:`pair_recovery` and summarise it: curves, recovery index, ignore-baseline comparison."""
    return summarize(pair_recovery(model, pairs, cfg, progress), cfg)


def summarize(positions: pd.DataFrame, cfg: RecoveryConfig = RecoveryConfig()) -> RecoveryResult:
    pairs_df = pair_table(positions, cfg)
    return RecoveryResult(positions, pairs_df, recovery_curves(positions, cfg), recovery_index(pairs_df, cfg),
                          ignore_comparison(pairs_df, cfg), cfg)
