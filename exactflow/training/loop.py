"""The training loop that :func:`exactflow.fit` and :func:`exactflow.fit_reverse_kl` share.

One step: set the learning rate, let the objective compute its loss and gradients, clip the
gradient norm, and apply the update only if the loss and the gradient norm are finite. A
step that is not finite is never applied: the model and optimizer go back to the last good
state (a snapshot taken every :data:`SNAPSHOT_EVERY` steps of a state that gave a finite
loss and gradient), the learning rate is halved for the rest of the run, and training goes
on; after :data:`MAX_FAILURES` such failures in a row a :class:`TrainingError` says at which
step, in which layer families, and what to try. Every ``eval_every`` steps the objective
records (and may ask to stop); every ``checkpoint_every`` steps a checkpoint is written.

The loop's own state is a :class:`TrainState`; randomness is drawn inside a forked torch RNG
seeded by the caller (:func:`forked_rng`), so a run is deterministic on the CPU and a
checkpoint can resume it exactly.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from ..distributed import THREAD_VARIABLES, thread_count_chosen, usable_cpus
from ..validation import device_named, positive_float, seed_value, warn_user
from .advice import MAX_FAILURES, TrainingError, data_advice, divergence_error, gentler_lr
from .history import History

__all__ = [
    "TrainingError",
    "TrainState",
    "Guard",
    "LoopSettings",
    "run_loop",
    "resolve_device",
    "forked_rng",
    "rng_state",
    "set_rng_state",
    "clone",
    "check_common",
    "adam",
    "MAX_FAILURES",
    "SNAPSHOT_EVERY",
]

#: Steps between snapshots of the last good state (the rollback target).
SNAPSHOT_EVERY = 10
#: Rolled-back steps (and this share of all steps) that make a run unstable: it stops.
UNSTABLE_ROLLBACKS = 10
UNSTABLE_SHARE = 0.05


@dataclass
class TrainState:
    """Where a run stands: everything besides the model, optimizer, history and RNG that a
    checkpoint must hold to resume it exactly.

    Attributes:
        step: optimizer steps done (rolled-back steps included).
        lr_scale: the factor on the scheduled learning rate (halved at each rollback).
        failures: consecutive non-finite steps.
        finished: the run ended before its last step (early stopping or a callback).
        best_state: the weights of the best validation record (``fit`` restores them).
        since_best: records since the best one (for ``patience``).
        run_sum, run_count: the running sum and count of the logged loss since the last
            record.
        elapsed: wall-clock seconds of training so far (summed across resumes).
    """

    step: int = 0
    lr_scale: float = 1.0
    failures: int = 0
    finished: bool = False
    best_state: dict[str, Tensor] | None = None
    since_best: int = 0
    run_sum: float = 0.0
    run_count: int = 0
    elapsed: float = 0.0

    def take_running_mean(self) -> float | None:
        """The mean logged loss since the last call (``None`` if no step was applied)."""
        mean = self.run_sum / self.run_count if self.run_count else None
        self.run_sum, self.run_count = 0.0, 0
        return mean


# -- devices, RNG, copies -----------------------------------------------------------------


def adam(params: list[Tensor], lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """The optimizer of :func:`exactflow.fit` and :func:`exactflow.fit_reverse_kl`: AdamW
    (Adam when ``weight_decay`` is 0) with torch's fused kernel where every parameter is a
    floating tensor on the CPU or a CUDA device, else torch's default implementation.

    The fused kernel updates every tensor in one call, where the default runs about a dozen
    small operations per tensor: on one CPU thread an update of 48 tensors holding 148,560
    numbers (a RealNVP of exactflow 0.1, two tensors per layer) takes 0.36 ms against
    1.6 ms. The update is the same formula; the two differ by float rounding only.
    """
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused or None)


def resolve_device(device: str | torch.device | None, module: nn.Module) -> torch.device:
    """``"auto"``: CUDA when available; ``None``: the module's device; else ``device``."""
    if device is None:
        ref = next(iter(module.parameters()), None)
        return ref.device if ref is not None else torch.device("cpu")
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return device_named(device)


@contextmanager
def forked_rng(device: torch.device, seed: int) -> Iterator[None]:
    """Seed torch's RNG for the run and give the caller's RNG state back afterwards."""
    devices: list[int] = []
    if device.type == "cuda":
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def rng_state(device: torch.device) -> dict[str, Tensor | None]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return {"torch": torch.get_rng_state(), "cuda": cuda}


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"].cpu())
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


def clone(tree: Any) -> Any:
    """Deep copy of a state dict: tensors cloned, containers rebuilt, plain values kept."""
    if isinstance(tree, Tensor):
        return tree.detach().clone()
    if isinstance(tree, dict):
        return type(tree)((k, clone(v)) for k, v in tree.items())
    if isinstance(tree, list):
        return [clone(v) for v in tree]
    if isinstance(tree, tuple):
        return tuple(clone(v) for v in tree)
    return tree


# -- the rollback guard -------------------------------------------------------------------


class Guard:
    """The last good model + optimizer state, and the rollback that restores it.

    :meth:`save` is called every :data:`SNAPSHOT_EVERY` steps, after that step's loss and
    gradients proved finite and before its update is applied, so the snapshot is a state that
    produced a finite loss (parameters and optimizer moments before the update, buffers such
    as batch-norm statistics after the forward pass). A failing step restores it (losing at
    most that many steps of progress) and halves the learning rate. Copying the state every
    step would cost about a tenth of a small model's step time.
    """

    def __init__(self, flow: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.flow, self.optimizer = flow, optimizer
        self.model_state: dict[str, Tensor] | None = None
        self.optimizer_state: dict[str, Any] | None = None

    def save(self) -> None:
        self.model_state = clone(self.flow.state_dict())
        self.optimizer_state = clone(self.optimizer.state_dict())

    def restore(self) -> None:
        if self.model_state is None or self.optimizer_state is None:
            return
        self.flow.load_state_dict(self.model_state)
        # Optimizer.load_state_dict may keep references: hand it a copy of the snapshot.
        self.optimizer.load_state_dict(clone(self.optimizer_state))
        self.optimizer.zero_grad(set_to_none=True)


# -- settings -----------------------------------------------------------------------------


def check_common(lr: float, schedule: str, grad_clip: float | None, seed: int) -> None:
    """Check the arguments both training engines share (one message per mistake)."""
    positive_float(lr, "lr")
    if schedule not in ("cosine", "constant"):
        raise ValueError(f"schedule must be 'cosine' or 'constant', got {schedule!r}")
    if grad_clip is not None:
        positive_float(grad_clip, "grad_clip (or None)")
    seed_value(seed)


def lr_factor(schedule: str, step: int, total: int) -> float:
    """Multiplier of the base learning rate for the 0-based ``step`` of ``total``."""
    if schedule == "constant":
        return 1.0
    return 0.5 * (1.0 + math.cos(math.pi * step / max(total, 1)))


#: Seconds between the progress lines of a run whose stderr is not a terminal.
PROGRESS_EVERY = 30.0


class _ProgressLines:
    """Progress where stderr is not a terminal (a log file, a pipe, a notebook): a line
    every :data:`PROGRESS_EVERY` seconds, with the step and the latest figures. The
    methods the loop calls are those of a tqdm bar."""

    def __init__(self, total: int, initial: int, desc: str) -> None:
        self.total, self.n, self.desc = total, initial, desc or "training"
        self.start = self.last = time.perf_counter()
        self.figures: dict[str, Any] = {}

    def update(self, steps: int) -> None:
        self.n += steps
        now = time.perf_counter()
        if now - self.last >= PROGRESS_EVERY:
            self.last = now
            figures = "".join(f", {k} {v}" for k, v in self.figures.items())
            print(f"{self.desc}: step {self.n:,} of at most {self.total:,}{figures} "
                  f"({now - self.start:.0f} s)", file=sys.stderr, flush=True)

    def set_postfix(self, values: dict[str, Any] | None = None, refresh: bool = True,
                    **more: Any) -> None:
        self.figures.update({**(values or {}), **more})

    def close(self) -> None:
        pass


def progress_bar(enabled: bool, total: int, initial: int, desc: str) -> Any:
    """A tqdm bar on a terminal, lines every :data:`PROGRESS_EVERY` seconds elsewhere, or
    ``None`` (disabled, or tqdm missing on a terminal)."""
    if not enabled:
        return None
    if not sys.stderr.isatty():
        return _ProgressLines(total, initial, desc)
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, leave=True)


@dataclass
class LoopSettings:
    """How long a run goes and how it steps: the schedule, clipping and record cadence."""

    total: int
    lr: float
    schedule: str = "constant"
    grad_clip: float | None = None
    eval_every: int = 1
    checkpoint_every: int | None = None
    desc: str = "fit"
    progress: bool = True
    postfix: Callable[[History], dict[str, str]] = field(default=lambda history: {})
    #: ``time.perf_counter()`` past which the run stops, with a last record (None: no limit).
    stop_at: float | None = None
    #: How long a record takes (a validation pass): the run stops that much before stop_at.
    record_seconds: float = 0.0


#: Steps between two looks at the clock of a run with a time limit (the ranks agree on
#: them, so a look is a collective under ``torch.distributed``).
CLOCK_EVERY = 8


class Peers(Protocol):
    """The processes that train together (one, without ``torch.distributed``)."""

    is_main: bool

    def sync_statistics(self, flow: nn.Module, step: int) -> None: ...

    def any(self, flag: bool) -> bool: ...


#: Whether this process's first training run has looked at torch's thread count.
_threads_checked = False


def warn_if_oversubscribed(flow: nn.Module) -> None:
    """Warn, once a process, when CPU training runs more torch threads than cores are idle.

    torch starts with one thread per core; on a busy machine each waits for a core at every
    parallel region, and a small flow trains several times slower than on one thread (the
    command line sets its own count: :mod:`exactflow.cli.threads`). Only the first run of
    a process looks, before its own threads weigh on the load average; a count the user
    chose (in the environment, or through the command line or ``launch``) is never
    questioned. Busy means more than one core's worth of other work on the cores the
    threads would need: a light background load does not count.
    """
    global _threads_checked
    if _threads_checked or thread_count_chosen():
        return
    _threads_checked = True
    threads = torch.get_num_threads()
    on_cpu = all(p.device.type == "cpu" for p in flow.parameters())
    if threads <= 1 or not on_cpu or any(os.environ.get(v, "").strip() for v in THREAD_VARIABLES):
        return
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return
    cpus = usable_cpus()
    if cpus - load >= threads - 1:
        return
    warn_user(
        f"torch runs {threads} threads on {cpus:g} CPUs with a 1-minute load average of "
        f"{load:.1f}: each thread waits for a core, and a small flow then trains several "
        "times slower than on one thread (3.6x for exactflow train on a busy 2-core "
        "machine, docs/reliability.md). Call torch.set_num_threads(1) before training (the "
        "command line chooses its own count); set OMP_NUM_THREADS to keep torch's count "
        "without this note"
    )


# -- the loop -------------------------------------------------------------------------------


def run_loop(
    flow: nn.Module,
    optimizer: torch.optim.Optimizer,
    params: list[Tensor],
    guard: Guard,
    state: TrainState,
    history: History,
    settings: LoopSettings,
    step: Callable[[int], tuple[Tensor, Tensor]],
    record: Callable[[int, float, float], bool],
    *,
    peers: Peers,
    checkpoint: Callable[[], None] | None = None,
    callback: Callable[[History], bool | None] | None = None,
) -> None:
    """Run steps from ``state.step`` to ``settings.total`` (or until a stop).

    Args:
        step: ``step(i)`` computes the objective of the 0-based step ``i`` and its gradients
            (``backward`` included) and returns two scalars: the loss that was
            differentiated (checked for finiteness) and the value to log.
        record: ``record(done, lr, clock)`` appends a record to the history every
            ``eval_every`` steps and at the last; returns whether to stop.
        peers: the processes training together (checks and stops agree across them).
        checkpoint: writes a checkpoint (called every ``checkpoint_every`` steps, at the
            last and at a stop).
        callback: ``callback(history)`` after each record; ``True`` stops the run.
    """
    total = settings.total
    if peers.is_main:
        warn_if_oversubscribed(flow)
    bar = progress_bar(settings.progress and peers.is_main, total, state.step, settings.desc)
    clock = time.perf_counter() - state.elapsed
    record_seconds = settings.record_seconds  # (the last record ends by stop_at)
    flow.train()
    try:
        while state.step < total and not state.finished:
            i = state.step
            current_lr = settings.lr * state.lr_scale * lr_factor(settings.schedule, i, total)
            for group in optimizer.param_groups:
                group["lr"] = current_lr
            optimizer.zero_grad(set_to_none=True)
            loss, logged = step(i)
            clip = settings.grad_clip if settings.grad_clip is not None else math.inf
            norm = torch.nn.utils.clip_grad_norm_(params, clip)
            # One device sync per step: the values for the log and the finiteness checks.
            loss_value, norm_value, logged_value = torch.stack(
                [loss.detach(), norm.detach().to(loss.dtype), logged.detach().to(loss.dtype)]
            ).tolist()
            state.step = i + 1
            if math.isfinite(loss_value) and math.isfinite(norm_value):
                if i % SNAPSHOT_EVERY == 0:
                    guard.save()
                optimizer.step()
                state.failures = 0
                state.run_sum += logged_value
                state.run_count += 1
            else:
                what = "loss" if not math.isfinite(loss_value) else "gradient norm"
                guard.restore()
                state.lr_scale *= 0.5
                state.failures += 1
                history.rollbacks.append(i + 1)
                if state.failures >= MAX_FAILURES:
                    raise divergence_error(flow, i + 1, current_lr * 0.5, what,
                                           never_finite=state.failures == i + 1)
                count = len(history.rollbacks)
                if count >= UNSTABLE_ROLLBACKS and count >= UNSTABLE_SHARE * (i + 1):
                    raise TrainingError(
                        f"training is unstable: {count} of its {i + 1} steps had a "
                        "non-finite loss or gradient and were undone (the learning rate "
                        f"was halved each time, from {settings.lr:.3g}). Lower the learning "
                        f"rate (lr, --lr; try {gentler_lr(settings.lr):.3g}), "
                        f"{data_advice(flow)}, or clip gradients harder (grad_clip)."
                    )
            if bar is not None:
                bar.update(1)
                if math.isfinite(logged_value):
                    bar.set_postfix(loss=f"{logged_value:.4f}", refresh=False)
            done = state.step
            late = settings.stop_at is not None and done % CLOCK_EVERY == 0 and peers.any(
                time.perf_counter() + record_seconds >= settings.stop_at)
            if done % settings.eval_every == 0 or done == total or late:
                peers.sync_statistics(flow, done)
                began = time.perf_counter()
                stop = record(done, current_lr, clock) or late
                record_seconds = time.perf_counter() - began
                history.total_steps = done
                if callback is not None and callback(history):
                    stop = True
                if peers.any(stop):
                    history.stopped_early = True
                    state.finished = True
                if bar is not None:
                    bar.set_postfix(settings.postfix(history))
                flow.train()  # validation ran in eval mode; a callback may switch modes
            every = settings.checkpoint_every
            due = every is not None and (done % every == 0 or done == total or state.finished)
            if checkpoint is not None and due:
                peers.sync_statistics(flow, done)
                state.elapsed = time.perf_counter() - clock
                if peers.is_main:
                    checkpoint()
    except TrainingError as err:  # (the weights it diverged to are of no use to anyone)
        flow.eval()
        if state.best_state is None:
            raise
        flow.load_state_dict(state.best_state)
        raise TrainingError(f"{str(err).rstrip('.')}. The flow is left with the weights of "
                            f"step {history.best_step}, its best validation NLL "
                            f"({history.best_val:.6g}), in eval mode.") from None
    finally:
        if bar is not None:
            bar.close()
    state.elapsed = time.perf_counter() - clock
    history.total_steps = state.step

