"""Tolerances and the closeness check shared by the tests."""

import pytest
import torch

# (rtol, atol) per dtype of the inputs, against a float64 reference computed from the same (rounded) inputs, so
# only the op's own rounding counts. atol is relative to the largest |reference| value of the tensor: a sum of
# K products carries an absolute error ~ eps * sqrt(K) * scale whatever the size of the single element.
# - float32: eps 1.2e-7; sums of <= a few hundred terms and fp32 softmax stay under 1e-5.
# - float16: outputs rounded to fp16 (eps 9.8e-4) and, on a GPU, fp32 side tensors in tf32 (10-bit mantissa).
# - bfloat16: unit roundoff u = 2^-8 = 3.9e-3 (eps 7.8e-3). rtol 2u: the output is rounded once (u), plus up to u
#   from a rounded 16-bit operand of the same sign. atol 3u: the GEMM operands the kernels hold in 16 bits (fc1's
#   GELU output and the gated u * g in forward; d(u * g) and fc2's input gradient in backward), each off by <= u
#   relative, whose errors add over a reduction as its terms do, to about u of the tensor's largest value per rounded
#   operand. Largest seen in these tests: 1.55u (dA of moe_lora: d(u * g) is rounded). test_ffn.py also holds the
#   kernels to torch's own bf16 FFN on the same inputs. On a CPU, Triton's interpreter computes bf16 as the GPU does
#   (tests/interpreter_bf16.py).
# The scale never goes below 1: the tests' intermediates are O(1), and where terms of that size cancel to an
# exact 0 in the reference (a softmax over one logit), the op is left with a rounding residue of eps * O(1).
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (2e-5, 2e-5),
    torch.float16: (4e-3, 2e-3),
    torch.bfloat16: (2 * 2**-8, 3 * 2**-8),
}
MIN_SCALE = 1.0


def tiny_vit(**kwargs):
    """A two-block 32x32 ViT-Tiny with 10 classes; kwargs override or add to timm.create_model's arguments."""
    import timm

    return timm.create_model("vit_tiny_patch16_224", **{"img_size": 32, "depth": 2, "num_classes": 10, **kwargs})


def tol(dtype: torch.dtype) -> tuple[float, float]:
    return TOLERANCES[dtype]


def assert_close(name: str, ref: torch.Tensor, out: torch.Tensor, dtype: torch.dtype | None = None,
                 rtol: float | None = None, atol: float | None = None, nonfinite: bool = False) -> None:
    """Elementwise |out - ref| <= atol * max|ref| + rtol * |ref|; on failure, say where and by how much.
    nonfinite: NaN and +-inf are expected, at exactly the reference's places; the finite rest is compared."""
    assert out is not None, f"{name}: no value (a gradient that was never computed?)"
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    if rtol is None:
        rtol, atol = tol(dtype if dtype is not None else out.dtype)
    ref64, out64 = ref.detach().double().cpu(), out.detach().double().cpu()
    if nonfinite:
        for what, where in (("NaN", torch.isnan), ("+inf", torch.isposinf), ("-inf", torch.isneginf)):
            assert torch.equal(where(ref64), where(out64)), (
                f"{name}: {what} at {torch.nonzero(where(out64))[:5].tolist()}, reference has it at "
                f"{torch.nonzero(where(ref64))[:5].tolist()}")
        finite = torch.isfinite(ref64)
        ref64, out64 = ref64[finite], out64[finite]
    assert torch.isfinite(out64).all(), f"{name}: non-finite values at {torch.nonzero(~torch.isfinite(out64))[:5]}"
    scale = ref64.abs().max().item() if ref64.numel() else 0.0
    err = (out64 - ref64).abs()
    bad = err > atol * max(scale, MIN_SCALE) + rtol * ref64.abs()
    if bad.any():
        first = torch.nonzero(bad)[:5].tolist()
        rel = (err / ref64.abs().clamp_min(1e-30)).max().item()
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{bad.numel()} elements off; max abs err {err.max().item():.3e} "
            f"(scale {scale:.3e}), max rel err {rel:.3e}, rtol={rtol}, atol={atol}*max(scale, 1); first bad {first}: "
            f"ref {[ref64[tuple(i)].item() for i in first]} out {[out64[tuple(i)].item() for i in first]}"
        )


# N/k/S/r configurations of DESIGN.md; N * r = 64 and (k + S) * r = 16 in all of them.
CONFIGS = [
    pytest.param((16, 4, 0, 4), id="16/4/0/4"),
    pytest.param((32, 8, 0, 2), id="32/8/0/2"),
    pytest.param((16, 3, 1, 4), id="16/3/1/4"),
    pytest.param((32, 6, 2, 2), id="32/6/2/2"),
    pytest.param((64, 12, 4, 1), id="64/12/4/1"),
]


def modes_for(num_shared: int) -> list[str]:
    """Gating modes valid for S shared experts ('none' is the S = 0 baseline)."""
    return ["adaptive", "naive"] if num_shared else ["adaptive", "naive", "none"]


def config_modes() -> list:
    """Every (configuration, mode) pair that the contract allows."""
    return [pytest.param(c.values[0], m, id=f"{c.id}-{m}") for c in CONFIGS for m in modes_for(c.values[0][2])]


def rounded(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t rounded to dtype and back in float64: an input that the op under test and the reference see alike."""
    return t.to(dtype).double()


def leaf(t: torch.Tensor, dtype: torch.dtype, device) -> torch.Tensor:
    """A fresh leaf copy of t in dtype on device, requiring grad."""
    return t.detach().to(device=device, dtype=dtype).clone().requires_grad_()


# every dtype the ops ship; the Triton interpreter computes bf16 as a GPU does (tests/interpreter_bf16.py)
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16"),
          pytest.param(torch.bfloat16, id="bf16")]


def routing_for(tokens: int, n: int, k: int, s: int, tasks: int = 2, d: int = 8):
    """A reference routing (float64 gates) of random tokens."""
    from ase_kernels import reference

    ids = torch.randint(0, tasks, (tokens,))
    return reference.route(torch.randn(tokens, d, dtype=torch.float64), torch.randn(tasks, n, d, dtype=torch.float64),
                           ids, top_k=k, num_shared=s)
