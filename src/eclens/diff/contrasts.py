"""Per-dimension Mann-Whitney contrasts between category groups, and the rows ``contrasts.csv`` keeps."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from ..hooks import head_of
from ..stats import F64, bh_qvalues

if TYPE_CHECKING:
    from .result import DiffResult


def compute_contrasts(result: DiffResult) -> pd.DataFrame:
    """The rows of :attr:`DiffResult.contrasts` (every test of every contrast, hook, layer and dimension)."""
    from scipy.stats import mannwhitneyu

    cfg = result.config
    cols = ["contrast", "group_a", "group_b", "measure", "hook", "layer", "offset", "dim", "unit", "head", "n_a",
            "n_b", "median_a", "median_b", "effect", "u", "p", "q", "significant"]
    if not cfg.categories:
        return pd.DataFrame(columns=cols)
    cat = result.tensors["sample/category"]
    keys = result.tensors["sample/keys"]
    ok = torch.isfinite(keys) & (cat >= 0)
    group_of = [c.split("/", 1)[0] for c in cfg.categories]
    names = sorted(set(group_of))
    gidx = torch.tensor([names.index(x) for x in group_of] + [-1], dtype=torch.long)
    sgroup = torch.where(ok, gidx[cat.clamp_min(0)], torch.full_like(cat, -1))
    frames = []
    for off in cfg.contrast_offsets:
        if off not in result.offsets:
            continue
        oi = result.offsets.index(off)
        valid = result.tensors["sample/valid"][:, oi] & (sgroup >= 0)
        for ia in range(len(names)):
            for ib in range(ia + 1, len(names)):
                ma = torch.nonzero(valid & (sgroup == ia)).flatten()
                mb = torch.nonzero(valid & (sgroup == ib)).flatten()
                if len(ma) < cfg.min_group or len(mb) < cfg.min_group:
                    continue
                for g in result.groups:
                    sigma = result.cell_stats(g.suffix, "all")["sigma_clean"][:, oi, :]  # [L, D]
                    inv = torch.where(sigma > 0, 1 / sigma.clamp_min(1e-300), torch.tensor(float("nan"),
                                                                                         dtype=F64))
                    sd = result.tensors[f"{g.suffix}/sample_delta"][:, oi].to(F64) * inv  # [S, L, D]
                    for measure in ("abs", "signed"):
                        x = sd.abs() if measure == "abs" else sd
                        xa = x.index_select(0, ma).reshape(len(ma), -1).numpy()
                        xb = x.index_select(0, mb).reshape(len(mb), -1).numpy()
                        good = np.isfinite(xa).all(0) & np.isfinite(xb).all(0)
                        u = np.full(xa.shape[1], np.nan)
                        p = np.full(xa.shape[1], np.nan)
                        if good.any():
                            with np.errstate(all="ignore"):
                                mw = mannwhitneyu(xa[:, good], xb[:, good], alternative="two-sided", axis=0)
                            u[good], p[good] = mw.statistic, mw.pvalue
                        L, D = len(g.layers), g.width
                        dims = np.tile(np.arange(D), L)
                        frames.append(pd.DataFrame({
                            "contrast": f"{names[ia]} vs {names[ib]}", "group_a": names[ia], "group_b": names[ib],
                            "measure": measure, "hook": g.suffix, "layer": np.repeat(np.array(g.layers), D),
                            "offset": off, "dim": dims, "unit": g.kind,
                            "head": [head_of(g, int(d)) for d in dims] if g.kind in ("head", "head_dim") else -1,
                            "n_a": len(ma), "n_b": len(mb), "median_a": np.median(xa, 0),
                            "median_b": np.median(xb, 0),
                            # rank-biserial correlation: P(a > b) - P(a < b)
                            "effect": 2 * u / (len(ma) * len(mb)) - 1, "u": u, "p": p}))
    if not frames:
        return pd.DataFrame(columns=cols)
    df = pd.concat(frames, ignore_index=True)
    df["q"] = np.nan
    for _measure, idx in df.groupby("measure").groups.items():
        df.loc[idx, "q"] = bh_qvalues(df.loc[idx, "p"].to_numpy())
    df["significant"] = df["q"] <= cfg.alpha
    return df[cols]


def contrasts_csv(con: pd.DataFrame, per_contrast: int = 200) -> pd.DataFrame:
    """Significant tests plus the ``per_contrast`` smallest p-values of each contrast and measure."""
    if con.empty:
        return con
    n_tests = con.dropna(subset=["p"]).groupby("measure").size()
    df = con.dropna(subset=["p"]).sort_values("p", kind="stable")
    top = df.groupby(["contrast", "measure"], sort=False).head(per_contrast)
    keep = pd.concat([df[df["significant"]], top]).drop_duplicates().sort_values(["measure", "q", "p"], kind="stable")
    keep = keep.copy()
    keep["n_tests"] = keep["measure"].map(n_tests).astype(int)
    return keep
