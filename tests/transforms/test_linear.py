"""Tests of the linear layers: Permutation, Reverse, LULinear."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import exactflow as ef
from exactflow.transforms import LULinear, Permutation, Reverse
from tests.helpers import perturb

LAYERS: dict[str, Callable[[int], ef.Transform]] = {
    "permutation": lambda d: Permutation(d),
    "reverse": Reverse,
    "lu": LULinear,
    "lu_random_perm": lambda d: LULinear(d, permutation="random"),
}


def make(name: str, features: int, seed: int, dtype, device="cpu") -> ef.Transform:
    torch.manual_seed(seed)  # the random permutations
    return perturb(LAYERS[name](features), seed=seed).to(device=device, dtype=dtype)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("name", sorted(LAYERS))
def test_check_transform_at_random_parameters(name, seed, dtype, device):
    gen = torch.Generator().manual_seed(100 + seed)
    t = make(name, 5, seed, dtype, device)
    x = torch.randn(6, 5, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    report = ef.check_transform(t, x)
    assert report.ok, str(report)
    context = torch.randn(6, 3, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    assert ef.check_transform(t, x, context).ok
    torch.testing.assert_close(t(x, context)[0], t(x)[0])


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_check_transform_float32(name):
    t = make(name, 7, seed=5, dtype=torch.float32)
    report = ef.check_transform(t, torch.randn(5, 7))
    assert report.ok and report.dtype == torch.float32, str(report)


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(LAYERS))
def test_check_transform_on_cuda(name):
    t = make(name, 4, seed=3, dtype=torch.float64, device="cuda")
    assert ef.check_transform(t, torch.randn(5, 4, dtype=torch.float64, device="cuda")).ok


# -- Permutation and Reverse ----------------------------------------------------------------


def test_permutation_values_and_inverse():
    t = Permutation([2, 0, 1])
    x = torch.tensor([[10.0, 20.0, 30.0], [1.0, 2.0, 3.0]])
    z, ladj = t(x)
    assert torch.equal(z, torch.tensor([[30.0, 10.0, 20.0], [3.0, 1.0, 2.0]]))
    assert torch.equal(ladj, torch.zeros(2))
    x_back, ladj_inv = t.inverse(z)
    assert torch.equal(x_back, x) and torch.equal(ladj_inv, torch.zeros(2))


def test_permutation_seed_is_reproducible_and_stored_as_buffers():
    a, b = Permutation(9, seed=3), Permutation(9, seed=3)
    assert torch.equal(a.perm, b.perm)
    assert not torch.equal(a.perm, torch.arange(9)), "seed 3 should shuffle 9 features"
    state = a.state_dict()
    assert set(state) == {"perm", "inverse_perm"}
    c = Permutation(9, seed=4)
    c.load_state_dict(state)
    x = torch.randn(2, 9)
    assert torch.equal(c(x)[0], a(x)[0])


@pytest.mark.parametrize("perm", [[0, 0, 2], [1, 2, 3], [0, -1]])
def test_permutation_rejects_non_permutations(perm):
    with pytest.raises(ValueError, match="not a permutation"):
        Permutation(perm)


def test_reverse():
    x = torch.arange(10.0).reshape(2, 5)
    z, ladj = Reverse(5)(x)
    assert torch.equal(z, x.flip(-1)) and torch.equal(ladj, torch.zeros(2))
    assert torch.equal(Reverse(5).inverse(z)[0], x)


# -- LULinear -------------------------------------------------------------------------------


def test_lu_linear_is_the_affine_map_of_its_weight():
    t = perturb(LULinear(5, permutation=[3, 0, 4, 1, 2])).double()
    w = t.weight()
    lower = torch.tril(t.lower, -1) + torch.eye(5, dtype=torch.float64)
    upper = torch.triu(t.upper, 1) + torch.diag(t.log_diag.exp())
    perm_matrix = torch.eye(5, dtype=torch.float64)[t.perm]
    torch.testing.assert_close(w, perm_matrix @ lower @ upper)
    x = torch.randn(4, 5, dtype=torch.float64)
    z, ladj = t(x)
    torch.testing.assert_close(z, x @ w.T + t.bias)
    torch.testing.assert_close(ladj, torch.linalg.slogdet(w)[1].expand(4))
    x_back, ladj_inv = t.inverse(z)
    torch.testing.assert_close(x_back, torch.linalg.solve(w, (z - t.bias).T).T)
    torch.testing.assert_close(ladj_inv, -ladj)


def test_lu_linear_starts_at_its_permutation():
    x = torch.randn(3, 4)
    torch.testing.assert_close(LULinear(4)(x)[0], x)
    t = LULinear(4, permutation=[1, 2, 3, 0])
    torch.testing.assert_close(t(x)[0], x[:, [1, 2, 3, 0]])


def test_lu_linear_rejects_bad_permutations():
    with pytest.raises(ValueError, match="permutation must be"):
        LULinear(3, permutation="sorted")
    with pytest.raises(ValueError, match="not a permutation"):
        LULinear(3, permutation=[0, 1])
    with pytest.raises(ValueError, match="not a permutation"):
        LULinear(3, permutation=[0, 1, 1])


def test_lu_linear_state_dict_round_trip_and_gradients():
    a = perturb(LULinear(4, permutation="random"))
    b = LULinear(4)
    b.load_state_dict(a.state_dict())
    x = torch.randn(3, 4)
    torch.testing.assert_close(b(x)[0], a(x)[0])
    torch.testing.assert_close(b.inverse(x)[0], a.inverse(x)[0])
    z, ladj = a(x)
    (z.square().sum() - ladj.sum()).backward()
    for name in ("lower", "upper", "log_diag", "bias"):
        grad = getattr(a, name).grad
        assert grad is not None and grad.abs().sum() > 0, name


@given(
    name=st.sampled_from(sorted(LAYERS)),
    batch=st.integers(1, 9),
    features=st.integers(1, 6),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 2**16),
)
def test_shapes_dtypes_and_row_independence(name, batch, features, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    t = make(name, features, seed % 64, dtype)
    x = torch.randn(batch, features, generator=gen, dtype=torch.float64).to(dtype)
    z, ladj = t(x)
    assert z.shape == (batch, features) and ladj.shape == (batch,)
    assert z.dtype == dtype and ladj.dtype == dtype
    z_last, ladj_last = t(x[-1:])
    torch.testing.assert_close(z_last, z[-1:])
    torch.testing.assert_close(ladj_last, ladj[-1:])
    x_back, ladj_inv = t.inverse(z)
    assert x_back.shape == x.shape and ladj_inv.shape == (batch,) and x_back.dtype == dtype
    tol = 1e-3 if dtype == torch.float32 else 1e-9
    torch.testing.assert_close(x_back, x, atol=tol, rtol=tol)
    torch.testing.assert_close(ladj_inv, -ladj, atol=tol, rtol=tol)
