"""Data-parallel training on ``torch.distributed`` (gloo on CPUs, NCCL with one GPU per rank).

Every process (rank) holds a full copy of the flow and sees the full data set (a memmap or
:class:`~exactflow.datasets.Shards`: a rank reads only its rows); each optimizer step of
:func:`exactflow.fit` draws one *global* batch of ``batch_size`` rows from the same seeded
shuffle on every rank, and rank ``r`` of ``W`` scores the rows ``r, r + W, r + 2W, ...`` of it
(strided shares of the sorted batch: disjoint, together the whole batch, sizes within one).
Rank ``r`` with ``b_r`` rows back-propagates its mean NLL weighted by ``b_r / batch_size``, and
the gradients are summed over the ranks, which gives every rank the gradient of the global
batch mean ``-(1/B) sum_i log p(x_i)``: what one process computes on the whole batch, up to
rounding. How they are summed is an :mod:`engine <exactflow.training.engines>`: by default
``torch.nn.parallel.DistributedDataParallel`` wraps the flow (its ``forward`` is its
``log_prob``), so gradients travel in buckets while the backward pass runs; DDP averages,
so each rank's weighted loss is also multiplied by ``W``. The step's loss is summed over
the ranks by one more all-reduce of two numbers, so the logged NLL, the finiteness checks,
gradient clipping, the rollbacks and the optimizer update are identical on every rank, and
the weights stay identical without ever being broadcast again.

A step may be split into ``accumulate`` micro-batches per rank (``fit(accumulate=k)``): each
is back-propagated on its own, under DDP's ``no_sync`` except the last, so the gradients
are communicated once per step; the result equals one backward on the whole share.

Rules (:func:`exactflow.fit` applies them; ``distributed=None`` turns them on whenever a
process group with more than one rank is initialized):

* every rank calls ``fit`` with the same arguments and the same full data; this is checked
  at the start, and a mismatch is the same ``ValueError`` on every rank;
* parameters and buffers are broadcast from rank 0 at the start, so ranks may build their
  flows with different seeds;
* ``ActNorm`` layers that are not yet initialized are initialized on the whole first global
  batch on every rank (the same values as one process);
* batch norm: with ``sync_batch_norm=True`` every exactflow ``BatchNorm`` layer normalizes by
  the statistics of the global batch (:mod:`~exactflow.training.syncbn`; exact, two small
  all-reduces per layer and pass). By default (``False``, as ``torch.nn.BatchNorm1d`` under
  DDP) each rank uses its own share's statistics in training, so a run with batch norm is
  not the one-process run; the running averages are then averaged across ranks before
  every validation, every checkpoint and at the end, so every rank's eval-mode model is
  identical (the average of the ranks' running variances misses the variance between the
  shares' means, a small term for random shares);
* validation data are split into contiguous shares, evaluated on each rank and combined
  (counts, means and sums of squares, pairwise), so the validation NLL and every early-stopping
  decision are identical on all ranks; a ``callback`` runs on every rank and training stops
  when it returns ``True`` on any rank;
* only rank 0 writes checkpoints and shows the progress bar; ``resume`` reads the checkpoint
  on every rank, so it must lie on a file system all ranks see (one machine, or a shared
  file system across machines). The data order depends on the global batch only, so a
  checkpoint may be resumed with a different number of processes.

Launch with ``torchrun --nproc-per-node W script.py`` (the script calls
:func:`exactflow.distributed.init` first; several machines: ``--nnodes`` and a c10d
rendezvous) or from Python with :func:`exactflow.distributed.launch`. See
``docs/distributed.md``.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..distributed import initialized, world_size
from ..io import CheckpointError
from ..scoring import module_dtype
from ..transforms.normalization import ActNorm, BatchNorm, batch_statistics_on_purpose
from ..validation import positive_int
from .engines import AllReduceEngine, DDPEngine, Engine
from .metrics import NLLSummary, summarize
from .precision import Precision
from .syncbn import synchronize_batch_norm

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


def _check_rows(batch_size: int, size: int, accumulate: int, batch_norm: bool,
                synced: bool) -> None:
    """Every micro-batch of every rank needs a row; unsynchronized batch norm needs two."""
    where = f" over {size} ranks" if size > 1 else ""
    if batch_size // size < accumulate:
        if size > 1 and accumulate == 1:
            raise ValueError(
                f"batch_size={batch_size} is the global batch, split across {size} ranks: "
                f"it must be at least {size}"
            )
        raise ValueError(
            f"batch_size={batch_size}{where} in accumulate={accumulate} micro-batches leaves "
            "a micro-batch without rows: raise batch_size or lower accumulate"
        )
    rows = batch_size // accumulate if synced else batch_size // size // accumulate
    if batch_norm and rows < 2:
        hint = "" if synced or size == 1 else " (or use sync_batch_norm=True)"
        per = "per rank and micro-batch" if size > 1 else "per micro-batch"
        raise ValueError(
            f"batch norm needs at least 2 rows {per}, but batch_size={batch_size}{where} "
            f"with accumulate={accumulate} gives {rows}: raise batch_size{hint}"
        )


def _check_devices(size: int, device: torch.device) -> None:
    """Each rank on its own GPU: two ranks of one machine on one GPU would deadlock NCCL."""
    mine = (socket.gethostname(), int(device.index or 0))
    everyone: list[Any] = [None] * size
    dist.all_gather_object(everyone, mine)
    shared = sorted({r for r, other in enumerate(everyone) if everyone.count(other) > 1})
    if shared:
        raise ValueError(
            f"ranks {shared} train on the same GPU ({device.type}:{mine[1]} of one machine): "
            "give each rank its own GPU (exactflow.distributed.init() selects cuda:LOCAL_RANK; "
            "torchrun --nproc-per-node at most the number of GPUs)"
        )


class Replicas:
    """The ranks that train one flow together; a world of one is plain local training.

    The training loops call these methods at fixed points; each is a no-op (no collective,
    no copy) in a world of one. Every method that communicates is called by all ranks at
    the same point of the loop, which the identical decisions guarantee. Besides the ranks,
    it holds how a step computes its gradients: the engine that combines them
    (:mod:`~exactflow.training.engines`), the numeric precision
    (:mod:`~exactflow.training.precision`) and the micro-batches of gradient accumulation.
    """

    def __init__(
        self,
        size: int = 1,
        index: int = 0,
        batch_size: int = 1,
        device: torch.device | None = None,
        comm_device: torch.device | None = None,
        *,
        ddp: bool | Mapping[str, Any] = True,
        sync_batch_norm: bool = False,
        precision: str = "fp32",
        accumulate: int = 1,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.world_size, self.rank, self.batch_size = size, index, batch_size
        self.device = device or torch.device("cpu")
        self.comm_device = comm_device or torch.device("cpu")
        self.active = size > 1
        self.is_main = index == 0
        self.ddp = ddp
        self.sync_batch_norm = bool(sync_batch_norm) and self.active
        self.precision = Precision(precision, self.device, dtype)
        self.accumulate = accumulate
        self.engine: Engine = Engine(nn.Module())
        self._synced_at = -1
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
        *,
        ddp: bool | Mapping[str, Any] = True,
        sync_batch_norm: bool = False,
        precision: str = "fp32",
        accumulate: int = 1,
        batch_norm: bool = True,
    ) -> Replicas:
        """The replicas of this run: checks the options and that the ranks agree, and
        broadcasts rank 0's state.

        Args:
            distributed: ``None`` (data-parallel when a group of more than one rank is
                initialized), ``True`` (insist on one) or ``False`` (train alone).
            flow: the flow being trained (its state is broadcast).
            device: where this rank trains.
            batch_size: the global batch (rows or samples per step, over all ranks).
            run: the arguments every rank must agree on.
            ddp, sync_batch_norm, precision, accumulate: see :func:`exactflow.fit`.
            batch_norm: whether a training forward runs the flow's batch-norm layers in
                training mode (maximum likelihood: yes; reverse KL samples: no), for the
                rows-per-rank checks.
        """
        if distributed is not None and not isinstance(distributed, bool):
            raise TypeError(f"distributed must be True, False or None, got {distributed!r}")
        if not isinstance(ddp, (bool, Mapping)):
            raise TypeError(
                f"ddp must be True, False or a dict of DistributedDataParallel options, got "
                f"{ddp!r}"
            )
        if not isinstance(sync_batch_norm, bool):
            raise TypeError(f"sync_batch_norm must be True or False, got {sync_batch_norm!r}")
        accumulate = positive_int(accumulate, "accumulate")
        dtype = module_dtype(flow)
        has_bn = batch_norm and any(_is_batch_norm(m) for m in flow.modules())
        options: dict[str, Any] = {
            "ddp": ddp, "sync_batch_norm": sync_batch_norm, "precision": precision,
            "accumulate": accumulate, "dtype": dtype,
        }
        if distributed is False or (distributed is None and world_size() == 1):
            _check_rows(batch_size, 1, accumulate, has_bn, False)
            return cls(batch_size=batch_size, device=device, **options)
        if not initialized():
            raise RuntimeError(
                "distributed=True needs an initialized torch.distributed process group: start "
                "the script with torchrun and call exactflow.distributed.init() first, or run "
                "the training function through exactflow.distributed.launch"
            )
        size, index = dist.get_world_size(), dist.get_rank()
        backend = str(dist.get_backend())
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        # First make sure every rank got the same arguments: the errors below are then raised
        # on all ranks alike, and no rank is left waiting in a collective.
        signature = dict(run)
        signature["parameters"] = [
            (name, tuple(t.shape), str(t.dtype)) for name, t in flow.state_dict().items()
        ]
        signature["device_type"] = device.type
        signature.update(
            ddp=ddp if isinstance(ddp, bool) else sorted(ddp),
            sync_batch_norm=sync_batch_norm, precision=precision, accumulate=accumulate,
        )
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
            _check_devices(size, device)
        _check_rows(batch_size, size, accumulate, has_bn, sync_batch_norm)
        replicas = cls(size, index, batch_size, device, comm, **options)
        replicas._broadcast_state(flow)
        return replicas

    @contextmanager
    def attach(self, flow: nn.Module, module: nn.Module | None = None) -> Iterator[Replicas]:
        """Set up the training forward for the block, and undo it after (also on errors).

        Synchronizes batch norm (``sync_batch_norm``), casts the outputs of the flow's
        layers to float32 (``precision="bf16"``), and builds the engine around ``module``
        (default the flow): DDP, the flat all-reduce, or nothing in a world of one. Inside,
        :attr:`model` is what a training forward calls.
        """
        with ExitStack() as stack:
            if self.sync_batch_norm:
                stack.enter_context(synchronize_batch_norm(flow))
            self.precision.attach(flow)
            stack.callback(self.precision.detach)
            target = flow if module is None else module
            if not self.active:
                self.engine = Engine(target)
            elif self.ddp is False:
                params = [p for p in target.parameters() if p.requires_grad]
                self.engine = AllReduceEngine(target, params, self.comm_device)
            else:
                options = self.ddp if isinstance(self.ddp, Mapping) else None
                self.engine = DDPEngine(target, self.device, self.comm_device, options)
            stack.callback(self.engine.close)
            yield self

    @property
    def model(self) -> nn.Module:
        """The module a training forward calls (the DDP wrapper of the flow, or the flow)."""
        return self.engine.model

    def backward(
        self, compute: Callable[[int, int], tuple[Tensor, Tensor]], rows: int
    ) -> tuple[Tensor, Tensor]:
        """One step's gradients of this rank's ``rows`` rows; returns the global batch's
        loss and logged value.

        ``compute(lo, hi)`` runs the training forward on rows ``lo:hi`` of this rank's share
        (through :attr:`model`) and returns their mean loss and the mean value to log. The
        share is cut into ``accumulate`` contiguous micro-batches; each loss is weighted by
        its rows over the global batch size (times the world size under DDP, which
        averages), back-propagated (under DDP's ``no_sync`` but the last), and the weighted
        values are summed over micro-batches and ranks.
        """
        parts = self.accumulate
        bounds = [rows * j // parts for j in range(parts + 1)]
        totals: Tensor | None = None
        for j in range(parts):
            lo, hi = bounds[j], bounds[j + 1]
            weight = (hi - lo) / self.batch_size
            with self.engine.micro(last=j == parts - 1):
                with self.precision.autocast():
                    loss, logged = compute(lo, hi)
                (loss * (weight * self.engine.scale)).backward()
            part = torch.stack([loss.detach(), logged.detach().to(loss.dtype)]) * weight
            totals = part if totals is None else totals + part
        assert totals is not None
        totals = self.engine.finish(totals)
        return totals[0], totals[1]

    def share_rows(self) -> int:
        """The rows of this rank's share of a global batch (``batch_size`` in a world of one)."""
        return len(range(self.rank, self.batch_size, self.world_size))

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

    def gather(self, values: Tensor) -> Tensor:
        """The 1-D ``values`` of all ranks, concatenated in rank order (the same on every
        rank; lengths may differ). In a world of one, ``values`` itself."""
        if not self.active:
            return values
        lengths = [int(t) for t in self._all_gather(torch.tensor([values.numel()]))]
        padded = values.new_zeros(max(lengths))
        padded[: values.numel()] = values.reshape(-1)
        parts = self._all_gather(padded)
        return torch.cat([p[:k] for p, k in zip(parts, lengths, strict=True)]).to(values.device)

    # -- hooks in the training loop --------------------------------------------------------
    def shard(self, index: Tensor) -> Tensor:
        """This rank's rows of a global batch: positions ``rank, rank + W, ...`` of ``index``."""
        if not self.active:
            return index
        return index[self.rank :: self.world_size].contiguous()

    def sync_statistics(self, flow: nn.Module, step: int) -> None:
        """Average batch-norm running statistics across ranks (once per ``step``)."""
        if not self.active or step == self._synced_at:
            return
        self._synced_at = step
        # Synchronized layers already hold the same (global) statistics on every rank.
        buffers = [
            b for m in flow.modules()
            if _is_batch_norm(m) and not (self.sync_batch_norm and type(m) is BatchNorm)
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
        dtype: torch.dtype, noisy: bool = False,
    ) -> None:
        """Initialize pending ActNorm layers on the whole next global batch, on every rank.

        One process initializes them on its first training batch; each rank (or each
        micro-batch) only sees a share of it, so here every rank runs the whole batch once
        (no gradients) and keeps the ActNorm values only (other buffers, e.g. batch-norm
        statistics, are restored). With input noise (``noisy``) one process does so too, so
        that ActNorm starts from the clean rows, as the ranks' does.
        """
        if not self.active and self.accumulate == 1 and not noisy:
            return
        pending = [m for m in flow.modules() if isinstance(m, ActNorm) and not bool(m.initialized)]
        if not pending:
            return
        index = order.peek()
        x = rows.take(index).to(device, getattr(flow, "input_dtype", dtype))
        c = None if ctx is None else ctx.take(index).to(device,
                                                       getattr(flow, "context_dtype", dtype))
        keep = {
            f"{name}.{key}" if name else key
            for name, m in flow.named_modules() if any(m is p for p in pending)
            for key in m.state_dict()
        }
        saved = {k: v.clone() for k, v in flow.state_dict().items() if k not in keep}
        training = flow.training
        flow.train()
        with batch_statistics_on_purpose():  # (restored below)
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
