"""Where the benchmark scripts write their tables: ``benchmarks/results/<stem>.md/.json``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def save(stem: str, text: str, data: Any = None) -> Path:
    """Write ``text`` to ``results/<stem>.md`` and, unless ``data`` is None, ``data`` as JSON
    to ``results/<stem>.json``; returns the Markdown file's path."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{stem}.md"
    path.write_text(text)
    if data is not None:
        (RESULTS / f"{stem}.json").write_text(json.dumps(data, indent=1) + "\n")
    return path
