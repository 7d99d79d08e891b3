"""Data in many files: Shards (.npy and Parquet), write_shards, the O(1)-memory shuffle, and
training from shards larger than a memory budget."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import exactflow as ef
from exactflow.datasets import DataError, Shards, write_shards
from exactflow.training.batches import Order, Permutation

ROOT = Path(__file__).resolve().parents[1]


def _table(n: int = 103, d: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)


@pytest.fixture
def npy_folder(tmp_path: Path) -> tuple[Path, np.ndarray]:
    data = _table()
    write_shards(data, tmp_path / "shards", rows_per_shard=10)
    return tmp_path / "shards", data


def test_shards_read_rows_like_the_array(npy_folder: tuple[Path, np.ndarray]) -> None:
    folder, data = npy_folder
    table = Shards(folder)
    assert table.shape == data.shape and table.dtype == np.float32 and len(table.files) == 11
    assert table.nbytes == data.nbytes
    index = np.array([102, 0, 55, 55, 9, 10, 11, 3])  # any order, repeats, across files
    np.testing.assert_array_equal(table[index], data[index])
    np.testing.assert_array_equal(table[5:97], data[5:97])
    np.testing.assert_array_equal(table[::7], data[::7])
    np.testing.assert_array_equal(table[-1], data[-1])
    np.testing.assert_array_equal(table[data[:, 0] > 0], data[data[:, 0] > 0])
    np.testing.assert_array_equal(np.asarray(table), data)
    assert table[7:7].shape == (0, 3)
    view = table.slice(20, 61)
    assert len(view) == 41
    np.testing.assert_array_equal(view[:], data[20:61])
    np.testing.assert_array_equal(view[[0, 40, -1]], data[[20, 60, 60]])
    np.testing.assert_array_equal(view.slice(1, 3)[:], data[21:23])
    with pytest.raises(IndexError, match="out of range"):
        table[103]
    with pytest.raises(IndexError, match="out of range"):
        table[[0, 200]]
    with pytest.raises(TypeError, match="row indices only"):
        table[0, 1]
    with pytest.raises(IndexError, match="out of range"):
        table.slice(5, 200)


def test_shards_pickle_the_file_names_not_the_data(tmp_path: Path) -> None:
    data = _table(5000, 8)
    write_shards(data, tmp_path, rows_per_shard=1000)
    table = Shards(tmp_path)
    table[[1, 50]]  # maps the files
    blob = pickle.dumps(table)
    assert len(blob) < 4000 < data.nbytes  # file names and offsets only
    np.testing.assert_array_equal(pickle.loads(blob)[[3, 99]], data[[3, 99]])


def test_shards_follow_the_natural_order_of_names(tmp_path: Path) -> None:
    for k in (10, 2, 1):
        np.save(tmp_path / f"part-{k}.npy", np.full((2, 2), float(k)))
    (tmp_path / "_SUCCESS").write_text("")
    np.save(tmp_path / ".hidden.npy", np.zeros((5, 2)))
    table = Shards(tmp_path)
    assert [Path(f).name for f in table.files] == ["part-1.npy", "part-2.npy", "part-10.npy"]
    assert table[:][:, 0].tolist() == [1, 1, 2, 2, 10, 10]
    assert len(Shards(str(tmp_path / "part-1*.npy"))) == 4  # a glob: part-1 and part-10
    assert len(Shards([tmp_path / "part-2.npy"])) == 2


def test_shards_select_columns(npy_folder: tuple[Path, np.ndarray]) -> None:
    folder, data = npy_folder
    table = Shards(folder, columns=[2, 0])
    assert table.shape == (103, 2)
    np.testing.assert_array_equal(table[[4, 77]], data[[4, 77]][:, [2, 0]])
    with pytest.raises(DataError, match="out of range"):
        Shards(folder, columns=[3])
    with pytest.raises(DataError, match="no column names"):
        Shards(folder, columns=["x"])


def test_shards_refuse_bad_folders(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="holds no .npy or .parquet files"):
        Shards(tmp_path)
    with pytest.raises(DataError, match="no such file or folder"):
        Shards(tmp_path / "missing")
    np.save(tmp_path / "a.npy", np.zeros((3, 2)))
    np.save(tmp_path / "b.npy", np.zeros((3, 4)))
    with pytest.raises(DataError, match="has 4 columns but .* has 2"):
        Shards(tmp_path)
    one = tmp_path / "one"
    one.mkdir()
    np.save(one / "a.npy", np.zeros(3))
    with pytest.raises(DataError, match="every shard must be 2-D"):
        Shards(one)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    np.save(mixed / "a.npy", np.zeros((3, 2)))
    (mixed / "b.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match="mix .npy and Parquet"):
        Shards(mixed)
    with pytest.raises(DataError, match=r"already holds a\*.npy shards"):
        write_shards(np.zeros((3, 2)), one.parent / "mixed", prefix="a")


def test_write_shards_reads_in_chunks_and_sizes_files(tmp_path: Path) -> None:
    data = _table(25, 2).astype(np.float64)
    names = write_shards(data, tmp_path, rows_per_shard=10, dtype=np.float32)
    assert names == ["part-00000.npy", "part-00001.npy", "part-00002.npy"]
    sizes = [np.load(tmp_path / n, mmap_mode="r").shape[0] for n in names]
    assert sizes == [10, 10, 5]
    assert Shards(tmp_path).dtype == np.float32
    np.testing.assert_allclose(Shards(tmp_path)[:], data, rtol=1e-6)


def test_shards_work_wherever_a_memmap_does(npy_folder: tuple[Path, np.ndarray]) -> None:
    folder, data = npy_folder
    table = Shards(folder)
    assert ef.datasets.validate(str(folder), features=3).shape == (103, 3)
    mean, std = ef.datasets.Standardize.statistics(table)
    np.testing.assert_allclose(mean, data.astype(np.float64).mean(0), rtol=1e-12)
    np.testing.assert_allclose(std, data.astype(np.float64).std(0), rtol=1e-12)
    np.save(folder.parent / "joined.npy", data)
    joined = np.load(folder.parent / "joined.npy", mmap_mode="r")
    train, val = ef.datasets.split(table, (0.8, 0.2), seed=1)
    ref_train, ref_val = ef.datasets.split(joined, (0.8, 0.2), seed=1)
    np.testing.assert_array_equal(np.asarray(train), np.asarray(ref_train))
    np.testing.assert_array_equal(np.asarray(val), np.asarray(ref_val))
    flow = ef.Flow(ef.transforms.ElementwiseAffine(3), ef.StandardNormal(3))
    assert ef.evaluate(flow, table, batch_size=7) == ef.evaluate(flow, data, batch_size=7)


def test_fit_from_a_folder_equals_fit_from_the_array(
    npy_folder: tuple[Path, np.ndarray],
) -> None:
    folder, data = npy_folder
    args = dict(steps=12, batch_size=16, lr=1e-2, eval_every=4, progress=False, device="cpu")

    def run(train: object, val: object) -> tuple[dict[str, torch.Tensor], list]:
        torch.manual_seed(0)
        flow = ef.models.maf(3, layers=2, hidden=(8,))
        history = ef.fit(flow, train, val, **args)
        return flow.state_dict(), history.val_nll

    state, val_nll = run(str(folder), Shards(folder).slice(80, 103))
    ref_state, ref_val_nll = run(torch.from_numpy(data), torch.from_numpy(data[80:]))
    for key in ref_state:
        torch.testing.assert_close(state[key], ref_state[key], rtol=0, atol=0, msg=key)
    assert val_nll == ref_val_nll


# -- Parquet -----------------------------------------------------------------------------------


@pytest.fixture
def parquet_folder(tmp_path: Path) -> tuple[Path, np.ndarray]:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    data = _table(103, 3)
    for k, lo in enumerate(range(0, 103, 40)):
        part = data[lo : lo + 40]
        table = pa.table({"x": part[:, 0], "y": part[:, 1].astype(np.float64), "z": part[:, 2],
                          "label": ["a"] * len(part)})
        pq.write_table(table, tmp_path / f"p{k}.parquet", row_group_size=7)
    return tmp_path, data


def test_parquet_files_read_as_one_table(parquet_folder: tuple[Path, np.ndarray]) -> None:
    folder, data = parquet_folder
    with pytest.raises(DataError, match="column 'label' is not numeric"):
        Shards(folder)
    table = Shards(folder, columns=["x", "y", "z"], cache_row_groups=2)
    assert table.shape == (103, 3) and table.dtype == np.float64
    assert table.column_names == ["x", "y", "z"]
    index = np.array([102, 0, 41, 41, 6, 7, 80])
    np.testing.assert_allclose(table[index], data[index], rtol=1e-7)
    np.testing.assert_allclose(table[:], data, rtol=1e-7)
    assert len(table._cache) <= 2  # the LRU cache of decoded row groups stays bounded
    np.testing.assert_allclose(Shards(folder, columns=[2, 0])[3:5], data[3:5][:, [2, 0]])
    with pytest.raises(DataError, match="no column named 'w'"):
        Shards(folder, columns=["w"])
    again = pickle.loads(pickle.dumps(table))
    np.testing.assert_allclose(again[index], data[index], rtol=1e-7)


def test_parquet_converts_to_npy_shards(parquet_folder: tuple[Path, np.ndarray],
                                        tmp_path: Path) -> None:
    folder, data = parquet_folder
    out = tmp_path / "npy"
    write_shards(Shards(folder, columns=["x", "y", "z"]), out, rows_per_shard=50)
    np.testing.assert_allclose(Shards(out)[:], data, rtol=1e-7)


def test_fit_reads_parquet_shards(parquet_folder: tuple[Path, np.ndarray]) -> None:
    folder, data = parquet_folder
    flow = ef.Flow(ef.transforms.ElementwiseAffine(3), ef.StandardNormal(3))
    ef.fit(flow, Shards(folder, columns=["x", "y", "z"]), steps=3, batch_size=32,
           progress=False, device="cpu")
    assert ef.evaluate(flow, Shards(folder, columns=["x", "y", "z"]))["n"] == 103


# -- the shuffle of data larger than memory ------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 17, 64, 1000, 4097])
def test_permutation_is_a_bijection(n: int) -> None:
    values = Permutation(n, seed=[1, 2])(np.arange(n))
    assert sorted(values.tolist()) == list(range(n))


def test_permutation_depends_on_the_seed_and_shuffles() -> None:
    n = 100_000
    a = Permutation(n, seed=1)(np.arange(n))
    assert np.array_equal(a, Permutation(n, seed=1)(np.arange(n)))
    assert np.mean(a == Permutation(n, seed=2)(np.arange(n))) < 1e-3
    assert abs(np.corrcoef(np.arange(n), a)[0, 1]) < 0.02  # no trace of the input order
    assert abs(np.corrcoef(a[:-1], a[1:])[0, 1]) < 0.02  # neighbours land far apart
    counts = np.histogram(a[:10_000], bins=10, range=(0, n))[0]
    assert counts.min() > 850 and counts.max() < 1150  # the first positions land uniformly


def test_order_above_the_in_memory_limit_covers_each_row_once_per_epoch() -> None:
    order = Order(1003, 10, seed=5, in_memory=100)
    epoch = np.concatenate([order.next().numpy() for _ in range(100)])
    assert len(np.unique(epoch)) == 1000 and order.epoch == 1
    again = Order(1003, 10, seed=5, in_memory=100)
    assert np.array_equal(np.concatenate([again.next().numpy() for _ in range(100)]), epoch)
    second = np.concatenate([order.next().numpy() for _ in range(100)])
    assert not np.array_equal(second, epoch)
    state = order.state_dict()
    ahead = order.next()
    order.load_state_dict(state)
    assert torch.equal(order.peek(), ahead) and torch.equal(order.next(), ahead)


# -- training from shards bigger than a memory budget ----------------------------------------------

PROBE = Path(__file__).with_name("shard_memory_probe.py")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc (Linux)")
def test_training_from_shards_four_times_a_memory_cap(tmp_path: Path) -> None:
    rows, features = 5_000_000, 4  # 76.3 MiB of float32; 4.5M training rows: above the
    # in-memory shuffle limit (4M), so the order needs no index array
    cap_mb = 16.0
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, str(PROBE), str(tmp_path / "shards"), str(rows), str(features)],
        capture_output=True, text=True, env=env, timeout=300, check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["data_mb"] >= 4 * cap_mb
    # Anonymous memory (not file pages the kernel can drop) grew by less than the cap while
    # fit validated, standardized, shuffled and trained on all of it ...
    assert result["peak_anon_growth_mb"] < cap_mb, result
    # ... and so did the largest Python/numpy allocation peak inside fit.
    assert result["tracemalloc_peak_mb"] < cap_mb, result
    assert result["steps"] == 40 and np.isfinite(result["final_nll"])


def test_a_write_cut_short_leaves_no_table_with_rows_missing(tmp_path, monkeypatch):
    # (each shard was renamed when complete: a kill after 6 of 20 opened as a whole table)
    import exactflow.datasets.shards as shards

    real = np.lib.format.open_memmap
    made = []

    def killed_after_three(path, *args, **kwargs):
        if len(made) == 3:
            raise KeyboardInterrupt
        made.append(path)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(shards.np.lib.format, "open_memmap", killed_after_three)
    with pytest.raises(KeyboardInterrupt):
        write_shards(np.arange(200.0).reshape(100, 2), tmp_path / "s", rows_per_shard=10)
    assert not list((tmp_path / "s").iterdir())  # no shard, no temporary file
    with pytest.raises(DataError):
        Shards(tmp_path / "s")
    monkeypatch.undo()
    # a failure among the renames takes back those done
    real_replace, renamed = shards.os.replace, []

    def fails_third(src, dst):
        if len(renamed) == 2:
            raise OSError("disk gone")
        renamed.append(dst)
        real_replace(src, dst)

    monkeypatch.setattr(shards.os, "replace", fails_third)
    with pytest.raises(OSError, match="disk gone"):
        write_shards(np.arange(200.0).reshape(100, 2), tmp_path / "r", rows_per_shard=10)
    assert len(renamed) == 2 and not list((tmp_path / "r").iterdir())
