"""ase_model/model.py: shapes, one backbone pass for all tasks, what trains, the fresh model equals the plain
frozen ViT, and pretrained-weight loading from .safetensors, .pth and JAX .npz (ase_model/plots.py is exercised by
test_train)."""

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from timm.models.vision_transformer import VisionTransformer

import ase_kernels as ak
from ase_model.datasets import get
from ase_model.model import LoRALinear, MultiTaskViT, load_pretrained

PASCAL = {t: task.channels for t, task in get("pascal_context").tasks.items()}
SMALL = dict(tasks=PASCAL, img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, head_dim=16)
EXPERTS = dict(num_experts=8, top_k=2, num_shared=1, rank=2, mode="adaptive", placement="ffn")


def test_outputs_every_task_at_full_resolution():
    model = MultiTaskViT(experts=EXPERTS, **SMALL)
    out = model(torch.randn(3, 3, 32, 32))
    assert set(out) == set(PASCAL)
    for t, y in out.items():
        assert y.shape == (3, PASCAL[t], 32, 32)


def test_all_tasks_run_as_one_backbone_batch():
    model = MultiTaskViT(experts=EXPERTS, **SMALL)
    calls = []
    model.vit.blocks[0].register_forward_hook(lambda m, i, o: calls.append(i[0].shape))
    model(torch.randn(2, 3, 32, 32))
    assert calls == [torch.Size([len(PASCAL) * 2, 1 + 16, 48])], "one pass over tasks * B images"
    ids = model.vit.blocks[0].mlp._last.task_ids.view(len(PASCAL) * 2, -1)  # one per token, the same per image
    assert (ids == ids[:, :1]).all() and ids[:, 0].tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4], "task-major ids"


def test_only_adapters_routers_embeddings_and_heads_train():
    model = MultiTaskViT(experts=EXPERTS, **SMALL)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(("lora_" in n or "router" in n or "experts." in n or n.startswith(("task_embed", "heads.")))
               for n in trainable)
    assert "vit.blocks.0.mlp.fc1.weight" not in trainable and "vit.blocks.0.attn.qkv.weight" not in trainable
    assert {"vit.blocks.0.mlp.router", "vit.blocks.0.mlp.experts.ffn.A", "vit.blocks.0.attn.qkv.lora_B",
            "task_embed", "heads.semseg.out.weight"} <= trainable


@pytest.mark.parametrize("placement", ["ffn", "fc1+fc2"])
def test_fresh_ase_model_equals_the_plain_frozen_vit(placement):
    """B = 0 in every expert and LoRA: the ASE model is exactly the plain ViT with the same heads."""
    ase = MultiTaskViT(experts=dict(EXPERTS, placement=placement), **SMALL)
    plain = MultiTaskViT(experts=None, lora_rank=0, **SMALL)
    missing, unexpected = plain.load_state_dict(ase.state_dict(), strict=False)
    assert not missing and all(("lora_" in k or "router" in k or "experts." in k) for k in unexpected)
    assert not any(isinstance(m, ak.ASEMlp) for m in plain.modules())
    images = torch.randn(2, 3, 32, 32)
    a, p = ase(images), plain(images)
    for t in PASCAL:
        torch.testing.assert_close(a[t], p[t], rtol=1e-5, atol=1e-5)


def test_model_without_experts_is_the_frozen_timm_vit_with_the_same_heads():
    """0 experts, fresh LoRA (B = 0), task embeddings at zero: every task's output is timm's own ViT forward
    followed by that task's head, so the replicated batch and the block loop change nothing."""
    model = MultiTaskViT(experts=None, **SMALL)
    assert not any(isinstance(m, ak.ASEMlp) for m in model.modules())
    with torch.no_grad():
        model.task_embed.zero_()
    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=0)
    missing, unexpected = vit.load_state_dict(model.vit.state_dict(), strict=False)
    assert not missing and all("lora_" in k for k in unexpected)
    images = torch.randn(2, 3, 32, 32)
    tokens = vit.forward_features(images)[:, vit.num_prefix_tokens:]  # (B, 16, 48)
    grid = tokens.transpose(1, 2).reshape(2, 48, 4, 4)
    out = model(images)
    for t in PASCAL:
        torch.testing.assert_close(out[t], model.heads[t](grid, (32, 32)), rtol=1e-5, atol=1e-5)
    assert not any(p.requires_grad for n, p in model.vit.named_parameters() if "lora_" not in n)


def test_lora_linear_keeps_linear_weight_names():
    layer = LoRALinear(6, 4, rank=2)
    assert {"weight", "bias", "lora_A", "lora_B"} == set(layer.state_dict())
    x = torch.randn(3, 6)
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))


def test_mi_loss_and_routing_statistics():
    model = MultiTaskViT(experts=EXPERTS, **SMALL)
    model(torch.randn(2, 3, 32, 32))
    assert model.mi_loss().requires_grad
    stats = model.routing_stats()
    assert stats["shared_gate"].shape == (2, len(PASCAL)) and stats["load"].shape == (2, len(PASCAL), 8)
    assert MultiTaskViT(experts=None, **SMALL).routing_stats() is None


@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
def test_load_pretrained_checks_keys(tmp_path, fmt):
    source = MultiTaskViT(experts=None, lora_rank=0, **SMALL)
    state = {k: v.clone() for k, v in source.vit.state_dict().items()}
    state["head.weight"] = torch.zeros(10, 48)  # a classifier head: allowed
    path = str(tmp_path / f"vit.{fmt}")
    save_file(state, path) if fmt == "safetensors" else torch.save({"state_dict": state}, path)
    model = MultiTaskViT(experts=EXPERTS, **SMALL)
    missing = load_pretrained(model, path)
    assert missing and all(("lora_" in k or "router" in k or "experts." in k) for k in missing)
    torch.testing.assert_close(model.vit.blocks[1].mlp.fc2.weight, source.vit.blocks[1].mlp.fc2.weight)
    del state["blocks.0.norm1.weight"]
    save_file(state, path) if fmt == "safetensors" else torch.save(state, path)
    with pytest.raises(ValueError, match="blocks.0.norm1.weight"):
        load_pretrained(model, path)
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_pretrained(model, str(tmp_path / "absent.safetensors"))


def _save_jax_npz(vit, path, drop=()):
    """vit's weights in the layout of Google's JAX ViT .npz checkpoints (what timm's _load_weights reads)."""
    d = vit.embed_dim
    heads = vit.blocks[0].attn.num_heads
    w = {"embedding/kernel": vit.patch_embed.proj.weight.permute(2, 3, 1, 0),
         "embedding/bias": vit.patch_embed.proj.bias, "cls": vit.cls_token,
         "Transformer/posembed_input/pos_embedding": vit.pos_embed,
         "Transformer/encoder_norm/scale": vit.norm.weight, "Transformer/encoder_norm/bias": vit.norm.bias}
    for i, block in enumerate(vit.blocks):
        b = f"Transformer/encoderblock_{i}/"
        mha = b + "MultiHeadDotProductAttention_1/"
        w |= {b + "LayerNorm_0/scale": block.norm1.weight, b + "LayerNorm_0/bias": block.norm1.bias,
              b + "LayerNorm_2/scale": block.norm2.weight, b + "LayerNorm_2/bias": block.norm2.bias,
              mha + "out/kernel": block.attn.proj.weight.reshape(d, heads, -1).permute(1, 2, 0),
              mha + "out/bias": block.attn.proj.bias}
        for n, weight, bias in zip(("query", "key", "value"), block.attn.qkv.weight.chunk(3),
                                   block.attn.qkv.bias.chunk(3), strict=True):
            w |= {mha + f"{n}/kernel": weight.T.reshape(d, heads, -1), mha + f"{n}/bias": bias.reshape(heads, -1)}
        for r, fc in enumerate((block.mlp.fc1, block.mlp.fc2)):
            w |= {b + f"MlpBlock_3/Dense_{r}/kernel": fc.weight.T, b + f"MlpBlock_3/Dense_{r}/bias": fc.bias}
    np.savez(path, **{k: v.detach().numpy() for k, v in w.items() if k not in drop})


def test_load_pretrained_reads_jax_npz(tmp_path):
    source = MultiTaskViT(experts=None, lora_rank=0, **SMALL)
    path = str(tmp_path / "vit.npz")
    _save_jax_npz(source.vit, path)
    model = MultiTaskViT(experts=EXPERTS, **SMALL)
    load_pretrained(model, path)
    ours, theirs = model.vit.state_dict(), source.vit.state_dict()
    for k, v in theirs.items():
        torch.testing.assert_close(ours[k], v, rtol=0, atol=0, msg=lambda m, k=k: f"{k}: {m}")
    _save_jax_npz(source.vit, path, drop=("Transformer/encoderblock_1/LayerNorm_2/scale",))
    with pytest.raises(ValueError, match="LayerNorm_2/scale"):
        load_pretrained(model, path)
    deeper = MultiTaskViT(experts=EXPERTS, **(SMALL | {"depth": 3}))
    _save_jax_npz(source.vit, path)
    with pytest.raises(ValueError, match="2 blocks, the ViT 3"):
        load_pretrained(deeper, path)

