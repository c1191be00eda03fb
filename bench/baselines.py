"""What users would otherwise run, as modules sharing the weights of one ``ak.ASEMlp``, so that every candidate
computes the same function and can be checked against the others before it is timed.

1. ``bare``: the frozen timm Mlp (the floor).
2. ``lora``: the frozen Mlp plus one plain LoRA of the ASE layer's active rank (k + S) * r, where its experts sit.
3. ``loop``: the ASE FFN with a per-expert Python loop, as published MoE-LoRA code writes it (gather each expert's
   tokens, run it, scatter back).
4. ``dense``: a competent dense-masked version: all experts as one einsum, masked by the gates.
5. ``compiled``: ``dense`` under torch.compile.
6. ``ase``: ase_kernels' ASEMlp.
"""

import copy
import math

import torch
from timm.layers import Mlp
from torch import nn

import ase_kernels as ak

IMPLEMENTATIONS = ("bare", "lora", "loop", "dense", "compiled", "ase")


def torch_route(x: torch.Tensor, router: torch.Tensor, top_k: int, num_shared: int, mode: str):
    """Routing with torch.topk and softmax, one task. x (T, d), router (1, N, d) -> (indices, gates) (T, k + S)."""
    n = router.shape[1]
    z = x @ router[0].T  # (T, N)
    z_sparse, z_shared = z[:, : n - num_shared], z[:, n - num_shared:]
    top_v, top_i = z_sparse.topk(top_k, dim=-1)
    if mode == "adaptive":
        gates = torch.softmax(torch.cat([top_v, z_shared], -1).float(), -1)
    else:
        gates = torch.cat([torch.softmax(z_sparse.float(), -1).gather(-1, top_i),
                           z.new_ones(z.shape[0], num_shared, dtype=torch.float32)], -1)
    shared = torch.arange(n - num_shared, n, device=x.device).expand(x.shape[0], num_shared)
    return torch.cat([top_i, shared], -1), gates


def loop_delta(x, A, B, indices, gates, scale):
    """sum_i g_i B_i A_i x with one gather / matmul / scatter per expert. x (T, d_in) -> (T, d_out)."""
    out = torch.zeros(x.shape[0], B.shape[1], device=x.device, dtype=x.dtype)
    for e in range(A.shape[0]):
        token, slot = (indices == e).nonzero(as_tuple=True)
        if token.numel() == 0:
            continue
        y = (x[token] @ A[e].T) @ B[e].T
        out.index_add_(0, token, (gates[token, slot, None] * scale).to(x.dtype) * y)
    return out


def dense_delta(x, A, B, indices, gates, scale):
    """All experts for every token in two einsums, the unselected ones zeroed by the gates."""
    g = torch.zeros(x.shape[0], A.shape[0], device=x.device, dtype=gates.dtype).scatter_add(1, indices, gates)
    u = torch.einsum("td,nrd->tnr", x, A) * (scale * g).to(x.dtype)[:, :, None]
    return torch.einsum("tnr,nor->to", u, B)


def ffn_with_deltas(m: ak.ASEMlp, x: torch.Tensor, targets, delta) -> torch.Tensor:
    """m's frozen FFN with delta(name, input) added where `targets` (placement names) say: on fc1's output from x,
    on the FFN output from x ("ffn"), on fc2's output from the hidden activations."""
    h = m.fc1(x)
    if "fc1" in targets:
        h = h + delta("fc1", x)
    h = m.act(h)
    y = m.fc2(h)
    if "ffn" in targets:
        y = y + delta("ffn", x)
    if "fc2" in targets:
        y = y + delta("fc2", h)
    return y


class RoutedMlp(nn.Module):
    """The ASE FFN written in plain PyTorch around a delta function (loop or dense), on ASEMlp's weights."""

    def __init__(self, ase: ak.ASEMlp, delta):
        super().__init__()
        self.ase, self.delta = ase, delta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.ase
        x2 = x.reshape(-1, x.shape[-1])
        indices, gates = torch_route(x2, m.router, m.top_k, m.num_shared, m.mode)

        def experts(name, inp):
            return self.delta(inp, m.experts[name].A, m.experts[name].B, indices, gates, m.scale)

        return ffn_with_deltas(m, x2, m.experts, experts).reshape(*x.shape[:-1], -1)


class LoRAMlp(nn.Module):
    """The frozen Mlp plus one plain LoRA per expert target, of rank (k + S) * r: the same active parameters."""

    def __init__(self, ase: ak.ASEMlp):
        super().__init__()
        self.ase = ase
        rank = (ase.top_k + ase.num_shared) * ase.rank
        self.lora = nn.ModuleDict()
        for name, experts in ase.experts.items():
            d_out, d_in = experts.B.shape[1], experts.A.shape[2]
            a = nn.Parameter(torch.randn(rank, d_in, device=experts.A.device, dtype=experts.A.dtype) / math.sqrt(d_in))
            b = nn.Parameter(torch.randn(d_out, rank, device=experts.B.device, dtype=experts.B.dtype) * 0.02)
            self.lora[name] = nn.ParameterList([a, b])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        def lora(name, inp):
            a, b = self.lora[name]
            return (inp @ a.T) @ b.T

        return ffn_with_deltas(self.ase, x, self.lora, lora)


def make_ase(d: int, hidden: int, config: tuple[int, int, int, int], placement: str, device, dtype) -> ak.ASEMlp:
    """An ASEMlp with frozen base weights and random (non-zero) routers and experts, so every path matters."""
    n, k, s, r = config
    mode = "adaptive" if s else "none"
    ase = ak.ASEMlp(d, hidden, num_experts=n, top_k=k, num_shared=s, rank=r, mode=mode, placement=placement)
    with torch.no_grad():
        ase.router.normal_(0, d**-0.5)
        for experts in ase.experts.values():
            experts.B.normal_(0, 0.02)
    ase.fc1.requires_grad_(False)
    ase.fc2.requires_grad_(False)
    return ase.to(device=device, dtype=dtype)


def build(impl: str, ase: ak.ASEMlp) -> nn.Module:
    """The implementation `impl` on the weights of `ase` (the bare Mlp gets copies of fc1/fc2)."""
    if impl == "ase":
        return ase
    if impl == "bare":
        mlp = Mlp(ase.fc1.in_features, ase.fc1.out_features, ase.fc2.out_features)
        mlp.fc1, mlp.fc2 = copy.deepcopy(ase.fc1), copy.deepcopy(ase.fc2)
        return mlp.requires_grad_(False)
    if impl == "lora":
        return LoRAMlp(ase)
    if impl == "loop":
        return RoutedMlp(ase, loop_delta)
    if impl == "dense":
        return RoutedMlp(ase, dense_delta)
    if impl == "compiled":
        return torch.compile(RoutedMlp(ase, dense_delta))
    raise ValueError(f"unknown implementation {impl!r}; known: {IMPLEMENTATIONS}")
