"""``ec generate`` (templates or an OpenAI-compatible LLM) and ``ec pairs import blimp|csv``.

These steps need only the target model's tokenizer (to keep single-token pairs),
never its weights.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from ._common import ModelOpt, console, out
from .pairs import pairs_app

app = typer.Typer()  # its commands are registered on `ec` by eclens.cli

import_app = typer.Typer(help="Import pairs from other formats (BLiMP, CSV) as eclens JSONL.", no_args_is_help=True)
pairs_app.add_typer(import_app, name="import")

CategoriesOpt = typer.Option(None, "--categories", "-c",
                             help="categories to make (repeat or comma-separate; a prefix such as 'grammar' "
                                  "selects all under it); default: all")


def _tokenizer(model: str):
    from ..model import load_tokenizer, tokenizer_prepends_bos

    with console.status(f"loading the tokenizer of {model}"):
        tok = load_tokenizer(model)
    return tok, tokenizer_prepends_bos(tok)


def _print_df(df, title: str, left: tuple[str, ...] = ("category",)) -> None:
    t = Table(title=title)
    for c in df.columns:
        t.add_column(str(c), justify="left" if c in left else "right", overflow="fold", no_wrap=c in left)
    for row in df.itertuples(index=False):
        t.add_row(*[str(v) for v in row])
    out.print(t)


_SHORT = {"different_length": "diff len", "multiple_differences": "multi diff", "identical": "ident",
          "too_long": "too long", "first_token": "first tok", "duplicate": "dup", "malformed": "malformed"}


def _template_view(stats):
    import pandas as pd

    rej = stats[[c for c in stats.columns if c.startswith("rejected_")]].sum(axis=1)
    extra = {}
    if "twins_size_matched" in stats:
        extra["size-matched"] = [f"{m:g}/{t}" if t else "" for m, t in zip(stats["twins_size_matched"].fillna(0),
                                                                             stats["twins"])]
    return pd.DataFrame({
        "category": stats["category"], "pairs": stats["pairs"], "twins": stats["twins"], **extra,
        "draws": stats["draws"], "dup": stats["duplicates"], "implausible": stats["dropped_implausible"],
        "rejected": rej, "templates": stats["templates"], "combos": stats["combinations"],
        "span": stats["span_pairs"], "detect>p": stats["detect_not_p"],
        "swap": [f"{100 * f:.0f}%" if f == f else "" for f in stats["swap_share"]],
        "tokens": [f"{a}-{b}" for a, b in zip(stats["len_min"], stats["len_max"])],
        "change at": [f"{a}/{m:g}/{b}" for a, m, b in zip(stats["pos_min"], stats["pos_median"], stats["pos_max"])],
    })


def _llm_view(df):
    import pandas as pd

    reasons = [c for c in df.columns if c.startswith("rejected_")]

    def why(row) -> str:
        text = ", ".join(f"{_SHORT.get(c[9:], c[9:])} {int(row[c])}" for c in reasons if row[c]) or "none"
        if row["bad_responses"]:
            text += f"; {int(row['bad_responses'])} unparseable response(s)"
        if row["failed_requests"]:
            text += f"; {int(row['failed_requests'])} failed request(s)"
        return text

    view = pd.DataFrame({
        "category": df["category"], "have": df["total"], "new": df["valid"], "asked": df["requested"],
        "returned": df["returned"], "rejected": df[reasons].sum(axis=1), "requests": df["requests"],
        "retries": df["retries"],
        "tokens in/out": [f"{a}/{b}" for a, b in zip(df["prompt_tokens"], df["completion_tokens"])],
    })
    # Reasons as lines under the table: a column of them would be folded unreadably in 80 columns.
    return view, [f"{c}: rejected {why(r)}" for c, (_, r) in zip(df["category"], df.iterrows())]


@app.command("generate")
def generate(
    out_file: Path = typer.Option(..., "--out", "-o", help="JSONL file to write (openai: appended to and resumed)"),
    source: str = typer.Option("templates", "--source", "-s", help="templates (offline) or openai"),
    n: int = typer.Option(200, "--n", help="valid pairs per category"),
    categories: list[str] = CategoriesOpt,
    seed: int = typer.Option(0, "--seed", help="seed (templates: output is a function of it)"),
    model: str = ModelOpt,
    llm_model: str = typer.Option("gpt-4o-mini", "--llm-model", help="openai: the chat model that writes pairs"),
    base_url: str = typer.Option(None, "--base-url", help="openai: any OpenAI-compatible server, e.g. "
                                 "http://localhost:8000/v1 (vLLM), :8080/v1 (llama.cpp), :11434/v1 (Ollama)"),
    pairs_per_request: int = typer.Option(20, "--pairs-per-request", help="openai: pairs asked for per request"),
    max_requests: int = typer.Option(None, "--max-requests",
                                     help="openai: request budget of this run (default 3x the minimum + 2/category)"),
    concurrency: int = typer.Option(4, "--concurrency", help="openai: requests in flight at once"),
    max_retries: int = typer.Option(5, "--max-retries", help="openai: retries of a 429/5xx/connection error"),
    retry_base: float = typer.Option(1.0, "--retry-base", help="openai: first backoff in seconds (doubles)"),
    timeout: float = typer.Option(120.0, "--timeout", help="openai: seconds per request"),
    temperature: float = typer.Option(0.9, "--temperature", help="openai: sampling temperature"),
    structured: str = typer.Option("auto", "--structured", help="openai: auto, json_schema, json_object or off"),
    tokenizers: str = typer.Option(None, "--tokenizers", help="keep only pairs valid under every one of these "
                                   "models' tokenizers too (comma-separated names or folders), so several models "
                                   "can be compared on identical pairs"),
    reference: str = typer.Option("smollm2-135m", "--reference", help="templates: the reference model of the "
                                  "plausibility filter and twin size match ('none': neither)"),
) -> None:
    """Make minimal pairs: offline from templates (default) or with an OpenAI-compatible LLM.

    Every pair is checked under MODEL's tokenizer (a single-token change, not at the first
    token); the API key comes from OPENAI_API_KEY or a .env file and is never written anywhere.
    """
    from ..errors import EclensError

    if source not in ("templates", "openai", "codespell"):
        raise EclensError(f"unknown --source {source!r}: use templates, openai or codespell")
    tok, bos = _tokenizer(model)
    extra = [_tokenizer(name.strip()) for name in (tokenizers or "").split(",") if name.strip() and name != model]
    if source == "templates":
        from ..pairs import write_jsonl
        from ..sources.templates import generate_templates_with_stats

        ref = None if reference.lower() == "none" else reference
        with console.status("making template pairs" + (f" (reference model {ref})" if ref else "")):
            pairs, stats = generate_templates_with_stats(tok, n, seed, categories, bos, reference=ref,
                                                         extra_tokenizers=extra)
        write_jsonl(out_file, pairs)
        _print_df(_template_view(stats), f"{len(pairs)} template pairs (seed {seed}, {model})")
        console.print(f"wrote {len(pairs)} pairs to {out_file}")
        return
    if source == "codespell":
        from ..pairs import write_jsonl
        from ..sources.codespell import codespell_check

        pairs, table = codespell_check(n, seed, [(tok, bos), *extra])
        _print_df(table, f"codespell typos under {model}", left=("typo kind",))
        write_jsonl(out_file, pairs)
        console.print(f"wrote {len(pairs)} pairs to {out_file}")
        return
    if extra:
        raise EclensError("--tokenizers is for --source templates or codespell; for openai, check the file "
                          "under each model with `ec pairs check`")

    from ..model import context_length
    from ..progress import category_bars
    from ..sources.openai_gen import LLMConfig, generate_openai

    cfg = LLMConfig(model=llm_model, base_url=base_url, n_per_category=n, categories=categories,
                    pairs_per_request=pairs_per_request, max_requests=max_requests, concurrency=concurrency,
                    max_retries=max_retries, retry_base_s=retry_base, timeout_s=timeout, temperature=temperature,
                    structured=structured, seed=seed)
    with category_bars(console) as progress:
        rep = generate_openai(out_file, tok, cfg, prepend_bos=bos, max_len=context_length(model), progress=progress)
    if rep.dropped_partial_line:
        console.print(f"[yellow]{out_file}: removed a partial last line left by an interrupted run[/yellow]")
    view, why = _llm_view(rep.by_category())
    _print_df(view, f"{llm_model}: {rep.requests} requests in {rep.seconds:.1f}s")
    for line in why:
        out.print(line, markup=False)
    if not rep.complete:
        short = {c: s.missing for c, s in rep.stats.items() if s.missing}
        raise EclensError(f"request budget ({rep.budget}) spent with categories short: "
                          + ", ".join(f"{c} by {k}" for c, k in short.items())
                          + f"; the {sum(s.have for s in rep.stats.values())} pairs so far are saved in {out_file}: "
                            "rerun to top up, or raise --max-requests")
    console.print(f"{out_file}: {sum(s.have for s in rep.stats.values())} pairs "
                  f"({sum(s.valid for s in rep.stats.values())} new)")


@import_app.command("blimp")
def import_blimp_cmd(
    paths: list[Path] = typer.Argument(..., help="BLiMP paradigm .jsonl files or folders of them"),
    out_file: Path = typer.Option(..., "--out", "-o", help="JSONL file to write"),
    model: str = ModelOpt,
    only_valid: bool = typer.Option(False, "--only-valid", help="write only single-token pairs (default: all; "
                                    "`ec pairs check` reports the rest)"),
    max_per_paradigm: int = typer.Option(None, "--max-per-paradigm", help="at most this many pairs per paradigm"),
    report: Path = typer.Option(None, "--report", help="write the per-paradigm table here (CSV)"),
) -> None:
    """BLiMP → pairs: sentence_good is clean, sentence_bad corrupt, category blimp/<term>/<UID>;
    reports per paradigm how many pairs are a single-token change under MODEL's tokenizer."""
    from ..pairs import REASONS, write_jsonl
    from ..runs import write_table
    from ..sources.blimp import import_blimp

    tok, bos = _tokenizer(model)
    with console.status("reading and checking BLiMP pairs"):
        pairs, rep = import_blimp(paths, tok, prepend_bos=bos, only_valid=only_valid,
                                  max_per_paradigm=max_per_paradigm)
    view = rep[["UID", "total", "valid", *REASONS]].rename(columns=_SHORT)
    view["valid %"] = (100 * rep["valid_frac"]).round(1)
    _print_df(view, f"BLiMP single-token yield under {model}", left=("UID",))
    total, valid = int(rep["total"].sum()), int(rep["valid"].sum())
    out.print(f"{len(rep)} paradigms: {valid} of {total} pairs are single-token changes ({valid / total:.1%})")
    out.print("BLiMP has no twins (no acceptable change of the same word): error pairs only, clustered by paradigm "
              "and the pair of differing words")
    write_jsonl(out_file, pairs)
    console.print(f"wrote {len(pairs)} pairs to {out_file}")
    if report:
        write_table(rep, report)
        console.print(f"wrote the per-paradigm table to {report}")


@import_app.command("csv")
def import_csv_cmd(
    file: Path = typer.Argument(..., help="CSV or TSV file with a header row"),
    out_file: Path = typer.Option(..., "--out", "-o", help="JSONL file to write"),
    clean_col: str = typer.Option("clean", "--clean-col", help="column with the clean sentence"),
    corrupt_col: str = typer.Option("corrupt", "--corrupt-col", help="column with the corrupt sentence"),
    category_col: str = typer.Option(None, "--category-col", help="column with the category (default: 'category' "
                                     "if present)"),
    id_col: str = typer.Option(None, "--id-col", help="column with pair ids (default: 'id' if present, else a hash)"),
    category: str = typer.Option(None, "--category", help="category of rows that have none"),
    source: str = typer.Option("csv", "--source", help="value of the records' source field"),
    delimiter: str = typer.Option(None, "--delimiter", help="field separator (default: tab for .tsv, else comma)"),
    model: str = ModelOpt,
    only_valid: bool = typer.Option(False, "--only-valid", help="write only single-token pairs"),
) -> None:
    """CSV/TSV → pairs, with the columns you name; reports single-token yield per category under MODEL."""
    from ..pairs import write_jsonl
    from ..sources.csvimport import import_csv

    tok, bos = _tokenizer(model)
    pairs, rep = import_csv(file, clean_col=clean_col, corrupt_col=corrupt_col, category_col=category_col,
                            id_col=id_col, category=category, source=source, delimiter=delimiter, tokenizer=tok,
                            prepend_bos=bos, only_valid=only_valid)
    _print_df(rep, f"{file} under {model}")
    write_jsonl(out_file, pairs)
    console.print(f"wrote {len(pairs)} pairs to {out_file}")
