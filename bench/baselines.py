"""The implementations the ASE FFN is measured against, as small modules built on the weights of one ``ak.ASEMlp``,
so that each computes a known function and is checked against the float64 reference before it is timed.

1. ``bare``: the frozen timm ``Mlp`` (the floor).
2. ``lora``: the frozen ``Mlp`` plus one plain LoRA of the ASE layer's active rank (k + S) * r on each expert
   target (what a PEFT user has today).
3. ``loop``: the ASE FFN with a per-expert Python loop, as published MoE-LoRA code writes it (gather each
   expert's tokens, run it, scatter back).
4. ``dense``: a competent dense-masked PyTorch version: all experts as one einsum, masked by the gates.
5. ``compiled``: ``dense`` under ``torch.compile(fullgraph=True)``.
6. ``ase``: ``ak.ASEMlp`` itself.

``ReferenceMlp`` is the ground truth: the ASE FFN composed from ``ak.reference`` (per-expert loop) in float64.
"""

import copy
import math

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from torch import nn

import ase_kernels as ak

IMPLEMENTATIONS = ("bare", "lora", "loop", "dense", "compiled", "ase")
ROUTED = ("loop", "dense", "compiled", "ase")  # the ones that compute the ASE FFN itself


def topk_gates(z: torch.Tensor, top_k: int, num_shared: int, mode: str):
    """DESIGN.md's gating from router logits with torch.topk and softmax. z (T, N) float32, the S shared experts
    last -> indices (T, k + S) int64 and gates (T, k + S) float32, the shared experts last."""
    n = z.shape[1]
    z_sparse, z_shared = z[:, : n - num_shared], z[:, n - num_shared :]
    top_v, top_i = z_sparse.topk(top_k, dim=-1)  # (T, k)
    if mode == "adaptive":
        gates = torch.softmax(torch.cat([top_v, z_shared], -1), -1)
    else:
        gates = torch.cat([torch.softmax(z_sparse, -1).gather(-1, top_i), z.new_ones(z.shape[0], num_shared)], -1)
    shared = torch.arange(n - num_shared, n, device=z.device).expand(z.shape[0], num_shared)  # (T, S)
    return torch.cat([top_i, shared], -1), gates


def torch_route(x: torch.Tensor, router: torch.Tensor, top_k: int, num_shared: int, mode: str):
    """Routing with torch.topk and softmax, one task. x (T, d), router (1, N, d) -> indices, gates (T, k + S).
    Logits in float32, as Switch Transformer and HF's Mixtral compute them: top-k on bf16 logits flips
    near-ties."""
    return topk_gates(F.linear(x.float(), router[0].float()), top_k, num_shared, mode)


def loop_delta(x, A, B, indices, gates, scale):
    """sum_i g_i B_i A_i x with one gather / two matmuls / scatter per expert (published MoE-LoRA code).
    x (T, d_in), A (N, r, d_in), B (N, d_out, r), indices and gates (T, k + S) -> (T, d_out)."""
    out = torch.zeros(x.shape[0], B.shape[1], device=x.device, dtype=x.dtype)
    for e in range(A.shape[0]):
        token, slot = (indices == e).nonzero(as_tuple=True)  # a host sync per expert, as in that code
        if token.numel() == 0:
            continue
        y = (x[token] @ A[e].T) @ B[e].T  # (T_e, d_out)
        out = out.index_add(0, token, (gates[token, slot, None] * scale).to(x.dtype) * y)
    return out


def dense_delta(x, A, B, indices, gates, scale):
    """All experts for every token in two einsums, the unselected ones zeroed by the gates.
    x (T, d_in) -> (T, d_out); computes all N * r rank columns (DESIGN.md: +15.6% FLOPs at ViT-B)."""
    g = torch.zeros(x.shape[0], A.shape[0], device=x.device, dtype=gates.dtype).scatter_add(1, indices, gates)
    u = torch.einsum("td,nrd->tnr", x, A) * (scale * g).to(x.dtype)[:, :, None]  # (T, N, r)
    return torch.einsum("tnr,nor->to", u, B)


def ffn_with_deltas(ffn: nn.Module, x: torch.Tensor, targets, delta) -> torch.Tensor:
    """ffn's frozen fc1 -> act -> fc2, with delta(name, input) added where ``targets`` (placement names) say: on
    fc1's output from x, on the FFN output from x ("ffn"), on fc2's output from the hidden activations."""
    h = ffn.fc1(x)
    if "fc1" in targets:
        h = h + delta("fc1", x)
    h = ffn.act(h)
    y = ffn.fc2(h)
    if "ffn" in targets:
        y = y + delta("ffn", x)
    if "fc2" in targets:
        y = y + delta("fc2", h)
    return y


class RoutedMlp(nn.Module):
    """The ASE FFN in plain PyTorch around a delta function (loop_delta or dense_delta), on ``ase``'s weights.
    x (..., d) -> (..., d)."""

    def __init__(self, ase: ak.ASEMlp, delta):
        super().__init__()
        self.ase, self.delta = ase, delta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.ase
        x2 = x.reshape(-1, x.shape[-1])  # (T, d)
        indices, gates = torch_route(x2, m.router, m.top_k, m.num_shared, m.mode)

        def experts(name, inp):
            return self.delta(inp, m.experts[name].A, m.experts[name].B, indices, gates, m.scale)

        return ffn_with_deltas(m, x2, m.experts, experts).reshape(*x.shape[:-1], -1)


class ReferenceMlp(nn.Module):
    """The ASE FFN by ``ak.reference`` (route, then the per-expert-loop moe_lora) on a float64 copy of ``ase``.
    x (..., d) any float dtype -> (..., d) float64."""

    def __init__(self, ase: ak.ASEMlp):
        super().__init__()
        self.ase = copy.deepcopy(ase).double()  # copy before ase's first forward: it keeps non-leaf tensors

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m, ref = self.ase, ak.reference
        x = x.double()
        routing = ref.route(x, m.router, top_k=m.top_k, num_shared=m.num_shared, mode=m.mode)

        def experts(name, inp, base_input, base):
            e = m.experts[name]
            return ref.moe_lora(inp, e.A, e.B, routing, m.scale, base_input=base_input, base_weight=base.weight,
                                base_bias=base.bias)

        h = m.act(experts("fc1", x, x, m.fc1) if "fc1" in m.experts else m.fc1(x))
        if "ffn" in m.experts:
            return experts("ffn", x, h, m.fc2)
        if "fc2" in m.experts:
            return experts("fc2", h, h, m.fc2)
        return m.fc2(h)


class LoRAMlp(nn.Module):
    """The frozen FFN of ``ase`` plus one plain LoRA of rank (k + S) * r on each of its expert targets: the
    same active rank as the ASE layer, without routing. x (..., d) -> (..., d)."""

    def __init__(self, ase: ak.ASEMlp, b_std: float):
        super().__init__()
        self.fc1, self.act, self.fc2 = ase.fc1, ase.act, ase.fc2
        rank = (ase.top_k + ase.num_shared) * ase.rank
        self.lora = nn.ModuleDict()
        for name, experts in ase.experts.items():
            d_out, d_in = experts.B.shape[1], experts.A.shape[2]
            like = dict(device=experts.A.device, dtype=experts.A.dtype)
            a = nn.Parameter(torch.randn(rank, d_in, **like) / math.sqrt(d_in))
            b = nn.Parameter(torch.randn(d_out, rank, **like) * b_std)
            self.lora[name] = nn.ParameterList([a, b])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        def lora(name, inp):
            a, b = self.lora[name]
            return F.linear(F.linear(inp, a), b)

        return ffn_with_deltas(self, x, self.lora, lora)


# Experts' B ~ N(0, B_STD): big enough that the expert sum is a sizeable share of the FFN output (a wrong gate
# or expert then fails the check), the way a trained layer looks; a fresh layer (B = 0) would test nothing.
B_STD = 0.3


def make_ase(d: int, hidden: int, config: tuple[int, int, int, int], placement: str, device, dtype) -> ak.ASEMlp:
    """An ASEMlp (d -> hidden -> d) with frozen base weights and random routers and experts. Configurations with
    shared experts use the ASE gating (``adaptive``), the others the plain LoRA-MoE baseline (``none``)."""
    n, k, s, r = config
    mode = "adaptive" if s else "none"
    ase = ak.ASEMlp(d, hidden, num_experts=n, top_k=k, num_shared=s, rank=r, mode=mode, placement=placement)
    with torch.no_grad():
        ase.router.normal_(0, d**-0.5)  # logits of unit scale: a real top-k, no ties
        for experts in ase.experts.values():
            experts.B.normal_(0, B_STD)
    ase.fc1.requires_grad_(False)
    ase.fc2.requires_grad_(False)
    return ase.to(device=device, dtype=dtype)


def build(impl: str, ase: ak.ASEMlp) -> nn.Module:
    """Implementation ``impl`` on the weights of ``ase`` (the bare Mlp gets copies of its frozen fc1/fc2)."""
    if impl == "ase":
        return ase
    if impl == "bare":
        mlp = Mlp(ase.fc1.in_features, ase.fc1.out_features, ase.fc2.out_features)
        mlp.fc1, mlp.fc2 = copy.deepcopy(ase.fc1), copy.deepcopy(ase.fc2)
        return mlp.requires_grad_(False)
    if impl == "lora":
        return LoRAMlp(ase, B_STD)
    if impl == "loop":
        return RoutedMlp(ase, loop_delta)
    if impl == "dense":
        return RoutedMlp(ase, dense_delta)
    if impl == "compiled":
        # a fresh Dynamo cache per module: the benchmark compiles one module per configuration, and past the
        # recompile limit (8) Dynamo would silently fall back to eager. Static shapes: the benchmark runs one
        torch._dynamo.reset()
        return torch.compile(RoutedMlp(ase, dense_delta), fullgraph=True, dynamic=False)
    raise ValueError(f"unknown implementation {impl!r}; known: {IMPLEMENTATIONS}")


def reference(impl: str, module: nn.Module, ase: ak.ASEMlp) -> nn.Module:
    """The float64 module that computes what ``impl`` should: ReferenceMlp for the routed implementations, a
    float64 copy of the module itself for ``bare`` and ``lora``. Build it before the first forward."""
    if impl in ROUTED:
        return ReferenceMlp(ase)
    return copy.deepcopy(module).double()


def trainable(impl: str, module: nn.Module, ase: ak.ASEMlp) -> dict[str, nn.Parameter]:
    """The parameters whose gradients the benchmark checks: experts and routers (named as in ``ase``), or the
    LoRA factors. For ReferenceMlp pass its ``.ase`` copy as ``ase``."""
    src = ase if impl in ROUTED else module
    return {n: p for n, p in src.named_parameters() if p.requires_grad}
