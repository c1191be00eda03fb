"""The ASE FFN in bf16 through the Triton kernels, every gradient, against the float64 reference: on a GPU at the real
ViT-B shapes (64 images x 197 tokens = 12,608 tokens, FFN 768 -> 3072 -> 768, five tasks); on a CPU at a small shape,
under Triton's interpreter taught bf16 as the GPU computes it (tests/interpreter_bf16.py). The CUDA-graph tests
need a GPU; they come first, being short (``bash bench/gpu_session.sh quick`` stops these tests at 270 s)."""

import pytest
import torch
from helpers import assert_close

import ase_kernels as ak
from ase_kernels import reference
from ase_kernels.checks import Routing

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU: CUDA-graph capture of the Triton kernels")
DEVICE = torch.device("cuda" if CUDA else "cpu")
TASKS, TOKENS_PER_IMAGE, DIM, HIDDEN = 5, 197, 768, 3072
# (images, tokens per image, dim, hidden): ViT-B on a GPU; on a CPU 5 x 13 = 65 tokens (three token blocks of the
# interpreter's 32, the last one partial, one image per task) at widths that are not multiples of a block
SHAPE = pytest.param((64, TOKENS_PER_IMAGE, DIM, HIDDEN), id="vit-b") if CUDA else pytest.param((5, 13, 40, 104),
                                                                                                 id="small")


@needs_cuda
def test_cuda_graph_capture_of_route_and_moe_lora(monkeypatch):
    """No host synchronisation on the hot path: forward and backward capture into one CUDA graph."""
    monkeypatch.setenv("ASE_KERNELS_BACKEND", "triton")
    mlp = ak.ASEMlp(DIM, HIDDEN, num_experts=32, top_k=6, num_shared=2, rank=2, num_tasks=TASKS).cuda().bfloat16()
    x = torch.randn(8, TOKENS_PER_IMAGE, DIM, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    ids = torch.arange(8, device="cuda") % TASKS
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # warm-up: autotuning and compilation happen outside the capture
            mlp(x, ids).sum().backward()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = mlp(x, ids)
        y.sum().backward()
    graph.replay()
    torch.cuda.synchronize()
    eager = mlp(x, ids)
    assert_close("y", eager, y, torch.bfloat16)


@needs_cuda
def test_cuda_graph_replay_follows_refilled_per_token_task_ids(monkeypatch):
    """Per-token int64 ids reach the ops as the very tensor the graph captured: refilled before replay, the router
    gradient must follow the new ids, not task ranges cached by the eager warm-up on the same tensor."""
    monkeypatch.setenv("ASE_KERNELS_BACKEND", "triton")
    tokens = 8 * TOKENS_PER_IMAGE
    x = torch.randn(tokens, DIM, device="cuda")
    w = torch.randn(TASKS, 32, DIM, device="cuda", requires_grad=True)
    ids = torch.arange(tokens, device="cuda") * TASKS // tokens  # task-major: the eager calls cache its ranges

    def step():
        w.grad = None
        r = ak.route(x, w, ids, top_k=6, num_shared=2)
        (r.gates.square().sum() + r.prob_sums.square().sum()).backward()

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    ids.copy_(torch.sort(torch.randint(0, TASKS, (tokens,), device="cuda")).values)  # another task-major split
    graph.replay()
    torch.cuda.synchronize()
    replayed = w.grad.clone()
    step()  # eager, on the refilled ids
    assert_close("d_router_weight", w.grad, replayed, torch.float32)


@pytest.mark.parametrize("shape", [SHAPE])
@pytest.mark.parametrize("config", [(32, 6, 2, 2), (64, 12, 4, 1), (16, 4, 0, 4)], ids=lambda c: "/".join(map(str, c)))
@pytest.mark.parametrize("placement", ["ffn", "fc1+fc2"])
def test_vit_b_ffn_bf16_matches_reference(monkeypatch, shape, config, placement):
    monkeypatch.setenv("ASE_KERNELS_BACKEND", "triton")
    images, tokens_per_image, dim, hidden = shape
    n, k, s, r = config
    mlp = ak.ASEMlp(dim, hidden, num_experts=n, top_k=k, num_shared=s, rank=r, num_tasks=TASKS,
                    placement=placement, mode="adaptive" if s else "none").to(DEVICE)
    for experts in mlp.experts.values():
        torch.nn.init.normal_(experts.B, std=0.02)
    torch.nn.init.normal_(mlp.router, std=0.02)
    mlp.fc1.requires_grad_(False), mlp.fc2.requires_grad_(False)
    mlp = mlp.bfloat16()
    x = torch.randn(images, tokens_per_image, dim, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    ids = torch.arange(TASKS, device=DEVICE).repeat_interleave(images // TASKS + 1)[:images]
    y = mlp(x, ids)
    d_y = torch.randn_like(y)
    (y * d_y).sum().backward()

    # reference: the same bf16 parameters and routing decisions, in float64
    x64 = x.detach().double().requires_grad_()
    params = {name: p.detach().double().requires_grad_() for name, p in mlp.named_parameters()}
    ids_tok = ids.repeat_interleave(tokens_per_image)
    x2 = x64.reshape(-1, dim)
    # bf16 logits can swap near-equal experts against float64 ones: the reference takes the kernel's selection
    # (the selection is not differentiated anyway) and checks that almost every token agrees with its own.
    indices = mlp._last.indices
    z = reference.router_logits(x2, params["router"], ids_tok)
    z_sparse, z_shared = z[:, : n - s], z[:, n - s :]
    differ = (reference.select_top_k(z_sparse.detach(), k) != indices[:, :k]).any(1).sum().item()
    assert differ <= max(1, 0.01 * len(ids_tok)), (
        f"{differ} of {len(ids_tok)} tokens select other experts than the float64 reference")
    if mlp.mode == "adaptive":
        gates = reference.adaptive_gates(z_sparse, z_shared, indices[:, :k])
    else:
        gates = reference.naive_gates(z_sparse, s, indices[:, :k])
    rt = Routing(indices, gates, reference.task_prob_sums(z, ids_tok, TASKS))

    def experts(name, inp, base_inp, base):
        return reference.moe_lora(inp, params[f"experts.{name}.A"], params[f"experts.{name}.B"], rt, mlp.scale,
                                  base_input=base_inp, base_weight=params[f"{base}.weight"],
                                  base_bias=params[f"{base}.bias"])

    if "fc1" in mlp.experts:
        h = experts("fc1", x2, x2, "fc1")
    else:
        h = x2 @ params["fc1.weight"].T + params["fc1.bias"]
    h = torch.nn.functional.gelu(h)
    y_ref = experts("ffn", x2, h, "fc2") if "ffn" in mlp.experts else experts("fc2", h, h, "fc2")
    (y_ref * d_y.reshape(-1, dim).double()).sum().backward()

    assert_close("y", y_ref.reshape(y.shape), y, torch.bfloat16)
    assert_close("dx", x64.grad, x.grad, torch.bfloat16)
    for name, p in mlp.named_parameters():
        if p.requires_grad:
            assert_close(f"d{name}", params[name].grad, p.grad, torch.bfloat16)
