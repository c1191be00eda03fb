"""Pure-PyTorch reference of every ASE op: the ground truth of the tests.

Written to read like the paper (arXiv 2510.00570), one function per equation, with an explicit loop over
experts. It is exact in float64 and differentiable end to end, and it is deliberately slow: it is not the CPU
fast path (that is :mod:`ase_kernels.torch_ops`).

Notation: ``T`` tokens, ``N`` experts of which the last ``S`` are shared, ``k`` sparse experts selected per
token, ``r`` the LoRA rank, ``tasks`` the number of task-specific routers.
"""

import torch

from .checks import Routing, check_moe_lora, check_route


def router_logits(x: torch.Tensor, router_weight: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
    """Task-specific router logits ``z = W_g^{(task)} x`` (Eq. 6 and the shared-expert router of Eq. 7).

    x: (T, d_in); router_weight: (tasks, N, d_in), sparse rows first; task_ids: (T,) int. Returns (T, N).
    """
    return torch.einsum("td,tnd->tn", x, router_weight[task_ids])  # (T, N)


def select_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest sparse logits per token (Eq. 6), ties to the lower expert index.

    A NaN logit ranks above every number (as in torch.sort and torch.argmax), so a NaN router output is selected
    and propagates into the gates instead of being hidden; -inf logits are selected like any other value.

    logits: (T, N - S). Returns (T, k) int64, best first, k distinct experts.
    """
    selected = [logits.new_empty(logits.shape[0], 0, dtype=torch.int64)]  # k = 0: only shared experts
    taken = torch.zeros_like(logits, dtype=torch.bool)  # (T, N - S)
    for _ in range(k):
        nan = logits.isnan() & ~taken
        top = logits.masked_fill(taken | nan, float("-inf")).amax(dim=-1, keepdim=True)  # (T, 1)
        best_set = torch.where(nan.any(dim=-1, keepdim=True), nan, ~taken & (logits == top))
        best = best_set.int().argmax(dim=-1)  # (T,): the first candidate, so ties go to the lower expert
        selected.append(best[:, None])
        taken = taken.scatter(-1, best[:, None], True)
    return torch.cat(selected, dim=-1)  # (T, k)


def adaptive_gates(z_sparse: torch.Tensor, z_shared: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    """ASE gating (Eq. 8-9): one softmax over the k selected sparse logits and all S shared logits.

    z_sparse: (T, N - S); z_shared: (T, S); top: (T, k). Returns gates (T, k + S) summing to 1 per token.
    """
    selected = z_sparse.gather(-1, top)  # (T, k)
    return torch.softmax(torch.cat([selected, z_shared], dim=-1), dim=-1)  # (T, k + S)


def naive_gates(z_sparse: torch.Tensor, num_shared: int, top: torch.Tensor) -> torch.Tensor:
    """Naive shared experts (Eq. 5): softmax over all sparse logits, the top-k kept without renormalising;
    every shared expert has the fixed gate 1. With S = 0 this is the plain LoRA-MoE baseline (mode ``none``).

    z_sparse: (T, N - S); top: (T, k). Returns gates (T, k + S).
    """
    sparse = torch.softmax(z_sparse, dim=-1).gather(-1, top)  # (T, k)
    shared = sparse.new_ones(sparse.shape[0], num_shared)  # (T, S)
    return torch.cat([sparse, shared], dim=-1)


def route(x, router_weight, task_ids=None, *, top_k: int, num_shared: int, mode: str = "adaptive") -> Routing:
    """Route tokens to experts: see :func:`ase_kernels.route` for the contract; this is its reference."""
    x2, task_ids, top_k, num_shared = check_route(x, router_weight, task_ids, top_k, num_shared, mode)
    tasks, n, _ = router_weight.shape
    z = router_logits(x2.to(router_weight.dtype), router_weight, task_ids)  # (T, N)
    z_sparse, z_shared = z[:, : n - num_shared], z[:, n - num_shared :]
    top = select_top_k(z_sparse.detach(), top_k)  # (T, k); the selection is not differentiated
    if mode == "adaptive":
        gates = adaptive_gates(z_sparse, z_shared, top)
    else:
        gates = naive_gates(z_sparse, num_shared, top)
    shared_ids = torch.arange(n - num_shared, n, device=x.device).expand(top.shape[0], num_shared)
    indices = torch.cat([top, shared_ids], dim=-1)  # (T, k + S)
    prob_sums = task_prob_sums(z, task_ids, tasks)
    gate_dtype = torch.promote_types(z.dtype, torch.float32)
    return Routing(indices, gates.to(gate_dtype), prob_sums.to(gate_dtype))


def task_prob_sums(z: torch.Tensor, task_ids: torch.Tensor, tasks: int) -> torch.Tensor:
    """Per-task sums of the full softmax over all N router logits (the numerator of Mod-Squad's P(t, e)).

    z: (T, N); task_ids: (T,). Returns (tasks, N).
    """
    p = torch.softmax(z, dim=-1)  # (T, N)
    sums = []
    for t in range(tasks):
        sums.append(p[task_ids == t].sum(dim=0))  # (N,)
    return torch.stack(sums)  # (tasks, N)


def moe_lora(x, lora_A, lora_B, routing: Routing, scale: float = 1.0, base_input=None, base_weight=None,
             base_bias=None):
    """MoE-LoRA layer (Eq. 4 with the gates of Eq. 5 or 9): ``y = base(x) + scale * sum_i g_i B_i A_i x``.

    See :func:`ase_kernels.moe_lora` for the contract; this is its reference, one expert at a time.
    """
    x2, lead = check_moe_lora(x, lora_A, lora_B, routing, base_input, base_weight, base_bias)
    n, d_out, _ = lora_B.shape
    indices, gates = routing.indices, routing.gates
    delta = x2.new_zeros(x2.shape[0], d_out, dtype=lora_B.dtype)  # (T, d_out)
    for i in range(n):
        g = torch.where(indices == i, gates, 0).sum(dim=-1, keepdim=True).to(delta.dtype)  # (T, 1), 0 if unselected
        delta = delta + g * (x2.to(lora_A.dtype) @ lora_A[i].T @ lora_B[i].T)  # B_i A_i x
    y = scale * delta
    if base_weight is not None:
        y = y + base_input.reshape(-1, base_weight.shape[1]) @ base_weight.T
        if base_bias is not None:
            y = y + base_bias
    return y.to(x.dtype).reshape(*lead, d_out)


def moe_lora_ffn(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, lora_A, lora_B, routing: Routing,
                 scale: float = 1.0):
    """The ASE FFN (Eq. 10): ``y = fc2(gelu(fc1(x))) + scale * sum_i g_i B_i A_i x``, experts on the FFN input."""
    h = torch.nn.functional.gelu(torch.nn.functional.linear(x, fc1_weight, fc1_bias))
    return moe_lora(x, lora_A, lora_B, routing, scale, base_input=h, base_weight=fc2_weight, base_bias=fc2_bias)


def mi_loss(prob_sums: torch.Tensor) -> torch.Tensor:
    """Mod-Squad mutual-information loss of one layer, exactly as Mod-Squad's official ``TaskMoE`` computes it.

    The official code adds 1e-4 to every token's softmax probabilities, sums them per task, divides by the token
    count + 1e-4, adds 1e-4 to both marginals, and takes ``-sum_{t,e} P(t,e) log(P(t,e) / (P(t) P(e)) + 1e-4)``.
    All of it follows from the per-task sums of the plain softmax: a token's probabilities sum to 1, so task t's
    token count n_t is its row sum, and the per-token 1e-4 adds 1e-4 n_t to each of the row's entries.

    prob_sums: (tasks, N), per-task sums of the full router softmax. Returns a scalar; 0 for an empty batch.
    The official code counts tokens instead of summing probabilities; the gradients to the router logits are the
    same, since the counts' gradient is constant along each row, which the softmax's Jacobian removes.
    """
    n_t = prob_sums.sum(dim=1)  # (tasks,) tokens of each task
    n = n_t.sum()  # all tokens of the layer
    p_te = torch.zeros_like(prob_sums)  # (tasks, N)
    for t in range(prob_sums.shape[0]):
        for e in range(prob_sums.shape[1]):
            p_te[t, e] = (prob_sums[t, e] + 1e-4 * n_t[t]) / (n + 1e-4)
    p_t = p_te.sum(dim=1) + 1e-4  # (tasks,)
    p_e = p_te.sum(dim=0) + 1e-4  # (N,)
    loss = p_te.new_zeros(())
    for t in range(p_te.shape[0]):
        for e in range(p_te.shape[1]):
            loss = loss - p_te[t, e] * torch.log(p_te[t, e] / (p_t[t] * p_e[e]) + 1e-4)
    return loss
