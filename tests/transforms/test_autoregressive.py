"""Tests for the MADE autoregressive layers (exactflow.transforms.autoregressive)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

import exactflow as ef
from exactflow.nn import MADE
from exactflow.transforms import (
    InverseAutoregressive,
    MaskedAffineAutoregressive,
    MaskedAutoregressive,
    SplineAutoregressive,
)
from tests.helpers import perturb, train_steps

LAYERS = {
    "maf": lambda d, c, **kw: MaskedAffineAutoregressive(d, hidden=(16, 16), context=c, **kw),
    "iaf": lambda d, c, **kw: InverseAutoregressive(d, hidden=(16, 16), context=c, **kw),
    "spline": lambda d, c, **kw: SplineAutoregressive(
        d, bins=5, bound=3.0, hidden=(16,), context=c, **kw
    ),
    "spline-sampling": lambda d, c, **kw: SplineAutoregressive(
        d, bins=5, bound=3.0, hidden=(16,), context=c, fast="sampling", **kw
    ),
}
# See tests/transforms/test_coupling.py: strongly perturbed splines are too steep somewhere
# for any float32 inverse; 0.1 keeps them far from the identity and resolvable.
ROUND_TRIP_SCALE = {"maf": 0.5, "iaf": 0.5, "spline": 0.1, "spline-sampling": 0.1}


def inputs(batch: int, d: int, c: int, dtype: torch.dtype) -> tuple[Tensor, Tensor | None]:
    x = 2.0 * torch.randn(batch, d, dtype=dtype)
    return x, (torch.randn(batch, c, dtype=dtype) if c else None)


@pytest.mark.parametrize("name", LAYERS)
@pytest.mark.parametrize("features", [1, 2, 3, 5])
@pytest.mark.parametrize("context", [0, 3])
def test_check_transform_float64(name: str, features: int, context: int) -> None:
    t = perturb(LAYERS[name](features, context, order="random", seed=features).double())
    x, c = inputs(8, features, context, torch.float64)
    assert ef.check_transform(t, x, c).ok


@pytest.mark.parametrize("name", LAYERS)
def test_check_transform_batch_of_one(name: str) -> None:
    t = perturb(LAYERS[name](3, 2).double())
    x, c = inputs(1, 3, 2, torch.float64)
    ef.check_transform(t, x, c)


@pytest.mark.parametrize("name", LAYERS)
@pytest.mark.parametrize("context", [0, 2])
def test_float32_round_trip(name: str, context: int) -> None:
    t = perturb(LAYERS[name](5, context), scale=ROUND_TRIP_SCALE[name])
    x, c = inputs(64, 5, context, torch.float32)
    with torch.no_grad():
        z, ladj = t(x, c)
        x_back, ladj_inv = t.inverse(z, c)
    assert (z - x).abs().max() > 0.5  # far from the identity
    assert (x_back - x).abs().max() < 1e-4
    assert (ladj + ladj_inv).abs().max() < 1e-4


@pytest.mark.parametrize("name", LAYERS)
@pytest.mark.parametrize("order", ["random", [2, 4, 0, 1, 3]])
def test_jacobian_is_triangular_in_the_order(name: str, order) -> None:
    """Both directions' Jacobians are exactly lower triangular in the layer's order."""
    d = 5
    t = LAYERS[name](d, 2, order=order, seed=7, activation=nn.Tanh).double()
    t = perturb(t)
    x, c = inputs(4, d, 2, torch.float64)
    with torch.no_grad():
        z, _ = t(x, c)
    strictly_upper = torch.triu(torch.ones(d, d, dtype=torch.bool), diagonal=1)
    strictly_lower = strictly_upper.T
    for fn, point in ((t, x), (t.inverse, z)):
        jac = ef.jacobian(fn, point, c)
        ordered = jac[:, t.order][:, :, t.order]
        assert not bool(ordered[:, strictly_upper].any()), "a feature depends on a later one"
        assert bool((ordered.diagonal(dim1=1, dim2=2) != 0).all())
        # Not trivially diagonal: each feature after the first depends on the earlier ones.
        assert bool((ordered[:, strictly_lower] != 0).any(dim=0).all())


def count_calls(t: MaskedAutoregressive, method, *args) -> tuple[int, int]:
    """(full conditioner passes, ``autoregress`` runs) during ``method(*args)``.

    A MADE's full passes each take a workspace for the fused pass (alone, or with the
    affine map); another conditioner's are its forward calls.
    """
    passes, runs = [], []
    made = t.made
    patched = {}
    if isinstance(made, MADE):
        patched["_workspace"] = made._workspace
        patched["autoregress"] = made.autoregress
        made._workspace = lambda *a, **k: passes.append(1) or patched["_workspace"](*a, **k)
        made.autoregress = lambda *a, **k: runs.append(1) or patched["autoregress"](*a, **k)
        handle = None
    else:
        handle = made.register_forward_hook(lambda *_: passes.append(1))
    try:
        with torch.no_grad():
            method(*args)
    finally:
        if handle is not None:
            handle.remove()
        for name in patched:
            delattr(made, name)
    return len(passes), len(runs)


@pytest.mark.parametrize("features", [1, 4])
def test_fast_direction_takes_one_pass_and_slow_one_autoregression(features: int) -> None:
    x = torch.randn(3, features)
    maf, iaf = LAYERS["maf"](features, 0), LAYERS["iaf"](features, 0)
    assert count_calls(maf, maf.forward, x) == (1, 0)
    assert count_calls(maf, maf.inverse, x) == (0, 1)
    assert count_calls(iaf, iaf.forward, x) == (0, 1)
    assert count_calls(iaf, iaf.inverse, x) == (1, 0)
    assert maf.fast == "density" and iaf.fast == "sampling"


def test_iaf_is_maf_with_directions_swapped() -> None:
    """With the same weights, IAF's inverse is MAF's forward and vice versa."""
    maf = perturb(LAYERS["maf"](4, 2, order="reverse").double())
    iaf = LAYERS["iaf"](4, 2, order="reverse").double()
    iaf.load_state_dict(maf.state_dict())
    x, c = inputs(6, 4, 2, torch.float64)
    z_maf, l_maf = maf(x, c)
    x_iaf, l_iaf = iaf.inverse(x, c)
    assert torch.equal(z_maf, x_iaf) and torch.equal(l_maf, l_iaf)
    back_maf, lb_maf = maf.inverse(x, c)
    back_iaf, lb_iaf = iaf(x, c)
    assert torch.allclose(back_maf, back_iaf) and torch.allclose(lb_maf, lb_iaf)


@pytest.mark.parametrize("name", LAYERS)
def test_new_layer_is_identity(name: str) -> None:
    t = LAYERS[name](3, 2)
    x, c = inputs(5, 3, 2, torch.float32)
    for fn in (t.forward, t.inverse):
        y, ladj = fn(x, c)
        assert torch.allclose(y, x, atol=1e-6) and ladj.abs().max() < 1e-6


def test_one_feature_with_context_is_a_conditional_elementwise_map() -> None:
    t = perturb(LAYERS["maf"](1, 2).double())
    x = torch.randn(5, 1, dtype=torch.float64)
    z1, _ = t(x, torch.zeros(5, 2, dtype=torch.float64))
    z2, _ = t(x, torch.ones(5, 2, dtype=torch.float64))
    assert not torch.allclose(z1, z2)
    # Without a context the single feature gets a learned constant affine map.
    u = perturb(LAYERS["maf"](1, 0).double())
    _, ladj = u(x)
    assert torch.allclose(ladj, ladj[:1].expand(5))


@pytest.mark.parametrize("name", LAYERS)
def test_gradients_reach_the_made(name: str) -> None:
    t = perturb(LAYERS[name](3, 2), scale=0.2)
    x, c = inputs(16, 3, 2, torch.float32)
    for fn in (t.forward, t.inverse):
        t.zero_grad()
        y, ladj = fn(x, c)
        (y.square().sum() - ladj.sum()).backward()
        grad = t.made.packed.grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_spline_autoregressive_tails_and_far_inputs() -> None:
    t = perturb(SplineAutoregressive(2, bins=4, bound=3.0, hidden=(8,)).double(), scale=0.3)
    x = torch.tensor([[1e6, -1e6], [3.0, -3.0], [0.0, 50.0]], dtype=torch.float64)
    z, ladj = t(x)
    assert torch.equal(z[0], x[0]) and torch.isfinite(ladj).all()
    assert torch.allclose(z[1], x[1], atol=1e-9)
    ef.check_transform(t, x)


def test_bad_arguments_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="fast"):
        MaskedAutoregressive(3, fast="both")
    with pytest.raises(ValueError, match="features"):
        MaskedAffineAutoregressive(0)
    with pytest.raises(ValueError, match="order"):
        MaskedAffineAutoregressive(3, order=[0, 1])
    t = MaskedAffineAutoregressive(3, hidden=(8,), context=2)
    with pytest.raises(ValueError, match=r"shape \(batch, 3\)"):
        t(torch.randn(4, 4), torch.randn(4, 2))
    with pytest.raises(ValueError, match="conditional"):
        t.inverse(torch.randn(4, 3))
    with pytest.raises(ValueError, match=r"context must have shape \(4, 2\)"):
        t(torch.randn(4, 3), torch.randn(5, 2))


def test_generic_layer_takes_any_map_by_name() -> None:
    t = perturb(MaskedAutoregressive(3, "additive", hidden=(8,), context=1).double())
    x, c = inputs(5, 3, 1, torch.float64)
    _, ladj = t(x, c)
    assert torch.equal(ladj, torch.zeros(5, dtype=torch.float64))
    ef.check_transform(t, x, c)
    assert t.made.outputs == 1
    assert SplineAutoregressive(3, bins=4).made.outputs == 11


# -- the sequential direction: incremental steps against the plain d-pass loop ------------


@pytest.mark.parametrize("name", LAYERS)
@pytest.mark.parametrize("features", [1, 2, 5])
@pytest.mark.parametrize("context", [0, 3])
def test_sequential_direction_equals_the_d_pass_loop(name: str, features: int, context: int):
    t = perturb(LAYERS[name](features, context, order="random", seed=features).double(),
                scale=0.3)
    v, c = inputs(9, features, context, torch.float64)
    # _solve is the sequential direction of either layer kind (MAF inverse, IAF forward).
    with torch.no_grad():
        u, ladj = t._solve(v, c)
        u_ref, ladj_ref = t._solve_by_passes(v, t._context(c))
    torch.testing.assert_close(u, u_ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(ladj, ladj_ref, rtol=0, atol=1e-10)
    # With autograd (the units are concatenated, not written in place): same values and
    # the same gradients as the loop.
    v.requires_grad_(True)
    u, ladj = t._solve(v, c)
    u_ref, ladj_ref = t._solve_by_passes(v, t._context(c))
    torch.testing.assert_close(u, u_ref, rtol=0, atol=1e-10)
    params = [v, *t.parameters()]
    weights = torch.randn_like(u)
    got = torch.autograd.grad((u * weights).sum() + ladj.sum(), params)
    expected = torch.autograd.grad((u_ref * weights).sum() + ladj_ref.sum(), params)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-9)


def test_compiled_maf_log_prob_equals_eager() -> None:
    flow = ef.models.maf(4, layers=2, hidden=(16, 16), context=2)
    perturb(flow, scale=0.3, seed=0)
    x, c = torch.randn(32, 4), torch.randn(32, 2)
    compiled = torch.compile(flow.log_prob, dynamic=False)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, c), flow.log_prob(x, c), rtol=1e-5, atol=1e-5)


# -- exactflow 0.1 model files --------------------------------------------------------------

FIXTURE = Path(__file__).parent.parent / "data" / "made_v01.pt"


@pytest.mark.parametrize("name", ["maf", "iaf", "nsf_ar"])
def test_flows_saved_by_exactflow_01_load_with_the_same_outputs(name: str) -> None:
    case = torch.load(FIXTURE, weights_only=True)["flows"][name]
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in case["kwargs"].items()}
    flow = getattr(ef.models, case["model"])(**kwargs).double()
    flow.load_state_dict(case["state"])  # strict: every 0.1 key converted, none missing
    x, c = case["x"], case["context"]
    with torch.no_grad():
        torch.testing.assert_close(flow.log_prob(x, c), case["log_prob"], rtol=0, atol=1e-10)
        z, ladj = flow.transform(x, c)
        back, ladj_back = flow.transform.inverse(z, c)
    for got, key in ((z, "z"), (ladj, "ladj"), (back, "x_back"), (ladj_back, "ladj_back")):
        torch.testing.assert_close(got, case[key], rtol=0, atol=1e-10)


# -- a conditioner of the user's own ----------------------------------------------------------


class TinyAutoregressive(nn.Module):
    """A conditioner written outside the package: masked bilinear features of tanh(x).

    ``theta[b, i, p] = sum_j W[p, i, j] M[i, j] tanh(x[b, j]) + (context term) + bias``
    with ``M[i, j] = 1`` iff feature ``j`` comes before ``i`` in the order: autoregressive.
    Zero weights at initialization, so the layer starts as the identity.
    """

    def __init__(self, features: int, outputs: int, context: int = 0, order=None):
        super().__init__()
        rank = torch.argsort(order)
        self.register_buffer("mask", (rank[None, :] < rank[:, None]).float())
        self.weight = nn.Parameter(torch.zeros(outputs, features, features))
        self.bias = nn.Parameter(torch.zeros(features, outputs))
        self.context_net = nn.Linear(context, features * outputs) if context else None
        if self.context_net is not None:
            nn.init.zeros_(self.context_net.weight)
            nn.init.zeros_(self.context_net.bias)
        self.shape = (features, outputs)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        theta = torch.einsum("pij,bj->bip", self.weight * self.mask, torch.tanh(x)) + self.bias
        if self.context_net is not None:
            theta = theta + self.context_net(context).reshape(-1, *self.shape)
        return theta


USER_LAYERS = {
    "maf": lambda d, c: MaskedAffineAutoregressive(
        d, context=c, order="random", seed=1, conditioner=TinyAutoregressive
    ),
    "iaf": lambda d, c: InverseAutoregressive(d, context=c, conditioner=TinyAutoregressive),
    "spline": lambda d, c: SplineAutoregressive(
        d, bins=4, bound=3.0, context=c, order="reverse", conditioner=TinyAutoregressive
    ),
}


@pytest.mark.parametrize("name", USER_LAYERS)
@pytest.mark.parametrize("context", [0, 2])
def test_a_user_conditioner_plugs_in(name: str, context: int) -> None:
    t = USER_LAYERS[name](4, context)
    assert isinstance(t.made, TinyAutoregressive) and t.conditioner is t.made
    assert t.order.tolist() == (t.made.mask.sum(1).argsort().tolist())
    x, c = inputs(16, 4, context, torch.float32)
    z, ladj = t(x, c)  # zero-initialized: the identity
    assert torch.allclose(z, x, atol=1e-5) and ladj.abs().max() < 1e-5
    # A few training steps move it; then it is proved right at those parameters.
    train_steps(t, x, c)
    assert t.made.weight.abs().sum() > 0
    t = t.double()
    x, c = inputs(8, 4, context, torch.float64)
    assert ef.check_transform(t, x, c).ok
    perturb(t, scale=0.3, seed=3)  # and at random parameters
    assert ef.check_transform(t, x, c).ok
    # No autoregress method: the sequential direction re-runs it once per feature (the
    # first of them on one row when there is no context).
    assert count_calls(t, t.inverse if name != "iaf" else t.forward, x, c) == (4, 0)


def test_a_user_conditioner_must_be_a_module() -> None:
    with pytest.raises(TypeError, match="nn.Module"):
        MaskedAffineAutoregressive(3, conditioner=lambda *a, **k: (lambda x, c: x))


# -- the fused affine pass (MAF density, IAF sampling) against the generic one --------------


def generic_one_pass(t: MaskedAutoregressive, u: Tensor, c: Tensor | None):
    """The layer's one-pass direction through the MADE and the AffineMap, unfused."""
    v, log_det = t.monotonic.forward(u, t.made(u, t._context(c)))
    return v, log_det.sum(dim=1)


@pytest.mark.parametrize("features", [1, 2, 5])
@pytest.mark.parametrize("hidden", [(), (3,), (9, 7)])
@pytest.mark.parametrize("context", [0, 3])
@pytest.mark.parametrize("order", [None, "random"])
def test_fused_affine_pass_equals_the_generic_one(features, hidden, context, order) -> None:
    t = MaskedAffineAutoregressive(features, hidden=hidden, context=context, order=order, seed=1)
    t = perturb(t.double(), seed=features)
    u = torch.randn(7, features, dtype=torch.float64, requires_grad=True)
    c = torch.randn(7, context, dtype=torch.float64, requires_grad=True) if context else None
    v, log_det = t._one_pass(u, c)
    v_ref, log_det_ref = generic_one_pass(t, u, c)
    torch.testing.assert_close(v, v_ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(log_det, log_det_ref, rtol=0, atol=1e-12)
    grad_v, grad_l = torch.randn_like(v), torch.randn_like(log_det)
    wrt = [u, t.made.packed] + ([c] if context else [])
    got = torch.autograd.grad((v * grad_v).sum() + (log_det * grad_l).sum(), wrt)
    expected = torch.autograd.grad((v_ref * grad_v).sum() + (log_det_ref * grad_l).sum(), wrt)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    with torch.no_grad():
        torch.testing.assert_close(t._one_pass(u, c)[0], v_ref, rtol=0, atol=1e-12)


def test_fused_affine_pass_gradcheck_and_gradgradcheck() -> None:
    """Finite differences agree with the hand-written backward and its create_graph path."""
    t = InverseAutoregressive(3, hidden=(5, 4), context=2, order="random", seed=3)
    sampling = ef.Inverse(perturb(t.double(), seed=1))  # its forward: IAF's fused direction
    z = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    c = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    packed = t.made.packed.detach().clone().requires_grad_(True)

    def fn(zz, cc, pp):
        return torch.func.functional_call(sampling, {"transform.made.packed": pp}, (zz, cc))

    assert torch.autograd.gradcheck(fn, (z, c, packed))
    assert torch.autograd.gradgradcheck(fn, (z, c, packed))


@pytest.mark.parametrize("builder", ["maf", "iaf"])
def test_conditional_autoregressive_flow_is_normalized(builder: str) -> None:
    """The mass ``log_prob`` puts on a box equals the share of the flow's samples in it.

    A 2-D conditional MAF / IAF at random parameters, three contexts: quadrature of
    ``exp(log_prob)`` against sampling, which runs the other direction (through
    ``MADE.autoregress`` or the fused pass), and the log-density ``sample_and_log_prob``
    reports against ``log_prob`` at the same points.
    """
    flow = getattr(ef.models, builder)(2, layers=3, hidden=(16, 16), context=3).double()
    perturb(flow, scale=0.2, seed=sum(map(ord, "maf")))
    edges = torch.linspace(-16.0, 16.0, 801, dtype=torch.float64)
    mid = (edges[1:] + edges[:-1]) / 2
    points = torch.cartesian_prod(mid, mid)
    cell = float(edges[1] - edges[0]) ** 2
    n = 40_000
    for context in 2.0 * torch.randn(3, 3, dtype=torch.float64):
        with torch.no_grad():
            mass = float(flow.log_prob(points, context.expand(len(points), 3)).exp().sum() * cell)
            x, log_prob = flow.sample_and_log_prob(n, context=context)
            torch.testing.assert_close(flow.log_prob(x, context.expand(n, 3)), log_prob)
        inside = float((x.abs() < 16.0).all(dim=1).double().mean())
        tolerance = 5e-3 + 4 * (inside * (1 - inside) / n) ** 0.5
        assert abs(mass - inside) < tolerance, (mass, inside, context.tolist())


def test_a_made_subclass_with_its_own_forward_is_what_the_layer_computes():
    # (the fused pass read MADE's packed weights and skipped the subclass's forward: the
    # layer computed another map than its conditioner, eager only; compiled and vmapped
    # runs called forward, so the same flow scored differently)
    class HalfMADE(MADE):
        def forward(self, x, context=None):
            return 0.5 * super().forward(x, context)

    def factory(features, outputs, context=0, order=None):
        return HalfMADE(features, outputs=outputs, hidden=(16,), context=context, order=order,
                        zero_last=False)

    torch.manual_seed(0)
    layer = MaskedAutoregressive(3, "affine", conditioner=factory).double()
    perturb(layer, 1.0, seed=1)
    x = torch.randn(6, 3, dtype=torch.float64)
    with torch.no_grad():
        z, ladj = layer(x)
        expected, each = ef.transforms.AffineMap().forward(x, layer.made(x))
    torch.testing.assert_close(z, expected)
    torch.testing.assert_close(ladj, each.sum(1))
    assert ef.check_transform(layer, x).ok  # (the inverse too: by passes, not MADE's steps)
