"""What one ASEMlp (ffn placement) forward + backward asks of the device, counted on the CPU (DESIGN.md section 5:
0 host syncs and at most 14 launches, against 6 for a bare timm Mlp).

The Triton kernels are replaced by counting stubs (their work does not matter here, their launches do), and the
torch ops that would launch a CUDA kernel are read from a CPU profiler trace: every leaf aten op except those
that only make views or allocate. A host sync is an op that reads a value back (item, _local_scalar_dense,
nonzero, ...) or a Python conversion of a tensor (int(), bool(), tolist(), ...). The second call is counted: the
first one checks the task ids (one read-back per ids tensor).
"""

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import ase_kernels as ak
from ase_kernels import ops

NO_DEVICE_WORK = {
    "aten::empty", "aten::empty_strided", "aten::empty_like", "aten::new_empty", "aten::new_empty_strided",
    "aten::view", "aten::_unsafe_view", "aten::reshape", "aten::t", "aten::transpose", "aten::permute",
    "aten::expand", "aten::slice", "aten::select", "aten::unsqueeze", "aten::squeeze", "aten::as_strided",
    "aten::alias", "aten::detach", "aten::lift_fresh", "aten::split", "aten::unbind", "aten::resolve_conj",
    "aten::resolve_neg", "aten::result_type", "aten::to", "aten::dropout", "aten::is_nonzero",
}
SYNCS = {"aten::_local_scalar_dense", "aten::item", "aten::nonzero", "aten::equal", "aten::is_nonzero",
         "aten::unique_consecutive", "aten::_unique2"}
MAX_LAUNCHES = 14


@pytest.fixture
def stubbed_kernels(monkeypatch):
    """The Triton kernels as stubs that record their launches."""
    monkeypatch.setenv("ASE_KERNELS_BACKEND", "triton")
    from ase_kernels.kernels import lowrank, routing

    launches = []

    class Stub:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append(self.name)

    ops._triton_ops()
    for module in (lowrank, routing):
        for name in [n for n in vars(module) if n.startswith("_") and n.endswith("_kernel")]:
            monkeypatch.setattr(module, name, Stub(name))
    return launches


def _leaf_ops(prof) -> list[str]:
    return [e.name for e in prof.events() if e.name.startswith("aten::")
            and not any(c.name.startswith("aten::") for c in e.cpu_children)]


@pytest.fixture
def read_backs(monkeypatch):
    """Python conversions of tensors to host values, recorded."""
    calls = []
    for method in ("tolist", "item", "__int__", "__float__", "__bool__", "__index__", "numpy", "cpu"):
        original = getattr(torch.Tensor, method)

        def record(self, *args, _original=original, _method=method, **kwargs):
            calls.append(_method)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, method, record)
    return calls


@pytest.mark.parametrize("task_ids", ["per-image", "none"])
def test_ase_mlp_forward_backward_launches_and_syncs(stubbed_kernels, read_backs, task_ids):
    mlp = ak.ASEMlp(32, 64, num_experts=32, top_k=6, num_shared=2, rank=2, placement="ffn",
                    num_tasks=5 if task_ids == "per-image" else 1)
    mlp.fc1.requires_grad_(False)
    mlp.fc2.requires_grad_(False)
    x = torch.randn(10, 7, 32, requires_grad=True)
    ids = torch.arange(10) // 2 if task_ids == "per-image" else None
    grad = torch.randn(10, 7, 32)

    def step():
        x.grad = None
        for p in mlp.parameters():
            p.grad = None
        mlp(x, ids).backward(grad)

    step()
    stubbed_kernels.clear()
    read_backs.clear()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    assert not read_backs, f"values read back to the host in fwd+bwd: {read_backs}"
    leaves = _leaf_ops(prof)
    syncs = [name for name in leaves if name in SYNCS]
    device_ops = [name for name in leaves if name not in NO_DEVICE_WORK]
    assert not syncs, f"host syncs in fwd+bwd: {syncs}"
    launches = len(stubbed_kernels) + len(device_ops)
    assert launches <= MAX_LAUNCHES, f"{launches} launches: Triton {stubbed_kernels}, torch {device_ops}"
