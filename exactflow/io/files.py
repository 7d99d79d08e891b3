"""Files exactflow writes and reads: atomic, durable writes; strict JSON; weights-only torch loads.

Every file exactflow writes goes through :func:`_atomic_write`: a temporary file in the same
folder, flushed and fsynced, given the usual permissions, moved over the target with
``os.replace``, and the folder fsynced; a crash during the write leaves the previous file
intact. :func:`safe_torch_load` reads torch archives with ``weights_only=True``, so a file
can never run code, and turns every way it can be wrong into a :class:`CheckpointError`.
"""

from __future__ import annotations

import errno
import json
import math
import os
import pickle
import signal
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from safetensors import SafetensorError

__all__ = [
    "atomic_save",
    "atomic_write_stream",
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_write_json",
    "json_safe",
    "read_json_record",
    "safe_torch_load",
    "signals_deferred",
    "CheckpointError",
]


@contextmanager
def signals_deferred() -> Iterator[None]:
    """Ctrl-C and SIGTERM held until the block ends (where Python handlers take them, on
    the main thread), for a few steps that must all happen or none: their handlers run
    after it, as if the signal came then. Blocking the signal in the main thread would not
    do: the C handler sets its flag from whichever thread the signal reaches."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[tuple[int, Any]] = []
    saved: dict[int, Any] = {}

    def hold(signum: int, frame: Any) -> None:
        held.append((signum, frame))

    for sig in (signal.SIGINT, signal.SIGTERM):
        if callable(handler := signal.getsignal(sig)):
            saved[sig] = handler
            signal.signal(sig, hold)
    try:
        yield
    finally:
        for number, handler in saved.items():
            signal.signal(number, handler)
        first: dict[int, Any] = {}  # (the first of each signal, in the order they came)
        for signum, frame in held:
            first.setdefault(signum, frame)
        for signum, frame in first.items():  # (raises where the handler does)
            saved[signum](signum, frame)


class CheckpointError(Exception):
    """A model or training-checkpoint file cannot be used (the message says why)."""


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _atomic_write(path: str | os.PathLike[str], write: Callable[[BinaryIO], None]) -> Path:
    """Write a file through a temporary file in the same folder, fsync and ``os.replace``.

    The one place where exactflow writes files: the temporary file is flushed and fsynced
    before the rename (so a crash never leaves a half-written target), given the usual
    permissions (``0666`` less the umask, like any file the user creates), moved over
    ``path`` atomically, and the folder is fsynced so the rename itself is durable. On any
    error the temporary file is removed and ``path`` is untouched; a process killed
    mid-write may leave a stray ``.<name>.*.tmp`` beside the target, never a corrupt target.
    """
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, "cannot write a file over a folder", str(path))
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    except OSError as err:
        raise _about(err, path) from None
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp_name, 0o666 & ~_umask())
        os.replace(tmp_name, path)
    except BaseException as err:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        if isinstance(err, OSError) and err.errno is not None:
            raise _about(err, path) from None
        raise
    _fsync_directory(directory)
    return path


def _about(err: OSError, path: Path) -> OSError:
    """``err`` naming the target ``path``, never the hidden temporary file beside it."""
    if err.errno == errno.ENOSPC:
        return OSError(errno.ENOSPC, "no space left on the device", str(path))
    if err.errno == errno.EDQUOT:
        return OSError(errno.EDQUOT, "disk quota exceeded", str(path))
    return type(err)(err.errno, err.strerror or os.strerror(err.errno or 0), str(path))


def _fsync_directory(directory: Path) -> None:
    # Makes the rename itself durable; not possible on every platform, hence best effort.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_stream(
    path: str | os.PathLike[str], write: Callable[[BinaryIO], None]
) -> Path:
    """Write a file of any size atomically: ``write(handle)`` writes it piece by piece.

    ``write`` gets a binary file open on a temporary file beside ``path``; once it returns,
    the file is fsynced and moved over ``path`` (see :func:`atomic_save`). Memory stays
    what ``write`` holds at a time, so a table larger than memory can be written in chunks.
    If ``write`` raises, ``path`` is untouched and the temporary file is removed.
    """
    return _atomic_write(path, write)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically and durably (see :func:`atomic_save`)."""
    def write(handle: BinaryIO) -> None:
        handle.write(data)

    return _atomic_write(path, write)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically and durably."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """Write ``obj`` as indented, strict JSON (non-finite numbers as ``null``) atomically."""
    text = json.dumps(json_safe(obj), indent=2, allow_nan=False)
    return atomic_write_text(path, text + "\n")


def atomic_save(obj: Any, path: str | os.PathLike[str]) -> Path:
    """``torch.save(obj, path)`` that never leaves a partial file at ``path``.

    Writes to a temporary file in the same directory (same file system, so the final rename
    is atomic), flushes and fsyncs it, then ``os.replace``\\ s it over ``path`` and fsyncs
    the directory. If anything fails before the rename, the temporary file is removed and
    the old ``path`` (if any) is untouched. A process killed mid-write may leave a stray
    ``.<name>.*.tmp`` file beside the target, never a corrupt target.

    Returns:
        The target path.
    """
    return _atomic_write(path, lambda handle: torch.save(obj, handle))


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float replaced by ``None`` and numpy/torch scalars,
    arrays and paths turned into plain Python, so ``json.dumps(..., allow_nan=False)`` works.
    """
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.generic):
        return json_safe(value.item())
    if isinstance(value, np.ndarray):
        return json_safe(value.tolist())
    if isinstance(value, torch.Tensor):
        return json_safe(value.detach().cpu().tolist())
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


RECORD_LIMIT = 64 * 2**20
"""The largest JSON record (a run folder's ``run.json``, ``history.json``)
:func:`read_json_record` reads; those exactflow writes hold kB, or a few MB for tables of
many thousand columns or runs of many thousand records."""


def read_json_record(path: str | os.PathLike[str]) -> Any:
    """The JSON value in the regular file ``path``, read no further than
    :data:`RECORD_LIMIT` (a FIFO, a device or a link to one is never opened: it could hang
    or fill memory).

    Raises:
        FileNotFoundError: there is no regular file at ``path``.
        ValueError: the file is larger than :data:`RECORD_LIMIT`, or not UTF-8 JSON.
        OSError: the file cannot be read.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(errno.ENOENT, "no regular file", str(path))
    with path.open("rb") as handle:  # (read() allocates what it is asked for: the size)
        data = handle.read(min(os.fstat(handle.fileno()).st_size, RECORD_LIMIT) + 1)
    if len(data) > RECORD_LIMIT:
        raise ValueError(f"it is larger than {RECORD_LIMIT // 2**20} MiB, far more than "
                         "exactflow writes in a run's records")
    return json.loads(data.decode("utf-8"))


def safe_torch_load(
    path: str | os.PathLike[str], map_location: Any = "cpu", what: str = "file"
) -> Any:
    """``torch.load(path, weights_only=True)`` with every failure turned into a clear error.

    ``weights_only=True`` makes torch's unpickler accept only tensors and plain containers
    and numbers: a pickle that names any other global (a code payload) is refused before
    anything is executed.

    Raises:
        CheckpointError: the file is missing, empty, truncated, not a torch file, or holds
            objects other than tensors and plain Python types.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"no such {what}: {str(path)!r}")
    if not path.is_file():
        raise CheckpointError(f"{what} {str(path)!r} is not a regular file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{what} {str(path)!r} is empty (an interrupted copy or write?)")
    try:
        with warnings.catch_warnings():
            # torch warns about pickle protocols it was not written with; the error says more.
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        text = str(err)
        if "global" in text.lower() or "unsupported class" in text.lower():
            raise CheckpointError(
                f"refusing to load {str(path)!r}: it contains Python objects other than tensors "
                "and plain types (possibly code); exactflow never executes code from a file. "
                f"Detail: {_first_line_about(text)}"
            ) from None
        raise CheckpointError(
            f"refusing to load {str(path)!r}: it is not a weights-only torch file (tensors and "
            "plain types only) or it is corrupt; exactflow never executes code from a file. "
            f"Detail: {_first_line_about(text)}"
        ) from None
    except (RuntimeError, EOFError, ValueError, OSError, KeyError, IndexError,
            SafetensorError) as err:  # (torch reads a path ending .safetensors as one)
        raise CheckpointError(
            f"{str(path)!r} is truncated or not a torch file ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else 'unexpected end of data'})"
        ) from None


def _first_line_about(text: str) -> str:
    # torch's weights-only message is long; keep the line that names the offending object.
    for line in text.splitlines():
        low = line.lower()
        if "global" in low or "unsupported" in low:
            return line.strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else text
