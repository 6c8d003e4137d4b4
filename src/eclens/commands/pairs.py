"""``ec pairs check``."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from ._common import ModelOpt, console, out

pairs_app = typer.Typer(help="Check and import minimal pairs.", no_args_is_help=True)  # `ec pairs`, added by eclens.cli


@pairs_app.command("check")
def check(
    file: Path = typer.Argument(..., help="pairs file: .jsonl, .csv/.tsv or the study's .json"),
    model: str = ModelOpt,
    device: str = typer.Option("cpu", "--device", hidden=True, help="unused: the check needs only the tokenizer"),
    out_file: Path = typer.Option(None, "--out", "-o", help="write the aligned valid pairs here (JSONL)"),
    rejected_file: Path = typer.Option(None, "--rejected", help="write the rejected pairs with reasons here"),
    fmt: str = typer.Option(None, "--format", help="jsonl, csv or json (default: by suffix)"),
    show: int = typer.Option(5, "--show", help="how many rejected pairs to print with their tokens"),
    span: bool = typer.Option(False, "--span", help="also accept pairs that differ in one contiguous span of "
                              "tokens of different lengths (natural typos); reports the yield of both modes"),
) -> None:
    """Align every pair under the model's tokenizer; count valid and rejected pairs by category and reason.

    Needs only the tokenizer and the model's context length (from its config), never its weights.
    Exits non-zero, writing nothing, when no pair is valid."""
    from ..pairs import check_pairs, load_pairs, write_jsonl

    pairs = load_pairs(file, fmt=fmt)  # before torch is imported (by ..model): a bad file fails in about a second
    from ..model import context_length, load_tokenizer, tokenizer_prepends_bos

    with console.status(f"loading the tokenizer of {model}"):
        tok = load_tokenizer(model)
        n_ctx = context_length(model)
    from ..designs import design_report

    with console.status(f"checking {len(pairs)} pairs"):
        res = check_pairs(pairs, tok, prepend_bos=tokenizer_prepends_bos(tok), max_len=n_ctx,
                          mode="span" if span else "single")
    print_check(res, show=show)
    if span:
        n_span = sum(a.mode == "span" for a in res.valid)
        out.print(f"span mode: {len(res.valid)} of {res.n_total} valid ({len(res.valid) - n_span} single-token, "
                  f"{n_span} multi-token spans)", markup=False)
    for line in design_report(pairs).lines():
        out.print(line, markup=False)
    if not res.valid:
        raise res.none_valid_error(file)
    if out_file:
        write_jsonl(out_file, res.valid)
        console.print(f"wrote {len(res.valid)} aligned pairs to {out_file}")
    if rejected_file:
        write_jsonl(rejected_file, res.rejected)
        console.print(f"wrote {len(res.rejected)} rejected pairs to {rejected_file}")


def print_check(res, show: int = 5) -> None:
    df = res.by_category()
    t = Table(title=f"{len(res.valid)} valid of {res.n_total} pairs")
    for c in df.columns:
        t.add_column(c, justify="left" if c == "category" else "right")
    for row in df.itertuples(index=False):
        t.add_row(*[str(v) for v in row])
    out.print(t)
    for r in res.rejected[:show]:
        out.print(f"[yellow]{r.label}[/yellow] {r.pair.id} [{r.pair.category}]")
        out.print(f"  clean:   {r.pair.clean!r}", markup=False)
        out.print(f"  corrupt: {r.pair.corrupt!r}", markup=False)
        if r.clean_tokens:
            out.print(f"  tokens:  {r.clean_tokens}", markup=False)
            out.print(f"           {r.corrupt_tokens}", markup=False)
