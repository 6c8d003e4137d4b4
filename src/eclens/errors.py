"""User-facing errors: one line, naming the file/line/pair and what to do."""

from __future__ import annotations


class EclensError(Exception):
    """An error the CLI prints as one line (no traceback) and exits non-zero with."""

    exit_code = 2


class PairFileError(EclensError):
    """A pairs file that cannot be read: names the file and, where known, the line."""

    def __init__(self, path, message: str, line: int | None = None):
        where = f"{path}:{line}" if line is not None else f"{path}"
        super().__init__(f"{where}: {message}")
        self.path = str(path)
        self.line = line
