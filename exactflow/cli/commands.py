"""The ``exactflow`` commands: each takes the parsed arguments and returns its result.

Every command returns a JSON-able dict (and, for ``check``, an exit code); :func:`main` prints
it with ``--json``, or the command prints its own text. Failures the user can fix raise an
exception that :func:`main` turns into one line on stderr and exit code 1 (2 for usage
errors); ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from ..datasets import DataError
from ..distributed import threads_chosen
from ..io import CheckpointError, json_safe
from ..runs import RunError
from ..training import TrainingError
from .common import CommandError, UsageError
from .inspect import cmd_check, cmd_report
from .output import silence_stdout, to_stdout
from .parser import PROG, UsageExit, build_parser
from .tables import cmd_sample, cmd_score
from .threads import ThreadsError, choose_threads
from .train import cmd_demo, cmd_train

__all__ = ["main", "CommandError", "COMMANDS"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 ok, 1 bad data or run, 2 usage).

    A closed output pipe (``exactflow sample ... | head``) ends the command quietly with
    exit code 141 (128 + SIGPIPE, as a shell reports it), without a traceback. SIGTERM (a
    job scheduler's stop, ``timeout``, ``kill``) ends it as Ctrl-C does, with exit code 143:
    a file being written is removed, an interrupted run keeps its checkpoint.
    """
    try:
        with _terminate_as_interrupt():
            code = _main(argv)
            sys.stdout.flush()  # (a reader gone before the last buffered rows: 141 here)
            return code
    except BrokenPipeError:
        silence_stdout()
        return 141


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the command is, so that it unwinds as after Ctrl-C."""


@contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield  # (signal handlers can only be set from the main thread)
        return

    def stop(signum: int, frame: Any) -> None:
        raise Terminated

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _glued(argv: Sequence[str]) -> list[str]:
    """``--bounds -180:180`` as ``--bounds=-180:180``: argparse takes a value that starts
    with ``-`` and is not a plain number for an option."""
    out: list[str] = []
    for arg in argv:
        if out and out[-1] == "--bounds" and arg.startswith("-") and ":" in arg:
            out[-1] = f"--bounds={arg}"
        else:
            out.append(arg)
    return out


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(_glued(sys.argv[1:] if argv is None else argv))
    except SystemExit as exit_:  # argparse: --help (0) or a usage error (2)
        given = list(argv) if argv is not None else sys.argv[1:]
        if isinstance(exit_, UsageExit) and "--json" in given:  # (said on stderr too)
            print(json.dumps({"ok": False, "error": exit_.message}))
        code = exit_.code
        return code if isinstance(code, int) else (0 if code is None else 2)
    threads_before = torch.get_num_threads()
    try:
        threads, source = choose_threads(args)
        if threads is not None and threads != threads_before:
            torch.set_num_threads(threads)
        formatter = warnings.formatwarning
        if not args.debug:  # one line per warning, without the library's source line
            warnings.formatwarning = _format_warning
        cores = os.cpu_count() or 1
        running = threads if threads is not None else torch.get_num_threads()
        if running > cores:
            warnings.warn(
                f"{source} asks for {running} threads on a machine with {cores} cores: "
                "threads beyond the cores wait on each other and slow every step",
                stacklevel=2,
            )
        try:
            with threads_chosen():  # (chosen above: training does not question it)
                result = COMMANDS[args.command](args)
        finally:
            warnings.formatwarning = formatter
    except KeyboardInterrupt as stop:
        terminated = isinstance(stop, Terminated)
        said = "terminated" if terminated else "interrupted"  # (then what the command left)
        _fail(args, f"{said}: {stop}" if str(stop) else said)
        return 143 if terminated else 130
    except BrokenPipeError:
        raise
    except UsageError as err:
        print(f"usage: {PROG} {args.command} ... (see `{PROG} {args.command} --help`)",
              file=sys.stderr)
        _fail(args, str(err))
        return 2
    except Exception as err:  # noqa: BLE001 - every failure becomes one line (or --debug)
        if args.debug:
            raise
        _fail(args, _message(err))
        return 1
    finally:
        if torch.get_num_threads() != threads_before:
            torch.set_num_threads(threads_before)
    code = 0
    if isinstance(result, tuple):
        result, code = result
    if args.json:
        to_stdout(json.dumps(json_safe(result), indent=2, allow_nan=False) + "\n")
    return code


def _format_warning(message: Warning | str, category: type[Warning], filename: str,
                    lineno: int, line: str | None = None) -> str:
    # Only the text changes: callers that record warnings (catch_warnings, pytest) still do.
    return f"{PROG}: warning: {' '.join(str(message).split())}\n"


def _fail(args: argparse.Namespace, message: str) -> None:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    if getattr(args, "json", False):
        print(json.dumps({"ok": False, "error": message}))


def _message(err: BaseException) -> str:
    """One line naming the problem."""
    text = " ".join(str(err).split()) or type(err).__name__
    if isinstance(err, (CommandError, DataError, CheckpointError, RunError, TrainingError,
                        ThreadsError)):
        return text
    if isinstance(err, OSError) and err.filename is not None:
        return f"{err.strerror or type(err).__name__}: {err.filename!r}"
    if isinstance(err, (ValueError, ImportError)):
        return text
    return f"{type(err).__name__}: {text} (rerun with --debug for the traceback)"


COMMANDS: dict[str, Callable[[argparse.Namespace], Any]] = {
    "demo": cmd_demo,
    "train": cmd_train,
    "sample": cmd_sample,
    "score": cmd_score,
    "check": cmd_check,
    "report": cmd_report,
}
