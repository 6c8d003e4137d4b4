"""Reading a language model's answer: the pair items in it, however leniently it kept to the schema."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

# Alternative field names models use when they ignore the schema.
_CLEAN_KEYS = ("clean", "sentence_good", "good", "correct", "original", "sentence1", "grammatical")
_CORRUPT_KEYS = ("corrupt", "sentence_bad", "bad", "incorrect", "modified", "sentence2", "ungrammatical",
                 "corrupted")

_FENCE = re.compile(r"```(?:json|JSON)?\s*(.*?)```", re.S)
_FLAT_OBJECT = re.compile(r"\{[^{}]*\}", re.S)


def parse_pairs(content: str | None) -> list[Any]:
    """The list of pair items in a model's answer, as leniently as sensible.

    Accepts ``{"pairs": [...]}``, a bare list, any object whose first list value holds
    the pairs, JSON in a code fence or after chatter, and, when the JSON is broken
    (e.g. cut off by a token limit), every complete flat ``{...}`` object in the text.
    """
    if not content or not content.strip():
        return []
    text = content.strip()
    m = _FENCE.search(text)
    if m:
        text = m.group(1).strip()
    doc: Any = None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError:
        dec = json.JSONDecoder()
        for i, ch in enumerate(text):
            if ch in "[{":
                try:
                    doc = dec.raw_decode(text[i:])[0]
                    break
                except json.JSONDecodeError:
                    continue
    if isinstance(doc, dict):
        if isinstance(doc.get("pairs"), list):
            return doc["pairs"]
        lists = [v for v in doc.values() if isinstance(v, list)]
        if lists:
            return lists[0]
        if _pick(doc, _CLEAN_KEYS) is not None:
            return [doc]
    if isinstance(doc, list):
        return doc
    out = []
    for m in _FLAT_OBJECT.finditer(text):
        try:
            out.append(json.loads(m.group(0)))
        except json.JSONDecodeError:
            continue
    return [o for o in out if isinstance(o, dict) and _pick(o, _CLEAN_KEYS) is not None]


def _pick(d: dict, keys: Sequence[str]) -> Any:
    for k in keys:
        if k in d:
            return d[k]
    return None


def item_sentences(item: Any) -> tuple[str, str, dict[str, str]] | None:
    """``(clean, corrupt, words)`` of one returned item, or ``None`` when it is not a usable pair."""
    if not isinstance(item, dict):
        return None
    clean, corrupt = _pick(item, _CLEAN_KEYS), _pick(item, _CORRUPT_KEYS)
    if not isinstance(clean, str) or not isinstance(corrupt, str):
        return None
    words = {k: item[k].strip() for k in ("clean_word", "corrupt_word", "twin", "twin_word", "twin_kind",
                                         "detect_word") if isinstance(item.get(k), str) and item[k].strip()}
    return clean.strip(), corrupt.strip(), words
