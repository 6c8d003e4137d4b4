"""Where pairs come from: the offline template generator, any OpenAI-compatible LLM,
codespell's real misspellings, and importers for BLiMP and CSV files. Every source yields
:class:`eclens.pairs.MinimalPair` records, written with :func:`eclens.pairs.write_jsonl`.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "CATEGORIES": "eclens.sources.categories",
    "resolve_categories": "eclens.sources.categories",
    "generate_templates": "eclens.sources.templates",
    "generate_templates_with_stats": "eclens.sources.templates",
    "generate_openai": "eclens.sources.openai_gen",
    "import_blimp": "eclens.sources.blimp",
    "import_csv": "eclens.sources.csvimport",
    "codespell_pairs": "eclens.sources.codespell",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'eclens.sources' has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
