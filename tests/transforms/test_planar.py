"""Tests of the planar and radial flows (exactflow.transforms.planar)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import exactflow as ef
from exactflow.transforms import Planar, Radial
from exactflow.transforms.planar import _m, _solve_planar, _y_minus_tanh
from tests.helpers import perturb

LAYERS = {"planar": Planar, "radial": Radial}
SHIFT = math.log(math.e - 1.0)


def make(name: str, features: int, seed: int, dtype, device="cpu", scale: float = 1.0):
    torch.manual_seed(seed)
    return perturb(LAYERS[name](features), scale=scale, seed=seed).to(device=device, dtype=dtype)


def set_params(layer: torch.nn.Module, **values) -> torch.nn.Module:
    with torch.no_grad():
        for name, value in values.items():
            getattr(layer, name).copy_(torch.as_tensor(value, dtype=getattr(layer, name).dtype))
    return layer


# -- exactness ------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("features", [1, 2, 3, 5])
@pytest.mark.parametrize("name", sorted(LAYERS))
def test_check_transform_at_random_parameters(name, features, seed, dtype, device):
    t = make(name, features, seed, dtype, device)
    gen = torch.Generator().manual_seed(seed)
    x = 2.0 * torch.randn(7, features, generator=gen, dtype=torch.float64)
    x = x.to(device=device, dtype=dtype)
    assert ef.check_transform(t, x).ok
    # Both directions are proved: the closed-form map as a forward of its own.
    assert ef.check_transform(ef.Inverse(t), x).ok
    # Unconditional layers accept and ignore a context.
    context = torch.randn(7, 2, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    assert ef.check_transform(t, x, context).ok
    torch.testing.assert_close(t(x, context)[0], t(x)[0])


def test_planar_is_not_the_identity_after_perturbation():
    # Guards the tests above against checking a trivial map.
    t = make("planar", 3, 0, torch.float64)
    x = torch.randn(5, 3, dtype=torch.float64)
    z, ladj = t(x)
    assert (z - x).abs().max() > 0.1 and ladj.abs().max() > 0.01


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_new_layer_is_the_identity(name):
    t = LAYERS[name](4).double()
    x = torch.randn(6, 4, dtype=torch.float64)
    z, ladj = t(x)
    torch.testing.assert_close(z, x)
    torch.testing.assert_close(ladj, torch.zeros(6, dtype=torch.float64))


@pytest.mark.parametrize("features", [1, 2, 5])
@pytest.mark.parametrize("name", sorted(LAYERS))
def test_float32_round_trips(name, features):
    t = make(name, features, 3, torch.float32)
    x = 3.0 * torch.randn(64, features)
    z, ladj = t(x)
    x_back, ladj_inv = t.inverse(z)
    assert (x_back - x).abs().max() <= 1e-4 * x.abs().max()
    assert (ladj + ladj_inv).abs().max() <= 1e-4 * (1 + ladj.abs().max())
    # And from the latent side (sampling, then scoring).
    z = torch.randn(64, features)
    x, _ = t.inverse(z)
    z_back, _ = t(x)
    assert (z_back - z).abs().max() <= 1e-4 * z.abs().max()


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_batch_of_one(name):
    t = make(name, 3, 4, torch.float64)
    x = torch.randn(1, 3, dtype=torch.float64)
    z, ladj = t(x)
    assert z.shape == (1, 3) and ladj.shape == (1,)
    assert ef.check_transform(t, x).ok


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_bad_input_is_rejected(name):
    t = LAYERS[name](3)
    with pytest.raises(ValueError, match=r"shape \(batch, 3\)"):
        t(torch.randn(4, 2))
    with pytest.raises(ValueError, match=r"shape \(batch, 3\)"):
        t.inverse(torch.randn(3))
    with pytest.raises(ValueError, match="positive int"):
        LAYERS[name](0)
    with pytest.raises(ValueError, match="positive int"):
        LAYERS[name](2.0)


def test_planar_iterations_argument():
    with pytest.raises(ValueError, match="iterations"):
        Planar(2, iterations=0)
    # Far too few steps leave a visible error; the default does not.
    few = set_params(Planar(2, iterations=1).double(), u=[40.0, 0.0], w=[1.0, 0.5], b=0.3)
    full = set_params(Planar(2).double(), u=[40.0, 0.0], w=[1.0, 0.5], b=0.3)
    x = torch.tensor([[30.0, -1.0]], dtype=torch.float64)
    assert (few.inverse(few(x)[0])[0] - x).abs().max() > 1e-6
    assert (full.inverse(full(x)[0])[0] - x).abs().max() < 1e-12


# -- constraints ----------------------------------------------------------------------------

raw = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False)


@given(
    u=st.lists(raw, min_size=3, max_size=3),
    w=st.lists(raw, min_size=3, max_size=3),
    w_scale=st.sampled_from([1.0, 1e-3, 1e-8, 1e-30, 0.0]),
)
def test_planar_constraint_holds_for_any_raw_parameters(u, w, w_scale):
    t = set_params(Planar(3).double(), u=u, w=[w_scale * v for v in w])
    u_hat, s, one_plus_s = t.constrained()
    assert torch.isfinite(u_hat).all() and torch.isfinite(s) and torch.isfinite(one_plus_s)
    assert s >= -1 and one_plus_s >= 0
    scale = 1 + t.w.abs().sum() * (t.u.abs().sum() + u_hat.abs().sum())
    assert t.w @ u_hat >= -1 - 1e-12 * scale
    # The returned s is w . u_hat, computed without the rounding of the dot product.
    assert (t.w @ u_hat - s).abs() <= 1e-12 * scale


@given(
    u=st.lists(st.floats(-100, 100), min_size=2, max_size=2),
    w=st.lists(st.floats(-10, 10), min_size=2, max_size=2),
    w_scale=st.sampled_from([1.0, 1e-4, 1e-8]),
    b=st.floats(-30, 30),
)
def test_planar_solve_round_trips_for_any_raw_parameters(u, w, w_scale, b):
    t = set_params(Planar(2).double(), u=u, w=[w_scale * v for v in w], b=b)
    gen = torch.Generator().manual_seed(0)
    x = 5.0 * torch.randn(16, 2, generator=gen, dtype=torch.float64)
    x[0] = 0.0
    z, ladj = t(x)
    x_back, ladj_inv = t.inverse(z)
    for v in (z, ladj, x_back, ladj_inv):
        assert torch.isfinite(v).all()
    assert (x_back - x).abs().max() <= 1e-10 * (1 + x.abs().max() + z.abs().max())
    assert (ladj + ladj_inv).abs().max() <= 1e-8 * (1 + ladj.abs().max())


@given(
    raw_alpha=st.floats(-50, 50),
    raw_beta=st.floats(-50, 50),
)
def test_radial_constraint_holds_for_any_raw_parameters(raw_alpha, raw_beta):
    t = set_params(Radial(2).double(), raw_alpha=raw_alpha, raw_beta=raw_beta, z0=[0.5, -1.0])
    alpha, beta, gamma = t.constrained()
    assert alpha > 0 and gamma >= 0
    assert beta >= -alpha * (1 + 1e-15)
    x = torch.tensor([[0.5, -1.0], [0.6, -1.0], [3.0, 4.0]], dtype=torch.float64)
    z, ladj = t(x)
    x_back, ladj_inv = t.inverse(z)
    for v in (z, ladj, x_back, ladj_inv):
        assert torch.isfinite(v).all()
    assert_radial_round_trip(t, x, z, x_back, 1e-9)


def assert_radial_round_trip(t, x, z, x_back, tol):
    # Storing z rounds it by eps |z|; the inverse multiplies that by its largest stretch,
    # max((gamma + r) / (alpha + r), 1 + beta alpha / (alpha + r)^2) at r = |z - z0|. With
    # alpha ~ 1e-10 a ball around z0 is squeezed by ~1e10 and no float round trip is better.
    alpha, beta, gamma = (v.detach() for v in t.constrained())
    r = (z - t.z0).detach().norm(dim=-1)
    stretch = torch.maximum((gamma + r) / (alpha + r), 1 + beta * alpha / (alpha + r) ** 2)
    eps = torch.finfo(x.dtype).eps
    allowed = tol * (1 + x.abs().amax(-1)) + 8 * eps * stretch * (1 + z.abs().amax(-1))
    assert ((x_back - x).abs().amax(-1) <= allowed).all()


def test_planar_m_is_the_shifted_softplus():
    a = torch.linspace(-40, 40, 801, dtype=torch.float64)
    torch.testing.assert_close(_m(a), F.softplus(a + SHIFT) - 1, atol=1e-15, rtol=1e-12)
    assert _m(torch.zeros((), dtype=torch.float64)) == 0
    # No cancellation near 0, where the correction (m(a) - a) / |w|^2 is divided by tiny |w|.
    small = torch.tensor([1e-12, -1e-20], dtype=torch.float64)
    torch.testing.assert_close(_m(small), small * (1 - 1 / math.e), rtol=1e-10, atol=0)


# -- the numerical inverse ------------------------------------------------------------------


def test_planar_solve_stops_early_once_every_row_is_within_rounding(monkeypatch):
    import exactflow.transforms.planar as planar

    calls = {"tanh": 0}
    real_tanh = torch.tanh

    def counting_tanh(x):
        calls["tanh"] += 1
        return real_tanh(x)

    t = torch.linspace(-3, 3, 50, dtype=torch.float64)
    one_plus_s = torch.full_like(t, 1.5)
    monkeypatch.setattr(planar.torch, "tanh", counting_tanh)
    fixed = _solve_planar(t, one_plus_s, 30)
    steps_fixed, calls["tanh"] = calls["tanh"], 0
    early = _solve_planar(t, one_plus_s, 30, early_exit=True)
    assert steps_fixed == 30 and calls["tanh"] < 10  # one tanh per step
    assert torch.equal(early, fixed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_planar_roots_do_not_depend_on_the_early_exit_or_the_batch(dtype):
    gen = torch.Generator().manual_seed(0)
    a = 3 * torch.randn(2000, generator=gen, dtype=dtype)
    t = 5 * torch.randn(2000, generator=gen, dtype=dtype)
    one_plus_s = F.softplus(a + SHIFT)
    iterations = Planar(1)._iterations(dtype)
    fixed = _solve_planar(t, one_plus_s, iterations)
    assert torch.equal(_solve_planar(t, one_plus_s, iterations, early_exit=True), fixed)
    # A row converged early keeps its root while slower rows of its batch go on.
    slow = torch.tensor([1e5], dtype=dtype)  # s large: tanh saturated, Newton creeps
    together = _solve_planar(torch.cat([t[:50], slow + 3]), torch.cat([one_plus_s[:50], slow]),
                             iterations, early_exit=True)
    alone = _solve_planar(t[:50], one_plus_s[:50], iterations, early_exit=True)
    if dtype == torch.float64:  # (float32's vectorized tanh and exp round by batch size)
        assert torch.equal(together[:50], alone)


def test_a_traced_planar_layer_keeps_the_fixed_step_count():
    layer = Planar(2).double()
    with torch.no_grad():
        layer.u.copy_(torch.tensor([50.0, 0.0]))
        layer.w.copy_(torch.tensor([1.0, 0.0]))
    layer.requires_grad_(False)
    traced = torch.jit.trace(lambda x: layer(x)[0], torch.zeros(4, 2, dtype=torch.float64),
                             check_trace=False)
    x = torch.tensor([[30.0, 0.0], [-2.0, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(traced(x), layer(x)[0], rtol=1e-12, atol=1e-12)


def solve_reference(t, one_plus_s):
    return _solve_planar(t.double(), one_plus_s.double(), 80)


@pytest.mark.parametrize("early_exit", [False, True])
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
def test_planar_solve_converges_on_adversarial_grid(dtype, tol, early_exit):
    # w.u from deep inside the boundary (s = -1 up to rounding) to huge, |t| over 33 decades,
    # and t within a few units of s (tanh saturated, the slowest region for Newton).
    a = torch.tensor([-200.0, -40, -18, -5, -1, -1e-4, 0, 1e-7, 0.7, 4, 60, 2e3, 1e5])
    mag = torch.logspace(-25 if dtype == torch.float64 else -15, 8, 34)
    t = torch.cat([mag, -mag, torch.zeros(1)])
    a, t = (v.reshape(-1) for v in torch.meshgrid(a, t, indexing="ij"))
    s_near = torch.logspace(0, 5, 40)
    offsets = torch.tensor([-5.0, -2.0, -0.5, 0.0, 0.3, 1.5, 4.0])
    a_near, off = (v.reshape(-1) for v in torch.meshgrid(s_near, offsets, indexing="ij"))
    a = torch.cat([a, a_near]).to(dtype)
    s = _m(a)
    t = torch.cat([t.to(dtype), (s[-a_near.numel():] + off.to(dtype))])
    one_plus_s = F.softplus(a + SHIFT)

    y = _solve_planar(t, one_plus_s, Planar(1)._iterations(dtype), early_exit=early_exit)
    ref = solve_reference(t, one_plus_s)
    s = one_plus_s - 1
    assert torch.isfinite(y).all()
    # The forward error allowed: tol relative, plus what rounding the inputs of the equation
    # (|t| + |s| + |y|) * eps moves the root, divided by the slope 1 + s sech^2(y) there.
    eps = torch.finfo(dtype).eps
    slope = one_plus_s.double() / torch.cosh(ref) ** 2 + torch.tanh(ref) ** 2
    allowed = tol * ref.abs() + 4 * eps * (t.double().abs() + s.double().abs() + ref.abs()) / slope
    assert ((y.double() - ref).abs() <= allowed).all()
    # The reference itself solves the equation to rounding, written as a sum of terms of one
    # sign, (1 + s) tanh|y| + (|y| - tanh|y|) = |t|, which does not cancel at s = -1.
    y_abs, t_abs, sp = ref.abs(), t.double().abs(), one_plus_s.double()
    terms = (sp * torch.tanh(y_abs), _y_minus_tanh(y_abs, torch.tanh(y_abs)), t_abs)
    residual = terms[0] + terms[1] - terms[2]
    # (y - tanh y is good to ~1e-14 relative just above the switch to its series at 0.2.)
    assert (residual.abs() <= 1e-13 * sum(terms) + 1e-300).all()
    assert (torch.sign(ref) == torch.sign(t.double())).all()


def test_y_minus_tanh_is_accurate():
    y = torch.linspace(0, 3, 3001, dtype=torch.float64)
    exact = y - torch.tanh(y)  # accurate to ~1e-14 relative above 0.2 only
    approx = _y_minus_tanh(y, torch.tanh(y))
    above = y > 0.2
    torch.testing.assert_close(approx[above], exact[above], rtol=1e-13, atol=0)
    # Continuity across the switch to the series, and the series' leading terms at tiny y.
    for dtype in (torch.float64, torch.float32):
        yy = torch.linspace(0.05, 1.0, 2000, dtype=dtype)
        vals = _y_minus_tanh(yy, torch.tanh(yy))
        assert (vals[1:] > vals[:-1]).all()
    tiny = torch.tensor([1e-3, 1e-8], dtype=torch.float64)
    torch.testing.assert_close(
        _y_minus_tanh(tiny, torch.tanh(tiny)),
        tiny**3 / 3 - 2 * tiny**5 / 15 + 17 * tiny**7 / 315,
        rtol=1e-14,
        atol=0,
    )


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
@pytest.mark.parametrize(
    "params",
    [
        {"u": [50.0, -50.0, 50.0], "w": [1.0, 0.5, -2.0], "b": 3.0},  # w.u = -125: s = -1
        {"u": [50.0, 50.0, 50.0], "w": [2.0, 1.0, 3.0], "b": -1.0},  # s = 300
        {"u": [50.0, 50.0, -50.0], "w": [1e-8, 1e-8, 1e-8], "b": 20.0},  # w near zero
        {"u": [0.5, 2.0, -1.0], "w": [0.0, 0.0, 0.0], "b": -30.0},  # w zero
        {"u": [3.0, 1.0, 0.0], "w": [40.0, -30.0, 10.0], "b": 100.0},  # large w, b
    ],
)
def test_planar_adversarial_parameters_round_trip(params, dtype, tol):
    t = set_params(Planar(3).to(dtype), **params)
    x = 4.0 * torch.randn(128, 3, dtype=dtype)
    # Points on and next to the hyperplane w.x + b = 0, where the map bends most.
    x[:8] = x[:8] - ((x[:8] @ t.w + t.b) / (t.w @ t.w).clamp_min(1e-30)).unsqueeze(-1) * t.w
    x[8:16] = x[:8] + 1e-3
    z, ladj = t(x)
    x_back, ladj_inv = t.inverse(z)
    for v in (z, ladj, x_back, ladj_inv):
        assert torch.isfinite(v).all()
    assert (x_back - x).abs().max() <= tol * (x.abs().max() + z.abs().max())
    assert (ladj + ladj_inv).abs().max() <= tol * (1 + ladj.abs().max())


def test_planar_with_zero_w_is_a_shift():
    t = set_params(Planar(2).double(), u=[1.0, -2.0], w=[0.0, 0.0], b=0.5)
    x = torch.randn(4, 2, dtype=torch.float64)
    z, ladj = t(x)
    torch.testing.assert_close(z, x - math.tanh(0.5) * torch.tensor([1.0, -2.0]).double())
    torch.testing.assert_close(ladj, torch.zeros(4, dtype=torch.float64))


def test_planar_check_near_the_invertibility_boundary():
    # w.u = -8: s = -1 + 2e-4, log-dets of size ~8 near the hyperplane.
    t = set_params(Planar(2).double(), u=[-4.0, -4.0], w=[1.0, 1.0], b=0.2)
    x = torch.randn(6, 2, dtype=torch.float64)
    # Rows on and near the hyperplane w.x + b = 0, where the map is flattest.
    x[:, 1] = -0.2 - x[:, 0] + torch.tensor([0.0, 1e-6, -1e-4, 1e-2, 0.1, 1.0]).double()
    report = ef.check_transform(t, x)
    assert report.ok, str(report)
    assert t(x)[1].max() > 7


def test_radial_at_and_near_the_centre():
    t = set_params(Radial(3).double(), z0=[1.0, -1.0, 0.5], raw_alpha=-1.0, raw_beta=2.0)
    x = t.z0.detach().clone().unsqueeze(0).repeat(3, 1)
    x[1] += 1e-9
    x[2] += torch.tensor([1e-3, -2e-3, 0.0], dtype=torch.float64)
    x.requires_grad_(True)
    z, ladj = t(x)
    (z.sum() + ladj.sum()).backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(t.z0.grad).all()
    torch.testing.assert_close(z[0], t.z0.detach())
    assert ef.check_transform(t, x.detach()[1:]).ok


def test_radial_extreme_parameters_stay_finite():
    # alpha tiny (sharp), beta at its bound -alpha (gamma tiny), and the reverse.
    for raw_alpha, raw_beta in [(-25.0, -30.0), (-25.0, 30.0), (30.0, -30.0), (20.0, 20.0)]:
        t = set_params(Radial(2).double(), raw_alpha=raw_alpha, raw_beta=raw_beta)
        x = torch.randn(64, 2, dtype=torch.float64) * 3
        z, ladj = t(x)
        x_back, ladj_inv = t.inverse(z)
        assert torch.isfinite(z).all() and torch.isfinite(ladj).all()
        assert_radial_round_trip(t, x, z.detach(), x_back.detach(), 1e-9)
        # The inverse re-measures r = |z - z0| from the rounded z: with alpha ~ 1e-11 that
        # moves log-dets of size ~50 in their 7th digit.
        torch.testing.assert_close(ladj_inv, -ladj, rtol=1e-5, atol=1e-9)


# -- gradients ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_gradients_of_log_prob_match_finite_differences(name):
    t = make(name, 3, 5, torch.float64)
    x = 2.0 * torch.randn(5, 3, dtype=torch.float64)
    names = [n for n, _ in t.named_parameters()]

    def nll(*params):
        z, ladj = torch.func.functional_call(t, dict(zip(names, params, strict=True)), (x,))
        return 0.5 * (z**2).sum(-1) - ladj

    params = tuple(p.detach().clone().requires_grad_(True) for p in t.parameters())
    assert torch.autograd.gradcheck(nll, params)
    # And with respect to the data.
    assert torch.autograd.gradcheck(lambda v: t(v), (x.clone().requires_grad_(True),))


def test_planar_gradients_at_adversarial_parameters_are_finite_and_nonzero():
    t = set_params(Planar(3).float(), u=[50.0, -50.0, 50.0], w=[1e-8, 2e-8, -1e-8], b=20.0)
    x = torch.randn(32, 3)
    z, ladj = t(x)
    (0.5 * (z**2).sum(-1) - ladj).mean().backward()
    for p in t.parameters():
        assert torch.isfinite(p.grad).all()
    assert sum(float(p.grad.abs().sum()) for p in t.parameters()) > 0


def test_planar_flow_trains_by_maximum_likelihood():
    torch.manual_seed(0)
    layers = [Planar(2) for _ in range(4)]
    flow = ef.Flow(ef.Compose(*layers), ef.StandardNormal(2))
    data = torch.randn(256, 2) * torch.tensor([2.0, 0.5]) + torch.tensor([1.0, -1.0])
    opt = torch.optim.Adam(flow.parameters(), lr=3e-2)
    first = float(-flow.log_prob(data).mean().detach())
    for _ in range(60):
        opt.zero_grad()
        loss = -flow.log_prob(data).mean()
        loss.backward()
        opt.step()
    assert float(-flow.log_prob(data).mean().detach()) < first - 0.2
    # Sampling (the closed-form direction) and scoring agree after training.
    x, log_p = flow.sample_and_log_prob(16)
    torch.testing.assert_close(flow.log_prob(x), log_p, atol=1e-4, rtol=1e-4)
