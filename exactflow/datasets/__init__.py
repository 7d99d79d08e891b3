"""Data for density estimation: 2D toy generators, tabular files, checks and splits.

* :func:`toy` draws the eight 2D benchmarks of the flow literature (the FFJORD definitions),
  and :data:`TOY_ENTROPY` gives each one's true entropy, so a model's ``test NLL - H`` is an
  absolute measure of how far it is from perfect (:mod:`~exactflow.datasets.toys`).
* :func:`load` reads CSV, ``.npy`` (memory-mapped, never read whole) and ``.npz`` files
  (:mod:`~exactflow.datasets.files`); :func:`digits` is scikit-learn's 8x8 digits with
  uniform dequantization, a real 64-dimensional benchmark (:mod:`~exactflow.datasets.bundled`).
* :func:`validate` stops bad data before training with a :class:`DataError` that names the
  problem (NaN/inf rows, wrong columns, too few rows, non-numeric cells, constant columns),
  and :func:`check_full_rank` data whose rows span fewer dimensions than its columns
  (:mod:`~exactflow.datasets.checks`).
* :func:`split` makes seeded train/validation/test splits (:mod:`~exactflow.datasets.splits`);
  :class:`Subset` is a lazy row/column view of a memory-mapped array
  (:mod:`~exactflow.datasets.arrays`).
* :class:`Shards` reads a folder of ``.npy`` shards (memory-mapped) or Parquet files as one
  lazy table, and :func:`write_shards` writes one (:mod:`~exactflow.datasets.shards`): data
  larger than memory, in many files, trains like one array.

:class:`~exactflow.transforms.Standardize`, the fixed affine layer a model puts first so
that ``log_prob`` stays in the units of the data, lives with the layers; it is importable
from here too, as in exactflow 0.1.
"""

from ..transforms.standardize import Standardize
from ..validation import DataError
from .arrays import CHUNK_ROWS, ArrayLike, LazyTable, Subset, column_names
from .bundled import digits
from .checks import check_full_rank, validate
from .files import load, read_cells, read_header, row_lines
from .shards import Shards, open_table, write_shards
from .splits import as_tensor, cut_between_copies, shuffled_rows, split, split_indices
from .toys import TOY_ENTROPY, TOYS, toy

__all__ = [
    "TOYS",
    "TOY_ENTROPY",
    "CHUNK_ROWS",
    "ArrayLike",
    "DataError",
    "Subset",
    "LazyTable",
    "Shards",
    "write_shards",
    "open_table",
    "Standardize",
    "toy",
    "load",
    "read_cells",
    "row_lines",
    "read_header",
    "digits",
    "validate",
    "check_full_rank",
    "column_names",
    "split",
    "split_indices",
    "shuffled_rows",
    "cut_between_copies",
    "as_tensor",
]
