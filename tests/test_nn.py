"""Tests for the conditioners in exactflow.nn: MLP and MADE."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from torch import nn

import exactflow as ef
from exactflow.nn import MADE, MLP, passes, resolve_order
from tests.helpers import perturb
from tests.made_v01 import MADEv01


def rank_of(order: torch.Tensor) -> torch.Tensor:
    """``rank[i]`` = position of feature ``i`` in the order."""
    return torch.argsort(order)


# -- MLP ------------------------------------------------------------------------------------


@pytest.mark.parametrize("hidden", [(), (7,), (5, 6, 4)])
def test_mlp_shapes_and_depth(hidden: tuple[int, ...]) -> None:
    net = MLP(3, 4, hidden=hidden, activation=nn.Tanh)
    assert net.layers == len(hidden) + 1
    assert [net.linear(i)[0].shape for i in range(net.layers)] == [
        (b, a) for a, b in zip((3, *hidden), (*hidden, 4), strict=True)
    ]
    assert [type(m) for m in net.activations()] == [nn.Tanh] * len(hidden)
    assert net(torch.randn(2, 3)).shape == (2, 4)
    assert [p.numel() for p in net.parameters()] == [
        sum(a * b + b for a, b in zip((3, *hidden), (*hidden, 4), strict=True))
    ]


@pytest.mark.parametrize("activation", [nn.ReLU, nn.Tanh, ef.nn.with_dropout(0.5)])
def test_mlp_is_the_sequential_network_it_stores(activation) -> None:
    torch.manual_seed(3)
    net = MLP(3, 4, hidden=(7, 5), activation=activation).double().eval()
    torch.manual_seed(3)
    twin = nn.Sequential(nn.Linear(3, 7), activation(), nn.Linear(7, 5), activation(),
                         nn.Linear(5, 4)).double().eval()
    # Same seed, same initialization; the state dict has the Sequential's keys and shapes.
    assert {k: v.shape for k, v in net.state_dict().items()} == {
        k: v.shape for k, v in twin.state_dict().items()}
    assert all(torch.equal(net.state_dict()[k], v) for k, v in twin.state_dict().items())
    with torch.no_grad():
        for p in twin.parameters():
            p.normal_(0, 0.7)
    net.load_state_dict(twin.state_dict())
    x = torch.randn(9, 3, dtype=torch.float64, requires_grad=True)
    assert torch.allclose(net(x), twin(x), rtol=1e-13, atol=1e-13)
    g = torch.randn(9, 4, dtype=torch.float64)
    grad_net = torch.autograd.grad(net(x), [x, net.packed], g)
    grad_twin = torch.autograd.grad(twin(x), [x, *twin.parameters()], g)
    assert torch.allclose(grad_net[0], grad_twin[0], rtol=1e-12, atol=1e-12)
    flat = torch.cat([t.reshape(-1) for t in grad_twin[1:]])
    assert torch.allclose(grad_net[1], flat, rtol=1e-12, atol=1e-12)


def test_mlp_fused_backward_is_differentiable_again_and_under_torch_func() -> None:
    net = perturb(MLP(3, 2, hidden=(6, 5)).double())
    x = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    packed = net.packed.detach().clone().requires_grad_()

    def call(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(net, {"packed": packed}, (x,))

    assert type(call(x, packed).grad_fn).__name__ == "_MLPFunctionBackward"
    assert torch.autograd.gradcheck(call, (x, packed))
    assert torch.autograd.gradgradcheck(call, (x, packed))
    # torch.func (jacrev) takes the composable pass: the same Jacobian.
    jac = torch.func.jacrev(net)(x[0].detach())
    auto = torch.autograd.functional.jacobian(lambda v: net(v.unsqueeze(0))[0], x[0].detach())
    assert torch.allclose(jac, auto, atol=1e-12)


def test_mlp_state_dict_errors_are_clear() -> None:
    net = MLP(3, 4, hidden=(5,))
    state = net.state_dict()
    with pytest.raises(RuntimeError, match=r"size mismatch for 2.weight"):
        net.load_state_dict({**state, "2.weight": torch.zeros(4, 6)})
    with pytest.raises(RuntimeError, match=r"Missing key.*0.bias"):
        net.load_state_dict({k: v for k, v in state.items() if k != "0.bias"})
    with pytest.raises(RuntimeError, match=r"Unexpected key.*4.weight"):
        net.load_state_dict({**state, "4.weight": torch.zeros(4, 4)})
    # assign=True takes the stored dtype, as nn.Linear layers would.
    double = {k: v.double() for k, v in state.items()}
    net.load_state_dict(double, assign=True)
    assert net.packed.dtype == torch.float64 and isinstance(net.packed, nn.Parameter)
    assert net(torch.randn(2, 3, dtype=torch.float64)).dtype == torch.float64


def test_mlp_partial_load_and_state_dict_views() -> None:
    net, other = MLP(3, 4, hidden=(5,)), perturb(MLP(3, 4, hidden=(5,)))
    first = {k: v for k, v in other.state_dict().items() if k.startswith("0.")}
    result = net.load_state_dict(first, strict=False)
    assert result.missing_keys == ["2.weight", "2.bias"] and not result.unexpected_keys
    assert torch.equal(net.linear(0)[0], other.linear(0)[0])
    assert not torch.equal(net.linear(1)[0], other.linear(1)[0])
    # Some entries in float64 into a float32 network, the others kept: converted as
    # nn.Linear layers would be.
    net.load_state_dict({k: v.double() for k, v in first.items()}, strict=False)
    assert net.packed.dtype == torch.float32
    assert torch.equal(net.linear(0)[0], other.linear(0)[0])
    # Entries are views of the network's weights, as with nn.Linear layers: an in-place
    # edit (a moving average of the weights, say) reaches the network.
    net.state_dict()["2.bias"].fill_(0.5)
    assert torch.equal(net.linear(1)[1], torch.full((4,), 0.5))


def test_mlp_takes_any_leading_shape_and_keeps_hooks() -> None:
    net = perturb(MLP(3, 4, hidden=(6,)).double())
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    rows = net(x.reshape(10, 3)).reshape(2, 5, 4)
    assert torch.allclose(net(x), rows, atol=1e-14)
    assert torch.allclose(net(x[0, 0]), rows[0, 0], atol=1e-14)
    seen = []
    net.activations()[0].register_forward_hook(lambda m, i, o: seen.append(o.shape))
    net(torch.randn(7, 3, dtype=torch.float64, requires_grad=True)).sum().backward()
    assert seen == [(7, 6)]


def test_mlp_forward_mode_ad_and_torch_func_over_other_tensors() -> None:
    import torch.autograd.forward_ad as fwAD

    net = perturb(MLP(3, 2, hidden=(6,)).double())
    x, v = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    with fwAD.dual_level():
        tangent = fwAD.unpack_dual(net(fwAD.make_dual(x, v))).tangent
    _, expected = torch.autograd.functional.jvp(net, x, v)
    assert torch.allclose(tangent, expected, atol=1e-12)
    # A transform active over a tensor the network does not see.
    scale = torch.tensor(2.0, dtype=torch.float64)
    grad = torch.func.grad(lambda s: (net(x) * s).sum())(scale)
    assert torch.allclose(grad, net(x).sum())


def test_fused_passes_save_their_activations_through_autograd() -> None:
    # Saved with save_for_backward: saved-tensor hooks see them (save_on_cpu, activation
    # checkpointing) and the backward frees them.
    net = perturb(MLP(3, 2, hidden=(5, 6)))
    layer = perturb(ef.transforms.AffineCoupling(4, hidden=(8, 8)))
    made_layer = perturb(ef.transforms.MaskedAffineAutoregressive(4, hidden=(8,)))
    for module, width, hidden in ((net, 3, 2), (layer, 4, 2), (made_layer, 4, 1)):
        shapes: list[tuple[int, ...]] = []

        def pack(t: torch.Tensor, shapes: list = shapes) -> torch.Tensor:
            shapes.append(tuple(t.shape))
            return t

        x = torch.randn(7, width, requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = module(x)
        assert sum(7 in shape for shape in shapes) >= 1 + hidden, (module, shapes)
        (out[0] if isinstance(out, tuple) else out).sum().backward()
        fn = (out[0] if isinstance(out, tuple) else out).grad_fn
        with pytest.raises(RuntimeError, match="freed"):
            _ = fn.saved_tensors


@pytest.mark.parametrize("name", ["realnvp", "maf", "nsf"])
def test_create_graph_gradients_are_partial_derivatives(name: str) -> None:
    # The context feeds every layer, and each layer's input depends on it too: the
    # differentiable backward must not count the path through the input twice.
    kwargs = {"batch_norm": False} if name == "realnvp" else {}
    flow = perturb(getattr(ef.models, name)(3, layers=2, hidden=(8,), context=2, **kwargs)
                   .double()).eval()
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    c = torch.randn(5, 2, dtype=torch.float64, requires_grad=True)
    first = torch.autograd.grad(flow.log_prob(x, context=c).sum(), (x, c))
    again = torch.autograd.grad(flow.log_prob(x, context=c).sum(), (x, c), create_graph=True)
    for a, b in zip(first, again, strict=True):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)
    net = perturb(MLP(3, 3, hidden=(5,)).double())
    y = torch.randn(4, 3, dtype=torch.float64)
    (g1,) = torch.autograd.grad(net(net(y)).sum(), net.packed)
    (g2,) = torch.autograd.grad(net(net(y)).sum(), net.packed, create_graph=True)
    assert torch.allclose(g1, g2, rtol=1e-10, atol=1e-12)


def test_batched_backward_of_the_fused_passes() -> None:
    for flow in (ef.models.realnvp(3, layers=2, hidden=(8,), batch_norm=False),
                 ef.models.maf(3, layers=2, hidden=(8,))):
        flow = perturb(flow.double()).eval()
        x = torch.randn(4, 3, dtype=torch.float64)
        batched = torch.autograd.functional.jacobian(flow.log_prob, x, vectorize=True)
        looped = torch.autograd.functional.jacobian(flow.log_prob, x)
        assert torch.allclose(batched, looped, atol=1e-12)


def test_fused_passes_keep_backward_hooks_and_empty_batches() -> None:
    t = perturb(ef.transforms.AffineCoupling(4, hidden=(8,)))
    seen = []
    t.conditioner.register_full_backward_hook(lambda m, gi, go: seen.append(go[0].shape))
    x = torch.randn(6, 4, requires_grad=True)
    t(x)[1].sum().backward()
    assert seen == [(6, 4)]
    for name in ("realnvp", "nice", "nsf", "maf"):
        flow = getattr(ef.models, name)(3, layers=2, hidden=(8,)).eval()
        assert flow.log_prob(torch.empty(0, 3)).shape == (0,)


def test_mlp_zero_last_outputs_zero_until_trained() -> None:
    net = MLP(3, 5, hidden=(8, 8), zero_last=True)
    assert torch.equal(net(torch.randn(6, 3)), torch.zeros(6, 5))
    out = net(torch.randn(6, 3)).sum()
    out.backward()
    # Gradient reaches the zeroed last layer, so training moves it off zero.
    last = net.unpack(net.packed.grad)[-2]
    assert last.abs().sum() > 0
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


def test_made_connectivity_from_masked_weights_is_exactly_the_order() -> None:
    made = MADE(6, 2, hidden=(10, 7, 9), order="random", seed=5, zero_last=False)
    path = None
    for weight, _ in made.masked_weights()[0]:
        mask = (weight != 0).double()
        path = mask if path is None else mask @ path
    connected = (path > 0).reshape(6, 2, 6).any(1)
    rank = rank_of(made.order)
    assert torch.equal(connected, rank[None, :] < rank[:, None])


def test_made_relu_fused_pass_is_autoregressive() -> None:
    """The fused ReLU pass and its hand-written backward keep every forbidden derivative 0."""
    made = perturb(MADE(5, 3, hidden=(12, 9), context=2, order="random", seed=2).double())
    x = torch.randn(3, 5, dtype=torch.float64)
    c = torch.randn(3, 2, dtype=torch.float64)
    rank = rank_of(made.order)
    forbidden = ~(rank[None, :] < rank[:, None])
    for b in range(3):  # per-row autograd Jacobians go through the fused backward
        row = lambda xb, b=b: made(xb, c[b : b + 1])  # noqa: E731
        jac = torch.autograd.functional.jacobian(row, x[b : b + 1])
        jac = jac.reshape(5, 3, 5)
        assert not bool((jac != 0).any(dim=1)[forbidden].any())


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
    x, c = torch.randn(4, 3, requires_grad=True), torch.randn(4, 2)
    assert torch.equal(made(x, c), torch.zeros(4, 3, 2))  # the autograd pass too
    state = made.double().state_dict()
    assert set(state) == {"packed", "order"}
    assert made.packed.dtype == torch.float64 and made.order.dtype == torch.long


def test_made_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="features"):
        MADE(0)
    with pytest.raises(ValueError, match="outputs"):
        MADE(3, outputs=0)
    with pytest.raises(ValueError, match="context"):
        MADE(3, context=2)(torch.randn(2, 3))
    with pytest.raises(ValueError, match="context"):
        MADE(3, context=2).autoregress(lambda k, theta: theta[:, 0], torch.randn(2, 3))
    with pytest.raises(ValueError, match="block_rows"):
        MADE(3, block_rows=0)


def test_made_hidden_narrower_than_features_stays_autoregressive() -> None:
    made = perturb(MADE(6, 1, hidden=(3,), order="random", seed=0).double())
    jac = made_jacobian(made, torch.randn(3, 6, dtype=torch.float64), None)
    rank = rank_of(made.order)
    forbidden = ~(rank[None, :] < rank[:, None])
    assert not bool((jac != 0).any(dim=(0, 2))[forbidden].any())


# -- MADE against the dense masked network it replaces ------------------------------------


def reference_masks(made: MADE) -> list[torch.Tensor]:
    """Germain et al.'s masks in exactflow 0.1's unit order, built independently here.

    Feature ``order[k]`` has degree ``k + 1``; hidden unit ``j`` has degree
    ``low + j % (d - low)`` with ``low = 0`` for a conditional (or one-feature) MADE, else 1;
    a hidden unit sees degrees ``<=`` its own, an output (degree of its feature) ``<``.
    """
    d, o = made.features, made.outputs
    low = 0 if (made.context_features > 0 or d == 1) else 1
    degree = torch.empty(d, dtype=torch.long)
    degree[made.order] = torch.arange(1, d + 1)
    masks, previous = [], degree
    for h in made.hidden:
        units = low + torch.arange(h) % (d - low)
        masks.append(units[:, None] >= previous[None, :])
        previous = units
    outputs = degree.repeat_interleave(o)
    masks.append(outputs[:, None] > previous[None, :])
    return masks


def dense_reference(made: MADE, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
    """The MADE as dense masked products ``act(W * M @ h + b)``, from ``masked_weights``."""
    layers, context_weight = made.masked_weights()
    masks = reference_masks(made)
    h = x
    for i, ((weight, bias), mask) in enumerate(zip(layers, masks, strict=True)):
        # masked_weights must be zero wherever the reference mask is.
        assert not bool(weight[~mask].any())
        h = torch.nn.functional.linear(h, weight * mask, bias)
        if i == 0 and context_weight is not None:
            h = h + context @ context_weight.T
        if i < len(layers) - 1:
            h = torch.relu(h)
    return h.reshape(x.shape[0], made.features, made.outputs)


HIDDEN = {  # for features = 5 (d - 1 = 4): none, below, equal, above, several layers
    "none": (),
    "below": (3,),
    "equal": (4,),
    "above-2": (9, 7),
    "3-layers": (12, 5, 11),
}


def made_case(features, hidden, context, order, block_rows=2, seed=0):
    made = MADE(
        features, 3, hidden=hidden, context=context, order=order, seed=seed,
        zero_last=False, block_rows=block_rows,
    )
    made = perturb(made.double(), seed=seed)
    x = torch.randn(7, features, dtype=torch.float64)
    c = torch.randn(7, context, dtype=torch.float64) if context else None
    return made, x, c


@pytest.fixture(params=["dense", "blocks"])
def products(request, monkeypatch) -> str:
    """The composable pass's layers as one dense masked product each, or in blocks."""
    monkeypatch.setattr(passes, "BLOCKS_FROM", 2**62 if request.param == "dense" else 0)
    return request.param


@pytest.mark.parametrize("features", [1, 2, 5])
@pytest.mark.parametrize("hidden", HIDDEN)
@pytest.mark.parametrize("context", [0, 3])
@pytest.mark.parametrize("order", ["forward", "reverse", "random"])
def test_made_equals_the_dense_masked_network(features, hidden, context, order, products) -> None:
    made, x, c = made_case(features, HIDDEN[hidden], context, order)
    ref = dense_reference(made, x, c)
    with torch.no_grad():  # the fused pass without autograd
        torch.testing.assert_close(made(x, c), ref, rtol=0, atol=1e-12)
    x.requires_grad_(True)  # the fused pass with its hand-written backward
    torch.testing.assert_close(made(x, c), ref, rtol=0, atol=1e-12)
    # The composable pass (what torch.func and torch.compile see), row by row under vmap.
    if c is None:
        rows = torch.func.vmap(lambda xi: made(xi[None])[0])(x)
    else:
        rows = torch.func.vmap(lambda xi, ci: made(xi[None], ci[None])[0])(x, c)
    torch.testing.assert_close(rows, ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("hidden", ["none", "below", "above-2"])
@pytest.mark.parametrize("context", [0, 2])
def test_made_fused_backward_matches_autograd_of_the_composable_pass(
    hidden, context, products
) -> None:
    made, x, c = made_case(5, HIDDEN[hidden], context, "random", seed=3)
    x.requires_grad_(True)
    inputs = [x, made.packed] + ([c.requires_grad_(True)] if c is not None else [])
    grad_out = torch.randn(7, 5, 3, dtype=torch.float64)
    fused = torch.autograd.grad(made(x, c), inputs, grad_out)
    composable = torch.autograd.grad(
        made._outputs(made._composable(made._inputs(x, c), made.packed)), inputs, grad_out
    )
    for a, b in zip(fused, composable, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("context", [0, 2])
def test_made_gradcheck_and_gradgradcheck(context: int) -> None:
    """Finite differences agree with the fused backward and with its create_graph path."""
    made, x, c = made_case(3, (5, 4), context, "reverse", seed=1)
    x = x[:3].requires_grad_(True)
    args = [x, made.packed.detach().clone().requires_grad_(True)]
    if c is not None:
        args.append(c[:3].requires_grad_(True))

    def fn(xx, packed, *cc):
        return torch.func.functional_call(made, {"packed": packed}, (xx, *cc))

    assert torch.autograd.gradcheck(fn, args)
    assert torch.autograd.gradgradcheck(fn, args)


def test_made_composable_pass_takes_blocks_where_they_skip_enough(monkeypatch) -> None:
    made, x, c = made_case(5, (9, 7), 0, "random")
    skipped = [layer.skipped for layer in made._plan]
    assert all(n > 0 for n in skipped)
    # Blocks from 7 rows of the widest layer's skipped multiply-adds on.
    monkeypatch.setattr(passes, "BLOCKS_FROM", 7 * max(skipped))

    def cats(rows: int) -> int:
        out = made._composable(made._inputs(x[:rows], None), made.packed)
        seen, stack, count = set(), [out.grad_fn], 0
        while stack:
            fn = stack.pop()
            if fn is None or fn in seen:
                continue
            seen.add(fn)
            count += type(fn).__name__ == "CatBackward0"
            stack += [f for f, _ in fn.next_functions]
        return count

    assert cats(6) == 0  # one dense product per layer
    assert cats(7) >= 1  # the widest layer in blocks
    for rows in (6, 7):
        out = made._outputs(made._composable(made._inputs(x[:rows], None), made.packed))
        torch.testing.assert_close(out, dense_reference(made, x[:rows], None), rtol=0, atol=1e-12)


def test_made_block_size_changes_speed_only() -> None:
    outs = []
    for block_rows in (1, 3, 64):
        torch.manual_seed(0)
        made = perturb(MADE(7, 2, hidden=(20, 13), context=2, order="random", seed=0,
                            zero_last=False, block_rows=block_rows).double(), seed=0)
        outs.append((made, made(torch.ones(2, 7, dtype=torch.float64),
                                torch.ones(2, 2, dtype=torch.float64))))
    (a, out_a), (b, out_b), (c, out_c) = outs
    assert len(a._plan[1].groups) > len(b._plan[1].groups) > len(c._plan[1].groups) == 1
    assert torch.equal(a.packed, c.packed)
    torch.testing.assert_close(out_a, out_c, rtol=0, atol=1e-12)
    torch.testing.assert_close(out_b, out_c, rtol=0, atol=1e-12)


def test_made_passes_without_autograd_take_smaller_blocks(monkeypatch) -> None:
    made = perturb(MADE(6, 2, hidden=(96, 80), context=2, order="random", seed=1,
                        zero_last=False).double(), seed=1)
    assert made.block_rows == 64
    scoring = made._scoring_layout
    assert scoring is not made._layout
    assert all(len(a.groups) > len(b.groups)
               for a, b in zip(scoring.layers[:-1], made._layout.layers[:-1], strict=True))
    # The same weights layout: the one scatter map loads both.
    _, scatter, _ = ef.nn.layout.build_layout(6, 2, 2, (96, 80), 16)
    assert torch.equal(scatter, made._scatter)
    assert scoring.weights_size == made._layout.weights_size
    taken = []
    take = ef.nn.workspace.take
    monkeypatch.setattr("exactflow.nn.made.take", lambda layout, like: taken.append(layout)
                        or take(layout, like))
    x, c = torch.randn(9, 6, dtype=torch.float64), torch.randn(9, 2, dtype=torch.float64)
    with torch.no_grad():
        scored = made(x, c)
    recorded = made(x, c)
    assert taken == [scoring, made._layout]
    ref = dense_reference(made, x, c)
    torch.testing.assert_close(scored, ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(recorded, ref, rtol=0, atol=1e-12)
    # A smaller block_rows is kept for both; where the blocks come out the same, the
    # layout (and so the pooled workspaces) is shared.
    small = MADE(6, 2, hidden=(96, 80), context=2, block_rows=4)
    assert small._scoring_layout is small._layout
    narrow = MADE(4, 2, hidden=(16, 16))
    assert narrow._scoring_layout is narrow._layout


def test_a_made_pickled_before_it_had_a_scoring_layout_scores() -> None:
    made = perturb(MADE(6, 2, hidden=(96, 80), order="random", seed=1,
                        zero_last=False).double(), seed=1)
    del made.__dict__["_scoring_layout"]  # as exactflow 0.2.0.dev pickled it before
    loaded = pickle.loads(pickle.dumps(made))
    assert loaded._scoring_layout is made._layout_for_scoring()
    x = torch.randn(9, 6, dtype=torch.float64)
    with torch.no_grad():
        scored = loaded(x)
    torch.testing.assert_close(scored, dense_reference(loaded, x, None), rtol=0, atol=1e-12)


def test_made_jacfwd_and_jacrev_agree() -> None:
    made, x, c = made_case(4, (6, 5), 2, "random", seed=4)
    fn = lambda xi, ci: made(xi[None], ci[None])[0]  # noqa: E731
    fwd = torch.func.vmap(torch.func.jacfwd(fn))(x, c)
    rev = torch.func.vmap(torch.func.jacrev(fn))(x, c)
    torch.testing.assert_close(fwd, rev, rtol=0, atol=1e-12)


# -- parameters, and the state dicts of exactflow 0.1 ------------------------------------


@pytest.mark.parametrize("kwargs", [
    dict(features=5, outputs=2, hidden=(9, 7), context=3, order="random", seed=1),
    dict(features=64, outputs=2, hidden=(256, 256)),
    dict(features=1, outputs=3, hidden=(4,)),
    dict(features=4, outputs=1, hidden=(), context=2, order="reverse"),
])
def test_made_stores_exactly_the_kept_weights_and_biases(kwargs) -> None:
    made = MADE(**kwargs)
    old = MADEv01(**kwargs)
    kept = sum(int(layer.mask.sum()) + layer.bias.numel() for layer in old.layers)
    if old.context_layer is not None:
        kept += old.context_layer.weight.numel()
    assert sum(p.numel() for p in made.parameters()) == made.packed.numel() == kept
    dense = sum(p.numel() for p in old.parameters())
    assert kept < dense  # 0.1 counted the masked-out weights too


@pytest.mark.parametrize("zero_last", [True, False])
def test_made_same_seed_same_network_as_v01(zero_last: bool) -> None:
    kwargs = dict(hidden=(9, 7), context=2, order="random", zero_last=zero_last)
    torch.manual_seed(5)
    old = MADEv01(5, 2, **kwargs)
    torch.manual_seed(5)
    new = MADE(5, 2, **kwargs)
    x, c = torch.randn(6, 5), torch.randn(6, 2)
    torch.testing.assert_close(new(x, c), old(x, c), rtol=0, atol=1e-6)
    assert torch.equal(new.order, old.order)


FIXTURE = Path(__file__).parent / "data" / "made_v01.pt"


@pytest.mark.parametrize(
    "name", ["random_ctx", "reverse_nohidden", "one_feature", "one_feature_ctx", "narrow"]
)
def test_made_loads_exactflow_01_state_dicts(name: str) -> None:
    """State dicts saved by exactflow 0.1 (frozen in tests/data) load with the same outputs."""
    case = torch.load(FIXTURE, weights_only=True)["mades"][name]
    kwargs = dict(case["kwargs"])
    if "hidden" in kwargs:
        kwargs["hidden"] = tuple(kwargs["hidden"])
    made = MADE(**kwargs).double()
    made.load_state_dict(case["state"])  # strict
    with torch.no_grad():
        params = made(case["x"], case["context"])
    torch.testing.assert_close(params, case["params"], rtol=0, atol=1e-12)
    assert set(made.state_dict()) == {"packed", "order"}


@pytest.mark.parametrize("features, hidden, context", [(5, (9, 7), 3), (2, (), 0), (6, (3,), 2)])
def test_made_converts_v01_weights_and_gives_them_back(features, hidden, context) -> None:
    old = perturb(MADEv01(features, 2, hidden=hidden, context=context, order="random",
                          seed=2, zero_last=False).double(), seed=2)
    made = MADE(features, 2, hidden=hidden, context=context).double()  # another order
    made.load_state_dict(old.state_dict())
    assert torch.equal(made.order, old.order)
    x = torch.randn(4, features, dtype=torch.float64)
    c = torch.randn(4, context, dtype=torch.float64) if context else None
    torch.testing.assert_close(made(x, c), old(x, c), rtol=0, atol=1e-12)
    layers, context_weight = made.masked_weights()
    for (weight, bias), layer in zip(layers, old.layers, strict=True):
        assert torch.equal(weight, layer.weight.detach() * layer.mask)
        assert torch.equal(bias, layer.bias.detach())
    if context:
        assert torch.equal(context_weight, old.context_layer.weight.detach())


def test_made_v01_state_dict_of_another_shape_is_a_clear_error() -> None:
    old = MADEv01(4, 2, hidden=(5,))
    with pytest.raises(RuntimeError, match="do not fit"):
        MADE(4, 2, hidden=(6,)).load_state_dict(old.state_dict())


# -- the sequential direction ---------------------------------------------------------------


def solve_affine(v_sorted: torch.Tensor):
    """``u_k = (v_k - t) * exp(-tanh(s))``: an invertible map per feature, for the tests."""

    def solve(k: int, theta: torch.Tensor) -> torch.Tensor:
        return (v_sorted[:, k] - theta[:, 0]) * torch.exp(-torch.tanh(theta[:, -1]))

    return solve


def by_passes(made: MADE, v: torch.Tensor, c) -> torch.Tensor:
    """The plain sequential loop: ``d`` full passes of the dense masked reference."""
    u = torch.zeros_like(v)
    for _ in range(made.features):
        theta = dense_reference(made, u, c)
        u = (v - theta[..., 0]) * torch.exp(-torch.tanh(theta[..., -1]))
    return u


@pytest.mark.parametrize("features", [1, 2, 5])
@pytest.mark.parametrize("hidden", ["none", "below", "above-2", "3-layers"])
@pytest.mark.parametrize("context", [0, 3])
@pytest.mark.parametrize("order", ["forward", "random"])
def test_made_autoregress_equals_the_d_pass_loop(features, hidden, context, order) -> None:
    made, v, c = made_case(features, HIDDEN[hidden], context, order, seed=features)
    expected = by_passes(made, v, c)
    solve = solve_affine(v.index_select(1, made.order))
    with torch.no_grad():  # units written in place
        torch.testing.assert_close(made.autoregress(solve, v, c), expected, rtol=0, atol=1e-12)
    u = made.autoregress(solve, v, c)  # differentiable: units concatenated
    torch.testing.assert_close(u, expected, rtol=0, atol=1e-12)
    assert u.requires_grad


def test_made_autoregress_gradients_equal_those_of_the_loop() -> None:
    made, v, c = made_case(4, (7, 6), 2, "random", seed=9)
    v.requires_grad_(True)
    c.requires_grad_(True)
    weights = torch.randn(7, 4, dtype=torch.float64)

    def loop_with_graph() -> torch.Tensor:
        u = torch.zeros_like(v)
        for _ in range(4):
            theta = made(u, c)
            u = (v - theta[..., 0]) * torch.exp(-torch.tanh(theta[..., -1]))
        return u

    inputs = [v, c, made.packed]
    expected = torch.autograd.grad((loop_with_graph() * weights).sum(), inputs)
    u = made.autoregress(solve_affine(v.index_select(1, made.order)), v, c)
    got = torch.autograd.grad((u * weights).sum(), inputs)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-11)


def test_made_autoregress_under_vmap_without_grad() -> None:
    made, v, c = made_case(3, (6,), 2, "reverse", seed=2)
    expected = by_passes(made, v, c)

    def row(vi, ci):
        solve = solve_affine(vi[None].index_select(1, made.order))
        return made.autoregress(solve, vi[None], ci[None])[0]

    with torch.no_grad():
        torch.testing.assert_close(torch.func.vmap(row)(v, c), expected, rtol=0, atol=1e-12)


def test_made_under_autocast_leaves_its_products_to_autocast() -> None:
    """Under autocast the blocked products are plain ops: bfloat16 like any linear layer."""
    made, x, c = made_case(5, (9, 7), 3, "random", seed=5)
    made, x, c = made.float(), x.float(), c.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = made(x, c)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), made(x, c), rtol=0.05, atol=0.05)


def test_double_backward_through_a_one_feature_made_without_context():
    # Its output does not depend on x: the second derivative is zero, not an error.
    from exactflow.transforms import SplineAutoregressive

    layer = SplineAutoregressive(1, bins=4, hidden=(8,)).double()
    x = torch.randn(5, 1, dtype=torch.float64, requires_grad=True)
    z, ladj = layer(x)
    (g,) = torch.autograd.grad(z.sum() + ladj.sum(), x, create_graph=True)
    (gg,) = torch.autograd.grad(g.sum(), x)
    assert torch.isfinite(gg).all()
