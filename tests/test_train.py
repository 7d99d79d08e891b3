"""Tests for exactflow.training: fit (maximum likelihood), evaluate, checkpoints and resume."""

from __future__ import annotations

import json
import math
import os
import re
import sys
import time
import warnings

import numpy as np
import pytest
import torch
from torch import Tensor, nn

import exactflow as ef
import exactflow.training.likelihood as fit_module
from exactflow.datasets import DataError
from exactflow.io import CheckpointError
from exactflow.sklearn import FlowDensity
from exactflow.training import History, TrainingError, evaluate, fit
from exactflow.transforms import ActNorm, ElementwiseAffine, LULinear

# Train on the CPU without a progress bar (the GPU test asks for CUDA itself).
CPU = {"progress": False, "device": "cpu"}

def affine_flow(d: int = 2, seed: int = 0) -> ef.Flow:
    torch.manual_seed(seed)
    return ef.Flow(ef.Compose(LULinear(d), ElementwiseAffine(d)), ef.StandardNormal(d))


def gaussian_data(n: int, d: int = 2, seed: int = 1) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=gen) + 2 * torch.eye(d)
    return torch.randn(n, d, generator=gen) @ a.T + torch.arange(1.0, d + 1)


def gaussian_entropy(data: Tensor) -> float:
    cov = torch.cov(data.T.double())
    d = data.shape[1]
    return 0.5 * float(torch.logdet(cov)) + 0.5 * d * (1 + math.log(2 * math.pi))


def same_history(a: History, b: History) -> None:
    da, db = a.to_dict(), b.to_dict()
    da.pop("time"), db.pop("time")
    assert da == db


# -- learning, records, best weights ----------------------------------------------------


def test_fit_learns_a_gaussian_and_records_history():
    data = gaussian_data(1400, d=3)
    train, val = data[:1024], data[1024:]
    flow = affine_flow(3)
    start = evaluate(flow, val)["nll"]
    h = fit(flow, train, val, steps=240, batch_size=128, lr=0.03, eval_every=40, **CPU)
    # A record at step 0 (the model as it starts), then every eval_every steps.
    assert h.steps == [0, 40, 80, 120, 160, 200, 240]
    assert h.val_nll[0] == pytest.approx(start) and h.train_nll[0] is None
    assert h.lr[0] == 0.03  # (the rate the first step takes; it was 0.0)
    assert h.total_steps == 240 and h.objective == "nll" and h.features == 3
    assert len(h.train_nll) == len(h.val_nll) == len(h.lr) == len(h.time) == 7
    assert all(v is not None and math.isfinite(v) for v in h.val_nll)
    # The fitted Gaussian's NLL on the validation set is near the entropy of the generator.
    entropy = gaussian_entropy(data)
    assert start > entropy + 1.0
    assert h.best_val == min(h.val_nll) and h.best_step == h.steps[h.val_nll.index(h.best_val)]
    assert abs(h.best_val - entropy) < 0.15
    # bits per dimension are nats / (d ln 2); to_dict is strict JSON.
    assert h.val_bpd[-1] == pytest.approx(h.val_nll[-1] / (3 * math.log(2)))
    d = json.loads(json.dumps(h.to_dict(), allow_nan=False))
    assert d["val_bpd"] == pytest.approx(h.val_bpd)
    assert History.from_dict(d).val_nll == h.val_nll
    # The cosine schedule decays the learning rate to (nearly) zero.
    assert h.lr[1] < 0.03 and h.lr[-1] < 1e-3 and h.lr[1:] == sorted(h.lr[1:], reverse=True)
    # fit leaves the flow in eval mode, and the restored weights are the best ones.
    assert not flow.training
    assert evaluate(flow, val)["nll"] == pytest.approx(h.best_val, abs=1e-9)


def shifted_problem() -> tuple[Tensor, Tensor]:
    # Training data centred at 4, validation data at 1: moving from 0 towards 4 the
    # validation NLL first falls, then rises, so the best weights are not the last ones.
    gen = torch.Generator().manual_seed(3)
    train = torch.randn(512, 2, generator=gen) * 0.5 + 4.0
    val = torch.randn(256, 2, generator=gen) * 0.5 + 1.0
    return train, val


def test_best_weights_are_restored_without_patience():
    train, val = shifted_problem()
    flow = ef.Flow(ElementwiseAffine(2), ef.StandardNormal(2))
    h = fit(flow, train, val, steps=150, batch_size=64, lr=0.05, schedule="constant",
            eval_every=5, **CPU)
    assert not h.stopped_early and h.total_steps == 150
    assert h.best_step < 150 and h.val_nll[-1] > h.best_val + 0.5
    assert evaluate(flow, val)["nll"] == pytest.approx(h.best_val, abs=1e-9)


def test_patience_stops_early_and_restores_best():
    train, val = shifted_problem()
    flow = ef.Flow(ElementwiseAffine(2), ef.StandardNormal(2))
    h = fit(flow, train, val, steps=1000, batch_size=64, lr=0.05, schedule="constant",
            eval_every=5, patience=3, **CPU)
    assert h.stopped_early and h.total_steps < 1000
    best = h.val_nll.index(h.best_val)
    # Patience counts epochs (512 rows / 64 = 8 steps) in records every 5 steps: stopped at
    # the first record 3 epochs (24 steps, 5 records) past the best.
    assert len(h.val_nll) - 1 - best == math.ceil(3 * 8 / 5)
    assert evaluate(flow, val)["nll"] == pytest.approx(h.best_val, abs=1e-9)


def test_without_validation_the_last_weights_are_kept():
    train, _ = shifted_problem()
    flow = ef.Flow(ElementwiseAffine(2), ef.StandardNormal(2))
    h = fit(flow, train, steps=60, batch_size=64, lr=0.05, eval_every=20, val_fraction=0,
            **CPU)
    assert h.val_nll == [None, None, None] and h.best_val is None and h.best_step is None
    assert h.train_nll[-1] < h.train_nll[0]
    assert json.loads(json.dumps(h.to_dict()))["val_bpd"] == [None, None, None]


def test_epochs_set_the_number_of_steps_and_callback_can_stop():
    data = gaussian_data(300)
    h = fit(affine_flow(), data, epochs=3, batch_size=64, eval_every=1, **CPU)
    assert h.total_steps == 3 * (300 // 64)
    seen: list[int] = []

    def stop_at_7(history: History) -> bool:
        seen.append(history.steps[-1])
        return history.steps[-1] >= 7

    h = fit(affine_flow(), data, steps=50, batch_size=64, eval_every=1, **CPU,
            callback=stop_at_7)
    assert seen == list(range(1, 8)) and h.total_steps == 7 and h.stopped_early


class ModeSpy(ef.Transform):
    """The identity, recording whether it ran in train or eval mode."""

    def __init__(self):
        super().__init__()
        self.modes: list[bool] = []

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self.modes.append(self.training)
        return x, x.new_zeros(x.shape[0])

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return z, z.new_zeros(z.shape[0])


def test_train_mode_for_steps_eval_mode_for_validation_and_at_the_end():
    spy = ModeSpy()
    flow = ef.Flow(ef.Compose(ElementwiseAffine(2), spy), ef.StandardNormal(2))
    data = gaussian_data(300)
    fit(flow, data[:200], data[200:], steps=4, batch_size=50, eval_every=2, **CPU)
    # validation at step 0, step, step, validation, step, step, validation
    assert spy.modes == [False, True, True, False, True, True, False]
    assert not flow.training and not spy.training


# -- data handling -------------------------------------------------------------------------


def test_numpy_memmap_and_tensor_data_give_the_same_run(tmp_path):
    data = gaussian_data(400).numpy()
    np.save(tmp_path / "train.npy", data)
    mm = np.load(tmp_path / "train.npy", mmap_mode="r")
    assert isinstance(mm, np.memmap)
    results = []
    for source in (torch.from_numpy(data), data, mm, ef.datasets.Subset(mm)):
        flow = affine_flow()
        h = fit(flow, source, steps=20, batch_size=64, eval_every=10, **CPU)
        results.append((h.train_nll, [p.detach().clone() for p in flow.parameters()]))
    for nll, params in results[1:]:
        assert nll == results[0][0]
        assert all(torch.equal(a, b) for a, b in zip(params, results[0][1], strict=True))


class CountingRows(np.ndarray):
    """An ndarray that records how many rows each read by index touches."""

    reads: list[int]

    def __getitem__(self, index):
        if isinstance(index, np.ndarray):
            CountingRows.reads.append(len(index))
        return super().__getitem__(index)


def test_batches_read_only_their_own_rows():
    CountingRows.reads = []
    data = gaussian_data(1000).numpy().view(CountingRows)
    fit(affine_flow(), data, steps=5, batch_size=32, eval_every=5, val_fraction=0, **CPU)
    assert CountingRows.reads == [32] * 5


@pytest.mark.parametrize(
    ("train", "kwargs", "message"),
    [
        (torch.full((100, 2), float("nan")), {}, "NaN or inf in 100 rows"),
        (torch.randn(100, 3), {}, "expected 2 columns"),
        (torch.randn(20, 2), {"batch_size": 32}, "fewer than one batch"),
        (np.array([["1", "2"], ["x", "4"]] * 20, dtype=object), {}, "non-numeric cell 'x'"),
        (torch.randn(100), {}, "2-D"),
        (torch.randn(2, 2), {"batch_size": None}, "has 2 rows for 2 columns"),
        # (an exact copy of a column was trained on in silence: +69 nats at 200 columns)
        (torch.randn(100, 1).repeat(1, 2), {}, "columns 0, 1 .* are linearly dependent"),
    ],
)
def test_bad_training_data_is_refused_before_training(train, kwargs, message):
    flow = affine_flow()
    before = [p.detach().clone() for p in flow.parameters()]
    with pytest.raises(DataError, match=message):
        fit(flow, train, steps=3, batch_size=kwargs.get("batch_size", 16), **CPU)
    assert all(torch.equal(a, b) for a, b in zip(before, flow.parameters(), strict=True))


def test_dependent_columns_are_found_past_the_first_rows_and_an_ordered_table_is_kept(
    monkeypatch
):
    from exactflow.datasets import checks

    read = []
    real = checks.check_full_rank
    monkeypatch.setattr(checks, "check_full_rank",
                        lambda data, *a, **kw: read.append(len(data)) or real(data, *a, **kw))
    x = torch.randn(3000, 2, dtype=torch.float64)
    x[:1500, 1] = 2 * x[:1500, 0]  # (ordered: the first rows lie on a line, the others not)
    fit(affine_flow().double(), x, steps=1, batch_size=64, **CPU)
    assert read == [1000]  # (the first 1,000 rows: dependent, so all 3,000 decide)
    x[1500:, 1] = 2 * x[1500:, 0]
    with pytest.raises(DataError, match="columns 0, 1 .* linearly dependent"):
        fit(affine_flow().double(), x, steps=1, batch_size=64, **CPU)


def test_nan_rows_are_named_and_bad_validation_data_refused():
    data = torch.randn(100, 2)
    data[[7, 42]] = float("inf")
    with pytest.raises(DataError, match=r"row indices 7, 42"):
        fit(affine_flow(), data, steps=1, batch_size=16, **CPU)
    with pytest.raises(DataError, match="validation data"):
        fit(affine_flow(), torch.randn(100, 2), torch.randn(10, 5), steps=1, batch_size=16,
            **CPU)


def test_bad_arguments():
    data = torch.randn(64, 2)
    with pytest.raises(ValueError, match="steps or epochs"):
        fit(affine_flow(), data, steps=2, epochs=1, batch_size=16, **CPU)
    with pytest.raises(ValueError, match="schedule"):
        fit(affine_flow(), data, steps=2, schedule="linear", batch_size=16, **CPU)
    with pytest.raises(ValueError, match="checkpoint"):
        fit(affine_flow(), data, steps=2, resume=True, batch_size=16, **CPU)
    with pytest.raises(ValueError, match="lr"):
        fit(affine_flow(), data, steps=2, lr=-1.0, batch_size=16, **CPU)
    with pytest.raises(TypeError, match="Flow"):
        fit(LULinear(2), data, steps=2, batch_size=16, **CPU)


class ContextShift(ef.Transform):
    """``z = x - W c``: a conditional shift (log-det 0)."""

    def __init__(self, features: int, context: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(features, context))

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return x - context @ self.weight.T, x.new_zeros(x.shape[0])

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return z + context @ self.weight.T, z.new_zeros(z.shape[0])


def test_conditional_flow_sees_the_context_row_of_each_data_row():
    gen = torch.Generator().manual_seed(5)
    c = torch.randn(600, 3, generator=gen)
    x = c[:, :2] * 3.0 + 0.2 * torch.randn(600, 2, generator=gen)
    flow = ef.Flow(ef.Compose(ContextShift(2, 3), ElementwiseAffine(2)), ef.StandardNormal(2),
                   context=3)
    h = fit(flow, x[:500], x[500:], context=c[:500], val_context=c[500:], steps=300,
            batch_size=100, lr=0.05, eval_every=100, **CPU)
    # Only a row-aligned context explains x: the NLL reaches the noise's entropy (~ -1.38).
    noise_entropy = 2 * (0.5 * math.log(2 * math.pi * math.e) + math.log(0.2))
    assert h.best_val < noise_entropy + 0.2
    with pytest.raises(ValueError, match="conditional"):
        fit(flow, x[:500], steps=1, batch_size=100, **CPU)
    with pytest.raises(DataError, match="rows"):
        fit(flow, x[:500], context=c[:400], steps=1, batch_size=100, **CPU)
    with pytest.raises(ValueError, match="unconditional"):
        fit(affine_flow(), x, context=c, steps=1, batch_size=100, **CPU)


# -- determinism, checkpoints, resume ----------------------------------------------------


def test_same_seed_same_run_other_seed_other_run():
    data = gaussian_data(500)
    runs = []
    for seed in (0, 0, 1):
        flow = affine_flow(seed=11)
        h = fit(flow, data[:400], data[400:], steps=30, batch_size=64, eval_every=10, seed=seed,
                **CPU)
        runs.append((h, flow.state_dict()))
    (h0, s0), (h1, s1), (h2, s2) = runs
    same_history(h0, h1)
    assert all(torch.equal(s0[k], s1[k]) for k in s0)
    assert h0.train_nll != h2.train_nll
    assert not all(torch.equal(s0[k], s2[k]) for k in s0)


def test_fit_leaves_the_global_rng_alone():
    flow, data = affine_flow(), gaussian_data(200)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    fit(flow, data, steps=3, batch_size=64, **CPU)
    assert torch.equal(torch.rand(3), expected)


class Interrupt(Exception):
    pass


def small_realnvp(seed: int) -> ef.Flow:
    torch.manual_seed(seed)
    return ef.models.realnvp(2, layers=3, hidden=(16,))  # with batch norm between couplings


def actnorm_flow(seed: int) -> ef.Flow:
    torch.manual_seed(seed)
    layers = ef.Compose(ActNorm(2), LULinear(2), ActNorm(2))  # data-dependent initialization
    return ef.Flow(layers, ef.StandardNormal(2))


@pytest.mark.parametrize(
    "make", [affine_flow, small_realnvp, actnorm_flow], ids=["affine", "realnvp", "actnorm"]
)
def test_resume_matches_an_uninterrupted_run(tmp_path, make):
    data = gaussian_data(700)
    train, val = data[:300], data[300:]  # 300 // 64 = 4 batches per epoch: many epochs
    kwargs = dict(steps=60, batch_size=64, lr=0.02, eval_every=5, **CPU, seed=3)

    whole = make(seed=2)
    h_whole = fit(whole, train, val, **kwargs)

    path = tmp_path / "run.ckpt"

    def crash_at_35(history: History) -> None:
        if history.steps[-1] == 35:
            raise Interrupt

    first = make(seed=2)
    with pytest.raises(Interrupt):
        fit(first, train, val, checkpoint=path, checkpoint_every=10, callback=crash_at_35,
            **kwargs)
    assert path.exists()  # written at step 30
    resumed = make(seed=99)  # a fresh object; its own initial weights are overwritten
    h_resumed = fit(resumed, train, val, checkpoint=path, checkpoint_every=10, resume=True,
                    **kwargs)
    same_history(h_whole, h_resumed)
    whole_state, resumed_state = whole.state_dict(), resumed.state_dict()
    assert all(torch.equal(whole_state[k], resumed_state[k]) for k in whole_state)
    assert [name for name in os.listdir(tmp_path)] == ["run.ckpt"]
    # Resuming a finished run returns its history without training further.
    again = make(seed=5)
    h_again = fit(again, train, val, checkpoint=path, resume=True, **kwargs)
    same_history(h_whole, h_again)
    assert all(torch.equal(whole_state[k], v) for k, v in again.state_dict().items())


def test_resume_of_a_checkpoint_with_per_layer_optimizer_state_is_a_clear_error(tmp_path):
    # exactflow 0.1 kept two tensors per conditioner layer; its optimizer state has one
    # entry per tensor, which the packed networks of this version cannot take.
    data = gaussian_data(300)
    path = tmp_path / "run.ckpt"
    fit(ef.models.realnvp(2, layers=2, hidden=(8,)), data, steps=4, batch_size=64,
        checkpoint=path, **CPU)
    payload = torch.load(path, weights_only=True)
    group = payload["optimizer"]["param_groups"][0]
    group["params"] = group["params"] + [max(group["params"]) + 1]
    payload.pop("sha256")  # (exactflow 0.1 wrote none)
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="optimizer state.*if exactflow 0.1 wrote it"):
        fit(ef.models.realnvp(2, layers=2, hidden=(8,)), data, steps=8, batch_size=64,
            checkpoint=path, resume=True, **CPU)


def test_resume_refuses_a_checkpoint_of_another_run(tmp_path):
    data = gaussian_data(300)
    path = tmp_path / "run.ckpt"
    fit(affine_flow(), data, steps=4, batch_size=64, checkpoint=path, **CPU)
    with pytest.raises(CheckpointError, match="batch_size"):
        fit(affine_flow(), data, steps=4, batch_size=32, checkpoint=path, resume=True,
            **CPU)
    with pytest.raises(CheckpointError, match="does not fit this flow"):
        fit(ef.Flow(LULinear(2), ef.StandardNormal(2)), data, steps=4, batch_size=64,
            checkpoint=path, resume=True, **CPU)
    # Other rows of the same number (moons for 8gaussians, say) resumed without a word.
    with pytest.raises(CheckpointError, match="written for other training rows"):
        fit(affine_flow(), gaussian_data(300) + 1.0, steps=8, batch_size=64,
            checkpoint=path, resume=True, **CPU)
    assert fit(affine_flow(), data, steps=8, batch_size=64, checkpoint=path, resume=True,
               **CPU).total_steps == 8
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="truncated"):
        fit(affine_flow(), data, steps=4, batch_size=64, checkpoint=path, resume=True,
            **CPU)


def test_resume_without_a_checkpoint_starts_afresh(tmp_path):
    data = gaussian_data(300)
    path = tmp_path / "sub" / "run.ckpt"
    h = fit(affine_flow(), data, steps=6, batch_size=64, eval_every=3, checkpoint=path,
            resume=True, **CPU)
    assert h.total_steps == 6 and path.exists()


def test_a_crash_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    data = gaussian_data(300)
    path = tmp_path / "run.ckpt"
    fit(affine_flow(), data, steps=4, batch_size=64, eval_every=2, checkpoint=path,
        **CPU)
    good = path.read_bytes()
    real_save = torch.save

    def dying_save(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        f.truncate(f.tell() // 2)  # half the bytes are on disk, then the process "dies"
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(OSError, match="disk full"):
        fit(affine_flow(), data, steps=4, batch_size=64, eval_every=2, checkpoint=path,
            **CPU)
    monkeypatch.undo()
    assert path.read_bytes() == good
    assert os.listdir(tmp_path) == ["run.ckpt"]  # no temporary file left behind
    h = fit(affine_flow(), data, steps=4, batch_size=64, eval_every=2, checkpoint=path,
            resume=True, **CPU)
    assert h.total_steps == 4


# -- divergence: rollback and TrainingError ------------------------------------------------


class LogScale(ef.Transform):
    """``z = a x`` with log-det ``d log(a)``: NaN once an update pushes ``a`` below 0."""

    def __init__(self, a: float):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(a))

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return x * self.a, (x.shape[1] * torch.log(self.a)).expand(x.shape[0])

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return z / self.a, (-z.shape[1] * torch.log(self.a)).expand(z.shape[0])


def test_non_finite_steps_are_rolled_back_and_the_lr_halved():
    # Data of scale 0.1: the optimum is a = 10. Starting at a = 30 with a huge lr, Adam's
    # first step jumps to a < 0, where log(a) is NaN.
    raw = gaussian_data(512)
    data = 0.1 * (raw - raw.mean(0)) / raw.std(0)
    flow = ef.Flow(LogScale(30.0), ef.StandardNormal(2))
    h = fit(flow, data, steps=200, batch_size=64, lr=50.0, schedule="constant", eval_every=1,
            grad_clip=None, val_fraction=0, **CPU)
    assert h.rollbacks and h.rollbacks[0] == 2  # step 1 applied a < 0; step 2 saw the NaN
    assert h.train_nll[1] is None  # the only step of that record was undone
    # Each rollback halved the learning rate; training went on and converged.
    assert h.lr[-1] == pytest.approx(50.0 * 0.5 ** len(h.rollbacks))
    a = float(flow.transform.a.detach())
    assert math.isfinite(a) and a > 0
    assert evaluate(flow, data)["n_nonfinite"] == 0
    assert h.train_nll[-1] < h.train_nll[0] - 1.0


class NaNLogDet(ef.Transform):
    """An affine map whose log-det is always NaN."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(2))

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return x * self.w, torch.full_like(x[:, 0], math.nan) + self.w.sum()

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return z / self.w, z.new_zeros(z.shape[0])


class SqrtAtZero(ef.Transform):
    """Finite loss but an infinite gradient: log-det ``sqrt(s)`` at ``s = 0``."""

    def __init__(self):
        super().__init__()
        self.s = nn.Parameter(torch.zeros(()))

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return x, torch.sqrt(self.s).expand(x.shape[0])

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return z, -torch.sqrt(self.s).expand(z.shape[0])


class BreaksLater(ef.Transform):
    """The identity until its 13th training call, then a NaN log-det for good."""

    calls = 0

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self.calls += self.training
        return x, x.new_full(x.shape[:1], math.nan if self.calls > 12 else 0.0)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return z, z.new_zeros(z.shape[0])


@pytest.mark.parametrize(("layer", "what"), [(NaNLogDet, "loss"), (SqrtAtZero, "gradient norm")])
def test_a_loss_never_finite_from_the_start_names_the_users_layer(layer, what):
    # (not "diverged ... lower the learning rate": no step was ever finite, and a layer of
    # the user's own is the likely cause)
    flow = ef.Flow(ef.Compose(ElementwiseAffine(2), layer()), ef.StandardNormal(2))
    before = {k: v.clone() for k, v in flow.state_dict().items()}
    with pytest.raises(TrainingError) as info:
        fit(flow, gaussian_data(256), steps=100, batch_size=64, lr=1e-2, **CPU)
    message = str(info.value)
    assert f"failed at step 5: the {what} was non-finite (NaN or inf) at every step from the " \
           "start" in message and "no learning rate helps" in message
    assert "ElementwiseAffine" in message and "grad_clip" not in message
    assert f"Check your own layers ({layer.__name__}) with ef.check_transform" in message
    assert "standardiz" in message
    # The model was never updated with a non-finite step.
    assert all(torch.equal(before[k], v) for k, v in flow.state_dict().items())


def test_persistent_divergence_after_good_steps_raises_a_helpful_error():
    flow = ef.Flow(ef.Compose(ElementwiseAffine(2), BreaksLater()), ef.StandardNormal(2))
    with pytest.raises(TrainingError) as info:
        fit(flow, gaussian_data(256), steps=100, batch_size=64, lr=1e-2, val_fraction=0,
            **CPU)
    message = str(info.value)
    assert "diverged at step 17: the loss was non-finite (NaN or inf) on 5 steps" in message
    assert "ElementwiseAffine, BreaksLater" in message
    assert "learning rate" in message and "grad_clip" in message and "standardiz" in message
    assert "Check your own layers (BreaksLater) with ef.check_transform" in message


# -- evaluate ----------------------------------------------------------------------------------


def test_evaluate_matches_the_closed_form_in_chunks_and_batch_one():
    flow = ef.Flow(ElementwiseAffine(3), ef.StandardNormal(3)).double()
    with torch.no_grad():
        flow.transform.log_scale.copy_(torch.tensor([0.3, -0.2, 0.1]))
        flow.transform.shift.copy_(torch.tensor([1.0, 0.0, -1.0]))
    x = torch.randn(1001, 3, dtype=torch.float64)
    log_scale, shift = flow.transform.log_scale.detach(), flow.transform.shift.detach()
    z = x * torch.exp(log_scale) + shift
    nll = 0.5 * (z**2).sum(1) + 1.5 * math.log(2 * math.pi) - log_scale.sum()
    full = evaluate(flow, x, batch_size=4096)
    assert full["nll"] == pytest.approx(float(nll.mean()), abs=1e-12)
    assert full["nll_se"] == pytest.approx(float(nll.std() / math.sqrt(1001)), rel=1e-9)
    assert full["bpd"] == pytest.approx(full["nll"] / (3 * math.log(2)))
    assert full["n"] == 1001 and full["n_nonfinite"] == 0
    chunked = evaluate(flow, x.numpy(), batch_size=7)
    assert chunked["nll"] == pytest.approx(full["nll"], abs=1e-12)
    assert chunked["nll_se"] == pytest.approx(full["nll_se"], rel=1e-9)
    one = evaluate(flow, x[:1])
    assert one["nll"] == pytest.approx(float(nll[0])) and math.isnan(one["nll_se"])


def test_evaluate_reports_non_finite_log_probs():
    flow = ef.Flow(ElementwiseAffine(2), ef.Uniform(-1.0, 1.0, features=2))
    x = torch.tensor([[0.0, 0.0], [0.5, 0.5], [3.0, 0.0]])
    out = evaluate(flow, x)
    assert out["n_nonfinite"] == 1 and out["nll"] == math.inf
    assert out["nll_finite"] == pytest.approx(math.log(4.0))


def test_evaluate_restores_modes_and_checks_input():
    spy = ModeSpy()
    flow = ef.Flow(spy, ef.StandardNormal(2)).train()
    evaluate(flow, torch.randn(5, 2))
    assert spy.modes == [False] and flow.training and spy.training
    with pytest.raises(DataError, match="columns"):
        evaluate(flow, torch.randn(5, 3))
    with pytest.raises(DataError, match="NaN or inf"):
        evaluate(flow, torch.tensor([[0.0, math.nan]]))


# -- progress bar and devices ------------------------------------------------------------------


def test_progress_bar_on_a_terminal_and_lines_elsewhere(monkeypatch, capsys):
    pytest.importorskip("tqdm")
    import exactflow.training.loop as loop

    data = gaussian_data(200)
    fit(affine_flow(), data, steps=3, batch_size=64, progress=True, device="cpu")
    assert "fit" not in capsys.readouterr().err  # not a terminal, and under 30 s: no line
    monkeypatch.setattr(loop, "PROGRESS_EVERY", 0.0)  # elsewhere: a line per interval
    fit(affine_flow(), data, steps=3, batch_size=64, progress=True, device="cpu")
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 3 and lines[-1].startswith("fit: step 3 of at most 3")
    assert "nll" in lines[-1] and "\r" not in "".join(lines)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    fit(affine_flow(), data, steps=3, batch_size=64, progress=True, device="cpu")
    err = capsys.readouterr().err
    assert "fit" in err and "3/3" in err and "nll=" in err


def test_no_progress_bar_without_tqdm(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    h = fit(affine_flow(), gaussian_data(200), steps=3, batch_size=64, progress=True,
            device="cpu")
    assert h.total_steps == 3 and capsys.readouterr().err == ""


def test_weight_decay_pulls_weights_towards_zero():
    train, _ = shifted_problem()  # whitening x ~ N(4, 0.5^2) takes z = 2 x - 8
    shifts = []
    for decay in (0.0, 1.0):
        flow = ef.Flow(ElementwiseAffine(2), ef.StandardNormal(2))
        fit(flow, train, steps=200, batch_size=64, lr=0.05, weight_decay=decay, **CPU)
        shifts.append(float(flow.transform.shift.detach().abs().mean()))
    assert shifts[0] > 2.0 and shifts[1] < shifts[0] - 0.5


@pytest.mark.gpu
def test_fit_on_cuda_moves_batches_and_matches_cpu_quality():
    data = gaussian_data(1000)
    flow = affine_flow()
    h = fit(flow, data[:800], data[800:], steps=100, batch_size=100, lr=0.03, device="auto",
            **CPU)
    assert next(flow.parameters()).device.type == "cuda"
    assert evaluate(flow, data[800:])["nll"] == pytest.approx(h.best_val, abs=1e-5)


@pytest.mark.slow
def test_compiled_fit_follows_the_eager_fit():
    # ActNorm first: it initializes on the first batch, which compile=True ran compiled
    # (where it cannot initialize): the layer stayed the identity, 1,450 nats worse.
    data = 10 * gaussian_data(600) + 50
    runs = []
    for compiled in (False, True):
        torch.manual_seed(0)
        made = ef.models.maf(2, layers=2, hidden=(16,))
        flow = ef.Flow(ef.Compose(ef.transforms.ActNorm(2), made.transform), made.base)
        history = fit(flow, data[:500], data[500:], steps=12, batch_size=100, lr=1e-2,
                      compile=compiled, **CPU)
        assert bool(flow.transform[0].initialized)
        runs.append((flow, history))
    (eager, h_eager), (compiled, h_compiled) = runs
    assert h_compiled.compiled == "compiled"
    for p, q in zip(eager.parameters(), compiled.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)
    assert h_compiled.best_val == pytest.approx(h_eager.best_val, abs=1e-4)


def test_compile_takes_a_bool_or_auto():
    # (1 == True passed the check, then ran eager: `mode is True` was False)
    for bad in (1, "yes", None):
        with pytest.raises(ValueError, match=f"compile must be True, False or 'auto', got "
                                             f"{re.escape(repr(bad))}"):
            fit(affine_flow(), gaussian_data(100), steps=1, compile=bad, **CPU)
    history = fit(affine_flow(), gaussian_data(100), steps=1, compile=np.False_, **CPU)
    assert history.compiled == "eager"


# -- defaults that follow the data -----------------------------------------------------------


def test_batch_norm_ends_with_population_statistics_eval_agrees_with_training():
    # On 200 rows, RealNVP's running variances drift (the last batches decide them): its
    # eval-mode log-densities of the training rows then differ from training mode. After
    # fit, each BatchNorm holds the statistics of its input over the whole training set, so
    # eval mode scores the training rows as training mode does on the whole set at once.
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(200, 3, generator=gen) @ torch.randn(3, 3, generator=gen)
    flow = ef.models.realnvp(3, layers=4, hidden=(16,), batch_norm=True)
    fit(flow, x, steps=150, batch_size=32, lr=5e-3, val_fraction=0, **CPU)
    with torch.no_grad():
        flow.eval()
        eval_logp = flow.log_prob(x)
        flow.train()
        with pytest.warns(UserWarning, match="BatchNorm layer ran in training mode without "
                                             "gradients .* call flow.eval"):
            train_logp = flow.log_prob(x)  # one batch: the whole training set
        flow.eval()
    torch.testing.assert_close(eval_logp, train_logp, atol=1e-3, rtol=1e-4)


def test_fit_runs_batch_norm_without_gradients_only_without_a_warning():
    # ActNorm's initialization on the whole batch (with input noise or accumulated
    # micro-batches) ran a BatchNorm in training mode under no_grad, and the warning meant
    # for a user scoring without eval() fired from inside fit.
    from exactflow.transforms.autoregressive import MaskedAffineAutoregressive as Made
    from exactflow.transforms.normalization import ActNorm, BatchNorm

    x = torch.randn(300, 2, generator=torch.Generator().manual_seed(1))
    for options in ({"noise": 0.1}, {"batch_size": 64, "accumulate": 2}):
        flow = ef.Flow(ef.Compose(ActNorm(2), Made(2, hidden=[8]), BatchNorm(2),
                                  Made(2, hidden=[8])), ef.StandardNormal(2))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            fit(flow, x, steps=10, **options, **CPU)


def test_small_tables_get_a_batch_size_and_a_validation_split_that_fit():
    # 90 rows: the old default batch of 512 was an error.
    x = gaussian_data(90, d=2)
    history = fit(affine_flow(2), x, lr=0.05, **CPU)
    assert history.best_step is not None and history.steps[0] == 0
    assert fit_module.default_batch_size(81) == 32 and fit_module.default_batch_size(10) == 10
    assert fit_module.default_batch_size(1000) == 125
    assert fit_module.default_batch_size(100_000) == 256


def test_the_context_is_standardized_like_the_data():
    gen = torch.Generator().manual_seed(1)
    context = 30.0 * torch.randn(512, 2, generator=gen) + 100.0
    x = context[:, :1] / 30.0 + 0.1 * torch.randn(512, 1, generator=gen)
    flow = ef.models.maf(1, layers=2, hidden=(16,), context=2, standardize=True)
    fit(flow, x, context=context, steps=20, **CPU)
    scaler = flow.context_scaler
    assert scaler is not None
    assert torch.allclose(scaler.mean.float(), context.mean(0), rtol=0.05)
    assert torch.allclose(scaler.std.float(), context.std(0), rtol=0.1)


def test_noise_regularization_perturbs_training_batches_only():
    x = gaussian_data(400, d=2)
    seen = []

    class Spy(ef.Transform):
        def forward(self, z, context=None):
            if self.training:
                seen.append(z.detach().clone())
            return z, z.new_zeros(z.shape[0])

        def inverse(self, z, context=None):
            return z, z.new_zeros(z.shape[0])

    flow = ef.Flow(ef.Compose(Spy(), ElementwiseAffine(2)), ef.StandardNormal(2))
    fit(flow, x, steps=3, batch_size=400, noise=0.5, val_fraction=0, lr=1e-9, **CPU)
    # The batches are the data plus noise of 0.5 column standard deviations.
    spread = (seen[0] - x).std(0) / x.std(0)
    assert torch.all((spread > 0.4) & (spread < 0.6))
    with pytest.raises(ValueError, match="noise"):
        fit(affine_flow(2), x, steps=1, noise=-1.0, **CPU)


def test_compile_auto_stays_eager_for_short_runs_and_says_why():
    h = fit(affine_flow(2), gaussian_data(512), steps=60, batch_size=64, **CPU)
    assert h.compiled.startswith("eager: the run is too short")


def test_compile_auto_says_when_a_run_ends_during_its_compile_and_spares_time_limits(
        monkeypatch):
    # A time-limited fit (150 s) spent 161 s compiling with a cold cache, trained 32 steps
    # and recorded "eager: the run is too short for compiling to pay".
    import time

    from exactflow.training import compiled

    def slow_compile(fn):
        def run(*args):
            time.sleep(1.2)  # (a compile, at the first compiled step)
            return fn(*args)
        return run

    monkeypatch.setattr(compiled, "_compiled", slow_compile)
    monkeypatch.setattr(compiled, "COMPILE_SECONDS", 0.0)  # every run "pays"
    x = torch.zeros(4, 1)

    def calls(loss, n):
        for _ in range(n):
            loss(x, None)

    loss = compiled.LossFunction(lambda: lambda x, c: x.sum(1), "auto", 1000)
    calls(loss, compiled.WARMUP + compiled.TIMED + 1)
    assert loss.decision == "compiled: the run ended before compiled steps were timed"
    calls(loss, 2)
    assert loss.decision.startswith("compiled (compiling took 1 s): the run ended before")
    # With a time limit, too little time left: no compile, and the reason said.
    loss = compiled.LossFunction(lambda: lambda x, c: x.sum(1), "auto", 1000,
                                 stop_at=time.perf_counter() + 100.0)
    calls(loss, 40)
    assert loss.decision == "eager: the time limit leaves too little time to risk a compile"
    h = fit(affine_flow(2), gaussian_data(512), steps=200, batch_size=64, time_limit=100,
            **CPU)
    assert h.compiled == loss.decision
    # A compile that runs past the time limit says so.
    monkeypatch.setattr(compiled, "SLOW_COMPILE_SECONDS", 0.0)
    loss = compiled.LossFunction(lambda: lambda x, c: x.sum(1), "auto", 1000,
                                 stop_at=time.perf_counter() + 1.0)
    calls(loss, compiled.WARMUP + compiled.TIMED + 1)
    with pytest.warns(UserWarning, match=r"compiling the loss took 1 s and ran past the time "
                                         r"limit by \d s.*compile=False"):
        calls(loss, 2)


@pytest.mark.slow
def test_compile_auto_compiles_when_it_pays_and_keeps_the_faster(monkeypatch):
    from exactflow.training import compiled

    monkeypatch.setattr(compiled, "COMPILE_SECONDS", 0.0)  # every run "pays"
    flow = ef.models.nsf(2, layers=2, hidden=(16,))
    h = fit(flow, gaussian_data(2048), steps=80, batch_size=64, val_fraction=0, **CPU)
    assert h.compiled.startswith(("compiled: ", "eager: compiled steps were not faster"))
    assert "x" in h.compiled and np.isfinite(h.train_nll[-1])


def test_fit_optimizer_is_fused_adamw_and_updates_as_torchs_default_does():
    from exactflow.training.loop import adam

    def run(make) -> list[Tensor]:
        torch.manual_seed(0)
        flow = ef.models.realnvp(3, layers=2, hidden=(8,), batch_norm=False).double()
        params = list(flow.parameters())
        optimizer = make(params)
        gen = torch.Generator().manual_seed(1)
        for _ in range(5):
            optimizer.zero_grad()
            x = torch.randn(32, 3, generator=gen, dtype=torch.float64)
            (-flow.log_prob(x).mean()).backward()
            optimizer.step()
        return [p.detach().clone() for p in params]

    fused = adam([torch.zeros(2, requires_grad=True)], 1e-2, weight_decay=0.1)
    assert fused.defaults["fused"] and fused.defaults["weight_decay"] == 0.1
    ours = run(lambda p: adam(p, 1e-2, weight_decay=0.01))
    torchs = run(lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.01))
    for a, b in zip(ours, torchs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_noise_follows_each_columns_spread_under_a_pooled_scale_too():
    from exactflow.training.batches import wrap
    from exactflow.training.calibrate import noise_std

    x = torch.randn(500, 3, dtype=torch.float64) * torch.tensor([0.1, 1.0, 5.0])
    rows = wrap(x, "training data", 3, strict=True)
    own = x.std(0, unbiased=False) * 0.2
    for standardize in (True, "pooled"):
        flow = ef.models.maf(3, layers=1, hidden=(8,), standardize=standardize).double()
        ef.fit(flow, x, steps=1, val_fraction=0.0, **CPU)
        torch.testing.assert_close(noise_std(0.2, flow, rows).double(), own,
                                   rtol=1e-5, atol=0)


def test_far_from_standardized_data_warn_at_the_users_line():
    # The warning says how to get a standardization layer wherever the flow was built, and
    # points at the caller's line, however deep in the package it was found.
    rows = torch.randn(200, 2, dtype=torch.float64) * 50 + 5000
    flow = ef.models.maf(2, layers=1, hidden=(8,), standardize=False)
    with pytest.warns(UserWarning, match=r"reach 5.*standardize=True \(FlowDensity"
                                         r"\(standardize=True\); in the command line, leave "
                                         r"out --no-standardize\)") as caught:
        ef.fit(flow, rows, steps=2, progress=False)
    assert [w.filename for w in caught] == [__file__]
    with pytest.warns(UserWarning, match="no standardization layer") as caught:
        FlowDensity(model="maf", layers=1, hidden=(8,), steps=2,
                    standardize=False).fit(rows.numpy())
    assert [w.filename for w in caught] == [__file__]


def test_data_the_splines_cannot_reach_or_too_small_for_the_layers_warn():
    # 100 + 20 x moons lies outside every spline's [-5, 5]: NSF stayed at NLL 1.1e4 and was
    # called diverged at 1.135e4 -> 1.138e4; a spread of 1e-6 cost MAF 15.8 nats. Silently.
    moons = torch.as_tensor(ef.datasets.toy("moons", 400), dtype=torch.float64)
    with pytest.warns(UserWarning, match=r"100% of the training values lie outside \[-5, 5\], "
                                         r"where this flow's splines are the identity"):
        fit(ef.models.nsf(2, layers=1, hidden=(8,)), 100 + 20 * moons, steps=40, **CPU)
    with pytest.warns(UserWarning, match=r"column 1 of the training data spreads by \d.\d+e-0[67] "
                                         r"\(a standard deviation\) and this flow has no "
                                         r"standardization layer"):
        fit(ef.models.maf(2, layers=1, hidden=(8,)), 1e-6 * moons, steps=2, **CPU)
    with pytest.warns(UserWarning, match="column 1 of the training data spreads by"):
        fit(ef.models.maf(2, layers=1, hidden=(8,)), moons * torch.tensor([1.0, 1e-6]),
            steps=2, **CPU)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fit(ef.models.nsf(2, layers=1, hidden=(8,)), moons, steps=2, **CPU)
        # closed-form models take any scale; an ActNorm first scales from the data
        fit(ef.models.gaussian(2), 1e-4 * moons, **CPU)
        fit(ef.models.gmm(2, components=2), 1e4 * moons, **CPU)
        act = ef.Flow(ef.Compose(ef.transforms.ActNorm(2), ef.transforms.SplineCoupling(2)),
                      ef.StandardNormal(2)).double()
        fit(act, 10 * moons + 20, steps=2, **CPU)


def test_a_diverged_run_leaves_the_flow_at_its_best_weights():
    # It left the weights it diverged to, in train mode: validation NLL 1.19e6.
    x = ef.datasets.toy("moons", 2000)
    v = ef.datasets.toy("moons", 500, seed=5)
    flow = ef.models.maf(2, standardize=True, layers=2, hidden=(16,))
    with pytest.raises(TrainingError, match=r"The flow is left with the weights of step \d+, "
                                            r"its best validation NLL \(([\d.]+)\), in eval"
                       ) as info:
        fit(flow, x, v, lr=1.0, steps=400, eval_every=10, **CPU)
    best = float(re.search(r"validation NLL \(([\d.]+)\)", str(info.value)).group(1))
    assert not flow.training
    assert ef.evaluate(flow, v)["nll"] == pytest.approx(best, rel=1e-5)


@pytest.mark.parametrize("model", ["maf", "gaussian"])
def test_a_validation_row_scored_minus_inf_at_the_start_is_named(model):
    # 1e30 overflows float32 once standardized: the validation NLL would be inf at every
    # step and no step could be chosen (the run used to end with best_step None, silently).
    rng = np.random.default_rng(0)
    train, val = rng.normal(size=(300, 3)), rng.normal(size=(40, 3))
    val[[3, 17], 1] = [1e30, -2e30]
    flow = ef.models.build({"model": model, "features": 3, "standardize": True})
    with pytest.raises(DataError, match=r"validation data: 2 rows score -inf under the model "
                                        r"before training, one with 2e\+30 in column 1"):
        fit(flow, train, val, steps=5, **CPU)
    with pytest.raises(DataError, match="validation data: 2 rows score -inf"):
        ef.fit_auto(train, val, budget=5)  # the data's fault: not one failure per candidate


@pytest.mark.parametrize("model", ["realnvp", "gaussian"])
def test_a_validation_row_that_dominates_the_nll_at_the_start_is_named(model):
    # In float64, 1e30 scores finitely (about -5e59): the validation NLL was finite but
    # that row's at every step, and the run kept step 0, silently.
    rng = np.random.default_rng(0)
    train, val = rng.normal(size=(300, 3)), rng.normal(size=(40, 3))
    val[5, 2] = 1e30
    flow = ef.models.build({"model": model, "features": 3, "standardize": True}).double()
    with pytest.raises(DataError, match=r"validation data: 1 row scores below -1e\+09 \(the "
                                        r"training rows' lowest: -\d+\.?\d*\) under the model "
                                        r"before training, one with 1e\+30 in column 2.*"
                                        r"they dominate the validation NLL"):
        fit(flow, train, val, steps=5, **CPU)


def test_a_validation_row_far_out_but_within_reason_is_kept():
    rng = np.random.default_rng(0)
    train, val = rng.normal(size=(300, 3)), rng.normal(size=(40, 3))
    val[5, 2] = 1e3  # 1,000 standard deviations: -5e5 nats, kept
    flow = ef.models.build({"model": "gaussian", "features": 3, "standardize": True})
    history = fit(flow, train, val, steps=5, **CPU)
    assert 1e4 < history.val_nll[0] < 1e5


def test_held_out_rows_share_no_row_with_the_training_rows():
    from exactflow.training.batches import hold_out, wrap
    rows = np.repeat(np.random.default_rng(0).normal(size=(100, 3)), 4, axis=0)
    train, _, val, _ = hold_out(wrap(rows, "rows", 3), None, 0.1, seed=2)
    assert val is not None and len(val) == 40 and len(train) == 360
    seen = {tuple(r) for r in train.data.tolist()}
    assert not any(tuple(r) in seen for r in val.data.tolist())


def test_a_conditional_flow_that_diverges_on_a_raw_context_is_told_to_standardize_it():
    torch.manual_seed(0)
    flow = ef.models.maf(2, context=1, layers=1).double()
    x = torch.randn(1000, 2, dtype=torch.float64)
    context = 1e8 * torch.randn(1000, 1, dtype=torch.float64)
    with pytest.warns(UserWarning, match="the context's columns spread by"), \
            pytest.raises(TrainingError, match="standardizes its context too") as info:
        fit(flow, x, context=context, steps=20, **CPU)
    assert "FlowDensity" not in str(info.value)  # (it fits no context)


def test_a_compiled_flow_given_for_a_flow_is_refused_with_the_way_to_compile():
    flow = affine_flow()
    compiled = torch.compile(flow)  # (nothing compiles until it is called)
    for call, name in ((lambda: fit(compiled, gaussian_data(64), **CPU), "fit"),
                       (lambda: ef.save(compiled, "never.safetensors"), "save"),
                       (lambda: ef.fit_reverse_kl(compiled, lambda x: -x.pow(2).sum(-1)),
                        "fit_reverse_kl")):
        with pytest.raises(TypeError, match=rf"{name} expects an exactflow Flow, got "
                                            r"OptimizedModule; pass the flow itself.*"
                                            r"compile=True"):
            call()
    with pytest.raises(TypeError, match=r"got Linear$"):
        fit(torch.nn.Linear(2, 2), gaussian_data(64))


def test_too_few_rows_to_hold_out_say_that_training_runs_a_fixed_length():
    # 12 rows at val_fraction=0.1 hold out 1: none is held out, and the default length
    # (set by validation) fell back to a fixed 1000 steps, silently
    flow = affine_flow()
    with pytest.warns(UserWarning, match="12 rows leave no validation rows at val_fraction=0.1"
                                         r".*a fixed 1000 steps and keeps the last"):
        history = fit(flow, gaussian_data(12), **CPU)
    assert history.best_step is None and history.total_steps == 1000
    with warnings.catch_warnings():  # a length of one's own: nothing to say
        warnings.simplefilter("error")
        fit(flow, gaussian_data(12), steps=3, **CPU)


def test_a_named_tables_columns_are_named_in_data_errors():
    class Named:  # a table with named columns, as a pandas DataFrame presents one
        def __init__(self, values, columns):
            self.values, self.columns = values, columns
            self.shape = values.shape

        def __array__(self, dtype=None, copy=None):
            return self.values if dtype is None else self.values.astype(dtype)

        def __len__(self):
            return len(self.values)

    rows = np.random.default_rng(0).normal(size=(300, 3))
    dependent = Named(np.c_[rows, 2 * rows[:, 0]], ["mass", "radius", "temp", "twice"])
    with pytest.raises(DataError, match="columns 'mass', 'twice' are linearly dependent"):
        ef.fit_auto(dependent, budget=2)
    flat = Named(np.c_[rows, np.ones(300)], ["mass", "radius", "temp", "one"])
    with pytest.raises(DataError, match="constant .*column 'one'"):
        fit(ef.models.maf(4, layers=1, hidden=(4,)), flat, steps=1, **CPU)


def test_prepare_fills_what_fit_would_before_a_loop_of_ones_own():
    rows = 5 + 3 * torch.randn(400, 2, dtype=torch.float64)
    flow = ef.models.maf(2, layers=1, hidden=(8,), standardize=True, base="gaussian")
    assert ef.prepare(flow, rows.numpy()) == ["standardization", "Gaussian base"]
    layer = flow.transform[0]
    torch.testing.assert_close(layer.mean, rows.mean(0))
    torch.testing.assert_close(layer.std, rows.std(0, correction=0))
    assert ef.prepare(flow, rows) == []  # prepared already: nothing changes
    twin = ef.models.maf(2, layers=1, hidden=(8,), standardize=True, base="gaussian")
    twin.load_state_dict(flow.state_dict())
    with pytest.raises(DataError, match="expected 2 columns"):
        ef.prepare(twin, torch.randn(10, 3))


def test_a_validation_nll_gone_to_inf_points_at_the_rows_first():
    history = History(features=2, objective="nll")
    history.steps, history.val_nll, history.train_nll = [0, 10], [3.0, math.inf], [None, 3.5]
    with pytest.raises(TrainingError, match=r"went from 3 at the start to inf nats.*look for "
                                            r"validation rows \(or context\) far beyond the "
                                            r"training rows.*or standardize") as info:
        fit_module._check_divergence(history, 3.5, 2, 1e-3, "standardize the data")
    assert "Lower the learning rate" in str(info.value)
    history.val_nll[-1] = 30.0  # a finite blow-up: the learning rate's advice alone
    with pytest.raises(TrainingError) as info:
        fit_module._check_divergence(history, 3.5, 2, 1e-3, "standardize the data")
    assert "validation rows (or context)" not in str(info.value)


def test_resume_with_input_noise_matches_an_uninterrupted_run(tmp_path):
    # The noise is measured in the standardization's units: a resume must see the restored
    # layer (it measured the identity, and added 0.1 in raw units to every column).
    data = gaussian_data(700) * torch.tensor([10.0, 0.1])
    train, val = data[:300], data[300:]
    kwargs = dict(steps=40, batch_size=64, lr=0.01, eval_every=5, noise=0.1, **CPU, seed=3)

    def make() -> ef.Flow:
        torch.manual_seed(2)
        return ef.models.maf(2, layers=2, hidden=(16,), standardize=True)

    whole = make()
    h_whole = fit(whole, train, val, **kwargs)

    def crash_at_25(history: History) -> None:
        if history.steps[-1] == 25:
            raise Interrupt

    path = tmp_path / "run.ckpt"
    with pytest.raises(Interrupt):
        fit(make(), train, val, checkpoint=path, checkpoint_every=10, callback=crash_at_25,
            **kwargs)
    resumed = make()
    h_resumed = fit(resumed, train, val, checkpoint=path, checkpoint_every=10, resume=True,
                    **kwargs)
    same_history(h_whole, h_resumed)
    assert all(torch.equal(v, resumed.state_dict()[k]) for k, v in whole.state_dict().items())


def test_a_device_name_torch_does_not_know_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="device must be 'cpu', 'cuda', 'cuda:N', 'mps' or "
                                         "'auto', got 'gpu'"):
        fit(affine_flow(), gaussian_data(100), steps=2, device="gpu", progress=False)
    # a device torch knows but this machine lacks (torch raised deep inside .to(...))
    missing = [name for name, there in (("cuda", torch.cuda.is_available()),
                                        ("mps", torch.backends.mps.is_available())) if not there]
    path = tmp_path / "flow.safetensors"
    ef.save(ef.models.maf(2, layers=1, hidden=(4,)), path)
    for name in missing:
        with pytest.raises(ValueError, match=f"device='{name}' was requested but this machine "
                                             f"has no {name.upper()} device"):
            fit(affine_flow(), gaussian_data(100), steps=2, device=name, progress=False)
        with pytest.raises(ValueError, match=f"map_location='{name}' was requested"):
            ef.load(path, map_location=name)


def test_conditional_training_refuses_or_warns_about_contexts_it_cannot_use():
    torch.manual_seed(0)
    theta = torch.randn(600, 2)
    x = theta + 0.5 * torch.randn(600, 2)
    # one validation context at 1e8: the flow at step 0 ignores its context, so the
    # validation NLL of the start could not show it, and the run kept step 0 silently
    far = theta[500:].clone()
    far[3, 0] = 1e8
    with pytest.raises(DataError, match=r"val_context: 1 row lies more than 10,000 standard "
                                        r"deviations .* \(row 3: 1e\+08 in column 0"):
        fit(ef.models.maf(2, layers=1, context=2, standardize=True), x[:500], x[500:],
            context=theta[:500], val_context=far, steps=3, **CPU)
    # a context column held fixed is centered, not refused as "a density has no width"
    fixed = theta.clone()
    fixed[:, 1] = 3.0
    fit(ef.models.maf(2, layers=1, context=2, standardize=True), x, context=fixed, steps=3,
        **CPU)
    # a context far from standardized, into a flow that does not standardize it, warns
    with pytest.warns(UserWarning, match="the context's columns spread by .* and this flow "
                                         "does not standardize its context"):
        fit(ef.models.maf(2, layers=1, context=2), x, context=theta * 1e-4, steps=3, **CPU)
    with pytest.raises(ValueError, match="val_context was given without val"):
        ef.fit_auto(x, context=theta, val_context=theta[:50], budget=1)
    with pytest.raises(ValueError, match="pass val_context"):
        ef.fit_auto(x[:500], x[500:], context=theta[:500], budget=1)
    with pytest.raises(DataError, match="context has 1 columns but the flow takes a context "
                                        "of 2 features"):
        fit(ef.models.maf(2, layers=1, context=2), x, context=theta[:, :1], steps=3, **CPU)
    # one training context at 1e8 set the standardized context's scale: conditioning lost
    wild = theta.clone()
    wild[7, 1] = 1e8
    with pytest.warns(UserWarning, match=r"context: 1 row lies more than 10,000 robust "
                                         r"standard deviations .* \(row 7: 1e\+08 in column 1"):
        fit(ef.models.maf(2, layers=1, context=2, standardize=True), x, context=wild,
            steps=3, **CPU)
    spread = torch.from_numpy(10 ** np.random.default_rng(1).uniform(-3, 5, size=(600, 1)))
    with warnings.catch_warnings():  # eight decades, log-uniform: a heavy tail, not a warning
        warnings.simplefilter("error")
        fit(ef.models.maf(2, layers=1, context=1, standardize=True), x.double(),
            context=spread, steps=3, **CPU)


def test_a_time_limit_stops_the_run_with_a_last_record():
    # (fit_auto's budget was read once per record, an epoch of up to 500 steps, and ran
    # 2-10 times over; a time limit is read every 8 steps)
    data = gaussian_data(600)
    history = fit(ef.models.maf(2, layers=1, hidden=(8,)), data[:500], data[500:],
                  steps=1_000_000, batch_size=50, eval_every=1_000_000, time_limit=0.5,
                  **CPU)
    assert history.stopped_early and history.total_steps < 1_000_000
    assert history.total_steps % 8 == 0 and history.steps[-1] == history.total_steps
    assert history.best_step is not None and history.compiled.startswith("eager")
    with pytest.raises(ValueError, match="time_limit must be a positive"):
        fit(affine_flow(), data, steps=2, time_limit=0, **CPU)


def test_the_time_limit_counts_the_preparation(monkeypatch):
    # fit_auto's flow on a mixture refits the mixture first (2.2 s on 90,000 rows): the
    # limit started after it, so the rung ran 2.5 times its share of the budget.
    prepare = fit_module.prepare

    def slow_prepare(*args, **kwargs):
        time.sleep(0.6)
        return prepare(*args, **kwargs)

    monkeypatch.setattr(fit_module, "prepare", slow_prepare)
    data = gaussian_data(600)
    history = fit(ef.models.maf(2, layers=1, hidden=(8,)), data[:500], data[500:],
                  steps=1_000_000, batch_size=50, eval_every=1_000_000, time_limit=0.5,
                  **CPU)
    assert history.stopped_early and history.total_steps <= 8


def test_the_time_limit_leaves_room_for_the_last_record(monkeypatch):
    # (on 1 M rows a validation pass took 1.9 s: each flow of the ladder ran that much past
    # its share, 13.2 s for a budget of 10)
    from exactflow.training.parallel import Replicas

    data = gaussian_data(600)
    fit(ef.models.maf(2, layers=1, hidden=(8,)), data[:500], data[500:], steps=2, **CPU)
    evaluate = Replicas.evaluate  # (a first fit above: what remains is the records)

    def slow_evaluate(self, *args, **kwargs):
        time.sleep(1.0)
        return evaluate(self, *args, **kwargs)

    monkeypatch.setattr(Replicas, "evaluate", slow_evaluate)
    history = fit(ef.models.maf(2, layers=1, hidden=(8,)), data[:500], data[500:],
                  steps=1_000_000, batch_size=50, eval_every=1_000_000, time_limit=1.5,
                  **CPU)
    # Stopped at the first look at the clock: a last record of 1 s no longer fits.
    assert history.stopped_early and history.total_steps == 8, history.total_steps


def test_the_flow_fit_returns_scores_its_best_val_with_batch_norm():
    # Batch norm's statistics were reset from the training set after the best weights came
    # back: the returned RealNVP scored validation up to 0.036 nats off history.best_val,
    # and worse than its last record at times.
    x, v = ef.datasets.toy("moons", 1500), ef.datasets.toy("moons", 400, seed=5)
    for seed in range(3):
        flow = ef.models.realnvp(2, standardize=True, layers=2, hidden=(16,))
        assert any(isinstance(m, ef.transforms.BatchNorm) for m in flow.modules())
        history = fit(flow, x, v, lr=3e-3, steps=60, eval_every=10, seed=seed, **CPU)
        assert ef.evaluate(flow, v)["nll"] == pytest.approx(history.best_val, abs=1e-9)
        assert history.best_val <= min(h for h in history.val_nll if h is not None)


def test_a_context_given_as_val_and_a_data_loader_are_named():
    # ef.fit(flow, x, c) put c in val and said only "pass context with one row per data
    # row"; a DataLoader was "expected a 2-D array (rows, features), got shape ()".
    x = torch.randn(200, 2)
    with pytest.raises(ValueError, match=r"pass context=\.\.\. \(a keyword argument: ef.fit's "
                                         r"third positional argument is val\)"):
        fit(ef.models.maf(2, layers=1, context=2), x, torch.randn(200, 2), steps=2, **CPU)
    loader = torch.utils.data.DataLoader(x, batch_size=64)
    with pytest.raises(DataError, match="DataLoader is not rows: give the rows themselves"):
        fit(ef.models.maf(2, layers=1), loader, steps=2, **CPU)


@pytest.mark.parametrize("wrap, message", [
    (lambda t: torch.utils.data.TensorDataset(t), r"a TensorDataset is not rows: give its "
                                                  r"tensor .*\(dataset.tensors\[0\]\)"),
    (lambda t: (t,), "a tuple of tables is not rows: give one table"),
    (lambda t: [t[:100], t[100:]], r"a list of tables is not rows: .*\(torch.cat"),
    (lambda t: torch.utils.data.DataLoader(t, batch_size=10), "a DataLoader is not rows"),
    (lambda t: {"c": t}, "a dict is not rows"),
])
def test_containers_of_tables_are_named_as_data_and_as_context(wrap, message):
    # (a TensorDataset or a tuple was "must be 2-D (rows, features), got shape (200, 1, 1)",
    # a DataLoader or a dict as context "must be numeric, got an array of dtype object")
    x, c = torch.randn(200, 2), torch.randn(200, 1)
    with pytest.raises(DataError, match="training data: " + message):
        fit(ef.models.maf(2, layers=1), wrap(x), steps=2, **CPU)
    with pytest.raises(DataError, match="context: " + message):
        fit(ef.models.maf(2, layers=1, context=1), x, context=wrap(c), steps=2, **CPU)
    # Rows in other containers are rows: a list of rows, a torch Subset, a memoryview.
    for rows in ([x[i] for i in range(200)], torch.utils.data.Subset(x, range(200)),
                 memoryview(x.numpy())):
        assert fit(ef.models.maf(2, layers=1), rows, steps=2, **CPU).total_steps == 2


def test_a_fixed_length_run_with_validation_checks_it_every_epoch():
    # With steps=, validation came every steps // 20 steps: a 100,000-step run on 600 rows
    # was checked every 5,000 steps and kept its step 0 (test NLL 5.85; 5.19 at step 296
    # with checks every epoch).
    x = np.random.default_rng(0).normal(size=(300, 2))
    history = ef.fit(ef.models.maf(2, layers=1, hidden=(8,)), x[:240], x[240:], steps=400,
                     batch_size=60, progress=False)
    assert history.steps[:3] == [0, 4, 8]  # (4 batches an epoch)
    unchecked = ef.fit(ef.models.maf(2, layers=1, hidden=(8,)), x, steps=400, batch_size=60,
                       val_fraction=0, progress=False)
    assert unchecked.steps[:2] == [20, 40]  # (no validation: 20 records of the loss)
