"""Model files: a flow's builder config (JSON) and its weights, in safetensors.

A model file is a `safetensors <https://huggingface.co/docs/safetensors>`_ file: a JSON
header naming every tensor with its dtype, shape and byte range, then the raw bytes. The
header's metadata holds the format, its version, the exactflow version, the builder
config as JSON text and a SHA-256 of the config and the weights (safetensors checks its
header's layout, not the bytes: a changed byte in either is refused). Nothing in the file
is ever executed: :func:`load` reads the header, checks that every size the config claims
is backed by weights in the file (a tampered ``layers=10**6`` or ``features=10**9`` is
refused before anything is built), rebuilds the model with
:func:`exactflow.models.build`, and checks every tensor's name and shape before copying
the weights in.

Files written by exactflow 0.1 (a ``torch.save`` archive of the config and the state dict)
still load: they are read with ``torch.load(weights_only=True)``, which refuses any pickle
that names code.

Only flows made by a builder (``flow.config`` set) can be saved: a hand-built flow has no
description that could be rebuilt without running code. Register your own builder with
:func:`exactflow.models.register`, or save only the weights with
``torch.save(flow.state_dict(), path)`` and rebuild the flow yourself.
"""

from __future__ import annotations

import json
import os
import struct
import zipfile
from pathlib import Path
from typing import Any

import torch

from .._version import __version__
from ..distributions import Flow
from ..models import build
from ..transforms.standardize import Standardize
from ..validation import device_named, not_a_flow, warn_user
from .files import CheckpointError, atomic_write_bytes, read_json_record, safe_torch_load
from .integrity import check_dense, check_dtypes, check_sizes, state_digest

__all__ = ["save", "load", "FORMAT_VERSION"]

#: The version of the model-file layout this exactflow writes; 1 was exactflow 0.1's
#: torch archive, 2 is safetensors.
FORMAT_VERSION = 2

_FORMAT = "exactflow"
#: The model file of a run folder, and that of run folders written by exactflow 0.1
#: (the same names as :data:`exactflow.runs.MODEL_FILE`; io sits below runs, so it names
#: them itself).
RUN_MODEL_FILES = ("model.safetensors", "model.pt")
#: A run folder's record (:data:`exactflow.runs.RUN_JSON`).
RUN_RECORD = "run.json"
# safetensors files start with an 8-byte header length, then the JSON header.
_MAX_HEADER = 100 * 1024 * 1024


def _nan_weights(state: dict[str, torch.Tensor]) -> str:
    """The names of the tensors of ``state`` holding a NaN (the first three), or ''."""
    bad = [k for k, v in state.items() if v.is_floating_point() and bool(torch.isnan(v).any())]
    return ", ".join(bad[:3]) + (", ..." if len(bad) > 3 else "")


def save(flow: Flow, path: str | os.PathLike[str]) -> Path:
    """Save a flow made by a builder: its JSON config and its weights, in safetensors.

    Written atomically (a crash never leaves a half-written file); tensors are stored on
    the CPU, in their own dtypes.

    Args:
        flow: a flow returned by a registered builder (``flow.config`` set).
        path: the file to write (``*.safetensors`` by convention; any name works).

    Returns:
        The path written, so ``ef.load(ef.save(flow, "model.safetensors"))`` works.

    Raises:
        TypeError: ``flow`` is not an :class:`exactflow.Flow`.
        ValueError: the flow has no builder config (built by hand), its config is not
            JSON-serializable, its weights do not fit that config, or some are NaN (files
            :func:`load` would refuse are not written).

    Example:
        >>> import os, tempfile, torch, exactflow as ef
        >>> flow = ef.models.planar(2, layers=2)
        >>> path = ef.save(flow, os.path.join(tempfile.mkdtemp(), "model.safetensors"))
        >>> x = torch.randn(3, 2)
        >>> torch.equal(ef.load(path).log_prob(x), flow.log_prob(x))
        True
    """
    from safetensors.torch import save as safetensors_bytes

    if not isinstance(flow, Flow):
        raise not_a_flow("save", flow)
    config = getattr(flow, "config", None)
    if not config:
        raise ValueError(
            "this flow has no builder config (flow.config is None: it was built by hand), so "
            "exactflow.load could not rebuild it without running code. Build it with an "
            "exactflow.models builder (e.g. ef.models.realnvp(...)) or register your own "
            "with exactflow.models.register, or save only its weights with "
            "torch.save(flow.state_dict(), path) and rebuild the flow yourself."
        )
    try:
        config_json = json.dumps(config, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise ValueError(f"flow.config must be JSON-serializable to be saved: {err}") from None
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in flow.state_dict().items()}
    bad = _nan_weights(state)
    if bad:  # (load refuses them: a file that cannot be loaded is not written)
        raise ValueError(
            f"the flow holds NaN weights ({bad}): it diverged, so it would score every row "
            "NaN; restore a good state (ef.fit keeps the best weights) before saving it"
        )
    with torch.random.fork_rng(devices=[]), torch.no_grad():  # what load will rebuild
        detail = _mismatch(build(config).state_dict(), state)
    if detail:
        raise ValueError(
            f"the flow's weights do not fit its builder config ({detail}): a layer or the "
            "embedding was replaced after the builder made the flow, so exactflow.load could "
            "not rebuild it. Give the builder the arguments that make it (e.g. embedding="
            "{...}), or save only its weights with torch.save(flow.state_dict(), path)."
        )
    metadata = {
        "format": _FORMAT,
        "version": str(FORMAT_VERSION),
        "exactflow_version": str(__version__),
        "config": config_json,
        "sha256": state_digest(state, config_json),
    }
    return atomic_write_bytes(path, safetensors_bytes(state, metadata=metadata))


def _mismatch(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor]) -> str:
    """What differs between two state dicts' names and shapes ("" where nothing does)."""
    want = {k: tuple(v.shape) for k, v in expected.items()}
    have = {k: tuple(v.shape) for k, v in found.items()}
    missing = sorted(set(want) - set(have))[:3]
    extra = sorted(set(have) - set(want))[:3]
    wrong = [k for k in want if k in have and want[k] != have[k]][:3]
    return "; ".join(part for part in (
        f"missing {missing}" if missing else "",
        f"unexpected {extra}" if extra else "",
        "wrong shapes " + ", ".join(f"{k} {have[k]} != {want[k]}" for k in wrong) if wrong
        else "",
    ) if part)


def _is_safetensors(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9:
        return False
    (size,) = struct.unpack("<Q", head[:8])
    return 0 < size <= _MAX_HEADER and head[8:9] == b"{"


def _run_record(run_dir: Path) -> dict[str, Any]:
    """A run folder's ``run.json``, or ``{}`` where there is none this module can read (the
    model then loads as it is)."""
    try:
        info = read_json_record(run_dir / RUN_RECORD)
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def _warn_if_dequantized(run_dir: Path, info: dict[str, Any]) -> None:
    """Warn when a run folder's model was trained on dequantized columns: its ``log_prob``
    of raw rows is not what the run scores."""
    data = info.get("data")
    columns = data.get("dequantized_columns") if isinstance(data, dict) else None
    if isinstance(columns, list) and columns:
        warn_user(
            f"the run {str(run_dir)!r} dequantized its integer-valued columns {columns} "
            "before training (uniform noise in [0, 1)): the loaded flow's log_prob of raw "
            "rows is its density at the integer points, not what `exactflow score` "
            "reports. `from exactflow.runs import load_run; load_run(run_dir).score(rows)` "
            "scores as the CLI does."
        )


def _model_file(path: Path, info: dict[str, Any]) -> Path:
    """``path`` itself, or the model file inside a run folder (``info``: its record)."""
    if not path.is_dir():
        return path
    for candidate in RUN_MODEL_FILES:
        if (path / candidate).is_file():
            return path / candidate
    status = info.get("status")
    if status in ("failed", "training"):
        what = ("failed: train it again with overwrite (--overwrite)" if status == "failed"
                else "has not finished: resume it (--resume) or train it again")
        raise CheckpointError(f"the run in {str(path)!r} {what}; it holds no model yet")
    raise CheckpointError(
        f"{str(path)!r} is a folder, not a model file, and holds no "
        f"{' or '.join(RUN_MODEL_FILES)} (as a run folder does): give the model file or a "
        "finished run folder"
    )


def _not_a_torch_file(path: Path) -> str | None:
    """What ``path`` looks like when it is clearly not a torch archive, else ``None``.

    A torch archive is a zip file (``PK``) or, from old torch versions, a pickle (first
    byte ``0x80``); anything else is named (text, a numpy array) instead of being handed
    to the unpickler, whose errors (``pop from empty list``) would say nothing useful.
    """
    with open(path, "rb") as f:
        head = f.read(4096)
    if head.startswith(b"PK"):
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError, ValueError):
            return None  # a damaged zip: torch's own error says more
        if names and all(n.endswith(".npy") and "/" not in n for n in names):
            return "a numpy .npz archive"
        return None
    if head.startswith(b"\x80"):
        return None
    if head.startswith(b"\x93NUMPY"):
        return "a numpy .npy array"
    try:
        if b"\x00" in head:  # (valid UTF-8, but no text holds NUL bytes)
            return "a binary file of an unknown format"
        head.decode("utf-8")
    except UnicodeDecodeError as err:
        if err.start < len(head) - 4:  # not just a character cut at the end of the block
            return "a binary file of an unknown format"
    return "a text file (a CSV?)" if b"," in head or b"\t" in head else "a text file"


def _read(path: Path, map_location: Any) -> tuple[dict[str, Any], dict[str, Any], str]:
    """``(config, tensors, damage)`` of a model file of either format, never running code:
    ``damage`` says how the config and tensors fail the checksum saved with them, '' where
    they pass (exactflow 0.1's files have none)."""
    name = str(path)
    if not path.exists():
        raise CheckpointError(f"no such model file: {name!r}")
    if not path.is_file():
        raise CheckpointError(f"model file {name!r} is not a regular file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"model file {name!r} is empty (an interrupted copy or write?)")
    if _is_safetensors(path):
        return _read_safetensors(path, map_location)
    looks_like = _not_a_torch_file(path)
    if looks_like is not None:
        raise CheckpointError(
            f"{name!r} is not an exactflow model file: it is {looks_like}; exactflow.load "
            "reads files written by exactflow.save (model.safetensors) and run folders"
        )
    payload = safe_torch_load(path, map_location=map_location, what="model file")
    if not isinstance(payload, dict) or payload.get("format") != _FORMAT:
        found = type(payload).__name__
        if isinstance(payload, dict):
            found = f"a dict with keys {sorted(map(str, payload))[:6]}"
        raise CheckpointError(
            f"{name!r} is not an exactflow model file (found {found}); "
            "exactflow.load reads files written by exactflow.save"
        )
    version = payload.get("version")
    if not isinstance(version, int):
        raise CheckpointError(f"{name!r} has no valid format version (got {version!r})")
    _check_version(name, version, payload.get("exactflow_version"))
    state = payload.get("state_dict")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{name!r} has no valid state_dict of tensors")
    check_dense(name, state)  # (a torch archive's tensor may be a view claiming more)
    config = _config(name, payload.get("config"))
    check_sizes(name, config, {key: tuple(t.shape) for key, t in state.items()})
    return config, state, ""


def _read_safetensors(path: Path, map_location: Any) -> tuple[dict, dict, str]:
    from safetensors import SafetensorError, safe_open

    name = str(path)
    device = "cpu" if map_location is None else str(torch.device(map_location))
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            if meta.get("format") != _FORMAT:
                raise CheckpointError(
                    f"{name!r} is a safetensors file but not an exactflow model file (its "
                    "metadata names no exactflow format); exactflow.load reads files written "
                    "by exactflow.save"
                )
            try:
                version = int(meta.get("version", ""))
            except ValueError:
                raise CheckpointError(f"{name!r} has no valid format version") from None
            _check_version(name, version, meta.get("exactflow_version"))
            config = _config(name, meta.get("config"))
            shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
            check_sizes(name, config, shapes)
            state = {key: f.get_tensor(key) for key in f.keys()}
            damage = _damage(meta, state)
            state = {key: t.to(device) for key, t in state.items()}
    except CheckpointError:
        raise
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(
            f"{name!r} is truncated or not a valid model file ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else 'unreadable'})"
        ) from None
    return config, state, damage


#: The exactflow that wrote model files whose checksum covers the weights alone, or that
#: have none (the development version before the checksum covered the config).
_WEIGHTS_ONLY_CHECKSUM = "0.2.0.dev0"


def _damage(meta: dict[str, str], state: dict[str, torch.Tensor]) -> str:
    """How a safetensors model file fails its checksum ('' where it does not)."""
    saved = meta.get("sha256")
    if meta.get("exactflow_version") == _WEIGHTS_ONLY_CHECKSUM:
        if saved is None or saved in (state_digest(state),
                                      state_digest(state, meta.get("config"))):
            return ""
    elif saved is None:
        return ("it has no checksum, which every file exactflow.save writes has (written "
                "otherwise, or its header edited)")
    elif saved == state_digest(state, meta.get("config")):
        return ""
    return ("its config and weights do not match the checksum saved with them (a changed "
            "byte, from a bad disk or copy)")


def _check_version(name: str, version: int, written_by: Any) -> None:
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{name!r} was written in exactflow model format version {version} "
            f"(by exactflow {written_by or '?'}); this exactflow reads versions up to "
            f"{FORMAT_VERSION}: upgrade exactflow to load it"
        )


def _config(name: str, text: Any) -> dict[str, Any]:
    try:
        config = json.loads(text)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{name!r} has no readable model config: {err}") from None
    if not isinstance(config, dict) or not isinstance(config.get("model"), str):
        raise CheckpointError(f"{name!r} has a model config without a builder name")
    return config


def load(path: str | os.PathLike[str], map_location: Any = "cpu") -> Flow:
    """Load a flow written by :func:`save` (or by exactflow 0.1); never executes code.

    Reads the config, checks its sizes against the stored weights, rebuilds the model
    with :func:`exactflow.models.build`, checks every tensor's name and shape, loads the
    weights and returns the flow in eval mode.

    Args:
        path: the model file, or a run folder (its ``model.safetensors``, or ``model.pt``
            in run folders of exactflow 0.1).
        map_location: the device to put the tensors on, default the CPU (``"auto"``: CUDA
            where there is one).

    Warns:
        UserWarning: ``path`` is a run folder that dequantized integer-valued columns (the
            flow's ``log_prob`` of raw rows is then not the run's score; see
            :meth:`exactflow.runs.Run.score`).

    Raises:
        ValueError: ``map_location`` is not a device name, or names a device this machine
            does not have.
        CheckpointError: the file is missing, empty, truncated or foreign (text, a numpy
            array); a folder without a model file; holds anything but tensors and plain
            types (e.g. a pickle with a code payload); was written by a newer exactflow
            format; names an unknown builder; has a config that its weights do not fit;
            holds NaN weights; or a config and weights that do not match the checksum saved
            with them (or no checksum).
    """
    if map_location == "auto":
        map_location = "cuda" if torch.cuda.is_available() else "cpu"
    if isinstance(map_location, (str, torch.device)):
        map_location = device_named(map_location, "map_location")
    elif map_location is not None:
        raise ValueError(f"map_location must be a device name ('cpu', 'cuda', 'cuda:N', 'mps' "
                         f"or 'auto'), got {type(map_location).__name__}: a model file holds "
                         "CPU tensors, put on that one device")
    path = Path(path)
    info = _run_record(path) if path.is_dir() else {}
    _warn_if_dequantized(path, info)
    path = _model_file(path, info)
    name = str(path)
    config, state, damage = _read(path, map_location)
    try:
        flow = build(config)
    except (ValueError, TypeError, RuntimeError, MemoryError) as err:
        raise CheckpointError(f"cannot rebuild the model saved in {name!r}: "
                              f"{' '.join(str(err).split())[:300]}") from None
    detail = _mismatch(flow.state_dict(), state)
    if detail:
        raise CheckpointError(
            f"the weights in {name!r} do not match its config {config!r}: {detail}"
        )
    bad = _nan_weights(state)
    if bad:
        raise CheckpointError(
            f"{name!r} holds NaN weights ({bad}): the model diverged before it was saved, or "
            "the file is damaged; it would score every row NaN"
        )
    check_dtypes(name, flow.state_dict(), state)
    if damage:  # (after the checks that say more about a file made otherwise)
        raise CheckpointError(
            f"{name!r} is damaged: {damage}; copy it again from a good source or train it "
            "again"
        )
    try:
        # assign=True keeps every tensor in the dtype it was saved in (a float64 model
        # loads as float64, not cast to the float32 it was rebuilt in).
        flow.load_state_dict(state, strict=True, assign=True)
    except (RuntimeError, TypeError, ValueError) as err:
        raise CheckpointError(
            f"the weights in {name!r} cannot be loaded into its model: "
            + " ".join(str(err).split())[:300]
        ) from None
    if state:
        flow.to(next(iter(state.values())).device)
    dtype = _model_dtype(flow)
    if dtype is not None:
        # Tensors that are not saved (a Standardize layer's output dtype) follow the weights.
        flow.to(dtype)
    return flow.eval()


def _model_dtype(flow: Flow) -> torch.dtype | None:
    """The floating dtype of a loaded model's weights and buffers; a Standardize layer's
    statistics, always float64, do not count. ``None`` when there are none."""
    fixed = {id(t) for m in flow.modules() if isinstance(m, Standardize)
             for t in (m.mean, m.std)}
    for tensor in (*flow.parameters(), *flow.buffers()):
        if tensor.is_floating_point() and id(tensor) not in fixed and tensor.numel():
            return tensor.dtype
    return None
