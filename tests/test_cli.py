"""The ``exactflow`` command end to end, in-process (``main(argv) -> int``) on tiny runs.

Each command: the files it writes, what it prints, its exit code and its ``--json`` output;
and bad input to each: missing files, wrong column counts, NaN rows, unknown models, run
folders with a deleted or corrupted file. Errors are one line, exit 1 (2 for usage), and
leave no partial output file.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

import exactflow as ef
from exactflow.cli import main
from exactflow.diagnostics import flatten_layers
from exactflow.runs import load_run

TINY = ["--model", "maf", "--layers", "2", "--hidden", "16", "--steps", "30",
        "--batch-size", "128", "--no-report"]


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines, "no error message"
    assert lines[-1].startswith("exactflow: error: ") or "error:" in lines[-1]
    assert "Traceback" not in err
    return lines[-1]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "run"
    code, stdout, stderr = run_cli(["train", "moons", *TINY, "--samples", "600", "--out", out])
    assert code == 0, stderr
    return out


def interrupt_training_after(monkeypatch: pytest.MonkeyPatch, steps: int) -> Callable[[], None]:
    """Make the run pipeline's training stop with Ctrl-C once ``steps`` are done (as a user
    interrupting it); returns the function that puts the real training back."""
    import exactflow.runs.pipeline as train_module

    real_fit = train_module.fit

    def interrupted_fit(*a, **kw):
        def stop(history):
            if history.steps[-1] >= steps:
                raise KeyboardInterrupt
        return real_fit(*a, **kw, callback=stop)

    monkeypatch.setattr(train_module, "fit", interrupted_fit)
    return lambda: monkeypatch.setattr(train_module, "fit", real_fit)


def test_the_summary_comes_before_the_report_and_an_interrupted_report_says_so(
    tmp_path, monkeypatch
):
    # (the summary came after the report: Ctrl-C there lost it, and said "interrupted" of
    # a finished run)
    import exactflow.cli.train as cli_train

    def stopped(path):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_train, "build_report", stopped)
    out = tmp_path / "run"
    code, text, err = run_cli(["train", "moons", *TINY[:-1], "--out", out])
    assert code == 130 and "test NLL" in text and f"run folder: {out}" in text
    assert one_error_line(err) == (
        f"exactflow: error: interrupted: the run in {str(out)!r} is complete, its report is "
        f"not: write it with `exactflow report {out}`")
    assert json.loads((out / "run.json").read_text())["status"] == "done"

    def full(path):  # (a full disk said "no space left", not that the model was saved)
        raise OSError(28, "no space left on the device", f"{path}/report/a.png")

    monkeypatch.setattr(cli_train, "build_report", full)
    code, text, err = run_cli(["train", "moons", *TINY[:-1], "--out", out, "--overwrite"])
    assert code == 1 and one_error_line(err).endswith(
        f"/report/a.png'; the run in {str(out)!r} is complete, its report is not: write it "
        f"with `exactflow report {out}`")
    assert json.loads((out / "run.json").read_text())["status"] == "done"


def test_train_without_matplotlib_keeps_the_run_and_says_how_to_get_its_report(
    tmp_path, monkeypatch
):
    # (it trained in full, then exited 1 at the report: an install without the [plot] extra)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    out = tmp_path / "run"
    code, text, err = run_cli(["train", "moons", *TINY[:-1], "--out", out])
    assert code == 0, err
    assert "test NLL" in text and "Traceback" not in err
    assert (f"note: no report: it needs matplotlib (pip install 'exactflow[plot]', then "
            f"`exactflow report {out}`; --no-report skips it)") in err
    assert json.loads((out / "run.json").read_text())["status"] == "done"
    assert not (out / "report").exists()
    code, text, _ = run_cli(["train", "moons", *TINY[:-1], "--out", out, "--overwrite",
                             "--json"])
    assert code == 0 and "no report: it needs matplotlib" in json.loads(text)["notes"][-1]
    code, _, err = run_cli(["report", out])  # (the report command itself still refuses)
    assert code == 1 and one_error_line(err).endswith("pip install 'exactflow[plot]'")


def test_test_rows_that_dominate_the_test_nll_are_said_with_the_nll_of_the_others(tmp_path):
    # (one heavy-tailed row made a test NLL of 17.09 +- 2.46 where the others gave 14.6)
    rng = np.random.default_rng(1)
    x = np.c_[rng.normal(size=(5000, 2)), rng.standard_t(3, size=5000) * 2 + 10]
    x[::500, 2] = 400.0
    np.save(tmp_path / "heavy.npy", x)
    code, text, err = run_cli(["train", tmp_path / "heavy.npy", "--model", "gaussian",
                               "--out", tmp_path / "run", "--no-report", "--seed", "3"])
    assert code == 0, err
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    far = info["metrics"]["test_dominant_rows"]
    assert far["rows"] == 2 and far["of"] == 500
    assert far["nll_of_the_others"] < info["metrics"]["test"]["nll"] - 0.5
    assert (f"2 of the test rows score more than 50 nats below the median row and dominate "
            f"the mean: over the other rows the test NLL is {far['nll_of_the_others']:.4f}"
            ) in text
    np.save(tmp_path / "plain.npy", rng.normal(size=(5000, 3)))  # (nothing to say there)
    code, text, err = run_cli(["train", tmp_path / "plain.npy", "--model", "gaussian",
                               "--out", tmp_path / "plain", "--no-report", "--seed", "3"])
    assert code == 0 and "over the other rows" not in text


def test_a_large_table_says_it_is_being_checked_before_the_silence(tmp_path):
    np.save(tmp_path / "big.npy", np.random.default_rng(2).normal(size=(100_000, 2)))
    code, _, err = run_cli(["train", tmp_path / "big.npy", "--model", "gaussian", "--out",
                            tmp_path / "run", "--no-report"])
    assert code == 0 and err.startswith(
        "read 100,000 rows of 2 columns; checking and splitting them\n")


def write_csv(path: Path, data: np.ndarray, header: list[str] | None = None) -> Path:
    text = io.StringIO()
    np.savetxt(text, data, delimiter=",", header=",".join(header) if header else "",
               comments="")
    path.write_text(text.getvalue().lstrip("\n"))
    return path


# -- help and usage ---------------------------------------------------------------------


def test_help_of_every_command_has_examples():
    code, out, _ = run_cli(["--help"])
    assert code == 0 and "examples:" in out
    for command in ("demo", "train", "sample", "score", "check", "report"):
        code, out, _ = run_cli([command, "--help"])
        assert code == 0, command
        assert "examples:" in out and f"exactflow {command}" in out and "--json" in out


def test_python_dash_m_help_in_a_subprocess():
    proc = subprocess.run([sys.executable, "-m", "exactflow", "--help"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0
    assert "usage: exactflow" in proc.stdout and "train" in proc.stdout


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["nonsense"],
        ["train", "moons", "--model", "nope", "--out", "x"],
        ["train", "moons", "--layers", "3"],  # sizes without a model: not with auto
        ["train", "moons", "--model", "maf", "--out", "x", "--steps", "5", "--epochs", "2"],
        ["train", "moons", "--model", "maf", "--out", "x", "--hidden", "64,zero"],
        ["train", "moons", "--model", "maf", "--out", "x", "--val-fraction", "1.5"],
        ["sample", "somewhere"],  # no -n
        ["sample", "somewhere", "-n", "0"],
        ["score", "somewhere", "data.csv", "--threshold-quantile", "1"],
        ["check"],  # neither RUN_DIR nor --model
        ["check", "--model", "nope"],
    ],
)
def test_usage_errors_exit_2(argv, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(argv)
    assert code == 2, (argv, out, err)
    assert "Traceback" not in err
    assert not (tmp_path / "x").exists()


def test_an_option_a_command_does_not_know_is_said_with_that_commands_usage():
    # argparse said it with the top-level usage (exactflow [-h] [--version] COMMAND ...).
    code, _, err = run_cli(["train", "moons", "--bogus"])
    assert code == 2 and err.startswith("usage: exactflow train ") and \
        "exactflow train: error: unrecognized arguments: --bogus" in err, err
    code, _, err = run_cli(["score", "r", "d.csv", "--thresold-quantile", "0.1"])
    assert code == 2 and "exactflow score: error: unrecognized arguments" in err, err
    code, _, err = run_cli(["--bogus", "train", "moons"])  # (before the command: its own)
    assert code == 2 and "exactflow: error: unrecognized arguments: --bogus" in err, err


def test_a_number_that_is_also_a_column_name_says_which_column_it_picks(tmp_path):
    # pandas' to_csv() heads its columns ",0,1,2": --drop 1 took the column named '0', with
    # nothing said.
    x = np.random.default_rng(4).normal(size=(200, 3))
    csv = write_csv(tmp_path / "pd.csv", np.c_[np.arange(200), x], ["", "0", "1", "2"])
    code, _, err = run_cli(["train", csv, "--drop", "0", "--model", "gaussian", "--out",
                            tmp_path / "r", "--no-report"])
    assert code == 0 and "note: --drop 0 is position 0 (numbers are positions, from 0), the " \
        "column named ''; the column named '0' is position 1" in err, err
    info = json.loads((tmp_path / "r" / "run.json").read_text())
    assert info["data"]["column_names"] == ["0", "1", "2"]  # (the index left out)
    code, _, err = run_cli(["score", tmp_path / "r", csv, "--columns", "1,2,3", "--json"])
    assert code == 0 and "--columns 1 is position 1" in err and "--columns 3" not in err, err
    plain = write_csv(tmp_path / "ab.csv", x, ["a", "b", "c"])
    code, _, err = run_cli(["train", plain, "--drop", "1", "--model", "gaussian", "--out",
                            tmp_path / "s", "--no-report"])
    assert code == 0 and "is position" not in err, err


# -- train ------------------------------------------------------------------------------


def test_train_missing_skip_leaves_out_the_rows_with_a_missing_value(tmp_path):
    # A warehouse export with a few empty cells stopped at the first, one run per fix.
    x = np.random.default_rng(8).normal(size=(300, 3)).round(4)
    lines = [",".join(map(str, row)) for row in x]
    lines[5] = lines[5].split(",")[0] + ",,1.0"
    lines[17] = "NA," + lines[17].split(",", 1)[1]
    csv = tmp_path / "m.csv"
    csv.write_text("a,b,c\n" + "\n".join(lines) + "\n")
    code, _, err = run_cli(["train", csv, "--model", "gaussian", "--out", tmp_path / "r",
                            "--no-report"])
    assert code == 1 and "train --missing skip" in err, err
    code, _, err = run_cli(["train", csv, "--model", "gaussian", "--out", tmp_path / "r",
                            "--no-report", "--missing", "skip"])
    assert code == 0 and "note: 2 of the 300 rows of m.csv have a missing value and are " \
        "left out (rows 5, 17, counting data rows from 0)" in err, err
    data = json.loads((tmp_path / "r" / "run.json").read_text())["data"]
    assert data["rows"]["total"] == 298 and data["missing_rows"] == 2
    with np.load(tmp_path / "r" / "data.npz") as npz:
        kept = np.concatenate([npz["train"], npz["val"], npz["test"]])
    expected = np.delete(x, [5, 17], axis=0)
    assert sorted(map(tuple, kept)) == sorted(map(tuple, expected))


def test_train_writes_the_run_folder(run_dir):
    for name in ("run.json", "model.safetensors", "data.npz", "history.json"):
        assert (run_dir / name).is_file(), name
    assert not (run_dir / "checkpoint.pt").exists()
    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "done" and info["model"]["model"] == "maf"
    assert info["data"]["source"] == "toy" and info["data"]["rows"]["total"] == 600
    assert info["data"]["entropy"] == ef.datasets.TOY_ENTROPY["moons"]
    # The saved model reproduces the test NLL of run.json on the saved test split, and the
    # standardization is part of it (so ef.load gives densities in data units).
    flow = ef.load(run_dir / "model.safetensors")
    assert flow.config["standardize"] is True
    assert type(flatten_layers(flow.transform)[0]).__name__ == "Standardize"
    with np.load(run_dir / "data.npz") as npz:
        test = npz["test"]
        assert len(npz["train"]) + len(npz["val"]) + len(test) == 600
    with torch.no_grad():
        nll = -flow.log_prob(torch.as_tensor(test, dtype=torch.float32)).double().mean().item()
    assert nll == pytest.approx(info["metrics"]["test"]["nll"], abs=1e-4)
    hist = json.loads((run_dir / "history.json").read_text())
    assert hist["steps"][-1] == 30 and len(hist["train_nll"]) == len(hist["steps"])


def test_train_json_output_and_text(tmp_path):
    code, out, err = run_cli(["train", "circles", *TINY, "--samples", "300", "--out",
                              tmp_path / "r", "--json"])
    assert code == 0, err
    result = json.loads(out)
    assert result["ok"] and result["model"] == "maf" and result["data"] == "circles"
    assert math.isfinite(result["metrics"]["test"]["nll"])
    expected = result["metrics"]["test"]["nll"] - ef.datasets.TOY_ENTROPY["circles"]
    assert result["metrics"]["test_nll_minus_entropy"] == pytest.approx(expected)

    code, out, err = run_cli(["train", "circles", *TINY, "--samples", "300", "--out",
                              tmp_path / "r2"])
    assert code == 0, err
    assert "test NLL" in out and "true entropy" in out and "run folder:" in out


def test_train_standardizes_into_data_units(tmp_path):
    # Gaussian data with scales 1000 and 0.001: after a few steps the flow is close to the
    # standardizing map, so its NLL must be close to the Gaussian's entropy in data units
    # (about 4.3 nats less than it would be in standardized units... plus log 1000 * 0.001).
    rng = np.random.default_rng(0)
    scale = np.array([1000.0, 0.001, 5.0])
    data = rng.normal(size=(2000, 3)) * scale + np.array([5e4, -2.0, 0.0])
    csv = write_csv(tmp_path / "gauss.csv", data, ["a", "b", "c"])
    code, out, err = run_cli(["train", csv, *TINY, "--lr", "1e-4", "--out", tmp_path / "r",
                              "--json"])
    assert code == 0, err
    nll = json.loads(out)["metrics"]["test"]["nll"]
    entropy = 0.5 * 3 * math.log(2 * math.pi * math.e) + float(np.log(scale).sum())
    assert nll == pytest.approx(entropy, abs=0.15)
    info = json.loads((tmp_path / "r" / "run.json").read_text())
    assert info["data"]["column_names"] == ["a", "b", "c"]
    assert json.loads(out)["notes"] == [] and err == ""  # (--json: only notes on stderr)
    # --json kept the notes on the data to itself: in the JSON, and on stderr
    data[:, 2] = np.round(data[:, 2])
    csv = write_csv(tmp_path / "ints.csv", data, ["a", "b", "c"])
    code, out, err = run_cli(["train", csv, "--model", "gaussian", "--out", tmp_path / "i",
                              "--json", "--no-report"])
    notes = json.loads(out)["notes"]
    assert len(notes) == 1 and notes[0].startswith("column 'c' holds integers only")
    assert err == f"note: {notes[0]}\n"


def test_train_pools_the_scale_of_pixels_and_takes_the_scale_asked_for(tmp_path):
    rng = np.random.default_rng(2)
    pixels = rng.integers(0, 17, size=(400, 4)).astype(float)
    pixels[:, 0] = np.where(rng.random(400) < 0.05, 16.0, 0.0)
    csv = write_csv(tmp_path / "px.csv", pixels, ["p0", "p1", "p2", "p3"])
    for flag, asked, expected in (([], "auto", "pooled"),
                                  (["--standardize", "columns"], "columns", True),
                                  (["--no-standardize"], False, False)):
        out_dir = tmp_path / f"r{len(flag)}{expected}"
        code, out, err = run_cli(["train", csv, *TINY, "--dequantize", *flag, "--out", out_dir])
        assert code == 0, err
        info = json.loads((out_dir / "run.json").read_text())
        # What was asked for, and what the model got.
        assert info["options"]["standardize"] == asked
        assert info["model"]["standardize"] == expected
        assert ("for all columns (pooled)" in out + err) == (expected == "pooled")
        code, out, err = run_cli(["train", csv, *TINY, "--dequantize", *flag, "--out", out_dir,
                                  "--overwrite", "--json"])
        assert code == 0 and json.loads(out)["standardize"] == expected, err
    code, _, err = run_cli(["train", csv, *TINY, "--standardize", "rows", "--out",
                            tmp_path / "bad"])
    assert code == 2 and "--standardize" in err
    code, _, err = run_cli(["train", csv, *TINY, "--standardize", "pooled", "--no-standardize",
                            "--out", tmp_path / "both"])
    assert code == 2 and "not allowed with" in err


def test_loading_a_dequantized_run_warns_that_raw_rows_score_otherwise(tmp_path):
    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 17, size=(300, 3)).astype(float)
    csv = write_csv(tmp_path / "px.csv", pixels, ["p0", "p1", "p2"])
    code, _, err = run_cli(["train", csv, *TINY, "--dequantize", "--out", tmp_path / "r"])
    assert code == 0, err
    with pytest.warns(UserWarning, match=r"dequantized its integer-valued columns \[0, 1, 2\]"
                                         r".*load_run\(run_dir\).score"):
        flow = ef.load(tmp_path / "r")
    run = load_run(tmp_path / "r")  # scores as the CLI does, without a warning
    rows = pixels[:5]
    raw = flow.log_prob(torch.as_tensor(rows)).detach().numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not np.allclose(run.score(rows), raw)
    # Rows dequantized already (the run's own data.npz) would get noise twice: said so.
    with pytest.warns(UserWarning, match=r"trained on the integer columns \['p0', 'p1', "
                                         r"'p2'\].*score the raw integer rows") as caught:
        run.score(rows + 0.5)
    assert {w.filename for w in caught} == {__file__}
    # A run without dequantized columns, and a model file, load silently.
    code, _, err = run_cli(["train", csv, *TINY, "--out", tmp_path / "plain"])
    assert code == 0, err
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ef.load(tmp_path / "plain")
        ef.load(tmp_path / "r" / "model.safetensors")


def test_train_refuses_repeated_or_linearly_dependent_columns(tmp_path):
    x = np.random.default_rng(4).normal(size=(200, 3))
    csv = write_csv(tmp_path / "dup.csv", np.c_[x, x[:, 0] + x[:, 2]], ["a", "b", "c", "d"])
    code, _, err = run_cli(["train", csv, *TINY, "--out", tmp_path / "r"])
    assert code == 1 and "columns 'a', 'c', 'd' are linearly dependent" in err, err
    code, _, err = run_cli(["train", csv, *TINY, "--columns", "a,b,a", "--out", tmp_path / "r"])
    assert code == 1 and "columns ['a'] asked for more than once" in err, err
    assert not (tmp_path / "r").exists()
    code, _, err = run_cli(["train", csv, *TINY, "--columns", "a,b,c", "--out", tmp_path / "r"])
    assert code == 0, err


def test_train_notes_a_column_of_row_numbers(tmp_path):
    x = np.random.default_rng(5).normal(size=(200, 2))
    # As pandas writes a table with its index: an unnamed first column 0, 1, 2, ...
    csv = write_csv(tmp_path / "indexed.csv", np.c_[np.arange(200), x], ["", "a", "b"])
    code, _, err = run_cli(["train", csv, *TINY, "--out", tmp_path / "r"])
    assert code == 0, err
    assert "column '' holds a different whole number on nearly every row" in err
    assert "--columns" in err
    code, _, err = run_cli(["train", csv, *TINY, "--columns", "a,b", "--out", tmp_path / "s"])
    assert code == 0 and "row numbers" not in err, err
    # IDs that start anywhere, or come in no order, are noted too (new IDs scored as
    # anomalies for being new); a column of small counts is not.
    ids = np.random.default_rng(6).permutation(np.arange(5000, 5200))
    counts = np.random.default_rng(7).integers(0, 5, size=200)
    csv = write_csv(tmp_path / "ids.csv", np.c_[ids, counts, x], ["id", "n", "a", "b"])
    code, _, err = run_cli(["train", csv, *TINY, "--out", tmp_path / "t"])
    assert code == 0 and "column 'id' holds a different whole number" in err, err
    assert "'n' holds" not in err


def test_a_run_begun_per_column_resumes_under_auto(tmp_path, monkeypatch):
    # Runs begun before standardize="auto" scaled every table per column; resuming one on
    # image-like data keeps that scaling instead of refusing a "different model".
    rng = np.random.default_rng(2)
    pixels = rng.integers(0, 17, size=(400, 4)).astype(float)
    pixels[:, 0] = np.where(rng.random(400) < 0.05, 16.0, 0.0)
    csv = write_csv(tmp_path / "px.csv", pixels, ["p0", "p1", "p2", "p3"])
    args = ["train", csv, *TINY, "--dequantize", "--out", tmp_path / "r"]
    resume_normally = interrupt_training_after(monkeypatch, 10)
    code, _, err = run_cli([*args, "--standardize", "columns"])
    assert code == 130, err
    resume_normally()
    code, _, err = run_cli([*args, "--resume"])
    assert code == 0, err
    assert json.loads((tmp_path / "r" / "run.json").read_text())["model"]["standardize"] is True


def test_train_columns_by_name_and_epochs(tmp_path):
    rng = np.random.default_rng(1)
    csv = write_csv(tmp_path / "d.csv", rng.normal(size=(300, 3)), ["x", "y", "z"])
    out_dir = tmp_path / "r"
    code, _, err = run_cli(["train", csv, "--model", "maf", "--layers", "1", "--hidden", "8",
                            "--epochs", "2", "--batch-size", "64", "--columns", "z,x",
                            "--no-report", "--out", out_dir])
    assert code == 0, err
    info = json.loads((out_dir / "run.json").read_text())
    assert info["data"]["features"] == 2 and info["data"]["column_names"] == ["z", "x"]
    assert info["metrics"]["steps"] == 2 * (info["data"]["rows"]["train"] // 64)
    code, out, _ = run_cli(["sample", out_dir, "-n", "3", "--seed", "0"])
    assert code == 0 and out.splitlines()[0] == "z,x" and len(out.splitlines()) == 4


def test_train_refuses_to_replace_a_run_without_overwrite(run_dir, tmp_path):
    before = (run_dir / "model.safetensors").read_bytes()
    code, _, err = run_cli(["train", "moons", *TINY, "--out", run_dir])
    assert code == 1 and "--overwrite" in one_error_line(err)
    assert (run_dir / "model.safetensors").read_bytes() == before
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    code, _, err = run_cli(["train", "moons", *TINY, "--out", tmp_path / "notes"])
    assert code == 1 and "not empty" in one_error_line(err)


def test_train_resume_continues_an_interrupted_run(tmp_path, monkeypatch):
    args = ["train", "moons", "--model", "maf", "--layers", "2", "--hidden", "8", "--steps",
            "40", "--batch-size", "64", "--samples", "400", "--no-report"]
    code, _, err = run_cli([*args, "--out", tmp_path / "whole"])
    assert code == 0, err

    resume_normally = interrupt_training_after(monkeypatch, 20)
    code, _, err = run_cli([*args, "--out", tmp_path / "cut"])
    assert code == 130 and one_error_line(err) == (
        f"exactflow: error: interrupted: the run in {str(tmp_path / 'cut')!r} did not "
        f"finish; continue it with the same command and --out {str(tmp_path / 'cut')!r} "
        "--resume (or keep the best step it reached: --resume --steps 1, which trains no step "
        "and writes the model)")
    info = json.loads((tmp_path / "cut" / "run.json").read_text())
    assert info["status"] == "training" and (tmp_path / "cut" / "checkpoint.pt").is_file()
    assert not (tmp_path / "cut" / "model.safetensors").exists()
    code, _, err = run_cli(["sample", tmp_path / "cut", "-n", "2"])
    assert code == 1 and "did not finish" in one_error_line(err)
    code, _, err = run_cli([*args, "--out", tmp_path / "cut"])  # no --resume
    assert code == 1 and "--resume" in one_error_line(err)

    resume_normally()
    shutil.copytree(tmp_path / "cut", tmp_path / "kept")  # (the best step so far, as it is)
    code, out, err = run_cli([*["1" if a == "40" else a for a in args], "--out",
                              tmp_path / "kept", "--resume"])
    assert code == 0 and "kept the weights of step" in out, err
    code, _, err = run_cli(["sample", tmp_path / "kept", "-n", "2"])
    assert code == 0, err
    code, _, err = run_cli([*args, "--out", tmp_path / "cut", "--resume"])
    assert code == 0, err
    whole = json.loads((tmp_path / "whole" / "run.json").read_text())["metrics"]["test"]
    resumed = json.loads((tmp_path / "cut" / "run.json").read_text())["metrics"]["test"]
    assert resumed["nll"] == pytest.approx(whole["nll"], abs=1e-5)
    assert not (tmp_path / "cut" / "checkpoint.pt").exists()
    code, _, err = run_cli([*args, "--out", tmp_path / "cut", "--resume"])
    assert code == 1 and "nothing to resume" in one_error_line(err)


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "neither a built-in dataset"),
        ("a,b\n1,2\n3,nan\n" + "".join(f"{i},{i * i % 7}\n" for i in range(40)),
         "'nan' at line 3, column 2 ('b') (a missing value)"),
        ("a,b\n1,2\n3,hello\n" + "".join(f"{i},{i * i % 7}\n" for i in range(40)), "hello"),
        # an inf cell is named by its line in the file, not by its index among the rows
        ("a,b\n\n1,2\n3,inf\n" + "".join(f"{i},{i * i % 7}\n" for i in range(40)),
         "'inf' at line 4, column 2 ('b'): a density needs finite values; drop that row"),
        ("a;b\n1;-1e999\n" + "".join(f"{i};{i * i % 7}\n" for i in range(40)) + "2;+inf\n",
         "'-1e999' (read as -inf) at line 2, column 2 ('b'); 2 rows hold one"),
        ("a,b\n" + "".join(f"{i},5\n" for i in range(40)),
         "constant (zero-variance) column 'b': a density"),
        ("a,b\n1,2\n3,4\n", "rows"),
        ("a,b,c,d,e,f,g,h\n" + "".join(
            ",".join(f"{v:.5f}" for v in row) + "\n"
            for row in np.random.default_rng(0).normal(size=(10, 8))),
         "8 training rows remain for 8 columns"),
    ],
)
def test_train_bad_data_exits_1_and_writes_nothing(tmp_path, content, message):
    data = tmp_path / "data.csv"
    if content is not None:
        data.write_text(content)
    out_dir = tmp_path / "run"
    code, out, err = run_cli(["train", data, *TINY, "--out", out_dir])
    assert code == 1
    assert message in one_error_line(err)
    assert not out_dir.exists()


def test_train_unknown_column_and_columns_on_a_toy(tmp_path):
    csv = write_csv(tmp_path / "d.csv", np.random.default_rng(0).normal(size=(50, 2)),
                    ["u", "v"])
    code, _, err = run_cli(["train", csv, *TINY, "--columns", "u,w", "--out", tmp_path / "r"])
    assert code == 1 and "'w'" in one_error_line(err)
    code, _, err = run_cli(["train", "moons", *TINY, "--columns", "0", "--out",
                            tmp_path / "r"])
    assert code == 1 and "toy" in one_error_line(err)
    assert not (tmp_path / "r").exists()


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(ef.datasets.DataError):
        main(["train", str(tmp_path / "missing.csv"), *TINY, "--out", str(tmp_path / "r"),
              "--debug"])


# -- sample -----------------------------------------------------------------------------


def test_sample_to_csv_npy_stdout_and_json(run_dir, tmp_path):
    code, out, err = run_cli(["sample", run_dir, "-n", "7", "-o", tmp_path / "s.csv",
                              "--seed", "3"])
    assert code == 0, err and "wrote 7 samples" in out
    rows = (tmp_path / "s.csv").read_text().splitlines()
    assert rows[0] == "x1,x2" and len(rows) == 8
    csv_values = np.loadtxt(tmp_path / "s.csv", delimiter=",", skiprows=1)

    code, _, _ = run_cli(["sample", run_dir, "-n", "7", "-o", tmp_path / "s.npy", "--seed",
                          "3"])
    assert code == 0
    npy = np.load(tmp_path / "s.npy")
    assert npy.shape == (7, 2) and np.all(np.isfinite(npy))
    np.testing.assert_allclose(csv_values, npy, rtol=1e-6)  # same seed, same samples

    code, out, _ = run_cli(["sample", run_dir, "-n", "4", "--seed", "3"])
    assert code == 0 and len(out.splitlines()) == 5
    np.testing.assert_allclose(np.loadtxt(io.StringIO(out), delimiter=",", skiprows=1),
                               npy[:4], rtol=1e-6)

    code, out, _ = run_cli(["sample", run_dir, "-n", "5", "--json", "--seed", "1"])
    result = json.loads(out)
    assert code == 0 and result["n"] == 5 and np.asarray(result["samples"]).shape == (5, 2)


def test_sample_without_a_seed_says_the_one_it_drew_with(run_dir):
    # (a random draw could not be drawn again: only --json gave its seed)
    code, out, err = run_cli(["sample", run_dir, "-n", "3"])
    assert code == 0 and err.startswith("note: seed "), err
    seed = err.split()[2]
    assert f"(--seed {seed} -n 3 draws these samples again)" in err
    code, again, err = run_cli(["sample", run_dir, "-n", "3", "--seed", seed])
    assert code == 0 and again == out and "note: seed" not in err


def test_json_usage_errors_are_json_too(run_dir):
    # (a script asking for --json got argparse's text on stderr and nothing on stdout)
    code, out, err = run_cli(["sample", run_dir, "-n", "0", "--json"])
    assert code == 2 and json.loads(out) == {
        "ok": False, "error": "argument -n/--num: expected a positive integer, got 0"}
    assert "usage: exactflow sample" in err
    code, out, err = run_cli(["sample", run_dir, "-n", "0"])
    assert code == 2 and out == "" and "expected a positive integer" in err


def test_train_and_score_a_folder_of_shards_and_a_parquet_file(tmp_path):
    # (the command line took one file only: "unknown file type '.parquet'", and a folder of
    # shards could not be scored)
    rows = np.random.default_rng(0).normal(size=(3000, 3))
    ef.datasets.write_shards(rows, tmp_path / "shards", rows_per_shard=1000)
    out = tmp_path / "run"
    code, _, err = run_cli(["train", tmp_path / "shards", "--model", "gaussian",
                            "--no-report", "--out", out])
    assert code == 0, err
    code, _, err = run_cli(["score", out, tmp_path / "shards", "-o", tmp_path / "s.npy"])
    assert code == 0, err
    scores = np.load(tmp_path / "s.npy")
    np.testing.assert_allclose(scores[:, 0], ef.runs.load_run(out).score(rows), rtol=1e-12)
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"a": rows[:, 0], "b": rows[:, 1], "c": rows[:, 2]}),
                   tmp_path / "t.parquet")
    code, _, err = run_cli(["train", tmp_path / "t.parquet", "--model", "gaussian",
                            "--no-report", "--out", tmp_path / "pq"])
    assert code == 0, err
    assert json.loads((tmp_path / "pq" / "run.json").read_text())["data"]["column_names"] == [
        "a", "b", "c"]
    pq.write_table(pa.table({"c": rows[:5, 2], "a": rows[:5, 0], "b": rows[:5, 1]}),
                   tmp_path / "new.parquet")  # (columns matched by name)
    code, _, err = run_cli(["score", tmp_path / "pq", tmp_path / "new.parquet", "-o",
                            tmp_path / "n.npy"])
    assert code == 0, err
    np.testing.assert_allclose(np.load(tmp_path / "n.npy")[:, 0],
                               ef.runs.load_run(tmp_path / "pq").score(rows[:5]), rtol=1e-12)


def test_sample_lands_where_the_data_is(run_dir):
    code, out, _ = run_cli(["sample", run_dir, "-n", "2000", "--seed", "0"])
    samples = np.loadtxt(io.StringIO(out), delimiter=",", skiprows=1)
    with np.load(run_dir / "data.npz") as npz:
        train = npz["train"]
    # In data units: the sample mean is within a fraction of a standard deviation of the
    # data's, even for a barely trained model (the standardization layer is inverted).
    assert np.all(np.abs(samples.mean(0) - train.mean(0)) < 0.5 * train.std(0))


def test_sample_errors(run_dir, tmp_path):
    code, _, err = run_cli(["sample", run_dir, "-n", "3", "-o", tmp_path / "s.parquet"])
    assert code == 2 and ".csv, .tsv, .txt or .npy" in one_error_line(err)  # (usage)
    assert not (tmp_path / "s.parquet").exists()
    code, _, err = run_cli(["sample", tmp_path / "nowhere", "-n", "3"])
    assert code == 1 and "no such run folder" in one_error_line(err)
    code, _, err = run_cli(["sample", tmp_path, "-n", "3"])
    assert code == 1 and "run.json" in one_error_line(err)


def broken_copy(run_dir: Path, tmp_path: Path, name: str, how: str) -> Path:
    import shutil

    copy = tmp_path / f"broken-{name}-{how}"
    shutil.copytree(run_dir, copy)
    if how == "deleted":
        (copy / name).unlink()
    else:
        raw = (copy / name).read_bytes()
        (copy / name).write_bytes(raw[: len(raw) // 2])
    return copy


@pytest.mark.parametrize("how", ["deleted", "corrupted"])
def test_sample_from_a_broken_run_leaves_no_output(run_dir, tmp_path, how):
    broken = broken_copy(run_dir, tmp_path, "model.safetensors", how)
    target = tmp_path / "s.csv"
    code, _, err = run_cli(["sample", broken, "-n", "3", "-o", target])
    line = one_error_line(err)
    assert code == 1
    assert ("no model.safetensors" in line) if how == "deleted" else ("truncated" in line or
                                                             "corrupt" in line)
    assert not target.exists()
    assert [p.name for p in tmp_path.iterdir() if p.is_file()] == []


def test_run_json_deleted_or_corrupted(run_dir, tmp_path):
    broken = broken_copy(run_dir, tmp_path, "run.json", "deleted")
    code, _, err = run_cli(["sample", broken, "-n", "3"])
    assert code == 1 and "run.json" in one_error_line(err)
    broken = broken_copy(run_dir, tmp_path, "run.json", "corrupted")
    code, _, err = run_cli(["report", broken])
    assert code == 1 and "corrupt" in one_error_line(err)


# -- score ------------------------------------------------------------------------------


def test_score_matches_the_model_and_flags_anomalies(run_dir, tmp_path):
    with np.load(run_dir / "data.npz") as npz:
        test, held_out = npz["test"], np.concatenate([npz["val"], npz["test"]])
    far = np.array([[40.0, -40.0], [1e3, 1e3]])
    data = np.vstack([test[:50] + 0.01, far])
    csv = write_csv(tmp_path / "new.csv", data, ["x1", "x2"])
    target = tmp_path / "scores.csv"
    code, out, err = run_cli(["score", run_dir, csv, "-o", target, "--threshold-quantile",
                              "0.05", "--json"])
    assert code == 0, err
    result = json.loads(out)
    table = np.loadtxt(target, delimiter=",", skiprows=1)
    assert target.read_text().splitlines()[0] == "row,log_density,p_value,anomaly"
    assert table.shape == (len(data), 4)
    np.testing.assert_array_equal(table[:, 0], np.arange(len(data)))
    flow = ef.load(run_dir / "model.safetensors")
    with torch.no_grad():
        direct = flow.log_prob(torch.as_tensor(data, dtype=torch.float32)).double().numpy()
        calibration = flow.log_prob(torch.as_tensor(held_out, dtype=torch.float32)).double()
    calibration = calibration.numpy()
    np.testing.assert_allclose(table[:, 1], direct, rtol=1e-6, atol=1e-6)
    # The p-value of a row: (1 + held-out rows scoring at or below it) / (n + 1).
    expected_p = (1 + (calibration[None, :] <= direct[:, None]).sum(1)) / (len(held_out) + 1)
    np.testing.assert_allclose(table[:, 2], expected_p, rtol=1e-6)
    np.testing.assert_array_equal(table[:, 3].astype(bool), expected_p <= 0.05)
    assert table[-1, 3] == 1 and table[-2, 3] == 1  # the far points are flagged
    assert result["anomalies"] == int((expected_p <= 0.05).sum())
    assert result["anomaly_rows"][-2:] == [len(data) - 2, len(data) - 1]
    assert result["calibration_rows"] == len(held_out)


def test_score_says_how_rows_beyond_the_model_count(run_dir, tmp_path):
    # 1e39 is beyond float32: the row scores -inf, an anomaly under any threshold.
    csv = write_csv(tmp_path / "new.csv", np.array([[0.0, 0.0], [1e39, 0.0]]), ["x1", "x2"])
    code, out, err = run_cli(["score", run_dir, csv, "-o", tmp_path / "s.csv"])
    assert code == 0, err
    assert "1 row with log-density -inf" in out
    assert "anomalies under any --threshold-quantile" in out
    code, out, err = run_cli(["score", run_dir, csv, "-o", tmp_path / "t.csv",
                              "--threshold-quantile", "0.05"])
    assert code == 0 and "-inf (outside the model's support" in out, err
    assert "flagged as anomalies" in out


def test_score_notes_rows_outside_the_training_range(run_dir, tmp_path):
    # A negative claim in a table of claims >= 0 scored p = 0.6 with nothing said: near the
    # data's mass, a value never seen can score as typical.
    with np.load(run_dir / "data.npz") as npz:
        seen = np.concatenate([npz["train"], npz["val"], npz["test"]])
    low, high = seen.min(axis=0), seen.max(axis=0)
    data = np.array([seen[0], [low[0] - 0.05, seen[0, 1]], seen[1], [high[0] + 1, high[1] + 1]])
    csv = write_csv(tmp_path / "new.csv", data, ["x1", "x2"])
    code, out, err = run_cli(["score", run_dir, csv, "--json"])
    assert code == 0, err
    result = json.loads(out)
    assert result["outside_training_range_rows"] == 2
    assert result["outside_training_range"] == {  # (a toy's columns have no names)
        "0": {"below": 1, "above": 1}, "1": {"below": 0, "above": 1}}
    assert "note: 2 of the 4 scored rows of new.csv hold values outside the range of the " \
        "data the model saw" in err and "rows 1, 3, from 0; of 4 new rows like the 600" in err
    code, out, err = run_cli(["score", run_dir, write_csv(tmp_path / "in.csv", seen[:5]),
                              "--json"])
    assert code == 0 and "outside the range" not in err, err
    assert json.loads(out)["outside_training_range_rows"] == 0


def test_score_to_stdout(run_dir, tmp_path):
    csv = write_csv(tmp_path / "new.csv", np.zeros((3, 2)))
    code, out, err = run_cli(["score", run_dir, csv])
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "row,log_density,p_value" and len(lines) == 4


@pytest.mark.parametrize(
    "content, message",
    [
        ("1,2,3\n4,5,6\n", "3 columns"),
        ("1\n2\n", "has 1 column but"),
        ("1,2\nnan,4\n", "'nan' at line 2, column 1 (a missing value)"),
        ("1,2\n3,x\n", "'x'"),
        (None, "neither a built-in dataset"),
    ],
)
def test_score_bad_data_exits_1_without_output(run_dir, tmp_path, content, message):
    data = tmp_path / "in.csv"
    if content is not None:
        data.write_text(content)
    target = tmp_path / "scores.csv"
    code, _, err = run_cli(["score", run_dir, data, "-o", target])
    assert code == 1
    assert message in one_error_line(err)
    assert not target.exists()


def test_score_with_threshold_needs_the_stored_data(run_dir, tmp_path):
    broken = broken_copy(run_dir, tmp_path, "data.npz", "deleted")
    csv = write_csv(tmp_path / "new.csv", np.zeros((3, 2)))
    target = tmp_path / "scores.csv"
    code, _, err = run_cli(["score", broken, csv, "-o", target, "--threshold-quantile",
                            "0.1"])
    assert code == 1 and "data.npz" in one_error_line(err)
    assert not target.exists()
    code, _, err = run_cli(["score", broken, csv, "-o", target])  # no threshold: fine
    assert code == 0, err
    assert target.read_text().splitlines()[0] == "row,log_density"  # no p-values


# -- check ------------------------------------------------------------------------------


def test_check_a_run_folder(run_dir):
    code, out, err = run_cli(["check", run_dir])
    assert code == 0, err
    assert "log-det error" in out and "round-trip error" in out
    assert "layers pass (log-determinant against autograd, round trip)" in out
    assert "base distribution StandardNormal passes: its log-density at the latent points " \
        "against torch.distributions" in out
    code, out, _ = run_cli(["check", run_dir, "--json", "--points", "16"])
    result = json.loads(out)
    flow = ef.load(run_dir / "model.safetensors")
    assert code == 0 and result["ok"] and result["points"] == 16
    assert [r["name"] for r in result["layers"]] == [
        type(t).__name__ for t in flatten_layers(flow.transform)
    ]
    assert all(r["log_det_error"] < 1e-8 for r in result["layers"])


@pytest.mark.parametrize("model", ef.models.available())
def test_check_a_new_model_of_every_builder(model):
    classical = model in ("gaussian", "gmm")  # no layers: the model is its base density
    layers = [] if classical else ["--layers", "2"]
    code, out, err = run_cli(["check", "--model", model, "--features", "3", *layers,
                              "--points", "24", "--json"])
    assert code == 0, out + err
    result = json.loads(out)
    assert result["ok"] and (len(result["layers"]) == 0 if classical
                             else len(result["layers"]) >= 2)


def test_check_takes_fewer_rows_by_default_past_128_features(monkeypatch):
    # (256 rows at 784 features held 45 GB of Jacobians; 32 rows took 104 s and 5.9 GB)
    from exactflow.diagnostics import default_check_points

    assert [default_check_points(d) for d in (2, 128, 129, 200, 784, 5000)] == [
        256, 256, 252, 104, 8, 8]
    import exactflow.cli.inspect as inspect_module

    seen = []
    real = inspect_module.check_layers
    monkeypatch.setattr(inspect_module, "check_layers",
                        lambda flow, x, **kw: seen.append(kw["max_points"]) or real(flow, x, **kw))
    code, out, err = run_cli(["check", "--model", "planar", "--features", "200", "--layers", "1"])
    assert code == 0, err
    assert seen == [104] and ("104 points (the default at 200 features; --points checks "
                              "more), float64") in out
    code, out, _ = run_cli(["check", "--model", "planar", "--features", "200", "--layers",
                            "1", "--points", "300", "--json"])
    assert code == 0 and seen[-1] == 300 and json.loads(out)["points"] == 300


def test_check_fails_on_a_wrong_log_det(run_dir, monkeypatch):
    from exactflow.datasets import Standardize

    real_forward = Standardize.forward

    def wrong(self, x, context=None):
        z, ladj = real_forward(self, x, context)
        return z, ladj + 1e-3

    monkeypatch.setattr(Standardize, "forward", wrong)
    code, out, _ = run_cli(["check", run_dir])
    assert code == 1
    assert "FAIL" in out and "layer 1 (Standardize)" in out
    code, out, _ = run_cli(["check", run_dir, "--json"])
    result = json.loads(out)
    assert code == 1 and not result["ok"]
    assert [r["ok"] for r in result["layers"]][0] is False


def test_check_broken_run_folder(run_dir, tmp_path):
    broken = broken_copy(run_dir, tmp_path, "model.safetensors", "corrupted")
    code, _, err = run_cli(["check", broken])
    assert code == 1 and "model.safetensors" in one_error_line(err)


# -- report and demo --------------------------------------------------------------------


def test_report_command(run_dir, tmp_path):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    code, out, err = run_cli(["report", copy, "--json"])
    assert code == 0, err
    index = Path(json.loads(out)["report"])
    assert index == copy / "report" / "index.html" and index.is_file()
    assert (copy / "report" / "metrics.json").is_file()
    broken = broken_copy(run_dir, tmp_path, "data.npz", "corrupted")
    code, _, err = run_cli(["report", broken])
    assert code == 1 and "data.npz" in one_error_line(err)
    assert not (broken / "report" / "index.html").exists()


def test_demo(tmp_path):
    out_dir = tmp_path / "demo"
    code, out, err = run_cli(["demo", "--steps", "50", "--samples", "2000", "--out", out_dir])
    assert code == 0, err
    assert "test NLL" in out and "true entropy" in out
    assert f"report: {out_dir / 'report' / 'index.html'}" in out
    info = json.loads((out_dir / "run.json").read_text())
    assert info["model"]["model"] == "realnvp" and info["model"]["layers"] == 8
    assert info["model"]["batch_norm"] is True and info["metrics"]["steps"] == 50
    for name in ("index.html", "metrics.json", "data_vs_model.png", "cartographer.png",
                 "training.png", "layer_log_dets.png"):
        assert (out_dir / "report" / name).is_file(), name
    # The demo can be run again into the same folder.
    code, out, err = run_cli(["demo", "--steps", "10", "--samples", "500", "--out", out_dir,
                              "--json"])
    assert code == 0, err
    assert json.loads(out)["metrics"]["steps"] == 10
    # Another run there (a user's own model on moons) is replaced only with --overwrite.
    mine = tmp_path / "mine"
    code, _, err = run_cli(["train", "moons", *TINY, "--samples", "500", "--out", mine])
    before = (mine / "model.safetensors").read_bytes()
    code, _, err = run_cli(["demo", "--steps", "10", "--samples", "500", "--out", mine])
    assert code == 1 and "pass --overwrite to replace it" in one_error_line(err)
    assert (mine / "model.safetensors").read_bytes() == before
    code, _, err = run_cli(["demo", "--steps", "10", "--samples", "500", "--out", mine,
                            "--overwrite"])
    assert code == 0 and json.loads((mine / "run.json").read_text())["model"]["layers"] == 8


def test_output_files_have_ordinary_permissions(run_dir, tmp_path):
    code, _, _ = run_cli(["sample", run_dir, "-n", "3", "-o", tmp_path / "s.csv"])
    mask = os.umask(0)
    os.umask(mask)
    assert code == 0
    assert (tmp_path / "s.csv").stat().st_mode & 0o777 == 0o666 & ~mask


def test_builtin_digits_run_checks_in_64_dimensions(tmp_path):
    pytest.importorskip("sklearn")
    out_dir = tmp_path / "digits"
    code, _, err = run_cli(["train", "digits", "--model", "maf", "--layers", "2", "--hidden",
                            "16", "--steps", "5", "--no-report", "--out", out_dir])
    assert code == 0, err
    info = json.loads((out_dir / "run.json").read_text())
    assert info["data"]["features"] == 64 and info["data"]["rows"]["total"] == 1797
    code, out, err = run_cli(["check", out_dir, "--points", "32", "--json"])
    assert code == 0, err
    assert all(r["ok"] for r in json.loads(out)["layers"])


def test_train_base_student_gives_a_named_flow_heavy_tails(tmp_path):
    rows = np.random.default_rng(0).standard_t(2.0, size=(400, 2))
    data = write_csv(tmp_path / "t.csv", rows, ["a", "b"])
    code, _, err = run_cli(["train", data, *TINY, "--base", "student", "--out", tmp_path / "r"])
    assert code == 0, err
    info = json.loads((tmp_path / "r" / "run.json").read_text())
    assert info["model"]["base"] == {"name": "student", "df": 5.0, "trainable": True}
    run = ef.runs.load_run(tmp_path / "r")
    assert isinstance(run.flow.base, ef.StudentT)
    code, out, err = run_cli(["score", tmp_path / "r", data])
    assert code == 0 and len(out.splitlines()) == 401, err
    for argv, message in ((["--base", "student"], "give --model NAME with them"),
                          (["--model", "gmm", "--base", "student"], "fitted in closed form")):
        code, _, err = run_cli(["train", data, *argv, "--out", tmp_path / "x"])
        assert code == 2 and message in err, err


def test_the_default_run_folder_is_claimed_and_released_when_the_run_fails(tmp_path,
                                                                           monkeypatch):
    # (two runs started at once both took runs/train; the second failed on the lock)
    from exactflow.cli.train import _default_out

    monkeypatch.chdir(tmp_path)
    first, second = _default_out("train.csv", claim=True), _default_out("train.csv", claim=True)
    assert (first, second) == (Path("runs/train"), Path("runs/train-2"))
    assert first.is_dir() and second.is_dir()
    assert _default_out("train.csv", claim=False) == Path("runs/train-3")
    (tmp_path / "bad.csv").write_text("a,b\n1,x\n2,3\n")
    code, _, err = run_cli(["train", "bad.csv", "--model", "maf", "--no-report"])
    assert code == 1 and "x" in err
    assert not (tmp_path / "runs" / "bad").exists()  # (nothing written: the folder went too)
    code, _, err = run_cli(["train", "bad.csv", "--model", "maf", "--resume"])
    assert code == 2 and "--resume continues the run in a folder: give it with --out" in err


def test_train_with_no_options_picks_a_model_writes_the_leaderboard_and_a_default_folder(
        tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    rows = rng.normal(size=(400, 3)) @ np.array([[1.0, 0.5, 0.0], [0.0, 1.0, 0.3],
                                                  [0.0, 0.0, 1.0]])
    write_csv(tmp_path / "table.csv", rows, ["a", "b", "c"])
    code, out, err = run_cli(["train", "table.csv", "--budget", "6", "--no-report"])
    assert code == 0, err
    assert "run folder: runs/table" in out and "<- kept" in out
    lines = out.split("candidates (", 1)[1].splitlines()[1:]
    board_lines = [line for line in lines[: next(i for i, x in enumerate(lines)
                                                 if not x.startswith("  "))]]
    ends = {re.match(r"^  .*? \d+\.\d s", line).end() for line in board_lines}
    assert len(board_lines) >= 4 and len(ends) == 1  # the columns line up, long names too
    kept = next(e["name"] for e in json.loads(
        (tmp_path / "runs" / "table" / "run.json").read_text())["metrics"]["leaderboard"]
        if e["chosen"])
    assert f"trained {kept} (" in out  # the chosen candidate by its leaderboard name
    # ... in the time the leaderboard gives it (a mixture's includes its search).
    kept_seconds = next(e["seconds"] for e in json.loads(
        (tmp_path / "runs" / "table" / "run.json").read_text())["metrics"]["leaderboard"]
        if e["chosen"])
    assert re.search(rf"trained .* steps in {kept_seconds:.1f} s", out), out
    info = json.loads((tmp_path / "runs" / "table" / "run.json").read_text())
    board = info["metrics"]["leaderboard"]
    names = [e["name"] for e in board]
    assert names[0] == "gaussian" and names[1].startswith("gmm (")  # size chosen on validation
    assert "nsf on the mixture" in names and "nsf-autoregressive" in names
    assert sum(e["chosen"] for e in board) == 1
    chosen = next(e for e in board if e["chosen"])
    # (Gaussian rows: a later rung better on validation only within noise is not kept)
    for entry in board[board.index(chosen) + 1:]:
        if entry["val_nll"] is not None and entry["val_nll"] < chosen["val_nll"]:
            assert "standard error" in entry["status"] or "rounding" in entry["status"], entry
    assert all(e["val_nll"] >= chosen["val_nll"] for e in board[:board.index(chosen)]
               if e["val_nll"] is not None)
    assert info["model"]["model"] == chosen["config"]["model"]
    assert ("kept the weights" in out) == (chosen["steps"] > 0), out
    # A second run does not replace the first: it gets the next free folder.
    code, out, _ = run_cli(["train", "table.csv", "--model", "gaussian", "--no-report"])
    assert code == 0 and "runs/table-2" in out
    # A missing file is the error, with no run folder named first.
    code, out, err = run_cli(["train", "nope.csv", "--model", "gaussian", "--no-report"])
    assert code == 1 and "run folder" not in out and "nope.csv" in err


def test_score_takes_the_toy_names_that_train_takes(run_dir):
    code, out, err = run_cli(["score", run_dir, "moons", "--json"])
    assert code == 0, err
    assert json.loads(out)["n"] == 20000  # the toy's default sample size


def test_dequantize_makes_integer_columns_continuous_and_scores_say_lower_bound(tmp_path):
    rng = np.random.default_rng(3)
    counts = np.column_stack([rng.poisson(4.0, 600), rng.poisson(9.0, 600),
                              rng.normal(size=600)])
    data = write_csv(tmp_path / "counts.csv", counts, ["a", "b", "c"])
    code, _, err = run_cli(["train", data, "--model", "gaussian", "--out", tmp_path / "plain",
                            "--no-report"])
    assert code == 0 and "integers only" in err and "--dequantize" in err
    assert "few distinct values" not in err
    scaled = write_csv(tmp_path / "scaled.csv", np.c_[counts[:, 2], (counts[:, 0] > 4) * 0.3],
                       ["c", "flag"])
    code, _, err = run_cli(["train", scaled, "--model", "gaussian", "--out", tmp_path / "lv",
                            "--no-report"])
    assert code == 0 and "column 'flag' takes only a few distinct values, not integers" in err
    code, _, err = run_cli(["train", data, "--model", "gaussian", "--dequantize", "--out",
                            tmp_path / "deq", "--no-report"])
    assert code == 0, err
    info = json.loads((tmp_path / "deq" / "run.json").read_text())
    assert info["data"]["dequantized_columns"] == [0, 1]
    with np.load(tmp_path / "deq" / "data.npz") as npz:
        train = npz["train"]
    assert not np.all(train[:, 0] == np.round(train[:, 0]))  # noise in [0, 1) was added
    code, out, err = run_cli(["score", tmp_path / "deq", data, "--json"])
    assert code == 0, err
    assert json.loads(out)["lower_bound"] is True
    # A row's noise is keyed to its values: the same row scores the same wherever it sits.
    scores = json.loads(out)["log_density"]
    twice = write_csv(tmp_path / "twice.csv", np.r_[counts[3:4], counts[:3], counts[3:4]],
                      ["a", "b", "c"])
    code, out, err = run_cli(["score", tmp_path / "deq", twice, "--json"])
    again = json.loads(out)["log_density"]
    assert code == 0 and again[0] == again[4] == scores[3] and again[1:4] == scores[:3]
    # A blank pixel is a constant column until it is dequantized.
    blank = write_csv(tmp_path / "blank.csv", np.c_[counts[:, :2], np.zeros(600)],
                      ["a", "b", "blank"])
    code, _, err = run_cli(["train", blank, "--model", "gaussian", "--out", tmp_path / "b1",
                            "--no-report"])
    assert code == 1 and "constant" in err and "dequantize" in err
    code, _, err = run_cli(["train", blank, "--model", "gaussian", "--dequantize", "--out",
                            tmp_path / "b2", "--no-report"])
    assert code == 0, err


def test_key_picks_an_array_of_an_npz_holding_several(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "two.npz", a=rng.normal(size=(300, 2)), b=rng.normal(size=(50, 3)))
    code, _, err = run_cli(["train", tmp_path / "two.npz", "--out", tmp_path / "r",
                            "--model", "gaussian", "--no-report"])
    assert code == 1 and "holds 2 arrays" in err
    code, _, err = run_cli(["train", tmp_path / "two.npz", "--key", "a", "--out",
                            tmp_path / "r", "--model", "gaussian", "--no-report"])
    assert code == 0, err
    code, out, err = run_cli(["score", tmp_path / "r", f"{tmp_path / 'two.npz'}:a", "--json"])
    assert code == 0 and json.loads(out)["n"] == 300, err
    code, _, err = run_cli(["train", tmp_path / "x.csv", "--key", "a", "--out", tmp_path / "s"])
    assert code == 2 and "--key picks an array" in err


def test_warnings_are_one_line_without_the_library_source(tmp_path):
    rng = np.random.default_rng(5)
    csv = write_csv(tmp_path / "big.csv", rng.normal(size=(300, 2)) * 1e4, ["a", "b"])
    argv = ["train", csv, *TINY, "--no-standardize", "--out", tmp_path / "r"]
    done = subprocess.run([sys.executable, "-m", "exactflow", *map(str, argv)],
                          capture_output=True, text=True, env={**os.environ,
                                                               "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if "warning" in line]
    assert lines and all(line.startswith("exactflow: warning: ") for line in lines)
    assert "--no-standardize" in lines[0] and ".py" not in done.stderr
    # A caller that records warnings still gets them, as warnings.
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        code, _, err = run_cli([*argv, "--overwrite"])
    assert code == 0, err
    assert any("--no-standardize" in str(w.message) for w in seen)
    # ... and the formatter is the caller's again after main() returns.
    assert "exactflow: warning" not in warnings.formatwarning("x", UserWarning, "f.py", 1)


def test_fractions_that_leave_no_training_rows_are_a_usage_error(tmp_path):
    code, _, err = run_cli(["train", "moons", *TINY, "--val-fraction", "0.6",
                            "--test-fraction", "0.5", "--out", tmp_path / "r"])
    assert code == 2 and "--val-fraction + --test-fraction must be below 1, got 1.1" in err


def test_sigterm_stops_a_command_as_ctrl_c_does_with_code_143(run_dir, tmp_path, monkeypatch):
    # A scheduler's stop (or `timeout`) mid-write: the file being written is removed, no
    # temporary file is left, and the exit code is 128 + SIGTERM.
    import signal

    sample = ef.Flow.sample

    def stopped(self, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return sample(self, *args, **kwargs)

    monkeypatch.setattr(ef.Flow, "sample", stopped)
    before = signal.getsignal(signal.SIGTERM)
    code, _, err = run_cli(["sample", run_dir, "-n", "5000", "-o", tmp_path / "s.npy"])
    assert code == 143 and "error: terminated" in err, err
    assert list(tmp_path.iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) == before


def test_train_says_why_the_test_nll_is_not_finite(capsys):
    # A test row far beyond the training rows scores -inf: the summary says how many, and
    # the NLL over the others.
    import argparse

    from exactflow.cli.train import _print_train_result

    test = {"nll": math.inf, "nll_se": math.nan, "bpd": math.inf, "n": 40,
            "n_nonfinite": 1, "nll_finite": 2.5}
    result = {"metrics": {"test": test, "parameters": 10, "steps": 5}, "model": "maf",
              "data": "t.csv", "run": "runs/t"}
    _print_train_result(argparse.Namespace(json=False, quiet=False), result)
    out = capsys.readouterr().out
    assert "test NLL inf" in out
    assert "1 of the test rows score -inf or NaN" in out and "the test NLL is 2.5000" in out


def test_train_says_when_training_never_beat_the_flow_as_it_started(capsys):
    # A named flow kept at step 0 (every later check worse) was reported as any other kept
    # step; on the ladder a flow on the mixture kept at step 0 is that mixture, as meant.
    import argparse

    from exactflow.cli.train import _print_train_result

    test = {"nll": 5.8, "nll_se": 0.2, "bpd": 2.0, "n": 60}
    for board, said in ((None, True), ([{"name": "maf", "chosen": True, "val_nll": 5.7}], False)):
        result = {"metrics": {"test": test, "parameters": 10, "steps": 3000, "best_step": 0,
                              "leaderboard": board}, "model": "maf", "data": "t.csv",
                  "run": "runs/t"}
        _print_train_result(argparse.Namespace(json=False, quiet=False), result)
        out = capsys.readouterr().out
        assert "kept the weights of step 0 of 3000" in out
        assert ("no later validation check beat the flow as it started" in out) == said


def test_train_names_a_deciding_validation_row_by_its_row_in_the_file(tmp_path):
    from sklearn.datasets import load_wine

    x = load_wine().data.copy()
    x[57, 0] = x[:, 0].mean() + 30 * x[:, 0].std()  # held out for validation with seed 30
    csv = write_csv(tmp_path / "wine.csv", x, [f"c{i}" for i in range(x.shape[1])])
    with pytest.warns(UserWarning, match=r"1 validation row \(row 57 of the data\) scores "
                                         r"more than"):
        code, _, err = run_cli(["train", csv, "--budget", "5", "--seed", "30", "--no-report",
                                "--out", tmp_path / "r"])
    assert code == 0, err


def test_train_with_bounds_keeps_samples_inside_and_scores_rows_outside_minus_infinity(
    tmp_path
):
    rng = np.random.default_rng(5)
    rows = np.c_[rng.beta(0.6, 3.0, 800), rng.normal(size=800), np.exp(rng.normal(size=800))]
    data = write_csv(tmp_path / "t.csv", rows, ["p", "x", "amount"])
    out = tmp_path / "run"
    code, _, err = run_cli(["train", data, *TINY, "--bounds", "p=0:1,amount=0:", "--out",
                            out])
    assert code == 0, err
    model = json.loads((out / "run.json").read_text())["model"]
    assert model["bounds"] == [[0.0, 1.0], [None, None], [0.0, None]]
    new = write_csv(tmp_path / "new.csv", np.array([[0.2, 0.0, 1.0], [1.5, 0.0, 1.0],
                                                    [0.2, 0.0, -1.0]]), ["p", "x", "amount"])
    code, text, err = run_cli(["score", out, new, "-o", tmp_path / "scores.csv"])
    assert code == 0, err
    lines = (tmp_path / "scores.csv").read_text().strip().splitlines()[1:]
    values = [line.split(",")[1] for line in lines]
    assert values[0] not in ("-inf", "") and values[1:] == ["-inf", "-inf"], lines
    assert "2 rows with log-density -inf (outside the model's support" in text
    code, text, _ = run_cli(["sample", out, "-n", "500", "--seed", "1"])
    drawn = np.loadtxt(io.StringIO(text), delimiter=",", skiprows=1)
    # (17 significant digits: at 9, a sample 1e-10 below a limit was written on it)
    assert max(len(cell) for line in text.splitlines()[1:11] for cell in line.split(",")) >= 17
    assert code == 0 and ((drawn[:, 0] > 0) & (drawn[:, 0] < 1)).all() and (
        drawn[:, 2] > 0).all()
    for bounds, status, message in (
        ("0:1", 1, "t.csv: values on or outside the bounds ('x' must lie in (0, 1)"),
        ("0-1", 2, "a column's bounds are LOW:HIGH"),
        ("p=0:1,0:", 2, "give every column's bounds in order"),
        ("zz=0:1", 1, "bounds name a column 'zz' the data does not have (its columns are"),
    ):
        code, _, err = run_cli(["train", data, *TINY, "--bounds", bounds, "--out",
                                tmp_path / "bad", "--overwrite"])
        assert code == status and message in err, (bounds, err)
