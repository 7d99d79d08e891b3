"""Gaussian and Gaussian-mixture densities, the classical models built on them, and flows
that start from the classical fit."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

import exactflow as ef
from tests.helpers import perturb

CPU = {"progress": False, "device": "cpu"}


def correlated(n: int, d: int = 3, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=gen, dtype=torch.float64)
    return torch.randn(n, d, generator=gen, dtype=torch.float64) @ mix + 2.0


@pytest.mark.parametrize("covariance", ["full", "diag"])
def test_gaussian_log_prob_matches_torch_at_random_parameters(covariance):
    g = perturb(ef.Gaussian(4, covariance).double(), 0.5, seed=1)
    x = torch.randn(9, 4, dtype=torch.float64)
    lower = g.lower()[0]
    reference = torch.distributions.MultivariateNormal(g.loc[0], scale_tril=lower)
    torch.testing.assert_close(g.log_prob(x), reference.log_prob(x))
    if covariance == "diag":
        assert torch.equal(lower, torch.diag(torch.diagonal(lower)))


def test_gaussian_fit_is_the_maximum_likelihood_estimate():
    x = correlated(2000)
    g = ef.Gaussian(3).double().fit_to(x)
    reference = torch.distributions.MultivariateNormal(x.mean(0), torch.cov(x.T, correction=0))
    # (a ridge of 1e-14 of each column's variance keeps degenerate data factorable)
    torch.testing.assert_close(g.log_prob(x), reference.log_prob(x), atol=1e-9, rtol=1e-12)
    assert bool(g.fitted)


def test_nearly_collinear_columns_keep_their_density():
    # A ridge of 1e-6 on the correlation matrix floored the variance of one column given
    # the other: 2.2 nats a row lost where they differ by 1e-4 of their spread, 6.1 at 2e-6.
    rng = np.random.default_rng(0)
    for eps in (1e-4, 2e-6):
        a, e = rng.standard_normal(4000), rng.standard_normal(4000)
        x = np.stack([a, a + eps * e], 1)
        truth = -0.5 * (a**2 + e**2) - math.log(2 * math.pi) - math.log(eps)
        model = ef.Gaussian(2).double().fit_to(x[:3000])
        gap = float(model.log_prob(torch.as_tensor(x[3000:])).mean()) - truth[3000:].mean()
        assert abs(gap) < 0.01


def test_mixture_log_prob_is_the_log_sum_of_its_components():
    mix = perturb(ef.GaussianMixture(2, components=3).double(), 0.5, seed=2)
    x = torch.randn(7, 2, dtype=torch.float64)
    w = mix.weights()
    dense = sum(
        w[k] * torch.distributions.MultivariateNormal(mix.loc[k], scale_tril=mix.lower()[k])
        .log_prob(x).exp() for k in range(3)
    )
    torch.testing.assert_close(mix.log_prob(x), dense.log())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models_score_as_float32_does_to_their_rounding(dtype):
    # (torch has no half-precision triangular solve on the CPU: it raised
    # NotImplementedError from deep inside log_prob)
    for model in (perturb(ef.Gaussian(3), 0.5, seed=3),
                  perturb(ef.GaussianMixture(3, components=2), 0.5, seed=4)):
        x = torch.randn(6, 3)
        reference = model.log_prob(x)
        half = model.to(dtype)
        out = half.log_prob(x.to(dtype))
        assert out.dtype == dtype
        torch.testing.assert_close(out.float(), reference, atol=0.1, rtol=0.02)


@pytest.mark.parametrize("make", [lambda: ef.Gaussian(2), lambda: ef.GaussianMixture(2, 3),
                                  lambda: ef.GaussianMixture(2, 2, "diag")])
def test_densities_integrate_to_one_and_sample_where_the_mass_is(make):
    dist = perturb(make().double(), 0.4, seed=3)
    edges = torch.linspace(-12, 12, 401, dtype=torch.float64)
    mid = (edges[1:] + edges[:-1]) / 2
    xx, yy = torch.meshgrid(mid, mid, indexing="ij")
    grid = torch.stack([xx.reshape(-1), yy.reshape(-1)], 1)
    with torch.no_grad():
        mass = dist.log_prob(grid).exp().sum() * (24 / 400) ** 2
    assert float(mass) == pytest.approx(1.0, abs=1e-3)
    samples = dist.sample(20000)
    assert not samples.requires_grad
    # The samples' mean log-density estimates minus the entropy; compare to quadrature.
    with torch.no_grad():
        p = dist.log_prob(grid).exp() * (24 / 400) ** 2
        entropy = -(p * dist.log_prob(grid)).sum()
        assert float(-dist.log_prob(samples).mean()) == pytest.approx(float(entropy), abs=0.05)
    x, log_q = dist.rsample_and_log_prob(5)
    assert x.requires_grad and torch.allclose(log_q, dist.log_prob(x))


def test_mixture_fit_recovers_separated_clusters():
    gen = torch.Generator().manual_seed(0)
    centres = torch.tensor([[-5.0, 0.0], [5.0, 0.0], [0.0, 6.0]], dtype=torch.float64)
    x = torch.cat([c + torch.randn(400, 2, generator=gen, dtype=torch.float64) for c in centres])
    mix = ef.GaussianMixture(2, components=3).double().fit_to(x, seed=0)
    found = sorted(map(tuple, mix.loc.detach().round().tolist()))
    assert found == sorted(map(tuple, centres.tolist()))
    np.testing.assert_allclose(sorted(mix.weights().tolist()), [1 / 3] * 3, atol=0.02)


def test_classical_models_fit_without_gradient_steps_and_round_trip(tmp_path):
    x = correlated(600)
    for build in (lambda: ef.models.gaussian(3),
                  lambda: ef.models.gmm(3, components=2, covariance="diag")):
        # (every row: 10% held out for a validation NLL that chooses nothing cost 0.55 nats
        # a row at 200 columns)
        model = build().double()
        history = ef.fit(model, x, **CPU)
        assert history.total_steps == 0 and history.steps == [] and history.best_step is None
        if model.config["model"] == "gaussian":
            torch.testing.assert_close(model.base.loc[0], x.mean(0))
        history = ef.fit(build().double(), x[:500], x[500:], **CPU)  # (measured on val)
        assert history.total_steps == 0 and history.steps == [0] and history.best_step == 0
        assert math.isfinite(history.val_nll[0])
        loaded = ef.load(ef.save(model, tmp_path / f"{model.config['model']}.safetensors"))
        with torch.no_grad():
            torch.testing.assert_close(loaded.double().log_prob(x[:20]), model.log_prob(x[:20]))
    with pytest.raises(ValueError, match="unconditional"):
        ef.models.gmm(2, context=1)
    with pytest.raises(ValueError, match="base= does not apply"):
        ef.models.gmm(2, base="gaussian")


@pytest.mark.parametrize("standardize", [True, False])
def test_the_conditional_gaussian_is_the_least_squares_regression(tmp_path, standardize):
    # x | c ~ N(W c + b, Sigma): the classical conditional density, in closed form. The
    # contexts lie far from standardized (means 50, spreads 1 to 100).
    gen = np.random.default_rng(0)
    c = gen.normal(size=(400, 3)) * [1.0, 10.0, 100.0] + 50.0
    x = c @ (gen.normal(size=(2, 3)) / [1.0, 10.0, 100.0]).T + 3.0 + gen.multivariate_normal(
        [0.0, 0.0], [[1.0, 0.6], [0.6, 2.0]], size=400)
    model = ef.models.gaussian(2, context=3, standardize=standardize).double()
    history = ef.fit(model, x, context=c, **CPU)
    assert history.total_steps == 0
    design = np.c_[c, np.ones(len(c))]
    residual = x - design @ np.linalg.lstsq(design, x, rcond=None)[0]
    cov = residual.T @ residual / len(x)
    expected = -0.5 * (np.einsum("ij,jk,ik->i", residual, np.linalg.inv(cov), residual)
                       + np.log(np.linalg.det(2 * np.pi * cov)))
    with torch.no_grad():
        np.testing.assert_allclose(model.log_prob(x, c).numpy(), expected, rtol=0, atol=1e-9)
        loaded = ef.load(ef.save(model, tmp_path / "conditional.safetensors")).double()
        torch.testing.assert_close(loaded.log_prob(x[:20], c[:20]), model.log_prob(x[:20], c[:20]))
    draws = model.sample(20_000, c[:1]).squeeze(1)  # (one context: its mean and covariance)
    mean = design[:1] @ np.linalg.lstsq(design, x, rcond=None)[0]
    np.testing.assert_allclose(draws.mean(0).numpy(), mean[0], atol=0.05)
    np.testing.assert_allclose(np.cov(draws.numpy(), rowvar=False), cov, atol=0.08)
    with pytest.raises(ValueError, match="conditional"):
        ef.fit(ef.models.gaussian(2, context=3), x, **CPU)


def test_the_conditional_gaussian_refuses_an_embedding_and_warns_of_no_scale():
    # An embedding was fitted to as it started and frozen with the regression (test NLL
    # 2.54 against 1.455 without it); a context far from standardized warned that
    # "conditioner networks" would fit poorly, of a model that has none.
    with pytest.raises(ValueError, match="the gaussian model is fitted in closed form: an "
                                         "embedding of its context would stay as initialized"):
        ef.models.gaussian(2, context=3, embedding={"features": 2})
    gen = np.random.default_rng(1)
    c = gen.normal(size=(200, 3)) * 1e4
    x = c[:, :2] * 1e-4 + gen.normal(size=(200, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ef.fit(ef.models.gaussian(2, context=3).double(), x, context=c, **CPU)


def test_context_shift_is_checked_at_random_parameters():
    layer = perturb(ef.transforms.ContextShift(3, context=2), 1.0).double()
    gen = torch.Generator().manual_seed(0)
    x, c = (torch.randn(8, k, generator=gen, dtype=torch.float64) for k in (3, 2))
    assert ef.check_transform(layer, x, c).ok
    z, ladj = layer(x, c)
    torch.testing.assert_close(z, x - c @ layer.weight.T - layer.bias)
    assert not ladj.any()


@pytest.mark.parametrize("base", ["gaussian", {"name": "gmm", "components": 3}])
@pytest.mark.parametrize("builder", ["maf", "nsf", "realnvp"])
def test_a_flow_started_from_the_classical_fit_equals_it_at_step_0(builder, base):
    x = correlated(800, d=4, seed=5)
    kwargs = {"batch_norm": False} if builder == "realnvp" else {}
    flow = getattr(ef.models, builder)(4, layers=2, hidden=(16,), standardize=True, base=base,
                                       **kwargs).double()
    history = ef.fit(flow, x[:700], x[700:], steps=1, lr=1e-12, **CPU)  # (one tiny step)
    classical = ef.models.gaussian(4, standardize=True) if base == "gaussian" else \
        ef.models.gmm(4, components=3, standardize=True)
    ef.fit(classical.double(), x[:700], x[700:], **CPU)  # the same rows, scaling and seed
    # The flow's layers (permutations included) are volume-preserving rearrangements at
    # step 0, so it is the classical model, whichever coordinates its base was fitted in.
    with torch.no_grad():
        torch.testing.assert_close(flow.log_prob(x[:100]), classical.log_prob(x[:100]),
                                   atol=1e-6, rtol=0)
    assert history.steps[0] == 0


def test_training_from_the_gaussian_keeps_only_improvements():
    # 60 rows of 6-D Gaussian data: a flow cannot beat the Gaussian on held-out rows, so the
    # weights kept are those of step 0, and the flow scores as the Gaussian does.
    x = correlated(90, d=6, seed=7).float()
    flow = ef.models.maf(6, layers=2, hidden=(32,), standardize=True, base="gaussian")
    history = ef.fit(flow, x[:60], x[60:], lr=1e-2, **CPU)
    assert history.best_val <= history.val_nll[0]
    assert ef.evaluate(flow, x[60:])["nll"] == pytest.approx(history.best_val, abs=1e-9)


@pytest.mark.parametrize("make", [lambda: ef.Gaussian(2), lambda: ef.Gaussian(2, "diag"),
                                  lambda: ef.GaussianMixture(2, 2)])
def test_a_column_of_small_spread_keeps_it(make):
    # The ridge was 1e-6 of the mean variance: a column of spread 1e-8 beside one of spread
    # 1 was fitted with spread 7e-4, 10.7 nats off the truth.
    z = np.random.default_rng(0).standard_normal((8000, 2))
    x = np.stack([1e-8 * z[:, 0], z[:, 1]], 1)
    model = make().double().fit_to(x[:6000])
    truth = math.log(2 * math.pi * math.e) + math.log(1e-8)  # the entropy, nats
    nll = -float(model.log_prob(torch.as_tensor(x[6000:])).mean())
    assert abs(nll - truth) < 0.1


def test_mixture_densities_of_many_rows_are_taken_a_block_at_a_time(monkeypatch):
    # (16 full components scored 500,000 validation rows through 2.5 GB of temporaries)
    import exactflow.gaussians as gaussians

    torch.manual_seed(0)
    mix = ef.GaussianMixture(3, components=4).double()
    with torch.no_grad():
        for p in mix.parameters():
            p.normal_(0, 0.3)
    x = torch.randn(1000, 3, dtype=torch.float64, requires_grad=True)
    whole = mix.log_prob(x)
    monkeypatch.setattr(gaussians, "DENSITY_BLOCK_VALUES", 4 * 3 * 64)  # blocks of 64 rows
    blocked = mix.log_prob(x)
    torch.testing.assert_close(blocked, whole, rtol=0, atol=1e-13)
    grad = torch.autograd.grad(blocked.sum(), x)[0]  # (the blocks keep the graph)
    torch.testing.assert_close(grad, torch.autograd.grad(whole.sum(), x)[0])


@pytest.mark.parametrize("components", [1, 3])
def test_draws_are_each_rows_component_factor_times_noise_without_a_copy_per_row(components):
    # Sampling copied the d x d factor once per row: 3.5 GB for 1,500 rows at d = 784.
    torch.manual_seed(0)
    g = (ef.GaussianMixture(5, components=components) if components > 1
         else ef.Gaussian(5)).double()
    with torch.no_grad():
        for p in g.parameters():
            p.add_(0.3 * torch.randn_like(p))
    index = torch.randint(0, components, (50,))
    torch.manual_seed(1)
    drawn = g._draw(index)
    torch.manual_seed(1)
    eps = torch.randn(50, 5, dtype=torch.float64)
    want = g.loc[index] + (g.lower()[index] @ eps.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(drawn, want, rtol=1e-12, atol=1e-12)


def test_a_float32_gaussian_scores_nearly_collinear_columns_as_float64_does():
    # (three columns 1e-5 of their spread off copies of others: float32's triangular solve
    # lost 0.09 nats a row at 40 columns, 0.71 at 200; scoring solves in float64)
    rng = np.random.default_rng(0)
    data = rng.normal(size=(1500, 5)) @ rng.normal(size=(5, 40))
    data += 0.1 * rng.normal(size=data.shape)
    data[:, 10:13] = data[:, 20:23] + 1e-5 * rng.normal(size=(1500, 3))
    x = torch.as_tensor(data, dtype=torch.float32)
    model = ef.models.gaussian(40)
    ef.fit(model, x[:1200], **CPU)
    exact = ef.models.gaussian(40).double()
    exact.load_state_dict(model.state_dict())
    with torch.no_grad():
        scored = model.log_prob(x[1200:])
        assert scored.dtype == torch.float32
        error = (scored.double() - exact.log_prob(x[1200:].double())).abs().max()
    assert error < 0.01, float(error)
    model.train()  # (training keeps float32 and its gradient)
    model.log_prob(x[:10].requires_grad_()).sum().backward()


def test_a_one_component_mixture_is_the_gaussian_also_on_nearly_collinear_columns():
    # (EM's ridge of 1e-6 floored the variance of a column given the others: gmm(1) lost
    # 2.1 nats a row to gaussian where two columns differ by 1e-4 of their spread)
    rng = np.random.default_rng(4)
    x = rng.normal(size=(2000, 3))
    x = np.c_[x, x[:, 0] + 1e-4 * rng.normal(size=2000)]
    gaussian, mixture = ef.models.gaussian(4).double(), ef.models.gmm(4, components=1).double()
    ef.fit(gaussian, x, **CPU)
    ef.fit(mixture, x, **CPU)
    with torch.no_grad():
        torch.testing.assert_close(mixture.log_prob(torch.as_tensor(x)),
                                   gaussian.log_prob(torch.as_tensor(x)))
