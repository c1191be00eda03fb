"""One behaviour on every backend (reference, torch, Triton, each fast one also under torch.compile) for the
inputs at the edges: NaN and inf, out-of-range routing indices, empty batches, numpy integers.

Ground truth is the reference in float64 on the same inputs. NaN semantics: a NaN logit ranks above every number
(it is selected, ties among NaNs to the lower index) and propagates through the softmax into the gates, the
prob_sums of its task and the output, never hidden behind finite gates; +-inf follow IEEE arithmetic.
"""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import DEVICE
from helpers import assert_close

import ase_kernels as ak
from ase_kernels import reference

N, K, S, R, TASKS, D_IN, D_OUT, HIDDEN, TOKENS = 8, 2, 1, 2, 2, 16, 12, 24, 13
NAN, INF = float("nan"), float("inf")


@pytest.fixture(params=["reference", "torch", "triton", "torch-compiled", "triton-compiled"])
def run(request, monkeypatch):
    """run(fn, *args): fn on the backend under test, compiled (fullgraph) where the id says so."""
    name, _, compiled = request.param.partition("-")
    monkeypatch.setenv("ASE_KERNELS_BACKEND", name)
    if compiled:
        torch._dynamo.reset()
    return _runner(bool(compiled))


def _runner(compiled: bool):
    def run(fn, *args):
        return (torch.compile(fn, fullgraph=True) if compiled else fn)(*args)
    run.compiled = compiled
    return run


def _inputs(tokens=TOKENS):
    x = torch.rand(tokens, D_IN) + 0.1  # positive, so that an inf weight gives an inf logit of known sign
    w = torch.randn(TASKS, N, D_IN)
    ids = torch.arange(tokens) % TASKS
    a, b = torch.randn(N, R, D_IN), torch.randn(N, D_OUT, R)
    w1, b1, w2, b2 = torch.randn(HIDDEN, D_IN), torch.randn(HIDDEN), torch.randn(D_OUT, HIDDEN), torch.randn(D_OUT)
    return x, w, ids, a, b, w1, b1, w2, b2


def _layer(mode):
    def layer(x, w, ids, a, b, w1, b1, w2, b2):
        r = ak.route(x, w, ids, top_k=K, num_shared=S if mode != "none" else 0, mode=mode)
        y = ak.moe_lora(x, a, b, r, 0.5, base_input=x, base_weight=w2[:, :D_IN])
        y_ffn = ak.moe_lora_ffn(x, w1, b1, w2, b2, a, b, r, 0.5)
        return r.indices, r.gates, r.prob_sums, y, y_ffn
    return layer


def _reference(mode, *args):
    """The float64 reference of _layer, on the CPU."""
    x, w, ids, a, b, w1, b1, w2, b2 = (t.cpu().double() if t.is_floating_point() else t.cpu() for t in args)
    r = reference.route(x, w, ids, top_k=K, num_shared=S if mode != "none" else 0, mode=mode)
    y = reference.moe_lora(x, a, b, r, 0.5, base_input=x, base_weight=w2[:, :D_IN])
    return r.indices, r.gates, r.prob_sums, y, reference.moe_lora_ffn(x, w1, b1, w2, b2, a, b, r, 0.5)


def _poison(case, x, w, ids, a, b, *rest):
    if case == "nan-router-weight":  # task 1's expert 3: NaN logits for task 1's tokens
        w[1, 3, 5] = NAN
    elif case == "nan-input":  # token 2: every logit NaN, its output NaN
        x[2, 0] = NAN
    elif case == "inf-router-weight":  # task 0: expert 5's logit +inf (selected, gates NaN), expert 6's -inf
        w[0, 5, 0], w[0, 6, 0] = INF, -INF
    elif case == "all-sparse-neg-inf":  # task 0: every sparse logit -inf: k distinct experts 0..k-1, finite gates
        w[0, : N - S, 0] = -INF
    elif case == "inf-input":  # token 4: logits +-inf or NaN by the signs of the weights
        x[4, 1] = INF
    return (x, w, ids, a, b, *rest)


CASES = ["nan-router-weight", "nan-input", "inf-router-weight", "all-sparse-neg-inf", "inf-input"]


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, under the interpreter
@pytest.mark.parametrize("mode", ["adaptive", "naive"])
@pytest.mark.parametrize("case", CASES)
def test_nan_and_inf_propagate_as_in_the_reference(run, case, mode):
    args = _poison(case, *_inputs())
    want = _reference(mode, *args)
    got = run(_layer(mode), *(t.to(DEVICE) for t in args))
    assert torch.equal(want[0], got[0].cpu()), f"indices differ:\n{want[0]}\n{got[0]}"
    for name, ref, out in zip(("gates", "prob_sums", "y", "y_ffn"), want[1:], got[1:], strict=True):
        assert_close(name, ref, out, torch.float32, nonfinite=True)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, under the interpreter
@pytest.mark.parametrize("run", ["torch", "triton"], indirect=True)
@pytest.mark.parametrize("mode", ["adaptive", "naive"])
@pytest.mark.parametrize("case", CASES)
def test_nan_and_inf_propagate_in_bf16(run, case, mode):
    """The same in bf16 on the fast backends (NaN and +-inf survive the bf16 casts), against the float64 reference on
    the rounded inputs."""
    args = [t.bfloat16() if t.is_floating_point() else t for t in _poison(case, *_inputs())]
    want = _reference(mode, *args)
    got = run(_layer(mode), *(t.to(DEVICE) for t in args))
    assert torch.equal(want[0], got[0].cpu()), f"indices differ:\n{want[0]}\n{got[0]}"
    for name, ref, out in zip(("gates", "prob_sums", "y", "y_ffn"), want[1:], got[1:], strict=True):
        assert_close(name, ref, out, torch.bfloat16, nonfinite=True)


def test_the_poisoned_cases_are_poisoned():
    """The cases above test what they say: NaN and inf do reach the routing (in the float64 reference)."""
    args = _inputs()
    clean_indices = _reference("adaptive", *args)[0]
    for case in CASES:  # _poison writes into its inputs: each case poisons its own copy of the same draw
        indices, gates, *_ = _reference("adaptive", *_poison(case, *(t.clone() for t in args)))
        assert not torch.equal(indices, clean_indices) or gates.isnan().any(), case
    assert _reference("adaptive", *_poison("all-sparse-neg-inf", *_inputs()))[0][0].tolist() == [0, 1, N - 1]


@pytest.mark.parametrize("bad", [N, -1])
@pytest.mark.parametrize("op", ["moe_lora", "moe_lora_ffn"])
def test_an_out_of_range_routing_index_is_an_error(run, op, bad):
    if DEVICE.type == "cuda":
        # a device-side assertion leaves the CUDA context unusable: provoke it in a child process
        script = (f"import sys; sys.path.insert(0, {os.path.dirname(__file__)!r}); import test_backends as t; "
                  f"t.call_with_a_bad_index(t._runner({run.compiled}), {op!r}, {bad}); import torch; "
                  "torch.cuda.synchronize()")
        child = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
        assert child.returncode != 0, f"no error from an index of {bad}:\n{child.stdout}{child.stderr}"
        assert "routing.indices must lie in" in child.stderr or "device-side assert" in child.stderr, child.stderr
        return
    with pytest.raises((ValueError, RuntimeError), match=r"routing.indices must lie in \[0, N=8\)"):
        call_with_a_bad_index(run, op, bad)


def call_with_a_bad_index(run, op: str, bad: int):
    """moe_lora or moe_lora_ffn on a routing whose index [3, 0] is bad."""
    x, w, ids, a, b, w1, b1, w2, b2 = (t.to(DEVICE) for t in _inputs())
    r = ak.route(x, w, ids, top_k=K, num_shared=S)
    indices = r.indices.clone()
    indices[3, 0] = bad
    routing = ak.Routing(indices, r.gates, r.prob_sums)

    def call(x, indices, gates):
        if op == "moe_lora":
            return ak.moe_lora(x, a, b, ak.Routing(indices, gates, r.prob_sums))
        return ak.moe_lora_ffn(x, w1, b1, w2, b2, a, b, ak.Routing(indices, gates, r.prob_sums))

    run(call, x, routing.indices, routing.gates)


def test_an_index_changed_in_place_after_route_is_checked(monkeypatch):
    monkeypatch.setenv("ASE_KERNELS_BACKEND", "torch")
    x, w, ids, a, b, *_ = _inputs()
    r = ak.route(x, w, ids, top_k=K, num_shared=S)
    ak.moe_lora(x, a, b, r)
    r.indices[0, 0] = N
    with pytest.raises(ValueError, match=r"got values in \[0, 8\]"):
        ak.moe_lora(x, a, b, r)


def test_routing_indices_in_inference_mode(run):
    """Inference tensors have no version counter: their task ids and indices are checked, not trusted, and pass."""
    x, w, _, a, b, *_ = (t.to(DEVICE) for t in _inputs())
    want = ak.moe_lora(x, a, b, ak.route(x, w[:1], top_k=K, num_shared=S))
    with torch.inference_mode():
        got = run(lambda x, w: ak.moe_lora(x, a, b, ak.route(x, w, top_k=K, num_shared=S)), x, w[:1])
    assert_close("y", want, got)


@pytest.mark.parametrize("mode", ["adaptive", "naive"])
def test_an_empty_batch_keeps_its_autograd_graph(run, mode):
    leaves = [t.to(DEVICE).requires_grad_(t.is_floating_point()) for t in _inputs(tokens=0)]

    def loss(*args):
        _, gates, prob_sums, y, y_ffn = _layer(mode)(*args)
        return y.sum() + y_ffn.sum() + gates.sum() + ak.mi_loss(prob_sums)

    out = run(loss, *leaves)
    out.backward()
    assert float(out.detach()) == 0.0
    for name, t in zip(("x", "w", "ids", "a", "b", "w1", "b1", "w2", "b2"), leaves, strict=True):
        if name != "ids":
            assert t.grad is not None and t.grad.shape == t.shape and not t.grad.any(), name


def test_numpy_integers_are_integers(run):
    x, w, ids, a, b, *_ = (t.to(DEVICE) for t in _inputs())

    def layer(top_k, num_shared):  # numpy integers as a module's configuration would hold them: constants
        def f(x, w):
            r = ak.route(x, w, ids, top_k=top_k, num_shared=num_shared)
            return r.indices, ak.moe_lora(x, a, b, r, np.float32(0.5))
        return f

    want = layer(2, 1)(x, w)
    got = run(layer(np.int64(2), np.int32(1)), x, w)
    assert torch.equal(want[0], got[0])
    assert_close("y", want[1], got[1])
    with pytest.raises(TypeError, match="top_k must be an integer, got float 2.0"):
        ak.route(x, w, ids, top_k=2.0, num_shared=1)
