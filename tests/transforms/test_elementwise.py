"""Tests of the elementwise layers: ElementwiseAffine, Sigmoid, Logit."""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import exactflow as ef
from exactflow.transforms import ElementwiseAffine, Logit, Sigmoid
from tests.helpers import perturb

LAYERS: dict[str, Callable[[int], ef.Transform]] = {
    "affine": ElementwiseAffine,
    "sigmoid": lambda d: Sigmoid(),
    "logit": lambda d: Logit(),
    "logit_alpha": lambda d: Logit(alpha=0.05),
}


def inputs(name: str, batch: int, features: int, dtype, device="cpu", gen=None) -> torch.Tensor:
    """Points inside the layer's domain: (0, 1) for the logits, R otherwise."""
    if name.startswith("logit"):
        u = torch.rand(batch, features, generator=gen, dtype=torch.float64)
        x = 0.02 + 0.96 * u
    else:
        x = 2.0 * torch.randn(batch, features, generator=gen, dtype=torch.float64)
    return x.to(device=device, dtype=dtype)


def make(name: str, features: int, seed: int, dtype, device="cpu") -> ef.Transform:
    return perturb(LAYERS[name](features), seed=seed).to(device=device, dtype=dtype)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("name", sorted(LAYERS))
def test_check_transform_at_random_parameters(name, seed, dtype, device):
    gen = torch.Generator().manual_seed(100 + seed)
    t = make(name, 5, seed, dtype, device)
    x = inputs(name, 6, 5, dtype, device, gen)
    report = ef.check_transform(t, x)
    assert report.ok, str(report)
    # A context is accepted and ignored.
    context = torch.randn(6, 2, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    assert ef.check_transform(t, x, context).ok
    z, ladj = t(x)
    z_c, ladj_c = t(x, context)
    torch.testing.assert_close(z_c, z)
    torch.testing.assert_close(ladj_c, ladj)


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_check_transform_float32(name):
    t = make(name, 3, seed=7, dtype=torch.float32)
    x = inputs(name, 5, 3, torch.float32)
    report = ef.check_transform(t, x)
    assert report.ok and report.dtype == torch.float32, str(report)


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(LAYERS))
def test_check_transform_on_cuda(name):
    t = make(name, 4, seed=3, dtype=torch.float64, device="cuda")
    x = inputs(name, 5, 4, torch.float64, device="cuda")
    assert ef.check_transform(t, x).ok


def test_elementwise_affine_formula():
    t = perturb(ElementwiseAffine(3)).double()
    assert t.log_scale.abs().min() > 0, "parameters must be away from the identity"
    x = torch.randn(4, 3, dtype=torch.float64)
    z, ladj = t(x)
    torch.testing.assert_close(z, x * t.log_scale.exp() + t.shift)
    torch.testing.assert_close(ladj, t.log_scale.sum().expand(4))
    x_back, ladj_inv = t.inverse(z)
    torch.testing.assert_close(x_back, x)
    torch.testing.assert_close(ladj_inv, -ladj)


def test_elementwise_affine_starts_as_identity_and_trains():
    t = ElementwiseAffine(3)
    x = torch.randn(4, 3)
    z, ladj = t(x)
    torch.testing.assert_close(z, x)
    assert torch.equal(ladj, torch.zeros(4))
    loss = (0.5 * (z - 3.0) ** 2).sum() - ladj.sum()
    loss.backward()
    assert t.log_scale.grad is not None and t.log_scale.grad.abs().sum() > 0
    assert t.shift.grad is not None and t.shift.grad.abs().sum() > 0


def test_sigmoid_log_det_is_stable_in_the_tails():
    x = torch.tensor([[-40.0, -5.0, 0.0, 5.0, 40.0]], dtype=torch.float64)
    z, ladj = Sigmoid()(x)
    torch.testing.assert_close(z, torch.sigmoid(x))
    # log s(x) (1 - s(x)) = -|x| - 2 log(1 + exp(-|x|))
    expected = (-x.abs() - 2 * torch.log1p(torch.exp(-x.abs()))).sum(-1)
    assert torch.isfinite(ladj).all()
    torch.testing.assert_close(ladj, expected)


def test_sigmoid_inverse_out_of_domain_raises():
    for bad in (0.0, 1.0, -0.2, 1.3, math.nan):
        z = torch.tensor([[0.5, bad]])
        with pytest.raises(ValueError, match=r"\(0, 1\)"):
            Sigmoid().inverse(z)


def test_logit_is_the_inverse_of_sigmoid():
    y = torch.rand(6, 3, dtype=torch.float64) * 0.9 + 0.05
    z, ladj = Logit()(y)
    z2, ladj2 = Sigmoid().inverse(y)
    torch.testing.assert_close(z, z2)
    torch.testing.assert_close(ladj, ladj2)
    torch.testing.assert_close(z, torch.logit(y))


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.1, 1.5, math.nan, math.inf])
def test_logit_out_of_domain_raises_a_clear_error(bad):
    x = torch.full((3, 2), 0.5)
    x[1, 1] = bad
    with pytest.raises(ValueError, match=r"strictly inside \(0, 1\)"):
        Logit()(x)


def test_logit_with_alpha_accepts_the_closed_interval():
    t = Logit(alpha=0.05).double()
    x = torch.tensor([[0.0, 1.0, 0.5]], dtype=torch.float64)
    z, ladj = t(x)
    assert torch.isfinite(z).all() and torch.isfinite(ladj).all()
    expected = torch.logit(0.05 + 0.9 * x)
    torch.testing.assert_close(z, expected)
    assert ef.check_transform(t, x).ok
    for bad in (-0.01, 1.01, math.nan):
        with pytest.raises(ValueError, match=r"inside \[0, 1\]"):
            t(torch.tensor([[0.5, bad]], dtype=torch.float64))


@pytest.mark.parametrize("alpha", [-0.1, 0.5, 0.7])
def test_logit_rejects_bad_alpha(alpha):
    with pytest.raises(ValueError, match="alpha"):
        Logit(alpha=alpha)


@given(
    name=st.sampled_from(sorted(LAYERS)),
    batch=st.integers(1, 9),
    features=st.integers(1, 6),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 2**16),
)
def test_shapes_dtypes_and_row_independence(name, batch, features, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    t = make(name, features, seed, dtype)
    x = inputs(name, batch, features, dtype, gen=gen)
    z, ladj = t(x)
    assert z.shape == (batch, features) and ladj.shape == (batch,)
    assert z.dtype == dtype and ladj.dtype == dtype
    assert torch.isfinite(z).all() and torch.isfinite(ladj).all()
    # Each row is transformed on its own: the last row alone gives the same result.
    z_last, ladj_last = t(x[-1:])
    torch.testing.assert_close(z_last, z[-1:])
    torch.testing.assert_close(ladj_last, ladj[-1:])
    x_back, ladj_inv = t.inverse(z)
    assert x_back.shape == x.shape and ladj_inv.shape == (batch,) and x_back.dtype == dtype
    tol = 1e-4 if dtype == torch.float32 else 1e-9
    torch.testing.assert_close(x_back, x, atol=tol, rtol=tol)
    torch.testing.assert_close(ladj_inv, -ladj, atol=tol, rtol=tol)


@pytest.mark.parametrize("name", ["logit", "logit_alpha", "sigmoid"])
def test_jacobian_of_domain_checked_layers_stays_vectorized(name, monkeypatch):
    jacobian_module = importlib.import_module("exactflow.jacobians")
    calls = []
    loop = jacobian_module._jacobian_loop
    monkeypatch.setattr(jacobian_module, "_jacobian_loop", lambda *a: calls.append(1) or loop(*a))
    t = make(name, 3, seed=0, dtype=torch.float64)
    x = inputs(name, 4, 3, torch.float64)
    jac = ef.jacobian(t, x)
    assert not calls, "the domain check must not force the per-row fallback"
    z, _ = t(x)
    jac_inv = ef.jacobian(lambda v: t.inverse(v)[0], z)
    assert not calls
    eye = torch.eye(3, dtype=torch.float64).expand(4, 3, 3)
    torch.testing.assert_close(jac @ jac_inv, eye)
