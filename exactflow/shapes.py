"""How a flow pairs rows with their contexts, and the shape of a draw.

Rows ``x`` of shape ``(..., d)`` and contexts of shape ``(..., c)`` pair as torch
broadcasts their leading shapes (as ``zuko`` and ``torch.distributions`` do): one context
row per row, ``(n, d)`` with ``(n, c)``; one context for every row, ``(c,)`` or
``(1, c)``; a batch of contexts ``(b, c)`` with samples ``(n, b, d)`` (what
``sample(n, context)`` returns); one row ``(d,)`` or ``(1, d)`` under each of ``b``
contexts; or any other pair of broadcastable leading shapes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .validation import non_negative_int

__all__ = ["paired", "sample_shape"]


def paired(x: Tensor, context: Tensor | None, features: int, name: str = "x"
           ) -> tuple[Tensor, Tensor | None, tuple[int, ...] | None]:
    """Rows ``x (..., features)`` and a context ``(..., c)`` (or ``None``), broadcast over
    their leading shapes: ``(rows (N, features), contexts (N, c) or None, lead)``, where
    ``lead`` is the leading shape to give the N results back in (``None`` when it is
    ``(N,)``: they need no reshape)."""
    if x.dim() == 0 or x.shape[-1] != features:
        hint = ("; for one feature use x.reshape(-1, 1)" if features == 1 and x.dim() == 1
                else "")
        raise ValueError(f"{name} must have shape (..., {features}), got "
                         f"{tuple(x.shape)}{hint}")
    lead = tuple(x.shape[:-1])
    if context is not None:
        try:
            lead = tuple(torch.broadcast_shapes(x.shape[:-1], context.shape[:-1]))
        except RuntimeError:
            raise ValueError(
                f"{name} of shape {tuple(x.shape)} and a context of shape "
                f"{tuple(context.shape)} do not pair up: their leading shapes must "
                f"broadcast, as one context row per row of {name}, one context (c,) for "
                f"every row, or a batch (b, c) for samples (n, b, d) of sample(n, context)"
            ) from None
        if tuple(context.shape[:-1]) != lead:
            context = context.expand(*lead, context.shape[-1])
        context = context.reshape(-1, context.shape[-1])
    if tuple(x.shape[:-1]) != lead:
        x = x.expand(*lead, features)
    return x.reshape(-1, features), context, None if len(lead) == 1 else lead


def sample_shape(n: Any) -> tuple[int, ...]:
    """The leading shape of a draw: ``n`` rows, or a shape ``(n1, n2, ...)`` as
    ``torch.distributions`` takes a ``sample_shape``."""
    if isinstance(n, (tuple, list, torch.Size)):
        return tuple(non_negative_int(k, "sample shape") for k in n)
    return (non_negative_int(n, "n"),)
