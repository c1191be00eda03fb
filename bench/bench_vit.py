"""A whole 5-task training step (forward, losses, backward, AdamW) of the multi-task ViT: images/s with the
ASE kernels, with the per-expert reference implementation, and without experts (plain MTL-ViT)."""

import os

import pytest
import torch
from conftest import ENV, GPU, median_ms, memory_bytes, sync

from ase_model.data import NUM_OUTPUTS, TASKS
from ase_model.losses import multi_task_loss
from ase_model.model import MultiTaskViT

# ViT-B/16 at 224 on a GPU; a small ViT on a CPU
VIT = (dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12) if GPU
       else dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2))
IMAGES = 8 if GPU else 2
EXPERTS = dict(num_experts=32, top_k=6, num_shared=2, rank=2, mode="adaptive", placement="ffn")


def _batch():
    s = VIT["img_size"]
    batch = {"image": torch.randn(IMAGES, 3, s, s, device=ENV.device)}
    for t in TASKS:
        if t in ("semseg", "human_parts"):
            batch[t] = torch.randint(0, NUM_OUTPUTS[t], (IMAGES, s, s), device=ENV.device)
        elif t == "normals":
            batch[t] = torch.nn.functional.normalize(torch.randn(IMAGES, 3, s, s, device=ENV.device), dim=1)
        else:
            batch[t] = torch.randint(0, 2, (IMAGES, s, s), device=ENV.device).float()
    return (batch,)


@pytest.mark.parametrize("impl", ["ase", "reference", "plain"])
def bench_vit_train_step(benchmark, impl, monkeypatch):
    if impl == "reference":
        monkeypatch.setenv("ASE_KERNELS_BACKEND", "reference")
    torch.manual_seed(0)
    model = MultiTaskViT(experts=None if impl == "plain" else EXPERTS, head_dim=64, **VIT).to(ENV.device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step(batch):
        with torch.autocast(ENV.device.type, dtype=torch.bfloat16, enabled=GPU):
            preds = model(batch["image"])
        loss, _ = multi_task_loss({t: p.float() for t, p in preds.items()}, batch)
        if impl != "plain":
            loss = loss + 0.005 * model.mi_loss()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync()

    ms = median_ms(step, _batch, max(3, ENV.rounds // 3), ENV.warmup)
    mem = memory_bytes(step, _batch())
    benchmark.extra_info.update(impl=impl, images=IMAGES, tasks=len(TASKS), ms=ms, images_per_s=IMAGES / ms * 1e3,
                                memory_mb=mem / 2**20, backend=os.environ.get("ASE_KERNELS_BACKEND", "default"))
    benchmark.pedantic(step, setup=lambda: (_batch(), {}), rounds=max(3, ENV.rounds // 3), warmup_rounds=1)
