"""exactflow extended from outside the package: a builder, an elementwise map, a conditioner
network and a context embedding defined here, trained, saved and loaded like the built-in
ones."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import exactflow as ef
from tests.helpers import perturb


class SinhShift(ef.transforms.MonotonicMap):
    """``y = x + a sinh(x) + t`` with ``a = softplus(p) - log 2 >= -log 2 > -1``: increasing,
    the identity at zero parameters; inverted by Newton's method (a strictly convex/concave
    scalar root per element, 30 steps are ample at these scales)."""

    params_per_feature = 2

    def _ab(self, params):
        shift, raw = params.unbind(-1)
        return torch.nn.functional.softplus(raw) - math.log(2.0), shift

    def forward(self, x, params):
        a, t = self._ab(params)
        return x + a * torch.sinh(x) + t, torch.log1p(a * torch.cosh(x))

    def inverse(self, y, params):
        a, t = self._ab(params)
        x = y - t
        for _ in range(60):
            f = x + a * torch.sinh(x) + t - y
            x = x - f / (1 + a * torch.cosh(x))
        return x, -torch.log1p(a * torch.cosh(x))


class GatedConditioner(torch.nn.Module):
    """A user's conditioner network: a tanh-gated two-layer net, last layer zeroed so the
    layer starts as the identity."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.hidden = torch.nn.Linear(in_features, 24)
        self.gate = torch.nn.Linear(in_features, 24)
        self.out = torch.nn.Linear(24, out_features)
        torch.nn.init.zeros_(self.out.weight)
        torch.nn.init.zeros_(self.out.bias)

    def forward(self, x):
        return self.out(torch.tanh(self.hidden(x)) * torch.sigmoid(self.gate(x)))


@pytest.fixture(autouse=True, scope="module")
def registered():
    ef.transforms.register_map("test_sinh_shift", SinhShift, replace=True)

    @ef.models.register(name="test_sinh_coupling", replace=True)
    def sinh_coupling(features, *, layers=2, hidden=(16,), context=0):
        blocks = []
        for i in range(layers):
            blocks.append(ef.transforms.Coupling(
                features, "test_sinh_shift", hidden=hidden, mask=("even", "odd")[i % 2],
                context=context, conditioner=GatedConditioner,
            ))
        return ef.Flow(ef.Compose(*blocks), ef.StandardNormal(features), context=context)

    yield


def test_a_registered_map_passes_the_checker_at_random_parameters():
    layer = perturb(ef.transforms.Coupling(3, "test_sinh_shift", hidden=(8,)).double(), 0.3,
                    seed=1)
    ef.check_transform(layer, torch.randn(6, 3, dtype=torch.float64))


def test_a_user_builder_with_its_own_map_and_conditioner_trains_saves_and_loads(tmp_path):
    x = ef.datasets.toy("moons", 1024, seed=1)
    flow = ef.models.build({"model": "test_sinh_coupling", "features": 2, "standardize": True})
    history = ef.fit(flow, x, steps=60, batch_size=256, lr=3e-3, progress=False, device="cpu")
    assert history.best_val < history.val_nll[0]  # better than at step 0
    # fit filled the standardization from the data.
    layer = ef.models.standardize_layer(flow)
    assert layer is not None and torch.allclose(layer.mean.float(), x.mean(0), atol=0.1)
    assert isinstance(flow.transform[1][0].conditioner, GatedConditioner)
    loaded = ef.load(ef.save(flow, tmp_path / "mine.safetensors"))
    assert loaded.config["model"] == "test_sinh_coupling"
    assert isinstance(loaded.transform[1][0].conditioner, GatedConditioner)
    with torch.no_grad():
        assert torch.equal(loaded.log_prob(x[:50]), flow.log_prob(x[:50]))


def test_an_embedding_network_is_trained_jointly_and_saved(tmp_path):
    gen = torch.Generator().manual_seed(0)
    context = torch.randn(2048, 6, generator=gen)
    x = context[:, :2] * 2.0 + 0.3 * torch.randn(2048, 2, generator=gen)
    flow = ef.models.maf(2, layers=2, hidden=(16,), context=6,
                         embedding={"features": 3, "hidden": [16]})
    assert flow.context_features == 6 and flow.embedding is not None
    assert all(t.context_features in (0, 3) for t in flow.transform)
    before = [p.clone() for p in flow.embedding.parameters()]
    history = ef.fit(flow, x, steps=80, batch_size=256, lr=3e-3, context=context,
                     progress=False, device="cpu")
    assert history.best_val < history.val_nll[0]
    assert any(not torch.equal(a, b)
               for a, b in zip(before, flow.embedding.parameters(), strict=True))
    loaded = ef.load(ef.save(flow, tmp_path / "emb.safetensors"))
    with torch.no_grad():
        torch.testing.assert_close(loaded.log_prob(x[:20], context[:20]),
                                   flow.log_prob(x[:20], context[:20]))
    assert loaded.sample(4, context[0]).shape == (4, 2)
    assert loaded.sample(5, context[:3]).shape == (5, 3, 2)
    # The raw context's size is the builder's context; an embedding that says otherwise
    # is refused, not ignored (a saved config repeats the same value, which loads).
    assert flow.config["embedding"]["context"] == 6
    with pytest.raises(ValueError, match="embedding context 3 differs from the builder's "
                                         "context=6"):
        ef.models.maf(2, context=6, embedding={"features": 4, "context": 3})
    # A network of the user's: the message gives the route that takes one.
    with pytest.raises(ValueError, match=r"ef.Flow\(inner.transform, inner.base, context=c, "
                                         r"embedding=net\)"):
        ef.models.maf(2, context=6, embedding=nn.Linear(6, 4))
    inner = ef.models.maf(2, context=4, layers=1, hidden=(8,))
    wrapped = ef.Flow(inner.transform, inner.base, context=6, embedding=nn.Linear(6, 4))
    assert wrapped.log_prob(torch.randn(5, 2), torch.randn(5, 6)).shape == (5,)


def test_a_builder_registers_under_a_name_given_first():
    # (as register_map takes it; it raised "'str' object has no attribute '__name__'")
    @ef.models.register("two_layer_maf_by_position", replace=True)
    def built(features, *, context=0):
        return ef.models.maf(features, layers=2, hidden=(8,), context=context)

    assert built(3).config["model"] == "two_layer_maf_by_position"
    with pytest.raises(TypeError, match="the name given twice"):
        ef.models.register("a", name="b")


def test_registering_needs_a_features_argument_and_a_free_name():
    with pytest.raises(ValueError, match="'features' as its first argument"):
        ef.models.register(lambda d: None)
    with pytest.raises(ValueError, match="registered already"):
        ef.models.register(lambda features: None, name="maf")
    with pytest.raises(ValueError, match="registered already"):
        ef.transforms.register_map("spline", SinhShift)
