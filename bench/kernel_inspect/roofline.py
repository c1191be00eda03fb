"""Floors and fit on an H100: roofline per launch, resident programs per SM per variant, role labels.

- FLOPs: the useful multiply-adds of a launch (2 per MAC), from its size arguments and constexprs, per kernel
  name (table below); a kernel the table does not know, or whose arguments it does not find, gets no FLOPs ("?")
  and a memory-only floor.
- minimum HBM bytes: every distinct tensor argument read or written once (numel x element size; arguments that
  alias another, as placeholders do, count once).
- floor = max(FLOPs / 700 TFLOP/s, bytes / 3 TB/s): H100 SXM peaks (bf16 dense tensor, HBM3); the few tf32
  FLOPs (the experts' K-extension, weight gradients) are counted at the bf16 rate too (tf32 peaks at half).
- programs per SM: the least of the thread, block, register and shared-memory limits of an H100 SM, computed as
  CUDA's occupancy calculator does (registers per warp rounded up to 256 and shared by the 4 SM sub-partitions;
  1 KB of shared memory reserved per block).
"""

H100 = dict(sms=132, regs_per_sm=65536, sub_partitions=4, smem_per_sm=228 * 1024, smem_per_block=227 * 1024,
            smem_reserved_per_block=1024, threads_per_sm=2048, blocks_per_sm=32, flops=700e12, hbm=3.0e12)

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


def floor_us(n_flops: int | None, n_bytes: int, gpu: dict = H100) -> tuple[float, str]:
    """(floor in microseconds, 'compute' or 'memory')."""
    compute = (n_flops or 0) / gpu["flops"] * 1e6
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
