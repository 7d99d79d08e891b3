"""Data for density estimation: 2D toy generators, tabular files, checks, splits, scaling.

* :func:`toy` draws the eight 2D benchmarks of the flow literature (the FFJORD definitions),
  and :data:`TOY_ENTROPY` gives each one's true entropy, so a model's ``test NLL - H`` is an
  absolute measure of how far it is from perfect.
* :func:`load` reads CSV, ``.npy`` (memory-mapped, never read whole) and ``.npz`` files;
  :func:`digits` is scikit-learn's 8x8 digits with uniform dequantization, a real
  64-dimensional benchmark.
* :func:`validate` stops bad data before training with a :class:`DataError` that names the
  problem (NaN/inf rows, wrong columns, too few rows, non-numeric cells, constant columns).
* :func:`split` makes seeded train/validation/test splits; :class:`Standardize` is the fixed
  affine layer a model puts first so that ``log_prob`` stays in the units of the user's data.

Every function that walks over the data does so in chunks of rows, so a memory-mapped array
larger than memory is checked, split and standardized without being copied whole.
"""

from __future__ import annotations

import csv
import functools
import math
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .core import Transform

__all__ = [
    "TOYS",
    "TOY_ENTROPY",
    "DataError",
    "Subset",
    "Standardize",
    "toy",
    "load",
    "digits",
    "validate",
    "split",
    "as_tensor",
]

#: Rows per chunk when a function walks over (possibly memory-mapped) data.
CHUNK_ROWS = 65536

#: How many offending rows or cells an error message lists before "...".
_SHOW = 5


class DataError(ValueError):
    """Data that a flow cannot be trained on, or a data file that cannot be read.

    The message names the problem and where it is (rows, columns, file lines).
    """


# ---------------------------------------------------------------------------------------
# 2D toy densities
# ---------------------------------------------------------------------------------------


def _moons(rng: np.random.Generator, n: int) -> np.ndarray:
    # scikit-learn make_moons(noise=0.1): upper arc (cos t, sin t) and lower arc
    # (1 - cos t, 0.5 - sin t), t in [0, pi], each with probability 1/2; then 2x + (-1, -0.2).
    t = rng.uniform(0.0, math.pi, n)
    lower = rng.random(n) < 0.5
    x = np.where(lower, 1.0 - np.cos(t), np.cos(t))
    y = np.where(lower, 0.5 - np.sin(t), np.sin(t))
    pts = np.stack([x, y], axis=1) + rng.normal(scale=0.1, size=(n, 2))
    return 2.0 * pts + np.array([-1.0, -0.2])


def _circles(rng: np.random.Generator, n: int) -> np.ndarray:
    # scikit-learn make_circles(factor=0.5, noise=0.08), then * 3.
    t = rng.uniform(0.0, 2 * math.pi, n)
    radius = np.where(rng.random(n) < 0.5, 0.5, 1.0)
    pts = radius[:, None] * np.stack([np.cos(t), np.sin(t)], axis=1)
    pts = pts + rng.normal(scale=0.08, size=(n, 2))
    return 3.0 * pts


def _rings(rng: np.random.Generator, n: int) -> np.ndarray:
    # Four circles of radius 3, 2.25, 1.5, 0.75 with equal weight, noise 0.08.
    t = rng.uniform(0.0, 2 * math.pi, n)
    radius = 3.0 * np.array([1.0, 0.75, 0.5, 0.25])[rng.integers(0, 4, n)]
    pts = radius[:, None] * np.stack([np.cos(t), np.sin(t)], axis=1)
    return pts + rng.normal(scale=0.08, size=(n, 2))


def _eight_gaussians(rng: np.random.Generator, n: int) -> np.ndarray:
    # Centres at radius 4 every 45 degrees, std 0.5, everything divided by 1.414.
    angle = rng.integers(0, 8, n) * (math.pi / 4)
    centres = 4.0 * np.stack([np.cos(angle), np.sin(angle)], axis=1)
    return (centres + rng.normal(scale=0.5, size=(n, 2))) / 1.414


def _checkerboard(rng: np.random.Generator, n: int) -> np.ndarray:
    # x1 ~ U[-2, 2); x2 in the unit cell above or below, shifted by the parity of floor(x1);
    # then * 2: eight 2x2 squares in [-4, 4]^2 (density 1/32 on each).
    x1 = rng.uniform(-2.0, 2.0, n)
    x2 = rng.random(n) - 2.0 * rng.integers(0, 2, n) + np.floor(x1) % 2
    return 2.0 * np.stack([x1, x2], axis=1)


def _pinwheel(rng: np.random.Generator, n: int) -> np.ndarray:
    # Five arms; radial coordinate ~ N(1, 0.3), tangential ~ N(0, 0.1); a point is rotated by
    # its arm's angle plus 0.25 * exp(radial), then * 2.
    arm = rng.integers(0, 5, n)
    radial = 1.0 + 0.3 * rng.standard_normal(n)
    tangential = 0.1 * rng.standard_normal(n)
    angle = arm * (2 * math.pi / 5) + 0.25 * np.exp(radial)
    c, s = np.cos(angle), np.sin(angle)
    return 2.0 * np.stack([radial * c + tangential * s, -radial * s + tangential * c], axis=1)


def _two_spirals(rng: np.random.Generator, n: int) -> np.ndarray:
    # Angle sqrt(U) * 3 pi, arm (-cos t * t, sin t * t) + U[0, 0.5)^2 jitter, the second arm
    # its negative, all / 3, plus N(0, 0.1^2) noise.
    t = np.sqrt(rng.random(n)) * (3 * math.pi)
    x = -np.cos(t) * t + 0.5 * rng.random(n)
    y = np.sin(t) * t + 0.5 * rng.random(n)
    sign = np.where(rng.random(n) < 0.5, -1.0, 1.0)
    pts = sign[:, None] * np.stack([x, y], axis=1) / 3.0
    return pts + rng.normal(scale=0.1, size=(n, 2))


def _swissroll(rng: np.random.Generator, n: int) -> np.ndarray:
    # scikit-learn make_swiss_roll(noise=1.0), coordinates (x, z), / 5.
    t = 1.5 * math.pi * (1.0 + 2.0 * rng.random(n))
    pts = np.stack([t * np.cos(t), t * np.sin(t)], axis=1)
    return (pts + rng.standard_normal((n, 2))) / 5.0


_TOY_GENERATORS: dict[str, Callable[[np.random.Generator, int], np.ndarray]] = {
    "moons": _moons,
    "circles": _circles,
    "8gaussians": _eight_gaussians,
    "checkerboard": _checkerboard,
    "pinwheel": _pinwheel,
    "2spirals": _two_spirals,
    "rings": _rings,
    "swissroll": _swissroll,
}

#: Names accepted by :func:`toy`.
TOYS: tuple[str, ...] = tuple(_TOY_GENERATORS)

#: True differential entropy H (nats) of each :func:`toy` generator, the best expected test NLL
#: any model can reach; ``test NLL - H >= 0`` up to sampling noise. Closed form for
#: checkerboard (ln 32); the others by Monte Carlo with exact densities (standard error about
#: 0.002). ``pinwheel`` has no reference value (its density has no closed form) and is absent.
#: Standardizing the data by ``x / s`` shifts H by ``-sum(log s)``.
TOY_ENTROPY: dict[str, float] = {
    "checkerboard": math.log(32.0),
    "8gaussians": 2.833,
    "moons": 2.394,
    "circles": 3.267,
    "rings": 2.624,
    "swissroll": 2.669,
    "2spirals": 2.646,
}


def toy(name: str, n: int, seed: int = 0) -> Tensor:
    """Draw ``n`` i.i.d. points from a 2D benchmark density.

    The definitions and parameters are FFJORD's (Grathwohl et al. 2019, ``lib/toy_data.py``),
    used across the flow literature, so :data:`TOY_ENTROPY` applies:

    * ``moons``: scikit-learn's ``make_moons(noise=0.1)``: arcs ``(cos t, sin t)`` and
      ``(1 - cos t, 0.5 - sin t)``, ``t ~ U[0, pi]``, Gaussian noise std 0.1; then
      ``2 x + (-1, -0.2)``.
    * ``circles``: ``make_circles(factor=0.5, noise=0.08)``: unit and half-unit circles,
      noise std 0.08; then ``* 3``.
    * ``8gaussians``: centres at radius 4 every 45 degrees, std 0.5, all divided by 1.414.
    * ``checkerboard``: eight 2x2 squares of a checkerboard in ``[-4, 4]^2``, uniform.
    * ``pinwheel``: five arms; radial ``N(1, 0.3^2)``, tangential ``N(0, 0.1^2)``, rotated by
      the arm's angle plus ``0.25 exp(radial)``; then ``* 2``.
    * ``2spirals``: angle ``t = sqrt(U) 3 pi``, arm ``(-t cos t, t sin t)`` plus
      ``U[0, 0.5)`` jitter per coordinate, and its mirror image; ``/ 3``, noise std 0.1.
    * ``rings``: four circles of radius 3, 2.25, 1.5, 0.75, noise std 0.08.
    * ``swissroll``: ``make_swiss_roll(noise=1.0)`` coordinates ``(x, z)``:
      ``t = 1.5 pi (1 + 2U)``, ``(t cos t, t sin t) + N(0, I)``; then ``/ 5``.

    Mixture components (moon, circle, ring, arm, centre) are chosen independently per point
    and angles are drawn uniformly, where scikit-learn and FFJORD use fixed counts and evenly
    spaced angles: the density is the same, and the points are a true i.i.d. sample of it,
    which an honest test NLL needs.

    Args:
        name: one of :data:`TOYS`.
        n: number of points (>= 1).
        seed: seed of a local ``numpy.random.Generator``; the global RNG is untouched.

    Returns:
        A ``(n, 2)`` float32 tensor.

    Raises:
        ValueError: unknown ``name`` or ``n < 1``.

    Example:
        >>> import exactflow as ef
        >>> ef.datasets.toy("moons", 5).shape
        torch.Size([5, 2])
    """
    if name not in _TOY_GENERATORS:
        raise ValueError(f"unknown toy dataset {name!r}; choose one of {', '.join(TOYS)}")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"toy({name!r}, n) needs an integer n >= 1, got {n!r}")
    rng = np.random.default_rng(seed)
    pts = _TOY_GENERATORS[name](rng, int(n))
    return torch.from_numpy(np.ascontiguousarray(pts, dtype=np.float32))


# ---------------------------------------------------------------------------------------
# Lazy row/column views of memory-mapped data
# ---------------------------------------------------------------------------------------


class Subset:
    """Selected rows and/or columns of an array, read lazily (for memory-mapped data).

    ``split`` returns these for ``np.memmap`` input and ``load`` for a column selection of a
    memory-mapped ``.npy`` that is not a plain slice, so that nothing is read whole. Rows are
    kept in increasing file order (sequential reads); shuffle when batching.

    It behaves like a read-only 2-D array for what training needs: ``len``, ``shape``,
    ``ndim``, ``dtype``, ``subset[i]``/``subset[i:j]``/``subset[index_array]`` (reads only those
    rows, returns an ``ndarray``) and ``np.asarray(subset)`` (reads all of it: only do this when
    it fits in memory).

    Args:
        base: the underlying array (``np.memmap`` or ``ndarray``), 2-D.
        rows: row indices into ``base`` (``None``: all rows).
        columns: column indices into ``base`` (``None``: all columns).
    """

    def __init__(
        self,
        base: np.ndarray,
        rows: np.ndarray | None = None,
        columns: np.ndarray | None = None,
    ):
        if isinstance(base, Subset):
            rows = base.rows if rows is None else (
                np.asarray(rows) if base.rows is None else base.rows[np.asarray(rows)]
            )
            columns = base.columns if columns is None else (
                np.asarray(columns) if base.columns is None else base.columns[np.asarray(columns)]
            )
            base = base.base
        if base.ndim != 2:
            raise ValueError(f"Subset needs a 2-D array, got shape {tuple(base.shape)}")
        self.base = base
        self.rows = None if rows is None else np.asarray(rows, dtype=np.int64)
        self.columns = None if columns is None else np.asarray(columns, dtype=np.int64)

    @property
    def shape(self) -> tuple[int, int]:
        n = self.base.shape[0] if self.rows is None else len(self.rows)
        d = self.base.shape[1] if self.columns is None else len(self.columns)
        return (n, d)

    @property
    def ndim(self) -> int:
        return 2

    @property
    def dtype(self) -> np.dtype:
        return self.base.dtype

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index: Any) -> np.ndarray:
        if isinstance(index, tuple):
            raise TypeError("Subset takes row indices only (a slice, an int or an index array)")
        if self.rows is None:
            out = self.base[index]
        else:
            out = self.base[self.rows[index]]
        out = np.asarray(out)
        if self.columns is not None:
            out = out[..., self.columns]
        return out

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self[:]
        return out if dtype is None else out.astype(dtype, copy=False)

    def __repr__(self) -> str:
        return f"Subset(shape={self.shape}, dtype={self.dtype}, base={type(self.base).__name__})"


ArrayLike = np.ndarray | Tensor | Subset


def _is_lazy(data: Any) -> bool:
    return isinstance(data, (np.memmap, Subset))


def _numpy(data: Any) -> np.ndarray | Subset:
    """A numpy view of ``data`` (no copy for arrays, memmaps, subsets and CPU tensors)."""
    if isinstance(data, (np.ndarray, Subset)):
        return data
    if isinstance(data, Tensor):
        return data.detach().cpu().numpy()
    return np.asarray(data)


def _chunks(data: np.ndarray | Subset) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(start, block)`` with ``block = data[start:start + CHUNK_ROWS]`` as an ndarray."""
    n, rows = len(data), CHUNK_ROWS
    for start in range(0, n, rows):
        yield start, np.asarray(data[start : start + rows])


# ---------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------


def _check_readable(path: str) -> None:
    if not os.path.exists(path):
        raise DataError(f"cannot read {path!r}: no such file")
    if os.path.isdir(path):
        raise DataError(f"cannot read {path!r}: it is a directory")
    if not os.access(path, os.R_OK):
        raise DataError(f"cannot read {path!r}: permission denied")


def _is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


def _split_line(line: str, delimiter: str | None) -> list[str]:
    if delimiter is None:  # runs of whitespace
        return line.split()
    return next(csv.reader([line], delimiter=delimiter))


def _guess_delimiter(line: str) -> str | None:
    for candidate in (",", "\t", ";"):
        if candidate in line:
            return candidate
    return None


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
                    "(pass column indices, or header=True if the first line is a header)"
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
    return out


def _read_text(
    path: str, columns: Sequence[int | str] | None, header: bool | str, delimiter: str | None
) -> np.ndarray:
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            text = f.read()
    except UnicodeDecodeError:
        raise DataError(f"cannot read {path!r}: not a UTF-8 text file") from None
    except OSError as e:
        raise DataError(f"cannot read {path!r}: {e.strerror or e}") from None

    # (1-based line number, line) of the lines that carry data; blank lines and lines
    # starting with '#' are skipped.
    lines = [
        (i + 1, line)
        for i, line in enumerate(text.splitlines())
        if line.strip() and not line.lstrip().startswith("#")
    ]
    if not lines:
        raise DataError(f"cannot read {path!r}: the file is empty")
    if delimiter is None:
        delimiter = _guess_delimiter(lines[0][1])
    first = [cell.strip() for cell in _split_line(lines[0][1], delimiter)]
    if header == "auto":
        # A header row is one in which no cell is a number.
        has_header = not any(_is_number(cell) for cell in first)
    elif isinstance(header, bool):
        has_header = header
    else:
        raise ValueError(f"header must be True, False or 'auto', got {header!r}")
    names = first if has_header else None
    width = len(first)
    body = lines[1:] if has_header else lines
    if not body:
        raise DataError(f"cannot read {path!r}: a header row but no data rows")
    keep = _column_indices(columns, width, names, path)

    if delimiter is None:
        records: Iterator[list[str]] = (line.split() for _, line in body)
    else:
        records = csv.reader((line for _, line in body), delimiter=delimiter)
    rows: list[list[float]] = []
    for (lineno, _), cells in zip(body, records, strict=True):
        if len(cells) != width:
            raise DataError(
                f"{path!r}: line {lineno} has {len(cells)} fields, expected {width} "
                f"(as on line {lines[0][0]})"
            )
        try:
            rows.append([float(cells[j]) for j in keep])
        except ValueError:
            _raise_cell_error(path, lineno, cells, keep, names)
    return np.array(rows, dtype=np.float64).reshape(len(rows), len(keep))


def _raise_cell_error(
    path: str, lineno: int, cells: list[str], keep: list[int], names: list[str] | None
) -> None:
    for j in keep:
        cell = cells[j].strip()
        if not _is_number(cell):
            where = f"column {j + 1}" + (f" ({names[j]!r})" if names else "")
            what = "an empty cell" if not cell else f"non-numeric cell {cell!r}"
            raise DataError(
                f"{path!r}: {what} at line {lineno}, {where}; "
                "choose the numeric columns with columns=[...]"
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


def load(
    path: str | os.PathLike[str],
    columns: Sequence[int | str] | None = None,
    header: bool | str = "auto",
    delimiter: str | None = None,
    mmap: bool = True,
    key: str | None = None,
) -> np.ndarray | Subset:
    """Read a table of numbers from a CSV, ``.npy`` or ``.npz`` file.

    * CSV and other text (``.csv``, ``.tsv``, ``.txt``, ``.dat``): the delimiter is guessed
      from the first line (comma, tab, semicolon, else whitespace) unless given; blank lines and
      lines starting with ``#`` are skipped. ``header="auto"`` treats the first line as a
      header when none of its cells is a number. Every selected cell must be a number
      (``nan``/``inf`` parse, and :func:`validate` reports them); a non-numeric or empty cell
      raises :class:`DataError` with its 1-based line and column as in the file. Text is
      read into memory: convert data larger than memory to ``.npy`` once.
    * ``.npy``: with ``mmap=True`` opened by ``np.load(mmap_mode="r")``: an ``np.memmap`` that
      reads rows from disk on demand, so a file larger than memory is never read whole. A
      column selection that is an evenly spaced range stays a memmap view; any other selection
      gives a lazy :class:`Subset`. Pickled (object) arrays are refused.
    * ``.npz``: the file's only array, or the one named ``key`` (read into memory: members of
      a zip archive cannot be memory-mapped).

    Args:
        path: the file.
        columns: column names (CSV with header) or integer indices (negative allowed) to keep,
            in the order given; ``None`` keeps all.
        header: ``True``, ``False`` or ``"auto"`` (CSV only).
        delimiter: the CSV delimiter; ``None`` guesses it.
        mmap: memory-map ``.npy`` files (default).
        key: the array to take from a ``.npz`` holding several.

    Returns:
        A float64 ``ndarray`` for text; for ``.npy``/``.npz`` the stored array as is (an
        ``np.memmap`` or :class:`Subset` when memory-mapped). Run :func:`validate` on it.

    Raises:
        DataError: missing or unreadable file, unknown format, non-numeric cells, ragged rows,
            unknown columns.
    """
    path = os.fspath(path)
    _check_readable(path)
    ext = os.path.splitext(path)[1].lower()
    if ext in (".csv", ".tsv", ".txt", ".dat"):
        if ext == ".tsv" and delimiter is None:
            delimiter = "\t"
        return _read_text(path, columns, header, delimiter)
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
            raise DataError(f"cannot read {path!r}: not a valid .npy file ({e})") from None
        except (OSError, EOFError) as e:
            raise DataError(f"cannot read {path!r}: not a valid .npy file ({e})") from None
        return _select_columns(arr, columns, path)
    if ext == ".npz":
        try:
            with np.load(path, allow_pickle=False) as archive:
                keys = list(archive.keys())
                if key is None:
                    if len(keys) != 1:
                        raise DataError(
                            f"{path!r} holds {len(keys)} arrays {keys}; choose one with key="
                        )
                    key = keys[0]
                if key not in keys:
                    raise DataError(f"{path!r} has no array {key!r}; it holds {keys}")
                arr = archive[key]
        except DataError:
            raise
        except (ValueError, OSError, EOFError) as e:
            if "pickle" in str(e).lower():
                raise DataError(
                    f"cannot read {path!r}: it holds a pickled object array, which is refused"
                ) from None
            raise DataError(f"cannot read {path!r}: not a valid .npz file ({e})") from None
        return _select_columns(arr, columns, path)
    raise DataError(
        f"cannot read {path!r}: unknown file type {ext or '(none)'!r}; "
        "use .csv/.tsv/.txt, .npy or .npz"
    )


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


@functools.lru_cache(maxsize=1)
def _digits_raw() -> np.ndarray:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ImportError(
            "exactflow.datasets.digits() needs scikit-learn: pip install 'exactflow[sklearn]'"
        ) from None
    x = np.asarray(load_digits().data, dtype=np.float64)
    x.setflags(write=False)
    return x


def digits(dequantize: bool = True, seed: int = 0) -> np.ndarray:
    """scikit-learn's 8x8 handwritten digits as a 64-dimensional density benchmark.

    The 1797 images of ``sklearn.datasets.load_digits`` (shipped with scikit-learn, no
    download) hold integers 0..16. Uniform dequantization turns them into a continuous
    density on ``(0, 1)^64``: ``y = (x + u) / 17`` with ``u ~ U[0, 1)``, whose log-likelihood
    lower-bounds that of the discrete data (Theis et al. 2016, arXiv:1511.01844). The values
    are kept in ``[2^-20, 1 - 2^-20]`` (about 2 of the 115,008 values move, by less than
    1e-6) so that they stay strictly inside (0, 1) after a cast to float32, as a logit layer
    needs.

    Args:
        dequantize: add the uniform noise and scale to (0, 1); ``False`` returns the raw
            integers 0..16 as floats.
        seed: seed of the dequantization noise (a local generator).

    Returns:
        A ``(1797, 64)`` float64 array.

    Raises:
        ImportError: scikit-learn is not installed (``pip install 'exactflow[sklearn]'``).
    """
    x = _digits_raw().copy()
    if not dequantize:
        return x
    rng = np.random.default_rng(seed)
    y = (x + rng.random(x.shape)) / 17.0
    eps = 2.0**-20
    return np.clip(y, eps, 1.0 - eps)


# ---------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------


def _list(indices: Sequence[int] | np.ndarray, total: int) -> str:
    shown = ", ".join(str(int(i)) for i in list(indices)[:_SHOW])
    return shown + (", ..." if total > _SHOW else "")


def _first_non_numeric(data: np.ndarray) -> tuple[int, int, Any] | None:
    for i in range(data.shape[0]):
        for j in range(data.shape[1]):
            try:
                float(data[i, j])
            except (TypeError, ValueError):
                return i, j, data[i, j]
    return None


def validate(
    data: ArrayLike | str | os.PathLike[str],
    features: int | None = None,
    batch_size: int | None = None,
    name: str = "data",
) -> ArrayLike:
    """Check that ``data`` can be trained on; raise a :class:`DataError` naming the problem.

    Checks, in order: a 2-D array ``(rows, features)``; not empty; numeric cells; ``features``
    columns; at least ``batch_size`` rows; no NaN or inf (the message lists the first row
    indices); no constant (zero-variance) column (a density has no width there, so its
    log-likelihood is unbounded). Row and column indices in messages are 0-based array
    indices; a file's cells are checked by :func:`load`, with its line numbers.

    Memory-mapped arrays are checked in chunks of rows, never copied whole.

    Args:
        data: an array, tensor, ``np.memmap``, :class:`Subset`, or a path for :func:`load`.
        features: the number of columns the model expects.
        batch_size: the training batch size (the data must hold at least one batch).
        name: how messages call the data (e.g. ``"validation data"``).

    Returns:
        ``data`` itself (a path is loaded first), so calls can be chained.

    Raises:
        DataError: the first problem found.
    """
    if isinstance(data, (str, os.PathLike)):
        data = load(data)
    arr = _numpy(data)
    if arr.ndim != 2:
        hint = "; for one feature use data.reshape(-1, 1)" if arr.ndim == 1 else ""
        raise DataError(
            f"{name}: expected a 2-D array (rows, features), got shape {tuple(arr.shape)}{hint}"
        )
    n, d = arr.shape
    if n == 0 or d == 0:
        raise DataError(f"{name} is empty: shape {tuple(arr.shape)}")
    if arr.dtype.kind not in "biuf":
        if arr.dtype.kind == "c":
            raise DataError(f"{name}: complex values are not supported (dtype {arr.dtype})")
        bad = _first_non_numeric(np.asarray(arr))
        if bad is not None:
            i, j, cell = bad
            cell = cell.item() if isinstance(cell, np.generic) else cell
            raise DataError(
                f"{name}: non-numeric cell {cell!r} at row index {i}, column index {j}"
            )
        arr = np.asarray(arr, dtype=np.float64)
    if features is not None and d != features:
        raise DataError(f"{name}: expected {features} columns (features), got {d}")
    if batch_size is not None and n < batch_size:
        raise DataError(
            f"{name} has {n} rows, fewer than one batch (batch_size={batch_size}): "
            "lower batch_size or add data"
        )

    bad_rows: list[int] = []
    n_bad = 0
    lo = np.full(d, np.inf)
    hi = np.full(d, -np.inf)
    for start, block in _chunks(arr):
        if block.dtype.kind == "f":
            row_ok = np.isfinite(block).all(axis=1)
            if not row_ok.all():
                idx = np.flatnonzero(~row_ok)
                n_bad += len(idx)
                bad_rows.extend((start + idx[: max(_SHOW - len(bad_rows), 0)]).tolist())
        if not n_bad:  # column ranges, for the constant-column check
            lo = np.minimum(lo, block.min(axis=0))
            hi = np.maximum(hi, block.max(axis=0))
    if n_bad:
        rows = "row" if n_bad == 1 else "rows"
        raise DataError(
            f"{name}: NaN or inf in {n_bad} {rows} (row indices {_list(bad_rows, n_bad)}); "
            "drop or impute them"
        )
    if n > 1:
        constant = np.flatnonzero(lo == hi)
        if len(constant):
            cols = "column" if len(constant) == 1 else "columns"
            raise DataError(
                f"{name}: constant (zero-variance) {cols} {_list(constant, len(constant))} "
                "(column indices): a density has no width there; drop them"
            )
    return data


# ---------------------------------------------------------------------------------------
# Splits and tensors
# ---------------------------------------------------------------------------------------


def split(
    data: ArrayLike, fractions: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0
) -> tuple[ArrayLike, ...]:
    """Split rows at random into parts of the given fractions (train, validation, test).

    One seeded permutation of the rows is cut at ``round(n * cumsum(fractions))``, so the
    parts are disjoint, cover every row and are the same for the same seed and data length.

    * ``ndarray`` and ``Tensor`` input: each part is a copy of its rows, in random order.
    * ``np.memmap`` or :class:`Subset` input: each part is a lazy :class:`Subset` holding only
      its row indices (sorted, for sequential disk reads); nothing is read until it is indexed.

    Args:
        data: ``(rows, features)`` data.
        fractions: non-negative fractions summing to 1 (two for train/validation, three for
            train/validation/test, or any number).
        seed: seed of the permutation (a local generator).

    Returns:
        A tuple with one part per fraction.

    Raises:
        ValueError: fractions that are negative or do not sum to 1.
        DataError: data with fewer rows than parts or not 2-D.
    """
    fr = np.asarray(fractions, dtype=np.float64)
    if fr.ndim != 1 or len(fr) < 1 or (fr < 0).any() or abs(fr.sum() - 1.0) > 1e-6:
        raise ValueError(f"fractions must be non-negative and sum to 1, got {tuple(fractions)}")
    if not isinstance(data, (np.ndarray, Tensor, Subset)):
        data = np.asarray(data)
    n = len(data)
    if len(data.shape) != 2:
        raise DataError(f"split needs a 2-D array (rows, features), got shape {tuple(data.shape)}")
    if n < len(fr):
        raise DataError(f"cannot split {n} rows into {len(fr)} parts")
    cuts = np.rint(np.cumsum(fr) * n).astype(np.int64)
    cuts[-1] = n
    perm = np.random.default_rng(seed).permutation(n)
    parts = np.split(perm, cuts[:-1])
    if _is_lazy(data):
        return tuple(Subset(data, rows=np.sort(p)) for p in parts)
    if isinstance(data, Tensor):
        return tuple(data[torch.from_numpy(p).to(data.device)] for p in parts)
    arr = np.asarray(data)
    return tuple(arr[p] for p in parts)


def as_tensor(data: ArrayLike, dtype: torch.dtype = torch.float32) -> Tensor:
    """``data`` as a tensor of ``dtype`` (a memmap or :class:`Subset` is read whole: it must
    fit in memory; batch large files by indexing them instead)."""
    if isinstance(data, Tensor):
        return data.to(dtype)
    arr = np.asarray(data)
    if arr.dtype.kind not in "biuf":
        validate(arr)  # names the non-numeric cell
    np_dtype = {torch.float32: np.float32, torch.float16: np.float16}.get(dtype, np.float64)
    return torch.from_numpy(np.array(arr, dtype=np_dtype)).to(dtype)


# ---------------------------------------------------------------------------------------
# Standardization as a layer
# ---------------------------------------------------------------------------------------


def _float64(values: Any) -> np.ndarray:
    if isinstance(values, Tensor):
        values = values.detach().cpu().double().numpy()
    return np.asarray(values, dtype=np.float64)


class Standardize(Transform):
    """A fixed per-feature affine map ``z = (x - mean) / std``, the first layer of a model.

    Training on standardized data changes the units of the density; putting the scaling
    inside the model instead keeps ``log_prob`` in the units of the user's data, because the
    change of variables adds ``log|det dz/dx| = -sum_i log std_i`` (the same for every row).
    Both directions are closed form and cost O(d); ``mean`` and ``std`` are buffers (saved
    with the model, not trained).

    Args:
        mean: ``(features,)`` shift.
        std: ``(features,)`` positive scale.
        dtype: dtype of the buffers (default: torch's default dtype); ``.double()`` later
            casts values already rounded to it, so pass ``torch.float64`` for float64 work.

    Example:
        >>> import torch, exactflow as ef
        >>> x = 3 + 2 * torch.randn(100, 2, dtype=torch.float64)
        >>> t = ef.datasets.Standardize.fit(x, dtype=torch.float64)
        >>> report = ef.check_transform(t, x)
        >>> report.ok
        True
    """

    linear = True

    def __init__(self, mean: Any, std: Any, dtype: torch.dtype | None = None):
        super().__init__()
        dtype = dtype or torch.get_default_dtype()
        mean_t = torch.as_tensor(_float64(mean)).to(dtype)
        std_t = torch.as_tensor(_float64(std)).to(dtype)
        if mean_t.ndim != 1 or mean_t.shape != std_t.shape:
            raise ValueError(
                "Standardize needs 1-D mean and std of the same length, got shapes "
                f"{tuple(mean_t.shape)} and {tuple(std_t.shape)}"
            )
        bad = torch.nonzero(~(torch.isfinite(std_t) & (std_t > 0))).flatten().tolist()
        if bad:
            raise ValueError(f"Standardize needs finite std > 0; columns {bad} are not")
        if not bool(torch.isfinite(mean_t).all()):
            raise ValueError("Standardize needs a finite mean")
        self.features = int(mean_t.numel())
        self.register_buffer("mean", mean_t)
        self.register_buffer("std", std_t)

    @classmethod
    def identity(cls, features: int, dtype: torch.dtype | None = None) -> Standardize:
        """The identity (mean 0, std 1); ``load_state_dict`` later fills the real values."""
        return cls(np.zeros(features), np.ones(features), dtype=dtype)

    @classmethod
    def fit(cls, data: ArrayLike, dtype: torch.dtype | None = None) -> Standardize:
        """Mean and standard deviation (``ddof=0``) of each column of ``data``.

        Accumulates in float64 over chunks of rows (Chan et al.'s pairwise update), so a
        memory-mapped array is never copied whole.

        Raises:
            DataError: data :func:`validate` rejects (NaN/inf, constant columns, ...).
        """
        validate(data, name="data for Standardize.fit")
        arr = _numpy(data)
        count = 0
        mean = np.zeros(arr.shape[1])
        m2 = np.zeros(arr.shape[1])
        for _, block in _chunks(arr):
            b = block.astype(np.float64, copy=False)
            nb = b.shape[0]
            mb = b.mean(axis=0)
            m2b = ((b - mb) ** 2).sum(axis=0)
            delta = mb - mean
            total = count + nb
            mean = mean + delta * (nb / total)
            m2 = m2 + m2b + delta**2 * (count * nb / total)
            count = total
        return cls(mean, np.sqrt(m2 / count), dtype=dtype)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        z = (x - self.mean) / self.std
        return z, (-torch.log(self.std).sum()).expand(x.shape[0])

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        x = z * self.std + self.mean
        return x, torch.log(self.std).sum().expand(z.shape[0])

    def extra_repr(self) -> str:
        return f"features={self.features}"
