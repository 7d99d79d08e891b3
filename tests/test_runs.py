"""Run folders under stress: a second run on the same folder, a folder that holds the input,
divergence, and data far from standardized."""

from __future__ import annotations

import multiprocessing
import warnings

import numpy as np
import pytest
import torch

import exactflow as ef
from exactflow.runs import RunError, locked, train_run

QUIET = {"progress": False, "log": lambda text: None}


def table(path, n=300, seed=0):
    rows = np.random.default_rng(seed).normal(size=(n, 3))
    np.savetxt(path, rows, delimiter=",", header="a,b,c", comments="")
    return path


def test_a_second_run_on_a_folder_in_use_is_refused_and_writes_nothing(tmp_path):
    data = table(tmp_path / "t.csv")
    out = tmp_path / "run"
    with locked(out):  # as another process training into it would hold it
        with pytest.raises(RunError, match="being written by another exactflow run"):
            train_run(data, out, model="gaussian", **QUIET)
        assert sorted(p.name for p in out.iterdir()) == [".exactflow.lock"]
        # A run under way is named so, not as an interrupted run to overwrite or resume.
        (out / "run.json").write_text('{"format": "exactflow-run", "status": "training"}')
        with pytest.raises(RunError, match="being written by another exactflow run"):
            train_run(data, out, model="gaussian", **QUIET)
        (out / "run.json").unlink()
    run = train_run(data, out, model="gaussian", **QUIET)  # free again
    assert run.info["status"] == "done"


def _hold_lock(folder: str, ready: multiprocessing.synchronize.Event,
               done: multiprocessing.synchronize.Event) -> None:
    from pathlib import Path

    with locked(Path(folder)):
        ready.set()
        done.wait(30)


def test_the_lock_holds_across_processes(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    ready, done = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(str(tmp_path / "run"), ready, done))
    holder.start()
    try:
        assert ready.wait(60)
        with pytest.raises(RunError, match=r"another exactflow run \(pid \d+\)"):
            train_run(table(tmp_path / "t.csv"), tmp_path / "run", model="gaussian", **QUIET)
    finally:
        done.set()
        holder.join(30)


def test_overwrite_never_replaces_the_data_being_read(tmp_path):
    project = tmp_path / "proj"
    project.mkdir()
    rows = np.random.default_rng(1).normal(size=(200, 2))
    np.savez(project / "data.npz", rows=rows)
    before = (project / "data.npz").read_bytes()
    with pytest.raises(RunError, match="would overwrite it"):
        train_run(project / "data.npz", project, model="gaussian", overwrite=True, **QUIET)
    assert (project / "data.npz").read_bytes() == before


def test_a_learning_rate_that_diverges_stops_the_run_with_the_cure(tmp_path):
    import json

    data = table(tmp_path / "t.csv", n=400)
    model = {"model": "maf", "layers": 2}
    for lr in (10.0, 1e30):
        out = tmp_path / f"lr{lr:g}"
        with pytest.raises(ef.TrainingError, match=r"Lower the learning rate .* try 0\.001.*"
                                                   r"marked failed.*overwrite") as caught:
            train_run(data, out, model=model, lr=lr, **QUIET)
        # The data are standardized already: no advice to standardize them.
        assert "standardize=True" not in str(caught.value)
        info = json.loads((out / "run.json").read_text())
        assert info["status"] == "failed" and info["error"].startswith("training ")
        assert not (out / "checkpoint.pt").exists()
    # The failed run says so, and how to train it again; resuming it is refused.
    with pytest.raises(RunError, match=r"failed: training is unstable.*--overwrite"):
        ef.runs.load_run(out)
    with pytest.raises(RunError, match=r"failed \(training is unstable.*overwrite it"):
        train_run(data, out, model=model, resume=True, **QUIET)
    with pytest.raises(RunError, match="already holds a failed run; overwrite it"):
        train_run(data, out, model=model, **QUIET)
    with pytest.raises(ef.CheckpointError, match="failed: train it again with overwrite"):
        ef.load(out)
    run = train_run(data, out, model=model, lr=1e-3, steps=20, overwrite=True, **QUIET)
    assert run.info["status"] == "done"


def test_data_far_from_standardized_without_a_standardization_layer_warns():
    x = 1e6 * torch.randn(256, 2)
    with pytest.warns(UserWarning, match="standardize=True"):
        ef.fit(ef.models.maf(2, layers=1, hidden=(8,)), x, steps=2, progress=False,
               device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ef.fit(ef.models.maf(2, layers=1, hidden=(8,), standardize=True), x, steps=2,
               progress=False, device="cpu")


def test_a_tampered_run_json_is_refused_before_anything_is_sized_by_it(tmp_path):
    import json

    run = train_run(table(tmp_path / "t.csv"), tmp_path / "run", model="gaussian", **QUIET)
    info_file = run.path / "run.json"
    info = json.loads(info_file.read_text())
    for features in (10**9, 4, "3"):
        info["data"]["features"] = features
        info_file.write_text(json.dumps(info))
        with pytest.raises(RunError, match="features|tampered"):
            ef.runs.load_run(run.path)


def test_a_model_file_of_another_model_of_the_same_width_is_refused(tmp_path):
    # (an NSF's file in a MAF run's folder scored silently, exit 0)
    import shutil

    data = table(tmp_path / "t.csv")
    maf = train_run(data, tmp_path / "maf", model="maf", steps=5, **QUIET)
    nsf = train_run(data, tmp_path / "nsf", model="nsf", steps=5, **QUIET)
    assert ef.runs.load_run(maf.path).flow is not None  # (its own file agrees)
    shutil.copy(nsf.path / "model.safetensors", maf.path / "model.safetensors")
    with pytest.raises(RunError, match=r"describes another model than the run's model file "
                                       r"\(model: 'maf' there, 'nsf' in the file"):
        ef.runs.load_run(maf.path)


def test_a_column_whose_spread_float32_cannot_hold_trains_and_scores_right(tmp_path):
    # 1e8 + N(0, 1): float32's spacing at 1e8 is 8. Cast before standardizing, the run
    # reported a test NLL of -11.3 nats where the truth is 2.84 (a 2-D standard normal's
    # entropy); standardized in float64 it gets the truth.
    rows = 1e8 + np.random.default_rng(0).normal(size=(3000, 2))
    np.savetxt(tmp_path / "big.csv", rows, delimiter=",", header="a,b", comments="",
               fmt="%.10f")
    for model in ("gaussian", {"model": "maf", "layers": 2, "hidden": [16]}):
        run = train_run(tmp_path / "big.csv", tmp_path / str(hash(str(model))), model=model,
                        **QUIET)
        nll, se = run.info["metrics"]["test"]["nll"], run.info["metrics"]["test"]["nll_se"]
        assert abs(nll - 2.838) < 4 * se + 0.05, (model, nll, se)


class _NamedTable:
    """A table with named columns, as a pandas DataFrame presents one."""

    def __init__(self, values: np.ndarray, columns: list[str]) -> None:
        self.values, self.columns = values, columns

    def __array__(self, dtype=None, copy=None):
        return self.values if dtype is None else self.values.astype(dtype)


def test_run_score_matches_named_columns_as_the_command_line_does(tmp_path):
    from exactflow.datasets import DataError

    run = train_run(table(tmp_path / "t.csv"), tmp_path / "run", model="gaussian", **QUIET)
    rows = np.random.default_rng(3).normal(size=(20, 3)) * [1.0, 3.0, 0.3]
    expected = run.score(rows)
    shuffled = _NamedTable(np.c_[rows[:, [2, 0]], np.ones(20), rows[:, 1]],
                           ["c", "a", "extra", "b"])
    np.testing.assert_array_equal(run.score(shuffled), expected)
    with pytest.raises(DataError, match=r"no column 'b' of the run's columns \['a', 'b', 'c'\]"):
        run.score(_NamedTable(rows, ["a", "B", "c"]))
    with pytest.raises(DataError, match=r"rows of shape \(20, 2\): the run was trained on 3"):
        run.score(rows[:, :2])


def test_a_table_with_named_columns_trains_a_run_that_knows_them(tmp_path):
    # (train_run named them x1, x2, x3: scoring the same table then found no column 'x1')
    from exactflow.datasets import DataError

    rows = np.random.default_rng(4).normal(size=(200, 3)) * [1.0, 3.0, 0.3]
    named = _NamedTable(rows, ["mass", "radius", "spin"])
    run = train_run(named, tmp_path / "run", model="gaussian", **QUIET)
    assert run.columns == ["mass", "radius", "spin"]
    np.testing.assert_array_equal(run.score(named), run.score(rows))
    two = train_run(named, tmp_path / "two", model="gaussian", columns=["spin", 0], **QUIET)
    assert two.columns == ["spin", "mass"]
    with pytest.raises(DataError, match=r"no column 'size' \(it has \['mass', 'radius'"):
        train_run(named, tmp_path / "bad", model="gaussian", columns=["size"], **QUIET)
    with pytest.raises(DataError, match=r"non-numeric cell 'n/a' at row index 0, column 'b'"):
        train_run(_NamedTable(np.array([[1.0, "n/a"]] * 20, dtype=object), ["a", "b"]),
                  tmp_path / "text", model="gaussian", **QUIET)


def test_a_run_stopped_before_its_first_checkpoint_resumes_from_a_prepared_start(
        tmp_path, monkeypatch):
    # Interrupted before any checkpoint: --resume starts again from step 0, with the
    # standardization filled as a fresh run fills it (it used to stay the identity).
    import exactflow.runs.pipeline as pipeline

    data = table(tmp_path / "t.csv", n=400)
    data_rows = np.loadtxt(data, delimiter=",", skiprows=1)
    np.savetxt(data, data_rows * 40 + 300, delimiter=",", header="a,b,c", comments="")
    model = {"model": "maf", "layers": 2}

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(pipeline, "fit", interrupted)
        with pytest.raises(KeyboardInterrupt):
            train_run(data, tmp_path / "stopped", model=model, steps=30, **QUIET)
    assert not (tmp_path / "stopped" / "checkpoint.pt").exists()
    notes: list[str] = []
    resumed = train_run(data, tmp_path / "stopped", model=model, steps=30, resume=True,
                        progress=False, log=notes.append)
    fresh = train_run(data, tmp_path / "fresh", model=model, steps=30, **QUIET)
    assert any("left no checkpoint" in note for note in notes)
    rows = torch.as_tensor(data_rows[:50] * 40 + 300)
    assert torch.equal(resumed.flow.log_prob(rows), fresh.flow.log_prob(rows))
    assert float(resumed.flow.transform[0].std.min()) > 10  # filled, not the identity

    # A run of the auto ladder stopped while choosing has no one model to resume.
    with monkeypatch.context() as patch:
        patch.setattr(pipeline, "fit_auto", interrupted)
        with pytest.raises(KeyboardInterrupt):
            train_run(data, tmp_path / "auto", budget=5, **QUIET)
    with pytest.raises(RunError, match=r"was choosing its model \(auto\) when it stopped.*"
                                       r"--overwrite"):
        train_run(data, tmp_path / "auto", model=model, resume=True, **QUIET)
    with pytest.raises(ValueError, match="resume continues the training of one named model"):
        train_run(data, tmp_path / "auto", resume=True, **QUIET)


def test_a_run_whose_data_training_refused_is_marked_failed(tmp_path, monkeypatch):
    # Refused once training began (a validation row the model scores -inf): the folder
    # says so, instead of holding a run that looks interrupted.
    import json

    import exactflow.runs.pipeline as pipeline

    def refused(*args, **kwargs):
        raise ef.DataError("validation data: 1 row scores -inf under the model")

    data = table(tmp_path / "t.csv")
    monkeypatch.setattr(pipeline, "fit", refused)
    with pytest.raises(ef.DataError, match=r"scores -inf under the model\. The run in .* is "
                                           r"marked failed; train it again with overwrite"):
        train_run(data, tmp_path / "r", model="maf", **QUIET)
    assert json.loads((tmp_path / "r" / "run.json").read_text())["status"] == "failed"
    with pytest.raises(RunError, match="already holds a failed run"):
        train_run(data, tmp_path / "r", model="maf", **QUIET)


def test_a_run_stores_its_rows_in_float32_where_that_is_exact(tmp_path):
    # (a 200 MB float32 table made a 400 MB data.npz: the parts were stored in float64)
    rng = np.random.default_rng(0)
    rows = rng.normal(size=(300, 3))
    for name, table, stored in (("f32", rows.astype(np.float32), np.float32),
                                ("f64", rows, np.float64)):
        out = tmp_path / name
        run = train_run(table, out, model="gaussian", progress=False)
        with np.load(out / "data.npz") as npz:
            assert {npz[part].dtype for part in npz.files} == {np.dtype(stored)}
        test = run.data("test")
        assert test.dtype == np.float64  # (read back as the same float64 values)
        assert np.isin(test[:, 0], np.asarray(table[:, 0], dtype=np.float64)).all()
