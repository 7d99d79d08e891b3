"""Saving and loading: model files (:mod:`~exactflow.io.modelfile`) and the atomic, durable
file writes every part of exactflow uses (:mod:`~exactflow.io.files`)."""

from .files import (
    CheckpointError,
    atomic_save,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    json_safe,
    safe_torch_load,
)
from .modelfile import FORMAT_VERSION, load, save

__all__ = [
    "save",
    "load",
    "FORMAT_VERSION",
    "CheckpointError",
    "atomic_save",
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_write_json",
    "json_safe",
    "safe_torch_load",
]
