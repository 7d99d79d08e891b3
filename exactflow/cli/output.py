"""What the command line writes in bulk: samples drawn and streamed a chunk at a time.

``exactflow sample -n N`` never holds ``N`` rows: :func:`sample_chunks` draws them a chunk
at a time (65,536 rows for narrow tables, fewer for wide ones), and the command streams
each chunk to its file (:func:`exactflow.io.write_table`) or to stdout. ``--json`` prints
every sample inside one JSON object built in memory, so it is capped
(:func:`json_cap_error`). Text goes to stdout whole or not at all (:func:`to_stdout`),
and a reader that goes away (``| head``) ends the command quietly (:func:`silence_stdout`).
"""

from __future__ import annotations

import codecs
import io
import os
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from ..distributions import Flow
from ..scoring import eval_mode
from ..transforms.support import Support

__all__ = ["JSON_MAX_VALUES", "CHUNK_VALUES", "SampleStream", "json_cap_error",
           "silence_stdout", "to_stdout"]

#: The most numbers (rows x features) ``sample --json`` prints without ``-o``.
JSON_MAX_VALUES = 1_000_000
#: The most numbers ``sample`` holds at a time (one chunk of rows).
CHUNK_VALUES = 1 << 17


class SampleStream:
    """``n`` samples of ``flow`` drawn with ``seed`` in chunks, counting non-finite rows.

    Iterating draws the chunks (float64 arrays) in eval mode, with torch's global RNG
    forked so the caller's is left as it was. Chunks are 65,536 rows for tables of up to
    two features (the chunks of exactflow 0.1, so a seed draws the same samples as there),
    fewer for wider ones (:data:`CHUNK_VALUES` numbers at most).
    """

    def __init__(self, flow: Any, n: int, seed: int, features: int) -> None:
        self.flow, self.n, self.seed = flow, n, seed
        self.rows = max(1, min(65536, CHUNK_VALUES // max(features, 1)))
        self.non_finite_rows = 0
        first = Flow._first_layer(flow.transform) if isinstance(flow, Flow) else None
        # Written with 17 significant digits where the flow has bounds: at the tables' 9, a
        # sample 1e-10 below 1 is written 1, on the limit, where its file scores -inf (61
        # of 100,000 samples of a Beta(0.25, 0.25) column), and 9 digits hold no number
        # inside (1e8, 1e8 + 1) at all.
        self.fmt = "%.17g" if isinstance(first, Support) else "%.9g"

    def __iter__(self) -> Iterator[np.ndarray]:
        with torch.random.fork_rng(devices=[]), eval_mode(self.flow):
            torch.manual_seed(self.seed)
            left = self.n
            while left > 0:
                k = min(left, self.rows)
                block = self.flow.sample(k).double().cpu().numpy()
                self.non_finite_rows += int((~np.isfinite(block).all(1)).sum())
                left -= k
                yield block


def json_cap_error(n: int, per_row: int, what: str = "samples") -> str | None:
    """The error for ``sample --json`` or ``score --json`` without ``-o`` when ``n`` rows
    of ``per_row`` values each are too many."""
    if n * per_row <= JSON_MAX_VALUES:
        return None
    return (
        f"--json prints the {what} inside one JSON object built in memory: at most "
        f"{JSON_MAX_VALUES // per_row:,} rows of {per_row} values; write the {n:,} rows to "
        "a file with -o FILE (.csv or .npy, streamed), or leave out --json to stream CSV to "
        "stdout"
    )


def to_stdout(text: str) -> None:
    """Write ``text`` to stdout in full, or raise ``BrokenPipeError``.

    Python's buffered stdout takes a pipe's partial write (the reader read part of a
    large chunk, then closed: ``| head``) as the whole and drops the rest without an error,
    so the command ended with exit code 0 and cut output. Here the bytes go out through
    ``os.write`` until every one is written; the write after the reader left fails with
    ``EPIPE`` (Python ignores SIGPIPE), which the command turns into exit code 141. A stdout
    with no file descriptor (a test's capture) is written as it is.
    """
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, ValueError, io.UnsupportedOperation):
        sys.stdout.write(text)
        return
    sys.stdout.flush()
    key = (sys.stdout.encoding or "utf-8", getattr(sys.stdout, "errors", None) or "strict")
    if _ENCODER[0] != key:  # (one encoder for the stream: a UTF-16 mark once, not per chunk)
        _ENCODER[:] = [key, codecs.getincrementalencoder(key[0])(key[1])]
    data = memoryview(_ENCODER[1].encode(text))
    while data:
        data = data[os.write(fd, data):]


#: The encoder :func:`to_stdout` keeps for stdout's encoding and error handler.
_ENCODER: list[Any] = [None, None]


def silence_stdout() -> None:
    """Point stdout at ``/dev/null`` after its reader went away, so that the interpreter's
    last flush at exit cannot raise a second ``BrokenPipeError``."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, io.UnsupportedOperation):
        pass
