"""exactflow.plotting: the figures show what they claim (densities that integrate to one, the
latent panel is the base density), leave the flow and torch's RNG as they were, and save."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

pytest.importorskip("matplotlib")

import exactflow as ef  # noqa: E402
from exactflow import plotting  # noqa: E402
from exactflow.diagnostics import flatten_layers  # noqa: E402
from tests.helpers import perturb  # noqa: E402


def hand_built_flow(features: int = 2) -> ef.Flow:
    """Couplings, a linear layer and a scale, perturbed away from the identity."""
    t = ef.transforms
    layers = [t.ElementwiseAffine(features)]
    for i in range(3):
        layers += [t.AffineCoupling(features, hidden=(8,), mask=("even", "odd")[i % 2]),
                   t.LULinear(features)]
    flow = ef.Flow(ef.Compose(*layers), ef.StandardNormal(features))
    return perturb(flow, 0.3, seed=1)


@pytest.fixture
def flow() -> ef.Flow:
    return hand_built_flow()


@pytest.fixture
def data() -> np.ndarray:
    return ef.datasets.toy("moons", 600, seed=0).double().numpy()


def test_log_density_grid_is_the_flow_density_and_integrates_to_one(flow):
    bounds = (-9.0, 9.0, -9.0, 9.0)
    xs, ys, logp = plotting.log_density_grid(flow, bounds, resolution=241)
    assert logp.shape == (241, 241)
    # Image order: row i is y = ys[i], column j is x = xs[j].
    i, j = 37, 150
    with torch.no_grad():
        direct = flow.log_prob(torch.tensor([[xs[j], ys[i]]], dtype=torch.float32))
    # float32: a row scored alone and inside a large batch differ by matmul rounding.
    assert logp[i, j] == pytest.approx(float(direct), rel=2e-6, abs=1e-5)
    cell = (xs[1] - xs[0]) * (ys[1] - ys[0])
    assert float(np.exp(logp).sum() * cell) == pytest.approx(1.0, abs=2e-2)


def test_data_vs_model_panels_and_no_side_effects(flow, data):
    flow.train()
    state = torch.get_rng_state()
    fig = plotting.data_vs_model(flow, data, n_samples=2000, resolution=60)
    assert torch.equal(state, torch.get_rng_state())
    assert flow.training and all(m.training for m in flow.modules())
    panels = [ax for ax in fig.axes if ax.images]
    assert len(panels) == 3
    assert [ax.get_title() for ax in panels] == [
        "data (n = 600)", "model samples (n = 2,000)", "model density p(x)"
    ]
    # The colour bar stands beside the density panel, the one it belongs to.
    (bar,) = [ax for ax in fig.axes if not ax.images]
    assert bar.get_position().x0 > panels[2].get_position().x1
    density = np.asarray(panels[2].images[0].get_array())
    x0, x1, y0, y1 = panels[2].images[0].get_extent()
    _, _, logp = plotting.log_density_grid(flow, (x0, x1, y0, y1), resolution=60)
    # (log-densities below -50 are drawn as exp(-50): invisible either way)
    np.testing.assert_allclose(density, np.exp(logp), rtol=1e-6, atol=1e-20)
    with pytest.raises(ValueError, match="2D"):
        plotting.data_vs_model(hand_built_flow(3), np.zeros((10, 3)))


def test_pairwise_any_dimension():
    flow = hand_built_flow(5)
    x = np.random.default_rng(0).normal(size=(300, 5))
    fig = plotting.pairwise(flow, x, dims=3, n_samples=500)
    assert len(fig.axes) == 9
    # Data below the diagonal, samples above, histograms on it.
    assert fig.axes[3].collections and fig.axes[1].collections and fig.axes[0].patches
    assert len(plotting.pairwise(hand_built_flow(2), x[:, :2], dims=4).axes) == 4
    # The axes carry the columns' names (a CSV's header), not x1..xd.
    named = plotting.pairwise(flow, x, dims=3, n_samples=200,
                              names=["height", "weight", "age", "d", "e"])
    assert named.axes[6].get_xlabel() == "height" and named.axes[3].get_ylabel() == "weight"


def test_training_curves_from_a_history_dict():
    history = ef.History(features=2, steps=[10, 20, 30], train_nll=[3.0, None, 2.5],
                               val_nll=[3.1, 2.8, None], lr=[1e-3] * 3, time=[1, 2, 3])
    fig = plotting.training_curves(history.to_dict(), entropy=2.394)
    ax = fig.axes[0]
    labels = [line.get_label() for line in ax.lines]
    assert "train" in labels and "validation" in labels
    assert any("true entropy" in label for label in labels)
    train_line = ax.lines[labels.index("train")]
    np.testing.assert_array_equal(train_line.get_xdata(), [10, 20, 30])
    assert ax.get_ylim()[0] < 2.394 < ax.get_ylim()[1]
    # The step whose weights training kept is marked.
    history.best_step = 20
    kept = plotting.training_curves(history.to_dict()).axes[0]
    (line,) = [ln for ln in kept.lines if "weights kept" in ln.get_label()]
    assert list(line.get_xdata()) == [20, 20] and "step 20" in line.get_label()
    plotting.training_curves({})  # an empty history draws an empty frame


def test_cartographer_ends_at_the_base_density(flow, data):
    fig = plotting.cartographer(flow, data, max_stages=4, resolution=40, lines=5)
    layers = flatten_layers(flow.transform)
    stages = plotting._stages(layers, 4)
    top = fig.axes[: len(stages)]
    bottom = fig.axes[len(stages) : 2 * len(stages)]
    assert len(fig.axes) == 2 * len(stages)
    assert top[0].get_title() == "data space" and "latent" in top[-1].get_title()
    # The last density panel is the standard normal on its box; the first is p(x).
    img = bottom[-1].images[0]
    x0, x1, y0, y1 = img.get_extent()
    gx, gy = np.meshgrid(np.linspace(x0, x1, 40), np.linspace(y0, y1, 40))
    normal = np.exp(-0.5 * (gx**2 + gy**2)) / (2 * math.pi)
    np.testing.assert_allclose(np.asarray(img.get_array()), normal, rtol=1e-4, atol=1e-7)
    img = bottom[0].images[0]
    _, _, logp = plotting.log_density_grid(flow, img.get_extent(), resolution=40)
    np.testing.assert_allclose(np.asarray(img.get_array()), np.exp(logp), rtol=1e-4,
                               atol=1e-7)


def test_stages_follow_the_nonlinear_layers():
    t = ef.transforms
    layers = [t.ElementwiseAffine(2)]
    for i in range(8):
        layers += [t.AffineCoupling(2, hidden=(4,), mask=("even", "odd")[i % 2]),
                   t.Reverse(2)]
    stages = plotting._stages(layers, 5)
    # Data, after couplings 2, 4 and 6, and the latent (the trailing Reverse included).
    assert stages == [0, 4, 8, 12, 17]
    assert plotting._stages(layers[:2], 6) == [0, 2]
    assert plotting._stages([t.LULinear(2)], 6) == [0, 1]


def test_layer_log_dets_bars(tmp_path):
    import matplotlib.image

    values = [0.5, -0.25, float("nan"), 1.0]
    fig = plotting.layer_log_dets(["A", "B", "C", "D"], values)
    bars = fig.axes[0].patches
    assert [b.get_width() for b in bars] == [0.5, -0.25, 0.0, 1.0]
    assert "non-finite" in " ".join(text.get_text() for text in fig.axes[0].texts)
    target = tmp_path / "bars.png"
    plotting.save_figure(fig, target)
    assert matplotlib.image.imread(target).shape[2] in (3, 4)
    assert [p.name for p in tmp_path.iterdir()] == ["bars.png"]
