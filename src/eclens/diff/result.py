"""The tables of a diff run (:class:`DiffResult`), computed from the accumulated statistics."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from ..errors import EclensError
from ..hooks import HookGroup
from ..stats import F64, Moments, PowerSums, masked_quantiles
from .accumulate import FEATURES, HEAD_SCALARS, SCALARS
from .aliases import Alias, assemble, layer_runs, over_layers, stored_group
from .config import (
    QUANTILES,
    RESPONSIVE_SIGN_GRID,
    RESPONSIVE_Z_GRID,
    THRESHOLD_GRID,
    DiffConfig,
)
from .contrasts import compute_contrasts, forget_permutations
from .intervals import forget_cluster_weights, mean_intervals
from .row_sums import weighted_sums
from .sample_stats import sample_stats, stable_rank, threshold_bounds
from .summary import diff_summary
from .tables import (
    all_tables,
    candidates_table,
    dims_columns,
    dims_stored,
    frame,
    heads_table,
    layers_table,
    sensitivity_table,
)


class DiffResult:
    """The statistics of a diff run, with DataFrame accessors.

    ``layers``, ``dims``, ``candidates``, ``contrasts``, ``heads``, ``pairs`` and
    ``summary`` are computed from the accumulated state on first access (see the
    module docstring for the definitions); :meth:`cell_stats` gives the arrays of one
    hook and category; :meth:`save` writes the run folder files, :meth:`load` reads them.
    """

    def __init__(self, meta: dict, tensors: dict[str, torch.Tensor], model: dict | None = None,
                 timing: dict | None = None):
        self.meta = meta
        self.tensors = tensors
        self.model = model or {}
        self.timing = timing or {}
        c = dict(meta["config"])
        self.config = DiffConfig(**c)
        self.groups = [HookGroup.from_dict(g) for g in meta["groups"]]
        self.aliases = {a.hook: a for a in (Alias.from_dict(d) for d in meta.get("aliases") or [])}
        self._cache: dict[Any, Any] = {}
        self.half: int | None = None  # a view of one split half of the clusters (for_half)

    def for_half(self, half: int) -> DiffResult:
        """The same statistics restricted to one split half of the clusters (``bootstrap.split_half`` of the
        cluster id with the run's seed): choose candidates on half 0, test them on half 1."""
        if half not in (0, 1):
            raise EclensError(f"half must be 0 or 1, got {half!r}")
        if not self.config.cells:
            raise EclensError("this diff run has no per-half statistics (made before they existed); rerun `ec diff`")
        out = DiffResult(self.meta, self.tensors, self.model, self.timing)
        out.half = half
        return out

    def candidates_for_half(self, half: int) -> pd.DataFrame:
        """:attr:`candidates` chosen on one half of the clusters only (σ, counts and sample of that half)."""
        return self.for_half(half).candidates

    def directions(self, category: str = "all") -> list[str]:
        """The swap directions of a category's pairs (``none`` for pairs whose record names none)."""
        return sorted({d for c, d, _ in self.config.rows if category in ("all", c)})

    def stat_groups(self) -> list[tuple[str, str]]:
        """``(category, swap direction)`` of every group with its own statistics: each category pooled
        (direction ``all``) and, where it holds two or more directions, each direction on its own."""
        out = []
        for cat in self.categories:
            dirs = self.directions(cat)
            out.append((cat, "all"))
            if len(dirs) > 1:
                # ``all`` lists a direction only where it spans categories: one category's direction is that
                # category's own group (listed there), and the same rows twice would double the tables
                out += [(cat, d) for d in dirs if cat != "all" or self.direction_spans(d) > 1]
        return out

    def direction_spans(self, direction: str) -> int:
        """How many categories hold pairs of ``direction``."""
        return len({c for c, d, _ in self.config.rows if d == direction})

    def direction_group(self, direction: str) -> tuple[str, str]:
        """The group that holds every pair of ``direction``: ``all`` or its one category."""
        if self.direction_spans(direction) > 1:
            return ("all", direction)
        return (next(c for c, d, _ in self.config.rows if d == direction), direction)

    def mixed(self, category: str, direction: str = "all") -> bool:
        """True where the group pools opposite swap directions: its signed statistics mean nothing."""
        return direction == "all" and len(self.directions(category)) > 1

    # ---- basic views
    @property
    def offsets(self) -> list[int]:
        return self.config.offsets

    @property
    def categories(self) -> list[str]:
        """``all`` first, then each category with its own statistics."""
        return ["all", *self.config.categories]

    @property
    def hooks(self) -> list[str]:
        return [g.suffix for g in self.groups]

    def stored_group(self, hook: str) -> HookGroup:
        """The layers of ``hook`` the state holds (all but an alias's: :mod:`eclens.diff.aliases`)."""
        return stored_group(self.group(hook), self.aliases.get(hook))

    def _layer_runs(self, hook: str) -> list:
        a = self.aliases[hook]
        return layer_runs(self.group(hook), a, self.stored_group(a.source))

    def hook_sample(self, hook: str, name: str, offset_index: int | None = None, layer_index: int | None = None
                    ) -> torch.Tensor:
        """The state's per-pair array ``{hook}/{name}`` (``sample_delta`` ``[S, O, L, D]``, ``sample_rel_l2``,
        ``sample_cos`` ``[S, O, L]``) over every layer of ``hook`` (an alias's layers read from its source),
        at one offset and one layer (indices into :attr:`offsets` and the group's layers) when given."""
        a = self.aliases.get(hook)
        return over_layers(self.tensors[f"{hook}/{name}"], self.tensors[f"{a.source}/{name}"] if a else None,
                           self._layer_runs(hook) if a else [], offset_index, layer_index)

    def group(self, hook: str) -> HookGroup:
        for g in self.groups:
            if g.suffix == hook:
                return g
        raise EclensError(f"hook {hook!r} is not in this run (hooks: {', '.join(self.hooks)})")

    @property
    def pairs(self) -> pd.DataFrame:
        if "pairs" not in self._cache:
            df = pd.DataFrame(self.meta["rows"])
            if not df.empty:
                ids = set(i for i in self.meta["sample_ids"] if i is not None)
                df["in_sample"] = df["id"].isin(ids)
            self._cache["pairs"] = df
        return self._cache["pairs"]

    @property
    def n_pairs(self) -> int:
        return len(self.meta["rows"])

    def _cat_rows(self, category: str, direction: str = "all") -> torch.Tensor | None:
        """The state rows of a group (``cfg.rows``: category, swap direction, half); None for every row. Kept
        (read-only): every cached statistic asks for its rows to find its key, thousands of times per run."""
        key = ("cat_rows", category, direction)
        if key not in self._cache:
            self._cache[key] = self._find_rows(category, direction)
        return self._cache[key]

    def _find_rows(self, category: str, direction: str) -> torch.Tensor | None:
        if category != "all" and category not in self.config.categories:
            raise EclensError(f"category {category!r} not in this run ({', '.join(self.categories)})")
        if direction != "all" and direction not in self.directions(category):
            raise EclensError(f"swap direction {direction!r} not in category {category!r} "
                              f"({', '.join(self.directions(category))})")
        if category == "all" and direction == "all" and self.half is None:
            return None
        idx = [i for i, (c, d, h) in enumerate(self.config.rows) if category in ("all", c)
               and direction in ("all", d) and (self.half is None or h == self.half)]
        return torch.tensor(idx, dtype=torch.long)

    @staticmethod
    def _pick(mom: Moments, r: torch.Tensor | None, dim: int) -> Moments:
        """Moments of rows ``r`` along ``dim`` merged (one row taken as it is)."""
        if r is None:
            return mom.reduce(dim)
        if len(r) == 1:
            i = int(r[0])
            return Moments(*(t.select(dim, i) for t in (mom.count, mom.mean, mom.m2)))
        return Moments(*(t.index_select(dim, r) for t in (mom.count, mom.mean, mom.m2))).reduce(dim)

    def _ps(self, key: str) -> PowerSums:
        return PowerSums.from_state_dict(self.tensors, key + "/")

    def _moments(self, key: str, category: str, feature: int, direction: str = "all") -> Moments:
        """Moments of one per-pair scalar (cell ``(F, O, L[, H])``), as ``[L, O(, H)]``."""
        ck = ("scalar_moments", key)
        if ck not in self._cache:
            self._cache[ck] = self._ps(key).moments()
        mom = self._cache[ck]
        m = self._pick(mom, self._cat_rows(category, direction), 0)
        m = Moments(m.count[feature], m.mean[feature], m.m2[feature])
        return Moments(*(t.transpose(0, 1) for t in (m.count, m.mean, m.m2)))

    def _rows_key(self, r: torch.Tensor | None) -> tuple | None:
        return None if r is None else tuple(r.tolist())

    def _row_sets(self) -> tuple[dict, torch.Tensor]:
        """Every row set with its own statistics (each category's and each :meth:`stat_groups` group's rows,
        ``_rows_key``) with its position, and their ``[G, C]`` float64 0/1 row weights."""
        if "row_sets" not in self._cache:
            index: dict = {}
            ws = []
            for cat, dr in [(c, "all") for c in self.categories] + self.stat_groups():
                r = self._cat_rows(cat, dr)
                rk = self._rows_key(r)
                if rk not in index:
                    index[rk] = len(ws)
                    ws.append(self._row_weights(r))
            self._cache["row_sets"] = (index, torch.stack(ws))
        return self._cache["row_sets"]

    def _shift0(self, hook: str) -> torch.Tensor:
        """The one shift ``[2, O, L, D]`` (Δ, clean activation) every row's power sums are re-expressed about:
        the first row's with pairs at that offset, float32 values every row shares exactly where a cell is
        constant (σ = 0 stays exactly 0)."""
        key = ("shift0", hook)
        if key not in self._cache:
            K = self.tensors[f"{hook}/shift"]  # [2, O, C, L, D]: each row has its own shift
            first = (self.tensors["count"].T > 0).to(torch.int8).argmax(1)  # [O]: 0 where no row has pairs
            self._cache[key] = K[:, torch.arange(K.shape[1]), first].to(F64)
        return self._cache[key]

    def _weighted_sums(self, hook: str, W: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """:func:`~eclens.diff.row_sums.weighted_sums` of ``hook``'s state about :meth:`_shift0`."""
        return weighted_sums(self.tensors[f"{hook}/feat"], self.tensors[f"{hook}/shift"], self._shift0(hook),
                             self.tensors["count"], W, out)

    def _sums(self, hook: str, category: str, direction: str = "all") -> torch.Tensor:
        """A group's :meth:`_weighted_sums` ``[O, 7, L, D]``: every row set's computed in one pass per hook,
        kept until the hook is forgotten (:meth:`forget_hook`)."""
        r = self._cat_rows(category, direction)
        rk = self._rows_key(r)
        index, W = self._row_sets()
        g = self.stored_group(hook)
        shape = (len(self.offsets), -1, len(g.layers), g.width)
        if rk not in index:  # a row set no table reads (e.g. asked for directly): its own pass
            return self._weighted_sums(hook, self._row_weights(r)[None])[:, 0].view(shape)
        key = ("sums", hook)
        if key not in self._cache:
            self._cache[key] = self._weighted_sums(hook, W, self._cache.pop("spare_sums", None))
        return self._cache[key][:, index[rk]].view(shape)

    def _row_weights(self, r: torch.Tensor | None) -> torch.Tensor:
        """``[C]`` float64 0/1 weights of rows ``r`` (None: every row)."""
        if r is None:
            return torch.ones(len(self.config.rows), dtype=F64)
        w = torch.zeros(len(self.config.rows), dtype=F64)
        w[r] = 1.0
        return w

    def _feat(self, hook: str, category: str, direction: str = "all") -> torch.Tensor:
        """Sums ``[O, 3, L, D]`` of the unshifted features (``delta_abs``, ``delta_sign``, ``delta_nonzero``)."""
        return self._sums(hook, category, direction)[:, 4:]

    def _feat_moments(self, hook: str, category: str, which: int, direction: str = "all") -> Moments:
        """Moments of Δ (``which=0``) or of the clean activation (``which=1``), arrays ``[L, O, D]``."""
        r = self._cat_rows(category, direction)
        key = ("feat_moments", hook, which, self._rows_key(r))  # the whole dataset's clean moments serve every group
        if key in self._cache:
            return self._cache[key]
        s = self._sums(hook, category, direction)[:, 2 * which:2 * which + 2]  # [O, 2, L, D]
        n = self.counts(category, direction)[:, None, None]  # [O, 1, 1]
        nn = n.clamp_min(1)
        s1, s2 = s[:, 0], s[:, 1]
        m = Moments(n, self._shift0(hook)[which] + s1 / nn, (s2 - s1 * s1 / nn).clamp_min(0))
        out = Moments(m.count.transpose(0, 1), m.mean.transpose(0, 1), m.m2.transpose(0, 1))
        if r is None:  # a group's own moments are read once, by its (cached) cell_stats
            self._cache[key] = out
        return out

    def _feat_sum(self, hook: str, category: str, name: str, direction: str = "all") -> torch.Tensor:
        return self._feat(hook, category, direction)[:, FEATURES.index(name) - 4].transpose(0, 1)

    def counts(self, category: str = "all", direction: str = "all") -> torch.Tensor:
        """Pairs per offset ``[O]``."""
        c = self.tensors["count"]
        r = self._cat_rows(category, direction)
        return c.sum(0) if r is None else c.index_select(0, r).sum(0)

    def _sample_members(self, category: str, direction: str = "all") -> torch.Tensor:
        cat = self.tensors["sample/category"]  # the state row of each sampled pair
        keys = self.tensors["sample/keys"]
        ok = torch.isfinite(keys) & (cat >= 0)
        r = self._cat_rows(category, direction)
        if r is not None:
            ok &= torch.isin(cat, r)
        return torch.nonzero(ok).flatten()

    def cell_stats(self, hook: str, category: str = "all", direction: str = "all") -> dict[str, torch.Tensor]:
        """Arrays ``[L, O, D]`` (``[L, O]`` for per-layer values; ``n``, ``n_sample`` ``[O]``) of one hook and
        group; an aliased hook's layers read from its source's (:mod:`eclens.diff.aliases`)."""
        r = self._cat_rows(category, direction)
        key = (hook, None if r is None else tuple(r.tolist()))  # groups with the same rows share their numbers
        if key in self._cache:
            return self._cache[key]
        a = self.aliases.get(hook)
        out = self._cell_stats(hook, category, direction)  # the layers the state holds
        if a is not None:
            src, runs = self.cell_stats(a.source, category, direction), self._layer_runs(hook)
            out = {k: v if k in ("n", "n_sample") else assemble(runs, src[k], v, 0) for k, v in out.items()}
        self._cache[key] = out
        return out

    def _cell_stats(self, hook: str, category: str, direction: str) -> dict[str, torch.Tensor]:
        """:meth:`cell_stats` of the layers the state holds for ``hook``."""
        g = self.stored_group(hook)
        cfg = self.config
        dm = self._feat_moments(hook, category, 0, direction)
        cm_all = self._feat_moments(hook, "all", 1)
        cm = cm_all if (category, direction) == ("all", "all") else self._feat_moments(hook, category, 1, direction)
        n = self.counts(category, direction)  # [O]
        n3 = n[None, :, None]
        nn = n3.clamp_min(1)
        nan = torch.tensor(float("nan"), dtype=F64)
        norm = self._hook_norms(hook)
        sigma, sig_ok, inv = norm["sigma"], norm["sig_ok"], norm["inv"]  # the whole dataset's clean spread
        out: dict[str, torch.Tensor] = {"n": n}
        out["mean_delta"] = torch.where(n3 > 0, dm.mean, nan)
        out["std_delta"] = dm.std
        out["mean_abs_delta"] = torch.where(n3 > 0, self._feat_sum(hook, category, "delta_abs", direction) / nn, nan)
        out["mean_clean"] = torch.where(n3 > 0, cm.mean, nan)
        out["sigma_clean"] = sigma
        # mean squares per dimension (Δ_d², a_d²) [L, O, D]: the clean RMS, the relative L2 and the direction
        # consistency read them (made once, where three expressions each made one)
        e_d2 = dm.m2 / nn + dm.mean ** 2
        e_a2 = cm.m2 / nn + cm.mean ** 2
        out["rms_clean"] = torch.where(n3 > 0, e_a2.sqrt(), nan)
        out["z_mean"] = out["mean_delta"] * inv
        out["absz_mean"] = out["mean_abs_delta"] * inv
        ss = self._feat_sum(hook, category, "delta_sign", direction)
        nz = self._feat_sum(hook, category, "delta_nonzero", direction)
        out["frac_pos"] = torch.where(n3 > 0, (nz + ss) / 2 / nn, nan)
        out["frac_neg"] = torch.where(n3 > 0, (nz - ss) / 2 / nn, nan)
        out["sign_consistency"] = torch.maximum(out["frac_pos"], out["frac_neg"])
        for k in ("rms_ratio", "massive_cell", "massive"):
            out[k] = norm[k]
        # Relative L2 as a ratio of mean squares, from the exact per-dimension sums, with and without the
        # massive dimensions (they dominate ‖a‖ and hide changes elsewhere).
        e_sq = e_d2.sum(-1)  # mean ||Δ||^2 over pairs [L, O]
        keep = ~out["massive"]
        for name, num, den in (("rel_l2_rms", e_sq, e_a2.sum(-1)),
                               ("rel_l2_rms_nomassive", torch.where(keep, e_d2, 0).sum(-1),
                                torch.where(keep, e_a2, 0).sum(-1))):
            out[name] = torch.where((n[None] > 0) & (den > 0), (num / den.clamp_min(1e-300)).sqrt(), nan)
        # Sample-based: quantiles of |Δ|/σ, fraction under the threshold, leave-one-out cosines.
        mem = self._sample_members(category, direction)
        sv = self.tensors["sample/valid"].index_select(0, mem)  # [s, O]
        out["n_sample"] = sv.sum(0).to(F64)  # [O]
        S = dm.mean * n3  # [L, O, D] sum of Δ over the category's pairs
        sd = self.tensors[f"{hook}/sample_delta"]
        # For the threshold grid (threshold sensitivity; unsigned, pooled, groups only): per offset the rank
        # whose |z| decides the stable rule at every threshold (stable_z), not a count per threshold.
        ranks = [stable_rank(int(k), cfg.stable_frac) for k in out["n_sample"].tolist()] if direction == "all" else None
        smp = sample_stats(sd, mem, sv, inv, S, self._bound(hook), ranks,
                           work=self._cache.setdefault(("scratch", threading.get_ident()), {}))
        for q, v in zip(QUANTILES, smp["q"]):
            out["absz_median" if q == 0.5 else f"absz_q{int(round(q * 100)):02d}"] = v
        ns = out["n_sample"][None, :, None]
        out["frac_under"] = torch.where((ns > 0) & sig_ok, smp["under"] / ns.clamp_min(1), nan)
        if direction == "all":
            out["stable_z"] = smp["ranked"]
        out["reachable"] = (nz.sum(-1) > 0)  # [L, O]
        # Per-layer exact scalars.
        for k in SCALARS:
            mom = self._moments(f"{hook}/scalars", category, SCALARS.index(k), direction)
            out[f"{k}_mean"] = torch.where(mom.count > 0, mom.mean, nan)
            out[f"{k}_std"] = mom.std
        m_sq = (out["mean_delta"] ** 2).sum(-1)  # ||mean Δ||^2 [L, O]
        out["dir_norm"] = torch.where(n[None] > 0, m_sq.sqrt(), nan)
        out["dir_consistency"] = torch.where(e_sq > 0, m_sq / e_sq.clamp_min(1e-300), nan)
        # Leave-one-out cosine of each sampled pair with the exact sum of the others.
        dot, dd = smp["dot"], smp["dd"]  # [s, L, O]
        ss2 = (S * S).sum(-1)
        rest2 = (ss2 - 2 * dot + dd).clamp_min(0)
        loo = (dot - dd) / (dd.sqrt() * rest2.sqrt()).clamp_min(1e-300)
        # Where the others' sum is tiny next to this pair's Δ the cosine is float16 rounding noise: skip it.
        lv = sv[:, None, :] & (dd > 0) & (rest2 > 1e-4 * dd) & (n[None, None] > 1)
        lq = masked_quantiles(loo, lv, (0.1, 0.5, 0.9))
        cnt = lv.sum(0).to(F64)
        out["loo_cos_mean"] = torch.where(cnt > 0, torch.where(lv, loo, 0).sum(0) / cnt.clamp_min(1), nan)
        out["loo_cos_q10"], out["loo_cos_median"], out["loo_cos_q90"] = lq
        rl = self.tensors[f"{hook}/sample_rel_l2"].index_select(0, mem).to(F64).transpose(1, 2)
        out["rel_l2_median"] = masked_quantiles(rl, sv[:, None, :] & torch.isfinite(rl), (0.5,))[0]
        if g.n_heads:
            for k in ("rel_l2", "cos"):
                mom = self._moments(f"{hook}/head_scalars", category, HEAD_SCALARS.index(k), direction)
                out[f"head_{k}_mean"] = torch.where(mom.count > 0, mom.mean, nan)
                out[f"head_{k}_std"] = mom.std
        return out

    def prepare_hook(self, hook: str) -> None:
        """Make what every group of ``hook`` reads (the sums of every row set, σ, the threshold's bounds, the
        per-pair scalars' moments), so that groups running on other threads find them made. The whole
        dataset's own :meth:`cell_stats` are one more group's (made on the first hook's critical path, they kept
        the second core idle for a tenth of a second)."""
        self._hook_norms(hook)
        self._bound(hook)
        for key in (f"{hook}/scalars", f"{hook}/head_scalars"):
            if any(k.startswith(key + "/") for k in self.tensors):
                self._moments(key, "all", 0)

    def clean_spread(self, hook: str) -> dict[str, torch.Tensor]:
        """``sigma_clean`` and ``massive`` ``[L, O, D]`` as :meth:`cell_stats` gives them (every group's: the whole
        dataset's), without computing a group's statistics (the contrasts read only these, beside the last
        hook's groups)."""
        norm = self._hook_norms(hook)
        out = {"sigma_clean": norm["sigma"], "massive": norm["massive"]}
        a = self.aliases.get(hook)
        if a is not None:
            src, runs = self.clean_spread(a.source), self._layer_runs(hook)
            out = {k: assemble(runs, src[k], v, 0) for k, v in out.items()}
        return out

    def _bound(self, hook: str) -> torch.Tensor:
        """:func:`threshold_bounds` of the run's threshold: ``inv`` is the whole dataset's, so one serves every
        group."""
        key = ("bound", hook)
        if key not in self._cache:
            self._cache[key] = threshold_bounds(self._hook_norms(hook)["inv"], [self.config.threshold],
                                                self.tensors[f"{hook}/sample_delta"].dtype)[..., 0]
        return self._cache[key]

    def _hook_norms(self, hook: str) -> dict[str, torch.Tensor]:
        """What every group of ``hook`` shares (read-only), from the whole dataset's clean moments: σ, ``1/σ``
        (NaN where σ = 0), the RMS ratio and the massive dimensions; made once per hook, not per group."""
        key = ("norms", hook)
        if key not in self._cache:
            cm_all = self._feat_moments(hook, "all", 1)
            nan = torch.tensor(float("nan"), dtype=F64)
            sigma = cm_all.std
            sig_ok = sigma > 0
            inv = torch.where(sig_ok, 1 / sigma.clamp_min(1e-300), nan)
            # Root mean square of the clean activation (the massive-activation criterion): from the moments.
            n_all = self.counts("all")[None, :, None]
            rms_all = (cm_all.m2 / n_all.clamp_min(1) + cm_all.mean ** 2).sqrt()
            med = rms_all.median(dim=-1, keepdim=True).values
            rms_ratio = torch.where(n_all > 0, rms_all / med.clamp_min(1e-30), nan)
            # Massive per (hook, layer) over every aligned position: a dimension massive at one position is left
            # out at all of them (flagged per cell, L2 #90 of SmolLM2 slipped through where it was under 100x).
            massive_cell = (rms_ratio > self.config.massive_ratio) & (n_all > 0)
            self._cache[key] = {"sigma": sigma, "sig_ok": sig_ok, "inv": inv, "rms_ratio": rms_ratio,
                                "massive_cell": massive_cell,
                                "massive": massive_cell.any(1, keepdim=True).expand_as(massive_cell)}
        return self._cache[key]

    # ---- tables
    def dims_for(self, category: str = "all", offset: int | None = None, hook: str | None = None) -> pd.DataFrame:
        """One row per (hook, layer, offset, dim) for ``category`` (one offset or all)."""
        hooks = [hook] if hook else self.hooks
        offs = None if offset is None else [offset]
        return frame([b for h in hooks for b in dims_columns(self, h, category, offs)])

    @property
    def dims(self) -> pd.DataFrame:
        """``all`` at every offset, and each category at offset 0 (what ``dims.parquet`` holds)."""
        if "dims" not in self._cache:
            parts = [self.dims_for("all")]
            parts += [self.dims_for(c, 0) for c in self.config.categories]
            self._cache["dims"] = pd.concat(parts, ignore_index=True)
        return self._cache["dims"]

    @property
    def dims_stored(self):
        """What ``dims.parquet`` holds: :attr:`dims` at the precision :data:`eclens.tables.PRECISION` declares, as
        an Arrow table (made without the float64 frame)."""
        if "dims_stored" not in self._cache:  # from build_tables' blocks when it has run
            self._cache["dims_stored"] = dims_stored(self, self._cache.pop("dims_parts", None))
        return self._cache["dims_stored"]

    def by_pair_id(self, mem: torch.Tensor) -> torch.Tensor:
        """Sample slots in the order of their pair ids: resampling draws then depend on the sampled pairs only,
        not on the slots a run or a merge put them in."""
        ids = self.meta["sample_ids"]
        return mem[sorted(range(len(mem)), key=lambda i: str(ids[int(mem[i])]))] if len(mem) else mem

    def sample_clusters(self, mem: torch.Tensor) -> list[str]:
        """The cluster of each sampled pair in ``mem`` (its id for rows made before clusters were recorded)."""
        if "cluster_of_id" not in self._cache:
            self._cache["cluster_of_id"] = {r["id"]: str(r.get("cluster") or r["id"]) for r in self.meta["rows"]}
        cl, ids = self._cache["cluster_of_id"], self.meta["sample_ids"]
        return [cl.get(ids[i], str(ids[i])) for i in mem.tolist()]

    def layer_intervals(self, hook: str, category: str = "all", direction: str = "all") -> dict[str, np.ndarray]:
        """Cluster-bootstrap intervals ``[L, O]`` of the mean relative L2 (``rel_l2_mean_lo``/``_hi``), from the
        sampled pairs (all pairs when there are at most ``sample_size``)."""
        mem = self.by_pair_id(self._sample_members(category, direction))
        key = ("intervals", hook, tuple(mem.tolist()))
        if key in self._cache:
            return self._cache[key]
        rl = self.hook_sample(hook, "sample_rel_l2").index_select(0, mem).to(F64).transpose(1, 2)  # [s, L, O]
        ok = self.tensors["sample/valid"].index_select(0, mem)[:, None, :] & torch.isfinite(rl)
        shape = rl.shape[1:]
        if not len(mem):  # no sampled pair in the group: no interval
            nan = np.full(tuple(shape), np.nan)
            return {"rel_l2_mean_lo": nan, "rel_l2_mean_hi": nan.copy()}
        lo, hi = mean_intervals(rl.reshape(len(mem), -1).numpy(), ok.reshape(len(mem), -1).numpy(),
                                self.sample_clusters(mem), self.config.n_boot, seed=self.config.seed)
        out = {"rel_l2_mean_lo": lo.reshape(shape), "rel_l2_mean_hi": hi.reshape(shape)}
        self._cache[key] = out
        return out

    @property
    def layers(self) -> pd.DataFrame:
        """One row per (category, swap direction, hook, layer, offset); ``swap_direction`` ``all`` pools the
        category's directions, and there its signed columns (direction cosines, sign consistency) are NaN
        where it holds two or more: opposite directions cancel in them."""
        if "layers" not in self._cache:
            self._cache["layers"] = layers_table(self)
        return self._cache["layers"]

    @property
    def heads(self) -> pd.DataFrame:
        """Per-head relative L2 and cosine for per-head hooks (``attn.hook_q/k/v/z``); empty otherwise."""
        if "heads" not in self._cache:
            self._cache["heads"] = heads_table(self)
        return self._cache["heads"]

    def grid(self, parameter: str) -> list[float]:
        """The values of one rule threshold the sensitivity table counts candidates at (the run's own included)."""
        base = {"threshold": THRESHOLD_GRID, "responsive_z": RESPONSIVE_Z_GRID,
                "responsive_sign": RESPONSIVE_SIGN_GRID}[parameter]
        return sorted(set(base) | {float(getattr(self.config, parameter))})

    def rule_base(self, hook: str, category: str, direction: str = "all") -> torch.Tensor:
        """``[L, O, D]``: the cells either candidate rule may pass at all (enough pairs, σ > 0, not massive,
        reachable), whatever its thresholds."""
        bkey = ("cand_base", hook, category, direction)
        if bkey not in self._cache:
            cfg = self.config
            st = self.cell_stats(hook, category, direction)
            enough = ((st["n"] >= cfg.min_pairs) & (st["n_sample"] >= cfg.min_pairs))[None, :, None]
            self._cache[bkey] = enough & (st["sigma_clean"] > 0) & ~st["massive"] & st["reachable"][..., None]
        return self._cache[bkey]

    def candidate_masks(self, hook: str, category: str, direction: str = "all", *, threshold: float | None = None,
                        responsive_z: float | None = None, responsive_sign: float | None = None
                        ) -> dict[str, torch.Tensor]:
        """Stable and responsive masks ``[L, O, D]``; the rule's thresholds may be overridden (sensitivity; another
        ``threshold`` only for a group pooling its swap directions, ``direction="all"``). The responsive rule
        needs a sign consistency, so it is evaluated per swap direction only: a group pooling two or more
        directions has no responsive candidates."""
        key = ("cand", hook, category, direction, threshold, responsive_z, responsive_sign)
        if key in self._cache:
            return self._cache[key]
        cfg = self.config
        st = self.cell_stats(hook, category, direction)
        base = self.rule_base(hook, category, direction)
        if threshold is None:
            stable = base & (st["frac_under"] >= cfg.stable_frac)
        elif "stable_z" in st:  # at least stable_frac of the pairs under it: the stable_rank-th smallest |z| is
            stable = base & (st["stable_z"] < threshold)
        else:
            raise EclensError(f"another threshold is counted for the groups that pool their swap directions only: "
                              f"candidate_masks({hook!r}, {category!r}, 'all', threshold={threshold})")
        rz = cfg.responsive_z if responsive_z is None else responsive_z
        rs = cfg.responsive_sign if responsive_sign is None else responsive_sign
        resp = base & (st["absz_median"] >= rz) & (st["sign_consistency"] >= rs)
        if self.mixed(category, direction):
            resp = torch.zeros_like(resp)
        out = {"stable": stable, "responsive": resp}
        if threshold is None and responsive_z is None and responsive_sign is None:
            self._cache[key] = out
        return out

    @property
    def candidates(self) -> pd.DataFrame:
        """Stable and responsive dimensions (rule in the module docstring), ranked per (category, swap direction,
        hook, layer, offset); ``swap_direction`` ``all`` pools the category's directions (stable only, and its
        signed columns NaN, where it holds two or more)."""
        if "candidates" not in self._cache:
            self._cache["candidates"] = candidates_table(self)
        return self._cache["candidates"]

    @property
    def sensitivity(self) -> pd.DataFrame:
        """Candidate counts (every passing dimension, not only the listed ``max_candidates``) per (category, swap
        direction, hook, kind) over a grid of each rule's threshold, the others at their set values
        (``sensitivity.csv``). ``default`` marks the run's own setting."""
        if "sensitivity" not in self._cache:
            self._cache["sensitivity"] = sensitivity_table(self)
        return self._cache["sensitivity"]

    @property
    def contrasts(self) -> pd.DataFrame:
        """Category-group contrasts: effect sizes with cluster-bootstrap intervals and cluster-permutation
        p-values per (hook, layer, offset) (:mod:`eclens.diff.contrasts`)."""
        if "contrasts" not in self._cache:
            self._cache["contrasts"] = self._compute_contrasts()
        return self._cache["contrasts"]

    def _compute_contrasts(self) -> pd.DataFrame:
        return compute_contrasts(self)

    @property
    def summary(self) -> dict:
        if "summary" not in self._cache:
            self._cache["summary"] = diff_summary(self)
        return self._cache["summary"]

    def build_tables(self, on_hook: Callable[[], None] | None = None) -> None:
        """Compute ``layers``, ``candidates``, ``sensitivity``, ``dims_stored``, ``heads`` and ``contrasts`` in one
        pass over the hooks, forgetting each hook's arrays as it goes (:func:`eclens.diff.tables.all_tables`):
        what :meth:`save` does before writing them. Reading the properties one by one gives the same tables.
        ``on_hook``: called as each hook's rows are done (not at all when the tables were already built)."""
        if any(k not in self._cache for k in ("layers", "candidates", "sensitivity", "heads", "contrasts")) or \
                not ({"dims_stored", "dims_parts"} & set(self._cache)):
            self._cache.update(all_tables(self, on_hook=on_hook))

    def rows_of(self, category: str, direction: str = "all") -> tuple | None:
        """A group's state rows as a key (None: every row); groups with the same rows share their numbers."""
        return self._rows_key(self._cat_rows(category, direction))

    def forget_group(self, hook: str, category: str, direction: str = "all") -> None:
        """Forget one group's :meth:`cell_stats` of ``hook`` (recomputed if asked for again), unless they are the
        whole dataset's, which stay as in :meth:`forget_hook`."""
        rk = self.rows_of(category, direction)
        if rk is not None:
            self._cache.pop((hook, rk), None)

    def forget_hook(self, hook: str) -> None:
        """Forget one hook's arrays of every group but the whole dataset's (:meth:`cell_stats`, candidate masks,
        intervals, the hook's power sums); they are recomputed if asked for again. The whole dataset's stay:
        the summary, the contrasts and the mean directions read them."""
        mem_all = tuple(self.by_pair_id(self._sample_members("all")).tolist())

        def of_hook(k) -> bool:
            if not (isinstance(k, tuple) and len(k) >= 2):
                return False
            if k[0] == hook and len(k) == 2:
                return k[1] is not None  # cell_stats; None: every row
            if k[0] in ("cand_base", "cand") and k[1] == hook:
                return k[2:4] != ("all", "all")
            if k[0] == "intervals" and k[1] == hook:
                return k[2] != mem_all
            return k[:2] in (("sums", hook), ("bound", hook), ("norms", hook))

        for k in [k for k in list(self._cache) if of_hook(k)]:
            v = self._cache.pop(k)
            if k[0] == "sums":  # the next hook's sums fill the same buffer
                self._cache["spare_sums"] = v

    def forget_scratch(self) -> None:
        """Drop the chunk buffers of :func:`sample_stats` kept for other threads than this one (each thread has
        its own: :func:`eclens.diff.tables.all_tables` runs groups on worker threads, which end with it)."""
        mine = ("scratch", threading.get_ident())
        for k in [k for k in list(self._cache) if isinstance(k, tuple) and k[0] == "scratch" and k != mine]:
            self._cache.pop(k, None)

    def state_bytes(self) -> int:
        """Bytes of the state's arrays (:data:`STATS_FILE` less its header): what ``--keep-state`` keeps."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def release_arrays(self) -> None:
        """Forget the per-group arrays behind the tables (recomputed on demand), keep the tables: a default run's
        cached cell statistics are gigabytes (~16 MB per group and hook for SmolLM2-135M) that nothing reads once
        the files are written."""
        for k in [k for k in list(self._cache) if isinstance(k, tuple) or k in ("spare_sums", "dims_stored", "dims_parts")]:
            del self._cache[k]
        forget_cluster_weights()
        forget_permutations()

    # ---- files
    def manifest_step(self, files: list[str], *, batch_size: int | None, seconds: float | None,
                      from_cache: str | None = None, **extra: Any) -> dict:
        """The manifest's ``steps.diff`` entry, the same from ``ec diff``, ``ec run`` and the study."""
        return {"hooks": self.config.hooks, "offsets": self.offsets, "categories": self.categories,
                "by_category": self.config.by_category, "sample_size": self.config.sample_size,
                "seed": self.config.seed, "rule": self.summary["rule"], **extra, "batch_size": batch_size,
                "from_cache": from_cache, "n_pairs": self.n_pairs, "timing": self.timing, "seconds": seconds,
                "outputs": files}

    def save(self, run: str | Path, *, stats: bool = True, progress: bool = False) -> list[str]:
        """Write every output of the diff step into ``run`` (:func:`eclens.diff.storage.save_result`)."""
        from .storage import save_result

        return save_result(self, run, stats=stats, progress=progress)

    @classmethod
    def load(cls, run: str | Path) -> DiffResult:
        """A run's diff from its state (:func:`eclens.diff.storage.load_result`)."""
        from .storage import load_result

        return load_result(cls, run)
