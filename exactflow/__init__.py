"""exactflow: normalizing flows in PyTorch with exact, verified likelihoods.

A flow maps data ``x`` to a latent ``z = f(x)`` through invertible layers and scores ``x``
exactly: ``log p(x) = log p_base(f(x)) + sum_k log|det J_k|``.

The package is layered, data flowing one way (``docs/architecture.md``): the transform
contract (:mod:`~exactflow.core`), the layers (:mod:`~exactflow.transforms`), the ground
truth that proves them right (:mod:`~exactflow.groundtruth`), densities
(:mod:`~exactflow.distributions`) and their builders (:mod:`~exactflow.models`), data
(:mod:`~exactflow.datasets`), training (:mod:`~exactflow.training`), saving
(:mod:`~exactflow.io`), run folders (:mod:`~exactflow.runs`), and the command line.
"""

from . import datasets, distributed, models, targets, transforms
from ._version import __version__
from .bases import StudentT
from .core import Compose, Inverse, Transform
from .distributions import DiagonalNormal, Distribution, Flow, StandardNormal, Uniform
from .gaussians import Gaussian, GaussianMixture
from .groundtruth import CheckError, CheckReport, check_transform, jacobian, log_abs_det_jacobian
from .io import CheckpointError, load, save
from .training import (
    History,
    TrainingError,
    estimate_log_normalizer,
    evaluate,
    fit,
    fit_auto,
    fit_reverse_kl,
    importance_sample,
    prepare,
)
from .validation import DataError

__all__ = [
    "__version__",
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
    "StudentT",
    "Uniform",
    "Gaussian",
    "GaussianMixture",
    "Flow",
    "transforms",
    "datasets",
    "distributed",
    "targets",
    "models",
    "fit",
    "fit_auto",
    "fit_reverse_kl",
    "prepare",
    "evaluate",
    "estimate_log_normalizer",
    "importance_sample",
    "History",
    "TrainingError",
    "DataError",
    "save",
    "load",
    "CheckpointError",
]
