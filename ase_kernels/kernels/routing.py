"""Triton kernels of the ASE router: task-specific logits, top-k, the gates of each mode, and the per-task sums of
the full softmax for the Mod-Squad loss, in one pass over the tokens; and their backward.

Forward, for each block of BLOCK_T tokens::

    for task in tasks present in the block:            # batches are task-major: usually one task per block
        z[tokens of task] = x @ W[task]^T               # (BLOCK_T, N), fp32 accumulation
    prob_sums_partial[block, task] = sum_t softmax(z)   # no (T, N) probabilities in HBM
    for j in range(k):  top_j = argmax(z_sparse)        # ties to the lower index, then masked out
    gates = softmax over {top_j} + shared   (adaptive)  |  softmax(z_sparse)[top_j], shared = 1   (naive, none)

Backward recomputes z (one small GEMM) rather than saving it, folds the gate and the MI-loss gradients into
dz (BLOCK_T, N), writes dz (fp32, O(T * N)) for the router-weight gradient, and computes dx = dz @ W[task].
The router-weight gradient dW[task] = dz^T x is :func:`ase_kernels.kernels.lowrank.weight_grad` over each task's
token range (task-major ids) or with a task filter (any order).
"""

import torch
import triton
import triton.language as tl

from .common import cdiv, dot_precision, launch_config, next_block
from .lowrank import weight_grad

MODE_ADAPTIVE = tl.constexpr(0)
MODE_NAIVE = tl.constexpr(1)  # also "none": the same gates with S = 0


@triton.jit
def _block_logits(
    x_ptr, w_ptr, task_ptr, pid,
    T, D, N, NUM_TASKS,
    stride_xt, stride_xd, stride_wt, stride_wn, stride_wd, stride_task,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    """Logits z[t, n] = sum_d x[t, d] W[task[t], n, d] of token block pid: (BLOCK_T, BLOCK_N) fp32, with the
    block's offsets, masks and task ids (-1 past the last token)."""
    offs_t = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_t = offs_t < T
    offs_n = tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    task = tl.load(task_ptr + offs_t * stride_task, mask=mask_t, other=-1)
    z = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    for tt in range(0, NUM_TASKS):
        of_task = task == tt
        # Skip the tasks absent from this block: with task-major batches a block holds one or two tasks.
        if tl.sum(of_task.to(tl.int32), axis=0) > 0:
            acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
            w_task = w_ptr + tt * stride_wt
            for d0 in range(0, D, BLOCK_D):
                offs_d = d0 + tl.arange(0, BLOCK_D)
                mask_d = offs_d < D
                x = tl.load(x_ptr + offs_t[:, None] * stride_xt + offs_d[None, :] * stride_xd,
                            mask=mask_t[:, None] & mask_d[None, :], other=0.0)
                w = tl.load(w_task + offs_n[None, :] * stride_wn + offs_d[:, None] * stride_wd,
                            mask=mask_n[None, :] & mask_d[:, None], other=0.0)
                acc = tl.dot(x, w, acc, input_precision=PRECISION)
            z = tl.where(of_task[:, None], acc, z)
    return offs_t, mask_t, offs_n, mask_n, task, z


@triton.jit
def _softmax_rows(z, valid):
    """Row softmax of z (BLOCK_T, BLOCK_N) over the columns where valid (1-D or 2-D mask); 0 elsewhere."""
    z = tl.where(valid, z, float("-inf"))
    e = tl.exp(z - tl.max(z, axis=1)[:, None])
    return e / tl.sum(e, axis=1)[:, None]


@triton.jit
def _route_fwd_kernel(
    # pointers
    x_ptr, w_ptr, task_ptr, idx_ptr, gate_ptr, psum_ptr,
    # sizes
    T, D, N, NUM_TASKS,
    # strides
    stride_xt, stride_xd, stride_wt, stride_wn, stride_wd, stride_task, stride_it, stride_ik, stride_gt, stride_gk,
    # meta
    TOP_K: tl.constexpr, NUM_SHARED: tl.constexpr, MODE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_KS: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    offs_t, mask_t, offs_n, mask_n, task, z = _block_logits(
        x_ptr, w_ptr, task_ptr, pid, T, D, N, NUM_TASKS,
        stride_xt, stride_xd, stride_wt, stride_wn, stride_wd, stride_task, BLOCK_T, BLOCK_N, BLOCK_D, PRECISION)

    # Mod-Squad statistics: this block's per-task sums of the full softmax, reduced over blocks by the launcher
    # (a fixed-order sum instead of atomics keeps the result deterministic).
    p = _softmax_rows(z, mask_n[None, :])
    for tt in range(0, NUM_TASKS):
        part = tl.sum(tl.where((task == tt)[:, None], p, 0.0), axis=0)
        tl.store(psum_ptr + (pid * NUM_TASKS + tt) * N + offs_n, part, mask=mask_n)

    # top-k over the sparse logits, then the shared experts, gathered into (BLOCK_T, k + S) tiles. The order is the
    # reference's: NaN first (it propagates into the gates; tl.max/argmax would skip it on a GPU), then the largest,
    # ties to the lower index; taken columns are masked, not set to -inf, so -inf logits are taken once each.
    sparse = offs_n < N - NUM_SHARED
    offs_j = tl.arange(0, BLOCK_KS)
    idx = tl.zeros((BLOCK_T, BLOCK_KS), dtype=tl.int32)
    val = tl.full((BLOCK_T, BLOCK_KS), float("-inf"), dtype=tl.float32)
    open_ = sparse[None, :] & mask_t[:, None]
    for j in tl.static_range(TOP_K):
        nan = open_ & (z != z)
        top = tl.max(tl.where(open_ & (z == z), z, float("-inf")), axis=1)
        has_nan = tl.sum(nan.to(tl.int32), axis=1) > 0
        best_set = tl.where(has_nan[:, None], nan, open_ & (z == top[:, None]))
        best = tl.min(tl.where(best_set, offs_n[None, :], BLOCK_N), axis=1)
        chosen = offs_n[None, :] == best[:, None]
        idx = tl.where(offs_j[None, :] == j, best[:, None], idx)
        val = tl.where(offs_j[None, :] == j, tl.sum(tl.where(chosen, z, 0.0), axis=1)[:, None], val)
        open_ = open_ & ~chosen
    for s in tl.static_range(NUM_SHARED):
        col = N - NUM_SHARED + s
        z_s = tl.sum(tl.where(offs_n[None, :] == col, z, 0.0), axis=1)
        idx = tl.where(offs_j[None, :] == TOP_K + s, col, idx)
        val = tl.where(offs_j[None, :] == TOP_K + s, z_s[:, None], val)

    if MODE == MODE_ADAPTIVE:
        # ONE softmax over the k selected and the S shared logits (Eq. 9); padded columns hold -inf.
        e = tl.exp(val - tl.max(val, axis=1)[:, None])
        gates = e / tl.sum(e, axis=1)[:, None]
    else:
        # softmax over all sparse logits, selected ones kept without renormalising; shared gates are 1 (Eq. 5)
        gates = tl.full((BLOCK_T, BLOCK_KS), 1.0, dtype=tl.float32)
        if TOP_K > 0:
            z_sp = tl.where(sparse[None, :], z, float("-inf"))
            m = tl.max(z_sp, axis=1)
            denom = tl.sum(tl.exp(z_sp - m[:, None]), axis=1)
            gates = tl.where(offs_j[None, :] < TOP_K, tl.exp(val - m[:, None]) / denom[:, None], gates)

    mask_out = mask_t[:, None] & (offs_j[None, :] < TOP_K + NUM_SHARED)
    tl.store(idx_ptr + offs_t[:, None] * stride_it + offs_j[None, :] * stride_ik, idx.to(tl.int64), mask=mask_out)
    tl.store(gate_ptr + offs_t[:, None] * stride_gt + offs_j[None, :] * stride_gk, gates, mask=mask_out)


@triton.jit
def _route_bwd_kernel(
    # pointers
    x_ptr, w_ptr, task_ptr, idx_ptr, gate_ptr, dgate_ptr, dpsum_ptr, dz_ptr, dx_ptr,
    # sizes
    T, D, N, NUM_TASKS,
    # strides
    stride_xt, stride_xd, stride_wt, stride_wn, stride_wd, stride_task, stride_it, stride_ik, stride_gt, stride_gk,
    stride_dgt, stride_dgk, stride_dxt, stride_dxd,
    # meta
    TOP_K: tl.constexpr, NUM_SHARED: tl.constexpr, MODE: tl.constexpr, PRECISION: tl.constexpr,
    HAS_DGATES: tl.constexpr, HAS_DPSUM: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_KS: tl.constexpr,
):
    """dz and dx = dz @ W[task] of one token block; an absent gate or MI-loss gradient (HAS_* False) counts as 0."""
    pid = tl.program_id(0).to(tl.int64)
    offs_t, mask_t, offs_n, mask_n, task, z = _block_logits(
        x_ptr, w_ptr, task_ptr, pid, T, D, N, NUM_TASKS,
        stride_xt, stride_xd, stride_wt, stride_wn, stride_wd, stride_task, BLOCK_T, BLOCK_N, BLOCK_D, PRECISION)

    # MI-loss sums: every token added softmax(z) to its task's row, so dz = p * (dP - <p, dP>)
    mask_tn = mask_t[:, None] & mask_n[None, :]
    dz = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    if HAS_DPSUM:
        p = _softmax_rows(z, mask_n[None, :])
        dp = tl.load(dpsum_ptr + task[:, None].to(tl.int64) * N + offs_n[None, :], mask=mask_tn, other=0.0)
        dz = p * (dp - tl.sum(p * dp, axis=1)[:, None])

    offs_j = tl.arange(0, BLOCK_KS)
    mask_j = mask_t[:, None] & (offs_j[None, :] < TOP_K + NUM_SHARED)
    idx = tl.load(idx_ptr + offs_t[:, None] * stride_it + offs_j[None, :] * stride_ik, mask=mask_j, other=-1)
    gates = tl.load(gate_ptr + offs_t[:, None] * stride_gt + offs_j[None, :] * stride_gk, mask=mask_j, other=0.0)
    dgates = tl.load(dgate_ptr + offs_t[:, None] * stride_dgt + offs_j[None, :] * stride_dgk, mask=mask_j, other=0.0)
    if HAS_DGATES and MODE == MODE_ADAPTIVE:
        # the k + S active logits went through one softmax: d z_a = g_a (dg_a - <g, dg>)
        d_active = gates * (dgates - tl.sum(gates * dgates, axis=1)[:, None])
        for j in tl.static_range(TOP_K + NUM_SHARED):
            col = tl.sum(tl.where(offs_j[None, :] == j, idx, 0), axis=1)
            d_j = tl.sum(tl.where(offs_j[None, :] == j, d_active, 0.0), axis=1)
            dz += tl.where(offs_n[None, :] == col[:, None], d_j[:, None], 0.0)
    elif HAS_DGATES and TOP_K > 0:
        # the selected gates are entries of softmax(z_sparse); the fixed shared gates carry no gradient
        p_sp = _softmax_rows(z, (offs_n < N - NUM_SHARED)[None, :])
        dp_sp = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
        for j in tl.static_range(TOP_K):
            col = tl.sum(tl.where(offs_j[None, :] == j, idx, 0), axis=1)
            d_j = tl.sum(tl.where(offs_j[None, :] == j, dgates, 0.0), axis=1)
            dp_sp += tl.where(offs_n[None, :] == col[:, None], d_j[:, None], 0.0)
        dz += p_sp * (dp_sp - tl.sum(p_sp * dp_sp, axis=1)[:, None])
    tl.store(dz_ptr + offs_t[:, None] * N + offs_n[None, :], dz, mask=mask_tn)

    # dx = dz @ W[task], one D chunk at a time; W is upcast so dz keeps fp32 (tf32 on GPU for 16-bit inputs)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        dx = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
        for tt in range(0, NUM_TASKS):
            of_task = task == tt
            if tl.sum(of_task.to(tl.int32), axis=0) > 0:
                w = tl.load(w_ptr + tt * stride_wt + offs_n[:, None] * stride_wn
                            + offs_d[None, :] * stride_wd, mask=mask_n[:, None] & mask_d[None, :], other=0.0)
                dz_task = tl.where(of_task[:, None], dz, 0.0)
                dx = tl.dot(dz_task, w.to(tl.float32), dx, input_precision=PRECISION)
        tl.store(dx_ptr + offs_t[:, None] * stride_dxt + offs_d[None, :] * stride_dxd,
                 dx.to(dx_ptr.dtype.element_ty), mask=mask_t[:, None] & mask_d[None, :])


def _mode(mode: str) -> int:
    return MODE_ADAPTIVE.value if mode == "adaptive" else MODE_NAIVE.value


def _meta(x: torch.Tensor, n: int, ks: int) -> dict:
    """The meta-parameters of both routing launches, computed once per dtype, device and expert counts."""
    key = (x.dtype, x.device, n, ks)
    meta = _metas.get(key)
    if meta is None:
        cfg = launch_config("route", x)
        meta = _metas[key] = dict(BLOCK_T=cfg["BLOCK_T"], BLOCK_D=cfg["BLOCK_D"], BLOCK_N=next_block(n),
                                  BLOCK_KS=next_block(ks, 1), num_warps=cfg["num_warps"],
                                  num_stages=cfg["num_stages"])
    return meta


_metas: dict[tuple, dict] = {}


def route_fwd(x, router_weight, task_ids, top_k: int, num_shared: int, mode: str):
    """x: (T, d_in); router_weight: (tasks, N, d_in), x's dtype; task_ids: (T,) int64.

    Returns indices (T, k + S) int64, gates (T, k + S) float32, prob_sums (tasks, N) float32.
    """
    t, d = x.shape
    tasks, n, _ = router_weight.shape
    ks = top_k + num_shared
    meta = _meta(x, n, ks)
    blocks = cdiv(t, meta["BLOCK_T"])
    indices = torch.empty(t, ks, dtype=torch.int64, device=x.device)
    gates = torch.empty(t, ks, dtype=torch.float32, device=x.device)
    partial = torch.empty(blocks, tasks, n, dtype=torch.float32, device=x.device)
    _route_fwd_kernel[(blocks,)](
        x, router_weight, task_ids, indices, gates, partial,
        t, d, n, tasks,
        x.stride(0), x.stride(1), *router_weight.stride(), task_ids.stride(0), *indices.stride(), *gates.stride(),
        TOP_K=top_k, NUM_SHARED=num_shared, MODE=_mode(mode), PRECISION=dot_precision(x),
        **meta,
    )
    return indices, gates, partial.sum(0)


def route_bwd(d_gates, d_prob_sums, x, router_weight, task_ids, indices, gates, top_k: int, num_shared: int, mode: str,
              task_offsets=None):
    """Gradients of :func:`route_fwd` w.r.t. x (T, d_in) and router_weight (tasks, N, d_in), in their dtypes.
    d_gates or d_prob_sums may be None (no gradient: zero). task_offsets (tasks + 1,) int64: ids are task-major,
    task i owns tokens [task_offsets[i], task_offsets[i + 1]), so the router-weight gradient walks only those."""
    t, d = x.shape
    tasks, n, _ = router_weight.shape
    meta = _meta(x, n, top_k + num_shared)
    d_z = torch.empty(t, n, dtype=torch.float32, device=x.device)
    d_x = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    # no-op conversions are skipped: each call would still dispatch (host time)
    if d_gates is not None and d_gates.dtype != torch.float32:
        d_gates = d_gates.to(torch.float32)
    if d_prob_sums is not None and (d_prob_sums.dtype != torch.float32 or not d_prob_sums.is_contiguous()):
        d_prob_sums = d_prob_sums.to(torch.float32).contiguous()
    _route_bwd_kernel[(cdiv(t, meta["BLOCK_T"]),)](
        x, router_weight, task_ids, indices, gates, d_gates if d_gates is not None else gates,
        d_prob_sums if d_prob_sums is not None else d_z, d_z, d_x,
        t, d, n, tasks,
        x.stride(0), x.stride(1), *router_weight.stride(), task_ids.stride(0), *indices.stride(), *gates.stride(),
        *(d_gates.stride() if d_gates is not None else (0, 0)), *d_x.stride(),
        TOP_K=top_k, NUM_SHARED=num_shared, MODE=_mode(mode), PRECISION=dot_precision(x),
        HAS_DGATES=d_gates is not None, HAS_DPSUM=d_prob_sums is not None, **meta,
    )
    # one router: every token is its task's (the ids were range-checked), so no per-token id is read
    (d_w,) = weight_grad([(d_z, x)], [torch.empty_like(router_weight)], task_ids=task_ids if tasks > 1 else None,
                         task_offsets=task_offsets)
    return d_x, d_w

