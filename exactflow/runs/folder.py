"""A run folder read back: :class:`Run`, :func:`load_run`, and the names of its files."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..datasets import column_names
from ..distributions import Flow
from ..io import CheckpointError, read_json_record, signals_deferred
from ..io import load as load_model_file
from ..scoring import log_prob
from ..validation import DataError
from .data import dequantize_to_score

__all__ = ["Run", "RunError", "load_run", "locked", "lock_holder", "RUN_FILES", "LOCK_FILE",
           "RUN_JSON", "MODEL_FILE", "LEGACY_MODEL_FILE", "DATA_FILE", "HISTORY_FILE",
           "CHECKPOINT_FILE", "REPORT_DIR", "RUN_FORMAT", "REPLACING_DIR", "replacing",
           "replace_run", "finish_replacement", "run_status"]

#: The files of a run folder.
RUN_JSON = "run.json"
MODEL_FILE = "model.safetensors"
#: The model file of run folders written by exactflow 0.1.
LEGACY_MODEL_FILE = "model.pt"
DATA_FILE = "data.npz"
HISTORY_FILE = "history.json"
CHECKPOINT_FILE = "checkpoint.pt"
REPORT_DIR = "report"
RUN_FORMAT = "exactflow-run"


class RunError(Exception):
    """A run folder that cannot be used: missing, incomplete or corrupt (the message says which)."""


#: The files a run writes in its folder (anything else there is left alone).
RUN_FILES = (RUN_JSON, MODEL_FILE, DATA_FILE, HISTORY_FILE, CHECKPOINT_FILE, REPORT_DIR)
LOCK_FILE = ".exactflow.lock"
#: Where a run that replaces a finished run is written until it is done (in its folder).
REPLACING_DIR = ".exactflow-replacing"


def run_status(folder: Path) -> str | None:
    """The status in ``folder``'s run.json, or None (no run.json, or not readable)."""
    try:
        status = read_json_record(folder / RUN_JSON).get("status")
    except (OSError, ValueError, AttributeError):
        return None
    return status if isinstance(status, str) else None


def replacing(out: Path, *, resume: bool = False) -> Path | None:
    """Where to write a run that replaces the finished run in ``out`` (which keeps scoring
    until the new one is done): :data:`REPLACING_DIR`, emptied of a replacement that
    stopped before; None when ``out`` holds no finished run (nothing to keep). With
    ``resume``: that folder where it holds a replacement that stopped while training (to
    continue there), else None."""
    stage = out / REPLACING_DIR
    finished = run_status(out) == "done"
    if resume:
        return stage if finished and run_status(stage) == "training" else None
    shutil.rmtree(stage, ignore_errors=True)
    return stage if finished else None


def replace_run(stage: Path, out: Path) -> None:
    """Move the finished run in ``stage`` into ``out`` in place of the run there, with
    Ctrl-C and SIGTERM held until it is done. The old run.json goes first and the new one
    comes last, so that a reader in between finds no run rather than one run's description
    beside another's model; a move cut short (the process killed) is completed by the
    next reader or writer of the folder (:func:`finish_replacement`)."""
    names = (MODEL_FILE, LEGACY_MODEL_FILE, DATA_FILE, HISTORY_FILE, CHECKPOINT_FILE,
             REPORT_DIR)
    with signals_deferred():
        (out / RUN_JSON).unlink(missing_ok=True)
        if (stage / MODEL_FILE).exists():  # (none moved yet: the old run's files go first;
            for name in names:            # the model moves first, so this holds once only)
                target = out / name
                if target.is_dir():
                    shutil.rmtree(target)
                else:
                    target.unlink(missing_ok=True)
        for name in names:
            if (stage / name).exists():
                os.replace(stage / name, out / name)
        os.replace(stage / RUN_JSON, out / RUN_JSON)
        shutil.rmtree(stage, ignore_errors=True)


def finish_replacement(out: Path) -> None:
    """Complete the move of a finished replacement into ``out`` that was cut short (``out``
    without a run.json, the replacement's saying done), unless a run writes ``out`` now."""
    stage = out / REPLACING_DIR
    if (out / RUN_JSON).exists() or run_status(stage) != "done" or lock_holder(out):
        return
    try:
        with locked(out):
            if not (out / RUN_JSON).exists() and run_status(stage) == "done":
                replace_run(stage, out)
    except (OSError, RunError):  # (a read-only folder, or a run started meanwhile: the
        pass                     # reader's own error says what the folder holds)


def lock_holder(folder: Path) -> str | None:
    """The pid of the process writing ``folder`` now (its lock held), or None: reads only,
    never creates the lock file."""
    path = folder / LOCK_FILE
    try:
        import fcntl

        fd = os.open(path, os.O_RDONLY)
    except (ImportError, OSError):  # not POSIX, or no lock file: nobody writes it
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return os.read(fd, 64).decode(errors="replace").strip() or "unknown"
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


@contextmanager
def locked(folder: Path) -> Iterator[None]:
    """Hold the run folder's lock while a run writes it: a second run on the same folder
    is refused at once, before it writes anything (the lock is released when the process
    ends, even if it is killed).

    Raises:
        RunError: another process holds the lock.
    """
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX: no lock, as before
            yield
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "another process"
            raise RunError(
                f"the run folder {str(folder)!r} is being written by another exactflow run "
                f"(pid {holder}); wait for it to finish or choose another folder"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


@dataclass
class Run:
    """A finished training run read back from its folder.

    Attributes:
        path: the run folder.
        info: the parsed ``run.json`` (data source, split, options, metrics, versions).
        flow: the trained model (eval mode, CPU), or ``None`` when not asked for.
        history: the parsed ``history.json`` (``{}`` when absent).
    """

    path: Path
    info: dict[str, Any]
    flow: Flow | None = None
    history: dict[str, Any] = field(default_factory=dict)
    _calibration: np.ndarray | None = field(default=None, repr=False)

    def data(self, part: str) -> np.ndarray:
        """The ``train``, ``val`` or ``test`` rows stored with the run, as a float64 array."""
        file = self.path / DATA_FILE
        if not file.is_file():
            raise RunError(
                f"run folder {str(self.path)!r} has no {DATA_FILE} (was it deleted?); "
                "retrain the run to recreate it"
            )
        try:
            with np.load(file, allow_pickle=False) as npz:
                if part not in npz.files:
                    raise RunError(f"{str(file)!r} has no {part!r} array (found {npz.files})")
                return np.asarray(npz[part], dtype=np.float64)
        except RunError:
            raise
        except Exception as err:  # noqa: BLE001 - zip, pickle or format errors alike
            raise RunError(f"{str(file)!r} is corrupt or not a numpy .npz file: {err}") from None

    @property
    def features(self) -> int:
        return int(self.info["data"]["features"])

    @property
    def dequantized(self) -> list[int]:
        """The integer-valued columns the run dequantized (uniform noise in [0, 1))."""
        return [int(c) for c in self.info["data"].get("dequantized_columns") or []]

    def score(self, rows: Any, seed: int = 0) -> np.ndarray:
        """The model's log-density of every row, in the units of the data (float64).

        ``rows``: an array or tensor with the run's columns in its order, or a table with
        named columns (a pandas DataFrame), whose columns are then matched by name, as
        ``exactflow score`` matches a CSV header (other columns are left out).

        Columns the run dequantized get uniform noise as in training, so the value is
        one draw of the documented lower bound of the discrete log-probability. The noise
        of a row is a hash of its values and ``seed`` (:func:`exactflow.runs.dequantize`
        with ``keyed=True``): the same row scores the same wherever it sits in a file.
        Never NaN: a row beyond the model's range or support scores ``-inf``.

        Raises:
            DataError: a named column of the run is missing, or an array has another
                number of columns than the run.
        """
        if self.flow is None:
            raise RunError(f"the run {str(self.path)!r} was read without its model")
        given = column_names(rows)  # a DataFrame's; arrays and tensors have none
        if given is not None:
            missing = [c for c in self.columns if c not in given]
            if missing:
                raise DataError(
                    f"the table has no column {missing[0]!r} of the run's columns "
                    f"{self.columns} (it has {given[:8]}{' ...' if len(given) > 8 else ''})"
                )
            rows = np.asarray(rows, dtype=np.float64)[:, [given.index(c) for c in self.columns]]
        rows = np.asarray(rows, dtype=np.float64)
        if rows.ndim != 2 or rows.shape[1] != self.features:
            raise DataError(
                f"rows of shape {tuple(rows.shape)}: the run was trained on "
                f"{self.features} columns {self.columns}"
            )
        rows = dequantize_to_score(rows, self.dequantized, seed, self.columns or None,
                                   "the run's data.npz holds them dequantized already")
        return log_prob(self.flow, rows)

    def calibration(self) -> np.ndarray:
        """Log-densities of the held-out rows (validation and test), the reference of
        conformal p-values.

        Neither part was trained on. The validation rows did choose the model and the step
        it kept, a mild optimism that lowers new rows' p-values a little; they also double
        the reference, which narrows the spread of the false-alarm rate
        (``benchmarks/anomaly.py`` measures both).
        """
        if self._calibration is None:
            held_out = np.concatenate([self.data("val"), self.data("test")])
            if self.flow is None:
                raise RunError(f"the run {str(self.path)!r} was read without its model")
            self._calibration = log_prob(self.flow, held_out)
        return self._calibration

    @property
    def columns(self) -> list[str]:
        """Column names of the data (``x1``, ``x2``, ... when the source had none)."""
        names = self.info["data"].get("column_names")
        if names and len(names) == self.features:
            return [str(c) for c in names]
        return [f"x{i + 1}" for i in range(self.features)]


def load_run(run_dir: str | os.PathLike[str], *, model: bool = True) -> Run:
    """Read a run folder written by :func:`train_run` (``exactflow train``).

    Args:
        run_dir: the folder.
        model: also load the model (with :func:`exactflow.load`, weights only).

    Raises:
        RunError: the folder or one of its files is missing, unreadable or corrupt, or the
            run did not finish.
    """
    path = Path(run_dir)
    if not path.exists():
        raise RunError(f"no such run folder: {str(path)!r}")
    if not path.is_dir():
        raise RunError(f"{str(path)!r} is not a run folder (it is a file)")
    finish_replacement(path)
    info_file = path / RUN_JSON
    if not info_file.is_file():
        raise RunError(
            f"{str(path)!r} is not a run folder: it has no {RUN_JSON} "
            "(make one with `exactflow train DATA --out RUN_DIR`)"
        )
    try:
        info = read_json_record(info_file)
    except (OSError, ValueError) as err:
        raise RunError(f"{str(info_file)!r} is corrupt: {err}") from None
    if not isinstance(info, dict) or info.get("format") != RUN_FORMAT:
        raise RunError(f"{str(info_file)!r} is not an exactflow run description")
    if info.get("status") == "failed":
        raise RunError(
            f"the run in {str(path)!r} failed: "
            f"{str(info.get('error', 'training diverged')).rstrip('.')}; "
            "train it again with `exactflow train ... --overwrite` (train_run(..., "
            "overwrite=True))"
        )
    if info.get("status") != "done":
        holder = lock_holder(path)
        if holder is not None:
            raise RunError(f"the run in {str(path)!r} is being trained now (pid {holder}); "
                           "wait for it to finish")
        auto = (info.get("options") or {}).get("model") == "auto"
        cure = ("it was choosing its model (auto), which cannot be resumed: train it again "
                "with `exactflow train ... --overwrite`" if auto else
                "continue it with `exactflow train ... --resume` (or keep the best step it "
                "reached: the same command with --resume --steps 1, which trains no step and "
                "writes the model)")
        raise RunError(
            f"the run in {str(path)!r} did not finish (status {info.get('status')!r}); {cure}"
        )
    history: dict[str, Any] = {}
    hist_file = path / HISTORY_FILE
    if hist_file.is_file():
        try:
            history = read_json_record(hist_file)
        except (OSError, ValueError) as err:
            raise RunError(f"{str(hist_file)!r} is corrupt: {err}") from None
        if not isinstance(history, dict):
            raise RunError(f"{str(hist_file)!r} is corrupt: not a training history")
    _check_info(info_file, info)
    run = Run(path, info, None, history)
    if model:
        run.flow = _load_model(path)
        if run.flow.features != run.features:
            raise RunError(
                f"{str(info_file)!r} says the data have {run.features} features but the "
                f"run's model has {run.flow.features}: the folder was tampered with or mixed "
                "up with another run"
            )
        said, saved = info.get("model"), run.flow.config or {}
        if isinstance(said, dict):  # (keys one side lacks: a run of an older version)
            differ = sorted(k for k in set(said) & set(saved) if said[k] != saved[k])
            if differ:
                pairs = ", ".join(f"{k}: {said[k]!r} there, {saved[k]!r} in the file"
                                  for k in differ[:3])
                raise RunError(
                    f"{str(info_file)!r} describes another model than the run's model file "
                    f"({pairs}): the folder was tampered with or mixed up with another run")
    return run


def _check_info(info_file: Path, info: dict[str, Any]) -> None:
    """The parts of run.json that commands size things by, checked before any use."""
    data = info.get("data")
    features = data.get("features") if isinstance(data, dict) else None
    if isinstance(features, bool) or not isinstance(features, int) or not 1 <= features <= 10**6:
        raise RunError(f"{str(info_file)!r} is corrupt: its data features are {features!r}")
    names = data.get("column_names")  # type: ignore[union-attr]
    if names is not None and (not isinstance(names, list) or len(names) != features):
        raise RunError(f"{str(info_file)!r} is corrupt: {features} features but column "
                       f"names {str(names)[:80]}")


def _load_model(run_dir: Path) -> Flow:
    file = run_dir / MODEL_FILE
    if not file.exists() and (run_dir / LEGACY_MODEL_FILE).is_file():
        file = run_dir / LEGACY_MODEL_FILE
    if not file.is_file():
        raise RunError(
            f"run folder {str(run_dir)!r} has no {MODEL_FILE} (was it deleted?); "
            "retrain the run to recreate it"
        )
    try:
        return load_model_file(file)
    except CheckpointError as err:
        raise RunError(str(err)) from None
