"""ase_model/model.py: shapes, one backbone pass for all tasks, what trains, the fresh model equals the plain
frozen ViT, and pretrained-weight loading (ase_model/plots.py is exercised by test_train)."""

import pytest
import torch
from safetensors.torch import save_file

import ase_kernels as ak
from ase_model.data import NUM_OUTPUTS, TASKS
from ase_model.model import LoRALinear, MultiTaskViT, load_pretrained

SMALL = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, head_dim=16)
EXPERTS = dict(num_experts=8, top_k=2, num_shared=1, rank=2, mode="adaptive", placement="ffn")


def test_outputs_every_task_at_full_resolution():
    model = MultiTaskViT(experts=EXPERTS, **SMALL)
    out = model(torch.randn(3, 3, 32, 32))
    assert set(out) == set(TASKS)
    for t, y in out.items():
        assert y.shape == (3, NUM_OUTPUTS[t], 32, 32)


def test_all_tasks_run_as_one_backbone_batch():
    model = MultiTaskViT(experts=EXPERTS, **SMALL)
    calls = []
    model.vit.blocks[0].register_forward_hook(lambda m, i, o: calls.append(i[0].shape))
    model(torch.randn(2, 3, 32, 32))
    assert calls == [torch.Size([len(TASKS) * 2, 1 + 16, 48])], "one pass over tasks * B images"
    ids = model.vit.blocks[0].mlp._last[2]
    assert ids.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4], "task-major ids, one per image"


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
    for t in TASKS:
        torch.testing.assert_close(a[t], p[t], rtol=1e-5, atol=1e-5)


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
    assert stats["shared_gate"].shape == (2, len(TASKS)) and stats["load"].shape == (2, len(TASKS), 8)
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
