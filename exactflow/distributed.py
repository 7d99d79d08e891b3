"""Data-parallel maximum-likelihood training on ``torch.distributed`` (gloo on CPUs, NCCL on GPUs).

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

Launch with ``torchrun --nproc-per-node W script.py`` (the script calls :func:`init` first) or
from Python with :func:`launch`. See ``docs/distributed.md``.
"""

from __future__ import annotations

import math
import os
import pickle
import shutil
import socket
import tempfile
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from .datasets import Subset
from .io import CheckpointError
from .transforms.normalization import ActNorm, BatchNorm

__all__ = ["launch", "init", "rank", "world_size"]

_RESULT = "result-{}.pkl"


# -- process groups ----------------------------------------------------------------------


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank in the default process group (0 without one)."""
    return dist.get_rank() if _initialized() else 0


def world_size() -> int:
    """The number of processes in the default process group (1 without one)."""
    return dist.get_world_size() if _initialized() else 1


def init(backend: str | None = None, *, timeout: float = 1800.0) -> tuple[int, int]:
    """Join the process group that ``torchrun`` describes in the environment.

    Reads ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT`` (and ``LOCAL_RANK``)
    and calls ``torch.distributed.init_process_group`` with ``init_method="env://"``. With
    NCCL the process first selects GPU ``LOCAL_RANK``, so ``fit(device="auto")`` trains
    each rank on its own GPU. Does nothing when a group is already initialized or when the
    environment names no group (a plain ``python script.py``), so a script runs both ways.

    Args:
        backend: ``"nccl"`` or ``"gloo"``; default NCCL when CUDA is available, else gloo.
        timeout: seconds a collective may wait for the other ranks before failing.

    Returns:
        ``(rank, world_size)``.

    Example:
        >>> import exactflow as ef
        >>> ef.distributed.init()      # not under torchrun: nothing to join
        (0, 1)
    """
    if _initialized():
        return rank(), world_size()
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        return 0, 1
    if not dist.is_available():
        raise RuntimeError("this torch build has no torch.distributed support")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    device_id = None
    if backend == "nccl":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device_id = torch.device("cuda", local)
    dist.init_process_group(
        backend, init_method="env://", timeout=timedelta(seconds=timeout), device_id=device_id
    )
    return rank(), world_size()


def _loopback_interface() -> str | None:
    try:
        names = [name for _, name in socket.if_nameindex()]
    except (AttributeError, OSError):
        return None
    for name in ("lo", "lo0"):
        if name in names:
            return name
    return None


def _worker(
    index: int,
    fn: Callable[..., Any],
    size: int,
    backend: str,
    timeout: float,
    threads: int,
    workdir: str,
    args: tuple[Any, ...],
) -> None:
    # Keep every socket on the loopback interface (gloo's pairs, NCCL's bootstrap) unless the
    # user chose an interface; the rendezvous is a file, so no port is opened for it.
    loop = _loopback_interface()
    if loop is not None:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", loop)
        os.environ.setdefault("NCCL_SOCKET_IFNAME", loop)
    os.environ.update(
        RANK=str(index), WORLD_SIZE=str(size), LOCAL_RANK=str(index), LOCAL_WORLD_SIZE=str(size)
    )
    torch.set_num_threads(threads)
    device_id = None
    if backend == "nccl":
        torch.cuda.set_device(index)
        device_id = torch.device("cuda", index)
    store = dist.FileStore(os.path.join(workdir, "store"), size)
    dist.init_process_group(
        backend, store=store, rank=index, world_size=size,
        timeout=timedelta(seconds=timeout), device_id=device_id,
    )
    try:
        result = fn(index, *args)
    finally:
        dist.destroy_process_group()
    path = Path(workdir) / _RESULT.format(index)
    with open(path.with_suffix(".tmp"), "wb") as fh:
        pickle.dump(result, fh)
    os.replace(path.with_suffix(".tmp"), path)


def launch(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    backend: str = "gloo",
    threads: int | None = None,
    timeout: float = 1800.0,
) -> list[Any]:
    """Run ``fn(rank, *args)`` in ``world_size`` new processes joined in one process group.

    The processes are started with ``torch.multiprocessing.spawn`` on this machine. They meet
    through a file in a private temporary folder (no port is opened for the rendezvous) and
    the collectives use the loopback interface (``GLOO_SOCKET_IFNAME`` / ``NCCL_SOCKET_IFNAME``
    are set to it unless already set), so nothing listens beyond 127.0.0.1. Each process sets
    ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` as ``torchrun`` would; with NCCL rank ``r`` uses
    GPU ``r``. Inside ``fn``, :func:`exactflow.fit` trains data-parallel on its own.

    ``fn`` must be importable by the new processes (defined at the top level of a module, not
    in an interactive session), and its arguments and return value picklable. If a process
    raises, the others are stopped and the error is raised here with the remote traceback.

    Args:
        fn: called as ``fn(rank, *args)`` in each process.
        world_size: the number of processes.
        *args: further arguments of ``fn``.
        backend: ``"gloo"`` (CPU) or ``"nccl"`` (one GPU per process).
        threads: torch threads per process; default ``max(1, cpu_count // world_size)``
            (as ``torchrun`` limits threads, so that the processes do not oversubscribe the
            cores).
        timeout: seconds a collective may wait for the other ranks before failing.

    Returns:
        The return values of ``fn``, by rank.

    Raises:
        ValueError: bad ``world_size`` or ``backend``, or too few GPUs for NCCL.
        RuntimeError: torch.distributed or the backend is unavailable.
        torch.multiprocessing.ProcessRaisedException: a process raised.
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive integer, got {world_size!r}")
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
    if not dist.is_available():
        raise RuntimeError("this torch build has no torch.distributed support")
    if backend == "gloo" and not dist.is_gloo_available():
        raise RuntimeError("this torch build has no gloo backend")
    if backend == "nccl":
        if not dist.is_nccl_available():
            raise RuntimeError("this torch build has no NCCL backend")
        if torch.cuda.device_count() < world_size:
            raise ValueError(
                f"backend='nccl' needs one GPU per process: {world_size} processes, "
                f"{torch.cuda.device_count()} GPU(s)"
            )
    if threads is None:
        threads = max(1, (os.cpu_count() or 1) // world_size)
    workdir = tempfile.mkdtemp(prefix="exactflow-launch-")
    try:
        torch.multiprocessing.spawn(
            _worker,
            args=(fn, world_size, backend, float(timeout), int(threads), workdir, tuple(args)),
            nprocs=world_size,
            join=True,
        )
        results = []
        for index in range(world_size):
            with open(Path(workdir) / _RESULT.format(index), "rb") as fh:
                results.append(pickle.load(fh))  # written by our own processes just now
        return results
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


# -- the training side -----------------------------------------------------------------------


def _is_batch_norm(module: nn.Module) -> bool:
    return isinstance(module, (BatchNorm, nn.modules.batchnorm._NormBase))


def _share(data: Any, lo: int, hi: int) -> Any:
    """Rows ``lo:hi`` of a tensor, array, memmap or Subset, without reading them."""
    if isinstance(data, Subset):
        return Subset(data, rows=np.arange(lo, hi))
    return data[lo:hi]


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


class _Replicas:
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
    ):
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
    ) -> _Replicas:
        """The replicas of this run: checks the ranks agree and broadcasts rank 0's state."""
        if distributed is not None and not isinstance(distributed, bool):
            raise TypeError(f"distributed must be True, False or None, got {distributed!r}")
        if distributed is False or (distributed is None and world_size() == 1):
            return cls(batch_size=batch_size, device=device)
        if not _initialized():
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
        peek = type(order)(order.n, order.batch_size, order.seed)
        peek.load_state_dict(order.state_dict())
        index = peek.next()
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
        flow.log_prob(x, c)
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
        from .train import _Rows, evaluate

        if not self.active:
            return evaluate(flow, rows, ctx, batch_size=batch_size, device=None)
        n = len(rows)
        key = id(rows)
        if self._val_share is None or self._val_share[0] != key:
            lo, hi = n * self.rank // self.world_size, n * (self.rank + 1) // self.world_size
            share = None
            if hi > lo:
                share = (
                    _Rows(_share(rows.data, lo, hi), rows.name, flow.features),
                    None if ctx is None else _Rows(_share(ctx.data, lo, hi), ctx.name,
                                                   ctx.data.shape[1]),
                )
            self._val_share = (key, share)
        share = self._val_share[1]
        stats = [0.0, 0.0, 0.0, 0.0, 0.0, 0.0]  # count, mean, m2, nonfinite, nan, -inf
        if share is not None:
            m = evaluate(flow, share[0], share[1], batch_size=batch_size, device=None)
            count = m["n"] - m["n_nonfinite"]
            if count:
                m2 = m["nll_se"] ** 2 * count * (count - 1) if count > 1 else 0.0
                stats[:3] = [float(count), m["nll_finite"], m2]
            stats[3] = float(m["n_nonfinite"])
            stats[4] = float(math.isnan(m["nll"]))
            stats[5] = float(m["nll"] == -math.inf)
        gathered = self._all_gather(torch.tensor(stats, dtype=torch.float64))
        return _combine([t.tolist() for t in gathered], n, flow.features)


def _combine(parts: list[list[float]], n: int, features: int) -> dict[str, float]:
    """Merge per-rank (count, mean, m2, nonfinite, nan, -inf) as :func:`evaluate` reports."""
    count, mean, m2 = 0.0, 0.0, 0.0
    nonfinite, has_nan, has_neg_inf = 0, False, False
    for k, k_mean, k_m2, bad, nan, neg_inf in parts:
        nonfinite += int(bad)
        has_nan |= bool(nan)
        has_neg_inf |= bool(neg_inf)
        if k:
            # Chan et al.'s pairwise update, as in evaluate.
            delta = k_mean - mean
            total = count + k
            mean += delta * k / total
            m2 += k_m2 + delta * delta * count * k / total
            count = total
    nll_finite = mean if count else math.nan
    se_finite = math.sqrt(m2 / (count - 1) / count) if count > 1 else math.nan
    if nonfinite == 0:
        nll, se = nll_finite, se_finite
    elif has_nan:
        nll, se = math.nan, math.nan
    else:
        nll, se = (-math.inf if has_neg_inf else math.inf), math.nan
    scale = 1.0 / (features * math.log(2.0))
    return {
        "nll": nll,
        "nll_se": se,
        "bpd": nll * scale,
        "bpd_se": se * scale,
        "nll_finite": nll_finite,
        "n": n,
        "n_nonfinite": nonfinite,
    }
