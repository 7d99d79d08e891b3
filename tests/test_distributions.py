"""Tests of the base densities and Flow: exact densities, normalization, sampling, the API."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import exactflow as ef
from exactflow.transforms import ElementwiseAffine, LULinear
from tests.helpers import perturb


def grid(lo, hi, n: int) -> tuple[torch.Tensor, float]:
    """Midpoints of an n x n grid over [lo0, hi0] x [lo1, hi1], and the cell area."""
    axes = [torch.linspace(lo[i], hi[i], n + 1, dtype=torch.float64) for i in range(2)]
    mids = [(a[1:] + a[:-1]) / 2 for a in axes]
    xx, yy = torch.meshgrid(*mids, indexing="ij")
    area = float((axes[0][1] - axes[0][0]) * (axes[1][1] - axes[1][0]))
    return torch.stack([xx.reshape(-1), yy.reshape(-1)], -1), area


# -- the worked examples ------------------------------------------------------------------------


def test_uniform_pushed_through_4z_plus_2():
    t = ElementwiseAffine(1).double()
    with torch.no_grad():  # forward (x - 2) / 4, so inverse 4z + 2
        t.log_scale.fill_(-math.log(4.0))
        t.shift.fill_(-0.5)
    flow = ef.Flow(t, ef.Uniform(0.0, 1.0, features=1)).double()
    torch.testing.assert_close(
        flow.transform.inverse(torch.tensor([[0.0], [1.0]], dtype=torch.float64))[0],
        torch.tensor([[2.0], [6.0]], dtype=torch.float64),
    )
    inside = torch.tensor([[2.001], [2.5], [4.0], [5.999]], dtype=torch.float64)
    quarter = torch.full((4,), math.log(0.25), dtype=torch.float64)
    torch.testing.assert_close(flow.log_prob(inside), quarter)
    outside = torch.tensor([[1.99], [6.01], [-3.0], [100.0]], dtype=torch.float64)
    assert torch.isneginf(flow.log_prob(outside)).all()
    # The density 1/4 on [2, 6] integrates to 1 (cells of width 1e-3 over [0, 8]).
    x = (torch.arange(8000, dtype=torch.float64) + 0.5)[:, None] * 1e-3
    with torch.no_grad():
        assert float(flow.log_prob(x).exp().sum() * 1e-3) == pytest.approx(1.0, abs=1e-9)
    samples, log_p = flow.sample_and_log_prob(200)
    assert samples.min() >= 2.0 and samples.max() <= 6.0
    torch.testing.assert_close(log_p, torch.full((200,), math.log(0.25), dtype=torch.float64))


def test_linear_map_of_the_unit_square_has_area_6_and_density_one_sixth():
    a = torch.tensor([[3.0, 1.0], [0.0, 2.0]], dtype=torch.float64)
    # LULinear set to A^-1 = [[1/3, -1/6], [0, 1/2]] (L = I, U = A^-1): x -> z = A^-1 x.
    t = LULinear(2).double()
    with torch.no_grad():
        t.upper[0, 1] = -1.0 / 6.0
        t.log_diag.copy_(torch.log(torch.tensor([1 / 3, 1 / 2], dtype=torch.float64)))
    torch.testing.assert_close(t.weight(), torch.linalg.inv(a))
    flow = ef.Flow(t, ef.Uniform(0.0, 1.0, features=2)).double()

    corners = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    images = flow.transform.inverse(corners)[0]
    expected = torch.tensor([[0.0, 0.0], [3.0, 0.0], [1.0, 2.0], [4.0, 2.0]], dtype=torch.float64)
    torch.testing.assert_close(images, expected)
    jac = ef.jacobian(lambda z: flow.transform.inverse(z)[0], torch.rand(3, 2, dtype=torch.float64))
    torch.testing.assert_close(jac, a.expand(3, 2, 2))
    assert float(torch.linalg.det(a)) == pytest.approx(6.0)

    inside = torch.tensor([[1.0, 0.5], [2.5, 1.0], [3.9, 1.9]], dtype=torch.float64)
    sixth = torch.full((3,), 1 / 6, dtype=torch.float64)
    torch.testing.assert_close(flow.log_prob(inside).exp(), sixth)
    outside = torch.tensor([[0.5, 1.5], [3.5, 0.5], [2.0, -0.1]], dtype=torch.float64)
    assert torch.isneginf(flow.log_prob(outside)).all()
    points, cell = grid((-0.5, -0.5), (4.5, 2.5), 1000)
    with torch.no_grad():
        density = flow.log_prob(points).exp()
    assert float((density > 0).sum() * cell) == pytest.approx(6.0, abs=1e-2)
    assert float(density.sum() * cell) == pytest.approx(1.0, abs=2e-3)


@pytest.mark.parametrize("base", ["standard", "diagonal"])
def test_flow_over_lu_linear_integrates_to_one(base):
    t = perturb(LULinear(2, permutation=[1, 0]), scale=0.5, seed=11).double()
    b = ef.StandardNormal(2) if base == "standard" else perturb(ef.DiagonalNormal(2), seed=12)
    flow = ef.Flow(t, b).double()
    w = t.weight().detach()
    if base == "standard":
        loc, scale = torch.zeros(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64)
    else:
        loc, scale = b.loc.detach(), b.log_scale.detach().exp()
    w_inv = torch.linalg.inv(w)
    mean = w_inv @ (loc - t.bias.detach())
    cov = w_inv @ torch.diag(scale**2) @ w_inv.T
    half = 9 * cov.diagonal().sqrt()
    points, cell = grid(mean - half, mean + half, 600)
    with torch.no_grad():
        log_p = flow.log_prob(points)
        total = float(log_p.exp().sum() * cell)
        # Without the log-det term the same grid does not integrate to 1.
        z, ladj = t(points)
        assert abs(float(ladj[0])) > 0.05
        unnormalized = float(b.log_prob(z).exp().sum() * cell)
    assert total == pytest.approx(1.0, abs=1e-3)
    assert abs(unnormalized - 1.0) > 0.05
    reference = torch.distributions.MultivariateNormal(mean, cov).log_prob(points)
    torch.testing.assert_close(log_p, reference)


# -- base distributions --------------------------------------------------------------------------


def test_standard_normal_matches_torch():
    d = ef.StandardNormal(3).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    reference = torch.distributions.Normal(0.0, 1.0).log_prob(x).sum(-1)
    torch.testing.assert_close(d.log_prob(x), reference)
    assert d.event_shape == (3,)
    s = d.sample(7)
    assert s.shape == (7, 3) and s.dtype == torch.float64


def test_diagonal_normal_matches_torch_and_is_reparameterized():
    d = perturb(ef.DiagonalNormal(3)).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    reference = torch.distributions.Normal(d.loc, d.log_scale.exp()).log_prob(x).sum(-1)
    torch.testing.assert_close(d.log_prob(x), reference)
    s, log_p = d.rsample_and_log_prob(6)
    torch.testing.assert_close(log_p, d.log_prob(s))
    s.sum().backward()
    assert d.loc.grad is not None
    torch.testing.assert_close(d.loc.grad, torch.full((3,), 6.0, dtype=torch.float64))
    assert d.log_scale.grad is not None and d.log_scale.grad.abs().sum() > 0


def test_uniform_box():
    u = ef.Uniform([0.0, -1.0], [2.0, 3.0]).double()
    assert u.features == 2
    inside = torch.tensor([[1.0, 0.0], [0.0, -1.0], [2.0, 3.0]], dtype=torch.float64)
    eighth = torch.full((3,), -math.log(8.0), dtype=torch.float64)
    torch.testing.assert_close(u.log_prob(inside), eighth)
    outside = torch.tensor([[-0.1, 0.0], [1.0, 3.1]], dtype=torch.float64)
    assert torch.isneginf(u.log_prob(outside)).all()
    s = u.sample(500)
    assert s.shape == (500, 2)
    assert (s >= u.low).all() and (s <= u.high).all()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"low": 1.0, "high": 1.0}, "high > low"),
        ({"low": [0.0, 2.0], "high": [1.0, 1.0]}, "high > low"),
        ({"low": 2}, r"its first argument is low: for 2 features, Uniform\(features=2\)"),
        ({"low": [0.0, 0.0], "high": 1.0, "features": 3}, "low has 2 entries"),
        ({"low": [0.0, 0.0], "high": [1.0, 1.0, 1.0]}, "low has 2 entries"),
        ({"low": 0.0, "high": 1.0, "features": 0}, "features must be a positive integer"),
    ],
)
def test_uniform_rejects_bad_boxes(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ef.Uniform(**kwargs)


@pytest.mark.parametrize("bad", [0, -2, 2.5, True, "3"])
def test_features_must_be_a_positive_integer(bad):
    for cls in (ef.StandardNormal, ef.DiagonalNormal):
        with pytest.raises(ValueError, match="features must be a positive integer"):
            cls(bad)


# -- Flow ------------------------------------------------------------------------------------


def make_flow(features: int = 3, dtype=torch.float64) -> ef.Flow:
    t = ef.Compose(perturb(LULinear(features)), perturb(ElementwiseAffine(features)))
    return ef.Flow(t, ef.StandardNormal(features)).to(dtype)


def test_log_prob_is_the_change_of_variables():
    flow = make_flow()
    x = torch.randn(6, 3, dtype=torch.float64)
    z, ladj = flow.transform(x)
    torch.testing.assert_close(flow.log_prob(x), flow.base.log_prob(z) + ladj)
    torch.testing.assert_close(flow(x), flow.log_prob(x))
    assert flow.event_shape == (3,) and flow.batch_shape == ()


def test_sample_and_log_prob_agree_with_log_prob():
    flow = make_flow()
    x, log_p = flow.sample_and_log_prob(9)
    assert x.shape == (9, 3) and log_p.shape == (9,)
    torch.testing.assert_close(log_p, flow.log_prob(x))
    assert flow.sample(4).shape == (4, 3) and flow.rsample(2).shape == (2, 3)
    assert flow.sample(1).shape == (1, 3)


def test_rsamples_are_differentiable_and_samples_carry_no_graph():
    flow = make_flow()
    x, log_p = flow.rsample_and_log_prob(16)
    (x.square().sum() + log_p.sum()).backward()
    for name, p in flow.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert flow.rsample(3).requires_grad
    # As in torch.distributions: sample() runs without autograd, so .numpy() just works.
    s = flow.sample(5)
    assert not s.requires_grad and s.numpy().shape == (5, 3)
    s, log_q = flow.sample_and_log_prob(5)
    assert not s.requires_grad and not log_q.requires_grad


def test_flow_rejects_wrong_shapes_and_types():
    flow = make_flow()
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., 3\), got \(4, 4\)"):
        flow.log_prob(torch.randn(4, 4))
    for bad in (torch.randn(3, 2, 4), torch.randn(4), torch.randn(0)):
        with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., 3\)"):
            flow.log_prob(bad)  # (leading dims are fine; the last is not)
    with pytest.raises(TypeError, match="numeric"):
        flow.log_prob(np.array([["a", "b", "c"]]))
    with pytest.raises(TypeError, match="Transform"):
        ef.Flow(nn.Linear(3, 3), ef.StandardNormal(3))
    with pytest.raises(TypeError, match="Distribution"):
        ef.Flow(LULinear(3), torch.distributions.Normal(0.0, 1.0))
    for n in (-1, 2.5, True):  # (0 is an empty batch)
        with pytest.raises(ValueError, match="n must be an integer >= 0"):
            flow.sample(n)


def test_numpy_and_integer_input_are_accepted():
    flow = make_flow(dtype=torch.float32)
    x = np.random.randn(5, 3)  # float64 array into a float32 flow
    log_p = flow.log_prob(x)
    assert log_p.dtype == torch.float32 and log_p.shape == (5,)
    torch.testing.assert_close(log_p, flow.log_prob(torch.as_tensor(x, dtype=torch.float32)))
    ints = flow.log_prob(torch.tensor([[1, 0, -2]]))
    torch.testing.assert_close(ints, flow.log_prob(torch.tensor([[1.0, 0.0, -2.0]])))
    assert flow.log_prob([[0.1, 0.2, 0.3]]).shape == (1,)


def test_nan_input_gives_nan_for_that_row_only():
    # Not validated in log_prob (that would cost a sync per batch); rows stay independent,
    # so a NaN row cannot contaminate the others. Data validation belongs upstream.
    flow = make_flow()
    x = torch.randn(4, 3, dtype=torch.float64)
    x[2, 1] = math.nan
    log_p = flow.log_prob(x)
    assert torch.isnan(log_p[2])
    keep = [0, 1, 3]
    torch.testing.assert_close(log_p[keep], flow.log_prob(x[keep]))


class ConditionalAffine(ef.Transform):
    """``z = x * exp(tanh(c W_s)) + c W_t``."""

    def __init__(self, features: int, context: int):
        super().__init__()
        self.scale = nn.Linear(context, features)
        self.shift = nn.Linear(context, features)

    def forward(self, x, context=None):
        s = torch.tanh(self.scale(context))
        return x * s.exp() + self.shift(context), s.sum(-1)

    def inverse(self, z, context=None):
        s = torch.tanh(self.scale(context))
        return (z - self.shift(context)) * (-s).exp(), -s.sum(-1)


def conditional_flow(features: int = 3, context: int = 2) -> ef.Flow:
    t = perturb(ConditionalAffine(features, context))
    return ef.Flow(t, ef.StandardNormal(features), context=context).double()


def test_conditional_transform_passes_check_transform():
    flow = conditional_flow()
    x, c = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    assert ef.check_transform(flow.transform, x, c).ok


def test_conditional_log_prob_and_sample_shapes():
    flow = conditional_flow()
    x, c = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    assert flow.log_prob(x, c).shape == (5,)
    assert not torch.allclose(flow.log_prob(x, c), flow.log_prob(x, c.flip(0)))

    batch = torch.randn(4, 2, dtype=torch.float64)
    samples, log_p = flow.sample_and_log_prob(6, batch)
    assert samples.shape == (6, 4, 3) and log_p.shape == (6, 4)
    assert flow.sample(6, batch).shape == (6, 4, 3)
    # Sample [i, j] belongs to context row j: its log-density under that row agrees.
    rows = batch.expand(6, 4, 2).reshape(24, 2)
    torch.testing.assert_close(log_p.reshape(24), flow.log_prob(samples.reshape(24, 3), rows))

    single = batch[1]
    samples, log_p = flow.sample_and_log_prob(7, single)
    assert samples.shape == (7, 3) and log_p.shape == (7,)
    assert flow.sample(7, single).shape == (7, 3)
    torch.testing.assert_close(log_p, flow.log_prob(samples, single.expand(7, 2)))
    # Context from numpy works too.
    assert flow.sample(2, batch.numpy()).shape == (2, 4, 3)


def test_conditional_flow_context_errors():
    flow = conditional_flow()
    x = torch.randn(5, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="conditional"):
        flow.log_prob(x)
    with pytest.raises(ValueError, match="conditional"):
        flow.sample(3)
    with pytest.raises(ValueError, match=r"x of shape \(5, 3\) and a context of shape \(4, 2\) "
                                         "do not pair up"):
        flow.log_prob(x, torch.randn(4, 2))
    with pytest.raises(ValueError, match=r"context must have shape \(\.\.\., 2\), got \(5, 3\)"):
        flow.log_prob(x, torch.randn(5, 3))
    with pytest.raises(ValueError, match=r"context must have shape \(\.\.\., 2\), got \(3,\)"):
        flow.sample(3, torch.randn(3))


@pytest.mark.parametrize("name", ["MaskedAffineAutoregressive", "InverseAutoregressive",
                                  "AffineCoupling"])
def test_a_conditional_layer_names_a_context_of_another_dtype(name):
    # A flow casts the context; a layer called directly says so, in both directions,
    # instead of failing deep inside a product.
    layer = perturb(getattr(ef.transforms, name)(4, context=2).double())
    x, context = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 2)
    for direction in (layer.forward, layer.inverse):
        with pytest.raises(ValueError, match=f"{name}.* dtype torch.float64 and a context of "
                                             "dtype torch.float32"):
            direction(x, context)
    assert layer(x, context.double())[0].dtype == torch.float64


def test_a_layer_with_a_log_det_per_batch_not_per_row_is_named_by_the_flow():
    class Keepdim(ElementwiseAffine):  # (batch, 1): would broadcast to (batch, batch)
        def forward(self, x, context=None):
            z, ladj = super().forward(x, context)
            return z, ladj[:, None]

        def inverse(self, z, context=None):
            x, ladj = super().inverse(z, context)
            return x, ladj[:, None]

    flow = ef.Flow(Keepdim(4), ef.StandardNormal(4))  # (a lone layer is named too)
    with pytest.raises(ValueError, match=r"Keepdim returned a log-det of shape \(6, 1\) for "
                                         r"6 rows.*ef.check_transform"):
        flow.log_prob(torch.randn(6, 4))
    with pytest.raises(ValueError, match=r"log-det of shape \(3, 1\) for 3 rows"):
        flow.sample_and_log_prob(3)


def test_a_layer_in_a_chain_with_a_log_det_summed_over_the_batch_is_named():
    # A scalar log-det (.sum() for .sum(-1)) was added to every row by Compose: log_prob
    # came out 1,385 nats off, silently.
    class Summed(ElementwiseAffine):
        def forward(self, x, context=None):
            z, ladj = super().forward(x, context)
            return z, ladj.sum()

    flow = ef.Flow(ef.Compose(Summed(2), ef.transforms.Reverse(2)), ef.StandardNormal(2))
    with pytest.raises(ValueError, match=r"Summed returned a log-det of shape \(\) for 7 rows "
                                         r"\(a sum over the whole batch.*\.sum\(-1\)"):
        flow.log_prob(torch.randn(7, 2))


def test_a_layer_that_changes_the_width_is_named():
    class Drop(ef.Transform):
        features = 3

        def forward(self, x, context=None):
            return x[:, :2], x.new_zeros(len(x))

    for transform, name in ((Drop(), "Drop"),
                            (ef.Compose(Drop(), ef.transforms.Reverse(3)), "Drop")):
        with pytest.raises(ValueError, match=f"{name} returned an output of shape \\(4, 2\\) "
                                             r"for an input of shape \(4, 3\)"):
            ef.Flow(transform, ef.StandardNormal(3)).log_prob(torch.randn(4, 3))


def test_context_widths_that_cannot_meet_are_refused_when_the_flow_is_built():
    # Each was accepted, then every call failed, with contradictory advice.
    maf = ef.transforms.MaskedAffineAutoregressive
    with pytest.raises(ValueError, match="Compose passes one context to every layer, but its "
                                         "conditional layers take contexts of 2, 4 features"):
        ef.Compose(maf(3, context=2), ef.transforms.AffineCoupling(3, context=4))
    for context in (0, 3):
        with pytest.raises(ValueError, match=f"layers take a context of 2 features but the "
                                             f"flow has context={context}: give context=2"):
            ef.Flow(maf(3, context=2), ef.StandardNormal(3), context=context)
    with pytest.raises(ValueError, match="the base is conditional"):
        ef.Flow(ef.transforms.Reverse(3), ef.models.maf(3, layers=1, context=2))
    flow = ef.Flow(maf(3, context=2), ef.StandardNormal(3), context=5,
                   embedding=nn.Linear(5, 2))  # an embedding makes the widths meet
    assert flow.log_prob(torch.randn(4, 3), torch.randn(4, 5)).shape == (4,)
    # A conditional flow of layers that take no context ignored it: the zuko habit
    # maf(2, 1) builds hidden=(1,), no context; the fitted density never moved with it.
    for layers in (ef.Compose(maf(2, 1), ef.transforms.Reverse(2)), ef.transforms.Reverse(2)):
        with pytest.raises(ValueError, match="context=1 but none of its layers takes a "
                                             "context, so the context would be ignored"):
            ef.Flow(layers, ef.StandardNormal(2), context=1)
    with pytest.raises(ValueError, match="none of its layers takes a context"):
        ef.Flow(maf(2), ef.StandardNormal(2), context=3, embedding=nn.Linear(3, 2))
    with pytest.raises(ValueError, match="none of its layers takes a context"):
        ef.Flow(ef.Inverse(maf(2)), ef.StandardNormal(2), context=1)
    # a layer of the user's may read the context without declaring it, inverted too
    ef.Flow(ef.Inverse(ConditionalAffine(2, 1)), ef.StandardNormal(2), context=1)


def test_log_prob_takes_the_contexts_sample_takes():
    # sample(n, (b, c)) gave (n, b, d) that log_prob refused, and sample took a context
    # (c,) that log_prob refused
    torch.manual_seed(0)
    flow = perturb(ef.models.maf(3, layers=2, hidden=(8,), context=2).double()).eval()
    context = torch.randn(4, 2, dtype=torch.float64)
    drawn = flow.sample(5, context)
    scored = flow.log_prob(drawn, context)
    assert scored.shape == (5, 4)
    torch.testing.assert_close(scored, torch.stack([flow.log_prob(d, context) for d in drawn]))
    x = torch.randn(6, 3, dtype=torch.float64)
    one = flow.log_prob(x, context[0].expand(6, 2))
    torch.testing.assert_close(flow.log_prob(x, context[0]), one)
    torch.testing.assert_close(flow.log_prob(x, context[:1]), one)
    with pytest.raises(ValueError, match=r"x of shape \(6, 3\) and a context of shape \(4, 2\)"):
        flow.log_prob(x, context)
    # One row under each of a batch of contexts (a likelihood across parameters): it was
    # refused, "context has 4 rows but x has 1".
    each = torch.stack([flow.log_prob(x[0], c) for c in context])
    assert each.shape == (4,)
    for row in (x[0], x[:1], x[0].tolist()):
        torch.testing.assert_close(flow.log_prob(row, context), each)
    torch.testing.assert_close(flow.log_prob(x[:1], context.numpy()), each)
    with pytest.raises(ValueError, match=r"context must have shape \(\.\.\., 2\), got \(\)"):
        flow.log_prob(x[:1], torch.tensor(0.5))  # (len() of it was a TypeError)


def test_unconditional_flow_rejects_a_context():
    flow = make_flow()
    with pytest.raises(ValueError, match="unconditional"):
        flow.log_prob(torch.randn(2, 3, dtype=torch.float64), torch.randn(2, 1))
    with pytest.raises(ValueError, match="unconditional"):
        flow.sample(2, torch.randn(2, 1))


@given(
    batch=st.integers(1, 8),
    features=st.integers(1, 5),
    n=st.integers(1, 6),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_flow_shapes_and_dtypes(batch, features, n, dtype):
    flow = make_flow(features, dtype)
    x = torch.randn(batch, features, dtype=dtype)
    log_p = flow.log_prob(x)
    assert log_p.shape == (batch,) and log_p.dtype == dtype
    assert torch.isfinite(log_p).all()
    samples, log_q = flow.sample_and_log_prob(n)
    assert samples.shape == (n, features) and log_q.shape == (n,)
    assert samples.dtype == dtype and log_q.dtype == dtype
    tol = 1e-3 if dtype == torch.float32 else 1e-9
    torch.testing.assert_close(log_q, flow.log_prob(samples), atol=tol, rtol=tol)


def test_a_context_that_is_not_finite_has_no_density():
    # (a NaN or inf context scored -inf, zero density, where a NaN row gives NaN; sampling
    # at a NaN context gave NaN silently)
    flow = perturb(ef.models.maf(2, layers=1, hidden=(8,), context=2).double()).eval()
    x = torch.randn(4, 2, dtype=torch.float64)
    context = torch.randn(4, 2, dtype=torch.float64)
    context[1, 0], context[2, 1] = math.nan, math.inf
    scores = flow.log_prob(x, context)
    assert torch.isnan(scores[1:3]).all() and torch.isfinite(scores[[0, 3]]).all()
    with pytest.raises(ef.DataError, match="context row 1 holds NaN or inf"):
        ef.scoring.log_prob(flow, x, context=context)
    with pytest.raises(ValueError, match="no conditional density to sample"):
        flow.sample(3, context[1])
    # (no contexts: no draws, as log_prob of no rows gives none)
    assert flow.sample(3, torch.empty(0, 2, dtype=torch.float64)).shape == (3, 0, 2)
    # one context for all rows, in every entry point
    one = ef.scoring.log_prob(flow, x, context=context[0])
    np.testing.assert_allclose(one, flow.log_prob(x, context[0]).detach().numpy())
    assert ef.evaluate(flow, x, context[0])["n"] == 4
    with pytest.raises(ValueError, match="this flow is conditional: pass a context"):
        flow.log_prob(flow.sample(2, context[[0, 3]]))  # (it named x's shape)


def test_a_flow_trained_without_prepare_says_its_standardization_is_unset(recwarn):
    # A loop of the user's own left standardize=True as the identity and base="gaussian"
    # as N(0, I): NLL 11,416 against 8.49 after ef.prepare on 100 + 20 x moons, silently.
    x = 100 + 20 * ef.datasets.toy("moons", 500)
    flow = ef.models.maf(2, layers=1, hidden=(8,), standardize=True, base="gaussian")
    with pytest.warns(UserWarning, match=r"standardization layer is the identity and its "
                                         r"Gaussian base is not fitted yet: call "
                                         r"ef.prepare\(flow, x\)"):
        flow.log_prob(x[:8]).mean().backward()
    flow.log_prob(x[:8])  # (said once)
    ready = ef.models.maf(2, layers=1, hidden=(8,), standardize=True, base="gaussian")
    ef.prepare(ready, x)
    ready.log_prob(x[:8]).mean().backward()
    with torch.no_grad():  # (scoring a fresh flow is not training it)
        ef.models.maf(2, layers=1, standardize=True).log_prob(x[:8])
    ef.models.maf(2, layers=1, standardize=True).eval().log_prob(x[:8])
    ef.fit(ef.models.maf(2, layers=1, hidden=(8,), standardize=True), x, steps=2,
           progress=False)
    # a context that is a balanced +-1 label standardizes to the identity: prepared all the
    # same (ef.fit told the user to call ef.prepare, which it had just called)
    label = torch.tensor([-1.0, 1.0]).repeat(250)[:, None]
    ef.fit(ef.models.maf(2, layers=1, hidden=(8,), context=1, standardize=True), x,
           context=label, steps=2, progress=False)
    # an ensemble under torch.func has no values to look at (vmap refused the check)
    from torch.func import functional_call, stack_module_state, vmap

    flows = [ef.models.maf(2, layers=1, hidden=(8,), standardize=True) for _ in range(3)]
    for f in flows:
        ef.prepare(f, x)
    params, buffers = stack_module_state(flows)
    fresh = ef.models.maf(2, layers=1, hidden=(8,), standardize=True)  # (not prepared)
    out = vmap(lambda p, b, rows: functional_call(fresh, (p, b), (rows,)),
               in_dims=(0, 0, None))(params, buffers, x[:4].float())
    assert out.shape == (3, 4)
    assert not [w for w in recwarn if "ef.prepare" in str(w.message)]


def test_to_latent_takes_the_sample_shapes_log_prob_takes():
    # sample(n, (b, c)) gives (n, b, d); to_latent refused it, so a posterior's latents
    # needed a reshape and a repeated context by hand.
    flow = ef.models.maf(3, context=2, standardize=True).double()
    perturb(flow, 0.3, seed=2)
    c = torch.randn(4, 2, dtype=torch.float64)
    x = flow.sample(5, c)
    z, ladj = flow.to_latent(x, c)
    assert z.shape == (5, 4, 3) and ladj.shape == (5, 4)
    torch.testing.assert_close(flow.base.log_prob(z.reshape(-1, 3)).reshape(5, 4) + ladj,
                               flow.log_prob(x, c))
    flat = flow.to_latent(x.reshape(-1, 3), c.repeat(5, 1))  # one context row per row
    torch.testing.assert_close(z.reshape(-1, 3), flat[0])
    back, ladj_inv = flow.from_latent(z, c)
    assert back.shape == (5, 4, 3)
    torch.testing.assert_close(back, x)
    torch.testing.assert_close(ladj_inv, -ladj)
    row, one = flow.to_latent(x[0, 0], c[0])  # one row under its context
    assert row.shape == (3,) and one.shape == ()
    torch.testing.assert_close(row, z[0, 0])
    with pytest.raises(ValueError, match=r"x of shape \(5, 4, 3\) and a context of shape \(3, 2\)"):
        flow.to_latent(x, c[:3])


def test_to_latent_and_from_latent_are_the_flows_own_map_with_its_context_handling():
    # flow.transform(x, c) skips the context scaler and the embedding: on a conditional
    # standardize=True flow its latents had mean -1077, log-densities off by 1.46e6.
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(40, 3, generator=gen, dtype=torch.float64) * 20 + 100
    c = torch.randn(40, 2, generator=gen, dtype=torch.float64) * 30 - 500
    flow = ef.models.maf(3, context=2, standardize=True, embedding={"features": 4}).double()
    ef.prepare(flow, x, c)
    perturb(flow, 0.1, seed=1)
    z, ladj = flow.to_latent(x, c)
    torch.testing.assert_close(flow.base.log_prob(z) + ladj, flow.log_prob(x, c))
    back, ladj_inv = flow.from_latent(z, c)
    torch.testing.assert_close(back, x, rtol=1e-9, atol=0)
    torch.testing.assert_close(ladj_inv, -ladj)
    one, _ = flow.to_latent(x[:5], c[0])  # one context for every row, as log_prob takes
    torch.testing.assert_close(one, flow.to_latent(x[:5], c[0].expand(5, 2))[0])
    with pytest.raises(ValueError, match=r"z must have shape \(\.\.\., 3\), got \(4, 2\)"):
        flow.from_latent(torch.zeros(4, 2), c[:4])
    with pytest.raises(ValueError, match="this flow is conditional"):
        flow.to_latent(x)
    # The context as the transform sees it: the checker proves the flow's own map with it
    # (with the raw context it checked another map, and passed).
    encoded = flow.encode_context(c)
    assert encoded.shape == (len(c), 4)
    torch.testing.assert_close(flow.transform(x, encoded)[0], z)
    assert ef.check_transform(flow.transform, x[:8], encoded[:8]).ok
    with pytest.raises(TypeError, match=r"check_transform\(flow.transform, x\[, "
                                        r"flow.encode_context\(context\)\]\)"):
        ef.check_transform(flow, x)


@pytest.mark.parametrize("name", ["maf", "realnvp", "nsf", "gmm", "gaussian"])
def test_zero_samples_are_an_empty_batch(name):
    # (sample(0) was refused, as torch.distributions and zuko give an empty batch)
    conditional = ef.models.takes(name, "hidden")
    flow = ef.models.build({"model": name, "features": 3, "standardize": True,
                            "context": 2 if conditional else 0})
    context = torch.randn(4, 2) if conditional else None
    samples, log_p = flow.sample_and_log_prob(0, context)
    assert samples.shape == ((0, 4, 3) if conditional else (0, 3))
    assert log_p.shape == samples.shape[:-1] and samples.dtype == torch.float64
    with pytest.raises(ValueError, match="n must be an integer >= 0, got -1"):
        flow.sample(-1, context)



def test_logit_samples_stay_strictly_inside_the_unit_interval_in_float32():
    # sigmoid rounds to exactly 1.0 in float32 from z of about 17 on: 2,327 of 200,000
    # samples of a wide latent were 1.0, which log_prob then refused.
    flow = ef.Flow(ef.transforms.Logit(), ef.DiagonalNormal(2))
    with torch.no_grad():
        flow.base.log_scale.fill_(math.log(20.0))
    x = flow.sample(20_000)
    assert x.dtype == torch.float32 and bool(((x > 0) & (x < 1)).all())
    assert bool(torch.isfinite(flow.log_prob(x)).all())


@pytest.mark.parametrize("name", ["maf", "realnvp", "nsf", "iaf", "nice"])
def test_a_flow_on_the_meta_device_gives_shapes(name):
    # (the hand-written passes asked autocast about the meta device: "unknown device type")
    flow = ef.models.build({"model": name, "features": 3, "standardize": True}).to("meta")
    assert flow.log_prob(torch.randn(4, 3, device="meta")).shape == (4,)
    assert flow.sample(2).shape == (2, 3)


def test_an_unconditional_flow_scores_any_leading_shape():
    # (5, 10, 3) was refused: "x must have shape (batch, 3)"
    flow = perturb(ef.models.maf(3, layers=2, hidden=(8,)).double(), 0.3, seed=0)
    x = torch.randn(5, 10, 3, dtype=torch.float64)
    torch.testing.assert_close(flow.log_prob(x), flow.log_prob(x.reshape(50, 3)).reshape(5, 10))
    assert flow.log_prob(torch.randn(2, 3, 4, 3, dtype=torch.float64)).shape == (2, 3, 4)
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., 3\), got \(5, 10, 2\)"):
        flow.log_prob(torch.randn(5, 10, 2, dtype=torch.float64))
    # One row (3,) scores as () (it was refused), as a one-row batch does; a conditional
    # flow's one row with its context (c,) too.
    row = x[0, 0]
    assert flow.log_prob(row).shape == () and flow.log_prob(row.tolist()).shape == ()
    torch.testing.assert_close(flow.log_prob(row), flow.log_prob(row[None])[0])
    conditional = perturb(ef.models.maf(3, layers=2, hidden=(8,), context=2).double(), 0.3,
                          seed=1)
    c = torch.randn(2, dtype=torch.float64)
    torch.testing.assert_close(conditional.log_prob(row, c),
                               conditional.log_prob(row[None], c[None])[0])


def test_a_base_of_ones_own_is_checked_for_one_value_per_row():
    # (a base's log_prob of shape (n, 1) broadcast against the log-dets into a (4, 4)
    # "density", silently, and ef.fit trained on it)
    class Laplace(ef.Distribution):
        def __init__(self) -> None:
            super().__init__()
            self.features = 2

        def log_prob(self, x):
            return (-x.abs()).sum(-1, keepdim=True)

        def rsample(self, n):
            return torch.randn(n, 2)

    flow = ef.Flow(ef.transforms.ElementwiseAffine(2), Laplace())
    message = (r"the base distribution Laplace returned a log-density of shape \(4, 1\) for 4 "
               r"rows; a base must return one value per row, shape \(batch,\)")
    with pytest.raises(ValueError, match=message):
        flow.log_prob(torch.randn(4, 2))
    with pytest.raises(ValueError, match=message):
        flow.sample_and_log_prob(4)


def test_flow_takes_none_for_no_context_and_names_torch_distributions():
    flow = ef.Flow(ef.transforms.ElementwiseAffine(2), ef.bases.StandardNormal(2), context=None)
    assert flow.context_features == 0  # (zuko's and nflows' "no context")
    with pytest.raises(TypeError, match=r"got Normal: wrap it in a subclass of "
                                        r"exactflow.Distribution"):
        ef.Flow(ef.transforms.ElementwiseAffine(2), torch.distributions.Normal(0.0, 1.0))


def test_a_generator_sets_the_draw_and_leaves_the_global_random_state_alone():
    torch.manual_seed(0)
    flow = ef.models.maf(3, layers=2, hidden=(8,), context=2, base={"name": "gmm",
                                                                     "components": 2})
    flow.base.fit_to(torch.randn(200, 3), seed=0)
    context = torch.randn(4, 2)
    state = torch.get_rng_state()
    first = flow.sample(5, context, generator=torch.Generator().manual_seed(7))
    assert torch.equal(torch.get_rng_state(), state)  # (the global state untouched)
    again = flow.sample(5, context, generator=torch.Generator().manual_seed(7))
    other = flow.sample(5, context, generator=torch.Generator().manual_seed(8))
    assert first.shape == (5, 4, 3) and torch.equal(first, again)
    assert not torch.equal(first, other)
    x, log_p = flow.sample_and_log_prob(5, context, generator=torch.Generator().manual_seed(7))
    assert torch.equal(x, first)
    with torch.no_grad():
        torch.testing.assert_close(log_p, flow.log_prob(x.reshape(20, 3), context.repeat(
            5, 1)).reshape(5, 4), rtol=1e-4, atol=1e-4)
    gen = torch.Generator().manual_seed(3)  # (one generator, two draws: it advances)
    assert not torch.equal(flow.sample(5, context, generator=gen),
                           flow.sample(5, context, generator=gen))
    with pytest.raises(TypeError, match="generator must be a torch.Generator, got int"):
        flow.sample(5, context, generator=7)


def test_rows_and_contexts_pair_by_broadcasting_their_leading_shapes():
    # x (7, 4, d) with contexts (7, 4, c), x (7, 1, d) under (4, c), 4-D x and a sample of
    # contexts (2, 4, c) were refused, "x must have shape (batch, 3)".
    flow = perturb(ef.models.maf(3, layers=2, hidden=(8,), context=2).double(), 0.3, seed=3)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(7, 4, 3, generator=gen, dtype=torch.float64)
    c = torch.randn(7, 4, 2, generator=gen, dtype=torch.float64)
    flat = flow.log_prob(x.reshape(-1, 3), c.reshape(-1, 2)).reshape(7, 4)
    torch.testing.assert_close(flow.log_prob(x, c), flat)
    z, ladj = flow.to_latent(x, c)
    assert z.shape == (7, 4, 3) and ladj.shape == (7, 4)
    under = flow.log_prob(x[:, :1], c[0])  # (7, 1, d) rows under each of 4 contexts
    assert under.shape == (7, 4)
    torch.testing.assert_close(under[:, 2], flow.log_prob(x[:, 0], c[0, 2]))
    deep = x.reshape(7, 2, 2, 3)
    torch.testing.assert_close(flow.log_prob(deep, c.reshape(7, 2, 2, 2)), flat.reshape(7, 2, 2))
    draws = flow.sample(5, c[:2])  # a (2, 4) grid of contexts
    assert draws.shape == (5, 2, 4, 3)
    s, log_q = flow.sample_and_log_prob(5, c[:2])
    torch.testing.assert_close(flow.log_prob(s, c[:2]), log_q)
    assert flow.sample(3, c[0, :0]).shape == (3, 0, 3)  # (no contexts: no draws; refused)
    # A shape for n, as torch.distributions' sample_shape.
    assert flow.sample((2, 3), c[0, 0]).shape == (2, 3, 3)
    assert flow.sample((2, 3), c[0]).shape == (2, 3, 4, 3)
    assert ef.models.maf(3, layers=1, hidden=(8,)).sample(torch.Size([2, 5])).shape == (2, 5, 3)
    with pytest.raises(ValueError, match=r"x of shape \(7, 4, 3\) and a context of shape "
                                         r"\(3, 2\) do not pair up"):
        flow.log_prob(x, c[0, :3])
    with pytest.raises(ValueError, match="sample shape must be an integer >= 0, got -1"):
        flow.sample((2, -1), c[0, 0])


def test_context_messages_help_with_one_feature_and_zuko_habits():
    flow = ef.models.maf(2, layers=1, hidden=(8,), context=1)
    with pytest.raises(ValueError, match=r"got \(6,\); for one context feature use "
                                         r"context.reshape\(-1, 1\)"):
        flow.log_prob(torch.randn(6, 2), torch.randn(6))
    with pytest.raises(ValueError, match=r"zuko's flow\(c\).log_prob\(x\) is "
                                         r"flow.log_prob\(x, c\) here"):
        flow(torch.randn(6, 1))


# -- the Student-t base ---------------------------------------------------------------------


@pytest.mark.parametrize("df", [1.5, 3.0, 40.0])
def test_the_student_base_is_independent_student_t_coordinates(df):
    base = ef.StudentT(3, df=df).double()
    z = torch.randn(50, 3, dtype=torch.float64) * 5
    torch.testing.assert_close(base.df, torch.full((3,), df, dtype=torch.float64), rtol=1e-6,
                               atol=0)  # (its parameter was made in float32)
    expected = torch.distributions.StudentT(base.df.detach()).log_prob(z)
    torch.testing.assert_close(base.log_prob(z), expected.sum(-1), rtol=1e-12, atol=1e-12)
    torch.manual_seed(0)
    draws = base.sample(200_000)
    share = float((draws.abs() > 4).double().mean())  # (both tails, every coordinate)
    from scipy import stats

    assert share == pytest.approx(2 * stats.t(df).sf(4), rel=0.05)


def test_the_student_bases_degrees_of_freedom_train_by_its_samples_and_densities():
    base = ef.StudentT(2, df=4.0)
    base.rsample(64).pow(2).clamp(max=50).mean().backward()
    assert base.raw_df.grad is not None and torch.isfinite(base.raw_df.grad).all()
    base.zero_grad()
    base.log_prob(torch.randn(8, 2)).sum().backward()
    assert base.raw_df.grad.abs().sum() > 0
    assert not ef.StudentT(2, trainable=False).raw_df.requires_grad
    for df in (1.0, 0.5, math.inf, "5"):
        with pytest.raises(ValueError, match="df must be a number above 1"):
            ef.StudentT(2, df=df)


def test_a_student_base_keeps_heavy_tails_where_a_normal_base_scores_far_rows_far_too_low():
    # (a 2-D Student-t with 1.5 degrees of freedom at (1e3, 1e3): -517 from a normal base
    # against the true -25, a reviewer's figure)
    from scipy import stats

    torch.manual_seed(0)
    t = torch.distributions.StudentT(1.5)
    x = t.sample((2000, 2)).double()
    far = torch.tensor([[1e3, 1e3], [50.0, -20.0]], dtype=torch.float64)
    truth = torch.from_numpy(stats.t(1.5).logpdf(far.numpy()).sum(1))
    gaps = {}
    for base in ("normal", "student"):
        torch.manual_seed(0)
        flow = ef.models.maf(2, layers=3, hidden=(32,), base=base, standardize=True).double()
        ef.fit(flow, x, steps=300, progress=False)
        with torch.no_grad():
            gaps[base] = float((flow.log_prob(far) - truth).abs().max())
    assert gaps["student"] < 50 < 1000 < gaps["normal"], gaps


def test_a_student_base_saves_and_loads_with_its_degrees_of_freedom(tmp_path):
    flow = ef.models.maf(2, layers=1, hidden=(8,), base={"name": "student", "df": 3.0})
    assert isinstance(flow.base, ef.StudentT)
    assert flow.config["base"] == {"name": "student", "df": 3.0, "trainable": True}
    with torch.no_grad():
        flow.base.raw_df.add_(torch.tensor([0.5, -0.5]))
    ef.save(flow, tmp_path / "m.safetensors")
    again = ef.load(tmp_path / "m.safetensors")
    torch.testing.assert_close(again.base.df, flow.base.df)
    x = torch.randn(5, 2)
    torch.testing.assert_close(again.log_prob(x), flow.log_prob(x))
    for spec, message in (({"name": "student", "df": 0.5}, "df must be a number above 1"),
                          ({"name": "student", "components": 2}, r"unknown keys.*components")):
        with pytest.raises(ValueError, match=message):
            ef.models.maf(2, base=spec)


def test_the_student_base_scores_far_latents_in_float32_without_overflow():
    # (z^2 overflowed float32 from |z| = 1.8e19: -inf where the density is -184)
    from scipy import stats

    base = ef.StudentT(2, df=3.0)
    z = torch.tensor([[1e20, 0.0], [1e3, -2.0], [1e-30, 1e30]], requires_grad=True)
    values = base.log_prob(z)
    values.sum().backward()
    truth = stats.t(float(base.df[0])).logpdf(z.detach().double().numpy()).sum(1)
    np.testing.assert_allclose(values.detach().numpy(), truth, rtol=1e-5)
    assert torch.isfinite(z.grad).all()
