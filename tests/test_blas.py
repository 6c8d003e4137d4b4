"""The one-BLAS-thread limit (eclens.blas): process-wide, so nested and concurrent contexts share it."""

from __future__ import annotations

import threading

import numpy as np  # noqa: F401  (loads numpy's BLAS, the library the limit is for)
from threadpoolctl import threadpool_info

from eclens.blas import one_blas_thread


def _blas_threads() -> list[int]:
    return [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]


def test_the_limit_holds_until_the_last_context_closes_and_is_then_restored():
    before = _blas_threads()
    assert before, "numpy's BLAS not found by threadpoolctl"
    seen: list[list[int]] = []

    def worker() -> None:  # as a table build's workers: a context of its own inside the caller's
        with one_blas_thread():
            seen.append(_blas_threads())
        seen.append(_blas_threads())

    with one_blas_thread():
        assert set(_blas_threads()) == {1}
        with one_blas_thread():  # nested: the same limit
            assert set(_blas_threads()) == {1}
        assert set(_blas_threads()) == {1}  # the inner one closing does not lift it
        t = threading.Thread(target=worker)
        t.start()
        t.join(10)
        assert [set(x) for x in seen] == [{1}, {1}]  # nor the worker's, on its thread
    assert _blas_threads() == before


def test_a_context_closing_does_not_lift_the_limit_while_another_thread_holds_one():
    before = _blas_threads()
    opened, release, seen = threading.Event(), threading.Event(), []

    def worker() -> None:
        with one_blas_thread():
            opened.set()
            release.wait(10)
            seen.append(_blas_threads())

    try:
        with one_blas_thread():
            t = threading.Thread(target=worker)
            t.start()
            assert opened.wait(10)
        release.set()  # this thread's context closed first, the worker's is still open
        t.join(10)
        assert [set(x) for x in seen] == [{1}]
    finally:
        from threadpoolctl import threadpool_limits

        threadpool_limits(limits=max(before), user_api="blas")  # (a limit lifted on another thread may not rise)
