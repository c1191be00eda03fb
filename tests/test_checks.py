"""ase_kernels/checks.py: bad input fails with a clear error naming the argument, on every backend."""

import pytest
import torch
from conftest import DEVICE

import ase_kernels as ak
from ase_kernels.checks import Routing


@pytest.fixture(params=["reference", "torch", "triton"])
def any_backend(request, monkeypatch):
    monkeypatch.setenv("ASE_KERNELS_BACKEND", request.param)
    return request.param


def _route_args(tokens=6, d=8, n=8, tasks=2):
    return torch.randn(tokens, d, device=DEVICE), torch.randn(tasks, n, d, device=DEVICE), torch.arange(
        tokens, device=DEVICE) % tasks


ROUTE_CASES = [
    pytest.param(lambda x, w, ids: (x.long(), w, ids, {}), TypeError, "x must be float", id="int-x"),
    pytest.param(lambda x, w, ids: (x, w[0], ids, {}), ValueError, "router_weight must have 3 dimensions",
                 id="2d-router"),
    pytest.param(lambda x, w, ids: (x, w[:, :, :5], ids, {}), ValueError, r"router_weight must have shape",
                 id="router-d_in"),
    pytest.param(lambda x, w, ids: (x, w.half(), ids, {}), TypeError, "router_weight must have dtype", id="dtype"),
    pytest.param(lambda x, w, ids: (x, w.to("meta"), ids, {}), ValueError, "router_weight must be on",
                 id="device"),
    pytest.param(lambda x, w, ids: (x, w, ids, dict(top_k=8)), ValueError, "top_k must be an int in", id="k>N-S"),
    pytest.param(lambda x, w, ids: (x, w, ids, dict(top_k=-1)), ValueError, "top_k", id="negative-k"),
    pytest.param(lambda x, w, ids: (x, w, ids, dict(num_shared=9)), ValueError, "num_shared must be", id="S>N"),
    pytest.param(lambda x, w, ids: (x, w, ids, dict(top_k=0, num_shared=0)), ValueError, "at least 1",
                 id="no-experts"),
    pytest.param(lambda x, w, ids: (x, w, ids, dict(mode="none")), ValueError, "mode 'none'", id="none-with-S"),
    pytest.param(lambda x, w, ids: (x, w, ids, dict(mode="softmax")), ValueError, "mode must be", id="bad-mode"),
    pytest.param(lambda x, w, ids: (x, w, ids + 1, {}), ValueError, r"task_ids must lie in \[0, 2\)",
                 id="task-out-of-range"),
    pytest.param(lambda x, w, ids: (x, w, ids - 1, {}), ValueError, "task_ids must lie in", id="negative-task"),
    pytest.param(lambda x, w, ids: (x, w, ids[:4], {}), ValueError, "task_ids must have one id per token",
                 id="task-count"),
    pytest.param(lambda x, w, ids: (x, w, ids.float(), {}), TypeError, "task_ids must be an integer", id="float-ids"),
    pytest.param(lambda x, w, ids: (x, w, None, {}), ValueError, "task_ids is required", id="missing-ids"),
    pytest.param(lambda x, w, ids: (x, w, ids[:, None], {}), ValueError, "task_ids must have 1 dimensions",
                 id="2d-ids"),
]


@pytest.mark.parametrize("make,error,match", ROUTE_CASES)
def test_route_rejects_bad_input(any_backend, make, error, match):
    x, w, ids, kw = make(*_route_args())
    kwargs = dict(top_k=2, num_shared=1, mode="adaptive") | kw
    with pytest.raises(error, match=match):
        ak.route(x, w, ids, **kwargs)


def _moe_args(tokens=6, d_in=8, d_out=5, n=8, r=2):
    x, w, ids = _route_args(tokens, d_in, n)
    routing = ak.route(x, w, ids, top_k=2, num_shared=1)
    return x, torch.randn(n, r, d_in, device=DEVICE), torch.randn(n, d_out, r, device=DEVICE), routing


MOE_CASES = [
    pytest.param(lambda x, a, b, r: ((x, a[:, :, :3], b, r), {}), ValueError, "lora_A must have shape", id="A-d_in"),
    pytest.param(lambda x, a, b, r: ((x, a, b[:4], r), {}), ValueError, "lora_B must have shape", id="B-experts"),
    pytest.param(lambda x, a, b, r: ((x, a, b[..., :1], r), {}), ValueError, "lora_B must have shape", id="B-rank"),
    pytest.param(lambda x, a, b, r: ((x, a.half(), b, r), {}), TypeError, "lora_A must have dtype", id="A-dtype"),
    pytest.param(lambda x, a, b, r: ((x, a, b, (r.indices[:3], r.gates[:3], r.prob_sums)), {}), ValueError,
                 "routing must cover the 6 tokens", id="routing-tokens"),
    pytest.param(lambda x, a, b, r: ((x, a, b, Routing(r.indices.int(), r.gates, r.prob_sums)), {}), TypeError,
                 "routing.indices must be int64", id="indices-dtype"),
    pytest.param(lambda x, a, b, r: ((x, a, b, r.gates), {}), TypeError, "routing must be the Routing",
                 id="not-routing"),
    pytest.param(lambda x, a, b, r: ((x, a, b, r), dict(base_weight=torch.randn(5, 7, device=DEVICE))), ValueError,
                 "base_input is required", id="weight-without-input"),
    pytest.param(lambda x, a, b, r: ((x, a, b, r), dict(base_input=x, base_weight=torch.randn(4, 8, device=DEVICE))),
                 ValueError, r"base_weight must have shape \(5, d_base\)", id="base-d_out"),
    pytest.param(lambda x, a, b, r: ((x, a, b, r), dict(base_input=x[:, :7], base_weight=torch.randn(5, 8,
                 device=DEVICE))), ValueError, "base_input must have shape", id="base-input-shape"),
    pytest.param(lambda x, a, b, r: ((x, a, b, r), dict(base_input=x, base_weight=torch.randn(5, 8, device=DEVICE),
                 base_bias=torch.randn(4, device=DEVICE))), ValueError, r"base_bias must have shape \(5,\)",
                 id="bias-shape"),
    pytest.param(lambda x, a, b, r: ((x, a, b, r), dict(base_bias=torch.randn(5, device=DEVICE))), ValueError,
                 "need base_weight", id="bias-without-weight"),
]


@pytest.mark.parametrize("make,error,match", MOE_CASES)
def test_moe_lora_rejects_bad_input(any_backend, make, error, match):
    args, kwargs = make(*_moe_args())
    with pytest.raises(error, match=match):
        ak.moe_lora(*args, **kwargs)


def test_modules_reject_bad_configuration():
    with pytest.raises(ValueError, match="top_k"):
        ak.ASEMlp(8, 16, num_experts=8, top_k=7, num_shared=2, rank=2)
    with pytest.raises(ValueError, match="mode must be one of"):
        ak.ASEMlp(8, 16, num_experts=8, top_k=2, num_shared=1, rank=2, mode="dense")
    with pytest.raises(ValueError, match="placement must be one of"):
        ak.ASEMlp(8, 16, num_experts=8, top_k=2, num_shared=1, rank=2, placement="attn")
    with pytest.raises(TypeError, match="base must be an nn.Linear"):
        ak.MoELoRALinear(torch.nn.Conv1d(2, 2, 1))


def test_task_ids_are_checked_again_after_an_in_place_change(any_backend):
    x, w, ids = _route_args()
    ak.route(x, w, ids, top_k=2, num_shared=1)
    ids[0] = 5  # same tensor, new version: the cached check must not hide this
    with pytest.raises(ValueError, match="task_ids must lie in"):
        ak.route(x, w, ids, top_k=2, num_shared=1)


def test_task_ids_made_in_inference_mode_are_checked(any_backend):
    """An inference tensor has no version counter to cache its check on: it is checked at every call."""
    x, w, ids = _route_args()
    want = ak.route(x, w, ids, top_k=2, num_shared=1).gates
    with torch.inference_mode():
        ids = ids.clone()
        assert torch.equal(ak.route(x, w, ids, top_k=2, num_shared=1).gates, want)
        ids[0] = 5
        with pytest.raises(ValueError, match="task_ids must lie in"):
            ak.route(x, w, ids, top_k=2, num_shared=1)


def test_a_one_task_module_trains_after_an_inference_mode_call(any_backend):
    """The zero task ids of a one-task call are a cached buffer; one made in inference mode would be an inference
    tensor that autograd refuses to save in every later training call."""
    mlp = ak.ASEMlp(8, 16, num_experts=4, top_k=1, num_shared=1, rank=2).to(DEVICE)
    x = torch.randn(3, 5, 8, device=DEVICE)
    with torch.inference_mode():
        want = mlp(x)
    y = mlp(x)
    y.sum().backward()
    assert torch.equal(y.detach(), want) and mlp.router.grad is not None


def _ffn_args(d=8, hidden=20, d_out=5):
    x, a, b, routing = _moe_args(d_in=d, d_out=d_out)
    w1, b1 = torch.randn(hidden, d, device=DEVICE), torch.randn(hidden, device=DEVICE)
    w2, b2 = torch.randn(d_out, hidden, device=DEVICE), torch.randn(d_out, device=DEVICE)
    return [x, w1, b1, w2, b2, a, b, routing]


FFN_CASES = [
    pytest.param(1, lambda w1: w1[:, :7], ValueError, r"fc1_weight must have shape \(hidden, 8\)", id="fc1-d"),
    pytest.param(3, lambda w2: w2[:, :19], ValueError, r"fc2_weight must have shape \(d_out, 20\)", id="fc2-hidden"),
    pytest.param(2, lambda b1: b1[:3], ValueError, r"fc1_bias must have shape \(20,\)", id="fc1-bias"),
    pytest.param(3, lambda w2: w2.double(), TypeError, "fc2_weight must have dtype", id="fc2-dtype"),
    pytest.param(6, lambda b: b[:, :4], ValueError, r"lora_B must have shape \(N, 5, r\) to match fc2", id="B-d_out"),
]


@pytest.mark.parametrize("position,change,error,match", FFN_CASES)
def test_moe_lora_ffn_rejects_bad_input(any_backend, position, change, error, match):
    args = _ffn_args()
    args[position] = change(args[position])
    with pytest.raises(error, match=match):
        ak.moe_lora_ffn(*args)


class _CountOps(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the aten ops run inside it: device work (and any read-back) shows up here."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_task_ids_are_checked_and_expanded_once_per_tensor():
    """The range check reads values back to the host: it runs once per ids tensor (and version), then every layer
    gets the cached per-token ids without any device op (no sync, no launch)."""
    from ase_kernels.checks import token_task_ids

    x, per_image = torch.randn(4, 7, 16, device=DEVICE), torch.tensor([2, 0, 1, 2], device=DEVICE)
    first, zeros = token_task_ids(per_image, x, 3), token_task_ids(None, x, 1)
    with _CountOps() as counted:
        again = token_task_ids(per_image, x, 3)
        zeros_again = token_task_ids(None, x, 1)
    assert again is first and torch.equal(first, per_image.repeat_interleave(7))
    assert not zeros.any() and zeros.shape == (28,) and zeros_again.data_ptr() == zeros.data_ptr()
    assert all(op == "aten.slice.Tensor" for op in counted.ops), f"device work on a cached call: {counted.ops}"


@pytest.mark.parametrize("bad", [-1, 2], ids=["negative", "too-large"])
def test_task_ids_out_of_range_fail_under_torch_compile(any_backend, bad):
    """Compiled code cannot read the ids back: a device-side assert must still refuse them (no silent routing)."""
    if any_backend == "reference":
        pytest.skip("the reference is a float64 loop, not meant to be compiled")
    x, w, ids = _route_args()
    route = torch.compile(lambda x, w, ids: ak.route(x, w, ids, top_k=2, num_shared=1).gates, fullgraph=True)
    route(x, w, ids)
    ids = ids.clone()
    ids[1] = bad
    with pytest.raises(RuntimeError, match=r"task_ids must lie in \[0, 2\)"):
        route(x, w, ids)
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
