"""Triton kernels of the MoE-LoRA expert sum, batched over tokens on the concatenated experts.

At rank 1-4 the whole expert bank (R = N * r rank columns, 64 in every DESIGN.md configuration) is a single tile,
so the kernels work token-major and mask each rank column by its token's gate instead of sorting tokens by
expert. Column c belongs to expert c // r; the gate of a column is rebuilt in registers from the compact
(indices, gates) of the router, never stored as a (T, R) tensor.

Forward::

    u = x @ A_all^T; ug = scale * u * g                # shrink: u (T, R) fp32, saved for backward; ug in x's dtype
    y = base_input @ W0^T + b + ug @ B_all^T           # expand: the experts are a plain 16-bit K-extension of the
                                                       #   base GEMM (gated where u is produced, not in the GEMM)

Backward (W0 is frozen: no dW0, no saved base_input)::

    du_g = scale * dy @ B_all; d_u = du_g * g          # shrink with a gating epilogue, which also gives
    d_gates[t, j] = sum_{c in expert j} u * du_g       #   the gate gradients and ug = scale * u * g (x's dtype)
    dx = d_u @ A_all (+ dy @ W0 when x is base_input)  # expand
    dA = d_u^T x;  dB = dy^T ug                        # weight_grad: token reductions cut into splits, one launch
                                                       #   for both, and one that adds the splits

The whole ASE FFN built on these kernels is in ffn.py.
"""

import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .common import (
    cdiv,
    dot_precision,
    interpreting,
    launch_config,
    next_block,
    smem_per_block,
    tile_smem,
    token_splits,
)


@triton.jit
def _dense_gates(idx_ptr, gate_ptr, offs_t, mask_t, offs_c, stride_it, stride_ik, stride_gt, stride_gk,
                 RANK: tl.constexpr, KS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr):
    """Gate of every rank column offs_c for tokens offs_t: (BLOCK_T, BLOCK_R) fp32, 0 for unselected experts.
    An index outside [0, N) matches no column, so it can neither read out of bounds nor add a gate."""
    expert = offs_c // RANK
    g = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
    for j in tl.static_range(KS):
        e_j = tl.load(idx_ptr + offs_t * stride_it + j * stride_ik, mask=mask_t, other=-1)
        g_j = tl.load(gate_ptr + offs_t * stride_gt + j * stride_gk, mask=mask_t, other=0.0).to(tl.float32)
        g += tl.where(expert[None, :] == e_j[:, None], g_j[:, None], 0.0)
    return g


@triton.jit
def _packed_bank_tile(l_ptr, c0, o0, R, D_OUT, stride_ln,
                      RANK: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_O: tl.constexpr):
    """Rank columns c0 .. c0 + BLOCK_R and outputs o0 .. o0 + BLOCK_O of a bank stored as lora_B, (N, D_OUT, RANK)
    with (o, j) contiguous: a (BLOCK_R, BLOCK_O) tile. Each expert's BLOCK_O * RANK values are one contiguous run,
    read with wide (128-bit) loads and reordered in registers, instead of 16-bit gathers with stride RANK."""
    NB: tl.constexpr = BLOCK_R // RANK
    offs_n = c0 // RANK + tl.arange(0, NB)
    offs_f = o0 * RANK + tl.arange(0, BLOCK_O * RANK)
    w = tl.load(l_ptr + offs_n[:, None] * stride_ln + offs_f[None, :],
                mask=(offs_n * RANK < R)[:, None] & (offs_f < D_OUT * RANK)[None, :], other=0.0)
    w = tl.permute(tl.reshape(w, (NB, BLOCK_O, RANK)), (0, 2, 1))
    return tl.reshape(w, (BLOCK_R, BLOCK_O))


@triton.jit
def _shrink_kernel(
    # pointers
    inp_ptr, w_ptr, out_ptr, u_ptr, idx_ptr, gate_ptr, ug_ptr, dgate_ptr,
    # sizes
    T, K, R,
    # strides
    stride_pt, stride_pk, stride_wn, stride_wr, stride_wk, stride_ot, stride_oc, stride_ut, stride_uc,
    stride_it, stride_ik, stride_gt, stride_gk, stride_dgt, stride_dgk,
    scale,
    # meta
    RANK: tl.constexpr, KS: tl.constexpr, BACKWARD: tl.constexpr, PACKED: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """acc[t, c] = sum_k inp[t, k] W[c // r, c % r, k] over all R columns at once (BLOCK_R >= R), and a gating
    epilogue: ug = scale * u * g in ug's (16-bit) dtype, so that the GEMMs that consume it need no gating.

    Forward (inp = x, W = A): out = u = acc in fp32. Backward (inp = dy, W = B): out = d_u = scale * acc * g and
    the gate gradients, which need whole experts in one program: hence one R block.
    """
    pid = tl.program_id(0).to(tl.int64)
    offs_t = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_t = offs_t < T
    offs_c = tl.arange(0, BLOCK_R)
    mask_c = offs_c < R
    w_cols = w_ptr + (offs_c // RANK) * stride_wn + (offs_c % RANK) * stride_wr
    acc = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        a = tl.load(inp_ptr + offs_t[:, None] * stride_pt + offs_k[None, :] * stride_pk,
                    mask=mask_t[:, None] & mask_k[None, :], other=0.0)
        if PACKED:  # W is lora_B (N, K, r): see _packed_bank_tile
            w = tl.trans(_packed_bank_tile(w_ptr, 0, k0, R, K, stride_wn, RANK, BLOCK_R, BLOCK_K))
        else:
            w = tl.load(w_cols[None, :] + offs_k[:, None] * stride_wk, mask=mask_c[None, :] & mask_k[:, None],
                        other=0.0)
        acc = tl.dot(a, w, acc, input_precision=PRECISION)

    mask_tc = mask_t[:, None] & mask_c[None, :]
    out_ptrs = out_ptr + offs_t[:, None] * stride_ot + offs_c[None, :] * stride_oc
    g = _dense_gates(idx_ptr, gate_ptr, offs_t, mask_t, offs_c, stride_it, stride_ik, stride_gt, stride_gk,
                     RANK, KS, BLOCK_T, BLOCK_R)
    if not BACKWARD:
        u = acc
        tl.store(out_ptrs, u, mask=mask_tc)
    else:
        u = tl.load(u_ptr + offs_t[:, None] * stride_ut + offs_c[None, :] * stride_uc, mask=mask_tc, other=0.0)
        du_g = acc * scale
        tl.store(out_ptrs, (du_g * g).to(out_ptr.dtype.element_ty), mask=mask_tc)
    tl.store(ug_ptr + offs_t[:, None] * stride_ot + offs_c[None, :] * stride_oc,
             (u * g * scale).to(ug_ptr.dtype.element_ty), mask=mask_tc)
    if BACKWARD:
        prod = u * du_g
        expert = offs_c // RANK
        for j in tl.static_range(KS):
            e_j = tl.load(idx_ptr + offs_t * stride_it + j * stride_ik, mask=mask_t, other=-1)
            d_j = tl.sum(tl.where(expert[None, :] == e_j[:, None], prod, 0.0), axis=1)
            tl.store(dgate_ptr + offs_t * stride_dgt + j * stride_dgk, d_j, mask=mask_t)


ACT_NONE = tl.constexpr(0)
ACT_GELU = tl.constexpr(1)
ACT_GELU_GRAD = tl.constexpr(2)
_ACTIVATIONS = {None: ACT_NONE.value, "gelu": ACT_GELU.value, "gelu_grad": ACT_GELU_GRAD.value}


@triton.jit
def _gelu(a):
    """Exact (erf) GELU, timm's and nn.GELU's default."""
    return 0.5 * a * (1.0 + tl.math.erf(a * 0.7071067811865476))


@triton.jit
def _gelu_grad(a):
    """d gelu(a) / da = Phi(a) + a phi(a)."""
    return 0.5 * (1.0 + tl.math.erf(a * 0.7071067811865476)) + a * 0.3989422804014327 * tl.exp(-0.5 * a * a)


def _config(block_t, block_o, block_k, warps, stages):
    return triton.Config(dict(BLOCK_T=block_t, BLOCK_O=block_o, BLOCK_K=block_k), num_warps=warps, num_stages=stages)


# Keyed on (D_OUT, K, R), the model dims, never on the token count; one list per operand width, each pruned per GPU
# by _prune_expand_configs. No configuration may spill registers on any target (tests/test_targets.py holds this).
# 16-bit: 128x256x64 with 8 warps and 128x128x32 with 4 warps were dropped: their GELU epilogues spill 180-1,224
# bytes per thread on sm_90. 64x128x64 in 3 stages (48-72 KB) fits two programs in an SM of the 99 KB parts.
_EXPAND_16 = [_config(128, 128, 64, 8, 3), _config(64, 128, 64, 4, 4), _config(128, 64, 64, 4, 4),
              _config(64, 128, 64, 4, 3)]
# fp32: IEEE dots run on the CUDA cores with both operand tiles in registers (TF32 ones on the tensor cores): K
# steps of 32, an expert K step of 16 (_expand) and, for 64x64, 2 stages keep every variant free of spills (in 3
# stages ptxas 13's sm_120 build spills 4 bytes); 16-56 KB of shared memory, so the 64x64 tile fits two or more
# programs per SM on every target.
_EXPAND_32 = [_config(64, 64, 32, 4, 2), _config(128, 64, 32, 8, 3)]
_EXPAND_CONFIGS = _EXPAND_16 + _EXPAND_32


def _prune_expand_configs(configs, named_args, **kwargs):
    """The configurations of this launch's operand width that fit the GPU's shared memory per program (so no launch
    meets OutOfResources), before anything is compiled; the first one only under ASE_KERNELS_AUTOTUNE=0."""
    wide = named_args["v_ptr"].dtype == torch.float32
    itemsize = 4 if wide else 2
    limit = smem_per_block(None)
    # the base loop and the experts' loop run one after the other and share their buffers: the wider K step counts
    block_r = kwargs["BLOCK_R"] if named_args["R"] > 0 else 0
    mine = [c for c in configs if any(c is w for w in (_EXPAND_32 if wide else _EXPAND_16))]
    fits = [c for c in mine if tile_smem(c.kwargs["BLOCK_T"], c.kwargs["BLOCK_O"], max(c.kwargs["BLOCK_K"], block_r),
                                         c.num_stages, itemsize) <= limit]
    if not fits:
        raise ValueError(f"no _expand_kernel configuration fits {limit} bytes of shared memory per program")
    return fits[:1] if os.environ.get("ASE_KERNELS_AUTOTUNE", "1") == "0" else fits


def _expand_configs():
    if interpreting():  # one numpy program per block: one large block keeps the tests fast
        return [triton.Config(dict(BLOCK_T=32, BLOCK_O=64, BLOCK_K=64), num_warps=1, num_stages=1)]
    return _EXPAND_CONFIGS


# restore_value: with ACCUMULATE the kernel reads out, so tuning runs must each start from its old value
@triton.autotune(configs=_expand_configs(), key=["D_OUT", "K", "R", "HAS_BASE"], restore_value=["out_ptr"],
                 prune_configs_by=dict(early_config_prune=_prune_expand_configs))
@triton.jit
def _expand_kernel(
    # pointers
    p_ptr, q_ptr, bias_ptr, v_ptr, l_ptr, pre_ptr, out_ptr,
    # sizes
    T, D_OUT, K, R,
    # strides
    stride_pt, stride_pk, stride_qo, stride_qk, stride_vt, stride_vc, stride_ln, stride_lr, stride_lo,
    stride_ot, stride_oo,
    # meta
    RANK: tl.constexpr, HAS_BASE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_EXPERTS: tl.constexpr,
    PACKED: tl.constexpr, ACCUMULATE: tl.constexpr, ACTIVATION: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, GROUP_T: tl.constexpr,
):
    """a[t, o] = sum_k P[t, k] Q[o, k] + bias[o] + sum_c V[t, c] L[c // r, c % r, o], then out = a (ACT_NONE),
    out = gelu(a) with a stored to pre (ACT_GELU), or out = a * gelu'(pre) (ACT_GELU_GRAD); ACCUMULATE adds
    out's old value to a (the experts after a cuBLAS GEMM).

    The expert sum is a K-extension of R columns after the base GEMM, so a frozen Linear plus its experts is one
    pass over the output tile. V (already gated and scaled by the shrink) and L share P's dtype: the extension
    is the same plain tile as the base GEMM's, with no gating logic in this kernel's registers.
    The GELU epilogues spare the FFN a separate elementwise pass over its (T, 4d) hidden activations.
    pre has out's shape and strides.
    """
    # grouped launch order (Triton tutorial 03): GROUP_T row blocks share each column block of Q in L2
    pid = tl.program_id(0)
    num_t = tl.cdiv(T, BLOCK_T)
    num_o = tl.cdiv(D_OUT, BLOCK_O)
    group = pid // (GROUP_T * num_o)
    first_t = group * GROUP_T
    group_size = min(num_t - first_t, GROUP_T)
    pid_t = (first_t + (pid % (GROUP_T * num_o)) % group_size).to(tl.int64)
    pid_o = ((pid % (GROUP_T * num_o)) // group_size).to(tl.int64)

    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    mask_t = offs_t < T
    mask_o = offs_o < D_OUT
    acc = tl.zeros((BLOCK_T, BLOCK_O), dtype=tl.float32)
    if HAS_BASE:
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < K
            p = tl.load(p_ptr + offs_t[:, None] * stride_pt + offs_k[None, :] * stride_pk,
                        mask=mask_t[:, None] & mask_k[None, :], other=0.0)
            q = tl.load(q_ptr + offs_o[None, :] * stride_qo + offs_k[:, None] * stride_qk,
                        mask=mask_o[None, :] & mask_k[:, None], other=0.0)
            acc = tl.dot(p, q, acc, input_precision=PRECISION)
    if HAS_EXPERTS:
        for c0 in range(0, R, BLOCK_R):
            offs_c = c0 + tl.arange(0, BLOCK_R)
            mask_c = offs_c < R
            v = tl.load(v_ptr + offs_t[:, None] * stride_vt + offs_c[None, :] * stride_vc,
                        mask=mask_t[:, None] & mask_c[None, :], other=0.0)
            if PACKED:  # L is lora_B (N, D_OUT, r): see _packed_bank_tile
                w = _packed_bank_tile(l_ptr, c0, pid_o * BLOCK_O, R, D_OUT, stride_ln, RANK, BLOCK_R, BLOCK_O)
            else:
                w = tl.load(l_ptr + ((offs_c // RANK) * stride_ln + (offs_c % RANK) * stride_lr)[:, None]
                            + offs_o[None, :] * stride_lo, mask=mask_c[:, None] & mask_o[None, :], other=0.0)
            acc = tl.dot(v, w.to(v.dtype), acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_o, mask=mask_o, other=0.0).to(tl.float32)[None, :]
    mask_to = mask_t[:, None] & mask_o[None, :]
    tile = offs_t[:, None] * stride_ot + offs_o[None, :] * stride_oo
    if ACCUMULATE:
        acc += tl.load(out_ptr + tile, mask=mask_to, other=0.0).to(tl.float32)
    if ACTIVATION == ACT_GELU:
        pre = acc.to(pre_ptr.dtype.element_ty)
        tl.store(pre_ptr + tile, pre, mask=mask_to)
        acc = _gelu(pre.to(tl.float32))  # from the stored (rounded) value, as an unfused GELU would see it
    elif ACTIVATION == ACT_GELU_GRAD:
        acc *= _gelu_grad(tl.load(pre_ptr + tile, mask=mask_to, other=0.0).to(tl.float32))
    tl.store(out_ptr + tile, acc.to(out_ptr.dtype.element_ty), mask=mask_to)


TASKS_NONE = tl.constexpr(0)  # every token counts
TASKS_FILTER = tl.constexpr(1)  # any order of task ids: mask each token block by task
TASKS_RANGES = tl.constexpr(2)  # task-major ids: each task's tokens are one range, from per-task offsets


@triton.jit
def _wgrad_tile(l_ptr, r_ptr, task_ptr, task, t_lo, t_hi, offs_c, mask_c, offs_k, K,
                stride_lt, stride_lc, stride_rt, stride_rk, stride_task,
                TASK_FILTER: tl.constexpr, PRECISION: tl.constexpr,
                BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    """sum_{t in [t_lo, t_hi)} L[t, offs_c]^T R[t, offs_k] (of task `task` only if TASK_FILTER): (BLOCK_C, BLOCK_K)
    fp32. No data-dependent branch in the loop, so its loads are pipelined."""
    mask_k = offs_k < K
    acc = tl.zeros((BLOCK_C, BLOCK_K), dtype=tl.float32)
    for t0 in range(t_lo, t_hi, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        mask_t = offs_t < t_hi
        if TASK_FILTER:
            mask_t &= tl.load(task_ptr + offs_t * stride_task, mask=mask_t, other=-1) == task
        lt = tl.load(l_ptr + offs_c[:, None] * stride_lc + offs_t[None, :] * stride_lt,
                     mask=mask_c[:, None] & mask_t[None, :], other=0.0)
        r = tl.load(r_ptr + offs_t[:, None] * stride_rt + offs_k[None, :] * stride_rk,
                    mask=mask_t[:, None] & mask_k[None, :], other=0.0)
        acc = tl.dot(lt, r.to(lt.dtype), acc, input_precision=PRECISION)
    return acc


@triton.jit
def _wgrad_kernel(
    # pointers
    l0_ptr, r0_ptr, l1_ptr, r1_ptr, task_ptr, toff_ptr, part_ptr,
    # sizes
    T, C, K0, K1, K_PART,
    # strides
    stride_l0t, stride_l0c, stride_r0t, stride_r0k, stride_l1t, stride_l1c, stride_r1t, stride_r1k, stride_task,
    # meta
    TASKS: tl.constexpr, TWO: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """part[split, p, c, k] = sum over the split's tokens of L_p[t, c] R_p[t, k], for problem p: the task p of one
    (L0, R0) pair, or (TWO) the pairs (L0, R0) and (L1, R1) of one launch.

    Each program owns one (K block, split, p) and writes its own partial: no atomics, a deterministic sum
    (:func:`_wgrad_sum_kernel` adds the splits). With TASKS_RANGES a program walks only the tokens of its task.
    """
    pid_k = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    p = tl.program_id(2)
    splits = tl.num_programs(1)
    if TASKS == TASKS_RANGES:
        t_start = tl.load(toff_ptr + p)
        t_end = tl.load(toff_ptr + p + 1)
    else:
        t_start = T * 0
        t_end = T * 1
    per_split = tl.cdiv(tl.cdiv(t_end - t_start, splits), BLOCK_T) * BLOCK_T
    t_lo = t_start + split * per_split
    t_hi = tl.minimum(t_end, t_lo + per_split)
    offs_c = tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    filt: tl.constexpr = TASKS == TASKS_FILTER
    if TWO and p == 1:
        acc = _wgrad_tile(l1_ptr, r1_ptr, task_ptr, p, t_lo, t_hi, offs_c, mask_c, offs_k, K1,
                          stride_l1t, stride_l1c, stride_r1t, stride_r1k, stride_task,
                          False, PRECISION, BLOCK_T, BLOCK_C, BLOCK_K)
    else:
        acc = _wgrad_tile(l0_ptr, r0_ptr, task_ptr, p, t_lo, t_hi, offs_c, mask_c, offs_k, K0,
                          stride_l0t, stride_l0c, stride_r0t, stride_r0k, stride_task,
                          filt, PRECISION, BLOCK_T, BLOCK_C, BLOCK_K)
    part = ((split * tl.num_programs(2) + p) * C + offs_c[:, None]) * K_PART + offs_k[None, :]
    tl.store(part_ptr + part, acc, mask=mask_c[:, None] & (offs_k < K_PART)[None, :])


@triton.jit
def _wgrad_sum_kernel(
    # pointers
    part_ptr, out0_ptr, out1_ptr,
    # sizes
    SPLITS, C, K0, K1, K_PART,
    # strides: out_p[c // RANK, c % RANK, k] (out0 of problem p at p * stride_0p)
    stride_0p, stride_0n, stride_0r, stride_0k, stride_1n, stride_1r, stride_1k,
    # meta
    RANK: tl.constexpr, TWO: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out_p[c, k] = sum_split part[split, p, c, k], in a fixed order, cast to the weight's dtype and written in
    its layout (e.g. lora_B's (N, d_out, r)): no separate sum, permute or cast kernels."""
    pid_k = tl.program_id(0).to(tl.int64)
    p = tl.program_id(1)
    offs_c = tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    rows = (p * C + offs_c[:, None]) * K_PART + offs_k[None, :]
    mask = mask_c[:, None] & (offs_k < K_PART)[None, :]
    acc = tl.zeros((BLOCK_C, BLOCK_K), dtype=tl.float32)
    for s in range(0, SPLITS):
        acc += tl.load(part_ptr + s * tl.num_programs(1) * C * K_PART + rows, mask=mask, other=0.0)
    if TWO and p == 1:
        out = out1_ptr + (offs_c // RANK)[:, None] * stride_1n + (offs_c % RANK)[:, None] * stride_1r \
            + offs_k[None, :] * stride_1k
        tl.store(out, acc.to(out1_ptr.dtype.element_ty), mask=mask_c[:, None] & (offs_k < K1)[None, :])
    else:
        out = out0_ptr + p * stride_0p + (offs_c // RANK)[:, None] * stride_0n + (offs_c % RANK)[:, None] * stride_0r \
            + offs_k[None, :] * stride_0k
        tl.store(out, acc.to(out0_ptr.dtype.element_ty), mask=mask_c[:, None] & (offs_k < K0)[None, :])


class _Launch(NamedTuple):
    """One launch's grid and keyword arguments (meta-parameters, num_warps, num_stages), computed once per key;
    config: the autotuner's choice where the kernel is autotuned."""

    grid: tuple
    meta: dict
    config: triton.Config | None = None


_MAX_LAUNCHES = 4096  # per launcher: the keys hold the token count, which a varying batch or sequence length varies


def _remember(cache: dict, key: tuple, launch: _Launch) -> _Launch:
    """Store a launch computed for key; a cache grown past _MAX_LAUNCHES is emptied first, so that the token counts
    of a long run with many batch shapes cannot grow it without bound (recomputing a launch is cheap, and the
    autotuner keeps its own choices)."""
    if len(cache) >= _MAX_LAUNCHES:
        cache.clear()
    cache[key] = launch
    return launch


def _wgrad_launch(t, c, k0, k1, two, rank, out_rows, no_ids, no_offsets, right) -> _Launch:
    """weight_grad's grid (k blocks, token splits, problems) and the meta-parameters of its two launches (with
    K_PART, the partial sums' width), computed once per shape."""
    problems = 2 if two else (1 if no_ids else out_rows)
    k_part = max(k0, k1)
    cfg = launch_config("wgrad", right)
    k_blocks = cdiv(k_part, cfg["BLOCK_K"])
    tokens_per_problem = t if no_offsets else cdiv(t, problems)
    splits = token_splits(right, tokens_per_problem, k_blocks * problems, cfg["BLOCK_T"])
    tasks = TASKS_NONE.value if no_ids else (TASKS_FILTER.value if no_offsets else TASKS_RANGES.value)
    common = dict(TWO=two, BLOCK_C=next_block(c), BLOCK_K=cfg["BLOCK_K"], num_warps=cfg["num_warps"],
                  num_stages=cfg["num_stages"])
    return _Launch((k_blocks, splits, problems), dict(
        K_PART=k_part, wgrad=dict(TASKS=tasks, PRECISION=dot_precision(right), BLOCK_T=cfg["BLOCK_T"], **common),
        sum=dict(RANK=rank if two else 1, **common)))


_wgrad_launches: dict[tuple, _Launch] = {}  # see weight_grad


def weight_grad(pairs, outs, rank: int = 1, task_ids: torch.Tensor | None = None,
                task_offsets: torch.Tensor | None = None):
    """Token reductions left^T right into weight gradients, in one launch of partial sums and one of their sum.

    pairs: one or two (left (T, C), right (T, K_i)); left and right of one dtype (fp32 left: right is upcast).
    outs: for two pairs, lora_A-like (N, r, K_0) and lora_B-like (N, K_1, r) gradients (C = N * r), written in
    their dtype; for one pair with task_ids (T,) int64, the router-like (tasks, C, K_0) gradient, each task
    summing its own tokens (task_offsets (tasks + 1,): task-major ids, each task one range).
    """
    t, c = pairs[0][0].shape
    (l0, r0), (l1, r1) = pairs[0], pairs[-1]
    o0, o1 = outs[0], outs[-1]
    two = len(pairs) == 2
    key = (t, c, r0.shape[1], r1.shape[1], two, rank, o0.shape[0], task_ids is None, task_offsets is None,
           r0.dtype, dot_precision(r0), r0.device)
    launch = _wgrad_launches.get(key)
    if launch is None:
        launch = _remember(_wgrad_launches, key, _wgrad_launch(*key[:-3], r0))
    (k_blocks, splits, problems), meta = launch.grid, launch.meta
    k_part = meta["K_PART"]
    partial = torch.empty(splits, problems, c, k_part, dtype=torch.float32, device=r0.device)
    ids = task_ids if task_ids is not None else l0
    _wgrad_kernel[launch.grid](
        l0, r0, l1, r1, ids, task_offsets if task_offsets is not None else ids, partial,
        t, c, r0.shape[1], r1.shape[1], k_part,
        *l0.stride(), *r0.stride(), *l1.stride(), *r1.stride(), ids.stride(0), **meta["wgrad"],
    )
    if two:  # lora_A (N, r, K0): (n, r, k); lora_B (N, K1, r): (n, r, k) = strides 0, 2, 1
        s0 = (0, o0.stride(0), o0.stride(1), o0.stride(2))
        s1 = (o1.stride(0), o1.stride(2), o1.stride(1))
    else:  # (P, C, K0) with rank 1
        s0 = (o0.stride(0), o0.stride(1), 0, o0.stride(2))
        s1 = (0, 0, 0)
    _wgrad_sum_kernel[(k_blocks, problems)](
        partial, o0, o1,
        splits, c, r0.shape[1], r1.shape[1], k_part,
        *s0, *s1, **meta["sum"],
    )
    return outs


_MAX_RANK_COLUMNS = 1024  # the shrink keeps all N * r columns in one tile (gate gradients need whole experts)


_shrink_launches: dict[tuple, _Launch] = {}  # see _shrink


def _shrink(inp, bank, gating, backward=None):
    """inp (T, K) times every rank column of an expert bank viewed as (N, r, K), with the gating epilogue of
    gating = (indices, gates, scale). Forward: returns u (T, N * r) fp32 and ug = scale * u * g in inp's dtype.
    backward = u: returns d_u and ug in inp's dtype, and d_gates (T, k + S) fp32."""
    t, k = inp.shape
    idx, gates, scale = gating
    bank_strides = bank.stride()
    key = (t, k, bank.shape, bank_strides, idx.shape[1], backward is None, inp.dtype, bank.dtype,
           dot_precision(inp), inp.device)
    launch = _shrink_launches.get(key)
    if launch is None:
        launch = _remember(_shrink_launches, key,
                           _shrink_launch(inp, bank, idx.shape[1], backward is not None, key[-2]))
    r_cols = bank.shape[0] * bank.shape[1]
    out = torch.empty(t, r_cols, dtype=torch.float32 if backward is None else inp.dtype, device=inp.device)
    ug = torch.empty(t, r_cols, dtype=inp.dtype, device=inp.device)
    u = out if backward is None else backward
    d_gates = torch.empty(t, idx.shape[1], dtype=torch.float32, device=inp.device) if backward is not None else out
    _shrink_kernel[launch.grid](
        inp, bank, out, u, idx, gates, ug, d_gates,
        t, k, r_cols,
        *inp.stride(), *bank_strides, *out.stride(), *u.stride(), *idx.stride(), *gates.stride(),
        *(d_gates.stride() if backward is not None else (0, 0)),
        scale, **launch.meta,
    )
    return (out, ug) if backward is None else (out, ug, d_gates)


def _shrink_launch(inp, bank, ks: int, backward: bool, precision: str) -> _Launch:
    """The grid and meta-parameters of a shrink (see _shrink), computed once per shape."""
    n, rank, _ = bank.shape
    r_cols = n * rank
    if r_cols > _MAX_RANK_COLUMNS:
        raise ValueError(f"lora_A: N * r = {r_cols} rank columns is more than the kernels' {_MAX_RANK_COLUMNS}")
    cfg = launch_config("shrink_bwd" if backward else "shrink", inp)
    block_r = next_block(r_cols)
    return _Launch((cdiv(inp.shape[0], cfg["BLOCK_T"]),),
                   dict(RANK=rank, KS=ks, BACKWARD=backward, PACKED=_packed(bank, block_r), PRECISION=precision,
                        BLOCK_T=cfg["BLOCK_T"], BLOCK_K=cfg["BLOCK_K"], BLOCK_R=block_r,
                        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"]))


def _expand(out, v, bank, base=None, bias=None, act=None, pre=None, accumulate=False):
    """out (T, D_OUT) = act([P @ Q^T] + bias + v @ L_all^T [+ out]), with the expert bank L viewed as
    (N, r, D_OUT) and v (T, R) in out's dtype (R = 0: no experts), base = (P, Q, stride_qo, stride_qk); act None,
    "gelu" (pre-activation stored to pre) or "gelu_grad" (pre read from pre)."""
    t, o = out.shape
    r_cols = v.shape[1]
    p, q, stride_qo, stride_qk = base if base is not None else (v, v, 0, 0)
    k = p.shape[1] if base is not None else 0
    bank_strides = bank.stride()
    args = (p, q, bias if bias is not None else v, v, bank, pre if pre is not None else out, out,
            t, o, k, r_cols,
            *p.stride(), stride_qo, stride_qk, *v.stride(), *bank_strides, *out.stride())
    # everything but the tensors and their strides follows from this key: after the first call per key, the grid
    # and the meta-parameters, with the configuration the autotuner chose, are looked up once and launched directly,
    # without the autotuner's per-call key building and lookup (host time; tests/test_launch_binding.py)
    key = (t, o, k, r_cols, bank.shape[1], bank_strides, base is not None, bias is not None, act, accumulate,
           p.dtype, q.dtype, v.dtype, bank.dtype, out.dtype, dot_precision(out), out.device)
    launch = _expand_choice.get(key)
    if launch is not None:
        _expand_kernel.fn[launch.grid](*args, **launch.meta)
        return out
    # the experts' K step: 64 rank columns (N * r in every DESIGN.md configuration) in one step for 16-bit operands;
    # 16 for fp32, whose lora_B tile spills at 32 and 64 (4-8 bytes on sm_86/sm_90, tests/test_targets.py)
    block_r = min(16 if v.dtype == torch.float32 else 64, next_block(r_cols))
    meta = dict(RANK=bank.shape[1], HAS_BASE=base is not None, HAS_BIAS=bias is not None, HAS_EXPERTS=r_cols > 0,
                # fp32 reads lora_B with strided loads: the packed tile's reshuffle spills at fp32 width
                PACKED=_packed(bank, block_r) and v.dtype != torch.float32, ACCUMULATE=accumulate,
                ACTIVATION=_ACTIVATIONS[act], PRECISION=key[-2], BLOCK_R=block_r, GROUP_T=8)
    _expand_kernel[lambda m: (cdiv(t, m["BLOCK_T"]) * cdiv(o, m["BLOCK_O"]),)](*args, **meta)
    config = getattr(_expand_kernel, "best_config", None)
    # None where the kernel is a stand-in that tunes nothing (tests/test_launches.py): it keeps this path
    if config is not None:
        c = config.kwargs
        _remember(_expand_choice, key, _Launch((cdiv(t, c["BLOCK_T"]) * cdiv(o, c["BLOCK_O"]),),
                                               {**meta, **config.all_kwargs()}, config))
    return out


_expand_choice: dict[tuple, _Launch] = {}  # see _expand


def _packed(bank: torch.Tensor, block_r: int) -> bool:
    """bank (N, r, d) is a view of a (N, d, r) tensor with (d, r) contiguous and r a power of two <= block_r: the
    kernels then read each expert's rows as one contiguous run (_packed_bank_tile)."""
    rank = bank.shape[1]
    return bank.stride(1) == 1 and bank.stride(2) == rank and rank & (rank - 1) == 0 and rank <= block_r


def _b_bank(lora_B: torch.Tensor) -> torch.Tensor:
    """lora_B (N, d_out, r) as the kernels' expert bank (N, r, d_out): a view, no copy."""
    return lora_B.transpose(1, 2)


def moe_lora_fwd(x, lora_A, lora_B, indices, gates, scale: float, base_input, base_weight, base_bias):
    """x: (T, d_in); lora_A: (N, r, d_in); lora_B: (N, d_out, r); indices, gates: (T, k + S).

    Returns y (T, d_out) in x's dtype and u = x A_all^T (T, N * r) fp32.
    """
    u, ug = _shrink(x, lora_A, (indices, gates, scale))
    y = torch.empty(x.shape[0], lora_B.shape[1], dtype=x.dtype, device=x.device)
    base = None
    if base_weight is not None:
        base = (base_input, base_weight, base_weight.stride(0), base_weight.stride(1))
    _expand(y, ug, _b_bank(lora_B), base=base, bias=base_bias)
    return y, u


def _expert_grads(d_y, x, lora_A, lora_B, indices, gates, u, scale):
    """The experts' share of backward: d_u = d(u * g) (T, N * r) in d_y's dtype for the caller's dx, and d_A, d_B,
    d_gates."""
    d_u, ug, d_gates = _shrink(d_y, _b_bank(lora_B), (indices, gates, scale), backward=u)
    d_a, d_b = weight_grad([(d_u, x), (ug, d_y)], [torch.empty_like(lora_A), torch.empty_like(lora_B)],
                           lora_A.shape[1])
    return d_u, d_a, d_b, d_gates


def moe_lora_bwd(d_y, x, lora_A, lora_B, indices, gates, u, scale: float, base_weight, need_d_base_input: bool,
                 fuse_base: bool = False):
    """Gradients of :func:`moe_lora_fwd`: d_x, d_A, d_B, d_gates (T, k + S) fp32, and d_base_input or None.

    fuse_base: x is base_input (a LoRA'd Linear), so d_x = d_u @ A_all + d_y @ W0 comes out of one expand.
    """
    d_u, d_a, d_b, d_gates = _expert_grads(d_y, x, lora_A, lora_B, indices, gates, u, scale)
    d_x = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    base = (d_y, base_weight, base_weight.stride(1), base_weight.stride(0)) if fuse_base else None
    _expand(d_x, d_u, lora_A, base=base)
    d_base_input = None
    if need_d_base_input and not fuse_base:
        d_base_input = d_y @ base_weight  # a plain frozen-weight GEMM: cuBLAS
    return d_x, d_a, d_b, d_gates, d_base_input
