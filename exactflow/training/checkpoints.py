"""Training checkpoints: everything a run needs to resume exactly, written atomically.

A checkpoint is one ``torch.save`` archive of tensors and plain types, read back with
``weights_only=True`` (a file can never run code). It holds the model and optimizer state,
the :class:`~exactflow.training.loop.TrainState`, the RNG state, the rollback snapshot,
the data order, the history and the run's arguments; a resume checks that the arguments
that shape the run (data size, batch size, features) match.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..io import CheckpointError, atomic_save, payload_digest, safe_torch_load, state_digest
from ..io.integrity import check_dense
from ..validation import warn_user
from .history import History
from .loop import Guard, TrainState, rng_state, set_rng_state

__all__ = ["Checkpoint", "CHECKPOINT_FORMAT"]

CHECKPOINT_FORMAT = "exactflow-checkpoint"
CHECKPOINT_VERSION = 1

#: Run arguments a checkpoint must agree on to be resumed at all.
MUST_MATCH = ("n_train", "batch_size", "features")


@dataclass
class Checkpoint:
    """The checkpoint file of a run and the objects it saves and restores in place."""

    path: Path
    flow: torch.nn.Module
    optimizer: torch.optim.Optimizer
    guard: Guard
    state: TrainState
    history: History
    run_args: dict[str, Any]
    device: torch.device
    order: Any = None

    def write(self) -> None:
        """Write the checkpoint atomically."""
        state = self.state
        payload = {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "step": state.step,
            "finished": bool(state.finished),
            "model": self.flow.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": {"lr_scale": state.lr_scale},
            "rng": rng_state(self.device),
            "order": None if self.order is None else self.order.state_dict(),
            "guard": {"model": self.guard.model_state, "optimizer": self.guard.optimizer_state},
            "best": {"state": state.best_state, "since": state.since_best},
            "running": {"sum": state.run_sum, "count": state.run_count},
            "failures": state.failures,
            "elapsed": state.elapsed,
            "history": self.history.saved(),
            "run": dict(self.run_args),
        }
        payload["sha256"] = payload_digest(payload)  # (every entry: a flipped byte anywhere)
        atomic_save(payload, self.path)

    def restore(self) -> None:
        """Restore the run from the file (every object updated in place).

        Raises:
            CheckpointError: the file is unreadable, foreign, damaged, newer than this
                exactflow, written for other data or batch size, or for another
                architecture.
        """
        path = self.path
        payload = safe_torch_load(path, map_location=self.device, what="checkpoint")
        if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(f"{str(path)!r} is not an exactflow training checkpoint")
        version = payload.get("version")
        if not isinstance(version, int):
            raise CheckpointError(f"{str(path)!r} is a damaged checkpoint: no format version")
        if version > CHECKPOINT_VERSION:
            raise CheckpointError(
                f"{str(path)!r} is checkpoint format version {version}; this exactflow "
                f"reads up to {CHECKPOINT_VERSION}"
            )
        check_dense(str(path), payload)
        # A SHA-256 of every entry; of the weights alone in the checkpoints of 0.2.0.dev0
        # builds; none in exactflow 0.1's.
        whole, weights = payload.pop("sha256", None), payload.get("model_sha256")
        if whole is not None:
            intact = whole == payload_digest(payload)
        else:
            intact = weights is None or (isinstance(payload.get("model"), dict)
                                         and weights == state_digest(payload["model"]))
        if not intact:
            what = "entries" if whole is not None else "weights"
            raise CheckpointError(
                f"{str(path)!r} is a damaged checkpoint: its {what} do not match the "
                "SHA-256 saved with them (a changed byte: a bad disk or copy); delete it and "
                "train again, or resume from a good copy")
        try:
            _restore(self, payload)
        except CheckpointError:
            raise
        except KeyError as err:
            raise CheckpointError(
                f"{str(path)!r} is a damaged checkpoint: its {err.args[0]!r} entry is missing; "
                "delete it and train again, or resume from a good copy"
            ) from None
        except (TypeError, ValueError, AttributeError, IndexError, RuntimeError,
                OverflowError) as err:
            raise CheckpointError(
                f"{str(path)!r} is a damaged checkpoint ({type(err).__name__}: "
                f"{' '.join(str(err).split())[:300]}); delete "
                "it and train again, or resume from a good copy"
            ) from None


def _restore(ckpt: Checkpoint, payload: dict[str, Any]) -> None:
    path, run_args, flow, state = ckpt.path, ckpt.run_args, ckpt.flow, ckpt.state
    saved = payload["run"]
    for key in MUST_MATCH:
        if key in run_args and saved.get(key) != run_args[key]:
            raise CheckpointError(
                f"cannot resume from {str(path)!r}: it was written for {key}={saved.get(key)!r}, "
                f"this run has {key}={run_args[key]!r}"
            )
    if run_args.get("data") and saved.get("data") and saved["data"] != run_args["data"]:
        raise CheckpointError(
            f"cannot resume from {str(path)!r}: it was written for other training rows (of "
            "the same number; a fingerprint of them differs): resume with the data, and the "
            "validation split, it was trained on, or train again without resume"
        )
    changed = [k for k in run_args if k not in (*MUST_MATCH, "data") and
               saved.get(k) != run_args[k]]
    if changed:
        warn_user(
            "resuming with different arguments than the checkpoint was written with ("
            + ", ".join(f"{k}: {saved.get(k)!r} -> {run_args[k]!r}" for k in changed)
            + "); the result will differ from an uninterrupted run"
        )
    try:
        flow.load_state_dict(payload["model"])
    except (RuntimeError, ValueError, KeyError) as err:
        raise CheckpointError(
            f"the checkpoint {str(path)!r} does not fit this flow (a different architecture?): "
            + " ".join(str(err).split())[:500]
        ) from None
    optimizer = _checked_optimizer_state(path, ckpt.optimizer, payload["optimizer"],
                                         "optimizer state")
    snapshot = _checked_optimizer_state(path, ckpt.optimizer, payload["guard"]["optimizer"],
                                        "rollback snapshot")
    try:
        ckpt.optimizer.load_state_dict(optimizer)
    except (RuntimeError, ValueError, KeyError) as err:
        # The weights fit but the optimizer's tensors do not: exactflow 0.1 kept two tensors
        # per layer in its conditioner networks, where 0.2 keeps one per network.
        raise CheckpointError(
            f"the optimizer state in {str(path)!r} does not fit this flow's parameters ("
            + " ".join(str(err).split())[:300]
            + "); if exactflow 0.1 wrote it, this version cannot resume it: start the run "
            "again, or finish it with exactflow 0.1"
        ) from None
    ckpt.guard.model_state = _checked_weights(path, flow, payload["guard"]["model"],
                                              "rollback snapshot")
    ckpt.guard.optimizer_state = snapshot
    if ckpt.order is not None:
        ckpt.order.load_state_dict(payload["order"])
    set_rng_state(payload["rng"], ckpt.device)
    restored = History.from_dict(payload["history"])
    for name in History.__dataclass_fields__:
        setattr(ckpt.history, name, getattr(restored, name))
    state.step = int(payload["step"])
    if state.step < 0:
        raise ValueError(f"step {state.step} is negative")
    state.finished = bool(payload["finished"])
    state.lr_scale = float(payload["schedule"]["lr_scale"])
    state.failures = int(payload["failures"])
    state.best_state = _checked_weights(path, flow, payload["best"]["state"], "best weights")
    state.since_best = int(payload["best"]["since"])
    state.run_sum = float(payload["running"]["sum"])
    state.run_count = int(payload["running"]["count"])
    state.elapsed = float(payload["elapsed"])


def _checked_weights(path: Path, flow: torch.nn.Module, saved: Any, what: str) -> Any:
    """``saved`` (a copy of the flow's weights kept for later: the best, the rollback's), once
    it holds the flow's tensors by name, shape and dtype: a run restores it at its end or at
    a rollback, after all the work, where a wrong one would stop it."""
    if saved is None:
        return None
    live = flow.state_dict()
    if not isinstance(saved, dict) or saved.keys() != live.keys():
        raise CheckpointError(f"the {what} in {str(path)!r} do not name this flow's weights "
                              "(a damaged or tampered file)")
    for name, value in live.items():
        got = saved[name]
        if (not isinstance(got, torch.Tensor) or got.shape != value.shape
                or got.dtype != value.dtype):
            raise CheckpointError(
                f"the {what} in {str(path)!r} hold {name!r} as "
                f"{tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__}"
                f", where the flow has {tuple(value.shape)} ({value.dtype}) (a damaged or "
                "tampered file)")
    return saved


def _checked_optimizer_state(path: Path, optimizer: torch.optim.Optimizer, saved: Any,
                             what: str) -> Any:
    """``saved`` (an optimizer's state dict) with its tensors copied out dense, once each
    per-parameter tensor has its parameter's shape and a floating dtype (a ``step`` one
    number) and each group's settings the types of the optimizer's own: torch's fused and
    foreach updates index the tensors as if they were dense and of that shape, past their
    end otherwise, and read the settings as they are."""
    if saved is None:
        return None
    params = [p for group in optimizer.param_groups for p in group["params"]]
    ids = [i for group in saved["param_groups"] for i in group["params"]]
    if len(ids) != len(params) or len(saved["param_groups"]) != len(optimizer.param_groups):
        if what == "optimizer state":  # (its load says more: written by exactflow 0.1?)
            return saved
        raise CheckpointError(
            f"the {what} in {str(path)!r} is for {len(ids)} parameters, this flow has "
            f"{len(params)}")

    def damaged(detail: str) -> CheckpointError:
        return CheckpointError(f"the {what} in {str(path)!r} {detail} (a damaged or "
                               "tampered file)")

    for live, group in zip(optimizer.param_groups, saved["param_groups"], strict=True):
        for key, value in live.items():
            got = group.get(key)
            if key != "params" and not (_like(got, value) if key in _DEVICE_FLAGS
                                        or not isinstance(value, bool)
                                        else key not in group or got is value):
                raise damaged(f"sets {key!r} to {got!r}, where the optimizer holds "
                              f"{value!r}")
    # Adam keeps these per parameter; a step without one of them raises inside torch.
    keys = ({"step", "exp_avg", "exp_avg_sq"} | ({"max_exp_avg_sq"}
            if optimizer.defaults.get("amsgrad") else set())
            if isinstance(optimizer, torch.optim.Adam) else None)
    shapes = dict(zip(ids, (p.shape for p in params), strict=True))
    state = {}
    for index, entry in saved["state"].items():
        if keys is not None and entry.keys() != keys:
            raise damaged(f"holds {sorted(entry)} for a parameter, where Adam keeps "
                          f"{sorted(keys)}")
        kept = {}
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                want = torch.Size([]) if key == "step" else shapes.get(index)
                if (want is None or value.numel() != want.numel()
                        or (key != "step" and value.shape != want)
                        or not value.is_floating_point()):
                    raise damaged(f"holds {key!r} of shape {tuple(value.shape)} "
                                  f"({value.dtype}) for a parameter of shape "
                                  f"{tuple(want) if want is not None else '?'}")
                value = torch.empty(value.shape, dtype=value.dtype,
                                    device=value.device).copy_(value)  # (dense)
            kept[key] = value
        state[index] = kept
    return {**saved, "state": state}


#: Optimizer flags that may differ between the run that wrote a checkpoint and the one that
#: resumes it (on another device, torch may fuse otherwise); every other flag must agree.
_DEVICE_FLAGS = ("foreach", "fused", "capturable")


def _like(got: Any, value: Any) -> bool:
    """Whether an optimizer setting read from a file is of the kind of the live one: a flag
    or None for a flag (a run on another device may fuse otherwise), a number for a
    number, as many of them for a tuple."""
    if value is None or isinstance(value, bool):
        return got is None or isinstance(got, bool)
    if isinstance(value, (int, float)):
        return isinstance(got, (int, float)) and not isinstance(got, bool)
    if isinstance(value, (tuple, list)):
        return (isinstance(got, (tuple, list)) and len(got) == len(value)
                and all(_like(a, b) for a, b in zip(got, value, strict=True)))
    return type(got) is type(value)
