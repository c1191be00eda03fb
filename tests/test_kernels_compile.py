"""Every Triton kernel compiles to a cubin for Ampere (sm_80) and Hopper (sm_90), without a GPU.

The interpreter runs kernels as Python and accepts code that the compiler rejects (a non-constexpr global, a
shape it cannot lower): this ahead-of-time compile through Triton's own ptxas catches that on every machine.
The compile runs in a child process, because the kernels of this process are interpreted (TRITON_INTERPRET=1).
"""

import os
import subprocess
import sys

import pytest

PRECISION = {"bf16": "tf32", "fp16": "tf32", "fp32": "ieee"}
# pointer arguments that are not in the activation dtype, and those that are fp32 in one kernel only
FIXED = {"task_ptr": "*i64", "idx_ptr": "*i64", "gate_ptr": "*fp32", "psum_ptr": "*fp32", "dgate_ptr": "*fp32",
         "dpsum_ptr": "*fp32", "dz_ptr": "*fp32", "u_ptr": "*fp32", "ug_ptr": "*fp32", "v_ptr": "*fp32",
         "toff_ptr": "*i64", "part_ptr": "*fp32"}
FP32 = {"_shrink_kernel": {"out_ptr"}, "_wgrad_kernel": {"l0_ptr", "l1_ptr"}}


def _compile(fn, dtype, constexprs, target, **options):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = "*fp32" if name in FP32.get(fn.__name__, ()) else FIXED.get(name, f"*{dtype}")
        else:
            sig[name] = "fp32" if name == "scale" else "i32"
    compiled = triton.compile(ASTSource(fn, sig, constexprs), target=GPUTarget("cuda", target, 32), options=options)
    assert compiled.asm["cubin"], f"{fn.__name__}: no cubin"
    return fn.__name__


def compile_all(target: int, dtype: str, all_configs: bool) -> list[str]:
    """Compile every kernel in every variant the launchers use, for one target and activation dtype; the GEMM's
    autotune configurations all of them, or only the first (pinned) one."""
    from ase_kernels.kernels import lowrank, routing

    done, precision = [], PRECISION[dtype]
    for fn in (routing._route_fwd_kernel, routing._route_bwd_kernel):
        for mode in (routing.MODE_ADAPTIVE.value, routing.MODE_NAIVE.value):
            extra = dict(HAS_DGATES=True, HAS_DPSUM=True) if fn is routing._route_bwd_kernel else {}
            done.append(_compile(fn, dtype, dict(TOP_K=6, NUM_SHARED=2, MODE=mode, PRECISION=precision, BLOCK_T=64,
                                                 BLOCK_N=32, BLOCK_D=64, BLOCK_KS=8, **extra), target, num_warps=4))
    for backward in (False, True):
        done.append(_compile(lowrank._shrink_kernel, dtype, dict(RANK=2, KS=8, BACKWARD=backward, PRECISION=precision,
                                                                 BLOCK_T=64, BLOCK_K=64, BLOCK_R=64), target))
    # (base GEMM, gates, epilogue): the fused Linear, the experts-only dx, fc1 + GELU, fc2's dx with GELU's gradient
    variants = ((True, True, "none"), (False, False, "none"), (True, False, "gelu"), (True, False, "gelu_grad"))
    for has_base, gated, act in variants:
        for config in lowrank._expand_kernel.configs[: None if all_configs else 1]:
            constexprs = dict(RANK=2, KS=8, HAS_BASE=has_base, HAS_BIAS=has_base, GATED=gated, PRECISION=precision,
                              ACTIVATION=lowrank._ACTIVATIONS[None if act == "none" else act], BLOCK_R=64, GROUP_T=8,
                              **config.kwargs)
            done.append(_compile(lowrank._expand_kernel.fn, dtype, constexprs, target, num_warps=config.num_warps,
                                 num_stages=config.num_stages))
    # dA and dB in one launch; the router gradient over task ranges or with a task filter
    for tasks, two in ((lowrank.TASKS_NONE, True), (lowrank.TASKS_RANGES, False), (lowrank.TASKS_FILTER, False)):
        done.append(_compile(lowrank._wgrad_kernel, dtype, dict(TASKS=tasks.value, TWO=two, PRECISION=precision,
                                                                BLOCK_T=64, BLOCK_C=64, BLOCK_K=64), target))
    for two in (True, False):
        done.append(_compile(lowrank._wgrad_sum_kernel, dtype, dict(RANK=2 if two else 1, TWO=two, BLOCK_C=64,
                                                                    BLOCK_K=64), target))
    return done


# the main workload (Hopper, bf16) with every autotune configuration; the other cases with the pinned one
CASES = [pytest.param(90, "bf16", True, id="sm90-bf16"), pytest.param(90, "fp32", False, id="sm90-fp32"),
         pytest.param(80, "fp16", False, id="sm80-fp16")]


@pytest.mark.parametrize("target,dtype,all_configs", CASES)
def test_every_kernel_compiles(target, dtype, all_configs):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["ASE_KERNELS_AUTOTUNE"] = "1"  # compile every autotune configuration, not only the pinned one
    proc = subprocess.run([sys.executable, __file__, str(target), dtype, str(int(all_configs))], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"compile for sm_{target} {dtype} failed:\n{proc.stderr[-4000:]}"
    compiled = proc.stdout.split()
    assert len(compiled) == 4 + 2 + 4 * (5 if all_configs else 1) + 3 + 2, f"unexpected kernel count: {compiled}"


if __name__ == "__main__":
    print(" ".join(compile_all(int(sys.argv[1]), sys.argv[2], sys.argv[3] == "1")))
