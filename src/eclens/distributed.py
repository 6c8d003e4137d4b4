"""Runs under ``torchrun``: shard the pairs over ranks, merge the statistics.

``torchrun --nproc-per-node N ec diff ...`` (or ``--nnodes``) starts N processes
with ``RANK``/``WORLD_SIZE``/``MASTER_ADDR`` set. Each rank takes every N-th pair
(:func:`shard`), streams its shard, and the ranks' accumulators are merged with
the same exact algebra as single-process shards (:func:`eclens.diff.merge_results`:
sums add, power sums are re-expressed about a common shift, Chan et al.; the
bottom-k pair samples merge into the smallest keys of the union). Every rank gets
the merged result; only rank 0 writes. Backend: NCCL on CUDA, gloo on the CPU.

The merge gathers each rank's accumulator state (``all_gather_object``) rather than
``all_reduce``-ing raw sums: the pair sample has to be gathered anyway, and a
state is a fixed size (it does not grow with the number of pairs), so the cost is
``world_size`` states, once, at the end.
"""

from __future__ import annotations

import itertools
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .errors import EclensError


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    backend: str | None = None

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init(device: str = "cpu") -> Dist:
    """Join the process group when launched by torchrun (``WORLD_SIZE`` > 1); else a 1-process context."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as dist

    if not dist.is_available():
        raise EclensError("this torch build has no torch.distributed; run without torchrun")
    backend = "nccl" if str(device).startswith("cuda") else "gloo"
    if not dist.is_initialized():
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
    return Dist(dist.get_rank(), dist.get_world_size(), backend)


def local_device(device: str, ctx: Dist) -> str:
    """Under torchrun on CUDA each process drives the GPU of its ``LOCAL_RANK``."""
    if ctx.active and device == "cuda":
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return device


def shard(items: Sequence[Any], ctx: Dist) -> list[Any]:
    """Every ``world_size``-th item starting at ``rank``: balanced lengths across ranks."""
    return list(items)[ctx.rank :: ctx.world_size]


def all_gather(obj: Any, ctx: Dist) -> list[Any]:
    """Each rank's ``obj`` (picklable; tensors moved to the CPU first), in rank order."""
    if not ctx.active:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def all_reduce_sum(t: torch.Tensor, ctx: Dist) -> torch.Tensor:
    if not ctx.active:
        return t
    import torch.distributed as dist

    dev = torch.device(f"cuda:{torch.cuda.current_device()}") if ctx.backend == "nccl" else torch.device("cpu")
    x = t.detach().to(dev).clone()
    dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x.to(t.device)


def barrier(ctx: Dist) -> None:
    """Every rank at the same point before any goes on: a counter on the rendezvous store (:func:`_meet`), not
    a gloo barrier: a rank that fails stops the ranks waiting for it at once, and ranks that reach different
    meetings (one at a barrier, one at the exit: a rank that skipped a barrier) get an error, where gloo
    paired the wrong barriers and hung or failed with "Connection closed by peer"."""
    if not ctx.active:
        return
    if not _meet(ctx, "a barrier"):  # no rendezvous store in the environment (MASTER_ADDR/MASTER_PORT unset)
        import torch.distributed as dist

        dist.barrier()


def merge_diff(result, ctx: Dist):
    """The diff statistics of every rank's shard merged into one :class:`~eclens.diff.DiffResult`."""
    from .diff import DiffResult, merge_results

    if not ctx.active:
        return result
    state = (result.meta, {k: v.detach().cpu() for k, v in result.tensors.items()}, result.model)
    parts = all_gather(state, ctx)
    merged = DiffResult(*parts[0])
    for meta, tensors, model in parts[1:]:
        merged = merge_results(merged, DiffResult(meta, tensors, model))
    merged.timing = dict(result.timing or {}, world_size=ctx.world_size)
    return merged


SYNC_TIMEOUT_S = 1800.0  # the longest a rank waits for the others at a barrier or the exit (torch's collective default)
_SYNCS = itertools.count()  # barriers and exits so far: every rank passes the same ones in the same order
_CLIENTS: dict = {}


def _job() -> str:
    return f"{os.environ.get('TORCHELASTIC_RUN_ID', 'job')}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"


def _meet(ctx: Dist, what: str, failed: bool = False) -> bool:
    """Return once every rank has called this as often (a counter on the rendezvous store, whose requests are
    acknowledged, unlike the last message of a collective); ``what`` names the kind of meeting (a barrier, the
    exit), and a rank that finds another kind there raises: ranks that took different paths fail at once
    rather than hang. ``failed``: this rank will not go on; it releases the ranks waiting at this meeting,
    which then raise instead of going on. False when the environment names no store
    (MASTER_ADDR/MASTER_PORT)."""
    import datetime

    import torch.distributed as dist

    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not addr or not port:
        return False
    job = _job()
    key = (addr, port, job)
    if key not in _CLIENTS:  # one connection per process and job (the store is torchrun's, or rank 0's)
        _CLIENTS[key] = dist.TCPStore(addr, int(port), is_master=False, timeout=datetime.timedelta(seconds=60))
    # One prefix per meeting: a rank that fails marks the meeting it will not reach, not the ones the others
    # passed with it (they may still be waking from the last of those).
    n = next(_SYNCS)
    store = dist.PrefixStore(f"eclens/{job}/sync{n}/", _CLIENTS[key])

    def fail(msg: str) -> None:
        store.set("failed", msg)  # before the release: a woken rank finds it
        store.set("all", "1")

    if failed:
        fail(f"rank {ctx.rank} of {ctx.world_size} failed; see its error above")
        return True
    seen = store.compare_set("what", "", what).decode()  # every rank must be at the same kind of meeting
    if seen != what:
        msg = (f"rank {ctx.rank} reached {what} at meeting {n}, where another rank reached {seen}: the ranks "
               "took different paths (an eclens bug; please report it)")
        fail(msg)
        raise EclensError(msg)
    if store.add("arrived", 1) >= ctx.world_size:
        store.set("all", "1")  # the last to arrive releases the others
    else:
        store.wait(["all"], datetime.timedelta(seconds=SYNC_TIMEOUT_S))
    if store.check(["failed"]):
        raise EclensError(store.get("failed").decode())
    return True


def shutdown(ctx: Dist) -> None:
    """Leave the process group; meant for a ``finally:``. A rank that finished its work first waits (on
    the rendezvous store, :func:`_meet`) until every rank is here, so that no rank closes its sockets while
    a peer is still inside a collective with it (gloo then fails that peer, pytorch/gloo#155), and a rank
    that skipped a barrier gets an error here rather than hanging its peers. A rank leaving on an exception
    releases the waiting ranks and does not wait."""
    if not ctx.active:
        return
    import torch.distributed as dist

    if not dist.is_initialized():
        return
    try:
        _meet(ctx, "the exit", failed=sys.exc_info()[0] is not None)
    except (dist.DistError, EclensError):  # the store's host (rank 0 outside torchrun) is gone, the wait timed
        pass  # out, or another rank failed: this rank is leaving anyway, and nothing is left to protect
    finally:
        _CLIENTS.clear()
    dist.destroy_process_group()
