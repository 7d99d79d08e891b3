"""Data-parallel maximum likelihood on ``torch.distributed`` (gloo on CPUs, NCCL on GPUs).

Every process (rank) holds a full copy of the flow and the full data set; each optimizer step
of :func:`exactflow.fit` draws one *global* batch of ``batch_size`` rows from the same seeded
shuffle on every rank, and rank ``r`` of ``W`` scores the rows ``r, r + W, r + 2W, ...`` of it
(strided shares of the sorted batch: disjoint, together the whole batch, sizes within one).
Rank ``r`` with ``b_r`` rows back-propagates its mean NLL and contributes its gradient weighted
by ``b_r / batch_size``; one all-reduce (sum) then gives every rank the gradient of the global
batch mean ``-(1/B) sum_i log p(x_i)``, exactly what one process would compute on the whole
batch, up to rounding. The same all-reduce carries the loss, so the logged NLL, the
finiteness checks, gradient clipping, the rollbacks and the optimizer update are identical on
every rank, and the weights stay identical without ever being broadcast again.

Why not ``DistributedDataParallel``: the loss is ``flow.log_prob`` (a plain method, not a DDP
forward), shares of a batch may differ by a row (DDP averages with equal weights), the loss
and the decisions derived from it should ride in the same collective, and the flows here are
small enough that overlapping communication with the backward pass gains little. The cost is
one all-reduce of ``P + 1`` numbers per step (``P`` parameters), after the backward pass.

Rules (:func:`exactflow.fit` applies them; ``distributed=None`` turns them on whenever a
process group with more than one rank is initialized):

* every rank calls ``fit`` with the same arguments and the same full data (a ``np.memmap``
  costs no memory: a rank reads only its rows); this is checked at the start;
* parameters and buffers are broadcast from rank 0 at the start, so ranks may build their
  flows with different seeds;
* ``ActNorm`` layers that are not yet initialized are initialized on the whole first global
  batch on every rank (the same values as one process);
* batch norm uses each rank's own batch statistics in training (no synchronized batch norm:
  with shares of ``b_r`` rows it normalizes by the share's statistics); its running averages
  are averaged across ranks before every validation, every checkpoint and at the end, so
  every rank's eval-mode model is identical. The average of the ranks' running variances
  misses the variance between the shares' means, a small term for random shares;
* validation data are split into contiguous shares, evaluated on each rank and combined
  (counts, means and sums of squares, pairwise), so the validation NLL and every early-stopping
  decision are identical on all ranks; a ``callback`` runs on every rank and training stops
  when it returns ``True`` on any rank;
* only rank 0 writes checkpoints and shows the progress bar; ``resume`` reads the checkpoint
  on every rank, so it must lie on a file system all ranks see (the case on one machine).
  The data order depends on the global batch only, so a checkpoint may be resumed with a
  different number of processes.

Launch with ``torchrun --nproc-per-node W script.py`` (the script calls
:func:`exactflow.distributed.init` first) or from Python with
:func:`exactflow.distributed.launch`. See ``docs/distributed.md``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..distributed import initialized, world_size
from ..io import CheckpointError
from ..transforms.normalization import ActNorm, BatchNorm
from .metrics import NLLSummary, summarize

__all__ = ["Replicas"]


def _is_batch_norm(module: nn.Module) -> bool:
    return isinstance(module, (BatchNorm, nn.modules.batchnorm._NormBase))


def _check_agreement(size: int, signature: dict[str, Any]) -> None:
    """Raise the same ValueError on every rank if the ranks' run signatures differ."""
    everyone: list[Any] = [None] * size
    dist.all_gather_object(everyone, signature)
    differ = sorted(
        {key for other in everyone for key in set(other) | set(signature)
         if other.get(key) != signature.get(key)}
    )
    if differ:
        shown = "; ".join(
            f"{key}: " + ", ".join(f"rank {r} {other.get(key)!r}" for r, other in
                                   enumerate(everyone))
            for key in differ if key != "parameters"
        )
        if "parameters" in differ:
            shown = "the flows' parameter names or shapes" + (f"; {shown}" if shown else "")
        raise ValueError(
            "distributed fit: every rank must call fit with the same flow architecture, "
            f"data size and arguments; they differ in {shown[:1500]}"
        )


class Replicas:
    """The ranks that train one flow together; a world of one is plain local training.

    :func:`exactflow.fit` calls these methods at fixed points of its loop; each is a no-op
    (no collective, no copy) in a world of one. Every method that communicates is called by
    all ranks at the same point of the loop, which the identical decisions guarantee.
    """

    def __init__(
        self,
        size: int = 1,
        index: int = 0,
        batch_size: int = 1,
        device: torch.device | None = None,
        comm_device: torch.device | None = None,
    ) -> None:
        self.world_size, self.rank, self.batch_size = size, index, batch_size
        self.device = device or torch.device("cpu")
        self.comm_device = comm_device or torch.device("cpu")
        self.active = size > 1
        self.is_main = index == 0
        self._synced_at = -1
        self._grad_pattern: list[bool] | None = None
        self._val_share: tuple[int, Any] | None = None

    # -- setup ---------------------------------------------------------------------------
    @classmethod
    def join(
        cls,
        distributed: bool | None,
        flow: nn.Module,
        device: torch.device,
        batch_size: int,
        run: dict[str, Any],
    ) -> Replicas:
        """The replicas of this run: checks the ranks agree and broadcasts rank 0's state."""
        if distributed is not None and not isinstance(distributed, bool):
            raise TypeError(f"distributed must be True, False or None, got {distributed!r}")
        if distributed is False or (distributed is None and world_size() == 1):
            return cls(batch_size=batch_size, device=device)
        if not initialized():
            raise RuntimeError(
                "distributed=True needs an initialized torch.distributed process group: start "
                "the script with torchrun and call exactflow.distributed.init() first, or run "
                "the training function through exactflow.distributed.launch"
            )
        size, index = dist.get_world_size(), dist.get_rank()
        backend = str(dist.get_backend())
        # First make sure every rank got the same arguments: the errors below are then raised
        # on all ranks alike, and no rank is left waiting in a collective.
        signature = dict(run)
        signature["parameters"] = [
            (name, tuple(t.shape), str(t.dtype)) for name, t in flow.state_dict().items()
        ]
        signature["device_type"] = device.type
        _check_agreement(size, signature)
        if device.type == "cpu":
            if backend == "nccl":
                raise ValueError(
                    "the NCCL backend needs CUDA tensors: train on device='cuda' (one GPU per "
                    "rank) or use the gloo backend for CPU training"
                )
            comm = torch.device("cpu")
        else:
            # gloo moves CPU tensors; NCCL and the other accelerator backends move device ones.
            comm = torch.device("cpu") if backend == "gloo" else device
        replicas = cls(size, index, batch_size, device, comm)
        if batch_size < size:
            raise ValueError(
                f"batch_size={batch_size} is the global batch, split across {size} ranks: "
                f"it must be at least {size}"
            )
        if batch_size // size < 2 and any(_is_batch_norm(m) for m in flow.modules()):
            raise ValueError(
                f"batch norm needs at least 2 rows per rank, but batch_size={batch_size} over "
                f"{size} ranks gives {batch_size // size}: raise batch_size"
            )
        replicas._broadcast_state(flow)
        return replicas

    def _broadcast_state(self, flow: nn.Module) -> None:
        state = flow.state_dict()
        synced = {}
        for name, tensor in state.items():
            buffer = tensor.detach().to(self.comm_device, copy=True)
            if buffer.dtype == torch.bool:
                flags = buffer.to(torch.uint8)
                dist.broadcast(flags, src=0)
                buffer = flags.to(torch.bool)
            else:
                dist.broadcast(buffer, src=0)
            synced[name] = buffer
        # load_state_dict (not in-place copies) so that layers mirroring a buffer in Python,
        # such as ActNorm's "initialized" flag, see the new value.
        flow.load_state_dict(synced)

    # -- collectives ---------------------------------------------------------------------
    def _all_reduce(self, tensor: Tensor, op: Any = None) -> Tensor:
        """All-reduce ``tensor`` (sum by default) through the backend's device; same device."""
        buffer = tensor.to(self.comm_device)
        dist.all_reduce(buffer, op=dist.ReduceOp.SUM if op is None else op)
        return buffer.to(tensor.device)

    def _all_gather(self, tensor: Tensor) -> list[Tensor]:
        buffer = tensor.to(self.comm_device)
        out = [torch.empty_like(buffer) for _ in range(self.world_size)]
        dist.all_gather(out, buffer)
        return [t.cpu() for t in out]

    # -- hooks in the training loop --------------------------------------------------------
    def shard(self, index: Tensor) -> Tensor:
        """This rank's rows of a global batch: positions ``rank, rank + W, ...`` of ``index``."""
        if not self.active:
            return index
        return index[self.rank :: self.world_size].contiguous()

    def average_gradients(self, loss: Tensor, params: Sequence[Tensor], rows: int) -> Tensor:
        """Turn the local mean NLL's gradients into the global batch's; returns its loss.

        Each rank weights its gradient and loss by ``rows / batch_size`` and one all-reduce
        sums them. A parameter without a gradient keeps none (as in one process); which ones
        those are must not differ between ranks, which the first call checks.
        """
        if not self.active:
            return loss
        grads = [p.grad for p in params]
        pattern = [g is not None for g in grads]
        if self._grad_pattern is None:
            everyone: list[Any] = [None] * self.world_size
            dist.all_gather_object(everyone, pattern)
            if any(other != pattern for other in everyone):
                raise RuntimeError(
                    "distributed fit: the ranks' backward passes reached different parameters"
                )
            self._grad_pattern = pattern
        weight = rows / self.batch_size
        by_dtype: dict[torch.dtype, list[Tensor]] = {}
        for g in grads:
            if g is not None:
                by_dtype.setdefault(g.dtype, []).append(g)
        total = loss.detach().reshape(1)
        by_dtype.setdefault(total.dtype, [])
        for dtype, group in by_dtype.items():
            parts = [g.reshape(-1) for g in group]
            carries_loss = dtype == total.dtype
            if carries_loss:
                parts.append(total)
            flat = self._all_reduce(torch.cat(parts).mul_(weight))
            offset = 0
            for g in group:
                g.copy_(flat[offset : offset + g.numel()].view_as(g))
                offset += g.numel()
            if carries_loss:
                total = flat[-1:]
        return total.reshape(()).to(loss.dtype)

    def sync_statistics(self, flow: nn.Module, step: int) -> None:
        """Average batch-norm running statistics across ranks (once per ``step``)."""
        if not self.active or step == self._synced_at:
            return
        self._synced_at = step
        buffers = [
            b for m in flow.modules() if _is_batch_norm(m)
            for b in m.buffers(recurse=False) if b.is_floating_point()
        ]
        by_dtype: dict[torch.dtype, list[Tensor]] = {}
        for b in buffers:
            by_dtype.setdefault(b.dtype, []).append(b)
        with torch.no_grad():
            for group in by_dtype.values():
                flat = self._all_reduce(torch.cat([b.reshape(-1) for b in group]))
                flat /= self.world_size
                offset = 0
                for b in group:
                    b.copy_(flat[offset : offset + b.numel()].view_as(b))
                    offset += b.numel()

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` is true on any rank (the same answer on every rank)."""
        if not self.active:
            return bool(flag)
        return bool(self._all_reduce(torch.tensor([float(bool(flag))]), dist.ReduceOp.MAX))

    def exists(self, path: Path) -> bool:
        """Whether ``path`` exists, agreed by all ranks (a resume reads it on every rank)."""
        here = path.exists()
        if not self.active:
            return here
        seen = [bool(t) for t in self._all_gather(torch.tensor([float(here)]))]
        if all(seen) or not any(seen):
            return here
        ranks = [r for r, s in enumerate(seen) if s]
        raise CheckpointError(
            f"the checkpoint {str(path)!r} exists on rank(s) {ranks} only: resuming reads it "
            "on every rank, so it must lie on a file system that all ranks share"
        )

    @torch.no_grad()
    def initialize(
        self, flow: nn.Module, order: Any, rows: Any, ctx: Any, device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        """Initialize pending ActNorm layers on the whole next global batch, on every rank.

        One process initializes them on its first training batch; each rank only sees its
        share of it, so here every rank runs the whole batch once (no gradients) and keeps
        the ActNorm values only (other buffers, e.g. batch-norm statistics, are restored).
        """
        if not self.active:
            return
        pending = [m for m in flow.modules() if isinstance(m, ActNorm) and not bool(m.initialized)]
        if not pending:
            return
        index = order.peek()
        x = rows.take(index).to(device, dtype)
        c = ctx.take(index).to(device, dtype) if ctx is not None else None
        keep = {
            f"{name}.{key}" if name else key
            for name, m in flow.named_modules() if any(m is p for p in pending)
            for key in m.state_dict()
        }
        saved = {k: v.clone() for k, v in flow.state_dict().items() if k not in keep}
        training = flow.training
        flow.train()
        flow(x, c)  # the flow's forward is its log_prob
        flow.train(training)
        state = flow.state_dict()
        for key, value in saved.items():
            state[key].copy_(value)

    def evaluate(self, flow: Any, rows: Any, ctx: Any, batch_size: int) -> dict[str, float]:
        """:func:`exactflow.evaluate` of the validation data, split across ranks and combined.

        Rank ``r`` scores the contiguous rows ``[r n / W, (r + 1) n / W)``; the ranks'
        counts, means and sums of squared deviations are gathered and combined pairwise in
        rank order, so every rank gets the same numbers.
        """
        if not self.active:
            return summarize(flow, rows, ctx, batch_size=batch_size).metrics(
                len(rows), flow.features)
        n = len(rows)
        key = id(rows)
        if self._val_share is None or self._val_share[0] != key:
            lo, hi = n * self.rank // self.world_size, n * (self.rank + 1) // self.world_size
            share = None
            if hi > lo:
                share = (rows.share(lo, hi), None if ctx is None else ctx.share(lo, hi))
            self._val_share = (key, share)
        share = self._val_share[1]
        summary = NLLSummary()
        if share is not None:
            summary = summarize(flow, share[0], share[1], batch_size=batch_size)
        gathered = self._all_gather(torch.tensor(summary.to_list(), dtype=torch.float64))
        total = NLLSummary()
        for part in gathered:  # pairwise merges in rank order: the same numbers on every rank
            total.merge(NLLSummary.from_list(part.tolist()))
        return total.metrics(n, flow.features)
