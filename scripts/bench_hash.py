"""Cost per GB of the file digests a run folder could record (issue 21): sha256 and blake2b
(hashlib, OpenSSL) against xxhash's xxh3_128 and xxh64, on an in-memory buffer (the hash alone)
and on a file read back from the page cache (what a reader pays after a write).

    python scripts/bench_hash.py [--mb 512]

Prints seconds per GB for each; the fastest well-kept one is what :mod:`eclens.integrity` uses.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import tempfile
import time


def hashers() -> dict:
    out = {"sha256": hashlib.sha256, "blake2b": hashlib.blake2b}
    try:
        import xxhash

        out["xxh3_128"] = xxhash.xxh3_128
        out["xxh64"] = xxhash.xxh64
    except ImportError:
        pass
    return out


def best_of(fn, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=512, help="buffer size in MiB")
    args = ap.parse_args()
    n = args.mb << 20
    buf = os.urandom(n)
    view = memoryview(buf)
    chunk = 1 << 20
    with tempfile.NamedTemporaryFile(delete=False) as fh:
        fh.write(buf)
        path = fh.name
    try:
        print(f"{'hash':10} {'s/GB memory':>12} {'s/GB file':>10}")
        for name, make in hashers().items():
            def mem(make=make):
                h = make()
                for i in range(0, n, chunk):
                    h.update(view[i:i + chunk])
                return h.hexdigest()

            def file(make=make):
                h = make()
                with open(path, "rb") as f:
                    for b in iter(lambda: f.read(chunk), b""):
                        h.update(b)
                return h.hexdigest()

            gb = n / 1e9
            print(f"{name:10} {best_of(mem) / gb:12.3f} {best_of(file) / gb:10.3f}")
    finally:
        os.unlink(path)


if __name__ == "__main__":
    main()
