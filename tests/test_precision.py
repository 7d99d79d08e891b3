"""Mixed precision (bf16 autocast, densities in float32) on the CPU; CUDA tests are marked gpu.

Also: device="auto", pinned batches, and synchronized batch norm's class swap, which need
no process group.
"""

from __future__ import annotations

import pytest
import torch

import exactflow as ef
from exactflow.nn import MADE
from exactflow.training.batches import to_device
from exactflow.training.loop import resolve_device
from exactflow.training.precision import Precision
from exactflow.training.syncbn import SyncedBatchNorm, synchronize_batch_norm
from tests.helpers import perturb


def _maf(seed: int = 0) -> ef.Flow:
    torch.manual_seed(seed)
    return perturb(ef.models.maf(4, layers=3, hidden=(32, 32)), 0.1, seed=seed)


def _data(n: int = 1024) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, 4, generator=gen)
    return torch.cat([x[:, :2], x[:, 2:] + x[:, :2] ** 2], 1)


def test_bf16_runs_the_matrix_products_in_bf16_and_everything_else_in_float32() -> None:
    flow = _maf()
    x = _data(256)
    precision = Precision("bf16", torch.device("cpu"), torch.float32)
    precision.attach(flow)
    seen: dict[str, set[torch.dtype]] = {"made": set(), "layer_z": set(), "layer_ladj": set()}

    def made(module: torch.nn.Module, args: object, out: torch.Tensor) -> None:
        # The MADE's output is its last blocked product's: bf16 under autocast.
        seen["made"].add(out.dtype)

    def layer(module: torch.nn.Module, args: object, out: tuple[torch.Tensor, ...]) -> None:
        seen["layer_z"].add(out[0].dtype)
        seen["layer_ladj"].add(out[1].dtype)

    # prepend: the MADE's own output, seen before attach's hook casts it back to float32.
    handles = [m.register_forward_hook(made, prepend=True) for m in flow.modules()
               if isinstance(m, MADE)]
    assert len(handles) == 3
    handles += [m.register_forward_hook(layer) for m in flow.modules()
                if isinstance(m, ef.Transform)]
    with precision.autocast():
        log_p = flow.log_prob(x)
    assert seen == {"made": {torch.bfloat16}, "layer_z": {torch.float32},
                    "layer_ladj": {torch.float32}}
    assert log_p.dtype == torch.float32
    with torch.no_grad():
        exact = flow.log_prob(x)
    error = (log_p.detach() - exact).abs()
    assert error.max() > 0  # bf16 rounding shows ...
    assert error.median() < 0.01 and error.max() < 0.5  # ... in thousandths of a nat per row
    assert (log_p.detach().mean() - exact.mean()).abs() < 0.01  # and less in the batch mean
    precision.detach()
    for handle in handles:
        handle.remove()
    assert all(not m._forward_hooks for m in flow.modules())  # detach removed every cast


def test_fit_in_bf16_trains_like_float32() -> None:
    x = _data()
    histories = {}
    flows = {}
    for precision in ("fp32", "bf16"):
        flow = _maf(seed=3)
        histories[precision] = ef.fit(flow, x, steps=60, batch_size=256, lr=3e-3,
                                      precision=precision, progress=False, device="cpu")
        flows[precision] = flow
    bf16 = flows["bf16"]
    assert all(p.dtype == torch.float32 for p in bf16.parameters())
    assert all(not m._forward_hooks for m in bf16.modules())
    curve = [v for v in histories["bf16"].train_nll if v is not None]
    assert curve[-1] < curve[0] - 0.1
    nll = {k: ef.evaluate(f, x)["nll"] for k, f in flows.items()}
    assert abs(nll["bf16"] - nll["fp32"]) < 0.05


def test_bf16_is_refused_where_it_cannot_work() -> None:
    with pytest.raises(ValueError, match="precision must be one of"):
        Precision("fp16", torch.device("cpu"), torch.float32)
    with pytest.raises(ValueError, match="this flow is torch.float64"):
        ef.fit(_maf().double(), _data(64).double(), steps=1, batch_size=32, precision="bf16",
               progress=False, device="cpu")


def test_device_auto_picks_cuda_when_available(monkeypatch: pytest.MonkeyPatch) -> None:
    flow = _maf()
    assert resolve_device("auto", flow) == torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto", flow).type == "cuda"


def test_batches_move_as_is_on_the_cpu() -> None:
    batch = torch.arange(6.0, dtype=torch.float64).reshape(3, 2)
    moved = to_device(batch, torch.device("cpu"), torch.float32)
    assert moved.dtype == torch.float32 and torch.equal(moved, batch.float())


def test_synchronized_batch_norm_is_undone_even_on_errors() -> None:
    flow = ef.models.realnvp(3, layers=2, hidden=(8,), batch_norm=True)
    layers = [m for m in flow.modules() if isinstance(m, ef.transforms.BatchNorm)]
    assert layers
    with pytest.raises(KeyError):
        with synchronize_batch_norm(flow) as count:
            assert count == len(layers)
            assert all(type(m) is SyncedBatchNorm for m in layers)
            raise KeyError("boom")
    assert all(type(m) is ef.transforms.BatchNorm for m in layers)


# -- CUDA (skipped without it) ---------------------------------------------------------------


@pytest.mark.gpu
def test_fit_on_auto_trains_on_the_gpu() -> None:
    flow = _maf()
    x = _data()
    history = ef.fit(flow, x, steps=20, batch_size=256, progress=False)  # device="auto"
    assert all(p.device.type == "cuda" for p in flow.parameters())
    assert history.train_nll[-1] < history.train_nll[0]


@pytest.mark.gpu
def test_pinned_batches_reach_the_gpu() -> None:
    batch = torch.randn(64, 4, dtype=torch.float64)
    moved = to_device(batch, torch.device("cuda"), torch.float32)
    torch.cuda.synchronize()
    assert moved.device.type == "cuda" and torch.equal(moved.cpu(), batch.float())


@pytest.mark.gpu
def test_fit_in_bf16_on_the_gpu() -> None:
    if not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bfloat16 support")
    x = _data()
    results = {}
    for precision in ("fp32", "bf16"):
        flow = _maf(seed=3)
        ef.fit(flow, x, steps=60, batch_size=256, lr=3e-3, precision=precision,
               progress=False, device="cuda")
        results[precision] = ef.evaluate(flow, x)["nll"]
    assert abs(results["bf16"] - results["fp32"]) < 0.05


def _nccl_worker(rank: int) -> dict[str, torch.Tensor]:
    flow = _maf(seed=rank)
    ef.fit(flow, _data(), steps=10, batch_size=255, lr=3e-3, progress=False, seed=2)
    return {k: v.cpu() for k, v in flow.state_dict().items()}


@pytest.mark.gpu
def test_two_gpus_with_nccl_match_one_process() -> None:
    if torch.cuda.device_count() < 2 or not torch.distributed.is_nccl_available():
        pytest.skip("needs two GPUs and NCCL")
    ranks = ef.distributed.launch(_nccl_worker, 2, backend="nccl", timeout=300)
    flow = _maf(seed=0)
    ef.fit(flow, _data(), steps=10, batch_size=255, lr=3e-3, progress=False, seed=2,
           device="cuda")
    for state in ranks:
        for key, value in flow.state_dict().items():
            torch.testing.assert_close(state[key], value.cpu(), atol=1e-4, rtol=1e-4)
