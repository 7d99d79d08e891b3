"""``exactflow sample`` and ``exactflow score``: rows out of a model, and rows scored by it."""

from __future__ import annotations

import argparse
import csv
import io
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..datasets import CHUNK_ROWS, DataError, Shards, read_cells, read_header
from ..datasets.shards import is_shards
from ..io import atomic_write_bytes, csv_rows, write_table
from ..runs import Run, RunError, anomaly, load_run, read_data
from ..runs.notes import OutsideRange
from ..validation import FilePositions, counted, index_list, nonfinite_rows_error
from .common import CommandError, UsageError, fmt, positions_named, say, with_key
from .output import SampleStream, json_cap_error, to_stdout

__all__ = ["cmd_sample", "cmd_score"]


_TABLE_SUFFIXES = (".csv", ".npy", ".txt", ".tsv")


def _output_path(args: argparse.Namespace, run: Run | None = None) -> Path | None:
    """The ``-o`` file of ``sample``/``score``, checked before any work is done: never the
    file ``run`` was trained on (the run records its path)."""
    if not args.output:
        return None
    out = Path(args.output)
    trained_on = None if run is None else (run.info.get("data") or {}).get("path")
    if trained_on and out.exists() and Path(trained_on).exists() and out.samefile(trained_on):
        raise CommandError(f"-o {str(out)!r} is the data the run was trained on: the output "
                           "would replace it; write it to another file")
    if out.suffix.lower() not in _TABLE_SUFFIXES:
        raise UsageError(f"cannot write {str(out)!r}: use a .csv, .tsv, .txt or .npy file "
                           "name")
    if out.is_dir():
        raise CommandError(f"cannot write {str(out)!r}: it is a folder; give a file name")
    if not out.parent.is_dir():
        raise CommandError(
            f"cannot write {str(out)!r}: folder {str(out.parent)!r} does not exist"
        )
    return out


def _write_npy(path: Path, array: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, array)
    atomic_write_bytes(path, buf.getvalue())


def cmd_sample(args: argparse.Namespace) -> dict[str, Any]:
    """Draw ``-n`` samples, streamed a chunk at a time to the file or stdout (memory stays
    bounded whatever ``n``; ``--json`` without ``-o`` is capped): see :mod:`.output`."""
    run = load_run(args.run)
    flow = run.flow
    assert flow is not None
    out = _output_path(args, run)
    cap = json_cap_error(args.n, run.features) if args.json and out is None else None
    if cap:
        raise CommandError(cap)
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little")
    if args.seed is None and not args.json:  # (JSON has it; stdout may carry the samples)
        print(f"note: seed {seed} (--seed {seed} -n {args.n} draws these samples again)",
              file=sys.stderr)
    samples = SampleStream(flow, args.n, seed, run.features)
    result: dict[str, Any] = {
        "ok": True, "n": args.n, "features": run.features, "columns": run.columns,
        "seed": seed, "output": str(out) if out else None,
    }
    if out is not None:
        write_table(out, samples, rows=args.n, columns=run.columns, fmt=samples.fmt)
        say(args, f"wrote {args.n} samples ({run.features} columns) to {out}")
    elif args.json:
        result["samples"] = np.concatenate(list(samples)).tolist()
    else:
        to_stdout(",".join(run.columns) + "\n")
        for block in samples:
            to_stdout(csv_rows(block, samples.fmt))
    result["non_finite_rows"] = samples.non_finite_rows
    return result


def _finite_stat(fn: Callable[[np.ndarray], Any], values: np.ndarray) -> float | None:
    v = values[np.isfinite(values)]
    return float(fn(v)) if v.size else None


def _score_columns(args: argparse.Namespace, run: Any, source: Path) -> list[int | str] | None:
    """The columns of DATA to score: ``--columns``; else, when DATA has a header and the
    run knows its columns' names, those names (so a file whose columns come in another
    order is reordered, and a missing column is a clear error); else the run's own
    ``--columns`` (positions). ``--columns`` naming the model's own columns is matched by
    name too, in any order; other names or positions map onto the model's columns in the
    order given."""
    data_info = run.info["data"]
    names = data_info.get("column_names")
    if args.columns is not None:
        chosen = list(args.columns)
        positions_named("--columns", chosen, read_header(source) if source.is_file() else None)
        if names and all(isinstance(c, str) for c in chosen) and set(chosen) <= set(names):
            if set(chosen) != set(names):
                missing = [n for n in names if n not in chosen]
                raise DataError(
                    f"--columns names {len(set(chosen))} of the {len(names)} columns the model "
                    f"of {args.run!r} was trained on; it needs all of them (missing: "
                    f"{', '.join(map(repr, missing))})"
                )
            return list(names)
        return chosen
    header = None
    if isinstance(args.data, str):
        header = (Shards(args.data).column_names if Path(args.data).exists() and
                  is_shards(args.data) else read_header(args.data))
    if names and header is not None:
        missing = [n for n in names if n not in header]
        if missing:
            raise DataError(
                f"{args.data!r} has no column named {missing[0]!r} (the model of "
                f"{args.run!r} was trained on columns {names}; the file has {header})"
            )
        twice = [n for n in names if header.count(n) > 1]
        if twice:
            raise DataError(
                f"{args.data!r} has {header.count(twice[0])} columns named {twice[0]!r}: "
                "which one the model's column is cannot be told; rename or drop the others"
            )
        return list(names)
    if data_info.get("source") == "file":
        columns = data_info.get("columns")
        if header is None and names and columns and all(isinstance(c, str) for c in columns):
            return None  # (DATA has no names: its columns, in order, are the model's)
        return columns
    return None


def _mapped_npy(data: Any, columns: list[int | str] | None) -> Any:
    """A ``.npy`` file of numbers memory-mapped, or a folder of shards or a Parquet file
    (:class:`~exactflow.datasets.Shards`, its columns picked): ``score`` then reads it a
    block at a time; or None: other sources, and files the reader must explain, go
    through ``read_data``."""
    path = Path(str(data))
    if path.exists() and is_shards(path):
        return Shards(str(path), columns=columns)
    if path.suffix.lower() != ".npy" or not path.is_file():
        return None
    if columns is not None and not all(isinstance(c, int) for c in columns):
        return None
    try:
        table = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError):
        return None
    if table.ndim != 2 or table.dtype.kind not in "biuf":
        return None
    if columns is not None and not all(-table.shape[1] <= int(c) < table.shape[1]
                                       for c in columns):
        return None
    return table


def _kept_cells(args: argparse.Namespace, rows: int) -> tuple[list[str], list[list[str]]]:
    """``--keep``: the names of the kept columns and each data row's cells of them."""
    path = str(args.data)
    if Path(path).suffix.lower() not in (".csv", ".tsv", ".txt", ".dat"):
        raise DataError(f"--keep copies columns of a text table (.csv, .tsv, .txt, .dat); "
                        f"{path!r} is not one (its rows are numbered in the row column)")
    try:
        cells = read_cells(path, args.keep)
    except DataError as err:
        if "more than once" in str(err):  # (the density reason does not apply to text)
            raise UsageError("--keep names a column more than once") from None
        raise
    if len(cells) != rows:  # (read_cells and load take the same lines as rows)
        raise DataError(f"{path!r}: --keep read {len(cells)} rows, the scores {rows}")
    header = read_header(path)
    names = [c if isinstance(c, str) else header[c] if header else f"column_{c}"
             for c in args.keep]
    return names, cells


def _csv_line(cells: list[str], delim: str = ",") -> str:
    """One CSV line, cells quoted where they hold the delimiter or a quote."""
    buf = io.StringIO()
    csv.writer(buf, delimiter=delim, lineterminator="\n").writerow(cells)
    return buf.getvalue()


def _score_text(rows: np.ndarray, table: np.ndarray, kept: list[list[str]] | None,
                delim: str = ",") -> Iterator[str]:
    """The output lines, a chunk at a time: row number, kept cells (quoted where CSV needs
    it), then the scores."""
    for start in range(0, len(rows), CHUNK_ROWS):
        part = slice(start, start + CHUNK_ROWS)
        if kept is None:
            yield csv_rows(np.hstack([rows[part], table[part]]), fmt="%.10g", delimiter=delim)
            continue
        buf = io.StringIO()
        csv.writer(buf, delimiter=delim, lineterminator="\n").writerows(kept[part])
        numbers = csv_rows(rows[part], fmt="%.10g").splitlines()
        scores = csv_rows(table[part], fmt="%.10g", delimiter=delim).splitlines()
        yield "".join(f"{n}{delim}{c}{delim}{v}\n" for n, c, v in
                      zip(numbers, buf.getvalue().splitlines(), scores, strict=True))


def cmd_score(args: argparse.Namespace) -> dict[str, Any]:
    with_key(args)
    run = load_run(args.run)
    out = _output_path(args, run)
    source = Path(str(args.data).split(":")[0])  # (data.npz:name names an array of a file)
    if out is not None and out.exists() and source.exists() and out.samefile(source):
        raise CommandError(f"-o {str(out)!r} is the data file being scored: the scores would "
                           "replace the data; write them to another file")
    if args.keep is not None and out is not None and out.suffix.lower() == ".npy":
        raise UsageError("--keep copies cells as text, which a .npy file of numbers cannot "
                           "hold; write a .csv, .tsv or .txt file")
    chosen = _score_columns(args, run, source)
    source_rows = _mapped_npy(args.data, chosen)
    picked: list[int] | None = None
    if source_rows is not None:  # read a block at a time: memory does not grow with the file
        info = {"name": source.name}
        lazy = isinstance(source_rows, Shards)  # (its columns are picked already)
        picked = None if chosen is None or lazy else [int(c) for c in chosen]
    else:
        source_rows, info = read_data(args.data, chosen, seed=0,
                                      missing="nan" if args.missing == "skip" else "error")
    d = run.features
    width = source_rows.shape[1] if picked is None else len(picked)
    if width != d:
        what = (f"--columns picks {width} columns of {info['name']}"
                if args.columns is not None else
                f"{info['name']} has {counted(width, 'column')}")
        hint = "; pick them with --columns" if width > d and args.columns is None else ""
        raise DataError(f"{what} but the model of {args.run!r} was trained on {d}{hint}")
    if len(source_rows) == 0:
        raise DataError(f"{info['name']} has no rows")
    per_row = 2 + (args.threshold_quantile is not None) + len(args.keep or ())
    cap = json_cap_error(len(source_rows), per_row, "scores") if args.json and not out else None
    if cap:
        raise CommandError(cap)
    kept = _kept_cells(args, len(source_rows)) if args.keep is not None else None
    names = run.info["data"].get("column_names")
    by_position = (chosen is None and args.columns is None and bool(names)
                   and run.info["data"].get("source") == "file" and source.is_file())
    if by_position:  # (stderr: stdout may carry the CSV or the JSON)
        print(f"note: {info['name']} has no column names: its {d} columns are read as the "
              f"model's {', '.join(names)}, in this order", file=sys.stderr)
    header = None if names or args.columns is not None else read_header(source)
    if header is not None:  # (a model without names reads every file by position)
        by_position = True
        print(f"note: the model of {args.run!r} has no column names (its training data had "
              f"no header): the columns of {info['name']} are read by position, its header "
              f"({', '.join(header[:8])}{', ...' if len(header) > 8 else ''}) is not "
              "used; pick and order them with --columns", file=sys.stderr)
    scores = np.empty(len(source_rows))
    ranges = run.info["data"].get("ranges")  # (runs of 0.2.0.dev0 and before: none)
    counts = run.info["data"].get("rows", {})  # (repeated rows add no chance to be outside)
    outside = OutsideRange(ranges, names or FilePositions.of(chosen), counts.get(
        "distinct", counts.get("total"))) if ranges and len(ranges) == d else None
    bad: list[int] = []
    skip = args.missing == "skip"  # rows with a missing value left unscored: NaN
    for start in range(0, len(source_rows), CHUNK_ROWS):
        block = np.asarray(source_rows[start : start + CHUNK_ROWS], dtype=np.float64)
        block = block if picked is None else block[:, picked]
        holes = np.isnan(block).any(axis=1)
        if outside is not None:
            outside.add(block, start, holes)
        bad += (start + np.flatnonzero(holes)).tolist()
        if skip:
            part = scores[start : start + len(block)]
            part[holes] = np.nan
            if not holes.all():
                part[~holes] = run.score(block[~holes])
        elif not bad:
            scores[start : start + len(block)] = run.score(block)
    if bad and not skip:
        err = nonfinite_rows_error(info["name"], len(bad), bad)
        raise DataError(f"{err}; --missing skip scores the other rows")
    if skip and len(bad) == len(scores):
        raise DataError(f"every row of {info['name']} has a missing value: none to score")
    scored = ~np.isnan(scores)
    q = args.threshold_quantile
    try:
        calibration = run.calibration()
    except RunError:
        if q is not None:
            raise
        calibration = None  # log-densities only: the held-out rows are gone
    p = flags = None
    if calibration is not None:  # (rows left unscored: NaN)
        p_values = np.full(len(scores), np.nan)
        if q is None:
            p_values[scored] = anomaly.p_values(scores[scored], calibration)
        else:  # (anomaly.flag warns where q is below every p-value)
            flags = np.full(len(scores), np.nan)
            p_values[scored], flags[scored] = anomaly.flag(scores[scored], calibration, q)
        p = p_values
    minus_inf = int(np.isneginf(scores).sum())
    beyond = "" if outside is None else outside.note(info["name"], chance_said=not minus_inf)
    if beyond:  # (stderr: stdout may carry the CSV or the JSON)
        print(f"note: {beyond}", file=sys.stderr)
    trained = run.info["data"].get("path")
    if trained and source.is_file() and Path(trained).is_file() and source.samefile(trained):
        train_rows = counts.get("train")
        print(f"note: {info['name']} is the file {args.run!r} was trained on"
              + ("" if train_rows is None else f" ({train_rows:,} of its rows trained it)")
              + ": training rows score higher than new rows (the model fitted them), so "
              "fewer of them are flagged than the threshold says, and an anomaly among them "
              "shaped the model around itself; to find the anomalies of a table, train on "
              "rows known to be normal, or on part of it and score the rest", file=sys.stderr)
    result: dict[str, Any] = {
        "ok": True, "n": int(len(scores)), "output": str(out) if out else None,
        "mean_log_density": _finite_stat(np.mean, scores),
        "min_log_density": _finite_stat(np.min, scores),
        "max_log_density": _finite_stat(np.max, scores),
        "minus_inf_rows": minus_inf,
        "outside_training_range_rows": None if outside is None else outside.rows,
        "outside_training_range": None if outside is None else outside.summary(),
        "calibration_rows": None if calibration is None else int(len(calibration)),
        "smallest_p_value": None if calibration is None else anomaly.smallest_p_value(
            len(calibration)),
        "lower_bound": bool(run.dequantized),
        "unscored_rows": len(bad),
        "columns_by_position": by_position,
    }
    columns, header = [scores], ["log_density"]
    if p is not None:
        columns.append(p)
        header.append("p_value")
    if flags is not None:
        columns.append(flags)
        header.append("anomaly")
        result.update(threshold_quantile=q, anomalies=int((flags == 1).sum()),
                      anomaly_rows=np.flatnonzero(flags == 1)[:1000].tolist())
    table = np.stack(columns, axis=1)
    rows = np.arange(len(scores), dtype=np.float64).reshape(-1, 1)
    header = ["row", *(kept[0] if kept else []), *header]
    cells = kept[1] if kept else None
    if out is not None:
        if out.suffix.lower() == ".npy":
            _write_npy(out, table)
        else:
            delim = "\t" if out.suffix.lower() == ".tsv" else ","
            text = _csv_line(header, delim) + "".join(_score_text(rows, table, cells, delim))
            atomic_write_bytes(out, text.encode("utf-8"))
        done = f"{len(scores) - len(bad)} of {len(scores)}" if bad else f"{len(scores)}"
        above = int(np.isfinite(scores).sum())
        over = "" if not minus_inf else (f" over the {counted(above, 'row')} scored above "
                                         "-inf" if above else " (every scored row is -inf)")
        mean = "-inf" if minus_inf and not above else fmt(result["mean_log_density"])
        say(args, f"scored {done} rows of {info['name']}: mean log-density {mean} nats"
                   f"{over}; wrote {out}")
        if bad:
            unset = ", ".join(h for h in header if h in ("log_density", "p_value", "anomaly"))
            say(args, f"{counted(len(bad), 'row')} with a missing value not scored "
                       f"(row{'s' if len(bad) > 1 else ''} {index_list(bad, len(bad))}, from "
                       f"0): {unset} {'is' if ',' not in unset else 'are'} NaN there")
        if minus_inf:
            flagged = ("flagged as anomalies" if flags is not None else
                       "anomalies under any --threshold-quantile")
            say(args, f"{counted(minus_inf, 'row')} with log-density -inf (outside the model's "
                       f"support or beyond the range of its numbers): {flagged}")
        if flags is not None and calibration is not None:
            # (copies of a held-out row score alike: the cut is among the distinct ones)
            distinct = len(np.unique(calibration))
            rate = anomaly.flag_rate(len(calibration), q, distinct)
            low, high = anomaly.flag_rate_range(len(calibration), q, distinct=distinct)
            copies = distinct < len(calibration)
            why = (f" (the held-out rows are {distinct} distinct ones and their copies, which "
                   "score alike)" if copies else "" if rate == q else
                   f" (p-values are multiples of 1/{len(calibration) + 1})")
            expected = "" if rate == 0 else (
                f", so about {rate:.1%} of new normal rows are flagged{why}"
                f" ({low:.1%} to {high:.1%} in 9 runs of 10, as the held-out rows vary)")
            say(args, f"{counted(int((flags == 1).sum()), 'row')} flagged as anomalies: "
                       f"conformal p-value <= "
                       f"{q:g} against the {len(calibration)} held-out rows{expected}")
    elif args.json:
        if kept:
            result["kept"] = {name: [row[i] for row in kept[1]] for i, name in enumerate(kept[0])}
        result["log_density"] = scores.tolist()
        if p is not None:
            result["p_value"] = p.tolist()
        if flags is not None:
            result["anomaly"] = [None if np.isnan(v) else bool(v) for v in flags]
    else:  # a chunk at a time: a reader gone (| head) is seen at the next chunk's write
        to_stdout(_csv_line(header))
        for chunk in _score_text(rows, table, cells):
            to_stdout(chunk)
    return result
