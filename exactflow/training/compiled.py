"""The training loss, compiled with ``torch.compile`` when that pays: ``compile="auto"``.

Compiling a flow's loss and backward costs 10-40 s on a CPU and then runs each step faster
by a factor that depends on the model (about 1.4x for small MAF and RealNVP, up to 3x for
small spline flows, nothing or less for large conditioners whose time is in the matrix
products: ``benchmarks/NOTES.md``). So ``"auto"`` measures instead of guessing: it times a
few eager steps, compiles only if the run is long enough for even a modest gain to repay a
typical compile, then times a few compiled steps and keeps whichever is faster. Short runs
never compile, nor do runs with a time limit and less than :data:`SLOW_COMPILE_SECONDS` of
it left: a compile cannot be cut short, and one took 161 s with a cold cache on a busy
machine. The decision, with the compile's seconds, is recorded in ``History.compiled``.
"""

from __future__ import annotations

import time
import types
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..validation import warn_user

__all__ = ["LossFunction", "COMPILE_SECONDS", "SLOW_COMPILE_SECONDS", "ASSUMED_GAIN"]

#: What ``"auto"`` assumes a compile costs (seconds) and saves (share of a step) before
#: measuring: a run compiles only if ``remaining steps x step time x ASSUMED_GAIN`` exceeds
#: ``COMPILE_SECONDS``.
COMPILE_SECONDS = 30.0
ASSUMED_GAIN = 0.3
#: A run with a time limit compiles only with at least this long left before it.
SLOW_COMPILE_SECONDS = 8 * COMPILE_SECONDS
#: Steps ignored (warm-up), then timed, eagerly and compiled.
WARMUP, TIMED = 5, 20
_TOO_SHORT = "eager: the run is too short for compiling to pay"


def _compiled(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
    # torch.compile caches graphs per code object, up to a recompile limit (8): every fit
    # of another flow would otherwise count against the same limit and, past it, silently
    # run eagerly. A copy of the code object gives each run its own cache. Shapes are
    # static: every training batch has the same size, so one graph serves the whole run.
    fresh = types.FunctionType(
        fn.__code__.replace(), fn.__globals__, fn.__name__, None, fn.__closure__
    )
    return torch.compile(fresh, dynamic=False)


class LossFunction:
    """``loss(x, ctx) = -mean(log p(x | ctx))`` through ``model`` (the flow or its DDP
    wrapper), eager, compiled, or compiled when measured to pay (``mode="auto"``).

    Args:
        model: returns the module whose ``forward`` is the log-density (looked up at every
            call: data-parallel training wraps the flow only once training starts).
        mode: ``False`` (eager), ``True`` (compiled from the second step: the first runs
            eagerly, where data-dependent layers such as ``ActNorm`` initialize, which they
            cannot inside a compiled graph) or ``"auto"``.
        expected_steps: the steps the run is expected to take (for ``"auto"``'s decision).
        stop_at: the ``time.perf_counter()`` at which the run stops (its time limit), if any.
    """

    def __init__(self, model: Callable[[], Any], mode: bool | str, expected_steps: int,
                 stop_at: float | None = None) -> None:
        if isinstance(mode, np.bool_):
            mode = bool(mode)
        if not (isinstance(mode, bool) or mode == "auto"):  # (1 == True: it would run eager)
            raise ValueError(f"compile must be True, False or 'auto', got {mode!r}")

        def nll(x: Tensor, ctx: Tensor | None) -> Tensor:
            return -model()(x, ctx).mean()

        self._eager = nll
        self._fn: Callable[[Tensor, Tensor | None], Tensor] = nll
        self.mode = mode
        self.expected = expected_steps
        self.decision = "compiled" if mode is True else "eager"
        self._calls = 0
        self._stamps: list[float] = []
        self._eager_step: float | None = None
        self._phase = "eager" if mode == "auto" else "fixed"
        self.stop_at = stop_at
        self._compile_seconds = 0.0
        self.start(expected_steps)

    def start(self, remaining: int) -> None:
        """Set the steps this process will run (fewer when a run resumes)."""
        self.expected = remaining
        if self.mode == "auto" and self._calls == 0:
            short = remaining <= 2 * (WARMUP + TIMED)
            self.decision, self._phase = (_TOO_SHORT, "fixed") if short else ("eager", "eager")

    def __call__(self, x: Tensor, ctx: Tensor | None) -> Tensor:
        if self._phase != "fixed":
            self._observe()
        self._calls += 1
        loss = self._fn(x, ctx)
        if self._calls == 1 and self.mode is True:
            self._fn = _compiled(self._eager)
        return loss

    def _observe(self) -> None:
        now = time.perf_counter()
        self._stamps.append(now)
        if self._phase == "eager" and len(self._stamps) == WARMUP + TIMED + 1:
            self._eager_step = (now - self._stamps[WARMUP]) / TIMED
            remaining = float(self.expected - self._calls)
            if self.stop_at is not None:  # (the steps its time allows)
                left = self.stop_at - now
                remaining = min(remaining, left / max(self._eager_step, 1e-9))
                if left < SLOW_COMPILE_SECONDS:
                    self.decision, self._phase = ("eager: the time limit leaves too little "
                                                  "time to risk a compile"), "fixed"
                    return
            if remaining * self._eager_step * ASSUMED_GAIN <= COMPILE_SECONDS:
                self.decision, self._phase = _TOO_SHORT, "fixed"
                return
            self._fn = _compiled(self._eager)
            self._phase = "compiling"
            self._stamps = [now]
            self.decision = "compiled: the run ended before compiled steps were timed"
        elif self._phase == "compiling" and len(self._stamps) == 2:
            self._compile_seconds = now - self._stamps[0]  # (one step with the compile)
            self._stamps = [now]  # (and not timed)
            self._phase = "timing"
            self.decision = (f"compiled (compiling took {self._compile_seconds:.0f} s): the "
                             "run ended before compiled steps were timed")
            if self.stop_at is not None and now > self.stop_at:
                warn_user(f"compiling the loss took {self._compile_seconds:.0f} s and ran past "
                          f"the time limit by {now - self.stop_at:.0f} s, leaving no time to "
                          "train: pass compile=False to time-limited runs on this machine")
        elif self._phase == "timing" and len(self._stamps) == TIMED + 1:
            assert self._eager_step is not None
            compiled_step = (now - self._stamps[0]) / TIMED
            speedup = self._eager_step / compiled_step if compiled_step > 0 else float("inf")
            took = f"; compiling took {self._compile_seconds:.0f} s"
            if speedup > 1.1:
                self.decision = f"compiled: {speedup:.2f}x faster per step than eager{took}"
            else:
                self._fn = self._eager
                self.decision = f"eager: compiled steps were not faster ({speedup:.2f}x{took})"
            self._phase = "fixed"
