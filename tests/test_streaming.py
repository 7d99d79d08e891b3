"""``exactflow sample`` streams: memory stays bounded whatever ``-n``, files are atomic.

Peak memory is measured with tracemalloc, which sees numpy's and Python's allocations (the
ones that grew with ``n`` before: the concatenated samples, their CSV text, the ``.npy``
bytes); torch's own buffers are one chunk at a time by construction.
"""

from __future__ import annotations

import contextlib
import io
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from exactflow.cli import main, output
from exactflow.io import csv_rows, write_table

TINY = ["--model", "maf", "--layers", "2", "--hidden", "8", "--steps", "10",
        "--batch-size", "64", "--no-report", "--samples", "300"]


class Sink(io.TextIOBase):
    """A stdout that keeps only the first and last lines and the number of lines."""

    def __init__(self) -> None:
        self.lines = 0
        self.head = ""
        self.tail = ""

    def write(self, text: str) -> int:
        if len(self.head) < 200:
            self.head = (self.head + text)[:200]
        self.lines += text.count("\n")
        self.tail = (self.tail + text)[-200:]
        return len(text)


def run_cli(argv: list, stdout: io.TextIOBase | None = None) -> tuple[int, str]:
    out = stdout or io.StringIO()
    err = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, err.getvalue()


def peak_mb(argv: list, stdout: io.TextIOBase | None = None) -> float:
    tracemalloc.start()
    try:
        code, err = run_cli(argv, stdout)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert code == 0, err
    return peak / 2**20


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("stream") / "run"
    code, err = run_cli(["train", "moons", *TINY, "--out", out])
    assert code == 0, err
    return out


def test_a_million_samples_to_npy_in_bounded_memory(run_dir, tmp_path):
    # Before: ~46 MB (the concatenated samples, then the .npy bytes twice) for 1e6 rows.
    target = tmp_path / "s.npy"
    assert peak_mb(["sample", run_dir, "-n", 1_000_000, "-o", target, "--seed", "1"]) < 4
    samples = np.load(target, mmap_mode="r")
    assert samples.shape == (1_000_000, 2) and samples.dtype == np.float64
    assert np.isfinite(samples[-1000:]).all()


def test_csv_and_stdout_stream_chunk_by_chunk(run_dir, tmp_path, monkeypatch):
    # Small chunks, so that the bound is far below what holding all rows would take
    # (before: ~4 MB for 6e4 rows of CSV text).
    monkeypatch.setattr(output, "CHUNK_VALUES", 4096)
    target = tmp_path / "s.csv"
    assert peak_mb(["sample", run_dir, "-n", 60_000, "-o", target, "--seed", "2"]) < 1.5
    lines = target.read_text().splitlines()
    assert lines[0] == "x1,x2" and len(lines) == 60_001
    sink = Sink()
    assert peak_mb(["sample", run_dir, "-n", 60_000, "--seed", "2"], sink) < 1.5
    assert sink.lines == 60_001 and sink.head.startswith("x1,x2\n" + lines[1])
    assert sink.tail.endswith(lines[-1] + "\n")


def test_npy_csv_and_stdout_hold_the_same_samples(run_dir, tmp_path):
    n = 70_000  # more than one chunk
    for name in ("s.npy", "s.csv", "s.tsv"):
        code, err = run_cli(["sample", run_dir, "-n", n, "-o", tmp_path / name, "--seed", "5"])
        assert code == 0, err
    npy = np.load(tmp_path / "s.npy")
    csv = np.loadtxt(tmp_path / "s.csv", delimiter=",", skiprows=1)
    tsv = np.loadtxt(tmp_path / "s.tsv", skiprows=1)
    assert npy.shape == (n, 2)
    np.testing.assert_allclose(csv, npy, rtol=1e-8)
    np.testing.assert_array_equal(csv, tsv)


def test_json_is_capped_with_an_error_naming_o(run_dir, monkeypatch):
    monkeypatch.setattr(output, "JSON_MAX_VALUES", 100)
    code, err = run_cli(["sample", run_dir, "-n", 51, "--json"])
    assert code == 1 and "-o FILE" in err and "at most 50 rows" in err
    code, err = run_cli(["sample", run_dir, "-n", 50, "--json"])
    assert code == 0, err


def test_score_json_is_capped_too(run_dir, tmp_path, monkeypatch):
    # (a 2,000,000-row score --json built a 60 MB object in memory)
    monkeypatch.setattr(output, "JSON_MAX_VALUES", 100)
    rows = np.random.default_rng(0).normal(size=(51, 2))
    np.savetxt(tmp_path / "r.csv", rows, delimiter=",")
    code, err = run_cli(["score", run_dir, tmp_path / "r.csv", "--json"])
    assert code == 1 and "--json prints the scores" in err and "at most 50 rows" in err
    assert "-o FILE" in err
    code, err = run_cli(["score", run_dir, tmp_path / "r.csv", "--json", "-o",
                         tmp_path / "s.csv"])
    assert code == 0, err
    code, err = run_cli(["score", run_dir, tmp_path / "r.csv", "--json",
                         "--threshold-quantile", "0.2"])  # (three values a row: 33 at most)
    assert code == 1 and "at most 33 rows" in err


def test_csv_rows_matches_savetxt():
    rows = np.array([[1.0, -2.5e-12, np.inf], [np.nan, 123456789.123, -0.0]])
    buf = io.StringIO()
    np.savetxt(buf, rows, delimiter=",", fmt="%.9g")
    assert csv_rows(rows) == buf.getvalue()
    assert csv_rows(np.zeros((0, 3))) == ""


def test_write_table_checks_the_rows_it_announced(tmp_path):
    chunks = [np.zeros((3, 2)), np.ones((2, 2))]
    write_table(tmp_path / "t.npy", iter(chunks), rows=5, columns=["a", "b"])
    np.testing.assert_array_equal(np.load(tmp_path / "t.npy"), np.vstack(chunks))
    for rows, blocks in ((6, chunks), (4, chunks), (5, [np.zeros((5, 3))])):
        with pytest.raises(ValueError, match="rows|columns"):
            write_table(tmp_path / "u.npy", iter(blocks), rows=rows, columns=["a", "b"])
    assert not (tmp_path / "u.npy").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.npy"]
