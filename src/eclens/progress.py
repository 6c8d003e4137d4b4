"""Progress bars on stderr, one kind for the library and the CLI.

Library calls stay quiet unless asked (``progress=True``); the bars go to stderr so that
stdout carries only results. Three shapes of use: :func:`progress_bar` (a rich
``Progress`` to add tasks to, or a null context), :class:`TaskBar` (one task with
``advance``) and :func:`category_bars` (one bar per category, fed ``(name, have, target)``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator


def stderr_console():
    from rich.console import Console

    return Console(stderr=True)


def progress_bar(enabled: bool, label: str = "diff", *, rate: bool = True, console=None):
    """A rich progress bar on stderr (items/s, time left), or a null context when not ``enabled``.

    ``label`` heads the bar; with ``rate=False`` each task's own description does (several tasks)."""
    if not enabled:
        return contextlib.nullcontext(None)
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        ProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.text import Text

    class Rate(ProgressColumn):
        def render(self, task):
            sp = task.finished_speed or task.speed
            return Text(f"{sp:.1f} pairs/s" if sp else "… pairs/s", style="progress.data.speed")

    console = console or stderr_console()
    if not rate:
        return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=console, transient=False)
    prog = Progress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), Rate(), TimeElapsedColumn(),
                    TimeRemainingColumn(), console=console, transient=False)
    return prog


class TaskBar:
    """One task's bar when asked for, a no-op otherwise (library calls stay quiet)."""

    def __init__(self, enabled: bool, total: int, description: str):
        self.bar = progress_bar(enabled, description, rate=False) if enabled else None
        if self.bar is not None:
            self.task = self.bar.add_task(description, total=total)

    def __enter__(self):
        if self.bar is not None:
            self.bar.__enter__()
        return self

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.advance(self.task, n)

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.__exit__(*exc)


@contextlib.contextmanager
def category_bars(console=None) -> Iterator[Callable[[str, int, int], None]]:
    """A callback ``(category, have, target)`` that keeps one bar per category up to date."""
    tasks: dict[str, int] = {}
    with progress_bar(True, rate=False, console=console) as bar:
        def update(cat: str, have: int, target: int) -> None:
            if cat not in tasks:
                tasks[cat] = bar.add_task(cat, total=target)
            bar.update(tasks[cat], completed=min(have, target))

        yield update
