"""Tests of exactflow.targets: the Rezende-Mohamed energies and the quadrature log Z."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch

import exactflow as ef
from exactflow import targets as tg

NAMES = ("U1", "U2", "U3", "U4")


@functools.cache
def _log_z(name: str, points: int) -> float:
    # Quadrature is the slow part of these tests: compute each value once.
    return tg.log_normalizer(name, points=points)


def _reference_energy(name: str, z: np.ndarray) -> np.ndarray:
    """Table 1 of Rezende & Mohamed (2015), written out in numpy, without the box wall."""
    z1, z2 = z[:, 0], z[:, 1]
    w1 = np.sin(2 * np.pi * z1 / 4)
    w2 = 3 * np.exp(-0.5 * ((z1 - 1) / 0.6) ** 2)
    w3 = 3 / (1 + np.exp(-(z1 - 1) / 0.3))
    if name == "U1":
        r = np.sqrt(z1**2 + z2**2)
        return 0.5 * ((r - 2) / 0.4) ** 2 - np.log(
            np.exp(-0.5 * ((z1 - 2) / 0.6) ** 2) + np.exp(-0.5 * ((z1 + 2) / 0.6) ** 2)
        )
    if name == "U2":
        return 0.5 * ((z2 - w1) / 0.4) ** 2
    if name == "U3":
        return -np.log(
            np.exp(-0.5 * ((z2 - w1) / 0.35) ** 2) + np.exp(-0.5 * ((z2 - w1 + w2) / 0.35) ** 2)
        )
    return -np.log(
        np.exp(-0.5 * ((z2 - w1) / 0.4) ** 2) + np.exp(-0.5 * ((z2 - w1 + w3) / 0.35) ** 2)
    )


@pytest.mark.parametrize("name", NAMES)
def test_energy_matches_paper_inside_the_box(name: str) -> None:
    z = np.random.default_rng(0).uniform(-3.99, 3.99, size=(257, 2))
    target = tg.get(name)
    lp = target.log_prob(torch.from_numpy(z))
    assert lp.shape == (257,) and lp.dtype == torch.float64
    np.testing.assert_allclose(lp.numpy(), -_reference_energy(name, z), rtol=1e-12, atol=1e-12)
    assert target.features == 2 and target.name == name
    assert target.box == ((-4.0, 4.0), (-4.0, 4.0))


@pytest.mark.parametrize("name", ("U2", "U3", "U4"))
def test_box_wall_outside(name: str) -> None:
    # Past the box edge the energy grows by (d / 0.1)^2 / 2 in each coordinate.
    z = torch.tensor([[4.3, 0.5], [-5.0, 1.0], [0.7, -4.2], [4.5, 4.5]], dtype=torch.float64)
    past = (z.abs() - 4.0).clamp(min=0)
    wall = 0.5 * ((past / 0.1) ** 2).sum(1)
    expected = -_reference_energy(name, z.numpy()) - wall.numpy()
    np.testing.assert_allclose(tg.get(name).log_prob(z).numpy(), expected, rtol=1e-12)


def test_u1_has_no_wall() -> None:
    z = torch.tensor([[6.0, 0.0], [0.0, -7.0]], dtype=torch.float64)
    np.testing.assert_allclose(
        tg.get("U1").log_prob(z).numpy(), -_reference_energy("U1", z.numpy()), rtol=1e-12
    )


@pytest.mark.parametrize("name", NAMES)
def test_finite_values_and_gradients_everywhere(name: str) -> None:
    z = torch.cat(
        [
            torch.zeros(1, 2),  # |z| = 0: U1's norm has no gradient there without the clamp
            torch.randn(64, 2) * 6,  # far outside the box too
            torch.tensor([[4.0, -4.0], [30.0, 30.0]]),
        ]
    ).requires_grad_(True)
    lp = tg.get(name)(z)
    assert lp.shape == (67,) and torch.isfinite(lp).all()
    (grad,) = torch.autograd.grad(lp.sum(), z)
    assert torch.isfinite(grad).all()
    # The gradient points back towards the mass: far out, moving inward raises log p.
    assert (grad[-1] < 0).all()


def test_gradient_matches_finite_differences() -> None:
    z = torch.tensor([[1.3, -0.7], [4.2, -4.1], [-2.2, 0.4]], dtype=torch.float64)
    for name in NAMES:
        t = tg.get(name)
        assert torch.autograd.gradcheck(t.log_prob, (z.clone().requires_grad_(True),))


def test_get_and_bad_input() -> None:
    assert tuple(tg.TARGETS) == NAMES
    assert tg.get("u3") is tg.TARGETS["U3"]
    with pytest.raises(ValueError, match="unknown target 'U5'; choose one of U1, U2, U3, U4"):
        tg.get("U5")
    with pytest.raises(ValueError, match=r"z must be \(\.\.\., 2\), got \(4, 3\)"):
        tg.get("U1").log_prob(torch.zeros(4, 3))
    assert ef.targets is tg


def test_log_normalizer_u1_reference_value() -> None:
    # REFERENCES.md: log Z(U1) = 1.8775 on [-8, 8]^2 with a 1601^2 grid.
    assert abs(_log_z("U1", 1601) - 1.8775) < 1e-3


def test_log_normalizer_exact_cases() -> None:
    # A standard Gaussian: log Z = log(2 pi).
    gauss = tg.log_normalizer(lambda z: -0.5 * (z * z).sum(-1), points=401)
    assert abs(gauss - math.log(2 * math.pi)) < 1e-9
    # U2 in closed form: each z1 slice is a Gaussian of width 0.4 in z2 (the z2 wall is
    # 7 widths away), and along z1 the box has length 8 plus two half-Gaussian walls.
    exact = math.log(8 + 2 * 0.1 * math.sqrt(math.pi / 2)) + math.log(0.4 * math.sqrt(2 * math.pi))
    assert abs(_log_z("U2", 801) - exact) < 1e-6


@pytest.mark.parametrize("name", ("U2", "U3", "U4"))
def test_log_normalizer_converged(name: str) -> None:
    coarse, fine = _log_z(name, 801), _log_z(name, 1601)
    assert math.isfinite(fine) and abs(fine - coarse) < 1e-3


def test_log_normalizer_warns_when_the_square_cuts_off_mass() -> None:
    with pytest.warns(UserWarning, match="not negligible on the edge"):
        tg.log_normalizer("U1", bound=2.0, points=101)
    with pytest.raises(ValueError, match="points >= 2"):
        tg.log_normalizer("U1", points=1)
