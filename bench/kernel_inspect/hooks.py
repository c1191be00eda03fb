"""Every Triton launch compiled for a chosen GPU through Triton's own binder, recorded, and not launched.

How: a stand-in driver reports ``GPUTarget("cuda", arch, 32)``, device 0 and stream 0, so ``JITFunction.run``
binds and specialises the real arguments (dtypes, 16-byte alignment, integers equal to 1 or divisible by 16) as a
CUDA launch would; the wrapped ``run`` always passes ``warmup=True``: compile (or hit Triton's cache), never load
or launch. The wrapped ``Autotuner.run`` forgets its tuned keys while recording, so that every launch of an
autotuned kernel compiles every configuration: its benchmarker is a stand-in that calls each configuration once
and reports equal times, which keeps the first configuration for the launch itself; with ``--first-config`` only
that first one compiles.

The package's own code is steered onto its GPU branch while its tensors stay on the CPU: inside modules of the
package (and only there) ``Tensor.is_cuda`` answers True, and the few CUDA runtime queries a launcher makes
answer as the target's GPU would (``roofline.GPUS``: its SMs and shared memory, no stream capture), and so does the
stand-in driver that Triton's autotuners ask for the shared-memory limit when they prune configurations. Torch,
timm and Triton see the truth.

Triton internals relied on (triton 3.8.0): ``triton.runtime.driver.driver.set_active / ._active`` (3.4: ``.active``),
``JITFunction.run(*args, grid, warmup, **kwargs)`` returning the ``CompiledKernel``, ``JITFunction.device_caches``
(per-device binder, target and kernel cache; cleared when the target changes), ``JITFunction.params[i].is_constexpr``,
``Autotuner.run / .cache / .do_bench / .cache_results`` (``run`` benchmarks the configurations that
``prune_configs`` keeps, in order, and keeps the fastest: the first of equal times) and
``CompiledKernel.hash / .metadata / .asm``.
"""

import contextlib
import sys
import types
from dataclasses import dataclass, field

import torch
from triton.backends.compiler import GPUTarget
from triton.runtime.autotuner import Autotuner
from triton.runtime.driver import driver
from triton.runtime.jit import JITFunction

from .roofline import GPUS


def arch(target: str) -> int:
    """'sm_90' -> 90."""
    return int(target.removeprefix("sm_"))


def torch_properties(target: str) -> types.SimpleNamespace:
    """What torch.cuda.get_device_properties would answer on the target's GPU (the fields the package reads)."""
    gpu = GPUS[target]
    return types.SimpleNamespace(
        name=f"NVIDIA {gpu['gpu']} (stand-in)", major=arch(target) // 10, minor=arch(target) % 10,
        multi_processor_count=gpu["sms"], total_memory=80 * 2**30, warp_size=32,
        max_threads_per_multi_processor=gpu["threads_per_sm"], regs_per_multiprocessor=gpu["regs_per_sm"],
        shared_memory_per_multiprocessor=gpu["smem_per_sm"], shared_memory_per_block_optin=gpu["smem_per_block"],
        L2_cache_size=50 * 2**20)


class _Driver:
    """What JITFunction.run, an autotuner's configuration pruning and a launcher sizing a persistent grid ask the
    active driver for, answered for the target's GPU, which is not there."""

    def __init__(self, target: str):
        self.target = GPUTarget("cuda", arch(target), 32)
        gpu = GPUS[target]
        props = dict(multiprocessor_count=gpu["sms"], max_shared_mem=gpu["smem_per_block"],
                     max_num_regs=gpu["regs_per_sm"], warpSize=32)
        self.utils = types.SimpleNamespace(get_device_properties=lambda device=0: dict(props))

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0


@dataclass
class Launch:
    """One launch: its kernel, phase, scalar arguments, tensor arguments, and (variant hash, grid) per compiled
    configuration (one entry unless autotuned)."""

    kernel: str
    phase: str
    scalars: dict
    tensors: list  # (name, shape, dtype, bytes, data_ptr)
    configs: list = field(default_factory=list)


@dataclass
class Variant:
    """One compiled kernel: Triton's CompiledKernel and the constexprs it was specialised for."""

    kernel: str
    compiled: object
    constexprs: dict


class Recorder:
    """Collects the launches and compiled variants while active; counts launches per phase always."""

    def __init__(self):
        self.launches: list[Launch] = []
        self.variants: dict[str, Variant] = {}
        self.counts: dict[str, int] = {}
        self.phase = "?"
        self.recording = False  # full records (pass 1); otherwise only the counts
        self._benchmarking = False
        self._first_only, self._benchmarked = False, 0
        self._pending: list = []

    def compiled(self, fn: JITFunction, kernel, args, kwargs, grid):
        if not self.recording:
            if not self._benchmarking:
                self.counts[self.phase] = self.counts.get(self.phase, 0) + 1
            return
        meta = {**dict(zip(fn.arg_names, args, strict=False)), **kwargs}
        constexprs = {p.name: _plain(meta[p.name]) for p in fn.params if p.is_constexpr and p.name in meta}
        self.variants.setdefault(kernel.hash, Variant(fn.__name__, kernel, constexprs))
        grid = grid(meta) if callable(grid) else grid
        entry = (kernel.hash, tuple(int(g) for g in grid) + (1,) * (3 - len(grid)))
        if self._benchmarking:
            self._pending.append(entry)
            return
        self.counts[self.phase] = self.counts.get(self.phase, 0) + 1
        scalars = {k: v for k, v in meta.items()
                   if k in fn.arg_names and isinstance(v, (bool, int, float)) and k not in constexprs}
        tensors = [(k, tuple(v.shape), str(v.dtype).removeprefix("torch."), v.numel() * v.element_size(),
                    v.data_ptr()) for k, v in meta.items() if isinstance(v, torch.Tensor)]
        self.launches.append(Launch(fn.__name__, self.phase, scalars, tensors, self._pending or [entry]))
        self._pending = []

    def tuning(self, first_only: bool):
        """An autotuner starts (it may or may not need to benchmark); first_only: compile only the first
        configuration it benchmarks (the first that survives its pruning)."""
        self._first_only, self._benchmarked = first_only, 0

    def benchmark(self, kernel_call, quantiles=None, **_):
        """The autotuner's benchmarker: one call per configuration (a compile), equal times for all, which keeps
        the first; with first_only the others are not compiled and report an infinite time."""
        self._benchmarked += 1
        if self._first_only and self._benchmarked > 1:
            return [float("inf")] * 3 if quantiles else float("inf")
        self._benchmarking = True
        try:
            kernel_call()
        finally:
            self._benchmarking = False
        return [0.0, 0.0, 0.0] if quantiles else 0.0


def _plain(v):
    v = getattr(v, "value", v)  # tl.constexpr
    return v if isinstance(v, (bool, int, float, str, type(None))) else str(v)


@contextlib.contextmanager
def compile_only(recorder: Recorder, target: str, first_config: bool = False):
    """While active, Triton launches compile for the target ('sm_90') and are recorded instead of run.
    first_config: autotuned kernels compile only the first configuration that survives their pruning there."""
    jit_run, tune_run = JITFunction.run, Autotuner.run
    stand_in = _Driver(target)
    target = stand_in.target

    def run(self, *args, grid, warmup, **kwargs):
        bound = self.device_caches.get(0)
        if bound is not None and bound[2] != target:  # bound for another target earlier in this process
            self.device_caches.clear()
        kernel = jit_run(self, *args, grid=grid, warmup=True, **kwargs)
        if kernel is not None:
            recorder.compiled(self, kernel, args, kwargs, grid)
        return kernel

    def tune(self, *args, **kwargs):
        if "do_bench" not in self.__dict__:
            self.__dict__["do_bench"] = recorder.benchmark  # also overrides a do_bench given to @autotune
            self.cache_results = False  # Triton's on-disk tuning cache would hold the stand-in's equal times
        if recorder.recording:
            self.cache.clear()  # every recorded launch tunes again: all its configurations compile
        recorder.tuning(first_config)
        return tune_run(self, *args, **kwargs)

    # the active driver, restored as it was: reset_active() would build the default driver, which needs a GPU
    # (triton 3.6 and later name it ._active, 3.4 .active)
    slot = "_active" if hasattr(driver, "_active") else "active"
    previous = getattr(driver, slot)
    driver.set_active(stand_in)
    JITFunction.run, Autotuner.run = run, tune
    try:
        yield recorder
    finally:
        JITFunction.run, Autotuner.run = jit_run, tune_run
        setattr(driver, slot, previous)


@contextlib.contextmanager
def gpu_code_path(package: str, target: str = "sm_90", on_sync=None):
    """Code of `package` sees CUDA tensors and the target's GPU; everything else sees the CPU tensors they are.
    on_sync(what) is called for torch.cuda.synchronize (a host sync on a GPU)."""
    real = torch._C.TensorBase.is_cuda
    props = torch_properties(target)

    def is_cuda(self):
        caller = sys._getframe(1).f_globals.get("__name__", "")
        return True if caller.split(".")[0] == package else real.__get__(self)

    def synchronize(device=None):
        if on_sync is not None:
            on_sync("torch.cuda.synchronize")

    patches = [(torch.Tensor, "is_cuda", property(is_cuda)),
               (torch.cuda, "get_device_properties", lambda device=None: props),
               (torch.cuda, "get_device_name", lambda device=None: props.name),
               (torch.cuda, "get_device_capability", lambda device=None: (props.major, props.minor)),
               (torch.cuda, "current_device", lambda: 0),
               (torch.cuda, "is_current_stream_capturing", lambda: False),
               (torch.cuda, "synchronize", synchronize)]
    saved = [(obj, name, obj.__dict__.get(name)) for obj, name, _ in patches]
    for obj, name, value in patches:
        setattr(obj, name, value)
    try:
        yield
    finally:
        for obj, name, value in saved:
            if value is None:
                delattr(obj, name)
            else:
                setattr(obj, name, value)
