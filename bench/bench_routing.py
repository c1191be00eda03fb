"""The router alone: ak.route (one fused kernel on a GPU) against torch topk + softmax, forward and backward."""

import pytest
import torch
from baselines import torch_route
from conftest import CONFIGS, ENV, median_ms, sync

import ase_kernels as ak

TASKS = 5


def _inputs(n: int):
    x = torch.randn(ENV.tokens, ENV.dim, device=ENV.device, dtype=ENV.dtype, requires_grad=True)
    w = torch.randn(TASKS, n, ENV.dim, device=ENV.device, dtype=ENV.dtype) * ENV.dim**-0.5
    ids = torch.arange(TASKS, device=ENV.device).repeat_interleave(ENV.tokens // TASKS + 1)[: ENV.tokens]
    return x, w.requires_grad_(), ids


def _ase(x, w, ids, k, s):
    r = ak.route(x, w, ids, top_k=k, num_shared=s)
    (r.gates.sum() + ak.mi_loss(r.prob_sums)).backward()
    sync()


def _torch(x, w, ids, k, s):
    """What one would write: every token's logits under its own task's router, then topk and softmax."""
    z_all = (x @ w.reshape(-1, w.shape[-1]).T).view(x.shape[0], TASKS, -1)
    z = z_all.gather(1, ids.view(-1, 1, 1).expand(-1, 1, z_all.shape[-1])).squeeze(1)
    _, gates = torch_route_from_logits(z, k, s)
    p = torch.softmax(z.float(), -1)
    prob_sums = torch.zeros(TASKS, z.shape[1], device=z.device).index_add(0, ids, p)
    (gates.sum() + ak.mi_loss(prob_sums)).backward()
    sync()


def torch_route_from_logits(z, k, s):
    eye = torch.eye(z.shape[1], device=z.device, dtype=z.dtype)[None]
    return torch_route(z, eye, k, s, "adaptive")


@pytest.mark.parametrize("impl", ["ase", "torch"])
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "/".join(map(str, c)))
def bench_route(benchmark, impl, config):
    n, k, s, _ = config
    fn = _ase if impl == "ase" else _torch
    x, w, ids = _inputs(n)
    r = ak.route(x, w, ids, top_k=k, num_shared=s)
    assert torch.allclose(r.gates.sum(-1), torch.ones(ENV.tokens, device=ENV.device), atol=1e-5)

    def run(x, w, ids):
        fn(x, w, ids, k, s)

    ms = median_ms(run, lambda: _inputs(n), ENV.rounds, ENV.warmup)
    benchmark.extra_info.update(impl=impl, config="/".join(map(str, config)), pass_="fwd+bwd", tokens=ENV.tokens,
                                ms=ms)
    benchmark.pedantic(run, setup=lambda: (_inputs(n), {}), rounds=ENV.rounds, warmup_rounds=ENV.warmup)
