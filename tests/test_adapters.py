"""ase_kernels/adapters.py: only routers and experts go to disk, with their options; loading checks everything."""

import json

import pytest
import torch
from helpers import tiny_vit
from safetensors import safe_open
from safetensors.torch import save_file

import ase_kernels as ak
from ase_kernels.modules import adapter_parameters
from ase_kernels.split_ffn import ASESplitFFN, ASESplitFFNOutput

CONFIG = dict(num_experts=8, top_k=2, num_shared=1, rank=2, num_tasks=3)
IDS = torch.tensor([2, 0])


def _vit(seed=0):
    torch.manual_seed(seed)  # the same seed, the same "pretrained" base weights
    return tiny_vit().eval().requires_grad_(False)  # a frozen backbone: only the adapters train


def _trained(model):
    """Give every router and expert values, as training would."""
    with torch.no_grad():
        for m in ak.ase_modules(model):
            for name, p in m.named_parameters():
                if name == "router" or name.startswith("experts."):
                    p.normal_(std=0.3)
    return model


def _out(model, images):
    with ak.task_ids(model, IDS):
        return model(images)


@pytest.mark.parametrize("target", [None, ["blocks.0.mlp", "blocks.1.attn.proj", "head"]], ids=["ffns", "mixed"])
@pytest.mark.parametrize("into", ["plain", "converted"])
def test_round_trip_reproduces_the_outputs_exactly(tmp_path, target, into):
    vit = _trained(ak.convert(_vit(), target=target, alpha=3.0, **CONFIG))
    images = torch.randn(2, 3, 32, 32)
    path = tmp_path / "ase.safetensors"
    ak.save_adapters(vit, path)
    fresh = _vit() if into == "plain" else ak.convert(_vit(), target=target, alpha=3.0, **CONFIG)
    assert ak.load_adapters(fresh, path) is fresh
    assert torch.equal(_out(vit, images), _out(fresh, images))


def test_the_file_holds_only_routers_and_experts_and_their_options(tmp_path):
    vit = ak.convert(_vit(), placement="fc1+fc2", mode="naive", **CONFIG)
    path = tmp_path / "ase.safetensors"
    ak.save_adapters(vit, path)
    with safe_open(path, framework="pt") as f:
        keys, metadata = set(f.keys()), f.metadata()
    assert keys == {f"blocks.{i}.mlp.{p}" for i in range(2)
                    for p in ("router", "experts.fc1.A", "experts.fc1.B", "experts.fc2.A", "experts.fc2.B")}
    assert metadata["format"] == "ase_kernels.adapters" and metadata["version"] == "1"
    assert json.loads(metadata["modules"])["blocks.1.mlp"] == {
        "type": "ASEMlp", "options": dict(CONFIG, alpha=2.0, mode="naive", placement="fc1+fc2")}


def test_mismatched_options_names_and_shapes_are_refused_by_name(tmp_path):
    path = tmp_path / "ase.safetensors"
    ak.save_adapters(ak.convert(_vit(), **CONFIG), path)
    with pytest.raises(ValueError, match=r"other ASE options: \['blocks.0.mlp: top_k file 2, model 3', 'blocks.1"):
        ak.load_adapters(ak.convert(_vit(), **{**CONFIG, "top_k": 3}), path)
    with pytest.raises(ValueError, match=r"in the file only \['blocks.1.mlp'\], in the model only \['head'\]"):
        ak.load_adapters(ak.convert(_vit(), target=["blocks.0.mlp", "head"], **CONFIG), path)
    wide = tiny_vit(embed_dim=96, num_heads=3, num_classes=1000)  # timm's default head
    with pytest.raises(ValueError, match=r"shapes \['blocks.0.mlp.router: file \(3, 8, 192\), model \(3, 8, 96\)"):
        ak.load_adapters(wide, path)
    shallow = tiny_vit(depth=1, num_classes=1000)
    with pytest.raises(ValueError, match=r"modules that VisionTransformer lacks: \['blocks.1.mlp'\]"):
        ak.load_adapters(shallow, path)


def test_files_that_are_not_adapters_and_models_without_adapters_are_refused(tmp_path):
    path = tmp_path / "weights.safetensors"
    save_file({"w": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="not an ase_kernels adapter file"):
        ak.load_adapters(_vit(), path)
    with pytest.raises(ValueError, match="has no ASE modules to save"):
        ak.save_adapters(_vit(), path)


def test_trainable_parameters_outside_the_adapters_are_never_dropped_silently(tmp_path):
    vit = ak.convert(_vit(), **CONFIG)
    vit.head.requires_grad_(True)  # a head trained beside the experts
    path = tmp_path / "ase.safetensors"
    with pytest.raises(ValueError, match=r"1,930 trainable parameters in 2 tensors outside the ASE modules, which the "
                                         r"adapter file would leave out: head.weight, head.bias. Freeze them .*"
                                         r"extra=\[...\] \(e.g. extra=\['head.\*'\]\)"):
        ak.save_adapters(vit, path)
    with pytest.warns(UserWarning, match="outside the ASE modules still require grad"):
        many = ak.convert(tiny_vit().eval(), **CONFIG)  # nothing frozen: the first five are named, and how many more
    with pytest.raises(ValueError, match=r"in 24 tensors .*: cls_token, .*, blocks.0.norm1.weight and 19 more"):
        ak.save_adapters(many, path)
    with pytest.raises(ValueError, match=r"extra patterns \['heads.\*'\] match no parameter"):
        ak.save_adapters(vit, path, extra=["head.*", "heads.*"])
    assert not path.exists(), "a refusal writes nothing"


def test_extra_parameters_are_saved_restored_and_checked(tmp_path):
    vit = _trained(ak.convert(_vit(), **CONFIG))
    with torch.no_grad():
        vit.head.weight.normal_(), vit.head.bias.normal_()
    vit.head.requires_grad_(True)
    path = tmp_path / "ase.safetensors"
    ak.save_adapters(vit, path, extra=["head.*"])
    with safe_open(path, framework="pt") as f:
        assert {"head.weight", "head.bias"} <= set(f.keys()) and json.loads(f.metadata()["extra"]) == [
            "head.weight", "head.bias"]
    fresh = ak.load_adapters(_vit(), path)
    assert torch.equal(fresh.head.weight, vit.head.weight)
    images = torch.randn(2, 3, 32, 32)
    assert torch.equal(_out(vit, images), _out(fresh, images))
    seven = tiny_vit(num_classes=7)
    with pytest.raises(ValueError, match=r"extra parameters that do not fit VisionTransformer: \['head.weight: file "
                                         r"\(10, 192\), model \(7, 192\)', 'head.bias: file \(10,\), model \(7,\)'\]"):
        ak.load_adapters(seven, path)
    experts = [p for n, p in adapter_parameters(seven).items() if n.endswith(".B")]
    assert experts and not any(p.any() for p in experts), "left converted, its experts fresh: nothing loaded"
    with pytest.raises(ValueError, match=r"\['head.weight: not in the model', 'head.bias: not in the model'\]"):
        ak.load_adapters(tiny_vit(num_classes=0), path)


def test_a_split_ffn_file_names_its_second_projection(tmp_path):
    from test_convert import _bert_like

    model = ak.convert(_bert_like(), **CONFIG)
    path = tmp_path / "ase.safetensors"
    ak.save_adapters(model, path)
    with safe_open(path, framework="pt") as f:
        spec = json.loads(f.metadata()["modules"])["layer.1.intermediate.dense"]
    assert spec == {"type": "ASESplitFFN", "options": dict(CONFIG, alpha=2.0, mode="adaptive", placement="ffn"),
                    "output": "layer.1.output.dense"}
    other = ak.convert(_bert_like(), target=[("intermediate.dense", "output.dense")], placement="fc2", **CONFIG)
    with pytest.raises(ValueError, match=r"layer.0.intermediate.dense: placement file 'ffn', model 'fc2'"):
        ak.load_adapters(other, path)
    narrow = _bert_like()
    narrow.layer[0].output.dense = torch.nn.Linear(24, 16)
    message = r"layer.0.intermediate.dense: the file has a split FFN ending at layer.0.output.dense, but the first "
    with pytest.raises(ValueError, match=message + "maps to 40 features, the second takes 24"):
        ak.load_adapters(narrow, path)
    alone = torch.nn.Module()
    alone.fc1 = ASESplitFFN(torch.nn.Linear(16, 40), 16, **CONFIG)
    ASESplitFFNOutput(torch.nn.Linear(40, 16), alone.fc1)  # its second projection outside the model saved
    with pytest.raises(ValueError, match=r"split FFNs \['fc1'\] have no ASESplitFFNOutput inside Module"):
        ak.save_adapters(alone, tmp_path / "alone.safetensors")
    shallow = _bert_like()
    del shallow.layer[1].output
    with pytest.raises(ValueError, match=r"modules that Module lacks: \['layer.1.output.dense'\]"):
        ak.load_adapters(shallow, path)
