"""ase_kernels/modules.py: MoELoRALinear and ASEMlp, alone and inside a timm ViT."""

import functools

import pytest
import timm
import torch
from conftest import DEVICE
from helpers import assert_close, tiny_vit
from timm.layers import Mlp

import ase_kernels as ak
from ase_kernels import reference
from ase_kernels.checks import Routing

CONFIG = dict(num_experts=16, top_k=3, num_shared=1, rank=4)


def _randomise_experts(module):
    """B starts at zero; give it values so the experts contribute."""
    for experts in module.modules():
        if isinstance(experts, ak.LoRAExperts):
            torch.nn.init.normal_(experts.B, std=0.2)
    if hasattr(module, "router"):
        torch.nn.init.normal_(module.router, std=0.3)


@pytest.mark.parametrize("placement", ak.PLACEMENTS)
def test_fresh_asemlp_equals_timm_mlp(backend, placement):
    mlp = Mlp(24, 48).to(DEVICE)
    ase = ak.ASEMlp(24, 48, placement=placement, num_tasks=2, **CONFIG).to(DEVICE)
    missing, unexpected = ase.load_state_dict(mlp.state_dict(), strict=False)
    assert not unexpected and all(k.startswith(("router", "experts")) for k in missing)
    x = torch.randn(3, 7, 24, device=DEVICE)
    assert_close("y", mlp(x), ase(x, torch.tensor([0, 1, 1], device=DEVICE)))


def test_fresh_moe_lora_linear_equals_its_base(backend):
    base = torch.nn.Linear(20, 30).to(DEVICE)
    layer = ak.MoELoRALinear(base, num_tasks=3, **CONFIG)
    x = torch.randn(2, 9, 20, device=DEVICE)
    assert_close("y", base(x), layer(x, torch.tensor([2, 0], device=DEVICE)))
    assert not base.weight.requires_grad, "the wrapped base layer must be frozen"


def _reference_asemlp(mlp: ak.ASEMlp, x, ids):
    """The ASE FFN written with the reference ops, one placement at a time."""
    x64 = x.double()
    w = {k: v.double() for k, v in mlp.state_dict().items()}
    r = reference.route(x64, w["router"], ids, top_k=mlp.top_k, num_shared=mlp.num_shared, mode=mlp.mode)
    r = Routing(r.indices, r.gates, r.prob_sums)

    def experts(name, inp, base_inp, base):
        return reference.moe_lora(inp, w[f"experts.{name}.A"], w[f"experts.{name}.B"], r, mlp.scale,
                                  base_input=base_inp, base_weight=w[f"{base}.weight"], base_bias=w[f"{base}.bias"])

    h = experts("fc1", x64, x64, "fc1") if "fc1" in mlp.experts else x64 @ w["fc1.weight"].T + w["fc1.bias"]
    h = torch.nn.functional.gelu(h)
    if "ffn" in mlp.experts:
        return experts("ffn", x64, h, "fc2")
    if "fc2" in mlp.experts:
        return experts("fc2", h, h, "fc2")
    return h @ w["fc2.weight"].T + w["fc2.bias"]


@pytest.mark.parametrize("placement", ak.PLACEMENTS)
@pytest.mark.parametrize("mode", ["adaptive", "naive"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_asemlp_matches_reference(backend, placement, mode, dtype):
    """The module in its parameters' dtype against the float64 reference on the same (rounded) parameters; every
    gradient of every placement in bf16 is in tests/test_gpu.py."""
    ase = ak.ASEMlp(24, 40, placement=placement, mode=mode, num_tasks=2, alpha=8, **CONFIG).to(DEVICE)
    _randomise_experts(ase)
    ase = ase.to(dtype)
    x = torch.randn(2, 11, 24, device=DEVICE, dtype=dtype)
    ids = torch.tensor([1, 0])
    y = ase(x, ids.to(DEVICE))
    assert y.dtype == dtype
    assert_close("y", _reference_asemlp(ase, x.cpu(), ids.repeat_interleave(11)), y)


def test_asemlp_trains_every_parameter(backend):
    ase = ak.ASEMlp(16, 32, placement="fc1+fc2", num_tasks=2, **CONFIG).to(DEVICE)
    _randomise_experts(ase)
    ase.fc1.requires_grad_(False), ase.fc2.requires_grad_(False)
    y = ase(torch.randn(2, 5, 16, device=DEVICE), torch.tensor([0, 1], device=DEVICE))
    (y.square().mean() + 0.005 * ase.mi_loss()).backward()
    for name, p in ase.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} got no gradient"
    assert ase.fc1.weight.grad is None and ase.fc2.weight.grad is None


def test_timm_vit_with_ase_mlp_and_task_ids_context(backend):
    mlp = functools.partial(ak.ASEMlp, num_tasks=2, **CONFIG)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, num_classes=0, mlp_layer=mlp)
    vit = vit.to(DEVICE)
    assert sum(1 for _ in ak.ase_modules(vit)) == len(vit.blocks)
    images = torch.randn(2, 3, 32, 32, device=DEVICE)
    with ak.task_ids(vit, torch.tensor([0, 1], device=DEVICE)):
        out = vit(images)
    assert out.shape == (2, 192)
    assert all(m._task_ids is None for m in ak.ase_modules(vit)), "the context must clear the ids"
    with pytest.raises(ValueError, match="task_ids is required"):
        vit(images)


def test_routing_stats_of_a_fresh_router(backend):
    """Zero routers: every token takes sparse experts 0..k-1 and the shared ones, adaptive gates 1/(k+S)."""
    ase = ak.ASEMlp(16, 32, num_tasks=3, **CONFIG).to(DEVICE)
    ase(torch.randn(4, 5, 16, device=DEVICE), torch.tensor([0, 0, 2, 2], device=DEVICE))
    stats = ase.routing_stats()
    k, s, n = CONFIG["top_k"], CONFIG["num_shared"], CONFIG["num_experts"]
    expected_load = torch.zeros(n)
    expected_load[:k] = 1
    expected_load[n - s:] = 1
    assert_close("load", torch.stack([expected_load, torch.zeros(n), expected_load]), stats["load"])
    assert_close("shared_gate", torch.tensor([s / (k + s), 0.0, s / (k + s)]), stats["shared_gate"])


def test_asemlp_under_torch_compile(backend):
    ase = ak.ASEMlp(16, 32, placement="ffn", num_tasks=2, **CONFIG).to(DEVICE)
    _randomise_experts(ase)
    x = torch.randn(3, 4, 16, device=DEVICE)
    ids = torch.tensor([0, 1, 1], device=DEVICE)
    compiled = torch.compile(ase, fullgraph=True)
    assert_close("y", ase(x, ids), compiled(x, ids))
    assert compiled.last_prob_sums is not None


def test_extra_repr_names_the_configuration():
    text = repr(ak.ASEMlp(8, 16, num_experts=8, top_k=2, num_shared=1, rank=2, placement="fc1"))
    assert "placement='fc1'" in text and "num_experts=8, top_k=2, num_shared=1, rank=2" in text


@pytest.mark.parametrize("variant", ["gelu-tanh", "dropout-training", "norm"])
def test_asemlp_unfused_ffn_paths_match_the_fused_one(backend, variant):
    """Anything between fc1 and fc2 other than an exact GELU takes the unfused path; with that thing neutral
    (a tanh GELU, dropout while training, a norm) the output must equal the composition of the public ops."""
    kwargs = dict(num_tasks=2, **CONFIG)
    if variant == "gelu-tanh":
        kwargs["act_layer"] = functools.partial(torch.nn.GELU, approximate="tanh")
    elif variant == "norm":
        kwargs["norm_layer"] = torch.nn.LayerNorm
    else:
        kwargs["drop"] = (0.5, 0.0)  # dropout between fc1 and fc2 only
    ase = ak.ASEMlp(16, 32, **kwargs).to(DEVICE)
    _randomise_experts(ase)
    assert not ase._fused_ffn()
    x, ids = torch.randn(2, 5, 16, device=DEVICE), torch.tensor([0, 1], device=DEVICE)
    routing = ak.route(x, ase.router, ids, top_k=ase.top_k, num_shared=ase.num_shared)
    torch.manual_seed(1)
    h = ase.norm(ase.drop1(ase.act(ase.fc1(x))))
    want = ak.moe_lora(x, ase.experts["ffn"].A, ase.experts["ffn"].B, routing, ase.scale, base_input=h,
                       base_weight=ase.fc2.weight, base_bias=ase.fc2.bias)
    torch.manual_seed(1)
    assert_close("y", want, ase(x, ids))


def test_a_module_copies_and_pickles_after_a_training_forward(backend):
    """The last forward's routing tensors belong to an autograd graph: copies start without them."""
    import copy
    import io

    ase = ak.ASEMlp(16, 32, num_tasks=2, **CONFIG).to(DEVICE)
    ase(torch.randn(2, 3, 16, device=DEVICE, requires_grad=True), torch.tensor([0, 1], device=DEVICE))
    clone = copy.deepcopy(ase)
    assert clone.last_prob_sums is None and ase.last_prob_sums is not None
    torch.save(ase, io.BytesIO())
    assert_close("router", ase.router, clone.router)


def _checkpointed_vit_grads(vit, images, ids, how: str, checkpointing: bool) -> dict[str, torch.Tensor]:
    """Gradients of a loss of the ViT's features, with backward called AFTER the task_ids block has exited."""
    vit.zero_grad()
    vit.set_grad_checkpointing(checkpointing and how == "timm")
    with ak.task_ids(vit, ids):
        if checkpointing and how != "timm":
            x = vit.norm_pre(vit._pos_embed(vit.patch_embed(images)))
            x = torch.utils.checkpoint.checkpoint(vit.blocks, x, use_reentrant=how == "reentrant")
            out = vit.forward_head(vit.norm(x))
        else:
            out = vit(images)
    out.square().mean().backward()
    return {n: p.grad.clone() for n, p in vit.named_parameters() if p.grad is not None}


def _ase_vit(num_tasks):
    """A two-block ViT with an ASE FFN in every block, its experts and routers randomised, on DEVICE."""
    mlp = functools.partial(ak.ASEMlp, num_tasks=num_tasks, **CONFIG)
    vit = tiny_vit(num_classes=4, mlp_layer=mlp).to(DEVICE)
    for m in ak.ase_modules(vit):
        _randomise_experts(m)
    return vit


@pytest.mark.parametrize("how", ["timm", "reentrant", "non-reentrant"])
def test_task_ids_survive_activation_checkpointing(backend, how):
    """Recomputation runs inside backward, after the block: the modules reuse the ids their forward used."""
    vit = _ase_vit(num_tasks=3)
    images, ids = torch.randn(3, 3, 32, 32, device=DEVICE), torch.tensor([2, 0, 1], device=DEVICE)
    want = _checkpointed_vit_grads(vit, images, ids, how, checkpointing=False)
    got = _checkpointed_vit_grads(vit, images, ids, how, checkpointing=True)
    assert want.keys() == got.keys() and "blocks.1.mlp.router" in got
    for name in want:
        assert_close(name, want[name], got[name])
    with pytest.raises(ValueError, match="task_ids is required"):  # outside backward the ids are still needed
        vit(images)


def test_several_forwards_then_one_backward_recompute_each_with_its_own_ids(backend):
    """One forward per task, one backward of the summed losses: each recomputation takes its own forward's ids."""
    vit = _ase_vit(num_tasks=3)
    images = torch.randn(2, 3, 32, 32, device=DEVICE)
    grads = []
    for checkpointing in (False, True):
        vit.zero_grad()
        vit.set_grad_checkpointing(checkpointing)
        loss = 0
        for task in range(3):
            with ak.task_ids(vit, torch.full((2,), task, device=DEVICE)):
                loss = loss + (task + 1) * vit(images).square().mean()
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in vit.named_parameters()})
        assert all(not m._last.pending for m in ak.ase_modules(vit)), "backward passed every forward"
    for name in grads[0]:
        assert_close(name, grads[0][name], grads[1][name])


def test_task_ids_and_checkpointing_under_torch_compile(backend):
    vit = _ase_vit(num_tasks=2)
    images, ids = torch.randn(2, 3, 32, 32, device=DEVICE), torch.tensor([1, 0], device=DEVICE)
    want = _checkpointed_vit_grads(vit, images, ids, "timm", checkpointing=False)
    vit.set_grad_checkpointing(True)
    compiled = torch.compile(vit)
    vit.zero_grad()
    with ak.task_ids(vit, ids):
        out = compiled(images)
    out.square().mean().backward()
    for name, p in vit.named_parameters():
        assert_close(name, want[name], p.grad)
