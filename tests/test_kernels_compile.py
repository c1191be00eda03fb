"""Every Triton kernel compiles to a cubin for Ampere (sm_80) and Hopper (sm_90), without a GPU, and the
workload's variants (Hopper, bf16, every autotune configuration) spill no registers and read lora_B without
16-bit gathers.

The interpreter runs kernels as Python and accepts code that the compiler rejects (a non-constexpr global, a
shape it cannot lower): this ahead-of-time compile through Triton's own ptxas catches that on every machine.
Each variant is compiled as the JIT specialises a launch of the ViT-B FFN (12,608 tokens, d 768, hidden 3,072,
32/6/2/2): unit strides are the constant 1 and the other integers and all pointers are multiples of 16, except
the strides listed as odd (the rank-2 stride of lora_B's (N, d_out, r) layout). Spill bytes come from
``ptxas -v`` with Triton's own flags. The compile runs in a child process, because the kernels of this process
are interpreted (TRITON_INTERPRET=1).
"""

import os
import re
import subprocess
import sys
import tempfile

import pytest

PRECISION = {"bf16": "tf32", "fp16": "tf32", "fp32": "ieee"}
# pointer arguments that are not in the activation dtype
FIXED = {"task_ptr": "*i64", "idx_ptr": "*i64", "gate_ptr": "*fp32", "psum_ptr": "*fp32", "dgate_ptr": "*fp32",
         "dpsum_ptr": "*fp32", "dz_ptr": "*fp32", "u_ptr": "*fp32", "toff_ptr": "*i64", "part_ptr": "*fp32"}


def _spill_bytes(ptx: str, target: int) -> int:
    """Spill stores + loads in bytes per thread, from ptxas -v with the flags Triton compiles with."""
    from bench.kernel_inspect.cubin import ptxas as ptxas_for

    ptxas = ptxas_for(target)
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        arch = f"sm_{target}a" if target == 90 else f"sm_{target}"
        log = subprocess.run([ptxas.path, "-v", "--regAllocOptLevel=2", f"--gpu-name={arch}", src,
                              "-o", src + ".o"], capture_output=True, text=True, check=True).stderr
    return sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", log))


def _compile(fn, dtype, constexprs, target, ones=(), odd=(), fp32=(), **options):
    """Compile fn for the target as a launch with these unit strides (ones) would be; returns
    'name:spill_bytes:scalar 16-bit global loads' (name tagged [packed] where lora_B is read as packed runs)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    constexprs = dict(constexprs, **{name: 1 for name in ones if name in fn.arg_names})
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
            continue
        if name.endswith("_ptr"):
            sig[name] = "*fp32" if name in fp32 else FIXED.get(name, f"*{dtype}")
        else:
            sig[name] = "fp32" if name == "scale" else "i32"
        if name not in odd and name != "scale":
            attrs[(i,)] = [["tt.divisibility", 16]]
    compiled = triton.compile(ASTSource(fn, sig, constexprs, attrs), target=GPUTarget("cuda", target, 32),
                              options=options)
    assert compiled.asm["cubin"], f"{fn.__name__}: no cubin"
    ptx = compiled.asm["ptx"]
    loads16 = len(re.findall(r"ld\.global(?:\.\w+)*\.b16\b", ptx))
    tag = "[packed]" if constexprs.get("PACKED") else ""
    return f"{fn.__name__}{tag}:{_spill_bytes(ptx, target)}:{loads16}"


def compile_all(target: int, dtype: str, all_configs: bool) -> list[str]:
    """Compile every kernel in every variant the launchers use, for one target and activation dtype; the GEMM's
    autotune configurations all of them, or only the first (pinned) one."""
    from ase_kernels.kernels import lowrank, routing

    done, precision = [], PRECISION[dtype]
    route_ones = ("stride_xd", "stride_wd", "stride_task", "stride_ik", "stride_gk", "stride_dgk", "stride_dxd")
    for fn in (routing._route_fwd_kernel, routing._route_bwd_kernel):
        for mode in (routing.MODE_ADAPTIVE.value, routing.MODE_NAIVE.value):
            extra = dict(HAS_DGATES=True, HAS_DPSUM=True) if fn is routing._route_bwd_kernel else {}
            done.append(_compile(fn, dtype, dict(TOP_K=6, NUM_SHARED=2, MODE=mode, PRECISION=precision, BLOCK_T=64,
                                                 BLOCK_N=32, BLOCK_D=64, BLOCK_KS=8, **extra), target,
                                 ones=route_ones, num_warps=4))
    # forward: x times lora_A (N, r, d); backward: d_y times lora_B seen as (N, r, d_out), k stride r
    shrink_ones = ("stride_pk", "stride_oc", "stride_uc", "stride_ik", "stride_gk", "stride_dgk")
    for backward in (False, True):
        done.append(_compile(lowrank._shrink_kernel, dtype, dict(RANK=2, KS=8, BACKWARD=backward, PACKED=backward,
                                                                 PRECISION=precision, BLOCK_T=64, BLOCK_K=64,
                                                                 BLOCK_R=64), target,
                             ones=shrink_ones + (("stride_wr",) if backward else ("stride_wk",)),
                             odd=("stride_wk",) if backward else (), fp32=() if backward else ("out_ptr",)))
    # (base GEMM, experts, epilogue, unit strides, odd strides, accumulate): fc2 + experts (lora_B, packed), the
    # experts-only dx, fc1 + GELU, fc2's dx with GELU's gradient (fc2 weight transposed), fc1's dx + experts
    # (lora_A), and the cuBLAS path's experts added to a GEMM's output (lora_B, packed)
    variants = (
        (True, True, None, ("stride_pk", "stride_qk", "stride_vc", "stride_lr", "stride_oo"), ("stride_lo",), False),
        (False, True, None, ("stride_vc", "stride_lo", "stride_oo"), (), False),
        (True, False, "gelu", ("stride_pk", "stride_qk", "stride_vc", "stride_lo", "stride_oo"), (), False),
        (True, False, "gelu_grad", ("stride_pk", "stride_qo", "stride_vc", "stride_lo", "stride_oo"), (), False),
        (True, True, None, ("stride_pk", "stride_qo", "stride_vc", "stride_lo", "stride_oo"), (), False),
        (False, True, None, ("stride_vc", "stride_lr", "stride_oo"), ("stride_lo",), True),
    )
    for has_base, experts, act, ones, odd, accumulate in variants:
        for config in (lowrank._EXPAND_32 if dtype == "fp32" else lowrank._EXPAND_16)[: None if all_configs else 1]:
            constexprs = dict(RANK=2, HAS_BASE=has_base, HAS_BIAS=has_base and act != "gelu_grad",
                              HAS_EXPERTS=experts, PACKED="stride_lr" in ones, ACCUMULATE=accumulate,
                              PRECISION=precision,
                              ACTIVATION=lowrank._ACTIVATIONS[act], BLOCK_R=64, GROUP_T=8, **config.kwargs)
            done.append(_compile(lowrank._expand_kernel.fn, dtype, constexprs, target, ones=ones, odd=odd,
                                 num_warps=config.num_warps, num_stages=config.num_stages))
    # dA and dB in one launch (16-bit operands); the router gradient (fp32 dz) over task ranges or with a filter
    wgrad_ones = ("stride_l0c", "stride_r0k", "stride_l1c", "stride_r1k", "stride_task")
    for tasks, two in ((lowrank.TASKS_NONE, True), (lowrank.TASKS_RANGES, False), (lowrank.TASKS_FILTER, False)):
        done.append(_compile(lowrank._wgrad_kernel, dtype, dict(TASKS=tasks.value, TWO=two, PRECISION=precision,
                                                                BLOCK_T=64, BLOCK_C=64 if two else 32, BLOCK_K=64),
                             target, ones=wgrad_ones, fp32=() if two else ("l0_ptr", "l1_ptr")))
    for two in (True, False):
        done.append(_compile(lowrank._wgrad_sum_kernel, dtype, dict(RANK=2 if two else 1, TWO=two, BLOCK_C=64,
                                                                    BLOCK_K=64), target,
                             ones=("stride_0k", "stride_1r") if two else ("stride_0k",),
                             odd=("stride_1k",) if two else ()))
    return done


# the main workload (Hopper, bf16) with every autotune configuration, held spill-free; the other cases compile
# the pinned configuration
CASES = [pytest.param(90, "bf16", True, id="sm90-bf16"), pytest.param(90, "fp32", False, id="sm90-fp32"),
         pytest.param(80, "fp16", False, id="sm80-fp16")]


@pytest.mark.parametrize("target,dtype,all_configs", CASES)
def test_every_kernel_compiles(target, dtype, all_configs):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["ASE_KERNELS_AUTOTUNE"] = "1"  # compile every autotune configuration, not only the pinned one
    # the script imports bench.kernel_inspect (the repository root is not on a script's sys.path)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (os.path.dirname(os.path.dirname(__file__)), env.get("PYTHONPATH"))
                                        if p)
    proc = subprocess.run([sys.executable, __file__, str(target), dtype, str(int(all_configs))], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"compile for sm_{target} {dtype} failed:\n{proc.stderr[-4000:]}"
    compiled = proc.stdout.split()
    from ase_kernels.kernels.lowrank import _EXPAND_16

    assert len(compiled) == 4 + 2 + 6 * (len(_EXPAND_16) if all_configs else 1) + 3 + 2, f"kernels: {compiled}"
    if all_configs:
        spilling = [c for c in compiled if c.split(":")[1] != "0"]
        assert not spilling, f"register spills (kernel:bytes per thread:...) at sm_{target} {dtype}: {spilling}"
        packed = [c for c in compiled if "[packed]" in c]
        # a gathered lora_B tile costs 32 scalar 16-bit loads per thread here; one may remain for the bias row
        assert len(packed) == 1 + 2 * len(_EXPAND_16) and all(int(c.split(":")[2]) <= 1 for c in packed), \
            f"16-bit gathers of lora_B (kernel:spills:16-bit loads): {packed}"


if __name__ == "__main__":
    print(" ".join(compile_all(int(sys.argv[1]), sys.argv[2], sys.argv[3] == "1")))
