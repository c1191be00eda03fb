"""ase_kernels/convert.py on the families beyond timm's ViT, each built from its own small config (nothing downloads):
GPT-2 (transformers Conv1D), BERT and RoBERTa (the FFN split across two modules), and ConvNeXt (its 1x1-conv MLP
refused, the way out converted). Each converts, returns what it returned (bitwise, CPU path), trains only the
routers and experts, and round-trips its adapters, as the LLaMA test does."""

import pytest
import timm
import torch
from helpers import assert_close

import ase_kernels as ak
from ase_kernels.modules import adapter_parameters
from ase_kernels.split_ffn import ASESplitFFN, ASESplitFFNOutput

CONFIG = dict(num_experts=8, top_k=2, num_shared=1, rank=2, num_tasks=2)
IDS = torch.tensor([0, 0, 1, 1])  # one task per sequence or image
TOKENS = 12


def _converts_trains_and_round_trips(build, run, loss_of, tmp_path, **options):
    """build() -> a fresh model (seeded: the same 'pretrained' weights each call); run(model) -> its output;
    loss_of(model) -> a training loss. Returns the converted model."""
    torch.manual_seed(0)
    model = build().eval().requires_grad_(False)
    before = run(model)
    ak.convert(model, **CONFIG, **options)
    with ak.task_ids(model, IDS):
        assert torch.equal(run(model), before), "a fresh conversion returns what the model returned"
    adapters = adapter_parameters(model)
    assert adapters and {n for n, p in model.named_parameters() if p.requires_grad} == set(adapters)
    frozen = {n: p.clone() for n, p in model.state_dict().items() if n not in adapters}
    optimizer = torch.optim.AdamW(adapters.values(), lr=5e-2)
    losses = []
    for _ in range(8):
        with ak.task_ids(model, IDS):
            loss = loss_of(model) + 0.005 * sum(m.mi_loss() for m in ak.ase_modules(model))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    assert all(torch.equal(frozen[n], t) for n, t in model.state_dict().items() if n in frozen), "only ASE trains"
    assert all(p.abs().sum() > 0 for n, p in adapters.items() if n.endswith(".B")), "every expert bank trained"
    path = tmp_path / "adapters.safetensors"
    ak.save_adapters(model, path)
    torch.manual_seed(0)
    fresh = ak.load_adapters(build().eval(), path)
    with ak.task_ids(model, IDS), ak.task_ids(fresh, IDS):
        assert torch.equal(run(fresh), run(model))
    return model


def _tokens():
    return torch.randint(0, 64, (4, TOKENS), generator=torch.Generator().manual_seed(1))


def _lm(model):
    return model(_tokens()).logits


def _lm_loss(model):
    tokens = _tokens()
    return model(tokens, labels=tokens).loss


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=4))


@pytest.mark.parametrize("target,placement,kind", [
    pytest.param(None, None, ak.ASEFFN, id="mlp"),
    pytest.param(["mlp.c_fc", "mlp.c_proj"], None, ak.MoELoRALinear, id="conv1d-targets"),
    pytest.param([("mlp.c_fc", "mlp.c_proj")], "fc1+fc2", ASESplitFFN, id="pair-fc1+fc2"),
])
def test_gpt2_converts_trains_and_round_trips(tmp_path, target, placement, kind):
    options = {"target": target} | ({"placement": placement} if placement else {})
    gpt2 = _converts_trains_and_round_trips(_gpt2, _lm, _lm_loss, tmp_path, **options)
    mlp = gpt2.transformer.h[1].mlp
    module = mlp if kind is ak.ASEFFN else mlp.c_fc
    assert type(module) is kind
    assert type(gpt2.transformer.h[1].attn.c_attn).__name__ == "Conv1D", "attention stays as it was"
    if kind is not ak.ASEFFN:
        assert type(module.base).__name__ == "Conv1D" and module.base.weight.shape == (32, 128), "reused, not copied"


def _bert():
    from transformers import BertConfig, BertForMaskedLM

    return BertForMaskedLM(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=48, max_position_embeddings=16))


def _roberta():
    from transformers import RobertaConfig, RobertaForMaskedLM

    return RobertaForMaskedLM(RobertaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                            intermediate_size=48, max_position_embeddings=TOKENS + 2))


@pytest.mark.parametrize("build,target,placement", [
    pytest.param(_bert, None, "ffn", id="bert-recognised"),
    pytest.param(_bert, [("*.intermediate.dense", "*.output.dense")], "fc1+fc2", id="bert-pair-fc1+fc2"),
    pytest.param(_roberta, None, "ffn", id="roberta-recognised"),
])
def test_bert_style_split_ffns_convert_train_and_round_trip(tmp_path, build, target, placement):
    options = {"target": target} | ({"placement": placement} if placement != "ffn" else {})
    model = _converts_trains_and_round_trips(build, _lm, _lm_loss, tmp_path, **options)
    layers = [m for m in model.modules() if hasattr(m, "intermediate") and hasattr(m, "output")]
    assert len(layers) == 2
    for layer in layers:
        assert type(layer.intermediate.dense) is ASESplitFFN and layer.intermediate.dense.placement == placement
        assert type(layer.output.dense) is ASESplitFFNOutput and layer.output.dense.first is layer.intermediate.dense
        assert type(layer.attention.output.dense) is torch.nn.Linear, "the attention output is not the FFN's"
    assert sum(1 for _ in ak.ase_modules(model)) == len(layers)


def test_bert_split_ffns_survive_activation_checkpointing():
    """transformers' gradient checkpointing recomputes each layer inside backward: the first projection routes
    again with the ids of the forward recomputed, before the second takes its routing; two forwards, one backward."""
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=48, max_position_embeddings=16, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    bert = ak.convert(BertModel(config).requires_grad_(False), **CONFIG)
    for m in ak.ase_modules(bert):
        torch.nn.init.normal_(m.router, std=0.3), torch.nn.init.normal_(m.experts["ffn"].B, std=0.3)
    prefix = "activation" if hasattr(bert, "activation_checkpointing_enable") else "gradient"  # transformers 5 / 4
    grads = []
    for checkpointing in (False, True):
        getattr(bert, f"{prefix}_checkpointing_{'enable' if checkpointing else 'disable'}")()
        on = any(getattr(m, "gradient_checkpointing", False) for m in bert.modules())  # the layers' (or encoder's) flag
        assert on == checkpointing, "the comparison needs one run checkpointed and one not"
        bert.train().zero_grad()
        loss = 0
        for task in (1, 0):
            with ak.task_ids(bert, torch.full((4,), task)):
                loss = loss + (task + 1) * bert(_tokens()).last_hidden_state.square().mean()
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in adapter_parameters(bert).items()})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 2 * 3
    for name in grads[0]:
        assert_close(name, grads[0][name], grads[1][name])


def _convnext(conv_mlp: bool):
    # layer scale 1 as a trained model has it (timm initialises it at 1e-6, which would hide the experts' steps)
    return timm.create_model("convnext_atto", conv_mlp=conv_mlp, depths=(1, 1, 1, 1), dims=(16, 24, 32, 40),
                             ls_init_value=1.0, num_classes=5)


def test_convnext_conv_mlp_is_refused_by_name_and_the_way_out_converts(tmp_path):
    """1x1 convolutions on (B, C, H, W) are refused (no strided (tokens, C) view exists); conv_mlp=False runs the
    same MLP with nn.Linear on (B, H, W, C), takes the conv weights flattened, and converts."""
    torch.manual_seed(0)
    conv = _convnext(conv_mlp=True).eval().requires_grad_(False)
    for target in (None, ["stages.0.blocks.0.mlp"]):
        with pytest.raises(ValueError, match=r"1x1-convolution MLPs .*\(stages.0.blocks.0.mlp[,)].*conv_mlp=False"):
            ak.convert(conv, target=target, **CONFIG)
    assert not any(True for _ in ak.ase_modules(conv)), "a refusal converts nothing"
    state = {k: v.flatten(1) if ".mlp.fc" in k and v.dim() == 4 else v for k, v in conv.state_dict().items()}
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    labels = torch.tensor([0, 1, 2, 3])

    def build():
        model = _convnext(conv_mlp=False)
        model.load_state_dict(state)
        return model

    assert_close("conv_mlp=False, same weights", conv(images), build().eval()(images))
    model = _converts_trains_and_round_trips(build, lambda m: m(images),
                                            lambda m: torch.nn.functional.cross_entropy(m(images), labels), tmp_path)
    assert [type(b.mlp) for stage in model.stages for b in stage.blocks] == [ak.ASEMlp] * 4
