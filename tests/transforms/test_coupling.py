"""Tests for the coupling layers (exactflow.transforms.coupling) and their elementwise maps."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

import exactflow as ef
from exactflow.transforms import (
    AdditiveCoupling,
    AffineCoupling,
    AffineMap,
    Coupling,
    MonotonicMap,
    SplineCoupling,
)
from exactflow.transforms.coupling import coupling_mask
from tests.helpers import perturb, train_steps

LAYERS = {
    "additive": lambda d, c, **kw: AdditiveCoupling(d, hidden=(16, 16), context=c, **kw),
    "affine": lambda d, c, **kw: AffineCoupling(d, hidden=(16, 16), context=c, **kw),
    "spline": lambda d, c, **kw: SplineCoupling(
        d, bins=5, bound=3.0, hidden=(16,), context=c, **kw
    ),
}
# Perturbation for float32 round trips. A spline driven by a strongly perturbed network has
# slopes near 1e-5 somewhere, where any float32 inverse is off by eps / slope; 0.1 still
# moves points by more than 1 (asserted below) with slopes the float32 inverse resolves.
ROUND_TRIP_SCALE = {"additive": 0.5, "affine": 0.5, "spline": 0.1}


def inputs(batch: int, d: int, c: int, dtype: torch.dtype) -> tuple[Tensor, Tensor | None]:
    # Scale 2 puts some spline inputs outside [-3, 3], on the identity tails.
    x = 2.0 * torch.randn(batch, d, dtype=dtype)
    return x, (torch.randn(batch, c, dtype=dtype) if c else None)


# -- masks ----------------------------------------------------------------------------------


def test_named_masks() -> None:
    assert coupling_mask(5, "even").tolist() == [True, False, True, False, True]
    assert coupling_mask(5, "odd").tolist() == [False, True, False, True, False]
    assert coupling_mask(5, "left").tolist() == [True, True, False, False, False]
    assert coupling_mask(5, "right").tolist() == [False, False, True, True, True]
    for d in (2, 3, 4, 7):
        assert torch.equal(coupling_mask(d, "even"), ~coupling_mask(d, "odd"))
        assert torch.equal(coupling_mask(d, "left"), ~coupling_mask(d, "right"))
    custom = torch.tensor([False, True, True])
    assert torch.equal(coupling_mask(3, custom), custom)


@pytest.mark.parametrize(
    "features, mask, match",
    [
        (1, "even", "features >= 2"),
        (3, "diagonal", "mask must be"),
        (3, torch.tensor([True, True, True]), "transforms 3 of 3"),
        (3, [False, False, False], "transforms 0 of 3"),
        (3, [True, False], "2 entries"),
        (3, torch.tensor([1, 0, 1]), "boolean"),
    ],
)
def test_bad_masks_raise(features: int, mask, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        coupling_mask(features, mask)


@pytest.mark.parametrize("name", LAYERS)
def test_one_feature_is_a_clear_error(name: str) -> None:
    with pytest.raises(ValueError, match="needs features >= 2"):
        LAYERS[name](1, 0)


# -- the proof: log-det against autograd, inverse ------------------------------------------


@pytest.mark.parametrize("name", LAYERS)
@pytest.mark.parametrize("features", [2, 3, 5])
@pytest.mark.parametrize("context", [0, 3])
@pytest.mark.parametrize("mask", ["even", "right"])
def test_check_transform_float64(name: str, features: int, context: int, mask: str) -> None:
    t = perturb(LAYERS[name](features, context, mask=mask).double(), scale=0.5)
    x, c = inputs(8, features, context, torch.float64)
    report = ef.check_transform(t, x, c)
    assert report.ok


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


# -- behaviour ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", LAYERS)
def test_new_layer_is_identity(name: str) -> None:
    t = LAYERS[name](4, 2)
    x, c = inputs(6, 4, 2, torch.float32)
    z, ladj = t(x, c)
    assert torch.allclose(z, x, atol=1e-6) and ladj.abs().max() < 1e-6


@pytest.mark.parametrize("name", LAYERS)
@pytest.mark.parametrize("mask", ["even", "odd", "left", "right"])
def test_only_masked_features_change(name: str, mask: str) -> None:
    t = perturb(LAYERS[name](5, 0, mask=mask).double())
    x, _ = inputs(16, 5, 0, torch.float64)
    x = x.clamp(-2.5, 2.5)  # inside the spline's interval, where it is not the identity
    z, _ = t(x)
    m = coupling_mask(5, mask)
    assert torch.equal(z[:, ~m], x[:, ~m])
    assert bool(((z - x)[:, m].abs() > 1e-8).any(dim=0).all())
    # The Jacobian is identity on the conditioning block, zero from transformed to conditioning.
    jac = ef.jacobian(t, x[:4])
    cond = (~m).nonzero().flatten()
    moved = m.nonzero().flatten()
    eye = torch.eye(len(cond), dtype=x.dtype).expand(4, -1, -1)
    assert torch.equal(jac[:, cond][:, :, cond], eye)
    assert not bool(jac[:, cond][:, :, moved].any())


@pytest.mark.parametrize("features", [2, 3, 5])
def test_alternating_masks_transform_every_feature(features: int) -> None:
    flow = ef.Compose(
        perturb(AffineCoupling(features, hidden=(8,), mask="even").double()),
        perturb(AffineCoupling(features, hidden=(8,), mask="odd").double()),
    )
    x = torch.randn(4, features, dtype=torch.float64)
    jac = ef.jacobian(flow, x)
    # Every output depends on some other input: no feature passed through untouched.
    off_diagonal = jac * (1 - torch.eye(features, dtype=x.dtype))
    assert bool((off_diagonal.abs().sum(dim=(0, 2)) > 0).all())


def test_context_changes_the_output() -> None:
    t = perturb(AffineCoupling(3, hidden=(8,), context=2).double())
    x = torch.randn(5, 3, dtype=torch.float64)
    z1, l1 = t(x, torch.zeros(5, 2, dtype=torch.float64))
    z2, l2 = t(x, torch.ones(5, 2, dtype=torch.float64))
    assert not torch.allclose(z1, z2) and not torch.allclose(l1, l2)


def test_affine_log_scale_is_soft_clamped() -> None:
    t = AffineCoupling(4, hidden=(8,), mask="left", scale_bound=2.0).double()
    with torch.no_grad():
        t.conditioner.linear(-1)[1].fill_(1e4)  # raw log-scales far beyond the bound
    x = torch.randn(3, 4, dtype=torch.float64)
    z, ladj = t(x)
    assert torch.allclose(ladj, torch.full((3,), 2 * 2.0, dtype=torch.float64))
    ef.check_transform(t, x)


def test_spline_is_identity_far_outside_its_interval() -> None:
    t = perturb(SplineCoupling(2, bins=4, bound=3.0, hidden=(8,)).double())
    x = torch.tensor([[1e6, 0.3], [-1e6, -0.7], [3.0, 1.0], [-3.0, 2.0]], dtype=torch.float64)
    z, ladj = t(x)  # feature 0 is transformed (mask "even")
    assert torch.equal(z[:2, 0], x[:2, 0]) and torch.isfinite(ladj).all()
    assert torch.allclose(z[2:, 0], x[2:, 0], atol=1e-9)  # the ends of the spline are fixed
    ef.check_transform(t, x)


@pytest.mark.parametrize("name", LAYERS)
def test_gradients_reach_every_parameter(name: str) -> None:
    t = perturb(LAYERS[name](3, 2))
    x, c = inputs(32, 3, 2, torch.float32)
    z, ladj = t(x, c)
    (z.square().sum() - ladj.sum()).backward()
    grads = [p.grad for p in t.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert t.conditioner.unpack(t.conditioner.packed.grad)[-2].abs().sum() > 0


def test_bad_input_is_a_clear_error() -> None:
    t = AffineCoupling(3, hidden=(8,), context=2)
    with pytest.raises(ValueError, match=r"shape \(batch, 3\)"):
        t(torch.randn(4, 2), torch.randn(4, 2))
    with pytest.raises(ValueError, match="conditional"):
        t(torch.randn(4, 3))
    with pytest.raises(ValueError, match=r"context must have shape \(4, 2\)"):
        t(torch.randn(4, 3), torch.randn(4, 3))
    with pytest.raises(ValueError, match="context"):
        AffineCoupling(3, context=-1)
    with pytest.raises(ValueError, match="scale_bound"):
        AffineCoupling(3, scale_bound=0.0)


def test_state_dict_round_trip_and_buffers() -> None:
    a = perturb(SplineCoupling(3, bins=3, hidden=(8,), mask=torch.tensor([True, False, True])))
    b = SplineCoupling(3, bins=3, hidden=(8,), mask=torch.tensor([True, False, True]))
    b.load_state_dict(a.state_dict())
    x = torch.randn(5, 3)
    assert torch.equal(a(x)[0], b(x)[0])
    names = dict(a.named_buffers())
    assert {"mask", "identity_index", "transformed_index", "unshuffle"} <= set(names)


class _LogScale(MonotonicMap):
    """A test map: ``y = x * exp(a)``, one parameter."""

    params_per_feature = 1

    def forward(self, x: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        return x * torch.exp(params[..., 0]), params[..., 0].expand_as(x)

    def inverse(self, y: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        return y * torch.exp(-params[..., 0]), -params[..., 0].expand_as(y)


def test_a_new_map_plugs_in_without_a_new_layer_class() -> None:
    t = perturb(Coupling(3, _LogScale(), hidden=(8,), mask="odd", context=1).double())
    x = torch.randn(6, 3, dtype=torch.float64)
    ef.check_transform(t, x, torch.randn(6, 1, dtype=torch.float64))
    named = Coupling(3, "affine", hidden=(8,))
    assert isinstance(named.monotonic, AffineMap)
    assert named.conditioner.out_features == 2 * 2  # features 0 and 2, 2 params each
    with pytest.raises(ValueError, match="unknown monotonic map"):
        Coupling(3, "cubic")


def test_spline_coupling_parameter_count() -> None:
    t = SplineCoupling(5, bins=6, hidden=(8,), mask="even")
    assert t.conditioner.out_features == 3 * (3 * 6 - 1)
    assert t.conditioner.in_features == 2
    assert math.isclose(t.monotonic.bound, 5.0)


# -- a conditioner of the user's own ----------------------------------------------------------


class ResidualNet(nn.Module):
    """A conditioner written outside the package: a residual tanh block, zero output layer."""

    def __init__(self, in_features: int, out_features: int, width: int = 12):
        super().__init__()
        self.inp = nn.Linear(in_features, width)
        self.block = nn.Sequential(nn.Tanh(), nn.Linear(width, width), nn.Tanh())
        self.out = nn.Linear(width, out_features)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: Tensor) -> Tensor:
        h = self.inp(x)
        return self.out(h + self.block(h))


USER_LAYERS = {
    "additive": lambda c: AdditiveCoupling(5, mask="left", context=c, conditioner=ResidualNet),
    "affine": lambda c: AffineCoupling(5, mask="odd", context=c, conditioner=ResidualNet),
    "spline": lambda c: SplineCoupling(
        5, bins=4, bound=3.0, context=c, conditioner=lambda i, o: ResidualNet(i, o, width=7)
    ),
    "generic": lambda c: Coupling(5, "affine", context=c, conditioner=ResidualNet),
}


@pytest.mark.parametrize("name", USER_LAYERS)
@pytest.mark.parametrize("context", [0, 2])
def test_a_user_conditioner_plugs_in(name: str, context: int) -> None:
    t = USER_LAYERS[name](context)
    assert isinstance(t.conditioner, ResidualNet)
    transformed = int(t.mask.sum())
    assert t.conditioner.inp.in_features == 5 - transformed + context
    assert t.conditioner.out.out_features == transformed * t.monotonic.params_per_feature
    x, c = inputs(16, 5, context, torch.float32)
    z, ladj = t(x, c)  # zero output layer: the identity
    assert torch.allclose(z, x, atol=1e-5) and ladj.abs().max() < 1e-5
    train_steps(t, x, c)
    assert t.conditioner.out.weight.abs().sum() > 0
    assert set(t.state_dict()) >= {"conditioner.out.weight", "conditioner.inp.weight"}
    t = t.double()
    x, c = inputs(8, 5, context, torch.float64)
    assert ef.check_transform(t, x, c).ok
    perturb(t, scale=0.3, seed=1)  # and at random parameters
    assert ef.check_transform(t, x, c).ok


def test_default_conditioner_keeps_the_01_state_dict_names() -> None:
    t = AffineCoupling(4, hidden=(8, 8))
    assert set(t.state_dict()) == {
        "mask", "identity_index", "transformed_index", "unshuffle",
        *(f"conditioner.{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias")),
    }


def test_a_user_conditioner_must_be_a_module() -> None:
    with pytest.raises(TypeError, match="nn.Module"):
        AffineCoupling(3, conditioner=lambda i, o: (lambda x: x))


# -- the fused density direction of the affine coupling ----------------------------------------


@pytest.mark.parametrize("context", [0, 3])
def test_fused_affine_coupling_equals_the_generic_layer(context: int) -> None:
    t = perturb(AffineCoupling(5, hidden=(7, 6), mask="odd", context=context).double())
    x, c = inputs(11, 5, context, torch.float64)
    x.requires_grad_()
    if c is not None:
        c.requires_grad_()
    z, log_det = t(x, c)
    assert type(z.grad_fn).__name__ == "_FusedAffineCouplingBackward"
    z_ref, log_det_ref = t._couple_generic(x, c, None, inverse=False)
    assert torch.allclose(z, z_ref, rtol=1e-14, atol=1e-14)
    assert torch.allclose(log_det, log_det_ref, rtol=1e-14, atol=1e-14)
    wanted = [x, t.conditioner.packed] + ([] if c is None else [c])
    g = (torch.randn_like(z), torch.randn_like(log_det))
    for a, b in zip(torch.autograd.grad((z, log_det), wanted, g),
                    torch.autograd.grad((z_ref, log_det_ref), wanted, g), strict=True):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)
    # Gradients of the hand-written backward, and its own derivatives (create_graph=True).
    packed = t.conditioner.packed.detach().clone().requires_grad_()

    def layer(x: Tensor, packed: Tensor, *c: Tensor) -> tuple[Tensor, Tensor]:
        return torch.func.functional_call(t, {"conditioner.packed": packed}, (x, *c))

    args = (x, packed) + (() if c is None else (c,))
    assert torch.autograd.gradcheck(layer, args)
    assert torch.autograd.gradgradcheck(layer, args)


def test_fused_affine_coupling_with_frozen_network_and_without_autograd() -> None:
    t = perturb(AffineCoupling(4, hidden=(8,)).double())
    t.conditioner.packed.requires_grad_(False)
    x = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    z, log_det = t(x)
    (grad,) = torch.autograd.grad((z.square().sum() + log_det.sum()), [x])
    z_ref, log_det_ref = t._couple_generic(x, None, None, inverse=False)
    (ref,) = torch.autograd.grad((z_ref.square().sum() + log_det_ref.sum()), [x])
    assert torch.allclose(grad, ref, rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        z, log_det = t(x)
    assert z.grad_fn is None and torch.allclose(z, z_ref) and torch.allclose(log_det, log_det_ref)
    ef.check_transform(t, x.detach())


def test_fused_affine_coupling_keeps_the_conditioners_hooks_and_a_subclass_forward() -> None:
    t = perturb(AffineCoupling(4, hidden=(8,)).double())
    x = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    calls = []
    handle = t.conditioner.register_forward_hook(lambda m, i, o: calls.append(o.shape))
    z, _ = t(x)
    assert calls == [(6, 4)] and type(z.grad_fn).__name__ != "_FusedAffineCouplingBackward"
    handle.remove()

    class Doubled(ef.nn.MLP):
        def forward(self, x: Tensor) -> Tensor:
            return 2 * super().forward(x)

    d = perturb(AffineCoupling(4, hidden=(8,), conditioner=lambda i, o: Doubled(i, o, (8,))))
    z, log_det = d(x.float())
    z_ref, log_det_ref = d._couple_generic(x.float(), None, None, inverse=False)
    assert torch.equal(z, z_ref) and torch.equal(log_det, log_det_ref)
    ef.check_transform(d.double(), x.detach())
