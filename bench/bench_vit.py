"""A whole 5-task training step (forward, the five task losses and the MI loss, backward, AdamW) of the multi-task
ViT of DESIGN.md, built here from timm and ``ak.ASEMlp``: frozen ViT-B/16, plain LoRA r=4 on attention qkv and
proj, a task embedding, all tasks as one task-major batch, one light head per task. Three ways:

- ``ase``: ASE 32/6/2/2 in every FFN on the ase_kernels ops;
- ``reference``: the same model on ``ASE_KERNELS_BACKEND=reference`` (the per-expert-loop reference);
- ``plain``: plain MTL-ViT, timm's ``Mlp`` (no experts).

Each runs eager; ``ase`` and ``plain`` also ``compiled`` (``torch.compile`` of the model, as ``--compile`` in
``ase_model.train``) and, on a GPU, ``graphed`` (``mode="reduce-overhead"``: the fixed-shape forward and backward
replayed as CUDA graphs, as ``--cuda-graphs``). On a CPU the compiled step runs at the smallest batch only (compiling
takes a minute there) and the graphed one is not listed (CUDA graphs need a GPU).

Images/s counts input images (each runs through the backbone once per task), against the images per task.
"""

import functools
import gc
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import ENV, GPU, check_close, memory_mb, run_timed
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import ase_kernels as ak

TASKS = {"semseg": 21, "human_parts": 7, "sal": 1, "normals": 3, "edge": 1}  # output channels
LOSS_WEIGHTS = {"semseg": 1.0, "human_parts": 2.0, "sal": 5.0, "normals": 10.0, "edge": 50.0}  # DESIGN.md
EXPERTS = dict(num_experts=32, top_k=6, num_shared=2, rank=2, mode="adaptive", placement="ffn")
MI_WEIGHT = 0.005
IMPLS = ("ase", "reference", "plain")
# bf16 through 12 blocks, with the reference's routing on bf16 logits: looser than one FFN
VIT_TOLERANCE = 5e-2 if GPU else 1e-4


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a plain LoRA ``B A x`` of rank r. x (..., d_in) -> (..., d_out)."""

    def __init__(self, base: nn.Linear, rank: int = 4):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + F.linear(F.linear(x, self.lora_A), self.lora_B)


class Head(nn.Module):
    """A light dense head: 3x3 conv, GELU, 1x1 conv on the patch grid, bilinear upsampling.
    grid (B, dim, h, w) -> (B, C, H, W)."""

    def __init__(self, dim: int, out_channels: int, hidden: int):
        super().__init__()
        self.conv, self.out = nn.Conv2d(dim, hidden, 3, padding=1), nn.Conv2d(hidden, out_channels, 1)

    def forward(self, grid: torch.Tensor, size) -> torch.Tensor:
        return F.interpolate(self.out(F.gelu(self.conv(grid))), size=size, mode="bilinear", align_corners=False)


class MultiTaskViT(nn.Module):
    """images (B, 3, H, W) -> {task: (B, C_task, H, W)}; the backbone runs once on the (tasks * B) batch."""

    def __init__(self, vit: dict, experts: dict | None, head_hidden: int):
        super().__init__()
        kwargs = dict(vit, num_classes=0)
        if experts:
            kwargs["mlp_layer"] = functools.partial(ak.ASEMlp, num_tasks=len(TASKS), **experts)
        self.vit = VisionTransformer(**kwargs).requires_grad_(False)  # frozen; the additions below train
        for block in self.vit.blocks:
            block.attn.qkv, block.attn.proj = LoRALinear(block.attn.qkv), LoRALinear(block.attn.proj)
        for m in ak.ase_modules(self.vit):
            m.router.requires_grad_(True)
            m.experts.requires_grad_(True)
        self.task_embed = nn.Parameter(torch.randn(len(TASKS), 1, vit["embed_dim"]) * 0.02)
        self.heads = nn.ModuleDict({t: Head(vit["embed_dim"], c, head_hidden) for t, c in TASKS.items()})

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        b, vit = images.shape[0], self.vit
        ids = torch.arange(len(TASKS), device=images.device).repeat_interleave(b)  # task-major, one per image
        x = vit._pos_embed(vit.patch_embed(images)).repeat(len(TASKS), 1, 1) + self.task_embed[ids]
        with ak.task_ids(vit, ids):
            x = vit.blocks(vit.norm_pre(x))
        x = vit.norm(x)[:, vit.num_prefix_tokens :]
        h, w = vit.patch_embed.grid_size
        grid = x.transpose(1, 2).reshape(x.shape[0], -1, h, w)  # (tasks * B, dim, h, w)
        return {t: head(grid[i * b : (i + 1) * b], images.shape[-2:]) for i, (t, head) in enumerate(self.heads.items())}

    def mi_loss(self) -> torch.Tensor:
        return sum((ak.mi_loss(m.last_prob_sums) for m in ak.ase_modules(self)), torch.zeros((), device=ENV.device))


def make_model(impl: str) -> MultiTaskViT:
    model = MultiTaskViT(ENV.vit, None if impl == "plain" else EXPERTS, head_hidden=256 if GPU else 16)
    with torch.no_grad():  # a trained-looking state: routers that really choose, experts and LoRA that matter
        for m in ak.ase_modules(model):
            m.router.normal_(0, m.router.shape[-1] ** -0.5)
            m.experts["ffn"].B.normal_(0, 0.1)
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.02)
    return model.to(ENV.device)


def task_losses(preds: dict, batch: dict) -> torch.Tensor:
    """The weighted sum of the five losses (CE, CE, BCE, L1 on unit normals, BCE), in float32."""
    losses = {}
    for t, p in preds.items():
        p, y = p.float(), batch[t]
        if t in ("semseg", "human_parts"):
            losses[t] = F.cross_entropy(p, y, ignore_index=255)
        elif t == "normals":
            losses[t] = (F.normalize(p, dim=1) - y).abs().mean()
        else:
            losses[t] = F.binary_cross_entropy_with_logits(p[:, 0], y)
    return sum(LOSS_WEIGHTS[t] * loss for t, loss in losses.items())


def make_batch(images: int) -> dict:
    s, dev = ENV.vit["img_size"], ENV.device
    batch = {"image": torch.randn(images, 3, s, s, device=dev)}
    for t, c in TASKS.items():
        if t == "normals":
            batch[t] = F.normalize(torch.randn(images, 3, s, s, device=dev), dim=1)
        elif c > 1:
            batch[t] = torch.randint(0, c, (images, s, s), device=dev)
        else:
            batch[t] = torch.randint(0, 2, (images, s, s), device=dev).float()
    return batch


def forward(model, images):
    with torch.autocast(ENV.device.type, dtype=torch.bfloat16, enabled=GPU):
        return model(images)


def expert_flops(images: int) -> float:
    """Useful FLOPs of one step's routers and selected experts, forward+backward (as in bench_ffn.ffn_flops)."""
    tokens = images * len(TASKS) * ((ENV.vit["img_size"] // ENV.vit["patch_size"]) ** 2 + 1)
    d, n, k, s, r = ENV.vit["embed_dim"], *(EXPERTS[key] for key in ("num_experts", "top_k", "num_shared", "rank"))
    per_layer = 2 * tokens * d * n + 2 * tokens * (k + s) * r * 2 * d
    return 3 * per_layer * ENV.vit["depth"]


@functools.cache
def plain_flops(images: int) -> float:
    """FLOPs of a plain MTL-ViT step (every GEMM, convolution and attention), counted by FlopCounterMode."""
    model, batch = make_model("plain"), make_batch(images)
    with FlopCounterMode(display=False) as counter:
        task_losses(forward(model, batch["image"]), batch).backward()
    return counter.get_total_flops()


def train_step(model: MultiTaskViT, net: nn.Module, impl: str, opt: torch.optim.Optimizer):
    """step(batch): one training step of ``net`` (``model`` itself, or compiled): the weighted task losses, plus the
    MI loss where the model has experts, backward, and ``opt``'s update."""

    def step(batch):
        loss = task_losses(forward(net, batch["image"]), batch)
        if impl != "plain":
            loss = loss + MI_WEIGHT * model.mi_loss()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


MODES = {"eager": None, "compiled": "default", "graphed": "reduce-overhead"}  # torch.compile mode of each
CASES = [(impl, "eager", images) for impl in IMPLS for images in ENV.vit_images]
CASES += [(impl, mode, images) for impl in ("ase", "plain") for mode in ("compiled", "graphed")
          for images in (ENV.vit_images if GPU else ENV.vit_images[:1]) if GPU or (impl, mode) == ("ase", "compiled")]


@pytest.mark.parametrize("impl, mode, images", CASES, ids=lambda v: f"{v}img" if isinstance(v, int) else v)
def bench_vit_train_step(benchmark, impl, mode, images, monkeypatch):
    if impl == "reference":
        monkeypatch.setenv("ASE_KERNELS_BACKEND", "reference")
    model = make_model(impl)
    net = model if mode == "eager" else torch.compile(model, mode=MODES[mode])
    err = None
    if impl == "ase" and mode == "eager":  # the same model and input on the reference backend
        x = make_batch(1)["image"]
        with torch.no_grad():
            got = forward(model, x)
            with monkeypatch.context() as m:
                m.setenv("ASE_KERNELS_BACKEND", "reference")
                want = forward(model, x)
        err = max(check_close(f"vit {t}", got[t].float(), want[t].float(), VIT_TOLERANCE) for t in TASKS)
    elif mode != "eager":  # the compiled or graphed model against the eager one, on the step's own batch
        x = make_batch(images)["image"]
        got = {t: v.detach().clone() for t, v in forward(net, x).items()}
        want = forward(model, x)
        err = max(check_close(f"vit {mode} {t}", got[t].float(), want[t].detach().float(), VIT_TOLERANCE)
                  for t in TASKS)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=GPU)
    step = train_step(model, net, impl, opt)
    try:
        ms = run_timed(benchmark, step, lambda: (make_batch(images),), rounds=ENV.vit_rounds,
                       warmup=2 if mode == "eager" else 3)  # a CUDA graph is recorded on the third call
        mem = memory_mb(step, (make_batch(images),), exclude=[*model.parameters()])
    except torch.OutOfMemoryError:
        ms = None  # skipped below, once the exception (and the frames it holds) is gone
    if ms is None:
        del model, opt, params, step
        gc.collect()
        torch.cuda.empty_cache()
        pytest.skip(f"{impl} {mode} at {images} images per task does not fit in GPU memory")
    flops = plain_flops(images) + (0 if impl == "plain" else expert_flops(images))
    benchmark.extra_info.update(
        impl=impl, mode=mode, images=images, tasks=len(TASKS), batch=images * len(TASKS), ms=ms,
        images_per_s=images / ms * 1e3,
        gflop=flops / 1e9, tflops=flops / (ms * 1e-3) / 1e12, memory_mb=mem, memory_kind="peak" if GPU else "saved",
        rel_err=err, trainable_params=sum(p.numel() for p in params), experts=None if impl == "plain" else EXPERTS,
        vit=ENV.vit, dtype="bf16 autocast" if GPU else "float32", device=ENV.device.type)
