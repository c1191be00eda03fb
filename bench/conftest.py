"""Benchmark settings: the ViT-B FFN in bf16 on a GPU, small shapes in fp32 on a CPU (a minute, for CI), and the
software and hardware of the run in pytest-benchmark's machine info."""

import platform
import statistics
import time
from dataclasses import dataclass

import pytest
import torch
import triton

GPU = torch.cuda.is_available()
CONFIGS = [(16, 4, 0, 4), (32, 8, 0, 2), (16, 3, 1, 4), (32, 6, 2, 2), (64, 12, 4, 1)]  # N/k/S/r, DESIGN.md
PLACEMENTS = ("ffn", "fc1", "fc2", "fc1+fc2")


@dataclass(frozen=True)
class Env:
    device: torch.device
    dtype: torch.dtype
    dim: int
    hidden: int
    images: int
    tokens_per_image: int
    rounds: int
    warmup: int

    @property
    def tokens(self) -> int:
        return self.images * self.tokens_per_image


# GPU: DESIGN.md's workload, 64 images x 197 tokens = 12,608 tokens, 768 -> 3072 -> 768, bf16.
# CPU: the same structure at a size that runs the whole suite in about a minute.
ENV = (Env(torch.device("cuda"), torch.bfloat16, 768, 3072, 64, 197, rounds=30, warmup=10) if GPU
       else Env(torch.device("cpu"), torch.float32, 64, 256, 1, 197, rounds=3, warmup=1))


@pytest.fixture
def env() -> Env:
    return ENV


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["torch"] = torch.__version__
    machine_info["triton"] = triton.__version__
    machine_info["python"] = platform.python_version()
    if GPU:
        machine_info["gpu"] = torch.cuda.get_device_name()
        machine_info["cuda"] = torch.version.cuda
        machine_info["gpu_memory_gb"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    machine_info["dtype"] = str(ENV.dtype).removeprefix("torch.")
    machine_info["shape"] = f"{ENV.tokens} tokens, {ENV.dim} -> {ENV.hidden} -> {ENV.dim}"


def sync() -> None:
    if GPU:
        torch.cuda.synchronize()


def median_ms(fn, make_inputs, rounds: int, warmup: int) -> float:
    """Median time of fn(*inputs) over fresh inputs each round: CUDA events on a GPU, a host clock on a CPU."""
    for _ in range(warmup):
        fn(*make_inputs())
    sync()
    times = []
    for _ in range(rounds):
        inputs = make_inputs()
        if GPU:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(*inputs)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn(*inputs)
            times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def memory_bytes(fn, inputs) -> int:
    """GPU: peak allocated above what was allocated before fn. CPU: bytes of the tensors autograd saved for
    backward during fn (the activations a training step holds)."""
    if GPU:
        sync()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn(*inputs)
        sync()
        return torch.cuda.max_memory_allocated() - before
    seen, total = set(), 0

    def pack(t):
        nonlocal total
        key = (t.untyped_storage().data_ptr(), t.dtype)
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*inputs)
    return total
