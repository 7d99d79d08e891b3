"""Tests for the model builders (exactflow.models)."""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable

import pytest
import torch

import exactflow as ef
from exactflow.transforms import (
    AffineCoupling,
    InverseAutoregressive,
    MaskedAffineAutoregressive,
    Permutation,
    SplineAutoregressive,
    SplineCoupling,
)
from tests.helpers import perturb

# Small versions of every builder; "nsf-ar" is the autoregressive spline flow.
BUILDERS: dict[str, Callable[..., ef.Flow]] = {
    "realnvp": lambda d, **kw: ef.models.realnvp(d, layers=3, hidden=(16, 16), **kw),
    "nice": lambda d, **kw: ef.models.nice(d, layers=3, hidden=(16, 16), **kw),
    "maf": lambda d, **kw: ef.models.maf(d, layers=3, hidden=(16, 16), **kw),
    "iaf": lambda d, **kw: ef.models.iaf(d, layers=3, hidden=(16, 16), **kw),
    "nsf": lambda d, **kw: ef.models.nsf(d, layers=2, hidden=(16, 16), bins=6, **kw),
    "nsf-ar": lambda d, **kw: ef.models.nsf(
        d, layers=2, hidden=(16, 16), bins=6, kind="autoregressive", permutation="random", **kw
    ),
    "planar": lambda d, **kw: ef.models.planar(d, layers=3, **kw),
    "radial": lambda d, **kw: ef.models.radial(d, layers=4, **kw),
}
CONDITIONAL = ["realnvp", "nice", "maf", "iaf", "nsf", "nsf-ar"]

# Quadrature grid per builder, [-L, L]^2 with n x n midpoints. Affine layers can contract
# the data side by up to e^3 per layer, so those flows have wide tails and get a wide box;
# splines are the identity outside [-5, 5], so their tails stay Gaussian but their slopes
# vary faster inside, so they get a finer grid. Planar's log_prob solves a Newton equation
# per point and layer: fewer points; its layers barely move the Gaussian tails.
GRIDS = {
    "nsf": (8.0, 200),
    "nsf-ar": (8.0, 200),
    "planar": (6.0, 100),
    "radial": (8.0, 160),
}
DEFAULT_GRID = (14.0, 200)


def randomized(name: str, d: int = 2, **kw) -> ef.Flow:
    """A builder's flow in float64 at random parameters, in eval mode.

    Scale 0.2: farther, and the splines get slopes of 1e-5..1e5 somewhere, which a grid of
    this size no longer resolves (the density is still normalized, the quadrature is not).
    Batch-norm statistics are set by a few training-mode passes over data.
    """
    flow = BUILDERS[name](d, **kw).double()
    perturb(flow, scale=0.2, seed=sum(map(ord, name)))
    if any(type(m).__name__ == "BatchNorm" for m in flow.modules()):
        flow.train()
        ctx = torch.randn(256, flow.context_features, dtype=torch.float64)
        with torch.no_grad(), warnings.catch_warnings():  # (on purpose without gradients)
            warnings.simplefilter("ignore")
            for _ in range(3):
                x = 1.5 * torch.randn(256, d, dtype=torch.float64) + 0.5
                flow.log_prob(x, ctx if flow.context_features else None)
    return flow.eval()


def grid(L: float, n: int) -> tuple[torch.Tensor, float]:
    edges = torch.linspace(-L, L, n + 1, dtype=torch.float64)
    mid = (edges[1:] + edges[:-1]) / 2
    xx, yy = torch.meshgrid(mid, mid, indexing="ij")
    return torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=1), (2 * L / n) ** 2


@pytest.mark.parametrize("name", BUILDERS)
def test_log_prob_integrates_to_one(name: str) -> None:
    flow = randomized(name)
    points, cell = grid(*GRIDS.get(name, DEFAULT_GRID))
    with torch.no_grad():
        mass = float(flow.log_prob(points).exp().sum() * cell)
    assert abs(mass - 1.0) < 1e-2, f"{name}: the density integrates to {mass}"


def stretched_grid(U: float, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Midpoints of an ``n x n`` grid on ``[-U, U]^2`` mapped by ``x = sinh(u)``, and their
    cell areas ``cosh(u_1) cosh(u_2) du^2``.

    Cells are ``2U/n`` wide at the origin and grow like ``|x|`` in the tails, so one grid
    spans ``±sinh(U)`` (±1490 for ``U = 8``) and still resolves the core.
    """
    edges = torch.linspace(-U, U, n + 1, dtype=torch.float64)
    u = (edges[1:] + edges[:-1]) / 2
    x, width = torch.sinh(u), torch.cosh(u) * (2 * U / n)
    xx, yy = torch.meshgrid(x, x, indexing="ij")
    area = (width[:, None] * width[None, :]).reshape(-1)
    return torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=1), area


def test_stretched_grid_integrates_a_wide_gaussian() -> None:
    points, area = stretched_grid(8.0, 400)
    for scale in (0.3, 1.0, 100.0):
        log_p = -0.5 * (points / scale).square().sum(1) - math.log(2 * math.pi * scale**2)
        assert abs(float((log_p.exp() * area).sum()) - 1.0) < 1e-3


@pytest.mark.parametrize("name", ["maf", "nsf"])
def test_conditional_log_prob_integrates_to_one_for_each_context(name: str) -> None:
    # The context feeds every first-layer unit unmasked: at some contexts the log-scales of
    # all three affine layers sit near their bound and the data-side tails reach far past
    # the boxes of GRIDS (at random parameters, up to half of a conditional MAF's mass lay
    # beyond ±14 and a tenth beyond ±50). A sinh-stretched grid spans ±1490: MAF integrates
    # to 1 within 1e-5 and NSF within 1e-3 at every context tried, so several are checked.
    flow = randomized(name, context=3)
    points, area = stretched_grid(8.0, 400)
    for context in 2.0 * torch.randn(4, 3, dtype=torch.float64):
        with torch.no_grad():
            density = flow.log_prob(points, context.expand(len(points), 3)).exp()
        mass = float((density * area).sum())
        assert abs(mass - 1.0) < 1e-2, f"{name}: mass {mass} at context {context.tolist()}"


@pytest.mark.parametrize("name", BUILDERS)
def test_sample_then_log_prob_agrees_with_sample_and_log_prob(name: str) -> None:
    flow = randomized(name, d=3)
    torch.manual_seed(11)
    x = flow.sample(32)
    torch.manual_seed(11)
    x2, log_p = flow.sample_and_log_prob(32)
    assert x.shape == (32, 3) and torch.equal(x, x2)
    with torch.no_grad():
        assert torch.allclose(flow.log_prob(x), log_p, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("name", BUILDERS)
def test_whole_transform_passes_check_transform(name: str) -> None:
    flow = randomized(name, d=3)
    ef.check_transform(flow.transform, 1.5 * torch.randn(6, 3, dtype=torch.float64))


@pytest.mark.parametrize("name", CONDITIONAL)
def test_conditional_shapes_and_check(name: str) -> None:
    flow = randomized(name, d=3, context=2)
    b, n = 4, 5
    context = torch.randn(b, 2, dtype=torch.float64)
    assert flow.sample(n, context).shape == (n, b, 3)
    x, log_p = flow.sample_and_log_prob(n, context)
    assert x.shape == (n, b, 3) and log_p.shape == (n, b)
    with torch.no_grad():
        again = flow.log_prob(x.reshape(n * b, 3), context.repeat(n, 1)).reshape(n, b)
    assert torch.allclose(again, log_p, atol=1e-6)
    assert flow.sample(n, context[0]).shape == (n, 3)
    assert flow.log_prob(x[0], context).shape == (b,)
    ef.check_transform(flow.transform, x[0].detach(), context)
    # The context matters.
    with torch.no_grad():
        a = flow.log_prob(x[0], context)
        c = flow.log_prob(x[0], context + 1.0)
    assert not torch.allclose(a, c)


@pytest.mark.parametrize("name", BUILDERS)
def test_build_from_config_rebuilds_the_same_architecture(name: str) -> None:
    flow = randomized(name)
    config = json.loads(json.dumps(flow.config))  # JSON-serializable, lists not tuples
    assert config == flow.config and config["model"] == name.split("-")[0]
    rebuilt = ef.models.build(config).double()
    rebuilt.load_state_dict(flow.state_dict())  # strict: same modules, parameters, buffers
    rebuilt.eval()
    assert repr(rebuilt) == repr(flow)
    x = torch.randn(7, 2, dtype=torch.float64)
    with torch.no_grad():
        assert torch.allclose(rebuilt.log_prob(x), flow.log_prob(x))


def test_builders_share_keyword_names() -> None:
    import inspect

    for name in ("realnvp", "nice", "maf", "iaf", "nsf", "planar", "radial"):
        params = inspect.signature(getattr(ef.models, name)).parameters
        assert list(params)[0] == "features"
        assert {"layers", "context", "standardize", "embedding"} <= set(params), name
        assert all(
            p.kind is inspect.Parameter.KEYWORD_ONLY for k, p in params.items() if k != "features"
        )
        if name not in ("planar", "radial"):
            assert params["hidden"].default == (64, 64)
    assert ef.models.realnvp(2).config["layers"] == 8


def test_realnvp_structure() -> None:
    flow = ef.models.realnvp(3, layers=4, hidden=(8,))
    kinds = [type(t).__name__ for t in flow.transform]
    assert kinds == [
        "AffineCoupling", "BatchNorm", "AffineCoupling", "BatchNorm", "AffineCoupling",
        "BatchNorm", "AffineCoupling",
    ]
    masks = [t.mask.tolist() for t in flow.transform if isinstance(t, AffineCoupling)]
    assert masks[0] == [True, False, True] and masks[1] == [False, True, False]
    assert masks[2] == masks[0]
    plain = ef.models.realnvp(3, layers=4, hidden=(8,), batch_norm=False)
    assert all(isinstance(t, AffineCoupling) for t in plain.transform)


def test_autoregressive_builders_fast_direction_and_permutations() -> None:
    maf = ef.models.maf(3, layers=3, hidden=(8,))
    iaf = ef.models.iaf(3, layers=3, hidden=(8,))
    mades = lambda f: [t for t in f.transform if hasattr(t, "made")]  # noqa: E731
    assert all(type(t) is MaskedAffineAutoregressive for t in mades(maf))
    assert all(type(t) is InverseAutoregressive for t in mades(iaf))
    assert "fast" not in maf.config and "fast" not in iaf.config
    # exactflow 0.1 configs: maf with fast="sampling" was an IAF; it loads as one.
    old = ef.models.build({"model": "maf", "features": 3, "layers": 3, "hidden": [8],
                           "fast": "sampling", "permutation": "reverse", "batch_norm": False,
                           "context": 0})
    assert old.config["model"] == "iaf" and all(
        type(t) is InverseAutoregressive for t in mades(old))
    old.load_state_dict(iaf.state_dict())
    kinds = [type(t).__name__ for t in maf.transform]
    assert kinds == [
        "MaskedAffineAutoregressive", "Reverse", "MaskedAffineAutoregressive", "Reverse",
        "MaskedAffineAutoregressive",
    ]
    a = ef.models.maf(5, layers=3, hidden=(8,), permutation="random")
    b = ef.models.maf(5, layers=3, hidden=(8,), permutation="random")
    perms = lambda f: [t.perm.tolist() for t in f.transform if type(t) is Permutation]  # noqa: E731
    assert perms(a) == perms(b) and len(perms(a)) == 2 and perms(a)[0] != perms(a)[1]
    bn = ef.models.maf(3, layers=2, hidden=(8,), batch_norm=True)
    assert "BatchNorm" in [type(t).__name__ for t in bn.transform]


def test_nsf_kinds() -> None:
    coupling = ef.models.nsf(3, layers=2, hidden=(8,), bins=4)
    assert [type(t) for t in coupling.transform] == [SplineCoupling, SplineCoupling]
    ar = ef.models.nsf(3, layers=2, hidden=(8,), bins=4, kind="autoregressive")
    assert [type(t).__name__ for t in ar.transform] == [
        "SplineAutoregressive", "Reverse", "SplineAutoregressive",
    ]
    assert all(t.fast == "density" for t in ar.transform if isinstance(t, SplineAutoregressive))
    shuffled = ef.models.nsf(4, layers=3, hidden=(8,), bins=4, permutation="random")
    assert sum(type(t) is Permutation for t in shuffled.transform) == 2


@pytest.mark.parametrize("name", ["maf", "iaf"])
def test_one_feature_autoregressive_flows(name: str) -> None:
    flow = perturb(getattr(ef.models, name)(1, layers=2, hidden=(8,), context=2).double())
    x = torch.randn(5, 1, dtype=torch.float64)
    context = torch.randn(5, 2, dtype=torch.float64)
    ef.check_transform(flow.transform, x, context)
    assert flow.sample(3, context).shape == (3, 5, 1)


def test_bad_arguments_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="features >= 2"):
        ef.models.realnvp(1)
    with pytest.raises(ValueError, match="features >= 2"):
        ef.models.nsf(1)
    with pytest.raises(ValueError, match="unconditional"):
        ef.models.planar(2, context=3)
    with pytest.raises(ValueError, match="unconditional"):
        ef.models.radial(2, context=1)
    with pytest.raises(TypeError, match="fast"):
        ef.models.maf(2, fast="sampling")  # maf and iaf are distinct builders
    with pytest.raises(ValueError, match="fast applies to kind='autoregressive' only"):
        ef.models.nsf(2, kind="coupling", fast="density")
    with pytest.raises(ValueError, match="fast"):
        ef.models.nsf(2, kind="autoregressive", fast="both")
    with pytest.raises(ValueError, match="permutation"):
        ef.models.nsf(2, permutation="reverse")  # couplings alternate their masks already
    with pytest.raises(ValueError, match="kind"):
        ef.models.nsf(2, kind="residual")
    with pytest.raises(ValueError, match="permutation"):
        ef.models.iaf(2, permutation="shuffle")
    with pytest.raises(ValueError, match="layers"):
        ef.models.nice(2, layers=0)
    with pytest.raises(ValueError, match="does not fit"):
        ef.models.build({"model": "maf", "features": 2, "bins": 8})


@pytest.mark.slow
def test_torch_compile_log_prob() -> None:
    """``torch.compile(flow.log_prob, fullgraph=True)`` traces without graph breaks and agrees."""
    for name in ("realnvp", "maf", "nsf"):
        flow = randomized(name).float()
        x = torch.randn(16, 2)
        compiled = torch.compile(flow.log_prob, fullgraph=True)
        with torch.no_grad():
            assert torch.allclose(compiled(x), flow.log_prob(x), atol=1e-4), name


class _LogProb(torch.nn.Module):
    def __init__(self, flow: ef.Flow) -> None:
        super().__init__()
        self.flow = flow

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.flow.log_prob(x)


@pytest.mark.filterwarnings("ignore:`torch.jit.trace:DeprecationWarning")
@pytest.mark.parametrize("name", ["realnvp", "maf", "iaf", "nsf"])
def test_jit_trace_and_export_record_the_density_for_any_batch(name: str) -> None:
    """A trace records torch ops, not the fused passes' pooled buffers or blocks of rows;
    an export with a dynamic batch size puts no guard on it. The argument checks stay out
    of a trace (its shapes are fixed): no TracerWarning but the IAF's shape tests."""
    flow = randomized(name).float()
    module = _LogProb(flow)
    x = torch.randn(300, 2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", torch.jit.TracerWarning)
        traced = torch.jit.trace(module, (x,), check_trace=False)
    tracer = [w for w in caught if issubclass(w.category, torch.jit.TracerWarning)]
    assert name == "iaf" or not tracer, [str(w.message)[:80] for w in tracer[:2]]
    batch = torch.export.Dim("batch")
    exported = torch.export.export(module, (x,), dynamic_shapes={"x": {0: batch}}).module()
    for n in (7, 1000):  # (1000: eager scoring runs in blocks, the trace in one)
        rows = torch.randn(n, 2)
        with torch.no_grad():
            want = flow.log_prob(rows)
            torch.testing.assert_close(traced(rows), want, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(exported(rows), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["realnvp", "nice", "maf", "iaf", "nsf", "nsf-ar"])
def test_dropout_acts_in_training_only_and_keeps_the_parameters(name: str) -> None:
    plain = BUILDERS[name](3)
    dropped = BUILDERS[name](3, dropout=0.5)
    assert dropped.config["dropout"] == 0.5
    assert {k: v.shape for k, v in plain.state_dict().items()} == {
        k: v.shape for k, v in dropped.state_dict().items()}
    perturb(dropped, 0.3, seed=0)
    x = torch.randn(64, 3)
    dropped.eval()
    with torch.no_grad():
        a, b = dropped.log_prob(x), dropped.log_prob(x)
    assert torch.equal(a, b)  # eval mode: no dropout, deterministic
    dropped.train()
    with torch.no_grad(), warnings.catch_warnings():  # (realnvp's BatchNorm: on purpose)
        warnings.simplefilter("ignore")
        c = dropped.log_prob(x)
    assert not torch.allclose(a, c)  # training mode: units dropped
    with pytest.raises(ValueError, match="dropout"):
        BUILDERS[name](3, dropout=1.0)


def test_an_argument_a_builder_does_not_take_is_named_with_the_builder():
    # (Python's own message named neither the builder nor what it takes)
    with pytest.raises(TypeError, match=r"planar\(\): got an unexpected keyword argument "
                                        r"'hidden'; it takes features, layers, context"):
        ef.models.planar(2, hidden=(8,))
    with pytest.raises(ValueError, match=r"base must be .* got 'uniform'"):
        ef.models.maf(2, base="uniform")
    # Through a config (FlowDensity's model_kwargs, a model file) too, with the near names.
    with pytest.raises(ValueError, match=r"'gmm' builder: got an unexpected keyword argument "
                                         r"'n_components' \('n_components': 'components'\?\); "
                                         r"it takes features, components, covariance"):
        ef.models.build({"model": "gmm", "features": 2, "n_components": 3})
