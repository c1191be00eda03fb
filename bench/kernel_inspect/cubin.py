"""What the compiler made of one variant: registers, spills, shared memory, and what its SASS runs.

- registers: ``cuobjdump -res-usage`` of Triton's own cubin (REG); static shared memory (SHARED) is added to
  Triton's dynamic ``metadata.shared``;
- spill stores / loads (bytes per thread): ``ptxas -v`` re-run on the variant's PTX with the flags Triton's
  ``make_cubin`` uses (the ptxas it picks for the arch, ``-lineinfo -v --regAllocOptLevel=2 --gpu-name=sm_XX[a]``,
  plus ``--fmad=false`` and ``ptx_options`` when set), because Triton deletes its ptxas log;
- SASS (``cuobjdump -sass``): counts of HGMMA (wgmma), HMMA (mma.sync), UTC*MMA (tcgen05 on sm_100), UTMALDG
  (TMA loads), LDL/STL (local memory), and whether an MMA sits inside a loop (an address range closed by a
  backward BRA): the main loop runs on the tensor cores.

The result is stored as JSON beside the cubin in Triton's cache (one file per kernel hash), so a second run
reads it instead of running ptxas and cuobjdump again. Triton internals: ``triton.runtime.cache
.get_cache_manager(hash)`` (the kernel's cache directory), ``triton.knobs.nvidia.cuobjdump`` (the bundled tool),
``triton.backends.nvidia.compiler.get_ptxas`` (``ptxas``, or ``ptxas-blackwell`` from sm_100 on) and
``.sm_arch_from_capability``.
"""

import inspect
import json
import os
import re
import subprocess
import tempfile

from triton import knobs
from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
from triton.runtime.cache import get_cache_manager

_VERSION = 2  # bump when the parsing below changes: the cached files are named after it

_SASS_LINE = re.compile(r"/\*([0-9a-f]+)\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")
_BRANCH_TARGET = re.compile(r"0x([0-9a-f]+)")


def ptxas(arch: int):
    """The ptxas Triton compiles for capability arch with: triton 3.6 and later pick one per target (the newer
    ``ptxas-blackwell`` from sm_100 on), 3.4 has one for all (tests/compat.sh tests both)."""
    return get_ptxas(arch) if inspect.signature(get_ptxas).parameters else get_ptxas()


def ptxas_targets(arch: int) -> set[str]:
    """The GPU names (``sm_90a``, ``sm_120a``, ...) that the ptxas Triton bundles for capability arch accepts (a
    newer one, ``ptxas-blackwell``, from sm_100 on), from its ``--help``."""
    help_text = _run(ptxas(arch).path, "--help")
    return set(re.findall(r"'(sm_[0-9]+[a-z]?)'", help_text))


def compilable(arch: int) -> tuple[bool, str]:
    """(whether Triton's bundled ptxas can compile for capability arch, the GPU name Triton passes it)."""
    name = sm_arch_from_capability(arch)
    return name in ptxas_targets(arch), name


def analyse(kernel) -> dict:
    """Registers, spills, shared memory and SASS facts of a CompiledKernel (cached in Triton's cache)."""
    cache = get_cache_manager(kernel.hash)
    name = f"{kernel.metadata.name}.inspect-v{_VERSION}.json"
    path = cache.get_file(name)
    if path is not None:
        with open(path) as f:
            return json.load(f)
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "k.cubin")
        with open(cubin, "wb") as f:
            f.write(kernel.asm["cubin"])
        result = {**_res_usage(cubin), **_ptxas(kernel, tmp), **_sass(cubin)}
    result["smem"] = kernel.metadata.shared + result.pop("static_smem")
    cache.put(json.dumps(result), name, binary=False)
    return result


def _run(*cmd) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return proc.stdout + proc.stderr


def _res_usage(cubin: str) -> dict:
    out = _run(knobs.nvidia.cuobjdump.path, "-res-usage", cubin)
    regs, smem = re.search(r"REG:(\d+)", out), re.search(r"SHARED:(\d+)", out)
    return {"regs": int(regs.group(1)), "static_smem": int(smem.group(1)) if smem else 0}


def _ptxas(kernel, tmp: str) -> dict:
    opt = kernel.metadata
    ptx = os.path.join(tmp, "k.ptx")
    with open(ptx, "w") as f:
        f.write(kernel.asm["ptx"])
    cmd = [ptxas(opt.target.arch).path, "-lineinfo", "-v", "--regAllocOptLevel=2",
           f"--gpu-name={sm_arch_from_capability(opt.target.arch)}", ptx, "-o", os.path.join(tmp, "re.cubin")]
    if not opt.enable_fp_fusion:
        cmd.insert(2, "--fmad=false")
    if opt.ptx_options:
        cmd[1:1] = opt.ptx_options.split()
    log = _run(*cmd)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    stack = re.search(r"(\d+) bytes stack frame", log)
    return {"spill_store": int(spill.group(1)) if spill else 0, "spill_load": int(spill.group(2)) if spill else 0,
            "stack": int(stack.group(1)) if stack else 0}


def _sass(cubin: str) -> dict:
    ops = []  # (address, opcode, operands)
    for m in _SASS_LINE.finditer(_run(knobs.nvidia.cuobjdump.path, "-sass", cubin)):
        ops.append((int(m.group(1), 16), m.group(2), m.group(3)))
    loops = []  # (first, last) address of each loop: a branch back to an earlier address closes it
    for addr, op, rest in ops:
        target = _BRANCH_TARGET.search(rest)
        if op.startswith("BRA") and target and int(target.group(1), 16) <= addr:
            loops.append((int(target.group(1), 16), addr))

    def count(prefix, in_loop=False, mma=False):
        return sum(1 for addr, op, _ in ops if op.startswith(prefix) and (not mma or "MMA" in op)
                   and (not in_loop or any(a <= addr <= b for a, b in loops)))

    return {"hgmma": count("HGMMA"), "hgmma_in_loop": count("HGMMA", True), "hmma": count("HMMA"),
            "hmma_in_loop": count("HMMA", True), "utcmma": count("UTC", mma=True),
            "utcmma_in_loop": count("UTC", True, mma=True), "utmaldg": count("UTMALDG"), "ldl": count("LDL"),
            "stl": count("STL"), "instructions": len(ops)}
