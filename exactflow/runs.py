"""Run folders: train a model on a table and keep everything about it, as a Python API.

``exactflow train`` calls :func:`train_run`; every other command reads a run back with
:func:`load_run`. A run folder holds::

    RUN_DIR/
      run.json        data source, split, options, metrics, versions (status "done" at the end)
      model.safetensors  the trained flow (exactflow.save: JSON config + weights only;
                      model.pt in run folders of exactflow 0.1)
      data.npz        the train / val / test rows the run used (float64)
      history.json    the training curves
      checkpoint.pt   while training (for resume=True); removed when the run finishes
      report/         index.html, PNG figures, metrics.json (exactflow.report.build_report)

Every file is written atomically (:mod:`exactflow.io`), so a crash never leaves a half-written
one; ``run.json`` says ``"status": "done"`` only once everything else is in place.

Example:
    >>> import tempfile, exactflow as ef
    >>> from exactflow.runs import train_run
    >>> run = train_run("moons", tempfile.mkdtemp(), model="maf", samples=600, steps=30,
    ...                 progress=False)
    >>> run.info["status"], run.features, sorted(run.info["metrics"]["test"])[:2]
    ('done', 2, ['bpd', 'bpd_se'])
"""

from __future__ import annotations

import io
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import distributed, models
from ._version import __version__
from .datasets import TOY_ENTROPY, TOYS, digits, load, read_header, split, toy, validate
from .distributions import Flow
from .io import CheckpointError, atomic_write_bytes, atomic_write_json, save
from .io import load as load_model_file
from .training import evaluate, fit
from .validation import DataError, fraction, positive_int

__all__ = [
    "Run",
    "RunError",
    "load_run",
    "train_run",
    "read_data",
    "RUN_JSON",
    "MODEL_FILE",
    "DATA_FILE",
    "HISTORY_FILE",
    "CHECKPOINT_FILE",
    "REPORT_DIR",
]

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

#: Names of the built-in data sets :func:`read_data` accepts besides files.
BUILTIN = (*TOYS, "digits")


class RunError(Exception):
    """A run folder that cannot be used: missing, incomplete or corrupt (the message says which)."""


# -- reading a run ------------------------------------------------------------------------


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
    info_file = path / RUN_JSON
    if not info_file.is_file():
        raise RunError(
            f"{str(path)!r} is not a run folder: it has no {RUN_JSON} "
            "(make one with `exactflow train DATA --out RUN_DIR`)"
        )
    try:
        info = json.loads(info_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RunError(f"{str(info_file)!r} is corrupt: {err}") from None
    if not isinstance(info, dict) or info.get("format") != RUN_FORMAT:
        raise RunError(f"{str(info_file)!r} is not an exactflow run description")
    if info.get("status") != "done":
        raise RunError(
            f"the run in {str(path)!r} did not finish (status {info.get('status')!r}); "
            "continue it with `exactflow train ... --resume`"
        )
    history: dict[str, Any] = {}
    hist_file = path / HISTORY_FILE
    if hist_file.is_file():
        try:
            history = json.loads(hist_file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise RunError(f"{str(hist_file)!r} is corrupt: {err}") from None
    run = Run(path, info, None, history)
    if model:
        run.flow = _load_model(path)
    return run


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


# -- reading data -------------------------------------------------------------------------


def read_data(
    spec: Any, columns: Sequence[int | str] | None = None, *, samples: int = 20000, seed: int = 0
) -> tuple[np.ndarray, dict[str, Any]]:
    """The rows named by ``spec`` as a float64 array, with a description of their source.

    ``spec`` is a toy name (:data:`exactflow.datasets.TOYS`, ``samples`` points drawn with
    ``seed``), ``"digits"`` (scikit-learn's 8x8 digits, dequantized), a path to a CSV,
    ``.npy`` or ``.npz`` file (``columns`` picks columns by header name or index), or an
    array of rows.

    Raises:
        DataError: a missing or unreadable file, or columns that do not fit.
    """
    if isinstance(spec, (str, os.PathLike)):
        text = os.fspath(spec)
        if text in TOYS and not Path(text).exists():
            if columns is not None:
                raise DataError(f"columns do not apply to the toy dataset {text!r}")
            arr = toy(text, samples, seed=seed).double().numpy()
            return arr, {"source": "toy", "name": text, "path": None, "columns": None,
                         "column_names": None, "samples": samples, "seed": seed,
                         "entropy": TOY_ENTROPY.get(text)}
        if text == "digits" and not Path(text).exists():
            if columns is not None:
                raise DataError("columns do not apply to the built-in digits dataset")
            arr = digits(seed=seed)
            return arr, {"source": "builtin", "name": "digits", "path": None, "columns": None,
                         "column_names": [f"pixel{i}" for i in range(arr.shape[1])],
                         "seed": seed, "entropy": None}
        return _read_file(Path(text), columns)
    arr = np.array(spec, dtype=np.float64)
    if arr.ndim == 1:
        arr = arr.reshape(-1, 1)
    if columns is not None:
        arr = arr[:, [int(c) for c in columns]]
    return arr, {"source": "array", "name": "array", "path": None, "columns": None,
                 "column_names": None, "entropy": None}


def _read_file(path: Path, columns: Sequence[int | str] | None) -> tuple[np.ndarray, dict]:
    if not path.exists():
        raise DataError(
            f"{str(path)!r} is neither a built-in dataset ({', '.join(BUILTIN)}) nor an "
            "existing file"
        )
    arr = np.asarray(load(path, columns=columns))
    if arr.dtype.kind not in "biuf":
        validate(arr, name=path.name)
    arr = np.array(arr, dtype=np.float64)  # a writable in-memory copy (memmaps are read-only)
    if arr.ndim == 1:
        arr = arr.reshape(-1, 1)
    header = read_header(path)
    if columns is not None:
        names: list[str] | None = [
            str(c) if isinstance(c, str)
            else (header[c] if header and -len(header) <= c < len(header) else f"x{int(c) + 1}")
            for c in columns
        ]
    else:
        names = header if header and arr.ndim == 2 and len(header) == arr.shape[1] else None
    info = {"source": "file", "name": path.name, "path": str(path.resolve()),
            "columns": list(columns) if columns is not None else None, "column_names": names,
            "entropy": None}
    return arr, info


def versions() -> dict[str, str]:
    """The versions a run records: exactflow, torch, numpy, Python and the platform."""
    return {
        "exactflow": __version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
    }


def _now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %z")


# -- training a run -------------------------------------------------------------------------


def _prepare_out(out: Path, *, resume: bool, overwrite: bool) -> dict[str, Any] | None:
    """Check the run folder can be written; returns its run.json when resuming."""
    if out.exists() and not out.is_dir():
        raise RunError(f"the run folder {str(out)!r} is a file, not a folder")
    info_file = out / RUN_JSON
    if not info_file.exists():
        if out.exists() and any(out.iterdir()) and not overwrite:
            raise RunError(
                f"the run folder {str(out)!r} is not empty and holds no run; "
                "choose another folder (or overwrite it)"
            )
        return None
    try:
        previous = json.loads(info_file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        previous = {}
    status = previous.get("status")
    if resume:
        if status == "done":
            raise RunError(
                f"the run in {str(out)!r} already finished: nothing to resume "
                "(overwrite it to train it again)"
            )
        return previous
    if not overwrite:
        what = "a finished run" if status == "done" else "an interrupted run"
        hint = "" if status == "done" else " or resume to continue it"
        raise RunError(
            f"{str(out)!r} already holds {what}; overwrite it to replace it{hint}, "
            "or choose another folder"
        )
    return None


def _build_seeded(config: dict[str, Any], seed: int) -> Flow:
    """Build a model with its initialization drawn from ``seed`` (global RNG untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return models.build(config)


def train_run(
    data: Any,
    out: str | os.PathLike[str],
    *,
    model: str | dict[str, Any] = "maf",
    columns: Sequence[int | str] | None = None,
    samples: int = 20000,
    steps: int | None = None,
    epochs: int | None = None,
    batch_size: int = 512,
    lr: float = 1e-3,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    standardize: bool = True,
    device: str = "auto",
    seed: int = 0,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> Run:
    """Train a model on a table and write a run folder; returns the finished :class:`Run`.

    The data (see :func:`read_data`) is checked, split into train / validation / test with
    ``seed``, the model is built (with the training split's mean and standard deviation as
    its first, fixed layer when ``standardize``, so every log-density is in the units of the
    data), trained with :func:`exactflow.fit` keeping the weights of the best validation
    NLL, and evaluated on the test split. Everything that can fail on bad data fails before
    anything is written. Under ``torch.distributed`` every rank trains its share and rank 0
    alone writes the folder. Build the report with :func:`exactflow.report.build_report`.

    Args:
        data: a toy name, ``"digits"``, a CSV/``.npy``/``.npz`` path, or an array of rows.
        out: the run folder (created; refused if it holds another run, unless
            ``overwrite`` or ``resume``).
        model: a builder name (:func:`exactflow.models.available`) or a config
            ``{"model": name, **arguments}`` without ``features``.
        columns: columns of a file to use, by header name or index.
        samples: points drawn when ``data`` is a toy.
        steps, epochs: training length (default 2000 steps).
        batch_size, lr: as in :func:`exactflow.fit` (a batch larger than the training split
            is cut to it, with a note).
        val_fraction, test_fraction: the held-out fractions.
        standardize: put a standardization layer first.
        device: ``"cpu"``, ``"cuda"`` or ``"auto"``.
        seed: seed of the split, the initialization and the batches.
        resume: continue the interrupted run in ``out`` from its checkpoint.
        overwrite: replace the run in ``out``.
        progress: show a progress bar on a terminal.
        log: called with notes for the user (default: printed to stderr).

    Raises:
        DataError: bad data; RunError: a folder that cannot be written or resumed;
        exactflow.TrainingError: training diverged.
    """
    log = log or (lambda text: print(text, file=sys.stderr))
    out = Path(out)
    fraction(val_fraction, "val_fraction")
    fraction(test_fraction, "test_fraction")
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(
            f"val_fraction + test_fraction must be below 1, got {val_fraction + test_fraction}"
        )
    batch_size = positive_int(batch_size, "batch_size")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but CUDA is not available here")
    writer = distributed.rank() == 0
    # Under torchrun only rank 0 (the writer) checks and writes the run folder.
    previous = _prepare_out(out, resume=resume, overwrite=overwrite) if writer else None

    # Everything that can fail on bad data fails here, before anything is written.
    rows, data_info = read_data(data, columns, samples=samples, seed=seed)
    validate(rows, name=data_info["name"])
    fractions = (1.0 - val_fraction - test_fraction, val_fraction, test_fraction)
    n = len(rows)
    if n < 10:
        raise DataError(f"{data_info['name']} has {n} rows; a train/validation/test split "
                        "needs at least 10")
    train, val, test = split(rows, fractions, seed=seed)
    if min(len(train), len(val), len(test)) == 0:
        raise DataError(f"{data_info['name']}: {n} rows are too few for the fractions {fractions}")
    if batch_size > len(train):
        log(f"note: batch size {batch_size} is more than the {len(train)} training rows; "
            f"using {len(train)}")
        batch_size = len(train)
    features = rows.shape[1]
    config: dict[str, Any] = {"model": model} if isinstance(model, str) else dict(model)
    config.update(features=features, standardize=bool(standardize))
    try:
        flow = _build_seeded(config, seed)
    except (TypeError, ValueError) as err:
        raise ValueError(f"cannot build model {config.get('model')!r}: {err}") from None
    data_info.update(
        features=features,
        rows={"total": n, "train": len(train), "val": len(val), "test": len(test)},
        split_seed=seed,
        fractions=list(fractions),
    )
    options = {
        "steps": steps, "epochs": epochs, "batch_size": batch_size, "lr": lr,
        "device": device, "seed": seed, "standardize": standardize,
        "val_fraction": val_fraction, "test_fraction": test_fraction,
    }
    if previous is not None:
        for key, now in (("data", data_info), ("model", flow.config)):
            before = previous.get(key)
            if before is not None and json.loads(json.dumps(before)) != json.loads(
                json.dumps(now, default=str)
            ):
                raise RunError(
                    f"cannot resume {str(out)!r}: it was started with a different {key} "
                    f"({json.dumps(before, default=str)[:200]}); rerun the original command "
                    "with resume"
                )

    checkpoint = out / CHECKPOINT_FILE
    if writer:
        out.mkdir(parents=True, exist_ok=True)
        if not resume and checkpoint.exists():
            checkpoint.unlink()
    info: dict[str, Any] = {
        "format": RUN_FORMAT,
        "version": 1,
        "status": "training",
        "created": _now() if previous is None else previous.get("created", _now()),
        "command": ["exactflow", *sys.argv[1:]] if sys.argv and "exactflow" in sys.argv[0]
        else None,
        "data": data_info,
        "model": flow.config,
        "options": options,
        "versions": versions(),
    }
    if writer:
        atomic_write_json(out / RUN_JSON, info)

    total = steps if steps is not None else (None if epochs is not None else 2000)
    if total is not None:
        expected = total
    else:
        expected = max(1, positive_int(epochs, "epochs") * (len(train) // batch_size))
    history = fit(
        flow, train, val,
        steps=total, epochs=epochs, batch_size=batch_size, lr=lr,
        eval_every=max(1, expected // 100),
        checkpoint=checkpoint, checkpoint_every=max(1, expected // 10),
        resume=resume, device=device, seed=seed, progress=progress,
    )
    if not writer:
        return Run(out, info, flow, history.to_dict())
    trained_on = str(next(iter(flow.parameters())).device) if any(
        True for _ in flow.parameters()) else "cpu"
    test_metrics = evaluate(flow, test)
    val_metrics = evaluate(flow, val)
    flow.cpu()
    hist = history.to_dict()
    metrics = {
        "test": test_metrics,
        "val": val_metrics,
        "train_time_s": hist["time"][-1] if hist.get("time") else None,
        "steps": history.total_steps,
        "best_step": history.best_step,
        "rollbacks": len(history.rollbacks),
        "parameters": int(sum(p.numel() for p in flow.parameters())),
    }
    entropy = data_info.get("entropy")
    if entropy is not None and math.isfinite(test_metrics["nll"]):
        metrics["test_nll_minus_entropy"] = test_metrics["nll"] - entropy

    buf = io.BytesIO()
    np.savez(buf, train=train, val=val, test=test)
    atomic_write_bytes(out / DATA_FILE, buf.getvalue())
    save(flow, out / MODEL_FILE)
    atomic_write_json(out / HISTORY_FILE, hist)
    info.update(status="done", finished=_now(), metrics=metrics)
    info["options"]["device"] = trained_on
    atomic_write_json(out / RUN_JSON, info)
    if checkpoint.exists():
        checkpoint.unlink()
    return Run(out, json.loads((out / RUN_JSON).read_text(encoding="utf-8")), flow.eval(), hist)
