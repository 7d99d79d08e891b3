"""exactflow.sklearn.FlowDensity: scikit-learn's estimator checks, clone, Pipeline, GridSearchCV."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")

from sklearn.base import clone  # noqa: E402
from sklearn.model_selection import GridSearchCV  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402
from sklearn.utils.estimator_checks import parametrize_with_checks  # noqa: E402

import exactflow as ef  # noqa: E402
from exactflow.sklearn import FlowDensity  # noqa: E402


def tiny(**kwargs) -> FlowDensity:
    params = dict(model="realnvp", layers=2, hidden=(8,), steps=5, batch_size=16,
                  random_state=0)
    params.update(kwargs)
    return FlowDensity(**params)


# Every applicable check, with training kept to a few steps: a coupling model (realnvp),
# an autoregressive one (maf, which also takes one-feature data), and the default (auto,
# on a budget of a fraction of a second).
@parametrize_with_checks([tiny(), tiny(model="maf"), FlowDensity(budget=0.3, random_state=0)])
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)


def test_score_samples_is_the_flow_log_density_in_data_units():
    rng = np.random.default_rng(0)
    X = rng.normal(loc=[100.0, -3.0, 7.0], scale=[50.0, 0.01, 2.0], size=(400, 3))
    est = FlowDensity(model="maf", layers=2, hidden=(16,), steps=30, random_state=1).fit(X)
    scores = est.score_samples(X[:50])
    direct = est.flow_.log_prob(torch.from_numpy(X[:50])).detach().numpy()
    np.testing.assert_allclose(scores, direct, rtol=1e-12)
    # The standardization layer is inside the model: the scores are in the units of X, so a
    # near-Gaussian fit sits close to the Gaussian's entropy, scales included.
    entropy = 0.5 * 3 * math.log(2 * math.pi * math.e) + math.log(50.0 * 0.01 * 2.0)
    assert abs(-scores.mean() - entropy) < 0.5
    assert est.score(X[:50]) == pytest.approx(scores.sum())


def test_fit_is_reproducible_and_leaves_torch_rng_alone():
    X = ef.datasets.toy("moons", 300, seed=3).numpy()
    state = torch.get_rng_state()
    a = tiny(random_state=7).fit(X).score_samples(X[:20])
    b = tiny(random_state=7).fit(X).score_samples(X[:20])
    c = tiny(random_state=8).fit(X).score_samples(X[:20])
    assert torch.equal(state, torch.get_rng_state())
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_sample_shape_seed_and_units():
    X = np.random.default_rng(1).normal(loc=1000.0, scale=10.0, size=(300, 2))
    est = tiny(model="maf", steps=20).fit(X)
    s1 = est.sample(500, random_state=3)
    s2 = est.sample(500, random_state=3)
    assert s1.shape == (500, 2)
    np.testing.assert_array_equal(s1, s2)
    assert not np.array_equal(s1, est.sample(500, random_state=4))
    # Samples come back in the units of X (the standardization is undone).
    assert np.all(np.abs(s1.mean(0) - 1000.0) < 5.0)
    with pytest.raises(ValueError, match="n_samples"):
        est.sample(0)


def test_errors_name_the_problem():
    X = np.random.default_rng(2).normal(size=(50, 2))
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        tiny(model="nope").fit(X)
    with pytest.raises(ValueError, match=r"1 feature\(s\); for one-dimensional data use "
                                         "model='nsf' with model_kwargs={'kind': "
                                         "'autoregressive'}"):
        tiny(model="realnvp").fit(X[:, :1])
    tiny(model="maf").fit(X[:, :1])  # one feature is fine for an autoregressive model
    spline = tiny(model="nsf", model_kwargs={"kind": "autoregressive"}).fit(X[:, :1])
    assert spline.score_samples(X[:3, :1]).shape == (3,)
    bad = X.copy()
    bad[:, 1] = 3.0
    with pytest.raises(ValueError, match="constant"):
        tiny().fit(bad)
    with pytest.raises(ValueError, match="NaN|nan"):
        tiny().fit(np.where(np.arange(100).reshape(50, 2) == 7, np.nan, X))
    with pytest.raises(ValueError, match="columns 0, 2 .* are linearly dependent"):
        tiny().fit(np.c_[X, 2 * X[:, 0]])
    with pytest.raises(ValueError, match="2 rows for 2 columns"):
        tiny().fit(X[:2])
    # 15 rows of 13 columns: after the hold-out 13 remain, where model="auto" refused and
    # a named model trained on a degenerate table (the Gaussian scored rows of its own
    # table at -8e5); the closed-form Gaussian now takes all 15
    wide = np.random.default_rng(3).normal(size=(15, 13))
    with pytest.raises(ValueError, match="after holding out 2 validation rows, 13 "
                                         "training rows remain for 13 columns"):
        FlowDensity("maf", steps=2).fit(wide)
    assert FlowDensity("gaussian").fit(wide).score_samples(wide).min() > -100
    for kwargs, message in (
            ({"model": "maf", "steps": 2.7}, "steps must be a positive integer, got 2.7"),
            ({"model": "maf", "batch_size": -4}, "batch_size must be a positive integer"),
            ({"model": "gmm", "steps": 5, "lr": 0.1}, "steps, lr: model='gmm' is fitted in "
                                                     "closed form"),
            ({"model": "planar", "hidden": (8,)}, "hidden: model='planar' has no hidden"),
            ({"model": "maf", "model_kwargs": {"standardize": False}},
             "model_kwargs sets standardize, which FlowDensity sets itself")):
        with pytest.raises(ValueError, match=message):  # (each was accepted, and ignored)
            FlowDensity(**kwargs).fit(X)
    fitted = tiny().fit(X)
    with pytest.raises(ValueError, match="features"):
        fitted.score_samples(np.zeros((3, 3)))


def test_closed_form_models_are_fitted_on_every_row():
    # (a 15% hold-out had nothing to stop or choose: the Gaussian was not the MLE of X)
    X = np.random.default_rng(5).normal(size=(150, 3)) @ np.diag([1.0, 2.0, 0.5])
    centered = X - X.mean(0)
    cov = centered.T @ centered / len(X)
    mle = -0.5 * (3 * math.log(2 * math.pi) + np.linalg.slogdet(cov)[1] + 3)
    fitted = FlowDensity("gaussian").fit(X)
    assert fitted.score_samples(X).mean() == pytest.approx(mle, abs=1e-6)


def test_integer_columns_are_warned_about_or_dequantized():
    # On a column of 0, 1, 2 the ladder's mixture piled its mass onto the integers:
    # held-out rows scored +2.0 nats, and -122,000 once that column moved by 0.5.
    rng = np.random.default_rng(0)
    X = np.c_[rng.normal(size=(600, 2)), rng.integers(0, 3, 600)]
    with pytest.warns(UserWarning, match=r"column 2 \(column indices\) holds integers only.*"
                                         r"FlowDensity\(dequantize=True\)"):
        FlowDensity("gmm", model_kwargs={"components": 3}).fit(X[:500])
    fitted = FlowDensity("gmm", model_kwargs={"components": 3}, dequantize=True).fit(X[:500])
    assert fitted.dequantized_columns_ == [2]
    scores = fitted.score_samples(X[500:])
    np.testing.assert_array_equal(scores, fitted.score_samples(X[500:]))  # keyed noise
    # a lower bound of log P: a 2-D normal (-2.84) and 1 of 3 levels (-1.10)
    assert -4.4 < scores.mean() < -3.8
    assert len({round(float(v), 6) for v in fitted.sample(50, random_state=0)[:, 2]}) == 50
    with pytest.warns(UserWarning, match="score the raw integer rows"):
        fitted.score_samples(X[500:] + [0.0, 0.0, 0.5])


def test_a_column_with_a_point_mass_is_warned_about():
    # 90% zeros beside continuous values: FlowDensity scored rows at 0 at +4.55 nats, at
    # 0.1 at -13.5, silently (no integer column, more than a few values).
    from exactflow.runs.notes import point_mass_columns

    rng = np.random.default_rng(0)
    mass = np.where(rng.uniform(size=2000) < 0.9, 0.0, rng.normal(5, 1, 2000))
    X = np.c_[rng.normal(size=2000), mass]
    assert point_mass_columns(X) == [(1, [(0.0, pytest.approx(0.9, abs=0.02))])]
    assert point_mass_columns(X, skip=[1]) == []
    seven = rng.uniform(size=(2000, 2))
    seven[rng.uniform(size=2000) < 0.07, 0] = 0.0  # (7% of exact zeros: a point mass too)
    assert [j for j, _ in point_mass_columns(seven)] == [0]
    # clipped at both ends: two masses, neither five times the other
    clipped = np.clip(rng.normal(50, 30, size=(2000, 1)), 20, 80)  # (16% at each end)
    assert sorted(v for v, _ in point_mass_columns(clipped)[0][1]) == [20.0, 80.0]
    # rounded measurements repeat values, none five times as often as the next nor by 10%
    assert point_mass_columns(np.round(rng.normal(size=(5000, 2)), 1)) == []
    with pytest.warns(UserWarning, match=r"column 1 \(column indices\) holds the value 0.0 in "
                                         r"90% of its rows, other values besides"):
        FlowDensity(model="gaussian").fit(X)


def test_columns_of_a_few_levels_that_are_not_integers_are_warned_about():
    # A 2-level column scaled by a StandardScaler (diabetes' sex, +-0.0507) escaped the
    # integer check: a 5-component mixture scored held-out rows 2.1 nats higher with it.
    from exactflow.runs.notes import few_valued_columns

    rng = np.random.default_rng(1)
    X = np.c_[rng.normal(size=(400, 2)), (rng.integers(0, 2, 400) - 0.5) / 0.5 * 0.0507]
    assert few_valued_columns(X) == [2]
    assert few_valued_columns(X[:, :2].round(1)) == []  # one decimal: more than 20 values
    assert few_valued_columns(np.c_[X, rng.integers(0, 3, 400)]) == [2]  # integers: not here
    assert few_valued_columns(X[:15]) == []  # too few rows to tell levels from values
    # (the first 4,096 rows are looked at first: levels there, measurements after them)
    late = np.r_[np.tile([0.25, 0.75], 2500), rng.normal(size=1000)]
    assert few_valued_columns(np.c_[late, late[::-1]]) == []
    assert few_valued_columns(np.c_[late[:4500], late[:4500] * 3]) == [0, 1]
    with pytest.warns(UserWarning, match=r"column 2 \(column indices\) takes only a few "
                                         r"distinct values, not integers.*integer levels"):
        FlowDensity("gaussian").fit(X)


def test_a_table_too_small_to_split_says_so_on_the_leaderboard():
    fitted = FlowDensity(budget=3).fit(np.random.default_rng(0).normal(size=(6, 1)))
    (entry,) = fitted.leaderboard_  # (it was None: nothing said what was kept, or why)
    assert entry["name"] == "gaussian" and entry["chosen"]
    assert entry["status"].startswith("fitted on all 6 rows: too few to hold out")


def test_clone_pipeline_and_grid_search():
    X = ef.datasets.toy("8gaussians", 600, seed=0).numpy()
    est = tiny(model="maf", steps=40, hidden=(16,))
    twin = clone(est)
    assert twin.get_params() == est.get_params() and not hasattr(twin, "flow_")

    pipe = make_pipeline(StandardScaler(), tiny(model="maf", steps=10)).fit(X)
    assert pipe.score_samples(X[:5]).shape == (5,)

    grid = GridSearchCV(est, {"layers": [1, 3], "lr": [1e-3, 1e-2]}, cv=2).fit(X)
    assert set(grid.cv_results_["params"][0]) == {"layers", "lr"}
    scores = grid.cv_results_["mean_test_score"]
    assert np.all(np.isfinite(scores)) and len(scores) == 4
    # GridSearchCV scores by total held-out log-likelihood; the refit model scores rows.
    assert grid.best_estimator_.score_samples(X[:10]).shape == (10,)
    assert grid.best_score_ == pytest.approx(np.max(scores))


def test_the_default_on_a_small_real_table_is_near_the_gaussian_never_far_off():
    # scikit-learn's wine table (178 x 13), standardized, 3 held-out splits. FlowDensity()
    # used to give held-out NLLs of 1e2..1e9 here; the default now never strays far from
    # the Gaussian it starts from.
    from sklearn.datasets import load_wine

    X = load_wine().data
    X = (X - X.mean(0)) / X.std(0)
    for seed in range(3):
        order = np.random.default_rng(seed).permutation(len(X))
        train, test = X[order[:140]], X[order[140:]]
        est = FlowDensity(budget=8, random_state=seed).fit(train)
        gaussian = FlowDensity(model="gaussian", random_state=seed).fit(train)
        nll, ref = -est.score_samples(test).mean(), -gaussian.score_samples(test).mean()
        assert np.isfinite(nll) and nll < ref + 3.0, (seed, nll, ref)
        assert est.leaderboard_ and sum(e["chosen"] for e in est.leaderboard_) == 1
        names = [e["name"] for e in est.leaderboard_]
        assert names[0] == "gaussian" and any(n.startswith("gmm") for n in names)


@pytest.mark.parametrize("kwargs", [{"layers": 3}, {"hidden": (8,)}, {"steps": 5},
                                    {"epochs": 2}, {"batch_size": 16}, {"lr": 0.0},
                                    {"model_kwargs": {"batch_norm": False}}])
def test_auto_refuses_settings_that_belong_to_one_model(kwargs):
    # The ladder sets each candidate's size and training itself: a setting it would
    # ignore (a grid search over lr, say) is refused by name instead.
    X = np.random.default_rng(0).normal(size=(50, 2))
    with pytest.raises(ValueError, match=f"^{next(iter(kwargs))} set one model.*give model=NAME"):
        FlowDensity(**kwargs).fit(X)
    with pytest.raises(ValueError, match="validation_fraction must be above 0"):
        FlowDensity(validation_fraction=0).fit(X)
    with pytest.raises(ValueError, match="budget is the time of the auto ladder; "
                                         "model='maf' trains one model"):
        FlowDensity(model="maf", budget=5).fit(X)


def test_standardize_takes_one_scale_per_column_or_one_for_all():
    rng = np.random.default_rng(4)
    X = rng.integers(0, 17, size=(200, 3)) + rng.random((200, 3))
    X[:, 0] = np.where(rng.random(200) < 0.03, 16.0, 0.0) + rng.random(200)  # a border pixel
    for standardize, pooled in (("auto", True), ("pooled", True), (True, False)):
        est = tiny(model="maf", standardize=standardize).fit(X)
        first = est.flow_.transform[0]
        assert first.pooled == pooled and est.flow_.config["standardize"] == (
            "pooled" if pooled else True)
    assert tiny(model="maf", standardize=False).fit(X).flow_.config["standardize"] is False
    with pytest.raises(ValueError, match="standardize must be"):
        tiny(model="maf", standardize="rows").fit(X)


def test_verbose_auto_says_what_the_ladder_does(capsys):
    X = np.random.default_rng(4).normal(size=(60, 2))  # 9 validation rows: no flow tried
    FlowDensity(budget=5, random_state=0, verbose=True).fit(X)
    err = capsys.readouterr().err
    assert "by 5-fold cross-validation" in err and "too few to choose a flow on" in err
    FlowDensity(budget=5, random_state=0).fit(X)
    assert capsys.readouterr().err == ""


def test_verbose_named_model_says_what_it_trained_and_kept(capsys):
    # (off a terminal progress comes every 30 s: a short fit said nothing at all)
    X = np.random.default_rng(4).normal(size=(200, 2))
    est = FlowDensity(model="maf", layers=1, hidden=8, steps=20, random_state=0,
                      verbose=True).fit(X)
    h = est.history_
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"FlowDensity: maf trained 20 steps in {h.time[-1]:.1f} s, kept step {h.best_step} "
        f"(validation NLL {h.best_val:.4f})")
    FlowDensity(model="gaussian", verbose=True).fit(X)
    assert capsys.readouterr().err.strip() == "FlowDensity: gaussian fitted in closed form"


def test_data_errors_name_a_data_frames_columns():
    pd = pytest.importorskip("pandas")
    X = np.random.default_rng(2).normal(size=(50, 2))
    frame = pd.DataFrame(np.c_[X, 2 * X[:, 0], np.ones(50)], columns=["a", "b", "c", "k"])
    with warnings.catch_warnings():  # (no "integers only" note beside the error)
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match=r"constant \(zero-variance\) column 'k'"):
            tiny().fit(frame)  # the constant column first, as the command line checks
    with pytest.raises(ValueError, match=r"columns 'a', 'c' are linearly dependent"):
        tiny().fit(frame[["a", "b", "c"]])


def test_flow_density_says_it_is_unconditional():
    X = np.random.default_rng(0).normal(size=(100, 2))
    for kwargs in ({"context": 2}, {"embedding": {"features": 4}}):
        with pytest.raises(ValueError, match="FlowDensity fits an unconditional density"):
            FlowDensity("maf", steps=2, model_kwargs=kwargs).fit(X)


def test_p_values_and_flags_rank_rows_against_the_held_out_ones():
    # The command line gave conformal p-values and flags; the estimator had neither.
    from exactflow.runs import anomaly

    rng = np.random.default_rng(0)
    mix = np.array([[1.0, 0.0, 0.0], [0.8, 0.6, 0.0], [-0.3, 0.2, 2.0]])
    X = rng.normal(size=(2000, 3)) @ mix.T
    fresh = rng.normal(size=(4000, 3)) @ mix.T
    planted = fresh[:20] + np.array([0.0, 0.0, 25.0])  # (12 sd out)
    for est in (FlowDensity(budget=15, random_state=0),
                FlowDensity("maf", layers=1, hidden=(16,), steps=200, random_state=0)):
        est.fit(X)
        assert len(est.calibration_) == round(0.15 * 2000)
        held = est.history_.held_out
        assert np.array_equal(est.calibration_, est.score_samples(X[held]))
        p = est.p_values(fresh)
        np.testing.assert_array_equal(p, anomaly.p_values(est.score_samples(fresh),
                                                          est.calibration_))
        rate = est.flag(fresh, 0.05).mean()  # (300 held-out rows: 9 runs in 10 within)
        low, high = anomaly.flag_rate_range(len(est.calibration_), 0.05)
        assert low - 0.01 < rate < high + 0.01, rate
        assert est.flag(planted, 0.01).all()
    gaussian = FlowDensity("gaussian").fit(X)
    assert gaussian.calibration_ is None
    with pytest.raises(ValueError, match="no held-out rows calibrate p-values"):
        gaussian.p_values(fresh)
