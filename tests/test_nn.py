"""Tests for the conditioners in exactflow.nn: MLP and MADE."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import exactflow as ef
from exactflow.nn import MADE, MLP, resolve_order
from tests.helpers import perturb


def rank_of(order: torch.Tensor) -> torch.Tensor:
    """``rank[i]`` = position of feature ``i`` in the order."""
    return torch.argsort(order)


# -- MLP ------------------------------------------------------------------------------------


@pytest.mark.parametrize("hidden", [(), (7,), (5, 6, 4)])
def test_mlp_shapes_and_depth(hidden: tuple[int, ...]) -> None:
    net = MLP(3, 4, hidden=hidden, activation=nn.Tanh)
    linears = [m for m in net if isinstance(m, nn.Linear)]
    assert len(linears) == len(hidden) + 1
    assert [m.out_features for m in linears] == [*hidden, 4]
    assert sum(isinstance(m, nn.Tanh) for m in net) == len(hidden)
    assert net(torch.randn(2, 3)).shape == (2, 4)


def test_mlp_zero_last_outputs_zero_until_trained() -> None:
    net = MLP(3, 5, hidden=(8, 8), zero_last=True)
    assert torch.equal(net(torch.randn(6, 3)), torch.zeros(6, 5))
    out = net(torch.randn(6, 3)).sum()
    out.backward()
    # Gradient reaches the zeroed last layer, so training moves it off zero.
    assert net[-1].weight.grad is not None and net[-1].weight.grad.abs().sum() > 0
    assert not torch.equal(MLP(3, 5, hidden=(8,))(torch.randn(6, 3)), torch.zeros(6, 5))


@pytest.mark.parametrize(
    "kwargs", [dict(in_features=0, out_features=2), dict(in_features=2, out_features=0),
               dict(in_features=2, out_features=2, hidden=(4, 0)),
               dict(in_features=2, out_features=2, hidden=(4.0,))]
)
def test_mlp_rejects_bad_sizes(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        MLP(**kwargs)


# -- orders ---------------------------------------------------------------------------------


def test_resolve_order() -> None:
    assert resolve_order(4, None).tolist() == [0, 1, 2, 3]
    assert resolve_order(4, "forward").tolist() == [0, 1, 2, 3]
    assert resolve_order(4, "reverse").tolist() == [3, 2, 1, 0]
    assert resolve_order(4, [2, 0, 3, 1]).tolist() == [2, 0, 3, 1]
    a, b = resolve_order(9, "random", seed=3), resolve_order(9, "random", seed=3)
    assert torch.equal(a, b) and sorted(a.tolist()) == list(range(9))
    for bad in ([0, 0, 1], [0, 1], "sideways", [1, 2, 3]):
        with pytest.raises(ValueError, match="order"):
            resolve_order(3, bad)


# -- MADE -----------------------------------------------------------------------------------

ORDERS = [None, "reverse", "random", [1, 4, 0, 3, 2]]


def made_jacobian(made: MADE, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
    """d params[b, i, p] / d x[b, j] as (batch, features, outputs, features)."""
    d, o = made.features, made.outputs
    fn = lambda xx, *c: made(xx, *c).reshape(xx.shape[0], d * o)  # noqa: E731
    jac = ef.jacobian(fn, x, context)
    return jac.reshape(x.shape[0], d, o, d)


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("context", [0, 3])
def test_made_is_autoregressive_in_its_order(order, context: int) -> None:
    d, o = 5, 3
    # tanh units are never flat, so structural connections show up as nonzero derivatives.
    made = MADE(d, o, hidden=(12, 12), context=context, order=order, seed=1, activation=nn.Tanh)
    made = perturb(made.double())
    x = torch.randn(4, d, dtype=torch.float64)
    ctx = torch.randn(4, context, dtype=torch.float64) if context else None
    jac = made_jacobian(made, x, ctx)
    rank = rank_of(made.order)
    allowed = rank[None, :] < rank[:, None]  # params of i may depend on x_j iff j before i
    dependent = (jac != 0).any(dim=(0, 2))
    # Exact zeros wherever the order forbids a dependency ...
    assert not bool(dependent[~allowed].any())
    # ... and, with enough hidden units and random weights, every allowed one is present.
    assert bool(dependent[allowed].all())


def test_made_connectivity_from_masks_is_exactly_the_order() -> None:
    made = MADE(6, 2, hidden=(10, 7, 9), order="random", seed=5)
    path = None
    for layer in made.layers:
        path = layer.mask if path is None else layer.mask @ path
    connected = (path > 0).reshape(6, 2, 6).any(1)
    rank = rank_of(made.order)
    assert torch.equal(connected, rank[None, :] < rank[:, None])


@pytest.mark.parametrize("features", [1, 2, 4])
def test_made_context_reaches_every_feature(features: int) -> None:
    """Every feature's parameters depend on the context, the first in the order included."""
    made = perturb(MADE(features, 2, hidden=(8,), context=3, order="reverse").double())
    x = torch.randn(5, features, dtype=torch.float64)
    c = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    out = made(x, c)
    for i in range(features):
        (grad,) = torch.autograd.grad(out[:, i].sum(), c, retain_graph=True)
        assert grad.abs().sum() > 0, f"feature {i} ignores the context"


def test_made_one_feature_without_context_is_constant() -> None:
    made = perturb(MADE(1, 2, hidden=(4,)))
    out = made(torch.randn(6, 1))
    assert torch.allclose(out, out[:1].expand_as(out))


def test_made_zero_last_and_buffers() -> None:
    made = MADE(3, 2, hidden=(8,), context=2)
    assert torch.equal(made(torch.randn(4, 3), torch.randn(4, 2)), torch.zeros(4, 3, 2))
    state = made.double().state_dict()
    assert "order" in state and all(f"layers.{i}.mask" in state for i in range(2))
    assert made.layers[0].mask.dtype == torch.float64


def test_made_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="features"):
        MADE(0)
    with pytest.raises(ValueError, match="outputs"):
        MADE(3, outputs=0)
    with pytest.raises(ValueError, match="context"):
        MADE(3, context=2)(torch.randn(2, 3))


def test_made_hidden_narrower_than_features_stays_autoregressive() -> None:
    made = perturb(MADE(6, 1, hidden=(3,), order="random", seed=0).double())
    jac = made_jacobian(made, torch.randn(3, 6, dtype=torch.float64), None)
    rank = rank_of(made.order)
    forbidden = ~(rank[None, :] < rank[:, None])
    assert not bool((jac != 0).any(dim=(0, 2))[forbidden].any())
