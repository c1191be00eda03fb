"""The multi-task ViT of the ASE paper: a frozen timm ViT, plain LoRA on attention, ASE in every FFN, a learnable
embedding per task, task-specific routers, and one light dense head per task. All tasks run as one batch.
"""

import functools
import math
import os
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

import ase_kernels as ak

from . import datasets


class LoRALinear(nn.Linear):
    """nn.Linear plus a plain LoRA delta ``scale * B A x`` (A Kaiming-uniform, B zero). It stays an nn.Linear
    with the same weight names, so timm checkpoints load into it unchanged."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, rank: int = 4,
                 alpha: float | None = None, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scale = (alpha if alpha is not None else rank) / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + self.scale * F.linear(F.linear(x, self.lora_A), self.lora_B)


def _add_lora(linear: nn.Linear, rank: int) -> LoRALinear:
    new = LoRALinear(linear.in_features, linear.out_features, linear.bias is not None, rank,
                     device=linear.weight.device, dtype=linear.weight.dtype)
    new.load_state_dict(linear.state_dict(), strict=False)
    return new


class DenseHead(nn.Module):
    """A light dense-prediction head: 3x3 conv, GELU, 1x1 conv on the patch grid, then bilinear upsampling to
    the input resolution. No batch norm: a data-parallel batch then trains exactly like the whole batch."""

    def __init__(self, dim: int, out_channels: int, hidden: int = 256):
        super().__init__()
        self.conv = nn.Conv2d(dim, hidden, 3, padding=1)
        self.act = nn.GELU()
        self.out = nn.Conv2d(hidden, out_channels, 1)

    def forward(self, grid: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """grid (B, dim, h, w) -> (B, out_channels, *size)."""
        y = self.out(self.act(self.conv(grid)))
        return F.interpolate(y, size=size, mode="bilinear", align_corners=False)


class MultiTaskViT(nn.Module):
    """Frozen ViT backbone shared by all tasks, with ASE FFNs and per-task routers, embeddings and heads.

    Args:
        tasks: {task name: output channels of its head}, in the order the tasks run (a dataset's
            ``{t: task.channels for t, task in dataset.tasks.items()}``, see ase_model/datasets).
        img_size, patch_size, embed_dim, depth, num_heads: the ViT (ViT-B/16: 224, 16, 768, 12, 12).
        experts: None for a plain MTL-ViT (timm's Mlp), else a dict of ``ak.ASEMlp`` options: num_experts,
            top_k, num_shared, rank, mode, placement.
        lora_rank: rank of the plain LoRA on attention qkv and proj (0: none).
        head_dim: hidden channels of each head.
    """

    def __init__(self, tasks: Mapping[str, int], img_size: int = 224, patch_size: int = 16,
                 embed_dim: int = 768, depth: int = 12, num_heads: int = 12, experts: dict | None = None,
                 lora_rank: int = 4, head_dim: int = 256):
        super().__init__()
        self.tasks = tuple(tasks)
        if not self.tasks:
            raise ValueError("tasks: expected at least one task")
        mlp_layer = None
        if experts:
            mlp_layer = functools.partial(ak.ASEMlp, num_tasks=len(self.tasks), **experts)
        kwargs = dict(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
                      num_heads=num_heads, num_classes=0)
        if mlp_layer is not None:
            kwargs["mlp_layer"] = mlp_layer
        self.vit = VisionTransformer(**kwargs)
        if lora_rank:
            for block in self.vit.blocks:
                block.attn.qkv = _add_lora(block.attn.qkv, lora_rank)
                block.attn.proj = _add_lora(block.attn.proj, lora_rank)
        self.task_embed = nn.Parameter(torch.zeros(len(self.tasks), 1, embed_dim))
        nn.init.trunc_normal_(self.task_embed, std=0.02)
        self.heads = nn.ModuleDict({t: DenseHead(embed_dim, tasks[t], head_dim) for t in self.tasks})
        self.freeze_backbone()

    def freeze_backbone(self) -> None:
        """Freeze the pretrained ViT; LoRA, experts, routers, task embeddings and heads train."""
        for name, p in self.vit.named_parameters():
            p.requires_grad_(any(key in name for key in ("lora_", "router", "experts.")))

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        names = {n for n, p in self.named_parameters() if p.requires_grad}
        return {n: t for n, t in self.state_dict().items() if n in names}

    def ase_layers(self):
        return list(ak.ase_modules(self))

    def forward_features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images (B, 3, H, W) -> patch features of every task (tasks * B, dim, h, w), task-major, and the task
        id of every row. The backbone runs ONCE on the replicated batch."""
        b = images.shape[0]
        ids = torch.arange(len(self.tasks), device=images.device).repeat_interleave(b)  # task-major
        vit = self.vit
        x = vit._pos_embed(vit.patch_embed(images))  # (B, L, dim)
        x = x.repeat(len(self.tasks), 1, 1) + self.task_embed[ids]  # task embedding, added once
        x = vit.norm_pre(vit.patch_drop(x))
        with ak.task_ids(vit, self._token_task_ids(b, x.shape[1], images.device)):
            x = vit.blocks(x)
        x = vit.norm(x)[:, vit.num_prefix_tokens:]
        h, w = vit.patch_embed.grid_size
        return x.transpose(1, 2).reshape(x.shape[0], -1, h, w), ids

    def _token_task_ids(self, b: int, tokens: int, device: torch.device) -> torch.Tensor:
        """The task id of every token of a task-major batch, one tensor per shape, reused from step to step: the
        experts range-check an ids tensor once (a read from the device), not at every step and layer."""
        key = (b, tokens, str(device))
        cache = self.__dict__.setdefault("_ids_cache", {})
        if key not in cache or torch.compiler.is_compiling():
            ids = torch.arange(len(self.tasks), device=device).repeat_interleave(b * tokens)
            if torch.compiler.is_compiling():
                return ids
            cache.clear()
            cache[key] = ids
        return cache[key]

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """images (B, 3, H, W) -> {task: (B, C_task, H, W)}."""
        b = images.shape[0]
        grid, _ = self.forward_features(images)
        size = images.shape[-2:]
        return {t: self.heads[t](grid[i * b:(i + 1) * b], size) for i, t in enumerate(self.tasks)}

    def mi_loss(self) -> torch.Tensor:
        """Mod-Squad MI loss summed over the ASE layers of the last forward. Under data parallelism the per-task
        expert sums are all-reduced first, so every rank's loss is the loss of the global batch."""
        total = self.task_embed.new_zeros(())
        for layer in self.ase_layers():
            prob_sums = layer.last_prob_sums
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                prob_sums = torch.distributed.nn.functional.all_reduce(prob_sums)
            total = total + ak.mi_loss(prob_sums)
        return total

    @torch.no_grad()
    def routing_stats(self) -> dict[str, torch.Tensor] | None:
        """Routing of the last forward, per layer: ``shared_gate`` (layers, tasks), the mean total gate of the
        shared experts for each task, and ``load`` (layers, tasks, N), the share of each task's tokens each expert
        served (rows sum to k + S; the last S columns, the shared experts, are 1). None for a model without
        experts."""
        stats = [m.routing_stats() for m in self.ase_layers()]
        if not stats:
            return None
        return {key: torch.stack([s[key] for s in stats]) for key in ("shared_gate", "load")}


def load_pretrained(model: MultiTaskViT, path: str) -> list[str]:
    """Load ViT weights from a local .safetensors / .npz / .pth(.tar) file into model.vit. Nothing downloads.

    The keys a pretrained ViT cannot have (LoRA, routers, experts) may be missing and a classifier head may be
    unexpected; anything else missing or unexpected is an error (timm's own loaders turn non-strict silently).
    Returns the missing keys.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--pretrained: no such file: {path}")
    if path.endswith(".npz"):  # Google's JAX checkpoints: timm reads them key by key, a missing key is a KeyError
        import re

        import numpy as np
        from timm.models.vision_transformer import _load_weights

        with np.load(path) as npz:
            blocks = {int(m.group(1)) for k in npz.files if (m := re.search(r"encoderblock_(\d+)/", k))}
        if blocks and len(blocks) != len(model.vit.blocks):
            raise ValueError(f"{path} has {len(blocks)} blocks, the ViT {len(model.vit.blocks)}")
        try:
            _load_weights(model.vit, path)
        except KeyError as e:
            raise ValueError(f"{path} does not fit the ViT: missing {e}") from e
        return []
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        for key in ("state_dict", "model"):
            if isinstance(state, dict) and key in state and isinstance(state[key], dict):
                state = state[key]
    state = {k.removeprefix("module.").removeprefix("vit."): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.startswith(("head.", "fc_norm.")) or k in model.vit.state_dict()}
    if "pos_embed" in state and state["pos_embed"].shape != model.vit.pos_embed.shape:
        from timm.layers import resample_abs_pos_embed

        state["pos_embed"] = resample_abs_pos_embed(state["pos_embed"], model.vit.patch_embed.grid_size,
                                                    num_prefix_tokens=model.vit.num_prefix_tokens)
    missing, unexpected = model.vit.load_state_dict(state, strict=False)
    allowed = ("lora_", "router", "experts.")
    bad_missing = [k for k in missing if not any(a in k for a in allowed)]
    if bad_missing or unexpected:
        raise ValueError(f"{path} does not fit the ViT: missing {bad_missing[:8]}, unexpected {unexpected[:8]}")
    return missing


def build_model(args) -> MultiTaskViT:
    """The model a training configuration asks for (see ase_model.train's options)."""
    experts = None
    if args.num_experts > 0:
        experts = dict(num_experts=args.num_experts, top_k=args.top_k, num_shared=args.num_shared,
                       rank=args.expert_rank, mode=args.mode, placement=args.placement)
    dataset = datasets.get(args.dataset)
    return MultiTaskViT(tasks={t: dataset.tasks[t].channels for t in args.tasks}, img_size=args.img_size,
                        patch_size=args.patch_size, embed_dim=args.embed_dim, depth=args.depth,
                        num_heads=args.num_heads, experts=experts, lora_rank=args.lora_rank, head_dim=args.head_dim)
