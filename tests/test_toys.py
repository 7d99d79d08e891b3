"""The classic RealNVP learns every 2D benchmark, and never beats the truth.

Each toy's test NLL after 1500 steps must be far below a Gaussian fitted to the same
training data, and, where the toy's true entropy H is known, it may not fall below H by more
than sampling noise: a model scoring better than the data's own entropy would mean a wrong
log-determinant somewhere. This is the most expensive test file of the suite (about 3 minutes
of one core), kept in its own file so it runs beside the rest.
"""

from __future__ import annotations

import pytest
import torch

import exactflow as ef

# Measured with these exact settings (seed 0, one thread): gain over the fitted Gaussian and
# test NLL - H, in nats.
#   moons 0.82 / 0.07   circles 0.41 / 0.23   8gaussians 1.21 / 0.21   checkerboard 0.78 / 0.26
#   pinwheel 1.17 / -   2spirals 0.62 / 0.47  rings 0.15 / 0.79        swissroll 0.65 / 0.15
# The bounds below are about 60% of the measured gains. Rings (concentric circles, almost
# isotropic) is the hardest for affine couplings and improves slowly.
MIN_GAIN = {
    "moons": 0.5,
    "circles": 0.25,
    "8gaussians": 0.7,
    "checkerboard": 0.45,
    "pinwheel": 0.7,
    "2spirals": 0.37,
    "rings": 0.09,
    "swissroll": 0.4,
}
STEPS, BATCH, LR = 1500, 256, 2e-3


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(MIN_GAIN))
def test_default_realnvp_learns_each_2d_toy(name):
    train = ef.datasets.toy(name, 10_000, seed=0)
    test = ef.datasets.toy(name, 5_000, seed=1)
    mean, cov = train.double().mean(0), torch.cov(train.double().T)
    gaussian = torch.distributions.MultivariateNormal(mean, cov)
    gaussian_nll = float(-gaussian.log_prob(test.double()).mean())

    torch.manual_seed(0)
    flow = ef.models.realnvp(2)  # the defaults: 8 affine couplings, hidden (64, 64), batch norm
    ef.fit(flow, train, steps=STEPS, batch_size=BATCH, lr=LR, seed=0, progress=False, device="cpu")
    result = ef.evaluate(flow, test)

    assert result["n_nonfinite"] == 0
    gain = gaussian_nll - result["nll"]
    assert gain > MIN_GAIN[name], (
        f"{name}: test NLL {result['nll']:.3f} vs fitted Gaussian {gaussian_nll:.3f}"
    )
    entropy = ef.datasets.TOY_ENTROPY.get(name)
    if entropy is not None:
        # The expected NLL of any density is >= H; allow 4 standard errors of the test mean
        # and the 0.01 uncertainty of the entropy estimate.
        floor = entropy - 4 * result["nll_se"] - 0.01
        assert result["nll"] > floor, (
            f"{name}: test NLL {result['nll']:.3f} is below the true entropy {entropy:.3f}"
        )
