"""Training: maximum likelihood, reverse KL, and exact evaluation.

* :func:`fit` (:mod:`~exactflow.training.likelihood`): maximum likelihood on data, with
  validation, the best weights kept, early stopping and data-parallel training
  (:mod:`~exactflow.training.parallel`: DDP or a flat all-reduce from
  :mod:`~exactflow.training.engines`, synchronized batch norm, bf16 autocast);
* :func:`fit_reverse_kl`, :func:`estimate_log_normalizer` and :func:`importance_sample`
  (:mod:`~exactflow.training.reverse_kl`): fitting to an unnormalized density, and its
  importance weights (:mod:`~exactflow.training.importance`: how far they can be trusted);
* :func:`evaluate` (:mod:`~exactflow.training.metrics`): the test NLL with its standard
  error, and bits per dimension;
* :func:`prepare` (:mod:`~exactflow.training.calibrate`): the parts set from the data
  (standardization, a classical base), before a training loop of one's own.

Both engines share one loop (:mod:`~exactflow.training.loop`: rollback of non-finite steps,
schedules, records, checkpoints in :mod:`~exactflow.training.checkpoints`) and one
:class:`History` (:mod:`~exactflow.training.history`).
"""

from .advice import TrainingError
from .auto import fit_auto
from .calibrate import prepare
from .history import History
from .likelihood import fit
from .metrics import evaluate
from .reverse_kl import estimate_log_normalizer, fit_reverse_kl, importance_sample

__all__ = ["fit", "fit_auto", "fit_reverse_kl", "evaluate", "estimate_log_normalizer",
           "importance_sample", "prepare", "History", "TrainingError"]
