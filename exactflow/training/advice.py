"""What a failed run says: the error that ends training and the advice in its message.

:func:`divergence_error` names where a run's loss or gradient stayed non-finite, the
flow's layers (the user's own among them, with the checker that tests them) and what to
try; :func:`data_advice` and :func:`gentler_lr` are the parts other messages share.
"""

from __future__ import annotations

from torch import nn

from ..core import Compose, Inverse, Transform, library_layers_only
from ..transforms.standardize import Standardize

__all__ = ["TrainingError", "divergence_error", "data_advice", "gentler_lr",
           "STANDARDIZE_ADVICE", "MAX_FAILURES"]

#: Consecutive non-finite steps tolerated before giving up.
MAX_FAILURES = 5


class TrainingError(RuntimeError):
    """Training diverged: the loss or its gradient stayed non-finite despite rollbacks."""


def _layer_families(flow: nn.Module) -> list[str]:
    names: list[str] = []
    for module in flow.modules():
        if isinstance(module, Transform) and not isinstance(module, (Compose, Inverse)):
            name = type(module).__name__
            if name not in names:
                names.append(name)
    return names


#: How to get a standardization layer, wherever the flow was built.
STANDARDIZE_ADVICE = (
    "Build the flow with standardize=True (FlowDensity(standardize=True); in the command "
    "line, leave out --no-standardize)"
)


def gentler_lr(lr: float) -> float:
    """A learning rate to suggest after ``lr`` failed: a tenth of it, at most Adam's 1e-3."""
    return min(lr / 10, 1e-3)


def data_advice(flow: nn.Module) -> str:
    """What to try about the data after a failed run: standardizing it, unless the flow
    already does."""
    if any(isinstance(m, Standardize) for m in flow.modules()):
        return "look for extreme values in the data (heavy tails standardize badly)"
    if getattr(flow, "context_features", 0):  # (FlowDensity and the command line: no context)
        return "build the flow with standardize=True, which standardizes its context too"
    return STANDARDIZE_ADVICE[0].lower() + STANDARDIZE_ADVICE[1:]


def divergence_error(flow: nn.Module, step: int, lr: float, what: str,
                     never_finite: bool = False) -> TrainingError:
    """The error for a run whose loss or gradient stayed non-finite: where, and what to try
    (``never_finite``: no step of the run had a finite one)."""
    families = ", ".join(_layer_families(flow)) or type(flow).__name__
    own = sorted({type(m).__name__ for m in flow.modules() if isinstance(m, Transform)
                  and not isinstance(m, (Compose, Inverse)) and not library_layers_only(m)})
    check = (f" Check your own layers ({', '.join(own)}) with ef.check_transform(layer, x): "
             "it compares their log-determinant and inverse with autograd's." if own else "")
    if never_finite:
        return TrainingError(
            f"training failed at step {step}: the {what} was non-finite (NaN or inf) at every "
            f"step from the start, at the initial parameters too, so no learning rate helps "
            f"(it was halved to {lr:.3g}). Layers in this flow: {families}.{check} Look "
            f"for NaN or extreme values in the data, or {data_advice(flow)}."
        )
    return TrainingError(
        f"training diverged at step {step}: the {what} was non-finite (NaN or inf) on "
        f"{MAX_FAILURES} steps in a row, even after rolling back to the last good state and "
        f"halving the learning rate each time (now {lr:.3g}). Layers in this flow: {families}. "
        f"Try: a lower learning rate (lr), gradient clipping (grad_clip=1.0), "
        f"{data_advice(flow)}, a larger spline bound or fewer/smaller layers.{check}"
    )
