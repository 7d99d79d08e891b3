"""Saving and loading: model files (:mod:`~exactflow.io.modelfile`), the atomic, durable
file writes every part of exactflow uses (:mod:`~exactflow.io.files`), and tables of rows
written chunk by chunk in bounded memory (:mod:`~exactflow.io.tables`)."""

from .files import (
    CheckpointError,
    atomic_save,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_stream,
    atomic_write_text,
    json_safe,
    read_json_record,
    safe_torch_load,
    signals_deferred,
)
from .integrity import payload_digest, state_digest
from .modelfile import FORMAT_VERSION, load, save
from .tables import csv_rows, write_table

__all__ = [
    "save",
    "load",
    "FORMAT_VERSION",
    "CheckpointError",
    "atomic_save",
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_write_json",
    "atomic_write_stream",
    "write_table",
    "csv_rows",
    "json_safe",
    "read_json_record",
    "safe_torch_load",
    "signals_deferred",
    "state_digest",
    "payload_digest",
]
