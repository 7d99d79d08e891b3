"""Reading tables of numbers from CSV, ``.npy`` and ``.npz`` files, with errors that say where.

:func:`load` reads CSV (delimiter and header guessed), ``.npy`` (memory-mapped, never read
whole) and ``.npz``; every unreadable file, ragged row or non-numeric cell raises a
:class:`~exactflow.validation.DataError` naming the file, the line and the column.
"""

from __future__ import annotations

import csv
import os
import struct
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import numpy as np

from ..validation import DataError, warn_user
from .arrays import Subset
from .cells import (
    BELOW,
    MISSING,
    cell_note,
    guess_delimiter,
    in_step,
    is_comment,
    is_header,
    is_number,
    looks_like_names,
    missing_error,
    not_utf8_error,
    number_or_nan,
    opens_quote,
    split_line,
)

__all__ = ["load", "read_cells", "read_header", "column_count", "row_lines", "split_key"]

_TEXT = (".csv", ".tsv", ".txt", ".dat")

_BLOCK_ROWS = 4096  # (rows of a text table parsed into Python lists, then into the array)


# What numpy, zipfile and zlib raise on a damaged .npy or .npz (beyond ValueError): a
# truncated or foreign zip, a bad deflate stream, a member listed but missing, an
# unsupported compression, a header numpy cannot make sense of, a shape too big to hold.
_ARCHIVE_ERRORS: tuple[type[BaseException], ...] = (
    OSError, EOFError, zipfile.BadZipFile, zlib.error, KeyError, NotImplementedError,
    TypeError, SyntaxError, struct.error, MemoryError, OverflowError,
)


_NPZ_ERRORS: tuple[type[BaseException], ...] = (ValueError, *_ARCHIVE_ERRORS)


def _first(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def _check_readable(path: str) -> None:
    if not os.path.exists(path):
        raise DataError(f"cannot read {path!r}: no such file")
    if os.path.isdir(path):
        raise DataError(f"cannot read {path!r}: it is a folder; load and the command line "
                        "read one file (ef.datasets.open_table and ef.fit: a folder of shards)")
    if not os.access(path, os.R_OK):
        raise DataError(f"cannot read {path!r}: permission denied")


def _column_indices(
    columns: Sequence[int | str] | None, width: int, names: list[str] | None, path: str
) -> list[int]:
    if columns is None:
        return list(range(width))
    if isinstance(columns, (str, int)):
        columns = [columns]
    out: list[int] = []
    for c in columns:
        if isinstance(c, str):
            if names is None:
                raise DataError(
                    f"{path!r}: column {c!r} asked by name, but the file has no header row "
                    "(pass column indices; if the first line names the columns, give them "
                    "names that are not all numbers, or in Python pass header=True)"
                )
            if c not in names:
                raise DataError(f"{path!r}: no column named {c!r}; the columns are {names}")
            out.append(names.index(c))
        elif isinstance(c, (int, np.integer)) and not isinstance(c, bool):
            if not -width <= c < width:
                raise DataError(f"{path!r}: column index {c} out of range for {width} columns")
            out.append(int(c) % width)
        else:
            raise DataError(f"{path!r}: columns must be names or integer indices, got {c!r}")
    repeated = sorted({c for c in out if out.count(c) > 1})
    if repeated:
        shown = [names[c] if names is not None else c for c in repeated]
        raise DataError(
            f"{path!r}: columns {shown} asked for more than once; a column and its copy "
            "have no density (the data lie on a line), give each column once"
        )
    return out


class _TextTable(NamedTuple):
    """A text table's lines as :func:`load` reads them, before any cell is parsed."""

    path: str
    delimiter: str | None
    first: list[str]  # the first line's cells (the names when it is a header)
    first_line: int  # its 1-based line number
    names: list[str] | None
    body: list[tuple[int, str]]  # (1-based line number, line) of every data row
    guessed_header: bool  # header="auto" decided that the first line is not a header


def _text_table(path: str, header: bool | str, delimiter: str | None) -> _TextTable:
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            text = f.read()
    except UnicodeDecodeError:
        raise DataError(not_utf8_error(path)) from None
    except OSError as e:
        raise DataError(f"cannot read {path!r}: {e.strerror or e}") from None

    # (1-based line number, line) of the lines that carry data; blank lines, and lines
    # starting with '#' before the table, are skipped. Inside the table such a line is a
    # row when it has the table's width (Excel's #N/A in a first cell: skipping it moved
    # every later row up by one), else a comment (numpy's footer, a note between rows).
    lines: list[tuple[int, str]] = []
    for i, line in enumerate(text.splitlines()):
        if line.strip() and (lines or not is_comment(line)):
            lines.append((i + 1, line))
    if not lines:
        raise DataError(f"cannot read {path!r}: the file is empty")
    if delimiter is None:
        delimiter = guess_delimiter(lines[0][1])
    first = [cell.strip() for cell in split_line(lines[0][1], delimiter)]
    lines = lines[:1] + [(n, line) for n, line in lines[1:] if not is_comment(line)
                         or len(split_line(line, delimiter)) == len(first)]
    if header == "auto":
        has_header = is_header(first, [split_line(line, delimiter)
                                        for _, line in lines[1 : 1 + BELOW]])
    elif isinstance(header, bool):
        has_header = header
    else:
        raise ValueError(f"header must be True, False or 'auto', got {header!r}")
    body = lines[1:] if has_header else lines
    if not body:
        raise DataError(f"cannot read {path!r}: a header row but no data rows")
    return _TextTable(path, delimiter, first, lines[0][0], first if has_header else None, body,
                      header == "auto" and not has_header)


def _records(table: _TextTable) -> Iterator[tuple[int, str, list[str]]]:
    """``(line number, line, cells)`` of every data row, each of the table's width."""
    path, delimiter, body = table.path, table.delimiter, table.body
    if delimiter is None:
        records: Iterator[list[str]] = (line.split() for _, line in body)
    else:
        records = csv.reader((line for _, line in body), delimiter=delimiter)
    # (strict: a line the csv module read on into the next would leave the lines and the
    # records out of step; the quote check names the usual cause first)
    for (lineno, line), cells in in_step(path, body, records):
        if '"' in line and opens_quote(line, delimiter):  # (csv joins the next line)
            raise DataError(
                f"{path!r}: the quoted cell that starts on line {lineno} runs over several "
                "lines; a table of numbers has one row per line"
            )
        if len(cells) != len(table.first):
            raise DataError(
                f"{path!r}: line {lineno} has {len(cells)} fields, expected "
                f"{len(table.first)} (as on line {table.first_line})"
            )
        yield lineno, line, cells


def _read_text(
    path: str, columns: Sequence[int | str] | None, header: bool | str, delimiter: str | None,
    missing: str = "error",
) -> np.ndarray:
    table = _text_table(path, header, delimiter)
    names, first = table.names, table.first
    keep = _column_indices(columns, len(first), names, path)
    # (a block of rows at a time into the array: Python floats in lists take ~10x its memory)
    values = np.empty((len(table.body), len(keep)))
    rows: list[list[float]] = []
    done = 0
    number = float if missing == "error" else number_or_nan
    for lineno, line, cells in _records(table):
        try:
            if "_" in line and any("_" in cells[j] for j in keep):
                raise ValueError  # (float() reads '1_0' as 10, as Python source would)
            rows.append([number(cells[j]) for j in keep])
        except ValueError:
            _raise_cell_error(path, lineno, cells, keep, names)
        if len(rows) == _BLOCK_ROWS:
            values[done : done + len(rows)] = rows
            done += len(rows)
            rows.clear()
    if rows:
        values[done : done + len(rows)] = rows
    if missing == "error" and np.isnan(values).any():  # (a 'nan' cell: named by its line)
        r, k = (int(i) for i in np.argwhere(np.isnan(values))[0])
        lineno, line = table.body[r]
        cell = split_line(line, table.delimiter)[keep[k]].strip()
        raise missing_error(path, cell, lineno, keep[k], names)
    if table.guessed_header and looks_like_names(first, keep, values):
        warn_user(
            f"{path!r}: line {table.first_line} ({', '.join(first)}) is read as a row of "
            "data, but its whole numbers lie far outside the range of the rows below them in "
            "every column, as column names such as years would; if it names the columns, give "
            "them names that are not numbers (y2019; in Python, header=True reads it as "
            "names)"
        )
    return values


def read_cells(
    path: str | os.PathLike[str],
    columns: Sequence[int | str],
    header: bool | str = "auto",
    delimiter: str | None = None,
) -> list[list[str]]:
    """The cells of some columns of a text table, as text: one list per data row, aligned
    with the rows :func:`load` reads from the same file (the same lines are rows).

    For columns that are not numbers, such as an ID to carry beside each row's score. The
    cells are stripped of surrounding blanks, quotes removed. Same arguments as :func:`load`.

    Example:
        >>> import pathlib, tempfile
        >>> f = pathlib.Path(tempfile.mkdtemp()) / "t.csv"
        >>> _ = f.write_text("id,x\\nA-1,0.5\\nB-2,1.5\\n")
        >>> read_cells(f, ["id"])
        [['A-1'], ['B-2']]
    """
    path = os.fspath(path)
    _check_readable(path)
    ext = os.path.splitext(path)[1].lower()
    if ext not in _TEXT:
        raise DataError(f"cannot read columns as text from {path!r}: it is not a text table "
                        "(.csv, .tsv, .txt, .dat)")
    if ext == ".tsv" and delimiter is None:
        delimiter = "\t"
    table = _text_table(path, header, delimiter)
    keep = _column_indices(columns, len(table.first), table.names, path)
    return [[cells[j].strip() for j in keep] for _, _, cells in _records(table)]


def row_lines(
    path: str | os.PathLike[str], header: bool | str = "auto", delimiter: str | None = None
) -> list[int]:
    """The 1-based file line of each data row of a text table, in the order :func:`load`
    reads the rows (same ``header`` and ``delimiter``), to name a row in a message.

    Example:
        >>> import pathlib, tempfile
        >>> f = pathlib.Path(tempfile.mkdtemp()) / "t.csv"
        >>> _ = f.write_text("x,y\\n\\n1,2\\n# a note\\n3,4\\n")
        >>> row_lines(f)
        [3, 5]
    """
    path = os.fspath(path)
    if os.path.splitext(path)[1].lower() == ".tsv" and delimiter is None:
        delimiter = "\t"
    return [lineno for lineno, _, _ in _records(_text_table(path, header, delimiter))]


def _raise_cell_error(
    path: str, lineno: int, cells: list[str], keep: list[int], names: list[str] | None
) -> None:
    for j in keep:
        cell = cells[j].strip()
        if not is_number(cell) or "_" in cell:
            where = f"column {j + 1}" + (f" ({names[j]!r})" if names else "")
            if cell in MISSING:
                raise missing_error(path, cell, lineno, j, names)
            raise DataError(
                f"{path!r}: non-numeric cell {cell!r} at line {lineno}, {where}; "
                "fix or drop that row, or, if the column is not data (an ID, a label), leave "
                "it out (columns=[...]; --columns or --drop in the command line)"
                + cell_note(cell)
            )
    raise DataError(f"{path!r}: a cell on line {lineno} is not a number")


def _as_slice(indices: list[int]) -> slice | None:
    """The slice equal to increasing, evenly spaced ``indices``, or None."""
    if len(indices) == 1:
        return slice(indices[0], indices[0] + 1)
    step = indices[1] - indices[0]
    if step <= 0 or any(b - a != step for a, b in zip(indices, indices[1:], strict=False)):
        return None
    return slice(indices[0], indices[-1] + 1, step)


def split_key(spec: str | os.PathLike[str]) -> tuple[str, str | None]:
    """``("data.npz", "name")`` for a spec ``"data.npz:name"`` naming an array of an
    existing ``.npz`` file; ``(spec, None)`` for anything else.

    A file whose own name holds the colon wins: ``"a.npz:b"`` is split only when no file
    of that name exists and ``"a.npz"`` does.
    """
    text = os.fspath(spec)
    head, sep, key = text.rpartition(":")
    if (
        sep
        and key
        and head.lower().endswith(".npz")
        and not os.path.exists(text)
        and os.path.isfile(head)
    ):
        return head, key
    return text, None


def load(
    path: str | os.PathLike[str],
    columns: Sequence[int | str] | None = None,
    header: bool | str = "auto",
    delimiter: str | None = None,
    mmap: bool = True,
    key: str | None = None,
    missing: str = "error",
) -> np.ndarray | Subset:
    """Read a table of numbers from a CSV, ``.npy`` or ``.npz`` file.

    * CSV and other text (``.csv``, ``.tsv``, ``.txt``, ``.dat``): the delimiter is guessed
      from the first line (comma, tab, semicolon, else whitespace) unless given; blank lines,
      and lines starting with ``#`` before the table, are skipped (inside the table such a
      line is a row: Excel writes ``#N/A``). ``header="auto"`` treats the first line as a
      header when none of its cells is a number, or when it holds pandas' labels for
      unnamed columns (``0, 1, 2, ...`` in any order, after an empty cell for the index)
      above a line of decimals. Every selected cell must be a number (``inf`` included;
      ``nan`` is a missing value, see ``missing``); a non-numeric or empty cell raises
      :class:`DataError` with its 1-based line and column as in the file (:func:`row_lines`
      gives the line of each row). Text is read into memory: convert data larger than
      memory to ``.npy`` once.
    * ``.npy``: with ``mmap=True`` opened by ``np.load(mmap_mode="r")``: an ``np.memmap`` that
      reads rows from disk on demand, so a file larger than memory is never read whole. A
      column selection that is an evenly spaced range stays a memmap view; any other selection
      gives a lazy :class:`Subset`. Pickled (object) arrays are refused.
    * ``.npz``: the file's only array, or the one named ``key``, also given in the path as
      ``"data.npz:name"`` (read into memory: members of a zip archive cannot be
      memory-mapped).

    Args:
        path: the file.
        columns: column names (CSV with header) or integer indices (negative allowed) to keep,
            in the order given; ``None`` keeps all.
        header: ``True``, ``False`` or ``"auto"`` (CSV only).
        delimiter: the CSV delimiter; ``None`` guesses it.
        mmap: memory-map ``.npy`` files (default).
        key: the array to take from a ``.npz`` holding several (or ``path`` written
            ``"data.npz:name"``).
        missing: ``"error"`` (default): an empty cell is an error naming it; ``"nan"``:
            empty cells and the usual markers of a missing value (``NA``, ``N/A``,
            ``#N/A``, ``null``, ``?``...: :data:`MISSING`) read as NaN (CSV only).

    Returns:
        A float64 ``ndarray`` for text; for ``.npy``/``.npz`` the stored array as is (an
        ``np.memmap`` or :class:`Subset` when memory-mapped). Run :func:`validate` on it.

    Raises:
        DataError: missing or unreadable file, unknown format, non-numeric cells, ragged rows,
            unknown columns.
    """
    path, spec_key = split_key(path)
    if spec_key is not None:
        if key is not None and key != spec_key:
            raise DataError(
                f"{path!r}: two arrays asked for, {spec_key!r} in the path and key={key!r}"
            )
        key = spec_key
    _check_readable(path)
    ext = os.path.splitext(path)[1].lower()
    if key is not None and ext != ".npz":
        raise DataError(f"{path!r}: key={key!r} applies to .npz files only")
    if ext in _TEXT:
        if ext == ".tsv" and delimiter is None:
            delimiter = "\t"
        if missing not in ("error", "nan"):
            raise ValueError(f"missing must be 'error' or 'nan', got {missing!r}")
        return _read_text(path, columns, header, delimiter, missing)
    if ext in (".npy", ".npz"):
        # Without its magic bytes numpy would try to unpickle the file: say what it is not.
        magic = b"\x93NUMPY" if ext == ".npy" else b"PK"
        with open(path, "rb") as f:
            if f.read(len(magic)) != magic:
                raise DataError(f"cannot read {path!r}: not a valid {ext} file (bad header)")
    if ext == ".npy":
        try:
            arr = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
        except ValueError as e:
            if "pickle" in str(e).lower() or "python objects" in str(e).lower():
                raise DataError(
                    f"cannot read {path!r}: it holds a pickled object array, which is refused"
                ) from None
            raise DataError(f"cannot read {path!r}: not a valid .npy file ({_first(e)})") from None
        except _ARCHIVE_ERRORS as e:
            raise DataError(f"cannot read {path!r}: not a valid .npy file ({_first(e)})") from None
        return _select_columns(arr, columns, path)
    if ext == ".npz":
        try:
            with np.load(path, allow_pickle=False) as archive:
                keys = list(archive.keys())
                if not keys:
                    raise DataError(f"{path!r} holds no arrays")
                if key is None:
                    if len(keys) != 1:
                        raise DataError(
                            f"{path!r} holds {len(keys)} arrays {keys}; choose one with "
                            f"key= (--key in the command line), or as {path}:{keys[0]}"
                        )
                    key = keys[0]
                if key not in keys:
                    raise DataError(f"{path!r} has no array {key!r}; it holds {keys}")
                arr = archive[key]
        except DataError:
            raise
        except _NPZ_ERRORS as e:
            if "pickle" in str(e).lower():
                raise DataError(
                    f"cannot read {path!r}: it holds a pickled object array, which is refused"
                ) from None
            raise DataError(
                f"cannot read {path!r}: not a valid .npz file ({_first(e)})"
            ) from None
        return _select_columns(arr, columns, path)
    parquet = ("; Parquet is read lazily in Python (ef.datasets.Shards of a folder of .parquet "
               "files: ef.fit, Run.score), or convert it to .npy") if ext == ".parquet" else ""
    raise DataError(f"cannot read {path!r}: unknown file type {ext or '(none)'!r}; use "
                    f".csv/.tsv/.txt/.dat, .npy or .npz{parquet}")


def _select_columns(
    arr: np.ndarray, columns: Sequence[int | str] | None, path: str
) -> np.ndarray | Subset:
    if columns is None:
        return arr
    if arr.ndim != 2:
        raise DataError(
            f"{path!r}: columns= needs a 2-D array, the file holds shape {tuple(arr.shape)}"
        )
    keep = _column_indices(columns, arr.shape[1], None, path)
    if isinstance(arr, np.memmap):
        as_slice = _as_slice(keep)
        if as_slice is not None:
            return arr[:, as_slice]
        return Subset(arr, columns=np.asarray(keep))
    return arr[:, keep]


def read_header(path: str | os.PathLike[str], delimiter: str | None = None) -> list[str] | None:
    """The column names of a text table, or ``None`` when its first data line is not a header.

    The same rules as :func:`load`: blank lines and ``#`` comments before the table are
    skipped, the delimiter
    is guessed from the first line, and that line is a header when none of its cells is a
    number (or it reads ``0, 1, 2, ...`` above decimals). Binary files (``.npy``, ``.npz``)
    have no header.
    """
    rows = _first_lines(path, delimiter)
    return rows[0] if rows and is_header(rows[0], rows[1:]) else None


def column_count(path: str | os.PathLike[str]) -> int | None:
    """The number of cells in the first line of a text table (``None`` for another file)."""
    rows = _first_lines(path, None)
    return len(rows[0]) if rows else None


def _first_lines(path: str | os.PathLike[str], delimiter: str | None) -> list[list[str]] | None:
    """The cells of a text table's first lines (the first and :data:`BELOW` more)."""
    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lower()
    if ext not in _TEXT:
        return None
    if ext == ".tsv" and delimiter is None:
        delimiter = "\t"
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            rows: list[list[str]] = []
            for line in f:
                if not line.strip() or (not rows and is_comment(line)):
                    continue
                line = line.rstrip("\r\n")
                if delimiter is None:
                    delimiter = guess_delimiter(line)
                rows.append([cell.strip() for cell in split_line(line, delimiter)])
                if len(rows) == 1 + BELOW:
                    break
    except (OSError, UnicodeDecodeError):
        return None
    return rows
