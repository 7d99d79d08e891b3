"""Tests of exactflow.datasets: toys, file loading, validation, splits, Standardize."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch

import exactflow as ef
from exactflow import datasets as ds
from exactflow.datasets import DataError, Standardize, Subset

# -- toys ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ds.TOYS)
def test_toy_shape_dtype_determinism(name: str) -> None:
    x = ds.toy(name, 501, seed=3)
    assert x.shape == (501, 2) and x.dtype == torch.float32
    assert torch.isfinite(x).all()
    assert torch.equal(x, ds.toy(name, 501, seed=3))
    assert not torch.equal(x, ds.toy(name, 501, seed=4))
    assert ds.toy(name, 1).shape == (1, 2)
    # Scale sanity: every toy is centred near 0 with a spread of order 1-2.
    big = ds.toy(name, 4000, seed=0).double()
    assert big.mean(0).abs().max() < 0.6
    assert ((big.std(0) > 1.0) & (big.std(0) < 2.5)).all()


def test_toy_leaves_global_rngs_alone() -> None:
    np_state = np.random.get_state()[1].copy()
    torch_state = torch.get_rng_state().clone()
    for name in ds.TOYS:
        ds.toy(name, 10, seed=1)
    assert np.array_equal(np.random.get_state()[1], np_state)
    assert torch.equal(torch.get_rng_state(), torch_state)


def test_toy_bad_arguments() -> None:
    with pytest.raises(ValueError, match="unknown toy dataset 'moon'.*moons.*swissroll"):
        ds.toy("moon", 10)
    for n in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="n >= 1"):
            ds.toy("moons", n)


def test_checkerboard_squares() -> None:
    x = ds.toy("checkerboard", 5000).double()
    assert x.abs().max() <= 4.0
    # The occupied 2x2 cells are those with floor(x1/2) + floor(x2/2) even, and all 8 are used.
    cells = torch.floor(x / 2).long()
    assert ((cells.sum(1) % 2) == 0).all()
    assert len({tuple(c) for c in cells.tolist()}) == 8


def test_rings_and_circles_radii() -> None:
    r = ds.toy("rings", 4000).double().norm(dim=1)
    dist = (r[:, None] - torch.tensor([3.0, 2.25, 1.5, 0.75], dtype=torch.float64)).abs()
    assert dist.min(1).values.max() < 0.5
    counts = torch.bincount(dist.argmin(1), minlength=4).double() / 4000
    assert (counts - 0.25).abs().max() < 0.04
    r = ds.toy("circles", 4000).double().norm(dim=1)
    assert ((r - 3.0).abs().clamp(max=(r - 1.5).abs()) < 1.2).all()
    assert abs(float((r > 2.25).double().mean()) - 0.5) < 0.04


def test_moons_and_swissroll_structure() -> None:
    x = ds.toy("moons", 4000).double()
    # Undo FFJORD's affine map; the raw moons have noise 0.1 around two unit arcs.
    raw = (x - torch.tensor([-1.0, -0.2], dtype=torch.float64)) / 2
    d_upper = (raw.norm(dim=1) - 1).abs()
    d_lower = ((raw - torch.tensor([1.0, 0.5], dtype=torch.float64)).norm(dim=1) - 1).abs()
    assert torch.minimum(d_upper, d_lower).max() < 0.6
    s = ds.toy("swissroll", 4000).double() * 5
    # Points are (t cos t, t sin t) + N(0, I) with t in [1.5 pi, 4.5 pi].
    assert s.norm(dim=1).min() > 1.5 * math.pi - 5 and s.norm(dim=1).max() < 4.5 * math.pi + 5


def test_eight_gaussians_entropy_monte_carlo() -> None:
    # The mixture density is closed form: H = -E log p(x), from 20k samples.
    x = ds.toy("8gaussians", 20000, seed=5).double()
    angle = torch.arange(8, dtype=torch.float64) * (math.pi / 4)
    centres = 4.0 * torch.stack([angle.cos(), angle.sin()], 1) / 1.414
    sigma = 0.5 / 1.414
    sq = ((x[:, None, :] - centres[None]) ** 2).sum(-1)
    log_p = torch.logsumexp(-sq / (2 * sigma**2), 1) - math.log(8 * 2 * math.pi * sigma**2)
    entropy = float(-log_p.mean())
    assert abs(entropy - ds.TOY_ENTROPY["8gaussians"]) < 0.03
    # Equal weights on the eight centres.
    counts = torch.bincount(sq.argmin(1), minlength=8).double() / len(x)
    assert (counts - 1 / 8).abs().max() < 0.015


def test_toy_entropy_table() -> None:
    assert set(ds.TOY_ENTROPY) == set(ds.TOYS) - {"pinwheel"}
    assert ds.TOY_ENTROPY["checkerboard"] == pytest.approx(math.log(32))


# -- loading files ------------------------------------------------------------------------


def _write(tmp_path, name: str, text: str):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_load_csv_header_and_columns(tmp_path) -> None:
    path = _write(tmp_path, "d.csv", "a,b,label\n1,2.5,x\n-3,4e-1,y\n5,6,z\n")
    x = ds.load(path, columns=["b", "a"])
    assert x.dtype == np.float64
    np.testing.assert_array_equal(x, [[2.5, 1], [0.4, -3], [6, 5]])
    np.testing.assert_array_equal(ds.load(path, columns=[0]), [[1], [-3], [5]])
    np.testing.assert_array_equal(ds.load(path, columns=[-2]), [[2.5], [0.4], [6]])
    with pytest.raises(DataError, match="no column named 'c'.*'a', 'b', 'label'"):
        ds.load(path, columns=["c"])
    with pytest.raises(DataError, match="column index 3 out of range for 3 columns"):
        ds.load(path, columns=[3])
    # Without columns=, the text column is a non-numeric cell, named by line and column.
    with pytest.raises(DataError, match=r"non-numeric cell 'x' at line 2, column 3 \('label'\)"):
        ds.load(path)


def test_pandas_labels_of_unnamed_columns_are_a_header_above_decimals(tmp_path) -> None:
    # DataFrame(array).to_csv(index=False) writes "0,1,2" first: a header, not a data row.
    path = _write(tmp_path, "p.csv", "0,1,2\n0.5,-1.25,3e-2\n2.0,1.0,0.0\n")
    np.testing.assert_array_equal(ds.load(path), [[0.5, -1.25, 0.03], [2, 1, 0]])
    assert ds.read_header(path) == ["0", "1", "2"]
    # Above integers the same line is data (a table of counts may begin 0, 1, 2).
    counts = _write(tmp_path, "c.csv", "0,1,2\n3,4,5\n")
    np.testing.assert_array_equal(ds.load(counts), [[0, 1, 2], [3, 4, 5]])
    assert ds.read_header(counts) is None
    assert ds.load(path, header=False).shape == (3, 3)
    # Columns reordered, and the index pandas writes by default (an empty first label).
    mixed = _write(tmp_path, "m.csv", "2,0,1\n0.5,-1.25,3e-2\n")
    assert ds.read_header(mixed) == ["2", "0", "1"] and ds.load(mixed).shape == (1, 3)
    indexed = _write(tmp_path, "i.csv", ",0,1\n0,0.5,-1.5\n1,2.0,1.0\n")
    assert ds.read_header(indexed) == ["", "0", "1"]
    np.testing.assert_array_equal(ds.load(indexed), [[0, 0.5, -1.5], [1, 2, 1]])


def test_load_csv_in_blocks_of_rows_gives_every_row_in_order(tmp_path, monkeypatch) -> None:
    import exactflow.datasets.files as files

    values = np.random.default_rng(4).normal(size=(11, 3))
    path = tmp_path / "t.csv"
    np.savetxt(path, values, delimiter=",", header="a,b,c", comments="", fmt="%.17g")
    for block in (1, 3, 11, 12):
        monkeypatch.setattr(files, "_BLOCK_ROWS", block)
        np.testing.assert_array_equal(ds.load(path), values)
        np.testing.assert_array_equal(ds.load(path, columns=["c", "a"]), values[:, [2, 0]])


def test_load_csv_without_header_and_other_delimiters(tmp_path) -> None:
    expected = [[1.0, 2.0], [3.0, 4.0]]
    np.testing.assert_array_equal(ds.load(_write(tmp_path, "a.csv", "1,2\n3,4\n")), expected)
    np.testing.assert_array_equal(ds.load(_write(tmp_path, "b.txt", "1 2\n  3\t4\n")), expected)
    np.testing.assert_array_equal(ds.load(_write(tmp_path, "c.csv", "1;2\n3;4\n")), expected)
    tsv = _write(tmp_path, "d.tsv", "x\ty\n1\t2\n3\t4\n")
    np.testing.assert_array_equal(ds.load(tsv), expected)
    # An explicit header=True drops a first line that looks numeric; header=False keeps it.
    path = _write(tmp_path, "e.csv", "0,0\n1,2\n3,4\n")
    np.testing.assert_array_equal(ds.load(path, header=True), expected)
    assert ds.load(path, header=False).shape == (3, 2)
    with pytest.raises(DataError, match="asked by name, but the file has no header"):
        ds.load(path, columns=["a"], header=False)


def test_text_cells_come_from_the_lines_load_reads_as_rows(tmp_path) -> None:
    # Comments before the table, blank lines, a note between rows, a quoted ID with the
    # delimiter in it, Excel's #N/A row: the text cells stay beside their numbers.
    text = ("# exported\n\nid,note,x,y\n\"A,1\",first,1.5,2\n\n# a note\nB-2, two ,3,4\n"
            "#N/A,third,5,6\n")
    path = _write(tmp_path, "t.csv", text)
    values = ds.load(path, ["x", "y"])
    cells = ds.read_cells(path, ["id", "note"])
    assert values.tolist() == [[1.5, 2.0], [3.0, 4.0], [5.0, 6.0]]
    assert cells == [["A,1", "first"], ["B-2", "two"], ["#N/A", "third"]]
    assert ds.read_cells(path, [-2]) == [["1.5"], ["3"], ["5"]]
    headerless = _write(tmp_path, "h.tsv", "k1\t0.5\nk2\t0.25\n")
    assert ds.read_cells(headerless, [0]) == [["k1"], ["k2"]]
    with pytest.raises(DataError, match="column 'id' asked by name, but the file has no header"):
        ds.read_cells(headerless, ["id"])
    np.save(tmp_path / "a.npy", np.zeros((2, 2)))
    with pytest.raises(DataError, match="not a text table"):
        ds.read_cells(tmp_path / "a.npy", [0])


def test_load_csv_line_numbers_count_comments_and_blank_lines(tmp_path) -> None:
    path = _write(tmp_path, "d.csv", "# comment\nx,y\n\n1,2\n3,oops\n")
    with pytest.raises(DataError, match=r"'oops' at line 5, column 2 \('y'\)"):
        ds.load(path)
    path = _write(tmp_path, "e.csv", "1,2\n3,\n")
    with pytest.raises(DataError, match="an empty cell at line 2, column 2"):
        ds.load(path)
    path = _write(tmp_path, "f.csv", "x,y,z\n1,2,3\n4,5\n")
    with pytest.raises(DataError, match="line 3 has 2 fields, expected 3"):
        ds.load(path)


def test_a_hash_inside_the_table_is_a_cell_not_a_comment(tmp_path) -> None:
    # Excel writes #N/A for a missing value; skipping that line moved every later row up.
    path = _write(tmp_path, "x.csv", "# exported\na,b,c\n1,2,3\n#N/A,5,6\n7,8,9\n")
    with pytest.raises(DataError, match=r"'#N/A' at line 4, column 1 \('a'\) \(a missing "
                                        r"value\).*--missing skip"):
        ds.load(path)
    assert np.isnan(ds.load(path, missing="nan")[1, 0])
    # A 'nan' cell parses as a number: it too is named by its line (it was "row index 1").
    with pytest.raises(DataError, match=r"'NaN' at line 3, column 2 \('b'\) \(a missing"):
        ds.load(_write(tmp_path, "n.csv", "a,b\n1,2\n3,NaN\n"))
    with pytest.raises(DataError, match=r"non-numeric cell '#REF!' at line 3.*has the table's "
                                        r"width"):
        ds.load(_write(tmp_path, "r.csv", "a,b,c\n1,2,3\n#REF!,5,6\n"))
    assert ds.read_header(path) == ["a", "b", "c"]
    assert ds.load(path, columns=["b", "c"]).tolist() == [[2, 3], [5, 6], [8, 9]]
    # A '#' line of another width stays a comment: a note between rows, numpy's footer.
    noted = ds.load(_write(tmp_path, "y.csv", "1,2\n3,4\n# a note\n5,6\n"))
    assert noted.tolist() == [[1, 2], [3, 4], [5, 6]]
    np.savetxt(tmp_path / "f.csv", [[1.5, 2], [3, 4]], delimiter=",", header="a,b",
               footer="written by numpy")
    assert ds.load(tmp_path / "f.csv").tolist() == [[1.5, 2], [3, 4]]


def test_cells_python_reads_but_a_table_does_not_are_refused(tmp_path) -> None:
    # float('1_0') is 10.
    with pytest.raises(DataError, match=r"non-numeric cell '1_0' at line 3, column 2"):
        ds.load(_write(tmp_path, "u.csv", "a_1,b_2\n1,2\n3,1_0\n"))
    # A quoted cell over two lines misaligned every later line.
    quoted = _write(tmp_path, "q.csv", 'a,b\n1,2\n"3\n4",5\n6,7\n')
    with pytest.raises(DataError, match="quoted cell that starts on line 3 runs over several"):
        ds.load(quoted)
    # A quote inside an unquoted cell is a character (an inch mark), not an open cell.
    inches = _write(tmp_path, "i.csv", 'a,b,item\n1,2,12" pipe\n3,4,nut\n')
    assert ds.load(inches, columns=["a", "b"]).tolist() == [[1, 2], [3, 4]]


def test_a_first_line_of_whole_numbers_unlike_the_rows_warns(tmp_path) -> None:
    rows = "\n".join(f"{10 + i % 7}.5,{-3 + i % 5}.25,{i % 3}.75" for i in range(20))
    path = _write(tmp_path, "years.csv", "2019,2020,2021\n" + rows + "\n")
    with pytest.warns(UserWarning, match=r"line 1 \(2019, 2020, 2021\) is read as a row of "
                                         r"data.*names that are not numbers"):
        assert ds.load(path).shape == (21, 3)
    assert ds.load(path, header=True).shape == (20, 3)  # (no warning asked: header given)
    # A table of counts whose first row is like the others reads without a word.
    import warnings

    counts = _write(tmp_path, "counts.csv", "3,4,5\n1,9,2\n6,0,7\n2,2,2\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ds.load(counts).shape == (4, 3)


def test_load_unreadable_files(tmp_path) -> None:
    with pytest.raises(DataError, match="cannot read '.*x.csv': no such file"):
        ds.load(tmp_path / "x.csv")
    with pytest.raises(DataError, match="it is a folder; load and the command line read "
                                        "one file.*ef.datasets.open_table"):
        ds.load(tmp_path)
    with pytest.raises(DataError, match="the file is empty"):
        ds.load(_write(tmp_path, "empty.csv", "\n\n"))
    with pytest.raises(DataError, match="a header row but no data rows"):
        ds.load(_write(tmp_path, "h.csv", "a,b\n"))
    with pytest.raises(DataError, match=r"unknown file type '.parquet'.*Parquet is read "
                                        r"lazily in Python \(ef.datasets.Shards"):
        ds.load(_write(tmp_path, "d.parquet", "1"))
    (tmp_path / "bin.csv").write_bytes(b"\xff\xfe\x00\x81")
    with pytest.raises(DataError, match="not a UTF-8 text file"):
        ds.load(tmp_path / "bin.csv")
    (tmp_path / "latin.csv").write_bytes("a,b\n1,2\ncafé,5\n".encode("cp1252"))
    with pytest.raises(DataError, match=r"not a UTF-8 text file \(line 3 holds the byte 0xe9, "
                                        r"as a Latin-1 or Windows-1252 file would\)"):
        ds.load(tmp_path / "latin.csv")


def test_load_npy_is_memory_mapped(tmp_path) -> None:
    arr = np.random.default_rng(0).normal(size=(50, 4))
    np.save(tmp_path / "d.npy", arr)
    x = ds.load(tmp_path / "d.npy")
    assert isinstance(x, np.memmap)
    np.testing.assert_array_equal(x, arr)
    in_memory = ds.load(tmp_path / "d.npy", mmap=False)
    assert not isinstance(in_memory, np.memmap)
    # An evenly spaced column selection stays a memmap view; any other one is a lazy Subset.
    view = ds.load(tmp_path / "d.npy", columns=[1, 3])
    assert isinstance(view, np.memmap)
    np.testing.assert_array_equal(view, arr[:, [1, 3]])
    lazy = ds.load(tmp_path / "d.npy", columns=[3, 0])
    assert isinstance(lazy, Subset) and lazy.shape == (50, 2)
    np.testing.assert_array_equal(np.asarray(lazy), arr[:, [3, 0]])
    np.testing.assert_array_equal(lazy[[4, 7]], arr[[4, 7]][:, [3, 0]])


def test_load_npy_refuses_pickles_and_truncation(tmp_path) -> None:
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    for mmap in (True, False):
        with pytest.raises(DataError, match="pickled object array, which is refused"):
            ds.load(tmp_path / "obj.npy", mmap=mmap)
    np.savez(tmp_path / "obj.npz", a=np.array([None], dtype=object))
    with pytest.raises(DataError, match="pickled object array, which is refused"):
        ds.load(tmp_path / "obj.npz")
    np.save(tmp_path / "full.npy", np.ones((100, 3)))
    data = (tmp_path / "full.npy").read_bytes()
    (tmp_path / "cut.npy").write_bytes(data[: len(data) // 2])
    for mmap in (True, False):
        with pytest.raises(DataError, match="cannot read .*cut.npy"):
            ds.load(tmp_path / "cut.npy", mmap=mmap)
    (tmp_path / "junk.npy").write_bytes(b"not numpy at all")
    with pytest.raises(DataError, match=r"not a valid .npy file \(bad header\)"):
        ds.load(tmp_path / "junk.npy")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match=r"not a valid .npz file \(bad header\)"):
        ds.load(tmp_path / "junk.npz")


def test_load_npz(tmp_path) -> None:
    a, b = np.arange(6.0).reshape(3, 2), np.ones((2, 2))
    np.savez(tmp_path / "one.npz", data=a)
    np.testing.assert_array_equal(ds.load(tmp_path / "one.npz"), a)
    np.savez(tmp_path / "two.npz", a=a, b=b)
    with pytest.raises(DataError, match=r"holds 2 arrays \['a', 'b'\]; choose one with key="):
        ds.load(tmp_path / "two.npz")
    np.testing.assert_array_equal(ds.load(tmp_path / "two.npz", key="b"), b)
    with pytest.raises(DataError, match="has no array 'c'"):
        ds.load(tmp_path / "two.npz", key="c")


# -- validation ---------------------------------------------------------------------------


def _good(n: int = 20, d: int = 3) -> np.ndarray:
    return np.random.default_rng(1).normal(size=(n, d))


def test_validate_accepts_good_data() -> None:
    x = _good()
    assert ds.validate(x, features=3, batch_size=20) is x
    t = torch.from_numpy(x)
    assert ds.validate(t) is t
    ds.validate(np.arange(12).reshape(6, 2))  # integers are numbers too


@pytest.mark.parametrize(
    "data, kwargs, message",
    [
        (np.zeros((0, 3)), {}, r"data is empty: shape \(0, 3\)"),
        (np.zeros((4, 0)), {}, r"data is empty"),
        (np.zeros(5), {}, r"expected a 2-D array .* shape \(5,\); for one feature use"),
        (np.zeros((2, 2, 2)), {}, r"2-D array \(rows, features\), got shape \(2, 2, 2\)"),
        (_good(), {"features": 2}, "expected 2 columns \\(features\\), got 3"),
        (_good(), {"batch_size": 64}, r"has 20 rows, fewer than one batch \(batch_size=64\)"),
        (
            np.array([[1.0, 2.0], [3.0, "x"]], dtype=object),
            {},
            r"non-numeric cell 'x' at row index 1, column index 1",
        ),
        (np.array([["1", "2"], ["3", ""]]), {}, r"cell '' at row index 1, column index 1"),
        (np.array([[1 + 1j, 2], [3, 4]]), {}, "complex values are not supported"),
    ],
)
def test_validate_rejects(data, kwargs, message) -> None:
    with pytest.raises(DataError, match=message):
        ds.validate(data, **kwargs)


def test_validate_names_nonfinite_rows() -> None:
    x = _good(30)
    x[[4, 9, 11, 20, 25, 29], [0, 2, 1, 0, 1, 2]] = [np.nan, np.inf, -np.inf, np.nan, np.nan, 1e400]
    message = r"NaN or inf in 6 rows \(row indices 4, 9, 11, 20, 25, \.\.\.\)"
    with pytest.raises(DataError, match=message):
        ds.validate(x)
    y = _good(5)
    y[3, 1] = np.nan
    with pytest.raises(DataError, match=r"val: NaN or inf in 1 row \(row indices 3\)"):
        ds.validate(torch.from_numpy(y), name="val")


def test_validate_names_constant_columns() -> None:
    x = _good(10, 5)
    x[:, 1] = 2.0
    x[:, 4] = 0.0
    message = r"constant \(zero-variance\) columns 1, 4 \(column indices\)"
    with pytest.raises(DataError, match=message) as caught:
        ds.validate(x)
    assert "drop them" in str(caught.value) and "dequantize" in str(caught.value)


def test_check_full_rank_names_linearly_dependent_columns(monkeypatch) -> None:
    x = _good(40, 4)
    ds.check_full_rank(x)
    ds.check_full_rank(x[:, :1])  # one column: nothing to depend on
    # Far from zero and nearly, but not exactly, a copy: full rank.
    near = np.c_[x, 1e8 + x[:, 0] + 1e-3 * _good(40, 1)[:, 0]]
    ds.check_full_rank(near)
    with pytest.raises(DataError, match=r"columns 0, 4 \(column indices\) are linearly "
                                         r"dependent.*drop one of them"):
        ds.check_full_rank(np.c_[x, 1e8 + x[:, 0]])
    with pytest.raises(DataError, match=r"t.csv: columns 'b', 'd', 'e' are linearly dependent"):
        ds.check_full_rank(np.c_[x, x[:, 1] - 2 * x[:, 3]], "t.csv", list("abcde"))
    # A column near, but not on, a copy (1e-5 of its spread off) is data.
    ds.check_full_rank(np.c_[x, x[:, 0] + 1e-5 * _good(40, 1)[:, 0]])
    # A constant column does not hide a copy; two dependencies ask for two columns dropped.
    with pytest.raises(DataError, match=r"columns 0, 5 .*plane of 4 dimensions in 5.*drop "
                                         r"one of them"):
        ds.check_full_rank(np.c_[x, np.ones(40), x[:, 0]])
    with pytest.raises(DataError, match=r"plane of 4 dimensions in 6.*drop 2 of them"):
        ds.check_full_rank(np.c_[x, 2 * x[:, 1], x[:, 2] + x[:, 3]])
    with pytest.raises(DataError, match=r"plane of 1 dimension in 2, where"):
        ds.check_full_rank(np.c_[x[:, 0], 3 * x[:, 0]])
    # Values stored in float32 carry its rounding: a sum far from zero is found all the same,
    # and a column that is noisy beyond that rounding is data.
    big = np.c_[x[:, :3] + 1e4, x[:, 0] + x[:, 1] + 2e4]
    with pytest.raises(DataError, match=r"columns 0, 1, 3 .*to within .* of their spread"):
        ds.check_full_rank(big.astype(np.float32))
    big[:, 3] += 0.05 * _good(40, 1)[:, 0]
    ds.check_full_rank(big.astype(np.float32))
    with pytest.raises(DataError, match=r"has 4 rows for 4 columns: the rows span at most "
                                         r"3 dimensions"):
        ds.check_full_rank(x[:4])
    with pytest.raises(DataError, match=r"has 2 rows for 4 columns: the rows span at most "
                                         r"1 dimension, so"):
        ds.check_full_rank(x[:2])
    # In blocks of rows, never the whole table at once, with the same verdict.
    monkeypatch.setattr(ds.arrays, "CHUNK_ROWS", 7)
    lazy = _CountingSubset(np.c_[x, x[:, 2] * 3])
    _CountingSubset.largest = 0
    with pytest.raises(DataError, match="columns 2, 4 "):
        ds.check_full_rank(lazy)
    assert _CountingSubset.largest == 7


def test_validate_path(tmp_path) -> None:
    with pytest.raises(DataError, match="no such file"):
        ds.validate(tmp_path / "missing.npy")
    np.save(tmp_path / "d.npy", _good())
    assert isinstance(ds.validate(tmp_path / "d.npy", features=3), np.memmap)


class _CountingSubset(Subset):
    """A Subset that records the largest number of rows read at once."""

    largest = 0

    def __getitem__(self, index):
        out = super().__getitem__(index)
        type(self).largest = max(type(self).largest, len(out))
        return out


def test_validate_and_fit_work_in_chunks(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(ds.arrays, "CHUNK_ROWS", 7)
    monkeypatch.setattr(ef.transforms.standardize, "_CHUNK_ROWS", 7)
    arr = _good(60, 3).astype(np.float32)
    arr[:, 2] = 5.0
    np.save(tmp_path / "d.npy", arr)
    mm = ds.load(tmp_path / "d.npy")
    lazy = _CountingSubset(mm)
    # Constant over all chunks: found; constant within every chunk but not overall: fine.
    with pytest.raises(DataError, match="constant .*column 2 "):
        ds.validate(lazy)
    assert _CountingSubset.largest == 7
    arr[:, 2] = np.repeat(np.arange(10), 6)[:60]
    arr[[8, 50], 0] = np.nan
    np.save(tmp_path / "e.npy", arr)
    with pytest.raises(DataError, match=r"NaN or inf in 2 rows \(row indices 8, 50\)"):
        ds.validate(ds.load(tmp_path / "e.npy"))
    arr[[8, 50], 0] = 0.0
    np.save(tmp_path / "f.npy", arr)
    _CountingSubset.largest = 0
    t = Standardize.fit(_CountingSubset(ds.load(tmp_path / "f.npy")))
    assert _CountingSubset.largest == 7
    np.testing.assert_allclose(t.mean.double().numpy(), arr.astype(np.float64).mean(0), rtol=1e-6)
    np.testing.assert_allclose(t.std.double().numpy(), arr.astype(np.float64).std(0), rtol=1e-6)


# -- splits and tensors -------------------------------------------------------------------


def test_split_arrays_and_tensors() -> None:
    x = np.arange(101.0)[:, None] * np.ones((1, 2))
    train, val, test = ds.split(x, seed=7)
    assert (len(train), len(val), len(test)) == (81, 10, 10)
    rows = np.concatenate([train[:, 0], val[:, 0], test[:, 0]])
    assert sorted(rows.tolist()) == list(range(101))  # disjoint, covering
    again = ds.split(x, seed=7)
    assert all(np.array_equal(a, b) for a, b in zip((train, val, test), again, strict=True))
    assert not np.array_equal(train, ds.split(x, seed=8)[0])
    t_train, t_val = ds.split(torch.from_numpy(x), (0.5, 0.5), seed=7)
    assert isinstance(t_train, torch.Tensor) and len(t_train) + len(t_val) == 101
    for bad in ((0.5, 0.6), (1.2, -0.2)):
        with pytest.raises(ValueError, match="fractions must be non-negative and sum to 1"):
            ds.split(x, bad)
    with pytest.raises(DataError, match="cannot split 2 rows into 3 parts"):
        ds.split(x[:2])
    assert [len(p) for p in ds.split([[1.0], [2.0], [3.0], [4.0]], (0.5, 0.5))] == [2, 2]
    with pytest.raises(DataError, match=r"split needs a 2-D array .* got shape \(5,\)"):
        ds.split(np.zeros(5))


def test_the_copies_of_a_row_go_to_one_part() -> None:
    # A table with each row three times: with copies on both sides, a model that memorizes
    # its training rows scored well on the held-out ones (and the auto ladder chose an
    # 18-component mixture 120 nats worse on new rows).
    rng = np.random.default_rng(0)
    x = np.repeat(rng.normal(size=(40, 2)), 3, axis=0)
    parts = ds.split(x, seed=3)
    assert [len(p) for p in parts] == [96, 12, 12]
    seen = [{tuple(r) for r in part.tolist()} for part in parts]
    assert not (seen[0] & seen[1] or seen[0] & seen[2] or seen[1] & seen[2])
    # distinct rows: the order is the plain permutation, as before
    distinct = rng.normal(size=(50, 2))
    order, starts = ds.shuffled_rows(distinct, rng=np.random.default_rng(5))
    assert starts is None and np.array_equal(order, np.random.default_rng(5).permutation(50))
    # a context makes rows distinct; copies of a row and its context stay together
    ctx = np.tile([[0.0], [1.0], [1.0]], (40, 1))
    order, starts = ds.shuffled_rows(x, ctx, rng=np.random.default_rng(1))
    assert starts is not None and len(starts) == 81 and sorted(order.tolist()) == list(range(120))
    keys = [tuple(x[i]) + tuple(ctx[i]) for i in order]
    for a, b in zip(starts[:-1], starts[1:], strict=True):
        assert len(set(keys[a:b])) == 1
    assert ds.cut_between_copies(np.array([13, 50]), np.array([0, 3, 7, 12, 15, 60])).tolist() \
        == [12, 60]


def _same_sets(inverse: np.ndarray, other: np.ndarray) -> bool:
    """Whether two numberings put the rows into the same sets."""
    pairs = np.unique(np.stack([inverse, other]), axis=1)
    return len(pairs.T) == len(np.unique(inverse)) == len(np.unique(other))


def test_copies_are_found_by_hash_and_confirmed_exactly(monkeypatch) -> None:
    import exactflow.datasets.splits as splits

    rng = np.random.default_rng(4)
    x = np.round(rng.normal(size=(3000, 3)), 1)  # many repeated rows
    ctx = rng.integers(0, 2, size=(3000, 1))
    _, truth, counts = np.unique(np.hstack([x, ctx]), axis=0, return_inverse=True,
                                 return_counts=True)
    inverse, found = splits._copies([x, ctx])
    assert _same_sets(inverse, truth.reshape(-1)) and sorted(found) == sorted(counts)
    # -0.0 and 0.0 are one value; rows that differ in their last bit are not copies
    signed = np.array([[0.0, 1.0], [-0.0, 1.0], [1.0, 1.0], [np.nextafter(1.0, 2), 1.0]])
    inverse, found = splits._copies([signed])
    assert inverse[0] == inverse[1] and len({*inverse[1:].tolist()}) == 3
    assert splits._copies([rng.normal(size=(500, 2))]) is None
    # two distinct rows whose hashes collide are not taken for copies (every hash 0 here)
    monkeypatch.setattr(splits, "row_hashes", lambda tables: np.zeros(len(tables[0]), "u8"))
    inverse, found = splits._copies([x, ctx])
    assert _same_sets(inverse, truth.reshape(-1)) and sorted(found) == sorted(counts)
    assert splits._copies([np.arange(6.0)[:, None]]) is None
    monkeypatch.undo()
    # whole numbers beyond 2^53 share a float64 (and a hash), not a value; cells of text
    big = np.array([[2**53], [2**53 + 1], [2**53]], dtype=np.int64)
    assert splits._copies([big])[0].tolist() == [0, 1, 0]
    text = np.array([["a", "x"], ["a", "x"], ["b", "y"], ["c", "z"]])
    inverse, found = splits._copies([text])
    assert inverse[0] == inverse[1] and sorted(found) == [1, 1, 2]
    assert sum(len(p) for p in ds.split(text, (0.5, 0.5))) == 4


def test_split_memmap_is_lazy(tmp_path) -> None:
    arr = np.random.default_rng(2).normal(size=(40, 3))
    np.save(tmp_path / "d.npy", arr)
    parts = ds.split(ds.load(tmp_path / "d.npy"), seed=1)
    assert all(isinstance(p, Subset) for p in parts)
    assert [len(p) for p in parts] == [32, 4, 4]
    rows = np.concatenate([p.rows for p in parts])
    assert sorted(rows.tolist()) == list(range(40))
    assert all((np.diff(p.rows) > 0).all() for p in parts)
    train = parts[0]
    np.testing.assert_array_equal(np.asarray(train), arr[train.rows])
    np.testing.assert_array_equal(train[[0, 5]], arr[train.rows[[0, 5]]])
    # A split of a split indexes the original file.
    inner = ds.split(train, (0.5, 0.5), seed=0)[0]
    np.testing.assert_array_equal(np.asarray(inner), arr[inner.rows])


def test_as_tensor(tmp_path) -> None:
    arr = np.random.default_rng(3).normal(size=(6, 2))
    np.save(tmp_path / "d.npy", arr)
    mm = ds.load(tmp_path / "d.npy")
    t = ds.as_tensor(mm)
    assert t.dtype == torch.float32 and t.shape == (6, 2)
    t64 = ds.as_tensor(ds.split(mm, (0.5, 0.5))[0], dtype=torch.float64)
    assert t64.dtype == torch.float64 and t64.shape == (3, 2)
    assert ds.as_tensor(torch.ones(2, 2, dtype=torch.float64)).dtype == torch.float32
    with pytest.raises(DataError, match="non-numeric cell 'a'"):
        ds.as_tensor(np.array([["1", "a"]]))


# -- digits ---------------------------------------------------------------------------------


def test_digits_dequantized() -> None:
    pytest.importorskip("sklearn")
    raw = ds.digits(dequantize=False)
    assert raw.shape == (1797, 64) and raw.min() == 0 and raw.max() == 16
    y = ds.digits(seed=1)
    assert y.shape == (1797, 64) and y.dtype == np.float64
    y32 = y.astype(np.float32)
    assert (y32 > 0).all() and (y32 < 1).all()
    np.testing.assert_array_equal(np.floor(y * 17), raw)  # each value stays in its own bin
    assert np.array_equal(y, ds.digits(seed=1)) and not np.array_equal(y, ds.digits(seed=2))
    # The noise is uniform within each bin.
    frac = y * 17 - raw
    assert abs(frac.mean() - 0.5) < 0.01 and abs(frac.var() - 1 / 12) < 0.005


def test_digits_without_sklearn(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    ds.bundled._digits_raw.cache_clear()
    with pytest.raises(ImportError, match=r"pip install 'exactflow\[sklearn\]'"):
        ds.digits()


# -- Standardize ----------------------------------------------------------------------------


def test_standardize_fit_and_check_transform() -> None:
    rng = np.random.default_rng(4)
    x = rng.normal(size=(64, 5)) * rng.uniform(0.1, 20, 5) + rng.normal(scale=10, size=5)
    t = Standardize.fit(x)
    # The statistics stay in float64 whatever the model's dtype (the output's).
    assert t.mean.dtype == torch.float64 and t.dtype == torch.float32
    assert t.float().mean.dtype == torch.float64
    np.testing.assert_allclose(t.mean.numpy(), x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(t.std.numpy(), x.std(0), rtol=1e-12)
    t = Standardize.fit(x, dtype=torch.float64)
    np.testing.assert_allclose(t.mean.numpy(), x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(t.std.numpy(), x.std(0), rtol=1e-12)
    xt = torch.from_numpy(x)
    ef.check_transform(t, xt[:9])
    ef.check_transform(t, xt[:1])
    z, ladj = t(xt)
    assert torch.allclose(z.mean(0), torch.zeros(5, dtype=torch.float64), atol=1e-10)
    assert torch.allclose(z.std(0, unbiased=False), torch.ones(5, dtype=torch.float64))
    assert torch.allclose(ladj, -torch.log(torch.from_numpy(x.std(0))).sum().expand(64))


def test_standardize_float32_round_trip_and_buffers() -> None:
    t = Standardize(mean=[1.0, -2.0, 300.0], std=[0.5, 3.0, 40.0])
    assert t.mean.dtype == torch.float64 and not list(t.parameters())
    assert set(t.state_dict()) == {"mean", "std"}
    x = torch.randn(7, 3) * 10
    z, ladj = t(x)
    assert z.dtype == ladj.dtype == torch.float32
    back, ladj_inv = t.inverse(z)
    assert back.dtype == torch.float64  # data come back in float64
    assert torch.allclose(back.float(), x, atol=1e-4)
    assert torch.allclose(ladj, -ladj_inv)
    ident = Standardize.identity(3)
    assert torch.equal(ident(x)[0], x)  # float32 in, float32 out
    ident.load_state_dict(t.state_dict())
    assert torch.equal(ident(x)[0], z)


def test_standardize_keeps_log_prob_in_data_units() -> None:
    # Flow(Standardize, N(0, I)) is exactly N(mean, diag(std^2)) in the data's units.
    mean = torch.tensor([3.0, -1.0], dtype=torch.float64)
    std = torch.tensor([0.2, 5.0], dtype=torch.float64)
    flow = ef.Flow(Standardize(mean, std), ef.StandardNormal(2)).double()
    x = mean + std * torch.randn(9, 2, dtype=torch.float64)
    expected = torch.distributions.Normal(mean, std).log_prob(x).sum(-1)
    assert torch.allclose(flow.log_prob(x), expected)


def test_standardize_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match=r"finite std > 0; columns \[1\]"):
        Standardize([0.0, 0.0], [1.0, 0.0])
    with pytest.raises(ValueError, match="same length"):
        Standardize([0.0, 0.0], [1.0])
    x = _good(10, 3)
    x[:, 0] = 1.0
    with pytest.raises(DataError, match=r"data for Standardize.fit: constant .*column 0 "):
        Standardize.fit(x)
    x[:, 0] = np.nan
    with pytest.raises(DataError, match="NaN or inf in 10 rows"):
        Standardize.fit(x)


def test_standardize_is_exact_where_float32_cannot_hold_the_spread() -> None:
    # A column 1e8 + N(0, 1): float32's spacing at 1e8 is 8, so casting the data first
    # erases it. Standardized in float64, a float32 flow scores it right.
    rng = np.random.default_rng(0)
    x = 1e8 + rng.normal(size=(2000, 2))
    flow = ef.Flow(Standardize.fit(x), ef.StandardNormal(2))  # float32 model
    logp = flow.log_prob(torch.from_numpy(x)).double()
    expected = -0.5 * ((x - x.mean(0)) / x.std(0)) ** 2 - 0.5 * np.log(2 * np.pi) - np.log(
        x.std(0))
    np.testing.assert_allclose(logp.numpy(), expected.sum(1), atol=1e-4)


def test_pooled_standardize_shifts_and_scales_every_column_alike() -> None:
    rng = np.random.default_rng(5)
    x = rng.normal(size=(300, 4)) * [0.1, 1.0, 2.0, 3.0] + [1.0, 0.0, -1.0, 2.0]
    mean, std = Standardize.statistics(x, pooled=True)
    # The mean and standard deviation of all values as one sample.
    np.testing.assert_allclose(mean, np.full(4, x.mean()), rtol=1e-12)
    np.testing.assert_allclose(std, np.full(4, x.std()), rtol=1e-12)
    t = Standardize.fit(x, dtype=torch.float64, pooled=True)
    assert t.pooled and t.scale == "pooled" and "pooled=True" in repr(t)
    ef.check_transform(t, torch.from_numpy(x[:9]))
    z, _ = t(torch.from_numpy(x))
    # The columns keep their relative spreads.
    np.testing.assert_allclose(z.std(0, unbiased=False).numpy(), x.std(0) / std, rtol=1e-12)
    assert Standardize.identity(4, pooled=True).pooled and not Standardize.identity(4).pooled
    with pytest.raises(DataError, match="constant"):
        Standardize.statistics(np.c_[x, np.ones(300)], pooled=True)


def _pixels(n: int = 400, seed: int = 0) -> np.ndarray:
    # Dequantized intensities 0..16 in eight columns: one nearly always 0, as at an image's
    # border, the others spread over the whole range.
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 17, size=(n, 8)).astype(float)
    x[:, 0] = np.where(rng.random(n) < 0.02, 16.0, 0.0)
    return x + rng.random((n, 8))


def test_a_column_whose_spread_underflows_float64_is_refused() -> None:
    # (a column in units of 1e-170: its variance underflowed, and the Gaussian's test NLL
    # read -12.6 where the true one is -387.2)
    x = np.random.default_rng(0).normal(size=(300, 3))
    x[:, 1] *= 1e-170
    with pytest.raises(DataError, match=r"column 'b' span less than 1e-150 \(down to "
                                        r"[0-9.]+e-170\).*multiply by a power of ten"):
        ef.datasets.validate(x, columns=["a", "b", "c"])
    x[:, 1] *= 1e60  # (units of 1e-110: squares of 1e-220 are still float64 numbers)
    ef.datasets.validate(x)


def test_choose_scale_pools_columns_on_one_range_only() -> None:
    rng = np.random.default_rng(6)
    assert Standardize.choose_scale(_pixels()) == "pooled"
    # Columns in different units (a mass in grams beside a length in metres).
    mixed = np.c_[rng.normal(4000, 800, 300), rng.normal(1.7, 0.1, 300), rng.normal(size=300)]
    assert Standardize.choose_scale(mixed) == "columns"
    # Two columns on one range and a third far from it.
    assert Standardize.choose_scale(np.c_[_pixels()[:, 1:3], 100 + _pixels()[:, 3]]) == "columns"
    # One range, but no column that per-column scaling would push far out: returns in one
    # unit with different spreads.
    returns = rng.standard_t(4, size=(1000, 5)) * [0.5, 0.6, 0.8, 0.9, 1.0]
    assert Standardize.choose_scale(returns) == "columns"
    assert Standardize.choose_scale(_pixels()[:, 1:]) == "columns"  # no border pixel
    # A column far narrower than the others is pooled too (an 8-bit image's blank pixel,
    # dequantization noise, must be), and named: in other units it would be squeezed
    from exactflow.transforms.standardize import narrow_columns

    small = np.c_[_pixels(), 8 + 1e-4 * rng.standard_t(3, size=400)]
    assert Standardize.choose_scale(small) == "pooled"
    assert narrow_columns(small) == [8] and narrow_columns(_pixels()) == []
    with pytest.raises(DataError, match="constant"):
        Standardize.choose_scale(np.c_[mixed, np.zeros(300)])


def test_resolve_standardize_says_what_a_builder_gets() -> None:
    from exactflow.transforms.standardize import resolve_standardize

    assert resolve_standardize("auto", _pixels()) == "pooled"
    assert resolve_standardize("auto", _pixels() * [1, 1, 1, 1, 1, 1, 1, 1000]) is True
    assert resolve_standardize("columns", _pixels()) is True
    assert resolve_standardize(True, None) is True and resolve_standardize(False, None) is False
    assert resolve_standardize("pooled", None) == "pooled"
    # Any non-string is read as a yes/no, as before "pooled" existed.
    assert resolve_standardize(np.True_, None) is True and resolve_standardize(0, None) is False
    # A layer pickled before the option existed has no such attribute: per column.
    old = Standardize.identity(2)
    del old.pooled
    assert old.pooled is False and "pooled" not in repr(old)
    with pytest.raises(ValueError, match="standardize must be 'auto', True .* got 'yes'"):
        resolve_standardize("yes", _pixels())


@pytest.mark.parametrize("cell, said", [
    ('"24,014.86"', "thousands separators or a decimal comma"),
    ("24014,86", "thousands separators or a decimal comma"),
    ('"$1,234.50"', "currency or percent sign"),
    ("12%", "currency or percent sign"),
    ("P100000", None),
])
def test_a_number_written_for_people_is_named_as_such(tmp_path, cell, said):
    # "non-numeric cell '24,014.86'" named the cell but not what was wrong with it.
    path = tmp_path / "t.csv"
    path.write_text(f"a;b\n1.5;2\n{cell};3\n" if cell == "24014,86" else f"a,b\n1.5,2\n{cell},3\n")
    with pytest.raises(DataError, match="non-numeric cell") as caught:
        ds.load(path)
    assert (said in str(caught.value)) if said else "(a number" not in str(caught.value)
