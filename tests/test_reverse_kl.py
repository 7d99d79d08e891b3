"""Tests for reverse-KL fitting and the log-normalizer estimates (exactflow.training)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

import exactflow as ef
from exactflow.training import estimate_log_normalizer, fit_reverse_kl
from exactflow.transforms import ElementwiseAffine

# Train on the CPU without a progress bar (the GPU test asks for CUDA itself).
CPU = {"progress": False, "device": "cpu"}

MU = torch.tensor([1.5, -2.0, 0.5], dtype=torch.float64)
SIGMA = torch.tensor([0.5, 2.0, 1.0], dtype=torch.float64)
# log of the integral of exp(-|(x - mu) / sigma|^2 / 2): the Gaussian's normalizer.
LOG_Z = float(torch.log(SIGMA).sum()) + 1.5 * math.log(2 * math.pi)


def gaussian_target(x: Tensor) -> Tensor:
    return -0.5 * (((x - MU.to(x)) / SIGMA.to(x)) ** 2).sum(-1)


def affine_flow(log_scale: Tensor | None = None, shift: Tensor | None = None) -> ef.Flow:
    """``q = N(shift', diag(scale'^2))`` through one affine layer (data = latent direction)."""
    flow = ef.Flow(ElementwiseAffine(3), ef.StandardNormal(3)).double()
    with torch.no_grad():
        if log_scale is not None:
            flow.transform.log_scale.copy_(log_scale)
        if shift is not None:
            flow.transform.shift.copy_(shift)
    return flow


def exact_flow() -> ef.Flow:
    # forward z = x exp(a) + b must whiten the target: a = -log sigma, b = -mu / sigma.
    return affine_flow(-torch.log(SIGMA).double(), (-MU / SIGMA).double())


def test_estimates_are_exact_when_q_is_the_target():
    out = estimate_log_normalizer(exact_flow(), gaussian_target, n=5000, seed=0)
    assert out["elbo"] == pytest.approx(LOG_Z, abs=1e-10)
    assert out["log_z_is"] == pytest.approx(LOG_Z, abs=1e-10)
    assert out["elbo_se"] < 1e-10 and out["log_z_is_se"] < 1e-10
    assert out["ess"] == pytest.approx(5000) and out["n"] == 5000 and out["n_nonfinite"] == 0
    # n by position too, as importance_sample takes it (it was keyword-only: a TypeError)
    assert estimate_log_normalizer(exact_flow(), gaussian_target, 300, seed=0)["n"] == 300


def test_bound_and_importance_sampling_standard_errors_are_calibrated():
    # q wider than p in every direction: bounded weights, a clear KL gap.
    flow = affine_flow(-torch.log(SIGMA * 1.6).double(), (-MU / (SIGMA * 1.6)).double())
    runs = [estimate_log_normalizer(flow, gaussian_target, n=400, seed=s) for s in range(40)]
    elbo = torch.tensor([r["elbo"] for r in runs], dtype=torch.float64)
    log_z = torch.tensor([r["log_z_is"] for r in runs], dtype=torch.float64)
    # KL(N(0, 1.6^2) || N(0, 1)) per dimension, three dimensions.
    kl = 3 * (0.5 * (1.6**2 - 1) - math.log(1.6))
    assert float(elbo.mean()) == pytest.approx(LOG_Z - kl, abs=4 * float(elbo.std()) / 40**0.5)
    assert abs(float(log_z.mean()) - LOG_Z) < 4 * float(log_z.std()) / 40**0.5 + 0.01
    # The reported standard errors match the spread over independent repeats.
    for values, key in ((elbo, "elbo_se"), (log_z, "log_z_is_se")):
        reported = sum(r[key] for r in runs) / len(runs)
        assert 0.6 < float(values.std()) / reported < 1.6
    assert all(r["ess"] < 400 for r in runs)


def test_reverse_kl_recovers_a_gaussian_and_its_normalizer():
    flow = affine_flow()
    h = fit_reverse_kl(flow, gaussian_target, steps=400, batch_size=256, lr=0.05,
                       anneal_steps=100, eval_every=50, final_samples=20_000, **CPU)
    assert h.objective == "reverse_kl" and h.steps[-1] == 400 and h.total_steps == 400
    assert h.beta[0] == pytest.approx(0.01 + 0.99 * 49 / 100) and h.beta[-1] == 1.0
    assert h.val_nll == [None] * len(h.steps) and not flow.training
    f = h.final
    assert set(f) >= {"elbo", "elbo_se", "log_z_is", "log_z_is_se", "ess"}
    gap = LOG_Z - f["elbo"]
    assert -3 * f["elbo_se"] < gap < 0.01
    assert abs(f["log_z_is"] - LOG_Z) < 0.01
    # train_nll tracks E_q[log q - log p~] = KL - log Z, which approaches -log Z.
    assert h.train_nll[-1] == pytest.approx(-LOG_Z, abs=0.05)
    assert torch.allclose(flow.transform.log_scale.detach(), -torch.log(SIGMA).double(), atol=0.05)


def test_targets_are_callables_or_objects_with_log_prob():
    class Wrapped:
        def log_prob(self, x: Tensor) -> Tensor:
            return gaussian_target(x)

    a = estimate_log_normalizer(exact_flow(), Wrapped(), n=100, seed=1)
    b = estimate_log_normalizer(exact_flow(), gaussian_target, n=100, seed=1)
    assert a == b
    with pytest.raises(TypeError, match="log_prob"):
        fit_reverse_kl(affine_flow(), 3.0, steps=2, **CPU)
    # One value per row: a sum over the batch, or a column, is refused before training.
    for wrong, shape in ((lambda x: gaussian_target(x).sum(), r"\(\)"),
                         (lambda x: gaussian_target(x)[:, None], r"\(\d+, 1\)")):
        with pytest.raises(ValueError, match=r"one log-density per row.*returned " + shape):
            fit_reverse_kl(affine_flow(), wrong, steps=2, **CPU)
        with pytest.raises(ValueError, match="one log-density per row"):
            estimate_log_normalizer(exact_flow(), wrong, n=100, seed=1)


def test_zero_target_density_counts_as_a_zero_weight():
    def half_space(x: Tensor) -> Tensor:  # N(0, 1) restricted to x_0 > 0: Z = 1/2 of N(0, I)
        return torch.where(x[:, 0] > 0, -0.5 * (x * x).sum(-1), -math.inf)

    out = estimate_log_normalizer(affine_flow(), half_space, n=20_000, seed=0)
    assert out["elbo"] == -math.inf and out["n_nonfinite"] == 0
    assert out["log_z_is"] == pytest.approx(math.log(0.5) + 1.5 * math.log(2 * math.pi),
                                            abs=4 * out["log_z_is_se"])


def test_same_seed_same_fit_and_the_global_rng_is_untouched():
    runs = []
    for _ in range(2):
        torch.manual_seed(7)
        expected = torch.rand(2)
        torch.manual_seed(7)
        flow = affine_flow()
        h = fit_reverse_kl(flow, gaussian_target, steps=20, batch_size=64, eval_every=5,
                           final_samples=1000, seed=3, **CPU)
        assert torch.equal(torch.rand(2), expected)
        runs.append((h, flow.state_dict()))
    (h0, s0), (h1, s1) = runs
    assert h0.train_nll == h1.train_nll and h0.final == h1.final
    assert all(torch.equal(s0[k], s1[k]) for k in s0)


@pytest.mark.parametrize("value", [math.nan, -math.inf])
def test_a_target_that_is_not_finite_where_the_flow_samples_is_named(value):
    # Not "training diverged, lower the learning rate": the target's values are the cause.
    flow = ef.models.planar(2, layers=2)
    before = {k: v.clone() for k, v in flow.state_dict().items()}
    with pytest.raises(ValueError, match=r"log_prob_target returned -inf or NaN for \d+ of "
                                         r"128 samples of the flow \(one at x = \["):
        fit_reverse_kl(flow, lambda x: torch.where(x[:, 0] > 0, x.sum(-1) * 0, value),
                       steps=50, batch_size=128, **CPU)
    assert all(torch.equal(before[k], v) for k, v in flow.state_dict().items())


def test_a_target_that_is_not_finite_only_where_the_flow_rarely_samples_is_named():
    # (-inf beyond x1 = -3 only: a fresh draw of one batch after training failed seldom
    # meets it, and the error read "training diverged ... a lower learning rate")
    def target(x):
        return torch.where(x[:, 0] > -3.0, -0.5 * (x**2).sum(-1), -math.inf)

    flow = ef.models.realnvp(2, layers=2, hidden=(16,))
    with pytest.raises(ValueError, match=r"log_prob_target returned -inf or NaN for \d+ of "
                                         r"the \d+ samples drawn in training: reverse KL "
                                         r"needs a finite log-density"):
        fit_reverse_kl(flow, target, steps=100, batch_size=64, final_samples=0, **CPU)


@pytest.mark.parametrize("scale, bound, warns", [(3.0, 5.0, True), (1.0, 5.0, False),
                                                  (3.0, 15.0, False)])
def test_a_spline_flow_whose_samples_crowd_its_range_warns(scale, bound, warns):
    # (a target with mass beyond the splines' [-5, 5] is out of reach: log Z came out 17
    # standard errors low on a banana, with an ESS of 98% and a Pareto k of 0.35)
    import warnings

    flow = ef.models.nsf(2, layers=2, hidden=(16,), bound=bound)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit_reverse_kl(flow, lambda x: -0.5 * ((x / scale) ** 2).sum(-1), steps=150,
                       batch_size=256, final_samples=0, seed=0, **CPU)
    edge = [str(w.message) for w in caught if "outer tenth of its splines' range" in
            str(w.message)]
    assert bool(edge) == warns, [str(w.message) for w in caught]
    if warns:
        assert f"[-{bound:g}, {bound:g}]" in edge[0] and "bound=" in edge[0]


def test_the_edge_check_does_not_grow_with_the_dimension():
    # (any of d coordinates at the edge: an untrained nsf(300), exactly N(0, I), warned)
    import warnings

    from exactflow.training.importance import warn_if_bounded

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_if_bounded(ef.models.nsf(300, layers=1, hidden=(8,)))


def test_a_target_without_a_gradient_warns_at_the_users_line():
    with pytest.warns(UserWarning, match="without a gradient with respect to x") as caught:
        fit_reverse_kl(affine_flow(), lambda x: gaussian_target(x).detach(), steps=2,
                       batch_size=64, final_samples=0, **CPU)
    assert {w.filename for w in caught} == {__file__}


def test_bad_arguments():
    with pytest.raises(ValueError, match="beta_start"):
        fit_reverse_kl(affine_flow(), gaussian_target, steps=2, beta_start=0.0, **CPU)
    with pytest.raises(ValueError, match="steps"):
        fit_reverse_kl(affine_flow(), gaussian_target, steps=0, **CPU)


@pytest.mark.slow
def test_planar_flows_on_u1_close_the_gap_as_k_grows():
    """Rezende & Mohamed's Figure 3 setting: the KL gap shrinks with the number of layers.

    Measured with this budget (600 Adam steps at lr 1e-2 of 2048 samples, energy weight
    annealed over the first 240): gaps of 0.90 (K = 2), 0.11 (K = 8) and 0.016-0.017 nats
    (K = 32, three seeds; 400 steps gave up to 0.038), importance-sampling log Z within
    0.001 of quadrature at K = 32. Larger batches cost little here (the step time is mostly
    per-layer overhead) and remove most of the seed-to-seed spread of 512-sample runs.
    """
    target = ef.targets.get("U1")
    log_z = ef.targets.log_normalizer(target)  # quadrature on [-8, 8]^2: 1.8775
    gaps, finals = {}, {}
    for k in (2, 8, 32):
        torch.manual_seed(0)
        flow = ef.models.planar(2, layers=k)
        h = fit_reverse_kl(flow, target, steps=600, batch_size=2048, lr=1e-2, anneal_steps=240,
                           seed=0, **CPU)
        assert not h.rollbacks
        finals[k] = h.final
        gaps[k] = log_z - h.final["elbo"]
        # The bound holds (up to its standard error) at every K.
        assert gaps[k] > -3 * h.final["elbo_se"]
    assert gaps[2] > gaps[8] + 0.2 and gaps[8] > gaps[32] + 0.03, gaps
    assert gaps[32] < 0.05, gaps
    assert abs(finals[32]["log_z_is"] - log_z) < 0.02, finals[32]


def test_a_ramp_longer_than_training_warns_with_the_final_beta():
    with pytest.warns(UserWarning, match=r"anneal_steps=100 outlasts the 10 training steps: "
                                         r"training ends at beta = 0\.0991"):
        fit_reverse_kl(affine_flow(), gaussian_target, steps=10, anneal_steps=100,
                       beta_start=0.01, batch_size=32, final_samples=0, **CPU)


def test_a_conditional_flow_estimates_the_log_evidence_under_one_context():
    # theta ~ N(0, I_2), x | theta ~ N(theta, s^2 I_2): p(x_obs) = N(x_obs; 0, (1 + s^2) I_2).
    # An untrained conditional MAF is N(0, I) under any context: a proposal as good as any.
    s2 = 0.5
    x_obs = torch.tensor([0.7, -1.2], dtype=torch.float64)
    flow = ef.models.maf(2, layers=2, hidden=(8,), context=2).double()

    def joint(theta):  # log p(theta) + log p(x_obs | theta)
        return (torch.distributions.Normal(0.0, 1.0).log_prob(theta).sum(1)
                + torch.distributions.Normal(theta, s2**0.5).log_prob(x_obs).sum(1))

    truth = float(torch.distributions.Normal(0.0, (1 + s2) ** 0.5).log_prob(x_obs).sum())
    out = ef.estimate_log_normalizer(flow, joint, 100_000, context=x_obs, seed=0)
    assert abs(out["log_z_is"] - truth) < 4 * out["log_z_is_se"] + 1e-3, (out, truth)
    theta, w = ef.importance_sample(flow, joint, 1000, context=x_obs.reshape(1, 2), seed=0)
    assert theta.shape == (1000, 2) and w.shape == (1000,)
    for flow_, context, message in (
        (flow, None, "this flow is conditional: pass context="),
        (ef.models.maf(2), x_obs, "this flow is unconditional: leave context out"),
        (flow, torch.zeros(3, 2), r"context must be one row of 2 values.*got shape \(3, 2\)"),
    ):
        with pytest.raises(ValueError, match=message):
            ef.estimate_log_normalizer(flow_, joint, n=10, context=context)


# -- how far the weights can be trusted -------------------------------------------------


def test_the_pareto_k_of_the_weights_follows_their_tail():
    # q = N(mu, (s sigma)^2) against p = N(mu, sigma^2) in each of 3 dimensions: with
    # x = mu + s sigma z, the weight exp(w) ~ exp(|z|^2 (1 - s^2) / 2) has a Pareto tail of
    # k = 1 - s^2 when s < 1 (too narrow a proposal) and is bounded (k < 0) when s > 1.
    from exactflow.training.importance import pareto_k

    ks = {}
    for s in (0.6, 0.8, 1.6):
        flow = affine_flow(-torch.log(SIGMA * s).double(), (-MU / (SIGMA * s)).double())
        with torch.no_grad():
            x, log_q = flow.sample_and_log_prob(100_000)
        ks[s] = pareto_k(gaussian_target(x) - log_q)
    assert ks[0.6] == pytest.approx(1 - 0.6**2, abs=0.12)
    assert ks[0.8] == pytest.approx(1 - 0.8**2, abs=0.12)
    assert ks[1.6] < 0
    assert math.isnan(pareto_k(torch.zeros(1000, dtype=torch.float64)))  # q = p


def test_unreliable_weights_warn_and_good_ones_do_not():
    import warnings

    narrow = affine_flow(-torch.log(SIGMA * 0.5).double(), (-MU / (SIGMA * 0.5)).double())
    with pytest.warns(UserWarning, match=r"estimate of log Z is unreliable: the Pareto k of "
                                         r"the weights is 0\.\d\d \(above 0\.7\)"):
        out = estimate_log_normalizer(narrow, gaussian_target, n=50_000, seed=0)
    assert out["pareto_k"] > 0.7
    wide = affine_flow(-torch.log(SIGMA * 1.3).double(), (-MU / (SIGMA * 1.3)).double())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = estimate_log_normalizer(wide, gaussian_target, n=50_000, seed=0)
    assert out["pareto_k"] < 0.5 and out["log_z_is"] == pytest.approx(LOG_Z, abs=0.02)


def test_a_nan_target_warns_that_the_estimates_are_not_finite():
    def holed(x: Tensor) -> Tensor:
        out = gaussian_target(x)
        return torch.where(x[:, 0] > 2.5, torch.nan, out)

    with pytest.warns(UserWarning, match=r"\d+ of 20000 samples had a non-finite log q or "
                                         r"log p~.*the estimates are not finite"):
        out = estimate_log_normalizer(exact_flow(), holed, n=20_000, seed=0)
    assert out["n_nonfinite"] > 0 and math.isnan(out["log_z_is"])


@pytest.mark.parametrize("dtype", [torch.bool, torch.complex128, torch.int64])
def test_a_target_of_other_numbers_is_named(dtype):
    with pytest.raises(TypeError, match=f"real floating-point log-densities; it returned a "
                                        f"{dtype} tensor"):
        estimate_log_normalizer(exact_flow(), lambda x: torch.zeros(len(x), dtype=dtype), n=10)


def test_importance_samples_reweight_expectations_to_the_target():
    wide = affine_flow(-torch.log(SIGMA * 1.3).double(), (-(MU + 0.3) / (SIGMA * 1.3)).double())
    x, w = ef.importance_sample(wide, gaussian_target, 40_000, seed=3)
    assert x.shape == (40_000, 3) and w.shape == (40_000,) and w.dtype == torch.float64
    mean = (torch.softmax(w, 0)[:, None] * x).sum(0)
    torch.testing.assert_close(mean, MU, atol=0.05, rtol=0)
    # The weights of estimate_log_normalizer's draw with the same seed.
    out = estimate_log_normalizer(wide, gaussian_target, n=40_000, seed=3)
    assert out["log_z_is"] == pytest.approx(float(w.logsumexp(0) - math.log(40_000)), abs=1e-12)


def test_a_proposal_equal_to_the_target_up_to_float32_rounding_does_not_warn():
    import warnings

    flow = ef.models.maf(2)  # at initialization: a standard normal, in float32
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = estimate_log_normalizer(flow, lambda x: -0.5 * (x**2).sum(1), n=2000, seed=0)
    assert math.isnan(out["pareto_k"]) and out["ess"] == pytest.approx(2000)


# -- amortized: a conditional flow fitted for every context at once -----------------------

# p~(x | c) = exp(-|(x - A c - mu) / sigma|^2 / 2): the same normalizer LOG_Z for every c.
A = torch.tensor([[1.0, -0.5], [0.3, 2.0], [0.0, 1.0]], dtype=torch.float64)


def conditional_target(x: Tensor, c: Tensor) -> Tensor:
    return gaussian_target(x - c @ A.T.to(c))


def linear_gaussian_flow() -> ef.Flow:
    """``q(x | c) = N(W c + m, diag(s^2))``: holds the target for every context."""
    layers = ef.Compose(ElementwiseAffine(3), ef.transforms.ContextShift(3, 2))
    return ef.Flow(layers, ef.StandardNormal(3), context=2).double()


def test_an_amortized_fit_recovers_the_conditional_density_for_every_context():
    flow = linear_gaussian_flow()
    table = torch.randn(500, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    h = fit_reverse_kl(flow, conditional_target, contexts=table, steps=600, batch_size=256,
                       final_samples=20_000, **CPU)
    f = h.final  # the amortized bound: the mean over contexts of each one's ELBO
    assert sorted(f) == ["elbo", "elbo_se", "n", "n_nonfinite"] and f["n"] == 20_000
    assert LOG_Z - 0.01 < f["elbo"] < LOG_Z + 4 * f["elbo_se"], (f, LOG_Z)
    for c in ([0.5, -1.0], [2.0, 1.5]):  # (contexts outside the table too)
        c = torch.tensor(c, dtype=torch.float64)
        x = flow.sample(20_000, c)
        assert (((x.mean(0) - (c @ A.T + MU)) / SIGMA).abs() < 0.15).all()
        assert torch.allclose(x.std(0), SIGMA, rtol=0.05)
        def joint(x: Tensor, c: Tensor = c) -> Tensor:
            return conditional_target(x, c.expand(len(x), -1))

        out = estimate_log_normalizer(flow, joint, n=20_000, context=c, seed=0)
        assert abs(out["log_z_is"] - LOG_Z) < 5 * out["log_z_is_se"] + 1e-3


def test_amortized_contexts_from_a_callable_and_the_same_seed_the_same_fit():
    asked: list[int] = []

    def draw(k: int) -> Tensor:
        asked.append(k)
        return torch.randn(k, 2, dtype=torch.float64)

    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        flow = ef.models.maf(3, layers=1, hidden=(8,), context=2).double()
        h = fit_reverse_kl(flow, conditional_target, contexts=draw, steps=20, batch_size=64,
                           final_samples=1000, **CPU)
        runs.append((h.train_nll, h.final, flow.state_dict()))
    assert asked[:20] == [64] * 20  # one context per sample, each step
    (c0, f0, s0), (c1, f1, s1) = runs
    assert c0 == c1 and f0 == f1 and all(torch.equal(s0[k], s1[k]) for k in s0)
    assert math.isfinite(f0["elbo"]) and f0["elbo"] < LOG_Z + 4 * f0["elbo_se"]


def test_an_interrupted_amortized_fit_resumes_to_the_same_result(tmp_path):
    table = torch.randn(50, 2, dtype=torch.float64)

    def run(path, stop=None):
        def interrupt(h):
            if stop is not None and h.steps[-1] >= stop:
                raise KeyboardInterrupt

        torch.manual_seed(0)
        flow = ef.models.maf(3, layers=1, hidden=(8,), context=2).double()
        h = fit_reverse_kl(flow, conditional_target, contexts=table, steps=40, eval_every=5,
                           batch_size=32, final_samples=500, checkpoint=path, resume=True,
                           callback=interrupt, **CPU)
        return h, flow.state_dict()

    h0, s0 = run(tmp_path / "whole.pt")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "cut.pt", stop=20)
    h1, s1 = run(tmp_path / "cut.pt")
    assert h1.steps == h0.steps and h1.train_nll == h0.train_nll and h1.final == h0.final
    assert all(torch.equal(s0[k], s1[k]) for k in s0)


def test_an_amortized_target_that_is_not_finite_is_named():
    flow = ef.models.maf(3, layers=1, hidden=(8,), context=2).double()
    with pytest.raises(ValueError, match=r"log_prob_target returned -inf or NaN for \d+ of "
                                         r"64 samples of the flow"):
        fit_reverse_kl(flow, lambda x, c: torch.where(c[:, 0] > 0, -math.inf, 0.0 * x[:, 0]),
                       contexts=torch.randn(100, 2), steps=20, batch_size=64, **CPU)


@pytest.mark.parametrize("contexts, message", [
    (None, r"this flow is conditional \(context=2\): pass contexts=, a tensor "
           r"\(m, 2\).*\(x, context\) -> log p~\(x \| context\)"),
    (torch.randn(10, 3), r"contexts must be a tensor \(m, 2\).*; got shape \(10, 3\)"),
    (torch.randn(10), r"got shape \(10,\)"),
    (torch.zeros(0, 2), "contexts has no rows"),
    (torch.tensor([[0.0, math.nan]]), "contexts must be finite; got NaN or inf"),
    (lambda k: torch.zeros(k + 1, 2), r"contexts\(64\) returned shape \(65, 2\)"),
    (torch.zeros(4, 2, dtype=torch.complex64), "contexts must be real numbers"),
])
def test_bad_amortized_contexts_are_named(contexts, message):
    flow = ef.models.maf(3, layers=1, hidden=(8,), context=2)
    with pytest.raises((ValueError, TypeError), match=message):
        fit_reverse_kl(flow, conditional_target, contexts=contexts, steps=1, batch_size=64,
                       **CPU)


def test_contexts_for_an_unconditional_flow_are_refused():
    with pytest.raises(ValueError, match="this flow is unconditional: leave contexts out"):
        fit_reverse_kl(ef.models.maf(3), gaussian_target, contexts=torch.zeros(4, 2), steps=1,
                       **CPU)


def test_amortized_contexts_are_data_whatever_graph_they_carry():
    # (a table made by a network failed with "backward through the graph a second time",
    # and a leaf table with requires_grad got a gradient)
    net = torch.nn.Linear(2, 2).double()
    table = net(torch.randn(50, 2, dtype=torch.float64))
    leaf = torch.randn(50, 2, dtype=torch.float64, requires_grad=True)
    for contexts in (table, leaf):
        flow = ef.models.maf(3, layers=1, hidden=(8,), context=2).double()
        fit_reverse_kl(flow, conditional_target, contexts=contexts, steps=3, batch_size=16,
                       final_samples=0, **CPU)
    assert leaf.grad is None and net.weight.grad is None
