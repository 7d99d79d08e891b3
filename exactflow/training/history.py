"""What a training run records: :class:`History`, one entry per evaluation point."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from ..io import json_safe

__all__ = ["History"]

_LN2 = math.log(2.0)


@dataclass
class History:
    """What a training run recorded, one entry per evaluation point.

    Attributes:
        features: the data dimension ``d`` (for bits per dimension).
        objective: ``"nll"`` (:func:`exactflow.fit`) or ``"reverse_kl"``
            (:func:`exactflow.fit_reverse_kl`).
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
            validation data); :func:`exactflow.fit` restores these weights at the end.
            ``best_val`` is the validation NLL of the flow ``fit`` returns: with batch-norm
            layers whose training-set statistics it kept at the end (they scored no worse),
            that value, which may be below every record.
        stopped_early: whether early stopping (``patience``) or a callback ended the run.
        total_steps: the number of optimizer steps run (rolled-back steps included).
        rollbacks: steps whose loss or gradient was non-finite and that were undone.
        final: end-of-training estimates (reverse KL: ``elbo``, ``elbo_se``, ``log_z_is``,
            ``log_z_is_se``, ``ess``, ``pareto_k``, ``n``, ``n_nonfinite``).
        compiled: whether the steps ran compiled, and why (``compile="auto"``).
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
    compiled: str | None = None
    #: Row numbers of the training data that ``fit`` held out for validation (``None``
    #: where ``val`` was given or nothing was held out); not saved with the history.
    held_out: Any = field(default=None, repr=False, compare=False)

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

    def saved(self) -> dict[str, Any]:
        """Every field that a checkpoint or ``history.json`` keeps (all but ``held_out``,
        row numbers of the data)."""
        return {k: v for k, v in asdict(self).items() if k != "held_out"}

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict of every field plus ``train_bpd`` and ``val_bpd``.

        Non-finite numbers become ``None`` so that ``json.dumps`` gives strict JSON.
        """
        out = json_safe(self.saved())
        out["train_bpd"] = json_safe(self.train_bpd)
        out["val_bpd"] = json_safe(self.val_bpd)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> History:
        """Rebuild a history from :meth:`to_dict` output (extra keys are ignored)."""
        names = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in names})
