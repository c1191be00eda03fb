"""The ViT-B FFN with experts, six ways (bench/baselines.py): every N/k/S/r configuration of DESIGN.md, every
placement, forward and forward+backward (frozen base weights; gradients for experts, routers and the input), and
the same against the number of tokens. Each candidate's output (and, for forward+backward, its input, expert and
router gradients) is checked against the float64 ``ak.reference`` before it is timed."""

import pytest
import torch
from baselines import IMPLEMENTATIONS, build, make_ase, reference, trainable
from conftest import CONFIGS, ENV, GPU, PLACEMENTS, TARGET, check_close, config_id, memory_mb, run_timed


def ffn_flops(tokens: int, config, placement: str, impl: str, train: bool) -> float:
    """Useful FLOPs: the frozen FFN, plus for LoRA its factors, plus for the routed variants the router and the
    SELECTED experts' low-rank products (what a perfect kernel must do; the dense-masked variants do more).
    Backward of a frozen GEMM is one GEMM (dx only); of the trained router and experts, two (dx and dW)."""
    d, h = ENV.dim, ENV.hidden
    n, k, s, r = config
    base = 2 * tokens * (d * h + h * d)
    shapes = {"ffn": (d, d), "fc1": (d, h), "fc2": (h, d)}
    targets = ("fc1", "fc2") if placement == "fc1+fc2" else (placement,)
    experts = sum(2 * tokens * (k + s) * r * sum(shapes[p]) for p in targets)
    router = 2 * tokens * d * n
    extra = {"bare": 0, "lora": experts}.get(impl, experts + router)
    return base * (2 if train else 1) + extra * (3 if train else 1)


def _inputs(images: int, train: bool):
    """x (images, 197, d) in the benchmark dtype, and the output gradient for forward+backward."""
    x = torch.randn(images, ENV.tokens_per_image, ENV.dim, device=ENV.device, dtype=ENV.dtype)
    return x.requires_grad_(train), (torch.randn_like(x) if train else None)


def _step(module, train: bool):
    def run(x, grad):
        if train:
            module(x).backward(grad)
        else:
            with torch.no_grad():
                module(x)

    return run


# The float64 reference sees at most 16 images (3,152 tokens): for backward it keeps one (T, d_out) product per
# expert, about 20 GB at 64 images for 64/12/4/1-fc1+fc2.
CHECK_IMAGES = 16


def _check(impl, module, ref, ase, images: int, train: bool) -> float:
    """Compare module with its float64 reference: the output, and for forward+backward the gradients of x and of
    every trained parameter. The candidate runs the benchmark's own shape (a compiled module is not compiled
    twice); tokens are independent, so its first CHECK_IMAGES images, with the output gradient zero elsewhere,
    are compared with the reference run on those images alone. Returns the largest relative error."""
    x, grad = _inputs(images, train)
    n = min(images, CHECK_IMAGES)
    x_ref = x[:n].detach().double().requires_grad_(train)
    with torch.set_grad_enabled(train):
        y, y_ref = module(x), ref(x_ref)
    errs = [check_close(f"{impl} output", y[:n], y_ref)]
    if train:
        grad[n:] = 0
        y.backward(grad)
        y_ref.backward(grad[:n].double())
        errs.append(check_close(f"{impl} grad of x", x.grad[:n], x_ref.grad))
        got = trainable(impl, module, ase)
        for name, p in trainable(impl, ref, getattr(ref, "ase", None)).items():
            assert got[name].grad is not None, f"{impl}: no gradient for {name}"
            errs.append(check_close(f"{impl} grad of {name}", got[name].grad, p.grad))
    return max(errs)


def measure(benchmark, impl: str, config, placement: str, train: bool, images: int) -> None:
    ase = make_ase(ENV.dim, ENV.hidden, config, placement, ENV.device, ENV.dtype)
    module = build(impl, ase)
    ref = reference(impl, module, ase)
    err = _check(impl, module, ref, ase, images, train)
    del ref
    params = list(trainable(impl, module, ase).values())

    def fresh_inputs():
        for p in params:  # as optimizer.zero_grad(set_to_none=True) would: backward allocates the gradients
            p.grad = None
        return _inputs(images, train)

    step = _step(module, train)
    ms = run_timed(benchmark, step, fresh_inputs)
    mem = None
    if GPU or train:  # on a CPU the memory is what autograd saves: nothing in a forward without grad
        inputs = fresh_inputs()
        exclude = [*module.parameters(), *ase.parameters(), *(t for t in inputs if t is not None)]
        mem = memory_mb(step, inputs, exclude=exclude)
    flops = ffn_flops(images * ENV.tokens_per_image, config, placement, impl, train)
    benchmark.extra_info.update(
        impl=impl, config=config_id(config), placement=placement, pass_="fwd+bwd" if train else "fwd",
        images=images, tokens=images * ENV.tokens_per_image, dtype=str(ENV.dtype).removeprefix("torch."),
        device=ENV.device.type, ms=ms, gflop=flops / 1e9, tflops=flops / (ms * 1e-3) / 1e12, memory_mb=mem,
        memory_kind="peak" if GPU else "saved", rel_err=err)


def _cases():
    """Every implementation x configuration x placement x pass, less what would measure the same thing twice:
    the bare frozen Mlp has no experts (measured once, at 32/6/2/2-ffn: the floor of every row); plain LoRA of
    rank (k+S)*r = 16 is the same layer in every configuration (measured at 32/6/2/2). On a CPU, where a
    torch.compile takes many seconds, the compiled variant runs at the target row 32/6/2/2-ffn-fwd+bwd only."""
    for impl in IMPLEMENTATIONS:
        for config in CONFIGS:
            for placement in PLACEMENTS:
                for train in (False, True):
                    if impl == "bare" and (config != TARGET or placement != "ffn"):
                        continue
                    if impl == "lora" and config != TARGET:
                        continue
                    if impl == "compiled" and not GPU and (config != TARGET or placement != "ffn" or not train):
                        continue
                    pass_ = "fwd+bwd" if train else "fwd"
                    yield pytest.param(impl, config, placement, train,
                                       id=f"{impl}-{config_id(config)}-{placement}-{pass_}")


@pytest.mark.parametrize(("impl", "config", "placement", "train"), list(_cases()))
def bench_ffn(benchmark, impl, config, placement, train):
    measure(benchmark, impl, config, placement, train, ENV.images)


@pytest.mark.parametrize("images", ENV.scaling_images, ids=lambda i: f"{i}img")
# CPU: no torch.compile here, it would compile once per shape (measured in bench_ffn)
@pytest.mark.parametrize("impl", [i for i in IMPLEMENTATIONS if GPU or i != "compiled"])
def bench_ffn_scaling(benchmark, impl, images):
    """Forward+backward at 32/6/2/2-ffn against the number of tokens (images x 197)."""
    measure(benchmark, impl, TARGET, "ffn", True, images)

