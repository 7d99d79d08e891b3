"""Tests of the ground truth: jacobian, log_abs_det_jacobian and check_transform."""

from __future__ import annotations

import importlib
import json
import math
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn

import exactflow as ef
from tests.helpers import perturb

jacobian_module = importlib.import_module("exactflow.jacobians")
ROOT = Path(__file__).resolve().parents[1]


def textbook_map(x: Tensor) -> Tensor:
    """``(2 x0, x0^2 + 3 x1)``: J = [[2, 0], [2 x0, 3]], det = 6 everywhere."""
    return torch.stack([2 * x[..., 0], x[..., 0] ** 2 + 3 * x[..., 1]], -1)


def per_row_jacobian(fn, x: Tensor, context: Tensor | None = None) -> Tensor:
    """Reference: one torch.autograd.functional.jacobian per row."""
    rows = []
    for i in range(x.shape[0]):
        if context is None:
            rows.append(
                torch.autograd.functional.jacobian(lambda r: fn(r.unsqueeze(0))[0], x[i])
            )
        else:
            ci = context[i : i + 1]
            rows.append(
                torch.autograd.functional.jacobian(lambda r, ci=ci: fn(r.unsqueeze(0), ci)[0], x[i])
            )
    return torch.stack(rows)


# -- the worked numbers ---------------------------------------------------------------


def test_jacobian_of_3x_plus_2_is_3():
    jac = ef.jacobian(lambda x: 3 * x + 2, torch.tensor([0.7], dtype=torch.float64))
    assert jac.shape == (1, 1)
    torch.testing.assert_close(jac, torch.tensor([[3.0]], dtype=torch.float64))
    batched = ef.jacobian(lambda x: 3 * x + 2, torch.randn(5, 1, dtype=torch.float64))
    torch.testing.assert_close(batched, torch.full((5, 1, 1), 3.0, dtype=torch.float64))


def test_textbook_map_jacobian_det_and_log_det():
    x = torch.tensor([4.0, 1.0], dtype=torch.float64)
    jac = ef.jacobian(textbook_map, x)
    torch.testing.assert_close(jac, torch.tensor([[2.0, 0.0], [8.0, 3.0]], dtype=torch.float64))
    assert float(torch.linalg.det(jac)) == pytest.approx(6.0, rel=1e-12)
    ladj = ef.log_abs_det_jacobian(textbook_map, x)
    assert ladj.shape == ()
    assert float(ladj) == pytest.approx(math.log(6.0), rel=1e-12)
    assert float(ladj) == pytest.approx(1.7917594692, abs=1e-9)


# -- jacobian ---------------------------------------------------------------------------


def smooth_map(x: Tensor) -> Tensor:
    w = torch.linspace(-1.0, 1.0, x.shape[-1] ** 2, dtype=x.dtype).reshape(x.shape[-1], -1)
    return torch.tanh(x @ w.T) + x.roll(1, -1) * x


def branchy_map(x: Tensor) -> Tensor:
    # A data-dependent Python branch: vmap cannot trace it.
    if float(x.detach().sum()) > 0:
        return torch.sin(x) * 2.0
    return x**3


def test_vectorized_path_matches_per_row_autograd(monkeypatch):
    calls = []
    loop = jacobian_module._jacobian_loop
    monkeypatch.setattr(jacobian_module, "_jacobian_loop", lambda *a: calls.append(1) or loop(*a))
    x = torch.randn(6, 4, dtype=torch.float64)
    jac = ef.jacobian(smooth_map, x)
    assert not calls, "a vmap-traceable function should not take the fallback"
    assert jac.shape == (6, 4, 4)
    torch.testing.assert_close(jac, per_row_jacobian(smooth_map, x))


def test_fallback_path_for_untraceable_function_is_exact(monkeypatch):
    calls = []
    loop = jacobian_module._jacobian_loop
    monkeypatch.setattr(jacobian_module, "_jacobian_loop", lambda *a: calls.append(1) or loop(*a))
    x = torch.randn(8, 3, dtype=torch.float64)
    x[0] = x[0].abs() + 0.1  # both branches are taken
    x[1] = -x[1].abs() - 0.1
    with pytest.warns(RuntimeWarning, match="vmap could not trace the map .*row by row"):
        jac = ef.jacobian(branchy_map, x)
    assert calls, "a function with a data-dependent branch must take the fallback"
    positive = (x.sum(-1) > 0)[:, None]
    expected = torch.diag_embed(torch.where(positive, 2.0 * torch.cos(x), 3 * x**2))
    torch.testing.assert_close(jac, expected)


def test_fallback_for_item_matches_vectorized():
    def with_item(x: Tensor) -> Tensor:
        scale = x.abs().max().item()  # a Python float: vmap cannot trace .item()
        return smooth_map(x) + 0.0 * scale

    x = torch.randn(5, 3, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="row by row"):
        looped = ef.jacobian(with_item, x)
    torch.testing.assert_close(looped, ef.jacobian(smooth_map, x))


def test_rows_are_differentiated_in_chunks_with_the_same_numbers(monkeypatch):
    # (one vmap over every row held each row's intermediates once per output coordinate:
    # a 784-D spline coupling grew by 180 MB a row)
    x = torch.randn(7, 4, dtype=torch.float64)
    whole = ef.jacobian(smooth_map, x)
    sizes = []
    real_vmap = torch.func.vmap

    def spy(fn, *a, chunk_size=None, **kw):
        sizes.append(chunk_size)
        return real_vmap(fn, *a, chunk_size=chunk_size, **kw)

    monkeypatch.setattr(torch.func, "vmap", spy)
    monkeypatch.setattr(jacobian_module, "_CHUNK_NUMBERS", 3 * 16)
    chunked = ef.jacobian(smooth_map, x)
    assert sizes == [3]
    torch.testing.assert_close(chunked, whole, rtol=1e-13, atol=1e-13)


def test_a_map_that_fails_row_by_row_too_raises_its_error_without_the_fallback_warning():
    # (a train-mode BatchNorm's "needs at least 2 rows" came after a warning that vmap
    # could not trace the map and the loop would give "the same numbers")
    def broken(x: Tensor) -> Tensor:
        raise ValueError("this map needs at least 2 rows")

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="needs at least 2 rows"):
            ef.jacobian(broken, torch.randn(3, 2, dtype=torch.float64))


def test_an_allocation_failure_is_raised_not_retried_row_by_row(monkeypatch):
    # (any exception fell back to the per-row loop: out of memory too, silently and slower)
    calls = []
    monkeypatch.setattr(jacobian_module, "_jacobian_loop", lambda *a: calls.append(1))

    seen = []

    def hungry(x: Tensor) -> Tensor:
        seen.append(1)
        if len(seen) > 1:  # (the first call sizes the chunks; the vmap's calls fail)
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: "
                               "can't allocate memory: you tried to allocate 9 bytes")
        return smooth_map(x)

    with pytest.raises(RuntimeError, match="can't allocate memory"):
        ef.jacobian(hungry, torch.randn(3, 4, dtype=torch.float64))
    assert not calls


def test_a_module_in_training_mode_is_differentiated_in_eval_mode_and_left_as_it_was():
    # (a RealNVP's transform in training mode: "BatchNorm in training mode needs at least
    # 2 rows ... got a batch of 1" for 6 rows, where check_transform passed)
    torch.manual_seed(0)
    flow = perturb(ef.models.realnvp(4, layers=2, hidden=(8,)).double())
    x = torch.randn(6, 4, dtype=torch.float64)
    state = {k: v.clone() for k, v in flow.state_dict().items()}
    for fn in (flow.transform, flow.transform.inverse):
        got = ef.jacobian(fn, x)
        assert flow.transform.training and all(m.training for m in flow.transform.modules())
        flow.eval()
        torch.testing.assert_close(got, ef.jacobian(lambda v, fn=fn: fn(v)[0], x))
        flow.train()
    assert all(torch.equal(state[k], v) for k, v in flow.state_dict().items())


def test_unbatched_and_non_square():
    def f(x: Tensor) -> Tensor:  # R^3 -> R^2
        return torch.stack([x[..., 0] * x[..., 1], torch.sin(x[..., 2]) + x[..., 0]], -1)

    x = torch.randn(4, 3, dtype=torch.float64)
    jac = ef.jacobian(f, x)
    assert jac.shape == (4, 2, 3)
    zero = torch.zeros(4, dtype=torch.float64)
    expected = torch.stack(
        [
            torch.stack([x[:, 1], x[:, 0], zero], -1),
            torch.stack([torch.ones_like(zero), zero, torch.cos(x[:, 2])], -1),
        ],
        1,
    )
    torch.testing.assert_close(jac, expected)
    single = ef.jacobian(f, x[2])
    assert single.shape == (2, 3)
    torch.testing.assert_close(single, expected[2])
    with pytest.raises(ValueError, match="not square"):
        ef.log_abs_det_jacobian(f, x)


def test_context_rows_are_respected():
    def f(x: Tensor, c: Tensor) -> Tensor:
        return x * c[:, :1] + c[:, 1:] * x.roll(1, -1)

    x = torch.randn(5, 3, dtype=torch.float64)
    c = torch.randn(5, 2, dtype=torch.float64)
    jac = ef.jacobian(f, x, c)
    torch.testing.assert_close(jac, per_row_jacobian(f, x, c))
    eye = torch.eye(3, dtype=torch.float64)
    shift = eye.roll(1, 0)
    expected = c[:, 0, None, None] * eye + c[:, 1, None, None] * shift
    torch.testing.assert_close(jac, expected)
    # A single vector with a single context vector.
    torch.testing.assert_close(ef.jacobian(f, x[3], c[3]), expected[3])


def test_jacobian_rejects_bad_shapes():
    with pytest.raises(ValueError, match="shape"):
        ef.jacobian(smooth_map, torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="context"):
        ef.jacobian(lambda x, c: x * c, torch.randn(4, 3), torch.randn(3, 3))
    with pytest.raises(TypeError, match="torch.Tensor"):
        ef.jacobian(smooth_map, np.zeros((2, 3)))


# -- log_abs_det_jacobian -----------------------------------------------------------------


def test_log_abs_det_never_overflows_at_d_1000():
    d = 1000
    gen = torch.Generator().manual_seed(0)
    a = 10.0 * torch.eye(d, dtype=torch.float64) + 0.01 * torch.randn(
        d, d, generator=gen, dtype=torch.float64
    )
    assert torch.isinf(torch.linalg.det(a)), "the raw determinant (~1e1000) overflows float64"
    x = torch.randn(1, d, dtype=torch.float64)
    ladj = ef.log_abs_det_jacobian(lambda v: v @ a.T, x)
    assert ladj.shape == (1,)
    assert torch.isfinite(ladj).all()
    reference = np.linalg.slogdet(a.numpy())[1]
    assert float(ladj[0]) == pytest.approx(reference, abs=1e-8)
    assert float(ladj[0]) == pytest.approx(d * math.log(10.0), abs=1.0)


def test_log_abs_det_of_singular_map_is_minus_inf():
    def f(x: Tensor) -> Tensor:
        s = x[..., 0] + x[..., 1]
        return torch.stack([s, 2 * s], -1)

    ladj = ef.log_abs_det_jacobian(f, torch.randn(3, 2, dtype=torch.float64))
    assert ladj.shape == (3,)
    assert torch.isneginf(ladj).all()


def test_log_abs_det_matches_numpy_above_the_batched_limit():
    # Sizes on both sides of the one-at-a-time threshold give the same answer as numpy.
    for d in (8, 100, 160):
        a = torch.randn(d, d, dtype=torch.float64) / d**0.5 + torch.eye(d, dtype=torch.float64)
        scale = torch.randn(3, d, dtype=torch.float64) * 0.3
        x = torch.randn(3, d, dtype=torch.float64)
        ladj = ef.log_abs_det_jacobian(lambda v, c, a=a: (v @ a.T) * c.exp(), x, scale)
        mats = (scale.exp()[:, :, None] * a).numpy()
        np.testing.assert_allclose(ladj.numpy(), np.linalg.slogdet(mats)[1], atol=1e-9)


_SLOGDET_TRAP = r"""
import json, numpy as np, torch
import exactflow as ef
from tests.helpers import perturb

# The explicit call is what triggers the defect on some CPU builds (see DESIGN.md).
torch.set_num_threads(torch.get_num_threads())
gen = torch.Generator().manual_seed(0)
d, b = 256, 6
a = torch.randn(d, d, generator=gen, dtype=torch.float64) / d**0.5
a = a + torch.eye(d, dtype=torch.float64)
c = 0.3 * torch.randn(b, d, generator=gen, dtype=torch.float64)
x = torch.randn(b, d, generator=gen, dtype=torch.float64)
got = ef.log_abs_det_jacobian(lambda v, ctx: (v @ a.T) * ctx.exp(), x, c)
mats = c.exp()[:, :, None] * a
ref = np.linalg.slogdet(mats.numpy())[1]
raw = torch.linalg.slogdet(mats)[1].numpy()

t = ef.Compose(perturb(ef.transforms.LULinear(d).double(), scale=0.5 / d**0.5, seed=1),
               ef.transforms.Sigmoid())
report = ef.check_transform(t, x, raise_on_failure=False)
print(json.dumps({
    "file": ef.__file__,
    "error": float(np.abs(got.numpy() - ref).max()),
    "raw_batched_error": float(np.abs(raw - ref).max()),
    "check_ok": report.ok,
    "check": str(report),
}))
"""


def test_log_abs_det_right_after_set_num_threads_at_d_256():
    """Pins the batched-slogdet defect: run in a subprocess so the thread setting stays there."""
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, PYTHONPATH=path)
    proc = subprocess.run(
        [sys.executable, "-c", _SLOGDET_TRAP],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert Path(out["file"]).resolve().is_relative_to(ROOT), out["file"]
    # raw_batched_error shows whether this machine has the defect (informational only).
    assert out["error"] < 1e-8, (
        f"log_abs_det_jacobian is off by {out['error']:.3e} at d=256 "
        f"(batched torch.linalg.slogdet is off by {out['raw_batched_error']:.3e} here)"
    )
    assert out["check_ok"], out["check"]


# -- check_transform: what it must reject ---------------------------------------------------


class Scale(ef.Transform):
    """``z = a x`` elementwise, with a log-det that can be deliberately wrong."""

    def __init__(self, features: int, ladj_offset: float = 0.0, inverse_factor: float = 1.0,
                 flip_forward: bool = False, flip_inverse: bool = False):
        super().__init__()
        self.log_a = nn.Parameter(0.3 * torch.randn(features))
        self.ladj_offset = ladj_offset
        self.inverse_factor = inverse_factor
        self.signs = (-1.0 if flip_forward else 1.0, -1.0 if flip_inverse else 1.0)

    def forward(self, x, context=None):
        ladj = self.signs[0] * (self.log_a.sum() + self.ladj_offset)
        return x * self.log_a.exp(), ladj.expand(x.shape[0])

    def inverse(self, z, context=None):
        x = z * (-self.log_a).exp() * self.inverse_factor
        ladj = self.signs[1] * (-self.log_a.sum() - self.ladj_offset)
        return x, ladj.expand(z.shape[0])


class DenseLinear(ef.Transform):
    """``z = x A^T``; ``diagonal_log_det`` computes the log-det as if A were diagonal."""

    def __init__(self, a: Tensor, diagonal_log_det: bool = False):
        super().__init__()
        self.a = nn.Parameter(a)
        self.diagonal_log_det = diagonal_log_det

    def _ladj(self) -> Tensor:
        if self.diagonal_log_det:
            return self.a.diagonal().abs().log().sum()
        return torch.linalg.slogdet(self.a)[1]

    def forward(self, x, context=None):
        return x @ self.a.T, self._ladj().expand(x.shape[0])

    def inverse(self, z, context=None):
        return torch.linalg.solve(self.a, z.T).T, (-self._ladj()).expand(z.shape[0])


def x64(batch: int = 6, features: int = 3) -> Tensor:
    return torch.randn(batch, features, dtype=torch.float64)


def assert_fails(transform: ef.Transform, x: Tensor, check: str, context=None) -> ef.CheckReport:
    with pytest.raises(ef.CheckError) as info:
        ef.check_transform(transform, x, context)
    message = str(info.value)
    assert f"{check}:" in message, message
    assert "FAILED" in message
    report = info.value.report
    assert not report.ok
    assert any(f.startswith(f"{check}:") for f in report.failures)
    # The same report comes back without raising.
    quiet = ef.check_transform(transform, x, context, raise_on_failure=False)
    assert not quiet.ok and quiet.failures == report.failures
    return report


def test_correct_reference_transforms_pass():
    for t in (Scale(3), DenseLinear(torch.randn(3, 3, dtype=torch.float64) + 2 * torch.eye(3))):
        report = ef.check_transform(t.double(), x64())
        assert report.ok, str(report)
        assert set(report.errors) == {"log_det", "autograd", "round_trip", "inverse_log_det",
                                      "rows", "recording", "parameters"}
        assert report.errors["parameters"] < 1e-6


def test_log_det_off_by_a_constant_fails():
    report = assert_fails(Scale(3, ladj_offset=1e-3).double(), x64(), "log_det")
    assert report.errors["log_det"] == pytest.approx(1e-3, rel=1e-6)
    assert "1.000e-03" in str(report)


def test_full_matrix_with_diagonal_log_det_fails():
    a = torch.tensor([[2.0, 1.5, 0.0], [-1.0, 1.0, 0.5], [0.3, 0.0, 1.5]], dtype=torch.float64)
    assert abs(math.log(abs(float(torch.linalg.det(a)))) - float(a.diagonal().log().sum())) > 0.1
    assert_fails(DenseLinear(a, diagonal_log_det=True), x64(), "log_det")
    # Both directions use the diagonal (they agree with each other): each is judged
    # against the Jacobian, so both fail, and nothing else does.
    report = ef.check_transform(DenseLinear(a, True), x64(), raise_on_failure=False)
    assert [f.split(":")[0] for f in report.failures] == ["log_det", "inverse_log_det"]


def test_each_directions_log_det_is_judged_on_its_own_and_a_flipped_sign_is_named():
    # The forward's log-det with the sign flipped, the inverse's right: before, the inverse
    # failed too (it was compared with the forward's), and nothing said which was wrong.
    report = ef.check_transform(Scale(3, flip_forward=True).double(), x64(),
                                raise_on_failure=False)
    assert [f.split(":")[0] for f in report.failures] == ["log_det"]
    assert "sign flipped at every row: forward returns log|det dz/dx|" in report.failures[0]
    report = ef.check_transform(Scale(3, flip_inverse=True).double(), x64(),
                                raise_on_failure=False)
    assert [f.split(":")[0] for f in report.failures] == ["inverse_log_det"]
    assert "sign flipped at every row: inverse returns log|det dx/dz|" in report.failures[0]


def test_a_map_that_mixes_rows_is_named_without_a_crash_or_a_rounding_excuse():
    class Normalize(ef.Transform):  # batch statistics: one row alone has no variance
        def forward(self, x, context=None):
            var = x.var(0, unbiased=False)
            return (x - x.mean(0)) / var.sqrt(), (-0.5 * var.log().sum()).expand(len(x))

        def inverse(self, z, context=None):
            return z, torch.zeros(len(z), dtype=z.dtype)

    class Center(Normalize):  # one row alone: a zero Jacobian
        def forward(self, x, context=None):
            return x - x.mean(0), torch.zeros(len(x), dtype=x.dtype)

    for t in (Normalize(), Center()):
        report = ef.check_transform(t, 3 * x64() + 1, raise_on_failure=False)  # (it crashed)
        failed = {f.split(":")[0]: f for f in report.failures}
        assert "rows" in failed and "no mixing across dim 0" in failed["rows"]
        assert "a map that mixes rows has no Jacobian row by row" in failed["log_det"]
        assert not any("rounding alone" in f for f in report.failures)


def test_a_map_that_changes_from_call_to_call_is_named_as_such():
    # A layer with a call counter failed every check, "rows" and "recording" included,
    # and was called a map that mixes rows.
    class Drift(ef.Transform):
        def __init__(self):
            super().__init__()
            self.register_buffer("calls", torch.zeros((), dtype=torch.float64))

        def forward(self, x, context=None):
            self.calls += 1
            return x * (1 + 0.01 * self.calls), (x.shape[1] * torch.log1p(
                0.01 * self.calls)).expand(len(x))

        def inverse(self, z, context=None):
            return z / (1 + 0.01 * self.calls), (-z.shape[1] * torch.log1p(
                0.01 * self.calls)).expand(len(z))

    class Noisy(ef.Transform):
        def forward(self, x, context=None):
            return x + 1e-4 * torch.randn_like(x), torch.zeros(len(x), dtype=x.dtype)

        def inverse(self, z, context=None):
            return z, torch.zeros(len(z), dtype=z.dtype)

    for layer, state in ((Drift(), "calls (by up to 1.000e+00)"), (Noisy(), None)):
        report = ef.check_transform(layer, x64(), raise_on_failure=False)
        assert [f.split(":")[0] for f in report.failures] == ["repeat"]
        assert "changes from call to call" in report.failures[0]
        assert (f"a call changed its state: {state}" in report.failures[0]) == (state is not None)
    drifted = Drift()  # (the checked layer's state is put back afterwards)
    ef.check_transform(drifted, x64(), raise_on_failure=False)
    assert drifted.calls == 0


def test_wrong_inverse_fails():
    report = assert_fails(Scale(3, inverse_factor=1.001).double(), x64(), "round_trip")
    assert report.errors["round_trip"] > 1e-4


def test_inverse_log_det_with_wrong_sign_fails():
    class WrongSign(Scale):
        def inverse(self, z, context=None):
            x, ladj = super().inverse(z, context)
            return x, -ladj

    assert_fails(WrongSign(3).double(), x64(), "inverse_log_det")


def test_nan_output_fails():
    class NaNs(Scale):
        def forward(self, x, context=None):
            z, ladj = super().forward(x, context)
            return torch.where(x > 0, z, torch.nan), ladj

    x = x64()
    x[0, 0] = -1.0
    report = assert_fails(NaNs(3).double(), x, "finite")
    assert "NaN" in report.failures[0]


def test_wrong_log_det_shape_fails():
    class Keepdim(Scale):
        def forward(self, x, context=None):
            z, ladj = super().forward(x, context)
            return z, ladj[:, None]

    assert_fails(Keepdim(3).double(), x64(), "log_det_shape")

    class Scalar(Scale):
        def forward(self, x, context=None):
            z, ladj = super().forward(x, context)
            return z, ladj[0]

    assert_fails(Scalar(3).double(), x64(), "log_det_shape")


@pytest.mark.parametrize("how", ["collapse", "detach", "round"])
def test_singular_or_untraceable_maps_fail(how):
    """A Jacobian with log|det| = -inf fails, though an infinite truth would make the
    relative tolerance infinite too."""

    class Broken(Scale):
        def forward(self, x, context=None):
            z, ladj = super().forward(x, context)
            if how == "collapse":  # z = (x0, x0, x2): not invertible
                z = torch.stack([z[:, 0], z[:, 0], z[:, 2]], 1)
            elif how == "detach":
                z = z.detach()
            else:  # a coordinate through round: a zero derivative
                z = torch.cat([torch.round(z[:, :1]), z[:, 1:]], 1)
            return z, ladj

    report = assert_fails(Broken(3).double(), x64(), "log_det")
    assert "singular in 6 of 6 rows" in report.failures[0]
    assert report.errors["log_det"] == math.inf


def test_a_jacobian_that_is_nan_fails_and_says_so():
    class Kink(Scale):  # the same values, but sqrt's derivative at 0 makes the Jacobian NaN
        def forward(self, x, context=None):
            z, ladj = super().forward(x, context)
            return z + 0 * torch.sqrt(x - x), ladj

    report = assert_fails(Kink(3).double(), x64(), "log_det")
    assert "NaN in 6 of 6 rows: the map is not differentiable there" in report.failures[0]


def test_check_transform_rejects_bad_x():
    with pytest.raises(ValueError, match="batch, features"):
        ef.check_transform(Scale(3), torch.randn(3))
    with pytest.raises(ValueError, match="batch, features"):
        ef.check_transform(Scale(3), np.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"x is torch.float32 but Scale's parameters are "
                                         r"torch.float64.*transform.double\(\)"):
        ef.check_transform(Scale(3).double(), torch.randn(4, 3))
    with pytest.raises(ValueError, match="x has no rows: a check on an empty batch proves"):
        ef.check_transform(Scale(3).double(), torch.randn(0, 3, dtype=torch.float64))
    maf = ef.transforms.MaskedAffineAutoregressive(3, hidden=(8,), context=2).double()
    with pytest.raises(ValueError, match="context is torch.float32 but MaskedAffine"):
        ef.check_transform(maf, x64(), torch.randn(len(x64()), 2))
    with pytest.raises(ValueError, match="x must be floating point .* got torch.int64"):
        ef.check_transform(ef.transforms.Reverse(3), torch.ones(4, 3, dtype=torch.long))
    with pytest.raises(TypeError, match=r"got Flow; for a flow, check its transform: "
                                        r"check_transform\(flow.transform, x\[, "):
        ef.check_transform(ef.models.maf(3), torch.randn(4, 3))
    with pytest.raises(TypeError, match="got Linear; subclass ef.Transform"):
        ef.check_transform(nn.Linear(3, 3), torch.randn(4, 3))


def test_the_check_runs_in_eval_mode_and_leaves_the_transform_as_it_was():
    # ActNorm initialized itself on the check's points; BatchNorm in training mode updated
    # its running statistics and then failed with "a batch of 1" (the per-row Jacobian).
    x = 3 * x64() + 2
    act = ef.transforms.ActNorm(3).double()
    assert ef.check_transform(act, x).ok
    assert not bool(act.initialized) and act.training and not act.bias.detach().any()
    norm = perturb(ef.transforms.BatchNorm(3).double(), 0.5, seed=4)
    with torch.no_grad():
        norm.running_var.uniform_(0.5, 2.0)
    before = {k: v.clone() for k, v in norm.state_dict().items()}
    assert ef.check_transform(norm, x).ok and norm.training
    assert all(torch.equal(v, before[k]) for k, v in norm.state_dict().items())

    class Counting(Scale):  # a layer of one's own that changes its state in a call
        def __init__(self, features):
            super().__init__(features)
            self.register_buffer("calls", torch.zeros((), dtype=torch.float64))

        def forward(self, x, context=None):
            self.calls += 1
            return super().forward(x, context)

    counting = Counting(3).double()
    with pytest.warns(RuntimeWarning, match="vmap could not trace .* in-place"):
        ef.check_transform(counting, x64())
    assert float(counting.calls) == 0.0


def test_a_transform_without_inverse_is_named():
    class ForwardOnly(ef.Transform):
        features = 3

        def forward(self, x, context=None):
            return 2 * x, x.new_full(x.shape[:1], 3 * math.log(2))

    with pytest.raises(NotImplementedError, match="ForwardOnly has no inverse: pass "
                                                  "check_inverse=False"):
        ef.check_transform(ForwardOnly(), x64())
    assert ef.check_transform(ForwardOnly(), x64(), check_inverse=False).ok
    with pytest.raises(NotImplementedError, match="ForwardOnly has no inverse: it cannot map "
                                                  "latent points to data"):
        ef.Flow(ForwardOnly(), ef.StandardNormal(3)).sample(3)  # a flow samples through it


def test_tolerances_can_be_overridden():
    t = Scale(3, ladj_offset=1e-3).double()
    assert ef.check_transform(t, x64(), atol=1e-2, check_inverse=False).ok
    exact = ef.check_transform(ef.transforms.Reverse(3), x64(), atol=0.0, rtol=0.0)
    assert exact.ok, str(exact)


# -- check_transform on a user's conditional transform ----------------------------------------


class ConditionalAffine(ef.Transform):
    """``z = x * exp(tanh(c W_s)) + c W_t``: a user's conditional transform."""

    def __init__(self, features: int, context: int, ignore_context_in_log_det: bool = False):
        super().__init__()
        self.scale = nn.Linear(context, features)
        self.shift = nn.Linear(context, features)
        self.ignore = ignore_context_in_log_det

    def _log_scale(self, context: Tensor) -> Tensor:
        if self.ignore:
            return torch.tanh(self.scale.bias).expand(context.shape[0], -1)
        return torch.tanh(self.scale(context))

    def forward(self, x, context=None):
        s = torch.tanh(self.scale(context))
        return x * s.exp() + self.shift(context), self._log_scale(context).sum(-1)

    def inverse(self, z, context=None):
        s = torch.tanh(self.scale(context))
        return (z - self.shift(context)) * (-s).exp(), -self._log_scale(context).sum(-1)


@pytest.mark.parametrize("dtype_", [torch.float64, torch.float32])
def test_user_conditional_transform(dtype_):
    t = perturb(ConditionalAffine(3, 2)).to(dtype_)
    x = torch.randn(7, 3, dtype=dtype_)
    c = torch.randn(7, 2, dtype=dtype_)
    report = ef.check_transform(t, x, c)
    assert report.ok and report.dtype == dtype_
    broken = perturb(ConditionalAffine(3, 2, ignore_context_in_log_det=True)).to(dtype_)
    assert_fails(broken, x, "log_det", context=c)


def test_check_report_reads_well():
    report = ef.check_transform(perturb(ef.transforms.LULinear(3).double()), x64(4, 3))
    text = str(report)
    assert text.startswith("check_transform(LULinear) on 4 x 3 float64: OK")
    for key in ("log_det", "round_trip", "inverse_log_det"):
        assert key in text


@pytest.mark.parametrize("traceable", [True, False])
@pytest.mark.filterwarnings("ignore:jacobian. torch.func.vmap could not trace")
def test_create_graph(traceable):
    log_a = nn.Parameter(torch.randn(3, dtype=torch.float64))

    def f(x: Tensor) -> Tensor:
        if not traceable:
            float(x.detach().sum())  # forces the per-row fallback
        return torch.sin(x) * log_a.exp()

    x = torch.randn(4, 3, dtype=torch.float64)
    constant = ef.jacobian(f, x)
    assert not constant.requires_grad
    jac = ef.jacobian(f, x, create_graph=True)
    torch.testing.assert_close(jac, constant)
    jac.diagonal(dim1=-2, dim2=-1).sum().backward()
    # d/da sum_b sum_i cos(x_bi) exp(a_i) = exp(a_i) sum_b cos(x_bi)
    torch.testing.assert_close(log_a.grad, log_a.exp().detach() * torch.cos(x).sum(0))
    ladj = ef.log_abs_det_jacobian(f, x, create_graph=True)
    assert ladj.requires_grad
    assert not ef.log_abs_det_jacobian(f, x).requires_grad


# -- what a right log-det alone does not prove ------------------------------------------


class Shift(ef.Transform):
    """``z = x + b``, with one deliberate defect switched on by ``bug``."""

    def __init__(self, features: int = 3, bug: str = "", context: int = 0):
        super().__init__()
        self.features, self.context_features = features, context
        self.b = nn.Parameter(torch.randn(features, dtype=torch.float64))
        self.bug = bug

    def _shift(self, x: Tensor, context: Tensor | None) -> Tensor:
        b = self.b
        if self.bug == "recording" and torch.is_grad_enabled():
            b = b + 0.1  # the training path shifts by another amount
        if context is not None:
            c = context.flip(0) if self.bug == "context_rows" else context
            b = b + c.sum(1, keepdim=True)
        return b

    def forward(self, x, context=None):
        ladj = x.new_zeros(x.shape[0])
        if self.bug == "in_place" and not torch.is_grad_enabled():
            return x.add_(self._shift(x, context)), ladj
        z = x + self._shift(x, context)
        if self.bug == "rows":
            z = z.flip(0)
        if self.bug == "dtype":
            return z.float(), ladj.float()
        return z, ladj

    def inverse(self, z, context=None):
        if self.bug == "rows":
            z = z.flip(0)
        if self.bug == "in_place" and not torch.is_grad_enabled():
            return z.sub_(-self._shift(z, context)), z.new_zeros(z.shape[0])  # wrong: adds
        return z - self._shift(z, context), z.new_zeros(z.shape[0])


def test_the_shift_passes_without_a_defect():
    c = x64(6, 2)
    assert ef.check_transform(Shift(), x64()).ok
    assert ef.check_transform(Shift(context=2), x64(), c).ok


def test_a_layer_writing_into_its_input_fails_and_leaves_the_callers_points():
    # Computing in place, the wrong inverse gave back the very storage it was handed, so
    # the round trip compared x with itself and passed.
    x = x64()
    kept = x.clone()
    report = assert_fails(Shift(bug="in_place"), x, "in_place")
    assert "forward changed its input in place" in report.failures[0]
    assert torch.equal(x, kept)


def test_rows_mixed_across_the_batch_fail():
    # Reversing the rows (dim 0 instead of the features) keeps every log-det right.
    report = assert_fails(Shift(bug="rows"), x64(), "rows")
    assert any("forward and inverse give a row other values alone" in failure
               for failure in report.failures)
    # So does pairing each row with another row's context.
    report = assert_fails(Shift(bug="context_rows", context=2), x64(), "rows", x64(6, 2))
    assert "rows must be mapped independently" in report.failures[0]


def test_a_dependence_hidden_from_autograd_fails_against_finite_differences():
    # (a planar map whose inner product goes through .detach(), with a log-det of 0 to
    # match: the autograd Jacobian agreed, so every check passed; the true log-det differs
    # by up to 0.4 nats)
    class Detached(ef.Transform):
        def __init__(self):
            super().__init__()
            gen = torch.Generator().manual_seed(0)
            self.w = torch.nn.Parameter(torch.randn(3, generator=gen, dtype=torch.float64))
            self.u = torch.nn.Parameter(0.5 * torch.randn(3, generator=gen,
                                                          dtype=torch.float64))

        def forward(self, x, context=None):
            return x + self.u * torch.tanh(x.detach() @ self.w)[:, None], x.new_zeros(len(x))

        def inverse(self, z, context=None):  # (a fixed point: not needed for this check)
            x = z
            for _ in range(200):
                x = z - self.u * torch.tanh(x @ self.w)[:, None]
            return x, z.new_zeros(len(z))

    report = assert_fails(Detached(), x64(), "autograd")
    assert report.errors["log_det"] == 0.0  # (the brute force alone agrees)
    assert "part of the output does not reach autograd (a .detach()" in report.failures[0]
    float32 = ef.check_transform(Detached().float(), x64().float(), raise_on_failure=False)
    assert "autograd" not in float32.errors  # (float64 only: differences need its digits)


def test_a_training_path_that_differs_from_the_scoring_path_fails():
    report = assert_fails(Shift(bug="recording"), x64(), "recording")
    assert "while autograd records (training)" in report.failures[0]
    assert report.errors["recording"] == pytest.approx(0.1)


def test_an_output_in_another_dtype_fails():
    report = assert_fails(Shift(bug="dtype"), x64(), "dtype")
    assert "torch.float32 values" in report.failures[0]


def test_an_inverse_that_refuses_forwards_output_fails_as_a_check():
    # Sigmoid saturates to exactly 1.0 at x = 40 in float64; its inverse refuses 1.0.
    x = torch.tensor([[0.5], [40.0]], dtype=torch.float64)
    report = assert_fails(ef.transforms.Sigmoid(1).double(), x, "round_trip")
    assert any("the inverse refused forward's output" in f for f in report.failures)


def test_failures_at_ill_conditioned_points_say_what_rounding_can_explain():
    # A right layer whose scale of e^-20 makes z = 5 + tiny: x's digits are lost in z.
    t = ef.transforms.ElementwiseAffine(2).double()
    with torch.no_grad():
        t.log_scale.fill_(-20.0)
        t.shift.fill_(5.0)
    report = ef.check_transform(t, x64(8, 2), raise_on_failure=False)
    assert [f.split(":")[0] for f in report.failures] == ["round_trip"]
    assert "rounding alone can reach about" in report.failures[0]
    # Weights of N(0, 1) in a spline autoregressive layer: condition numbers near 1e18.
    # Every failure leads with rounding; the reasons that would blame the code come after.
    torch.manual_seed(0)
    t = ef.transforms.SplineAutoregressive(7, hidden=8, context=2).double()
    with torch.no_grad():
        for p in t.parameters():
            p.normal_()
    report = ef.check_transform(t, x64(12, 7), torch.randn(12, 2, dtype=torch.float64),
                                raise_on_failure=False)
    failed = {f.split(":")[0]: f for f in report.failures}
    assert {"round_trip", "inverse_log_det"} <= set(failed)
    assert all("rounding alone can reach about" in f for f in failed.values())
    for key in {"rows", "recording"} & set(failed):
        assert failed[key].index("rounding alone") < failed[key].index(
            "if it fails at such points too: inverse gives")
    # A wrong formula at well-conditioned points gets no such excuse.
    report = assert_fails(Scale(3, ladj_offset=0.5).double(), x64(), "log_det")
    assert "rounding alone" not in str(report)


def test_the_identity_warns_that_the_check_proves_little():
    with pytest.warns(UserWarning, match="is the identity at these parameters"):
        ef.check_transform(ef.transforms.ElementwiseAffine(3).double(), x64())
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ef.check_transform(perturb(ef.transforms.ElementwiseAffine(3).double()), x64())

    class SinhArcsinh(ef.Transform):  # the identity up to rounding at its start
        def __init__(self) -> None:
            super().__init__()
            self.features = 3
            self.skew = nn.Parameter(torch.zeros(3, dtype=torch.float64))

        def forward(self, x, context=None):
            u = torch.asinh(x) + self.skew
            return torch.sinh(u), (torch.log(torch.cosh(u)) - 0.5 * torch.log1p(x * x)).sum(-1)

        def inverse(self, z, context=None):
            x = torch.sinh(torch.asinh(z) - self.skew)
            return x, -self.forward(x)[1]

    with pytest.warns(UserWarning, match="is the identity at these parameters"):
        ef.check_transform(SinhArcsinh(), x64())

    class Centered(ef.Transform):  # (buffers only: "random parameters" cannot help)
        def __init__(self) -> None:
            super().__init__()
            self.features = 3
            self.register_buffer("shift", torch.zeros(3, dtype=torch.float64))

        def forward(self, x, context=None):
            return x - self.shift, x.new_zeros(len(x))

        def inverse(self, z, context=None):
            return z + self.shift, z.new_zeros(len(z))

    with pytest.warns(UserWarning, match="it has no parameters: check it with other values "
                                         "in its buffers"):
        ef.check_transform(Centered(), x64())


def test_a_registered_map_with_summed_log_derivatives_is_named():
    class Summed(ef.transforms.monotonic.AffineMap):
        def forward(self, x, params):
            y, log_det = super().forward(x, params)
            return y, log_det.sum(-1)

    layer = ef.transforms.Coupling(4, Summed(), hidden=(8,)).double()
    with pytest.raises(ValueError, match=r"Summed.forward returned .* log-derivatives of shape "
                                         r"\(5,\).*one log-derivative per feature"):
        layer(x64(5, 4))


def test_a_nan_among_the_points_is_the_finite_check_not_an_in_place_write():
    x = x64()
    x[2, 1] = float("nan")
    report = ef.check_transform(perturb(ef.transforms.ElementwiseAffine(3).double()), x,
                                raise_on_failure=False)
    assert [f.split(":")[0] for f in report.failures] == ["finite"]


# -- the gradient with respect to the parameters ------------------------------------------


class DetachedLogDet(ef.Transform):
    """``z = x exp(s)`` with the right log-det value, detached from ``s``: every value
    checks, but training never sees the log-det's pull on ``s``."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.s = nn.Parameter(0.3 * torch.randn(features))

    def forward(self, x, context=None):
        return x * self.s.exp(), self.s.detach().sum().expand(x.shape[0])

    def inverse(self, z, context=None):
        return z * (-self.s).exp(), -self.s.sum().expand(z.shape[0])


class _WrongBackward(torch.autograd.Function):
    """``x * exp(s)`` whose hand-written gradient for ``s`` is half the true one."""

    @staticmethod
    def forward(x, s):
        return x * s.exp()

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[1], output)

    @staticmethod
    def backward(ctx, grad):
        s, out = ctx.saved_tensors
        return grad * s.exp(), 0.5 * (grad * out).sum(0)


class HandWrittenBackward(ef.Transform):
    """A fused pass whose backward halves the gradient of ``s`` (values all right)."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.s = nn.Parameter(0.3 * torch.randn(features))

    def forward(self, x, context=None):
        return _WrongBackward.apply(x, self.s), self.s.sum().expand(x.shape[0])

    def inverse(self, z, context=None):
        return z * (-self.s).exp(), -self.s.sum().expand(z.shape[0])


@pytest.mark.parametrize("layer, direction", [(DetachedLogDet, "forward"),
                                              (HandWrittenBackward, "forward")])
def test_a_gradient_that_training_would_get_wrong_fails_the_parameters_check(layer, direction):
    torch.manual_seed(0)
    report = assert_fails(layer(3).double(), x64(), "parameters")
    assert [f for f in report.failures if not f.startswith("parameters:")] == []
    assert re.search(f"the gradient of {direction}'s output and log-det with respect to the "
                     r"parameters differs from finite differences at [2-6] of 6 rows",
                     str(report)), str(report)


def test_the_parameters_check_is_float64_only_and_skips_layers_without_parameters():
    assert "parameters" not in ef.check_transform(DetachedLogDet(3), x64().float()).errors
    assert "parameters" not in ef.check_transform(ef.transforms.Reverse(3), x64()).errors


def test_one_row_within_a_step_of_a_kink_is_not_a_wrong_gradient():
    # a radial layer's log-det has a cone's kink at its centre: a row 1e-9 from it is not
    # differentiable there, the other rows are
    t = ef.transforms.Radial(3).double()
    with torch.no_grad():
        t.z0.copy_(torch.tensor([1.0, -1.0, 0.5])), t.raw_alpha.fill_(-1.0), t.raw_beta.fill_(2.0)
    x = torch.cat([t.z0.detach()[None] + 1e-9, x64()])
    from exactflow.jacobians import parameter_gap

    alone, _, _ = parameter_gap(t.forward, list(t.parameters()), x[:1])
    assert float(alone.max()) > 1e-3  # (that row differs: no gradient is defined there)
    report = ef.check_transform(t, x)  # ... and is left alone; the report shows the others'
    assert report.ok and report.errors["parameters"] < 1e-6


def test_columns_in_far_apart_units_get_finite_difference_steps_of_their_own_size():
    # (one step for the whole row, set by its largest value, moved a column in units of
    # 1e-6 by 5% of its range: "autograd" failed on a right flow, blaming a .detach())
    torch.manual_seed(0)
    x = torch.randn(64, 3, dtype=torch.float64) * torch.tensor([1e-6, 1e6, 1.0],
                                                              dtype=torch.float64)
    flow = ef.models.maf(3, layers=2, hidden=(16,), standardize=True).double()
    ef.prepare(flow, x)
    perturb(flow.transform, 0.3, seed=1)
    report = ef.check_transform(flow.transform, x[:8])
    assert report.ok and report.errors["autograd"] < 1e-5, str(report)


class DiagonalLogDet(ef.Transform):
    """``z = A x`` with ``A = [[2, 1], [1, 1]]`` (det 1), its log-det read off the
    diagonal (log 2)."""

    def forward(self, x, context=None):
        z = torch.stack([2 * x[:, 0] + x[:, 1], x[:, 0] + x[:, 1]], 1)
        return z, x.new_full(x.shape[:1], math.log(2))

    def inverse(self, z, context=None):
        x = torch.stack([z[:, 0] - z[:, 1], 2 * z[:, 1] - z[:, 0]], 1)
        return x, z.new_full(z.shape[:1], -math.log(2))


def test_a_failed_log_det_shows_the_layers_value_beside_autograds():
    report = ef.check_transform(DiagonalLogDet(), torch.randn(3, 2, dtype=torch.float64),
                                raise_on_failure=False)
    assert "(row 0: the layer's 0.693147, autograd's 0)" in report.failures[0]
    assert "(row 0: the layer's -0.693147, autograd's 0)" in report.failures[1]


class SignFlippedScale(ef.Transform):
    """``z = x exp(s)`` with the log-det's sign flipped: right only at ``s = 0``."""

    def __init__(self) -> None:
        super().__init__()
        self.s = nn.Parameter(torch.zeros(2))

    def forward(self, x, context=None):
        return x * self.s.exp(), -self.s.sum().expand(len(x))

    def inverse(self, z, context=None):
        return z * (-self.s).exp(), self.s.sum().expand(len(z))


def test_a_layer_at_the_identity_inside_a_chain_is_named():
    # (the chain is not the identity, so the whole-transform warning never came, and the
    # wrong layer passed unseen)
    chain = ef.Compose(perturb(ef.transforms.LULinear(2), 0.3, seed=0), SignFlippedScale())
    with pytest.warns(UserWarning, match=r"its layer 1 \(SignFlippedScale\) is the identity "
                                         r"at the points it receives"):
        assert ef.check_transform(chain.double(), x64(6, 2)).ok
    perturb(chain[1], 0.3, seed=1)
    assert not ef.check_transform(chain, x64(6, 2), raise_on_failure=False).ok


@pytest.mark.parametrize("far", [1e5, 1e6])
def test_a_far_row_does_not_coarsen_the_other_rows_finite_differences(far):
    # (a step set by the column's largest value failed right MAF, NSF and RealNVP layers)
    failed = []
    for name in ("maf", "nsf", "realnvp"):
        for seed in range(4):
            torch.manual_seed(seed)
            flow = getattr(ef.models, name)(4).double()
            perturb(flow, 0.1, seed=seed)
            x = torch.randn(16, 4, dtype=torch.float64)
            x[15, 0] = far
            report = ef.check_transform(flow.transform, x, raise_on_failure=False)
            failed += [f"{name} {seed}: {f[:60]}" for f in report.failures
                       if f.startswith("autograd")]
    assert not failed, failed


def test_each_parameter_gets_a_finite_difference_step_of_its_own_size():
    # (one step for all, set by a shift of -1e4, failed right coupling layers on data
    # around 1e4)
    torch.manual_seed(3)
    shift = ef.transforms.ElementwiseAffine(2)
    with torch.no_grad():
        shift.shift.fill_(-1e4)
    chain = ef.Compose(shift, perturb(ef.transforms.AffineCoupling(2, hidden=(16,)), 0.3, seed=3),
                       ef.transforms.Reverse(2),
                       perturb(ef.transforms.AffineCoupling(2, hidden=(16,)), 0.3, seed=4))
    x = 1e4 + torch.randn(16, 2, dtype=torch.float64)
    report = ef.check_transform(chain.double(), x, raise_on_failure=False)
    assert report.ok and report.errors["parameters"] < 1e-5, str(report)
