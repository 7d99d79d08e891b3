"""A Compose's MAF layers and the permutations between them, run as one fused chain."""

from __future__ import annotations

import pytest
import torch

import exactflow as ef
from exactflow.transforms import (
    ElementwiseAffine,
    InverseAutoregressive,
    MaskedAffineAutoregressive,
    Permutation,
    Reverse,
)
from tests.helpers import perturb

MAF = MaskedAffineAutoregressive
IAF = InverseAutoregressive


def one_by_one(t: ef.Compose, x, c=None):
    """The layers called one at a time: each MAF layer through its own fused pass."""
    total = None
    for layer in t:
        x, log_det = layer(x, c)
        total = log_det if total is None else total + log_det
    return x, total


def stack(d: int = 4, c: int = 0, orders=("forward", "random", "reverse")) -> ef.Compose:
    layers = []
    for k, order in enumerate(orders):
        layers.append(MAF(d, hidden=(10, 7), context=c, order=order, seed=k))
        layers.append(Reverse(d) if k % 2 == 0 else Permutation(d, seed=k))
    return perturb(ef.Compose(*layers).double())


def chained(t: ef.Compose, x, c=None) -> bool:
    z, _ = t(x, c)
    return type(z.grad_fn).__name__ == "_AffineChainBackward"


@pytest.mark.parametrize("context", [0, 3])
def test_chain_equals_the_layers_one_by_one(context: int) -> None:
    t = stack(c=context)
    x = torch.randn(9, 4, dtype=torch.float64, requires_grad=True)
    c = torch.randn(9, 3, dtype=torch.float64, requires_grad=True) if context else None
    assert chained(t, x, c)
    wanted = [x, *([c] if context else []), *t.parameters()]
    gz, gl = torch.randn(9, 4, dtype=torch.float64), torch.randn(9, dtype=torch.float64)
    z_ref, l_ref = one_by_one(t, x, c)
    ref = torch.autograd.grad((z_ref, l_ref), wanted, (gz, gl))
    z, log_det = t(x, c)
    got = torch.autograd.grad((z, log_det), wanted, (gz, gl))
    assert torch.equal(z, z_ref) and torch.equal(log_det, l_ref)
    for a, b in zip(got, ref, strict=True):  # the context's sum may add in another order
        assert torch.allclose(a, b, rtol=1e-13, atol=1e-15)
    with torch.no_grad():
        assert torch.equal(t(x, c)[0], z_ref)


def test_chain_passes_the_checker_and_gradcheck() -> None:
    t = stack(d=3, c=2)
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    c = torch.randn(5, 2, dtype=torch.float64, requires_grad=True)
    assert ef.check_transform(t, x.detach(), c.detach()).ok
    assert torch.autograd.gradcheck(lambda x, c: t(x, c), (x, c))
    assert torch.autograd.gradgradcheck(lambda x, c: t(x, c), (x, c))


def test_only_some_gradients_wanted() -> None:
    t = stack()
    x = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    t.requires_grad_(False)
    (gx,) = torch.autograd.grad(t(x)[1].sum(), x)
    (ref,) = torch.autograd.grad(one_by_one(t, x)[1].sum(), x)
    assert torch.equal(gx, ref)
    t.requires_grad_(True)
    last = list(t.parameters())[-1]
    x.requires_grad_(False)
    (g,) = torch.autograd.grad(t(x)[0].sum(), last)
    (ref,) = torch.autograd.grad(one_by_one(t, x)[0].sum(), last)
    assert torch.equal(g, ref)


def test_chains_stop_at_other_layers() -> None:
    d = 3
    t = perturb(ef.Compose(
        MAF(d, hidden=(8,)), Reverse(d), ElementwiseAffine(d),
        MAF(d, hidden=(8,)), Permutation(d, seed=0), MAF(d, hidden=(8,), order="random"),
    ).double())
    runs: list[int] = []
    for layer in t:
        if isinstance(layer, MAF):
            original = layer._chain

            def spy(layers, start, x, context, original=original):
                result = original(layers, start, x, context)
                runs.append(-1 if result is None else result[2] - start)
                return result

            layer._chain = spy
    x = torch.randn(7, d, dtype=torch.float64)
    z, log_det = t(x)
    z_ref, l_ref = one_by_one(t, x)
    assert runs == [2, 3]  # MAF + Reverse; MAF + Permutation + MAF
    assert torch.allclose(z, z_ref, rtol=1e-14) and torch.allclose(log_det, l_ref, rtol=1e-14)


def test_hooks_and_transforms_run_the_layers_one_by_one() -> None:
    t = stack()
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    seen: list[str] = []
    handle = t[2].register_forward_hook(lambda *_: seen.append("hook"))
    z, log_det = t(x)  # the hooked layer runs alone, the others in chains around it
    assert seen == ["hook"] and torch.equal(z, one_by_one(t, x)[0])
    handle.remove()
    with torch.autograd.graph.saved_tensors_hooks(lambda s: s, lambda s: s):
        assert not chained(t, x)
    jac = torch.func.jacrev(lambda x: t(x)[1].sum())(x.detach())
    (ref,) = torch.autograd.grad(one_by_one(t, x)[1].sum(), x)
    assert torch.allclose(jac, ref, rtol=1e-12)
    assert chained(t, x)


def test_flows_built_by_maf_run_one_chain() -> None:
    flow = ef.models.maf(5, layers=4, hidden=(16,))
    x = torch.randn(8, 5)
    z, _ = flow.transform(x)
    assert type(z.grad_fn).__name__ == "_AffineChainBackward"
    with torch.no_grad():
        assert torch.allclose(flow.log_prob(x), flow.log_prob(x.double().float()))


def test_a_changed_order_is_seen() -> None:
    t = stack(orders=("forward", "forward"))
    x = torch.randn(6, 4, dtype=torch.float64)
    t(x)  # plans the chain
    state = t[0].state_dict()
    state["made.order"] = torch.tensor([2, 0, 3, 1])
    t[0].load_state_dict(state)
    z, log_det = t(x)
    z_ref, l_ref = one_by_one(t, x)
    assert torch.equal(z, z_ref) and torch.equal(log_det, l_ref)


@pytest.mark.parametrize("context", [0, 3])
def test_scoring_runs_in_blocks_of_rows_with_the_same_values(context: int, monkeypatch) -> None:
    t = stack(c=context)
    n = 600  # blocks of 256 rows (the least), the last one of 88
    monkeypatch.setattr(ef.nn.workspace, "KEEP_LARGEST", 0)
    layout = t[0].made._scoring_layout
    assert ef.nn.workspace.block_rows(layout, torch.zeros(1)) == 256
    x = torch.randn(n, 4, dtype=torch.float64)
    c = torch.randn(n, 3, dtype=torch.float64) if context else None
    seen: list[int] = []
    loads: list[int] = []
    take, load = ef.nn.workspace.take, ef.nn.workspace.Workspace.load

    def spy(layout, like):
        seen.append(like.shape[0])
        return take(layout, like)

    def spy_load(ws, packed, scatter):
        loads.append(ws.batch)
        return load(ws, packed, scatter)

    monkeypatch.setattr("exactflow.transforms.fused_affine.take", spy)
    monkeypatch.setattr(ef.nn.workspace.Workspace, "load", spy_load)
    with torch.no_grad():
        z, log_det = t(x, c)
    # Layer by layer: the blocks of 256 rows through one workspace, the last one's 88
    # through another, each loading the layer's weights once.
    assert seen == loads == [256, 88] * 3
    seen.clear()
    x.requires_grad_(True)
    z_whole, l_whole = t(x, c)  # training runs the whole batch at once
    assert seen == [n] * 3
    z_ref, l_ref = one_by_one(t, x, c)
    for got in ((z, log_det), (z_whole, l_whole)):
        assert torch.allclose(got[0], z_ref, rtol=1e-13, atol=1e-14)
        assert torch.allclose(got[1], l_ref, rtol=1e-13, atol=1e-14)


def iaf_stack(c: int = 0) -> ef.Compose:
    layers = []
    for k, order in enumerate(("forward", "random", "reverse")):
        layers.append(IAF(4, hidden=(10, 7), context=c, order=order, seed=k))
        layers.append(Reverse(4) if k % 2 == 0 else Permutation(4, seed=k))
    return perturb(ef.Compose(*layers).double())


def inverses_one_by_one(t: ef.Compose, z, c=None):
    """The layers' inverses called one at a time, last layer first."""
    total = None
    for layer in reversed(list(t)):
        z, log_det = layer.inverse(z, c)
        total = log_det if total is None else total + log_det
    return z, total


@pytest.mark.parametrize("context", [0, 3])
def test_iaf_sampling_chain_equals_the_inverses_one_by_one(context: int, monkeypatch) -> None:
    t = iaf_stack(c=context)
    z = torch.randn(9, 4, dtype=torch.float64, requires_grad=True)
    c = torch.randn(9, 3, dtype=torch.float64, requires_grad=True) if context else None
    x, log_det = t.inverse(z, c)
    assert type(x.grad_fn).__name__ == "_AffineChainBackward"
    x_ref, l_ref = inverses_one_by_one(t, z, c)
    assert torch.equal(x, x_ref) and torch.equal(log_det, l_ref)
    wanted = [z, *([c] if context else []), *t.parameters()]
    gx, gl = torch.randn(9, 4, dtype=torch.float64), torch.randn(9, dtype=torch.float64)
    got = torch.autograd.grad((x, log_det), wanted, (gx, gl))
    ref = torch.autograd.grad((x_ref, l_ref), wanted, (gx, gl))
    for a, b in zip(got, ref, strict=True):
        assert torch.allclose(a, b, rtol=1e-13, atol=1e-15)
    assert torch.autograd.gradcheck(lambda z: t.inverse(z, c)[0], (z,))
    assert ef.check_transform(t, x.detach(), None if c is None else c.detach()).ok
    # Without a backward: block by block, layer by layer, with the same values.
    n = 600
    monkeypatch.setattr(ef.nn.workspace, "KEEP_LARGEST", 0)
    seen: list[int] = []
    take = ef.nn.workspace.take

    def spy(layout, like):
        seen.append(like.shape[0])
        return take(layout, like)

    monkeypatch.setattr("exactflow.transforms.fused_affine.take", spy)
    z = torch.randn(n, 4, dtype=torch.float64)
    c = torch.randn(n, 3, dtype=torch.float64) if context else None
    with torch.no_grad():
        x, log_det = t.inverse(z, c)
        x_ref, l_ref = inverses_one_by_one(t, z, c)
    assert seen == [256, 88] * 3
    assert torch.allclose(x, x_ref, rtol=1e-13, atol=1e-14)
    assert torch.allclose(log_det, l_ref, rtol=1e-13, atol=1e-14)


def test_iaf_models_sample_through_one_chain() -> None:
    flow = ef.models.iaf(5, layers=4, hidden=(16,))
    x, _ = flow.transform.inverse(torch.randn(8, 5))
    assert type(x.grad_fn).__name__ == "_AffineChainBackward"
    x, log_prob = flow.rsample_and_log_prob(8)
    with torch.no_grad():
        torch.testing.assert_close(flow.log_prob(x), log_prob, rtol=1e-4, atol=1e-4)
    assert MAF(3)._chain_direction == "forward" and IAF(3)._chain_direction == "inverse"

    class Mine(IAF):
        def inverse(self, z, context=None):
            return super().inverse(z, context)

    assert Mine(3)._chain_direction is None  # (an inverse of its own: called as it is)


@pytest.mark.parametrize("model", ["maf", "iaf"])
@pytest.mark.parametrize("which", [0, 1])  # an autoregressive layer, a permutation
def test_a_direction_of_an_instance_is_called_as_it_is(model: str, which: int) -> None:
    torch.manual_seed(0)
    flow = perturb(getattr(ef.models, model)(3, layers=3, hidden=(8,)).double())
    t = flow.transform
    direction = "forward" if model == "maf" else "inverse"
    own = getattr(t[which], direction)
    shifted = lambda u, context=None: (lambda v, ld: (v + 1, ld + 2))(*own(u, context))  # noqa: E731
    setattr(t[which], direction, shifted)
    u = torch.randn(5, 3, dtype=torch.float64)
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            got = t(u) if model == "maf" else t.inverse(u)
            ref = one_by_one(t, u) if model == "maf" else inverses_one_by_one(t, u)
        assert torch.equal(got[0], ref[0])
        assert torch.allclose(got[1], ref[1], rtol=1e-13, atol=1e-13)  # (sums' order)
    plain = getattr(ef.models, model)(3, layers=3, hidden=(8,)).double()
    plain.load_state_dict(flow.state_dict())
    with torch.no_grad():
        other = plain.transform(u) if model == "maf" else plain.transform.inverse(u)
    assert not torch.allclose(got[0], other[0])  # (the override changed the result)


def test_block_rows_fit_two_workspaces_in_the_pool() -> None:
    flow = ef.models.maf(10, layers=3, hidden=(128, 128))
    made = next(m for m in flow.modules() if isinstance(m, ef.nn.MADE))
    like = torch.zeros(1)
    rows = ef.nn.workspace.block_rows(made._scoring_layout, like)
    assert rows % 64 == 0 and rows >= 256
    ef.nn.workspace.clear()
    with torch.no_grad():
        flow.log_prob(torch.randn(3 * rows + 64, 10))
    kept = [ws for ws in ef.nn.workspace._pool if ws.layout is made._scoring_layout]
    assert sorted(ws.batch for ws in kept) == [64, rows]  # the blocks', the last block's
    small, large = min(kept, key=lambda ws: ws.batch), max(kept, key=lambda ws: ws.batch)
    assert 2 * large.nbytes <= ef.nn.workspace.KEEP_LARGEST
    per_row = (large.nbytes - small.nbytes) // (rows - 64)
    assert 2 * (large.nbytes + 64 * per_row) > ef.nn.workspace.KEEP_LARGEST  # the most
