"""Property-based tests (hypothesis): random small shapes and N/k/S/r configurations, every mode, both fast
backends, fp32 and bf16, forward and gradients against the reference."""

import pytest
import torch
from conftest import DEVICE
from helpers import assert_close, leaf, rounded
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ase_kernels as ak
from ase_kernels import reference


@st.composite
def problems(draw):
    n = draw(st.integers(1, 40))
    s = draw(st.integers(0, n))
    k = draw(st.integers(0 if s else 1, n - s))
    mode = draw(st.sampled_from(["adaptive", "naive"] + (["none"] if s == 0 else [])))
    return dict(tokens=draw(st.integers(1, 80)), d_in=draw(st.integers(1, 40)), d_out=draw(st.integers(1, 40)),
                n=n, k=k, s=s, r=draw(st.integers(1, 5)), tasks=draw(st.integers(1, 4)), mode=mode,
                scale=draw(st.floats(0.25, 4.0)), seed=draw(st.integers(0, 2**31 - 1)))


def _check(p, dtype):
    g = torch.Generator().manual_seed(p["seed"])
    x = torch.randn(p["tokens"], p["d_in"], generator=g)
    w = torch.randn(p["tasks"], p["n"], p["d_in"], generator=g) * 0.5
    ids = torch.randint(0, p["tasks"], (p["tokens"],), generator=g)
    a = torch.randn(p["n"], p["r"], p["d_in"], generator=g) * 0.5
    b = torch.randn(p["n"], p["d_out"], p["r"], generator=g) * 0.5
    t = [leaf(v, dtype, DEVICE) for v in (x, w, a, b)]
    r = [leaf(v, torch.float64, "cpu") for v in t]
    kw = dict(top_k=p["k"], num_shared=p["s"], mode=p["mode"])
    route_t = ak.route(t[0], t[1], ids.to(DEVICE), **kw)
    route_r = reference.route(r[0], r[1], ids, **kw)
    assert torch.equal(route_t.indices.cpu(), route_r.indices)
    y_t = ak.moe_lora(t[0], t[2], t[3], route_t, p["scale"])
    y_r = reference.moe_lora(r[0], r[2], r[3], route_r, p["scale"])
    assert_close("y", y_r, y_t, dtype)
    d_y = rounded(torch.randn(y_r.shape, generator=g, dtype=torch.float64), dtype)
    (y_r * d_y).sum().add(reference.mi_loss(route_r.prob_sums)).backward()
    (y_t * d_y.to(DEVICE, dtype)).sum().add(ak.mi_loss(route_t.prob_sums)).backward()
    for name, ref, out in zip(("x", "router_weight", "A", "B"), r, t, strict=True):
        assert_close(f"d{name}", ref.grad, out.grad, dtype)


@pytest.mark.parametrize("name,examples,dtype", [
    pytest.param("torch", 60, torch.float32, id="torch-fp32"),
    pytest.param("triton", 20, torch.float32, id="triton-fp32"),
    pytest.param("torch", 20, torch.bfloat16, id="torch-bf16"),
    pytest.param("triton", 10, torch.bfloat16, id="triton-bf16"),
])
def test_random_problems_match_reference(monkeypatch, name, examples, dtype):
    monkeypatch.setenv("ASE_KERNELS_BACKEND", name)

    @settings(max_examples=examples, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(problems())
    def run(p):
        _check(p, dtype)

    run()
