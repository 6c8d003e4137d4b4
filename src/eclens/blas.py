"""One thread for numpy's matrix products where torch's thread pool does the heavy work.

numpy's OpenBLAS keeps its worker threads spinning for a while after each product. On a machine with few
cores they hold a core that torch's OpenMP threads then wait for: measured on 2 cores, building a diff run's
tables took 20 s after the bootstrap's products and 10 s with them on one thread (the products themselves,
a few hundred by a few thousand, take milliseconds either way; results are the same).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from typing import Any


@cache
def _controller():
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


_lock = threading.Lock()
_limiter: Any = None  # the limit in force while any context is open
_depth = 0  # the contexts open


@contextmanager
def one_blas_thread() -> Iterator[None]:
    """A context in which numpy's BLAS (and any other BLAS library loaded) runs on one thread. The limit is the
    process's, so contexts opened inside it or beside it on other threads share it: set by the first to open,
    restored by the last to close (each restoring its own start, a worker's close lifted the limit while
    another worker computed). Setting it costs a third of a millisecond and a diff run's tables open hundreds:
    the table build holds one around them all, so that its own, opened first, closes last, on the thread that
    set it (OpenBLAS does not raise its thread count when asked from another thread)."""
    global _depth, _limiter
    with _lock:
        if _depth == 0:
            _limiter = _controller().limit(limits=1, user_api="blas")
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                _limiter.restore_original_limits()
                _limiter = None
