"""The guides' code runs as written: each ```python block of a guide in ``docs/``, in
order, in one namespace (a block may use what an earlier one defined)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"
#: The guides whose code blocks are whole programs, run top to bottom.
GUIDES = ["custom-layers.md"]


def blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def test_a_guide_without_code_blocks_is_not_listed():
    assert all(blocks((DOCS / name).read_text(encoding="utf-8")) for name in GUIDES)
    assert blocks("text\n```python\nx = 1\n```\nmore\n") == ["x = 1\n"]


@pytest.mark.parametrize("name", GUIDES)
def test_the_code_of_a_guide_runs(name, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": f"docs_{name}"}
    for i, code in enumerate(blocks((DOCS / name).read_text(encoding="utf-8"))):
        exec(compile(code, f"{name}, block {i + 1}", "exec"), namespace)  # noqa: S102
