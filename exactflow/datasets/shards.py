"""Many files read as one table: ``.npy`` shards (memory-mapped) or Parquet files (pyarrow).

:class:`Shards` joins a folder of files into one lazy 2-D table, rows in the order of the
file names, so data larger than memory and split over many files trains like one array:
``ef.fit(flow, "data/train/")`` or ``ef.fit(flow, ef.datasets.Shards("data/train/"))``.
Only the rows asked for are read; :func:`write_shards` writes any array or table as
``.npy`` shards, a chunk at a time.
"""

from __future__ import annotations

import glob
import os
import re
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..validation import DataError, positive_int
from .arrays import CHUNK_ROWS, LazyTable, as_numpy
from .files import load

__all__ = ["Shards", "write_shards", "open_table", "is_shards", "NPY_SUFFIXES", "PARQUET_SUFFIXES"]

NPY_SUFFIXES = (".npy",)
PARQUET_SUFFIXES = (".parquet", ".pq")


def _natural_key(path: str) -> list[Any]:
    # part-2 before part-10: digit runs compare as numbers.
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", os.path.basename(path))]


def _list_files(source: Any) -> list[str]:
    if isinstance(source, (str, os.PathLike)):
        text = os.fspath(source)
        if os.path.isdir(text):
            names = [
                os.path.join(text, name) for name in os.listdir(text)
                if not name.startswith((".", "_"))
                and name.lower().endswith(NPY_SUFFIXES + PARQUET_SUFFIXES)
            ]
            if not names:
                raise DataError(
                    f"the folder {text!r} holds no .npy or .parquet files (files whose names "
                    "start with '.' or '_' are skipped)"
                )
            return sorted(names, key=_natural_key)
        if glob.has_magic(text):
            names = sorted(glob.glob(text), key=_natural_key)
            if not names:
                raise DataError(f"no file matches {text!r}")
            return names
        if os.path.isfile(text):
            return [text]
        raise DataError(f"cannot read {text!r}: no such file or folder")
    if isinstance(source, Iterable):
        names = [os.fspath(p) for p in source]
        if not names:
            raise DataError("Shards needs at least one file, got an empty list")
        for name in names:
            if not os.path.isfile(name):
                raise DataError(f"cannot read {name!r}: no such file")
        return names
    raise TypeError(
        "Shards takes a folder, a glob pattern or a list of files, got "
        f"{type(source).__name__}"
    )


class _NpyShard:
    """One ``.npy`` file, memory-mapped on first use (and again after unpickling)."""

    def __init__(self, path: str, columns: np.ndarray | None) -> None:
        self.path = path
        self.columns = columns
        array = self._open()
        if array.ndim != 2:
            raise DataError(
                f"{path!r} holds an array of shape {tuple(array.shape)}; every shard must be "
                "2-D (rows, features)"
            )
        if array.dtype.kind not in "biuf":
            raise DataError(f"{path!r} holds non-numeric data (dtype {array.dtype})")
        self.rows = int(array.shape[0])
        self.width = int(array.shape[1])
        self.dtype = array.dtype
        self._array: np.ndarray | None = array

    def _open(self) -> np.ndarray:
        with open(self.path, "rb") as fh:
            if fh.read(6) != b"\x93NUMPY":
                raise DataError(f"cannot read {self.path!r}: not a valid .npy file (bad header)")
        try:
            return np.load(self.path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError, EOFError) as err:
            raise DataError(f"cannot read {self.path!r}: {err}") from None

    @property
    def array(self) -> np.ndarray:
        if self._array is None:
            self._array = self._open()
        return self._array

    def take(self, local: np.ndarray) -> np.ndarray:
        out = np.asarray(self.array[local])
        return out if self.columns is None else out[:, self.columns]

    def range(self, lo: int, hi: int) -> np.ndarray:
        out = np.asarray(self.array[lo:hi])
        return out if self.columns is None else out[:, self.columns]

    def __getstate__(self) -> dict[str, Any]:
        # A pickled memmap is a full in-memory copy: send the path, map it again on arrival.
        return {**self.__dict__, "_array": None}


def _parquet() -> Any:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(
            "reading Parquet files needs pyarrow: pip install 'exactflow[parquet]' (or "
            "pyarrow), or convert the files to .npy shards"
        ) from None
    return pq


class _ParquetShard:
    """One Parquet file: its row groups are read whole, decoded, and kept in an LRU cache."""

    def __init__(self, path: str, columns: Sequence[int | str] | None,
                 cache: OrderedDict[tuple[str, int], np.ndarray], cache_size: int) -> None:
        pq = _parquet()
        self.path = path
        try:
            meta = pq.ParquetFile(path)
        except Exception as err:  # noqa: BLE001 - pyarrow raises several kinds
            raise DataError(f"cannot read {path!r}: not a valid Parquet file ({err})") from None
        schema = meta.schema_arrow
        names = list(schema.names)
        if columns is None:
            chosen = names
        else:
            chosen = []
            for c in columns:
                if isinstance(c, str):
                    if c not in names:
                        raise DataError(f"{path!r}: no column named {c!r}; the columns are {names}")
                    chosen.append(c)
                elif isinstance(c, (int, np.integer)) and not isinstance(c, bool):
                    if not -len(names) <= c < len(names):
                        raise DataError(f"{path!r}: column index {c} out of range for "
                                        f"{len(names)} columns")
                    chosen.append(names[int(c)])
                else:
                    raise DataError(f"columns must be names or integer indices, got {c!r}")
        dtypes = []
        for name in chosen:
            field = schema.field(name)
            try:
                dtype = np.dtype(field.type.to_pandas_dtype())
            except (NotImplementedError, TypeError):
                dtype = np.dtype(object)
            if dtype.kind not in "biuf":
                raise DataError(
                    f"{path!r}: column {name!r} is not numeric ({field.type}); choose the "
                    "numeric columns with columns=[...]"
                )
            dtypes.append(dtype)
        self.names = chosen
        self.width = len(chosen)
        self.dtype = np.result_type(*dtypes) if dtypes else np.dtype(np.float64)
        groups = [meta.metadata.row_group(i).num_rows for i in range(meta.num_row_groups)]
        self.group_starts = np.concatenate([[0], np.cumsum(groups, dtype=np.int64)])
        self.rows = int(self.group_starts[-1])
        self._cache = cache
        self._cache_size = cache_size

    def _group(self, g: int) -> np.ndarray:
        key = (self.path, g)
        block = self._cache.get(key)
        if block is not None:
            self._cache.move_to_end(key)
            return block
        table = _parquet().ParquetFile(self.path).read_row_group(g, columns=self.names)
        block = np.empty((table.num_rows, self.width), dtype=self.dtype)
        for j, name in enumerate(self.names):
            block[:, j] = table.column(name).to_numpy(zero_copy_only=False)
        self._cache[key] = block
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return block

    def take(self, local: np.ndarray) -> np.ndarray:
        """Rows at sorted local indices: one decode per row group touched."""
        out = np.empty((len(local), self.width), dtype=self.dtype)
        group = np.searchsorted(self.group_starts, local, side="right") - 1
        cuts = np.flatnonzero(np.diff(group)) + 1
        for a, b in zip(np.r_[0, cuts], np.r_[cuts, len(local)], strict=True):
            g = int(group[a])
            out[a:b] = self._group(g)[local[a:b] - self.group_starts[g]]
        return out

    def range(self, lo: int, hi: int) -> np.ndarray:
        return self.take(np.arange(lo, hi))


class Shards(LazyTable):
    """Many ``.npy`` or Parquet files read as one 2-D table, without reading them whole.

    The rows are those of the files one after the other, in the natural order of the file
    names (``part-2`` before ``part-10``). It is a :class:`~exactflow.datasets.LazyTable`
    and is accepted wherever a memory-mapped array is (:func:`exactflow.fit` for training
    and validation data, :func:`exactflow.evaluate`, :func:`~exactflow.datasets.validate`,
    :func:`~exactflow.datasets.split`, ``Standardize.statistics``): ``len``, ``shape``,
    ``dtype``, and ``shards[i]``, ``shards[i:j]``, ``shards[index_array]``, which read only
    those rows and return an ``ndarray`` (index arrays in any order, repeats allowed).
    :meth:`slice` is a lazy view of consecutive rows. Pickled (e.g. to another process) it
    carries only the file names.

    * ``.npy`` shards are memory-mapped: a gather of ``k`` rows costs ``k`` page reads (the
      operating system's page cache keeps the hot pages); this is the fast format for
      training with a global shuffle.
    * Parquet files need ``pyarrow`` (``pip install 'exactflow[parquet]'``). Parquet pages
      are compressed, so a row is read by decoding its whole row group; decoded row groups
      are kept in an LRU cache of ``cache_row_groups`` entries (memory: that many row groups
      of ``rows x columns`` values). A sequential scan (validation, evaluation) decodes each
      row group once; a randomly shuffled batch touches many row groups, so training on
      Parquet larger than the cache is much slower than on ``.npy``: convert once with
      :func:`write_shards` (``write_shards(Shards("pq/"), "npy/")``).

    All files must have the same number of columns (the same column names for Parquet);
    the table's dtype is the common type of the files' dtypes.

    Args:
        source: a folder (its ``.npy`` or ``.parquet``/``.pq`` files; names starting with
            ``.`` or ``_`` are skipped; one format per folder), a glob pattern, or a list of
            files.
        columns: the columns to use, by index (or, for Parquet, by name); default all.
        cache_row_groups: decoded Parquet row groups kept in memory.

    Raises:
        DataError: no files, a file that is not 2-D numeric ``.npy`` or valid Parquet,
            files that disagree on columns, mixed formats.
        ImportError: Parquet files without pyarrow installed.

    Example:
        >>> import tempfile, numpy as np, exactflow as ef
        >>> folder = tempfile.mkdtemp()
        >>> ef.datasets.write_shards(np.arange(20.0).reshape(10, 2), folder, rows_per_shard=4)
        ['part-00000.npy', 'part-00001.npy', 'part-00002.npy']
        >>> table = ef.datasets.Shards(folder)
        >>> table.shape, table[[9, 0]].tolist()
        ((10, 2), [[18.0, 19.0], [0.0, 1.0]])
    """

    def __init__(
        self,
        source: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
        *,
        columns: Sequence[int | str] | None = None,
        cache_row_groups: int = 8,
    ) -> None:
        files = _list_files(source)
        kinds = {"npy" if f.lower().endswith(NPY_SUFFIXES) else
                 "parquet" if f.lower().endswith(PARQUET_SUFFIXES) else "other" for f in files}
        if "other" in kinds:
            bad = next(f for f in files if not f.lower().endswith(NPY_SUFFIXES + PARQUET_SUFFIXES))
            raise DataError(f"cannot read {bad!r} as a shard: use .npy or .parquet files")
        if len(kinds) > 1:
            raise DataError("the shards mix .npy and Parquet files; use one format per table")
        self.format = kinds.pop()
        cache_size = positive_int(cache_row_groups, "cache_row_groups")
        self._cache: OrderedDict[tuple[str, int], np.ndarray] = OrderedDict()
        shards: list[Any] = []
        if self.format == "npy":
            picked = None
            if columns is not None:
                if any(isinstance(c, str) for c in columns):
                    raise DataError(".npy shards have no column names: pass column indices")
                picked = np.asarray([int(c) for c in columns], dtype=np.int64)
            for f in files:
                shards.append(_NpyShard(f, None))
            width = shards[0].width
            if picked is not None:
                if len(picked) == 0 or (picked < -width).any() or (picked >= width).any():
                    raise DataError(f"columns {list(columns or [])} out of range for {width} "
                                    "columns")
                picked = picked % width
                for shard in shards:
                    shard.columns = picked
            self.column_names: list[str] | None = None
        else:
            for f in files:
                shards.append(_ParquetShard(f, columns, self._cache, cache_size))
            self.column_names = shards[0].names
            for shard in shards[1:]:
                if shard.names != self.column_names:
                    raise DataError(
                        f"{shard.path!r} has the columns {shard.names}, but "
                        f"{shards[0].path!r} has {self.column_names}"
                    )
        for shard in shards[1:]:
            if shard.width != shards[0].width:
                raise DataError(
                    f"{shard.path!r} has {shard.width} columns but {shards[0].path!r} has "
                    f"{shards[0].width}: every shard must have the same columns"
                )
        self._shards = shards
        self._starts = np.concatenate([[0], np.cumsum([s.rows for s in shards], dtype=np.int64)])
        self._width = (len(shards[0].columns) if self.format == "npy" and
                       shards[0].columns is not None else shards[0].width)
        self._dtype = np.result_type(*[s.dtype for s in shards])
        self._lo, self._hi = 0, int(self._starts[-1])

    # -- the table protocol ---------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int]:
        return (self._hi - self._lo, self._width)

    @property
    def dtype(self) -> np.dtype:
        return self._dtype

    @property
    def files(self) -> list[str]:
        """The files, in row order."""
        return [s.path for s in self._shards]

    @property
    def nbytes(self) -> int:
        """The size of the table's values in memory, if it were read whole."""
        return int(self.shape[0] * self.shape[1] * self._dtype.itemsize)

    def __getitem__(self, index: Any) -> np.ndarray:
        n = len(self)
        if isinstance(index, tuple):
            raise TypeError("Shards takes row indices only (a slice, an int or an index array)")
        if isinstance(index, (int, np.integer)) and not isinstance(index, bool):
            i = int(index)
            if not -n <= i < n:
                raise IndexError(f"row {i} out of range for {n} rows")
            return self._gather(np.asarray([i % n], dtype=np.int64))[0]
        if isinstance(index, slice):
            start, stop, step = index.indices(n)
            if step == 1:
                return self._range(start, max(start, stop))
            return self._gather(np.arange(start, stop, step, dtype=np.int64))
        idx = np.asarray(index)
        if idx.dtype == bool:
            if idx.shape != (n,):
                raise IndexError(f"a boolean index needs {n} values, got shape {idx.shape}")
            idx = np.flatnonzero(idx)
        if idx.dtype.kind not in "iu":
            raise IndexError(f"Shards takes integer row indices, got dtype {idx.dtype}")
        idx = idx.astype(np.int64).reshape(-1)
        if len(idx) and (idx.min() < -n or idx.max() >= n):
            raise IndexError(f"row indices out of range for {n} rows")
        return self._gather(idx % n if n else idx)

    def slice(self, lo: int, hi: int) -> Shards:
        """Rows ``lo:hi`` as a lazy view (nothing is read; files and cache are shared)."""
        n = len(self)
        if not 0 <= lo <= hi <= n:
            raise IndexError(f"slice {lo}:{hi} out of range for {n} rows")
        view = object.__new__(Shards)
        view.__dict__.update(self.__dict__)
        view._lo, view._hi = self._lo + lo, self._lo + hi
        return view

    def __repr__(self) -> str:
        return (f"Shards({len(self._shards)} {self.format} files, shape={self.shape}, "
                f"dtype={self.dtype})")

    # -- reading --------------------------------------------------------------------------
    def _range(self, lo: int, hi: int) -> np.ndarray:
        lo, hi = lo + self._lo, hi + self._lo
        out = np.empty((hi - lo, self._width), dtype=self._dtype)
        first = int(np.searchsorted(self._starts, lo, side="right")) - 1
        at = lo
        f = max(first, 0)
        while at < hi:
            start, stop = int(self._starts[f]), int(self._starts[f + 1])
            take = min(hi, stop) - at
            if take > 0:
                out[at - lo : at - lo + take] = self._shards[f].range(at - start, at - start + take)
                at += take
            f += 1
        return out

    def _gather(self, idx: np.ndarray) -> np.ndarray:
        """Rows at global indices ``idx`` (any order): one sorted read per file touched."""
        out = np.empty((len(idx), self._width), dtype=self._dtype)
        if not len(idx):
            return out
        order = np.argsort(idx, kind="stable")
        sorted_idx = idx[order] + self._lo
        file_of = np.searchsorted(self._starts, sorted_idx, side="right") - 1
        cuts = np.flatnonzero(np.diff(file_of)) + 1
        for a, b in zip(np.r_[0, cuts], np.r_[cuts, len(idx)], strict=True):
            f = int(file_of[a])
            out[order[a:b]] = self._shards[f].take(sorted_idx[a:b] - self._starts[f])
        return out

    def __getstate__(self) -> dict[str, Any]:
        # The decoded row groups stay behind; the shards drop their memory maps themselves.
        return {**self.__dict__, "_cache": OrderedDict()}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        for shard in self._shards:
            if isinstance(shard, _ParquetShard):
                shard._cache = self._cache


def write_shards(
    data: Any,
    folder: str | os.PathLike[str],
    *,
    rows_per_shard: int = 1_000_000,
    dtype: Any = None,
    prefix: str = "part-",
) -> list[str]:
    """Write rows as ``.npy`` shards in ``folder``, a chunk at a time; returns the file names.

    ``data`` is anything :class:`Shards` accepts as a table (an array, a tensor, a memmap, a
    :class:`~exactflow.datasets.LazyTable` such as Parquet :class:`Shards`); it is read in
    chunks of at most :data:`~exactflow.datasets.CHUNK_ROWS` rows and written to
    ``prefix00000.npy``, ``prefix00001.npy``, ... of ``rows_per_shard`` rows each (the last
    may be shorter), so the memory used is one chunk whatever the size of the data. Each file
    is written under a temporary name (``.npy.tmp``), and all are renamed once the last is
    complete: a write cut short (a kill, a full disk) leaves no folder that opens as a table
    with rows missing.

    Args:
        data: ``(rows, features)`` data.
        folder: created if missing; must hold no ``prefix*.npy`` files yet.
        rows_per_shard: rows per file.
        dtype: the stored dtype (default the data's).
        prefix: the file name prefix.

    Raises:
        DataError: data that is not 2-D, or a folder that already holds shards of this prefix.
    """
    rows_per_shard = positive_int(rows_per_shard, "rows_per_shard")
    table = as_numpy(data)
    if len(table.shape) != 2:
        raise DataError(f"write_shards needs 2-D data (rows, features), got shape {table.shape}")
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    if any(out.glob(f"{glob.escape(prefix)}*.npy")):
        raise DataError(f"{str(out)!r} already holds {prefix}*.npy shards; use an empty folder")
    n, d = int(table.shape[0]), int(table.shape[1])
    dtype = np.dtype(dtype) if dtype is not None else np.dtype(table.dtype)
    names: list[str] = []
    done: list[str] = []
    try:
        for k, lo in enumerate(range(0, n, rows_per_shard)):
            hi = min(n, lo + rows_per_shard)
            names.append(f"{prefix}{k:05d}.npy")
            target = np.lib.format.open_memmap(out / (names[-1] + ".tmp"), mode="w+",
                                               dtype=dtype, shape=(hi - lo, d))
            for start in range(lo, hi, CHUNK_ROWS):
                stop = min(hi, start + CHUNK_ROWS)
                target[start - lo : stop - lo] = np.asarray(table[start:stop])
            target.flush()
            del target
        for name in names:  # (all at the end: a write cut short leaves no table that opens)
            os.replace(out / (name + ".tmp"), out / name)
            done.append(name)
    except BaseException:
        for name in names:  # (a failed write leaves neither shards nor temporary files)
            if name in done:
                (out / name).unlink(missing_ok=True)
            (out / (name + ".tmp")).unlink(missing_ok=True)
        raise
    return names


def is_shards(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` names what :class:`Shards` reads (a folder, a glob pattern or a
    Parquet file), not one file of :func:`~exactflow.datasets.load`."""
    text = os.fspath(path)
    return os.path.isdir(text) or glob.has_magic(text) or text.lower().endswith(
        PARQUET_SUFFIXES)


def open_table(path: str | os.PathLike[str]) -> np.ndarray | LazyTable:
    """The table a path names: :class:`Shards` for a folder, a glob pattern or a Parquet
    file; :func:`~exactflow.datasets.load` for any other file (a ``.npy`` is memory-mapped).

    Raises:
        DataError: no such file or folder, or an unreadable one.
    """
    text = os.fspath(path)
    return Shards(text) if is_shards(text) else load(text)
