"""Vectorised PyTorch path of the ASE ops: what CPU tensors run (and any device, with ASE_KERNELS_BACKEND=torch).

Same maths and same saved tensors as the Triton kernels (:mod:`ase_kernels.kernels`), written with whole-tensor
ops instead of a loop over experts: the experts are concatenated into ``R = N * r`` rank columns and masked by the
dense gate of each column. Everything accumulates in float32 (float64 for float64 inputs).

Shapes: ``x (T, d_in)``, ``router_weight (tasks, N, d_in)``, ``task_ids (T,) int64``, ``indices, gates (T, k + S)``,
``lora_A (N, r, d_in)``, ``lora_B (N, d_out, r)``, ``u (T, N * r)``.
"""

import torch


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _logits(x: torch.Tensor, router_weight: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
    """Router logits of each token under its own task's router: (T, N), float32.

    All task routers in one GEMM, then each token keeps its task's N columns: tasks x the router FLOPs, which
    are ~1% of the FFN, instead of gathering a (T, N, d_in) weight per token.
    """
    tasks, n, d_in = router_weight.shape
    acc = _acc(x.dtype)
    z_all = (x.to(acc) @ router_weight.reshape(tasks * n, d_in).to(acc).T).view(-1, tasks, n)  # (T, tasks, N)
    return z_all.gather(1, task_ids.view(-1, 1, 1).expand(-1, 1, n)).squeeze(1)  # (T, N)


def _gating(z: torch.Tensor, top_k: int, num_shared: int, mode: str):
    """Top-k selection and gates from logits z (T, N). Returns (top (T, k), gates (T, k + S), p_sel) where p_sel
    is the softmax the gates were taken from, for backward."""
    n = z.shape[1]
    z_sparse, z_shared = z[:, : n - num_shared], z[:, n - num_shared :]
    # torch.topk does not promise which of equal values it returns; a stable descending sort keeps the lower
    # index first among ties, as the contract asks.
    top = torch.sort(z_sparse, dim=1, descending=True, stable=True).indices[:, :top_k]  # (T, k)
    if mode == "adaptive":
        gates = torch.softmax(torch.cat([z_sparse.gather(1, top), z_shared], dim=1), dim=1)  # (T, k + S)
    else:
        p = torch.softmax(z_sparse, dim=1)  # (T, N - S)
        gates = torch.cat([p.gather(1, top), p.new_ones(p.shape[0], num_shared)], dim=1)
    return top, gates


def _task_sums(values: torch.Tensor, task_ids: torch.Tensor, tasks: int) -> torch.Tensor:
    """Per-task sums of the rows of values (T, C): (tasks, C)."""
    out = values.new_zeros(tasks, values.shape[1])
    return out.index_add_(0, task_ids, values)


def route_fwd(x, router_weight, task_ids, top_k: int, num_shared: int, mode: str):
    """Returns indices (T, k + S) int64, gates (T, k + S) float32, prob_sums (tasks, N) float32."""
    tasks, n, _ = router_weight.shape
    z = _logits(x, router_weight, task_ids)
    top, gates = _gating(z, top_k, num_shared, mode)
    shared = torch.arange(n - num_shared, n, device=x.device).expand(x.shape[0], num_shared)
    indices = torch.cat([top, shared], dim=1)
    prob_sums = _task_sums(torch.softmax(z, dim=1), task_ids, tasks)
    return indices, gates, prob_sums


def route_bwd(d_gates, d_prob_sums, x, router_weight, task_ids, indices, gates, top_k: int, num_shared: int, mode: str,
              task_offsets=None):
    """Gradients of route w.r.t. x (T, d_in) and router_weight (tasks, N, d_in), in their dtypes. d_gates or
    d_prob_sums may be None (zero); task_offsets is the Triton path's hint and unused here.

    Recomputes the logits (one small GEMM) instead of saving a (T, N) tensor in forward.
    """
    tasks, n, d_in = router_weight.shape
    z = _logits(x, router_weight, task_ids)  # (T, N)
    acc = z.dtype
    d_z = torch.zeros_like(z)
    if d_gates is not None and mode == "adaptive":
        d_gates = d_gates.to(acc)
        # softmax over the k + S active logits: dz_a = g_a (dg_a - sum_b g_b dg_b), zero elsewhere
        d_active = gates * (d_gates - (gates * d_gates).sum(1, keepdim=True))
        d_z.scatter_(1, indices, d_active)
    elif d_gates is not None and top_k:
        d_gates = d_gates.to(acc)
        p = torch.softmax(z[:, : n - num_shared], dim=1)  # (T, N - S)
        d_p = torch.zeros_like(p).scatter_(1, indices[:, :top_k], d_gates[:, :top_k])
        d_z[:, : n - num_shared] = p * (d_p - (p * d_p).sum(1, keepdim=True))
    # Mod-Squad sums: every token adds its full softmax to its task's row
    if d_prob_sums is not None:
        p_all = torch.softmax(z, dim=1)
        d_p_all = d_prob_sums.to(acc)[task_ids]  # (T, N)
        d_z += p_all * (d_p_all - (p_all * d_p_all).sum(1, keepdim=True))
    # each token's logit gradient lands in its task's block of a (T, tasks * N) matrix
    d_z_tasks = z.new_zeros(x.shape[0], tasks, n).scatter_(1, task_ids.view(-1, 1, 1).expand(-1, 1, n), d_z[:, None])
    d_z_tasks = d_z_tasks.view(x.shape[0], tasks * n)
    w = router_weight.reshape(tasks * n, d_in).to(acc)
    d_x = d_z_tasks @ w
    d_w = (d_z_tasks.T @ x.to(acc)).view(tasks, n, d_in)
    return d_x.to(x.dtype), d_w.to(router_weight.dtype)


def dense_gates(indices: torch.Tensor, gates: torch.Tensor, num_experts: int, rank: int) -> torch.Tensor:
    """The gate of every rank column: (T, N * r), zero for unselected experts."""
    g = gates.new_zeros(indices.shape[0], num_experts).scatter_add_(1, indices, gates)  # (T, N)
    return g.repeat_interleave(rank, dim=1)


def moe_lora_fwd(x, lora_A, lora_B, indices, gates, scale: float, base_input, base_weight, base_bias):
    """Returns y (T, d_out) in x's dtype and u = x A_all^T (T, N * r) float32, saved for backward."""
    n, rank, d_in = lora_A.shape
    acc = _acc(x.dtype)
    u = x.to(acc) @ lora_A.reshape(n * rank, d_in).to(acc).T  # (T, R)
    u_gated = u * dense_gates(indices, gates.to(acc), n, rank) * scale
    b_all = lora_B.permute(1, 0, 2).reshape(lora_B.shape[1], n * rank).to(acc)  # (d_out, R), column n*r+j = B_n[:, j]
    y = u_gated @ b_all.T
    if base_weight is not None:  # F.linear, as nn.Linear computes it: a fresh layer (B = 0) returns its base exactly
        bias = base_bias.to(acc) if base_bias is not None else None
        y = torch.nn.functional.linear(base_input.to(acc), base_weight.to(acc), bias) + y
    return y.to(x.dtype), u


def moe_lora_bwd(d_y, x, lora_A, lora_B, indices, gates, u, scale: float, base_weight, need_d_base_input: bool,
                 fuse_base: bool = False):
    """Returns d_x (T, d_in), d_A (N, r, d_in), d_B (N, d_out, r), d_gates (T, k + S) float32 and d_base_input
    (T, d_base) or None. fuse_base: x is base_input, whose gradient d_y @ W0 is then added to d_x. The frozen base
    weight gets no gradient here."""
    n, rank, d_in = lora_A.shape
    d_out = lora_B.shape[1]
    acc = u.dtype
    d_y = d_y.to(acc)
    g = dense_gates(indices, gates.to(acc), n, rank)  # (T, R)
    b_all = lora_B.permute(1, 0, 2).reshape(d_out, n * rank).to(acc)  # (d_out, R)
    d_u_gated = scale * (d_y @ b_all)  # (T, R): gradient of the gated rank activations
    d_u = d_u_gated * g
    d_x = d_u @ lora_A.reshape(n * rank, d_in).to(acc)
    d_a = (d_u.T @ x.to(acc)).view(n, rank, d_in)
    d_b = (d_y.T @ (u * g * scale)).view(d_out, n, rank).permute(1, 0, 2).contiguous()
    per_expert = (u * d_u_gated).view(-1, n, rank).sum(2)  # (T, N)
    d_gates = per_expert.gather(1, indices)
    d_base_input = None
    if fuse_base:
        d_x = d_x + d_y @ base_weight.to(acc)
    elif need_d_base_input:
        d_base_input = (d_y @ base_weight.to(acc)).to(x.dtype)
    return d_x.to(x.dtype), d_a.to(lora_A.dtype), d_b.to(lora_B.dtype), d_gates, d_base_input


def moe_lora_ffn_fwd(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, lora_A, lora_B, indices, gates, scale: float):
    """y = fc2(gelu(fc1(x))) + scale * sum_i g_i B_i A_i x. Returns y, u (T, N * r) and h_pre = fc1(x)."""
    h_pre = torch.nn.functional.linear(x, fc1_weight, fc1_bias)
    h = torch.nn.functional.gelu(h_pre)
    y, u = moe_lora_fwd(x, lora_A, lora_B, indices, gates, scale, h, fc2_weight, fc2_bias)
    return y, u, h_pre


def moe_lora_ffn_bwd(d_y, x, fc1_weight, fc2_weight, lora_A, lora_B, indices, gates, u, h_pre, scale: float):
    """Gradients of :func:`moe_lora_ffn_fwd` with frozen fc1/fc2: d_x, d_A, d_B, d_gates and d_h_pre."""
    d_x, d_a, d_b, d_gates, d_h = moe_lora_bwd(d_y, x, lora_A, lora_B, indices, gates, u, scale, fc2_weight, True)
    a = h_pre.to(u.dtype)
    gelu_grad = 0.5 * (1 + torch.erf(a * 0.5**0.5)) + a * torch.exp(-0.5 * a * a) * (2 * torch.pi) ** -0.5
    d_h_pre = (d_h.to(u.dtype) * gelu_grad).to(x.dtype)
    d_x = (d_x.to(u.dtype) + d_h_pre.to(u.dtype) @ fc1_weight.to(u.dtype)).to(x.dtype)
    return d_x, d_a, d_b, d_gates, d_h_pre
