"""Looking inside a flow: its layers one by one, each checked against brute force.

:func:`flatten_layers` lists a flow's layers in data -> latent order, :func:`propagate`
pushes data through them one at a time, and :func:`check_layers` runs
:func:`exactflow.check_transform` on each layer at the points that really reach it (not a
standard normal that may sit far outside its working range); :func:`format_check_table`
prints the result as ``exactflow check`` shows it.
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch import distributions as td

from .bases import DiagonalNormal, StandardNormal, Uniform, tensor_of
from .core import Compose, Transform
from .distributions import Flow
from .gaussians import Gaussian, GaussianMixture
from .groundtruth import check_transform
from .io import json_safe
from .scoring import eval_mode

__all__ = [
    "LayerCheck",
    "flatten_layers",
    "layer_name",
    "propagate",
    "check_layers",
    "default_check_points",
    "format_check_table",
    "check_base",
    "reference_log_prob",
]


def flatten_layers(transform: Transform) -> list[Transform]:
    """The layers of a transform in data -> latent order, nested ``Compose`` unrolled."""
    if isinstance(transform, Compose):
        out: list[Transform] = []
        for t in transform:
            out.extend(flatten_layers(t))
        return out
    return [transform]


def layer_name(layer: Transform) -> str:
    """A short readable name for a layer (its class name)."""
    return type(layer).__name__


def propagate(flow: Flow, x: Tensor, context: Tensor | None = None) -> list[tuple[Tensor, Tensor]]:
    """Push ``x`` through the flow's layers one at a time (eval mode, no gradients).

    Returns ``[(x_0, 0), (x_1, ladj_1), ..., (x_K, ladj_K)]`` where ``x_0 = x`` is the data,
    ``x_K`` the latent, and ``ladj_k = log|det d x_k / d x_{k-1}|`` per row.
    """
    out = [(x, x.new_zeros(x.shape[0]))]
    with eval_mode(flow):
        for layer in flatten_layers(flow.transform):
            x, ladj = layer(x, context)
            out.append((x, ladj))
    return out


@dataclass
class LayerCheck:
    """One row of the layer-by-layer check table.

    Attributes:
        index: the layer's position, from 1 (the layer that sees the data) to K.
        name: the layer's class name.
        log_det_error: largest |analytic - autograd| log-determinant error.
        round_trip_error: largest |inverse(forward(x)) - x|.
        mean_log_det: the layer's mean log-det contribution on the points (nats).
        ok: whether every check passed.
        failures: readable lines for the failed checks.
    """

    index: int
    name: str
    log_det_error: float
    round_trip_error: float
    mean_log_det: float
    ok: bool
    failures: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return json_safe(asdict(self))


def default_check_points(features: int) -> int:
    """The rows ``exactflow check`` and the report check by default: 256, fewer past 128
    features so that the dense Jacobians hold as many numbers as 256 rows at 128 features
    (each row's is features x features, O(features^3) to factor): 104 rows at 200
    features, 8 (the least) at 784."""
    return max(8, min(256, 256 * 128**2 // max(1, features) ** 2))


_IDENTITY = r"check_transform\(.*\): the transform is the identity"


def check_layers(
    flow: Flow, x: Any, context: Any = None, *, max_points: int = 256
) -> list[LayerCheck]:
    """Run :func:`exactflow.check_transform` on each layer, on the data that reaches it.

    The flow is copied, cast to float64 and put in eval mode (batch statistics frozen), so
    the caller's model is untouched. Layer ``k`` is checked at ``x_{k-1}``, the first
    ``max_points`` rows of ``x`` pushed through layers ``1..k-1``: the points the layer
    really sees, not a standard normal that may sit far outside its working range.

    Returns:
        One :class:`LayerCheck` per layer, in data -> latent order, numbered from 1.
    """
    model = copy.deepcopy(flow).double().eval()
    x = tensor_of(np.asarray(x, dtype=np.float64)[:max_points])
    ctx = None
    if context is not None:
        ctx = tensor_of(np.asarray(context, dtype=np.float64)[:max_points])
        if model.embedding is not None:
            with torch.no_grad():
                ctx = model.embedding(ctx)
    rows: list[LayerCheck] = []
    for i, layer in enumerate(flatten_layers(model.transform), start=1):
        try:
            with warnings.catch_warnings():  # (a layer left at the identity is no failure)
                warnings.filterwarnings("ignore", message=_IDENTITY)
                rep = check_transform(layer, x, ctx, raise_on_failure=False)
            failures = list(rep.failures)
            ld_err = rep.errors.get("log_det", math.nan)
            rt_err = rep.errors.get("round_trip", math.nan)
        except Exception as err:  # noqa: BLE001 - a layer that crashes is a failed check
            failures = [f"{type(err).__name__}: {err}"]
            ld_err = rt_err = math.nan
        with torch.no_grad():
            try:
                x_next, ladj = layer(x, ctx)
                mean_ld = float(ladj.mean())
            except Exception:  # noqa: BLE001 - reported above; keep the points as they are
                x_next, mean_ld = x, math.nan
        rows.append(
            LayerCheck(i, layer_name(layer), ld_err, rt_err, mean_ld, not failures, failures)
        )
        x = x_next
    return rows


def format_check_table(rows: list[LayerCheck]) -> str:
    """The check table as aligned plain text."""
    head = f"{'layer':>5}  {'name':<28} {'log-det error':>13} {'round-trip error':>16} " \
           f"{'mean log-det':>12}  verdict"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r.index:>5}  {r.name:<28} {format_error(r.log_det_error):>13} "
            f"{format_error(r.round_trip_error):>16} {r.mean_log_det:>12.4f}  "
            f"{'ok' if r.ok else 'FAIL'}"
        )
    return "\n".join(lines)


def format_error(value: float) -> str:
    """An error in scientific notation, ``n/a`` when it could not be measured."""
    return "n/a" if math.isnan(value) else f"{value:.2e}"


def reference_log_prob(base: Any, z: Tensor) -> Tensor | None:
    """``log p(z)`` of exactflow's base distributions by ``torch.distributions``, an
    implementation independent of theirs; None for a base it does not know (a user's)."""
    kind = type(base)
    if kind is StandardNormal:
        return td.Normal(torch.zeros_like(z), 1.0).log_prob(z).sum(-1)
    if kind is DiagonalNormal:
        return td.Normal(base.loc, torch.exp(base.log_scale)).log_prob(z).sum(-1)
    if kind is Uniform:
        inside = ((z >= base.low) & (z <= base.high)).all(-1)
        volume = torch.log(base.high - base.low).sum()
        return torch.where(inside, -volume, torch.full_like(volume, -math.inf))
    if kind in (Gaussian, GaussianMixture):  # (the factors from the parameters: not lower())
        lower = torch.diag_embed(torch.exp(base.log_diag))
        if base.covariance == "full":
            lower = lower + torch.tril(base.off_diag, -1)
        normals = td.MultivariateNormal(base.loc, scale_tril=lower)
        if kind is Gaussian:
            return normals.log_prob(z.unsqueeze(1))[:, 0]
        return td.MixtureSameFamily(td.Categorical(logits=base.logits), normals).log_prob(z)
    return None


def check_base(flow: Flow, x: Any, context: Any = None, *, max_points: int = 256,
               atol: float = 1e-9, rtol: float = 1e-12) -> dict[str, Any]:
    """The flow's base log-density at the latents of ``x`` (the points it really sees)
    against :func:`reference_log_prob`, in float64, elementwise within ``atol + rtol *
    |reference|``: ``{"name", "checked", "error", "ok"}`` (``checked`` False, ``ok`` None
    for a base of the user's; ``error`` the largest absolute difference)."""
    model = copy.deepcopy(flow).double().eval()
    rows = tensor_of(np.asarray(x, dtype=np.float64)[:max_points])
    ctx = None if context is None else tensor_of(
        np.asarray(context, dtype=np.float64)[:max_points])
    name = type(model.base).__name__
    with torch.no_grad():
        z = model.to_latent(rows, ctx)[0].double()  # (a layer of the user's may cast)
        reference = reference_log_prob(model.base, z)
        if reference is None:
            return {"name": name, "checked": False, "error": None, "ok": None}
        got = model.base.log_prob(z)
    both = torch.isfinite(reference) & torch.isfinite(got)
    same_inf = bool(torch.equal(torch.isfinite(reference), torch.isfinite(got)))
    gap = (got - reference)[both].abs()
    within = bool((gap <= atol + rtol * reference[both].abs()).all())
    error = float(gap.max()) if gap.numel() else 0.0
    return {"name": name, "checked": True, "error": error, "ok": same_inf and within}
