"""Single-token yield of every BLiMP paradigm under a model's tokenizer.

Prints one row per paradigm (total, valid, rejected by reason) and the totals.

    .venv/bin/python scripts/blimp_yield.py [--blimp ../shared/data/blimp] [--model smollm2-135m] [--csv out.csv]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

DEFAULT_BLIMP = Path(__file__).resolve().parents[2] / "shared" / "data" / "blimp"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blimp", type=Path, default=DEFAULT_BLIMP, help="BLiMP folder or files")
    ap.add_argument("--model", default="smollm2-135m", help="whose tokenizer to use")
    ap.add_argument("--csv", type=Path, default=None, help="also write the table here")
    ap.add_argument("--markdown", action="store_true", help="print a Markdown table")
    args = ap.parse_args(argv)

    from eclens.errors import EclensError
    from eclens.model import load_tokenizer, tokenizer_prepends_bos
    from eclens.pairs import REASONS
    from eclens.runs import write_table
    from eclens.sources.blimp import import_blimp

    try:
        tok = load_tokenizer(args.model)
        t0 = time.perf_counter()
        _, rep = import_blimp(args.blimp, tok, prepend_bos=tokenizer_prepends_bos(tok))
    except EclensError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    secs = time.perf_counter() - t0
    cols = ["UID", "linguistics_term", "one_prefix", "total", "valid", *REASONS, "valid_frac"]
    tab = rep[cols]
    total = tab[["total", "valid", *REASONS]].sum()
    if args.markdown:
        print("| " + " | ".join(cols) + " |")
        print("|" + "---|" * len(cols))
        for row in tab.itertuples(index=False):
            print("| " + " | ".join(str(v) for v in row) + " |")
    else:
        import pandas as pd

        with pd.option_context("display.max_rows", None, "display.width", 200):
            print(tab.to_string(index=False))
    print(f"\n{len(tab)} paradigms, {int(total['total'])} pairs, {int(total['valid'])} valid "
          f"({total['valid'] / total['total']:.1%}) under {args.model}; "
          + ", ".join(f"{r} {int(total[r])}" for r in REASONS) + f"; {secs:.1f}s")
    print(f"paradigms with >= 100 valid pairs: {(tab['valid'] >= 100).sum()}; with none: {(tab['valid'] == 0).sum()}")
    if args.csv:
        write_table(tab, args.csv)
        print(f"wrote {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
