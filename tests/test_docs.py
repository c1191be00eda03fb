"""The examples in the public docstrings of ase_kernels (ops.py, modules.py) run and print what they say."""

import doctest

import pytest

from ase_kernels import modules, ops


@pytest.mark.parametrize("module", [ops, modules], ids=lambda m: m.__name__)
def test_docstring_examples_run(module, monkeypatch):
    monkeypatch.delenv("ASE_KERNELS_BACKEND", raising=False)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0, f"{module.__name__} has no examples"
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples in {module.__name__} failed"
