"""The ``ec`` command line. Commands live in :mod:`eclens.commands`, one module per
step, each a thin layer over library functions; this module only assembles them and
turns :class:`~eclens.errors.EclensError` into a one-line message and an exit code."""

from __future__ import annotations

import os
import sys

import typer

app = typer.Typer(
    name="ec",
    help="eclens: which layers and dimensions of a language model change when one token changes.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode="rich",
)

# Each command module defines its commands on a typer app of its own; they are gathered here, explicitly.
from .commands import compare, diff, measure, model, pairs, patch, runcheck, sources, verify, views  # noqa: E402, F401

for _mod in (diff, measure, patch, sources, views, compare, runcheck):
    app.registered_commands += _mod.app.registered_commands
app.add_typer(model.model_app, name="model")
app.add_typer(pairs.pairs_app, name="pairs")


def main(argv: list[str] | None = None) -> int:
    from .errors import EclensError

    # Nothing may reach the model hub unasked; a user who wants the hub sets HF_HUB_OFFLINE=0.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        app(args=argv, standalone_mode=True)
    except SystemExit as e:
        code = int(e.code or 0) if isinstance(e.code, int) or e.code is None else 1
        # typer turns Ctrl-C into a silent exit 130 (its Exit is caused by the KeyboardInterrupt);
        # commands that say more raise typer.Exit(130) themselves, without that cause.
        if code == 130 and isinstance(getattr(e.__context__, "__cause__", None), KeyboardInterrupt):
            print("interrupted: finished work is saved; rerun the same command to resume", file=sys.stderr)
        return code
    except EclensError as e:
        # One line, whatever the message quotes (a file name or a key may hold a line break).
        msg = str(e).replace("\r", "\\r").replace("\n", "\\n")
        print(f"error: {msg}", file=sys.stderr)
        return e.exit_code
    except OSError as e:
        # A write that failed for lack of space or permission outside eclens.runs.atomic_path (which says
        # the same with the bytes it needed): one line naming the file, never a traceback.
        from .integrity import disk_error, disk_full_error

        code = disk_error(e)
        if code is None:
            raise
        msg = str(disk_full_error(e.filename or os.getcwd() + "/?", code, None))
        print(f"error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished work is saved; rerun the same command to resume", file=sys.stderr)
        return 130
    finally:
        from .lock import release_all

        release_all()  # the run folder's writer lock (eclens.lock), so a next command in this process can write
    return 0


def entry() -> None:
    sys.exit(main())

