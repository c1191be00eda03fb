"""The router alone, 5 task-specific routers on task-major tokens: ``ak.route`` (indices, gates and the per-task
probability sums of the MI loss) against torch topk + softmax, forward and forward+backward, for every
configuration (N at fixed N * r) and against the number of tokens. Both are checked against the float64
``ak.reference.route`` first."""

import pytest
import torch
import torch.nn.functional as F
from baselines import topk_gates
from conftest import CONFIGS, ENV, GPU, TARGET, check_close, config_id, memory_mb, run_timed

import ase_kernels as ak

TASKS = 5
IMPLS = ("ase", "torch")


def ase_route(x, w, ids, top_k, num_shared, mode):
    r = ak.route(x, w, ids, top_k=top_k, num_shared=num_shared, mode=mode)
    return r.indices, r.gates, r.prob_sums


def torch_route_tasks(x, w, ids, top_k, num_shared, mode):
    """What one writes in PyTorch: every task's logits in one float32 GEMM, each token's own task gathered, then
    topk + softmax, and the per-task sums of the full softmax by index_add. x (T, d), w (tasks, N, d), ids (T,)
    -> indices (T, k + S), gates (T, k + S), prob_sums (tasks, N)."""
    tasks, n, d = w.shape
    z_all = F.linear(x.float(), w.float().reshape(tasks * n, d)).view(-1, tasks, n)  # (T, tasks, N)
    z = z_all.gather(1, ids.view(-1, 1, 1).expand(-1, 1, n)).squeeze(1)  # (T, N)
    indices, gates = topk_gates(z, top_k, num_shared, mode)
    prob_sums = z.new_zeros(tasks, n).index_add(0, ids, torch.softmax(z, -1))  # (tasks, N)
    return indices, gates, prob_sums


def reference_route(x, w, ids, top_k, num_shared, mode):
    r = ak.reference.route(x.double(), w.double(), ids, top_k=top_k, num_shared=num_shared, mode=mode)
    return r.indices, r.gates, r.prob_sums


def _inputs(n: int, ks: int, images: int, train: bool):
    """x (T, d), router weights (5, N, d), task ids (T,) task-major by image, and the weights of the gates in the
    loss that backward starts from."""
    tokens = images * ENV.tokens_per_image
    x = torch.randn(tokens, ENV.dim, device=ENV.device, dtype=ENV.dtype)
    w = torch.randn(TASKS, n, ENV.dim, device=ENV.device, dtype=ENV.dtype) * ENV.dim**-0.5
    image_task = torch.arange(images, device=ENV.device) * TASKS // images  # (images,)
    ids = image_task.repeat_interleave(ENV.tokens_per_image)  # (T,)
    dg = torch.randn(tokens, ks, device=ENV.device) if train else None
    return x.requires_grad_(train), w.requires_grad_(train), ids, dg


def _loss(gates, prob_sums, dg):
    return (gates * dg).sum() + ak.mi_loss(prob_sums)


def _check(fn, config, mode, images: int, train: bool) -> float:
    """Compare fn with the float64 reference: the same experts per token, their gates, the probability sums,
    and for forward+backward the gradients of x and of the router weights."""
    n, k, s, _ = config
    x, w, ids, dg = _inputs(n, k + s, images, train)
    x_ref, w_ref = (t.detach().double().requires_grad_(train) for t in (x, w))
    with torch.set_grad_enabled(train):
        indices, gates, prob_sums = fn(x, w, ids, k, s, mode)
        ref_indices, ref_gates, ref_sums = reference_route(x_ref, w_ref, ids, k, s, mode)
    same = (indices == ref_indices).all(-1)
    # float32 logits against float64 ones: a flip needs two logits within ~1e-6; allow one token in a thousand
    assert same.float().mean() >= 0.999, f"{(~same).sum().item()} tokens select other experts than the reference"
    errs = [check_close("gates", gates[same], ref_gates[same]), check_close("prob_sums", prob_sums, ref_sums)]
    if train:
        _loss(gates, prob_sums, dg).backward()
        _loss(ref_gates, ref_sums, dg.double()).backward()
        errs += [check_close("grad of x", x.grad, x_ref.grad), check_close("grad of router", w.grad, w_ref.grad)]
    return max(errs)


def measure(benchmark, impl: str, config, train: bool, images: int) -> None:
    n, k, s, _ = config
    mode = "adaptive" if s else "none"
    fn = ase_route if impl == "ase" else torch_route_tasks
    err = _check(fn, config, mode, images, train)

    def step(x, w, ids, dg):
        if train:
            _, gates, prob_sums = fn(x, w, ids, k, s, mode)
            _loss(gates, prob_sums, dg).backward()
        else:
            with torch.no_grad():
                fn(x, w, ids, k, s, mode)

    ms = run_timed(benchmark, step, lambda: _inputs(n, k + s, images, train))
    mem = None
    if GPU or train:
        inputs = _inputs(n, k + s, images, train)
        mem = memory_mb(step, inputs, exclude=[t for t in inputs if t is not None])
    tokens = images * ENV.tokens_per_image
    flops = 2 * tokens * ENV.dim * n * (3 if train else 1)  # each token's own router; backward: dx and dW
    benchmark.extra_info.update(
        impl=impl, config=config_id(config), pass_="fwd+bwd" if train else "fwd", images=images, tokens=tokens,
        tasks=TASKS, dtype=str(ENV.dtype).removeprefix("torch."), device=ENV.device.type, ms=ms,
        gflop=flops / 1e9, tflops=flops / (ms * 1e-3) / 1e12, memory_mb=mem, memory_kind="peak" if GPU else "saved",
        rel_err=err)


@pytest.mark.parametrize("train", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("config", CONFIGS, ids=config_id)
@pytest.mark.parametrize("impl", IMPLS)
def bench_route(benchmark, impl, config, train):
    measure(benchmark, impl, config, train, ENV.images)


@pytest.mark.parametrize("images", ENV.scaling_images, ids=lambda i: f"{i}img")
@pytest.mark.parametrize("impl", IMPLS)
def bench_route_scaling(benchmark, impl, images):
    """Forward+backward at 32/6/2/2 against the number of tokens (images x 197)."""
    measure(benchmark, impl, TARGET, True, images)
