"""fp32 follows torch.get_float32_matmul_precision(), as torch.matmul does: IEEE fp32 dots at "highest" (torch's
default), TF32 tensor cores at "high" or "medium" (ase_kernels/kernels/common.py, dot_precision).

What a CPU run can and cannot show: the interpreter computes every tl.dot in fp32 whatever its input_precision,
so here the TF32 path is held to the TF32 tolerances and proven to run (the "tf32" kernels compile and execute),
but its rounding is not exercised; that it lands on the tensor cores is held by tests/test_targets.py, which
compiles fp32 with TF32 allowed (sm_80 in CI, every GPU in ``python -m bench.sweep_targets``) and finds MMA
instructions in every GEMM's main loop, and none in the IEEE variants (sm_86, sm_90, sm_120 in CI). The IEEE
path is held to fp32 tolerances by every fp32 test of the suite (conftest turns TF32 off).
"""

import pytest
import torch
from conftest import DEVICE
from helpers import assert_close, leaf, tol

import ase_kernels as ak
from ase_kernels import reference
from ase_kernels.kernels.common import dot_precision

# TF32 rounds each operand to 10 mantissa bits, as fp16 does (eps 9.8e-4), and keeps fp32's exponent range and fp32
# accumulation: fp16's tolerances (helpers.TOLERANCES) bound a TF32 dot of fp32 inputs.
TF32_RTOL, TF32_ATOL = tol(torch.float16)


@pytest.fixture
def matmul_precision():
    """Sets torch's float32 matmul precision for one test, then restores it."""
    before = torch.get_float32_matmul_precision()
    yield torch.set_float32_matmul_precision
    torch.set_float32_matmul_precision(before)


@pytest.mark.parametrize("setting,want", [("highest", "ieee"), ("high", "tf32"), ("medium", "tf32")])
def test_fp32_dots_follow_torch_matmul_precision(matmul_precision, setting, want):
    matmul_precision(setting)
    assert dot_precision(torch.empty(1, dtype=torch.float32)) == want
    # 16-bit inputs: their fp32 side tensors are exact in tf32, whatever the setting
    assert dot_precision(torch.empty(1, dtype=torch.bfloat16)) == "tf32"
    assert dot_precision(torch.empty(1, dtype=torch.float16)) == "tf32"


def test_allow_tf32_flag_is_the_same_setting(matmul_precision):
    """torch.backends.cuda.matmul.allow_tf32 = True is precision "high": the kernels then take TF32 too."""
    torch.backends.cuda.matmul.allow_tf32 = True
    assert dot_precision(torch.empty(1)) == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = False
    assert dot_precision(torch.empty(1)) == "ieee"


@pytest.mark.parametrize("setting", ["highest", "high"])
def test_fp32_ffn_and_router_within_their_precision(monkeypatch, matmul_precision, setting):
    """route + moe_lora_ffn in fp32 on the Triton kernels, forward and every gradient, against the float64
    reference: fp32 tolerances at "highest", TF32 tolerances at "high"."""
    monkeypatch.setenv("ASE_KERNELS_BACKEND", "triton")
    matmul_precision(setting)
    rtol, atol = tol(torch.float32) if setting == "highest" else (TF32_RTOL, TF32_ATOL)
    tokens, d, hidden, n, k, s, r = 37, 24, 96, 16, 3, 1, 4
    x, w = torch.randn(tokens, d), torch.randn(2, n, d) * 0.3
    a, b = torch.randn(n, r, d) * 0.3, torch.randn(n, d, r) * 0.3
    fc = [torch.randn(hidden, d) * d**-0.5, torch.randn(hidden), torch.randn(d, hidden) * hidden**-0.5,
          torch.randn(d)]
    ids = torch.tensor([0] * 20 + [1] * 17)
    outs = {}
    for name, dtype, device in (("ref", torch.float64, "cpu"), ("out", torch.float32, DEVICE)):
        xx, ww, aa, bb = (leaf(v, dtype, device) for v in (x, w, a, b))
        fcs = [leaf(v, dtype, device).requires_grad_(False) for v in fc]
        route = reference.route if name == "ref" else ak.route
        rt = route(xx, ww, ids.to(device), top_k=k, num_shared=s)
        ffn = reference.moe_lora_ffn if name == "ref" else ak.moe_lora_ffn
        y = ffn(xx, *fcs, aa, bb, rt, 1.5)
        (y * torch.linspace(-1, 1, d, dtype=dtype, device=device)).sum().add(ak.mi_loss(rt.prob_sums)).backward()
        outs[name] = dict(indices=rt.indices, y=y, gates=rt.gates, prob_sums=rt.prob_sums, dx=xx.grad, dw=ww.grad,
                          dA=aa.grad, dB=bb.grad)
    # random logits: no ties, so both pick the same experts
    assert torch.equal(outs["ref"].pop("indices"), outs["out"].pop("indices").cpu())
    for key, want in outs["ref"].items():
        assert_close(key, want, outs["out"][key], rtol=rtol, atol=atol)
