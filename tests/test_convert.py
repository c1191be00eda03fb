"""ase_kernels/convert.py: a model loaded the usual way, converted in place, returns what it returned."""

import warnings

import numpy as np
import pytest
import torch
from conftest import DEVICE
from helpers import assert_close, tiny_vit

import ase_kernels as ak
from ase_kernels.convert import convert_module

CONFIG = dict(num_experts=8, top_k=2, num_shared=1, rank=2)


def _vit():
    """A frozen tiny ViT, as a user converts it: only what convert adds trains."""
    return tiny_vit().requires_grad_(False)


def _equal_or_close(backend, name, want, got):
    """The torch path computes a fresh ASE module's base exactly as nn.Linear does; the fused kernels accumulate in
    another order, so they agree to fp32 rounding."""
    if backend == "torch":
        assert torch.equal(want, got), f"{name}: max diff {(want - got).abs().max()}"
    else:
        assert_close(name, want, got)


@pytest.fixture
def vit_checkpoint(tmp_path):
    """A small ViT's weights on disk, as a user's pretrained checkpoint would be."""
    path = tmp_path / "vit.pth"
    torch.save(tiny_vit().state_dict(), path)
    return str(path)


@pytest.mark.parametrize("load", ["checkpoint_path", "pretrained_cfg_overlay"])
def test_a_timm_loaded_vit_converts_and_returns_what_it_returned(backend, vit_checkpoint, load):
    if load == "checkpoint_path":
        vit = tiny_vit(checkpoint_path=vit_checkpoint)
    else:
        vit = tiny_vit(pretrained=True, pretrained_cfg_overlay=dict(file=vit_checkpoint))
    assert_close("loaded", torch.load(vit_checkpoint)["blocks.0.mlp.fc1.weight"], vit.blocks[0].mlp.fc1.weight)
    vit = vit.to(DEVICE).eval().requires_grad_(False)
    images = torch.randn(2, 3, 32, 32, device=DEVICE)
    before = vit(images)
    fc1 = vit.blocks[0].mlp.fc1.weight
    assert ak.convert(vit, num_tasks=5, **CONFIG) is vit
    mlps = [block.mlp for block in vit.blocks]
    assert all(type(m) is ak.ASEMlp and m._fused_ffn() for m in mlps)
    assert mlps[0].fc1.weight is fc1 and not fc1.requires_grad, "the weights are reused, frozen"
    trainable = {n for n, p in vit.named_parameters() if p.requires_grad}
    assert trainable == {f"blocks.{i}.mlp.{p}" for i in range(2) for p in ("router", "experts.ffn.A", "experts.ffn.B")}
    with ak.task_ids(vit, torch.tensor([4, 1], device=DEVICE)):
        _equal_or_close(backend, "logits", before, vit(images))


@pytest.mark.parametrize("options", [dict(placement="fc1+fc2", mode="naive", alpha=4.0),
                                     dict(num_experts=np.int64(8), top_k=np.int32(2), num_shared=np.int64(1),
                                          rank=np.int8(2), num_tasks=np.int64(2))], ids=["fc1+fc2-naive", "numpy-ints"])
def test_convert_passes_the_options_on(options):
    vit = ak.convert(_vit(), **{**CONFIG, **options})
    mlp = vit.blocks[1].mlp
    for key, value in options.items():
        assert getattr(mlp, key) == value and type(getattr(mlp, key)) in (int, float, str), key


def test_target_patterns_name_ffns_or_linears():
    vit = _vit()
    ak.convert(vit, target=["blocks.0.mlp", "blocks.1.mlp.fc*", "head"], **CONFIG)
    assert type(vit.blocks[0].mlp) is ak.ASEMlp
    assert type(vit.blocks[1].mlp.fc1) is ak.MoELoRALinear and type(vit.blocks[1].mlp.fc2) is ak.MoELoRALinear
    assert type(vit.head) is ak.MoELoRALinear
    assert sum(1 for _ in ak.ase_modules(vit)) == 4


@pytest.mark.parametrize("target,message", [
    pytest.param(["mlp", "nothing.here"], r"\['nothing.here'\] match no module", id="unknown"),
    pytest.param(["norm1"], r"blocks.0.norm1 \(LayerNorm: neither", id="not-convertible"),
    pytest.param(["blocks.0.mlp", "blocks.0.mlp.fc1"], r"ambiguous.*blocks.0.mlp.*blocks.0.mlp.fc1", id="nested"),
    pytest.param([3], "module-name patterns", id="not-a-string"),
])
def test_bad_targets_are_named(target, message):
    with pytest.raises((ValueError, TypeError), match=message):
        ak.convert(_vit(), target=target, **CONFIG)


def test_converting_twice_and_bad_options_are_errors():
    vit = ak.convert(_vit(), **CONFIG)
    with pytest.raises(ValueError, match=r"blocks.0.mlp.fc1 \(already converted\)"):
        ak.convert(vit, target=["fc1"], **CONFIG)
    with pytest.raises(ValueError, match="found no FFN"):
        ak.convert(vit, **CONFIG)
    with pytest.raises(TypeError, match=r"unknown options \['experts'\]"):
        ak.convert(tiny_vit(), experts=8)
    with pytest.raises(ValueError, match="placement applies to FFN modules, not to the Linear 'head'"):
        ak.convert(_vit(), target="head", placement="fc1", **CONFIG)
    with pytest.raises(TypeError, match="top_k must be an integer, got float 2.0"):
        ak.convert(_vit(), top_k=2.0)
    with pytest.raises(ValueError, match=r"the model itself \(Linear\) is not one"):
        convert_module(torch.nn.Linear(4, 4), "", CONFIG)


class GeluMLP(torch.nn.Module):
    """A d -> d FFN of two Linears that is no timm Mlp (GPT-2's MLP has this shape)."""

    def __init__(self, d, hidden):
        super().__init__()
        self.fc_in, self.fc_out = torch.nn.Linear(d, hidden), torch.nn.Linear(hidden, d)

    def forward(self, x):
        return self.fc_out(torch.nn.functional.gelu(self.fc_in(x)))


def test_placement_on_an_ffn_convert_can_only_wrap_names_the_way_to_lora_deltas():
    model = torch.nn.Sequential(torch.nn.ModuleDict({"mlp": GeluMLP(16, 40)}), SwiGLU(16, 24)).requires_grad_(False)
    with pytest.raises(ValueError, match=r"placement='fc1\+fc2' needs a timm Mlp with fc1/fc2 or a split FFN; '0.mlp' "
                                         r"is a GeluMLP, .*\(placement='ffn'\), or name its two projections as a pair: "
                                         r"target=\[\('mlp.fc_in', 'mlp.fc_out'\)\]$"):
        ak.convert(model, target="0.mlp", placement="fc1+fc2", **CONFIG)
    with pytest.raises(ValueError, match=r"'1' is a SwiGLU, whose experts can only sit beside it \(placement='ffn'\)$"):
        ak.convert(model, target="1", placement="fc2", **CONFIG)  # three Linears: no pair to name
    glu = GeluMLP(16, 40)
    glu.fc_in = torch.nn.Linear(16, 80)  # a GLU's fused gate and value (d -> 2 hidden): no chaining pair to name
    with pytest.raises(ValueError, match=r"\(placement='ffn'\)$"):
        ak.convert(torch.nn.ModuleDict({"mlp": glu}).requires_grad_(False), placement="fc1", **CONFIG)
    ak.convert(model, target=[("mlp.fc_in", "mlp.fc_out")], placement="fc1+fc2", **CONFIG)  # the way named converts
    assert type(model[0]["mlp"].fc_in).__name__ == "ASESplitFFN"


class SwiGLU(torch.nn.Module):
    """A LLaMA-style gated FFN: down(silu(gate(x)) * up(x)), d -> d."""

    def __init__(self, d, hidden):
        super().__init__()
        self.gate_proj, self.up_proj = torch.nn.Linear(d, hidden, bias=False), torch.nn.Linear(d, hidden, bias=False)
        self.down_proj = torch.nn.Linear(hidden, d, bias=False)

    def forward(self, x):
        return self.down_proj(torch.nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


def test_a_gated_ffn_gets_experts_beside_it(backend):
    model = torch.nn.Sequential(SwiGLU(16, 40), torch.nn.LayerNorm(16), SwiGLU(16, 24)).to(DEVICE).requires_grad_(False)
    x = torch.randn(3, 5, 16, device=DEVICE)
    before = model(x)
    ak.convert(model, num_tasks=3, **CONFIG)
    assert [type(m) for m in model] == [ak.ASEFFN, torch.nn.LayerNorm, ak.ASEFFN]
    ids = torch.tensor([2, 0, 1], device=DEVICE)
    with ak.task_ids(model, ids):
        assert torch.equal(model(x), before)
    # with trained experts: the wrapped FFN's output plus the routed expert sum of its input
    ffn = model[0]
    torch.nn.init.normal_(ffn.experts.B), torch.nn.init.normal_(ffn.router)
    routing = ak.route(x, ffn.router, ids, top_k=2, num_shared=1)
    want = ffn.base(x) + ak.moe_lora(x, ffn.experts.A, ffn.experts.B, routing)
    assert_close("y", want, ffn(x, task_ids=ids))


def test_a_llama_model_converts_trains_and_round_trips_its_adapters(tmp_path):
    """Beyond vision: the gated MLPs of a small random LLaMA (transformers, built from its config) get experts."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16)
    torch.manual_seed(0)
    llama = LlamaForCausalLM(config).eval().requires_grad_(False)
    tokens = torch.randint(0, 64, (4, 12))
    ids = torch.tensor([0, 0, 1, 1])  # one task per sequence
    before = llama(tokens).logits
    ak.convert(llama, num_tasks=2, **CONFIG)
    assert [type(layer.mlp) for layer in llama.model.layers] == [ak.ASEFFN, ak.ASEFFN]
    with ak.task_ids(llama, ids):
        assert torch.equal(llama(tokens).logits, before)
    trainable = [p for p in llama.parameters() if p.requires_grad]
    assert len(trainable) == 2 * 3  # router, A, B per layer
    optimizer = torch.optim.AdamW(trainable, lr=3e-2)
    losses = []
    for _ in range(8):
        with ak.task_ids(llama, ids):
            loss = llama(tokens, labels=tokens).loss
        loss = loss + 0.005 * sum(m.mi_loss() for m in ak.ase_modules(llama))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses
    path = tmp_path / "llama-ase.safetensors"
    ak.save_adapters(llama, path)
    torch.manual_seed(0)
    fresh = ak.load_adapters(LlamaForCausalLM(config).eval(), path)
    with ak.task_ids(llama, ids), ak.task_ids(fresh, ids):
        assert torch.equal(fresh(tokens).logits, llama(tokens).logits)


def test_a_converted_model_compiles_fullgraph(backend):
    model = torch.nn.Sequential(SwiGLU(16, 40), torch.nn.LayerNorm(16)).to(DEVICE).requires_grad_(False)
    model = ak.convert(model, num_tasks=2, **CONFIG)
    torch.nn.init.normal_(model[0].experts.B)
    x, ids = torch.randn(2, 5, 16, device=DEVICE), torch.tensor([0, 1], device=DEVICE)
    with ak.task_ids(model, ids):
        assert_close("y", model(x), torch.compile(model, fullgraph=True)(x))


def _bert_like(layers=2, d=16, hidden=40):
    """The module layout of a BERT encoder (no forward needed): attention.output.dense, intermediate.dense and
    output.dense in each layer, registered in that order."""
    model = torch.nn.Module()
    model.layer = torch.nn.ModuleList()
    for _ in range(layers):
        layer = torch.nn.Module()
        for name, shape in (("attention", (d, d)), ("intermediate", (d, hidden)), ("output", (hidden, d))):
            part = torch.nn.Module()
            part.dense = torch.nn.Linear(*shape)
            if name == "attention":
                layer.attention = torch.nn.Module()
                layer.attention.output = part
            else:
                setattr(layer, name, part)
        model.layer.append(layer)
    return model.requires_grad_(False)


@pytest.mark.parametrize("target", [None, [("*.intermediate.dense", "*.output.dense")],
                                    [("layer.*.intermediate.dense", "output.dense")]], ids=["none", "pair", "suffix"])
def test_split_ffns_are_paired_with_the_next_second_module(target):
    """'*.output.dense' also matches attention.output.dense, which comes before each layer's intermediate.dense:
    the pair is each first match and the next second match after it."""
    from ase_kernels.split_ffn import ASESplitFFN, ASESplitFFNOutput

    model = ak.convert(_bert_like(), target=target, placement="fc1+fc2", **CONFIG)
    for layer in model.layer:
        assert type(layer.intermediate.dense) is ASESplitFFN and layer.intermediate.dense.placement == "fc1+fc2"
        assert type(layer.output.dense) is ASESplitFFNOutput and layer.output.dense.first is layer.intermediate.dense
        assert type(layer.attention.output.dense) is torch.nn.Linear
    with pytest.raises(ValueError, match="found no FFN"):  # converted pairs are not recognised again
        ak.convert(model, **CONFIG)
    with pytest.raises(ValueError, match=r"layer.0.output.dense \(already converted\)"):
        ak.convert(model, target=["layer.0.output.dense"], **CONFIG)


class _EncoderFFN(torch.nn.Module):
    """An FFN by its class name whose Linears sit as a BERT layer's do: converted whole, its pair left inside."""

    def __init__(self):
        super().__init__()
        self.intermediate, self.output = torch.nn.Module(), torch.nn.Module()
        self.intermediate.dense, self.output.dense = torch.nn.Linear(16, 40), torch.nn.Linear(40, 16)

    def forward(self, x):
        return x + self.output.dense(torch.relu(self.intermediate.dense(x)))


def test_a_split_pair_inside_a_recognised_ffn_is_converted_with_it():
    model = ak.convert(torch.nn.Sequential(_EncoderFFN()).requires_grad_(False), **CONFIG)
    assert type(model[0]) is ak.ASEFFN and type(model[0].base.intermediate.dense) is torch.nn.Linear


@pytest.mark.parametrize("target,message", [
    pytest.param([("intermediate.dense", "attention.output.dense")],
                 r"\(layer.0.intermediate.dense, layer.1.attention.output.dense\) \(the first maps to 40 features, the "
                 r"second takes 16\).*layer.1.intermediate.dense \(no module matching 'attention.output.dense' follows",
                 id="misfit"),
    pytest.param([("intermediate.dense", "nothing")], r"\['nothing'\] match no module", id="unknown"),
    pytest.param(["layer.0.output.dense", ("intermediate.dense", "output.dense")], r"the same module twice "
                 r"\['layer.0.output.dense'\]", id="twice"),
    pytest.param([("intermediate.dense", "output.dense", "x")], "or pairs of them", id="triple"),
    pytest.param([["intermediate.dense", "output.dense"]], r"pairs of them as tuples \(first, second\)", id="list"),
])
def test_bad_pairs_are_named(target, message):
    with pytest.raises((ValueError, TypeError), match=message):
        ak.convert(_bert_like(), target=target, **CONFIG)


def test_convert_warns_once_about_trainable_parameters_it_leaves_outside():
    with pytest.warns(UserWarning) as record:
        ak.convert(tiny_vit(), **CONFIG)
    messages = [str(w.message) for w in record]
    assert len(messages) == 1 and "\n" not in messages[0], messages
    assert record[0].filename == __file__, "the warning points at the caller's line (once per line, Python's default)"
    left = [p for n, p in tiny_vit().named_parameters() if ".mlp.fc" not in n]  # convert froze fc1 and fc2 only
    assert messages[0].startswith(f"{sum(p.numel() for p in left):,} parameters in {len(left)} tensors outside the ASE "
                                  f"modules still require grad (cls_token, pos_embed, patch_embed.proj.weight and "
                                  f"{len(left) - 3} more)"), messages[0]
    assert "freeze them first" in messages[0] and "extra=" in messages[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a frozen backbone: nothing to say
        ak.convert(_vit(), **CONFIG)
