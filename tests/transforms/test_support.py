"""Tests of the Support layer and of the builders' ``bounds=``: bounded columns mapped onto
the real line, samples inside the limits, the density exact inside them."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import exactflow as ef
from exactflow.transforms import Support
from exactflow.transforms.support import bounds_spec, map_rows
from tests.helpers import perturb

CPU = {"progress": False, "device": "cpu"}
MIXED = [(0, 1), (0, None), (None, 3.0), None, (-2, 5)]


def test_bounds_are_one_pair_per_column_with_none_for_no_limit():
    assert bounds_spec(None, 3) is None
    assert bounds_spec((0, 1), 2) == [[0.0, 1.0], [0.0, 1.0]]
    assert bounds_spec([(0, None), None], 2) == [[0.0, None], [None, None]]
    assert bounds_spec([None, (None, None)], 2) is None  # (no limit anywhere: no layer)
    for bad, message in (
        ((1, 0), "the lower bound 1 is not below the upper bound 0"),
        ([(0, 1)] * 3, "bounds gives 3 pairs for 2 columns"),
        ([(0, math.inf), None], "must be finite"),
        ([("0", 1), None], "must be a number or None"),
        ([(0, 1, 2), None], "bounds of column 0 must be a pair"),
        ("01", "must be a pair"),
    ):
        with pytest.raises(ValueError, match=message):
            bounds_spec(bad, 2)


def test_each_kind_of_limit_maps_as_torch_distributions_biject_to_does():
    t = Support(MIXED, 5).double()
    x = torch.tensor([[0.3, 2.0, 1.0, -4.0, 4.9], [0.99, 1e-3, 2.99, 7.0, -1.9]],
                     dtype=torch.float64)
    z, ladj = t(x)
    expected = torch.stack([torch.logit(x[:, 0]), torch.log(x[:, 1]), torch.log(3 - x[:, 2]),
                            x[:, 3], torch.logit((x[:, 4] + 2) / 7)], 1)
    torch.testing.assert_close(z, expected)
    jac = ef.jacobian(t, x)
    torch.testing.assert_close(ladj, torch.linalg.slogdet(jac)[1])
    assert ef.check_transform(perturb(t, 0.3), x).ok


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_samples_stay_strictly_inside_the_limits_even_where_the_maps_saturate(dtype):
    # (float32's sigmoid rounds to 1.0 from z of about 17, 5 + 1.0 to the limit 6 itself,
    # and exp underflows to 0 below z of about -104)
    t = Support([(0, 1), (5, 6), (0, None), (None, -3.0)], 4).to(dtype)
    z = torch.tensor([[-200.0], [-40.0], [-17.0], [17.0], [40.0], [200.0]], dtype=dtype)
    x, _ = t.inverse(z.expand(-1, 4))
    assert ((x[:, 0] > 0) & (x[:, 0] < 1)).all() and ((x[:, 1] > 5) & (x[:, 1] < 6)).all()
    assert (x[:, 2] > 0).all() and (x[:, 3] < -3).all() and torch.isfinite(x).all()
    assert torch.isfinite(t(x)[1]).all()  # (every sample scores: none sits on a limit)


def test_values_on_or_outside_a_limit_are_refused_by_column():
    t = Support(MIXED, 5)
    x = torch.tensor([[1.0, -1.0, 4.0, 0.0, 0.0], [0.5, 0.0, 1.0, 0.0, 0.0]])
    with pytest.raises(ValueError, match=r"column 0 must lie in \(0, 1\): 1 row does not; "
                                         r"column 1 must lie above 0: 2 rows do not; column "
                                         r"2 must lie below 3: 1 row does not; rows 0, 1, from "
                                         r"0\): the density .*pass the rows in float64"):
        t(x)
    # Every row counted, not only a first block's; a NaN is no bound's fault.
    many = torch.zeros(20_000, 5, dtype=torch.float64) + 0.5
    many[::1000, 0] = 1.0
    with pytest.raises(ef.datasets.DataError, match=r"t.csv: values on or outside the bounds "
                                                    r"\('p' must lie in \(0, 1\): 20 rows do "
                                                    r"not; rows 0, 1000, 2000, 3000, 4000, \.\.\."):
        map_rows(t, many, "t.csv", ["p", "q", "r", "s", "u"])
    nan = torch.tensor([[float("nan"), 1.0, 1.0, 0.0, 0.0]], dtype=torch.float64)
    assert bool(t.double().inside(nan).all())


def test_a_flow_with_bounds_keeps_its_samples_inside_and_scores_as_a_density_there(tmp_path):
    # (a MAF posterior fitted to parameters with a U(0, 1) prior drew 6% of its samples
    # outside the box)
    gen = torch.Generator().manual_seed(0)
    theta = torch.distributions.Beta(torch.tensor([0.6, 5.0]), torch.tensor([3.0, 0.7]))
    torch.manual_seed(0)
    x = torch.cat([theta.sample((2000,)), torch.exp(1.5 * torch.randn(2000, 1, generator=gen))],
                  1)
    flow = ef.models.maf(3, layers=2, hidden=(16,), standardize=True,
                         bounds=[(0, 1), (0, 1), (0, None)])
    ef.fit(flow, x[:1600], x[1600:], steps=200, **CPU)
    samples = flow.sample(5000)
    assert ((samples[:, :2] > 0) & (samples[:, :2] < 1)).all() and (samples[:, 2] > 0).all()
    # The standardization is fitted to the columns as the flow sees them: logit and log.
    mapped = torch.cat([torch.logit(x[:1600, :2].double()), torch.log(x[:1600, 2:].double())],
                       1)
    layer = ef.models.standardize_layer(flow)
    torch.testing.assert_close(layer.mean.double(), mapped.mean(0), rtol=1e-5, atol=1e-5)
    loaded = ef.load(ef.save(flow, tmp_path / "bounded.safetensors"))
    assert loaded.config["bounds"] == [[0.0, 1.0], [0.0, 1.0], [0.0, None]]
    with torch.no_grad():
        torch.testing.assert_close(loaded.log_prob(x[1600:]), flow.log_prob(x[1600:]))
    double = flow.double()
    assert ef.check_transform(double.transform, x[1600:1650].double()).ok
    # Beyond the limits the density is 0: -inf, and the rows inside keep their values
    # (Flow.log_prob raised, losing every row of the batch).
    mixed = torch.cat([x[1600:1603], -x[:2]]).double()
    with torch.no_grad():
        scored = flow.log_prob(mixed)
        torch.testing.assert_close(scored[:3], flow.log_prob(x[1600:1603].double()))
    assert torch.isfinite(scored[:3]).all() and (scored[3:] == -math.inf).all()
    with pytest.raises(ValueError, match="column 2 must lie above 0"):
        flow.to_latent(-x[:3].double())  # (no latent there)
    train = flow.train()
    loss = -train.log_prob(mixed).mean()
    assert loss == math.inf
    loss.backward()  # (the rows outside, held inside, leave no NaN in the gradients)
    assert all(torch.isfinite(p.grad).all() for p in flow.parameters() if p.grad is not None)
    flow.eval()
    with pytest.raises(ValueError, match="noise= .* bounds="):
        ef.fit(ef.models.maf(3, bounds=(0, None)), x, steps=1, noise=0.1, **CPU)


def test_a_gaussian_with_a_lower_bound_is_the_log_normal_fitted_by_maximum_likelihood():
    rng = np.random.default_rng(3)
    x = np.exp(0.7 + 0.4 * rng.normal(size=(500, 1)))
    model = ef.models.gaussian(1, bounds=(0, None)).double()
    ef.fit(model, x, **CPU)
    logs = np.log(x[:, 0])
    mu, sigma = logs.mean(), logs.std()
    expected = (-0.5 * ((logs - mu) / sigma) ** 2 - np.log(sigma) - 0.5 * np.log(2 * np.pi)
                - logs)  # (the log-normal density: the normal's, less log x)
    with torch.no_grad():
        got = model.log_prob(torch.as_tensor(x)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-9)


def _bounded_rows(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.c_[rng.beta(0.6, 3.0, size=n), rng.beta(5.0, 0.7, size=n),
                 np.exp(1.5 * rng.normal(size=n))]


def test_the_auto_ladder_with_bounds_keeps_a_bounded_model_and_says_nlls_of_the_data():
    x = _bounded_rows(1200, 0)
    val = _bounded_rows(300, 1)
    lines: list[str] = []
    result = ef.fit_auto(x, val, budget=8, bounds=[(0, 1), (0, 1), (0, None)],
                         log=lines.append)
    assert ef.models.support_layer(result.flow) is not None
    kept = next(entry for entry in result.leaderboard if entry.chosen)
    with torch.no_grad():  # (the leaderboard's NLL is the kept model's on the data as given)
        nll = -result.flow.log_prob(torch.as_tensor(val)).double().mean()
        samples = result.flow.sample(3000)
    assert float(nll) == pytest.approx(kept.val_nll, abs=1e-4)
    # (the log said the NLL of the mapped columns, 2 nats from the table's)
    assert f"{kept.name}: validation NLL {kept.val_nll:.4f}" in "\n".join(lines)
    assert ((samples[:, :2] > 0) & (samples[:, :2] < 1)).all() and (samples[:, 2] > 0).all()
    with pytest.raises(ef.datasets.DataError, match="training data: values on or outside the "
                                                    "bounds .*column 2 must lie above 0"):
        ef.fit_auto(-x, budget=5, bounds=[(0, 1), (0, 1), (0, None)])


def test_flow_density_with_bounds_scores_rows_outside_minus_infinity():
    from exactflow.sklearn import FlowDensity

    x = _bounded_rows(600, 2)
    for est in (FlowDensity(budget=5, bounds=[(0, 1), (0, 1), (0, None)], random_state=0),
                FlowDensity("maf", layers=1, hidden=(8,), steps=20,
                            bounds=[(0, 1), (0, 1), (0, None)], random_state=0)):
        est.fit(x)
        rows = np.vstack([x[:3], [[0.5, 1.0, 2.0], [0.5, 0.5, -1.0]]])
        scores = est.score_samples(rows)
        assert np.isfinite(scores[:3]).all() and (scores[3:] == -np.inf).all()
        drawn = est.sample(2000, random_state=0)
        assert ((drawn[:, :2] > 0) & (drawn[:, :2] < 1)).all() and (drawn[:, 2] > 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_limits_stay_float64_in_a_float32_or_float64_model(dtype):
    # (stored in float32, 0.3 became 0.30000001: a float64 flow drew 7 of 100,000 samples
    # above 0.3, a row at 0.1 + 1e-10 was refused, and (1e8, 1e8 + 1) collapsed to a point)
    t = Support([(0.1, 0.3), (1e8, 1e8 + 1)], 2).to(dtype)
    assert t.low.dtype == t.high.dtype == torch.float64 and t.high[0] == 0.3
    z = torch.tensor([[20.0, 20.0], [-20.0, -20.0], [0.0, 0.0]], dtype=dtype)
    x, ladj = t.inverse(z)
    assert x.dtype == torch.float64 and ladj.dtype == dtype
    assert ((x[:, 0] > 0.1) & (x[:, 0] < 0.3)).all() and ((x[:, 1] > 1e8) & (x[:, 1] < 1e8 + 1)
                                                          ).all()
    assert abs(float(x[2, 1]) - (1e8 + 0.5)) < 1e-6  # (the middle of a narrow box far out)
    back, ladj_back = t(x)
    assert back.dtype == dtype and torch.isfinite(back).all()
    inside = torch.tensor([[0.1 + 1e-10, 1e8 + 0.5]], dtype=torch.float64)
    assert bool(t.inside(inside).all())
    flow = ef.models.maf(2, layers=1, hidden=(8,), bounds=[(0.1, 0.3), (1e8, 1e8 + 1)]).to(dtype)
    with torch.no_grad():
        assert torch.isfinite(flow.log_prob(inside)).all()  # (float64 rows: as given)


def test_bounds_take_numpy_numbers_arrays_and_columns_by_name():
    # (np.int64(0) was "not a pair"; a dict by name worked in train_run only)
    assert bounds_spec((np.int64(0), np.float32(1)), 2) == [[0.0, 1.0], [0.0, 1.0]]
    assert bounds_spec(np.array([[0, 1], [2, 3]]), 2) == [[0.0, 1.0], [2.0, 3.0]]
    assert bounds_spec({"b": (0, None), 0: (None, 1)}, 2, ["a", "b"]) == [[None, 1.0],
                                                                          [0.0, None]]
    with pytest.raises(ValueError, match=r"bounds name a column 'c' the data does not have "
                                         r"\(its columns are \['a', 'b'\]\)"):
        bounds_spec({"c": (0, 1)}, 2, ["a", "b"])
    with pytest.raises(ValueError, match=r"bounds of 'b': the lower bound 1 is not below"):
        bounds_spec({"b": (1, 0)}, 2, ["a", "b"])
    with pytest.raises(ValueError, match=r"column 5 is not one of the 2 columns"):
        bounds_spec({5: (0, 1)}, 2)
    pandas = pytest.importorskip("pandas")
    from exactflow.sklearn import FlowDensity

    frame = pandas.DataFrame(_bounded_rows(400, 3), columns=["p", "q", "amount"])
    est = FlowDensity("maf", layers=1, hidden=(8,), steps=5, random_state=0,
                      bounds={"p": (0, 1), "amount": (0, None)}).fit(frame)
    assert est.flow_.config["bounds"] == [[0.0, 1.0], [None, None], [0.0, None]]
    frame.loc[5, "amount"] = -1.0  # (named by position: "column 2 must lie above 0")
    for est in (FlowDensity("maf", steps=5, bounds={"amount": (0, None)}),
                FlowDensity(budget=5, bounds={"amount": (0, None)})):
        with pytest.raises(ef.datasets.DataError, match=r"'amount' must lie above 0: 1 row "
                                                        r"does not; rows 5"):
            est.fit(frame)


def test_evaluate_counts_rows_outside_the_limits_as_scored_minus_infinity():
    # (ef.evaluate raised Support's error where scoring.log_prob gave -inf)
    flow = ef.models.maf(3, layers=1, hidden=(8,), bounds=[(0, 1), (0, 1), (0, None)])
    rows = np.vstack([_bounded_rows(10, 4), [[0.5, 0.5, -1.0]]])
    out = ef.evaluate(flow, rows)
    assert out["n"] == 11 and out["n_nonfinite"] == 1 and out["nll"] == math.inf
    assert math.isfinite(out["nll_finite"])
    from exactflow.scoring import log_prob

    scored = log_prob(flow, rows)
    assert np.isfinite(scored[:10]).all() and scored[10] == -np.inf


def test_a_row_with_a_nan_stays_nan_beyond_the_limits_too():
    # (a row [2, nan] under (0, 1) for its first column scored -inf: a NaN has no density)
    flow = ef.models.maf(2, layers=1, hidden=(8,), bounds=[(0, 1), None]).double()
    with torch.no_grad():
        scored = flow.log_prob(torch.tensor([[2.0, math.nan], [2.0, 0.5], [0.5, math.nan],
                                             [0.5, 0.5]], dtype=torch.float64))
    assert math.isnan(scored[0]) and scored[1] == -math.inf and math.isnan(scored[2])
    assert math.isfinite(scored[3])
