"""What a file claims, checked against what it holds, before anything is built from it:
checksums of model files and checkpoints, tensors that are views claiming more numbers
than they store, and a model config's sizes against the weights stored beside it."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from itertools import pairwise
from typing import Any

import torch

from .files import CheckpointError

__all__ = ["state_digest", "payload_digest", "check_dense", "check_sizes", "check_dtypes"]

#: The built-in flow builders, whose every layer holds ``features`` numbers or more.
BUILTIN_FLOWS = ("realnvp", "nice", "maf", "iaf", "nsf", "planar", "radial")


def state_digest(state: dict[str, torch.Tensor], config: str | None = None) -> str:
    """SHA-256 of every tensor's name, dtype, shape and bytes, in name order, after the
    builder ``config``'s JSON text where given: a changed byte in the weights or in the
    config (a bad disk, a bad copy) changes it."""
    digest = hashlib.sha256()
    if config is not None:
        digest.update(f"config|{len(config)}|{config}|".encode())
    for key in sorted(state):
        digest.update(f"{key}|".encode())
        _add_tensor(digest, state[key])
    return digest.hexdigest()


def _add_tensor(digest: Any, tensor: torch.Tensor) -> None:
    """Feed a tensor's dtype, shape and bytes (from the CPU, dense) to ``digest``."""
    t = tensor.detach().to("cpu").contiguous()
    digest.update(f"{t.dtype}|{tuple(t.shape)}|".encode())
    digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())


def payload_digest(payload: Any) -> str:
    """SHA-256 of a nest of dicts (by key), lists, tuples, tensors and plain values: a
    changed byte anywhere in a checkpoint changes it. Check the tensors with
    :func:`check_dense` first (a view's bytes are read in full)."""
    digest = hashlib.sha256()

    def walk(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            digest.update(b"T|")
            _add_tensor(digest, value)
        elif isinstance(value, dict):
            digest.update(f"D{len(value)}|".encode())
            for key in sorted(value, key=repr):
                digest.update(f"{key!r}:".encode())
                walk(value[key])
        elif isinstance(value, (list, tuple)):
            digest.update(f"L{len(value)}|".encode())
            for item in value:
                walk(item)
        else:
            digest.update(f"{type(value).__name__}|{value!r}|".encode())

    walk(payload)
    return digest.hexdigest()


def check_dense(name: str, payload: Any, where: str = "") -> None:
    """Refuse a tensor anywhere in ``payload`` that claims more numbers than its storage
    holds (an expanded view: ``torch.zeros(1).expand(10**9)`` is 4 bytes in a file and
    4 GB once copied)."""
    if isinstance(payload, torch.Tensor):
        what = where or "a tensor"
        if (payload.layout != torch.strided or payload.is_quantized
                or payload.device.type == "meta"):
            raise CheckpointError(f"{name!r} stores {what} as a {payload.layout} "
                                  f"{payload.device.type} tensor, which exactflow never writes "
                                  "(a damaged or tampered file)")
        stored = payload.untyped_storage().nbytes()
        reach = payload.storage_offset() + sum(
            (n - 1) * abs(step) for n, step in zip(payload.shape, payload.stride(), strict=True))
        if payload.numel() and ((reach + 1) * payload.element_size() > stored
                                or payload.numel() * payload.element_size() > stored):
            raise CheckpointError(
                f"{name!r} stores {what} as a view of {stored:,} bytes that claims "
                f"{payload.numel():,} numbers (a damaged or tampered file)")
    elif isinstance(payload, dict):
        for key, value in payload.items():
            check_dense(name, value, f"{where}[{key!r}]" if where else repr(key))
    elif isinstance(payload, (list, tuple)):
        for i, value in enumerate(payload):
            check_dense(name, value, f"{where}[{i}]")


def check_sizes(name: str, config: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> None:
    """Refuse a config whose sizes the stored weights cannot back, before building anything.

    Every layer holds at least one tensor and, in the built-in flows, at least ``features``
    numbers, and every conditioner at least ``hidden`` weights per layer: a config that
    claims more than the file holds was tampered with (or belongs to other weights), and
    building it could take unbounded memory and time.
    """
    numel = sum(int(torch.Size(s).numel()) for s in shapes.values())
    tensors = len(shapes)

    def size(key: str, value: Any, bound: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= bound:
            raise CheckpointError(
                f"{name!r} claims {key}={value!r} but holds only {tensors} tensors with "
                f"{numel} numbers in all: the config does not fit its weights (a damaged or "
                "tampered file)"
            )
        return value

    features = size("features", config.get("features", 1), max(numel, 1))
    layers = size("layers", config.get("layers", 1), max(tensors, 1))
    size("context", config.get("context", 0), numel)
    size("bins", config.get("bins", 1), numel)
    hidden = config.get("hidden", [])
    widths = hidden if isinstance(hidden, list) else [hidden]
    for width in widths:
        size("hidden", width, numel)
    if config.get("model") in BUILTIN_FLOWS:
        size("layers x features", layers * features, numel)
        for width in widths:
            size("layers x hidden", layers * width, numel)
    # Each weight matrix is stored whole: the product of two widths a network chains is
    # no more than the numbers stored (hidden=[40000, 40000] beside 40,000 numbers of pad
    # would build 1.6e9 of them).
    # The first layer takes the features (half of them in a coupling) and the context, the
    # last gives a spline's bins for each feature.
    inputs = max(1, features // 2) + int(config.get("context", 0) or 0)
    for a, b in pairwise([inputs, *widths] if widths else []):
        size("width x width", a * b, numel)
    if widths and "bins" in config:
        size("hidden x bins", widths[-1] * int(config.get("bins") or 1), numel)
    if config.get("model") in ("gaussian", "gmm"):
        _mixture_sizes(size, config, features, numel)
    base = config.get("base")
    if isinstance(base, dict):
        _mixture_sizes(size, base, features, numel, prefix="base ")
    elif base == "gaussian":
        size("base features x features", features * features, numel)
    embedding = config.get("embedding")
    if isinstance(embedding, dict):
        chain = [size("embedding context", embedding.get("context", config.get("context", 1)),
                      numel)]
        inner = embedding.get("hidden", [])
        for width in [*(inner if isinstance(inner, list) else [inner]),
                      embedding.get("features", 1)]:
            chain.append(size("embedding width", width, numel))
        for a, b in pairwise(chain):
            size("embedding width x width", a * b, numel)


def _mixture_sizes(size: Callable[[str, Any, int], int], config: dict[str, Any],
                   features: int, numel: int, prefix: str = "") -> None:
    """A Gaussian's or mixture's means and covariances: ``components x features`` numbers,
    times ``features`` for full covariances."""
    components = 1 if config.get("name", config.get("model")) == "gaussian" else size(
        f"{prefix}components", config.get("components", 4), numel)
    full = config.get("covariance", "full") != "diag"
    size(f"{prefix}components x features" + (" x features" if full else ""),
         components * features * (features if full else 1), numel)


def check_dtypes(name: str, expected: dict[str, torch.Tensor],
                 state: dict[str, torch.Tensor]) -> None:
    """Refuse stored tensors of a kind their place cannot hold: a complex or integer tensor
    where the model has floating weights, or an index or mask buffer in another dtype."""
    for key, want in expected.items():
        got = state[key].dtype
        ok = (
            not state[key].is_complex()
            and (state[key].is_floating_point() if want.is_floating_point() else got == want.dtype)
        )
        if not ok:
            kind = "a real floating tensor" if want.is_floating_point() else str(want.dtype)
            raise CheckpointError(
                f"{name!r} stores {key!r} as {got}, where the model holds {kind} (a damaged "
                "or tampered file)"
            )
