"""MADE's pooled workspaces: the same numbers as fresh buffers, and never shared unsafely."""

from __future__ import annotations

import threading

import pytest
import torch

import exactflow as ef
from exactflow.nn import MADE
from exactflow.nn import workspace as pool
from tests.helpers import perturb


def no_pool():
    """Saved-tensor hooks make the passes take fresh buffers (the reference)."""
    return torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t)


def ours(layout) -> list[pool.Workspace]:
    return [ws for ws in pool._pool if ws.layout is layout]


def made_and_inputs(batch: int = 9):
    made = perturb(MADE(5, 3, hidden=(12, 9), context=2, order="random", seed=1,
                        block_rows=3).double())
    x = torch.randn(batch, 5, dtype=torch.float64, requires_grad=True)
    c = torch.randn(batch, 2, dtype=torch.float64, requires_grad=True)
    return made, x, c


def test_made_through_a_workspace_equals_fresh_buffers() -> None:
    made, x, c = made_and_inputs()
    assert len(made._layout.fused[1][4]) > 1  # several blocks a layer
    g = torch.randn(9, 5, 3, dtype=torch.float64)
    with no_pool():
        ref = made(x, c)
        ref_grads = torch.autograd.grad(ref, (x, c, made.packed), g)
    out = made(x, c)
    grads = torch.autograd.grad(out, (x, c, made.packed), g)
    assert torch.equal(out, ref)
    assert all(torch.equal(a, b) for a, b in zip(grads, ref_grads, strict=True))
    with torch.no_grad():
        assert torch.equal(made(x, c), ref)


@pytest.mark.parametrize("order", ["forward", "random"])
def test_maf_layer_through_a_workspace_equals_fresh_buffers(order: str) -> None:
    layer = perturb(ef.transforms.MaskedAffineAutoregressive(
        5, hidden=(12, 9), context=2, order=order, seed=2).double())
    _, x, c = made_and_inputs()
    gv, gl = torch.randn(9, 5, dtype=torch.float64), torch.randn(9, dtype=torch.float64)
    params = (x, c, layer.made.packed)
    with no_pool():
        v_ref, l_ref = layer(x, c)
        ref = torch.autograd.grad((v_ref, l_ref), params, (gv, gl))
    v, log_det = layer(x, c)
    got = torch.autograd.grad((v, log_det), params, (gv, gl))
    assert torch.equal(v, v_ref) and torch.equal(log_det, l_ref)
    assert all(torch.equal(a, b) for a, b in zip(got, ref, strict=True))


def flow_and_batches():
    torch.manual_seed(0)
    flow = perturb(ef.models.maf(4, layers=3, hidden=(16, 16)).double())
    x1, x2 = torch.randn(2, 11, 4, dtype=torch.float64)
    return flow, x1, x2


def grads_of(flow, loss) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, list(flow.parameters())))


def test_a_workspace_is_not_reused_while_a_graph_needs_it() -> None:
    flow, x1, x2 = flow_and_batches()
    g1 = grads_of(flow, flow.log_prob(x1).sum())
    g2 = grads_of(flow, flow.log_prob(x2).sum())
    # Two graphs alive at once, then one backward through both.
    both = grads_of(flow, flow.log_prob(x1).sum() + flow.log_prob(x2).sum())
    assert all(torch.allclose(a, b + c, rtol=1e-12) for a, b, c in zip(both, g1, g2, strict=True))
    # A retained graph keeps its workspaces through other passes and backwards.
    kept = flow.log_prob(x1).sum()
    torch.autograd.grad(kept, list(flow.parameters()), retain_graph=True)
    for _ in range(2):
        grads_of(flow, flow.log_prob(x2).sum())
        with torch.no_grad():
            flow.log_prob(x2)
    again = grads_of(flow, kept)
    assert all(torch.equal(a, b) for a, b in zip(again, g1, strict=True))


def test_training_and_scoring_reuse_workspaces() -> None:
    flow, x1, x2 = flow_and_batches()
    mades = [m for m in flow.modules() if isinstance(m, MADE)]
    layout = mades[0]._layout
    assert len(mades) == 3 and all(m._layout is layout for m in mades)  # shared
    pool.clear()
    start = len(ours(layout))
    for x in (x1, x2, x1, x2):
        flow.log_prob(x).mean().backward()
    # One workspace per layer: the previous step's are free once its backward has run.
    assert len(ours(layout)) == start + 3
    assert all(ws.free() for ws in ours(layout))
    with torch.no_grad():
        flow.log_prob(torch.randn(23, 4, dtype=torch.float64))
    # Without autograd the stack runs layer by layer through one workspace (of the
    # scoring layout: here the same blocks, so the same layout).
    assert mades[0]._scoring_layout is layout
    assert sum(ws.batch == 23 for ws in ours(layout)) == 1


@pytest.mark.parametrize("order", ["forward", "random"])
def test_what_a_pass_returns_is_not_a_view_of_a_workspace(order: str) -> None:
    made = perturb(MADE(5, 3, hidden=(12, 9), order=order, seed=1).double())
    x = torch.randn(9, 5, dtype=torch.float64, requires_grad=True)
    flow, x1, x2 = flow_and_batches()
    for grad_mode in (False, True):
        with torch.set_grad_enabled(grad_mode):
            first, kept = made(x), flow.log_prob(x1)
            snapshot = (first.detach().clone(), kept.detach().clone())
            made(2 * x).sum().backward() if grad_mode else made(2 * x)
            flow.log_prob(x2)
        assert torch.equal(first, snapshot[0]) and torch.equal(kept, snapshot[1])
    x1.requires_grad_(True)
    (grad,) = torch.autograd.grad(flow.log_prob(x1).sum(), x1)
    saved = grad.clone()
    torch.autograd.grad(flow.log_prob(x2.requires_grad_(True)).sum(), x2)
    assert torch.equal(grad, saved)


def test_the_pool_keeps_free_workspaces_up_to_its_size(monkeypatch) -> None:
    flow, x1, _ = flow_and_batches()
    layout = next(m for m in flow.modules() if isinstance(m, MADE))._layout
    monkeypatch.setattr(pool, "POOL_BYTES", 0)
    with torch.no_grad():
        for batch in (3, 4, 5, 6):
            flow.log_prob(x1[:batch])
    # Each new workspace drops the free ones: only the last one made is left (the stack
    # runs layer by layer through one).
    assert [ws.batch for ws in ours(layout)] == [6]
    pool.clear()
    assert ours(layout) == []


def test_workspaces_follow_dtype_and_batch() -> None:
    made = perturb(MADE(3, 2, hidden=(8,)))
    for dtype in (torch.float32, torch.float64, torch.float32):
        made = made.to(dtype)
        for batch in (4, 7):
            x = torch.randn(batch, 3, dtype=dtype, requires_grad=True)
            out = made(x)
            with no_pool():
                ref = made(x)
            assert out.dtype == dtype and torch.equal(out, ref)
            out.sum().backward()


def test_threads_scoring_one_flow_at_once() -> None:
    flow, _, _ = flow_and_batches()
    batches = [torch.randn(64, 4, dtype=torch.float64) for _ in range(4)]
    with torch.no_grad():
        expected = [flow.log_prob(x) for x in batches]
    results: dict[int, list[torch.Tensor]] = {i: [] for i in range(4)}

    def score(i: int) -> None:
        with torch.no_grad():
            for _ in range(25):
                results[i].append(flow.log_prob(batches[i]))

    threads = [threading.Thread(target=score, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.equal(r, expected[i]) for i in range(4) for r in results[i])


def test_an_input_of_another_dtype_is_named() -> None:
    flow = ef.models.maf(3, layers=2, hidden=(8,))
    x = torch.randn(4, 3, dtype=torch.float64)
    for module in (flow.transform, next(m for m in flow.modules() if isinstance(m, MADE))):
        with pytest.raises(TypeError, match="input is torch.float64 but the weights are"):
            module(x)


def test_large_workspaces_leave_the_pool_after_a_pass_without_autograd(monkeypatch) -> None:
    flow, x1, _ = flow_and_batches()
    layout = next(m for m in flow.modules() if isinstance(m, MADE))._layout
    pool.clear()
    monkeypatch.setattr(pool, "KEEP_LARGEST", 0)
    with torch.no_grad():
        flow.log_prob(x1)
    assert ours(layout) == []
    flow.log_prob(x1).sum().backward()  # training keeps its workspaces
    assert len(ours(layout)) == 3


def test_gradients_of_one_row_are_not_workspace_memory() -> None:
    # At batch 1 a transposed (n, 1) buffer is contiguous: .contiguous() would return the
    # workspace itself, and the next backward would overwrite .grad.
    made = perturb(MADE(3, 2, hidden=(8,)))
    maf = perturb(ef.transforms.MaskedAffineAutoregressive(3, hidden=(8,), context=2))
    iaf = perturb(ef.transforms.InverseAutoregressive(3, hidden=(8,), context=2))
    runs = [
        (lambda a: made(a).sum(), 3),
        (lambda c: sum(t.sum() for t in maf(torch.randn(1, 3), c)), 2),
        (lambda c: sum(t.sum() for t in iaf.inverse(torch.randn(1, 3), c)), 2),
    ]
    for loss, width in runs:
        first = torch.randn(1, width, requires_grad=True)
        loss(first).backward()
        kept = first.grad.clone()
        (3 * loss(torch.randn(1, width, requires_grad=True))).backward()
        assert torch.equal(first.grad, kept)


def test_a_context_of_another_dtype_is_named() -> None:
    flow = ef.models.maf(3, layers=2, hidden=(8,), context=2)
    x, c = torch.randn(4, 3), torch.randn(4, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="MaskedAffineAutoregressive got input of dtype "
                                         "torch.float32 and a context of dtype torch.float64"):
        flow.transform(x, c)


def test_the_layers_of_a_layout_share_one_set_of_gradient_buffers() -> None:
    flow, x1, x2 = flow_and_batches()
    layout = next(m for m in flow.modules() if isinstance(m, MADE))._layout
    pool.clear()
    flow.log_prob(x1).sum().backward()
    mine = ours(layout)
    assert len(mine) == 3 and len({id(ws._gradients) for ws in mine}) == 1
    shared = mine[0]._gradients
    assert shared is pool.gradients(layout, 11, torch.float64, x1.device)
    # Another batch size gets its own set; each thread keeps the last KEEP_GRADIENTS.
    flow.log_prob(x2[:5]).sum().backward()
    assert pool.gradients(layout, 5, torch.float64, x1.device) is not shared
    for batch in range(1, pool.KEEP_GRADIENTS + 1):
        pool.gradients(layout, 100 + batch, torch.float64, x1.device)
    assert pool.gradients(layout, 11, torch.float64, x1.device) is not shared  # dropped
    # Workspaces built against a dropped set rebuild their views: gradients stay right.
    with no_pool():
        ref = grads_of(flow, flow.log_prob(x1).sum())
    assert all(torch.equal(a, b) for a, b in zip(grads_of(flow, flow.log_prob(x1).sum()),
                                                  ref, strict=True))


def test_threads_training_flows_of_one_layout_at_once() -> None:
    torch.manual_seed(3)
    flows = [perturb(ef.models.maf(4, layers=3, hidden=(16, 16)).double()) for _ in range(3)]
    layouts = {id(m._layout) for f in flows for m in f.modules() if isinstance(m, MADE)}
    assert len(layouts) == 1  # one layout: the threads would share a set of buffers
    batches = [torch.randn(32, 4, dtype=torch.float64) for _ in range(3)]
    with no_pool():
        expected = [grads_of(f, f.log_prob(x).sum()) for f, x in zip(flows, batches, strict=True)]
    failures: list[int] = []

    def train(i: int) -> None:
        for _ in range(20):
            got = grads_of(flows[i], flows[i].log_prob(batches[i]).sum())
            if not all(torch.equal(a, b) for a, b in zip(got, expected[i], strict=True)):
                failures.append(i)

    threads = [threading.Thread(target=train, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
