"""Yield tables for issue 16's closing note: template pairs (`ec generate --source templates`) and codespell's
natural typos (`ec generate --source codespell`), aligned under a tokenizer in single-token and span mode.

    python experiments/span16/yield_tables.py TEMPLATES.jsonl CODESPELL.jsonl [--model smollm2-135m] [--examples 5]

Prints Markdown tables: per category (error pairs, twins, combinations, swap share, detect != p, single-token
and span yield), error pairs per combination, per typo kind (template typos and codespell), and example
twins per category drawn at random (seed 0).
"""

from __future__ import annotations

import argparse
import random
from collections import Counter, defaultdict

from eclens.designs import is_error
from eclens.model import load_tokenizer, tokenizer_prepends_bos
from eclens.pairs import AlignedPair, align, load_pairs


def md(rows: list[dict]) -> str:
    cols = list(rows[0])
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(out)


def pct(a: int, b: int) -> str:
    return f"{a} ({100 * a / b:.0f} %)" if b else "0"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("templates")
    ap.add_argument("codespell")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--examples", type=int, default=5)
    args = ap.parse_args()
    tok = load_tokenizer(args.model)
    bos = tokenizer_prepends_bos(tok)

    def modes(p):
        s = align(p, tok, prepend_bos=bos)
        sp = align(p, tok, prepend_bos=bos, mode="span")
        return isinstance(s, AlignedPair), isinstance(sp, AlignedPair), isinstance(sp, AlignedPair) and sp.is_span

    pairs = load_pairs(args.templates)
    twins_of = defaultdict(list)
    for p in pairs:
        if p.role == "twin" and p.twin_of:
            twins_of[p.twin_of].append(p)
    rows, combo_rows = [], []
    for cat in sorted({p.category for p in pairs}, key=lambda c: (c.startswith("meaning"), c)):
        ps = [p for p in pairs if p.category == cat]
        err = [p for p in ps if is_error(p)]
        changed = [p for p in ps if p.role not in ("twin",)]  # errors, acceptable 2x2 cells, comparison pairs
        twins = [p for p in ps if p.role == "twin"]
        with_twin = sum(bool(twins_of[p.id]) for p in err)
        dirs = Counter(p.swap_direction for p in err if p.swap_direction)
        combos = Counter((p.meta.get("clean_word"), p.meta.get("corrupt_word"), p.meta.get("head")) for p in changed)
        m = [modes(p) for p in ps]
        first = sorted(dirs)[0] if dirs else None
        rows.append({"category": cat, "error pairs": len(err), "with twin": with_twin, "twins": len(twins),
                     "other pairs": len(ps) - len(err) - len(twins), "combinations": len(combos),
                     "swap share": f"{first} {100 * dirs[first] / sum(dirs.values()):.0f} %" if dirs else "-",
                     "detect != p": sum(p.detect is not None for p in ps),
                     "single-token valid": pct(sum(s for s, _, _ in m), len(ps)),
                     "span-mode valid": pct(sum(v for _, v, _ in m), len(ps)),
                     "multi-token spans": sum(x for _, _, x in m)})
        per = Counter(combos.values())
        combo_rows.append({"category": cat, "combinations": len(combos),
                           "pairs per combination (count: combinations)":
                               ", ".join(f"{k}: {v}" for k, v in sorted(per.items()))})
    print("## Template pairs per category\n")
    print(md(rows))
    print("\n## Pairs (errors and other changed sentences) per combination (clean word, changed word, head)\n")
    print(md(combo_rows))

    def kinds(ps, label):
        out = []
        for kind in sorted({p.typo_kind for p in ps}):
            ks = [p for p in ps if p.typo_kind == kind]
            m = [modes(p) for p in ks]
            out.append({"source": label, "typo kind": kind, "errors": len(ks),
                        "single-token valid": pct(sum(s for s, _, _ in m), len(ks)),
                        "span-mode valid": pct(sum(v for _, v, _ in m), len(ks)),
                        "multi-token spans": sum(x for _, _, x in m),
                        "with twin": sum(bool(twins_of[p.id]) for p in ks)})
        return out

    typos = [p for p in pairs if p.category == "typo" and is_error(p)]
    cs = load_pairs(args.codespell)
    for p in cs:
        if p.role == "twin" and p.twin_of:
            twins_of[p.twin_of].append(p)
    cs_err = [p for p in cs if is_error(p)]
    print("\n## Typo kinds: template typos and codespell's natural typos\n")
    print(md(kinds(typos, "templates") + kinds(cs_err, "codespell")))
    cs_tw = [p for p in cs if p.role == "twin"]
    m = [modes(p) for p in cs_tw]
    print(f"\ncodespell twins: {len(cs_tw)} ({Counter(p.twin_kind for p in cs_tw)}), single-token valid "
          f"{sum(s for s, _, _ in m)}, span-mode valid {sum(v for _, v, _ in m)}")
    print("\n## Example twins (error pair and its twin), five per category, drawn at random (seed 0)\n")
    rng = random.Random(0)
    for cat in sorted({p.category for p in pairs if p.role == "twin"}) + ["typo/codespell"]:
        err = [p for p in (cs if cat == "typo/codespell" else pairs)
               if p.category == cat and is_error(p) and twins_of[p.id]]
        print(f"\n**{cat}**\n")
        print(md([{"clean": e.clean, "error": e.corrupt, "twin": t.corrupt, "twin kind": t.twin_kind,
                   "detect word": e.detect if e.detect is not None else "p",
                   "kind / direction": e.typo_kind or e.swap_direction or "-"}
                  for e in rng.sample(err, min(args.examples, len(err))) for t in twins_of[e.id][:1]]))


if __name__ == "__main__":
    main()
