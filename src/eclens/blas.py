"""One thread for numpy's matrix products where torch's thread pool does the heavy work.

numpy's OpenBLAS keeps its worker threads spinning for a while after each product. On a machine with few
cores they hold a core that torch's OpenMP threads then wait for: measured on 2 cores, building a diff run's
tables took 20 s after the bootstrap's products and 10 s with them on one thread (the products themselves,
a few hundred by a few thousand, take milliseconds either way; results are the same).
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from functools import cache


@cache
def _controller():
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


def one_blas_thread() -> AbstractContextManager:
    """A context in which numpy's BLAS (and any other BLAS library loaded) runs on one thread."""
    return _controller().limit(limits=1, user_api="blas")
