"""Process groups for multi-process training: join one (``torchrun``) or start one (:func:`launch`).

This module is the plumbing only: which rank this process is, how many there are, how to
join the group that ``torchrun`` describes in the environment, and how to start a group of
processes on this machine from Python. What the ranks do together during training lives in
:mod:`exactflow.training.parallel`; :func:`exactflow.fit` trains data-parallel on its own
whenever a group of more than one process is initialized. See ``docs/distributed.md``.
"""

from __future__ import annotations

import os
import pickle
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["launch", "init", "finish", "rank", "world_size", "initialized", "usable_cpus"]

_RESULT = "result-{}.pkl"
#: How long :func:`finish` leaves the GIL to gloo's worker threads after the last barrier.
_SETTLE_SECONDS = 0.1


# -- process groups ----------------------------------------------------------------------


def initialized() -> bool:
    """Whether a ``torch.distributed`` default process group is initialized."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank in the default process group (0 without one)."""
    return dist.get_rank() if initialized() else 0


def world_size() -> int:
    """The number of processes in the default process group (1 without one)."""
    return dist.get_world_size() if initialized() else 1


def init(backend: str | None = None, *, timeout: float = 1800.0) -> tuple[int, int]:
    """Join the process group that ``torchrun`` describes in the environment.

    Reads ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT`` (and ``LOCAL_RANK``)
    and calls ``torch.distributed.init_process_group`` with ``init_method="env://"``. With
    NCCL the process first selects GPU ``LOCAL_RANK``, so ``fit(device="auto")`` trains
    each rank on its own GPU. Does nothing when a group is already initialized or when the
    environment names no group (a plain ``python script.py``), so a script runs both ways.

    The same call serves one machine (``torchrun --standalone --nproc-per-node W``) and
    several (``torchrun --nnodes N --nproc-per-node W --rdzv-backend c10d
    --rdzv-endpoint HOST:PORT --rdzv-id JOB`` on every machine; ranks are numbered across
    machines). Where a machine has several network interfaces, choose the one the ranks
    reach each other by with ``GLOO_SOCKET_IFNAME`` or ``NCCL_SOCKET_IFNAME``.

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
    if initialized():
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


def finish() -> None:
    """Leave the process group at the end of a run: wait until every rank is here, then
    destroy the group (``torch.distributed.destroy_process_group``).

    Call it on every rank after the last collective, at the end of a script that called
    :func:`init`; ``exactflow train`` under ``torchrun`` does. A rank that exits right after
    its last collective can abort in interpreter shutdown ("terminate called without an
    active exception", a SIGABRT after the work is done): DDP keeps gloo's worker threads
    alive to the end, and one that releases the collective's tensors only then (it needs
    the GIL) is killed. Under ``torchrun --nnodes N`` the other machines' launchers then
    wait five minutes for it in their exit barrier. ``finish`` waits for every rank at a
    barrier, which holds no tensors, then leaves the threads 0.1 s to let go. Does nothing
    without a group. Only for the way out of a run that succeeded: a rank that failed must
    not wait for the others (``torchrun`` stops them).

    Example:
        >>> import exactflow as ef
        >>> ef.distributed.finish()    # not under torchrun: nothing to leave
    """
    if not initialized():
        return
    dist.barrier()
    dist.destroy_process_group()
    # gloo's worker threads release a finished collective's tensors after the caller has
    # seen it complete, and that release takes the GIL: a moment without it lets them do so
    # before the interpreter shuts down (a thread that asks for the GIL then is killed).
    time.sleep(_SETTLE_SECONDS)


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
        with threads_chosen():  # (launch's threads: training does not question them)
            result = fn(index, *args)
    except BaseException:
        if initialized():
            dist.destroy_process_group()
        raise
    try:
        finish()  # (fn may have left the group itself)
    except Exception:  # noqa: BLE001 - another rank failed: its error is the one to report
        if initialized():
            dist.destroy_process_group()
    path = Path(workdir) / _RESULT.format(index)
    with open(path.with_suffix(".tmp"), "wb") as fh:
        pickle.dump(result, fh)
    os.replace(path.with_suffix(".tmp"), path)


def _cgroup_cpus() -> float | None:
    """The CPU quota of this process's cgroup (v2 ``cpu.max`` or v1 cfs files), if any."""
    try:
        with open("/sys/fs/cgroup/cpu.max", encoding="ascii") as f:
            quota, period = f.read().split()[:2]
        if quota != "max":
            return int(quota) / int(period)
        return None
    except (OSError, ValueError):
        pass
    try:
        with open("/sys/fs/cgroup/cpu/cpu.cfs_quota_us", encoding="ascii") as f:
            quota_us = int(f.read())
        with open("/sys/fs/cgroup/cpu/cpu.cfs_period_us", encoding="ascii") as f:
            period_us = int(f.read())
    except (OSError, ValueError):
        return None
    return quota_us / period_us if quota_us > 0 and period_us > 0 else None


def usable_cpus() -> float:
    """The CPUs this process may use: its affinity mask (``taskset``, a scheduler's
    allocation), capped by its cgroup's CPU quota (a container's limit)."""
    try:
        cpus: float = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    quota = _cgroup_cpus()
    return cpus if quota is None else min(cpus, quota)


#: Environment variables that set the thread count (torch follows the last two).
THREAD_VARIABLES = ("EXACTFLOW_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
#: Whether torch's thread count in this process was chosen (by the command line, by
#: :func:`launch`'s ``threads``): training then does not question it.
_threads_chosen = False


@contextmanager
def threads_chosen() -> Iterator[None]:
    """Inside, torch's thread count counts as chosen: training does not warn about it."""
    global _threads_chosen
    before, _threads_chosen = _threads_chosen, True
    try:
        yield
    finally:
        _threads_chosen = before


def thread_count_chosen() -> bool:
    """Whether torch's thread count was chosen for this process (see :func:`threads_chosen`)."""
    return _threads_chosen


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
        threads: torch threads per process; default ``max(1, usable CPUs // world_size)``
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
        threads = max(1, int(usable_cpus()) // world_size)
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
