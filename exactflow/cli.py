"""The ``exactflow`` command: train a flow on a file or a toy, sample, score, check, report.

Every subcommand reads or writes a *run folder*::

    RUN_DIR/
      run.json        data source, split, options, metrics, versions (status "done" at the end)
      model.pt        the trained flow (exactflow.save: JSON config + weights only)
      data.npz        the train / val / test rows the run used (float64)
      history.json    the training curves
      checkpoint.pt   while training (for --resume); removed when the run finishes
      report/         index.html, PNG figures, metrics.json

Exit codes: 0 success, 1 bad data or a bad run folder (one line ``exactflow: error: ...``
on stderr, a traceback only with ``--debug``), 2 a usage error (argparse). ``--json`` prints
one JSON object on stdout instead of text. Output files are written atomically.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import sys
import textwrap
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["main", "build_parser", "CommandError"]

PROG = "exactflow"
DEMO_DATASETS = ("moons", "8gaussians", "circles", "checkerboard", "pinwheel", "2spirals",
                 "rings", "swissroll")


class CommandError(Exception):
    """A failure the user can fix (bad data, bad run folder): printed as one line, exit 1."""


# -- argument parsing -----------------------------------------------------------------


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the examples' line breaks, wraps the description, shows meaningful defaults."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n  " in text:  # an epilog of examples: keep it as written
            return super()._fill_text(text, width, indent)
        return textwrap.fill(" ".join(text.split()), width, initial_indent=indent,
                             subsequent_indent=indent)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        shown = not (default is None or default is False or default is True
                     or default == argparse.SUPPRESS)
        if shown and "%(default)" not in text and action.option_strings:
            text += " (default: %(default)s)"
        return text


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text!r}") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a number strictly between 0 and 1, got {text}")
    return value


def _hidden(text: str) -> list[int]:
    try:
        sizes = [int(s) for s in text.replace(" ", "").split(",") if s]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated layer sizes such as 64,64, got {text!r}"
        ) from None
    if not sizes or any(s < 1 for s in sizes):
        raise argparse.ArgumentTypeError(
            f"expected positive layer sizes such as 64,64, got {text!r}"
        )
    return sizes


def _columns(text: str) -> list[int | str]:
    out: list[int | str] = []
    for cell in text.split(","):
        cell = cell.strip()
        if not cell:
            continue
        try:
            out.append(int(cell))
        except ValueError:
            out.append(cell)
    if not out:
        raise argparse.ArgumentTypeError("expected column names or indices such as 0,2 or x,y")
    return out


def _model_names() -> list[str]:
    from . import models

    return models.available()


def build_parser() -> argparse.ArgumentParser:
    """The ``exactflow`` argument parser (one subparser per command)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true",
                        help="print one JSON object on stdout instead of text")
    common.add_argument("--debug", action="store_true",
                        help="show the full traceback on errors")
    common.add_argument("--threads", type=_positive_int, default=None,
                        help="CPU threads for torch (default: torch's; demo: 1, the fastest "
                             "for small models and on a busy machine)")

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Normalizing flows with exact, verified likelihoods: train a flow on your "
                    "data, sample from it, score rows by their exact log-density, check it "
                    "layer by layer, and see what it learned.",
        epilog="examples:\n"
               "  exactflow demo                      # RealNVP on a 2D toy, with a report\n"
               "  exactflow train data.csv --model maf --steps 3000 --out runs/maf\n"
               "  exactflow sample runs/maf -n 1000 -o samples.csv\n"
               "  exactflow score runs/maf new.csv -o scores.csv --threshold-quantile 0.01\n"
               "  exactflow check runs/maf\n"
               "  exactflow report runs/maf\n\n"
               "Run `exactflow COMMAND --help` for the options of a command.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"exactflow {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    # demo
    p = sub.add_parser(
        "demo", parents=[common], formatter_class=_Formatter,
        help="train RealNVP on a built-in 2D toy and write its report",
        description="Train the classic RealNVP (8 affine coupling layers with batch norm) on a "
                    "built-in 2D benchmark, write a run folder with the model, metrics and an "
                    "HTML report, and print the test NLL against the true entropy.",
        epilog="examples:\n"
               "  exactflow demo\n"
               "  exactflow demo --dataset 8gaussians --steps 5000 --out runs/8g\n",
    )
    p.add_argument("--out", default="runs/demo", help="run folder to write (replaced if present)")
    p.add_argument("--steps", type=_positive_int, default=2500, help="optimizer steps")
    p.add_argument("--dataset", choices=DEMO_DATASETS, default="moons", metavar="NAME",
                   help="2D toy dataset: " + ", ".join(DEMO_DATASETS))
    p.add_argument("--samples", type=_positive_int, default=20000,
                   help="points drawn from the toy (train/validation/test 80/10/10)")
    p.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto",
                   help="where to train")
    p.add_argument("--seed", type=int, default=0, help="seed of the data, split and training")
    p.set_defaults(func=_cmd_demo, default_threads=1)

    # train
    p = sub.add_parser(
        "train", parents=[common], formatter_class=_Formatter,
        help="train a flow on a toy dataset or a CSV/.npy/.npz file",
        description="Train a flow by maximum likelihood and write a run folder. DATA is a toy "
                    "name (" + ", ".join(DEMO_DATASETS) + "), digits (scikit-learn's 8x8 "
                    "digits, dequantized: 64 features), or a CSV, .npy or .npz file of rows. "
                    "The data is split into train/validation/test, and the training "
                    "split's mean and standard deviation become the model's first layer, so "
                    "every log-density is in the units of the data.",
        epilog="examples:\n"
               "  exactflow train moons --model realnvp --steps 2000 --out runs/moons\n"
               "  exactflow train data.csv --columns x,y,z --model maf --layers 5 "
               "--hidden 128,128 --epochs 50 --out runs/maf\n"
               "  exactflow train data.npy --model nsf --device cuda --out runs/nsf\n"
               "  exactflow train data.csv --model maf --out runs/maf --resume   "
               "# continue an interrupted run\n",
    )
    p.add_argument("data", metavar="DATA",
                   help="toy name, digits, or a data file (.csv, .npy, .npz)")
    p.add_argument("--model", required=True, choices=_model_names(), metavar="NAME",
                   help="builder: " + ", ".join(_model_names()))
    p.add_argument("--out", required=True, metavar="RUN_DIR", help="run folder to write")
    _model_options(p)
    length = p.add_mutually_exclusive_group()
    length.add_argument("--steps", type=_positive_int, help="optimizer steps (default 2000)")
    length.add_argument("--epochs", type=_positive_int, help="passes over the training split")
    p.add_argument("--batch-size", type=_positive_int, default=512, help="rows per step")
    p.add_argument("--lr", type=_positive_float, default=1e-3, help="Adam learning rate")
    p.add_argument("--val-fraction", type=_fraction, default=0.1,
                   help="fraction of rows held out for validation")
    p.add_argument("--test-fraction", type=_fraction, default=0.1,
                   help="fraction of rows held out for the test metrics")
    p.add_argument("--columns", type=_columns, metavar="COLS",
                   help="columns to use, by name (CSV header) or 0-based index: x,y or 0,2")
    p.add_argument("--samples", type=_positive_int, default=20000,
                   help="points drawn when DATA is a toy")
    p.add_argument("--no-standardize", dest="standardize", action="store_false",
                   help="do not put a standardization layer in front of the model")
    p.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto",
                   help="where to train")
    p.add_argument("--seed", type=int, default=0, help="seed of the split, init and batches")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from RUN_DIR/checkpoint.pt")
    p.add_argument("--overwrite", action="store_true", help="replace a finished run in RUN_DIR")
    p.add_argument("--no-report", dest="report", action="store_false",
                   help="skip the HTML report (build it later with `exactflow report`)")
    p.set_defaults(func=_cmd_train)

    # sample
    p = sub.add_parser(
        "sample", parents=[common], formatter_class=_Formatter,
        help="draw samples from a trained flow",
        description="Draw N samples from the trained model of RUN_DIR, in the units of the "
                    "data. Without -o, CSV goes to stdout.",
        epilog="examples:\n"
               "  exactflow sample runs/moons -n 1000 -o samples.csv\n"
               "  exactflow sample runs/moons -n 10 --seed 1\n",
    )
    p.add_argument("run", metavar="RUN_DIR")
    p.add_argument("-n", "--num", dest="n", type=_positive_int, required=True,
                   help="number of samples")
    p.add_argument("-o", "--output", metavar="FILE", help="write to FILE (.csv or .npy)")
    p.add_argument("--seed", type=int, default=None, help="seed (default: random)")
    p.set_defaults(func=_cmd_sample)

    # score
    p = sub.add_parser(
        "score", parents=[common], formatter_class=_Formatter,
        help="exact log-density of every row of a file; flag anomalies",
        description="Score every row of DATA by its exact log-density under the model of "
                    "RUN_DIR (nats, in the units of the data). With --threshold-quantile Q, "
                    "rows whose log-density is below the Q-quantile of the training rows' "
                    "log-densities are flagged as anomalies. Without -o, CSV goes to stdout.",
        epilog="examples:\n"
               "  exactflow score runs/maf new.csv -o scores.csv\n"
               "  exactflow score runs/maf new.csv --threshold-quantile 0.01 --json\n",
    )
    p.add_argument("run", metavar="RUN_DIR")
    p.add_argument("data", metavar="DATA", help="data file (.csv, .npy, .npz) or toy name")
    p.add_argument("-o", "--output", metavar="FILE", help="write scores to FILE (.csv or .npy)")
    p.add_argument("--threshold-quantile", type=_fraction, metavar="Q",
                   help="flag rows below this quantile of the training log-densities")
    p.add_argument("--columns", type=_columns, metavar="COLS",
                   help="columns to use (default: the columns the model was trained on)")
    p.set_defaults(func=_cmd_score)

    # check
    p = sub.add_parser(
        "check", parents=[common], formatter_class=_Formatter,
        help="check every layer's log-determinant and inverse against autograd",
        description="Run check_transform layer by layer: each layer of the flow, on the data "
                    "that reaches it, in float64 and eval mode on a copy of the model. Prints "
                    "a table (layer, log-det error, round-trip error, verdict) and exits 1 if "
                    "any layer fails. With --model, checks a freshly built model whose "
                    "parameters are perturbed away from their initialization.",
        epilog="examples:\n"
               "  exactflow check runs/moons\n"
               "  exactflow check --model nsf --features 3\n",
    )
    p.add_argument("run", metavar="RUN_DIR", nargs="?", help="run folder to check")
    p.add_argument("--model", choices=_model_names(), metavar="NAME",
                   help="check a new model instead: " + ", ".join(_model_names()))
    p.add_argument("--features", type=_positive_int, default=2, help="with --model: dimension")
    _model_options(p)
    p.add_argument("--points", type=_positive_int, default=256, help="rows checked")
    p.add_argument("--seed", type=int, default=0, help="with --model: seed of the perturbation")
    p.set_defaults(func=_cmd_check)

    # report
    p = sub.add_parser(
        "report", parents=[common], formatter_class=_Formatter,
        help="(re)build the HTML report of a run",
        description="Build RUN_DIR/report/index.html (self-contained: inline CSS, PNG figures "
                    "beside it, no scripts or external URLs) and RUN_DIR/report/metrics.json.",
        epilog="examples:\n  exactflow report runs/moons\n",
    )
    p.add_argument("run", metavar="RUN_DIR")
    p.set_defaults(func=_cmd_report)
    return parser


def _model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--layers", type=_positive_int, help="number of layers (builder default)")
    p.add_argument("--hidden", type=_hidden, metavar="SIZES",
                   help="hidden layer sizes of the conditioners, e.g. 64,64 (builder default)")


# -- entry point ----------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 ok, 1 bad data or run, 2 usage)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse: --help (0) or a usage error (2)
        code = exit_.code
        return code if isinstance(code, int) else (0 if code is None else 2)
    import torch

    threads_before = torch.get_num_threads()
    threads = args.threads if args.threads is not None else getattr(args, "default_threads", None)
    try:
        if threads is not None and threads != threads_before:
            torch.set_num_threads(threads)
        result = args.func(args)
    except KeyboardInterrupt:
        _fail(args, "interrupted")
        return 130
    except _UsageError as err:
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
        print(json.dumps(_clean(result), indent=2, allow_nan=False, default=_json_default))
    return code


def _fail(args: argparse.Namespace, message: str) -> None:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    if getattr(args, "json", False):
        print(json.dumps({"ok": False, "error": message}))


def _message(err: BaseException) -> str:
    """One line naming the problem."""
    from .datasets import DataError
    from .io import CheckpointError
    from .report import RunError
    from .train import TrainingError

    text = " ".join(str(err).split()) or type(err).__name__
    if isinstance(err, (CommandError, DataError, CheckpointError, RunError, TrainingError)):
        return text
    if isinstance(err, OSError) and err.filename is not None:
        return f"{err.strerror or type(err).__name__}: {err.filename!r}"
    if isinstance(err, (ValueError, ImportError)):
        return text
    return f"{type(err).__name__}: {text} (rerun with --debug for the traceback)"


def _json_default(obj: Any) -> Any:
    from .report import _json_default as default

    return default(obj)


def _say(args: argparse.Namespace, text: str) -> None:
    if not args.json:
        print(text, flush=True)


def _clean(value: Any) -> Any:
    """Replace non-finite floats by None so the value is valid JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, np.generic):
        return _clean(value.item())
    return value


# -- data -----------------------------------------------------------------------------


def _sniff_header(path: Path) -> list[str] | None:
    """Column names from the first line of a text file, when that line is a header."""
    if path.suffix.lower() not in (".csv", ".tsv", ".txt", ".dat"):
        return None
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                delim = next((c for c in (",", "\t", ";") if c in line), None)
                parts = line.split(delim) if delim else line.split()
                cells = [c.strip().strip('"') for c in parts]
                numeric = 0
                for c in cells:
                    try:
                        float(c)
                        numeric += 1
                    except ValueError:
                        pass
                return cells if numeric == 0 else None
    except OSError:
        return None
    return None


def _read_table(spec: str, columns: list[int | str] | None, *, what: str = "DATA") -> tuple[
    np.ndarray, dict[str, Any]
]:
    """Load a data file (CSV, .npy, .npz) into a float64 array, with its description."""
    from .datasets import DataError, load

    path = Path(spec)
    if not path.exists():
        raise DataError(f"{what} {spec!r} is neither a toy dataset nor an existing file")
    raw = load(path, columns=columns)
    arr = np.asarray(raw)
    if arr.dtype.kind not in "biuf":
        from .datasets import validate

        validate(arr, name=f"{path.name}")
    arr = np.array(arr, dtype=np.float64)  # a writable in-memory copy (memmaps are read-only)
    if arr.ndim == 1:
        arr = arr.reshape(-1, 1)
    header = _sniff_header(path)
    if columns is not None:
        names = [str(c) if isinstance(c, str) else (header[c] if header and -len(header) <= c
                 < len(header) else f"x{int(c) + 1}") for c in columns]
    else:
        names = header if header and arr.ndim == 2 and len(header) == arr.shape[1] else None
    info = {
        "source": "file",
        "name": path.name,
        "path": str(path.resolve()),
        "columns": columns,
        "column_names": names,
    }
    return arr, info


def _read_data(spec: str, columns: list[int | str] | None, samples: int, seed: int) -> tuple[
    np.ndarray, dict[str, Any]
]:
    from .datasets import TOY_ENTROPY, TOYS, toy

    if spec in TOYS and not Path(spec).exists():
        if columns is not None:
            raise CommandError(f"--columns does not apply to the toy dataset {spec!r}")
        arr = toy(spec, samples, seed=seed).double().numpy()
        info = {
            "source": "toy",
            "name": spec,
            "path": None,
            "columns": None,
            "column_names": None,
            "samples": samples,
            "seed": seed,
            "entropy": TOY_ENTROPY.get(spec),
        }
        return arr, info
    if spec == "digits" and not Path(spec).exists():
        from .datasets import digits

        arr = digits(seed=seed)
        if columns is not None:
            raise CommandError("--columns does not apply to the built-in digits dataset")
        info = {
            "source": "builtin",
            "name": "digits",
            "path": None,
            "columns": None,
            "column_names": [f"pixel{i}" for i in range(arr.shape[1])],
            "seed": seed,
            "entropy": None,
        }
        return arr, info
    return _read_table(spec, columns)


def _versions() -> dict[str, str]:
    import torch

    from . import __version__

    return {
        "exactflow": __version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
    }


def _now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %z")


# -- train / demo ---------------------------------------------------------------------


def _prepare_out(out: Path, *, resume: bool, overwrite: bool) -> dict[str, Any] | None:
    """Check the run folder can be written; returns its run.json when resuming."""
    from .report import RUN_JSON

    if out.exists() and not out.is_dir():
        raise CommandError(f"--out {str(out)!r} is a file, not a folder")
    info_file = out / RUN_JSON
    if not info_file.exists():
        if out.exists() and any(out.iterdir()) and not overwrite:
            raise CommandError(
                f"--out {str(out)!r} is a folder that is not empty and holds no run; "
                "choose another --out (or pass --overwrite)"
            )
        return None
    try:
        previous = json.loads(info_file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        previous = {}
    status = previous.get("status")
    if resume:
        if status == "done":
            raise CommandError(
                f"the run in {str(out)!r} already finished: nothing to resume "
                "(use --overwrite to train it again)"
            )
        return previous
    if not overwrite:
        what = "a finished run" if status == "done" else "an interrupted run"
        hint = "" if status == "done" else " or --resume to continue it"
        raise CommandError(
            f"{str(out)!r} already holds {what}; pass --overwrite to replace it{hint}, "
            "or choose another --out"
        )
    return None


def _train_run(
    args: argparse.Namespace,
    *,
    data_spec: str,
    columns: list[int | str] | None,
    samples: int,
    model_config: dict[str, Any],
    steps: int | None,
    epochs: int | None,
    batch_size: int,
    lr: float,
    val_fraction: float,
    test_fraction: float,
    standardize: bool,
    out: Path,
    resume: bool,
    overwrite: bool,
    report: bool,
    writer: bool = True,
) -> dict[str, Any]:
    import torch

    from .datasets import DataError, Standardize, split, validate
    from .io import save
    from .report import (
        CHECKPOINT_FILE,
        DATA_FILE,
        HISTORY_FILE,
        MODEL_FILE,
        RUN_FORMAT,
        RUN_JSON,
        build_report,
        write_bytes_atomic,
        write_json_atomic,
    )
    from .train import evaluate, fit

    if val_fraction + test_fraction >= 1.0:
        raise CommandError(
            f"--val-fraction + --test-fraction must be below 1, got {val_fraction + test_fraction}"
        )
    if args.device == "cuda" and not torch.cuda.is_available():
        raise CommandError("--device cuda was given but CUDA is not available here")
    # Under torchrun only rank 0 (the writer) checks and writes the run folder.
    previous = _prepare_out(out, resume=resume, overwrite=overwrite) if writer else None

    # Everything that can fail on bad data fails here, before anything is written.
    data, data_info = _read_data(data_spec, columns, samples, args.seed)
    validate(data, name=data_info["name"])
    fractions = (1.0 - val_fraction - test_fraction, val_fraction, test_fraction)
    n = len(data)
    if n < 10:
        raise DataError(f"{data_info['name']} has {n} rows; a train/validation/test split "
                        "needs at least 10")
    train, val, test = split(data, fractions, seed=args.seed)
    if min(len(train), len(val), len(test)) == 0:
        raise DataError(f"{data_info['name']}: {n} rows are too few for the fractions {fractions}")
    if batch_size > len(train):
        if not args.json:
            print(f"note: --batch-size {batch_size} is more than the {len(train)} training rows; "
                  f"using {len(train)}", file=sys.stderr)
        batch_size = len(train)
    features = data.shape[1]
    config = {**model_config, "features": features}
    if standardize:
        config["standardize"] = True
    flow = _build_seeded(config, args.seed)
    if standardize:
        stats = Standardize.fit(train)
        first = flow.transform[0]
        with torch.no_grad():
            first.mean.copy_(stats.mean)
            first.std.copy_(stats.std)
    data_info.update(
        features=features,
        rows={"total": n, "train": len(train), "val": len(val), "test": len(test)},
        split_seed=args.seed,
        fractions=list(fractions),
    )
    data_info.setdefault("entropy", None)
    options = {
        "steps": steps, "epochs": epochs, "batch_size": batch_size, "lr": lr,
        "device": args.device, "seed": args.seed, "standardize": standardize,
        "val_fraction": val_fraction, "test_fraction": test_fraction,
    }
    if previous is not None:
        for key, now in (("data", data_info), ("model", flow.config)):
            before = previous.get(key)
            if before is not None and json.loads(json.dumps(before)) != json.loads(
                json.dumps(now, default=str)
            ):
                raise CommandError(
                    f"cannot resume {str(out)!r}: it was started with a different {key} "
                    f"({json.dumps(before, default=str)[:200]}); rerun the original command "
                    "with --resume"
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
        "versions": _versions(),
    }
    if writer:
        write_json_atomic(out / RUN_JSON, info)

    total = steps if steps is not None else (None if epochs is not None else 2000)
    expected = total if total is not None else max(1, epochs * (len(train) // batch_size))
    history = fit(
        flow, train, val,
        steps=total, epochs=epochs, batch_size=batch_size, lr=lr,
        eval_every=max(1, expected // 100),
        checkpoint=checkpoint, checkpoint_every=max(1, expected // 10),
        resume=resume, device=args.device, seed=args.seed,
        progress=not args.json,
    )
    if not writer:
        return {"ok": True, "run": str(out)}
    device = str(next(iter(flow.parameters())).device) if any(True for _ in flow.parameters()) \
        else "cpu"
    test_metrics = evaluate(flow, test)
    val_metrics = evaluate(flow, val)
    flow.cpu()
    hist = history.to_dict()
    metrics = {
        "test": _clean(test_metrics),
        "val": _clean(val_metrics),
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
    write_bytes_atomic(out / DATA_FILE, buf.getvalue())
    save(flow, out / MODEL_FILE)
    write_json_atomic(out / HISTORY_FILE, hist)
    info.update(status="done", finished=_now(), metrics=metrics)
    info["options"]["device"] = device
    write_json_atomic(out / RUN_JSON, info)
    if checkpoint.exists():
        checkpoint.unlink()

    result: dict[str, Any] = {
        "ok": True,
        "run": str(out),
        "model": flow.config["model"],
        "data": data_info["name"],
        "metrics": metrics,
        "report": None,
    }
    if report:
        result["report"] = str(build_report(out))
    return result


def _print_train_result(args: argparse.Namespace, result: dict[str, Any]) -> None:
    m = result["metrics"]
    t = m["test"]
    _say(args, f"trained {result['model']} ({m['parameters']:,} parameters) on "
               f"{result['data']}: {m['steps']} steps in {_fmt_time(m['train_time_s'])}")
    _say(args, f"test NLL {_fmt(t.get('nll'))} ± {_fmt(t.get('nll_se'))} nats "
               f"({_fmt(t.get('bpd'))} bits/dim, {t.get('n')} rows)")
    if "test_nll_minus_entropy" in m:
        _say(args, f"test NLL - true entropy = {m['test_nll_minus_entropy']:+.4f} nats "
                   "(0 is a perfect model)")
    _say(args, f"run folder: {result['run']}")
    if result.get("report"):
        _say(args, f"report: {result['report']}")


def _fmt(value: Any, spec: str = ".4f") -> str:
    if value is None:
        return "n/a"
    v = float(value)
    return format(v, spec) if math.isfinite(v) else str(v)


def _fmt_time(seconds: Any) -> str:
    if seconds is None:
        return "?"
    return f"{float(seconds):.1f} s"


def _cmd_train(args: argparse.Namespace) -> dict[str, Any]:
    from .distributed import init

    # Under torchrun: join the process group (fit then trains data-parallel); the other
    # ranks stay silent and rank 0 writes the run folder and reports.
    rank, _ = init("gloo" if args.device == "cpu" else None)
    if rank != 0:
        args.json = False
    model_config: dict[str, Any] = {"model": args.model}
    if args.layers is not None:
        model_config["layers"] = args.layers
    if args.hidden is not None:
        model_config["hidden"] = args.hidden
    result = _train_run(
        args,
        data_spec=args.data, columns=args.columns, samples=args.samples,
        model_config=model_config, steps=args.steps, epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr, val_fraction=args.val_fraction,
        test_fraction=args.test_fraction, standardize=args.standardize, out=Path(args.out),
        resume=args.resume, overwrite=args.overwrite, report=args.report, writer=rank == 0,
    )
    if rank == 0:
        _print_train_result(args, result)
    return result


def _cmd_demo(args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.out)
    overwrite = (out / "run.json").exists()
    _say(args, f"exactflow demo: RealNVP (8 affine couplings, batch norm) on {args.dataset}, "
               f"{args.steps} steps")
    result = _train_run(
        args,
        data_spec=args.dataset, columns=None, samples=args.samples,
        model_config={"model": "realnvp", "layers": 8, "hidden": [64, 64], "batch_norm": True},
        steps=args.steps, epochs=None, batch_size=512, lr=2e-3, val_fraction=0.1,
        test_fraction=0.1, standardize=True, out=out, resume=False, overwrite=overwrite,
        report=True,
    )
    _print_train_result(args, result)
    if not args.json and result.get("report"):
        print(f"open {Path(result['report']).resolve().as_uri()} in a browser")
    return result


# -- sample / score -------------------------------------------------------------------


def _write_table(path: Path, array: np.ndarray, header: list[str], fmt: str = "%.9g") -> None:
    """Write rows as CSV or .npy, atomically (chosen by the file extension)."""
    from .report import write_bytes_atomic

    suffix = path.suffix.lower()
    if suffix not in (".csv", ".npy", ".txt", ".tsv"):
        raise CommandError(f"cannot write {str(path)!r}: use a .csv or .npy file name")
    if not path.parent.is_dir():
        raise CommandError(
            f"cannot write {str(path)!r}: folder {str(path.parent)!r} does not exist"
        )
    if suffix == ".npy":
        buf = io.BytesIO()
        np.save(buf, array)
        write_bytes_atomic(path, buf.getvalue())
        return
    delim = "\t" if suffix == ".tsv" else ","
    write_bytes_atomic(path, _csv_text(array, header, delim, fmt).encode("utf-8"))


def _csv_text(array: np.ndarray, header: list[str], delim: str = ",", fmt: str = "%.9g") -> str:
    buf = io.StringIO()
    np.savetxt(buf, array, delimiter=delim, header=delim.join(header), comments="", fmt=fmt)
    return buf.getvalue()


def _output_path(args: argparse.Namespace) -> Path | None:
    """The ``-o`` file of ``sample``/``score``, checked for a table format we can write."""
    out = Path(args.output) if args.output else None
    if out is not None and out.suffix.lower() not in (".csv", ".npy", ".txt", ".tsv"):
        raise CommandError(f"cannot write {str(out)!r}: use a .csv or .npy file name")
    return out


def _cmd_sample(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from .report import evaluating, load_run

    run = load_run(args.run)
    flow = run.flow
    assert flow is not None
    out = _output_path(args)
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little")
    parts = []
    with torch.random.fork_rng(devices=[]), evaluating(flow):
        torch.manual_seed(seed)
        left = args.n
        while left > 0:
            k = min(left, 65536)
            parts.append(flow.sample(k).double().cpu().numpy())
            left -= k
    samples = np.concatenate(parts)
    result: dict[str, Any] = {
        "ok": True, "n": args.n, "features": run.features, "columns": run.columns,
        "seed": seed, "output": str(out) if out else None,
        "non_finite_rows": int((~np.isfinite(samples).all(1)).sum()),
    }
    if out is not None:
        _write_table(out, samples, run.columns)
        _say(args, f"wrote {args.n} samples ({run.features} columns) to {out}")
    elif args.json:
        result["samples"] = _clean(samples.tolist())
    else:
        sys.stdout.write(_csv_text(samples, run.columns))
    return result


def _cmd_score(args: argparse.Namespace) -> dict[str, Any]:
    from .datasets import DataError
    from .report import load_run

    run = load_run(args.run)
    flow = run.flow
    assert flow is not None
    out = _output_path(args)
    columns = args.columns
    if columns is None and run.info["data"].get("source") == "file":
        columns = run.info["data"].get("columns")
    data, info = _read_table(args.data, columns)
    d = run.features
    if data.shape[1] != d:
        raise DataError(
            f"{info['name']} has {data.shape[1]} columns but the model of {args.run!r} was "
            f"trained on {d}" + ("; pick them with --columns" if data.shape[1] > d else "")
        )
    bad = np.flatnonzero(~np.isfinite(data).all(axis=1))
    if bad.size:
        shown = ", ".join(map(str, bad[:5])) + (", ..." if bad.size > 5 else "")
        raise DataError(f"{info['name']}: NaN or inf in {bad.size} row(s) (row indices "
                        f"{shown}); drop or impute them")
    if len(data) == 0:
        raise DataError(f"{info['name']} has no rows")
    scores = _log_density(flow, data)
    result: dict[str, Any] = {
        "ok": True, "n": int(len(scores)), "output": str(out) if out else None,
        "mean_log_density": _finite_stat(np.mean, scores),
        "min_log_density": _finite_stat(np.min, scores),
        "max_log_density": _finite_stat(np.max, scores),
        "non_finite": int((~np.isfinite(scores)).sum()),
    }
    table = scores.reshape(-1, 1)
    header = ["log_density"]
    flags = None
    if args.threshold_quantile is not None:
        train_scores = _log_density(flow, run.data("train"))
        threshold = float(np.quantile(train_scores, args.threshold_quantile))
        flags = scores < threshold
        table = np.stack([scores, flags.astype(np.float64)], axis=1)
        header.append("anomaly")
        result.update(
            threshold_quantile=args.threshold_quantile,
            threshold=threshold,
            anomalies=int(flags.sum()),
            anomaly_rows=np.flatnonzero(flags)[:1000].tolist(),
        )
    rows = np.arange(len(scores), dtype=np.float64).reshape(-1, 1)
    if out is not None:
        if out.suffix.lower() == ".npy":
            _write_table(out, table if flags is not None else scores, header)
        else:
            _write_table(out, np.hstack([rows, table]), ["row", *header], fmt="%.10g")
        _say(args, f"scored {len(scores)} rows of {info['name']}: mean log-density "
                   f"{_fmt(result['mean_log_density'])} nats; wrote {out}")
        if flags is not None:
            _say(args, f"{int(flags.sum())} rows below the {args.threshold_quantile:g}-quantile "
                       f"of the training log-densities ({threshold:.4f}) are flagged as anomalies")
    elif args.json:
        result["log_density"] = _clean(scores.tolist())
        if flags is not None:
            result["anomaly"] = flags.tolist()
    else:
        sys.stdout.write(_csv_text(np.hstack([rows, table]), ["row", *header], fmt="%.10g"))
    return result


def _finite_stat(fn: Callable[[np.ndarray], Any], values: np.ndarray) -> float | None:
    v = values[np.isfinite(values)]
    return float(fn(v)) if v.size else None


def _log_density(flow: Any, data: np.ndarray, chunk: int = 8192) -> np.ndarray:
    import torch

    from .report import evaluating

    ref = next(iter(flow.parameters()))
    out = []
    with evaluating(flow):
        for i in range(0, len(data), chunk):
            x = torch.as_tensor(data[i : i + chunk], dtype=ref.dtype, device=ref.device)
            out.append(flow.log_prob(x).double().cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0)


# -- check / report -------------------------------------------------------------------


def _build_seeded(config: dict[str, Any], seed: int) -> Any:
    """Build a model with its initialization drawn from ``seed`` (global RNG untouched)."""
    import torch

    from . import models

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            return models.build(config)
        except (TypeError, ValueError) as err:
            raise CommandError(f"cannot build model {config['model']!r}: {err}") from None


def _perturb(flow: Any, scale: float, seed: int) -> None:
    """Move every parameter away from its initialization (many layers start as identity)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype).to(p.device))


def _cmd_check(args: argparse.Namespace) -> tuple[dict[str, Any], int]:
    from .report import check_layers, format_check_table, load_run

    if (args.run is None) == (args.model is None):
        raise _UsageError("give either RUN_DIR or --model NAME")
    if args.run is not None:
        run = load_run(args.run)
        flow = run.flow
        try:
            x = run.data("test")
        except Exception:  # noqa: BLE001 - fall back to the model's own samples
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
            from .datasets import toy

            x = toy("moons", args.points, seed=args.seed).double().numpy()
            x = (x - x.mean(0)) / x.std(0)
        what = f"new {args.model} model ({args.features} features, perturbed parameters)"
    assert flow is not None
    if x is None:
        import torch

        gen = torch.Generator().manual_seed(args.seed)
        x = torch.randn(args.points, flow.features, generator=gen, dtype=torch.float64).numpy()
    rows = check_layers(flow, x, max_points=args.points)
    ok = all(r.ok for r in rows)
    if not args.json:
        print(f"check_transform layer by layer on {what}: {min(len(x), args.points)} points, "
              "float64, eval mode")
        print(format_check_table(rows))
        for r in rows:
            for f in r.failures:
                print(f"layer {r.index} ({r.name}): {f}")
        print("all layers pass" if ok else f"{sum(not r.ok for r in rows)} layer(s) FAILED")
    result = {"ok": ok, "layers": [r.to_dict() for r in rows], "points": int(min(len(x),
              args.points))}
    return result, (0 if ok else 1)


class _UsageError(CommandError):
    """A usage error found after parsing (exit 2)."""


def _cmd_report(args: argparse.Namespace) -> dict[str, Any]:
    from .report import build_report

    index = build_report(args.run)
    _say(args, f"report: {index}")
    return {"ok": True, "report": str(index)}
