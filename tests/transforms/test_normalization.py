"""Tests of the normalization layers (exactflow.transforms.normalization): BatchNorm, ActNorm."""

from __future__ import annotations

import io

import pytest
import torch

import exactflow as ef
from exactflow.transforms import ActNorm, BatchNorm
from tests.helpers import perturb


def random_batchnorm(features: int, seed: int, dtype=torch.float64, device="cpu") -> BatchNorm:
    bn = perturb(BatchNorm(features), seed=seed).to(device=device, dtype=dtype)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # running statistics away from (0, 1) too
        bn.running_mean.copy_(torch.randn(features, generator=gen, dtype=torch.float64))
        bn.running_var.copy_(torch.rand(features, generator=gen, dtype=torch.float64) * 3 + 0.1)
    return bn


def data(batch: int, features: int, dtype=torch.float64) -> torch.Tensor:
    scale = torch.linspace(0.5, 3.0, features, dtype=torch.float64)
    return (torch.randn(batch, features, dtype=torch.float64) * scale + 2.0).to(dtype)


# -- BatchNorm ------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("features", [1, 2, 3, 5])
def test_batchnorm_check_transform_in_eval_mode(features, seed, dtype, device):
    bn = random_batchnorm(features, seed, dtype, device).eval()
    x = data(6, features, dtype).to(device)
    assert ef.check_transform(bn, x).ok
    context = torch.randn(6, 2, dtype=dtype, device=device)
    assert ef.check_transform(bn, x, context).ok
    # Eval mode leaves the running statistics alone.
    before = bn.running_mean.clone()
    bn(x)
    torch.testing.assert_close(bn.running_mean, before)


@pytest.mark.parametrize("features", [1, 3])
def test_batchnorm_training_log_det_with_batch_statistics_held_fixed(features):
    bn = random_batchnorm(features, 2).train()
    x = data(16, features)
    z, ladj = bn(x)
    mean, var = x.mean(0), x.var(0, unbiased=False)

    def per_row(v: torch.Tensor) -> torch.Tensor:
        return (v - mean) / torch.sqrt(var + bn.eps) * torch.exp(bn.log_gamma) + bn.beta

    torch.testing.assert_close(z, per_row(x))
    truth = ef.log_abs_det_jacobian(per_row, x)
    torch.testing.assert_close(ladj, truth)
    # The batch statistics normalize the batch; the log-det differs from eval mode's.
    standardized = (z - bn.beta) * torch.exp(-bn.log_gamma)
    torch.testing.assert_close(standardized.mean(0), torch.zeros(features, dtype=torch.float64))
    torch.testing.assert_close(
        standardized.var(0, unbiased=False),
        var / (var + bn.eps),
    )
    _, ladj_eval = bn.eval()(x)
    assert (ladj - ladj_eval).abs().max() > 1e-3


def test_batchnorm_running_averages_follow_momentum():
    bn = BatchNorm(2, momentum=0.25).double()
    x = data(10, 2)
    bn(x)
    torch.testing.assert_close(bn.running_mean, 0.25 * x.mean(0))
    torch.testing.assert_close(bn.running_var, 0.75 + 0.25 * x.var(0, unbiased=True))
    for _ in range(200):
        bn(data(64, 2))
    # Converges to the data's statistics (mean 2, std 0.5 and 3).
    torch.testing.assert_close(bn.running_mean, torch.full((2,), 2.0).double(), atol=0.5, rtol=0)
    torch.testing.assert_close(
        bn.running_var.sqrt(), torch.tensor([0.5, 3.0]).double(), atol=0.0, rtol=0.3
    )


def test_batchnorm_inverse_uses_running_averages_in_both_modes():
    bn = random_batchnorm(3, 3)
    x = data(8, 3)
    z_eval, ladj_eval = bn.eval()(x)
    bn.train()
    x_back, ladj_inv = bn.inverse(z_eval)
    torch.testing.assert_close(x_back, x)
    torch.testing.assert_close(ladj_inv, -ladj_eval)
    # It is not the inverse of a training-mode forward (that one used the batch statistics).
    z_train, _ = bn(x)
    assert (bn.inverse(z_train)[0] - x).abs().max() > 1e-2


def test_batchnorm_float32_round_trip_and_batch_of_one():
    bn = random_batchnorm(5, 4, torch.float32).eval()
    x = data(32, 5, torch.float32)
    z, _ = bn(x)
    assert (bn.inverse(z)[0] - x).abs().max() <= 1e-4 * x.abs().max()
    # One row is fine in eval mode, an error in training mode.
    assert bn(x[:1])[0].shape == (1, 5)
    with pytest.raises(ValueError, match="at least 2 rows"):
        bn.train()(x[:1])
    # No rows: empty in, empty out, the running averages untouched (in both modes)
    before = bn.running_mean.clone()
    z, ladj = bn(x[:0])
    assert z.shape == (0, 5) and ladj.shape == (0,) and torch.equal(bn.running_mean, before)


def test_batchnorm_gradients_in_training_mode():
    bn = random_batchnorm(3, 5).train()
    x = data(12, 3).requires_grad_(True)
    names = [n for n, _ in bn.named_parameters()]

    def nll(v, *params):
        z, ladj = torch.func.functional_call(bn, dict(zip(names, params, strict=True)), (v,))
        return 0.5 * (z**2).sum(-1) - ladj

    params = tuple(p.detach().clone().requires_grad_(True) for p in bn.parameters())
    assert torch.autograd.gradcheck(nll, (x, *params))


def test_batchnorm_state_dict_round_trip():
    bn = random_batchnorm(3, 6).train()
    for _ in range(3):
        bn(data(16, 3))
    clone = BatchNorm(3).double()
    clone.load_state_dict(bn.state_dict())
    x = data(5, 3)
    for mode in ("train", "eval"):
        getattr(bn, mode)(), getattr(clone, mode)()
        torch.testing.assert_close(clone(x), bn(x))
    torch.testing.assert_close(clone.running_var, bn.running_var)


def test_batchnorm_bad_arguments():
    with pytest.raises(ValueError, match="momentum"):
        BatchNorm(2, momentum=0.0)
    with pytest.raises(ValueError, match="eps"):
        BatchNorm(2, eps=0.0)
    with pytest.raises(ValueError, match="positive int"):
        BatchNorm(0)
    with pytest.raises(ValueError, match=r"shape \(batch, 2\)"):
        BatchNorm(2)(torch.randn(4, 3))


# -- ActNorm --------------------------------------------------------------------------------


@pytest.mark.parametrize("features", [1, 2, 3, 5])
def test_actnorm_first_batch_gives_zero_mean_unit_variance(features):
    act = ActNorm(features).double()
    assert not bool(act.initialized)
    x = data(50, features)
    z, ladj = act(x)
    assert bool(act.initialized)
    torch.testing.assert_close(z.mean(0), torch.zeros(features).double(), atol=1e-12, rtol=0)
    # Unit variance up to eps: var / (var + eps).
    var = x.var(0, unbiased=False)
    torch.testing.assert_close(z.var(0, unbiased=False), var / (var + act.eps))
    assert (z.var(0, unbiased=False) - 1).abs().max() < 1e-4
    torch.testing.assert_close(ladj, act.log_scale.sum().expand(50))
    # The second batch does not re-initialize.
    params = [p.clone() for p in act.parameters()]
    act(data(50, features) * 10)
    for before, after in zip(params, act.parameters(), strict=True):
        torch.testing.assert_close(after, before)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("features", [1, 2, 3, 5])
def test_actnorm_check_transform_at_random_parameters(features, seed, dtype, device):
    act = ActNorm(features).to(device=device, dtype=dtype)
    act.initialize(data(20, features, dtype).to(device))
    perturb(act, seed=seed)
    x = data(6, features, dtype).to(device)
    assert ef.check_transform(act, x).ok
    assert ef.check_transform(act, x, torch.randn(6, 2, dtype=dtype, device=device)).ok


def test_actnorm_float32_round_trip():
    act = ActNorm(5)
    x = data(40, 5, torch.float32)
    act(x)
    perturb(act, seed=3)
    z, ladj = act(x)
    x_back, ladj_inv = act.inverse(z)
    assert (x_back - x).abs().max() <= 1e-4 * x.abs().max()
    torch.testing.assert_close(ladj_inv, -ladj)


def test_actnorm_batches_without_a_variance_leave_it_for_the_next_and_constants_stay_finite():
    # One row (a quick check of a new flow) fixed the scale at 1 and the shift at that
    # row; no rows set the shift to NaN: a flow that scored -inf everywhere from then on.
    act = ActNorm(3).double()
    for rows in (1, 0):
        x = 5 * torch.randn(rows, 3, dtype=torch.float64) + 2
        z, ladj = act(x)
        torch.testing.assert_close(z, x)
        assert z.shape == (rows, 3) and ladj.shape == (rows,) and not bool(act.initialized)
        with pytest.raises(ValueError, match="at least 2 rows to estimate a variance, got"):
            act.initialize(x)
    x = 5 * data(50, 3) + 2
    z, _ = act(x)
    assert bool(act.initialized) and torch.isfinite(act.bias).all()
    torch.testing.assert_close(z.mean(0), torch.zeros(3, dtype=torch.float64), atol=1e-9,
                               rtol=0)
    # A constant column: eps keeps the scale finite.
    act = ActNorm(2).double()
    x = torch.stack([torch.randn(10).double(), torch.full((10,), 4.0).double()], -1)
    z, ladj = act(x)
    assert torch.isfinite(z).all() and torch.isfinite(ladj).all()
    torch.testing.assert_close(z[:, 1], torch.zeros(10).double())


def test_actnorm_before_initialization():
    act = ActNorm(3).double()
    z = torch.randn(4, 3, dtype=torch.float64)
    # Sampling an untrained layer: the identity, and no initialization from latent values.
    x, ladj_inv = act.inverse(z)
    torch.testing.assert_close(x, z)
    torch.testing.assert_close(ladj_inv, torch.zeros(4, dtype=torch.float64))
    # Eval mode neither initializes.
    act.eval()
    torch.testing.assert_close(act(z)[0], z)
    assert not bool(act.initialized)
    act.train()
    act(data(8, 3))
    assert bool(act.initialized)


def test_actnorm_state_dict_round_trip_continues_identically():
    torch.manual_seed(0)
    act = ActNorm(3).double()
    opt = torch.optim.SGD(act.parameters(), lr=0.1)

    def step(layer, optimizer, x):
        optimizer.zero_grad()
        z, ladj = layer(x)
        loss = (0.5 * (z**2).sum(-1) - ladj).mean()
        loss.backward()
        optimizer.step()
        return loss.detach()

    step(act, opt, data(32, 3))  # initializes, then trains
    buffer = io.BytesIO()
    torch.save({"model": act.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    restored = ActNorm(3).double()
    restored.load_state_dict(saved["model"])
    opt2 = torch.optim.SGD(restored.parameters(), lr=0.1)
    opt2.load_state_dict(saved["opt"])
    assert bool(restored.initialized) and not restored._needs_init

    batch = data(32, 3) * 5 - 1  # would give other parameters if it re-initialized
    torch.testing.assert_close(step(restored, opt2, batch), step(act, opt, batch))
    for a, b in zip(act.parameters(), restored.parameters(), strict=True):
        torch.testing.assert_close(a, b)

    # Also through a parent module, as when a whole flow is loaded.
    flow = ef.Flow(ef.Compose(ActNorm(3), ActNorm(3)), ef.StandardNormal(3)).double()
    flow.log_prob(data(16, 3))
    fresh = ef.Flow(ef.Compose(ActNorm(3), ActNorm(3)), ef.StandardNormal(3)).double()
    fresh.load_state_dict(flow.state_dict())
    x = data(16, 3)
    torch.testing.assert_close(fresh.log_prob(x), flow.log_prob(x))
    assert all(not layer._needs_init for layer in fresh.transform)
    # An uninitialized state loads as uninitialized.
    again = ActNorm(3).double()
    again.load_state_dict(ActNorm(3).double().state_dict())
    assert again._needs_init and not bool(again.initialized)


def test_actnorm_flag_is_a_buffer_that_survives_dtype_moves():
    act = ActNorm(2)
    act(data(8, 2, torch.float32))
    assert "initialized" in dict(act.named_buffers())
    act = act.double()
    assert act.initialized.dtype == torch.bool and bool(act.initialized)


def test_actnorm_bad_arguments():
    with pytest.raises(ValueError, match="eps"):
        ActNorm(2, eps=-1.0)
    with pytest.raises(ValueError, match="positive int"):
        ActNorm(0)
    with pytest.raises(ValueError, match=r"shape \(batch, 2\)"):
        ActNorm(2)(torch.randn(4, 3))
