"""Errors that name the real problem and the user's own file, never internals.

Damaged checkpoints, model files that are something else, run folders given to
``ef.load``, unwritable or full output locations, empty CSV cells, ``.npz`` files of
several arrays, closed output pipes, a ``report`` link out of the run folder, and the
permissions of every file a run writes.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import exactflow as ef
from exactflow.cli import main
from exactflow.datasets import DataError
from exactflow.io import CheckpointError, atomic_write_text
from exactflow.runs import RunError
from tests.helpers import perturb

REPO = Path(__file__).resolve().parents[1]
TINY = ["--model", "maf", "--layers", "2", "--hidden", "8", "--steps", "10",
        "--batch-size", "64", "--no-report", "--samples", "300"]


def run_cli(argv: list) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def error_line(err: str) -> str:
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("exactflow: error: "), err
    return lines[-1]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("errors") / "run"
    code, _, err = run_cli(["train", "moons", *TINY, "--out", out, "--threads", "1"])
    assert code == 0, err
    return out


# -- damaged checkpoints ----------------------------------------------------------------


@pytest.mark.parametrize("payload", [
    {"format": "exactflow-checkpoint", "version": 1},  # no "run": was KeyError: 'run'
    {"format": "exactflow-checkpoint", "version": 1, "run": {}, "model": {}},
    {"format": "exactflow-checkpoint", "version": 1, "run": "text"},
])
def test_a_damaged_checkpoint_is_a_checkpoint_error(tmp_path, payload):
    path = tmp_path / "checkpoint.pt"
    torch.save(payload, path)
    flow = ef.models.maf(2, layers=1, hidden=(4,))
    with pytest.raises(CheckpointError, match="checkpoint") as info:
        ef.fit(flow, torch.randn(64, 2), steps=2, batch_size=32, checkpoint=path,
               resume=True, progress=False, device="cpu")
    assert str(path) in str(info.value)


def test_a_checkpoint_that_claims_what_it_does_not_hold_is_refused_before_use(tmp_path):
    # An optimizer state of the wrong shape, with the checksum made again to match, crashed
    # the process in torch's fused Adam (SIGSEGV, "corrupted double-linked list"); an
    # expanded view of 4 bytes was copied out to its claimed size (2.5 GB) by the checksum.
    from exactflow.io import payload_digest

    path = tmp_path / "checkpoint.pt"
    x = torch.randn(64, 2)
    args = dict(batch_size=32, checkpoint=path, progress=False, device="cpu")
    ef.fit(ef.models.maf(2, layers=1, hidden=(4,)), x, steps=2, checkpoint_every=1, **args)
    good = torch.load(path, weights_only=True)

    def resume_with(change, sign=True):
        payload = torch.load(path.with_name("good.pt"), weights_only=True)
        change(payload)
        if sign:
            payload.pop("sha256")
            payload["sha256"] = payload_digest(payload)
        torch.save(payload, path)
        ef.fit(ef.models.maf(2, layers=1, hidden=(4,)), x, steps=4, resume=True, **args)

    torch.save(good, path.with_name("good.pt"))

    def short_moments(payload):
        for entry in payload["optimizer"]["state"].values():
            entry["exp_avg"] = torch.zeros(7)

    with pytest.raises(CheckpointError, match=r"holds 'exp_avg' of shape \(7,\)"):
        resume_with(short_moments)

    def integer_moments(payload):  # (in the snapshot that a rollback loads)
        payload["guard"]["optimizer"] = snapshot = copy.deepcopy(payload["optimizer"])
        for entry in snapshot["state"].values():
            entry["exp_avg_sq"] = entry["exp_avg_sq"].long()

    with pytest.raises(CheckpointError, match="rollback snapshot .* holds 'exp_avg_sq'"):
        resume_with(integer_moments)

    def expanded(payload):
        payload["model"][next(iter(payload["model"]))] = torch.zeros(1).expand(10**9)

    with pytest.raises(CheckpointError, match="a view of 4 bytes that claims 1,000,000,000"):
        resume_with(expanded, sign=False)

    def bad_rng(payload):
        payload["rng"]["torch"] = torch.zeros(3, dtype=torch.uint8)

    with pytest.raises(CheckpointError, match="is a damaged checkpoint"):
        resume_with(bad_rng)
    def changed_weight(payload):  # (a flipped bit in the weights resumed another model)
        name = next(k for k, v in payload["model"].items() if v.is_floating_point())
        payload["model"][name].view(-1)[0] += 1e-3

    for change in (changed_weight, short_moments, bad_rng, lambda p: p.update(step=10**30)):
        with pytest.raises(CheckpointError, match="its entries do not match the SHA-256"):
            resume_with(change, sign=False)  # (unsigned: a changed byte anywhere)
    with pytest.raises(CheckpointError, match="step -5 is negative"):
        resume_with(lambda p: p.update(step=-5))
    with pytest.raises(CheckpointError, match="is a damaged checkpoint"):
        resume_with(lambda p: p.update(step=float("inf")))
    with pytest.raises(CheckpointError, match="stores 'history'.* as a torch.sparse_coo cpu "):
        resume_with(lambda p: p["history"].update(beta=[torch.zeros(3).to_sparse()]),
                    sign=False)  # (refused before its checksum is read)

    def long_betas(payload):
        payload["optimizer"]["param_groups"][0]["betas"] = (0.9, 0.99, 0.5)

    with pytest.raises(CheckpointError, match="sets 'betas' to"):
        resume_with(long_betas)
    with pytest.raises(CheckpointError, match="sets 'maximize' to 'yes'"):
        resume_with(lambda p: p["optimizer"]["param_groups"][0].update(maximize="yes"))

    def integer_rate(payload):  # (a number for a number: 0 and 0.0 alike)
        group = payload["optimizer"]["param_groups"][0]
        group["weight_decay"] = int(group["weight_decay"])

    resume_with(integer_rate)

    def long_step(payload):
        for entry in payload["optimizer"]["state"].values():
            entry["step"] = torch.zeros(9)

    with pytest.raises(CheckpointError, match=r"holds 'step' of shape \(9,\)"):
        resume_with(long_step)

    def overlapping(payload):  # (stride 0 from the last element: a dense write ran past it)
        for entry in payload["optimizer"]["state"].values():
            n = entry["exp_avg"].numel()
            entry["exp_avg"] = torch.zeros(n).as_strided(entry["exp_avg"].shape, (0,) * (
                entry["exp_avg"].dim()), n - 1)

    resume_with(overlapping)  # (copied out dense before the optimizer sees it)

    # These raised inside the first step (a missing moment, amsgrad without its maximum,
    # differentiable=True) or at the run's end or a rollback (weights of another shape).
    def no_second_moment(payload):
        for entry in payload["optimizer"]["state"].values():
            del entry["exp_avg_sq"]

    with pytest.raises(CheckpointError, match=r"holds \['exp_avg', 'step'\] .* Adam keeps"):
        resume_with(no_second_moment)
    for flag in ("amsgrad", "differentiable", "maximize"):
        with pytest.raises(CheckpointError, match=f"sets '{flag}' to True"):
            resume_with(lambda p, f=flag: p["optimizer"]["param_groups"][0].update({f: True}))
    resume_with(lambda p: p["optimizer"]["param_groups"][0].update(fused=None))  # (a device's)
    resume_with(lambda p: p["optimizer"]["param_groups"][0].pop("maximize"))  # (torch's default)

    def narrow(state):
        name = next(k for k, v in state.items() if v.is_floating_point() and v.dim() == 1)
        state[name] = state[name][1:].clone()

    with pytest.raises(CheckpointError, match=r"best weights .* hold '.*' as \("):
        resume_with(lambda p: p["best"].update(state=dict(p["model"])) or narrow(
            p["best"]["state"]))
    with pytest.raises(CheckpointError, match="rollback snapshot .* do not name"):
        resume_with(lambda p: p["guard"].update(model={"w": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"order is at epoch \d+, batch 7; an epoch holds"):
        resume_with(lambda p: p["order"].update(position=7))
    torch.save(good, path)
    ef.fit(ef.models.maf(2, layers=1, hidden=(4,)), x, steps=4, resume=True, **args)


def test_model_configs_that_would_build_far_more_than_the_file_holds_are_refused(tmp_path):
    # Sizes the size check did not bound (a mixture's components, an embedding, a width
    # squared, any size of a model.pt) built up to 3.7 GB, or tried to allocate 8-120 GB,
    # from files of 1-41 KB.
    from safetensors import safe_open
    from safetensors.torch import save_file

    def tampered(flow, change, pad=0):
        path = ef.save(flow, tmp_path / "m.safetensors")
        with safe_open(str(path), "pt") as f:
            meta, state = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        config = json.loads(meta["config"])
        change(config)
        if pad:
            state["pad"] = torch.zeros(pad, dtype=torch.uint8)
        save_file(state, str(tmp_path / "t.safetensors"),
                  metadata={**meta, "config": json.dumps(config)})
        return tmp_path / "t.safetensors"

    gmm = ef.models.build({"model": "gmm", "features": 2, "components": 2})
    maf = ef.models.maf(2, layers=1, hidden=(8,))
    cases = [
        (gmm, lambda c: c.update(components=10**9), 0, "components=1000000000"),
        (maf, lambda c: c.update(base={"name": "gmm", "components": 10**8}), 0,
         "base components=100000000"),
        (maf, lambda c: c.update(hidden=[40000, 40000], layers=1), 40_000,
         "width x width=1600000000"),
        (maf, lambda c: c.update(features=12000, hidden=[12000], layers=1), 12_000,
         "width x width=72000000"),
        (ef.models.nsf(2, layers=1, hidden=(8,)),
         lambda c: c.update(hidden=[12000], bins=12000, layers=1), 12_000,
         "hidden x bins=144000000"),
        (maf, lambda c: c.update(context=3, embedding={"features": 10**5, "hidden": [10**5]}),
         0, "embedding width"),
        (ef.models.build({"model": "gaussian", "features": 2}),
         lambda c: c.update(features=30000), 30_000, "x features=900000000"),
    ]
    for flow, change, pad, claim in cases:
        with pytest.raises(CheckpointError, match=claim):
            ef.load(tampered(flow, change, pad))
    # exactflow 0.1's torch archives are held to the same bounds.
    legacy = {"format": "exactflow", "version": 1, "exactflow_version": "0.1.0",
              "config": json.dumps({"model": "maf", "features": 2, "layers": 10**6,
                                    "hidden": [16]}), "state_dict": {}}
    torch.save(legacy, tmp_path / "old.pt")
    with pytest.raises(CheckpointError, match="claims features=2 but holds only 0 tensors"):
        ef.load(tmp_path / "old.pt")
    legacy["state_dict"] = {"w": torch.zeros(1).expand(10**9)}
    torch.save(legacy, tmp_path / "old.pt")
    with pytest.raises(CheckpointError, match="a view of 4 bytes"):
        ef.load(tmp_path / "old.pt")


def test_a_run_json_that_is_not_a_file_is_not_read(run_dir, tmp_path):
    # /dev/zero in its place filled memory (2.5 GB, MemoryError); a FIFO hung.
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    (copy / "run.json").unlink()
    os.mkfifo(copy / "run.json")
    flow = ef.load(copy)  # (the model file alone: its run.json is not read)
    assert isinstance(flow, ef.Flow)
    stage = copy / ".exactflow-replacing"
    stage.mkdir()
    os.symlink("/dev/zero", stage / "run.json")
    code, _, err = run_cli(["check", str(copy)])
    assert code == 1 and "MemoryError" not in err, err
    (copy / "run.json").unlink()
    os.symlink("/dev/zero", copy / "run.json")  # (train --resume read it whole)
    code, _, err = run_cli(["train", "moons", "--model", "maf", "--out", str(copy),
                            "--resume", "--steps", "3", "--samples", "200", "--no-report"])
    assert code == 0 and "MemoryError" not in err, err  # (unread: nothing to resume)


def test_run_records_are_read_within_a_bound(run_dir, tmp_path, monkeypatch):
    # A 600 MB run.json was read whole (1.46 GB) before being refused; `demo` read a
    # run.json linked to /dev/zero whole; a history that was not a dict was kept.
    from exactflow.io import files
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    monkeypatch.setattr(files, "RECORD_LIMIT", 10_000)
    text = (copy / "run.json").read_text()
    (copy / "run.json").write_text(text + " " * 10_000)
    with pytest.raises(RunError, match="larger than"):
        ef.runs.load_run(copy)
    assert isinstance(ef.load(copy), ef.Flow)  # (the model file alone)
    code, _, err = run_cli(["check", str(copy)])
    assert code == 1 and "larger than" in error_line(err), err
    (copy / "run.json").write_text(text)
    (copy / "history.json").write_text("[1, 2]")
    with pytest.raises(RunError, match="not a training history"):
        ef.runs.load_run(copy)
    (copy / "run.json").unlink()
    os.symlink("/dev/zero", copy / "run.json")
    code, _, err = run_cli(["demo", "--out", str(copy), "--steps", "3"])
    assert code == 1 and "interrupted run" in error_line(err), err


def test_train_resume_from_a_damaged_checkpoint_is_one_line(tmp_path):
    out = tmp_path / "run"
    (out).mkdir()
    code, _, err = run_cli(["train", "moons", *TINY, "--out", out, "--steps", "40"])
    assert code == 0, err
    info = json.loads((out / "run.json").read_text())
    info["status"] = "training"  # an interrupted run with a damaged checkpoint
    (out / "run.json").write_text(json.dumps(info))
    torch.save({"format": "exactflow-checkpoint", "version": 1}, out / "checkpoint.pt")
    code, _, err = run_cli(["train", "moons", *TINY, "--out", out, "--steps", "40",
                            "--resume"])
    line = error_line(err)
    assert code == 1 and "checkpoint.pt' is a damaged checkpoint" in line
    assert "delete it and train again" in line


# -- ef.load on things that are not model files -----------------------------------------


def test_ef_load_names_what_a_foreign_file_is(tmp_path):
    (tmp_path / "data.csv").write_text("x,y\n1,2\n3,4\n")
    np.save(tmp_path / "a.npy", np.zeros((3, 2)))
    np.savez(tmp_path / "b.npz", a=np.zeros(2), b=np.ones(2))
    (tmp_path / "notes.txt").write_text("")  # empty
    (tmp_path / "zeros.bin").write_bytes(bytes(100))  # valid UTF-8, but not text
    for name, what in (("data.csv", "a text file"), ("a.npy", "a numpy .npy array"),
                       ("b.npz", "a numpy .npz archive"), ("notes.txt", "empty"),
                       ("zeros.bin", "a binary file of an unknown format")):
        with pytest.raises(CheckpointError, match=what) as info:
            ef.load(tmp_path / name)
        text = str(info.value)
        assert name in text and "pop from empty list" not in text
        assert "Unsupported operand" not in text


def test_ef_load_of_a_run_folder_loads_its_model(run_dir, tmp_path):
    flow = ef.load(run_dir)
    x = torch.randn(5, 2)
    with torch.no_grad():
        assert torch.equal(flow.log_prob(x), ef.load(run_dir / "model.safetensors").log_prob(x))
    # A run folder of exactflow 0.1 holds model.pt (a torch archive of config and weights).
    old = tmp_path / "old-run"
    old.mkdir()
    torch.save({"format": "exactflow", "version": 1, "exactflow_version": "0.1.0",
                "config": json.dumps(flow.config, sort_keys=True),
                "state_dict": flow.state_dict()}, old / "model.pt")
    with torch.no_grad():
        assert torch.equal(ef.load(old).log_prob(x), flow.log_prob(x))
    (tmp_path / "empty-folder").mkdir()
    with pytest.raises(CheckpointError, match="holds no model.safetensors or model.pt"):
        ef.load(tmp_path / "empty-folder")


def test_nan_weights_are_neither_saved_nor_loaded(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    flow = perturb(ef.models.maf(2, layers=1, hidden=(4,)))
    path = ef.save(flow, tmp_path / "m.safetensors")
    with torch.no_grad():
        next(flow.parameters())[0] = float("nan")
    with pytest.raises(ValueError, match=r"the flow holds NaN weights \(.*\): it diverged"):
        ef.save(flow, tmp_path / "nan.safetensors")  # a file load would refuse
    assert not (tmp_path / "nan.safetensors").exists()
    # A file written otherwise, or damaged, with a NaN: refused by name.
    with safe_open(path, "pt") as f:
        metadata = f.metadata()
        state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open's API
    next(v for v in state.values() if v.is_floating_point() and v.dim()).view(-1)[0] = float("nan")
    save_file(state, path, metadata=metadata)
    with pytest.raises(CheckpointError, match="NaN weights"):
        ef.load(path)


def test_a_changed_byte_in_the_weights_is_refused(tmp_path):
    # safetensors checks its header, not its data: the checksum saved with the weights does.
    flow = perturb(ef.models.maf(3, layers=1, hidden=(8,)))
    path = ef.save(flow, tmp_path / "m.safetensors")
    data = bytearray(path.read_bytes())
    data[-9] ^= 0x10  # in the last tensor's bytes, one bit
    (tmp_path / "flipped.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="is damaged: its config and weights do not "
                                              "match the checksum"):
        ef.load(tmp_path / "flipped.safetensors")
    assert torch.equal(ef.load(path).log_prob(torch.ones(2, 3)), flow.log_prob(torch.ones(2, 3)))


def test_a_changed_config_or_a_missing_checksum_is_refused(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    flow = perturb(ef.models.maf(3, layers=1, hidden=(8,)))
    path = ef.save(flow, tmp_path / "m.safetensors")
    data = bytearray(path.read_bytes())
    at = data.index(b'\\"maf\\"') + 2  # the builder's name in the header's JSON
    data[at] ^= 0x04  # 'm' -> 'i': an IAF of the same shapes, one bit away
    (tmp_path / "iaf.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="is damaged: its config and weights do not "
                                              "match the checksum"):
        ef.load(tmp_path / "iaf.safetensors")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open's API
    save_file(state, str(tmp_path / "bare.safetensors"),
              metadata={k: v for k, v in meta.items() if k != "sha256"})
    with pytest.raises(CheckpointError, match="is damaged: it has no checksum"):
        ef.load(tmp_path / "bare.safetensors")
    # Files of the development builds before the checksum covered the config still load.
    older = {**{k: v for k, v in meta.items() if k != "sha256"},
             "exactflow_version": "0.2.0.dev0"}
    for extra in ({}, {"sha256": ef.io.state_digest(state)}):
        save_file(state, str(tmp_path / "older.safetensors"), metadata={**older, **extra})
        x = torch.ones(2, 3)
        assert torch.equal(ef.load(tmp_path / "older.safetensors").log_prob(x), flow.log_prob(x))


def test_ef_load_keeps_the_saved_dtype_and_refuses_complex_weights(tmp_path):
    from safetensors.torch import load_file, save_file

    flow = perturb(ef.models.maf(2, layers=1, hidden=(4,))).double().eval()
    loaded = ef.load(ef.save(flow, tmp_path / "m64.safetensors"))
    assert all(p.dtype == torch.float64 for p in loaded.parameters())  # was cast to float32
    x = torch.randn(4, 2, dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(loaded.log_prob(x), flow.log_prob(x))
    from safetensors import safe_open

    with safe_open(str(tmp_path / "m64.safetensors"), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(tmp_path / "m64.safetensors"))
    key = next(k for k, v in tensors.items() if v.is_floating_point())
    tensors[key] = tensors[key].to(torch.complex64)
    save_file(tensors, str(tmp_path / "complex.safetensors"), metadata=meta)
    with pytest.raises(CheckpointError, match=f"stores '{key}' as torch.complex64"):
        ef.load(tmp_path / "complex.safetensors")


# -- output locations: the user's file is named, never a hidden temporary ---------------


def test_a_write_that_cannot_start_names_the_target(tmp_path, monkeypatch):
    def refused(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied",
                              str(tmp_path / ".x.csv.abc123.tmp"))

    monkeypatch.setattr(tempfile, "mkstemp", refused)
    with pytest.raises(PermissionError) as info:
        atomic_write_text(tmp_path / "x.csv", "a")
    assert info.value.filename == str(tmp_path / "x.csv")


def test_sample_to_an_unwritable_place_names_the_file(run_dir, tmp_path, monkeypatch):
    target = tmp_path / "s.csv"

    def refused(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / ".s.csv.q.tmp"))

    monkeypatch.setattr(tempfile, "mkstemp", refused)
    code, _, err = run_cli(["sample", run_dir, "-n", "5", "-o", target])
    line = error_line(err)
    assert code == 1 and repr(str(target)) in line and ".tmp" not in line


def test_sample_to_a_folder_is_refused_with_its_name(run_dir, tmp_path):
    (tmp_path / "out.csv").mkdir()
    code, _, err = run_cli(["sample", run_dir, "-n", "5", "-o", tmp_path / "out.csv"])
    line = error_line(err)
    assert code == 1 and "out.csv" in line and "folder" in line and ".tmp" not in line


def test_a_full_disk_mid_stream_names_the_file_and_leaves_nothing(run_dir, tmp_path,
                                                                   monkeypatch):
    from exactflow.cli import output, tables

    calls = {"n": 0}
    real = tables.write_table.__globals__["csv_rows"]

    def filling(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setitem(tables.write_table.__globals__, "csv_rows", filling)
    monkeypatch.setattr(output, "CHUNK_VALUES", 64)
    target = tmp_path / "s.csv"
    code, _, err = run_cli(["sample", run_dir, "-n", "500", "-o", target])
    line = error_line(err)
    assert code == 1 and "no space left" in line and repr(str(target)) in line
    assert os.listdir(tmp_path) == []


def test_atomic_writes_replace_a_link_never_its_target(tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("keep")
    (tmp_path / "run").mkdir()
    link = tmp_path / "run" / "index.html"
    link.symlink_to(outside)
    atomic_write_text(link, "new")
    assert outside.read_text() == "keep"
    assert not link.is_symlink() and link.read_text() == "new"


# -- data files -------------------------------------------------------------------------


def test_an_empty_cell_names_line_and_column_and_suggests_dropping_the_row(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("a,b\n1,2\n3,\n5,6\n")
    with pytest.raises(DataError) as info:
        ef.datasets.load(path)
    text = str(info.value)
    assert "empty cell at line 3, column 2 ('b')" in text and "drop or impute" in text


def test_an_npz_array_chosen_in_the_path(tmp_path):
    a, b = np.zeros((4, 2)), np.arange(6.0).reshape(3, 2)
    np.savez(tmp_path / "two.npz", a=a, b=b)
    np.testing.assert_array_equal(ef.datasets.load(f"{tmp_path / 'two.npz'}:b"), b)
    np.testing.assert_array_equal(ef.datasets.load(tmp_path / "two.npz", key="a"), a)
    with pytest.raises(DataError, match=r"choose one with key= \(--key in the command "
                                        r"line\), or as .*two\.npz:a"):
        ef.datasets.load(tmp_path / "two.npz")
    with pytest.raises(DataError, match="no array 'c'"):
        ef.datasets.load(f"{tmp_path / 'two.npz'}:c")
    with pytest.raises(DataError, match="two arrays asked for"):
        ef.datasets.load(f"{tmp_path / 'two.npz'}:b", key="a")
    (tmp_path / "d.csv").write_text("1,2\n")
    with pytest.raises(DataError, match="applies to .npz files only"):
        ef.datasets.load(tmp_path / "d.csv", key="a")


# -- a closed pipe ----------------------------------------------------------------------


@pytest.mark.parametrize("extra", [
    ["-n", "300000", "--seed", "1"], ["-n", "50000", "--json"], ["score", 300_000],
    # (less than a chunk: the pipe took part of one write, Python dropped the rest, exit 0)
    ["-n", "10000", "--seed", "1"], ["score", 10_000],
], ids=["csv", "json", "score", "csv-one-write", "score-one-write"])
def test_a_closed_pipe_ends_quietly(run_dir, extra, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    command = ["sample", str(run_dir), *extra]
    if extra[0] == "score":  # (its scores were written in one piece: exit 0, rows lost)
        with np.load(run_dir / "data.npz") as npz:  # (within the training range: no note)
            seen = npz["train"]
        rows = seen[np.random.default_rng(0).integers(0, len(seen), extra[1])]
        np.save(tmp_path / "rows.npy", rows)
        command = ["score", str(run_dir), str(tmp_path / "rows.npy")]
    proc = subprocess.Popen(
        [sys.executable, "-m", "exactflow", *command],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.readline()
    time.sleep(1.0)  # (the command blocked in a write to the full pipe, as `| head` finds it)
    proc.stdout.close()  # as `| head -1` does
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141
    assert err == "", err


# -- the run folder ---------------------------------------------------------------------


def test_a_report_link_out_of_the_run_is_refused(run_dir, tmp_path):
    pytest.importorskip("matplotlib")
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (copy / "report").symlink_to(elsewhere)
    code, _, err = run_cli(["report", copy])
    line = error_line(err)
    assert code == 1 and "not a folder of the run" in line
    assert list(elsewhere.iterdir()) == []
    from exactflow.report import build_report

    with pytest.raises(RunError, match="a link or a file"):
        build_report(copy)


def test_every_file_of_a_run_has_the_same_ordinary_permissions(run_dir):
    mask = os.umask(0)
    os.umask(mask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in run_dir.iterdir() if p.is_file()}
    assert "model.safetensors" in modes and "run.json" in modes and "data.npz" in modes
    assert set(modes.values()) == {0o666 & ~mask}, modes


@pytest.mark.parametrize("encoding, errors, expected", [
    ("ascii", "backslashreplace", "temp\\xe9rature\ntemp\\xe9rature\n".encode("ascii")),
    ("utf-16", "strict", "température\ntempérature\n".encode("utf-16")),  # (one mark)
])
def test_stdout_keeps_its_encoding_and_error_handler(monkeypatch, encoding, errors, expected):
    # (to_stdout encoded strictly, each chunk alone: an error where the stream's handler
    # would have escaped, and a UTF-16 byte-order mark in every chunk)
    from exactflow.cli.output import to_stdout

    read_end, write_end = os.pipe()
    stream = io.TextIOWrapper(io.FileIO(write_end, "w"), encoding=encoding, errors=errors)
    monkeypatch.setattr(sys, "stdout", stream)
    to_stdout("température\n")
    to_stdout("température\n")
    stream.close()
    with io.FileIO(read_end, "r") as got:
        assert got.read() == expected
