"""Scoring a model without training it: eval mode, and log-densities computed in chunks.

One home for the two things every consumer of a trained flow needs (the command line, the
report and its figures, the scikit-learn estimator, the benchmarks): a context that puts a
module in eval mode without gradients and restores every submodule's mode afterwards, and
the exact log-density of many rows computed a chunk at a time.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["eval_mode", "log_prob", "module_dtype", "module_device"]


@contextmanager
def eval_mode(module: nn.Module, *, grad: bool = False) -> Iterator[nn.Module]:
    """Put ``module`` in eval mode (without gradients unless ``grad``) and restore after.

    Every submodule's own ``training`` flag is restored, not only the top one's.
    """
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        if grad:
            yield module
        else:
            with torch.no_grad():
                yield module
    finally:
        for m, mode in modes:
            m.training = mode


def module_dtype(module: nn.Module) -> torch.dtype:
    """The floating dtype of a module's parameters (or buffers); torch's default if none."""
    for t in list(module.parameters()) + list(module.buffers()):
        if t.is_floating_point():
            return t.dtype
    return torch.get_default_dtype()


def module_device(module: nn.Module) -> torch.device:
    """The device of a module's first parameter or buffer (the CPU if it has none)."""
    for t in list(module.parameters()) + list(module.buffers()):
        return t.device
    return torch.device("cpu")


def log_prob(
    model: Any, x: Any, context: Any = None, *, chunk: int = 8192
) -> np.ndarray:
    """The exact log-density of every row of ``x`` as a float64 array, in eval mode.

    Rows are scored ``chunk`` at a time in the model's dtype and on its device, without
    gradients; ``x`` may be an array, a tensor or a memory-mapped array (read a chunk at a
    time). The model's train/eval modes are restored afterwards.
    """
    dtype, device = module_dtype(model), module_device(model)
    n = len(x)
    out = np.empty(n, dtype=np.float64)
    with eval_mode(model):
        for start in range(0, n, chunk):
            part = _tensor(x[start : start + chunk], dtype, device)
            ctx = None if context is None else _tensor(context[start : start + chunk], dtype,
                                                       device)
            values = model.log_prob(part) if ctx is None else model.log_prob(part, ctx)
            out[start : start + len(part)] = values.double().cpu().numpy()
    return out


def _tensor(values: Any, dtype: torch.dtype, device: torch.device) -> Tensor:
    if isinstance(values, Tensor):
        return values.to(device=device, dtype=dtype)
    return torch.as_tensor(np.asarray(values), dtype=dtype, device=device)
