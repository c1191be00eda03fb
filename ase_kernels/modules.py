"""nn.Modules: a LoRA-MoE Linear, an ASE FFN that drops into timm's ViT in place of ``timm.layers.Mlp``, and ASE
experts beside any other d -> d FFN."""

import contextlib
import functools
import math
import weakref
from collections.abc import Iterator

import torch
from torch import nn

from .checks import MODES, integer
from .ops import mi_loss, moe_lora, moe_lora_ffn, route

PLACEMENTS = ("ffn", "fc1", "fc2", "fc1+fc2")


class LoRAExperts(nn.Module):
    """N low-rank experts ``E_i(x) = B_i A_i x``, stacked in two parameters (one DDP bucket each, every
    parameter used every step). A is LoRA's Kaiming-uniform, B is zero: a fresh expert adds nothing.

    A: (N, r, in_features); B: (N, out_features, r).
    """

    def __init__(self, num_experts: int, rank: int, in_features: int, out_features: int, device=None, dtype=None):
        super().__init__()
        self.A = nn.Parameter(torch.empty(num_experts, rank, in_features, device=device, dtype=dtype))
        self.B = nn.Parameter(torch.zeros(num_experts, out_features, rank, device=device, dtype=dtype))
        for a in self.A:  # per expert: the fan-in is in_features, as for LoRA's nn.Linear(in_features, r)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))

    def extra_repr(self) -> str:
        n, r, d_in = self.A.shape
        return f"num_experts={n}, rank={r}, in_features={d_in}, out_features={self.B.shape[1]}"


def is_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2), known by name so that transformers need not be imported: a Linear whose
    weight is stored transposed, (d_in, d_out), computing ``addmm(bias, x, weight)``."""
    return type(module).__name__ == "Conv1D" and type(module).__module__.startswith("transformers")


def linear_weight(module: nn.Module) -> torch.Tensor | None:
    """The (d_out, d_in) weight of an nn.Linear, or of a transformers Conv1D as a transposed view (no copy: the ops
    read weights through their strides); None for any other module."""
    if isinstance(module, nn.Linear):
        return module.weight
    return module.weight.T if is_conv1d(module) else None


class _LastForward:
    """What a module's last forward leaves for the losses and logs: routing tensors of an autograd graph. A copy
    or a pickle of the module starts without them (deepcopy refuses non-leaf tensors)."""

    def __init__(self):
        self.prob_sums = self.indices = self.gates = self.task_ids = None
        # [ids] of each forward whose graph backward has not passed yet, latest last: checkpointing recomputes them
        self.pending: list[list] = []

    def __reduce__(self):
        return _LastForward, ()


class _Routed(nn.Module):
    """What every ASE module shares: the task routers, the routing call, and the statistics of its last call."""

    def _init_routing(self, in_features, num_experts, top_k, num_shared, rank, alpha, num_tasks, mode, device, dtype):
        num_experts, top_k, num_shared, rank, num_tasks = (
            integer(name, value) for name, value in (("num_experts", num_experts), ("top_k", top_k),
                                                     ("num_shared", num_shared), ("rank", rank),
                                                     ("num_tasks", num_tasks)))
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if not 0 <= num_shared <= num_experts or not 0 <= top_k <= num_experts - num_shared:
            raise ValueError(
                f"need 0 <= num_shared <= num_experts and 0 <= top_k <= num_experts - num_shared, got "
                f"num_experts={num_experts}, top_k={top_k}, num_shared={num_shared}"
            )
        if num_tasks < 1 or rank < 1:
            raise ValueError(f"num_tasks and rank must be >= 1, got num_tasks={num_tasks}, rank={rank}")
        self.num_experts, self.top_k, self.num_shared, self.rank = num_experts, top_k, num_shared, rank
        self.num_tasks, self.mode = num_tasks, mode
        self.alpha = float(alpha if alpha is not None else rank)
        self.scale = self.alpha / rank
        # zero-initialised as in Mod-Squad: every token starts with equal logits, so top-k ties go to low indices
        self.router = nn.Parameter(torch.zeros(num_tasks, num_experts, in_features, device=device, dtype=dtype))
        self._task_ids: torch.Tensor | None = None  # set by ase_kernels.task_ids(model, ids)
        self._last = _LastForward()

    def options(self) -> dict:
        """The keyword arguments that rebuild this module's experts and routers (``ak.convert`` takes them)."""
        return dict(num_experts=self.num_experts, top_k=self.top_k, num_shared=self.num_shared, rank=self.rank,
                    alpha=self.alpha, num_tasks=self.num_tasks, mode=self.mode)

    def _route(self, x: torch.Tensor, task_ids: torch.Tensor | None):
        last = self._last
        ids = task_ids if task_ids is not None else self._task_ids
        recomputing = ids is None and _recomputing()
        if recomputing:
            # Activation checkpointing runs forward again inside backward, after the task_ids block has exited. The
            # forward recomputed is the latest one whose graph backward has not passed yet (backward visits the
            # graphs of several forwards latest first); without such a record (reentrant checkpointing builds no
            # graph in forward), the last forward.
            ids = last.pending[-1][0] if last.pending else last.task_ids
        routing = route(x, self.router, ids, top_k=self.top_k, num_shared=self.num_shared, mode=self.mode)
        # only forwards without explicit ids can be recomputed without them: one given its ids gets them again (a
        # record and a gradient hook cost ~10 us of host time per layer)
        if (task_ids is None and not recomputing and routing.gates.requires_grad
                and not torch.compiler.is_compiling()):
            entry = [ids]
            last.pending = last.pending[-_PENDING + 1:] + [entry]  # graphs never differentiated fall off the end
            # a weak reference: the graph must not keep the holder (and through it, its own last graph) alive
            routing.gates.register_hook(functools.partial(_passed, weakref.ref(last), entry))
        # references only, no copies: the statistics are computed when someone asks for them
        last.prob_sums, last.indices, last.gates, last.task_ids = (routing.prob_sums, routing.indices.detach(),
                                                                   routing.gates.detach(), ids)
        return routing

    @property
    def last_prob_sums(self) -> torch.Tensor | None:
        """(tasks, N) float32, differentiable: the per-task router softmax sums of the last forward."""
        return self._last.prob_sums

    def mi_loss(self) -> torch.Tensor:
        """Mod-Squad MI loss of this layer's last forward (a scalar with gradient)."""
        if self.last_prob_sums is None:
            raise RuntimeError("mi_loss() needs a forward call first")
        return mi_loss(self.last_prob_sums)

    @torch.no_grad()
    def routing_stats(self) -> dict[str, torch.Tensor]:
        """Statistics of the last forward, for training logs: ``shared_gate`` (tasks,) the mean total gate of the
        shared experts over each task's tokens, and ``load`` (tasks, N) the share of each task's tokens that each
        expert served (selected for, whatever its gate): every token is served by its k sparse and all S shared
        experts, so each row sums to k + S, and the S shared columns (the last ones) are 1. Tasks without tokens
        get 0. Device tensors: no host synchronisation."""
        last = self._last
        if last.indices is None:
            raise RuntimeError("routing_stats() needs a forward call first")
        indices, gates, ids = last.indices, last.gates, last.task_ids
        tokens = indices.shape[0]
        if ids is None:
            ids = torch.zeros(tokens, dtype=torch.int64, device=indices.device)
        elif ids.shape[0] != tokens:  # one id per leading batch row
            ids = ids[:, None].expand(ids.shape[0], tokens // ids.shape[0]).reshape(-1)
        ids = ids.to(torch.int64)
        count = torch.zeros(self.num_tasks, device=indices.device).index_add_(0, ids, gates.new_ones(tokens))
        shared = gates[:, self.top_k :].sum(-1)
        shared_gate = torch.zeros_like(count).index_add_(0, ids, shared) / count.clamp_min(1)
        load = torch.zeros(self.num_tasks, self.num_experts, device=indices.device)
        load.index_put_((ids[:, None].expand_as(indices), indices), gates.new_ones(indices.shape), accumulate=True)
        return {"shared_gate": shared_gate, "load": load / count.clamp_min(1)[:, None]}

    def _routing_repr(self) -> str:
        return (f"num_experts={self.num_experts}, top_k={self.top_k}, num_shared={self.num_shared}, rank={self.rank}, "
                f"scale={self.scale:g}, num_tasks={self.num_tasks}, mode={self.mode!r}")


class MoELoRALinear(_Routed):
    """A frozen ``nn.Linear`` plus a routed mixture of LoRA experts: ``y = base(x) + scale * sum_i g_i B_i A_i x``.

    The base layer is frozen here (``requires_grad_(False)``); its product and the experts run as one fused op.
    transformers' ``Conv1D`` (GPT-2's projections, weight stored (d_in, d_out)) is taken as well: the ops get its
    weight as a transposed view (``weight.T``, no copy), which every backend reads through its strides.

    Args:
        base: the nn.Linear (or transformers Conv1D) to adapt (d_in -> d_out).
        num_experts, top_k, num_shared, rank: N, k, S, r.
        num_tasks: task-specific routers; forward then takes ``task_ids``.
        mode: ``adaptive`` | ``naive`` | ``none``. alpha: LoRA alpha, scale = alpha / r (default alpha = r).

    Example:
        >>> import torch, ase_kernels as ak
        >>> layer = ak.MoELoRALinear(torch.nn.Linear(16, 24), num_experts=8, top_k=2, num_shared=1, rank=2)
        >>> x = torch.randn(3, 5, 16)
        >>> torch.equal(layer(x), layer.base(x))  # B starts at zero
        True
    """

    def __init__(self, base: nn.Module, num_experts: int = 32, top_k: int = 6, num_shared: int = 2, rank: int = 2,
                 num_tasks: int = 1, mode: str = "adaptive", alpha: float | None = None):
        super().__init__()
        w = linear_weight(base)
        if w is None:
            raise TypeError(f"base must be an nn.Linear or a transformers Conv1D, got {type(base).__name__}")
        d_out, d_in = w.shape
        self.base = base.requires_grad_(False)
        self._init_routing(d_in, num_experts, top_k, num_shared, rank, alpha, num_tasks, mode, w.device, w.dtype)
        self.experts = LoRAExperts(num_experts, rank, d_in, d_out, w.device, w.dtype)

    def forward(self, x: torch.Tensor, task_ids: torch.Tensor | None = None) -> torch.Tensor:
        """x: (..., d_in); task_ids: (T,) or one per leading batch row, or None. Returns (..., d_out)."""
        routing = self._route(x, task_ids)
        return moe_lora(x, self.experts.A, self.experts.B, routing, self.scale, base_input=x,
                        base_weight=linear_weight(self.base), base_bias=self.base.bias)

    def extra_repr(self) -> str:
        return self._routing_repr()


class ASEMlp(_Routed):
    """ViT FFN with Adaptive Shared Experts, a drop-in for ``timm.layers.Mlp`` (same fc1/act/drop1/norm/fc2/drop2
    names, so timm checkpoints load). One router per FFN, fed with the FFN input.

    placement: ``ffn`` (experts map the FFN input d -> d and are added to its output; the paper's Eq. 10),
    ``fc1`` / ``fc2`` / ``fc1+fc2`` (experts are LoRA deltas of those Linears, sharing the one routing).
    The base fc1/fc2 are not frozen here: freeze them in the model, as a frozen-ViT fine-tune does.

    Example:
        >>> import functools, timm, torch, ase_kernels as ak
        >>> mlp = functools.partial(ak.ASEMlp, num_experts=8, top_k=2, num_shared=1, rank=2, num_tasks=2)
        >>> vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, mlp_layer=mlp)
        >>> with ak.task_ids(vit, torch.tensor([0, 1])):
        ...     vit(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 1000])
    """

    def __init__(self, in_features: int, hidden_features: int | None = None, out_features: int | None = None,
                 act_layer=nn.GELU, norm_layer=None, bias: bool | tuple[bool, bool] = True,
                 drop: float | tuple[float, float] = 0.0, use_conv: bool = False, *, num_experts: int = 32,
                 top_k: int = 6, num_shared: int = 2, rank: int = 2, alpha: float | None = None, num_tasks: int = 1,
                 mode: str = "adaptive", placement: str = "ffn", device=None, dtype=None, **kwargs):
        super().__init__()
        if use_conv:
            raise ValueError("use_conv=True (1x1-conv Mlp) is not supported by ASEMlp: tokens must be (..., d)")
        if placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        bias = bias if isinstance(bias, tuple) else (bias, bias)
        drop = drop if isinstance(drop, tuple) else (drop, drop)
        factory = dict(device=device, dtype=dtype)
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias[0], **factory)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop[0])
        self.norm = norm_layer(hidden_features) if norm_layer is not None else nn.Identity()
        self.fc2 = nn.Linear(hidden_features, out_features, bias=bias[1], **factory)
        self.drop2 = nn.Dropout(drop[1])
        self.placement = placement
        self._init_routing(in_features, num_experts, top_k, num_shared, rank, alpha, num_tasks, mode, device, dtype)
        shapes = {"ffn": (in_features, out_features), "fc1": (in_features, hidden_features),
                  "fc2": (hidden_features, out_features)}
        targets = ("fc1", "fc2") if placement == "fc1+fc2" else (placement,)
        self.experts = nn.ModuleDict(
            {name: LoRAExperts(num_experts, rank, *shapes[name], **factory) for name in targets}
        )

    def forward(self, x: torch.Tensor, task_ids: torch.Tensor | None = None) -> torch.Tensor:
        """x: (..., in_features); task_ids: (T,) or one per leading batch row, or None (one task, or the ids set
        by :func:`task_ids`). Returns (..., out_features)."""
        routing = self._route(x, task_ids)
        experts = self.experts
        if self._fused_ffn():
            y = moe_lora_ffn(x, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias, experts["ffn"].A,
                             experts["ffn"].B, routing, self.scale)
            return self.drop2(y)
        if "fc1" in experts:
            h = moe_lora(x, experts["fc1"].A, experts["fc1"].B, routing, self.scale, base_input=x,
                         base_weight=self.fc1.weight, base_bias=self.fc1.bias)
        else:
            h = self.fc1(x)
        h = self.norm(self.drop1(self.act(h)))
        if "ffn" in experts:  # the expert sum rides inside fc2's GEMM
            y = moe_lora(x, experts["ffn"].A, experts["ffn"].B, routing, self.scale, base_input=h,
                         base_weight=self.fc2.weight, base_bias=self.fc2.bias)
        elif "fc2" in experts:
            y = moe_lora(h, experts["fc2"].A, experts["fc2"].B, routing, self.scale, base_input=h,
                         base_weight=self.fc2.weight, base_bias=self.fc2.bias)
        else:
            y = self.fc2(h)
        return self.drop2(y)

    def _fused_ffn(self) -> bool:
        """The whole FFN is one op when nothing sits between fc1 and fc2 but an exact GELU: the default ViT."""
        act = self.act
        return (self.placement == "ffn" and type(act) is nn.GELU and act.approximate == "none"
                and isinstance(self.norm, nn.Identity) and (self.drop1.p == 0 or not self.training))

    def options(self) -> dict:
        return super().options() | {"placement": self.placement}

    def extra_repr(self) -> str:
        return f"placement={self.placement!r}, {self._routing_repr()}"


class ASEFFN(_Routed):
    """Any feed-forward module mapping d -> d (the gated SwiGLU MLP of LLaMA-family models, for one) with Adaptive
    Shared Experts in parallel, routed from its input (the paper's Eq. 10): ``y = base(x) + scale * sum_i g_i B_i A_i
    x``. ``ak.convert`` builds it around a loaded module; the module is frozen and called unchanged.

    Args:
        base: the FFN; its forward takes x (..., features) first and returns (..., features).
        features: d. The other arguments are those of :class:`MoELoRALinear`.

    Example:
        >>> import torch, ase_kernels as ak
        >>> ffn = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.SiLU(), torch.nn.Linear(64, 16))
        >>> ase = ak.ASEFFN(ffn, 16, num_experts=8, top_k=2, num_shared=1, rank=2)
        >>> x = torch.randn(3, 5, 16)
        >>> torch.equal(ase(x), ffn(x))  # B starts at zero
        True
    """

    def __init__(self, base: nn.Module, features: int, *, num_experts: int = 32, top_k: int = 6, num_shared: int = 2,
                 rank: int = 2, alpha: float | None = None, num_tasks: int = 1, mode: str = "adaptive", device=None,
                 dtype=None):
        super().__init__()
        self.base = base.requires_grad_(False)
        self._init_routing(features, num_experts, top_k, num_shared, rank, alpha, num_tasks, mode, device, dtype)
        self.experts = LoRAExperts(num_experts, rank, features, features, device, dtype)

    def forward(self, x: torch.Tensor, *args, task_ids: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """x: (..., features); task_ids: (T,) or one per leading batch row, or None; other arguments go to the
        wrapped module. Returns (..., features)."""
        routing = self._route(x, task_ids)
        return self.base(x, *args, **kwargs) + moe_lora(x, self.experts.A, self.experts.B, routing, self.scale)

    def extra_repr(self) -> str:
        return self._routing_repr()


_PENDING = 64  # forwards remembered for recomputation: more than any loop runs before its backward


def _passed(last_ref: weakref.ref, entry: list, grad: torch.Tensor) -> None:
    """Backward has passed the routing of the forward that recorded entry: it will not be recomputed again."""
    last = last_ref()
    if last is not None:
        last.pending = [e for e in last.pending if e is not entry]


def _recomputing() -> bool:
    """True while autograd runs a backward pass and the caller is not being traced: a forward called then is an
    activation-checkpointing recomputation. (Compiled graphs replay their recomputation without Python.)"""
    return not torch.compiler.is_compiling() and torch._C._current_graph_task_id() != -1


def ase_modules(model: nn.Module) -> Iterator[_Routed]:
    """The ASE modules (ASEMlp, MoELoRALinear, ASEFFN, split_ffn.ASESplitFFN) inside model, in registration order."""
    return (m for m in model.modules() if isinstance(m, _Routed))


def adapter_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The routers and experts of model's ASE modules, by their ``state_dict`` name: what ``ak.save_adapters``
    writes (the frozen bases inside the modules are not among them)."""
    names = {m: n for n, m in model.named_modules()}
    return {f"{names[m]}.{p}" if names[m] else p: t for m in ase_modules(model) for p, t in m.named_parameters()
            if p == "router" or p.startswith("experts.")}


@contextlib.contextmanager
def task_ids(model: nn.Module, ids: torch.Tensor):
    """Hand task ids to every ASE module in model for calls made without ``task_ids`` (timm's blocks call
    ``mlp(x)``). ids: (B,) one per image, or (T,) one per token.

    Backward may run after the block, also with activation checkpointing (timm's ``set_grad_checkpointing``,
    ``torch.utils.checkpoint`` reentrant or not): a forward that autograd re-runs inside backward reuses the ids of
    the forward it recomputes. With non-reentrant checkpointing (timm's default) that holds for several forwards
    (one per task, say) before one backward; reentrant checkpointing records no graph in forward, so there the
    last forward's ids are used: call backward before the next forward with other ids. Under torch.compile the
    recomputation is part of the compiled graph and needs nothing.

    Example:
        >>> with ak.task_ids(vit, ids):  # doctest: +SKIP
        ...     out = vit(images)
    """
    modules = list(ase_modules(model))
    for m in modules:
        m._task_ids = ids
    try:
        yield model
    finally:
        for m in modules:
            m._task_ids = None
