"""Where the benchmark scripts write their tables (``benchmarks/results/<stem>.md/.json``),
and the name of the CPU they record beside them."""

from __future__ import annotations

import json
import platform
import sys
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


def publish(stem: str, lines: list[str], data: Any = None) -> Path:
    """A benchmark's table: ``lines`` joined, printed, and written by :func:`save`."""
    text = "\n".join(lines) + "\n"
    print(text)
    return save(stem, text, data)


def cpu_name() -> str:
    """The CPU model name (from ``/proc/cpuinfo`` where there is one)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def command(module: str, argv: list[str] | None = None) -> str:
    """The command line that reruns ``python -m benchmarks.<module>`` with ``argv`` (default:
    this process's arguments), as the result files record it."""
    return " ".join([f"python -m benchmarks.{module}", *(argv or sys.argv[1:])])
