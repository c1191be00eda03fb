"""Launch settings shared by the kernels: block sizes per target and dtype, dot precision, the split of token
reductions."""

import functools
import os

import torch


@functools.cache
def interpreting() -> bool:
    """True when TRITON_INTERPRET=1 runs the kernels on the CPU with numpy. Read once per process, at the first
    launch, as the kernels themselves read it once, when they are defined (on first use, see ops._triton_ops): the
    launchers ask dozens of times per layer, and an environment lookup costs about a microsecond."""
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
    """The input precision of tl.dot for operands of x's dtype. fp32 follows torch.get_float32_matmul_precision(),
    as torch.matmul does: "highest" (torch's default) keeps IEEE fp32 dots, "high" or "medium" allow TF32 tensor
    cores (torch's "medium" also allows bf16 passes; the kernels stop at tf32). 16-bit inputs accumulate fp32 side
    tensors in tf32, whose 10-bit mantissa holds fp16 and bf16 operands exactly."""
    if x.dtype == torch.float32:
        return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"
    return "ieee" if x.dtype == torch.float64 else "tf32"


def smem_per_block(device: int | None) -> int:
    """Bytes of shared memory one program may use on the current GPU (the opt-in maximum), as Triton's driver
    reports it: 163 KB on sm_80, 227 KB on sm_90/sm_100, 99 KB on sm_86/sm_89/sm_120."""
    from triton.runtime import driver

    active = driver.active
    return active.utils.get_device_properties(active.get_current_device() if device is None else device)[
        "max_shared_mem"]


def tile_smem(block_m: int, block_n: int, block_k: int, num_stages: int, itemsize: int) -> int:
    """Shared memory of a pipelined (M, K) x (K, N) main loop: one A and one B tile per stage. An upper bound: on
    sm_8x Triton buffers num_stages - 1 tiles, and epilogue scratch reuses the loop's buffers."""
    return num_stages * (block_m + block_n) * block_k * itemsize


# One small named table of launch settings, keyed by kernel and operand width (16-bit or fp32). BLOCK_T=64 rows
# fill an MMA tile on Ampere/Hopper. fp32 gets its own, smaller tiles: IEEE fp32 dots run on the CUDA cores with
# both operand tiles in registers, and 64-wide K steps spill there (tests/test_targets.py holds 0 spills on every
# target). num_stages is 3 where a program may take >= 160 KB of shared memory (sm_80, sm_90, sm_100) and 2 on
# the 99 KB parts (sm_86, sm_89, sm_120), so that two programs fit an SM everywhere. The interpreter runs one numpy
# program per block, so it gets larger blocks to keep tests fast.
_GPU_CONFIGS = {
    ("route", 2): dict(BLOCK_T=64, BLOCK_D=64, num_warps=4),
    ("route", 4): dict(BLOCK_T=64, BLOCK_D=32, num_warps=8),  # 4 warps spill 24 bytes in 3 stages on sm_80
    ("shrink", 2): dict(BLOCK_T=64, BLOCK_K=64, num_warps=4),
    ("shrink", 4): dict(BLOCK_T=32, BLOCK_K=32, num_warps=4),
    # 8 warps: the backward epilogue holds five (BLOCK_T, 64) fp32 tiles (acc, u, g, du_g, u * du_g); at 4 warps it
    # spills on sm_86/sm_89 (16-bit) and sm_120 (fp32)
    ("shrink_bwd", 2): dict(BLOCK_T=64, BLOCK_K=64, num_warps=8),
    ("shrink_bwd", 4): dict(BLOCK_T=32, BLOCK_K=32, num_warps=8),
    ("wgrad", 2): dict(BLOCK_T=64, BLOCK_K=64, num_warps=4),
    ("wgrad", 4): dict(BLOCK_T=32, BLOCK_K=32, num_warps=4),
}
_INTERPRETER_CONFIGS = {
    "route": dict(BLOCK_T=32, BLOCK_D=64, num_warps=1, num_stages=1),
    "shrink": dict(BLOCK_T=32, BLOCK_K=64, num_warps=1, num_stages=1),
    "shrink_bwd": dict(BLOCK_T=32, BLOCK_K=64, num_warps=1, num_stages=1),
    "wgrad": dict(BLOCK_T=32, BLOCK_K=64, num_warps=1, num_stages=1),
}


def launch_config(kernel: str, x: torch.Tensor) -> dict:
    """Block sizes, num_warps and num_stages of a kernel for operands like x on x's device (cached per device)."""
    if interpreting() or not x.is_cuda:
        return _INTERPRETER_CONFIGS[kernel]
    return _gpu_config(kernel, 4 if x.dtype == torch.float32 else 2, x.device.index)


@functools.cache
def _gpu_config(kernel: str, itemsize: int, device: int | None) -> dict:
    return dict(_GPU_CONFIGS[kernel, itemsize], num_stages=3 if smem_per_block(device) >= 160 * 1024 else 2)


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
