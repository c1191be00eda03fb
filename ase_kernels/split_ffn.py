"""An ASE FFN whose two projections are separate modules: BERT's ``intermediate.dense`` and ``output.dense``.

BERT-style encoders (BERT, RoBERTa, ...) split the FFN across two modules, the residual and the LayerNorm inside the
second, so there is no single module to wrap. :func:`ak.convert` replaces the two projections
by a pair: :class:`ASESplitFFN` (the first projection) routes its input once, holds the routers and experts, and
leaves the input and the routing for :class:`ASESplitFFNOutput` (the second projection), which takes them at its
next forward. Every call of the second is therefore preceded by one of the first, as in the model's own forward
(also chunked, as transformers' ``apply_chunking_to_forward`` runs it, and when activation checkpointing recomputes
the layer: the first runs again, with the ids of the forward it recomputes, before the second). Chunked, each
chunk is a forward of its own: ``mi_loss()`` and ``routing_stats()`` read the last chunk's routing, as for every ASE
module, so leave ``chunk_size_feed_forward`` at 0 when training with the MI loss. The pair's state lives between the
two calls, in one model instance: ``nn.DataParallel``, whose replicas share it from threads, is not supported (DDP,
one model per process, is).
"""

import torch
from torch import nn

from .modules import PLACEMENTS, LoRAExperts, _Routed, linear_weight
from .ops import moe_lora


class _Handoff:
    """(x, routing) of the first projection's last forward, until the second takes it: references into an autograd
    graph, so a copy or a pickle of the module starts without them (deepcopy refuses non-leaf tensors)."""

    def __init__(self):
        self.value: tuple | None = None

    def __reduce__(self):
        return _Handoff, ()


class ASESplitFFN(_Routed):
    """The first projection of a split FFN (d -> hidden), frozen, with the pair's routers and experts.

    placement: ``ffn`` (experts map the FFN input d -> d; their sum is added to the second projection's output,
    before the model's residual and LayerNorm: the paper's Eq. 10), ``fc1`` / ``fc2`` / ``fc1+fc2`` (LoRA deltas of
    those projections, sharing the one routing computed here from the FFN input).

    Args:
        base: the first projection, an nn.Linear or a transformers Conv1D (d -> hidden).
        out_features: the width of the second projection's output (d for a d -> d FFN).
        The other arguments are those of :class:`ak.ASEMlp`.

    Example:
        >>> import torch, ase_kernels as ak
        >>> from ase_kernels import ASESplitFFN, ASESplitFFNOutput
        >>> fc1, fc2 = torch.nn.Linear(16, 64), torch.nn.Linear(64, 16)
        >>> first = ASESplitFFN(fc1, 16, num_experts=8, top_k=2, num_shared=1, rank=2)
        >>> second = ASESplitFFNOutput(fc2, first)
        >>> x = torch.randn(3, 5, 16)
        >>> torch.equal(second(torch.relu(first(x))), fc2(torch.relu(fc1(x))))  # B starts at zero
        True
    """

    def __init__(self, base: nn.Module, out_features: int, *, num_experts: int = 32, top_k: int = 6,
                 num_shared: int = 2, rank: int = 2, alpha: float | None = None, num_tasks: int = 1,
                 mode: str = "adaptive", placement: str = "ffn"):
        super().__init__()
        w = linear_weight(base)
        if w is None:
            raise TypeError(f"base must be an nn.Linear or a transformers Conv1D, got {type(base).__name__}")
        if placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
        hidden, d = w.shape
        self.base = base.requires_grad_(False)
        self.placement = placement
        self._init_routing(d, num_experts, top_k, num_shared, rank, alpha, num_tasks, mode, w.device, w.dtype)
        shapes = {"ffn": (d, out_features), "fc1": (d, hidden), "fc2": (hidden, out_features)}
        targets = ("fc1", "fc2") if placement == "fc1+fc2" else (placement,)
        self.experts = nn.ModuleDict(
            {name: LoRAExperts(num_experts, rank, *shapes[name], w.device, w.dtype) for name in targets}
        )
        self._handoff = _Handoff()

    def forward(self, x: torch.Tensor, task_ids: torch.Tensor | None = None) -> torch.Tensor:
        """x: (..., d); task_ids: (T,) or one per leading batch row, or None (one task, or the ids set by
        :func:`ak.task_ids`). Returns (..., hidden)."""
        routing = self._route(x, task_ids)
        self._handoff.value = (x, routing)
        if "fc1" not in self.experts:
            return self.base(x)
        experts = self.experts["fc1"]
        return moe_lora(x, experts.A, experts.B, routing, self.scale, base_input=x,
                        base_weight=linear_weight(self.base), base_bias=self.base.bias)

    def options(self) -> dict:
        return super().options() | {"placement": self.placement}

    def extra_repr(self) -> str:
        return f"placement={self.placement!r}, {self._routing_repr()}"


class ASESplitFFNOutput(nn.Module):
    """The second projection of a split FFN (hidden -> d), frozen, adding the experts of its :class:`ASESplitFFN`.

    It holds no parameters of its own besides the frozen base: the routers and experts are the first's (saved
    with it), which it references without registering (so they are not counted twice).

    Args:
        base: the second projection, an nn.Linear or a transformers Conv1D.
        first: the :class:`ASESplitFFN` of the same FFN.
    """

    def __init__(self, base: nn.Module, first: ASESplitFFN):
        super().__init__()
        if linear_weight(base) is None:
            raise TypeError(f"base must be an nn.Linear or a transformers Conv1D, got {type(base).__name__}")
        if not isinstance(first, ASESplitFFN):
            raise TypeError(f"first must be an ASESplitFFN, got {type(first).__name__}")
        self.base = base.requires_grad_(False)
        object.__setattr__(self, "first", first)  # a reference, not a submodule

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """h: (..., hidden), computed from the input of the first projection's last forward. Returns (..., d)."""
        first = self.first
        if first._handoff.value is None:
            raise RuntimeError("ASESplitFFNOutput was called without a forward of its first projection (the "
                               "ASESplitFFN before it), which routes the FFN input: call the first on the same tokens "
                               "before each call of the second, in one forward (or one checkpointed region)")
        (x, routing), first._handoff.value = first._handoff.value, None
        if x.shape[:-1] != h.shape[:-1]:
            raise ValueError(f"h must hold the tokens of the first projection's input {tuple(x.shape[:-1])}, got "
                             f"shape {tuple(h.shape)}")
        experts, w, b = first.experts, linear_weight(self.base), self.base.bias
        if "ffn" in experts:  # the expert sum rides inside this projection's GEMM
            return moe_lora(x, experts["ffn"].A, experts["ffn"].B, routing, first.scale, base_input=h, base_weight=w,
                            base_bias=b)
        if "fc2" in experts:
            return moe_lora(h, experts["fc2"].A, experts["fc2"].B, routing, first.scale, base_input=h, base_weight=w,
                            base_bias=b)
        return self.base(h)
