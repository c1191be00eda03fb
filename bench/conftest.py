"""Benchmark settings and helpers shared by bench_*.py.

On a CUDA machine: DESIGN.md's workload (ViT-B FFN 768 -> 3072 -> 768, 64 images x 197 tokens = 12,608 tokens,
bf16, ViT-B/16 for the training step). On a CPU: the same structure at small shapes in fp32, so that
``pytest bench/`` checks every candidate in about a minute (CI). pytest-benchmark's machine info records the
GPU, CUDA, torch and triton versions and the command line of the run.
"""

import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass

import pytest
import torch

GPU = torch.cuda.is_available()
CONFIGS = [(16, 4, 0, 4), (32, 8, 0, 2), (16, 3, 1, 4), (32, 6, 2, 2), (64, 12, 4, 1)]  # N/k/S/r, DESIGN.md
PLACEMENTS = ("ffn", "fc1", "fc2", "fc1+fc2")
TARGET = (32, 6, 2, 2)  # the paper's best configuration: the target rows of DESIGN.md section 5


@dataclass(frozen=True)
class Env:
    device: torch.device
    dtype: torch.dtype
    dim: int  # FFN d
    hidden: int  # FFN 4d
    images: int  # images of the FFN / routing workload
    tokens_per_image: int
    rounds: int
    warmup: int
    scaling_images: tuple[int, ...]  # the token-scaling sweeps, 1 to 64 images on a GPU
    vit: dict  # timm VisionTransformer arguments of the training-step benchmark
    vit_images: tuple[int, ...]  # images per task of the training step (the batch is 5 tasks x this)
    vit_rounds: int
    tolerance: float  # relative (norm-wise) error allowed against the float64 reference

    @property
    def tokens(self) -> int:
        return self.images * self.tokens_per_image


VIT_B = dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12)
# Tolerances are norm-wise relative errors over a whole tensor: bf16 candidates sit at 3e-3 to 5e-3 against
# float64 at ViT-B shapes (measured on CPU bf16), fp32 on a CPU at ~1e-6.
ENV = (Env(torch.device("cuda"), torch.bfloat16, 768, 3072, 64, 197, rounds=20, warmup=5,
           scaling_images=(1, 4, 16, 64), vit=VIT_B, vit_images=(1, 4, 16, 64), vit_rounds=8, tolerance=2e-2)
       if GPU else
       Env(torch.device("cpu"), torch.float32, 64, 256, 1, 197, rounds=5, warmup=1, scaling_images=(1, 4),
           vit=dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2), vit_images=(1, 2),
           vit_rounds=2, tolerance=1e-4))

if not GPU:
    # The CPU shapes are far too small to split across threads, and one thread keeps the timings of a shared CI
    # runner from collapsing when another process takes the second core (OpenMP barriers spin).
    torch.set_num_threads(1)


def config_id(config: tuple[int, int, int, int]) -> str:
    return "/".join(map(str, config))


def pytest_benchmark_update_machine_info(config, machine_info):
    try:
        import triton

        machine_info["triton"] = triton.__version__
    except ImportError:  # no Triton off Linux: the CPU path of ase_kernels does not need it
        machine_info["triton"] = None
    machine_info["torch"] = torch.__version__
    machine_info["python"] = platform.python_version()
    machine_info["command"] = " ".join(["pytest", *sys.argv[1:]])
    machine_info["backend_env"] = os.environ.get("ASE_KERNELS_BACKEND", "")
    machine_info["torch_threads"] = torch.get_num_threads()
    if GPU:
        props = torch.cuda.get_device_properties(0)
        machine_info["gpu"] = torch.cuda.get_device_name()
        machine_info["cuda"] = torch.version.cuda
        machine_info["gpu_memory_gb"] = round(props.total_memory / 2**30, 1)
        machine_info["gpu_sm"] = f"{props.major}.{props.minor}"
    machine_info["dtype"] = str(ENV.dtype).removeprefix("torch.")
    machine_info["shape"] = (f"FFN {ENV.dim} -> {ENV.hidden} -> {ENV.dim}, {ENV.tokens} tokens "
                             f"({ENV.images} x {ENV.tokens_per_image}); ViT {ENV.vit}")


@pytest.fixture(autouse=True)
def _seed_and_release():
    """Every benchmark starts from the same seed; on a GPU the cached memory of the previous one is handed back
    after it, so that the large ViT batches do not inherit its fragments. (No gc.collect here: with torch and
    triton loaded it takes 0.3 s, longer than most CPU benchmarks; modules are freed by reference counting.)"""
    torch.manual_seed(0)
    yield
    if GPU:
        torch.cuda.empty_cache()


def sync() -> None:
    if GPU:
        torch.cuda.synchronize()


class Timer:
    """Wraps fn and records the time of each call: CUDA events around the work on a GPU (the host clock of
    pytest-benchmark would add launch latency), perf_counter on a CPU. pytest-benchmark calls it once per round,
    so its own statistics and ``times`` describe the same calls."""

    def __init__(self, fn):
        self.fn, self.times = fn, []

    def __call__(self, *args):
        if GPU:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            self.fn(*args)
            end.record()
            torch.cuda.synchronize()  # the target ends with the GPU idle (STYLE.md item 10)
            self.times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            self.fn(*args)
            self.times.append(1e3 * (time.perf_counter() - t0))


def run_timed(benchmark, fn, make_inputs, rounds: int | None = None, warmup: int | None = None) -> float:
    """Benchmark fn(*make_inputs()) with fresh inputs every round; returns the median ms of the timed rounds.

    make_inputs() runs in pytest-benchmark's setup, outside the timed region, and is synchronised so that the
    GPU is idle when a round starts. With --benchmark-disable fn runs once (a check that it works)."""
    rounds = ENV.rounds if rounds is None else rounds
    warmup = ENV.warmup if warmup is None else warmup
    timer = Timer(fn)

    def setup():
        inputs = make_inputs()
        sync()
        return inputs, {}

    benchmark.pedantic(timer, setup=setup, rounds=rounds, warmup_rounds=warmup)
    return statistics.median(timer.times[-rounds:])


def memory_mb(fn, inputs, exclude=()) -> float:
    """Memory of one call of fn(*inputs), in MiB.

    GPU: peak allocated during the call above what was allocated before it (torch.cuda.max_memory_allocated).
    CPU: bytes of the tensors autograd saved for backward (the activation memory a training step holds),
    not counting the storages of ``exclude`` (weights and inputs, which exist whatever the implementation)."""
    if GPU:
        sync()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn(*inputs)
        sync()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    seen = {t.untyped_storage().data_ptr() for t in exclude}
    total = 0

    def pack(t):
        nonlocal total
        ptr = t.untyped_storage().data_ptr()
        if ptr not in seen:
            seen.add(ptr)
            total += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*inputs)
    return total / 2**20


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """Norm-wise relative error ||got - want|| / ||want||, in float64."""
    got, want = got.double(), want.double()
    return ((got - want).norm() / want.norm().clamp_min(1e-30)).item()


def check_close(name: str, got: torch.Tensor, want: torch.Tensor, tol: float | None = None) -> float:
    """Assert the relative error of got against want is within tol (ENV.tolerance); returns it."""
    tol = ENV.tolerance if tol is None else tol
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)}, expected {tuple(want.shape)}"
    err = rel_err(got, want)
    if not err <= tol:
        bad = ((got.double() - want.double()).abs() > tol * want.double().abs().max()).nonzero()[:5].tolist()
        raise AssertionError(f"{name}: relative error {err:.2e} > {tol:.0e} against the float64 reference; "
                             f"first bad indices {bad}")
    return err
