"""The public ops: argument checks, autocast, backend dispatch, and their ``torch.library`` registration.

Each op is a ``torch.library.custom_op`` with a fake (meta) implementation and a registered autograd formula whose
backward is itself a custom op, so ``torch.compile(fullgraph=True)`` and CUDA graphs see two opaque nodes and no
host synchronisation. Eager calls run the same functions as a plain ``autograd.Function``, which costs less host
time than the custom-op dispatcher. Backends (``ASE_KERNELS_BACKEND`` forces one):

- ``triton``: the kernels of :mod:`ase_kernels.kernels`; the default for CUDA tensors (CPU tensors run them
  under ``TRITON_INTERPRET=1``);
- ``torch``: the vectorised :mod:`ase_kernels.torch_ops`; the default for CPU tensors;
- ``reference``: :mod:`ase_kernels.reference`, the per-expert loop, differentiated by autograd.
"""

import contextlib
import functools
import os
import types

import torch

from . import reference, torch_ops
from .checks import Routing, check_moe_lora, check_moe_lora_ffn, check_route, task_offsets, trust_indices
from .kernels.common import interpreting

BACKENDS = ("reference", "torch", "triton")


def backend(x: torch.Tensor) -> str:
    """The backend that serves tensors like x: ASE_KERNELS_BACKEND if set, else triton for CUDA tensors and torch
    for the rest. Forcing triton on CPU tensors needs TRITON_INTERPRET=1 (the tests do this)."""
    name = os.environ.get("ASE_KERNELS_BACKEND", "").strip().lower()
    if name:
        if name not in BACKENDS:
            raise ValueError(f"ASE_KERNELS_BACKEND must be one of {BACKENDS}, got {name!r}")
        return name
    return "triton" if x.is_cuda else "torch"


def _impl(x: torch.Tensor) -> types.ModuleType | types.SimpleNamespace:
    """The backend functions for x. Callers run them with autocast off: the ops pick their own precisions."""
    if backend(x) != "triton":
        return torch_ops
    if x.dtype == torch.float64:
        raise TypeError("x must be float32, float16 or bfloat16 for the Triton backend, got torch.float64")
    if not x.is_cuda and not interpreting():
        raise ValueError(f"the Triton backend needs CUDA tensors (or TRITON_INTERPRET=1), x is on {x.device}")
    if interpreting() and x.dtype == torch.bfloat16 and not interpreter_computes_bf16():
        # the interpreter multiplies bf16 bit patterns as integers (triton-lang/triton#11584): a wrong answer
        raise TypeError("x must be float32 or float16 under TRITON_INTERPRET=1: the interpreter cannot multiply bf16")
    return _triton_ops()


def interpreter_computes_bf16() -> bool:
    """Whether Triton's interpreter has been taught bf16 as a GPU computes it. Unpatched it multiplies bf16 bit
    patterns as integers and truncates fp32 -> bf16; the test harness (tests/interpreter_bf16.py) patches both,
    checks the result, and marks the interpreter's builder class. Users' interpreters are never patched."""
    from triton.runtime import interpreter

    return getattr(interpreter.InterpreterBuilder, "ase_kernels_bf16_as_gpu", False) is True


@functools.cache
def _triton_ops() -> types.SimpleNamespace:
    # The kernels are defined on first use: @triton.jit reads TRITON_INTERPRET when a kernel is defined, and a test
    # session sets it at collection time, after this module was imported.
    from .kernels import ffn, lowrank, routing

    return types.SimpleNamespace(route_fwd=routing.route_fwd, route_bwd=routing.route_bwd,
                                 moe_lora_fwd=lowrank.moe_lora_fwd, moe_lora_bwd=lowrank.moe_lora_bwd,
                                 moe_lora_ffn_fwd=ffn.moe_lora_ffn_fwd, moe_lora_ffn_bwd=ffn.moe_lora_ffn_bwd)


def _no_autocast(x: torch.Tensor):
    """Autocast off inside an op (no context at all when it is off already: this runs on every call)."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.autocast(x.device.type, enabled=False)
    return contextlib.nullcontext()


def _gate_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _autocast(*tensors):
    """Under torch.autocast, cast the float arguments to the autocast dtype (ops run in one dtype)."""
    ref = tensors[0]
    if not torch.is_autocast_enabled(ref.device.type):
        return tensors
    dtype = torch.get_autocast_dtype(ref.device.type)
    return tuple(t.to(dtype) if t is not None and t.is_floating_point() else t for t in tensors)


def _autograd_op(op, fn, setup_context, grad):
    """Call op when tracing (torch.compile, or tensor subclasses such as fake tensors: one opaque node) and, for
    plain eager tensors, the same forward, setup and backward as an autograd.Function: the custom-op dispatcher
    and its autograd wrapper cost more host time per call than the kernel launches they wrap."""

    def forward(ctx, *inputs):
        # forward and setup in one (ctx-first forward): an autograd.Function with a separate setup_context binds
        # its arguments through inspect.signature on every call, tens of microseconds of host time
        output = fn(*inputs)
        setup_context(ctx, inputs, output)
        ctx.eager = True  # backward then calls the plain backward function, not its custom op
        return output

    function = type(f"{fn.__name__}_function", (torch.autograd.Function,), dict(
        forward=staticmethod(forward), backward=staticmethod(grad)))

    def call(*args):
        if torch.compiler.is_compiling() or type(args[0]) is not torch.Tensor:
            return op(*args)
        return function.apply(*args)

    return call


def _backward_op(ctx, op, fn, *args):
    """The backward custom op op, or its plain function fn in the eager autograd.Function (see _autograd_op)."""
    return fn(*args) if getattr(ctx, "eager", False) else op(*args)


# ------------------------------------------------------------------------------------------------------ route


def _route_fn(x: torch.Tensor, router_weight: torch.Tensor, task_ids: torch.Tensor, top_k: int, num_shared: int,
              mode: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    with _no_autocast(x):
        indices, gates, prob_sums = _impl(x).route_fwd(x, router_weight, task_ids, top_k, num_shared, mode)
    # float outputs first: opcheck's autograd test sums the outputs in order, and an int64 first one breaks it
    return gates, prob_sums, indices


_route = torch.library.custom_op("ase_kernels::route", _route_fn, mutates_args=())


@_route.register_fake
def _(x, router_weight, task_ids, top_k, num_shared, mode):
    ks = top_k + num_shared
    gdt = _gate_dtype(x)
    return (x.new_empty(x.shape[0], ks, dtype=gdt), x.new_empty(router_weight.shape[:2], dtype=gdt),
            x.new_empty(x.shape[0], ks, dtype=torch.int64))


def _route_backward_fn(d_gates: torch.Tensor | None, d_prob_sums: torch.Tensor | None, x: torch.Tensor,
                       router_weight: torch.Tensor, task_ids: torch.Tensor, indices: torch.Tensor, gates: torch.Tensor,
                       top_k: int, num_shared: int, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    # an absent gradient (None: autograd does not materialise zeros) counts as zero
    with _no_autocast(x):
        return tuple(_impl(x).route_bwd(d_gates, d_prob_sums, x, router_weight, task_ids, indices, gates, top_k,
                                        num_shared, mode,
                                        task_offsets=task_offsets(task_ids, router_weight.shape[0])))


_route_backward = torch.library.custom_op("ase_kernels::route_backward", _route_backward_fn, mutates_args=())


@_route_backward.register_fake
def _(d_gates, d_prob_sums, x, router_weight, task_ids, indices, gates, top_k, num_shared, mode):
    return x.new_empty(x.shape), router_weight.new_empty(router_weight.shape)


def _route_setup(ctx, inputs, output):
    x, router_weight, task_ids, top_k, num_shared, mode = inputs
    gates, _, indices = output
    ctx.mark_non_differentiable(indices)
    ctx.set_materialize_grads(False)  # no zero tensors for unused outputs: backward takes None
    # Saved: x and the router weight (already alive), ids and the compact routing; the (T, N) logits are
    # recomputed in backward (one small GEMM) instead of being saved.
    ctx.save_for_backward(x, router_weight, task_ids, indices, gates)
    ctx.config = (top_k, num_shared, mode)


def _route_grad(ctx, d_gates, d_prob_sums, d_indices):
    if d_gates is None and d_prob_sums is None:
        return None, None, None, None, None, None
    x, router_weight, task_ids, indices, gates = ctx.saved_tensors
    d_x, d_w = _backward_op(ctx, _route_backward, _route_backward_fn, d_gates, d_prob_sums, x, router_weight, task_ids,
                            indices, gates, *ctx.config)
    return d_x, d_w, None, None, None, None


_route.register_autograd(_route_grad, setup_context=_route_setup)
_route_call = _autograd_op(_route, _route_fn, _route_setup, _route_grad)


def route(x: torch.Tensor, router_weight: torch.Tensor, task_ids: torch.Tensor | None = None, *, top_k: int,
          num_shared: int, mode: str = "adaptive") -> Routing:
    """Route every token to k sparse experts plus the S shared ones, with its task's router.

    Args:
        x: (..., d_in) float32, float16 or bfloat16.
        router_weight: (tasks, N, d_in), x's dtype; rows N-S..N-1 are the shared experts' router.
        task_ids: (T,) integer, T = x.numel() // d_in, or one id per leading batch row of x; may be None with
            one task.
        top_k: k, sparse experts per token, 0 <= k <= N - S.
        num_shared: S, shared experts, active for every token.
        mode: ``adaptive`` (ASE: one softmax over the k selected and S shared logits), ``naive`` (softmax over
            the sparse logits, top-k kept without renormalising, shared gates 1) or ``none`` (naive with S = 0).

    Returns:
        :class:`Routing` with indices (T, k + S) int64, gates (T, k + S) float32 and prob_sums (tasks, N)
        float32. Gates are float32 whatever x's dtype, so adaptive gates sum to 1 to float32 precision. Gradients
        flow from gates and prob_sums into x and router_weight; ties in top-k go to the lower expert index. A NaN
        logit ranks above every number (selected, its NaN reaching the gates and prob_sums), on every backend.

    Example:
        >>> import torch, ase_kernels as ak
        >>> x, w = torch.randn(10, 16), torch.randn(2, 8, 16)
        >>> r = ak.route(x, w, torch.tensor([0] * 5 + [1] * 5), top_k=3, num_shared=2)
        >>> r.indices.shape, r.gates.sum(-1).allclose(torch.ones(10))
        (torch.Size([10, 5]), True)
    """
    x, router_weight = _autocast(x, router_weight)
    x2, ids, top_k, num_shared = check_route(x, router_weight, task_ids, top_k, num_shared, mode)  # ints for the op
    if backend(x) == "reference" or x2.shape[0] == 0:  # an empty batch keeps its (empty) autograd graph
        return reference.route(x, router_weight, ids, top_k=top_k, num_shared=num_shared, mode=mode)
    gates, prob_sums, indices = _route_call(x2, router_weight, ids, top_k, num_shared, mode)
    trust_indices(indices)
    return Routing(indices, gates, prob_sums)


# --------------------------------------------------------------------------------------------------- moe_lora


def _moe_lora_fn(x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, indices: torch.Tensor,
                 gates: torch.Tensor, scale: float, base_input: torch.Tensor | None, base_weight: torch.Tensor | None,
                 base_bias: torch.Tensor | None, base_is_x: bool) -> tuple[torch.Tensor, torch.Tensor]:
    with _no_autocast(x):
        return tuple(_impl(x).moe_lora_fwd(x, lora_A, lora_B, indices, gates, scale,
                                           x if base_is_x else base_input, base_weight, base_bias))


_moe_lora = torch.library.custom_op("ase_kernels::moe_lora", _moe_lora_fn, mutates_args=())


@_moe_lora.register_fake
def _(x, lora_A, lora_B, indices, gates, scale, base_input, base_weight, base_bias, base_is_x):
    n, rank, _ = lora_A.shape
    return x.new_empty(x.shape[0], lora_B.shape[1]), x.new_empty(x.shape[0], n * rank, dtype=_gate_dtype(x))


def _moe_lora_backward_fn(d_y: torch.Tensor, x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                          indices: torch.Tensor, gates: torch.Tensor, u: torch.Tensor, scale: float,
                          base_weight: torch.Tensor | None, need_d_base_input: bool,
                          base_is_x: bool
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    with _no_autocast(x):
        d_x, d_a, d_b, d_g, d_base = _impl(x).moe_lora_bwd(d_y, x, lora_A, lora_B, indices, gates, u, scale,
                                                           base_weight, need_d_base_input, fuse_base=base_is_x)
    # a custom op returns tensors only: an absent base-input gradient is an empty tensor
    return d_x, d_a, d_b, d_g, d_base if d_base is not None else x.new_empty(0)


_moe_lora_backward = torch.library.custom_op("ase_kernels::moe_lora_backward", _moe_lora_backward_fn,
                                             mutates_args=())


@_moe_lora_backward.register_fake
def _(d_y, x, lora_A, lora_B, indices, gates, u, scale, base_weight, need_d_base_input, base_is_x):
    d_base = (x.new_empty(x.shape[0], base_weight.shape[1]) if need_d_base_input and not base_is_x
              else x.new_empty(0))
    return (x.new_empty(x.shape), lora_A.new_empty(lora_A.shape), lora_B.new_empty(lora_B.shape),
            gates.new_empty(gates.shape, dtype=_gate_dtype(x)), d_base)


def _moe_lora_setup(ctx, inputs, output):
    x, lora_A, lora_B, indices, gates, scale, base_input, base_weight, base_bias, base_is_x = inputs
    _, u = output
    ctx.mark_non_differentiable(u)
    ctx.set_materialize_grads(False)  # no zero gradient for u: backward takes None
    # Saved: x and u = x A_all^T (T, N * r), the compact routing, the weights. base_input is saved only when the
    # base weight itself trains: a frozen W0 needs no activation for its (absent) gradient.
    weight_trains = base_weight is not None and ctx.needs_input_grad[7]
    ctx.save_for_backward(x, lora_A, lora_B, indices, gates, u, base_weight,
                          (x if base_is_x else base_input) if weight_trains else None)
    ctx.scale, ctx.base_is_x = scale, base_is_x
    ctx.need_d_base_input = base_weight is not None and not base_is_x and ctx.needs_input_grad[6]
    ctx.bias_trains = base_bias is not None and ctx.needs_input_grad[8]


def _moe_lora_grad(ctx, d_y, d_u):
    if d_y is None:
        return (None,) * 10
    x, lora_A, lora_B, indices, gates, u, base_weight, base_input = ctx.saved_tensors
    d_x, d_a, d_b, d_g, d_base = _backward_op(ctx, _moe_lora_backward, _moe_lora_backward_fn, d_y, x, lora_A, lora_B,
                                              indices, gates, u, ctx.scale, base_weight, ctx.need_d_base_input,
                                              ctx.base_is_x)
    # the frozen-base path; kept for completeness when a user does train W0 or its bias
    d_w0 = (d_y.T @ base_input).to(base_weight.dtype) if base_input is not None else None
    d_bias = d_y.sum(0) if ctx.bias_trains else None
    return (d_x, d_a, d_b, None, d_g, None, d_base if ctx.need_d_base_input else None, d_w0, d_bias, None)


_moe_lora.register_autograd(_moe_lora_grad, setup_context=_moe_lora_setup)
_moe_lora_call = _autograd_op(_moe_lora, _moe_lora_fn, _moe_lora_setup, _moe_lora_grad)


def moe_lora(x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, routing: Routing, scale: float = 1.0,
             base_input: torch.Tensor | None = None, base_weight: torch.Tensor | None = None,
             base_bias: torch.Tensor | None = None) -> torch.Tensor:
    """Gated sum of low-rank experts, optionally fused into a frozen base Linear:
    ``y = base_input @ base_weight^T + base_bias + scale * sum_i g_i B_i A_i x``.

    Args:
        x: (..., d_in) float32, float16 or bfloat16: the experts' input.
        lora_A: (N, r, d_in), lora_B: (N, d_out, r), x's dtype.
        routing: the :class:`Routing` of these tokens, from :func:`route`.
        scale: alpha / r.
        base_input: (..., d_base) or None; base_weight: (d_out, d_base) or None; base_bias: (d_out,) or None.
            For a LoRA'd Linear pass base_input=x. The base weight is treated as frozen: it gets a gradient only
            if it requires one, and then base_input is saved for it.

    Returns:
        y: (..., d_out) in x's dtype. Backward gives x, lora_A, lora_B, routing.gates and base_input gradients;
        it saves u = x A_all^T (T, N * r) in float32 and no per-expert output.

    Example:
        >>> import torch, ase_kernels as ak
        >>> x = torch.randn(10, 16)
        >>> r = ak.route(x, torch.randn(1, 8, 16), top_k=2, num_shared=1)
        >>> y = ak.moe_lora(x, torch.randn(8, 2, 16), torch.randn(8, 24, 2), r)
        >>> y.shape
        torch.Size([10, 24])
    """
    same = base_input is x
    x, lora_A, lora_B, base_input, base_weight, base_bias = _autocast(x, lora_A, lora_B, base_input, base_weight,
                                                                      base_bias)
    if same:
        base_input = x
    x2, lead = check_moe_lora(x, lora_A, lora_B, routing, base_input, base_weight, base_bias)
    if backend(x) == "reference" or x2.shape[0] == 0:  # an empty batch keeps its (empty) autograd graph
        return reference.moe_lora(x, lora_A, lora_B, routing, scale, base_input, base_weight, base_bias)
    d_out = lora_B.shape[1]
    base2 = None if base_input is None or same else base_input.reshape(-1, base_input.shape[-1])
    y, _ = _moe_lora_call(x2, lora_A, lora_B, routing.indices, routing.gates, float(scale), base2, base_weight,
                     base_bias, same)
    return y.reshape(*lead, d_out)


# ----------------------------------------------------------------------------------------------- moe_lora_ffn


def _moe_lora_ffn_fn(x: torch.Tensor, fc1_weight: torch.Tensor, fc1_bias: torch.Tensor | None, fc2_weight: torch.Tensor,
                     fc2_bias: torch.Tensor | None, lora_A: torch.Tensor, lora_B: torch.Tensor, indices: torch.Tensor,
                     gates: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    with _no_autocast(x):
        return tuple(_impl(x).moe_lora_ffn_fwd(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, lora_A, lora_B,
                                               indices, gates, scale))


_moe_lora_ffn = torch.library.custom_op("ase_kernels::moe_lora_ffn", _moe_lora_ffn_fn, mutates_args=())


@_moe_lora_ffn.register_fake
def _(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, lora_A, lora_B, indices, gates, scale):
    n, rank, _ = lora_A.shape
    return (x.new_empty(x.shape[0], fc2_weight.shape[0]), x.new_empty(x.shape[0], n * rank, dtype=_gate_dtype(x)),
            x.new_empty(x.shape[0], fc1_weight.shape[0]))


def _moe_lora_ffn_backward_fn(d_y: torch.Tensor, x: torch.Tensor, fc1_weight: torch.Tensor, fc2_weight: torch.Tensor,
                              lora_A: torch.Tensor, lora_B: torch.Tensor, indices: torch.Tensor, gates: torch.Tensor,
                              u: torch.Tensor, h_pre: torch.Tensor, scale: float
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    with _no_autocast(x):
        return tuple(_impl(x).moe_lora_ffn_bwd(d_y, x, fc1_weight, fc2_weight, lora_A, lora_B, indices, gates, u,
                                               h_pre, scale))


_moe_lora_ffn_backward = torch.library.custom_op("ase_kernels::moe_lora_ffn_backward", _moe_lora_ffn_backward_fn,
                                                 mutates_args=())


@_moe_lora_ffn_backward.register_fake
def _(d_y, x, fc1_weight, fc2_weight, lora_A, lora_B, indices, gates, u, h_pre, scale):
    return (x.new_empty(x.shape), lora_A.new_empty(lora_A.shape), lora_B.new_empty(lora_B.shape),
            gates.new_empty(gates.shape, dtype=_gate_dtype(x)), h_pre.new_empty(h_pre.shape))


def _moe_lora_ffn_setup(ctx, inputs, output):
    x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, lora_A, lora_B, indices, gates, scale = inputs
    _, u, h_pre = output
    ctx.mark_non_differentiable(u, h_pre)
    ctx.set_materialize_grads(False)  # no zero gradients for u and h_pre (a (T, hidden) memset): backward takes None
    # Saved: x, u (T, N * r) and h_pre = fc1(x) (T, hidden) for the GELU gradient, as an unfused FFN saves it;
    # h = gelu(h_pre) is not saved: with fc2 frozen nothing needs it (recomputed if fc2 does train).
    ctx.save_for_backward(x, fc1_weight, fc2_weight, lora_A, lora_B, indices, gates, u, h_pre)
    ctx.scale = scale
    ctx.trains = tuple(t is not None and ctx.needs_input_grad[i] for i, t in
                       ((1, fc1_weight), (2, fc1_bias), (3, fc2_weight), (4, fc2_bias)))


def _moe_lora_ffn_grad(ctx, d_y, d_u, d_h_pre_out):
    if d_y is None:
        return (None,) * 10
    x, fc1_weight, fc2_weight, lora_A, lora_B, indices, gates, u, h_pre = ctx.saved_tensors
    d_x, d_a, d_b, d_g, d_h_pre = _backward_op(ctx, _moe_lora_ffn_backward, _moe_lora_ffn_backward_fn, d_y, x,
                                               fc1_weight, fc2_weight, lora_A, lora_B, indices, gates, u, h_pre,
                                               ctx.scale)
    w1, b1, w2, b2 = ctx.trains  # the frozen-base path leaves these None; kept for a user who trains fc1/fc2
    d_w1 = d_h_pre.T @ x if w1 else None
    d_b1 = d_h_pre.sum(0) if b1 else None
    d_w2 = d_y.T @ torch.nn.functional.gelu(h_pre) if w2 else None
    d_b2 = d_y.sum(0) if b2 else None
    return d_x, d_w1, d_b1, d_w2, d_b2, d_a, d_b, None, d_g, None


_moe_lora_ffn.register_autograd(_moe_lora_ffn_grad, setup_context=_moe_lora_ffn_setup)
_moe_lora_ffn_call = _autograd_op(_moe_lora_ffn, _moe_lora_ffn_fn, _moe_lora_ffn_setup, _moe_lora_ffn_grad)


def moe_lora_ffn(x: torch.Tensor, fc1_weight: torch.Tensor, fc1_bias: torch.Tensor | None, fc2_weight: torch.Tensor,
                 fc2_bias: torch.Tensor | None, lora_A: torch.Tensor, lora_B: torch.Tensor, routing: Routing,
                 scale: float = 1.0) -> torch.Tensor:
    """The ASE FFN in one op: ``y = fc2(gelu(fc1(x))) + scale * sum_i g_i B_i A_i x`` (exact-erf GELU).

    On the Triton backend this is three kernels forward (the rank shrink, fc1 with bias and GELU in its epilogue,
    fc2 with the experts as a K-extension) and three GEMM-sized ones backward. The FFN weights are treated as
    frozen (gradients only if they require them).

    Args:
        x: (..., d) float32, float16 or bfloat16.
        fc1_weight: (hidden, d); fc1_bias: (hidden,) or None; fc2_weight: (d_out, hidden); fc2_bias: (d_out,) or
            None; lora_A: (N, r, d); lora_B: (N, d_out, r); all in x's dtype.
        routing: the :class:`Routing` of these tokens. scale: alpha / r.

    Returns:
        y: (..., d_out) in x's dtype.

    Example:
        >>> import torch, ase_kernels as ak
        >>> x = torch.randn(10, 16)
        >>> r = ak.route(x, torch.randn(1, 8, 16), top_k=2, num_shared=1)
        >>> w1, w2 = torch.randn(64, 16), torch.randn(16, 64)
        >>> ak.moe_lora_ffn(x, w1, None, w2, None, torch.randn(8, 2, 16), torch.randn(8, 16, 2), r).shape
        torch.Size([10, 16])
    """
    x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, lora_A, lora_B = _autocast(
        x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, lora_A, lora_B)
    x2, lead = check_moe_lora_ffn(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, lora_A, lora_B, routing)
    if backend(x) == "reference" or x2.shape[0] == 0:  # an empty batch keeps its (empty) autograd graph
        return reference.moe_lora_ffn(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, lora_A, lora_B, routing, scale)
    d_out = fc2_weight.shape[0]
    y, _, _ = _moe_lora_ffn_call(x2, fc1_weight, fc1_bias, fc2_weight, fc2_bias, lora_A, lora_B, routing.indices,
                            routing.gates, float(scale))
    return y.reshape(*lead, d_out)


# ---------------------------------------------------------------------------------------------------- mi_loss


def mi_loss(prob_sums: torch.Tensor) -> torch.Tensor:
    """Mod-Squad mutual-information loss of one layer, exactly as Mod-Squad's official ``TaskMoE`` computes it.

    With n_t = the row sums of prob_sums (task t's token count: each token's softmax sums to 1) and n = sum n_t,
    ``P(t,e) = (prob_sums[t,e] + 1e-4 n_t) / (n + 1e-4)`` (the official code adds 1e-4 to every token's
    probabilities), ``P(t) = sum_e P(t,e) + 1e-4``, ``P(e) = sum_t P(t,e) + 1e-4``, and
    ``L = -sum_{t,e} P(t,e) log(P(t,e) / (P(t) P(e)) + 1e-4)``. The official code counts tokens where this sums
    probabilities: the gradients to the router logits agree, as the counts' gradient is constant along each row
    and a constant shift of a token's probability gradient does not reach its logits through the softmax.

    Args:
        prob_sums: (tasks, N), the per-task sums of the full router softmax (``Routing.prob_sums``).

    Returns:
        A scalar in prob_sums' dtype; 0 for an empty batch. Weight it (the paper uses 0.005) and sum over layers.

    Example:
        >>> import torch, ase_kernels as ak
        >>> round(float(ak.mi_loss(torch.tensor([[2.0, 0.0], [0.0, 2.0]]))), 4)  # each task owns one expert
        -0.6918
    """
    if prob_sums.dim() != 2:
        raise ValueError(f"prob_sums must have shape (tasks, N), got {tuple(prob_sums.shape)}")
    n_t = prob_sums.sum(dim=1, keepdim=True)  # (tasks, 1) tokens of each task
    p_te = (prob_sums + 1e-4 * n_t) / (n_t.sum() + 1e-4)  # (tasks, N)
    p_t = p_te.sum(dim=1, keepdim=True) + 1e-4  # (tasks, 1)
    p_e = p_te.sum(dim=0, keepdim=True) + 1e-4  # (1, N)
    # P(t, e) = 0 only for a task without tokens: its terms are 0 * log(1e-4) = 0
    return -(p_te * torch.log(p_te / (p_t * p_e) + 1e-4)).sum()
