"""``exactflow train`` and ``exactflow demo``: a run folder from a table, and its report."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

from .. import distributed, models
from ..datasets import TOYS, DataError, read_header
from ..datasets.files import column_count
from ..io import read_json_record
from ..report import build_report
from ..runs import BUILTIN, LOCK_FILE, REPLACING_DIR, RUN_JSON, RunError, run_status, train_run
from .common import CommandError, UsageError, fmt, positions_named, say, with_key
from .parser import DEMO_DATASETS

__all__ = ["cmd_train", "cmd_demo"]


def _train(args: argparse.Namespace, **kwargs: Any) -> dict[str, Any]:
    """Train a run folder with :func:`exactflow.runs.train_run`; returns the result dict."""
    writer = distributed.rank() == 0
    notes: list[str] = []  # (--json: the notes on the data, in the JSON and on stderr)

    def log(text: str) -> None:
        if args.json and text.startswith("note: "):
            notes.append(text.removeprefix("note: "))
        if not args.json or text.startswith("note: "):
            print(text, file=sys.stderr)

    try:
        run = train_run(progress=not args.json and writer, log=log, **kwargs)
    except RunError as err:
        raise CommandError(str(err).replace("overwrite it", "pass --overwrite").replace(
            "resume to continue", "--resume to continue")) from None
    except KeyboardInterrupt as stop:  # (say what the folder holds and how to go on)
        out = Path(kwargs["out"])
        status = run_status(out)  # (a run stopped before it wrote anything leaves a folder's
        # earlier run as it was)
        if writer and status == "done" and (out / REPLACING_DIR).is_dir():
            cure = ("train it again with --overwrite" if kwargs["model"] == "auto" else
                    "continue it with the same command and --resume, or train it again "
                    "with --overwrite")
            raise type(stop)(f"the run in {str(out)!r} is left as it was: the new run did "
                             f"not replace it ({cure})") from None
        if not writer or status != "training":
            raise
        cure = ("train it again with the same command and --overwrite (a model chosen by "
                "the auto ladder cannot be resumed)" if kwargs["model"] == "auto" else
                f"continue it with the same command and --out {str(out)!r} --resume (or keep "
                "the best step it reached: --resume --steps 1, which trains no step and "
                "writes the model)")
        raise type(stop)(f"the run in {str(out)!r} did not finish; {cure}") from None
    if not writer:
        return {"ok": True, "run": str(run.path)}
    result: dict[str, Any] = {
        "ok": True,
        "run": str(run.path),
        "model": run.info["model"]["model"],
        "standardize": run.info["model"].get("standardize"),
        "data": run.info["data"]["name"],
        "metrics": run.info["metrics"],
        "report": None,
        "notes": notes,
    }
    return result


def _write_report(args: argparse.Namespace, result: dict[str, Any]) -> None:
    """Build the run's report (after its summary: the run is complete without it)."""
    if not getattr(args, "report", True):
        return
    try:
        result["report"] = str(build_report(result["run"]))
    except ImportError as err:  # (the run is complete: say how to get its report, exit 0)
        if err.name != "matplotlib":
            raise
        text = (f"no report: it needs matplotlib (pip install 'exactflow[plot]', then "
                f"`exactflow report {result['run']}`; --no-report skips it)")
        result["notes"].append(text)
        print(f"note: {text}", file=sys.stderr)
        return
    except KeyboardInterrupt as stop:
        raise type(stop)(f"the run in {result['run']!r} is complete, its report is not: "
                         f"write it with `exactflow report {result['run']}`") from None
    except OSError as err:  # (a full disk: the model is saved, and scores)
        where = f": {err.filename!r}" if err.filename else ""
        raise CommandError(f"{err.strerror or err}{where}; the run in "
                           f"{result['run']!r} is complete, its report is not: write it "
                           f"with `exactflow report {result['run']}`") from None
    say(args, f"report: {result['report']}")


def _print_train_result(args: argparse.Namespace, result: dict[str, Any]) -> None:
    m = result["metrics"]
    t = m["test"]
    board = m.get("leaderboard")
    kept = next((e for e in board or () if e.get("chosen")), None)
    chosen = result["model"] if kept is None else kept["name"]
    # The kept candidate's time on the leaderboard includes a mixture's search.
    seconds = m.get("train_time_s") if kept is None else kept.get("seconds")
    took = "?" if seconds is None else f"{float(seconds):.1f} s"
    say(args, f"trained {chosen} ({m['parameters']:,} parameters) on "
               f"{result['data']}: {m['steps']} steps in {took}")
    if board:
        say(args, "candidates (validation NLL, nats; the lowest is kept):")
        width = max(len(str(e["name"])) for e in board)
        for e in board:
            value = "" if e.get("val_nll") is None else f"{e['val_nll']:.4f}"
            mark = "  <- kept" if e.get("chosen") else ""
            status = "" if e.get("status", "ok") == "ok" else f"  ({e['status']})"
            say(args, f"  {e['name']:<{width}} {value:>10}  {e.get('seconds', 0.0):6.1f} s"
                       f"{mark}{status}")
    if m.get("best_step") is not None and m.get("steps"):
        say(args, f"kept the weights of step {m['best_step']} of {m['steps']} (the best "
                   "validation NLL)")
        if m["best_step"] == 0 and not board:
            say(args, "  no later validation check beat the flow as it started: training "
                       "made it worse from the first steps (too few rows for the model, or "
                       "too high a learning rate); --model auto starts flows from a fitted "
                       "mixture, or try a smaller model or a lower --lr")
    say(args, f"test NLL {fmt(t.get('nll'))} ± {fmt(t.get('nll_se'))} nats "
               f"({fmt(t.get('bpd'))} bits/dim, {t.get('n')} rows)")
    if t.get("n_nonfinite"):
        say(args, f"  {t['n_nonfinite']} of the test rows score -inf or NaN (values far beyond "
                   f"the training rows?); over the others the test NLL is "
                   f"{fmt(t.get('nll_finite'))} nats")
    far = m.get("test_dominant_rows")
    if far:
        one = far["rows"] == 1
        say(args, f"  {far['rows']} of the test rows score{'s' if one else ''} more than "
                   f"{far['nats_below_median']:.0f} nats below the median row and "
                   f"dominate{'s' if one else ''} the mean: over the other rows"
                   + ("" if far["of"] == t.get("n") else f" (of the first {far['of']:,})")
                   + f" the test NLL is {fmt(far['nll_of_the_others'])} nats")
    if "test_nll_minus_entropy" in m:
        say(args, f"test NLL - true entropy = {m['test_nll_minus_entropy']:+.4f} nats "
                   "(0 is a perfect model)")
    say(args, f"run folder: {result['run']}")


def cmd_train(args: argparse.Namespace) -> dict[str, Any]:
    with_key(args)
    # Under torchrun: join the process group (fit then trains data-parallel); the other
    # ranks stay silent and rank 0 writes the run folder and reports.
    joined = not distributed.initialized()  # (a group made by the caller is the caller's)
    rank, _ = distributed.init("gloo" if args.device == "cpu" else None)
    joined = joined and distributed.initialized()
    if rank != 0:
        args.json = False
    model: str | dict[str, Any] = "auto"
    if args.samples is not None and (args.data not in TOYS or Path(args.data).exists()):
        raise UsageError("--samples is the number of points drawn from a toy dataset; "
                         f"{args.data!r} is a file, whose rows are all used")
    if args.model != "auto":
        _check_model_options(args)
        model = {"model": args.model}
        if args.layers is not None:
            model["layers"] = args.layers
        if args.hidden is not None:
            model["hidden"] = args.hidden
        if args.base == "student":
            model["base"] = {"name": "student", "df": 5.0, "trainable": True}
        if args.budget is not None:
            raise UsageError("--budget limits the auto ladder; with --model NAME the "
                             "validation NLL sets the length (or --steps / --epochs)")
    elif args.layers is not None or args.hidden is not None or args.base is not None:
        raise UsageError("--layers, --hidden and --base set one model: give --model NAME "
                         "with them")
    else:
        given = [flag for flag, value in (
            ("--steps", args.steps), ("--epochs", args.epochs), ("--patience", args.patience),
            ("--batch-size", args.batch_size), ("--lr", args.lr)) if value is not None]
        if given:
            verb = "sets" if len(given) == 1 else "set"
            raise UsageError(f"{', '.join(given)} {verb} how one model trains, which the auto "
                             "ladder sets for each candidate: give --model NAME with "
                             f"{'it' if len(given) == 1 else 'them'}")
    if args.val_fraction + args.test_fraction >= 1.0:
        raise UsageError(f"--val-fraction + --test-fraction must be below 1, got "
                         f"{args.val_fraction + args.test_fraction:g}")
    if args.columns is not None and Path(args.data).is_file():
        positions_named("--columns", args.columns, read_header(args.data))
    if args.resume and args.out is None:
        raise UsageError("--resume continues the run in a folder: give it with --out RUN_DIR "
                         "(the folder the interrupted run named)")
    claimed = args.out is None and not distributed.initialized()
    out = args.out if args.out is not None else _default_out(args.data, claimed)
    if args.out is None and rank == 0 and _readable(args.data):
        say(args, f"run folder: {out} (choose another with --out)")
    try:
        result = _train(
            args, data=args.data, out=out, model=model,
            budget=args.budget if args.budget is not None else 300.0,
            columns=_all_but(args.data, args.drop, args.columns) if args.drop else args.columns,
            samples=20000 if args.samples is None else args.samples, steps=args.steps,
            epochs=args.epochs, patience=args.patience,
            batch_size=args.batch_size, lr=args.lr if args.lr is not None else 1e-3,
            val_fraction=args.val_fraction,
            test_fraction=args.test_fraction, standardize=args.standardize, bounds=args.bounds,
            dequantize=args.dequantize, missing=args.missing, device=args.device, seed=args.seed,
            resume=args.resume,
            overwrite=args.overwrite,
        )
    except BaseException:
        if claimed:
            _release(out)
        raise
    if joined:
        distributed.finish()
    if rank == 0:
        _print_train_result(args, result)
        _write_report(args, result)
    return result


def _all_but(data: str, drop: list[int | str], columns: Any) -> list[int | str]:
    """``--drop``: the columns of ``data`` other than ``drop`` (names where it has a header,
    else positions; a ``.npy`` file has positions only)."""
    if columns is not None:
        raise UsageError("--columns and --drop both choose the columns: give one of them")
    header = read_header(data) if Path(data).is_file() else None
    positions_named("--drop", drop, header)
    if header is not None:
        width = len(header)
    elif Path(data).suffix.lower() == ".npy" and Path(data).is_file():
        shape = np.load(data, mmap_mode="r", allow_pickle=False).shape
        if len(shape) != 2:
            raise DataError(f"--drop: {data!r} holds an array of shape {shape}, not a table")
        width = int(shape[1])
    elif Path(data).is_file() and (cells := column_count(data)) is not None:
        width = cells  # (a text table without a header: by position)
    else:
        raise DataError(f"--drop needs a table file (.csv, .tsv, .txt or .npy); {data!r} is "
                        "not one: choose the columns to keep with --columns")
    gone = set()
    for c in drop:
        if isinstance(c, str):
            if header is None or c not in header:
                raise DataError(f"--drop: {data!r} has no column named {c!r}"
                                + (f"; its columns are {header}" if header else ""))
            gone.add(header.index(c))
        elif -width <= c < width:
            gone.add(c % width)
        else:
            raise DataError(f"--drop: column index {c} is out of range for {width} columns")
    if len(gone) < len(drop):
        raise UsageError("--drop names a column more than once")
    if len(gone) == width:
        raise UsageError("--drop leaves no column to train on")
    keep = [j for j in range(width) if j not in gone]
    return [header[j] for j in keep] if header is not None else list(keep)


def _check_model_options(args: argparse.Namespace) -> None:
    """Options a named model would ignore are refused by name, as the auto ladder's are."""
    if args.model in models.CLOSED_FORM:
        given = [flag for flag, value in (
            ("--layers", args.layers), ("--hidden", args.hidden), ("--steps", args.steps),
            ("--epochs", args.epochs), ("--patience", args.patience),
            ("--batch-size", args.batch_size), ("--lr", args.lr), ("--base", args.base))
            if value is not None]
        if given:
            raise UsageError(f"{', '.join(given)}: --model {args.model} is fitted in closed "
                             "form, without layers, steps or another base")
    elif args.hidden is not None and not models.takes(args.model, "hidden"):
        raise UsageError(f"--hidden: --model {args.model} has no hidden layers")


def _readable(data: str) -> bool:
    """Whether DATA names a built-in data set or an existing file (``FILE:KEY`` too); a
    missing file is reported by the training itself, before any folder is named."""
    return data in BUILTIN or any(Path(p).exists() for p in (data, data.rsplit(":", 1)[0]))


def _default_out(data: str, claim: bool) -> Path:
    """``runs/<data name>``, or the first of ``runs/<name>-2``, ``-3``... that is free;
    with ``claim`` (one process), taken by creating it, so that two runs started at once
    each get a folder of their own (they both took the first free one and the second
    failed on the first one's lock)."""
    stem = Path(data).stem or "run"
    name = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in stem) or "run"
    if claim:
        Path("runs").mkdir(exist_ok=True)
    number = 1
    while True:
        candidate = Path("runs") / (name if number == 1 else f"{name}-{number}")
        number += 1
        if not claim:
            if not candidate.exists():
                return candidate
            continue
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue


def _release(out: Path) -> None:
    """Remove a folder :func:`_default_out` claimed for a run that failed before writing
    anything (the lock file at most)."""
    try:
        (out / LOCK_FILE).unlink(missing_ok=True)
        out.rmdir()
        out.parent.rmdir()  # (runs/ itself, where this run made it and nothing else is in it)
    except OSError:  # (not empty: the run wrote something, which stays)
        pass


DEMO_MODEL = {"model": "realnvp", "layers": 8, "hidden": [64, 64], "batch_norm": True}


def _made_by_demo(out: Path) -> bool:
    """Whether ``out`` holds a run like those ``exactflow demo`` writes (the demo's model on
    one of its toys): the demo replaces those alone unless told to."""
    try:
        info = read_json_record(out / RUN_JSON)
        model, data = info.get("model") or {}, info.get("data") or {}
        command = info.get("command")
    except (OSError, ValueError, AttributeError):
        return False
    if isinstance(command, list) and len(command) > 1 and command[1] != "demo":
        return False  # (the command line is recorded where exactflow ran as a program)
    return data.get("name") in DEMO_DATASETS and all(
        model.get(key) == value for key, value in DEMO_MODEL.items())


def cmd_demo(args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.out)
    say(args, f"exactflow demo: RealNVP (8 affine couplings, batch norm) on {args.dataset}, "
               f"{args.steps} steps")
    result = _train(
        args, data=args.dataset, out=out, samples=args.samples,
        model=DEMO_MODEL,
        steps=args.steps, batch_size=512, lr=2e-3, device=args.device, seed=args.seed,
        overwrite=args.overwrite or _made_by_demo(out),
    )
    _print_train_result(args, result)
    _write_report(args, result)
    if not args.json and result.get("report"):
        print(f"open {Path(result['report']).resolve().as_uri()} in a browser")
    return result
