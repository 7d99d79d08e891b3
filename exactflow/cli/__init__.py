"""The ``exactflow`` command: train a flow on a file or a toy, sample, score, check, report.

:mod:`~exactflow.cli.parser` builds the argument parser; :mod:`~exactflow.cli.commands`
runs the commands on the Python API (:mod:`exactflow.runs`, :mod:`exactflow.report`).

Exit codes: 0 success, 1 bad data or a bad run folder (one line ``exactflow: error: ...``
on stderr, a traceback only with ``--debug``), 2 a usage error (argparse). ``--json`` prints
one JSON object on stdout instead of text. Output files are written atomically.
"""

from .commands import CommandError, main
from .parser import build_parser

__all__ = ["main", "build_parser", "CommandError"]
