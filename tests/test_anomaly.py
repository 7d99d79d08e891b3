"""Anomaly flags that mean what they say: conformal p-values against held-out rows, and
columns matched by name."""

from __future__ import annotations

import contextlib
import io
import json
import warnings

import numpy as np
import pytest

from exactflow.cli import main
from exactflow.runs import anomaly, train_run


def cli(argv: list) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("seed", range(5))
def test_p_values_of_exchangeable_scores_are_uniform(seed):
    rng = np.random.default_rng(seed)
    calibration, new = rng.normal(size=400), rng.normal(size=4000)
    p = anomaly.p_values(new, calibration)
    assert p.min() >= 1 / 401 and p.max() <= 1.0
    for q in (0.01, 0.05, 0.2):
        rate = float((p <= q).mean())
        # P(p <= q) = floor(q (n + 1)) / (n + 1) given exchangeability; the rate on 4000 new
        # rows also varies with the calibration draw (a Beta of sd sqrt(q / 400)).
        sd = np.sqrt(q * (1 - q) / 400 + q * (1 - q) / 4000)
        assert abs(rate - q) < 4.5 * sd, (q, rate)


@pytest.mark.parametrize(("m", "q"), [(600, 0.05), (60, 0.1), (2000, 0.01)])
def test_the_flag_rate_range_holds_its_share_of_calibration_sets(m, q):
    # `score` said "about 5.0% of new normal rows are flagged" on a run that flagged 8%:
    # the share flagged depends on which m rows set the threshold. Over 4,000 sets of m
    # standard-normal scores, the true share flagged, Phi(threshold), must fall in the
    # range for 90% of them (binomial sd 0.5 points) and below or above it about equally.
    from scipy.stats import norm

    low, high = anomaly.flag_rate_range(m, q)
    rng = np.random.default_rng(m)
    k = int(np.floor(q * (m + 1) + 1e-9))
    shares = norm.cdf(np.sort(rng.normal(size=(4000, m)), axis=1)[:, k - 1])
    inside = float(((shares >= low) & (shares <= high)).mean())
    assert abs(inside - 0.9) < 0.02, inside
    assert abs(float((shares < low).mean()) - 0.05) < 0.015
    assert low < anomaly.flag_rate(m, q) < high
    # (the share is exactly that of the scores below the k-th lowest calibration score)
    new = rng.normal(size=200_000)
    cal = rng.normal(size=m)
    _, flags = anomaly.flag(new, cal, q)
    assert abs(flags.mean() - norm.cdf(np.sort(cal)[k - 1])) < 0.003


def test_minus_inf_rows_are_always_flagged():
    p, flags = anomaly.flag(np.array([-np.inf, 0.0, 5.0]), np.linspace(-1, 1, 9), 0.01)
    assert flags.tolist() == [True, False, False] and p[0] == pytest.approx(0.1)
    with pytest.raises(ValueError, match="q must be a number in"):
        anomaly.flag(np.zeros(2), np.zeros(2), 1.5)


def correlated_table(path, n, seed, columns=("a", "b", "c")):
    rng = np.random.default_rng(seed)
    mix = np.array([[1.0, 0.0, 0.0], [0.8, 0.6, 0.0], [-0.3, 0.2, 2.0]])
    rows = rng.normal(size=(n, 3)) @ mix.T + np.array([5.0, -1.0, 100.0])
    order = ["a", "b", "c"]
    table = rows[:, [order.index(c) for c in columns]]
    np.savetxt(path, table, delimiter=",", header=",".join(columns), comments="")
    return path


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_flags_at_q_flag_about_q_of_new_normal_rows(tmp_path, seed):
    train = correlated_table(tmp_path / "train.csv", 5000, seed)
    new = correlated_table(tmp_path / "new.csv", 3000, 100 + seed)
    train_run(train, tmp_path / "run", model="gaussian", test_fraction=0.2, seed=seed,
              progress=False)
    code, out, err = cli(["score", tmp_path / "run", new, "--threshold-quantile", "0.05",
                          "--json"])
    assert code == 0, err
    rate = json.loads(out)["anomalies"] / 3000
    # 1,500 held-out rows and 3,000 new ones: sd about 0.0068; 4.5 sd either side.
    assert 0.019 < rate < 0.081, rate


def test_reordered_columns_score_identically_and_a_missing_one_is_named(tmp_path):
    train = correlated_table(tmp_path / "train.csv", 600, 0)
    train_run(train, tmp_path / "run", model="gaussian", progress=False)
    same = correlated_table(tmp_path / "same.csv", 50, 5)
    shuffled = correlated_table(tmp_path / "shuffled.csv", 50, 5, columns=("c", "a", "b"))
    results = []
    for path in (same, shuffled):
        code, out, err = cli(["score", tmp_path / "run", path, "--json"])
        assert code == 0, err
        results.append(json.loads(out)["log_density"])
    np.testing.assert_allclose(results[0], results[1], rtol=1e-12)
    narrow = tmp_path / "narrow.csv"
    narrow.write_text("a,b,d\n1,2,3\n")
    code, _, err = cli(["score", tmp_path / "run", narrow])
    assert code == 1 and "no column named 'c'" in err
    # --columns with the model's names, in any order, is matched by name too.
    code, out, err = cli(["score", tmp_path / "run", shuffled, "--columns", "b,c,a", "--json"])
    assert code == 0, err
    np.testing.assert_allclose(json.loads(out)["log_density"], results[0], rtol=1e-12)
    code, _, err = cli(["score", tmp_path / "run", shuffled, "--columns", "c,a"])
    assert code == 1 and "needs all of them (missing: 'b')" in err
    code, _, err = cli(["score", tmp_path / "run", shuffled, "--columns", "0,1"])
    assert code == 1 and "--columns picks 2 columns" in err


def test_a_threshold_below_the_smallest_p_value_is_warned_about(tmp_path):
    train = correlated_table(tmp_path / "train.csv", 200, 3)
    new = correlated_table(tmp_path / "new.csv", 50, 4)
    train_run(train, tmp_path / "run", model="gaussian", seed=0, progress=False)
    with pytest.warns(UserWarning, match=r"with 40 held-out rows the smallest p-value is "
                                         r"1/41 = 0.0244, so a threshold of 0.01 flags only "
                                         r"rows scored -inf"):
        code, out, err = cli(["score", tmp_path / "run", new, "--threshold-quantile", "0.01",
                              "--json"])
    assert code == 0, err
    result = json.loads(out)
    assert result["calibration_rows"] == 40
    assert result["smallest_p_value"] == pytest.approx(1 / 41) and result["anomalies"] == 0
    # the same from Python
    with pytest.warns(UserWarning, match="the smallest p-value is 1/21") as caught:
        anomaly.flag(np.array([-50.0]), np.zeros(20), 0.001)
    assert {w.filename for w in caught} == {__file__}
    with pytest.warns(UserWarning, match="the smallest p-value is 1/41"):
        code, out, err = cli(["score", tmp_path / "run", new, "--threshold-quantile", "0.01",
                              "-o", tmp_path / "scores.csv"])
    assert code == 0 and "0 rows flagged" in out and "new normal rows are flagged" not in out
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        code, out, err = cli(["score", tmp_path / "run", new, "--threshold-quantile", "0.05",
                              "--json"])
    assert code == 0 and "warning" not in err


def test_the_flag_rate_range_counts_the_distinct_held_out_rows(tmp_path):
    # 600 rows written 4 times: the 480 held-out rows are 120 distinct ones, whose spread
    # is that of 120 (their copies score alike). The range said "3.5% to 6.7%" from 480,
    # and 2 of 5 seeds flagged fresh rows outside it (2.8%, 7.4%).
    rows = np.random.default_rng(0).normal(size=(600, 3))
    table = tmp_path / "t.csv"
    np.savetxt(table, np.repeat(rows, 4, axis=0), delimiter=",", header="a,b,c", comments="")
    new = tmp_path / "new.csv"
    np.savetxt(new, np.random.default_rng(1).normal(size=(50, 3)), delimiter=",",
               header="a,b,c", comments="")
    train_run(table, tmp_path / "run", model="gaussian", test_fraction=0.2, progress=False)
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["data"]["rows"]["distinct"] == 600
    code, out, err = cli(["score", tmp_path / "run", new, "--threshold-quantile", "0.05",
                          "-o", tmp_path / "s.csv"])
    assert code == 0, err
    held = info["data"]["rows"]["val"] + info["data"]["rows"]["test"]
    rate = anomaly.flag_rate(held, 0.05, held // 4)
    low, high = anomaly.flag_rate_range(held, 0.05, distinct=held // 4)
    assert f"so about {rate:.1%} of new normal rows are flagged (the held-out rows are " \
           f"{held // 4} distinct ones and their copies, which score alike) ({low:.1%} to " \
           f"{high:.1%} in 9 runs of 10, as the held-out rows vary)" in out


def test_the_mean_log_density_says_it_leaves_out_the_rows_scored_minus_inf(tmp_path):
    # (it printed the mean of the finite rows alone, where 4 of 5 rows scored -inf)
    table = tmp_path / "t.csv"
    np.savetxt(table, np.exp(np.random.default_rng(0).normal(size=(300, 2))), delimiter=",",
               header="a,b", comments="")
    new = tmp_path / "new.csv"
    np.savetxt(new, [[1.0, 1.0], [-1.0, 1.0], [2.0, 0.5]], delimiter=",", header="a,b",
               comments="")
    train_run(table, tmp_path / "run", model="gaussian", bounds=(0, None), progress=False)
    code, out, err = cli(["score", tmp_path / "run", new, "-o", tmp_path / "s.csv"])
    assert code == 0, err
    assert "nats over the 2 rows scored above -inf; wrote" in out
    assert "1 row with log-density -inf" in out


def test_scoring_the_training_file_says_its_rows_trained_the_model(tmp_path):
    # (3.2% of a model's own training rows were flagged at q = 0.05, 5.6% of new rows,
    # and nothing said the rows had trained it)
    train = correlated_table(tmp_path / "train.csv", 400, 0)
    new = correlated_table(tmp_path / "new.csv", 50, 1)
    train_run(train, tmp_path / "run", model="gaussian", progress=False)
    said = "train.csv is the file"
    for data, noted in ((train, True), (new, False)):
        code, _, err = cli(["score", tmp_path / "run", data, "--threshold-quantile", "0.05",
                            "-o", tmp_path / "s.csv"])
        assert code == 0, err
        assert (f"{said} {str(tmp_path / 'run')!r} was trained on (320 of its rows trained "
                "it)" in err) == noted


@pytest.mark.parametrize(("distinct", "copies", "q"), [(30, 4, 0.05), (150, 4, 0.05),
                                                       (100, 3, 0.1)])
def test_the_flag_rate_and_its_range_hold_with_copies_among_the_held_out_rows(distinct,
                                                                             copies, q):
    # Copies of a held-out row score alike, so the cut falls among the distinct scores:
    # 120 held-out rows, 30 distinct, at q = 0.05 flag 6.4% of new rows on average (5.0%
    # was said), and 21% of runs flagged above the range given.
    from scipy.stats import norm

    m = distinct * copies
    grid = norm.ppf((np.arange(4000) + 0.5) / 4000)  # (new rows: the share is the mean)
    rng = np.random.default_rng(distinct)
    shares = np.array([anomaly.flag(grid, np.repeat(rng.normal(size=distinct), copies),
                                    q)[1].mean() for _ in range(1500)])
    assert abs(shares.mean() - anomaly.flag_rate(m, q, distinct)) < 0.004
    low, high = anomaly.flag_rate_range(m, q, distinct=distinct)
    inside = float(((shares >= low - 1e-3) & (shares <= high + 1e-3)).mean())
    assert abs(inside - 0.9) < 0.03, inside
