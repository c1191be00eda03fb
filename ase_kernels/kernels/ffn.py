"""The ASE FFN, y = fc2(gelu(fc1(x))) + scale * sum_i g_i B_i A_i x, on the kernels of lowrank.py, two ways.

Fused: fc1's bias and GELU ride in its GEMM's epilogue and the experts are a K-extension of fc2's GEMM; in
backward the GELU gradient rides in fc2's input-gradient GEMM and the experts' input gradient is a K-extension of
fc1's. Three GEMM kernels each way, as many as a bare FFN has.

cuBLAS (the hedge): the frozen GEMMs are torch calls (cuBLAS, bias in their epilogue), with the shrink and the
experts' sum as small kernels around them, so the layer is never slower than a bare FFN plus a few small kernels,
whatever Triton's GEMMs do on a given GPU.

On a GPU each phase (forward, backward) measures both once per shape, as an autotuner does, and keeps the faster;
ASE_KERNELS_FFN=fused|cublas forces one.
"""

import functools
import os

import torch

from .common import interpreting, next_power_of_2
from .lowrank import _b_bank, _expand, _expert_grads, _shrink


def _ffn_fwd_fused(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, lora_A, lora_B, indices, gates, scale):
    # three kernels: the shrink, fc1 with bias and GELU in its epilogue, fc2 with the experts as a K-extension
    u, ug = _shrink(x, lora_A, (indices, gates, scale))
    h_pre = torch.empty(x.shape[0], fc1_weight.shape[0], dtype=x.dtype, device=x.device)
    h = torch.empty_like(h_pre)
    _expand(h, ug[:, :0], lora_A, base=(x, fc1_weight, *fc1_weight.stride()), bias=fc1_bias, act="gelu", pre=h_pre)
    y = torch.empty(x.shape[0], lora_B.shape[1], dtype=x.dtype, device=x.device)
    _expand(y, ug, _b_bank(lora_B), base=(h, fc2_weight, *fc2_weight.stride()), bias=fc2_bias)
    return y, u, h_pre


def _ffn_fwd_cublas(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, lora_A, lora_B, indices, gates, scale):
    # the frozen GEMMs (bias in their epilogue) are cuBLAS calls; the shrink and the experts' sum are small kernels
    u, ug = _shrink(x, lora_A, (indices, gates, scale))
    h_pre = torch.nn.functional.linear(x, fc1_weight, fc1_bias)
    y = torch.nn.functional.linear(torch.nn.functional.gelu(h_pre), fc2_weight, fc2_bias)
    _expand(y, ug, _b_bank(lora_B), accumulate=True)
    return y, u, h_pre


def _ffn_bwd_fused(d_y, x, fc1_weight, fc2_weight, lora_A, lora_B, indices, gates, u, h_pre, scale):
    # the GELU gradient rides in fc2's input-gradient GEMM, the experts' input gradient in fc1's (a K-extension)
    d_u, d_a, d_b, d_gates = _expert_grads(d_y, x, lora_A, lora_B, indices, gates, u, scale)
    d_h_pre = torch.empty_like(h_pre)
    _expand(d_h_pre, d_u[:, :0], lora_A, base=(d_y, fc2_weight, fc2_weight.stride(1), fc2_weight.stride(0)),
            act="gelu_grad", pre=h_pre)
    d_x = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _expand(d_x, d_u, lora_A, base=(d_h_pre, fc1_weight, fc1_weight.stride(1), fc1_weight.stride(0)))
    return d_x, d_a, d_b, d_gates, d_h_pre


def _ffn_bwd_cublas(d_y, x, fc1_weight, fc2_weight, lora_A, lora_B, indices, gates, u, h_pre, scale):
    d_u, d_a, d_b, d_gates = _expert_grads(d_y, x, lora_A, lora_B, indices, gates, u, scale)
    d_h_pre = torch.ops.aten.gelu_backward(d_y @ fc2_weight, h_pre)
    d_x = d_h_pre @ fc1_weight
    _expand(d_x, d_u, lora_A, accumulate=True)
    return d_x, d_a, d_b, d_gates, d_h_pre


FFN_PATHS = ("fused", "cublas")
_FFN = {"fwd": {"fused": _ffn_fwd_fused, "cublas": _ffn_fwd_cublas},
        "bwd": {"fused": _ffn_bwd_fused, "cublas": _ffn_bwd_cublas}}
_ffn_choice: dict[tuple, str] = {}  # (phase, shapes, dtype, device) -> the faster path, measured once


def ffn_path(key: tuple, fns: dict, args: tuple, x: torch.Tensor, measure=None) -> str:
    """Which implementation of the ASE FFN serves a call: ASE_KERNELS_FFN=fused|cublas if set; on a GPU the faster
    of fns (path -> function of args), measured once per key like an autotuner (measure, a function of a
    no-argument callable, defaults to triton.testing.do_bench) and cached; else (CPU, interpreter, or a CUDA-graph
    capture before any measurement) the fused one."""
    forced = os.environ.get("ASE_KERNELS_FFN", "").strip().lower()
    if forced:
        if forced not in FFN_PATHS:
            raise ValueError(f"ASE_KERNELS_FFN must be one of {FFN_PATHS}, got {forced!r}")
        return forced
    if key in _ffn_choice:
        return _ffn_choice[key]
    if measure is None:
        if not x.is_cuda or interpreting() or torch.cuda.is_current_stream_capturing():
            return "fused"
        from triton.testing import do_bench as measure
    times = {path: measure(functools.partial(fn, *args)) for path, fn in fns.items()}
    _ffn_choice[key] = min(times, key=times.get)
    return _ffn_choice[key]


def _ffn_run(phase: str, x: torch.Tensor, indices: torch.Tensor, weights: tuple, args: tuple):
    """One phase of the ASE FFN through the path that ffn_path picks. The choice is made per token count rounded
    up to a power of 2 and per shape of the token-independent tensors: weights (None for an absent bias) and the
    k + S experts per token."""
    key = (phase, next_power_of_2(x.shape[0]), indices.shape[1], *[None if w is None else w.shape for w in weights],
           x.dtype, x.device)
    fns = _FFN[phase]
    return fns[ffn_path(key, fns, args, x)](*args)


def moe_lora_ffn_fwd(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, lora_A, lora_B, indices, gates, scale: float):
    """The ASE FFN with experts on its input: y = fc2(gelu(fc1(x))) + scale * sum_i g_i B_i A_i x.

    x: (T, d); fc1_weight: (hidden, d); fc2_weight: (d_out, hidden); biases or None; lora_A: (N, r, d);
    lora_B: (N, d_out, r). Returns y (T, d_out), u (T, N * r) fp32 and h_pre = fc1(x) (T, hidden), saved for the
    GELU gradient. Fused (three kernels: the shrink, fc1 with bias and GELU in its epilogue, fc2 with the experts)
    or with cuBLAS GEMMs, as :func:`ffn_path` picks; both save the same tensors.
    """
    return _ffn_run("fwd", x, indices, (fc1_weight, fc1_bias, fc2_weight, fc2_bias, lora_A, lora_B),
                    (x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, lora_A, lora_B, indices, gates, scale))


def moe_lora_ffn_bwd(d_y, x, fc1_weight, fc2_weight, lora_A, lora_B, indices, gates, u, h_pre, scale: float):
    """Gradients of :func:`moe_lora_ffn_fwd` with frozen fc1/fc2: d_x, d_A, d_B, d_gates, and d_h_pre (T, hidden)
    for the caller that trains fc1. d_x = (d_y W2 * gelu'(h_pre)) W1 + d_u A_all; fused, the experts' input
    gradient rides in fc1's backward GEMM as a K-extension."""
    return _ffn_run("bwd", x, indices, (fc1_weight, fc2_weight, lora_A, lora_B),
                    (d_y, x, fc1_weight, fc2_weight, lora_A, lora_B, indices, gates, u, h_pre, scale))
