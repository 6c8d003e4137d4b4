"""eclens: study how a language model handles a one-token change.

Feed minimal pairs (clean / corrupt sentences differing in one token), stream
position-aligned, normalised activation differences through TransformerLens hooks,
find dimensions that change consistently little or much, and test them causally.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

# Lazy exports keep `import eclens` and `ec --help` fast (torch is imported on first use).
_EXPORTS = {
    "load_model": "eclens.model",
    "model_info": "eclens.model",
    "tiny_model": "eclens.model",
    "load_tokenizer": "eclens.model",
    "verify_model": "eclens.verify",
    "verify_bridge": "eclens.verify",
    "compare_runs": "eclens.compare",
    "MinimalPair": "eclens.pairs",
    "AlignedPair": "eclens.pairs",
    "Rejection": "eclens.pairs",
    "load_pairs": "eclens.pairs",
    "align": "eclens.pairs",
    "check_pairs": "eclens.pairs",
    "check_with_model": "eclens.pairs",
    "EclensError": "eclens.errors",
    "exact_patch": "eclens.patch",
    "dims_intervention": "eclens.patch",
    "dims_interventions": "eclens.patch",
    "attribution_patch": "eclens.patch",
    "DimSet": "eclens.patch",
    "DimsResult": "eclens.patch",
    "candidate_sets": "eclens.patch",
    "pair_baselines": "eclens.patch",
    "fraction_restored": "eclens.metrics",
    "prepare_pair": "eclens.metrics",
    "run_diff": "eclens.diff",
    "DiffResult": "eclens.diff",
    "open_cache": "eclens.cache",
    "write_cache": "eclens.cache",
    "diff_from_cache": "eclens.cache",
    "cluster_bootstrap": "eclens.bootstrap",
    "PoissonBootstrap": "eclens.bootstrap",
    "measure_recovery": "eclens.recovery",
    "probe_curve": "eclens.probe",
    "measure_invariance": "eclens.invariance",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'eclens' has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
