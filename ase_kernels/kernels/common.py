"""Launch settings shared by the kernels: block sizes, dot precision, the split of token reductions."""

import functools
import os

import torch


def interpreting() -> bool:
    """True when TRITON_INTERPRET=1 runs the kernels on the CPU with numpy."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) on the host. triton.cdiv and triton.next_power_of_2 are constexpr functions whose wrapper costs
    several microseconds per call, and the launchers make dozens of calls per layer."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def next_block(n: int, minimum: int = 16) -> int:
    """Smallest power of two >= n and >= minimum: tl.dot needs every tile dimension >= 16."""
    return max(minimum, next_power_of_2(max(n, 1)))


def dot_precision(x: torch.Tensor) -> str:
    """fp32 inputs get full-precision dots (no silent tf32); 16-bit inputs accumulate fp32 side tensors in tf32,
    whose 10-bit mantissa holds fp16 and bf16 operands exactly."""
    return "ieee" if x.dtype in (torch.float32, torch.float64) else "tf32"


# One small named table of launch settings, keyed by kernel. BLOCK_T=64 rows fill an MMA tile on Ampere/Hopper;
# the interpreter runs one numpy program per block, so it gets larger blocks to keep tests fast.
_GPU_CONFIGS = {
    "route": dict(BLOCK_T=64, BLOCK_D=64, num_warps=4),
    "shrink": dict(BLOCK_T=64, BLOCK_K=64, num_warps=4),
    "wgrad": dict(BLOCK_T=64, BLOCK_K=64, num_warps=4),
}
_INTERPRETER_CONFIGS = {
    "route": dict(BLOCK_T=32, BLOCK_D=64, num_warps=1),
    "shrink": dict(BLOCK_T=32, BLOCK_K=64, num_warps=1),
    "wgrad": dict(BLOCK_T=32, BLOCK_K=64, num_warps=1),
}


def launch_config(kernel: str, x: torch.Tensor) -> dict:
    return (_INTERPRETER_CONFIGS if interpreting() or not x.is_cuda else _GPU_CONFIGS)[kernel]


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def token_splits(x: torch.Tensor, tokens: int, other_programs: int, block_t: int) -> int:
    """How many token ranges a reduction over tokens is cut into: enough programs for two waves on the GPU,
    two under the interpreter so that the split path is exercised by the CPU tests."""
    blocks = cdiv(max(tokens, 1), block_t)
    if x.is_cuda and not interpreting():
        want = cdiv(2 * _sm_count(x.device.index or 0), max(other_programs, 1))
    else:
        want = 2
    return max(1, min(want, blocks))
