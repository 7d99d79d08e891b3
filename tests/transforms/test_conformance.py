"""Every layer in one registry (tests/conformance.py), through the same checks, in float64
and float32 and on the ``--device`` of the run (``pytest --device cuda`` on a GPU): the
log-det against the autograd Jacobian and the inverse round trip at random parameters,
batch 1 and odd widths, conditional and not, gradients, and the shape contract.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import exactflow as ef
from tests.conformance import LAYERS, Entry, every_public_layer
from tests.helpers import perturb

CONTEXT = 3

# Both precisions on every run (the --dtype option of other tests picks one).
both_dtypes = pytest.mark.parametrize("dtype", [torch.float64, torch.float32],
                                      ids=["float64", "float32"])


def build(entry: Entry, features: int, context: int, dtype, device, seed: int) -> ef.Transform:
    torch.manual_seed(seed)
    layer = entry.make(features, context)
    if entry.perturb:
        perturb(layer, entry.perturb, seed=seed)
    layer = layer.to(device=device, dtype=dtype)
    if entry.batch_statistics:
        layer.train()
        with torch.no_grad(), warnings.catch_warnings():  # running statistics away from
            warnings.simplefilter("ignore")  # (0, 1), on purpose without gradients
            for _ in range(3):
                layer(1.7 * torch.randn(64, features, dtype=dtype, device=device) + 0.4)
    return layer.eval()


def points(entry: Entry, batch: int, features: int, dtype, device, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if entry.unit_interval:
        x = 0.03 + 0.94 * torch.rand(batch, features, generator=gen, dtype=torch.float64)
    else:
        x = 1.5 * torch.randn(batch, features, generator=gen, dtype=torch.float64)
    return x.to(device=device, dtype=dtype)


def tolerances(dtype) -> dict:
    # float32: the log-det of a Jacobian by LU and an inverse by Newton/quadratic roots carry
    # rounding of about 1e-5 relative; the dtype's default (2e-3) bounds it with margin.
    return {} if dtype == torch.float64 else {"atol": 5e-3, "rtol": 5e-3}


def test_the_registry_covers_every_public_layer():
    covered = {name.split("(")[0] for name in LAYERS}
    missing = every_public_layer() - covered - {"Coupling", "MaskedAutoregressive"}
    assert not missing, f"add these layers to tests/conformance.py: {sorted(missing)}"


@both_dtypes
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("features", [1, 2, 5])
@pytest.mark.parametrize("name", sorted(LAYERS))
def test_log_det_and_inverse_against_brute_force(name, features, seed, dtype, device):
    entry = LAYERS[name]
    if features < entry.min_features:
        pytest.skip(f"{name} needs at least {entry.min_features} features")
    context = CONTEXT if entry.conditional else 0
    layer = build(entry, features, context, dtype, device, seed)
    x = points(entry, 7, features, dtype, device, seed)
    ctx = None
    if context:
        ctx = torch.randn(7, context, dtype=torch.float64).to(device=device, dtype=dtype)
    report = ef.check_transform(layer, x, ctx, raise_on_failure=False, **tolerances(dtype))
    assert report.ok, str(report)
    assert (layer.features in (None, features)) and layer.context_features == context


@both_dtypes
@pytest.mark.parametrize("name", sorted(LAYERS))
def test_batch_of_one_and_gradients(name, dtype, device):
    entry = LAYERS[name]
    features = max(3, entry.min_features)
    context = CONTEXT if entry.conditional else 0
    layer = build(entry, features, context, dtype, device, seed=5)
    x = points(entry, 1, features, dtype, device, seed=5).requires_grad_(True)
    ctx = torch.randn(1, context, dtype=dtype, device=device) if context else None
    z, ladj = layer(x, ctx)
    assert z.shape == (1, features) and ladj.shape == (1,)
    assert z.dtype == dtype and z.device.type == torch.device(device).type
    (z.square().sum() + ladj.sum()).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    trainable = [p for p in layer.parameters() if p.requires_grad]
    if trainable:
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable), name


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_wrong_shapes_are_clear_errors(name, device):
    entry = LAYERS[name]
    features = max(3, entry.min_features)
    context = CONTEXT if entry.conditional else 0
    layer = build(entry, features, context, torch.float64, device, seed=0)
    ctx = torch.randn(4, context, dtype=torch.float64, device=device) if context else None
    for direction in (layer, layer.inverse):
        with pytest.raises(ValueError, match=r"expects input of shape \(batch, "):
            direction(torch.zeros(4, features + 1, dtype=torch.float64, device=device), ctx)
        with pytest.raises(ValueError, match=r"expects input of shape"):
            direction(torch.zeros(features, dtype=torch.float64, device=device), ctx)
        if context:
            with pytest.raises(ValueError, match="conditional"):
                direction(torch.zeros(4, features, dtype=torch.float64, device=device))
