"""Log-densities are never NaN: a finite value or ``-inf``, in any input dtype.

``Flow.log_prob`` and ``exactflow.scoring.log_prob`` give ``-inf`` for rows that are finite
in the data but overflow the model's dtype (``1e39``, ``-1e300`` into float32), cast inputs
of another dtype to the model's, and the scorer refuses NaN rows with their indices.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

import exactflow as ef
from exactflow.distributions import tensor_of
from exactflow.scoring import log_prob
from tests.helpers import perturb

BUILDERS = [
    {"model": "realnvp", "layers": 2, "hidden": [8]},
    {"model": "nice", "layers": 2, "hidden": [8]},
    {"model": "maf", "layers": 2, "hidden": [8]},
    {"model": "iaf", "layers": 2, "hidden": [8]},
    {"model": "nsf", "layers": 2, "hidden": [8]},
    {"model": "nsf", "layers": 2, "hidden": [8], "kind": "autoregressive"},
    {"model": "planar", "layers": 2},
    {"model": "radial", "layers": 2},
]

# Finite in a float64 file, but beyond float32 (max ~3.4e38) or far in the tails.
FAR = [[1e39, 0.0], [-1e300, 1.0], [3e38, 3e38], [0.0, -1e38], [math.inf, 0.0], [1e30, 1e30],
       [math.inf, -math.inf]]


def built(config: dict, dtype: torch.dtype = torch.float32, standardize: bool = True):
    torch.manual_seed(0)
    flow = ef.models.build({**config, "features": 2, "standardize": standardize})
    perturb(flow, 0.3, seed=1)
    return flow.to(dtype).eval()


@pytest.mark.parametrize("config", BUILDERS, ids=lambda c: c["model"] + c.get("kind", ""))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_far_out_rows_score_minus_inf_never_nan(config, dtype):
    flow = built(config, dtype)
    x = np.array([[0.1, -0.2], *FAR])
    scores = log_prob(flow, x)
    assert not np.isnan(scores).any(), scores
    assert np.isfinite(scores[0])
    assert np.all(np.isfinite(scores[1:]) | (scores[1:] == -np.inf))
    with torch.no_grad():
        direct = flow.log_prob(torch.as_tensor(x, dtype=dtype))
    assert not torch.isnan(direct).any()
    if dtype == torch.float32:  # beyond float32: below any float32 density
        assert np.all(scores[1:5] == -np.inf), scores


def test_a_nan_row_stays_nan_in_flow_log_prob_and_is_refused_by_the_scorer():
    flow = built(BUILDERS[2])
    x = torch.tensor([[0.0, 0.0], [math.nan, 1.0], [1e39, 0.0]])
    with torch.no_grad():
        values = flow.log_prob(x)
    assert torch.isnan(values[1]) and values[2] == -math.inf and torch.isfinite(values[0])
    data = np.zeros((20000, 2))
    data[[3, 12000, 19999], 1] = np.nan
    with pytest.raises(ef.datasets.DataError, match=r"3 rows hold NaN \(row indices 3, 12000, "
                                                    r"19999\)"):
        log_prob(flow, data, chunk=4096)


class SignedLogDet(ef.Transform):
    """A reflection whose log-det is ``torch.logdet``, NaN for its negative determinant
    (``slogdet``'s log|det| is what a flow needs)."""

    linear = True

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor([[0.0, 2.0], [1.0, 0.0]]))

    def forward(self, x, context=None):
        return x @ self.a.T, torch.logdet(self.a).expand(x.shape[0])

    def inverse(self, z, context=None):
        return z @ torch.linalg.inv(self.a).T, -torch.logdet(self.a).expand(z.shape[0])


def test_a_layers_nan_log_det_at_a_finite_latent_stays_nan_where_an_overflow_is_minus_inf():
    # (it read -inf, zero density, and fit blamed the learning rate)
    flow = ef.Flow(SignedLogDet(), ef.StandardNormal(2))
    with torch.no_grad():
        values = flow.log_prob(torch.tensor([[0.5, -1.0], [1e39, 0.0]]))
    assert torch.isnan(values[0]) and values[1] == -math.inf, values


@pytest.mark.parametrize("config", BUILDERS[:4] + BUILDERS[6:],
                         ids=lambda c: c["model"] + c.get("kind", ""))
def test_a_float64_tensor_into_a_float32_flow_is_cast(config):
    flow = built(config, torch.float32, standardize=False)
    x64 = torch.randn(5, 2, dtype=torch.float64)
    with torch.no_grad():
        got = flow.log_prob(x64)
        want = flow.log_prob(x64.float())
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want)
    # and the other way: a float32 tensor into a float64 flow
    flow64 = built(config, torch.float64, standardize=False)
    with torch.no_grad():
        assert flow64.log_prob(x64.float()).dtype == torch.float64


def test_float64_rows_reach_a_first_standardize_layer_as_they_are():
    # A column 1e8 + N(0, 1): float32's spacing at 1e8 is 8. The scorer and Flow.log_prob
    # hand float64 rows to the Standardize layer, which standardizes in float64.
    rng = np.random.default_rng(0)
    x = 1e8 + rng.normal(size=(500, 2))
    flow = ef.models.maf(2, layers=2, hidden=(8,), standardize=True).eval()  # identity start
    ef.models.standardize_layer(flow).set_statistics(x.mean(0), x.std(0))
    expected = (-0.5 * ((x - x.mean(0)) / x.std(0)) ** 2 - 0.5 * np.log(2 * np.pi)
                - np.log(x.std(0))).sum(1)
    np.testing.assert_allclose(log_prob(flow, x), expected, atol=1e-4)
    with torch.no_grad():
        np.testing.assert_allclose(flow.log_prob(x).double().numpy(), expected, atol=1e-4)


def test_mixed_dtypes_keep_the_gradient():
    flow = built(BUILDERS[2], torch.float32).train()
    x = torch.randn(8, 2, dtype=torch.float64, requires_grad=True)
    flow.log_prob(x).sum().backward()
    assert x.grad is not None and x.grad.dtype == torch.float64
    assert all(p.grad is not None for p in flow.parameters() if p.requires_grad)


def test_complex_input_is_refused_clearly():
    flow = built(BUILDERS[2])
    with pytest.raises(TypeError, match="real"):
        flow.log_prob(torch.zeros(2, 2, dtype=torch.complex64))
    with pytest.raises(TypeError, match="real"):
        flow.log_prob(np.zeros((2, 2), dtype=np.complex128))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_read_only_arrays_score_without_a_warning(dtype):
    # pandas columns and memmaps opened for reading are read-only arrays: torch warns when
    # it shares their memory, so they are copied first, and score like writable ones.
    flow = ef.models.maf(3, layers=1, hidden=(8,)).to(dtype)
    perturb(flow)
    rows = np.random.default_rng(0).normal(size=(20, 3))
    frozen = rows.copy()
    frozen.flags.writeable = False
    # (torch warns once a process: what decides is that the memory is not shared.)
    assert tensor_of(frozen).data_ptr() != frozen.ctypes.data
    assert tensor_of(rows).data_ptr() == rows.ctypes.data
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = [flow.log_prob(frozen), log_prob(flow, frozen)]
        assert ef.evaluate(flow, frozen)["nll"] == ef.evaluate(flow, rows)["nll"]
    assert torch.equal(got[0], flow.log_prob(rows))
    assert np.array_equal(got[1], log_prob(flow, rows))


def test_reversed_and_flipped_views_score_as_their_copies():
    # (x[::-1] and np.flip(x, 1) have negative strides, which torch.as_tensor refuses: a
    # ValueError from deep inside, in FlowDensity.score_samples too; big-endian arrays, as
    # FITS files give, the same)
    from exactflow.diagnostics import check_layers
    from exactflow.sklearn import FlowDensity

    flow = ef.models.maf(3, layers=1, hidden=(8,)).double()
    perturb(flow)
    rows = np.random.default_rng(0).normal(size=(20, 3))
    for view in (rows[::-1], rows[:, ::-1], np.flip(rows), rows.astype(">f8")):
        copy = view.copy()
        assert torch.equal(flow.log_prob(view), flow.log_prob(copy))
        assert np.array_equal(log_prob(flow, view), log_prob(flow, copy))
        assert all(check.ok for check in check_layers(flow, view))
    est = FlowDensity(model="gaussian").fit(rows)
    assert np.array_equal(est.score_samples(rows[::-1]), est.score_samples(rows[::-1].copy()))
