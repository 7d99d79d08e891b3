"""How many CPU threads a command gives torch: never oversubscribe a busy machine.

torch starts with one intra-op thread per core. exactflow's models are small (MLP
conditioners of 64-512 units on tables of a few to a few hundred columns): each matrix
product is too small to split profitably, and when the machine's cores are busy with other
work, every extra thread waits for a core at each parallel region. On a busy 2-core machine
torch's default made ``exactflow train`` 3.6 times slower than one thread
(``benchmarks/threads.py`` measures it; the figures are in ``docs/reliability.md``).

The rule, in order (the first that applies wins):

1. ``--threads N``;
2. ``EXACTFLOW_THREADS=N`` in the environment;
3. ``OMP_NUM_THREADS`` or ``MKL_NUM_THREADS`` set to a positive integer: torch already
   follows it, and so does exactflow (nothing is changed; torch ignores another value and
   takes every core, so exactflow does too, and goes on to 4);
4. otherwise one thread, except for training a large model (batch x widest hidden layer^2
   of at least :data:`LARGE_WORK`) on a machine with idle cores: then up to
   :data:`MAX_AUTO_THREADS` threads, as many as the cores that are idle now (the CPUs this
   process may use, capped by a cgroup CPU quota, less the 1-minute load average), and only
   if a short timing of a matrix product of the model's size shows they are faster.

One thread is never much slower than several for these models, and never pathological.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from collections.abc import Mapping

import torch

from ..distributed import THREAD_VARIABLES, usable_cpus

__all__ = ["choose_threads", "idle_cores", "ThreadsError", "LARGE_WORK", "MAX_AUTO_THREADS"]

#: ``batch_size * hidden**2`` from which training may use more than one thread: about one
#: 512-wide layer on a batch of 512 (134 MFLOP per product).
LARGE_WORK = 512 * 512 * 512
#: The most threads the automatic choice gives (small products scale no further).
MAX_AUTO_THREADS = 4
#: Default conditioner width of the built-in builders.
_DEFAULT_HIDDEN = 64
#: The largest batch ``fit`` chooses when none is given (it follows the rows: n/8, 32-256).
_DEFAULT_BATCH = 256
#: Several threads must be at least this much faster than one in the start-up timing.
_SPEEDUP = 1.3


class ThreadsError(ValueError):
    """``EXACTFLOW_THREADS`` is not a positive integer."""


def idle_cores() -> int:
    """The cores this process may use that nobody else uses now (at least 0).

    The CPUs of this process's affinity mask, capped by a cgroup CPU quota, less the
    1-minute load average (which counts this process too, so the estimate errs low).
    """
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        load = 0.0
    return max(0, math.floor(usable_cpus() - load))


def _work(args: argparse.Namespace) -> int:
    """``batch_size * widest hidden layer ** 2`` of a ``train`` command (0 otherwise)."""
    if getattr(args, "command", None) != "train":
        return 0
    hidden = getattr(args, "hidden", None) or [_DEFAULT_HIDDEN]
    return int(getattr(args, "batch_size", None) or _DEFAULT_BATCH) * max(hidden) ** 2


def _faster_with(threads: int, rows: int, width: int) -> bool:
    """Whether ``threads`` threads multiply ``(rows, width) x (width, width)`` at least
    :data:`_SPEEDUP` times faster than one, timed here and now (best of 5, ~10-100 ms)."""
    a = torch.randn(rows, width)
    b = torch.randn(width, width)
    before = torch.get_num_threads()

    def best(n: int) -> float:
        torch.set_num_threads(n)
        times = []
        for _ in range(5):
            start = time.perf_counter()
            torch.mm(a, b)
            times.append(time.perf_counter() - start)
        return min(times)

    try:
        best(1)  # warm up
        return best(1) >= _SPEEDUP * best(threads)
    finally:
        torch.set_num_threads(before)


def choose_threads(
    args: argparse.Namespace, environ: Mapping[str, str] | None = None
) -> tuple[int | None, str]:
    """The intra-op thread count for the command of ``args``, and why (``None``: leave
    torch's count as it is). See the module docstring for the rule.

    Raises:
        ThreadsError: ``EXACTFLOW_THREADS`` is set but not a positive integer.
    """
    env = os.environ if environ is None else environ
    if getattr(args, "threads", None) is not None:
        return int(args.threads), "--threads"
    text = env.get("EXACTFLOW_THREADS", "").strip()
    if text:
        try:
            value = int(text)
        except ValueError:
            value = 0
        if value < 1:
            raise ThreadsError(
                f"EXACTFLOW_THREADS must be a positive integer, got {text!r}"
            )
        return value, "EXACTFLOW_THREADS"
    for name in THREAD_VARIABLES[1:]:  # (OMP_NUM_THREADS, MKL_NUM_THREADS)
        text = env.get(name, "").strip()
        if text.isdigit() and int(text) > 0:  # (torch ignores 0 or "abc": all cores)
            return None, name
    work = _work(args)
    if work < LARGE_WORK:
        return 1, "small model"
    free = min(idle_cores(), MAX_AUTO_THREADS)
    if free < 2:
        return 1, "no idle cores"
    width = max(getattr(args, "hidden", None) or [_DEFAULT_HIDDEN])
    rows = max(1, work // (width * width))
    if _faster_with(free, min(rows, 8192), width):
        return free, f"large model, {free} idle cores"
    return 1, "large model, but several threads were not faster here"
