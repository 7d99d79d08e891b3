"""Test configuration: ``--device`` and ``--dtype`` options, per-test seeding, the gpu marker.

Run on another device or precision with ``pytest --device cuda`` or ``pytest --dtype float32``;
tests that need CUDA skip cleanly when it is not available. Shared helpers (``perturb``)
live in ``tests/helpers.py``.
"""

from __future__ import annotations

import os
import random
import zlib

import numpy as np
import pytest
import torch

try:
    from hypothesis import HealthCheck, settings
except ImportError:  # pragma: no cover - hypothesis is a dev dependency
    settings = None
else:
    # No per-example deadline: machines are shared and timings vary; Jacobian checks are
    # cubic in the dimension. The default profile is derandomized (the same verdict on
    # every run) with 30 examples per test to keep the suite fast;
    # HYPOTHESIS_PROFILE=explore draws 1000 fresh examples per test.
    settings.register_profile(
        "ci",
        deadline=None,
        max_examples=30,
        derandomize=True,
        database=None,
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow],
    )
    settings.register_profile(
        "explore",
        deadline=None,
        max_examples=1000,
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow],
    )
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

_DTYPES = {"float64": torch.float64, "float32": torch.float32}


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """One intra-op thread per test process.

    The models under test are small: they run fastest on one thread, and ``make test``
    runs two pytest-xdist workers on two cores, where more threads only contend.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("exactflow")
    group.addoption(
        "--device", default="cpu", help="torch device the tests run on (cpu, cuda, cuda:1...)"
    )
    group.addoption(
        "--dtype",
        default="float64",
        choices=sorted(_DTYPES),
        help="floating dtype of the Jacobian checks (float64 by default)",
    )


def _cuda_available() -> bool:
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _cuda_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA, which is not available")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def device(request: pytest.FixtureRequest) -> torch.device:
    """The device given by ``--device`` (skips when it is CUDA and CUDA is missing)."""
    dev = torch.device(request.config.getoption("--device"))
    if dev.type == "cuda" and not _cuda_available():
        pytest.skip("--device cuda given but CUDA is not available")
    return dev


@pytest.fixture(scope="session")
def dtype(request: pytest.FixtureRequest) -> torch.dtype:
    """The dtype given by ``--dtype`` (float64 by default)."""
    return _DTYPES[request.config.getoption("--dtype")]


@pytest.fixture(autouse=True)
def seed(request: pytest.FixtureRequest) -> int:
    """Seed torch, numpy and random per test, from the test's id.

    Every test sees the same random numbers whatever runs before it (in any order, under
    xdist too), and different tests see different ones.
    """
    value = zlib.crc32(request.node.nodeid.encode())
    torch.manual_seed(value)
    np.random.seed(value)
    random.seed(value)
    return value
