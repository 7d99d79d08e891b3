"""Synchronized batch norm: exactflow's ``BatchNorm`` layers normalized by global statistics.

In data-parallel training each rank holds a share of the global batch. A
:class:`~exactflow.transforms.BatchNorm` layer in training mode normalizes by the mean and
variance of the rows it sees, so by default each rank uses its share's statistics, which
is not what one process does on the whole batch. :func:`synchronize_batch_norm` makes
every such layer of a flow use the statistics of the **global** batch instead (the
semantics of ``torch.nn.SyncBatchNorm``): per layer and forward, one all-reduce of the
column sums and the row count, then one of the sums of squared deviations from the global
mean (two passes: no cancellation); gradients flow back through both all-reduces, so the
gradient is that of one process on the whole batch and the running averages are updated
with the global statistics, identical on every rank.

Cost: two all-reduces of ``d + 1`` and ``d`` numbers per batch-norm layer in the forward
pass and two in the backward pass, each a round trip between the ranks (tens of
microseconds on one machine with gloo; more across machines), so it is opt-in:
``fit(..., sync_batch_norm=True)``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..transforms.normalization import BatchNorm

__all__ = ["SyncedBatchNorm", "synchronize_batch_norm"]


class _SumOverRanks(torch.autograd.Function):
    """``all_reduce(SUM)`` with its gradient: each rank's input gets the sum over the ranks
    of the output's gradients (torch's ``torch.distributed.nn.functional.all_reduce`` is
    deprecated, with no public replacement)."""

    @staticmethod
    def forward(ctx: object, tensor: Tensor) -> Tensor:
        out = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    @staticmethod
    def backward(ctx: object, grad: Tensor) -> Tensor:
        return _SumOverRanks.forward(ctx, grad)


class SyncedBatchNorm(BatchNorm):
    """:class:`~exactflow.transforms.BatchNorm` whose training statistics are those of the
    global batch over the ranks of the default process group.

    The same parameters, buffers and formula as ``BatchNorm``; in training mode ``mean`` and
    ``var`` (biased, as in the normalization) are computed over the rows of all ranks, and
    the running variance gets the unbiased ``var * N / (N - 1)`` with ``N`` the global row
    count. Eval mode and ``inverse`` are unchanged. Layers become this class only inside
    :func:`synchronize_batch_norm`, which every rank must enter alike.
    """

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if not self.training:
            return super().forward(x, context)
        stats = torch.cat([x.sum(0), x.new_full((1,), float(x.shape[0]))])
        stats = _SumOverRanks.apply(stats)
        total = stats[-1].detach()
        mean = stats[:-1] / total
        var = _SumOverRanks.apply((x - mean).pow(2).sum(0)) / total
        with torch.no_grad():  # the caller guarantees N >= 2 (Replicas.join checks it)
            self.running_mean.lerp_(mean.detach(), self.momentum)
            self.running_var.lerp_(var.detach() * (total / (total - 1)), self.momentum)
        log_scale = self.log_gamma - 0.5 * torch.log(var + self.eps)
        z = (x - mean) * torch.exp(log_scale) + self.beta
        return z, log_scale.sum().expand(x.shape[0])


@contextmanager
def synchronize_batch_norm(flow: nn.Module) -> Iterator[int]:
    """Inside the block, every ``BatchNorm`` layer of ``flow`` uses global batch statistics.

    The layers are the same objects throughout (their class is :class:`SyncedBatchNorm`
    during the block and ``BatchNorm`` again after it, also when the block raises), so
    parameters, buffers, hooks, ``state_dict`` keys and references to them are unchanged.
    Subclasses of ``BatchNorm`` and ``torch.nn`` batch-norm modules are left alone.

    Yields:
        The number of layers synchronized.
    """
    layers = [m for m in flow.modules() if type(m) is BatchNorm]
    for layer in layers:
        layer.__class__ = SyncedBatchNorm
    try:
        yield len(layers)
    finally:
        for layer in layers:
            layer.__class__ = BatchNorm
