"""The mixture search of ``model="auto"``: one validation split or k-fold cross-validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import exactflow as ef
from exactflow.gaussians import GaussianMixture
from exactflow.training.auto import ladder, select_gmm


def _clusters(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = np.array([[-6.0, 0.0], [0.0, 6.0], [6.0, 0.0]])
    return centers[rng.integers(0, 3, n)] + rng.normal(size=(n, 2))


def test_select_gmm_on_validation_finds_the_clusters_and_reports_their_validation_nll():
    train, val = _clusters(300, 0), _clusters(100, 1)
    spec, nll, fits = select_gmm(train, val, components=(1, 2, 3, 4), seed=0)
    assert spec["components"] >= 3 and fits == 8
    mix = GaussianMixture(2, spec["components"], spec["covariance"]).double()
    mix.fit_to(train, seed=0)
    with torch.no_grad():
        assert nll == pytest.approx(float(-mix.log_prob(torch.as_tensor(val)).mean()))


def test_select_gmm_by_folds_scores_every_pooled_row_once_when_held_out():
    train, val = _clusters(90, 2), _clusters(30, 3)
    spec, nll, fits = select_gmm(train, val, components=(1, 3), seed=4, folds=4)
    assert spec["components"] == 3 and fits == 2 * 2 * 4
    pooled = np.concatenate([train, val])
    parts = np.array_split(np.random.default_rng(4).permutation(len(pooled)), 4)
    total = 0.0
    for part in parts:
        held = np.zeros(len(pooled), dtype=bool)
        held[part] = True
        mix = GaussianMixture(2, 3, spec["covariance"]).double()
        mix.fit_to(pooled[~held], seed=4)
        with torch.no_grad():
            total += float(-mix.log_prob(torch.as_tensor(pooled[held])).sum())
    assert nll == pytest.approx(total / len(pooled))


def test_a_large_training_set_is_searched_on_a_subset_and_the_choice_fitted_on_every_row(
    monkeypatch,
):
    import exactflow.training.mixtures as mixtures

    monkeypatch.setattr(mixtures, "SEARCH_ROWS", 150)
    tried: list[tuple[int, str, int]] = []
    fit_to = GaussianMixture.fit_to

    def record(self, data, **kwargs):
        tried.append((self.components, self.covariance, len(data)))
        return fit_to(self, data, **kwargs)

    monkeypatch.setattr(GaussianMixture, "fit_to", record)
    train, val = _clusters(600, 7), _clusters(200, 8)
    spec, nll, fits, state, rows = mixtures.search_gmm(train, val, components=(1, 2, 3, 4, 5),
                                                        seed=0, deadline=None, folds=1)
    # coarse sizes first, both covariance types each; then one fit to every row
    assert [t[:2] for t in tried[:6]] == [(1, "full"), (1, "diag"), (2, "full"),
                                          (2, "diag"), (4, "full"), (4, "diag")]
    assert {t[2] for t in tried[:-1]} == {150} and tried[-1][2] == 600 == rows and fits == 11
    assert tried[-1][:2] == (spec["components"], spec["covariance"]) and spec["components"] >= 3
    mix = GaussianMixture(2, spec["components"], spec["covariance"]).double()
    mix.load_state_dict(state)
    with torch.no_grad():  # the reported NLL is the fit to every row's
        assert nll == pytest.approx(float(-mix.log_prob(torch.as_tensor(val)).mean()))


def test_a_subset_search_out_of_time_keeps_its_subset_fit(monkeypatch):
    # (the fit on every row of 1.6 million took 24 s of a 2.5 s share)
    import exactflow.training.mixtures as mixtures

    monkeypatch.setattr(mixtures, "SEARCH_ROWS", 150)
    train, val = _clusters(600, 12), _clusters(100, 13)
    found = mixtures.search_gmm(train, val, components=(1, 2, 3), seed=0, deadline=0.0,
                                 folds=1)
    assert found.spec == {"components": 1, "covariance": "full"}
    assert found.fits == 1 and found.rows == 150


def test_a_search_out_of_time_keeps_its_first_fit():
    train, val = _clusters(300, 9), _clusters(100, 10)
    spec, _, fits = select_gmm(train, val, components=(1, 2, 3), deadline=0.0)
    assert spec == {"components": 1, "covariance": "full"} and fits == 1


def test_em_started_from_a_mixture_climbs_from_it():
    x = torch.as_tensor(_clusters(900, 11))
    part = GaussianMixture(2, 3).double().fit_to(x[:90], seed=0)
    for covariance in ("full", "diag"):
        start = GaussianMixture(2, 3, covariance).double().fit_to(x[:90], seed=0)
        whole = GaussianMixture(2, 3, covariance).double().fit_to(x, seed=1, start=start)
        with torch.no_grad():
            assert whole.log_prob(x).mean() >= start.log_prob(x).mean()
        # from its own optimum EM stays there
        again = GaussianMixture(2, 3, covariance).double().fit_to(x, seed=2, start=whole)
        torch.testing.assert_close(again.loc, whole.loc, rtol=0, atol=1e-3)
    with pytest.raises(ValueError, match="components"):
        GaussianMixture(2, 4).double().fit_to(x, start=part)


def test_select_gmm_skips_sizes_larger_than_a_fold_and_refuses_bad_folds():
    train, val = _clusters(8, 5), _clusters(4, 6)
    spec, _, _ = select_gmm(train, val, components=(1, 2, 11), folds=3)
    assert spec["components"] in (1, 2)
    with pytest.raises(ValueError, match="folds"):
        select_gmm(train, val, folds=0)


def test_the_ladder_starts_from_the_mixture_and_from_a_standard_normal():
    gmm = {"components": 2, "covariance": "full"}
    rungs = ladder(500, 5, 0, gmm)
    first, second = rungs[0], rungs[1]
    assert first.name == "nsf on the mixture" and first.config["kind"] == "coupling"
    assert first.config["base"] == {"name": "gmm", **gmm} and first.options == {"lr": 3e-4}
    assert second.name == "nsf-autoregressive" and second.config["kind"] == "autoregressive"
    assert "base" not in second.config and second.config["layers"] == 3
    assert [r.priority for r in rungs] == [True, True, False, False, False]
    assert rungs[2].name == "nsf-autoregressive on the mixture"


def test_one_column_gets_no_coupling_rung_and_names_say_what_they_are():
    rungs = ladder(500, 1, 0, {"components": 3, "covariance": "diag"})
    assert [r.name for r in rungs] == [
        "nsf-autoregressive on the mixture", "nsf-autoregressive", "maf on the mixture"]
    assert all(r.config.get("kind", "autoregressive") == "autoregressive" for r in rungs)
    assert [r.priority for r in rungs] == [True, True, False]


def test_auto_pools_the_scale_of_columns_on_one_range_and_says_so():
    from exactflow.training.auto import fit_auto

    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 17, size=(300, 4)) + rng.random((300, 4))
    # A border pixel: blank but for a few inked images (per-column scaling would put those
    # far out).
    pixels[:, 0] = np.where(rng.random(300) < 0.03, 16.0, 0.0) + rng.random(300)
    lines: list[str] = []
    result = fit_auto(pixels, budget=3, seed=0, log=lines.append)
    assert result.flow.config["standardize"] == "pooled"
    std = result.flow.transform[0].std
    assert result.flow.transform[0].pooled and torch.all(std == std[0])
    assert any("for all columns (pooled)" in line for line in lines)
    # Asked for one scale per column, it gets one.
    result = fit_auto(pixels, budget=3, seed=0, standardize=True)
    assert result.flow.config["standardize"] is True and not result.flow.transform[0].pooled


def test_too_few_validation_rows_keep_a_mixture_chosen_by_cross_validation():
    from exactflow.training.auto import MIN_VAL_ROWS, fit_auto

    x = _clusters(60, 4)  # 9 validation rows
    lines: list[str] = []
    result = fit_auto(x, budget=5, seed=0, log=lines.append)
    assert int(round(0.15 * 60)) < MIN_VAL_ROWS
    board = {e.name: e for e in result.leaderboard}
    chosen = [e for e in result.leaderboard if e.chosen]
    assert len(chosen) == 1 and chosen[0].name.startswith("gmm (")
    assert result.flow.config["model"] == "gmm"
    assert board["gaussian"].status.startswith("skipped: in the mixtures' cross-validation")
    flows = [e for e in result.leaderboard if e.config.get("model") not in ("gaussian", "gmm")]
    assert flows and all(e.status == "skipped: 9 validation rows, too few to choose a flow on"
                         and e.val_nll is None for e in flows)
    assert any("by 5-fold cross-validation" in line for line in lines)
    assert any("too few to choose a flow on" in line and "fitted again on all 60 rows" in line
               for line in lines)
    # chosen on every row, fitted on every row (it was fitted on the 51 training rows)
    again = ef.models.build({**chosen[0].config, "features": x.shape[1], "standardize": True})
    ef.fit(again, x, val_fraction=0.0, seed=0, progress=False)
    np.testing.assert_allclose(ef.scoring.log_prob(result.flow, x),
                               ef.scoring.log_prob(again, x), rtol=1e-6)
    assert result.history.val_nll == []
    # With enough validation rows the ladder runs as before.
    result = fit_auto(_clusters(200, 5), budget=4, seed=0)
    names = [e.name for e in result.leaderboard]
    assert "gaussian" in names and result.leaderboard[0].status == "ok"
    assert not any("too few" in e.status for e in result.leaderboard)
    assert any(e.val_nll is not None and e.config.get("model") == "nsf"
               for e in result.leaderboard)


def test_fit_auto_takes_a_list_of_rows():
    rows = _clusters(200, 3).tolist()  # ("expected a 2-D array of rows, got shape None")
    result = ef.fit_auto(rows, budget=2, seed=0)
    assert result.flow.features == 2 and any(e.chosen for e in result.leaderboard)


def test_too_few_validation_rows_fall_back_to_the_gaussian_if_no_mixture_fits(monkeypatch):
    import exactflow.training.auto as auto

    def no_mixture(*args, **kwargs):
        raise ValueError("no mixture today")

    monkeypatch.setattr(auto, "search_gmm", no_mixture)
    result = auto.fit_auto(_clusters(60, 4), budget=5, seed=0)
    assert result.flow.config["model"] == "gaussian"
    board = result.leaderboard
    assert board[0].name == "gaussian" and board[0].chosen and board[0].status == "ok"
    flows = [e for e in board if e.config.get("model") not in ("gaussian", "gmm")]
    assert flows and all("too few to choose a flow on" in e.status for e in flows)


def test_a_ladder_where_nothing_fits_raises_a_training_error(monkeypatch):
    import exactflow as ef
    import exactflow.training.auto as auto

    def broken(*args, **kwargs):
        raise ValueError("broken")

    monkeypatch.setattr(auto, "search_gmm", broken)
    monkeypatch.setattr(auto, "build", broken)
    with pytest.raises(ef.TrainingError, match="no candidate of the ladder could be fitted"):
        auto.fit_auto(_clusters(200, 1), budget=2, seed=0)


def test_fit_auto_refuses_dependent_columns_and_too_few_training_rows():
    from exactflow.datasets import DataError
    from exactflow.training.auto import fit_auto

    x = _clusters(200, 6)
    with pytest.raises(DataError, match=r"training data: columns 0, 2 .* linearly dependent"):
        fit_auto(np.c_[x, 3 * x[:, 0] + 1], budget=2)
    rows = np.random.default_rng(0).normal(size=(10, 8))
    with pytest.raises(DataError, match=r"after holding out 2 validation rows, 8 training "
                                        r"rows remain for 8 columns"):
        fit_auto(rows, budget=2, val_fraction=0.2)


def test_validation_rows_that_decide_the_choice_alone_are_named():
    import warnings

    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, 3)) @ np.array([[1.0, 0.5, 0.0], [0.0, 1.0, 0.3], [0, 0, 1]])
    train, val = x[:500], x[500:].copy()
    candidates = [ef.training.auto.Candidate("maf", {"model": "maf", "layers": 1},
                                             {"steps": 20})]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ef.fit_auto(train, val, budget=30, candidates=candidates, progress=False)
    val[7] = 40.0  # one row 40 standard deviations out: its NLL is most of the mean's
    with pytest.warns(UserWarning, match=r"1 validation row \(row 7 of the validation data\) "
                                         r"scores more than 50 nats below the median row.*"
                                         r"the choice may be its more than the other rows'"):
        ef.fit_auto(train, val, budget=30, candidates=candidates, progress=False)


def test_held_out_rows_keep_their_numbers_in_the_data():
    from exactflow.training.batches import hold_out, wrap

    data = np.arange(200.0).reshape(100, 2) ** 1.5
    rows = wrap(data, "training data", 2, strict=True)
    train, _, val, _ = hold_out(rows, None, 0.2, seed=0)
    assert val is not None and train.origin is not None and val.origin is not None
    np.testing.assert_array_equal(data[val.origin], val.data)
    np.testing.assert_array_equal(data[train.origin], train.data)
    assert sorted([*train.origin, *val.origin]) == list(range(100))


def test_rungs_on_the_chosen_mixture_start_from_its_own_fit(monkeypatch):
    # Each rung on the mixture fitted the same EM to the same rows again (2.2 s on
    # 90,000 x 6 rows, outside its share of the budget).
    import exactflow.training.auto as auto

    def short_ladder(n, d, c, gmm):
        config = {"model": "maf", "layers": 1, "hidden": [8], "base": {"name": "gmm", **gmm}}
        return [auto.Candidate("maf on the mixture", config, {"steps": 3})]

    seen = []
    fit = auto.fit

    def spy(flow, *args, **kwargs):
        before = {k: v.clone() for k, v in flow.base.state_dict().items()}
        history = fit(flow, *args, **kwargs)
        seen.append((before, {k: v.clone() for k, v in flow.base.state_dict().items()}))
        return history

    monkeypatch.setattr(auto, "ladder", short_ladder)
    monkeypatch.setattr(auto, "fit", spy)
    rng = np.random.default_rng(1)
    x = np.concatenate([rng.normal(-3, 1, size=(200, 2)), rng.normal(3, 1, size=(200, 2))])
    ef.fit_auto(x, budget=60, progress=False)
    (_, _), (_, mixture), (maf_before, maf_after) = seen  # gaussian, gmm, maf
    assert bool(maf_before["fitted"]) and all(
        torch.equal(maf_before[k], mixture[k]) for k in mixture)
    assert all(torch.equal(maf_after[k], mixture[k]) for k in mixture)  # (a fixed base)


def test_the_mixture_rung_takes_the_searchs_fit_without_a_second_em(monkeypatch):
    # The search fitted the chosen mixture to the training rows; its rung ran the same EM
    # on the same rows again (6.1 s of a 5 s share on 200,000 x 10 rows).
    import exactflow.training.auto as auto

    monkeypatch.setattr(auto, "ladder", lambda n, d, c, gmm: [])
    calls = []
    em = ef.GaussianMixture.fit_to

    def counted(self, data, **kwargs):
        calls.append(len(data))
        return em(self, data, **kwargs)

    monkeypatch.setattr(ef.GaussianMixture, "fit_to", counted)
    rng = np.random.default_rng(2)
    x = np.concatenate([rng.normal(-3, 1, size=(300, 2)), rng.normal(3, 1, size=(300, 2))])
    logs: list[str] = []
    result = ef.fit_auto(x, budget=60, progress=False, log=logs.append)
    searched = next(line for line in logs if line.startswith("gmm: "))
    assert f"gmm: {len(calls)} mixtures fitted" in searched  # (none after the search)
    entry = next(e for e in result.leaderboard if e.name.startswith("gmm ("))
    assert entry.chosen and entry.config["components"] == 2 and entry.val_nll is not None
    assert bool(result.flow.base.fitted)


def test_the_ladder_imports_its_em_before_its_clock_starts(monkeypatch):
    # (the import of scikit-learn's mixture, 1-4 s, was charged to the mixture search: on a
    # 10 s budget it fitted one mixture, where it fits several once the import is done)
    import sys

    monkeypatch.setitem(sys.modules, "sklearn.mixture", None)
    with pytest.raises(ImportError, match="needs scikit-learn: pip install scikit-learn"):
        ef.fit_auto(np.zeros((5, 2)), budget=1.0)  # (before the rows are looked at)


_FIRST_FIT = """
import sys, time
import numpy as np
import exactflow as ef
import exactflow.training.auto as auto

seen = []
real = time.perf_counter

class Clock:
    def perf_counter(self):
        if not seen:
            seen.append(sorted(m for m in ("torch._dynamo", "sklearn.mixture")
                               if m in sys.modules))
        return real()

    def __getattr__(self, name):
        return getattr(time, name)

auto.time = Clock()
x = np.random.default_rng(0).normal(size=(200, 2))
ef.fit_auto(x, budget=1, candidates=[])
print(seen[0])
"""


def test_a_first_fit_in_a_process_imports_what_it_needs_before_its_clock_starts():
    # (torch's first optimizer imports its compiler, 2-3 s, which came off the budget of
    # the first FlowDensity of a process: its flow trained 8 steps where a second one 72)
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _FIRST_FIT], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[-2] == "['sklearn.mixture', 'torch._dynamo']", done.stdout


def test_a_candidate_better_only_within_noise_or_rounding_is_not_kept(monkeypatch):
    # A spline flow on the mixture that kept its step 0 is the mixture, scored through
    # identity layers: 2e-8 nats below it, it was kept and reported as a 41,899-parameter
    # flow. On 3-D Gaussian rows a flow 0.02 nats better on the validation rows, within
    # their noise, was kept half the time and was 0.03-0.1 nats worse on new rows. A later
    # candidate must beat the best by more than MARGIN_SE standard errors of the per-row
    # difference (and rounding); a real gain is still taken.
    import exactflow.training.auto as auto

    shift = {"gain": 0.0, "noise": 0.0}

    def short_ladder(n, d, c, gmm):
        config = {"model": "maf", "layers": 1, "hidden": [8], "base": {"name": "gmm", **gmm}}
        return [auto.Candidate("maf on the mixture", config, {"steps": 2})]

    def scored(flow, data, context=None):
        each = row_nll(flow, data, context)
        if flow.config["model"] == "gmm":
            mixture[:] = [each]
        elif flow.config["model"] == "maf":  # (the mixture's rows, better by gain on average)
            noise = torch.randn(len(each), generator=torch.Generator().manual_seed(0),
                                dtype=torch.float64)
            each = mixture[0] - shift["gain"] + shift["noise"] * (noise - noise.mean())
        return each

    row_nll = auto.row_nll
    mixture: list[torch.Tensor] = []
    monkeypatch.setattr(auto, "ladder", short_ladder)
    monkeypatch.setattr(auto, "row_nll", scored)
    x = _clusters(400, seed=3)
    se = 1.0 / np.sqrt(60)  # (60 validation rows, a per-row spread of 1 nat)
    for gain, noise, kept, why in ((2e-8, 0.0, "gmm", "beyond rounding"),
                                   (1e-3, 0.0, "maf on the mixture", ""),
                                   (0.4 * se, 1.0, "gmm", "within 0.5 standard error"),
                                   (3 * se, 1.0, "maf on the mixture", "")):
        shift.update(gain=gain, noise=noise)
        result = ef.fit_auto(x, budget=60, progress=False)
        assert result.chosen.name.startswith(kept), result.leaderboard
        flow_entry = result.leaderboard[-1]
        assert (why in flow_entry.status) if why else flow_entry.status == "ok", flow_entry


def test_a_rung_that_diverges_is_listed_with_what_happened_not_advice_on_its_settings():
    # A diverging rung was listed with "Lower the learning rate (lr, --lr ...)": the ladder
    # sets each rung's learning rate, so the advice pointed the user at the wrong fix.
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 2))
    candidates = [ef.training.auto.Candidate("maf", {"model": "maf", "layers": 2},
                                             {"steps": 30, "lr": 1e6})]
    result = ef.fit_auto(x, budget=30, candidates=candidates, progress=False)
    entry = next(e for e in result.leaderboard if e.name == "maf")
    assert entry.status.startswith("failed: training diverged"), entry.status
    assert "learning rate (lr" not in entry.status and "Try:" not in entry.status
    assert result.chosen.name != "maf"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the machine has CUDA")
def test_a_device_the_machine_lacks_is_refused_before_the_ladder_runs():
    # (the whole ladder ran, mixture search included, then every rung failed)
    with pytest.raises(ValueError, match="device='cuda' was requested but this machine has "
                                         "no CUDA device"):
        ef.fit_auto(torch.randn(100, 2), budget=5, device="cuda")


def test_a_conditional_ladder_starts_from_the_linear_gaussian_regression():
    # With a context the ladder had no classical rung: on 300 rows of a linear-Gaussian
    # model it kept a MAF, 0.24 nats a row worse on 2,000 new rows than the regression
    # (1.69 against 1.45; the true conditional entropy is 1.45), at budgets of 20 and 60 s.
    from exactflow.training.auto import Candidate

    gen = np.random.default_rng(0)

    def rows(n):
        c = gen.normal(size=(n, 3))
        return c @ np.array([[1.0, -2.0, 0.5], [0.3, 1.0, 2.0]]).T + 0.5 * gen.normal(
            size=(n, 2)), c

    x, c = rows(300)
    short = [Candidate("maf", {"model": "maf", "layers": 1, "hidden": [8]}, {"steps": 5})]
    result = ef.fit_auto(x, context=c, budget=30, candidates=short)
    assert [e.name for e in result.leaderboard] == ["gaussian", "maf"]
    assert result.chosen.name == "gaussian" and result.flow.context_features == 3
    x_new, c_new = rows(2000)
    with torch.no_grad():
        nll = -result.flow.log_prob(x_new, c_new).mean().item()
    assert abs(nll - 2 * 0.5 * np.log(2 * np.pi * np.e * 0.25)) < 0.1  # (the true entropy)
    # Too few validation rows to choose a flow on: the regression, fitted on every row.
    x, c = rows(60)
    lines: list[str] = []
    small = ef.fit_auto(x, context=c, budget=30, log=lines.append)
    assert small.chosen.name == "gaussian"
    assert [e.status.startswith("skipped") for e in small.leaderboard[1:]] == [True] * 3
    assert any("the linear-Gaussian regression is kept, fitted again on all 60" in line
               for line in lines)
    every = ef.models.gaussian(2, context=3, standardize=True).double()
    ef.fit(every, x, context=c, progress=False)
    with torch.no_grad():
        torch.testing.assert_close(small.flow.double().log_prob(x, c), every.log_prob(x, c),
                                   rtol=0, atol=1e-5)  # (the kept model is float32)
