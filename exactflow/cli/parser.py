"""The ``exactflow`` argument parser: one subparser per command, with examples in every help.

Parsing only: the commands themselves are in :mod:`exactflow.cli.commands`.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from collections.abc import Callable, Mapping
from typing import Any, NoReturn

from .. import models
from .._version import __version__
from ..datasets import TOYS
from ..validation import fraction, positive_float, positive_int, seed_value

__all__ = ["build_parser", "PROG", "DEMO_DATASETS"]

PROG = "exactflow"
DEMO_DATASETS = TOYS


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


def _argument(parse: Callable[[str], Any], check: Callable[[Any, str], Any],
              what: str) -> Callable[[str], Any]:
    """An argparse type: ``parse`` the text, then the package's own ``check`` of the value
    (one rule and one message for the API and the command line)."""

    def convert(text: str) -> Any:
        try:
            value = parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        try:
            return check(value, "the value")
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text}") from None

    convert.__name__ = what  # argparse names the type in its messages
    return convert


_positive_int = _argument(int, positive_int, "a positive integer")
_positive_float = _argument(float, positive_float, "a positive number")
_fraction = _argument(float, fraction, "a number strictly between 0 and 1")
_seed = _argument(int, seed_value, "a seed, an integer from 0 to 2**63 - 1")


def _bounds(text: str) -> Any:
    """``--bounds``: ``LOW:HIGH`` for every column, one ``LOW:HIGH`` per column
    (``0:1,0:,:``), or ``NAME=LOW:HIGH`` for some (a name or a 0-based index); an empty
    side has no limit."""
    def pair(item: str) -> tuple[float | None, float | None]:
        low, sep, high = item.partition(":")
        if not sep:
            raise argparse.ArgumentTypeError(
                f"a column's bounds are LOW:HIGH (an empty side has no limit: 0: is "
                f"positive), got {item!r} in {text!r}")
        try:
            return (float(low) if low.strip() else None, float(high) if high.strip() else None)
        except ValueError:
            raise argparse.ArgumentTypeError(f"bounds must be numbers, got {item!r}") from None

    items = [item.strip() for item in text.split(",")]
    named = ["=" in item for item in items]
    if any(named) and not all(named):
        raise argparse.ArgumentTypeError(
            f"give every column's bounds in order (0:1,0:,:) or name them all (age=0:,p=0:1), "
            f"got {text!r}")
    if all(named):
        out: dict[int | str, Any] = {}
        for item in items:
            key, _, limits = item.partition("=")
            column = int(key) if key.strip().isdigit() else key.strip()
            if column in out:
                raise argparse.ArgumentTypeError(f"--bounds names {column!r} twice in {text!r}")
            out[column] = pair(limits)
        return out
    return pair(items[0]) if len(items) == 1 else [pair(item) for item in items]


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
    return models.available()


class UsageExit(SystemExit):
    """A usage error found while parsing (exit 2), with its message for ``--json``."""

    def __init__(self, message: str) -> None:
        super().__init__(2)
        self.message = message


class _Parser(argparse.ArgumentParser):
    """argparse's parser, whose usage errors keep their message (:class:`UsageExit`)."""

    #: The command parsers by name (the top-level parser's), for the errors of a command.
    commands: Mapping[str, argparse.ArgumentParser] = {}

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise UsageExit(message)

    def parse_args(self, args: Any = None, namespace: Any = None) -> Any:
        """As argparse's, but an option the command does not know is said with the
        command's usage (argparse says it with the top-level one)."""
        parsed, extra = self.parse_known_args(args, namespace)
        if extra:
            given = list(sys.argv[1:] if args is None else args)
            command = getattr(parsed, "command", None) or ""
            after = given[given.index(command) + 1:] if command in given else []
            where = self.commands.get(command, self) if set(extra) <= set(after) else self
            where.error(f"unrecognized arguments: {' '.join(extra)}")
        return parsed


def build_parser() -> argparse.ArgumentParser:
    """The ``exactflow`` argument parser (one subparser per command)."""
    common = _Parser(add_help=False)
    common.add_argument("--json", action="store_true",
                        help="print one JSON object on stdout instead of text")
    common.add_argument("--debug", action="store_true",
                        help="show the full traceback on errors")
    common.add_argument("--threads", type=_positive_int, default=None,
                        help="CPU threads for torch (default: EXACTFLOW_THREADS, else "
                             "OMP_NUM_THREADS or MKL_NUM_THREADS, else 1, the fastest for "
                             "small models and on a busy machine; training a large model on "
                             "idle cores may use up to 4)")

    parser = _Parser(
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
    parser.add_argument("--version", action="version", version=f"exactflow {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    parser.commands = sub.choices

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
    p.add_argument("--out", default="runs/demo",
                   help="run folder to write (an earlier demo's run there is replaced)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace whatever run or files OUT holds")
    p.add_argument("--steps", type=_positive_int, default=2500, help="optimizer steps")
    p.add_argument("--dataset", choices=DEMO_DATASETS, default="moons", metavar="NAME",
                   help="2D toy dataset: " + ", ".join(DEMO_DATASETS))
    p.add_argument("--samples", type=_positive_int, default=20000,
                   help="points drawn from the toy (train/validation/test 80/10/10)")
    p.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto",
                   help="where to train")
    p.add_argument("--seed", type=_seed, default=0, help="seed of the data, split and training")
    p.set_defaults(default_threads=1)

    # train
    p = sub.add_parser(
        "train", parents=[common], formatter_class=_Formatter,
        help="train a flow on a toy dataset, a CSV/.npy/.npz/Parquet file or a folder of shards",
        description="Train a flow by maximum likelihood and write a run folder. DATA is a toy "
                    "name (" + ", ".join(DEMO_DATASETS) + "), digits (scikit-learn's 8x8 "
                    "digits dequantized to (x + u) / 17 in (0, 1): 64 features), a CSV, .npy, "
                    ".npz or Parquet file of rows, or a folder of .npy or Parquet shards. The "
                    "data is split into train/validation/test, and "
                    "the training split's mean and standard deviation become the model's "
                    "first layer, so every log-density is in the units of the data.",
        epilog="examples:\n"
               "  exactflow train moons --model realnvp --steps 2000 --out runs/moons\n"
               "  exactflow train data.csv --columns x,y,z --model maf --layers 5 "
               "--hidden 128,128 --epochs 50 --out runs/maf\n"
               "  exactflow train data.npy --model nsf --device cuda --out runs/nsf\n"
               "  exactflow train data.csv --model maf --out runs/maf --resume   "
               "# continue an interrupted run\n",
    )
    p.add_argument("data", metavar="DATA",
                   help="toy name, digits, a data file (.csv, .npy, .npz, .parquet) or a "
                        "folder of .npy or Parquet shards")
    p.add_argument("--model", default="auto", choices=["auto", *_model_names()],
                   metavar="NAME",
                   help="auto (default: try a short ladder of models within --budget and keep "
                        "the best on validation) or a builder: " + ", ".join(_model_names()))
    p.add_argument("--out", metavar="RUN_DIR",
                   help="run folder to write (default: runs/<data name>, numbered if taken)")
    _model_options(p)
    p.add_argument("--base", choices=["normal", "student"],
                   help="with --model NAME: the flow's base density, normal (default) or "
                        "student (heavy tails, their degrees of freedom trained: for data whose "
                        "far rows a normal base scores far too low)")
    p.add_argument("--budget", type=_positive_float, metavar="SECONDS",
                   help="with --model auto: the time the ladder of candidates may take "
                        "(default 300); reading and splitting the data, scoring the test "
                        "rows and the report come on top")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--steps", type=_positive_int,
                        help="a fixed number of optimizer steps, of which the one with the "
                             "best validation NLL is kept (default: until the validation NLL "
                             "stops improving)")
    length.add_argument("--epochs", type=_positive_int,
                        help="a fixed number of passes over the training split (the best "
                             "step on validation is kept)")
    p.add_argument("--patience", type=_positive_int,
                   help="epochs without improvement of the validation NLL before stopping "
                        "(default 20 when the length is set by validation)")
    p.add_argument("--batch-size", type=_positive_int,
                   help="rows per step (default: about 8 batches an epoch, 32 to 256 rows)")
    p.add_argument("--lr", type=_positive_float,
                   help="Adam learning rate (default 1e-3); with --model NAME, as are "
                        "--steps, --epochs, --patience and --batch-size (the auto ladder "
                        "sets them for each candidate)")
    p.add_argument("--val-fraction", type=_fraction, default=0.1,
                   help="fraction of rows held out for validation")
    p.add_argument("--test-fraction", type=_fraction, default=0.1,
                   help="fraction of rows held out for the test metrics")
    p.add_argument("--key", metavar="NAME",
                   help="the array to read from an .npz holding several (same as DATA:NAME)")
    p.add_argument("--columns", type=_columns, metavar="COLS",
                   help="columns to use, by name (CSV header) or 0-based index: x,y or 0,2")
    p.add_argument("--drop", type=_columns, metavar="COLS",
                   help="use every column but these (an ID, a label), by name or 0-based "
                        "index: id or id,date")
    p.add_argument("--samples", type=_positive_int,
                   help="points drawn when DATA is a toy (default 20000)")
    scaling = p.add_mutually_exclusive_group()
    scaling.add_argument("--standardize", choices=("auto", "columns", "pooled"),
                         default="auto",
                         help="the model's first, fixed layer: one mean and scale per column, "
                              "or pooled, one for all columns (as images are normalized); "
                              "auto pools where the columns lie on one range and some nearly "
                              "blank column would otherwise be scaled far out (image pixels)")
    scaling.add_argument("--no-standardize", dest="standardize", action="store_const",
                         const=False,
                         help="do not put a standardization layer in front of the model")
    p.add_argument("--bounds", type=_bounds, metavar="LIMITS",
                   help="limits of the columns, which the model maps onto the real line "
                        "first (its samples respect them; rows outside score -inf): 0:1 for "
                        "every column, 0:1,0:,: for each in order, or age=0:,p=0:1 by name "
                        "(an empty side has no limit)")
    p.add_argument("--missing", choices=("error", "skip"), default="error",
                   help="rows with a missing value (an empty cell, NA, N/A, #N/A, null, ?, "
                        "NaN): error (default) stops at the first; skip leaves them out, "
                        "with a note of how many and which")
    p.add_argument("--dequantize", action="store_true",
                   help="add uniform noise in [0, 1) to integer-valued columns (counts, "
                        "levels, pixels); log-densities are then a lower bound of the discrete "
                        "log-probability")
    p.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto",
                   help="where to train")
    p.add_argument("--seed", type=_seed, default=0,
                   help="seed of the split, init and batches (with --model auto, what the "
                        "--budget reaches still depends on the machine's speed)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from RUN_DIR/checkpoint.pt")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run in RUN_DIR; a finished run stays in place (and "
                        "scores) until the new one is done, and stays if it fails or is "
                        "interrupted")
    p.add_argument("--no-report", dest="report", action="store_false",
                   help="skip the HTML report (build it later with `exactflow report`)")

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
    p.add_argument("-o", "--output", metavar="FILE",
                   help="write to FILE (.csv, .tsv, .txt or .npy, by its extension)")
    p.add_argument("--seed", type=_seed, default=None,
                   help="seed: the same seed and -n draw the same samples (another -n other "
                        "ones); default: a random one, said on stderr")

    # score
    p = sub.add_parser(
        "score", parents=[common], formatter_class=_Formatter,
        help="exact log-density of every row of a file; flag anomalies",
        description="Score every row of DATA by its exact log-density under the model of "
                    "RUN_DIR (nats, in the units of the data) and its conformal p-value, "
                    "(k + 1) / (m + 1) where k of the run's m held-out rows (validation and "
                    "test) score at or below it. With "
                    "--threshold-quantile Q, rows with p-value <= Q are flagged as anomalies: "
                    "if new normal rows are exchangeable with the run's data, about Q of them "
                    "are flagged (floor(Q (m + 1)) / (m + 1): p-values are multiples of "
                    "1 / (m + 1)); rows scored -inf (zero density under the model) are always "
                    "flagged. Columns are matched by name when DATA has a header. "
                    "Without -o, CSV goes to stdout; with --json the scores come inside the "
                    "JSON object, a -inf log-density as null (JSON has no infinities; "
                    "minus_inf_rows counts them; a row left unscored by --missing skip is "
                    "null in every list), and anomaly_rows lists the first 1,000 "
                    "flagged rows (anomalies counts them all). --keep copies columns of DATA "
                    "into the output (under kept in JSON), to join the scores back by ID.",
        epilog="examples:\n"
               "  exactflow score runs/maf new.csv -o scores.csv\n"
               "  exactflow score runs/maf new.csv --threshold-quantile 0.01 --json\n"
               "  exactflow score runs/maf new.csv --keep customer_id -o scores.csv\n",
    )
    p.add_argument("run", metavar="RUN_DIR")
    p.add_argument("data", metavar="DATA", help="data file (.csv, .npy, .npz, .parquet), a "
                   "folder of .npy or Parquet shards (read a block at a time), or toy name")
    p.add_argument("-o", "--output", metavar="FILE",
                   help="write scores to FILE (.csv, .tsv, .txt or .npy)")
    p.add_argument("--missing", choices=("error", "skip"), default="error",
                   help="rows with a missing value (an empty cell, NA, N/A, #N/A, null, ?, "
                        "NaN): error (default) stops at the first; skip scores the other "
                        "rows and leaves these NaN in the output")
    p.add_argument("--threshold-quantile", type=_fraction, metavar="Q",
                   help="flag rows whose conformal p-value is at most Q (a false-alarm rate "
                        "of Q on new normal data), and rows scored -inf")
    p.add_argument("--key", metavar="NAME",
                   help="the array to read from an .npz holding several (same as DATA:NAME)")
    p.add_argument("--columns", type=_columns, metavar="COLS",
                   help="columns to use (default: the columns the model was trained on)")
    p.add_argument("--keep", type=_columns, metavar="COLS",
                   help="columns of a text DATA file to copy, as text (blanks around a "
                        "cell dropped), into each output row after its row number (an ID, a "
                        "label: any cells, numbers or not), by name or 0-based index: id or "
                        "id,date")

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
    p.add_argument("--features", type=_positive_int,
                   help="with --model: dimension (default 2)")
    _model_options(p)
    p.add_argument("--points", type=_positive_int,
                   help="rows checked (default 256, fewer past 128 features: 104 at 200, "
                        "8 at 784; each row's dense Jacobian costs features^3)")
    p.add_argument("--seed", type=_seed, default=0,
                   help="with --model: seed of the perturbation and of the points")

    # report
    p = sub.add_parser(
        "report", parents=[common], formatter_class=_Formatter,
        help="(re)build the HTML report of a run",
        description="Build RUN_DIR/report/index.html (self-contained: inline CSS, PNG figures "
                    "beside it, no scripts or external URLs) and RUN_DIR/report/metrics.json.",
        epilog="examples:\n  exactflow report runs/moons\n",
    )
    p.add_argument("run", metavar="RUN_DIR")
    return parser


def _model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--layers", type=_positive_int, help="number of layers (builder default)")
    p.add_argument("--hidden", type=_hidden, metavar="SIZES",
                   help="hidden layer sizes of the conditioners, e.g. 64,64 (builder default)")
