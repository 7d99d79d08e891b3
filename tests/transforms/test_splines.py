"""Tests for the monotonic rational-quadratic spline (exactflow.transforms.splines)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import exactflow as ef
from exactflow.transforms.splines import rational_quadratic, spline_params

DTYPES = [torch.float32, torch.float64]
# Inverse-of-forward tolerances at moderate random parameters (scale 0.5: every slope is
# within about e^{+-5}); steeper splines are tested against their conditioning below.
ROUND_TRIP_TOL = {torch.float32: 1e-5, torch.float64: 1e-10}


def random_params(
    shape: tuple[int, ...],
    bins: int,
    dtype: torch.dtype,
    seed: int,
    scale: float = 0.5,
    requires_grad: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    params = tuple(
        (scale * torch.randn(*shape, n, generator=g, dtype=torch.float64))
        .to(dtype)
        .requires_grad_(requires_grad)
        for n in (bins, bins, bins - 1)
    )
    return params  # type: ignore[return-value]


def reference_knots(raw: Tensor, bound: float, min_size: float = 1e-3) -> Tensor:
    """Knot positions as the docstring defines them, computed independently."""
    bins = raw.shape[-1]
    fractions = min_size + (1 - min_size * bins) * torch.softmax(raw, -1)
    cum = torch.cat([torch.zeros_like(fractions[..., :1]), torch.cumsum(fractions, -1)], -1)
    return -bound + 2 * bound * cum


def reference_derivatives(raw: Tensor, min_derivative: float = 1e-3) -> Tensor:
    interior = min_derivative + F.softplus(raw + math.log(math.expm1(1 - min_derivative)))
    one = torch.ones_like(interior[..., :1])
    return torch.cat([one, interior, one], -1)


def test_spline_params() -> None:
    assert [spline_params(b) for b in (1, 2, 8)] == [2, 5, 23]
    for bad in (0, -3, 2.0, True):
        with pytest.raises(ValueError, match="bins"):
            spline_params(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_round_trip_and_log_dets_cancel(dtype: torch.dtype, seed: int) -> None:
    bound, bins = 3.0, 7
    g = torch.Generator().manual_seed(100 + seed)
    # Mostly inside, some outside [-bound, bound].
    x = (4.0 * torch.rand(64, 5, generator=g, dtype=torch.float64) - 2.0).to(dtype) * bound
    w, h, d = random_params((64, 5), bins, dtype, seed)
    y, ladj = rational_quadratic(x, w, h, d, bound)
    x_back, ladj_inv = rational_quadratic(y, w, h, d, bound, inverse=True)
    assert y.shape == ladj.shape == x.shape and y.dtype == dtype
    torch.testing.assert_close(x_back, x, atol=ROUND_TRIP_TOL[dtype], rtol=0)
    torch.testing.assert_close(
        ladj + ladj_inv, torch.zeros_like(x), atol=50 * ROUND_TRIP_TOL[dtype], rtol=0
    )
    outside = x.abs() > bound
    assert outside.any() and (~outside).any()
    assert torch.equal(y[outside], x[outside])
    assert torch.equal(ladj[outside], torch.zeros_like(x[outside]))
    # The spline really moves the points inside (random parameters, not the identity).
    assert (y - x)[~outside].abs().max() > 0.1


@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trip_of_steep_splines_is_as_good_as_their_conditioning(dtype: torch.dtype) -> None:
    # At large parameters the slope ranges over many orders of magnitude, and a rounding of
    # y of size eps * bound moves the inverse by eps * bound / slope: the best any inverse
    # can do. The error must stay within a small multiple of that.
    bound, eps = 2.0, torch.finfo(dtype).eps
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        x = (2.0 * torch.rand(400, generator=g, dtype=torch.float64) - 1.0).to(dtype) * bound
        w, h, d = random_params((400,), 10, dtype, seed, scale=2.0)
        y, ladj = rational_quadratic(x, w, h, d, bound)
        x_back, ladj_inv = rational_quadratic(y, w, h, d, bound, inverse=True)
        allowed = 1e3 * eps * bound * (1 + torch.exp(-ladj))
        assert ladj.min() < -5  # the test is about steep, badly conditioned splines
        assert ((x_back - x).abs() <= allowed).all()
        assert ((ladj + ladj_inv).abs() <= 1e3 * eps * (1 + torch.exp(-ladj)) * 50).all()


@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_log_det_matches_autograd_derivative(inverse: bool, seed: int) -> None:
    bound = 2.5
    g = torch.Generator().manual_seed(seed)
    x = (5.0 * torch.rand(200, generator=g, dtype=torch.float64) - 2.5) * 1.3
    x.requires_grad_(True)
    w, h, d = random_params((200,), 6, torch.float64, seed, scale=1.0)
    y, ladj = rational_quadratic(x, w, h, d, bound, inverse=inverse)
    # Elementwise map: the gradient of the sum is the diagonal of the Jacobian.
    (slope,) = torch.autograd.grad(y.sum(), x)
    assert (slope > 0).all()
    torch.testing.assert_close(ladj, torch.log(slope), atol=1e-9, rtol=1e-9)


class _SplineLayer(ef.Transform):
    """A spline with its own parameters per feature, to run the library's checker on."""

    elementwise = True

    def __init__(self, features: int, bins: int, bound: float, seed: int):
        super().__init__()
        w, h, d = random_params((features,), bins, torch.float64, seed, scale=1.0)
        self.widths = nn.Parameter(w)
        self.heights = nn.Parameter(h)
        self.derivatives = nn.Parameter(d)
        self.bound = bound

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        y, ladj = rational_quadratic(x, self.widths, self.heights, self.derivatives, self.bound)
        return y, ladj.sum(-1)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        x, ladj = rational_quadratic(
            z, self.widths, self.heights, self.derivatives, self.bound, inverse=True
        )
        return x, ladj.sum(-1)


@pytest.mark.parametrize("features,batch", [(1, 1), (3, 7), (5, 4)])
def test_check_transform_float64(features: int, batch: int) -> None:
    layer = _SplineLayer(features, bins=5, bound=2.0, seed=features)
    g = torch.Generator().manual_seed(7)
    x = 1.5 * torch.randn(batch, features, generator=g, dtype=torch.float64)
    report = ef.check_transform(layer, x)
    assert report.ok


def test_knots_continuity_and_prescribed_derivatives() -> None:
    bound, bins = 3.0, 6
    w, h, d = random_params((), bins, torch.float64, seed=3, scale=1.0)
    xk, yk, dk = reference_knots(w, bound), reference_knots(h, bound), reference_derivatives(d)
    assert not torch.allclose(dk, torch.ones_like(dk), atol=0.1)  # non-trivial knot slopes
    delta = 1e-7
    for k in range(bins + 1):
        at = xk[k].expand(1)
        pts = torch.cat([at - delta, at, at + delta])
        y, ladj = rational_quadratic(pts, w, h, d, bound)
        # The value at the knot, and both one-sided limits (through the neighbouring bins'
        # formulas), agree with the knot height.
        torch.testing.assert_close(y[1], yk[k], atol=1e-12, rtol=0)
        torch.testing.assert_close(y[0] + delta * dk[k], yk[k], atol=1e-9, rtol=0)
        torch.testing.assert_close(y[2] - delta * dk[k], yk[k], atol=1e-9, rtol=0)
        # The slope on both sides (and at the knot) is the prescribed derivative.
        torch.testing.assert_close(torch.exp(ladj), dk[k].expand(3), atol=0, rtol=1e-5)
        # And the inverse maps the knot height back to the knot.
        x_back, ladj_inv = rational_quadratic(yk[k].expand(1), w, h, d, bound, inverse=True)
        torch.testing.assert_close(x_back, at, atol=1e-12, rtol=0)
        torch.testing.assert_close(ladj_inv, -torch.log(dk[k]).expand(1), atol=1e-9, rtol=0)


def test_strictly_monotonic_on_a_dense_grid() -> None:
    bound = 2.0
    x = torch.linspace(-1.5 * bound, 1.5 * bound, 20001, dtype=torch.float64)
    for seed in range(3):
        w, h, d = random_params((), 12, torch.float64, seed, scale=1.5)
        y, ladj = rational_quadratic(x, w, h, d, bound)
        assert (y[1:] > y[:-1]).all()
        assert torch.isfinite(ladj).all()
        # The analytic inverse is monotonic too, and undoes the forward map.
        x_back, _ = rational_quadratic(y, w, h, d, bound, inverse=True)
        assert (x_back[1:] > x_back[:-1]).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_boundary_joins_identity_with_value_and_slope(dtype: torch.dtype) -> None:
    bound = 4.0
    eps = torch.finfo(dtype).eps
    w, h, d = random_params((), 8, dtype, seed=5, scale=1.0)
    delta = 1e-4 if dtype == torch.float32 else 1e-6
    for side in (-1.0, 1.0):
        b = side * bound
        pts = torch.tensor([b - delta, b, b + delta], dtype=dtype)
        y, ladj = rational_quadratic(pts, w, h, d, bound)
        # Value continuous at the bound, where the spline and the identity both give b.
        torch.testing.assert_close(y[1], pts[1], atol=8 * eps * bound, rtol=0)
        torch.testing.assert_close(y, pts, atol=1e3 * delta**2 + 8 * eps * bound, rtol=0)
        # Slope 1 on both sides of the bound: log-det goes to 0 (exactly 0 outside).
        assert (ladj.abs() <= 1e3 * delta + 1e3 * eps).all()
        assert ladj[2 if side > 0 else 0] == 0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("scale", [1.0, 6.0])
def test_edges_knots_and_far_outside_are_finite_with_finite_gradients(
    dtype: torch.dtype, inverse: bool, scale: float
) -> None:
    bound, bins = 3.0, 5
    w, h, d = random_params((), bins, dtype, seed=11, scale=scale, requires_grad=True)
    with torch.no_grad():
        knots = reference_knots(h if inverse else w, bound)
    far = [-1e30, 1e30]  # b^2 - 4ac would overflow float32 if these were not clamped
    special = torch.cat([torch.tensor([-1e6, -bound, bound, 1e6, *far], dtype=dtype), knots])
    x = special.clone().requires_grad_(True)
    y, ladj = rational_quadratic(x, w, h, d, bound, inverse=inverse)
    assert torch.isfinite(y).all() and torch.isfinite(ladj).all()
    (y.sum() + ladj.sum()).backward()
    for name, t in (("x", x), ("widths", w), ("heights", h), ("derivatives", d)):
        assert t.grad is not None and torch.isfinite(t.grad).all(), name
    # Far outside: the identity with log-det exactly 0; the bounds map to themselves.
    assert torch.equal(y[[0, 3, 4, 5]], special[[0, 3, 4, 5]])
    assert (ladj[[0, 3, 4, 5]] == 0).all()
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(y[1:3].detach(), special[1:3], atol=8 * eps * bound, rtol=0)
    # And the other direction takes them back.
    x_back, ladj_back = rational_quadratic(y.detach(), w, h, d, bound, inverse=not inverse)
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(x_back, special, atol=tol, rtol=0)
    assert torch.isfinite(ladj_back).all()


def test_zero_parameters_are_the_identity() -> None:
    x = torch.linspace(-6, 6, 101, dtype=torch.float64)
    w, h, d = (torch.zeros(n, dtype=torch.float64) for n in (8, 8, 7))
    y, ladj = rational_quadratic(x, w, h, d, bound=5.0)
    torch.testing.assert_close(y, x, atol=1e-12, rtol=0)
    torch.testing.assert_close(ladj, torch.zeros_like(x), atol=1e-12, rtol=0)


def test_broadcast_parameters_and_scalar_input() -> None:
    w, h, d = random_params((3,), 4, torch.float64, seed=2)
    x = torch.randn(6, 3, dtype=torch.float64)
    y, ladj = rational_quadratic(x, w, h, d, bound=2.0)
    full = rational_quadratic(x, w.expand(6, 3, 4), h.expand(6, 3, 4), d.expand(6, 3, 3), bound=2.0)
    assert y.shape == ladj.shape == (6, 3)
    torch.testing.assert_close((y, ladj), full, atol=1e-14, rtol=0)
    ws, hs, ds = random_params((), 4, torch.float64, seed=2)
    ys, ls = rational_quadratic(torch.tensor(0.3, dtype=torch.float64), ws, hs, ds, bound=2.0)
    assert ys.shape == ls.shape == ()


def test_bad_arguments_raise_clear_errors() -> None:
    x = torch.zeros(4, 3)
    w, h, d = random_params((4, 3), 5, torch.float32, seed=0)
    with pytest.raises(ValueError, match="heights"):
        rational_quadratic(x, w, h[..., :4], d, 1.0)
    with pytest.raises(ValueError, match="derivatives"):
        rational_quadratic(x, w, h, h, 1.0)
    with pytest.raises(ValueError, match="broadcast"):
        rational_quadratic(torch.zeros(4, 2), w, h, d, 1.0)
    with pytest.raises(ValueError, match="bound"):
        rational_quadratic(x, w, h, d, 0.0)
    with pytest.raises(ValueError, match="bound"):
        rational_quadratic(x, w, h, d, math.inf)
    with pytest.raises(ValueError, match="min_width"):
        rational_quadratic(x, w, h, d, 1.0, min_width=0.2)
    with pytest.raises(ValueError, match="min_derivative"):
        rational_quadratic(x, w, h, d, 1.0, min_derivative=0.0)
    with pytest.raises(ValueError, match="dtype"):
        rational_quadratic(x.double(), w, h, d, 1.0)


def test_compiles_without_graph_breaks() -> None:
    w, h, d = random_params((5,), 4, torch.float32, seed=1)

    def both(x: Tensor) -> tuple[Tensor, Tensor]:
        y, ladj = rational_quadratic(x, w, h, d, 2.0)
        x_back, ladj_inv = rational_quadratic(y, w, h, d, 2.0, inverse=True)
        return x_back, ladj + ladj_inv

    compiled = torch.compile(both, fullgraph=True, backend="eager")
    x = 3 * torch.randn(9, 5)
    x_back, total = compiled(x)
    torch.testing.assert_close(x_back, x, atol=1e-5, rtol=0)
    torch.testing.assert_close(total, torch.zeros_like(x), atol=1e-4, rtol=0)


@settings(max_examples=40, deadline=None)
@given(
    shape=st.lists(st.integers(1, 4), min_size=0, max_size=3).map(tuple),
    bins=st.integers(2, 16),
    bound=st.floats(0.25, 10.0),
    dtype=st.sampled_from(DTYPES),
    shared=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_property_round_trip_monotone_finite(
    shape: tuple[int, ...], bins: int, bound: float, dtype: torch.dtype, shared: bool, seed: int
) -> None:
    g = torch.Generator().manual_seed(seed)
    x = (3.0 * bound * (2 * torch.rand(shape, generator=g, dtype=torch.float64) - 1)).to(dtype)
    # Parameters either one per element or shared along the leading dimension.
    param_shape = shape[1:] if shared and shape else shape
    w, h, d = random_params(param_shape, bins, dtype, seed)
    y, ladj = rational_quadratic(x, w, h, d, bound)
    x_back, ladj_inv = rational_quadratic(y, w, h, d, bound, inverse=True)
    assert y.shape == ladj.shape == x_back.shape == x.shape
    assert y.dtype == ladj.dtype == dtype
    assert torch.isfinite(y).all() and torch.isfinite(ladj).all() and torch.isfinite(ladj_inv).all()
    eps = torch.finfo(dtype).eps
    conditioning = 1 + torch.exp(-ladj)
    assert ((x_back - x).abs() <= 64 * eps * bound * conditioning).all()
    assert ((ladj + ladj_inv).abs() <= 1e3 * eps * conditioning).all()
    # Image of [-bound, bound] is [-bound, bound], order is preserved, identity outside.
    inside = x.abs() <= bound
    assert (y.abs() <= bound * (1 + 4 * eps))[inside].all()
    assert torch.equal(torch.where(inside, x, y), x)
    flat_x, flat_y = x.flatten(), y.flatten()
    order = torch.argsort(flat_x)
    if param_shape == ():
        assert (flat_y[order][1:] >= flat_y[order][:-1]).all()
