"""Shared fixtures: seeds, exact fp32 matmuls, and the backend under test.

Without a GPU, the Triton kernels run under Triton's interpreter: TRITON_INTERPRET must be set before the
first kernel is defined, so it is set here, at collection time; the interpreter is then taught bf16 as a GPU
computes it (tests/interpreter_bf16.py), so that the bf16 kernel tests run on a CPU too.
"""

import os
import random

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
if os.environ.get("TRITON_INTERPRET") == "1":
    # bf16 in the interpreter as on a GPU (dots of the values, not of their bit patterns; fp32 -> bf16 rounded to
    # nearest even): checked at install, loud if Triton changed (tests/interpreter_bf16.py)
    import interpreter_bf16

    interpreter_bf16.install()

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
KERNEL_BACKENDS = ("torch", "triton")


@pytest.fixture(autouse=True)
def _seed_and_exact_fp32():
    """Every test starts from the same seed, and fp32 matmuls are fp32 (no TF32) so tolerances mean what they say."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


@pytest.fixture(params=KERNEL_BACKENDS)
def backend(request, monkeypatch):
    """Runs the test once per fast backend (the reference is what they are compared with)."""
    monkeypatch.setenv("ASE_KERNELS_BACKEND", request.param)
    return request.param


@pytest.fixture
def pyedgeeval():
    """pyEdgeEval, the benchmark's edge matcher (the `eval` extra, which the `test` extra installs): a test that
    needs it is skipped with that reason where it is missing, and fails in CI (CI=true), which installs it."""
    import importlib.util

    if importlib.util.find_spec("pyEdgeEval") is None:
        message = "pyEdgeEval is not installed (pip install -e '.[eval]')"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"{message}: CI installs the test extra, which includes it")
        pytest.skip(message)
