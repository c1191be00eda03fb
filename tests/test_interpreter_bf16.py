"""tests/interpreter_bf16.py, the harness's bf16 patch of Triton's interpreter: it computes what a GPU computes, and
it refuses to install over an interpreter that changed, or that has been fixed."""

import os

import interpreter_bf16 as patch
import pytest
import torch
import triton
import triton.language as tl  # module-level: older interpreters look for it in a kernel's globals

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="the Triton interpreter runs only without a GPU (TRITON_INTERPRET=1)")


@pytest.fixture
def unpatched(monkeypatch):
    """Triton's interpreter builder as Triton ships it (monkeypatch restores the patched one afterwards)."""
    from triton.runtime.interpreter import InterpreterBuilder as builder

    assert patch.ORIGINALS, "conftest.py installs the patch"
    for name, original in patch.ORIGINALS.items():
        monkeypatch.setattr(builder, name, original)
    monkeypatch.setattr(builder, patch.MARK, False)
    return builder


def test_the_installed_patch_computes_bf16_as_a_gpu():
    from triton.runtime.interpreter import InterpreterBuilder

    assert getattr(InterpreterBuilder, patch.MARK) is True, "conftest.py installs the patch"
    patch._gpu_answers(*patch._run_probe(patch._probe_kernel()), "the installed patch")


def test_the_unpatched_interpreter_gets_bf16_wrong(unpatched):
    c, r = patch._run_probe(patch._probe_kernel())
    with pytest.raises(patch.InterpreterBF16Error, match="a bf16 tl.dot of exact values is off"):
        patch._gpu_answers(c, r, "unpatched")
    r_bits = r.view(torch.int16)[0, 0].item() & 0xFFFF
    assert r_bits == 0x3F80, "1 + 3 * 2^-9 truncated, where the GPU rounds it up to 0x3F81"


def test_install_refuses_a_fixed_interpreter(unpatched, monkeypatch):
    dot = unpatched.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):  # what a fixed Triton would do
        from triton.runtime.interpreter import TensorHandle

        def wide(h):
            return TensorHandle(patch._bf16_to_fp32(h.data), tl.float32) if h.dtype.scalar == tl.bfloat16 else h
        return dot(self, wide(a), wide(b), d, input_precision, max_num_imprecise_acc)

    monkeypatch.setattr(unpatched, "create_dot", create_dot)
    with pytest.raises(patch.InterpreterBF16Error, match="now multiplies bf16 correctly"):
        patch.install()
    assert getattr(unpatched, patch.MARK) is False


def test_install_refuses_changed_internals(unpatched, monkeypatch):
    monkeypatch.setattr(unpatched, "create_dot", lambda self, a, b, acc, precision: None)
    with pytest.raises(patch.InterpreterBF16Error, match="create_dot is .* expected"):
        patch.install()


def test_elementwise_bf16_arithmetic_is_refused():
    """The interpreter would add bf16 bit patterns as integers: the patch raises instead of returning garbage."""

    @triton.jit
    def add(x_ptr, out_ptr):
        offs = tl.arange(0, 16)
        x = tl.load(x_ptr + offs)
        tl.store(out_ptr + offs, x + x)

    x = torch.ones(16, dtype=torch.bfloat16)
    with pytest.raises(Exception, match="on bf16 values: Triton's interpreter would compute it on their bit"):
        add[(1,)](x, torch.empty_like(x))
