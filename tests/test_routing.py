"""ase_kernels/kernels/routing.py and the torch path's routing, against the reference: forward and gradients."""

import pytest
import torch
from conftest import DEVICE
from helpers import CONFIGS, DTYPES, assert_close, config_modes, leaf

import ase_kernels as ak
from ase_kernels import reference


def check_route(x, w, ids, top_k, num_shared, mode, dtype, check_indices=True):
    """Route with the backend under test and with the float64 reference (on the same rounded inputs); compare
    indices, gates, prob_sums and the gradients of a random loss of gates and prob_sums w.r.t. x and w."""
    x_t, w_t = leaf(x, dtype, DEVICE), leaf(w, dtype, DEVICE)
    x_r, w_r = leaf(x_t, torch.float64, "cpu"), leaf(w_t, torch.float64, "cpu")
    out = ak.route(x_t, w_t, ids.to(DEVICE), top_k=top_k, num_shared=num_shared, mode=mode)
    ref = reference.route(x_r, w_r, ids, top_k=top_k, num_shared=num_shared, mode=mode)

    assert out.indices.dtype == torch.int64 and out.gates.dtype == torch.float32
    if check_indices:
        assert torch.equal(out.indices.cpu(), ref.indices), "top-k selection differs from the reference"
    assert_close("gates", ref.gates, out.gates, dtype)
    assert_close("prob_sums", ref.prob_sums, out.prob_sums, dtype)

    d_gates, d_sums = torch.randn_like(ref.gates), torch.randn_like(ref.prob_sums)
    ((ref.gates * d_gates).sum() + (ref.prob_sums * d_sums).sum()).backward()
    ((out.gates * d_gates.to(DEVICE)).sum() + (out.prob_sums * d_sums.to(DEVICE)).sum()).backward()
    assert_close("dx", x_r.grad, x_t.grad, dtype)
    assert_close("d_router_weight", w_r.grad, w_t.grad, dtype)
    return out


@pytest.mark.parametrize("config,mode", config_modes())
@pytest.mark.parametrize("dtype", DTYPES)
def test_route_matches_reference(backend, config, mode, dtype):
    n, k, s, _ = config
    tasks = 3
    x = torch.randn(37, 24)  # 37 tokens: not a multiple of any block size
    w = torch.randn(tasks, n, 24) * 0.5
    ids = torch.randint(0, tasks, (37,))
    check_route(x, w, ids, k, s, mode, dtype)


@pytest.mark.parametrize("tokens", [1, 31, 32, 33, 100], ids=lambda t: f"T{t}")
def test_route_token_counts(backend, tokens):
    x = torch.randn(tokens, 20)
    w = torch.randn(2, 16, 20)
    ids = torch.sort(torch.randint(0, 2, (tokens,))).values  # task-major, as the model lays batches out
    check_route(x, w, ids, 3, 1, "adaptive", torch.float32)


@pytest.mark.parametrize("mode", ["adaptive", "naive"])
def test_route_zero_router_ties_go_to_lower_indices(backend, mode):
    """Routers start at zero: every logit ties, the first k sparse experts win, adaptive gates are uniform."""
    n, k, s = 32, 6, 2
    x = torch.randn(40, 16)
    out = check_route(x, torch.zeros(2, n, 16), torch.randint(0, 2, (40,)), k, s, mode, torch.float32)
    expected = list(range(k)) + list(range(n - s, n))
    assert out.indices.tolist() == [expected] * 40
    if mode == "adaptive":
        assert torch.allclose(out.gates.cpu(), torch.full((40, k + s), 1 / (k + s)))
    else:
        assert torch.allclose(out.gates[:, :k].cpu(), torch.full((40, k), 1 / (n - s)))


def test_route_all_tokens_to_one_expert(backend):
    """A router that prefers expert 5 for every token, the other logits tied at 0."""
    x = torch.rand(50, 12) + 1.0
    w = torch.zeros(1, 16, 12)
    w[0, 5] = 0.2  # logits ~3 against 0: a clear winner, yet gradients that do not vanish in fp32
    out = check_route(x, w, torch.zeros(50, dtype=torch.int64), 4, 0, "adaptive", torch.float32)
    assert (out.indices[:, 0] == 5).all() and out.indices[:, 1:].tolist() == [[0, 1, 2]] * 50


def test_route_many_tasks_one_batch(backend):
    """Five task routers in one launch, tokens of all tasks interleaved."""
    x = torch.randn(64, 16)
    w = torch.randn(5, 16, 16)
    check_route(x, w, torch.arange(64) % 5, 3, 1, "adaptive", torch.float32)


def test_route_strided_inputs(backend):
    """x and the router weight as non-contiguous views: the kernels take strides, no hidden copies."""
    x = torch.randn(16, 40)[:, ::2]  # (16, 20), stride 2 along d
    w = torch.randn(2, 20, 16).transpose(1, 2)  # (2, 16, 20)
    check_route(x, w, torch.arange(16) % 2, 3, 1, "adaptive", torch.float32)


@pytest.mark.parametrize("config", CONFIGS)
def test_route_invariants(backend, config):
    n, k, s, _ = config
    x = torch.randn(29, 16, device=DEVICE)
    w = torch.randn(2, n, 16, device=DEVICE)
    ids = torch.randint(0, 2, (29,), device=DEVICE)
    for mode in ["adaptive", "naive"]:
        r = ak.route(x, w, ids, top_k=k, num_shared=s, mode=mode)
        sparse = r.indices[:, :k]
        assert ((sparse >= 0) & (sparse < n - s)).all(), "sparse indices outside the sparse pool"
        assert (r.indices[:, k:] == torch.arange(n - s, n, device=DEVICE)).all(), "shared experts not all active"
        assert (torch.sort(r.indices, 1).values.diff(dim=1) > 0).all(), "an expert selected twice"
        assert (r.gates > 0).all()
        if mode == "adaptive":
            assert torch.allclose(r.gates.sum(1), torch.ones(29, device=DEVICE), atol=1e-6)
        else:
            assert (r.gates[:, :k].sum(1) < 1).all() and (r.gates[:, k:] == 1).all()
        assert torch.allclose(r.prob_sums.sum(), torch.tensor(29.0, device=DEVICE), rtol=1e-5)


@pytest.mark.parametrize("order", ["task-major", "interleaved"])
def test_route_gradient_with_an_absent_task(backend, order):
    """Task-major ids give each router-gradient program its task's token range (from per-task offsets); task 1
    has no tokens (an empty range) and gets a zero gradient. Interleaved ids take the filtering path."""
    from ase_kernels.checks import task_offsets, token_task_ids

    ids = torch.tensor([0] * 20 + [2] * 45 + [3] * 6)
    if order == "interleaved":
        ids = ids[torch.randperm(ids.shape[0])]
    x, w = torch.randn(ids.shape[0], 16), torch.randn(4, 16, 16)
    check_route(x, w, ids, 3, 1, "adaptive", torch.float32)
    ids_d = ids.to(DEVICE)
    offsets = task_offsets(token_task_ids(ids_d, x.to(DEVICE), 4), 4)
    if order == "task-major":
        assert offsets.tolist() == [0, 20, 20, 65, 71]
    else:
        assert offsets is None


def test_task_offsets_belong_to_the_task_count_they_were_checked_for():
    """One ids tensor may feed a 4-task and a 5-task router: the cached ranges of a 4-task check must not reach the
    5-task router's gradient kernel (it would read one offset past their end)."""
    from ase_kernels.checks import task_offsets, token_task_ids

    ids = torch.tensor([0] * 9 + [1] * 7 + [2] * 11 + [3] * 5, device=DEVICE)
    per_token = token_task_ids(ids, torch.randn(ids.shape[0], 16, device=DEVICE), 4)
    assert task_offsets(per_token, 4).tolist() == [0, 9, 16, 27, 32]
    assert task_offsets(per_token, 5) is None


def test_router_gradient_while_capturing_takes_the_ids_it_will_replay_on(backend, monkeypatch):
    """A CUDA graph replays on whatever its ids tensor then holds: the task ranges cached by an eager call on the
    same tensor must not reach a captured gradient. Capture is simulated (no value can be read back); on a GPU,
    tests/test_gpu.py captures a real graph."""
    from ase_kernels import checks

    ids = torch.tensor([0] * 30 + [1] * 3)  # int64, one per token: on the CPU the ops get this very tensor
    x, w = torch.randn(33, 16), torch.randn(2, 8, 16)
    check_route(x, w, ids, 3, 1, "adaptive", torch.float32)  # eager: checks the ids and caches their task ranges
    monkeypatch.setattr(checks, "_can_read_back", lambda device: False)
    ids.copy_(torch.tensor([0] * 3 + [1] * 30))  # a graph's static input, refilled before replay
    check_route(x, w, ids, 3, 1, "adaptive", torch.float32)


@pytest.mark.parametrize("loss", ["gates-only", "prob-sums-only"])
def test_route_gradient_of_one_output(backend, loss):
    """Autograd does not materialise zeros for the unused output: backward takes None for it."""
    x, w, ids = torch.randn(33, 16), torch.randn(2, 8, 16), torch.sort(torch.randint(0, 2, (33,))).values
    x_t, w_t = leaf(x, torch.float32, DEVICE), leaf(w, torch.float32, DEVICE)
    x_r, w_r = leaf(x, torch.float64, "cpu"), leaf(w, torch.float64, "cpu")
    out = ak.route(x_t, w_t, ids.to(DEVICE), top_k=3, num_shared=1)
    ref = reference.route(x_r, w_r, ids, top_k=3, num_shared=1)
    pick = (lambda r: r.gates) if loss == "gates-only" else (lambda r: r.prob_sums)
    d = torch.randn_like(pick(ref))
    (pick(ref) * d).sum().backward()
    (pick(out) * d.to(DEVICE)).sum().backward()
    assert_close("dx", x_r.grad, x_t.grad, torch.float32)
    assert_close("d_router_weight", w_r.grad, w_t.grad, torch.float32)
