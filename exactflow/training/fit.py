"""Maximum likelihood: :func:`fit` minimizes the mean NLL ``-(1/n) sum_i log p(x_i)``.

The NLL is in nats; bits per dimension are ``NLL / (d ln 2)``. The loop (rollbacks,
schedule, records, checkpoints) is :func:`~exactflow.training.loop.run_loop`; this module
adds what is particular to data: batches, validation with the best weights kept, early
stopping, the standardization layer filled from the training data, and data-parallel
training over a process group.
"""

from __future__ import annotations

import math
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..distributions import Flow
from ..models import standardize_layer
from ..scoring import module_dtype
from ..transforms.normalization import Standardize
from ..validation import non_negative_float, positive_int
from .batches import Order, Rows, wrap, wrap_context
from .checkpoints import Checkpoint
from .history import History
from .loop import (
    Guard,
    LoopSettings,
    TrainState,
    check_common,
    clone,
    forked_rng,
    resolve_device,
    run_loop,
)
from .parallel import Replicas

__all__ = ["fit"]


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

    A flow built with ``standardize=True`` whose :class:`~exactflow.transforms.Standardize`
    layer is still the identity gets the training data's column means and standard
    deviations (float64) before the first step, so its ``log_prob`` is in the units of the
    data.

    The flow is put in train mode for the steps and in eval mode for validation (batch-norm
    layers use their running statistics there), and **fit leaves it in eval mode**, on
    ``device``. Non-finite losses or gradients are rolled back (see
    :mod:`exactflow.training.loop`).

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
            default process group (:mod:`exactflow.training.parallel`): ``batch_size`` is
            the global batch, split across ranks, gradients are summed, the result equals
            one process's up to rounding (batch norm excepted: per-rank statistics).
            ``None`` (default): on when a group of more than one rank is initialized;
            ``False``: train this process alone even then. Every rank must call ``fit``
            alike.

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
    check_common(lr, schedule, grad_clip, seed)
    batch_size = positive_int(batch_size, "batch_size")
    patience = None if patience is None else positive_int(patience, "patience")
    if steps is not None and epochs is not None:
        raise ValueError("give steps or epochs, not both")
    weight_decay = non_negative_float(weight_decay, "weight_decay")
    if resume and checkpoint is None:
        raise ValueError("resume=True needs checkpoint=<path>")

    features = flow.features
    train_rows = wrap(train, "training data", features, strict=True, batch_size=batch_size)
    train_ctx = wrap_context(flow, context, "context", len(train_rows))
    val_rows = wrap(val, "validation data", features, strict=True) if val is not None else None
    if val_rows is None and val_context is not None:
        raise ValueError("val_context was given without val")
    val_ctx = None
    if val_rows is not None:
        val_ctx = wrap_context(flow, val_context, "val_context", len(val_rows))

    order = Order(len(train_rows), batch_size, int(seed))
    if steps is None:
        total = order.per_epoch * positive_int(epochs, "epochs") if epochs is not None else 1000
    else:
        total = positive_int(steps, "steps")
    eval_every = max(1, total // 20) if eval_every is None else positive_int(
        eval_every, "eval_every")
    checkpoint_every = eval_every if checkpoint_every is None else positive_int(
        checkpoint_every, "checkpoint_every")

    if not resume:
        _fill_standardization(flow, train_rows)
    dev = resolve_device(device, flow)
    flow.to(dev)
    dtype = module_dtype(flow)
    params: list[Tensor] = [p for p in flow.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the flow has no trainable parameters")
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    guard = Guard(flow, optimizer)
    history = History(features=features, objective="nll")
    state = TrainState()
    nll = _nll_function(flow, compile)
    run_args = {
        "n_train": len(train_rows), "batch_size": batch_size, "features": features,
        "seed": int(seed), "total_steps": total, "lr": float(lr), "schedule": schedule,
        "weight_decay": float(weight_decay), "grad_clip": grad_clip,
        "eval_every": eval_every, "patience": patience,
    }
    replicas = Replicas.join(distributed, flow, dev, batch_size, {
        **run_args, "n_val": None if val_rows is None else len(val_rows), "resume": resume,
        "checkpoint": checkpoint is not None, "checkpoint_every": checkpoint_every,
        "context": train_ctx is not None, "compile": compile,
    })

    def step(i: int) -> tuple[Tensor, Tensor]:
        index = replicas.shard(order.next())
        x = train_rows.take(index).to(dev, dtype, non_blocking=True)
        ctx = None
        if train_ctx is not None:
            ctx = train_ctx.take(index).to(dev, dtype, non_blocking=True)
        loss = nll(x, ctx)
        loss.backward()
        loss = replicas.average_gradients(loss, params, x.shape[0])
        return loss, loss

    def record(done: int, current_lr: float, clock: float) -> bool:
        val_nll = None
        stop = False
        if val_rows is not None:
            metrics = replicas.evaluate(flow, val_rows, val_ctx, batch_size=max(batch_size, 4096))
            val_nll = metrics["nll"]
            if math.isfinite(val_nll) and (history.best_val is None or val_nll < history.best_val):
                history.best_val, history.best_step = val_nll, done
                state.best_state = clone(flow.state_dict())
                state.since_best = 0
            else:
                state.since_best += 1
                stop = patience is not None and state.since_best >= patience
        history.steps.append(done)
        history.train_nll.append(state.take_running_mean())
        history.val_nll.append(val_nll)
        history.lr.append(current_lr)
        history.time.append(time.perf_counter() - clock)
        return stop

    ckpt = None
    if checkpoint is not None:
        ckpt = Checkpoint(Path(checkpoint), flow, optimizer, guard, state, history, run_args,
                          dev, order)

    settings = LoopSettings(
        total=total, lr=lr, schedule=schedule, grad_clip=grad_clip, eval_every=eval_every,
        checkpoint_every=checkpoint_every, desc="fit", progress=progress, postfix=_postfix,
    )
    with forked_rng(dev, int(seed)):
        if resume and ckpt is not None and replicas.exists(ckpt.path):
            ckpt.restore()
        else:
            guard.save()
        replicas.initialize(flow, order, train_rows, train_ctx, dev, dtype)
        run_loop(
            flow, optimizer, params, guard, state, history, settings, step, record,
            peers=replicas, checkpoint=None if ckpt is None else ckpt.write,
            callback=callback,
        )

    if state.best_state is not None:
        flow.load_state_dict(state.best_state)
    flow.eval()
    return history


def _postfix(history: History) -> dict[str, str]:
    out = {}
    if history.train_nll and history.train_nll[-1] is not None:
        out["nll"] = f"{history.train_nll[-1]:.4f}"
    if history.val_nll and history.val_nll[-1] is not None:
        out["val"] = f"{history.val_nll[-1]:.4f}"
    return out


def _fill_standardization(flow: Flow, rows: Rows) -> None:
    """Fill a builder's ``standardize=True`` layer from the training rows if still unset."""
    layer = standardize_layer(flow)
    if layer is None or not _is_identity(layer):
        return
    mean, std = Standardize.statistics(rows.data, name="training data")
    layer.set_statistics(mean, std)


def _is_identity(layer: Standardize) -> bool:
    return bool(torch.all(layer.mean == 0)) and bool(torch.all(layer.std == 1))


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
