"""How :func:`exactflow.check_transform` calls a transform: on copies of its input (a
write into them is caught), each row alone and the batch, recording autograd or not, and
with the transform's state put back afterwards (a layer of the user's may change it in a
call, and a map that changes with each call has no Jacobian to check).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

from .core import Compose, Transform
from .jacobians import parameter_gap
from .nn.passes import in_eval_mode
from .validation import not_a_pair

__all__ = ["call", "close", "rows_and_recording", "unchanged", "state_of", "changed_state",
           "max_abs", "same", "parameter_failures", "identity_layers", "ROWS_ALONE"]


def max_abs(t: Tensor) -> float:
    """The largest absolute value (0 for no values, inf for a NaN or inf among them)."""
    if t.numel() == 0:
        return 0.0
    v = t.detach().abs().max()
    return float("inf") if not torch.isfinite(v) else float(v)


def close(a: Tensor, b: Tensor, atol: float, rtol: float) -> bool:
    """Equal within ``atol + rtol |b|``, equal infinities and NaN at the same places."""
    return bool(((a - b).abs() <= atol + rtol * b.abs()).logical_or(a == b)
                .logical_or(a.isnan() & b.isnan()).all())


def state_of(transform: Transform) -> dict[str, Tensor]:
    """A copy of the transform's parameters and buffers."""
    return {k: v.detach().clone() for k, v in transform.state_dict().items()}


def changed_state(transform: Transform, before: dict[str, Tensor]) -> str:
    """What of the transform's state differs from ``before`` (names and the largest
    change), or "" where nothing does."""
    moved = {k: max_abs(v.detach().double() - before[k].double()) if v.is_floating_point()
             else float(not torch.equal(v, before[k]))
             for k, v in transform.state_dict().items()
             if k in before and v.shape == before[k].shape and not same(v.detach(), before[k])}
    if not moved:
        return ""
    names = ", ".join(sorted(moved)[:4]) + (f" and {len(moved) - 4} more" if len(moved) > 4 else "")
    return f"{names} (by up to {max(moved.values()):.3e})"


def call(
    fn: Callable[..., tuple[Tensor, Tensor]], x: Tensor, context: Tensor | None, record: bool,
) -> tuple[Tensor | None, Any]:
    """``fn`` on copies of ``x`` and ``context``: ``(output, log-det)``, or ``(None, what
    changed)`` where ``fn`` wrote into its input. ``record``: as in training (autograd on,
    the input requiring a gradient), else under ``no_grad`` as when scoring."""
    x_in = x.detach().clone().requires_grad_(record)
    c_in = None if context is None else context.detach().clone()
    with torch.enable_grad() if record else torch.no_grad():
        returned = fn(x_in, c_in)
    if not isinstance(returned, (tuple, list)) or len(returned) != 2 or not all(
            isinstance(t, Tensor) for t in returned):
        owner = getattr(fn, "__self__", None)
        raise not_a_pair(returned, type(owner).__name__ if owner is not None else "the layer",
                         getattr(fn, "__name__", "forward"))
    out, ladj = returned
    for name, given, kept in (("input", x_in, x), ("context", c_in, context)):
        if given is not None and kept is not None and not same(given.detach(), kept):
            return None, f"its {name} changed by up to {max_abs(given.detach() - kept):.3e}"
    return out.detach(), ladj.detach()


#: How many rows the ``rows`` check runs alone (a mixing of rows shows in any of them).
ROWS_ALONE = 16


def same(a: Tensor, b: Tensor) -> bool:
    """Equal values, NaN equal to NaN (points with a NaN are the ``finite`` check's)."""
    return bool(((a == b) | (a.isnan() & b.isnan())).all())


def rows_and_recording(
    fn: Callable[..., tuple[Tensor, Tensor]], x: Tensor, context: Tensor | None, out: Tensor,
    ladj: Tensor, extra: dict[str, list[tuple[str, Tensor, Tensor]]], direction: str,
) -> None:
    """The errors of two checks of ``fn`` (a direction of the transform) against its values
    ``out`` and ``ladj`` at ``x``, added to ``extra``: ``rows``, each row alone gives what it
    gave in the batch, and ``recording``, the values are the same while autograd records
    (training) as without it (scoring)."""
    n = x.shape[0]
    both = torch.cat([out.reshape(n, -1), ladj.reshape(n, 1)], 1)
    alone = []
    for i in range(min(n, ROWS_ALONE) if n > 1 else 0):
        o, l = call(fn, x[i : i + 1], None if context is None else context[i : i + 1],
                     record=False)
        assert o is not None  # (the batch's call did not write into its input)
        alone.append(torch.cat([o.reshape(1, -1), l.reshape(1, 1)], 1))
    if alone:
        k = len(alone)
        extra["rows"].append((direction, torch.cat(alone) - both[:k], both[:k]))
    o, l = call(fn, x, context, record=True)
    assert o is not None
    got = torch.cat([o.reshape(n, -1), l.reshape(n, 1)], 1)
    extra["recording"].append((direction, got - both, both))


@contextlib.contextmanager
def unchanged(transform: Transform) -> Iterator[None]:
    """``transform`` in eval mode inside the block; its modes, parameters and buffers as
    they were after it (a layer of the user's may change its state in a call)."""
    saved = state_of(transform)
    try:
        with in_eval_mode(transform):
            yield
    finally:
        with torch.no_grad():
            for key, value in transform.state_dict().items():
                if key in saved:
                    value.copy_(saved[key])


def parameter_failures(transform: Transform, x: Tensor, z: Tensor, context: Tensor | None,
                       check_inverse: bool, tolerance: float) -> tuple[float, list[str]] | None:
    """The ``parameters`` check of :func:`exactflow.check_transform`: the autograd gradient
    of each direction's outputs and log-det with respect to the trainable parameters
    against finite differences (:func:`~exactflow.jacobians.parameter_gap`) at the first
    :data:`ROWS_ALONE` rows. Returns the largest gap and a line per failed direction, or
    None for a transform without trainable parameters. One row alone may differ: a kink
    within a step of it."""
    params: list[Tensor] = [p for p in transform.parameters()
                            if p.requires_grad and p.is_floating_point()]
    if not params:
        return None
    n = min(x.shape[0], ROWS_ALONE)
    c = None if context is None else context[:n]
    runs: list[tuple[str, Callable[..., tuple[Tensor, Tensor]], Tensor]] = [
        ("forward", transform.forward, x[:n])]
    if check_inverse:
        runs.append(("inverse", transform.inverse, z[:n].detach()))
    worst, failures = 0.0, []
    for direction, fn, rows in runs:
        try:
            gap, by_autograd, by_differences = parameter_gap(fn, params, rows, c,
                                                             tolerance=tolerance)
        except ValueError:  # (a step beyond the domain)
            continue
        bad = ~(gap <= tolerance)
        excused = int(bad.sum()) == 1 and len(gap) > 1  # (a kink within a step of one row)
        worst = max(worst, max_abs(gap[~bad]) if excused else max_abs(gap))
        if int(bad.sum()) >= min(2, n):
            i = int(bad.nonzero()[0, 0])
            failures.append(
                f"parameters: the gradient of {direction}'s output and log-det with respect "
                f"to the parameters differs from finite differences at {int(bad.sum())} of "
                f"{n} rows (row {i}, along a random direction: autograd "
                f"{float(by_autograd[i]):.6g}, differences {float(by_differences[i]):.6g}): "
                "part of the computation does not reach autograd from the parameters (a "
                ".detach() or .item() of a parameter, a no_grad block) or a hand-written "
                "backward is wrong, so training would follow a wrong gradient")
    return worst, failures


def identity_layers(transform: Transform, x: Tensor, context: Tensor | None, atol: float,
                    rtol: float) -> list[str]:
    """The layers of a :class:`~exactflow.Compose` that are the identity at the points they
    receive (``"2 (WrongSign)"``: position and class), where a wrong log-det formula of
    theirs cannot show inside the chain's right total; empty for another transform."""
    if not isinstance(transform, Compose):
        return []
    found = []
    with torch.no_grad():
        for i, layer in enumerate(transform):
            z, ladj = layer(x, context)
            if close(z, x, atol, rtol) and bool((ladj.abs() <= atol).all()):
                found.append(f"{i} ({type(layer).__name__})")
            x = z
    return found
