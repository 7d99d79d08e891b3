"""Tests of the transform contract: Transform, Compose, Inverse, check_domain."""

from __future__ import annotations

from typing import NamedTuple

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import exactflow as ef
from exactflow.core import check_domain
from exactflow.transforms import ElementwiseAffine, Logit, LULinear, Permutation, Reverse, Sigmoid
from tests.helpers import perturb


class ConditionalShift(ef.Transform):
    """``z = x + c W``: log-det 0, the shift depends on the context."""

    def __init__(self, features: int, context: int):
        super().__init__()
        self.net = nn.Linear(context, features)

    def forward(self, x, context=None):
        return x + self.net(context), x.new_zeros(x.shape[0])

    def inverse(self, z, context=None):
        return z - self.net(context), z.new_zeros(z.shape[0])


def chain(d: int = 4) -> list[ef.Transform]:
    return [
        perturb(ElementwiseAffine(d)),
        perturb(LULinear(d, permutation="random")),
        Sigmoid(),
        perturb(Logit(alpha=0.02)),
        Reverse(d),
    ]


def test_compose_passes_check_transform(dtype):
    t = ef.Compose(*chain()).to(dtype)
    x = torch.randn(6, 4, dtype=dtype)
    report = ef.check_transform(t, x)
    assert report.ok, str(report)


def test_compose_sums_log_dets_and_inverts_in_reverse_order():
    layers = [perturb(LULinear(3)).double(), perturb(ElementwiseAffine(3)).double()]
    t = ef.Compose(layers)
    x = torch.randn(5, 3, dtype=torch.float64)
    h, l1 = layers[0](x)
    z_ref, l2 = layers[1](h)
    z, ladj = t(x)
    torch.testing.assert_close(z, z_ref)
    torch.testing.assert_close(ladj, l1 + l2)
    x_back, ladj_inv = t.inverse(z)
    torch.testing.assert_close(x_back, x)
    torch.testing.assert_close(ladj_inv, -ladj)
    # Inverting in the forward order would give a different point.
    wrong = layers[1].inverse(layers[0].inverse(z)[0])[0]
    assert not torch.allclose(wrong, x, atol=1e-3)


def test_compose_container_behaviour():
    layers = chain(3)
    t = ef.Compose(layers)
    assert len(t) == 5 and t[1] is layers[1] and list(t) == layers
    nested = ef.Compose(t, Reverse(3))
    assert len(nested) == 2
    assert set(dict(nested.named_parameters())) >= {"transforms.0.transforms.0.log_scale"}
    empty = ef.Compose()
    x = torch.randn(2, 3)
    z, ladj = empty(x)
    assert torch.equal(z, x) and torch.equal(ladj, torch.zeros(2))


def test_compose_rejects_non_transforms():
    with pytest.raises(TypeError, match="Linear"):
        ef.Compose(ElementwiseAffine(2), nn.Linear(2, 2))


def test_compose_passes_the_context_to_every_layer():
    t = perturb(ef.Compose(ConditionalShift(3, 2), LULinear(3), ConditionalShift(3, 2))).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    c = torch.randn(5, 2, dtype=torch.float64)
    assert ef.check_transform(t, x, c).ok
    z, _ = t(x, c)
    z_other, _ = t(x, c + 1.0)
    assert not torch.allclose(z, z_other)
    torch.testing.assert_close(t.inverse(z, c)[0], x)


def test_inverse_swaps_directions_and_shares_parameters():
    base = perturb(LULinear(4)).double()
    inv = ef.Inverse(base)
    x = torch.randn(3, 4, dtype=torch.float64)
    torch.testing.assert_close(inv(x)[0], base.inverse(x)[0])
    torch.testing.assert_close(inv.inverse(x)[1], base(x)[1])
    assert ef.check_transform(inv, x).ok
    assert isinstance(base.inv, ef.Inverse) and base.inv.transform is base
    assert inv.inv is base
    assert {id(p) for p in inv.parameters()} == {id(p) for p in base.parameters()}


def test_transform_base_is_abstract():
    t = ef.Transform()
    with pytest.raises(NotImplementedError):
        t(torch.zeros(1, 2))
    with pytest.raises(NotImplementedError):
        t.inverse(torch.zeros(1, 2))


def test_check_domain():
    check_domain(torch.tensor([True, True]), "unused")
    with pytest.raises(ValueError, match="needs positive input"):
        check_domain(torch.tensor([True, False]), "needs positive input")


def test_to_moves_every_tensor():
    t = ef.Compose(*chain(3), Permutation(3)).to(torch.float64)
    for p in t.parameters():
        assert p.dtype == torch.float64
    # Integer buffers (permutations) keep their dtype and travel with the module.
    state = t.state_dict()
    assert any(k.endswith("perm") for k in state)
    assert all(v.dtype in (torch.float64, torch.long) for v in state.values())


LAYER_CHOICES = {
    "affine": lambda d: perturb(ElementwiseAffine(d)),
    "lu": lambda d: perturb(LULinear(d), scale=0.3),
    "reverse": Reverse,
    "permutation": lambda d: Permutation(d),
    "sigmoid_logit": lambda d: ef.Compose(Sigmoid(), Logit()),
}


@given(
    names=st.lists(st.sampled_from(sorted(LAYER_CHOICES)), min_size=0, max_size=4),
    batch=st.integers(1, 7),
    features=st.integers(1, 5),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_compose_shapes_and_round_trip(names, batch, features, dtype):
    t = ef.Compose(*[LAYER_CHOICES[n](features) for n in names]).to(dtype)
    x = torch.randn(batch, features, dtype=dtype)
    z, ladj = t(x)
    assert z.shape == x.shape and ladj.shape == (batch,)
    assert z.dtype == dtype and ladj.dtype == dtype
    x_back, ladj_inv = t.inverse(z)
    tol = 2e-3 if dtype == torch.float32 else 1e-8
    torch.testing.assert_close(x_back, x, atol=tol, rtol=tol)
    torch.testing.assert_close(ladj_inv, -ladj, atol=tol, rtol=tol)


def test_check_domain_is_skipped_under_vmap_only():
    def guarded(x):
        check_domain(x > 0, "needs positive input")
        return x.log()

    x = torch.tensor([[1.0, 2.0], [3.0, -1.0]])
    with pytest.raises(ValueError, match="needs positive input"):
        guarded(x)
    with pytest.raises(ValueError, match="needs positive input"):
        torch.func.grad(lambda v: guarded(v).sum())(x[1])
    # vmap cannot branch on data: the check steps aside rather than break the trace.
    out = torch.func.vmap(guarded)(x)
    torch.testing.assert_close(out[0], x[0].log())


# -- the layer contract: shapes checked once, in the base class ---------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda: ElementwiseAffine(3),
        lambda: LULinear(3),
        lambda: Permutation(3),
        lambda: Reverse(3),
        lambda: ef.transforms.BatchNorm(3),
        lambda: ef.transforms.AffineCoupling(3, hidden=(4,)),
        lambda: ef.transforms.MaskedAffineAutoregressive(3, hidden=(4,)),
    ],
)
@pytest.mark.parametrize("direction", ["forward", "inverse"])
@pytest.mark.parametrize("shape", [(4, 1), (4, 4), (3,), (2, 3, 1)])
def test_a_wrong_width_is_a_clear_error_in_both_directions(make, direction, shape):
    # Before the check lived in the base class, ElementwiseAffine(3) broadcast a (4, 1)
    # input to (4, 3) silently and LULinear / Permutation raised raw torch errors.
    t = make().eval()
    call = t if direction == "forward" else t.inverse
    with pytest.raises(ValueError, match=r"expects input of shape \(batch, 3\)"):
        call(torch.randn(*shape))


def test_every_layer_declares_its_width_and_context():
    t = ef.transforms.AffineCoupling(4, context=2)
    assert (t.features, t.context_features) == (4, 2)
    assert (ef.transforms.Sigmoid().features, ef.transforms.Logit(features=5).features) == (
        None, 5)
    chain = ef.Compose(ElementwiseAffine(4), t)
    assert (chain.features, chain.context_features) == (4, 2)
    assert (chain.inv.features, chain.inv.context_features) == (4, 2)
    with pytest.raises(ValueError, match="one width"):
        ef.Compose(ElementwiseAffine(2), ElementwiseAffine(3))
    with pytest.raises(ValueError, match="conditional"):
        chain(torch.randn(5, 4))


def test_linear_flag_marks_affine_layers():
    assert all(t.linear for t in (ElementwiseAffine(2), LULinear(2), Permutation(2),
                                  Reverse(2), ef.transforms.BatchNorm(2),
                                  ef.transforms.ActNorm(2)))
    assert not any(t.linear for t in (Sigmoid(), Logit(), ef.transforms.Planar(2),
                                      ef.transforms.AffineCoupling(2)))


def test_a_user_transform_gets_the_shape_check_without_writing_it():
    class Shift(ef.Transform):
        def __init__(self) -> None:
            super().__init__()
            self.features = 2

        def forward(self, x, context=None):
            return x + 1, x.new_zeros(x.shape[0])

        def inverse(self, z, context=None):
            return z - 1, z.new_zeros(z.shape[0])

    with pytest.raises(ValueError, match=r"Shift expects input of shape \(batch, 2\)"):
        Shift()(torch.zeros(3, 1))
    with pytest.raises(ValueError, match=r"Shift.inverse expects"):
        Shift().inverse(torch.zeros(3))
    ef.check_transform(Shift(), torch.randn(4, 2, dtype=torch.float64))


# -- scoring in blocks of rows -------------------------------------------------------------


def rows_seen(monkeypatch) -> list[int]:
    """The batch sizes the coupling layers are called with."""
    seen: list[int] = []
    couple = ef.transforms.Coupling._couple

    def spy(self, x, context, inverse):
        seen.append(x.shape[0])
        return couple(self, x, context, inverse)

    monkeypatch.setattr(ef.transforms.Coupling, "_couple", spy)
    return seen


def flow_in_blocks(model: str, context: int, monkeypatch):
    """A 3-layer flow of 4 features in float64 at random parameters, in eval mode, run in
    blocks of 256 rows; 600 rows of input and context (None without one)."""
    torch.manual_seed(0)
    build = getattr(ef.models, model)
    flow = perturb(build(4, layers=3, hidden=(32, 32), context=context).double()).eval()
    monkeypatch.setattr(ef.core, "SCORING_BLOCK_BYTES", 256 * 32 * 8)  # 256 rows
    x = torch.randn(600, 4, dtype=torch.float64)
    c = torch.randn(600, context, dtype=torch.float64) if context else None
    return flow, x, c


@pytest.mark.parametrize("model", ["realnvp", "nsf"])
@pytest.mark.parametrize("context", [0, 3])
def test_scoring_without_a_backward_runs_in_blocks_of_rows(model, context, monkeypatch) -> None:
    flow, x, c = flow_in_blocks(model, context, monkeypatch)
    if model == "realnvp":
        assert any(isinstance(t, ef.transforms.BatchNorm) for t in flow.transform)
    seen = rows_seen(monkeypatch)
    with torch.no_grad():
        blocked = flow.log_prob(x, c) if context else flow.log_prob(x)
    assert seen == [256] * 6 + [88] * 3  # each block through the layers
    seen.clear()
    x.requires_grad_(True)  # a backward follows: the whole batch at once
    whole = flow.log_prob(x, c) if context else flow.log_prob(x)
    assert seen == [600] * 3
    torch.testing.assert_close(blocked, whole.detach(), rtol=1e-13, atol=1e-13)
    seen.clear()
    with torch.no_grad():  # a batch that fits in one block
        flow.log_prob(x[:256], c[:256] if context else None) if context else flow.log_prob(x[:256])
    assert seen == [256] * 3


@pytest.mark.parametrize("model", ["realnvp", "nsf"])
@pytest.mark.parametrize("context", [0, 3])
def test_sampling_runs_the_inverses_in_blocks_of_rows(model, context, monkeypatch) -> None:
    flow, z, c = flow_in_blocks(model, context, monkeypatch)
    seen = rows_seen(monkeypatch)
    with torch.no_grad():
        x, ladj = flow.transform.inverse(z, c)
    assert seen == [256] * 6 + [88] * 3  # each block through the layers
    seen.clear()
    z.requires_grad_(True)  # a backward follows: the whole batch at once
    x_whole, ladj_whole = flow.transform.inverse(z, c)
    assert seen == [600] * 3
    torch.testing.assert_close(x, x_whole.detach(), rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(ladj, ladj_whole.detach(), rtol=1e-13, atol=1e-13)
    # Sampling draws the same points in blocks as in one pass.
    seen.clear()
    torch.manual_seed(1)
    drawn = flow.sample(600, c[0]) if context else flow.sample(600)
    assert seen == [256] * 6 + [88] * 3
    monkeypatch.setattr(ef.core, "SCORING_BLOCK_BYTES", 2**40)  # one block: the reference
    torch.manual_seed(1)
    reference = flow.sample(600, c[0]) if context else flow.sample(600)
    torch.testing.assert_close(drawn, reference, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("model, kwargs", [
    ("maf", {}), ("iaf", {}), ("nsf", {"kind": "autoregressive"}),
])
@pytest.mark.parametrize("context", [0, 3])
def test_autoregressive_layers_run_their_slow_direction_in_blocks_of_rows(
        model, kwargs, context, monkeypatch) -> None:
    # (MAF sampling ran its sequential pass on the whole batch: 10 million 2-D points
    # took 3.6 GB for a result of 160 MB)
    torch.manual_seed(0)
    flow = perturb(getattr(ef.models, model)(4, layers=3, hidden=(32, 32), context=context,
                                             **kwargs).double()).eval()
    width = flow.transform[0]._row_width  # (the widest tensor: a MADE's outputs or units)
    monkeypatch.setattr(ef.core, "SCORING_BLOCK_BYTES", 256 * width * 8)  # 256 rows
    monkeypatch.setattr(ef.core, "SEQUENTIAL_BLOCK_BYTES", 512 * width * 8)  # the slow way
    x = torch.randn(600, 4, dtype=torch.float64)
    c = torch.randn(600, context, dtype=torch.float64) if context else None
    seen: list[int] = []
    for name in ("_solve", "_one_pass"):
        real = getattr(ef.transforms.MaskedAutoregressive, name)

        def spy(self, v, ctx, real=real):
            seen.append(v.shape[0])
            return real(self, v, ctx)

        monkeypatch.setattr(ef.transforms.MaskedAutoregressive, name, spy)
    results = []
    for way in ("forward", "inverse"):
        with torch.no_grad():
            results.append(getattr(flow.transform, way)(x, c))
        fused = (model, way) in (("maf", "forward"), ("iaf", "inverse"))  # (one chain)
        sequential = (way == "inverse") == (model != "iaf")
        blocks = [512] * 3 + [88] * 3 if sequential else [256] * 6 + [88] * 3
        assert seen == ([] if fused else blocks), (way, seen)
        seen.clear()
    layer = flow.transform[0]  # (a method of the instance's own: the whole batch)
    layer._solve = lambda v, ctx: (v, v.new_zeros(v.shape[0]))
    assert layer._row_width is None
    del layer._solve
    monkeypatch.setattr(ef.core, "SCORING_BLOCK_BYTES", 2**40)  # one block: the reference
    monkeypatch.setattr(ef.core, "SEQUENTIAL_BLOCK_BYTES", 2**40)
    for way, (out, ladj) in zip(("forward", "inverse"), results, strict=True):
        with torch.no_grad():
            ref_out, ref_ladj = getattr(flow.transform, way)(x, c)
        torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(ladj, ref_ladj, rtol=1e-12, atol=1e-12)


def test_scoring_keeps_the_whole_batch_where_rows_are_not_independent(monkeypatch) -> None:
    torch.manual_seed(0)
    flow = perturb(ef.models.realnvp(4, layers=2, hidden=(32, 32)).double())
    monkeypatch.setattr(ef.core, "SCORING_BLOCK_BYTES", 256 * 32 * 8)
    x = torch.randn(600, 4, dtype=torch.float64)
    seen = rows_seen(monkeypatch)
    with torch.no_grad(), pytest.warns(UserWarning, match="BatchNorm layer ran in training"):
        flow.log_prob(x)  # training mode: BatchNorm normalizes by the batch
    assert seen == [256, 256, 88] * 2  # the couplings before and after it, one by one
    flow.eval()
    seen.clear()
    handle = flow.transform[2].register_forward_hook(lambda *args: None)
    with torch.no_grad():  # a hook sees the batch it was promised
        flow.log_prob(x)
    assert seen == [256, 256, 88, 600]
    handle.remove()
    seen.clear()
    handle.remove()
    seen.clear()
    # Under autograd, a layer whose parameters train runs on the whole batch, and the
    # gradients are those of the whole batch at once.
    for p in flow.transform[0].parameters():
        p.requires_grad_(False)
    flow.log_prob(x).sum().backward()
    assert seen == [256, 256, 88, 600]
    grads = [p.grad for p in flow.transform[2].parameters()]
    flow.zero_grad()
    monkeypatch.setattr(ef.core, "SCORING_BLOCK_BYTES", 2**40)  # one block: the reference
    flow.log_prob(x).sum().backward()
    for p, g in zip(flow.transform[2].parameters(), grads, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-12, atol=1e-12)
    seen.clear()
    # Once a layer before trains, the input carries a gradient: the whole batch after it.
    monkeypatch.setattr(ef.core, "SCORING_BLOCK_BYTES", 256 * 32 * 8)
    flow.zero_grad()
    for p in flow.transform[1].parameters():
        p.requires_grad_(True)
    for p in flow.transform[2].parameters():
        p.requires_grad_(False)
    flow.log_prob(x).sum().backward()
    assert seen == [256, 256, 88, 600]
    seen.clear()
    custom = ef.transforms.AffineCoupling(
        4, conditioner=lambda n_in, n_out: nn.Sequential(nn.Linear(n_in, n_out))
    )
    with torch.no_grad():  # a network of the user's: exactflow cannot know
        ef.Compose(custom, ef.transforms.Reverse(4))(x.float())
    assert seen == [600]


def test_row_width_is_declared_by_the_layers_that_take_rows_one_by_one() -> None:
    coupling = ef.transforms.AffineCoupling(6, hidden=(40, 24))
    assert coupling._row_width == 40
    assert ef.transforms.SplineCoupling(6, hidden=(8,), bins=8)._row_width == 3 * (3 * 8 - 1)
    assert Reverse(5)._row_width == Permutation(5)._row_width == 5
    bn = ef.transforms.BatchNorm(3)
    assert bn._row_width is None and bn.eval()._row_width == 3
    assert ElementwiseAffine(3)._row_width is None  # (not declared)

    class Mine(ef.transforms.AffineCoupling):
        def forward(self, x, context=None):
            return super().forward(x, context)

    class MyInverse(ef.transforms.AffineCoupling):
        def inverse(self, z, context=None):
            return super().inverse(z, context)

    assert Mine(4)._row_width is None and MyInverse(4)._row_width is None

    class MyMap(ef.transforms.monotonic.AffineMap):
        pass

    assert ef.transforms.Coupling(4, MyMap())._row_width is None  # (a map of the user's)


def test_blocks_ignore_a_context_no_layer_takes_and_directions_of_an_instance(
    monkeypatch,
) -> None:
    torch.manual_seed(0)
    t = ef.Compose(*[ef.transforms.AffineCoupling(4, hidden=(16,), mask=m)
                     for m in ("even", "odd", "even")])
    monkeypatch.setattr(ef.core, "SCORING_BLOCK_BYTES", 256 * 16 * 4)
    x = torch.randn(600, 4)
    seen = rows_seen(monkeypatch)
    with torch.no_grad():
        ref = t(x)
        for context in (torch.tensor(0.0), [1, 2]):
            got = t(x, context)  # type: ignore[arg-type]
            assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
    assert seen == ([256] * 6 + [88] * 3) * 3
    seen.clear()
    own = t[1].forward
    t[1].forward = lambda x, context=None: own(x, context)  # type: ignore[method-assign]
    with torch.no_grad():
        t(x)
    assert seen == [256, 256, 88, 600, 256, 256, 88]  # the instance's own forward: whole
    del t[1].forward
    seen.clear()
    own_inverse = t[1].inverse
    t[1].inverse = lambda z, context=None: own_inverse(z, context)  # type: ignore[method-assign]
    with torch.no_grad():
        t.inverse(x)  # its own inverse: whole; the forward is the class's: in blocks
        t(x)
    assert seen == [256, 256, 88, 600, 256, 256, 88] + [256] * 6 + [88] * 3


class _OnlyZ(ef.Transform):
    """Forgot the log-det: returns the output alone."""

    def forward(self, x, context=None):
        return 2 * x

    def inverse(self, z, context=None):
        return z / 2, z.new_full(z.shape[:1], -2 * 0.6931471805599453)


class _FloatLogDet(ef.Transform):
    """Returns its log-det as a Python float."""

    def forward(self, x, context=None):
        return 2 * x, 2 * 0.6931471805599453

    def inverse(self, z, context=None):
        return z / 2, z.new_full(z.shape[:1], -2 * 0.6931471805599453)


@pytest.mark.parametrize("rows", [2, 6])  # (two rows unpacked as (z, log_det) before)
def test_a_layer_that_does_not_return_a_pair_of_tensors_is_named(rows):
    x = torch.randn(rows, 2)
    pair = (rf"_OnlyZ.forward returned a Tensor of shape \({rows}, 2\); a layer returns the "
            r"pair \(output, log_det\)")
    for call in (lambda: ef.Flow(_OnlyZ(), ef.StandardNormal(2)).log_prob(x),
                 lambda: ef.Compose(ElementwiseAffine(2), _OnlyZ())(x),
                 lambda: ef.check_transform(_OnlyZ(), x.double())):
        with pytest.raises(TypeError, match=pair):
            call()
    with pytest.raises(TypeError, match=r"_FloatLogDet returned a log-det of type float; it "
                                        r"must be a tensor of one value per row"):
        ef.Flow(_FloatLogDet(), ef.StandardNormal(2)).log_prob(x)
    with pytest.raises(TypeError, match="returned a pair of Tensor and float"):
        ef.check_transform(_FloatLogDet(), x.double())


def test_the_jacobian_of_a_flow_points_to_its_transform():
    flow = ef.models.maf(2, layers=1, hidden=(4,))
    for fn in (ef.jacobian, ef.log_abs_det_jacobian):
        with pytest.raises(TypeError, match=r"calling a flow gives its log-density.*"
                                            r"jacobian\(flow.transform, x"):
            fn(flow, torch.randn(3, 2))


class _NamedPair(ef.Transform):
    """Returns a NamedTuple (z, log_det), as some user code does."""

    def forward(self, x, context=None):
        return _Pair(2 * x, x.new_full(x.shape[:1], 2 * 0.6931471805599453))

    def inverse(self, z, context=None):
        return [z / 2, z.new_full(z.shape[:1], -2 * 0.6931471805599453)]  # (a list too)


class _Pair(NamedTuple):
    z: torch.Tensor
    log_det: torch.Tensor


def test_a_named_tuple_or_a_list_pair_is_a_pair():
    x = torch.randn(4, 2, dtype=torch.float64)
    flow = ef.Flow(ef.Compose(_NamedPair(), ElementwiseAffine(2)), ef.StandardNormal(2)).double()
    assert torch.isfinite(flow.log_prob(x)).all() and flow.sample(3).shape == (3, 2)
    assert ef.check_transform(_NamedPair(), x).ok
