"""What exactflow says of a table: ID columns, repeated rows, and rows scored outside the
training data's range (``exactflow.runs.notes``)."""

from __future__ import annotations

import numpy as np

from exactflow.runs.notes import OutsideRange, column_ranges, row_number_columns, split_notes
from exactflow.validation import FilePositions


def _ids_found(column: np.ndarray) -> bool:
    rows = np.c_[column, np.zeros(len(column))]
    return row_number_columns(rows, [0]) == [0]


def test_id_columns_are_found_with_copied_rows_and_when_drawn_at_random():
    rng = np.random.default_rng(0)
    ids = rng.permutation(np.arange(500_000, 503_000)).astype(float)
    assert _ids_found(ids)
    # 60 copied rows repeat their IDs: every ID was no longer unique, and none was found.
    assert _ids_found(np.r_[ids, ids[:60]])
    # Eight-digit IDs drawn at random fill their range evenly, far wider than one a row.
    assert _ids_found(rng.choice(10**8, size=3000, replace=False).astype(float))
    assert _ids_found(np.arange(3000.0)[::-1])  # (row numbers, falling)


def test_measurements_held_as_whole_numbers_are_not_ids():
    rng = np.random.default_rng(1)
    incomes = np.round(rng.lognormal(10.0, 1.0, 3000))  # distinct, crowded at small values
    assert len(np.unique(incomes)) > 0.9 * len(incomes) and not _ids_found(incomes)
    heights = np.round(rng.normal(1e6, 1e5, 3000))  # distinct, bell-shaped
    assert len(np.unique(heights)) > 0.9 * len(heights) and not _ids_found(heights)
    assert not _ids_found(rng.poisson(4.0, 3000).astype(float))  # counts repeat
    assert not _ids_found(rng.permutation(np.arange(40.0)))  # too few rows to tell


def test_a_tenth_of_the_rows_repeated_is_noted():
    # 300 copies among 1,300 rows were not noted (only a majority of copies was).
    parts = [np.arange(1040), np.arange(1040, 1170), np.arange(1170, 1300)]
    fractions = (0.8, 0.1, 0.1)
    notes = split_notes(parts, 1000, fractions, "t.csv")
    assert len(notes) == 1 and "300 of the 1,300 rows of t.csv repeat another row" in notes[0]
    assert split_notes(parts, 1200, fractions, "t.csv") == []  # (100 copies: 8%)


def test_rows_outside_the_training_range_are_counted_per_column_and_side():
    train = np.array([[0.0, 18.0], [5.0, 60.0], [2.0, 30.0]])
    outside = OutsideRange(column_ranges(train), ["claim", "age"], seen=3)
    def add(block, start):  # (as score does: a row with a missing value is not scored)
        block = np.array(block)
        outside.add(block, start, np.isnan(block).any(axis=1))

    add([[-150.0, 30.0], [1.0, 40.0]], start=0)
    add([[-7.0, 12.0], [9.0, 99.0], [-1.0, 17.0]], start=2)
    add([[np.nan, 99.0], [-3.0, np.nan]], start=5)  # (score --missing skip): not counted
    assert outside.rows == 4 and outside.first == [0, 2, 3, 4] and outside.scored == 5
    assert outside.summary() == {"claim": {"below": 3, "above": 1},
                                 "age": {"below": 2, "above": 1}}
    note = outside.note("new.csv")
    assert note.startswith("4 of the 5 scored rows of new.csv hold values outside the range")
    assert "'claim': 3 below its minimum 0 and 1 above its maximum 5" in note
    # Of new rows like the 3 seen, 1 - (1 - 2/4)^2 = 3/4 are beyond them by chance.
    assert "rows 0, 2, 3, 4, from 0; of 5 new rows like the 3 it saw, about 3.8 would be" \
        in note
    # (4 or more of 5 at 3/4 each: chance gives that 63% of the time; at 200 columns the
    # note told to check rows like the training rows)
    assert note.endswith("by chance): no more than chance gives, so this alone marks no row "
                         "as unusual")
    # (a row scored -inf, beyond a model's bounds, is unusual whatever chance says)
    assert outside.note("new.csv", chance_said=False).endswith("check those rows")
    inside = OutsideRange(column_ranges(train), None)
    inside.add(train, start=0, holes=np.zeros(len(train), dtype=bool))
    assert inside.rows == 0 and inside.note("t") == "" and inside.summary() == {}
    one = OutsideRange(column_ranges(train), None)
    one.add(np.array([[9.0, 20.0]]), start=0, holes=np.zeros(1, dtype=bool))
    assert one.note("t").startswith("1 of the 1 scored row of t holds a value outside")
    assert "column 0: 1 above its maximum 5" in one.note("t")
    # Columns picked by position from a file without a header are named by their index in
    # the file (with --columns 3,5 the second was "column 1").
    picked = OutsideRange(column_ranges(train), FilePositions.of([3, 5]))
    picked.add(np.array([[1.0, 99.0]]), start=0, holes=np.zeros(1, dtype=bool))
    assert "(column 5: 1 above its maximum 60;" in picked.note("t")
    assert picked.summary() == {"5": {"below": 0, "above": 1}}
    assert one.note("t").endswith("near the data's mass; check those rows")  # (no chance said)
    many = OutsideRange(column_ranges(train), None, seen=1000)  # (2 of 3 at 0.4% each)
    many.add(np.array([[9.0, 20.0], [1.0, 20.0], [1.0, 99.0]]), start=0,
             holes=np.zeros(3, dtype=bool))
    assert many.rows == 2 and many.note("t").endswith("check those rows")


def test_columns_above_zero_whose_samples_fall_below_it_get_a_bounds_note():
    # A table's amounts are all positive, and the model drew 1.7% of them negative with
    # nothing said.
    import exactflow as ef
    from exactflow.runs.notes import below_zero_note

    rng = np.random.default_rng(0)
    rows = np.c_[np.exp(rng.normal(0, 1, 500)), rng.normal(size=500), 5 + rng.random(500)]
    model = ef.models.gaussian(3)
    ef.fit(model, rows, progress=False)
    data = {"ranges": column_ranges(rows), "column_names": ["amount", "x", "t"]}
    note = below_zero_note(model, data)
    assert note.startswith("'amount' is above 0 in every training row, but up to ")
    assert "--bounds amount=0: (bounds= in Python)" in note  # ('t' stays far above 0)
    by_position = below_zero_note(model, {"ranges": data["ranges"], "columns": [2, 3, 4]})
    assert by_position.startswith("2 (column indices in the file) is above 0")
    assert "--bounds 0:,:,: (bounds=" in by_position
    bounded = ef.models.gaussian(3, bounds=[(0, None), None, None])
    ef.fit(bounded, rows, progress=False)
    assert below_zero_note(bounded, data) == ""
