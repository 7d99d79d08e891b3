"""The command line refuses what it cannot do by name, and records only what it did."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.test_cli import run_cli, write_csv

GAUSSIAN = ["--model", "gaussian", "--no-report"]


@pytest.fixture(scope="module")
def table(tmp_path_factory) -> Path:
    rng = np.random.default_rng(0)
    rows = rng.normal(size=(300, 3))
    rows[:, 1] += rows[:, 0]
    return write_csv(tmp_path_factory.mktemp("data") / "t.csv", rows, ["a", "b", "c"])


@pytest.fixture(scope="module")
def gaussian_run(table, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "g"
    code, _, err = run_cli(["train", table, *GAUSSIAN, "--out", out])
    assert code == 0, err
    return out


def test_score_never_writes_over_the_file_it_scores(gaussian_run, table, tmp_path):
    copy = tmp_path / "in.csv"
    copy.write_bytes(table.read_bytes())
    code, _, err = run_cli(["score", gaussian_run, copy, "-o", copy])
    assert code == 1 and "is the data file being scored" in err
    assert copy.read_bytes() == table.read_bytes()


def test_sample_and_score_never_write_over_the_runs_training_data(table, tmp_path):
    # (`sample RUN -n 2 -o data.csv` replaced the training table with two rows, exit 0)
    copy = tmp_path / "train.csv"
    copy.write_bytes(table.read_bytes())
    out = tmp_path / "r"
    assert run_cli(["train", copy, *GAUSSIAN, "--out", out])[0] == 0
    for argv in (["sample", out, "-n", "2", "-o", copy],
                 ["score", out, table, "-o", copy]):
        code, _, err = run_cli(argv)
        assert code == 1 and "is the data the run was trained on" in err, err
        assert copy.read_bytes() == table.read_bytes()
    assert run_cli(["sample", out, "-n", "2", "-o", tmp_path / "s.csv"])[0] == 0


def test_a_split_uneven_for_repeated_rows_says_why(tmp_path):
    # ("600 rows are too few for the fractions (0.8, 0.1, 0.1)" for 4 distinct rows, and a
    # split of 482/91/27 rows of counts without a word)
    rng = np.random.default_rng(3)
    binary = write_csv(tmp_path / "b.csv", rng.integers(0, 2, (600, 2)), ["u", "v"])
    code, _, err = run_cli(["train", binary, *GAUSSIAN, "--out", tmp_path / "b"])
    assert code == 1 and "holds 4 distinct rows among its 600, and the copies of a row " \
        "stay on one side of the split" in err and "--dequantize" in err, err
    counts = write_csv(tmp_path / "c.csv", np.random.default_rng(0).poisson(1, (600, 2)),
                       ["u", "v"])
    code, _, err = run_cli(["train", counts, *GAUSSIAN, "--out", tmp_path / "c"])
    assert code == 0 and "holds 24 distinct rows among its 600" in err
    assert "26 validation rows (asked 60), 98 test rows (asked 60)" in err, err
    # An empty part is refused before anything is written, however few rows were asked.
    small = write_csv(tmp_path / "s.csv", rng.normal(size=(12, 2)), ["u", "v"])
    code, _, err = run_cli(["train", small, *GAUSSIAN, "--val-fraction", "0.05",
                            "--test-fraction", "0.05", "--out", tmp_path / "s"])
    assert code == 1 and "12 rows are too few for the fractions (0.9, 0.05, 0.05)" in err, err
    assert not (tmp_path / "s").exists()
    code, _, err = run_cli(["train", counts, *GAUSSIAN, "--dequantize", "--out",
                            tmp_path / "d"])
    assert code == 0 and "distinct" not in err, err
    # Most rows copies of others, the split still even: said all the same.
    rng = np.random.default_rng(1)
    points = rng.normal(size=(100, 3))
    copies = write_csv(tmp_path / "r.csv", points[rng.integers(0, 100, 2000)], ["a", "b", "c"])
    code, _, err = run_cli(["train", copies, *GAUSSIAN, "--out", tmp_path / "r"])
    assert code == 0 and "rows of r.csv repeat another row exactly (100 distinct)" in err, err


def test_check_of_one_point_passes_and_a_run_takes_no_model_options(gaussian_run):
    # (one moons point was standardized by its own spread, 0: NaN, and every layer "FAILED")
    code, out, err = run_cli(["check", "--model", "maf", "--points", "1"])
    assert code == 0 and "all 9 layers pass" in out, out + err
    # (a closed-form model: "all layers pass" over no layers, its density unchecked)
    code, out, err = run_cli(["check", "--model", "gmm", "--features", "3"])
    assert code == 0 and "no layers: the model is its base distribution " \
        "(GaussianMixture)" in out and "all layers pass" not in out
    assert "base distribution GaussianMixture passes: its log-density at the latent " \
        "points against torch.distributions" in out


def test_check_base_is_relative_at_far_points_and_takes_a_context():
    import torch

    import exactflow as ef
    from exactflow.diagnostics import check_base

    flow = ef.models.maf(2, layers=1, hidden=(4,))  # (latents near 1e5: log p near -1e10,
    far = np.full((4, 2), 1e5)                      # whose rounding is above 1e-9)
    assert check_base(flow, far)["ok"]
    conditional = ef.models.maf(2, layers=1, hidden=(4,), context=3)
    result = check_base(conditional, np.zeros((4, 2)), np.zeros((4, 3)))
    assert result["checked"] and result["ok"] and result["error"] < 1e-12
    assert torch.is_tensor(conditional.base.log_prob(torch.zeros(1, 2)))


def test_check_finds_a_wrong_base_density(monkeypatch):
    from exactflow.gaussians import GaussianMixture

    real = GaussianMixture.log_prob
    monkeypatch.setattr(GaussianMixture, "log_prob", lambda self, x: real(self, x) + 1e-6)
    code, out, _ = run_cli(["check", "--model", "gmm", "--features", "3"])
    assert code == 1 and "base distribution GaussianMixture FAILED" in out
    code, out, _ = run_cli(["check", "--model", "gmm", "--features", "3", "--json"])
    base = json.loads(out)["base"]
    assert code == 1 and base["checked"] and not base["ok"] and base["error"] > 9e-7
    code, _, err = run_cli(["check", gaussian_run, "--layers", "3", "--seed", "5"])
    assert code == 2 and "--layers, --seed describe a new model" in err


def test_overwrite_leaves_nothing_of_the_run_it_replaces(table, tmp_path):
    out = tmp_path / "r"
    code, _, err = run_cli(["train", table, "--model", "maf", "--layers", "1", "--hidden", "8",
                            "--steps", "5", "--out", out])
    assert code == 0 and (out / "report" / "index.html").exists(), err
    code, _, err = run_cli(["train", table, *GAUSSIAN, "--out", out, "--overwrite"])
    assert code == 0, err
    assert not (out / "report").exists()  # (it described the maf run)
    assert json.loads((out / "run.json").read_text())["model"]["model"] == "gaussian"


@pytest.mark.parametrize("stop", ["diverged", "interrupted"])
def test_an_overwrite_that_fails_leaves_the_finished_run_scoring(table, tmp_path, monkeypatch,
                                                                 stop):
    # (the old run's files were removed when the new run started: a failed or interrupted
    # nightly retrain left nothing to score with)
    import exactflow.runs.pipeline as pipeline
    from exactflow.runs import REPLACING_DIR, load_run
    from exactflow.training import TrainingError

    out = tmp_path / "r"
    assert run_cli(["train", table, *GAUSSIAN, "--out", out])[0] == 0
    before = load_run(out).score(np.zeros((2, 3)))
    seen = {}

    def failing(*args, **kwargs):
        run = load_run(out)  # (while the new run trains, the old one is there and scores)
        seen["model"], seen["scores"] = run.info["model"]["model"], run.score(np.zeros((2, 3)))
        if stop == "interrupted":
            raise KeyboardInterrupt
        raise TrainingError("the loss stayed non-finite")

    monkeypatch.setattr(pipeline, "fit", failing)
    code, _, err = run_cli(["train", table, "--model", "maf", "--steps", "5", "--no-report",
                            "--out", out, "--overwrite"])
    assert seen["model"] == "gaussian" and np.array_equal(seen["scores"], before)
    assert code == (130 if stop == "interrupted" else 1)
    assert f"run in {str(out)!r} is left as it was: the new run did not replace it" in err
    run = load_run(out)
    assert run.info["model"]["model"] == "gaussian" and np.array_equal(
        run.score(np.zeros((2, 3))), before)
    assert (out / REPLACING_DIR).exists() == (stop == "interrupted")
    monkeypatch.undo()
    # An interrupted replacement continues with --resume (where it was), a failed one is
    # trained again with --overwrite; either way the new run replaces the old when done.
    again = "--resume" if stop == "interrupted" else "--overwrite"
    code, _, err = run_cli(["train", table, "--model", "maf", "--steps", "5", "--no-report",
                            "--out", out, again])
    assert code == 0, err
    assert (stop == "interrupted") == ("left no checkpoint" in err)
    assert load_run(out).info["model"]["model"] == "maf"
    assert sorted(p.name for p in out.iterdir() if p.name != ".exactflow.lock") == [
        "data.npz", "history.json", "model.safetensors", "run.json"]


def test_a_replacement_cut_short_while_moved_in_is_completed_by_the_next_reader(
        table, tmp_path, monkeypatch):
    # (the process killed between two of the moves: no run.json, a mix of both runs' files,
    # and the next --overwrite deleted the finished new run)
    import os

    import exactflow.runs.folder as folder
    import exactflow.runs.pipeline as pipeline
    from exactflow.runs import REPLACING_DIR, load_run

    out = tmp_path / "r"
    assert run_cli(["train", table, *GAUSSIAN, "--out", out])[0] == 0
    (out / "notes.txt").write_text("the user's own")
    real, moves = os.replace, []

    def killed(src, dst):
        moves.append(dst)
        if len(moves) == 2:
            raise SystemExit("killed")  # (what a SIGKILL leaves: the moves stop here)
        real(src, dst)

    def cut_short(stage, target):
        monkeypatch.setattr(os, "replace", killed)
        folder.replace_run(stage, target)

    monkeypatch.setattr(pipeline, "replace_run", cut_short)
    with pytest.raises(SystemExit):
        run_cli(["train", table, "--model", "maf", "--layers", "1", "--hidden", "8",
                 "--steps", "5", "--no-report", "--out", out, "--overwrite"])
    monkeypatch.undo()
    assert not (out / "run.json").exists() and (out / REPLACING_DIR / "run.json").exists()
    run = load_run(out)  # (completes the move)
    assert run.info["model"]["model"] == "maf" and not (out / REPLACING_DIR).exists()
    assert run.score(np.zeros((1, 3))).shape == (1,) and (out / "notes.txt").exists()


def test_signals_deferred_holds_ctrl_c_to_the_end_of_the_block():
    import os
    import signal

    from exactflow.io import signals_deferred

    done = []
    with pytest.raises(KeyboardInterrupt):
        with signals_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            done.append("the rest of the block")
    assert done == ["the rest of the block"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    seen = []  # (handlers that do not raise: each signal's runs after the block)
    previous = {sig: signal.signal(sig, lambda n, f: seen.append(n))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with signals_deferred():
            for sig in (signal.SIGINT, signal.SIGINT, signal.SIGTERM):
                os.kill(os.getpid(), sig)
            assert seen == []
        assert seen == [signal.SIGINT, signal.SIGTERM]
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def test_values_beyond_1e150_are_refused_before_the_run_folder_is_made(tmp_path):
    # (the squares overflowed: numpy warnings, a dequantize note for continuous data and
    # "Standardize needs finite std > 0", with a half-made folder left "training")
    rows = np.random.default_rng(1).normal(size=(400, 2)) * [1e160, 1.0]
    data = write_csv(tmp_path / "h.csv", rows, ["x", "y"])
    code, _, err = run_cli(["train", data, *GAUSSIAN, "--out", tmp_path / "r"])
    assert code == 1 and "column 'x' holds values up to" in err and "beyond 1e+150" in err
    assert "warning" not in err and "integers" not in err
    assert not (tmp_path / "r").exists()


def test_a_run_that_training_refuses_is_marked_failed(table, tmp_path, monkeypatch):
    import exactflow.runs.pipeline as pipeline

    def refuse(*args, **kwargs):
        raise ValueError("a setting the model cannot take")

    monkeypatch.setattr(pipeline, "fit", refuse)
    code, _, err = run_cli(["train", table, "--model", "maf", "--steps", "5", "--no-report",
                            "--out", tmp_path / "r"])
    assert code == 1 and "is marked failed" in err
    assert json.loads((tmp_path / "r" / "run.json").read_text())["status"] == "failed"


def test_a_column_named_twice_is_refused_when_training(tmp_path):
    rows = np.random.default_rng(2).normal(size=(200, 2))
    data = write_csv(tmp_path / "d.csv", rows, ["x", "x"])
    code, _, err = run_cli(["train", data, *GAUSSIAN, "--out", tmp_path / "r"])
    assert code == 1 and "the columns are named 'x' more than once" in err


def test_a_scored_file_with_a_models_column_twice_is_refused(gaussian_run, tmp_path):
    # The first copy used to be taken silently (here a column of 999s: scores of -3e5).
    rows = np.random.default_rng(3).normal(size=(20, 4))
    rows[:, 0] = 999.0
    data = write_csv(tmp_path / "s.csv", rows, ["a", "b", "c", "a"])
    code, _, err = run_cli(["score", gaussian_run, data, "-o", tmp_path / "o.csv"])
    assert code == 1 and "has 2 columns named 'a'" in err
    assert not (tmp_path / "o.csv").exists()


@pytest.mark.parametrize("argv, message", [
    (["--model", "gmm", "--steps", "10", "--lr", "5"], "--steps, --lr: --model gmm is fitted "
                                                        "in closed form"),
    (["--model", "planar", "--hidden", "8"], "--hidden: --model planar has no hidden layers"),
    (["--model", "gaussian", "--samples", "10"], "--samples is the number of points drawn "
                                                  "from a toy"),
    (["--model", "gaussian", "--seed", "-5"], "expected a seed"),
    (["--model", "gaussian", "--seed", str(10**23)], "expected a seed"),
])
def test_options_a_run_would_ignore_are_usage_errors(table, tmp_path, argv, message):
    code, _, err = run_cli(["train", table, "--no-report", "--out", tmp_path / "r", *argv])
    assert code == 2 and message in err, err
    assert not (tmp_path / "r").exists()


def test_dequantize_without_integer_columns_says_it_changes_nothing(table, tmp_path):
    code, _, err = run_cli(["train", table, *GAUSSIAN, "--dequantize", "--out", tmp_path / "r"])
    assert code == 0 and "no column holds integers only: dequantizing changes nothing" in err


def test_ctrl_c_during_the_auto_ladder_points_to_overwrite(gaussian_run, tmp_path,
                                                          monkeypatch):
    import exactflow.cli.train as cli_train

    def stopped(**kwargs):  # (the ladder was choosing when Ctrl-C came)
        Path(kwargs["out"]).mkdir()
        (Path(kwargs["out"]) / "run.json").write_text('{"status": "training"}')
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_train, "train_run", stopped)
    out = tmp_path / "auto"
    code, _, err = run_cli(["train", "moons", "--budget", "5", "--out", out])
    assert code == 130 and err.strip().endswith(
        f"interrupted: the run in {str(out)!r} did not finish; train it again with the same "
        "command and --overwrite (a model chosen by the auto ladder cannot be resumed)")


def test_ctrl_c_before_a_run_is_written_says_nothing_of_the_folders_earlier_run(tmp_path,
                                                                                monkeypatch):
    import exactflow.runs.pipeline as pipeline

    out = tmp_path / "run"
    args = ["train", "8gaussians", *GAUSSIAN, "--samples", "400", "--out", out]
    assert run_cli(args)[0] == 0
    real = pipeline.read_data

    def stopped(*a, **kw):  # (Ctrl-C while a large table is read and checked)
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "read_data", stopped)
    code, _, err = run_cli([*args, "--overwrite"])
    assert code == 130 and err.strip() == "exactflow: error: interrupted"  # (no "--resume")
    monkeypatch.setattr(pipeline, "read_data", real)
    assert json.loads((out / "run.json").read_text())["status"] == "done"


def test_an_interrupted_auto_run_is_pointed_to_overwrite_not_resume(gaussian_run, tmp_path):
    out = tmp_path / "auto"
    out.mkdir()
    info = json.loads((gaussian_run / "run.json").read_text())
    info["status"], info["options"]["model"] = "training", "auto"
    (out / "run.json").write_text(json.dumps(info))
    code, _, err = run_cli(["sample", out, "-n", "1"])
    assert code == 1 and "cannot be resumed" in err and "--overwrite" in err
    code, _, err = run_cli(["train", "t.csv", *GAUSSIAN, "--out", out])
    assert code == 1 and "already holds an interrupted run; pass --overwrite" in err
    assert "--resume" not in err


def test_the_anomaly_summary_gives_the_rate_p_values_allow(gaussian_run, table):
    # 60 held-out rows: p-values are multiples of 1/61, so q = 0.06 flags at 3/61 = 4.9%
    code, out, err = run_cli(["score", gaussian_run, table, "--threshold-quantile", "0.06",
                              "-o", table.parent / "s.csv"])
    assert code == 0, err
    assert "so about 4.9% of new normal rows are flagged (p-values are multiples of 1/61)" in out


def test_arrays_that_are_not_tables_are_named(gaussian_run, tmp_path):
    np.save(tmp_path / "zero.npy", np.float64(3.0))
    np.save(tmp_path / "cube.npy", np.zeros((150, 3, 2)))
    for name in ("zero.npy", "cube.npy"):
        code, _, err = run_cli(["score", gaussian_run, tmp_path / name])
        assert code == 1 and f"{name}: expected a 2-D array (rows, features)" in err, err


def test_columns_of_a_headerless_file_are_matched_by_position(table, tmp_path):
    # (a headerless .npy trained on columns 0, 2 was given the names x1, x3, which a
    # scored CSV with a header then had to hold)
    rows = np.loadtxt(table, delimiter=",", skiprows=1)
    np.save(tmp_path / "t.npy", rows)
    out = tmp_path / "r"
    code, _, err = run_cli(["train", tmp_path / "t.npy", "--columns", "0,2", *GAUSSIAN,
                            "--out", out])
    assert code == 0, err
    code, stdout, err = run_cli(["score", out, table])
    assert code == 0, err
    code, stdout, err = run_cli(["sample", out, "-n", "1", "--seed", "1"])
    assert code == 0 and stdout.splitlines()[0] == "x1,x2"


def test_a_resume_with_other_data_names_what_changed(table, tmp_path):
    out = tmp_path / "r"
    code, _, err = run_cli(["train", table, *GAUSSIAN, "--out", out])
    info = json.loads((out / "run.json").read_text())
    info["status"] = "training"
    info["options"]["model"] = "maf"
    (out / "run.json").write_text(json.dumps(info))
    other = write_csv(tmp_path / "other.csv", np.random.default_rng(3).normal(size=(250, 3)),
                      ["a", "b", "c"])
    code, _, err = run_cli(["train", other, *GAUSSIAN, "--out", out, "--resume"])
    assert code == 1 and "it was started with another data (" in err
    # each changed entry, before -> after (it printed the first 200 characters of the JSON)
    assert "name: \"t.csv\" -> \"other.csv\"" in err and '"total": 300' in err
    assert err.rstrip().endswith("(--resume in the command line)")


def test_a_resume_on_another_split_of_the_rows_is_refused(tmp_path):
    # A run records a digest of its split: resumed on other test rows (a changed file, or a
    # run written before repeated rows were split as now), its test rows would be trained on.
    rows = np.random.default_rng(2).normal(size=(200, 2))
    distinct = write_csv(tmp_path / "distinct.csv", rows, ["a", "b"])
    repeated = write_csv(tmp_path / "repeated.csv", np.repeat(rows[:100], 2, axis=0),
                         ["a", "b"])
    maf = ["--model", "maf", "--layers", "1", "--steps", "4", "--no-report"]
    for data, recorded, refused in ((distinct, "0123456789abcdef", True),
                                    (distinct, None, False), (repeated, None, True)):
        out = tmp_path / f"{data.stem}-{recorded}"
        code, _, err = run_cli(["train", data, *maf, "--out", out])
        assert code == 0, err
        info = json.loads((out / "run.json").read_text())
        assert len(info["data"]["split"]) == 16
        info["status"] = "training"
        if recorded is None:  # (as written before splits were recorded)
            del info["data"]["split"]
        else:
            info["data"]["split"] = recorded
        (out / "run.json").write_text(json.dumps(info))
        code, _, err = run_cli(["train", data, *maf, "--out", out, "--resume"])
        assert (code == 1 and "its test rows would no longer be held out" in err) == refused, err
        assert refused or code == 0, err


def test_notes_come_only_once_the_data_is_accepted(tmp_path):
    # (three integer rows were told to dequantize, then refused for being three)
    data = write_csv(tmp_path / "three.csv", np.array([[1.0, 2.0], [3.0, 5.0], [4.0, 4.0]]),
                     ["a", "b"])
    code, _, err = run_cli(["train", data, *GAUSSIAN, "--out", tmp_path / "r"])
    assert code == 1 and "needs at least 10" in err
    assert "note" not in err and "standardization" not in err


def test_score_reads_an_npy_file_a_block_at_a_time(gaussian_run, table, tmp_path, monkeypatch):
    # (it read the whole file, and made a copy for its NaN check: 1.9 bytes per byte)
    import exactflow.cli.tables as tables

    rows = np.loadtxt(table, delimiter=",", skiprows=1)
    np.save(tmp_path / "t.npy", rows)
    code, whole, err = run_cli(["score", gaussian_run, table])
    assert code == 0, err
    monkeypatch.setattr(tables, "CHUNK_ROWS", 7)
    code, blocks, err = run_cli(["score", gaussian_run, tmp_path / "t.npy"])
    assert code == 0, err
    assert blocks == whole and "t.npy has no column names: its 3 columns are read as" in err
    rows[[3, 250], 1] = np.nan
    np.save(tmp_path / "nan.npy", rows)
    code, _, err = run_cli(["score", gaussian_run, tmp_path / "nan.npy"])
    assert code == 1 and "NaN or inf in 2 rows (row indices 3, 250)" in err
    np.save(tmp_path / "wide.npy", np.c_[rows[:, :1], np.ones(300), rows[:, 1:]])
    code, _, err = run_cli(["score", gaussian_run, tmp_path / "wide.npy"])
    assert code == 1 and "has 4 columns but the model" in err


def test_score_skips_rows_with_a_missing_value_when_asked(gaussian_run, tmp_path):
    data = tmp_path / "holes.csv"
    rows = np.random.default_rng(4).normal(size=(6, 3))
    lines = ["a,b,c"] + [",".join(f"{v:.6f}" for v in r) for r in rows]
    lines[2] = lines[2].replace(lines[2].split(",")[1], "NA")  # row 1
    lines[5] = ",".join(["", *lines[5].split(",")[1:]])  # row 4: an empty cell
    data.write_text("\n".join(lines) + "\n")
    code, _, err = run_cli(["score", gaussian_run, data, "-o", tmp_path / "o.csv"])
    assert code == 1 and "'NA' at line 3, column 2 ('b') (a missing value)" in err
    assert "--missing skip" in err
    out = tmp_path / "s.csv"
    code, said, err = run_cli(["score", gaussian_run, data, "--missing", "skip",
                               "--threshold-quantile", "0.1", "-o", out])
    assert code == 0, err
    assert "scored 4 of 6 rows" in said and "rows 1, 4, from 0" in said
    assert "log_density, p_value, anomaly are NaN there" in said
    code, said, err = run_cli(["score", gaussian_run, data, "--missing", "skip", "-o",
                               tmp_path / "plain.csv"])
    assert "log_density, p_value are NaN there" in said  # (no anomaly column)
    table = np.genfromtxt(out, delimiter=",", names=True)
    assert np.isnan(table["log_density"][[1, 4]]).all()
    assert np.isnan(table["anomaly"][[1, 4]]).all() and np.isnan(table["p_value"][[1, 4]]).all()
    kept = [0, 2, 3, 5]
    code, text, _ = run_cli(["score", gaussian_run, data, "--missing", "skip", "--json"])
    result = json.loads(text)
    assert result["unscored_rows"] == 2
    assert [result["log_density"][i] is None for i in range(6)] == [
        i not in kept for i in range(6)]
    # The other rows score as they do alone.
    alone = tmp_path / "alone.csv"
    alone.write_text("\n".join([lines[0]] + [lines[1 + i] for i in kept]) + "\n")
    code, text, _ = run_cli(["score", gaussian_run, alone, "--json"])
    np.testing.assert_allclose([result["log_density"][i] for i in kept],
                               json.loads(text)["log_density"], rtol=1e-12)


def test_score_of_rows_all_missing_is_an_error_and_nan_rows_point_to_skip(gaussian_run,
                                                                         tmp_path):
    data = tmp_path / "empty.csv"
    data.write_text("a,b,c\nNA,1,2\n3,,4\n")
    code, _, err = run_cli(["score", gaussian_run, data, "--missing", "skip"])
    assert code == 1 and "every row of empty.csv has a missing value: none to score" in err
    rows = np.random.default_rng(5).normal(size=(4, 3))
    rows[2, 1] = np.nan
    np.save(tmp_path / "r.npy", rows)
    code, _, err = run_cli(["score", gaussian_run, tmp_path / "r.npy"])
    assert code == 1 and "NaN or inf in 1 row (row indices 2)" in err
    assert "--missing skip scores the other rows" in err


def test_score_keeps_columns_of_the_data_beside_the_scores(gaussian_run, tmp_path):
    """``--keep id`` copies each row's cells, as text, into the output: the rows can be
    joined back to the file by ID, whatever the rows between them."""
    rows = np.random.default_rng(3).normal(size=(4, 3))
    lines = ["id,a,b,c,when"] + [
        f"{name},{r[0]:.6f},{r[1]:.6f},{r[2]:.6f},2026-0{i + 1}-01"
        for i, (name, r) in enumerate(zip(["u1", '"u,2"', "u3", "u4"], rows, strict=True))]
    data = tmp_path / "new.csv"
    data.write_text("\n".join(lines[:2] + ["# a note", ""] + lines[2:]) + "\n")
    code, text, _ = run_cli(["score", gaussian_run, data, "--json"])
    plain = json.loads(text)["log_density"]
    out = tmp_path / "s.csv"
    code, _, err = run_cli(["score", gaussian_run, data, "--keep", "id,when",
                            "--threshold-quantile", "0.1", "-o", out])
    assert code == 0, err
    written = out.read_text().splitlines()
    assert written[0] == "row,id,when,log_density,p_value,anomaly"
    assert written[2].startswith('1,"u,2",2026-02-01,')
    import csv

    table = list(csv.DictReader(out.open()))
    assert [r["id"] for r in table] == ["u1", "u,2", "u3", "u4"]
    np.testing.assert_allclose([float(r["log_density"]) for r in table], plain, rtol=1e-9)
    code, text, _ = run_cli(["score", gaussian_run, data, "--keep", "0", "--json"])
    assert json.loads(text)["kept"] == {"id": ["u1", "u,2", "u3", "u4"]}
    code, text, _ = run_cli(["score", gaussian_run, data, "--keep", "id"])
    assert code == 0 and text.splitlines()[1].startswith("0,u1,")
    tsv = tmp_path / "s.tsv"
    code, _, _ = run_cli(["score", gaussian_run, data, "--keep", "id", "-o", tsv])
    assert tsv.read_text().splitlines()[2].split("\t")[:2] == ["1", "u,2"]


@pytest.mark.parametrize("argv, message", [
    (["--keep", "id", "-o", "{tmp}/s.npy"], "a .npy file of numbers cannot hold"),
    (["--keep", "nope"], "no column named 'nope'"),
])
def test_score_keep_refusals_name_the_problem(gaussian_run, table, tmp_path, argv, message):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    data = tmp_path / "new.csv"
    data.write_text("id,a,b,c\nx,1,2,3\n")
    code, _, err = run_cli(["score", gaussian_run, data, *argv])
    assert code != 0 and message in err
    np.save(tmp_path / "r.npy", np.zeros((2, 3)))
    code, _, err = run_cli(["score", gaussian_run, tmp_path / "r.npy", "--keep", "0"])
    assert code != 0 and "--keep copies columns of a text table" in err


def test_a_run_without_names_says_it_reads_a_named_file_by_position(tmp_path):
    # A model trained on a headerless file scored a file with a header, columns in another
    # order, by position without a word: 999 of 1,000 rows flagged, exit 0,
    # "columns_by_position": false.
    rows = np.random.default_rng(5).normal(size=(200, 3)) * [1.0, 10.0, 100.0]
    plain = write_csv(tmp_path / "plain.csv", rows)
    code, _, err = run_cli(["train", plain, *GAUSSIAN, "--out", tmp_path / "run"])
    assert code == 0, err
    named = write_csv(tmp_path / "named.csv", rows[:5][:, [2, 0, 1]], ["c", "a", "b"])
    code, text, err = run_cli(["score", tmp_path / "run", named, "--json"])
    assert code == 0 and json.loads(text)["columns_by_position"]
    assert "has no column names (its training data had no header): the columns of " \
           "named.csv are read by position, its header (c, a, b) is not used" in err
    code, text, err = run_cli(["score", tmp_path / "run", plain, "--json"])
    assert not json.loads(text)["columns_by_position"] and "by position" not in err


def test_a_file_without_names_is_scored_by_position_against_a_run_of_named_columns(tmp_path):
    # A run of named columns (--columns picked them from a wider CSV) asked a .npy or a
    # headerless CSV for them by name: "column 'c' asked by name, but the file has no
    # header row", for columns the user never named.
    rng = np.random.default_rng(4)
    rows = rng.normal(size=(200, 4))
    data = write_csv(tmp_path / "wide.csv", rows, ["a", "b", "c", "d"])
    code, _, err = run_cli(["train", data, "--columns", "c,a,b", *GAUSSIAN, "--out",
                            tmp_path / "run"])
    assert code == 0, err
    np.save(tmp_path / "cab.npy", rows[:5][:, [2, 0, 1]])
    code, text, _ = run_cli(["score", tmp_path / "run", data, "--json"])
    named = json.loads(text)["log_density"][:5]
    code, text, err = run_cli(["score", tmp_path / "run", tmp_path / "cab.npy", "--json"])
    assert code == 0, err
    np.testing.assert_allclose(json.loads(text)["log_density"], named, rtol=1e-12)
    code, _, err = run_cli(["score", tmp_path / "run", tmp_path / "cab.npy"])
    assert "its 3 columns are read as the model's c, a, b, in this order" in err
    code, text, err = run_cli(["score", tmp_path / "run", tmp_path / "cab.npy", "--json"])
    assert json.loads(text)["columns_by_position"] and "read as the model's" in err
    code, text, err = run_cli(["score", tmp_path / "run", data, "--json"])
    assert not json.loads(text)["columns_by_position"] and "read as" not in err
    np.save(tmp_path / "four.npy", rows[:5])
    code, _, err = run_cli(["score", tmp_path / "run", tmp_path / "four.npy"])
    assert code == 1 and "four.npy has 4 columns but the model" in err
    code, _, err = run_cli(["score", tmp_path / "run", "moons"])
    assert code == 1 and "has 2 columns but the model" in err


def test_score_keep_names_a_column_given_twice(gaussian_run, tmp_path):
    data = tmp_path / "new.csv"
    data.write_text("id,a,b,c\nx,1,2,3\n")
    for twice in ("id,id", "id,0"):
        code, _, err = run_cli(["score", gaussian_run, data, "--keep", twice])
        assert code == 2 and "--keep names a column more than once" in err


def test_train_drop_uses_every_column_but_the_named_ones(tmp_path):
    # An ID column meant listing every other column in --columns.
    rng = np.random.default_rng(6)
    rows = rng.normal(size=(200, 3))
    lines = ["id,a,b,c"] + [f"r{i},{r[0]:.6f},{r[1]:.6f},{r[2]:.6f}" for i, r in enumerate(rows)]
    data = tmp_path / "t.csv"
    data.write_text("\n".join(lines) + "\n")
    code, _, err = run_cli(["train", data, "--drop", "id", *GAUSSIAN, "--out", tmp_path / "r"])
    assert code == 0, err
    info = json.loads((tmp_path / "r" / "run.json").read_text())
    assert info["data"]["column_names"] == ["a", "b", "c"]
    np.save(tmp_path / "t.npy", rows)
    code, _, err = run_cli(["train", tmp_path / "t.npy", "--drop", "-1", *GAUSSIAN, "--out",
                            tmp_path / "n"])
    assert code == 0, err
    assert json.loads((tmp_path / "n" / "run.json").read_text())["data"]["columns"] == [0, 1]
    for argv, status, message in (
        (["--drop", "zz"], 1, "has no column named 'zz'; its columns are ['id', 'a', 'b', 'c']"),
        (["--drop", "9"], 1, "column index 9 is out of range for 4 columns"),
        (["--drop", "id,a,b,c"], 2, "--drop leaves no column to train on"),
        (["--drop", "id", "--columns", "a,b"], 2, "--columns and --drop both choose"),
        (["--drop", "id,0"], 2, "--drop names a column more than once"),
    ):
        code, _, err = run_cli(["train", data, *argv, *GAUSSIAN, "--out", tmp_path / "x"])
        assert code == status and message in err, (argv, err)
    code, _, err = run_cli(["train", "moons", "--drop", "0", *GAUSSIAN, "--out", tmp_path / "y"])
    assert code == 1 and "--drop needs a table file (.csv, .tsv, .txt or .npy)" in err
    # A text table without a header drops by position (it was refused: "needs a header").
    bare = tmp_path / "bare.csv"
    np.savetxt(bare, rows, delimiter=",")
    code, _, err = run_cli(["train", bare, "--drop", "0", *GAUSSIAN, "--out", tmp_path / "b"])
    assert code == 0, err
    assert json.loads((tmp_path / "b" / "run.json").read_text())["data"]["columns"] == [1, 2]


def test_columns_picked_by_position_are_named_by_their_place_in_the_file(tmp_path):
    # (after --drop 0,1 on a .npy file, an error named positions among the kept columns:
    # "columns 2, 4", where the file's were 4 and 6, so dropping them dropped others)
    rng = np.random.default_rng(7)
    rows = rng.normal(size=(300, 8))
    rows[:, 0] = 1.0
    rows[:, 6] = rows[:, 4]
    np.save(tmp_path / "d.npy", rows)
    for picked in (["--drop", "0,1"], ["--columns", "2,3,4,5,6"]):
        code, _, err = run_cli(["train", tmp_path / "d.npy", *picked, *GAUSSIAN, "--out",
                                tmp_path / "r"])
        assert code == 1 and "d.npy: columns 4, 6 (column indices in the file) are " \
            "linearly dependent" in err, (picked, err)
    code, _, err = run_cli(["train", tmp_path / "d.npy", *GAUSSIAN, "--out", tmp_path / "r"])
    assert code == 1 and "constant (zero-variance) column 0 (column indices):" in err, err
