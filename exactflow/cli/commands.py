"""The ``exactflow`` commands: each takes the parsed arguments and returns its result.

Every command returns a JSON-able dict (and, for ``check``, an exit code); :func:`main` prints
it with ``--json``, or the command prints its own text. Failures the user can fix raise an
exception that :func:`main` turns into one line on stderr and exit code 1 (2 for usage
errors); ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import distributed, models
from ..datasets import DataError, read_header, toy
from ..diagnostics import check_layers, format_check_table
from ..io import CheckpointError, atomic_write_bytes, csv_rows, json_safe, write_table
from ..report import build_report
from ..runs import RunError, anomaly, load_run, read_data, train_run
from ..training import TrainingError
from ..validation import nonfinite_rows_error
from .output import SampleStream, json_cap_error, silence_stdout
from .parser import PROG, build_parser
from .threads import ThreadsError, choose_threads

__all__ = ["main", "CommandError"]


class CommandError(Exception):
    """A failure the user can fix (bad data, bad run folder): printed as one line, exit 1."""


class UsageError(CommandError):
    """A usage error found after parsing (exit 2)."""


# -- entry point ----------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 ok, 1 bad data or run, 2 usage).

    A closed output pipe (``exactflow sample ... | head``) ends the command quietly with
    exit code 141 (128 + SIGPIPE, as a shell reports it), without a traceback.
    """
    try:
        return _main(argv)
    except BrokenPipeError:
        silence_stdout()
        return 141


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse: --help (0) or a usage error (2)
        code = exit_.code
        return code if isinstance(code, int) else (0 if code is None else 2)
    threads_before = torch.get_num_threads()
    try:
        threads, _ = choose_threads(args)
        if threads is not None and threads != threads_before:
            torch.set_num_threads(threads)
        result = COMMANDS[args.command](args)
    except KeyboardInterrupt:
        _fail(args, "interrupted")
        return 130
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
        print(json.dumps(json_safe(result), indent=2, allow_nan=False))
        sys.stdout.flush()
    return code


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


def _say(args: argparse.Namespace, text: str) -> None:
    if not args.json:
        print(text, flush=True)


def _fmt(value: Any, spec: str = ".4f") -> str:
    if value is None:
        return "n/a"
    v = float(value)
    return format(v, spec) if math.isfinite(v) else str(v)


# -- train / demo ---------------------------------------------------------------------


def _train(args: argparse.Namespace, **kwargs: Any) -> dict[str, Any]:
    """Train a run folder with :func:`exactflow.runs.train_run`; returns the result dict."""
    writer = distributed.rank() == 0
    try:
        run = train_run(
            progress=not args.json and writer,
            log=lambda text: None if args.json else print(text, file=sys.stderr),
            **kwargs,
        )
    except RunError as err:
        raise CommandError(str(err).replace("overwrite it", "pass --overwrite").replace(
            "resume to continue", "--resume to continue")) from None
    if not writer:
        return {"ok": True, "run": str(run.path)}
    result: dict[str, Any] = {
        "ok": True,
        "run": str(run.path),
        "model": run.info["model"]["model"],
        "data": run.info["data"]["name"],
        "metrics": run.info["metrics"],
        "report": None,
    }
    if getattr(args, "report", True):
        result["report"] = str(build_report(run.path))
    return result


def _print_train_result(args: argparse.Namespace, result: dict[str, Any]) -> None:
    m = result["metrics"]
    t = m["test"]
    seconds = m.get("train_time_s")
    took = "?" if seconds is None else f"{float(seconds):.1f} s"
    _say(args, f"trained {result['model']} ({m['parameters']:,} parameters) on "
               f"{result['data']}: {m['steps']} steps in {took}")
    board = m.get("leaderboard")
    if board:
        _say(args, "candidates (validation NLL, nats; the lowest is kept):")
        for e in board:
            value = "" if e.get("val_nll") is None else f"{e['val_nll']:.4f}"
            mark = "  <- kept" if e.get("chosen") else ""
            status = "" if e.get("status", "ok") == "ok" else f"  ({e['status']})"
            _say(args, f"  {e['name']:<22} {value:>10}  {e.get('seconds', 0.0):6.1f} s"
                       f"{mark}{status}")
    if m.get("best_step") is not None:
        _say(args, f"kept the weights of step {m['best_step']} of {m['steps']} (the best "
                   "validation NLL)")
    _say(args, f"test NLL {_fmt(t.get('nll'))} ± {_fmt(t.get('nll_se'))} nats "
               f"({_fmt(t.get('bpd'))} bits/dim, {t.get('n')} rows)")
    if "test_nll_minus_entropy" in m:
        _say(args, f"test NLL - true entropy = {m['test_nll_minus_entropy']:+.4f} nats "
                   "(0 is a perfect model)")
    _say(args, f"run folder: {result['run']}")
    if result.get("report"):
        _say(args, f"report: {result['report']}")


def cmd_train(args: argparse.Namespace) -> dict[str, Any]:
    # Under torchrun: join the process group (fit then trains data-parallel); the other
    # ranks stay silent and rank 0 writes the run folder and reports.
    rank, _ = distributed.init("gloo" if args.device == "cpu" else None)
    if rank != 0:
        args.json = False
    model: str | dict[str, Any] = "auto"
    if args.model != "auto":
        model = {"model": args.model}
        if args.layers is not None:
            model["layers"] = args.layers
        if args.hidden is not None:
            model["hidden"] = args.hidden
    elif args.layers is not None or args.hidden is not None:
        raise UsageError("--layers and --hidden size one model: give --model NAME with them")
    out = args.out if args.out is not None else _default_out(args.data)
    if args.out is None and rank == 0:
        _say(args, f"run folder: {out} (choose another with --out)")
    result = _train(
        args, data=args.data, out=out, model=model, budget=args.budget, columns=args.columns,
        samples=args.samples, steps=args.steps, epochs=args.epochs, patience=args.patience,
        batch_size=args.batch_size, lr=args.lr, val_fraction=args.val_fraction,
        test_fraction=args.test_fraction, standardize=args.standardize,
        dequantize=args.dequantize, device=args.device, seed=args.seed, resume=args.resume,
        overwrite=args.overwrite,
    )
    if rank == 0:
        _print_train_result(args, result)
    return result


def _default_out(data: str) -> Path:
    """``runs/<data name>``, or the first of ``runs/<name>-2``, ``-3``... that is free."""
    stem = Path(data).stem or "run"
    name = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in stem) or "run"
    candidate = Path("runs") / name
    number = 2
    while candidate.exists():
        candidate = Path("runs") / f"{name}-{number}"
        number += 1
    return candidate


def cmd_demo(args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.out)
    _say(args, f"exactflow demo: RealNVP (8 affine couplings, batch norm) on {args.dataset}, "
               f"{args.steps} steps")
    result = _train(
        args, data=args.dataset, out=out, samples=args.samples,
        model={"model": "realnvp", "layers": 8, "hidden": [64, 64], "batch_norm": True},
        steps=args.steps, batch_size=512, lr=2e-3, device=args.device, seed=args.seed,
        overwrite=(out / "run.json").exists(),
    )
    _print_train_result(args, result)
    if not args.json and result.get("report"):
        print(f"open {Path(result['report']).resolve().as_uri()} in a browser")
    return result


# -- sample / score -------------------------------------------------------------------

_TABLE_SUFFIXES = (".csv", ".npy", ".txt", ".tsv")


def _output_path(args: argparse.Namespace) -> Path | None:
    """The ``-o`` file of ``sample``/``score``, checked before any work is done."""
    if not args.output:
        return None
    out = Path(args.output)
    if out.suffix.lower() not in _TABLE_SUFFIXES:
        raise CommandError(f"cannot write {str(out)!r}: use a .csv or .npy file name")
    if out.is_dir():
        raise CommandError(f"cannot write {str(out)!r}: it is a folder; give a file name")
    if not out.parent.is_dir():
        raise CommandError(
            f"cannot write {str(out)!r}: folder {str(out.parent)!r} does not exist"
        )
    return out


def _write_table(path: Path, array: np.ndarray, header: list[str], fmt: str = "%.9g") -> None:
    """Write rows as CSV or .npy, atomically (chosen by the file extension)."""
    if path.suffix.lower() == ".npy":
        buf = io.BytesIO()
        np.save(buf, array)
        atomic_write_bytes(path, buf.getvalue())
        return
    delim = "\t" if path.suffix.lower() == ".tsv" else ","
    atomic_write_bytes(path, _csv_text(array, header, delim, fmt).encode("utf-8"))


def _csv_text(array: np.ndarray, header: list[str], delim: str = ",", fmt: str = "%.9g") -> str:
    buf = io.StringIO()
    np.savetxt(buf, array, delimiter=delim, header=delim.join(header), comments="", fmt=fmt)
    return buf.getvalue()


def cmd_sample(args: argparse.Namespace) -> dict[str, Any]:
    """Draw ``-n`` samples, streamed a chunk at a time to the file or stdout (memory stays
    bounded whatever ``n``; ``--json`` without ``-o`` is capped): see :mod:`.output`."""
    run = load_run(args.run)
    flow = run.flow
    assert flow is not None
    out = _output_path(args)
    cap = json_cap_error(args.n, run.features) if args.json and out is None else None
    if cap:
        raise CommandError(cap)
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little")
    samples = SampleStream(flow, args.n, seed, run.features)
    result: dict[str, Any] = {
        "ok": True, "n": args.n, "features": run.features, "columns": run.columns,
        "seed": seed, "output": str(out) if out else None,
    }
    if out is not None:
        write_table(out, samples, rows=args.n, columns=run.columns)
        _say(args, f"wrote {args.n} samples ({run.features} columns) to {out}")
    elif args.json:
        result["samples"] = np.concatenate(list(samples)).tolist()
    else:
        sys.stdout.write(",".join(run.columns) + "\n")
        for block in samples:
            sys.stdout.write(csv_rows(block))
            sys.stdout.flush()
    result["non_finite_rows"] = samples.non_finite_rows
    return result


def _finite_stat(fn: Callable[[np.ndarray], Any], values: np.ndarray) -> float | None:
    v = values[np.isfinite(values)]
    return float(fn(v)) if v.size else None


def _score_columns(args: argparse.Namespace, run: Any) -> list[int | str] | None:
    """The columns of DATA to score: ``--columns``; else, when DATA has a header and the
    run knows its columns' names, those names (so a file whose columns come in another
    order is reordered, and a missing column is a clear error); else the run's own
    ``--columns`` (positions)."""
    if args.columns is not None:
        return list(args.columns)
    data_info = run.info["data"]
    names = data_info.get("column_names")
    header = read_header(args.data) if isinstance(args.data, str) else None
    if names and header is not None:
        missing = [n for n in names if n not in header]
        if missing:
            raise DataError(
                f"{args.data!r} has no column named {missing[0]!r} (the model of "
                f"{args.run!r} was trained on columns {names}; the file has {header})"
            )
        return list(names)
    if data_info.get("source") == "file":
        return data_info.get("columns")
    return None


def cmd_score(args: argparse.Namespace) -> dict[str, Any]:
    run = load_run(args.run)
    out = _output_path(args)
    data, info = read_data(args.data, _score_columns(args, run), seed=0)
    d = run.features
    if data.shape[1] != d:
        raise DataError(
            f"{info['name']} has {data.shape[1]} columns but the model of {args.run!r} was "
            f"trained on {d}" + ("; pick them with --columns" if data.shape[1] > d else "")
        )
    bad = np.flatnonzero(np.isnan(data).any(axis=1))
    if bad.size:
        raise nonfinite_rows_error(info["name"], int(bad.size), bad.tolist())
    if len(data) == 0:
        raise DataError(f"{info['name']} has no rows")
    scores = run.score(data)
    q = args.threshold_quantile
    try:
        calibration = run.calibration()
    except RunError:
        if q is not None:
            raise
        calibration = None  # log-densities only: the held-out rows are gone
    p = flags = None
    if calibration is not None:
        p = anomaly.p_values(scores, calibration)
    if q is not None and calibration is not None:
        p, flags = anomaly.flag(scores, calibration, q)
    outside = int(np.isneginf(scores).sum())
    result: dict[str, Any] = {
        "ok": True, "n": int(len(scores)), "output": str(out) if out else None,
        "mean_log_density": _finite_stat(np.mean, scores),
        "min_log_density": _finite_stat(np.min, scores),
        "max_log_density": _finite_stat(np.max, scores),
        "minus_inf_rows": outside,
        "calibration_rows": None if calibration is None else int(len(calibration)),
        "lower_bound": bool(run.dequantized),
    }
    columns, header = [scores], ["log_density"]
    if p is not None:
        columns.append(p)
        header.append("p_value")
    if flags is not None:
        columns.append(flags.astype(np.float64))
        header.append("anomaly")
        result.update(threshold_quantile=q, anomalies=int(flags.sum()),
                      anomaly_rows=np.flatnonzero(flags)[:1000].tolist())
    table = np.stack(columns, axis=1)
    rows = np.arange(len(scores), dtype=np.float64).reshape(-1, 1)
    if out is not None:
        if out.suffix.lower() == ".npy":
            _write_table(out, table, header)
        else:
            _write_table(out, np.hstack([rows, table]), ["row", *header], fmt="%.10g")
        _say(args, f"scored {len(scores)} rows of {info['name']}: mean log-density "
                   f"{_fmt(result['mean_log_density'])} nats; wrote {out}")
        if outside:
            _say(args, f"{outside} rows have log-density -inf (outside the model's support or "
                       "beyond the range of its numbers): flagged as anomalies")
        if flags is not None and calibration is not None:
            _say(args, f"{int(flags.sum())} rows flagged as anomalies: conformal p-value <= "
                       f"{q:g} against the {len(calibration)} held-out test rows, so about "
                       f"{q:.1%} of new normal rows are flagged")
    elif args.json:
        result["log_density"] = scores.tolist()
        if p is not None:
            result["p_value"] = p.tolist()
        if flags is not None:
            result["anomaly"] = flags.tolist()
    else:
        sys.stdout.write(_csv_text(np.hstack([rows, table]), ["row", *header], fmt="%.10g"))
    return result


# -- check / report -------------------------------------------------------------------


def _build_seeded(config: dict[str, Any], seed: int) -> Any:
    """Build a model with its initialization drawn from ``seed`` (global RNG untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            return models.build(config)
        except (TypeError, ValueError) as err:
            raise CommandError(f"cannot build model {config['model']!r}: {err}") from None


def _perturb(flow: Any, scale: float, seed: int) -> None:
    """Move every parameter away from its initialization (many layers start as identity)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype).to(p.device))


def cmd_check(args: argparse.Namespace) -> tuple[dict[str, Any], int]:
    if (args.run is None) == (args.model is None):
        raise UsageError("give either RUN_DIR or --model NAME")
    if args.run is not None:
        run = load_run(args.run)
        flow = run.flow
        try:
            x = run.data("test")
        except RunError:  # fall back to the model's own samples
            x = None
        what = f"run {args.run}"
    else:
        config: dict[str, Any] = {"model": args.model, "features": args.features}
        if args.layers is not None:
            config["layers"] = args.layers
        if args.hidden is not None:
            config["hidden"] = args.hidden
        flow = _build_seeded(config, args.seed)
        _perturb(flow, 0.1, args.seed)
        x = None
        if args.features == 2:
            x = toy("moons", args.points, seed=args.seed).double().numpy()
            x = (x - x.mean(0)) / x.std(0)
        what = f"new {args.model} model ({args.features} features, perturbed parameters)"
    assert flow is not None
    if x is None:
        gen = torch.Generator().manual_seed(args.seed)
        x = torch.randn(args.points, flow.features, generator=gen, dtype=torch.float64).numpy()
    rows = check_layers(flow, x, max_points=args.points)
    ok = all(r.ok for r in rows)
    points = int(min(len(x), args.points))
    if not args.json:
        print(f"check_transform layer by layer on {what}: {points} points, float64, eval mode")
        print(format_check_table(rows))
        for r in rows:
            for f in r.failures:
                print(f"layer {r.index} ({r.name}): {f}")
        print("all layers pass" if ok else f"{sum(not r.ok for r in rows)} layer(s) FAILED")
    result = {"ok": ok, "layers": [r.to_dict() for r in rows], "points": points}
    return result, (0 if ok else 1)


def cmd_report(args: argparse.Namespace) -> dict[str, Any]:
    index = build_report(args.run)
    _say(args, f"report: {index}")
    return {"ok": True, "report": str(index)}


COMMANDS: dict[str, Callable[[argparse.Namespace], Any]] = {
    "demo": cmd_demo,
    "train": cmd_train,
    "sample": cmd_sample,
    "score": cmd_score,
    "check": cmd_check,
    "report": cmd_report,
}
