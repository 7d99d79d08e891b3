"""What to tell a user about a table before and after a model is fitted to it: columns a
continuous density piles its mass onto (integers, a few levels, point masses), columns that
name the rows (IDs), repeated rows, and rows scored outside the range of the training data.

Each function returns the notes as sentences (no ``note:`` prefix); the command line, the
run folder (``run.json``, the report) and :class:`~exactflow.sklearn.FlowDensity` say them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..models import support_layer
from ..validation import DataError, FilePositions, column_list, counted, index_list
from .data import integer_columns

__all__ = ["data_notes", "split_notes", "value_notes", "column_ranges", "OutsideRange",
           "below_zero_note"]


def data_notes(rows: np.ndarray, integers: Sequence[int], names: list[str] | None, *,
               dequantized: bool, dequantize_fix: str, drop_fix: str) -> list[str]:
    """What to say about the columns of ``rows`` (``integers``: its integer columns, from
    :func:`~exactflow.runs.data.integer_columns`): ID columns, levels and point masses, and
    integer columns left as they are (``dequantized`` False) or dequantizing that changes
    nothing. ``dequantize_fix`` and ``drop_fix`` name the ways to dequantize and to leave
    a column out."""
    notes = []
    ids = row_number_columns(rows, integers)
    if ids:
        notes.append(
            f"column {column_list(ids, names)} holds a different whole number on nearly "
            "every row, as row numbers or IDs do: new rows would carry new ones and score as "
            f"anomalies for that alone; leave it out ({drop_fix}) unless its values are data")
    notes += value_notes(rows, integers, names, dequantize_fix)
    if dequantized and not integers:
        notes.append("no column holds integers only: dequantizing changes nothing")
    if integers and not dequantized:
        which = "column {} holds" if len(integers) == 1 else "columns {} hold"
        notes.append(
            f"{which.format(column_list(integers, names))} integers only: a continuous "
            "density can pile its mass onto the integers, and rows on them then score far "
            f"above any real density; {dequantize_fix} adds uniform noise in [0, 1) to "
            "them, for a log-density that means something")
    return notes


#: A column of non-integers with at most this many distinct values (and ten rows or more
#: for each, on average) holds levels, not measurements: :func:`few_valued_columns`.
FEW_VALUES = 20


def few_valued_columns(rows: np.ndarray, integers: Sequence[int] | None = None) -> list[int]:
    """The columns that are not integers but take few distinct values (at most
    :data:`FEW_VALUES`, and a tenth as many as the rows): categories coded as numbers, or
    integers scaled (a ``StandardScaler``'s output), which :func:`integer_columns` misses.
    ``integers``: that function's result where the caller has it.

    A continuous density can pile its mass onto those values as onto integers.
    """
    rows = np.asarray(rows, dtype=np.float64)
    if rows.ndim != 2 or len(rows) < 10:
        return []
    skip = set(integer_columns(rows) if integers is None else integers)
    limit = min(FEW_VALUES, len(rows) // 10)
    # (a column with more values than that in its first rows has more in all of them)
    return [j for j in range(rows.shape[1]) if j not in skip
            and len(np.unique(rows[:4096, j])) <= limit
            and 1 < len(np.unique(rows[:, j])) <= limit]


def few_values_note(columns: list[int], names: list[str] | None, fix: str) -> str:
    """What to say about :func:`few_valued_columns`; ``fix`` names the way to dequantize."""
    which = "column {} takes" if len(columns) == 1 else "columns {} take"
    return (
        f"{which.format(column_list(columns, names))} only a few distinct values, not "
        "integers: a continuous density can pile its mass onto them, and rows on them then "
        "score far above any real density; leave such a column out, or give it as integer "
        f"levels (before any scaling) and {fix}"
    )


#: A column that holds one value in at least this share of its rows, its other values
#: spread out, has a point mass there: :func:`point_mass_columns`.
POINT_MASS_SHARE = 0.05


#: A column with at least this many distinct values (in the rows looked at) spreads its
#: values: each value of it held by twice :data:`POINT_MASS_SHARE` of the rows is a point
#: mass (a value recorded at a coarse resolution holds 5-8% of a small table's rows).
SPREAD_VALUES = 50


def point_mass_columns(rows: np.ndarray, skip: Sequence[int] = ()
                       ) -> list[tuple[int, list[tuple[float, float]]]]:
    """``(column, [(value, share), ...])`` for each column (but ``skip``) with point
    masses: values held by twice :data:`POINT_MASS_SHARE` of its rows or more where the
    column spreads its values (:data:`SPREAD_VALUES` distinct ones or more: values
    clipped at both ends of a range, a scaled count), or one value held by
    :data:`POINT_MASS_SHARE` of them and five times as often as any other (zeros beside
    continuous amounts). A continuous density scores
    rows at such a value far above any real density (90% zeros: +4.6 nats where the
    others scored -13.5). Looked for in at most 100,000 rows spread over the table."""
    rows = np.asarray(rows)
    if rows.ndim != 2 or len(rows) < 10:
        return []
    sample = np.asarray(rows[:: -(-len(rows) // 100_000)], dtype=np.float64)
    found = []
    for j in range(rows.shape[1]):
        if j in skip:
            continue
        values, counts = np.unique(sample[:, j], return_counts=True)
        if len(counts) < 2:
            continue
        share = counts / len(sample)
        top, second = np.sort(counts)[-2:][::-1]
        spikes = np.flatnonzero((counts == top) & (share >= POINT_MASS_SHARE)
                                & (top >= 5 * second))
        if len(counts) >= SPREAD_VALUES and not len(spikes):
            spikes = np.flatnonzero(share >= 2 * POINT_MASS_SHARE)
        if len(spikes):
            order = spikes[np.argsort(-counts[spikes])]
            found.append((j, [(float(values[i]), float(share[i])) for i in order]))
    return found


def row_number_columns(rows: np.ndarray, integers: Sequence[int]) -> list[int]:
    """The columns of ``integers`` whose values name the rows, as row numbers or IDs do:
    they rise (or fall) from row to row, or (50 rows and more) nearly every row holds a
    value of its own (nine in ten: copies of rows repeat theirs) and the values fill most
    of their range (IDs given in turn, shuffled) or, 200 of them and more, spread evenly
    over it (IDs drawn at random); incomes, prices and counts crowd at their small values.
    """
    found = []
    n = len(rows)
    for j in integers if n > 2 else ():
        column = rows[:, j]
        steps = np.diff(column)
        if bool(np.all(steps > 0)) or bool(np.all(steps < 0)):
            found.append(j)
            continue
        if n < 50:
            continue
        values = np.unique(column)
        m = len(values)
        if m < 0.9 * n:
            continue
        low, span = float(values[0]), float(values[-1] - values[0])
        if span + 1 <= 1.5 * n:
            found.append(j)
        elif m >= 200:  # the distinct values' largest distance from an even spread
            gap = float(np.abs((values - low) / span - np.linspace(0.0, 1.0, m)).max())
            if gap <= max(0.08, 1.6 / m**0.5):
                found.append(j)
    return found


def value_notes(rows: np.ndarray, integers: Sequence[int], names: list[str] | None,
                fix: str) -> list[str]:
    """What to say about columns whose values a continuous density piles its mass onto,
    beyond integer ones (``integers``): a few levels (:func:`few_valued_columns`; ``fix``
    names the way to dequantize) and point masses (:func:`point_mass_columns`)."""
    levels = few_valued_columns(rows, integers)
    notes = [few_values_note(levels, names, fix)] if levels else []
    for j, masses in point_mass_columns(rows, [*integers, *levels]):
        held = " and ".join(f"{value!r} in {share:.0%}" for value, share in masses[:3])
        notes.append(
            f"column {column_list([j], names)} holds the value{'s' if len(masses) > 1 else ''}"
            f" {held} of its rows, other values besides: a continuous density piles its "
            "mass onto such a value, and rows there score far above any real density; model "
            "those rows apart (a flag column, say), spread them by the resolution they were "
            "recorded at, or leave the column out")
    return notes


def split_notes(parts: Sequence[np.ndarray], distinct: int, fractions: Sequence[float],
                name: str) -> list[str]:
    """What to say about a split (:func:`split_rows`: its parts and the number of distinct
    rows) whose parts are far from ``fractions`` because the copies of a row stay on one
    side of it: a note, or a :class:`DataError` where a part is empty; a note too where a
    tenth of the rows or more repeat another.

    Raises:
        DataError: a part holds no rows.
    """
    sizes = [len(part) for part in parts]
    n = sum(sizes)
    asked = [round(f * n) for f in fractions]
    said = "(" + ", ".join(f"{f:g}" for f in fractions) + ")"
    if min(sizes) == 0 and distinct == n:
        raise DataError(f"{name}: {n} rows are too few for the fractions {said}")
    if min(sizes) > 0 and all(abs(got - want) <= max(5, 0.2 * want)
                              for got, want in zip(sizes, asked, strict=True)):
        if n - distinct < n / 10:
            return []
        return [f"{n - distinct:,} of the {n:,} rows of {name} repeat another row "
                f"exactly ({distinct:,} distinct): a continuous density piles its mass onto "
                "repeated points, and rows there score far above any real density; drop the "
                "copies, or dequantize integer columns (--dequantize, or train_run(..., "
                "dequantize=True))"]
    if distinct == n:
        return []
    why = (f"{name} holds {distinct:,} distinct rows among its {n:,}, and the copies of a "
           "row stay on one side of the split (on both, memorizing the training rows would "
           "score well on the held-out ones)")
    cure = ("; dequantize integer columns (--dequantize, or train_run(..., dequantize=True)) "
            "or drop the repeated rows")
    if min(sizes) == 0:
        raise DataError(f"{why}: they do not fill a train, validation and test part at the "
                        f"fractions {said}{cure}")
    parts_said = ", ".join(f"{got:,} {what} rows (asked {want:,})" for got, want, what in
                           zip(sizes, asked, ("training", "validation", "test"), strict=True))
    return [f"{why}: the split has {parts_said}{cure}"]


def column_ranges(rows: np.ndarray) -> list[list[float]]:
    """``[[min, max], ...]``: each column's range in ``rows`` (finite values), as the run
    folder records it for :class:`OutsideRange`."""
    rows = np.asarray(rows, dtype=np.float64)
    return [[float(low), float(high)] for low, high in zip(rows.min(axis=0), rows.max(axis=0),
                                                           strict=True)]


def _by_chance(rows: int, scored: int, share: float) -> bool:
    """Whether ``rows`` or more of ``scored`` rows, each outside with chance ``share``, is
    no rarer than 1 in 20."""
    from scipy.stats import binom

    return bool(binom.sf(rows - 1, scored, share) >= 0.05)


class OutsideRange:
    """Counts the scored rows with a value outside the range of the training data
    (:func:`column_ranges`), a block of rows at a time: there a density rests on no
    training row, and a value never seen (a negative amount, an age below the youngest) can
    still score as typical when it lies near the data's mass."""

    def __init__(self, ranges: Sequence[Sequence[float]], names: list[str] | None,
                 seen: int | None = None) -> None:
        bounds = np.asarray(ranges, dtype=np.float64).reshape(-1, 2)
        self.low, self.high = bounds[:, 0], bounds[:, 1]
        self.names = names
        self.seen = seen  # (the rows the ranges were taken from)
        self.scored = 0
        self.below = np.zeros(len(bounds), dtype=np.int64)
        self.above = np.zeros(len(bounds), dtype=np.int64)
        self.rows = 0
        self.first: list[int] = []  # (the first rows outside, for the note)

    def add(self, block: np.ndarray, start: int, holes: Any) -> None:
        """Count ``block`` (rows ``start``, ``start + 1``, ... of the data) but its rows
        with a missing value (``holes``, one flag a row), which are not scored."""
        scored = ~holes[:, None]
        self.scored += int(scored.sum())
        below, above = (block < self.low) & scored, (block > self.high) & scored
        self.below += below.sum(axis=0)
        self.above += above.sum(axis=0)
        outside = np.flatnonzero((below | above).any(axis=1))
        self.rows += len(outside)
        self.first += (start + outside[: max(0, 1000 - len(self.first))]).tolist()

    def summary(self) -> dict[str, Any]:
        """``{column: {"below": k, "above": m}}`` for the columns with values outside."""
        keys = self.names or [str(j) for j in range(len(self.low))]
        return {keys[j]: {"below": int(self.below[j]), "above": int(self.above[j])}
                for j in np.flatnonzero(self.below + self.above)}

    def note(self, name: str, chance_said: bool = True) -> str:
        """What to say of them ('' when no row is outside); ``chance_said=False`` (a row
        scored ``-inf``, beyond a model's bounds) never calls them chance."""
        if not self.rows:
            return ""
        scored, d = self.scored, len(self.low)
        # A new row like the seen ones is beyond their smallest or largest value of one
        # column with chance 2 / (seen + 1), for a continuous column (independent columns:
        # dependent ones are beyond together, so this is at most the chance).
        share = None if self.seen is None else 1 - (1 - 2 / (self.seen + 1)) ** d
        chance = "" if share is None else (
            f"; of {scored:,} new rows like the {self.seen:,} it saw, about "
            f"{scored * share:.2g} would be, by chance")
        parts = []
        worst = np.argsort(-(self.below + self.above), kind="stable")
        for j in worst[: 4]:
            sides = [f"{self.below[j]:,} below its minimum {self.low[j]:.6g}" if self.below[j]
                     else "", f"{self.above[j]:,} above its maximum {self.high[j]:.6g}"
                     if self.above[j] else ""]
            if any(sides):
                label = (f"column {self.names[j]}" if isinstance(self.names, FilePositions)
                         else repr(self.names[j]) if self.names else f"column {j}")
                parts.append(f"{label}: " + " and ".join(s for s in sides if s))
        more = int(np.count_nonzero(self.below + self.above)) - len(parts)
        listed = "; ".join(parts) + (f"; {more} more columns" if more > 0 else "")
        verb = "holds a value" if self.rows == 1 else "hold values"
        return (f"{self.rows:,} of the {counted(scored, 'scored row')} of {name} {verb} "
                f"outside the range of the data the model saw ({listed}; "
                f"{'row' if self.rows == 1 else 'rows'} {index_list(self.first, self.rows)}, "
                f"from 0{chance}): "
                + ("no more than chance gives, so this alone marks no row as unusual"
                   if share is not None and chance_said and _by_chance(self.rows, scored,
                                                                        share)
                   else "there the density rests on no training row, and a value never seen "
                   "can still score as typical near the data's mass; check those rows"))


#: Draws :func:`below_zero_note` looks at, and the share below 0 that it names.
BELOW_ZERO_DRAWS, BELOW_ZERO_SHARE = 10_000, 0.005


def below_zero_note(flow: Any, data: dict[str, Any]) -> str:
    """A note where columns above 0 in every training row (a run's ``data`` record: its
    ``ranges``) get samples at or below 0 from a model without bounds (at least
    :data:`BELOW_ZERO_SHARE` of :data:`BELOW_ZERO_DRAWS`), with the ``--bounds`` that keeps
    its mass above 0; ``""`` otherwise, or past 64 columns (the draws of an autoregressive
    flow there take seconds)."""
    ranges = data["ranges"]
    names = data.get("column_names") or FilePositions.of(data.get("columns"))
    positive = np.flatnonzero(np.asarray(ranges, dtype=np.float64).reshape(-1, 2)[:, 0] > 0)
    if not positive.size or flow.features > 64 or support_layer(flow) is not None:
        return ""
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(0)
        draws = flow.eval().sample(BELOW_ZERO_DRAWS).double().cpu().numpy()
    share = (draws[:, positive] <= 0).mean(axis=0)
    hit = positive[share >= BELOW_ZERO_SHARE]
    if not hit.size:
        return ""
    if names is not None and not isinstance(names, FilePositions):  # by name, else in order
        spec = ",".join(f"{names[j]}=0:" for j in hit)
    else:
        spec = ",".join("0:" if j in hit else ":" for j in range(len(ranges)))
    return (f"{column_list(hit, names)} {'is' if len(hit) == 1 else 'are'} above 0 in every "
            f"training row, but up to {share.max():.1%} of the model's samples fall at or "
            f"below 0 there: --bounds {spec} (bounds= in Python) keeps the model's mass "
            "above 0, where such columns cannot go (a lower limit maps a column by log: "
            "README)")
