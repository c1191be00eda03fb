"""ak.mi_loss and reference.mi_loss against Mod-Squad's official TaskMoE formula, re-implemented here from the
per-token softmaxes: every token's probabilities + 1e-4 summed per task, divided by the token count + 1e-4,
marginals + 1e-4, ``-sum P(t,e) log(P(t,e) / (P(t) P(e)) + 1e-4)``. Value and gradient to the router logits."""

import math

import pytest
import torch
from helpers import assert_close

import ase_kernels as ak
from ase_kernels import reference

F64 = torch.float64


def official_mi_loss(logits: torch.Tensor, task_ids: torch.Tensor, num_tasks: int) -> torch.Tensor:
    """logits (T, N) of every token under its own task's router, task_ids (T,)."""
    probs = torch.softmax(logits, dim=1) + 1e-4  # (T, N): the official code adds 1e-4 per token
    task_gate = torch.zeros(num_tasks, logits.shape[1], dtype=logits.dtype)
    for t in range(num_tasks):  # accumulated one task's batch at a time, as TaskMoE does
        task_gate[t] = task_gate[t] + probs[task_ids == t].sum(0)
    tot = float(logits.shape[0])  # acc_freq.sum() / k: every token selects k experts
    task_gate = task_gate / (tot + 1e-4)
    p_ti = task_gate.sum(dim=1, keepdim=True) + 1e-4
    p_ei = task_gate.sum(dim=0, keepdim=True) + 1e-4
    return -(task_gate * torch.log(task_gate / p_ti / p_ei + 1e-4)).sum()


def _prob_sums(logits, task_ids, num_tasks):
    probs = torch.softmax(logits, dim=1)
    return torch.stack([probs[task_ids == t].sum(0) for t in range(num_tasks)])


@pytest.mark.parametrize("tasks,experts,tokens,missing", [
    pytest.param(5, 32, 300, None, id="5x32"),
    pytest.param(3, 7, 50, None, id="3x7-odd"),
    pytest.param(4, 16, 90, 2, id="4x16-task-2-absent"),
])
@pytest.mark.parametrize("impl", [pytest.param(ak.mi_loss, id="ak"), pytest.param(reference.mi_loss, id="reference")])
def test_mi_loss_is_the_official_formula(tasks, experts, tokens, missing, impl):
    logits = (torch.randn(tokens, experts, dtype=F64) * 2).requires_grad_()
    task_ids = torch.randint(0, tasks, (tokens,))
    if missing is not None:
        task_ids[task_ids == missing] = (missing + 1) % tasks
    want = official_mi_loss(logits, task_ids, tasks)
    (want_grad,) = torch.autograd.grad(want, logits)
    got = impl(_prob_sums(logits, task_ids, tasks))
    (got_grad,) = torch.autograd.grad(got, logits)
    assert math.isclose(got.item(), want.item(), rel_tol=1e-12, abs_tol=1e-14), (got.item(), want.item())
    assert_close("d mi_loss / d logits", want_grad, got_grad, rtol=1e-10, atol=1e-12)


def test_mi_loss_fp32_is_close_to_float64():
    prob_sums = torch.rand(5, 32, dtype=F64) * 40
    assert math.isclose(ak.mi_loss(prob_sums.float()).item(), ak.mi_loss(prob_sums).item(), rel_tol=1e-5)


def test_mi_loss_hand_computed():
    # two tasks own one expert each, 3 tokens each: P(t,e) = (3 + 3e-4) / (6 + 1e-4) on the diagonal,
    # 3e-4 / (6 + 1e-4) off it; the marginals are their sums + 1e-4
    diag, off = (3 + 3e-4) / (6 + 1e-4), 3e-4 / (6 + 1e-4)
    marg = diag + off + 1e-4
    want = -2 * (diag * math.log(diag / marg**2 + 1e-4) + off * math.log(off / marg**2 + 1e-4))
    got = ak.mi_loss(torch.tensor([[3.0, 0.0], [0.0, 3.0]], dtype=F64))
    assert math.isclose(got.item(), want, rel_tol=1e-12)
    assert math.isclose(reference.mi_loss(torch.tensor([[3.0, 0.0], [0.0, 3.0]], dtype=F64)).item(), want,
                        rel_tol=1e-12)
    assert ak.mi_loss(torch.zeros(3, 4)).item() == 0.0, "an empty batch costs nothing"
