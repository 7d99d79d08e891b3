"""How the ranks of a data-parallel run combine their gradients: three interchangeable engines.

A training step of :class:`~exactflow.training.parallel.Replicas` computes the loss of each
micro-batch through :attr:`Engine.model`, back-propagates it scaled by :attr:`Engine.scale`
inside :meth:`Engine.micro`, and hands the step's summed loss values to
:meth:`Engine.finish`, which returns them summed over the ranks. Every rank weights its
losses by its share of the global batch, so after ``finish`` every rank holds the gradient
of the global batch mean (what one process computes on the whole batch, up to rounding).

* :class:`Engine`: one process; no communication.
* :class:`DDPEngine`: ``torch.nn.parallel.DistributedDataParallel``. Gradients are
  all-reduced in buckets while the backward pass is still running (communication overlaps
  computation), ``no_sync`` skips the all-reduce on all but the last micro-batch of a step,
  and DDP's options and communication hooks apply. DDP averages over the ranks, so each
  rank scales its loss by the world size.
* :class:`AllReduceEngine`: the gradients of all parameters and the loss in one flat
  all-reduce after the backward pass (no overlap). Kept for flows DDP cannot wrap and for
  comparison (``benchmarks/scaling.py``).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = ["Engine", "DDPEngine", "AllReduceEngine", "DDP_DEFAULTS"]



def _ddp_defaults() -> dict[str, Any]:
    known = inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters
    out: dict[str, Any] = {}
    # torch >= 2.13 names it forward_sync_buffers (broadcast_buffers warns there).
    out["forward_sync_buffers" if "forward_sync_buffers" in known else "broadcast_buffers"] = False
    if "init_sync" in known:
        out["init_sync"] = False
    return out


#: exactflow's defaults for ``DistributedDataParallel`` (``fit(ddp={...})`` overrides them).
#: No buffer broadcast before every forward (``forward_sync_buffers=False``, or
#: ``broadcast_buffers=False`` before torch 2.13): exactflow keeps buffers equal itself
#: (ActNorm is initialized on the whole first global batch; batch-norm running averages are
#: synchronized or averaged at every record). ``init_sync=False``: the ranks' states were
#: just broadcast from rank 0.
DDP_DEFAULTS: dict[str, Any] = _ddp_defaults()


class Engine:
    """One process: the module itself, unscaled losses, nothing to combine."""

    #: Factor on each rank's share-weighted loss before ``backward``.
    scale: float = 1.0

    def __init__(self, module: nn.Module) -> None:
        self.model: nn.Module = module

    def micro(self, last: bool) -> AbstractContextManager[Any]:
        """The context of one micro-batch's forward and backward (``last``: of the step)."""
        return nullcontext()

    def finish(self, totals: Tensor) -> Tensor:
        """The step's share-weighted loss values, summed over the ranks."""
        return totals

    def close(self) -> None:
        """Release what the engine holds (a DDP reducer and its autograd hooks)."""
        self.model = nn.Module()


def _all_reduce(tensor: Tensor, comm: torch.device) -> Tensor:
    buffer = tensor.to(comm)
    dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
    return buffer.to(tensor.device)


class DDPEngine(Engine):
    """``DistributedDataParallel`` around the module, with exactflow's :data:`DDP_DEFAULTS`.

    ``options`` are keyword arguments of ``DistributedDataParallel`` (``bucket_cap_mb``,
    ``find_unused_parameters``, ``gradient_as_bucket_view``, ``static_graph``, ...), plus
    ``"comm_hook": (state, hook)``, registered with ``register_comm_hook`` (e.g.
    ``(None, torch.distributed.algorithms.ddp_comm_hooks.default_hooks.bf16_compress_hook)``).
    """

    def __init__(
        self, module: nn.Module, device: torch.device, comm: torch.device,
        options: Mapping[str, Any] | None = None,
    ) -> None:
        settings = {**DDP_DEFAULTS, **dict(options or {})}
        hook = settings.pop("comm_hook", None)
        for key in ("module", "device_ids", "output_device", "process_group"):
            if key in settings:
                raise ValueError(
                    f"ddp option {key!r} is set by exactflow (the flow, its device, the "
                    "default process group); leave it out"
                )
        device_ids = [device.index] if device.type == "cuda" else None
        try:
            model = nn.parallel.DistributedDataParallel(module, device_ids=device_ids, **settings)
        except TypeError as err:
            raise ValueError(
                f"ddp options {sorted(settings)}: {err} (they are keyword arguments of "
                "torch.nn.parallel.DistributedDataParallel, plus 'comm_hook')"
            ) from None
        if hook is not None:
            if not (isinstance(hook, tuple) and len(hook) == 2 and callable(hook[1])):
                raise ValueError(
                    "ddp option 'comm_hook' must be a pair (state, hook), e.g. (None, "
                    "torch.distributed.algorithms.ddp_comm_hooks.default_hooks.allreduce_hook)"
                )
            model.register_comm_hook(hook[0], hook[1])
        self.model = model
        self.scale = float(dist.get_world_size())
        self.comm = comm

    def micro(self, last: bool) -> AbstractContextManager[Any]:
        assert isinstance(self.model, nn.parallel.DistributedDataParallel)
        return nullcontext() if last else self.model.no_sync()

    def finish(self, totals: Tensor) -> Tensor:
        return _all_reduce(totals, self.comm)


class AllReduceEngine(Engine):
    """The gradients of all parameters and the loss in one all-reduce after the backward.

    Each rank's gradients already carry its share's weight, so the sum is the gradient of
    the global batch mean. A parameter without a gradient keeps none (as in one process);
    which ones those are must not differ between ranks, which the first step checks.
    """

    def __init__(
        self, module: nn.Module, params: Sequence[Tensor], comm: torch.device
    ) -> None:
        super().__init__(module)
        self.params = list(params)
        self.comm = comm
        self._pattern: list[bool] | None = None

    def finish(self, totals: Tensor) -> Tensor:
        grads = [p.grad for p in self.params]
        pattern = [g is not None for g in grads]
        if self._pattern is None:
            everyone: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(everyone, pattern)
            if any(other != pattern for other in everyone):
                raise RuntimeError(
                    "distributed fit: the ranks' backward passes reached different parameters"
                )
            self._pattern = pattern
        by_dtype: dict[torch.dtype, list[Tensor]] = {}
        for g in grads:
            if g is not None:
                by_dtype.setdefault(g.dtype, []).append(g)
        by_dtype.setdefault(totals.dtype, [])
        for dtype, group in by_dtype.items():
            parts = [g.reshape(-1) for g in group]
            carries = dtype == totals.dtype
            if carries:
                parts.append(totals.reshape(-1))
            flat = _all_reduce(torch.cat(parts), self.comm)
            offset = 0
            for g in group:
                g.copy_(flat[offset : offset + g.numel()].view_as(g))
                offset += g.numel()
            if carries:
                totals = flat[offset:].view_as(totals)
        return totals
