"""Scoring a model without training it: eval mode, and log-densities computed in chunks.

One home for the two things every consumer of a trained flow needs (the command line, the
report and its figures, the scikit-learn estimator, the benchmarks): a context that puts a
module in eval mode without gradients and restores every submodule's mode afterwards, and
the exact log-density of many rows computed a chunk at a time.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .distributions import Flow, tensor_of
from .nn.passes import in_eval_mode
from .validation import SHOW, DataError, index_list

__all__ = ["eval_mode", "log_prob", "module_dtype", "module_device"]


@contextmanager
def eval_mode(module: nn.Module, *, grad: bool = False) -> Iterator[nn.Module]:
    """Put ``module`` in eval mode (without gradients unless ``grad``) and restore after.

    Every submodule's own ``training`` flag is restored, not only the top one's.
    """
    with in_eval_mode(module), torch.no_grad() if not grad else contextlib.nullcontext():
        yield module


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

    Every value is a finite log-density or ``-inf``, never NaN. A row on or outside the
    limits of a flow built with ``bounds=`` scores ``-inf`` (as ``Flow.log_prob`` gives
    it): its density is 0. A row that is finite in the
    input but beyond the range of the model's dtype (``1e39`` or ``-1e300`` into a float32
    model), or ``inf``, lies so far out that its density is below the smallest positive
    float: it scores ``-inf``, whatever the layers computed on the way (``inf - inf`` would
    give NaN).

    Raises:
        DataError: a row holds NaN (it has no density): the message gives the count and
            the first row indices; a context row holds NaN or inf; ``x`` is not 2-D.
    """
    dtype, device = module_dtype(model), module_device(model)
    # A Flow casts its input itself, and keeps float64 for a first Standardize layer
    # (which standardizes in float64): hand it float64 rows as they are.
    keep64 = isinstance(model, Flow)
    if len(getattr(x, "shape", (0, 0))) != 2:
        raise DataError(f"rows must be a 2-D array (rows, features), got shape "
                        f"{tuple(np.shape(x))}")
    n = len(x)
    if context is not None and len(np.shape(context)) == 1:  # one context for every row
        context = np.broadcast_to(np.asarray(context), (n, len(context)))
    out = np.empty(n, dtype=np.float64)
    nan_rows: list[int] = []
    n_nan = 0
    with eval_mode(model):
        for start in range(0, n, chunk):
            part = _tensor(x[start : start + chunk], dtype, device, keep64)
            bad = torch.isnan(part).reshape(len(part), -1).any(-1)
            if bool(bad.any()):
                idx = torch.nonzero(bad).flatten().cpu().numpy() + start
                n_nan += len(idx)
                nan_rows.extend(idx[: max(SHOW - len(nan_rows), 0)].tolist())
            if n_nan:  # keep counting, stop scoring
                continue
            ctx = None if context is None else _tensor(context[start : start + chunk], dtype,
                                                       device, keep64)
            if ctx is not None and not bool(torch.isfinite(ctx).all()):
                rows = torch.nonzero(~torch.isfinite(ctx).reshape(len(ctx), -1).all(-1))
                raise DataError(
                    f"context row {int(rows[0]) + start} holds NaN or inf: no conditional "
                    "density is defined there; drop or impute such rows before scoring")
            values = (model.log_prob(part) if ctx is None else model.log_prob(part, ctx)
                      ).double().cpu().numpy()  # (-inf beyond a flow's bounds=)
            out[start : start + len(part)] = np.where(np.isnan(values), -np.inf, values)
    if n_nan:
        noun = "row holds" if n_nan == 1 else "rows hold"
        raise DataError(
            f"{n_nan} {noun} NaN (row indices {index_list(nan_rows, n_nan)}): a NaN has no "
            "density; drop or impute those rows before scoring"
        )
    return out


def _tensor(values: Any, dtype: torch.dtype, device: torch.device, keep64: bool = False
            ) -> Tensor:
    if not isinstance(values, Tensor):
        values = tensor_of(values)
    if keep64 and values.dtype == torch.float64:
        return values.to(device=device)
    return values.to(device=device, dtype=dtype)
