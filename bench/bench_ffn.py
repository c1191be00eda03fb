"""The ViT-B FFN with experts, six ways (bench/baselines.py), every N/k/S/r configuration and placement, forward
and forward+backward with frozen base weights. Each candidate is checked against a float64 reference first."""

import copy

import pytest
import torch
from baselines import IMPLEMENTATIONS, RoutedMlp, build, loop_delta, make_ase
from conftest import CONFIGS, ENV, GPU, PLACEMENTS, median_ms, memory_bytes, sync

# bf16 on a GPU against float64: outputs are rounded to bf16 (eps 7.8e-3); fp32 on a CPU is exact to ~1e-6
TOLERANCE = 3e-2 if GPU else 1e-4


def ffn_flops(config, placement: str, impl: str, train: bool) -> float:
    """Useful FLOPs: the frozen FFN, and for the routed variants the router and the SELECTED experts' low-rank
    products (what a perfect kernel must do). Backward of a frozen GEMM is one GEMM (dx only); of the
    trainable experts, two (dx and dW)."""
    t, d, h = ENV.tokens, ENV.dim, ENV.hidden
    n, k, s, r = config
    base = 2 * t * (d * h + h * d)
    active = (k + s) * r
    shapes = {"ffn": (d, d), "fc1": (d, h), "fc2": (h, d)}
    targets = ("fc1", "fc2") if placement == "fc1+fc2" else (placement,)
    experts = sum(2 * t * active * (shapes[p][0] + shapes[p][1]) for p in targets)
    router = 2 * t * d * n
    extra = 0 if impl == "bare" else experts + (0 if impl == "lora" else router)
    return base * (2 if train else 1) + extra * (3 if train else 1)


def _reference(impl: str, module, ase):
    """A float64 CPU copy that computes what `module` should: the per-expert loop for the routed variants."""
    if impl in ("loop", "dense", "compiled", "ase"):
        return RoutedMlp(copy.deepcopy(ase).double().cpu(), loop_delta)
    return copy.deepcopy(module).double().cpu()


def _inputs(train: bool):
    x = torch.randn(ENV.images, ENV.tokens_per_image, ENV.dim, device=ENV.device, dtype=ENV.dtype)
    grad = torch.randn_like(x) if train else None
    return (x.requires_grad_(train), grad)


def _step(module, train: bool):
    def run(x, grad):
        if train:
            module(x).backward(grad)
        else:
            with torch.no_grad():
                module(x)
        sync()

    return run


def _cases():
    """Every (implementation, configuration, placement), except: the bare and plain-LoRA FFNs do not depend on
    N/k/S/r and are measured once, at 32/6/2/2; on a CPU, torch.compile (seconds per compile) only at 32/6/2/2 ffn."""
    for impl in IMPLEMENTATIONS:
        for config in CONFIGS:
            for placement in PLACEMENTS:
                if impl in ("bare", "lora") and config != (32, 6, 2, 2):
                    continue
                if impl == "compiled" and not GPU and (config != (32, 6, 2, 2) or placement != "ffn"):
                    continue
                yield pytest.param(impl, config, placement, id=f"{impl}-{'/'.join(map(str, config))}-{placement}")


@pytest.mark.parametrize("train", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("impl,config,placement", list(_cases()))
def bench_ffn(benchmark, impl, config, placement, train):
    torch.manual_seed(0)
    ase = make_ase(ENV.dim, ENV.hidden, config, placement, ENV.device, ENV.dtype)
    module = build(impl, ase)

    x, _ = _inputs(False)
    with torch.no_grad():
        got = module(x).double().cpu()
        want = _reference(impl, module, ase)(x.double().cpu())
    err = ((got - want).norm() / want.norm()).item()
    assert err < TOLERANCE, f"{impl} differs from the reference: relative error {err:.2e}"

    step = _step(module, train)
    ms = median_ms(step, lambda: _inputs(train), ENV.rounds, ENV.warmup)
    mem = memory_bytes(step, _inputs(train)) if train else None
    flops = ffn_flops(config, placement, impl, train)
    benchmark.extra_info.update(
        impl=impl, config="/".join(map(str, config)), placement=placement, pass_="fwd+bwd" if train else "fwd",
        tokens=ENV.tokens, ms=ms, tflops=flops / (ms * 1e-3) / 1e12, memory_mb=None if mem is None else mem / 2**20,
        memory_kind="peak" if GPU else "saved", rel_err=err)
    benchmark.pedantic(step, setup=lambda: (_inputs(train), {}), rounds=ENV.rounds, warmup_rounds=ENV.warmup)


@pytest.mark.parametrize("images", [1, 8, 64] if GPU else [1, 2], ids=lambda i: f"{i}img")
@pytest.mark.parametrize("impl", ["bare", "ase"])
def bench_ffn_token_scaling(benchmark, impl, images):
    """Forward+backward time against the number of images (tokens = images * 197), at 32/6/2/2 ffn."""
    torch.manual_seed(0)
    module = build(impl, make_ase(ENV.dim, ENV.hidden, (32, 6, 2, 2), "ffn", ENV.device, ENV.dtype))

    def inputs():
        x = torch.randn(images, ENV.tokens_per_image, ENV.dim, device=ENV.device, dtype=ENV.dtype)
        return x.requires_grad_(), torch.randn_like(x)

    step = _step(module, True)
    ms = median_ms(step, inputs, ENV.rounds, ENV.warmup)
    benchmark.extra_info.update(impl=impl, images=images, tokens=images * ENV.tokens_per_image, ms=ms)
    benchmark.pedantic(step, setup=lambda: (inputs(), {}), rounds=ENV.rounds, warmup_rounds=ENV.warmup)
