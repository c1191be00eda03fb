"""Triton's interpreter taught bf16 as an NVIDIA GPU computes it: the one place where the tests patch Triton.

The interpreter (TRITON_INTERPRET=1) holds a bf16 value as its numpy uint16 bit pattern (numpy has no bf16), and

- ``tl.dot`` multiplies those bit patterns as integers (triton-lang/triton#11584);
- fp32 -> bf16 casts (``x.to(tl.bfloat16)``, the cast a store into a bf16 tensor implies) truncate the mantissa,
  where the GPU's ``cvt.rn.bf16.f32`` rounds to nearest, ties to even. Truncation alone puts a bf16 result about
  twice as far from float64.

:func:`install` replaces the two builder methods that do this (``InterpreterBuilder.create_dot`` and
``cast_impl``, through which ``create_fp_trunc``/``create_fp_ext`` cast): bf16 dot operands are widened to fp32,
which is exact (a bf16 is the top half of an fp32; the tensor cores multiply bf16 pairs exactly into fp32), and
fp32 -> bf16 rounds to nearest even. Every other interpreter op on bf16 values (elementwise arithmetic, comparisons,
math functions) computes on the bit patterns too; the kernels do none of them (they compute in fp32), so the
patch makes them raise rather than return garbage.

install() first checks that the interpreter still has these internals (their signatures) and still has both bugs
(a probe kernel of known values); once patched, the probe must give the GPU's answers: a bf16 dot of exact values,
and fp32 -> bf16 bits equal to torch's round-to-nearest-even conversion on known cases (ties both ways, a carry
into the exponent, overflow to inf, subnormals, NaN) and on random values. Any mismatch raises
:class:`InterpreterBF16Error` saying what changed: a Triton upgrade is looked at, not papered over.

The library refuses bf16 under TRITON_INTERPRET=1 (ase_kernels/ops.py) unless the interpreter carries the mark
:data:`MARK` that install() sets on its builder class (``ase_kernels.ops.interpreter_computes_bf16``).
"""

import inspect

import numpy as np
import torch
import triton
import triton.language as tl  # module-level: older interpreters look for it in the probe kernel's globals

MARK = "ase_kernels_bf16_as_gpu"  # the attribute ase_kernels.ops.interpreter_computes_bf16 looks for
ORIGINALS = {}  # the builder methods install() replaced, by name (tests/test_interpreter_bf16.py restores them)


class InterpreterBF16Error(RuntimeError):
    pass


def _bf16_to_fp32(bits: np.ndarray) -> np.ndarray:
    """bf16 bit patterns (uint16) -> fp32 values: exact, the bits are the fp32's upper half."""
    return (np.ascontiguousarray(bits).astype(np.uint32) << 16).view(np.float32)


def _fp32_to_bf16(values: np.ndarray) -> np.ndarray:
    """fp32 values -> bf16 bit patterns (uint16), rounded to nearest, ties to even (cvt.rn.bf16.f32).
    Adding 0x7FFF plus the kept part's lowest bit to the fp32 bits rounds the dropped 16 bits, and a carry out of the
    mantissa moves into the exponent (up to inf) as it should; NaN is kept a (quiet) NaN."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    quiet_nan = ((bits >> 16) | 0x0040).astype(np.uint16)
    return np.where(np.isnan(values), quiet_nan, rounded)


# fp32 bit pattern -> the GPU's bf16 bit pattern (round to nearest even); truncation gets five of the first six wrong,
# round-half-up (Triton's own RTNE in _convert_float) the tie at 1 + 2^-8
ROUNDING_CASES = {
    0x3F80C000: 0x3F81,  # 1 + 3 * 2^-9: above the half-way point, rounds up
    0x3F808000: 0x3F80,  # 1 + 2^-8: a tie, to the even 1.0 (round-half-up would give 0x3F81)
    0x3F818000: 0x3F82,  # 1 + 3 * 2^-8: a tie, to the even 0x3F82
    0xBF80C000: 0xBF81,  # -(1 + 3 * 2^-9): the magnitude rounds, the sign stays
    0x3FFFFFFF: 0x4000,  # just below 2: the mantissa's carry moves into the exponent
    0x7F7FFFFF: 0x7F80,  # fp32's largest finite value: overflows to +inf
    0x3F800000: 0x3F80,  # 1.0: exact
    0x0000C000: 0x0001,  # a subnormal, above half of the smallest bf16 subnormal
    0x7F800000: 0x7F80,  # +inf
    0xFF800000: 0xFF80,  # -inf
}


def _probe_kernel():
    """Defined on call: @triton.jit interprets only what it defines while TRITON_INTERPRET=1 is set."""

    @triton.jit
    def probe(a_ptr, b_ptr, c_ptr, f_ptr, r_ptr):
        """c = a @ b for (16, 16) bf16 a, b (fp32 c); r = f.to(bf16) for (16, 16) fp32 f."""
        offs = tl.arange(0, 16)
        tile = offs[:, None] * 16 + offs[None, :]
        c = tl.dot(tl.load(a_ptr + tile), tl.load(b_ptr + tile))
        tl.store(c_ptr + tile, c)
        tl.store(r_ptr + tile, tl.load(f_ptr + tile).to(tl.bfloat16))

    return probe


def _probe_inputs():
    """a, b: (16, 16) bf16 of few-bit values, so every product and every sum of a @ b is exact in fp32 (the expected
    c is exact); f: (16, 16) fp32, the rounding cases then random values over a wide exponent range, and a NaN."""
    i = torch.arange(16, dtype=torch.float64)
    a = ((i[:, None] - 2 * i[None, :]) / 4).to(torch.bfloat16)
    b = ((3 * i[:, None] + i[None, :] - 20) / 8).to(torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    f = torch.randn(256, generator=gen) * torch.exp2(torch.randint(-140, 120, (256,), generator=gen).float())
    cases = torch.tensor(list(ROUNDING_CASES), dtype=torch.int64).to(torch.int32).view(torch.float32)
    f[: len(cases)] = cases
    f[len(cases)] = float("nan")
    return a, b, f.view(16, 16)


def _run_probe(probe):
    a, b, f = _probe_inputs()
    c = torch.empty(16, 16, dtype=torch.float32)
    r = torch.empty(16, 16, dtype=torch.bfloat16)
    probe[(1,)](a, b, c, f, r)
    return c, r


def _check_internals(interp):
    """The interpreter internals the patch replaces, with the signatures it calls them with."""
    builder = getattr(interp, "InterpreterBuilder", None)
    expected = {"create_dot": ["self", "a", "b", "d", "input_precision", "max_num_imprecise_acc"],
                "cast_impl": ["self", "src", "dst_type"], "binary_op": ["self", "lhs", "rhs", "op"],
                "unary_op": ["self", "arg", "op"], "create_fp_trunc": ["self", "src", "dst_type"],
                "create_fp_ext": ["self", "src", "dst_type"]}
    for name, params in expected.items():
        method = getattr(builder, name, None)
        got = list(inspect.signature(method).parameters) if callable(method) else None
        if got != params:
            raise InterpreterBF16Error(
                f"triton.runtime.interpreter.InterpreterBuilder.{name} is {got}, expected {params}: the bf16 patch of "
                f"tests/interpreter_bf16.py must be brought up to date with this Triton")
    for name in ("create_fp_trunc", "create_fp_ext"):
        if "cast_impl" not in inspect.getsource(getattr(builder, name)):
            raise InterpreterBF16Error(f"InterpreterBuilder.{name} no longer goes through cast_impl: update "
                                       "tests/interpreter_bf16.py")
    if not hasattr(interp, "TensorHandle"):
        raise InterpreterBF16Error("triton.runtime.interpreter.TensorHandle is gone: update tests/interpreter_bf16.py")


def _gpu_answers(c, r, what):
    """Raise unless the probe's c and r are what a GPU computes."""
    a, b, f = _probe_inputs()
    want_c = a.double() @ b.double()
    if not torch.equal(c.double(), want_c):
        raise InterpreterBF16Error(f"{what}: a bf16 tl.dot of exact values is off by "
                                   f"{(c.double() - want_c).abs().max().item():.3g}")
    bits = f.flatten().view(torch.int32).tolist()
    got = (r.flatten().view(torch.int16).int() & 0xFFFF).tolist()
    want = (f.flatten().to(torch.bfloat16).view(torch.int16).int() & 0xFFFF).tolist()  # torch rounds to nearest even
    nan = torch.isnan(f.flatten()).tolist()
    wrong = [(hex(x & 0xFFFFFFFF), hex(g), hex(w)) for x, g, w, n in zip(bits, got, want, nan, strict=True)
             if ((g & 0x7FFF) <= 0x7F80 if n else g != w)]  # a NaN stays a NaN: above 0x7F80 without its sign
    if wrong:
        raise InterpreterBF16Error(f"{what}: fp32 -> bf16 is not rounded to nearest even in {len(wrong)}/256 "
                                   f"cases, e.g. (fp32 bits, got, want) {wrong[:3]}")


def install() -> None:
    """Patch Triton's interpreter as the module docstring says; idempotent. Call with TRITON_INTERPRET=1 set."""
    from triton.runtime import interpreter as interp

    builder = interp.InterpreterBuilder
    if getattr(builder, MARK, False):
        return
    for bits, want in ROUNDING_CASES.items():  # the table above is what torch and the GPU compute
        got = torch.tensor([bits], dtype=torch.int64).to(torch.int32).view(torch.float32).to(torch.bfloat16)
        if got.view(torch.int16).item() & 0xFFFF != want:
            raise InterpreterBF16Error(f"ROUNDING_CASES[{bits:#x}] is not {want:#x}: torch rounds it otherwise")
    _check_internals(interp)
    probe = _probe_kernel()
    c, r = _run_probe(probe)
    a, b, _ = _probe_inputs()
    if torch.equal(c.double(), a.double() @ b.double()):
        raise InterpreterBF16Error("Triton's interpreter now multiplies bf16 correctly (triton-lang/triton#11584 "
                                   "fixed?): drop the dot patch of tests/interpreter_bf16.py")
    cases = (r.flatten()[: len(ROUNDING_CASES)].view(torch.int16).int() & 0xFFFF).tolist()
    if cases == list(ROUNDING_CASES.values()):
        raise InterpreterBF16Error("Triton's interpreter now rounds fp32 -> bf16 to nearest even: drop the cast "
                                   "patch of tests/interpreter_bf16.py")

    ORIGINALS.update({name: getattr(builder, name) for name in ("create_dot", "cast_impl", "binary_op", "unary_op")})
    create_dot, cast_impl, binary_op, unary_op = ORIGINALS.values()

    def widened(h):
        return interp.TensorHandle(_bf16_to_fp32(h.data), tl.float32) if h.dtype.scalar == tl.bfloat16 else h

    def patched_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return create_dot(self, widened(a), widened(b), d, input_precision, max_num_imprecise_acc)

    def patched_cast(self, src, dst_type):
        src_ty, dst_ty = src.dtype.scalar, dst_type.scalar
        if src_ty == tl.float32 and dst_ty == tl.bfloat16:
            return interp.TensorHandle(_fp32_to_bf16(src.data), dst_ty)
        if (src_ty == tl.bfloat16) != (dst_ty == tl.bfloat16) and not (src_ty == tl.bfloat16 and dst_ty == tl.float32):
            # Triton's semantics route bf16 <-> fp16/fp64 through fp32; what reaches here (ints, fp64 -> bf16) would
            # be an integer cast of the bit pattern
            raise InterpreterBF16Error(f"the interpreter casts {src_ty} -> {dst_ty} wrongly and "
                                       "tests/interpreter_bf16.py does not teach it: cast through tl.float32")
        return cast_impl(self, src, dst_type)

    def refuse_bf16(op_name, original):
        def op(self, first, *rest):
            if first.dtype.scalar == tl.bfloat16:
                raise InterpreterBF16Error(
                    f"{rest[-1].__name__} on bf16 values: Triton's interpreter would compute it on their bit patterns "
                    f"({op_name}); compute in fp32 (x.to(tl.float32)) as the kernels do")
            return original(self, first, *rest)
        return op

    builder.create_dot = patched_dot
    builder.cast_impl = patched_cast
    builder.binary_op = refuse_bf16("binary_op", binary_op)
    builder.unary_op = refuse_bf16("unary_op", unary_op)
    try:
        _gpu_answers(*_run_probe(probe), "after tests/interpreter_bf16.py's patch")
    except BaseException:
        for name, original in ORIGINALS.items():
            setattr(builder, name, original)
        raise
    setattr(builder, MARK, True)
