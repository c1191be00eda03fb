"""The examples in the public docstrings of ase_kernels (ops.py, modules.py, convert.py) run and print what they say."""

import doctest
import importlib

import pytest

# by name: ase_kernels.convert is also the name of the function the package exports
MODULES = [importlib.import_module(f"ase_kernels.{name}") for name in ("ops", "modules", "convert")]


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__)
def test_docstring_examples_run(module, monkeypatch):
    monkeypatch.delenv("ASE_KERNELS_BACKEND", raising=False)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0, f"{module.__name__} has no examples"
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples in {module.__name__} failed"
