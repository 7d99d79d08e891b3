"""exactflow: normalizing flows in PyTorch with exact, verified likelihoods.

A flow maps data ``x`` to a latent ``z = f(x)`` through invertible layers and scores ``x``
exactly: ``log p(x) = log p_base(f(x)) + sum_k log|det J_k|``.
"""

from . import datasets, distributed, models, targets, transforms
from .core import Compose, Inverse, Transform
from .distributions import DiagonalNormal, Distribution, Flow, StandardNormal, Uniform
from .io import CheckpointError, load, save
from .jacobian import CheckError, CheckReport, check_transform, jacobian, log_abs_det_jacobian
from .train import (
    History,
    TrainingError,
    estimate_log_normalizer,
    evaluate,
    fit,
    fit_reverse_kl,
)

__version__ = "0.1.0"

__all__ = [
    "Transform",
    "Compose",
    "Inverse",
    "jacobian",
    "log_abs_det_jacobian",
    "check_transform",
    "CheckError",
    "CheckReport",
    "Distribution",
    "StandardNormal",
    "DiagonalNormal",
    "Uniform",
    "Flow",
    "transforms",
    "datasets",
    "distributed",
    "targets",
    "models",
    "fit",
    "fit_reverse_kl",
    "evaluate",
    "estimate_log_normalizer",
    "History",
    "TrainingError",
    "save",
    "load",
    "CheckpointError",
]
