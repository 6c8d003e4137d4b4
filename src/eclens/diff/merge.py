"""Merging the statistics of disjoint shards into one :class:`DiffResult`."""

from __future__ import annotations

from ..errors import EclensError
from .accumulate import merge_states
from .result import DiffResult


def merge_results(a: DiffResult, b: DiffResult) -> DiffResult:
    """The statistics of the union of two runs on disjoint pairs (shards, processes, machines).

    Sums add; power sums with different shifts are merged through their moments
    (Chan et al.) and re-expressed about the merged mean; the two samples merge into
    the ``sample_size`` pairs with the smallest keys, exactly as one run would have kept.
    """
    if a.config.numbers_key() != b.config.numbers_key():
        raise EclensError("cannot merge diff results made with different settings")
    if set(a.meta["done"]) & set(b.meta["done"]):
        raise EclensError("cannot merge diff results that share pairs")
    if (a.model.get("weights_hash"), a.model.get("name")) != (b.model.get("weights_hash"), b.model.get("name")):
        raise EclensError("cannot merge diff results of different models")
    if a.aliases != b.aliases:  # one made before aliases, or with other hooks' layers: other arrays
        raise EclensError("cannot merge diff results whose states hold different layers (made by different "
                          "eclens versions?); rerun one of them")
    out, order = merge_states(a.tensors, b.tensors, [a.stored_group(h) for h in a.hooks], a.config.sample_size)
    ids = a.meta["sample_ids"] + b.meta["sample_ids"]
    meta = dict(a.meta)
    meta.update(done=sorted(set(a.meta["done"]) | set(b.meta["done"])), sample_ids=[ids[i] for i in order.tolist()],
                rows=a.meta["rows"] + b.meta["rows"], complete=bool(a.meta.get("complete") and b.meta.get("complete")))
    inside = set(i for i in meta["sample_ids"] if i is not None)
    meta["rows"] = [{**r, "in_sample": r["id"] in inside} for r in meta["rows"]]
    return DiffResult(meta, out, a.model, {})
