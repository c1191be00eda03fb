"""ase_kernels/split_ffn.py and MoELoRALinear on transformers' Conv1D: the ASE FFN whose projections are two modules,
and GPT-2's transposed weights read through their strides, checked against the float64 reference."""

import copy

import pytest
import torch
from conftest import DEVICE
from helpers import assert_close
from transformers.pytorch_utils import Conv1D

import ase_kernels as ak
from ase_kernels import reference
from ase_kernels.modules import linear_weight
from ase_kernels.split_ffn import ASESplitFFN, ASESplitFFNOutput

CONFIG = dict(num_experts=8, top_k=2, num_shared=1, rank=2)
D, HIDDEN = 12, 40  # odd widths on purpose


def _projection(kind: str, d_in: int, d_out: int) -> torch.nn.Module:
    """An nn.Linear, or transformers' Conv1D (weight stored (d_in, d_out)) with a non-zero bias."""
    layer = torch.nn.Linear(d_in, d_out) if kind == "Linear" else Conv1D(d_out, d_in)
    torch.nn.init.normal_(layer.bias, std=0.1)
    return layer.to(DEVICE)


def _randomise(module: torch.nn.Module) -> None:
    """B and the routers start at zero; give them values so the experts and the routing count."""
    torch.nn.init.normal_(module.router, std=0.3)
    for p in module.parameters():
        if p.requires_grad and p.dim() == 3 and p is not module.router:
            torch.nn.init.normal_(p, std=0.3)


def _weight64(layer: torch.nn.Module) -> torch.Tensor:
    w = layer.weight.detach().double()
    return w if isinstance(layer, torch.nn.Linear) else w.T


def _reference_pair(first: ASESplitFFN, fc1, fc2, x, ids):
    """The split ASE FFN of x with the reference ops in float64: one routing, from the FFN input."""
    x64 = x.detach().cpu().double().requires_grad_()
    p = {n: t.detach().cpu().double().requires_grad_() for n, t in first.named_parameters() if t.requires_grad}
    (w1, b1), (w2, b2) = ((_weight64(fc).cpu(), fc.bias.detach().cpu().double()) for fc in (fc1, fc2))
    r = reference.route(x64, p["router"], ids.cpu(), top_k=first.top_k, num_shared=first.num_shared)

    def experts(name, inp, base_input, w, b):
        return reference.moe_lora(inp, p[f"experts.{name}.A"], p[f"experts.{name}.B"], r, first.scale,
                                  base_input=base_input, base_weight=w, base_bias=b)

    h = experts("fc1", x64, x64, w1, b1) if "fc1" in first.experts else x64 @ w1.T + b1
    h = torch.nn.functional.gelu(h)
    if "ffn" in first.experts:
        y = experts("ffn", x64, h, w2, b2)
    elif "fc2" in first.experts:
        y = experts("fc2", h, h, w2, b2)
    else:
        y = h @ w2.T + b2
    return y, x64, p


def _gradients_match(y, want, x, x64, module, p) -> None:
    """One random d_y through y and through its float64 reference want (built from x64 and the copies p of module's
    trainable parameters): x and each trainable parameter get the reference's gradient."""
    d_y = torch.randn_like(y)
    y.backward(d_y)
    want.backward(d_y.cpu().double())
    assert_close("d_x", x64.grad, x.grad)
    for name, t in module.named_parameters():
        if t.requires_grad:
            assert_close(f"d_{name}", p[name].grad, t.grad)


@pytest.mark.parametrize("placement,kind", [("ffn", "Conv1D"), ("fc1+fc2", "Linear"), ("fc1+fc2", "Conv1D"),
                                             ("fc1", "Conv1D")])
def test_a_split_pair_is_one_ase_ffn_with_one_routing(backend, placement, kind):
    fc1, fc2 = _projection(kind, D, HIDDEN), _projection(kind, HIDDEN, D)
    first = ASESplitFFN(fc1, D, placement=placement, num_tasks=2, alpha=3.0, **CONFIG)
    second = ASESplitFFNOutput(fc2, first)
    _randomise(first)
    x = torch.randn(2, 7, D, device=DEVICE, requires_grad=True)
    ids = torch.tensor([1, 0], device=DEVICE)
    y = second(torch.nn.functional.gelu(first(x, ids)))
    want, x64, p = _reference_pair(first, fc1, fc2, x, ids.repeat_interleave(7))
    assert_close("y", want, y)
    _gradients_match(y, want, x, x64, first, p)
    assert fc1.weight.grad is None and fc2.weight.grad is None, "the projections are frozen"


def test_moe_lora_linear_takes_a_conv1d_as_its_transposed_weight(backend):
    """GPT-2's Conv1D: the ops get weight.T, a view of the frozen tensor (no copy), forward and backward."""
    conv = _projection("Conv1D", D, HIDDEN)
    layer = ak.MoELoRALinear(conv, num_tasks=2, **CONFIG)
    assert layer.base is conv and not conv.weight.requires_grad, "the Conv1D itself, frozen"
    view = linear_weight(conv)
    assert view.shape == (HIDDEN, D) and view.data_ptr() == conv.weight.data_ptr() and view.stride() == (1, HIDDEN), \
        "the kernels get the stored (d_in, d_out) tensor as a strided view, not a contiguous copy"
    x = torch.randn(3, 5, D, device=DEVICE)
    ids = torch.tensor([0, 1, 1], device=DEVICE)
    assert_close("fresh", conv(x), layer(x, ids))
    _randomise(layer)
    x.requires_grad_()
    y = layer(x, ids)
    x64 = x.detach().cpu().double().requires_grad_()
    p = {n: t.detach().cpu().double().requires_grad_() for n, t in layer.named_parameters() if t.requires_grad}
    r = reference.route(x64, p["router"], ids.cpu().repeat_interleave(5), top_k=2, num_shared=1)
    want = reference.moe_lora(x64, p["experts.A"], p["experts.B"], r, layer.scale, base_input=x64,
                              base_weight=_weight64(conv).cpu(), base_bias=conv.bias.detach().cpu().double())
    assert_close("y", want, y)
    _gradients_match(y, want, x, x64, layer, p)


def test_the_second_projection_needs_the_first_forward_of_the_same_tokens():
    first = ASESplitFFN(torch.nn.Linear(D, HIDDEN), D, **CONFIG)
    second = ASESplitFFNOutput(torch.nn.Linear(HIDDEN, D), first)
    with pytest.raises(RuntimeError, match="without a forward of its first projection .*: call the first on the "
                                           r"same tokens before each call of the second, in one forward \(or one"):
        second(torch.randn(4, HIDDEN))
    first(torch.randn(4, D))
    with pytest.raises(ValueError, match=r"tokens of the first projection's input \(4,\), got shape \(5, 40\)"):
        second(torch.randn(5, HIDDEN))
    first(torch.randn(4, D))
    second(torch.randn(4, HIDDEN))
    with pytest.raises(RuntimeError, match="without a forward"):  # each forward of the first is taken once
        second(torch.randn(4, HIDDEN))
    with pytest.raises(TypeError, match="nn.Linear or a transformers Conv1D, got Conv2d"):
        ASESplitFFN(torch.nn.Conv2d(D, HIDDEN, 1), D, **CONFIG)
    with pytest.raises(TypeError, match="first must be an ASESplitFFN, got Linear"):
        ASESplitFFNOutput(torch.nn.Linear(HIDDEN, D), torch.nn.Linear(D, HIDDEN))


def test_the_pair_copies_after_a_training_forward_and_registers_the_experts_once():
    block = torch.nn.Module()
    block.fc1 = ASESplitFFN(torch.nn.Linear(D, HIDDEN), D, placement="fc1+fc2", **CONFIG)
    block.fc2 = ASESplitFFNOutput(torch.nn.Linear(HIDDEN, D), block.fc1)
    block.fc1(torch.randn(3, D, requires_grad=True))  # the handoff now holds graph tensors
    clone = copy.deepcopy(block)
    assert clone.fc2.first is clone.fc1 and clone.fc1._handoff.value is None
    names = [n for n, _ in block.named_parameters(remove_duplicate=False)]
    assert "fc1.router" in names and not any(n.startswith("fc2.first") for n in names), names


def test_the_docstring_example_runs(monkeypatch):
    import doctest

    import ase_kernels.split_ffn

    monkeypatch.delenv("ASE_KERNELS_BACKEND", raising=False)
    result = doctest.testmod(ase_kernels.split_ffn, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0, result


class _Encoder(torch.nn.Module):
    """A BERT-style FFN: the residual after the second projection, as BertOutput has it."""

    def __init__(self):
        super().__init__()
        self.intermediate, self.output = torch.nn.Linear(D, HIDDEN), torch.nn.Linear(HIDDEN, D)

    def forward(self, x):
        return x + self.output(torch.nn.functional.gelu(self.intermediate(x)))


def test_a_split_pair_compiles_fullgraph():
    model = ak.convert(_Encoder().requires_grad_(False), target=[("intermediate", "output")], num_tasks=2, **CONFIG)
    _randomise(model.intermediate)
    x, ids = torch.randn(2, 5, D), torch.tensor([1, 0])
    with ak.task_ids(model, ids):
        want = model(x)
        assert_close("y", want, torch.compile(model, fullgraph=True)(x))


@pytest.mark.parametrize("how", ["chunked", "reentrant", "non-reentrant"])
def test_the_handoff_survives_chunking_and_activation_checkpointing(how):
    """The second projection takes the routing of the first's last forward: the tokens in chunks (transformers'
    apply_chunking_to_forward runs the pair chunk by chunk) and checkpointing (the first runs again inside backward,
    after the task_ids block, before the second) give what one plain forward gives, and keep nothing afterwards."""
    model = ak.convert(_Encoder().requires_grad_(False), target=[("intermediate", "output")], placement="fc1+fc2",
                       num_tasks=2, **CONFIG)
    _randomise(model.intermediate)
    x, ids = torch.randn(2, 6, D, requires_grad=True), torch.tensor([1, 0])
    d_y = torch.randn(2, 6, D)

    def run(how):
        x.grad = None
        model.zero_grad()
        with ak.task_ids(model, ids):
            if how == "chunked":
                y = torch.cat([model(chunk) for chunk in x.split(4, dim=1)], dim=1)  # 4 then 2 tokens per sequence
            elif how == "plain":
                y = model(x)
            else:
                y = torch.utils.checkpoint.checkpoint(model, x, use_reentrant=how == "reentrant")
        y.backward(d_y)
        assert model.intermediate._handoff.value is None, "the second took what the first left"
        return {"y": y.detach(), "d_x": x.grad} | {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    want, got = run("plain"), run(how)
    assert len(want) == 2 + 5  # y, d_x, the router and two expert banks of A and B
    for name in want:
        assert_close(name, want[name], got[name])
