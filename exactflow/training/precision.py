"""Mixed precision for training: matrix products in bfloat16, densities summed in float32.

``fit(..., precision="bf16")`` runs each training forward under ``torch.autocast`` with
bfloat16, which computes the matrix products of the conditioner networks (linear layers,
MADE's masked layers) in bfloat16. Everything else stays float32: the output of every
layer of the flow (``z`` and its log-determinant) and of every network a layer calls (a
conditioner, a context embedding) is cast back to float32 as it leaves the module, so the
elementwise maps, ``exp`` of the scales, every log-determinant, the sum over layers, the
base log-density and the batch mean are float32 operations. The weights, gradients and
Adam's moments stay float32 (autocast does not cast parameters in place).

Effect: bfloat16 keeps 8 significant bits, so each matrix product carries a relative
rounding error of about ``2^-8``; in a training forward the per-row log-densities differ
from float32 by thousandths of a nat typically and by up to tenths in the tails, and
their batch mean (the loss) by much less, since the errors are not systematic
(``docs/distributed.md`` gives measured figures). The gain is speed and memory on GPUs with
bfloat16 tensor cores (compute capability 8.0 and later); on CPUs without bfloat16 units
it is usually slower. Validation, :func:`exactflow.evaluate` and sampling run in float32,
so the reported NLL is exact.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ..core import Transform
from ..distributions import Distribution, Flow

__all__ = ["PRECISIONS", "Precision"]

#: The values of ``fit(precision=...)``.
PRECISIONS = ("fp32", "bf16")

_LOW = (torch.bfloat16, torch.float16)


def _to_float32(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.float() if value.dtype in _LOW else value
    if isinstance(value, tuple):
        return tuple(_to_float32(v) for v in value)
    if isinstance(value, list):
        return [_to_float32(v) for v in value]
    return value


def _output_hook(module: nn.Module, args: Any, output: Any) -> Any:
    return _to_float32(output)


def _networks_and_layers(flow: nn.Module) -> Iterator[nn.Module]:
    """Every layer of the flow, and every non-layer module a layer or the flow calls."""
    for parent in flow.modules():
        if isinstance(parent, Transform):
            yield parent
        if isinstance(parent, (Transform, Flow)):
            for child in parent.children():
                if not isinstance(child, (Transform, Distribution)):
                    yield child


class Precision:
    """The numeric precision of a run's training forwards: ``"fp32"`` or ``"bf16"``.

    :meth:`attach` registers the float32 casts on the flow's layers and networks (a no-op
    for ``"fp32"``); :meth:`autocast` is the context of one training forward; :meth:`detach`
    removes the casts.

    Raises:
        ValueError: an unknown precision; ``"bf16"`` for a flow that is not float32, or on
            a GPU without bfloat16 support.
    """

    def __init__(self, precision: str, device: torch.device, dtype: torch.dtype) -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        self.precision = precision
        self.device = device
        self._handles: list[RemovableHandle] = []
        if precision == "bf16":
            if dtype != torch.float32:
                raise ValueError(
                    f"precision='bf16' trains a float32 flow with bfloat16 matrix products; "
                    f"this flow is {dtype} (autocast leaves float64 alone): use .float() or "
                    "precision='fp32'"
                )
            if device.type == "cuda" and not torch.cuda.is_bf16_supported():
                raise ValueError(
                    "precision='bf16' needs a GPU with bfloat16 support (compute capability "
                    "8.0 or later); use precision='fp32'"
                )

    @property
    def enabled(self) -> bool:
        return self.precision != "fp32"

    def attach(self, flow: nn.Module) -> None:
        """Cast the outputs of the flow's layers and networks back to float32."""
        if not self.enabled or self._handles:
            return
        seen: set[int] = set()
        for module in _networks_and_layers(flow):
            if id(module) not in seen:
                seen.add(id(module))
                self._handles.append(module.register_forward_hook(_output_hook))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def autocast(self) -> AbstractContextManager[Any]:
        """The context of one training forward (``torch.autocast`` with bfloat16, or none)."""
        if not self.enabled:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)
