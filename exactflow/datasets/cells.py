"""How the cells and lines of a text table are read: missing-value markers, comments, quotes
left open, headers, and the first line that names columns with numbers.

:func:`~exactflow.datasets.load` reads CSV text with these rules (``files.py``)."""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Iterator

import numpy as np

from ..validation import DataError

__all__ = ["MISSING", "HASH_NOTE", "split_line", "guess_delimiter", "cell_note", "BELOW",
           "number_or_nan", "is_comment", "opens_quote", "is_number", "in_step",
           "looks_like_names", "missing_error", "is_header"]


#: Added to the error of a non-numeric cell that starts with ``#``.
HASH_NOTE = (" (a line starting with '#' inside the table is a row when it has the table's "
             "width, as with Excel's #N/A in a first cell; a comment otherwise)")


#: Cells read as a missing value with ``missing="nan"``: pandas' default ``na_values``, and
#: the ``?`` of many public tables.
MISSING = frozenset({
    "", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND",
    "1.#QNAN", "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null", "?",
})


_SEPARATED = re.compile(r"[+-]?\d{1,3}([,.' \u00a0]\d{3})+([.,]\d+)?|[+-]?\d+,\d+")
_SIGNED = re.compile(r"[$\u20ac\u00a3\u00a5].*|.*[%$\u20ac\u00a3]")


def split_line(line: str, delimiter: str | None) -> list[str]:
    """The cells of one line: by ``delimiter`` (quotes as the csv module reads them), or
    by runs of whitespace for ``None``."""
    if delimiter is None:
        return line.split()
    return next(csv.reader([line], delimiter=delimiter))


def guess_delimiter(line: str) -> str | None:
    """The delimiter of a table from its first line: a comma, tab or semicolon, else
    ``None`` (runs of whitespace)."""
    for candidate in (",", "\t", ";"):
        if candidate in line:
            return candidate
    return None


def cell_note(cell: str) -> str:
    """What to add to the error of a non-numeric ``cell``, where it looks like a number
    written for people (thousands separators, a decimal comma, a currency or percent
    sign) or starts with ``#`` (:data:`HASH_NOTE`); '' otherwise."""
    if cell.startswith("#"):
        return HASH_NOTE
    if _SEPARATED.fullmatch(cell):
        return (" (a number written with thousands separators or a decimal comma, which are "
                "not read: export the column as plain digits with '.' for the decimal point)")
    if _SIGNED.fullmatch(cell) and is_number(cell.strip("$%\u20ac\u00a3\u00a5 ").replace(",", "")):
        return " (a number with a currency or percent sign: export the column as plain numbers)"
    return ""


def number_or_nan(cell: str) -> float:
    """``float(cell)``, or NaN for a missing-value marker (:data:`MISSING`)."""
    return math.nan if cell.strip() in MISSING else float(cell)


#: A first cell that is a spreadsheet's missing value, not the start of a comment.
_HASH_CELL = re.compile(r"\s*#(N/A( N/A)?|NA)\s*([,;\t]|$)")


def is_comment(line: str) -> bool:
    """A line starting with ``#``, unless its first cell is ``#N/A`` or ``#NA``."""
    return line.lstrip().startswith("#") and not _HASH_CELL.match(line)


def opens_quote(line: str, delimiter: str | None) -> bool:
    """Whether ``line`` leaves a quoted cell open, so that the csv module reads on into
    the next line: a quote that starts a cell, and an odd count of quotes (a quote inside
    an unquoted cell, as ``12" pipe``, is a plain character)."""
    if delimiter is None or line.count('"') % 2 == 0:
        return False
    return any(cell.lstrip().startswith('"') for cell in line.split(delimiter))


def is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


def in_step(
    path: str, body: list[tuple[int, str]], records: Iterator[list[str]]
) -> Iterator[tuple[tuple[int, str], list[str]]]:
    """``zip(body, records)``, refusing lines and records out of step (a record over
    several lines) by name instead of with ``zip``'s own message."""
    try:
        yield from zip(body, records, strict=True)
    except ValueError as err:
        if not str(err).startswith("zip()"):
            raise
        raise DataError(f"{path!r}: a quoted cell runs over several lines; a table of "
                        "numbers has one row per line") from None


def looks_like_names(first: list[str], keep: list[int], table: np.ndarray) -> bool:
    """Whether a first line read as data looks like column names written as numbers:
    two or more distinct whole numbers above five rows or more, each farther outside its
    column's range below it than that range is wide (2019 above values of 8 to 12; a
    table of counts, sorted or not, has no such first row)."""
    cells = [first[j] for j in keep]
    if len(cells) < 2 or len(table) < 6 or len(set(cells)) < len(cells):
        return False
    if not all(cell.lstrip("+-").isdigit() for cell in cells):
        return False
    rest = table[1:]
    if np.isnan(rest).all(axis=0).any():
        return False
    low, high = np.nanmin(rest, axis=0), np.nanmax(rest, axis=0)  # (missing cells: NaN)
    gap = np.maximum(low - table[0], table[0] - high)
    return bool(np.all(gap > np.maximum(high - low, 1e-12)))


def missing_error(
    path: str, cell: str, lineno: int, j: int, names: list[str] | None
) -> DataError:
    """The error for a missing value (``cell``) at ``lineno``, column ``j`` (0-based)."""
    where = f"column {j + 1}" + (f" ({names[j]!r})" if names else "")
    what = "an empty cell" if not cell else f"{cell!r}"
    return DataError(
        f"{path!r}: {what} at line {lineno}, {where} (a missing value); drop or impute that "
        "row, or leave the column out (columns=[...]; --columns in the command line); "
        "`exactflow train --missing skip` leaves such rows out, `exactflow score --missing "
        "skip` scores the other rows"
    )


#: How many lines under a first line of ``0, 1, 2, ...`` are looked at for a decimal.
BELOW = 5


def is_header(first: list[str], below: list[list[str]]) -> bool:
    """Whether the first line of a table names its columns: none of its cells is a number,
    or they are the labels pandas writes for unnamed columns (``0, 1, 2, ...`` in any
    order, after an empty cell for the index) above decimals in the next few lines (a
    first row of missing values leaves its line without one)."""
    if not any(is_number(cell) for cell in first):
        return True
    labels = first[1:] if first and first[0] == "" else first
    counts = sorted(labels) == sorted(str(i) for i in range(len(labels)))
    return counts and any(
        is_number(cell) and not cell.strip().lstrip("+-").isdigit()
        for line in below[:BELOW] for cell in line)


def not_utf8_error(path: str) -> str:
    """What to say of a text table that is not UTF-8: where its first such byte is."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        return (f"cannot read {path!r}: not a UTF-8 text file (line {line} holds the byte "
                f"0x{data[err.start]:02x}, as a Latin-1 or Windows-1252 file would); save it "
                "as UTF-8")
    return f"cannot read {path!r}: not a UTF-8 text file"

