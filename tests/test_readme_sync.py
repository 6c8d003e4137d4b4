"""README.ja.md shows the same commands (and the same Python/JSON code) as README.md.

A failure lists each command one file lacks, with the line and section heading it came from and the
matching section of the other file, so syncing is copying. `python scripts/readme_commands.py` prints
the same list.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NEWCOMER = ("bash scripts/setup.sh && .venv/bin/ec run", "bash scripts/test.sh")


def _load():
    spec = importlib.util.spec_from_file_location("readme_commands", ROOT / "scripts" / "readme_commands.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod   # dataclasses look their module up by name
    spec.loader.exec_module(mod)
    return mod


rc = _load()

EXAMPLE = """# Tool

Run `ec run` first; `ec diff --out RUN
--sample 8` wraps a line, `--flag` and `python` alone are not commands.

## Setup

```bash
# a comment-only line
$ bash scripts/setup.sh && .venv/bin/ec run   # trailing comment
ec diff PAIRS --hooks 'a#b' \\
    --out RUN

ec run [--pairs FILE]
       [--n 25]
```

```console
$ ec serve runs
serving on http://127.0.0.1:5000
```

```python
x = 1  # comment
```

## `ec patch RUN`: patching
"""


def test_extract_commands_on_a_tiny_readme():
    got = [(c.text, c.line, c.heading, c.section) for c in rc.extract_commands(EXAMPLE)]
    assert got == [
        ("ec run", 3, "# Tool", 1),
        ("ec diff --out RUN --sample 8", 3, "# Tool", 1),
        ("bash scripts/setup.sh && .venv/bin/ec run", 10, "## Setup", 2),
        ("ec diff PAIRS --hooks 'a#b' --out RUN", 11, "## Setup", 2),
        ("ec run [--pairs FILE] [--n 25]", 14, "## Setup", 2),
        ("ec serve runs", 19, "## Setup", 2),   # console output is not a command
        ("ec patch RUN", 27, "## `ec patch RUN`: patching", 3),
    ]
    code = rc.extract_commands(EXAMPLE, langs=rc.CODE_LANGS, inline=())
    assert [c.text for c in code] == ["x = 1"]
    assert rc.headings(EXAMPLE) == ["# Tool", "## Setup", "## `ec patch RUN`: patching"]


def test_sync_report_names_what_is_missing_and_where():
    other = (EXAMPLE.replace("# Tool", "# ツール").replace("## Setup", "## 準備")
             .replace("# trailing comment", "# 末尾のコメント").replace("--n 25", "--n 30"))
    assert rc.sync_report("A.md", EXAMPLE, "B.md", EXAMPLE.replace("# a comment-only", "# 翻訳")) == ""
    report = rc.sync_report("A.md", EXAMPLE, "B.md", other)
    assert report.splitlines() == [
        "1 command(s) in A.md missing from B.md:",
        "  A.md:14 in section 2 '## Setup' -> B.md '## 準備': ec run [--pairs FILE] [--n 25]",
        "1 command(s) in B.md missing from A.md:",
        "  B.md:14 in section 2 '## 準備' -> A.md '## Setup': ec run [--pairs FILE] [--n 30]",
    ]
    assert rc.section_report("A.md", EXAMPLE, "B.md", other) == ""
    fewer = rc.section_report("A.md", EXAMPLE, "B.md", other.replace("## `ec patch RUN`: patching", ""))
    assert fewer.startswith("A.md has 3 headings, B.md 2;")


@pytest.fixture(scope="module")
def readmes() -> tuple[str, str]:
    return ((ROOT / "README.md").read_text(encoding="utf-8"),
            (ROOT / "README.ja.md").read_text(encoding="utf-8"))


def test_readmes_link_each_other(readmes):
    en, ja = readmes
    assert "日本語: [README.ja.md](README.ja.md)" in en.splitlines()[:5]
    assert "English: [README.md](README.md)" in ja.splitlines()[:5]


def test_readmes_have_the_same_sections(readmes):
    en, ja = readmes
    report = rc.section_report("README.md", en, "README.ja.md", ja)
    assert not report, "\n" + report


def test_readmes_show_the_same_commands(readmes):
    en, ja = readmes
    report = rc.sync_report("README.md", en, "README.ja.md", ja)
    assert not report, "README.md and README.ja.md show different commands; copy them over:\n" + report
    for name, text in (("README.md", en), ("README.ja.md", ja)):
        cmds = {c.text for c in rc.extract_commands(text)}
        assert set(NEWCOMER) <= cmds, f"{name} lacks the newcomer command(s) {set(NEWCOMER) - cmds}"


def test_readmes_show_the_same_code(readmes):
    en, ja = readmes
    report = rc.sync_report("README.md", en, "README.ja.md", ja, what="code line", langs=rc.CODE_LANGS,
                            inline=())
    assert not report, "README.md and README.ja.md differ in Python/JSON code (comments aside):\n" + report
