"""Floors and fit on a target GPU: roofline per launch, resident programs per SM per variant, role labels.

- FLOPs: the useful multiply-adds of a launch (2 per MAC), from its size arguments and constexprs, per kernel
  name (table below); a kernel the table does not know, or whose arguments it does not find, gets no FLOPs ("?")
  and a memory-only floor.
- minimum HBM bytes: every distinct tensor argument read or written once (numel x element size; arguments that
  alias another, as placeholders do, count once).
- floor = max(FLOPs / peak, bytes / bandwidth) with the target GPU's datasheet peaks (``GPUS``): the dense tensor
  peak of the workload's dtype (bf16/fp16 with fp32 accumulation; fp32 at the TF32 tensor peak where TF32 is
  allowed, else at the CUDA-core fp32 peak); the few tf32 FLOPs of 16-bit workloads (the experts' K-extension,
  weight gradients) are counted at the 16-bit rate (tf32 peaks at half).
- programs per SM: the least of the thread, block, register and shared-memory limits of the target's SM, computed
  as CUDA's occupancy calculator does (registers per warp rounded up to 256 and shared by the 4 SM
  sub-partitions; 1 KB of shared memory reserved per block).
"""

KB = 1024

# Per compute capability: the CUDA C++ Programming Guide, "Compute Capabilities", table "Technical Specifications
# per Compute Capability" (maximum resident threads and blocks per SM, 64 K 32-bit registers per SM, maximum
# shared memory per SM and per block (opt-in), 1 KB reserved per block), and, for one representative GPU of each
# capability, its SM count, dense tensor-core peaks and memory bandwidth from NVIDIA's datasheet or architecture
# whitepaper (named in `gpu`). Peaks are dense (no 2:4 sparsity), fp32 accumulation.
_CC = dict(regs_per_sm=65536, sub_partitions=4, smem_reserved_per_block=1 * KB)
GPUS = {
    # A100 whitepaper / A100 datasheet (SXM4 80GB): 108 SMs, 312 TF bf16, 156 TF tf32, 19.5 TF fp32, 2,039 GB/s
    "sm_80": dict(_CC, gpu="A100 SXM4 80GB", sms=108, smem_per_sm=164 * KB, smem_per_block=163 * KB,
                  threads_per_sm=2048, blocks_per_sm=32, flops16=312e12, flops_tf32=156e12, flops32=19.5e12,
                  hbm=2.039e12),
    # RTX A6000 datasheet (GA102, 84 SMs): 309.7 TF 16-bit tensor with sparsity (154.8 dense), 77.4 TF tf32 dense,
    # 38.7 TF fp32, 768 GB/s; cc 8.6: 100 KB per SM, 99 KB per block, 1,536 threads and 16 blocks per SM
    "sm_86": dict(_CC, gpu="RTX A6000", sms=84, smem_per_sm=100 * KB, smem_per_block=99 * KB,
                  threads_per_sm=1536, blocks_per_sm=16, flops16=154.8e12, flops_tf32=77.4e12, flops32=38.7e12,
                  hbm=0.768e12),
    # RTX 6000 Ada datasheet / Ada whitepaper (AD102, 142 SMs): 364.2 TF 16-bit tensor dense (728.5 sparse),
    # 182.1 TF tf32, 91.1 TF fp32, 960 GB/s; cc 8.9: 100 KB / 99 KB, 1,536 threads and 24 blocks per SM
    "sm_89": dict(_CC, gpu="RTX 6000 Ada", sms=142, smem_per_sm=100 * KB, smem_per_block=99 * KB,
                  threads_per_sm=1536, blocks_per_sm=24, flops16=364.2e12, flops_tf32=182.1e12, flops32=91.1e12,
                  hbm=0.960e12),
    # H100 datasheet (SXM5): 132 SMs, 1,979 TF bf16 with sparsity (989.4 dense), 494.7 TF tf32 dense, 66.9 TF
    # fp32, HBM3 3.35 TB/s; cc 9.0: 228 KB per SM, 227 KB per block
    "sm_90": dict(_CC, gpu="H100 SXM5", sms=132, smem_per_sm=228 * KB, smem_per_block=227 * KB,
                  threads_per_sm=2048, blocks_per_sm=32, flops16=989.4e12, flops_tf32=494.7e12, flops32=66.9e12,
                  hbm=3.35e12),
    # HGX B200 datasheet (per GPU) / Blackwell technical brief: 148 SMs, 4.5 PF 16-bit with sparsity (2.25 dense),
    # 1.1 PF tf32 dense, 75 TF fp32, HBM3e 8 TB/s; cc 10.0: 228 KB / 227 KB
    "sm_100": dict(_CC, gpu="B200", sms=148, smem_per_sm=228 * KB, smem_per_block=227 * KB,
                   threads_per_sm=2048, blocks_per_sm=32, flops16=2250e12, flops_tf32=1100e12, flops32=75e12,
                   hbm=8.0e12),
    # RTX Blackwell (GB202) whitepaper, RTX 5090: 170 SMs, 209.5 TF 16-bit tensor with fp32 accumulation dense,
    # 104.8 TF tf32, 104.8 TF fp32, 1,792 GB/s; cc 12.0: 100 KB / 99 KB, 1,536 threads and 32 blocks per SM
    "sm_120": dict(_CC, gpu="RTX 5090", sms=170, smem_per_sm=100 * KB, smem_per_block=99 * KB,
                   threads_per_sm=1536, blocks_per_sm=32, flops16=209.5e12, flops_tf32=104.8e12, flops32=104.8e12,
                   hbm=1.792e12),
}
H100 = GPUS["sm_90"]


def peak_flops(gpu: dict, dtype: str, tf32: bool) -> float:
    """The compute peak a workload of this dtype ('bf16', 'fp16', 'fp32') runs at on gpu."""
    if dtype != "fp32":
        return gpu["flops16"]
    return gpu["flops_tf32"] if tf32 else gpu["flops32"]


# useful FLOPs per kernel, from its size arguments and constexprs (names as in the kernel's signature)
FLOPS = {
    "_expand_kernel": lambda a: 2 * a["T"] * a["D_OUT"] * (a["K"] + a["R"]),  # base GEMM + expert K-extension
    "_shrink_kernel": lambda a: 2 * a["T"] * a["K"] * a["R"],
    # one token reduction (K), or two sharing a launch (K0, and K1 when TWO)
    "_wgrad_kernel": lambda a: 2 * a["T"] * a["C"] * (a["K"] if "K" in a else a["K0"] + a["K1"] * bool(a["TWO"])),
    "_route_fwd_kernel": lambda a: 2 * a["T"] * a["D"] * a["N"],
    "_route_bwd_kernel": lambda a: 4 * a["T"] * a["D"] * a["N"],  # logits recomputed, then dx = dz W
    "_wgrad_sum_kernel": lambda a: 0,  # fp32 additions of the split partials, no matrix work: memory-bound
}
# constexprs that name what a variant does; the rest of the role is the kernel's name
_FLAGS = {"BACKWARD": "bwd", "HAS_BASE": "base", "HAS_BIAS": "bias", "GATED": "gated", "HAS_TASKS": "per task"}
_ENUMS = {"ACTIVATION": {1: "gelu", 2: "gelu'"}, "MODE": {0: "adaptive", 1: "naive"}}


def role(kernel: str, constexprs: dict, scalars: dict | None = None) -> str:
    """E.g. 'expand base bias gelu', 'shrink bwd', 'wgrad per task'; the bare kernel name for unknown kernels."""
    parts = [kernel.strip("_").removesuffix("_kernel").replace("_", " ")]
    parts += [label for name, label in _FLAGS.items() if constexprs.get(name) is True]
    parts += [_ENUMS[k][v] for k, v in constexprs.items() if v in _ENUMS.get(k, {})]
    if "HAS_BASE" in constexprs and (scalars or {}).get("R"):
        parts.append("+experts")  # the expert K-extension (R rank columns) rides on the base GEMM
    return " ".join(parts)


def tile(constexprs: dict) -> str:
    """The BLOCK_* constexprs, e.g. 'T128 O128 K64 R16'."""
    return " ".join(f"{k.removeprefix('BLOCK_')}{v}" for k, v in constexprs.items() if k.startswith("BLOCK_"))


def flops(kernel: str, args: dict) -> int | None:
    """FLOPs of a launch from its arguments and constexprs by name; None where the table cannot say."""
    try:
        return int(FLOPS[kernel](args))
    except KeyError:
        return None


def min_bytes(tensors: list) -> int:
    """Bytes of the distinct tensor arguments: (name, shape, dtype, bytes, data_ptr) rows; one per pointer."""
    per_ptr = {}
    for _, _, _, nbytes, ptr in tensors:
        per_ptr[ptr] = max(per_ptr.get(ptr, 0), nbytes)
    return sum(per_ptr.values())


def floor_us(n_flops: int | None, n_bytes: int, gpu: dict = H100, peak: float | None = None) -> tuple[float, str]:
    """(floor in microseconds, 'compute' or 'memory') at peak FLOP/s (default: the 16-bit tensor peak)."""
    compute = (n_flops or 0) / (peak or gpu["flops16"]) * 1e6
    memory = n_bytes / gpu["hbm"] * 1e6
    return (compute, "compute") if compute > memory else (memory, "memory")


def programs_per_sm(regs: int, warps: int, smem: int, gpu: dict = H100) -> tuple[int, str]:
    """Resident programs (thread blocks) per SM and the resource that limits them."""
    regs_per_warp = -(-max(regs, 1) * 32 // 256) * 256
    warps_per_part = gpu["regs_per_sm"] // gpu["sub_partitions"] // regs_per_warp
    limits = {
        "threads": gpu["threads_per_sm"] // (warps * 32),
        "blocks": gpu["blocks_per_sm"],
        "regs": warps_per_part * gpu["sub_partitions"] // warps,
        "smem": gpu["smem_per_sm"] // (smem + gpu["smem_reserved_per_block"]) if smem <= gpu["smem_per_block"] else 0,
    }
    limit = min(limits, key=limits.get)
    return limits[limit], limit
