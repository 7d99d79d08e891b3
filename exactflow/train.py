"""Training engines: maximum likelihood (:func:`fit`), reverse KL (:func:`fit_reverse_kl`),
and exact evaluation (:func:`evaluate`, :func:`estimate_log_normalizer`).

Maximum likelihood minimizes the mean negative log-likelihood of the data,
``NLL = -(1/n) sum_i log p(x_i)``, in nats; bits per dimension are ``NLL / (d ln 2)``.
Reverse KL fits a flow ``q`` to an unnormalized density ``p~ = Z p`` by minimizing
``E_q[log q(x) - log p~(x)] = KL(q || p) - log Z`` with reparameterized samples.

Both engines share one guard against divergence: a step whose loss or gradient norm is not
finite is never applied. The model and optimizer go back to the last good state (a snapshot
taken every :data:`SNAPSHOT_EVERY` steps of a state that gave a finite loss and gradient),
the learning rate is halved for the rest of the run, and training goes on; after
:data:`MAX_FAILURES` such failures in a row a :class:`TrainingError` says at which step, in
which layer families, and what to try. Rolled-back steps are listed in
``History.rollbacks``.

Randomness is drawn inside a forked torch RNG seeded with ``seed`` (the caller's global RNG
is left as it was), and the data order of epoch ``e`` is a permutation derived from
``(seed, e)`` alone, so a run is deterministic on the CPU and a checkpoint can resume it
exactly.
"""

from __future__ import annotations

import math
import sys
import time
import types
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .core import Compose, Inverse, Transform
from .datasets import DataError, Subset, validate
from .distributed import _Replicas
from .distributions import Flow
from .io import CheckpointError, atomic_save, safe_torch_load

__all__ = [
    "fit",
    "fit_reverse_kl",
    "evaluate",
    "estimate_log_normalizer",
    "History",
    "TrainingError",
]

_LN2 = math.log(2.0)
#: Consecutive non-finite steps tolerated before giving up.
MAX_FAILURES = 5
_CHECKPOINT_FORMAT = "exactflow-checkpoint"
_CHECKPOINT_VERSION = 1
#: Steps between snapshots of the last good state (the rollback target).
SNAPSHOT_EVERY = 10
# Rows per chunk when scanning arrays (finiteness checks, evaluation of memmaps).
_SCAN_ROWS = 65536


class TrainingError(RuntimeError):
    """Training diverged: the loss or its gradient stayed non-finite despite rollbacks."""


# -- history ------------------------------------------------------------------------------


@dataclass
class History:
    """What a training run recorded, one entry per evaluation point.

    Attributes:
        features: the data dimension ``d`` (for bits per dimension).
        objective: ``"nll"`` (:func:`fit`) or ``"reverse_kl"`` (:func:`fit_reverse_kl`).
        steps: the optimizer step of each record (1-based: steps done so far).
        train_nll: the running mean of the training loss since the previous record, in
            nats. For ``fit`` the mini-batch NLL; for ``fit_reverse_kl`` the batch estimate
            of ``E_q[log q - log p~]`` (= ``KL(q || p) - log Z``; the annealed loss
            actually minimized is ``E_q[log q - beta log p~]``). ``None`` if every step
            since the previous record was rolled back.
        val_nll: the validation NLL (nats) at each record, ``None`` without validation data.
        lr: the learning rate at each record.
        time: wall-clock seconds since the start of training (summed across resumes).
        beta: the annealing weight of the energy at each record (reverse KL only).
        best_step, best_val: the record with the lowest validation NLL (``None`` without
            validation data); :func:`fit` restores these weights at the end.
        stopped_early: whether early stopping (``patience``) or a callback ended the run.
        total_steps: the number of optimizer steps run (rolled-back steps included).
        rollbacks: steps whose loss or gradient was non-finite and that were undone.
        final: end-of-training estimates (reverse KL: ``elbo``, ``elbo_se``, ``log_z_is``,
            ``log_z_is_se``, ``ess``, ``n``, ``n_nonfinite``).
    """

    features: int = 0
    objective: str = "nll"
    steps: list[int] = field(default_factory=list)
    train_nll: list[float | None] = field(default_factory=list)
    val_nll: list[float | None] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    time: list[float] = field(default_factory=list)
    beta: list[float] = field(default_factory=list)
    best_step: int | None = None
    best_val: float | None = None
    stopped_early: bool = False
    total_steps: int = 0
    rollbacks: list[int] = field(default_factory=list)
    final: dict[str, float] = field(default_factory=dict)

    def _bpd(self, values: list[float | None]) -> list[float | None]:
        scale = 1.0 / (max(self.features, 1) * _LN2)
        return [None if v is None else v * scale for v in values]

    @property
    def train_bpd(self) -> list[float | None]:
        """``train_nll`` in bits per dimension, ``nll / (d ln 2)``."""
        return self._bpd(self.train_nll)

    @property
    def val_bpd(self) -> list[float | None]:
        """``val_nll`` in bits per dimension, ``nll / (d ln 2)``."""
        return self._bpd(self.val_nll)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict of every field plus ``train_bpd`` and ``val_bpd``.

        Non-finite numbers become ``None`` so that ``json.dumps`` gives strict JSON.
        """
        out = _json_safe(asdict(self))
        out["train_bpd"] = _json_safe(self.train_bpd)
        out["val_bpd"] = _json_safe(self.val_bpd)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> History:
        """Rebuild a history from :meth:`to_dict` output (extra keys are ignored)."""
        names = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in names})


def _json_safe(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


# -- data ---------------------------------------------------------------------------------


class _Rows:
    """Rows of a 2-D tensor, array, ``np.memmap`` or :class:`~exactflow.datasets.Subset`,
    gathered a batch at a time.

    Lazy data (a memmap, a ``Subset``) is never read whole: a batch copies only its own rows
    (indices sorted, for locality) and the checks scan it chunk by chunk.

    With ``strict`` (training and validation data) the data must pass
    :func:`exactflow.datasets.validate` (2-D, numeric, ``features`` columns, at least
    ``batch_size`` rows, no NaN/inf, no constant column); otherwise (data to evaluate,
    contexts) only the shape, the dtype and finiteness are checked.
    """

    def __init__(
        self,
        data: Any,
        name: str,
        features: int,
        *,
        strict: bool = False,
        batch_size: int | None = None,
    ):
        if strict:
            validate(data, features=features, batch_size=batch_size, name=name)
        if isinstance(data, Tensor):
            if data.is_complex():
                raise DataError(f"{name}: complex values are not supported (dtype {data.dtype})")
            array: Any = data.detach()
        elif isinstance(data, (np.ndarray, Subset)):
            array = data
        else:
            try:
                array = np.asarray(data)
            except (TypeError, ValueError) as err:
                raise DataError(f"{name} cannot be read as a numeric array: {err}") from None
        if not isinstance(array, Tensor) and array.dtype.kind not in "biuf":
            if strict:  # validate accepted it: numeric cells stored as text or objects
                array = np.asarray(array, dtype=np.float64)
            else:
                raise DataError(
                    f"{name} must be numeric, got an array of dtype {array.dtype} (load "
                    "tabular files with exactflow.datasets.load, which names bad cells)"
                )
        if array.ndim != 2:
            raise DataError(f"{name} must be 2-D (rows, features), got shape {tuple(array.shape)}")
        if array.shape[1] != features:
            raise DataError(
                f"{name} has {array.shape[1]} columns but the flow has {features} features"
            )
        if array.shape[0] == 0:
            raise DataError(f"{name} has no rows")
        self.data = array
        self.name = name
        if not strict:
            self._check_finite()

    def __len__(self) -> int:
        return int(self.data.shape[0])

    def _check_finite(self) -> None:
        bad: list[int] = []
        count = 0
        for start, chunk in self.chunks(_SCAN_ROWS):
            if not chunk.is_floating_point():
                continue
            rows = (~torch.isfinite(chunk).all(1)).nonzero().flatten().cpu()
            count += rows.numel()
            bad.extend(int(r) + start for r in rows[: max(0, 5 - len(bad))])
        if count:
            shown = ", ".join(map(str, bad)) + (", ..." if count > len(bad) else "")
            raise DataError(
                f"{self.name}: NaN or inf in {count} row(s) (row indices {shown}); "
                "drop or impute them"
            )

    def take(self, index: Tensor) -> Tensor:
        """The rows at ``index`` (a 1-D long tensor on the CPU), as a tensor."""
        if isinstance(self.data, Tensor):
            return self.data[index.to(self.data.device)]
        rows = np.asarray(self.data[index.numpy()])
        return torch.from_numpy(np.ascontiguousarray(rows))

    def chunks(self, size: int) -> Iterator[tuple[int, Tensor]]:
        """Consecutive slices of at most ``size`` rows, as tensors."""
        for start in range(0, len(self), size):
            part = self.data[start : start + size]
            if not isinstance(part, Tensor):
                part = torch.from_numpy(np.ascontiguousarray(np.asarray(part)))
            yield start, part


def _wrap(
    data: Any,
    name: str,
    features: int,
    rows: int | None = None,
    *,
    strict: bool = False,
    batch_size: int | None = None,
) -> _Rows:
    if isinstance(data, _Rows):
        wrapped = data
    else:
        wrapped = _Rows(data, name, features, strict=strict, batch_size=batch_size)
    if rows is not None and len(wrapped) != rows:
        raise DataError(
            f"{name} has {len(wrapped)} rows but the data has {rows}; give one per data row"
        )
    return wrapped


def _wrap_context(flow: Flow, context: Any, name: str, rows: int) -> _Rows | None:
    need = int(getattr(flow, "context_features", 0))
    if need == 0:
        if context is not None:
            raise ValueError(f"the flow is unconditional (context=0) but {name} was given")
        return None
    if context is None:
        raise ValueError(
            f"the flow is conditional (context={need}): pass {name} with one row per data row"
        )
    return _wrap(context, name, need, rows)


class _Order:
    """Shuffled mini-batches, epoch by epoch, reproducible from ``(seed, epoch, position)``.

    The permutation of epoch ``e`` is drawn from a generator seeded by ``(seed, e)`` only, so
    the data order state is two integers and a resumed run sees the same batches. Each epoch
    holds ``n // batch_size`` full batches (the remainder rows of that epoch's shuffle are
    skipped, which keeps batch statistics of batch norm well defined).
    """

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.per_epoch = n // batch_size
        self.epoch = 0
        self.position = 0
        self._perm: Tensor | None = None

    def next(self) -> Tensor:
        if self._perm is None:
            words = np.random.SeedSequence([self.seed, self.epoch]).generate_state(2, np.uint32)
            gen = torch.Generator().manual_seed(int(words[0]) << 32 | int(words[1]))
            self._perm = torch.randperm(self.n, generator=gen)
        start = self.position * self.batch_size
        index = torch.sort(self._perm[start : start + self.batch_size]).values
        self.position += 1
        if self.position == self.per_epoch:
            self.epoch, self.position, self._perm = self.epoch + 1, 0, None
        return index

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position, self._perm = int(state["epoch"]), int(state["position"]), None


# -- shared machinery -------------------------------------------------------------------


def _resolve_device(device: str | torch.device | None, flow: nn.Module) -> torch.device:
    if device is None:
        ref = next(iter(flow.parameters()), None)
        return ref.device if ref is not None else torch.device("cpu")
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={str(device)!r} was requested but CUDA is not available")
    return dev


def _float_dtype(flow: nn.Module) -> torch.dtype:
    for t in list(flow.parameters()) + list(flow.buffers()):
        if t.is_floating_point():
            return t.dtype
    return torch.get_default_dtype()


@contextmanager
def _forked_rng(device: torch.device, seed: int) -> Iterator[None]:
    """Seed torch's RNG for the run and give the caller's RNG state back afterwards."""
    devices: list[int] = []
    if device.type == "cuda":
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _rng_state(device: torch.device) -> dict[str, Tensor | None]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return {"torch": torch.get_rng_state(), "cuda": cuda}


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"].cpu())
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


def _clone(tree: Any) -> Any:
    """Deep copy of a state dict: tensors cloned, containers rebuilt, plain values kept."""
    if isinstance(tree, Tensor):
        return tree.detach().clone()
    if isinstance(tree, dict):
        return type(tree)((k, _clone(v)) for k, v in tree.items())
    if isinstance(tree, list):
        return [_clone(v) for v in tree]
    if isinstance(tree, tuple):
        return tuple(_clone(v) for v in tree)
    return tree


def _layer_families(flow: nn.Module) -> list[str]:
    names: list[str] = []
    for module in flow.modules():
        if isinstance(module, Transform) and not isinstance(module, (Compose, Inverse)):
            name = type(module).__name__
            if name not in names:
                names.append(name)
    return names


class _Guard:
    """The last good model + optimizer state, and the rollback that restores it.

    :meth:`save` is called every :data:`SNAPSHOT_EVERY` steps, after that step's loss and
    gradients proved finite and before its update is applied, so the snapshot is a state that
    produced a finite loss (parameters and optimizer moments before the update, buffers such
    as batch-norm statistics after the forward pass). A failing step restores it (losing at
    most that many steps of progress) and halves the learning rate. Copying the state every
    step would cost about a tenth of a small model's step time.
    """

    def __init__(self, flow: nn.Module, optimizer: torch.optim.Optimizer):
        self.flow, self.optimizer = flow, optimizer
        self.model_state: dict[str, Tensor] | None = None
        self.optimizer_state: dict[str, Any] | None = None

    def save(self) -> None:
        self.model_state = _clone(self.flow.state_dict())
        self.optimizer_state = _clone(self.optimizer.state_dict())

    def restore(self) -> None:
        if self.model_state is None or self.optimizer_state is None:
            return
        self.flow.load_state_dict(self.model_state)
        # Optimizer.load_state_dict may keep references: hand it a copy of the snapshot.
        self.optimizer.load_state_dict(_clone(self.optimizer_state))
        self.optimizer.zero_grad(set_to_none=True)


def _divergence_error(flow: nn.Module, step: int, lr: float, what: str) -> TrainingError:
    families = ", ".join(_layer_families(flow)) or type(flow).__name__
    return TrainingError(
        f"training diverged at step {step}: the {what} was non-finite (NaN or inf) on "
        f"{MAX_FAILURES} steps in a row, even after rolling back to the last good state and "
        f"halving the learning rate each time (now {lr:.3g}). Layers in this flow: {families}. "
        "Try: a lower learning rate (lr), gradient clipping (grad_clip=1.0), standardizing the "
        "data (exactflow.datasets.Standardize), a larger spline bound or fewer/smaller layers, "
        "and check the data for extreme values."
    )


def _lr_factor(schedule: str, step: int, total: int) -> float:
    """Multiplier of the base learning rate for the 0-based ``step`` of ``total``."""
    if schedule == "constant":
        return 1.0
    return 0.5 * (1.0 + math.cos(math.pi * step / max(total, 1)))


def _progress_bar(enabled: bool, total: int, initial: int, desc: str) -> Any:
    if not enabled or not sys.stderr.isatty():
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, leave=True)


def _positive(value: Any, name: str, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _check_common(lr: float, schedule: str, grad_clip: float | None, seed: int) -> None:
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    if schedule not in ("cosine", "constant"):
        raise ValueError(f"schedule must be 'cosine' or 'constant', got {schedule!r}")
    if grad_clip is not None and not (grad_clip > 0):
        raise ValueError(f"grad_clip must be positive or None, got {grad_clip!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")


# -- evaluation -----------------------------------------------------------------------------


@contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def evaluate(
    flow: Flow,
    data: Any,
    context: Any = None,
    *,
    batch_size: int = 8192,
    device: str | torch.device | None = None,
) -> dict[str, float]:
    """Exact test metrics of a flow on data, in eval mode and under ``torch.inference_mode``.

    The NLL is ``-(1/n) sum_i log p(x_i)``; its standard error is the sample standard
    deviation of ``-log p(x_i)`` over ``sqrt(n)``; bits per dimension are ``NLL / (d ln 2)``.
    Rows whose log-probability is not finite are counted in ``n_nonfinite`` and not
    hidden: then ``nll`` is ``inf`` (a ``-inf`` log-density) or ``nan``, and ``nll_finite``
    gives the mean over the finite rows only. The data are read in slices of ``batch_size``
    rows (a memmap is never loaded whole) and statistics are accumulated in float64.
    The flow's train/eval modes are restored afterwards.

    Args:
        flow: the flow to score.
        data: ``(n, features)`` tensor, array or memmap.
        context: ``(n, context_features)`` for a conditional flow.
        batch_size: rows per forward pass.
        device: where to compute; default the flow's device (a flow elsewhere is moved
            there).

    Returns:
        ``{"nll", "nll_se", "bpd", "bpd_se", "nll_finite", "n", "n_nonfinite"}``.

    Example:
        >>> import torch, exactflow as ef
        >>> flow = ef.Flow(ef.transforms.ElementwiseAffine(2), ef.StandardNormal(2))
        >>> out = ef.evaluate(flow, torch.zeros(4, 2))
        >>> round(out["nll"], 4), out["n"], out["n_nonfinite"]
        (1.8379, 4, 0)
    """
    batch_size = int(_positive(batch_size, "batch_size"))
    rows = _wrap(data, "data", flow.features)
    ctx_rows = _wrap_context(flow, context, "context", len(rows))
    dev = _resolve_device(device, flow)
    if dev != _resolve_device(None, flow):
        flow.to(dev)
    dtype = _float_dtype(flow)
    count, mean, m2 = 0, 0.0, 0.0
    nonfinite, has_nan, has_neg_inf = 0, False, False
    with _eval_mode(flow), torch.inference_mode():
        for start, part in rows.chunks(batch_size):
            x = part.to(dev, dtype)
            ctx = None
            if ctx_rows is not None:
                ctx = ctx_rows.take(torch.arange(start, start + x.shape[0])).to(dev, dtype)
            nll = -flow.log_prob(x, ctx).to(torch.float64)
            finite = torch.isfinite(nll)
            values = nll[finite].cpu().numpy()
            k = int(values.size)
            nonfinite += x.shape[0] - k
            if k < x.shape[0]:
                bad = nll[~finite]
                has_nan |= bool(torch.isnan(bad).any())
                has_neg_inf |= bool((bad == -math.inf).any())
            if k:
                # Chan et al.'s pairwise update of the running mean and sum of squares.
                chunk_mean = float(values.mean())
                chunk_m2 = float(((values - chunk_mean) ** 2).sum())
                delta = chunk_mean - mean
                total = count + k
                mean += delta * k / total
                m2 += chunk_m2 + delta * delta * count * k / total
                count = total
    n = len(rows)
    nll_finite = mean if count else math.nan
    se_finite = math.sqrt(m2 / (count - 1) / count) if count > 1 else math.nan
    if nonfinite == 0:
        nll_all, se = nll_finite, se_finite
    elif has_nan:
        nll_all, se = math.nan, math.nan
    else:
        nll_all, se = (-math.inf if has_neg_inf else math.inf), math.nan
    scale = 1.0 / (flow.features * _LN2)
    return {
        "nll": nll_all,
        "nll_se": se,
        "bpd": nll_all * scale,
        "bpd_se": se * scale,
        "nll_finite": nll_finite,
        "n": n,
        "n_nonfinite": nonfinite,
    }


# -- maximum likelihood -----------------------------------------------------------------------


def fit(
    flow: Flow,
    train: Any,
    val: Any = None,
    *,
    steps: int | None = None,
    epochs: int | None = None,
    batch_size: int = 512,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    schedule: str = "cosine",
    grad_clip: float | None = 5.0,
    patience: int | None = None,
    eval_every: int | None = None,
    progress: bool = True,
    checkpoint: str | Path | None = None,
    checkpoint_every: int | None = None,
    resume: bool = False,
    device: str | torch.device | None = "auto",
    seed: int = 0,
    context: Any = None,
    val_context: Any = None,
    callback: Callable[[History], bool | None] | None = None,
    compile: bool = False,
    distributed: bool | None = None,
) -> History:
    """Fit a flow by maximum likelihood: minimize the mean NLL ``-(1/B) sum_i log p(x_i)``.

    Each step draws a mini-batch (epoch-wise shuffling without replacement), computes the
    exact NLL, clips the gradient norm and takes an Adam step (AdamW when
    ``weight_decay > 0``; with 0 they coincide). The learning rate follows ``schedule``:
    ``"cosine"`` decays it from ``lr`` to 0 over the run, ``"constant"`` keeps it.

    Every ``eval_every`` steps (and at the last) the running mean of the training NLL and
    the validation NLL are recorded in the returned :class:`History`. With validation data
    the weights with the best validation NLL are kept and **restored at the end**, with or
    without ``patience``; ``patience`` additionally stops training after that many
    evaluations without improvement. Without validation data the final weights are kept.

    The flow is put in train mode for the steps and in eval mode for validation (batch-norm
    layers use their running statistics there), and **fit leaves it in eval mode**, on
    ``device``. Non-finite losses or gradients are rolled back (see the module docstring).

    Checkpoints (``checkpoint=path``) are written atomically every ``checkpoint_every``
    steps and at the end: model, optimizer, learning-rate state, RNG states, data-order
    state, step, history, best weights and the rollback snapshot. ``resume=True`` continues
    from that file (or starts afresh if it does not exist yet) and reaches the same result
    as an uninterrupted run with the same arguments; the flow passed in must have the same
    architecture (e.g. rebuilt by the same builder call).

    Args:
        flow: the flow to train (modified in place).
        train: ``(n, features)`` tensor, numpy array or ``np.memmap`` (read per batch).
        val: optional validation data of the same kind.
        steps: number of optimizer steps; or ``epochs`` (``n // batch_size`` steps each).
            With neither, 1000 steps.
        batch_size: rows per step; the data must hold at least one batch.
        lr: Adam learning rate (the peak of the cosine schedule).
        weight_decay: decoupled weight decay (AdamW).
        schedule: ``"cosine"`` or ``"constant"``.
        grad_clip: maximum global gradient norm, ``None`` for no clipping.
        patience: evaluations without improvement of the validation NLL before stopping.
        eval_every: steps between records; default ``max(1, steps // 20)``.
        progress: show a tqdm bar (only when stderr is a terminal and tqdm is installed).
        checkpoint: path of the checkpoint file.
        checkpoint_every: steps between checkpoints; default ``eval_every``.
        resume: continue from ``checkpoint`` if it exists.
        device: ``"auto"`` (CUDA when available), a device, or ``None`` (the flow's).
        seed: seeds the data order and torch's RNG during training.
        context, val_context: conditioning rows for a conditional flow.
        callback: called as ``callback(history)`` after each record; returning ``True``
            stops training (counted as an early stop).
        compile: run the loss and its backward through ``torch.compile`` (opt-in). The
            first step compiles (10-40 s on a CPU), so it pays for long runs of small,
            overhead-bound flows: on 2-D data about 1.4x (MAF, RealNVP) to 3x (NSF) per
            step on a CPU, little for large conditioners whose time is in the matrix
            products (``benchmarks/NOTES.md``). Same values up to rounding.
        distributed: data-parallel training over the ranks of ``torch.distributed``'s
            default process group (:mod:`exactflow.distributed`): ``batch_size`` is the
            global batch, split across ranks, gradients are summed, the result equals one
            process's up to rounding (batch norm excepted: per-rank statistics). ``None``
            (default): on when a group of more than one rank is initialized; ``False``: train
            this process alone even then. Every rank must call ``fit`` alike.

    Returns:
        The :class:`History` of the run.

    Raises:
        ValueError: bad arguments.
        exactflow.datasets.DataError: bad data (a ``ValueError``): NaN/inf rows, wrong
            number of columns, fewer rows than a batch, non-numeric cells, constant
            columns, context rows that do not match the data rows.
        TrainingError: the loss stayed non-finite for five steps in a row.
        CheckpointError: ``resume=True`` with an unreadable or mismatched checkpoint.

    Example:
        >>> import torch, exactflow as ef
        >>> flow = ef.Flow(ef.transforms.ElementwiseAffine(2), ef.StandardNormal(2))
        >>> data = 3.0 + 0.5 * torch.randn(512, 2)
        >>> history = ef.fit(flow, data, steps=200, batch_size=128, lr=0.05, progress=False)
        >>> history.train_nll[-1] < history.train_nll[0]
        True
    """
    if not isinstance(flow, Flow):
        raise TypeError(f"fit expects an exactflow Flow, got {type(flow).__name__}")
    _check_common(lr, schedule, grad_clip, seed)
    batch_size = int(_positive(batch_size, "batch_size"))
    patience = _positive(patience, "patience", allow_none=True)
    if steps is not None and epochs is not None:
        raise ValueError("give steps or epochs, not both")
    if not (weight_decay >= 0):
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
    if resume and checkpoint is None:
        raise ValueError("resume=True needs checkpoint=<path>")

    features = flow.features
    train_rows = _wrap(train, "training data", features, strict=True, batch_size=batch_size)
    train_ctx = _wrap_context(flow, context, "context", len(train_rows))
    val_rows = _wrap(val, "validation data", features, strict=True) if val is not None else None
    if val_rows is None and val_context is not None:
        raise ValueError("val_context was given without val")
    val_ctx = None
    if val_rows is not None:
        val_ctx = _wrap_context(flow, val_context, "val_context", len(val_rows))

    order = _Order(len(train_rows), batch_size, int(seed))
    if steps is None:
        total = order.per_epoch * int(_positive(epochs, "epochs")) if epochs is not None else 1000
    else:
        total = int(_positive(steps, "steps"))
    eval_every = int(_positive(eval_every, "eval_every", True) or max(1, total // 20))
    checkpoint_every = int(_positive(checkpoint_every, "checkpoint_every", True) or eval_every)

    dev = _resolve_device(device, flow)
    flow.to(dev)
    dtype = _float_dtype(flow)
    params = [p for p in flow.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the flow has no trainable parameters")
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    guard = _Guard(flow, optimizer)
    history = History(features=features, objective="nll")
    nll = _nll_function(flow, compile)
    run_args = {
        "n_train": len(train_rows), "batch_size": batch_size, "features": features,
        "seed": int(seed), "total_steps": total, "lr": float(lr), "schedule": schedule,
        "weight_decay": float(weight_decay), "grad_clip": grad_clip,
        "eval_every": eval_every, "patience": patience,
    }
    state: dict[str, Any] = {
        "step": 0, "lr_scale": 1.0, "failures": 0, "finished": False,
        "best_state": None, "since_best": 0, "run_sum": 0.0, "run_count": 0, "elapsed": 0.0,
    }

    replicas = _Replicas.join(distributed, flow, dev, batch_size, {
        **run_args, "n_val": None if val_rows is None else len(val_rows), "resume": resume,
        "checkpoint": checkpoint is not None, "checkpoint_every": checkpoint_every,
        "context": train_ctx is not None, "compile": compile,
    })

    with _forked_rng(dev, int(seed)):
        path = Path(checkpoint) if checkpoint is not None else None
        if resume and path is not None and replicas.exists(path):
            _restore_checkpoint(path, flow, optimizer, guard, order, history, state, run_args, dev)
        else:
            guard.save()
        replicas.initialize(flow, order, train_rows, train_ctx, dev, dtype)
        bar = _progress_bar(progress and replicas.is_main, total, state["step"], "fit")
        clock = time.perf_counter() - state["elapsed"]
        flow.train()
        try:
            while state["step"] < total and not state["finished"]:
                step = state["step"]
                current_lr = lr * state["lr_scale"] * _lr_factor(schedule, step, total)
                for group in optimizer.param_groups:
                    group["lr"] = current_lr
                index = replicas.shard(order.next())
                x = train_rows.take(index).to(dev, dtype, non_blocking=True)
                ctx = None
                if train_ctx is not None:
                    ctx = train_ctx.take(index).to(dev, dtype, non_blocking=True)
                optimizer.zero_grad(set_to_none=True)
                loss = nll(x, ctx)
                loss.backward()
                loss = replicas.average_gradients(loss, params, x.shape[0])
                norm = torch.nn.utils.clip_grad_norm_(
                    params, grad_clip if grad_clip is not None else math.inf
                )
                # One device sync per step: the loss for the log and the finiteness checks.
                pair = torch.stack([loss.detach(), norm.detach().to(loss.dtype)])
                loss_value, norm_value = pair.tolist()
                state["step"] = step + 1
                if math.isfinite(loss_value) and math.isfinite(norm_value):
                    if step % SNAPSHOT_EVERY == 0:
                        guard.save()
                    optimizer.step()
                    state["failures"] = 0
                    state["run_sum"] += loss_value
                    state["run_count"] += 1
                else:
                    what = "loss" if not math.isfinite(loss_value) else "gradient norm"
                    guard.restore()
                    state["lr_scale"] *= 0.5
                    state["failures"] += 1
                    history.rollbacks.append(step + 1)
                    if state["failures"] >= MAX_FAILURES:
                        raise _divergence_error(flow, step + 1, current_lr * 0.5, what)
                if bar is not None:
                    bar.update(1)
                    if math.isfinite(loss_value):
                        bar.set_postfix(nll=f"{loss_value:.4f}", refresh=False)
                done = state["step"]
                if done % eval_every == 0 or done == total:
                    replicas.sync_statistics(flow, done)
                    stop = _record(flow, history, state, done, current_lr, clock, val_rows, val_ctx,
                                   batch_size, patience, replicas)
                    if callback is not None and callback(history):
                        stop = True
                    stop = replicas.any(stop)
                    if stop:
                        history.stopped_early = True
                        state["finished"] = True
                    if bar is not None and history.val_nll[-1] is not None:
                        bar.set_postfix(nll=f"{loss_value:.4f}", val=f"{history.val_nll[-1]:.4f}")
                    flow.train()  # validation ran in eval mode; a callback may switch modes
                due = done % checkpoint_every == 0 or done == total or state["finished"]
                if path is not None and due:
                    replicas.sync_statistics(flow, done)
                    state["elapsed"] = time.perf_counter() - clock
                    if replicas.is_main:
                        _write_checkpoint(
                            path, flow, optimizer, guard, order, history, state, run_args, dev
                        )
        finally:
            if bar is not None:
                bar.close()

    history.total_steps = state["step"]
    if state["best_state"] is not None:
        flow.load_state_dict(state["best_state"])
    flow.eval()
    return history


def _nll_function(flow: Flow, compile: bool) -> Callable[[Tensor, Tensor | None], Tensor]:
    """The mean NLL of a batch, ``-mean(log p(x | ctx))``, compiled with ``compile=True``.

    Shapes are static (``dynamic=False``): every training batch has the same size, so one
    graph serves the whole run (a different size compiles once more).
    """

    def nll(x: Tensor, ctx: Tensor | None) -> Tensor:
        return -flow.log_prob(x, ctx).mean()

    if not compile:
        return nll
    # torch.compile caches graphs per code object, up to a recompile limit (8): every fit
    # of another flow would otherwise count against the same limit and, past it, silently
    # run eagerly. A copy of the code object gives each run its own cache.
    fresh = types.FunctionType(
        nll.__code__.replace(), nll.__globals__, nll.__name__, None, nll.__closure__
    )
    return torch.compile(fresh, dynamic=False)


def _record(
    flow: Flow,
    history: History,
    state: dict[str, Any],
    done: int,
    current_lr: float,
    clock: float,
    val_rows: _Rows | None,
    val_ctx: _Rows | None,
    batch_size: int,
    patience: int | None,
    replicas: _Replicas | None = None,
) -> bool:
    """Append one record to the history; returns whether early stopping triggers."""
    train_nll = state["run_sum"] / state["run_count"] if state["run_count"] else None
    state["run_sum"], state["run_count"] = 0.0, 0
    val_nll = None
    stop = False
    if val_rows is not None:
        replicas = replicas or _Replicas()
        metrics = replicas.evaluate(flow, val_rows, val_ctx, batch_size=max(batch_size, 4096))
        val_nll = metrics["nll"]
        if math.isfinite(val_nll) and (history.best_val is None or val_nll < history.best_val):
            history.best_val, history.best_step = val_nll, done
            state["best_state"] = _clone(flow.state_dict())
            state["since_best"] = 0
        else:
            state["since_best"] += 1
            stop = patience is not None and state["since_best"] >= patience
    history.steps.append(done)
    history.train_nll.append(train_nll)
    history.val_nll.append(val_nll)
    history.lr.append(current_lr)
    history.time.append(time.perf_counter() - clock)
    history.total_steps = done
    return stop


def _write_checkpoint(
    path: Path,
    flow: Flow,
    optimizer: torch.optim.Optimizer,
    guard: _Guard,
    order: _Order,
    history: History,
    state: dict[str, Any],
    run_args: dict[str, Any],
    dev: torch.device,
) -> None:
    payload = {
        "format": _CHECKPOINT_FORMAT,
        "version": _CHECKPOINT_VERSION,
        "step": state["step"],
        "finished": bool(state["finished"]),
        "model": flow.state_dict(),
        "optimizer": optimizer.state_dict(),
        "schedule": {"lr_scale": state["lr_scale"]},
        "rng": _rng_state(dev),
        "order": order.state_dict(),
        "guard": {"model": guard.model_state, "optimizer": guard.optimizer_state},
        "best": {"state": state["best_state"], "since": state["since_best"]},
        "running": {"sum": state["run_sum"], "count": state["run_count"]},
        "failures": state["failures"],
        "elapsed": state["elapsed"],
        "history": asdict(history),
        "run": dict(run_args),
    }
    atomic_save(payload, path)


_MUST_MATCH = ("n_train", "batch_size", "features")


def _restore_checkpoint(
    path: Path,
    flow: Flow,
    optimizer: torch.optim.Optimizer,
    guard: _Guard,
    order: _Order,
    history: History,
    state: dict[str, Any],
    run_args: dict[str, Any],
    dev: torch.device,
) -> None:
    payload = safe_torch_load(path, map_location=dev, what="checkpoint")
    if not isinstance(payload, dict) or payload.get("format") != _CHECKPOINT_FORMAT:
        raise CheckpointError(f"{str(path)!r} is not an exactflow training checkpoint")
    if int(payload.get("version", 0)) > _CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{str(path)!r} is checkpoint format version {payload['version']}; this exactflow "
            f"reads up to {_CHECKPOINT_VERSION}"
        )
    saved = payload["run"]
    for key in _MUST_MATCH:
        if saved.get(key) != run_args[key]:
            raise CheckpointError(
                f"cannot resume from {str(path)!r}: it was written for {key}={saved.get(key)!r}, "
                f"this run has {key}={run_args[key]!r}"
            )
    changed = [k for k in run_args if k not in _MUST_MATCH and saved.get(k) != run_args[k]]
    if changed:
        warnings.warn(
            "resuming with different arguments than the checkpoint was written with ("
            + ", ".join(f"{k}: {saved.get(k)!r} -> {run_args[k]!r}" for k in changed)
            + "); the result will differ from an uninterrupted run",
            stacklevel=3,
        )
    try:
        flow.load_state_dict(payload["model"])
        optimizer.load_state_dict(payload["optimizer"])
    except (RuntimeError, ValueError, KeyError) as err:
        raise CheckpointError(
            f"the checkpoint {str(path)!r} does not fit this flow (a different architecture?): "
            + " ".join(str(err).split())[:500]
        ) from None
    guard.model_state = payload["guard"]["model"]
    guard.optimizer_state = payload["guard"]["optimizer"]
    order.load_state_dict(payload["order"])
    _set_rng_state(payload["rng"], dev)
    restored = History.from_dict(payload["history"])
    for name in History.__dataclass_fields__:
        setattr(history, name, getattr(restored, name))
    state.update(
        step=int(payload["step"]),
        finished=bool(payload["finished"]),
        lr_scale=float(payload["schedule"]["lr_scale"]),
        failures=int(payload["failures"]),
        best_state=payload["best"]["state"],
        since_best=int(payload["best"]["since"]),
        run_sum=float(payload["running"]["sum"]),
        run_count=int(payload["running"]["count"]),
        elapsed=float(payload["elapsed"]),
    )


# -- reverse KL ---------------------------------------------------------------------------------


def _target_fn(target: Any) -> Callable[[Tensor], Tensor]:
    fn = getattr(target, "log_prob", target)
    if not callable(fn):
        raise TypeError(
            "log_prob_target must be a callable x -> log p~(x) or an object with .log_prob, "
            f"got {type(target).__name__}"
        )
    return fn


def estimate_log_normalizer(
    flow: Flow,
    log_prob_target: Any,
    *,
    n: int = 100_000,
    batch_size: int = 16384,
    seed: int | None = None,
) -> dict[str, float]:
    """The evidence lower bound and an importance-sampling estimate of ``log Z``.

    With ``x_i ~ q`` (the flow) and log-weights ``w_i = log p~(x_i) - log q(x_i)``:

    * ``elbo = (1/n) sum_i w_i <= log Z``, standard error ``sd(w) / sqrt(n)``; the gap
      ``log Z - elbo`` is ``KL(q || p)``;
    * ``log_z_is = logsumexp(w) - log n``, an estimate of ``log Z`` (biased low by
      Jensen, consistent); its standard error by the delta method is
      ``sd(exp w) / (sqrt(n) mean(exp w))``;
    * ``ess = (sum e^w)^2 / sum e^(2w)``, the effective sample size.

    Computed in float64 from samples drawn under ``torch.inference_mode`` in eval mode.

    Args:
        flow: the proposal ``q``.
        log_prob_target: ``x -> log p~(x)`` or an object with ``.log_prob``.
        n: number of samples.
        batch_size: samples per pass.
        seed: seeds the draw (in a forked RNG); ``None`` uses the current RNG.

    Returns:
        ``{"elbo", "elbo_se", "log_z_is", "log_z_is_se", "ess", "n", "n_nonfinite"}``
        (``n_nonfinite`` counts non-finite ``log q`` or ``log p~``; a ``-inf`` target
        density, outside its support, is kept as a zero weight).
    """
    fn = _target_fn(log_prob_target)
    n = int(_positive(n, "n"))
    batch_size = int(_positive(batch_size, "batch_size"))
    dev = _resolve_device(None, flow)
    parts: list[Tensor] = []
    bad = 0

    @contextmanager
    def maybe_seed() -> Iterator[None]:
        if seed is None:
            yield
        else:
            with _forked_rng(dev, int(seed)):
                yield

    with maybe_seed(), _eval_mode(flow), torch.inference_mode():
        done = 0
        while done < n:
            k = min(batch_size, n - done)
            x, log_q = flow.sample_and_log_prob(k)
            w = (fn(x).to(torch.float64) - log_q.to(torch.float64)).cpu()
            ok = torch.isfinite(w) | ((w == -math.inf) & torch.isfinite(log_q.cpu()))
            bad += int((~ok).sum())
            parts.append(w)
            done += k
    w = torch.cat(parts)
    elbo = float(w.mean())
    elbo_se = float(w.std() / math.sqrt(n)) if n > 1 else math.nan
    log_z = float(torch.logsumexp(w, 0) - math.log(n))
    shifted = torch.exp(w - w.max())
    mean_e = shifted.mean()
    log_z_se = float(shifted.std() / (math.sqrt(n) * mean_e)) if n > 1 else math.nan
    ess = float(shifted.sum() ** 2 / (shifted * shifted).sum())
    return {
        "elbo": elbo,
        "elbo_se": elbo_se,
        "log_z_is": log_z,
        "log_z_is_se": log_z_se,
        "ess": ess,
        "n": n,
        "n_nonfinite": bad,
    }


def fit_reverse_kl(
    flow: Flow,
    log_prob_target: Any,
    *,
    steps: int = 10_000,
    batch_size: int = 512,
    lr: float = 1e-2,
    schedule: str = "constant",
    anneal_steps: int | None = None,
    beta_start: float = 0.01,
    grad_clip: float | None = 10.0,
    eval_every: int | None = None,
    final_samples: int = 100_000,
    progress: bool = True,
    device: str | torch.device | None = "auto",
    seed: int = 0,
    callback: Callable[[History], bool | None] | None = None,
) -> History:
    """Fit a flow ``q`` to an unnormalized density ``p~`` by minimizing the reverse KL.

    Each step draws ``batch_size`` reparameterized samples ``x ~ q`` with their exact
    ``log q(x)`` (one pass of :meth:`exactflow.Flow.rsample_and_log_prob`, latent -> data)
    and takes an Adam step on the annealed objective

        ``L_t = E_q[log q(x) - beta_t log p~(x)]``,

    where ``beta_t`` rises linearly from ``beta_start`` to 1 over ``anneal_steps`` steps
    (Rezende & Mohamed 2015), which keeps ``q`` from collapsing onto one mode early. At
    ``beta = 1``, ``L = KL(q || p) - log Z``. Non-finite steps are rolled back as in
    :func:`fit`.

    At the end (flow in eval mode) :func:`estimate_log_normalizer` runs on
    ``final_samples`` fresh samples and its result is stored in ``history.final``: the bound
    ``elbo`` with ``elbo_se``, and ``log_z_is`` with ``log_z_is_se``.

    Defaults follow what works for planar flows on Rezende & Mohamed's energies: Adam at lr
    1e-2 with a constant schedule (lr 1e-3 stalls far from the optimum at K = 32). For small
    flows a step's cost is mostly fixed overhead, so more samples per step are nearly free
    and cut the gradient noise: measured here on U1 with 32 planar layers, 600 steps of 2048
    samples reach a KL gap of 0.016-0.017 nats (three seeds), while 500-800 steps of 512
    samples end between 0.018 and 0.049 depending on the seed.

    Args:
        flow: the flow ``q`` (modified in place, left in eval mode on ``device``).
        log_prob_target: ``x -> log p~(x)`` of shape ``(batch,)``, or an object with
            ``.log_prob`` (e.g. ``exactflow.targets.get("U1")``).
        steps: optimizer steps.
        batch_size: samples per step.
        lr: Adam learning rate.
        schedule: ``"constant"`` (default) or ``"cosine"``.
        anneal_steps: length of the linear ramp of ``beta``; default ``steps // 2``;
            0 disables annealing.
        beta_start: initial weight of the energy.
        grad_clip: maximum gradient norm, ``None`` for none.
        eval_every: steps between records; default ``max(1, steps // 50)``.
        final_samples: samples for the final estimates (0 to skip them).
        progress: tqdm bar when stderr is a terminal.
        device: ``"auto"``, a device, or ``None`` (the flow's).
        seed: seeds torch's RNG for the run (the caller's RNG state is restored).
        callback: ``callback(history)`` after each record; ``True`` stops.

    Returns:
        The :class:`History` (``objective="reverse_kl"``; ``train_nll`` holds the batch
        estimate of ``E_q[log q - log p~]``, ``beta`` the annealing weight).

    References:
        Rezende & Mohamed, Variational Inference with Normalizing Flows (2015),
        arXiv:1505.05770.

    Example:
        >>> import exactflow as ef
        >>> flow = ef.models.planar(2, layers=4)
        >>> h = ef.fit_reverse_kl(flow, ef.targets.get("U1"), steps=50, final_samples=2000,
        ...                       progress=False)
        >>> sorted(h.final)
        ['elbo', 'elbo_se', 'ess', 'log_z_is', 'log_z_is_se', 'n', 'n_nonfinite']
    """
    if not isinstance(flow, Flow):
        raise TypeError(f"fit_reverse_kl expects an exactflow Flow, got {type(flow).__name__}")
    if getattr(flow, "context_features", 0):
        raise ValueError("fit_reverse_kl fits unconditional flows (this flow has a context)")
    fn = _target_fn(log_prob_target)
    _check_common(lr, schedule, grad_clip, seed)
    total = int(_positive(steps, "steps"))
    batch_size = int(_positive(batch_size, "batch_size"))
    anneal = total // 2 if anneal_steps is None else int(anneal_steps)
    if anneal < 0:
        raise ValueError(f"anneal_steps must be >= 0, got {anneal_steps!r}")
    if not 0.0 < beta_start <= 1.0:
        raise ValueError(f"beta_start must be in (0, 1], got {beta_start!r}")
    eval_every = int(_positive(eval_every, "eval_every", True) or max(1, total // 50))
    if final_samples < 0:
        raise ValueError(f"final_samples must be >= 0, got {final_samples!r}")

    dev = _resolve_device(device, flow)
    flow.to(dev)
    params = [p for p in flow.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the flow has no trainable parameters")
    optimizer = torch.optim.Adam(params, lr=lr)
    guard = _Guard(flow, optimizer)
    history = History(features=flow.features, objective="reverse_kl")
    lr_scale, failures, run_sum, run_count = 1.0, 0, 0.0, 0

    with _forked_rng(dev, int(seed)):
        guard.save()
        bar = _progress_bar(progress, total, 0, "reverse KL")
        clock = time.perf_counter()
        flow.train()
        try:
            for step in range(total):
                beta = 1.0
                if anneal > 0:
                    beta = min(1.0, beta_start + (1.0 - beta_start) * step / anneal)
                current_lr = lr * lr_scale * _lr_factor(schedule, step, total)
                for group in optimizer.param_groups:
                    group["lr"] = current_lr
                optimizer.zero_grad(set_to_none=True)
                x, log_q = flow.rsample_and_log_prob(batch_size)
                log_p = fn(x)
                loss = (log_q - beta * log_p).mean()
                loss.backward()
                norm = torch.nn.utils.clip_grad_norm_(
                    params, grad_clip if grad_clip is not None else math.inf
                )
                kl = (log_q - log_p).detach().mean()
                loss_value, norm_value, kl_value = torch.stack(
                    [loss.detach(), norm.detach().to(loss.dtype), kl]
                ).tolist()
                if math.isfinite(loss_value) and math.isfinite(norm_value):
                    if step % SNAPSHOT_EVERY == 0:
                        guard.save()
                    optimizer.step()
                    failures = 0
                    run_sum += kl_value
                    run_count += 1
                else:
                    what = "loss" if not math.isfinite(loss_value) else "gradient norm"
                    guard.restore()
                    lr_scale *= 0.5
                    failures += 1
                    history.rollbacks.append(step + 1)
                    if failures >= MAX_FAILURES:
                        raise _divergence_error(flow, step + 1, current_lr * 0.5, what)
                if bar is not None:
                    bar.update(1)
                done = step + 1
                if done % eval_every == 0 or done == total:
                    history.steps.append(done)
                    history.train_nll.append(run_sum / run_count if run_count else None)
                    history.val_nll.append(None)
                    history.lr.append(current_lr)
                    history.time.append(time.perf_counter() - clock)
                    history.beta.append(beta)
                    history.total_steps = done
                    run_sum, run_count = 0.0, 0
                    if bar is not None and history.train_nll[-1] is not None:
                        bar.set_postfix(
                            kl_minus_logz=f"{history.train_nll[-1]:.4f}", beta=f"{beta:.2f}"
                        )
                    if callback is not None and callback(history):
                        history.stopped_early = True
                        break
        finally:
            if bar is not None:
                bar.close()
        flow.eval()
        if final_samples:
            history.final = estimate_log_normalizer(flow, fn, n=final_samples)
    return history
