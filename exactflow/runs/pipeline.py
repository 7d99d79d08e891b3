"""Training a run folder: :func:`train_run`, the pipeline behind ``exactflow train``."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import distributed, models
from ..datasets import check_full_rank, validate
from ..distributions import Flow
from ..io import atomic_write_bytes, atomic_write_json, read_json_record, save
from ..training import TrainingError, evaluate, fit, fit_auto
from ..training.batches import wrap
from ..training.metrics import dominant_test_rows
from ..transforms.standardize import describe_standardize, narrow_columns, resolve_standardize
from ..transforms.support import Support, bounds_spec, check_rows
from ..validation import (
    DataError,
    FilePositions,
    choice,
    counted,
    device_named,
    fraction,
    positive_int,
    training_rows_error,
)
from .data import (
    _now,
    integer_columns,
    read_data,
    split_changed,
    split_rows,
    stored_parts,
    versions,
    without_missing,
)
from .data import dequantize as dequantize_rows
from .folder import (
    CHECKPOINT_FILE,
    DATA_FILE,
    HISTORY_FILE,
    LOCK_FILE,
    MODEL_FILE,
    REPORT_DIR,
    RUN_FILES,
    RUN_FORMAT,
    RUN_JSON,
    Run,
    RunError,
    finish_replacement,
    locked,
    replace_run,
    replacing,
)
from .notes import below_zero_note, column_ranges, data_notes, split_notes

__all__ = ["train_run"]


def _protect_input(data: Any, out: Path) -> None:
    """Refuse a run folder whose run files would overwrite the data being read."""
    if not isinstance(data, (str, os.PathLike)) or not Path(data).exists():
        return
    source = Path(data).resolve()
    for name in RUN_FILES:
        target = (out / name).resolve()
        if source == target or target in source.parents:
            raise RunError(
                f"the data {str(data)!r} is where the run writes its {name}: training into "
                f"{str(out)!r} would overwrite it; choose another run folder"
            )


def _prepare_out(out: Path, *, resume: bool, overwrite: bool) -> dict[str, Any] | None:
    """Check the run folder can be written; returns its run.json when resuming."""
    if out.exists() and not out.is_dir():
        raise RunError(f"the run folder {str(out)!r} is a file, not a folder")
    info_file = out / RUN_JSON
    if not info_file.exists():
        if out.exists() and any(p.name != LOCK_FILE for p in out.iterdir()) and not overwrite:
            raise RunError(
                f"the run folder {str(out)!r} is not empty and holds no run; "
                "choose another folder (or overwrite it)"
            )
        return None
    previous: Any = {}
    with contextlib.suppress(OSError, ValueError):
        previous = read_json_record(info_file)
    if not isinstance(previous, dict):
        previous = {}
    status = previous.get("status")
    if resume:
        if status == "done":
            raise RunError(
                f"the run in {str(out)!r} already finished: nothing to resume "
                "(overwrite it to train it again)"
            )
        if status == "failed":
            raise RunError(
                f"the run in {str(out)!r} failed "
                f"({str(previous.get('error', 'training diverged')).rstrip('.')}); resuming "
                "would start where it failed: overwrite it to train it again"
            )
        return previous
    if not overwrite:
        what = {"done": "a finished run", "failed": "a failed run"}.get(
            status, "an interrupted run")
        auto = (previous.get("options") or {}).get("model") == "auto"
        hint = "" if status in ("done", "failed") or auto else " or resume to continue it"
        raise RunError(
            f"{str(out)!r} already holds {what}; overwrite it to replace it{hint}, "
            "or choose another folder"
        )
    return None


def _silent(text: str) -> None:
    """A ``log`` that drops its notes."""


def _build_seeded(config: dict[str, Any], seed: int) -> Flow:
    """Build a model with its initialization drawn from ``seed`` (global RNG untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return models.build(config)


def train_run(
    data: Any,
    out: str | os.PathLike[str],
    *,
    model: str | dict[str, Any] = "auto",
    budget: float = 300.0,
    columns: Sequence[int | str] | None = None,
    samples: int = 20000,
    steps: int | None = None,
    epochs: int | None = None,
    patience: int | None = None,
    batch_size: int | None = None,
    lr: float = 1e-3,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    standardize: bool | str = "auto",
    bounds: Any = None,
    dequantize: bool = False,
    missing: str = "error",
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
    data; ``"auto"`` pools one scale over columns on one range, see
    :meth:`~exactflow.transforms.Standardize.choose_scale`), trained with
    :func:`exactflow.fit` keeping the weights of the best validation NLL, and evaluated on
    the test split. Everything that can fail on bad data fails before
    anything is written. Under ``torch.distributed`` every rank trains its share and rank 0
    alone writes the folder. Build the report with :func:`exactflow.report.build_report`.

    Args:
        data: a toy name, ``"digits"``, a CSV/``.npy``/``.npz`` path, or an array of rows.
        out: the run folder (created; refused if it holds another run, unless
            ``overwrite`` or ``resume``).
        model: ``"auto"`` (a short ladder of models within ``budget`` seconds, the best on
            the validation split kept: :func:`exactflow.fit_auto`), a builder name
            (:func:`exactflow.models.available`), or a config ``{"model": name,
            **arguments}`` without ``features``.
        budget: with ``model="auto"``, the seconds the ladder may take.
        columns: columns of a file to use, by header name or index.
        samples: points drawn when ``data`` is a toy.
        steps, epochs: a fixed training length; by default the length is set by the
            validation split (see :func:`exactflow.fit`).
        patience: epochs without improvement of the validation NLL before stopping.
        batch_size, lr: as in :func:`exactflow.fit` (a batch larger than the training split
            is cut to it, with a note; by default it follows the number of rows).
        val_fraction, test_fraction: the held-out fractions.
        standardize: put a standardization layer first: ``"auto"``, ``True`` (one scale per
            column), ``"pooled"`` (one scale for all columns) or ``False``.
        bounds: limits of the columns (:func:`~exactflow.transforms.support.bounds_spec`,
            a dict by name too): the model maps them onto the real line first; a row on or
            outside one is refused.
        dequantize: add uniform noise in [0, 1) to the integer-valued columns (counts,
            levels, pixels), so the log-densities are the documented lower bound of the
            discrete log-probability (:func:`exactflow.runs.dequantize`); without it, a run
            on integer columns notes them.
        missing: a CSV's rows with a missing value: ``"error"`` names the first,
            ``"skip"`` leaves them out, with a note of how many and which.
        device: ``"cpu"``, ``"cuda"`` or ``"auto"``.
        seed: seed of the split, the initialization and the batches.
        resume: continue the interrupted run in ``out`` from its checkpoint.
        overwrite: replace the run in ``out``.
        progress: show a progress bar on a terminal, a line every 30 seconds elsewhere.
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
    if batch_size is not None:
        batch_size = positive_int(batch_size, "batch_size")
    choice(missing, "missing", ("error", "skip"))
    if device != "auto":
        device_named(device)  # an unknown name, or a device this machine lacks
    if model == "auto" and resume:
        raise ValueError("resume continues the training of one named model (e.g. --model "
                         "maf); a run of the auto ladder is trained again with overwrite")
    writer = distributed.rank() == 0
    if writer:
        _protect_input(data, out)
    else:  # under torchrun the notes come once, from rank 0
        log = _silent
    return _train(
        data, out, writer, model=model, budget=budget, columns=columns, samples=samples,
        steps=steps, epochs=epochs, patience=patience, batch_size=batch_size, lr=lr,
        val_fraction=val_fraction, test_fraction=test_fraction, standardize=standardize,
        bounds=bounds, dequantize=dequantize, missing=missing, device=device, seed=seed,
        resume=resume, overwrite=overwrite, progress=progress, log=log,
    )


def _train(data: Any, out: Path, writer: bool, *, model: str | dict[str, Any], budget: float,
           columns: Sequence[int | str] | None, samples: int, steps: int | None,
           epochs: int | None, patience: int | None, batch_size: int | None, lr: float,
           val_fraction: float, test_fraction: float, standardize: bool | str, bounds: Any,
           dequantize: bool,
           missing: str, device: str, seed: int, resume: bool, overwrite: bool, progress: bool,
           log: Callable[[str], None]) -> Run:
    # Under torchrun only rank 0 (the writer) checks and writes the run folder.
    if writer and (out / LOCK_FILE).exists():
        with locked(out):  # a run writing the folder now is named as such, not "interrupted"
            pass
    if writer and out.is_dir():
        finish_replacement(out)
    # A replacement of a finished run that stopped while training resumes where it is (every
    # rank looks: the checkpoint's path must agree).
    stage = replacing(out, resume=True) if resume else None
    previous = _prepare_out(stage or out, resume=resume, overwrite=overwrite) if writer else None

    # Everything that can fail on bad data fails here, before anything is written.
    rows, data_info = read_data(data, columns, samples=samples, seed=seed, finite=True,
                                missing="nan" if missing == "skip" else "error")
    rows, dropped = without_missing(rows, data_info) if missing == "skip" else (rows, [])
    if writer and len(rows) >= 100_000:  # (checks and the split take seconds: say so)
        log(f"read {len(rows):,} rows of {rows.shape[1]} columns; checking and splitting them")
    discrete = integer_columns(rows)
    names = data_info.get("column_names") or FilePositions.of(data_info.get("columns"))
    # (said once every check has passed)
    notes = dropped + data_notes(rows, discrete, names or None, dequantized=dequantize,
                       dequantize_fix="--dequantize (or train_run(..., dequantize=True))",
                       drop_fix="--drop or --columns, or train_run(..., columns=[...])")
    data_info["ranges"] = column_ranges(rows)  # (raw: score reads raw rows)
    if dequantize:  # first: a blank pixel is a constant column until it is dequantized
        rows = dequantize_rows(rows, discrete, seed)
        data_info["dequantized_columns"] = discrete
    validate(rows, name=data_info["name"], columns=names)
    if (bounds := bounds_spec(bounds, rows.shape[1], names or None)) is not None:
        check_rows(Support(bounds, rows.shape[1]), rows, data_info["name"], names)
    check_full_rank(rows, data_info["name"], names)
    if discrete and not dequantize:
        data_info["integer_columns"] = discrete
    fractions = (1.0 - val_fraction - test_fraction, val_fraction, test_fraction)
    n = len(rows)
    if n < 10:
        raise DataError(f"{data_info['name']} has {counted(n, 'row')}; a train/validation/test "
                        "split needs at least 10")
    parts, distinct = split_rows(rows, fractions, seed, data_info)  # (and their rows)
    notes += split_notes(parts, distinct, fractions, data_info["name"])
    data_info["notes"] = notes
    train, val, test = (rows[part] for part in parts)
    features = rows.shape[1]
    del rows  # (the parts hold every row: the table itself need not stay in memory)
    if 1 < train.shape[1] >= len(train):
        held = f"{counted(len(val), 'validation row')} and {counted(len(test), 'test row')}"
        err = training_rows_error(held, len(train), train.shape[1])
        raise DataError(f"{data_info['name']}: {err}")
    for note in notes:
        log(f"note: {note}")
    requested, standardize = standardize, resolve_standardize(standardize, train)
    if requested == "auto" and standardize == "pooled" and (narrow := narrow_columns(train)):
        log(f"note: one scale for all columns (pooled), but column(s) {narrow} span under 1% of "
            "the median column's range: if they are in other units, --standardize columns")
    if requested == "auto" and previous is not None and previous.get("model"):
        # Resuming: the scaling the run started with (an older default chose per column).
        standardize = previous["model"].get("standardize", standardize)
    if batch_size is not None and batch_size > len(train):
        log(f"note: batch size {batch_size} is more than the {len(train)} training rows; "
            f"using {len(train)}")
        batch_size = len(train)
    auto = model == "auto"
    flow: Flow | None = None
    if not auto:
        config: dict[str, Any] = {"model": model} if isinstance(model, str) else dict(model)
        config.update(features=features, standardize=standardize, bounds=bounds)
        try:
            flow = _build_seeded(config, seed)
        except (TypeError, ValueError) as err:
            raise ValueError(f"cannot build model {config.get('model')!r}: {err}") from None
    data_info.update(
        features=features,
        rows={"total": n, "train": len(train), "val": len(val), "test": len(test),
              "distinct": distinct},
        split_seed=seed,
        fractions=list(fractions),
    )
    options = {
        "model": "auto" if auto else config.get("model"), "budget": budget if auto else None,
        "steps": steps, "epochs": epochs, "patience": patience, "batch_size": batch_size,
        "lr": lr, "device": device, "seed": seed, "standardize": requested,
        "dequantize": dequantize, "val_fraction": val_fraction, "test_fraction": test_fraction,
        "bounds": bounds,
    }
    if previous is not None and (previous.get("options") or {}).get("model") == "auto":
        raise RunError(
            f"the run in {str(out)!r} was choosing its model (auto) when it stopped, which "
            "cannot be resumed: train it again with overwrite (--overwrite in the command "
            "line)"
        )
    if previous is not None:
        for key, now in (("data", data_info), ("model", None if flow is None else flow.config)):
            before = previous.get(key)
            if now is None or before is None:
                continue
            now = json.loads(json.dumps(now, default=str))
            changed = [f"{k}: {json.dumps(before.get(k))[:60]} -> {json.dumps(now.get(k))[:60]}"
                       for k in sorted((set(before) | set(now)) - {"split"})
                       if before.get(k) != now.get(k)]
            if key == "data" and not changed and split_changed(n, fractions, seed, before,
                                                               now):
                raise RunError(
                    f"cannot resume {str(out)!r}: its data now split into other train, "
                    "validation and test rows than when it started (the data changed, or "
                    "the run was written by a version that placed repeated rows otherwise), "
                    "so its test rows would no longer be held out; train it again with "
                    "overwrite (--overwrite in the command line)")
            if changed:
                raise RunError(
                    f"cannot resume {str(out)!r}: it was started with another {key} ("
                    f"{'; '.join(changed[:4])}); resume with the data and options it was "
                    "started with (--resume in the command line)"
                )

    if not auto:
        log(describe_standardize(standardize))
    with locked(out) if writer else contextlib.nullcontext():
        if writer:  # again, under the lock: another run may have started meanwhile
            _prepare_out(stage or out, resume=resume, overwrite=overwrite)
        if writer and not resume:  # (a finished run keeps scoring until the new one is done)
            stage = replacing(out)
        run = _write_run(
            stage or out, writer, flow, train, val, test, data_info, options, previous,
            model=model, val_origin=parts[1], replaces=out if stage else None,
            budget=budget, steps=steps, epochs=epochs, patience=patience,
            batch_size=batch_size, lr=lr, standardize=standardize, device=device, seed=seed,
            resume=resume, progress=progress, log=log,
        )
        if stage is not None and writer:  # (every rank resumes there; one moves it in)
            replace_run(stage, out)
        run.path = out
        return run


def _write_run(out: Path, writer: bool, flow: Flow | None, train: Any, val: Any,
               test: Any, data_info: dict[str, Any], options: dict[str, Any],
               previous: dict[str, Any] | None, *, model: Any, budget: float,
               steps: int | None, epochs: int | None, patience: int | None,
               batch_size: int | None, lr: float, standardize: bool | str, device: str, seed: int,
               resume: bool, progress: bool, log: Callable[[str], None],
               val_origin: np.ndarray, replaces: Path | None) -> Run:
    checkpoint = out / CHECKPOINT_FILE
    if writer:
        out.mkdir(parents=True, exist_ok=True)
        if not resume:  # a run replaced: nothing of it may describe the new one
            for name in (CHECKPOINT_FILE, MODEL_FILE, HISTORY_FILE, DATA_FILE):
                (out / name).unlink(missing_ok=True)
            shutil.rmtree(out / REPORT_DIR, ignore_errors=True)
        elif not checkpoint.exists():
            log("note: the interrupted run left no checkpoint (it stopped before its first "
                "one): training starts again from step 0")
    info: dict[str, Any] = {
        "format": RUN_FORMAT,
        "version": 1,
        "status": "training",
        "created": _now() if previous is None else previous.get("created", _now()),
        "command": ["exactflow", *sys.argv[1:]] if sys.argv and "exactflow" in sys.argv[0]
        else None,
        "data": data_info,
        "model": None if flow is None else flow.config,
        "options": options,
        "versions": versions(),
    }
    if writer:
        atomic_write_json(out / RUN_JSON, info)

    leaderboard = None
    try:
        if flow is None:
            held = wrap(val, "validation data", val.shape[1], strict=True)
            held.origin = val_origin  # (its rows named by their numbers in the file)
            result = fit_auto(train, held, budget=budget, standardize=standardize, seed=seed,
                              bounds=options.get("bounds"), device=device, progress=False,
                              log=log)
            flow, history = result.flow, result.history
            leaderboard = [entry.to_dict() for entry in result.leaderboard]
            info["model"] = flow.config
        else:
            history = fit(
                flow, train, val,
                steps=steps, epochs=epochs, patience=patience, batch_size=batch_size, lr=lr,
                checkpoint=checkpoint, resume=resume, device=device, seed=seed,
                progress=progress,
            )
    except (TrainingError, ValueError) as err:  # (a DataError is a ValueError)
        if not writer:
            raise
        # A diverged run cannot be resumed (it would start where it blew up), nor one whose
        # data or settings training refused: mark it failed, drop its checkpoint, say how
        # to train again.
        checkpoint.unlink(missing_ok=True)
        if replaces is not None:  # (the finished run it was to replace stays)
            shutil.rmtree(out, ignore_errors=True)
            raise type(err)(f"{str(err).rstrip('.')}. The run in {str(replaces)!r} is left "
                            "as it was: the new run did not replace it.") from err
        info.update(status="failed", finished=_now(), error=str(err))
        atomic_write_json(out / RUN_JSON, info)
        raise type(err)(
            f"{str(err).rstrip('.')}. The run in {str(out)!r} is marked failed; train it "
            "again with overwrite (--overwrite in the command line)."
        ) from err
    if not writer:
        return Run(out, info, flow, history.to_dict())
    trained_on = str(next(iter(flow.parameters())).device) if any(
        True for _ in flow.parameters()) else "cpu"
    test_metrics = evaluate(flow, test)
    dominant = dominant_test_rows(flow, test)
    val_metrics = evaluate(flow, val)
    if below := below_zero_note(flow, data_info):
        log(f"note: {below}")
        data_info["notes"].append(below)
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
    if dominant is not None:
        metrics["test_dominant_rows"] = dominant
    if leaderboard is not None:
        metrics["leaderboard"] = leaderboard
        kept = next((e for e in leaderboard if e.get("chosen")), None)
        if kept is not None:  # its time includes a mixture's search
            metrics["train_time_s"] = kept.get("seconds")
    entropy = data_info.get("entropy")
    if entropy is not None and math.isfinite(test_metrics["nll"]):
        metrics["test_nll_minus_entropy"] = test_metrics["nll"] - entropy

    buf = io.BytesIO()
    np.savez(buf, **stored_parts(train=train, val=val, test=test))  # (float32 where exact)
    atomic_write_bytes(out / DATA_FILE, buf.getvalue())
    save(flow, out / MODEL_FILE)
    atomic_write_json(out / HISTORY_FILE, hist)
    info.update(status="done", finished=_now(), metrics=metrics)
    info["options"]["device"] = trained_on
    atomic_write_json(out / RUN_JSON, info)
    if checkpoint.exists():
        checkpoint.unlink()
    return Run(out, json.loads((out / RUN_JSON).read_text(encoding="utf-8")), flow.eval(), hist)
