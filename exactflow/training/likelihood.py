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
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..datasets import check_full_rank, column_names
from ..distributions import Flow
from ..scoring import module_dtype
from ..validation import (
    DataError,
    counted,
    fraction,
    non_negative_float,
    not_a_flow,
    positive_float,
    positive_int,
    warn_user,
)
from .advice import TrainingError, data_advice, gentler_lr
from .batches import Order, default_batch_size, hold_out, to_device, wrap, wrap_context
from .calibrate import (
    far_context_error,
    noise_std,
    prepare,
    recalibrate_batch_norm,
    warn_if_far_training_context,
    warn_if_unstandardized,
)
from .checkpoints import Checkpoint
from .compiled import LossFunction
from .history import History
from .loop import (
    Guard,
    LoopSettings,
    TrainState,
    adam,
    check_common,
    clone,
    forked_rng,
    resolve_device,
    run_loop,
)
from .metrics import evaluate, unscorable_error
from .parallel import Replicas

__all__ = ["fit", "default_batch_size"]

#: Without steps or epochs, training stops when validation has not improved in this many epochs...
DEFAULT_PATIENCE_EPOCHS = 20
#: ...or this many epochs have passed.
DEFAULT_MAX_EPOCHS = 400
#: Without validation data and without steps or epochs: a fixed number of steps.
DEFAULT_STEPS_WITHOUT_VALIDATION = 1000
#: For compile="auto": the epochs a run whose length validation sets is expected to take.
EXPECTED_EPOCHS = 60
#: With long epochs, the validation NLL is computed at least this often (steps).
MAX_STEPS_BETWEEN_EVALUATIONS = 500


def fit(
    flow: Flow,
    train: Any,
    val: Any = None,
    *,
    steps: int | None = None,
    epochs: int | None = None,
    batch_size: int | None = None,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    schedule: str | None = None,
    grad_clip: float | None = 5.0,
    patience: int | None = None,
    eval_every: int | None = None,
    val_fraction: float = 0.1,
    noise: float | str | None = None,
    max_epochs: int | None = None,
    progress: bool = True,
    checkpoint: str | Path | None = None,
    checkpoint_every: int | None = None,
    resume: bool = False,
    device: str | torch.device | None = "auto",
    seed: int = 0,
    context: Any = None,
    val_context: Any = None,
    callback: Callable[[History], bool | None] | None = None,
    time_limit: float | None = None,
    compile: bool | str = "auto",
    distributed: bool | None = None,
    ddp: bool | Mapping[str, Any] = True,
    sync_batch_norm: bool = False,
    precision: str = "fp32",
    accumulate: int = 1,
) -> History:
    """Fit a flow by maximum likelihood: minimize the mean NLL ``-(1/B) sum_i log p(x_i)``.

    Each step draws a mini-batch (epoch-wise shuffling without replacement), computes the
    exact NLL, clips the gradient norm and takes an Adam step (AdamW when
    ``weight_decay > 0``; with 0 they coincide).

    **With no options, training length is set by validation**: ``val_fraction`` of the rows
    are held out (unless ``val`` is given), the validation NLL is computed every epoch (at
    least every 500 steps) and at step 0, training stops once it has not improved for
    ``patience`` epochs (default 20, at most ``max_epochs``, default 400) at a constant
    learning rate, and the weights of the best record are **restored at the end** (the
    record of step 0 included, so a model that starts at a classical fit, ``base=
    "gaussian"``, can only improve on it). ``History.best_step`` says which step was kept.
    The batch size follows the number of training rows (about 8 batches an epoch, 32 to
    256 rows). With ``steps`` or ``epochs`` the length is fixed (a cosine schedule by
    default) and ``patience``, if given, still stops early.

    Before the first step, data-dependent layers are set from the training rows: a
    builder's ``standardize=True`` layer gets the columns' means and standard deviations
    (float64), the context scaler those of the context, and a Gaussian or mixture base its
    closed-form or EM fit (see :mod:`exactflow.training.calibrate`); a classical model
    (:func:`exactflow.models.gaussian`, :func:`~exactflow.models.gmm`) is then fitted and
    takes no gradient step. After the last step, batch-norm layers get the population
    statistics of the training set where validation scores that no worse (``best_val``:
    the returned flow's).

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
        train: ``(n, features)`` tensor, numpy array, ``np.memmap``,
            :class:`~exactflow.datasets.Shards` or a path (a folder of shards, a file), read
            per batch; above 4M rows the shuffle needs no index array.
        val: optional validation data of the same kind (streamed in chunks).
        steps: a fixed number of optimizer steps; or ``epochs`` (``n // batch_size`` steps
            each). With neither, the length is set by validation (see above); without
            validation data either, 1000 steps.
        batch_size: rows per step; default: about 8 batches an epoch, 32 to 256 rows.
        lr: Adam learning rate (the peak of the cosine schedule).
        weight_decay: decoupled weight decay (AdamW).
        schedule: ``"cosine"`` (the default with ``steps`` or ``epochs``) or ``"constant"``
            (the default otherwise).
        grad_clip: maximum global gradient norm, ``None`` for no clipping.
        patience: epochs without improvement of the validation NLL before stopping
            (default 20 when the length is set by validation, none otherwise).
        eval_every: steps between records; default one epoch (at most 500 steps), and
            at most ``steps // 20`` with a fixed length (only that without validation).
        val_fraction: the fraction of the training rows held out for validation when
            ``val`` is not given (0 for none). A classical model is fitted to every row
            (it chooses nothing on held-out rows; 10% held out cost 0.55 nats a row at
            200 columns): give ``val`` to measure it.
        noise: noise regularization: Gaussian noise added to every training batch, in units
            of each column's standard deviation, or ``"auto"`` for ``0.25 n^(-1/(4+d))``
            (Rothfuss et al. 2019, arXiv:1907.08982); ``None`` for none.
        max_epochs: the cap on the length set by validation (default 400).
        progress: show a tqdm bar when stderr is a terminal (and tqdm is installed), and
            elsewhere (a log file, a pipe, a notebook) a line every 30 seconds.
        checkpoint: path of the checkpoint file.
        checkpoint_every: steps between checkpoints; default ``eval_every``.
        resume: continue from ``checkpoint`` if it exists.
        device: ``"auto"`` (CUDA when available), a device, or ``None`` (the flow's).
        seed: seeds the data order and torch's RNG during training.
        context, val_context: conditioning rows for a conditional flow.
        callback: called as ``callback(history)`` after each record; returning ``True``
            stops training (counted as an early stop).
        time_limit: seconds after the call at which training stops, with a last
            validation record (counted as an early stop; the best step is kept): the
            preparation (the standardization, a classical base's fit) counts too, and the
            clock is read every 8 steps. ``compile="auto"`` stays eager with less than 4
            minutes of the limit left, as a compile cannot be cut short.
        compile: run the loss and its backward through ``torch.compile``: ``"auto"``
            (default) times eager steps, compiles only when the run is long enough to repay
            a compile (10-40 s on a CPU), then keeps compiled steps only if they are faster
            (:mod:`exactflow.training.compiled`; the decision is in ``History.compiled``);
            ``True`` compiles from the second step (the first, eager, initializes ActNorm
            layers), ``False`` never. Compiled steps give the same values up to rounding.
        distributed: data-parallel training over the ranks of ``torch.distributed``'s
            default process group (:mod:`exactflow.training.parallel`): ``batch_size`` is
            the global batch, split across ranks, gradients are summed, the result equals
            one process's up to rounding (batch norm too with ``sync_batch_norm=True``).
            ``None`` (default): on when a group of more than one rank is initialized;
            ``False``: train this process alone even then. Every rank must call ``fit``
            alike. See ``docs/distributed.md``.
        ddp: ``True``: DistributedDataParallel with exactflow's defaults; a dict: with
            these DDP options (plus ``"comm_hook": (state, hook)``); ``False``: one flat
            all-reduce after the backward (:mod:`~exactflow.training.engines`).
        sync_batch_norm: batch norm by the global batch's statistics across ranks
            (default ``False``: each rank's share, as ``torch.nn.BatchNorm1d`` under DDP).
        precision: ``"fp32"`` or ``"bf16"`` (autocast; layer outputs, log-dets and the loss
            in float32; :mod:`~exactflow.training.precision`).
        accumulate: micro-batches per step and rank (gradients sent once, ``no_sync``).

    Returns:
        The :class:`History` of the run.

    Raises:
        ValueError: bad arguments.
        exactflow.datasets.DataError: bad data (a ``ValueError``): NaN/inf rows, wrong
            number of columns, no more training rows than features, fewer rows than
            ``batch_size`` (when given), non-numeric cells, constant columns, linearly
            dependent columns (:func:`exactflow.datasets.check_full_rank`), context rows
            that do not match the data rows, validation rows scored ``-inf`` at the start.
        TrainingError: the run diverged: the loss or gradient non-finite five steps in a
            row, or the NLL far above where it started (the flow then holds its best weights).
        CheckpointError: ``resume=True`` with an unreadable or mismatched checkpoint.

    Example:
        >>> import torch, exactflow as ef
        >>> flow = ef.Flow(ef.transforms.ElementwiseAffine(2), ef.StandardNormal(2))
        >>> _ = torch.manual_seed(0)
        >>> data = 3.0 + 0.5 * torch.randn(1000, 2)
        >>> history = ef.fit(flow, data, lr=0.05, progress=False)  # length set by validation
        >>> history.steps[0], history.best_step > 0
        (0, True)
        >>> nll = ef.evaluate(flow, data)["nll"]  # about the entropy, log(2 pi e 0.25) = 1.45
        >>> abs(nll - 1.45) < 0.05
        True
    """
    called = time.perf_counter()  # (time_limit counts from here: preparation included)
    if not isinstance(flow, Flow):
        raise not_a_flow("fit", flow)
    if steps is not None and epochs is not None:
        raise ValueError("give steps or epochs, not both")
    fixed_length = steps is not None or epochs is not None
    schedule = schedule if schedule is not None else ("cosine" if fixed_length else "constant")
    check_common(lr, schedule, grad_clip, seed)
    patience = None if patience is None else positive_int(patience, "patience")
    weight_decay = non_negative_float(weight_decay, "weight_decay")
    val_fraction = fraction(val_fraction, "val_fraction", allow_zero=True)
    if resume and checkpoint is None:
        raise ValueError("resume=True needs checkpoint=<path>")

    features = flow.features
    if val is None and val_context is not None:
        raise ValueError("val_context was given without val")
    # Checked whole first, so that messages name the user's own row numbers.
    train_rows = wrap(train, "training data", features, strict=True)
    if features > 1:  # (on the first rows: all rows only if those are dependent)
        check_full_rank(train_rows.data, "training data", column_names(train),
                        first_rows=max(1000, 4 * features))
    train_ctx = wrap_context(flow, context, "context", len(train_rows),
                             " (a keyword argument: ef.fit's third positional argument is val)")
    if train_ctx is not None and not resume:  # (the user's row numbers, before a hold-out)
        warn_if_far_training_context(train_ctx)
    val_rows = val_ctx = None
    if val is not None:
        val_rows = wrap(val, "validation data", features, strict=True)
        val_ctx = wrap_context(flow, val_context, "val_context", len(val_rows))
    elif val_fraction > 0 and any(p.requires_grad for p in flow.parameters()):
        train_rows, train_ctx, val_rows, val_ctx = hold_out(train_rows, train_ctx, val_fraction,
            int(seed), None if fixed_length else DEFAULT_STEPS_WITHOUT_VALIDATION)
    if batch_size is None:
        batch_size = default_batch_size(len(train_rows))
    batch_size = positive_int(batch_size, "batch_size")
    if batch_size > len(train_rows):
        raise DataError(
            f"training data has {counted(len(train_rows), 'row')}, fewer than one batch "
            f"(batch_size={batch_size}): lower batch_size or add data"
        )

    order = Order(len(train_rows), batch_size, int(seed))
    per_epoch = order.per_epoch
    if steps is not None:
        total = positive_int(steps, "steps")
    elif epochs is not None:
        total = per_epoch * positive_int(epochs, "epochs")
    elif val_rows is None:
        total = DEFAULT_STEPS_WITHOUT_VALIDATION
    else:
        cap = DEFAULT_MAX_EPOCHS if max_epochs is None else positive_int(max_epochs, "max_epochs")
        total = per_epoch * cap
    if eval_every is None:  # every epoch where validation keeps the best step (steps // 20
        # alone checked a 100,000-step run every 5,000 steps), 20 records in a fixed length
        limits = [total // 20] if fixed_length or val_rows is None else []
        if val_rows is not None:
            limits += [per_epoch, MAX_STEPS_BETWEEN_EVALUATIONS]
        eval_every = max(1, min(limits))
    eval_every = positive_int(eval_every, "eval_every")
    if patience is None and not fixed_length and val_rows is not None:
        patience = DEFAULT_PATIENCE_EPOCHS
    # Patience is counted in epochs; records come every eval_every steps.
    patience_records = None if patience is None else max(
        1, math.ceil(patience * per_epoch / eval_every))
    checkpoint_every = eval_every if checkpoint_every is None else positive_int(
        checkpoint_every, "checkpoint_every")

    # A resume restores what prepare() filled from the checkpoint; with no checkpoint yet
    # (a run stopped before its first one), the run starts afresh, prepared.
    resuming = resume and Path(checkpoint).exists()  # type: ignore[arg-type]
    if not resuming:
        prepare(flow, train_rows, train_ctx, int(seed))
    warn_if_unstandardized(flow, train_rows, train_ctx)
    if val is not None and val_ctx is not None and train_ctx is not None and (
            err := far_context_error(train_ctx, val_ctx)):
        raise err
    # (A resume measures the noise after the restore, in the standardization it brings.)
    noise_scale = None if resuming else noise_std(noise, flow, train_rows)
    dev = resolve_device(device, flow)
    flow.to(dev)
    dtype = module_dtype(flow)
    params: list[Tensor] = [p for p in flow.parameters() if p.requires_grad]
    history = History(features=features, objective="nll")
    history.held_out = None if val is not None or val_rows is None else val_rows.origin
    if not params:  # a classical model: fitted in closed form by prepare()
        if val_rows is not None:
            metrics = evaluate(flow, val_rows, val_ctx, batch_size=max(batch_size, 4096))
            if err := unscorable_error(flow, val_rows, val_ctx, "validation data",
                                       train_rows, train_ctx, metrics["nll"]):
                raise err
            history.steps, history.val_nll, history.train_nll = [0], [metrics["nll"]], [None]
            history.lr, history.time = [0.0], [0.0]
            history.best_step, history.best_val = 0, metrics["nll"]
        flow.eval()
        return history
    optimizer = adam(params, lr, weight_decay)
    guard = Guard(flow, optimizer)
    state = TrainState()
    run_args = {
        "n_train": len(train_rows), "batch_size": batch_size, "features": features,
        "data": None if checkpoint is None else train_rows.digest(), "seed": int(seed),
        "total_steps": total, "lr": float(lr), "schedule": schedule, "grad_clip": grad_clip,
        "weight_decay": float(weight_decay), "eval_every": eval_every, "patience": patience,
    }
    replicas = Replicas.join(distributed, flow, dev, batch_size, {
        **run_args, "n_val": None if val_rows is None else len(val_rows), "resume": resume,
        "checkpoint": checkpoint is not None, "checkpoint_every": checkpoint_every,
        "context": train_ctx is not None, "compile": compile,
    }, ddp=ddp, sync_batch_norm=sync_batch_norm, precision=precision, accumulate=accumulate)
    expected = total if fixed_length or val_rows is None else min(
        total, EXPECTED_EPOCHS * per_epoch)
    stop_at = None if time_limit is None else called + positive_float(time_limit, "time_limit")
    nll = LossFunction(lambda: replicas.model, compile, expected, stop_at)

    def step(i: int) -> tuple[Tensor, Tensor]:
        batch = order.next()
        index = replicas.shard(batch)
        x = to_device(train_rows.take(index), dev, flow.input_dtype)
        ctx = None if train_ctx is None else to_device(train_ctx.take(index), dev,
                                                       flow.context_dtype)
        if noise_scale is not None:  # the global batch's noise, this rank's rows of it
            noise = torch.randn(len(batch), x.shape[1], device=x.device, dtype=x.dtype)
            x = x + noise_scale * replicas.shard(noise)

        def compute(lo: int, hi: int) -> tuple[Tensor, Tensor]:
            loss = nll(x[lo:hi], None if ctx is None else ctx[lo:hi])
            return loss, loss

        return replicas.backward(compute, x.shape[0])

    def record(done: int, current_lr: float, clock: float) -> bool:
        val_nll = None
        stop = False
        train_nll = state.take_running_mean()
        if val_rows is not None:
            metrics = replicas.evaluate(flow, val_rows, val_ctx, batch_size=max(batch_size, 4096))
            val_nll = metrics["nll"]
            if math.isfinite(val_nll) and (history.best_val is None or val_nll < history.best_val):
                history.best_val, history.best_step = val_nll, done
                state.best_state = clone(flow.state_dict())
                state.since_best = 0
            else:
                state.since_best += 1
                stop = patience_records is not None and state.since_best >= patience_records
        history.steps.append(done)
        history.train_nll.append(train_nll)
        history.val_nll.append(val_nll)
        _check_divergence(history, train_nll, features, lr, data_advice(flow))
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
        stop_at=stop_at,
    )
    with forked_rng(dev, int(seed)):
        if resume and ckpt is not None and replicas.exists(ckpt.path):
            ckpt.restore()  # the standardization the noise is measured in comes back too
            noise_scale = noise_std(noise, flow, train_rows)
            if state.step >= total:
                warn_user(f"the checkpoint is at step {state.step}, at or past this run's "
                          f"{total} steps: no step is trained (give more steps to go on)")
        else:
            guard.save()
            if val_rows is not None:  # step 0: the model as it starts is a candidate too
                record(0, lr, time.perf_counter())  # (the rate its first step will take)
                settings.record_seconds = history.time[0]  # (a record's length: its own clock)
                if err := unscorable_error(flow, val_rows, val_ctx, "validation data",
                                           train_rows, train_ctx, history.val_nll[0]):
                    raise err
                flow.train()
        if noise_scale is not None:
            noise_scale = noise_scale.to(dev, dtype)
        replicas.initialize(flow, order, train_rows, train_ctx, dev, dtype,
                            noisy=noise_scale is not None)
        nll.start(max(0, expected - state.step))
        with replicas.attach(flow):
            run_loop(
                flow, optimizer, params, guard, state, history, settings, step, record,
                peers=replicas, checkpoint=None if ckpt is None else ckpt.write,
                callback=callback,
            )

    if state.best_state is not None:
        flow.load_state_dict(state.best_state)
    history.best_val = recalibrate_batch_norm(  # (kept where validation scores no worse)
        flow, train_rows, train_ctx, int(seed), best=history.best_val, score=None if val_rows
        is None else lambda: replicas.evaluate(flow, val_rows, val_ctx, batch_size=4096)["nll"])
    history.compiled = nll.decision
    flow.eval()
    return history


def _postfix(history: History) -> dict[str, str]:
    out = {}
    if history.train_nll and history.train_nll[-1] is not None:
        out["nll"] = f"{history.train_nll[-1]:.4f}"
    if history.val_nll and history.val_nll[-1] is not None:
        out["val"] = f"{history.val_nll[-1]:.4f}"
    return out


#: A training NLL this many nats per dimension, plus a tenth of its size, above its first
#: record: the run diverged.
DIVERGED_NATS_PER_DIM = 5.0


def _check_divergence(history: History, train_nll: float | None, d: int, lr: float,
                      advice: str) -> None:
    """Stop a run whose optimization blew up: the training NLL far above its first record,
    or the validation NLL far above the start while the training NLL is no better than the
    start either (a model that overfits fits its training rows better; this one fits
    nothing)."""
    if train_nll is None:
        return
    margin = DIVERGED_NATS_PER_DIM * d
    first = next((v for v in history.train_nll if v is not None), None)
    start = history.val_nll[0] if history.val_nll and history.steps[0] == 0 else None
    last = history.val_nll[-1] if history.val_nll else None
    what = None
    if first is not None and train_nll > first + margin + 0.1 * abs(first):  # (1e4 +- 30)
        what = f"the training NLL rose from {first:.4g} to {train_nll:.4g} nats"
    elif (start is not None and last is not None and math.isfinite(start)
          and last > start + margin + 0.1 * abs(start) and train_nll > start):
        what = (f"the validation NLL went from {start:.4g} at the start to {last:.4g} nats "
                f"and the training NLL is {train_nll:.4g}")
        if last == math.inf or last > start + 1000 * margin:  # often the rows' fault
            advice = (f"look for validation rows (or context) far beyond the training rows, "
                      f"where the model now puts no density; or {advice}")
    if what is not None:
        raise TrainingError(
            f"training diverged: {what} (worse by more than {DIVERGED_NATS_PER_DIM:g} nats "
            "per dimension and a tenth of the NLL it started from, together). Lower the "
            f"learning rate (lr, --lr; now {lr:.3g}, try {gentler_lr(lr):.3g}) or {advice}."
        )
