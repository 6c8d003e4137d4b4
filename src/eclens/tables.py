"""Result tables on disk: the file that holds each table, the precision it is stored at, reading it back.

A run's results are what the report, the web UI and the later steps read; they are written once, as
Parquet, except the small tables a person opens by hand (``pairs.csv``, ``sensitivity.csv``, the patch
tables). Parquet files are zstd-compressed with the floating columns byte-stream-split (their bytes
grouped by significance, which zstd compresses about 10 % better); both are lossless.

Declared precision (issue 20). The numbers each table carries are averages over at most a few thousand
pairs and quantiles of a float16 sample, so their sampling error is percents; they are stored at:

- ``dims.parquet``: float16 (round to nearest: relative error at most 2^-11 ≈ 4.9e-4, absolute at most
  2^-25 below float16's normal range, 6.1e-5) except ``sigma_clean``, ``absz_median`` and ``absz_q90``,
  float32 (relative 2^-24): the matched controls rank dimensions by these, and float16 would tie many
  of them. A column with a value beyond float16's range (65,504) is stored as float32. ``z_mean``
  (= ``mean_delta / sigma_clean``), ``absz_mean`` (= ``mean_abs_delta / sigma_clean``) and
  ``sign_consistency`` (= max(``frac_pos``, ``frac_neg``)) are not stored: :func:`read_table_file`
  derives them (error: the float16 one of their inputs, plus 2^-25 / σ for a value below float16's
  normal range).
- ``candidates.parquet``: float32 (relative 2^-24).
- every other table: as computed (float64).

:data:`PRECISION` says the same for code and tests; reading gives float16 columns back as float32 (exact).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd

from .errors import EclensError

F16_RTOL = 2.0 ** -11   # round to nearest, 10 stored mantissa bits
F16_ATOL = 2.0 ** -25   # half the spacing of float16's subnormals
F32_RTOL = 2.0 ** -24
F16_MAX = 65504.0

# table file -> {"float16": columns, "float32": columns ("*": every float column), "derived": columns}
PRECISION: dict[str, dict[str, tuple[str, ...]]] = {
    "dims.parquet": {
        "float16": ("mean_delta", "std_delta", "mean_abs_delta", "mean_clean", "rms_clean", "rms_ratio",
                    "frac_pos", "frac_neg", "absz_q10", "absz_q25", "absz_q75", "frac_under"),
        "float32": ("sigma_clean", "absz_median", "absz_q90"),
        "derived": ("z_mean", "absz_mean", "sign_consistency"),
    },
    "candidates.parquet": {"float32": ("*",)},
}

# Derived columns of dims.parquet: name -> (the stored columns it is computed from).
DERIVED: dict[str, tuple[str, ...]] = {
    "z_mean": ("mean_delta", "sigma_clean"),
    "absz_mean": ("mean_abs_delta", "sigma_clean"),
    "sign_consistency": ("frac_pos", "frac_neg"),
}

# Tables that moved from CSV to Parquet (issue 20): a reader asked for either name finds either file, so
# run folders written before and after read the same.
TABLE_FILES = {"layers": "layers.parquet", "candidates": "candidates.parquet", "dims": "dims.parquet",
               "contrasts": "contrasts.parquet"}


def table_file(run: str | os.PathLike, name: str) -> Path | None:
    """The file of table ``name`` (``candidates``, ``candidates.parquet`` or ``candidates.csv``) in ``run``:
    the Parquet or the CSV one, whichever exists (Parquet first); None if neither."""
    run = Path(run)
    stem = name.split(".", 1)[0]
    names = [name] if "." in name else []
    names += [f"{stem}.parquet", f"{stem}.csv"]
    for n in dict.fromkeys(names):
        if (run / n).is_file():
            return run / n
    return None


def _derive(df: pd.DataFrame, name: str) -> pd.Series:
    if name == "sign_consistency":
        return np.maximum(df["frac_pos"].astype("float64"), df["frac_neg"].astype("float64"))
    num = df[DERIVED[name][0]].astype("float64")
    sig = df["sigma_clean"].astype("float64")
    with np.errstate(all="ignore"):  # σ = 0: no spread, no z (NaN, as the diff gives it)
        return (num / sig).where(sig > 0)


def fits_float16(v: np.ndarray) -> bool:
    """Whether every finite value of ``v`` is within float16's range (beyond it, it would become inf)."""
    fin = v[np.isfinite(v)]
    return not fin.size or bool(np.abs(fin).max() <= F16_MAX)


def as_float16(v: np.ndarray) -> np.ndarray:
    """A float16-declared column at float16, or at float32 when a finite value is beyond float16's range."""
    return v.astype(np.float16 if fits_float16(v) else np.float32)


def repeated_strings(values: list[str], lengths: list[int]):
    """An Arrow ``large_string`` array of ``values[i]`` repeated ``lengths[i]`` times, made from its two buffers
    (the UTF-8 bytes and the offsets, built by numpy and ``bytes`` repetition). An object array of millions of
    Python strings took ~0.8 s per column to convert; a dictionary array cast by Arrow, 0.3-3 ms per block of
    ``dims.parquet`` (up to a second of ``ec diff``'s finishing)."""
    import pyarrow as pa

    enc = [v.encode("utf-8") for v in values]
    reps = np.asarray(lengths, dtype=np.int64).reshape(-1)
    n = int(reps.sum())
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.repeat(np.array([len(e) for e in enc], dtype=np.int64), reps), out=offsets[1:])
    data = b"".join(e * int(k) for e, k in zip(enc, reps))
    return pa.LargeStringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(data))


def narrow(df: pd.DataFrame, file: str) -> pd.DataFrame:
    """``df`` at the precision :data:`PRECISION` declares for ``file`` (derived columns dropped)."""
    spec = PRECISION.get(Path(file).name)
    if not spec:
        return df
    out = df.drop(columns=[c for c in spec.get("derived", ()) if c in df.columns])
    floats = [c for c in out.columns if pd.api.types.is_float_dtype(out[c])]
    f32 = floats if "*" in spec.get("float32", ()) else [c for c in spec.get("float32", ()) if c in floats]
    for c in floats:
        if c in spec.get("float16", ()):
            out[c] = as_float16(out[c].to_numpy())
        elif c in f32:
            out[c] = out[c].astype(np.float32)
    return out


def stored_block(block: dict, file: str) -> dict:
    """One block of columns (as :func:`stored_table` takes them) at what ``file`` stores: derived columns left
    out, float32 columns cast now (float64 to float32 rounds as :func:`narrow` does). float16 columns stay
    float64: whether a column fits float16 is known only once every block of it is."""
    spec = PRECISION.get(Path(file).name) or {}
    f32 = spec.get("float32", ())
    out = {}
    for k, v in block.items():
        if k in spec.get("derived", ()):
            continue
        if isinstance(v, np.ndarray) and v.dtype.kind == "f" and ("*" in f32 or k in f32):
            v = v.astype(np.float32)
        out[k] = v
    return out


class HalfColumn(NamedTuple):
    """One block of a float16-declared column (:func:`stored_chunk`): the values and, when they all fit float16,
    their float16 copy (None otherwise)."""

    values: np.ndarray
    half: np.ndarray | None


def stored_chunk(block: dict, file: str) -> dict:
    """One :func:`stored_block` block of ``file`` as Arrow arrays (scalars repeated over the block's rows), made
    where the block is (a worker thread): :func:`join_chunks` then joins the blocks without copying them. A
    float16-declared float column is a :class:`HalfColumn`: whether the column fits float16 is known only once
    every block of it is."""
    import pyarrow as pa

    spec = PRECISION.get(Path(file).name) or {}
    n = next(len(v) for v in block.values() if isinstance(v, np.ndarray))
    out = {}
    for k, v in block.items():
        if isinstance(v, str):
            out[k] = repeated_strings([v], [n])
        elif not isinstance(v, np.ndarray):
            out[k] = pa.array(np.full(n, v))
        elif k in spec.get("float16", ()) and v.dtype.kind == "f":
            out[k] = HalfColumn(v, v.astype(np.float16) if fits_float16(v) else None)
        else:
            out[k] = pa.array(v)
    return out


def join_chunks(chunks: list[dict]):
    """The Arrow table of :func:`stored_chunk` blocks, in order: a float16-declared column at float16 where every
    block fits it, at float32 in every block otherwise (:func:`as_float16` of the whole column)."""
    import pyarrow as pa

    cols = {}
    for k in chunks[0]:
        parts = [c[k] for c in chunks]
        if isinstance(parts[0], HalfColumn):
            fits = all(p.half is not None for p in parts)
            parts = [pa.array(p.half if fits else p.values.astype(np.float32)) for p in parts]
        cols[k] = pa.chunked_array(parts)
    return pa.table(cols)


def stored_table(blocks: list[dict], file: str):
    """The Arrow table ``file`` holds for blocks of columns (arrays of one length per block, or scalars
    repeated over it; :func:`stored_block`): the numbers and types of ``narrow(frame)`` converted by Arrow, made
    block by block (:func:`stored_chunk`) without a float64 frame of the whole table (for ``dims.parquet``,
    300 MB at 225 pairs of SmolLM2-135M, built, consolidated and converted, was a tenth of ``ec diff``'s
    finishing time)."""
    return join_chunks([stored_chunk(b, file) for b in blocks])


def write_parquet(df, path: str | os.PathLike) -> None:
    """Parquet with zstd, floating columns byte-stream-split (lossless), the rest dictionary-encoded. ``df``: a
    DataFrame or an Arrow table."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    t = df if isinstance(df, pa.Table) else pa.Table.from_pandas(df, preserve_index=False)
    floats = [f.name for f in t.schema if pa.types.is_floating(f.type)]
    other = [f.name for f in t.schema if f.name not in floats]
    pq.write_table(t, str(path), compression="zstd", use_byte_stream_split=floats or False,
                   use_dictionary=other or False)


def read_table_file(path: str | os.PathLike, columns: Sequence[str] | None = None,
                    filters: list | None = None) -> pd.DataFrame:
    """A table file as a DataFrame: Parquet (only ``columns``, rows passing ``filters``) or CSV; float16
    columns come back as float32 and the derived columns of :data:`DERIVED` are added (when their inputs
    are there and they are not), so a reader sees every column whatever precision the file holds."""
    path = Path(path)
    if path.suffix != ".parquet":
        df = pd.read_csv(path, keep_default_na=False, na_values=[""])
        return df[list(columns)] if columns is not None else df
    import pyarrow.parquet as pq

    names = set(pq.read_schema(path).names)
    want = list(columns) if columns is not None else None
    read = None
    if want is not None:
        read = [c for c in want if c in names]
        for c in want:
            if c not in names and c in DERIVED:
                read += [s for s in DERIVED[c] if s in names and s not in read]
    df = pq.read_table(path, columns=read, filters=filters or None).to_pandas()
    for c in df.columns:
        if df[c].dtype == np.float16:
            df[c] = df[c].astype(np.float32)
    for c, src in DERIVED.items():
        if c not in df.columns and all(s in df.columns for s in src) and (want is None or c in want):
            df[c] = _derive(df, c)
    if want is not None:
        missing = [c for c in want if c not in df.columns]
        if missing:
            raise EclensError(f"{path}: no column {', '.join(missing)}; rerun the step that wrote it")
        df = df[want]
    return df


__all__ = ["DERIVED", "PRECISION", "TABLE_FILES", "HalfColumn", "as_float16", "join_chunks", "narrow", "read_table_file",
           "repeated_strings", "stored_block", "stored_chunk", "stored_table", "table_file", "write_parquet"]
