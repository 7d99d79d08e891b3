"""Runs the docstring examples of every exactflow module as doctests.

Modules are found on disk (no import at collection), so a new module's examples are tested
as soon as the file exists. A module may be skipped only when importing it fails for want
of an optional third-party package.
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil
from pathlib import Path

import pytest
import torch

import exactflow

OPTIONS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def module_names() -> list[str]:
    names = ["exactflow"]

    def walk(path: Path, prefix: str) -> None:
        for info in pkgutil.iter_modules([str(path)]):
            name = f"{prefix}.{info.name}"
            names.append(name)
            if info.ispkg:
                walk(path / info.name, name)

    walk(Path(exactflow.__file__).parent, "exactflow")
    return sorted(names)


MODULES = module_names()


def test_modules_are_found():
    expected = ["core", "groundtruth", "distributions", "transforms.linear",
                "transforms.elementwise"]
    for name in expected:
        assert f"exactflow.{name}" in MODULES


@pytest.mark.parametrize("name", MODULES)
def test_doctests(name, monkeypatch, tmp_path):
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as err:
        if err.name is None or err.name.split(".")[0] == "exactflow":
            raise
        pytest.skip(f"{name} needs the optional package {err.name!r}")
    # Examples that write files write them into a fresh directory.
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=OPTIONS)
    # As doctest.testmod: the module's own objects, each example run in a copy of the
    # module's globals.
    tests = [t for t in finder.find(module, name) if t.examples]
    failures: list[str] = []
    for test in sorted(tests, key=lambda t: t.name):
        result = runner.run(test, out=failures.append)
        assert result.attempted == len(test.examples)
    assert not failures, "".join(failures)
