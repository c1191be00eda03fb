"""ase_kernels/ops.py: dispatch, torch.library registration (opcheck), torch.compile, autocast, empty batches,
the MI loss, and gradcheck of the registered ops in float64."""

import math

import pytest
import torch
from conftest import DEVICE
from helpers import assert_close, leaf, rounded

import ase_kernels as ak
from ase_kernels import reference
from ase_kernels.checks import Routing


def _problem(tokens=13, d_in=16, d_out=12, n=8, k=2, s=1, r=2, tasks=2, dtype=torch.float32, device=DEVICE):
    x = torch.randn(tokens, d_in, dtype=dtype, device=device)
    w = torch.randn(tasks, n, d_in, dtype=dtype, device=device)
    ids = torch.arange(tokens, device=device) % tasks
    a = torch.randn(n, r, d_in, dtype=dtype, device=device)
    b = torch.randn(n, d_out, r, dtype=dtype, device=device)
    return x, w, ids, a, b, (n, k, s, r)


def test_default_backend_is_torch_on_cpu_and_triton_on_cuda(monkeypatch):
    monkeypatch.delenv("ASE_KERNELS_BACKEND", raising=False)
    assert ak.backend(torch.zeros(1)) == "torch"
    if torch.cuda.is_available():
        assert ak.backend(torch.zeros(1, device="cuda")) == "triton"


def test_backend_env_forces_one_and_rejects_unknown(monkeypatch):
    for name in ak.BACKENDS:
        monkeypatch.setenv("ASE_KERNELS_BACKEND", name)
        assert ak.backend(torch.zeros(1)) == name
    monkeypatch.setenv("ASE_KERNELS_BACKEND", "cuda")
    with pytest.raises(ValueError, match="ASE_KERNELS_BACKEND"):
        ak.backend(torch.zeros(1))


def test_reference_backend_goes_through_the_public_ops(monkeypatch):
    monkeypatch.setenv("ASE_KERNELS_BACKEND", "reference")
    x, w, ids, a, b, (n, k, s, r) = _problem(device="cpu")
    got = ak.moe_lora(x, a, b, ak.route(x, w, ids, top_k=k, num_shared=s))
    want = reference.moe_lora(x, a, b, reference.route(x, w, ids, top_k=k, num_shared=s))
    assert torch.equal(got, want)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter's bf16 guard is a CPU-only path")
def test_triton_interpreter_refuses_bf16_unless_taught(monkeypatch):
    """A user's interpreter multiplies bf16 bit patterns: refused. The tests' interpreter is taught bf16
    (tests/interpreter_bf16.py) and marked so: accepted."""
    from interpreter_bf16 import MARK
    from triton.runtime.interpreter import InterpreterBuilder

    monkeypatch.setenv("ASE_KERNELS_BACKEND", "triton")
    x, w, ids, *_ = _problem(dtype=torch.bfloat16, device="cpu")
    assert getattr(InterpreterBuilder, MARK) is True, "conftest.py installs the bf16 interpreter patch"
    assert ak.route(x, w, ids, top_k=2, num_shared=1).indices.shape == (13, 3)
    monkeypatch.setattr(InterpreterBuilder, MARK, False)
    with pytest.raises(TypeError, match="bf16"):
        ak.route(x, w, ids, top_k=2, num_shared=1)


def test_opcheck_route_and_moe_lora(backend):
    x, w, ids, a, b, (n, k, s, r) = _problem()
    x.requires_grad_(), w.requires_grad_(), a.requires_grad_(), b.requires_grad_()
    for mode in ["adaptive", "naive"]:
        torch.library.opcheck(torch.ops.ase_kernels.route.default, (x, w, ids, k, s, mode))
    routing = ak.route(x, w, ids, top_k=k, num_shared=s)
    gates = routing.gates.detach().requires_grad_()
    h = torch.randn(x.shape[0], 20, device=DEVICE, requires_grad=True)
    w0, b0 = torch.randn(12, 20, device=DEVICE), torch.randn(12, device=DEVICE)
    for args in [(h, w0, b0, False), (None, None, None, False)]:
        torch.library.opcheck(torch.ops.ase_kernels.moe_lora.default, (x, a, b, routing.indices, gates, 1.5, *args))
    w_x = torch.randn(12, 16, device=DEVICE)
    torch.library.opcheck(torch.ops.ase_kernels.moe_lora.default,
                          (x, a, b, routing.indices, gates, 1.5, None, w_x, None, True))
    w1, b1 = torch.randn(40, 16, device=DEVICE), torch.randn(40, device=DEVICE)
    w2, b2 = torch.randn(12, 40, device=DEVICE), torch.randn(12, device=DEVICE)
    for biases in [(b1, b2), (None, None)]:
        torch.library.opcheck(torch.ops.ase_kernels.moe_lora_ffn.default,
                              (x, w1, biases[0], w2, biases[1], a, b, routing.indices, gates, 0.5))


@pytest.mark.parametrize("mode,s", [("adaptive", 1), ("naive", 1), ("none", 0)])
def test_registered_ops_gradcheck_float64(monkeypatch, mode, s):
    """The custom ops' autograd formulas (torch path, float64) against finite differences."""
    monkeypatch.setenv("ASE_KERNELS_BACKEND", "torch")
    x, w, ids, a, b, (n, k, _, r) = _problem(tokens=7, d_in=5, d_out=4, n=6, dtype=torch.float64, device="cpu")
    h, w0 = torch.randn(7, 6, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)
    for t in (x, w, a, b, h):
        t.requires_grad_()

    def f(x, w, a, b, h):
        r_ = ak.route(x, w, ids, top_k=k, num_shared=s, mode=mode)
        y = ak.moe_lora(x, a, b, r_, 0.7, base_input=h, base_weight=w0)
        return y, ak.mi_loss(r_.prob_sums)

    assert torch.autograd.gradcheck(f, (x, w, a, b, h))


def test_torch_compile_fullgraph_matches_eager(backend):
    x, w, ids, a, b, (n, k, s, r) = _problem()
    h, w0, b0 = torch.randn(x.shape[0], 20, device=DEVICE), torch.randn(12, 20, device=DEVICE), torch.randn(12)

    def layer(x, w, a, b, h):
        routing = ak.route(x, w, ids, top_k=k, num_shared=s)
        return ak.moe_lora(x, a, b, routing, 1.0, h, w0, b0.to(x.device)), ak.mi_loss(routing.prob_sums)

    leaves = [t.clone().requires_grad_() for t in (x, w, a, b, h)]
    y, aux = layer(*leaves)
    (y.sum() + aux).backward()
    compiled = torch.compile(layer, fullgraph=True)
    leaves_c = [t.clone().requires_grad_() for t in (x, w, a, b, h)]
    y_c, aux_c = compiled(*leaves_c)
    (y_c.sum() + aux_c).backward()
    assert_close("y", y, y_c)
    for name, t, t_c in zip("xwabh", leaves, leaves_c, strict=True):
        assert_close(f"d{name}", t.grad, t_c.grad)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_autocast_runs_in_the_autocast_dtype(backend, dtype):
    x, w, ids, a, b, (n, k, s, r) = _problem()
    with torch.autocast(DEVICE.type, dtype=dtype):
        routing = ak.route(x, w, ids, top_k=k, num_shared=s)
        y = ak.moe_lora(x, a, b, routing)
    assert y.dtype == dtype and routing.gates.dtype == torch.float32
    # float64 on the inputs as autocast rounded them
    ref = reference.moe_lora(*(rounded(t, dtype) for t in (x, a, b)),
                             reference.route(rounded(x, dtype), rounded(w, dtype), ids, top_k=k, num_shared=s))
    assert_close("y", ref, y, dtype)


def test_empty_token_batch(backend):
    x, w, ids, a, b, (n, k, s, r) = _problem(tokens=0)
    x.requires_grad_()
    routing = ak.route(x, w, ids, top_k=k, num_shared=s)
    assert routing.indices.shape == (0, k + s) and routing.gates.shape == (0, k + s)
    assert routing.prob_sums.shape == (2, n) and (routing.prob_sums == 0).all()
    y = ak.moe_lora(x, a, b, routing)
    assert y.shape == (0, 12)
    assert float(ak.mi_loss(routing.prob_sums).detach()) == 0.0


def test_leading_batch_dims_and_per_image_task_ids(backend):
    x = torch.randn(4, 7, 16, device=DEVICE)
    w = torch.randn(3, 8, 16, device=DEVICE)
    per_image = torch.tensor([2, 0, 1, 2], device=DEVICE)
    r_img = ak.route(x, w, per_image, top_k=2, num_shared=1)
    r_tok = ak.route(x.reshape(-1, 16), w, per_image.repeat_interleave(7), top_k=2, num_shared=1)
    assert torch.equal(r_img.indices, r_tok.indices) and torch.equal(r_img.gates, r_tok.gates)
    y = ak.moe_lora(x, torch.randn(8, 2, 16, device=DEVICE), torch.randn(8, 5, 2, device=DEVICE), r_img)
    assert y.shape == (4, 7, 5)


def test_mi_loss_matches_reference_and_its_gradient():
    prob_sums = (torch.rand(5, 32, dtype=torch.float64) * 10).requires_grad_()
    prob_sums_r = prob_sums.detach().clone().requires_grad_()
    ak.mi_loss(prob_sums).backward()
    reference.mi_loss(prob_sums_r).backward()
    assert_close("mi_loss grad", prob_sums_r.grad, prob_sums.grad)
    assert math.isclose(ak.mi_loss(prob_sums).item(), reference.mi_loss(prob_sums_r).item(), rel_tol=1e-12)


def test_mi_loss_with_an_absent_task_is_finite():
    prob_sums = torch.tensor([[3.0, 1.0], [0.0, 0.0], [1.0, 3.0]], requires_grad=True)
    loss = ak.mi_loss(prob_sums)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(prob_sums.grad).all()
    assert_close("loss", reference.mi_loss(prob_sums.detach().double()), loss.detach(), torch.float32)


def test_gradients_reach_router_through_moe_lora(backend):
    """End to end: a loss of y alone trains the router through the gates (no MI term)."""
    x, w, ids, a, b, (n, k, s, r) = _problem()
    x_t, w_t, a_t, b_t = (leaf(t, torch.float32, DEVICE) for t in (x, w, a, b))
    x_r, w_r, a_r, b_r = (leaf(t, torch.float64, "cpu") for t in (x, w, a, b))
    ak.moe_lora(x_t, a_t, b_t, ak.route(x_t, w_t, ids, top_k=k, num_shared=s)).square().sum().backward()
    reference.moe_lora(x_r, a_r, b_r, reference.route(x_r, w_r, ids.cpu(), top_k=k, num_shared=s)).square().sum() \
        .backward()
    assert w_t.grad.abs().sum() > 0
    assert_close("d_router_weight", w_r.grad, w_t.grad)
    assert_close("dx", x_r.grad, x_t.grad)


def test_routing_is_a_named_tuple():
    r = Routing(torch.zeros(1, 1, dtype=torch.int64), torch.ones(1, 1), torch.ones(1, 1))
    indices, gates, prob_sums = r
    assert r.indices is indices and r.gates is gates and r.prob_sums is prob_sums
