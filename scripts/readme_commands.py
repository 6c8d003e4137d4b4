"""The shell commands a README shows, and what one README has that the other lacks.

README.ja.md translates README.md but must show the same commands, so that a reader of either runs the
same thing. A command is (1) a logical line of a ```bash / ```sh / ```console block (a leading `$ `
prompt removed, backslash-continued lines joined, a trailing `# comment` removed, since comments may be
translated) or (2) an inline code span that starts with `ec `, `bash `, `.venv/bin/`, `python `,
`pytest ` or `torchrun `. The lines of ```python / ```json blocks (comments dropped) are compared the
same way, separately. Each item keeps the file line and the section heading it came from, so a
mismatch says exactly where to copy it from.

    python scripts/readme_commands.py [README.md README.ja.md]   # exit 1 and a list when they differ
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SHELL_LANGS = frozenset({"bash", "sh", "shell", "console"})
CODE_LANGS = frozenset({"python", "py", "json", "jsonl"})   # compared line by line, comments dropped
INLINE_PREFIXES = ("ec ", "bash ", ".venv/bin/", "python ", "pytest ", "torchrun ")
_FENCE = re.compile(r"^\s*(`{3,}|~{3,})\s*([\w+-]*)")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_SPAN = re.compile(r"(`+)(.+?)(?<!`)\1(?!`)", re.S)


@dataclass(frozen=True)
class Command:
    text: str     # whitespace-normalised command
    line: int     # 1-based line in the file where it starts
    heading: str  # the nearest section heading above it ("" before the first)
    section: int  # that heading's ordinal among the file's headings (1-based; 0 before the first)


def _strip_comment(line: str) -> str:
    """Drop a shell `# comment` that begins the line or follows whitespace, outside quotes."""
    quote = ""
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = ""
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def _norm(text: str) -> str:
    return " ".join(text.split())


def extract_commands(markdown: str, langs: frozenset[str] | set[str] = SHELL_LANGS,
                     inline: tuple[str, ...] = INLINE_PREFIXES) -> list[Command]:
    """Every command of a README, in file order (duplicates kept; compare them as sets): the logical
    lines of code blocks in ``langs`` and the inline code spans that start with one of ``inline``."""
    return _scan(markdown, langs, inline)[0]


def headings(markdown: str) -> list[str]:
    """The file's headings outside code blocks, in order (``Command.section`` indexes this, from 1)."""
    return _scan(markdown, frozenset(), ())[1]


def _scan(markdown: str, langs: frozenset[str] | set[str],
          inline: tuple[str, ...]) -> tuple[list[Command], list[str]]:
    out: list[Command] = []
    heads: list[str] = []
    lines = markdown.splitlines()
    heading = ""
    fence = ""          # the open fence's marker, "" outside a code block
    shell = False       # the open block's language is one of ``langs``
    console = False     # ... a console block: only `$ ` lines are commands, the rest is output
    pending: list[str] = []   # backslash-continued pieces of one shell command
    pending_line = 0
    block_start = 0     # index in ``out`` of the open block's first command
    para: list[tuple[int, str]] = []   # the current prose paragraph, for spans that wrap lines

    def flush_para() -> None:
        if not para:
            return
        text = "\n".join(t for _, t in para)
        starts = [0]
        for _, t in para:
            starts.append(starts[-1] + len(t) + 1)
        for m in _SPAN.finditer(text):
            code = _norm(m.group(2))
            if inline and code.startswith(inline):
                k = max(i for i, s in enumerate(starts[:-1]) if s <= m.start())
                out.append(Command(code, para[k][0], heading, len(heads)))
        para.clear()

    for n, raw in enumerate(lines, 1):
        f = _FENCE.match(raw)
        if fence:
            if f and f.group(1)[0] == fence[0] and len(f.group(1)) >= len(fence) and not f.group(2):
                if pending:   # a block that ends on a backslash still yields its command
                    out.append(Command(_norm(" ".join(pending)), pending_line, heading, len(heads)))
                    pending = []
                fence, shell, console = "", False, False
                continue
            if not shell:
                continue
            line = raw.strip()
            if not pending:
                if line.startswith("$ "):
                    line = line[2:]
                elif line == "$" or console:
                    line = ""
                pending_line = n
            line = _strip_comment(line).rstrip()
            if not pending and block_start < len(out) and raw[:1].isspace() and line.startswith("["):
                # an indented `[--flag ...]` line continues the synopsis above it (no backslash)
                last = out[-1]
                out[-1] = Command(_norm(f"{last.text} {line}"), last.line, last.heading, last.section)
                continue
            cont = line.endswith("\\")
            if cont:
                line = line[:-1].rstrip()
            if line:
                pending.append(line)
            if not cont and pending:
                out.append(Command(_norm(" ".join(pending)), pending_line, heading, len(heads)))
                pending = []
            continue
        if f:
            flush_para()
            lang = f.group(2).lower()
            block_start = len(out)
            fence, shell, console = f.group(1), lang in langs, lang == "console"
            continue
        h = _HEADING.match(raw)
        if h:
            flush_para()
            heading = f"{h.group(1)} {h.group(2)}"
            heads.append(heading)
            para.append((n, h.group(2)))   # a heading's own code spans count too
            flush_para()
            continue
        if not raw.strip():
            flush_para()
            continue
        para.append((n, raw))
    flush_para()
    return out, heads


def missing(a: list[Command], b: list[Command]) -> list[Command]:
    """Commands of ``a`` whose text appears nowhere in ``b`` (first occurrence of each)."""
    have = {c.text for c in b}
    seen: set[str] = set()
    res = []
    for c in a:
        if c.text not in have and c.text not in seen:
            seen.add(c.text)
            res.append(c)
    return res


def sync_report(a_name: str, a_text: str, b_name: str, b_text: str, *, what: str = "command",
                **kw: Any) -> str:
    """'' when both files show the same set of commands; else a list of what each lacks: where it is
    (file, line, section heading) and, when both files have the same number of headings (the same
    section structure), the heading of the other file's matching section, where it goes. ``kw`` goes to
    :func:`extract_commands` (e.g. ``langs={"python"}, inline=()`` compares code lines)."""
    a, b = extract_commands(a_text, **kw), extract_commands(b_text, **kw)
    ha, hb = headings(a_text), headings(b_text)
    parts = []
    for src_name, src, dst_name, dst, dst_heads in ((a_name, a, b_name, b, hb), (b_name, b, a_name, a, ha)):
        gone = missing(src, dst)
        if gone:
            parts.append(f"{len(gone)} {what}(s) in {src_name} missing from {dst_name}:")
        for c in gone:
            where = f"  {src_name}:{c.line} in section {c.section} '{c.heading or '(top)'}'"
            if len(ha) == len(hb):
                where += f" -> {dst_name} '{dst_heads[c.section - 1] if c.section else '(top)'}'"
            parts.append(f"{where}: {c.text}")
    return "\n".join(parts)


def section_report(a_name: str, a_text: str, b_name: str, b_text: str) -> str:
    """'' when both files have as many headings; else the two heading lists side by side."""
    ha, hb = headings(a_text), headings(b_text)
    if len(ha) == len(hb):
        return ""
    rows = [f"  {i + 1:>2}. {x:<60} | {y}" for i, (x, y) in
            enumerate(zip(ha + [""] * (len(hb) - len(ha)), hb + [""] * (len(ha) - len(hb))))]
    return "\n".join([f"{a_name} has {len(ha)} headings, {b_name} {len(hb)}; give them the same sections:", *rows])


def main(argv: list[str]) -> int:
    root = Path(__file__).resolve().parent.parent
    if argv and len(argv) != 2:
        print("usage: python scripts/readme_commands.py [README.md README.ja.md]", file=sys.stderr)
        return 2
    a, b = (Path(argv[0]), Path(argv[1])) if argv else (root / "README.md", root / "README.ja.md")
    ta, tb = a.read_text(encoding="utf-8"), b.read_text(encoding="utf-8")
    report = "\n".join(r for r in (section_report(a.name, ta, b.name, tb), sync_report(a.name, ta, b.name, tb),
                                   sync_report(a.name, ta, b.name, tb, what="code line", langs=CODE_LANGS,
                                               inline=())) if r)
    print(report or f"{a.name} and {b.name} show the same commands and code")
    return 1 if report else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
