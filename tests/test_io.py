"""Tests for exactflow.io: model files that round-trip exactly and never run code on load."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import exactflow as ef
from exactflow.io import CheckpointError, atomic_save, load, save
from tests.helpers import perturb

# Train on the CPU without a progress bar (the GPU test asks for CUDA itself).
CPU = {"progress": False, "device": "cpu"}

REPO = Path(__file__).resolve().parents[1]


def assert_same_density(a: ef.Flow, b: ef.Flow, x: torch.Tensor) -> None:
    a.eval(), b.eval()
    with torch.no_grad():
        assert torch.equal(a.log_prob(x), b.log_prob(x))


BUILDERS = [
    ("realnvp", lambda: ef.models.realnvp(2, layers=2, hidden=(8,), batch_norm=False), 2),
    ("maf", lambda: ef.models.maf(3, layers=2, hidden=(8,), permutation="random"), 3),
    ("nsf", lambda: ef.models.nsf(3, layers=2, hidden=(8,), bins=4), 3),
    ("planar", lambda: ef.models.planar(2, layers=3), 2),
]


@pytest.mark.parametrize(("name", "make", "d"), BUILDERS, ids=[b[0] for b in BUILDERS])
def test_round_trip_gives_identical_log_prob(tmp_path, name, make, d):
    flow = perturb(make(), scale=0.3)
    path = save(flow, tmp_path / "model.pt")
    assert path == tmp_path / "model.pt"
    loaded = load(path)
    assert loaded.config == flow.config and loaded.config["model"] == name
    assert not loaded.training
    assert_same_density(flow, loaded, torch.randn(64, d))
    assert sorted(os.listdir(tmp_path)) == ["model.pt"]


def test_standardization_travels_with_the_model(tmp_path):
    data = torch.randn(500, 2) * torch.tensor([3.0, 0.5]) + torch.tensor([10.0, -4.0])
    flow = perturb(ef.models.maf(2, layers=2, hidden=(8,), standardize=True), scale=0.3)
    fitted = ef.datasets.Standardize.fit(data)
    first = flow.transform[0]
    first.mean.copy_(fitted.mean), first.std.copy_(fitted.std)
    loaded = load(save(flow, tmp_path / "std.pt"))
    assert torch.equal(loaded.transform[0].mean, fitted.mean)
    assert torch.equal(loaded.transform[0].std, fitted.std)
    assert_same_density(flow, loaded, data[:50])


def test_a_trained_realnvp_with_batch_norm_round_trips(tmp_path):
    data = ef.datasets.toy("moons", 600, seed=0)
    flow = ef.models.realnvp(2, layers=3, hidden=(8,))
    ef.fit(flow, data, steps=20, batch_size=100, lr=1e-2, **CPU)
    stats = {k: v for k, v in flow.state_dict().items() if "running" in k}
    assert stats and not all(torch.equal(v, torch.zeros_like(v)) for v in stats.values())
    loaded = load(save(flow, tmp_path / "m.pt"))
    for k, v in stats.items():
        assert torch.equal(loaded.state_dict()[k], v)
    assert_same_density(flow, loaded, data[:100])


def test_a_hand_built_flow_cannot_be_saved(tmp_path):
    flow = ef.Flow(ef.transforms.LULinear(2), ef.StandardNormal(2))
    with pytest.raises(ValueError, match="builder"):
        save(flow, tmp_path / "m.pt")
    assert not (tmp_path / "m.pt").exists()
    flow.config = {"model": "planar", "features": 2, "bad": object()}
    with pytest.raises(ValueError, match="JSON"):
        save(flow, tmp_path / "m.pt")


class Payload:
    """Unpickling this object creates a marker file (stands in for arbitrary code)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("writer", ["torch.save", "pickle-2", "pickle-5"])
def test_a_pickle_with_a_code_payload_is_refused_without_running_it(tmp_path, writer):
    path, marker = tmp_path / "evil.pt", tmp_path / "pwned"
    payload = {"format": "exactflow", "version": 1, "config": "{}", "state_dict": Payload(marker)}
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        with open(path, "wb") as handle:
            pickle.dump(payload, handle, protocol=int(writer[-1]))
    with pytest.raises(CheckpointError, match="refusing to load.*never executes code"):
        load(path)
    assert not marker.exists()
    if writer == "torch.save":
        # The payload is live: an unsafe load would have run it.
        torch.load(path, weights_only=False)
        assert marker.exists()


def test_truncated_foreign_empty_and_missing_files(tmp_path):
    path = save(perturb(ef.models.planar(2, layers=2)), tmp_path / "m.pt")
    data = path.read_bytes()
    for cut in (len(data) // 2, 30):
        (tmp_path / "cut.pt").write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match="truncated|not a torch"):
            load(tmp_path / "cut.pt")
    (tmp_path / "random.pt").write_bytes(os.urandom(4096))
    with pytest.raises(CheckpointError, match="random.pt"):
        load(tmp_path / "random.pt")
    torch.save(torch.randn(3), tmp_path / "tensor.pt")
    with pytest.raises(CheckpointError, match="not an exactflow model file.*Tensor"):
        load(tmp_path / "tensor.pt")
    torch.save({"a": torch.zeros(1)}, tmp_path / "dict.pt")
    with pytest.raises(CheckpointError, match="not an exactflow model file"):
        load(tmp_path / "dict.pt")
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        load(tmp_path / "empty.pt")
    with pytest.raises(CheckpointError, match="no such model file"):
        load(tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match="is a folder, not a model file"):
        load(tmp_path)
    # A safetensors file that is not an exactflow model.
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(CheckpointError, match="not an exactflow model file"):
        load(tmp_path / "other.safetensors")


def legacy(flow: ef.Flow, path: Path) -> Path:
    """Write ``flow`` as exactflow 0.1 did: a torch archive of the config and the weights."""
    torch.save({"format": "exactflow", "version": 1, "exactflow_version": "0.1.0",
                "config": json.dumps(flow.config, sort_keys=True),
                "state_dict": {k: v.clone() for k, v in flow.state_dict().items()}}, path)
    return path


def rewrite(path: Path, **changes) -> Path:
    payload = torch.load(path, weights_only=True)
    payload.update(changes)
    torch.save(payload, path)
    return path


def rewrite_safetensors(path: Path, state=None, **metadata) -> Path:
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta.update(metadata)
    save_file(tensors if state is None else state, str(path), metadata=meta)
    return path


def test_model_files_are_safetensors_with_the_config_in_the_metadata(tmp_path):
    from safetensors import safe_open

    flow = perturb(ef.models.maf(3, layers=2, hidden=(8,), standardize=True))
    path = save(flow, tmp_path / "m.safetensors")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        assert set(f.keys()) == set(flow.state_dict())
    assert meta["format"] == "exactflow" and meta["version"] == "2"
    assert json.loads(meta["config"]) == flow.config


def test_files_written_by_exactflow_0_1_still_load(tmp_path):
    flow = perturb(ef.models.realnvp(2, layers=2, hidden=(8,)), scale=0.3)
    loaded = load(legacy(flow, tmp_path / "old.pt"))
    assert_same_density(flow, loaded, torch.randn(16, 2))
    # A 0.1 "maf" with fast="sampling" was an IAF: it loads as one, with its weights.
    iaf = perturb(ef.models.iaf(3, layers=2, hidden=(8,)), scale=0.3)
    old_config = {**iaf.config, "model": "maf", "fast": "sampling"}
    torch.save({"format": "exactflow", "version": 1, "config": json.dumps(old_config),
                "state_dict": iaf.state_dict()}, tmp_path / "old_iaf.pt")
    loaded = load(tmp_path / "old_iaf.pt")
    assert loaded.config["model"] == "iaf"
    assert_same_density(iaf, loaded, torch.randn(8, 3))


def test_newer_format_unknown_builder_and_mismatched_weights(tmp_path):
    flow = ef.models.realnvp(2, layers=2, hidden=(8,), batch_norm=False)
    with pytest.raises(CheckpointError, match="version 3.*upgrade"):
        load(rewrite_safetensors(save(flow, tmp_path / "v.safetensors"), version="3"))
    with pytest.raises(CheckpointError, match="version 3.*upgrade"):  # torch archives too
        load(rewrite(legacy(flow, tmp_path / "v.pt"), version=3))
    with pytest.raises(CheckpointError, match="unknown model 'glowworm'"):
        load(rewrite_safetensors(save(flow, tmp_path / "u.safetensors"),
                                 config='{"model": "glowworm"}'))
    bigger = flow.config | {"hidden": [16]}
    with pytest.raises(CheckpointError, match="do not match.*wrong shapes"):
        load(rewrite_safetensors(save(flow, tmp_path / "b.safetensors"),
                                 config=json.dumps(bigger)))
    state = flow.state_dict()
    state.pop(next(iter(state)))
    with pytest.raises(CheckpointError, match="do not match.*missing"):
        load(rewrite_safetensors(save(flow, tmp_path / "s.safetensors"), state=state))
    with pytest.raises(CheckpointError, match="do not match.*missing"):
        load(rewrite(legacy(flow, tmp_path / "s.pt"), state_dict=state))
    with pytest.raises(CheckpointError, match="not an exactflow model file"):
        ckpt = tmp_path / "train.ckpt"
        ef.fit(flow, ef.datasets.toy("moons", 128), steps=1, batch_size=64, checkpoint=ckpt,
               **CPU)
        load(ckpt)


@pytest.mark.parametrize(("key", "value"), [("layers", 10**6), ("features", 10**9),
                                            ("hidden", [10**8]), ("bins", 10**9)])
def test_sizes_the_weights_cannot_back_are_refused_before_building(tmp_path, key, value):
    flow = ef.models.nsf(2, layers=2, hidden=(8,), bins=4)
    path = rewrite_safetensors(save(flow, tmp_path / "m.safetensors"),
                               config=json.dumps(flow.config | {key: value}))
    with pytest.raises(CheckpointError, match=f"claims {key}"):
        load(path)


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    import errno

    flow = perturb(ef.models.planar(2, layers=2))
    path = save(flow, tmp_path / "m.pt")
    good = path.read_bytes()

    def disk_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="no space left") as err:
        save(perturb(ef.models.planar(2, layers=2)), path)
    assert err.value.filename == str(path)  # the message names the file
    monkeypatch.undo()
    assert path.read_bytes() == good and os.listdir(tmp_path) == ["m.pt"]
    assert_same_density(flow, load(path), torch.randn(8, 2))


def test_a_process_killed_mid_write_never_leaves_a_corrupt_file(tmp_path):
    target = tmp_path / "state.pt"
    atomic_save({"step": 1, "w": torch.ones(3)}, target)
    script = textwrap.dedent(
        f"""
        import os, signal, torch
        from exactflow.io import atomic_save
        real_save = torch.save
        def killed(obj, f, *args, **kwargs):
            real_save(obj, f, *args, **kwargs)
            f.truncate(f.tell() // 2)
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        torch.save = killed
        atomic_save({{"step": 2, "w": torch.zeros(3)}}, {str(target)!r})
        """
    )
    env = dict(os.environ, PYTHONPATH=str(REPO))
    result = subprocess.run([sys.executable, "-c", script], env=env, timeout=300)
    assert result.returncode == -9  # SIGKILL: no cleanup ran
    survivor = torch.load(target, weights_only=True)
    assert survivor["step"] == 1 and torch.equal(survivor["w"], torch.ones(3))
    # The kill leaves at most a stray temporary beside the target, never in its place.
    stray = [p for p in os.listdir(tmp_path) if p != "state.pt"]
    assert all(p.startswith(".state.pt.") and p.endswith(".tmp") for p in stray)


@pytest.mark.gpu
def test_load_to_cuda(tmp_path):
    flow = perturb(ef.models.planar(2, layers=2))
    loaded = load(save(flow, tmp_path / "m.pt"), map_location="cuda")
    assert next(loaded.parameters()).device.type == "cuda"


def test_a_pooled_standardization_is_rebuilt_pooled_and_filled_pooled(tmp_path):
    data = torch.randn(400, 3, dtype=torch.float64) * torch.tensor([0.2, 1.0, 3.0])
    flow = ef.models.maf(3, layers=2, hidden=(8,), standardize="pooled")
    assert flow.config["standardize"] == "pooled" and flow.transform[0].pooled
    ef.fit(flow.double(), data, steps=3, batch_size=100, val_fraction=0.0, **CPU)
    first = flow.transform[0]
    assert torch.allclose(first.std, data.std(unbiased=False).expand(3))
    assert torch.allclose(first.mean, data.mean().expand(3))
    loaded = load(save(flow, tmp_path / "pooled.pt"))
    assert loaded.transform[0].pooled and loaded.config["standardize"] == "pooled"
    assert_same_density(flow, loaded, data[:50])
    with pytest.raises(ValueError, match="standardize must be True"):
        ef.models.maf(3, standardize="per-column")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_model_with_a_standardization_layer_loads_in_its_own_dtype(tmp_path, dtype):
    flow = perturb(ef.models.maf(3, layers=2, hidden=(8,), standardize=True), scale=0.3)
    flow = flow.to(dtype)
    loaded = load(save(flow, tmp_path / "m.pt"))
    assert loaded.transform[0].dtype == dtype and loaded.transform[0].std.dtype == torch.float64
    assert_same_density(flow, loaded, torch.randn(20, 3, dtype=dtype))


def test_a_flow_whose_embedding_was_replaced_is_refused_when_saved(tmp_path):
    # (it was saved, and then ef.load refused the file: "the weights do not match")
    flow = ef.models.maf(2, context=3, embedding={"features": 4})
    flow.embedding = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh())
    state = torch.get_rng_state()
    with pytest.raises(ValueError, match=r"the flow's weights do not fit its builder config "
                                         r"\(missing \['embedding.2.bias'"):
        ef.save(flow, tmp_path / "flow.safetensors")
    assert not (tmp_path / "flow.safetensors").exists()
    assert torch.equal(torch.get_rng_state(), state)  # (the rebuild draws no numbers of ours)


def test_load_names_a_torch_archive_under_a_safetensors_name_and_takes_device_names(tmp_path):
    # (torch reads a path ending .safetensors as one: its SafetensorError leaked)
    torch.save({"a": torch.zeros(2)}, tmp_path / "x.safetensors")
    with pytest.raises(ef.io.CheckpointError, match="x.safetensors' is truncated or not a "
                                                    "torch file"):
        ef.load(tmp_path / "x.safetensors")
    path = ef.save(ef.models.maf(2, layers=1, hidden=(4,)), tmp_path / "m.safetensors")
    assert ef.load(path, map_location="auto").features == 2  # (listed, then refused)
    with pytest.raises(ValueError, match="map_location must be a device name"):
        ef.load(path, map_location={"cuda:0": "cpu"})
