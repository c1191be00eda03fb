"""ase_kernels/kernels/lowrank.py and the torch path's expert sum (torch_ops), against the reference:
forward and the gradients of x, lora_A, lora_B, gates and base_input, with and without the fused base GEMM."""

import pytest
import torch
from conftest import DEVICE
from helpers import CONFIGS, DTYPES, assert_close, leaf, rounded, routing_for

import ase_kernels as ak
from ase_kernels import reference
from ase_kernels.checks import Routing
from ase_kernels.kernels.common import next_block


def check_moe_lora(x, a, b, routing, scale, dtype, base=None, base_is_x=False):
    """moe_lora of the backend under test against the reference on the same rounded inputs, forward and all
    gradients. base: (base_input, base_weight, base_bias) or None; base_is_x: base_input is x itself."""
    x_t, a_t, b_t = (leaf(t, dtype, DEVICE) for t in (x, a, b))
    x_r, a_r, b_r = (leaf(t, torch.float64, "cpu") for t in (x_t, a_t, b_t))
    g_t = leaf(routing.gates, torch.float32, DEVICE)
    g_r = leaf(g_t, torch.float64, "cpu")
    kw_t, kw_r = {}, {}
    if base is not None:
        h, w0, b0 = base
        h_t = x_t if base_is_x else leaf(h, dtype, DEVICE)
        h_r = x_r if base_is_x else leaf(h_t, torch.float64, "cpu")
        w0_t = w0.to(DEVICE, dtype)  # frozen
        b0_t = b0.to(DEVICE, dtype) if b0 is not None else None
        kw_t = dict(base_input=h_t, base_weight=w0_t, base_bias=b0_t)
        kw_r = dict(base_input=h_r, base_weight=w0_t.cpu().double(),
                    base_bias=b0_t.cpu().double() if b0_t is not None else None)
    y = ak.moe_lora(x_t, a_t, b_t, Routing(routing.indices.to(DEVICE), g_t, routing.prob_sums), scale, **kw_t)
    y_r = reference.moe_lora(x_r, a_r, b_r, Routing(routing.indices, g_r, routing.prob_sums), scale, **kw_r)
    assert y.dtype == dtype
    assert_close("y", y_r, y, dtype)
    d_y = rounded(torch.randn_like(y_r), dtype)  # the kernel's d_y is rounded to dtype: the reference's too
    (y_r * d_y).sum().backward()
    (y * d_y.to(DEVICE, dtype)).sum().backward()
    assert_close("dx", x_r.grad, x_t.grad, dtype)
    assert_close("dA", a_r.grad, a_t.grad, dtype)
    assert_close("dB", b_r.grad, b_t.grad, dtype)
    assert_close("d_gates", g_r.grad, g_t.grad, dtype)
    if base is not None and not base_is_x:
        assert_close("d_base_input", kw_r["base_input"].grad, kw_t["base_input"].grad, dtype)
        assert kw_t["base_weight"].grad is None, "a frozen base weight got a gradient"


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fused", ["experts", "base", "base-is-x"])
def test_moe_lora_matches_reference(backend, config, dtype, fused):
    n, k, s, r = config
    tokens, d_in, d_out, d_base = 37, 24, 40, 56
    routing = routing_for(tokens, n, k, s)
    x, a, b = torch.randn(tokens, d_in), torch.randn(n, r, d_in) * 0.3, torch.randn(n, d_out, r) * 0.3
    base = None
    if fused == "base":
        base = (torch.randn(tokens, d_base), torch.randn(d_out, d_base) * 0.2, torch.randn(d_out))
    elif fused == "base-is-x":
        base = (None, torch.randn(d_out, d_in) * 0.2, torch.randn(d_out))
    check_moe_lora(x, a, b, routing, 2.0, dtype, base, base_is_x=fused == "base-is-x")


@pytest.mark.parametrize("tokens", [1, 31, 33, 130], ids=lambda t: f"T{t}")
def test_moe_lora_token_counts(backend, tokens):
    n, k, s, r = 32, 6, 2, 2
    routing = routing_for(tokens, n, k, s)
    base = (torch.randn(tokens, 70), torch.randn(20, 70) * 0.2, None)
    check_moe_lora(torch.randn(tokens, 17), torch.randn(n, r, 17), torch.randn(n, 20, r), routing, 1.0,
                   torch.float32, base)


def test_moe_lora_all_tokens_to_one_expert(backend):
    """Every token on expert 3 alone (k = 1, S = 0): one expert's columns carry the whole sum."""
    tokens, n, r = 40, 16, 4
    routing = Routing(torch.full((tokens, 1), 3), torch.rand(tokens, 1, dtype=torch.float64), torch.zeros(1, n))
    check_moe_lora(torch.randn(tokens, 16), torch.randn(n, r, 16), torch.randn(n, 16, r), routing, 1.0,
                   torch.float32)


def test_moe_lora_strided_weights(backend):
    """lora_A, lora_B, x and the base weight as non-contiguous views (e.g. a transposed checkpoint layout)."""
    tokens, n, k, s, r = 21, 8, 2, 1, 3
    routing = routing_for(tokens, n, k, s)
    a = torch.randn(n, 18, r).transpose(1, 2)  # (n, r, 18)
    b = torch.randn(n, r, 12).transpose(1, 2)  # (n, 12, r)
    x = torch.randn(tokens, 36)[:, ::2]
    base = (torch.randn(tokens, 30), torch.randn(30, 12).T, torch.randn(12))
    check_moe_lora(x, a, b, routing, 0.5, torch.float32, base)


def test_moe_lora_large_rank_columns(backend):
    """N * r = 96 > 64 rank columns: the expand kernel walks the rank columns in several blocks."""
    tokens, n, k, s, r = 20, 24, 4, 2, 4
    routing = routing_for(tokens, n, k, s)
    check_moe_lora(torch.randn(tokens, 16), torch.randn(n, r, 16), torch.randn(n, 16, r), routing, 1.0,
                   torch.float32, (torch.randn(tokens, 16), torch.randn(16, 16), None))


def test_next_block_keeps_tiles_at_least_16():
    assert [next_block(n) for n in (1, 2, 16, 17, 64, 65)] == [16, 16, 16, 32, 64, 128]
