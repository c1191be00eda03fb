"""The reference (ase_kernels.reference) itself: gradcheck in float64, and hand-computed cases of each equation."""

import math

import pytest
import torch

from ase_kernels import reference
from ase_kernels.checks import Routing

F64 = torch.float64


def _inputs(tokens=6, d_in=5, d_out=4, n=6, rank=2, tasks=2):
    x = torch.randn(tokens, d_in, dtype=F64, requires_grad=True)
    w = torch.randn(tasks, n, d_in, dtype=F64, requires_grad=True)
    ids = torch.arange(tokens) % tasks
    a = torch.randn(n, rank, d_in, dtype=F64, requires_grad=True)
    b = torch.randn(n, d_out, rank, dtype=F64, requires_grad=True)
    return x, w, ids, a, b


@pytest.mark.parametrize("mode,num_shared", [("adaptive", 2), ("adaptive", 0), ("naive", 2), ("none", 0)])
def test_route_gradcheck(mode, num_shared):
    x, w, ids, _, _ = _inputs()

    def f(x, w):
        r = reference.route(x, w, ids, top_k=2, num_shared=num_shared, mode=mode)
        return r.gates, r.prob_sums

    assert torch.autograd.gradcheck(f, (x, w))


@pytest.mark.parametrize("with_base", [False, True], ids=["experts-only", "fused-base"])
def test_moe_lora_gradcheck(with_base):
    x, w, ids, a, b = _inputs()
    r = reference.route(x.detach(), w.detach(), ids, top_k=2, num_shared=2)
    gates = r.gates.clone().requires_grad_()
    h = torch.randn(6, 7, dtype=F64, requires_grad=True)
    w0 = torch.randn(4, 7, dtype=F64, requires_grad=True)
    b0 = torch.randn(4, dtype=F64, requires_grad=True)

    def f(x, a, b, gates, h, w0, b0):
        routing = Routing(r.indices, gates, r.prob_sums)
        if with_base:
            return reference.moe_lora(x, a, b, routing, 0.5, base_input=h, base_weight=w0, base_bias=b0)
        return reference.moe_lora(x, a, b, routing, 0.5)

    assert torch.autograd.gradcheck(f, (x, a, b, gates, h, w0, b0))


def test_mi_loss_gradcheck():
    prob_sums = (torch.rand(3, 5, dtype=F64) + 0.1).requires_grad_()
    assert torch.autograd.gradcheck(reference.mi_loss, (prob_sums,))


def test_top_k_ties_go_to_the_lower_index():
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    assert reference.select_top_k(logits, 3).tolist() == [[1, 2, 4], [0, 1, 2]]


def test_adaptive_gates_are_one_softmax_over_selected_and_shared():
    # N = 4, S = 1: sparse logits [2, 0, 1], shared logit 0; k = 2 selects experts 0 and 2
    x = torch.tensor([[1.0]], dtype=F64)
    w = torch.tensor([[[2.0], [0.0], [1.0], [0.0]]], dtype=F64)
    r = reference.route(x, w, top_k=2, num_shared=1, mode="adaptive")
    e = [math.exp(2), math.exp(1), math.exp(0)]
    assert r.indices.tolist() == [[0, 2, 3]]
    torch.testing.assert_close(r.gates, torch.tensor([[v / sum(e) for v in e]], dtype=F64))


def test_naive_gates_keep_the_sparse_softmax_and_fix_shared_to_one():
    x = torch.tensor([[1.0]], dtype=F64)
    w = torch.tensor([[[2.0], [0.0], [1.0], [5.0]]], dtype=F64)
    r = reference.route(x, w, top_k=2, num_shared=1, mode="naive")
    e = [math.exp(2), math.exp(0), math.exp(1)]
    torch.testing.assert_close(r.gates, torch.tensor([[e[0] / sum(e), e[2] / sum(e), 1.0]], dtype=F64))
    assert r.gates[0, :2].sum() < 1


def test_prob_sums_are_per_task_sums_of_the_full_softmax():
    x = torch.tensor([[1.0], [1.0], [2.0]], dtype=F64)
    w = torch.tensor([[[1.0], [0.0]], [[0.0], [1.0]]], dtype=F64)
    r = reference.route(x, w, torch.tensor([0, 0, 1]), top_k=1, num_shared=0, mode="none")
    p = torch.softmax(torch.tensor([1.0, 0.0], dtype=F64), 0)
    q = torch.softmax(torch.tensor([0.0, 2.0], dtype=F64), 0)
    torch.testing.assert_close(r.prob_sums, torch.stack([2 * p, q]))


def test_moe_lora_adds_the_gated_experts_to_the_base():
    x = torch.tensor([[1.0, 2.0]], dtype=F64)
    a = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]], [[1.0, 1.0]]], dtype=F64)  # N = 3, r = 1: A_i x = 1, 2, 3
    b = torch.tensor([[[1.0]], [[10.0]], [[100.0]]], dtype=F64)  # d_out = 1
    routing = Routing(torch.tensor([[2, 0]]), torch.tensor([[0.25, 0.75]], dtype=F64), torch.zeros(1, 3))
    y = reference.moe_lora(x, a, b, routing, scale=2.0, base_input=x, base_weight=torch.ones(1, 2, dtype=F64),
                           base_bias=torch.tensor([0.5], dtype=F64))
    # base 3.5, experts 2 * (0.25 * 300 + 0.75 * 1)
    torch.testing.assert_close(y, torch.tensor([[3.5 + 2 * (75 + 0.75)]], dtype=F64))


def test_mi_loss_hand_computed():
    # (two tasks each owning one expert is checked exactly in tests/test_mi_loss.py::test_mi_loss_hand_computed)
    # independent tasks and experts, with Mod-Squad's 1e-4 smoothing as reference.mi_loss applies it: each task
    # has n_t = 2 tokens, n = 4 in all, so every P(t,e) = p = (1 + 1e-4 * 2) / (4 + 1e-4); both marginals are
    # P(t) = P(e) = 2p + 1e-4, and the loss is the four equal terms -4 p log(p / (2p + 1e-4)^2 + 1e-4)
    p = (1 + 2e-4) / (4 + 1e-4)
    want = -4 * p * math.log(p / (2 * p + 1e-4) ** 2 + 1e-4)
    loss = reference.mi_loss(torch.tensor([[1.0, 1.0], [1.0, 1.0]], dtype=F64))
    assert math.isclose(loss.item(), want, rel_tol=1e-12)
