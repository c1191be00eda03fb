"""Argument checks shared by every backend, so that bad input fails the same way everywhere.

Each check raises ``ValueError`` (shapes, values) or ``TypeError`` (dtypes, types) naming the argument, what it
got and what was expected, before any kernel runs.
"""

import operator
import weakref
from typing import NamedTuple

import torch

MODES = ("adaptive", "naive", "none")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


class Routing(NamedTuple):
    """What a router decided for each token.

    indices: (T, k + S) int64, the k selected sparse experts (best first) then the S shared experts N-S..N-1.
    gates: (T, k + S) float32 (float64 for float64 inputs), the gate of each of those experts.
    prob_sums: (tasks, N) float32, per-task sums over tokens of the full softmax over all N router logits
        (what the Mod-Squad MI loss needs, without a (T, N) tensor).
    """

    indices: torch.Tensor
    gates: torch.Tensor
    prob_sums: torch.Tensor


def _check_tensor(name: str, t, dim: int | None = None, dtype=None, device=None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{name} must have {dim} dimensions, got shape {tuple(t.shape)}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype} (the dtype of x), got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} must be on {device} (the device of x), got {t.device}")


@torch.compiler.assume_constant_result  # dynamo would trace a numpy integer as a tensor: call it, keep the int
def integer(name: str, value) -> int:
    """value as a Python int: ints, numpy integers and anything with ``__index__`` (not bool, not float)."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}") from None


def check_x(x) -> None:
    _check_tensor("x", x)
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    if x.dim() < 1:
        raise ValueError("x must have shape (..., d_in), got a 0-d tensor")


_ids_cache: tuple | None = None  # (weakref to the ids given, version, tasks, tokens, per-token ids, offsets)
_zero_ids: dict[torch.device, torch.Tensor] = {}  # read-only zeros: the ids of a one-task batch, grown on demand


def token_task_ids(task_ids, x: torch.Tensor, tasks: int) -> torch.Tensor:
    """Task id of every token: (T,) int64 from None, (T,) or one id per leading batch row of x (..., d_in).

    Hot path: every layer of a model gets the same ids tensor, so its range check (a device-to-host read) and
    its expansion to one id per token run once per tensor and version; later calls return the cached result
    with no device work at all. Under torch.compile or CUDA-graph capture, where no value can be read back, a
    device-side assert (torch._assert_async) raises instead.
    """
    global _ids_cache
    tokens = x.shape[:-1].numel()
    if task_ids is None:
        if tasks != 1:
            raise ValueError(f"task_ids is required: router_weight has {tasks} task routers")
        return _zeros(tokens, x.device)
    _check_tensor("task_ids", task_ids, dim=1, device=x.device)
    if task_ids.dtype.is_floating_point or task_ids.dtype == torch.bool or task_ids.is_complex():
        raise TypeError(f"task_ids must be an integer tensor, got {task_ids.dtype}")
    per_row = None
    if task_ids.shape[0] != tokens:
        if x.dim() > 2 and task_ids.shape[0] == x.shape[0]:
            per_row = tokens // x.shape[0]
        else:
            raise ValueError(
                f"task_ids must have one id per token ({tokens}) or per leading batch row of x "
                f"({x.shape[0] if x.dim() > 2 else 'n/a'}), got shape {tuple(task_ids.shape)}"
            )
    if not _can_read_back(task_ids.device):
        torch._assert_async(((task_ids >= 0) & (task_ids < tasks)).all(),
                            f"task_ids must lie in [0, {tasks}) (router_weight has {tasks} tasks)")
        return _per_token(task_ids, per_row)
    # an inference tensor has no version counter to key the cache on: it is checked at every call
    key = None if task_ids.is_inference() else (task_ids._version, tasks, tokens)
    if key is not None and _ids_cache is not None and _ids_cache[0]() is task_ids and _ids_cache[1:4] == key:
        return _ids_cache[4]
    ids, offsets = _per_token(task_ids, per_row), None
    if ids.numel():
        lo, hi, task_major = torch.stack([ids.min(), ids.max(), (ids[1:] >= ids[:-1]).all().long()]).tolist()
        if lo < 0 or hi >= tasks:
            raise ValueError(f"task_ids must lie in [0, {tasks}) (router_weight has {tasks} tasks), got [{lo}, {hi}]")
        if task_major:  # each task's tokens are one range: gradient reductions walk only their own task's range
            offsets = torch.searchsorted(ids, torch.arange(tasks + 1, device=ids.device))
    if key is not None:
        _ids_cache = (weakref.ref(task_ids), *key, ids, offsets)
    return ids


def task_offsets(ids: torch.Tensor, tasks: int) -> torch.Tensor | None:
    """(tasks + 1,) int64 start of each task's token range if ids (per-token ids returned by
    :func:`token_task_ids`) were checked against `tasks` routers and found task-major (sorted), else None. No
    device work. (The same ids may feed modules of other task counts: their offsets are not these.)

    None under torch.compile or CUDA-graph capture: a captured graph replays on whatever its ids tensor then holds,
    and the offsets of an earlier eager call would be stale (token_task_ids hands int64 per-token ids through as
    the same tensor, so the identity check alone cannot tell)."""
    if not _can_read_back(ids.device):
        return None
    if _ids_cache is not None and _ids_cache[4] is ids and _ids_cache[2] == tasks:
        return _ids_cache[5]
    return None


def _can_read_back(device: torch.device) -> bool:
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    return not torch.compiler.is_compiling() and not capturing


def _per_token(task_ids: torch.Tensor, per_row: int | None) -> torch.Tensor:
    if per_row is not None:
        task_ids = task_ids[:, None].expand(task_ids.shape[0], per_row).reshape(-1)
    return task_ids.to(torch.int64)


def _zeros(tokens: int, device: torch.device) -> torch.Tensor:
    """tokens int64 zeros, a slice of one cached buffer per device (the kernels only read task ids)."""
    # a compiled or captured graph allocates its own; so does inference mode, whose tensors autograd refuses to save
    # (a cached buffer made there would break every later training call)
    if not _can_read_back(device) or torch.is_inference_mode_enabled():
        return torch.zeros(tokens, dtype=torch.int64, device=device)
    buf = _zero_ids.get(device)
    if buf is None or buf.shape[0] < tokens:
        buf = _zero_ids[device] = torch.zeros(max(tokens, 1024), dtype=torch.int64, device=device)
    return buf[:tokens]


def trust_indices(indices: torch.Tensor) -> None:
    """Mark indices made by route() as in range, so that moe_lora skips their value check (while unmodified). The
    mark is the tensor's version, held as an attribute of the tensor itself: a weak-keyed table costs several
    microseconds of host time per layer, an attribute a fraction of one; detach() and views carry no mark."""
    if not torch.compiler.is_compiling() and not indices.is_inference():  # inference tensors have no version
        indices._ase_kernels_version = indices._version


def _check_index_values(indices: torch.Tensor, n: int) -> None:
    """Every routing index must name one of the N experts, on every backend. On the CPU a bad index is a
    ValueError; on an accelerator and under torch.compile the check runs on the device (torch._assert_async: no host
    sync) and fails the stream. Indices fresh from route() are not checked again."""
    if indices.numel() == 0 or (not torch.compiler.is_compiling() and not indices.is_inference()
                                and getattr(indices, "_ase_kernels_version", None) == indices._version):
        return
    ok = ((indices >= 0) & (indices < n)).all()
    if torch.compiler.is_compiling() or indices.device.type != "cpu":
        torch._assert_async(ok, f"routing.indices must lie in [0, N={n})")
    elif not ok:
        raise ValueError(f"routing.indices must lie in [0, N={n}) (the experts of lora_A), got values in "
                         f"[{int(indices.min())}, {int(indices.max())}]")


def check_route(x, router_weight, task_ids, top_k, num_shared, mode):
    """Validate the arguments of ``route``. Returns x as (T, d_in), task ids as (T,) int64, and top_k and
    num_shared as Python ints (numpy and 0-d integer tensors are accepted)."""
    check_x(x)
    _check_tensor("router_weight", router_weight, dim=3, dtype=x.dtype, device=x.device)
    tasks, n, d_in = router_weight.shape
    if d_in != x.shape[-1]:
        raise ValueError(f"router_weight must have shape (tasks, N, {x.shape[-1]}), got {tuple(router_weight.shape)}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    num_shared, top_k = integer("num_shared", num_shared), integer("top_k", top_k)
    if not 0 <= num_shared <= n:
        raise ValueError(f"num_shared must be an int in [0, N={n}], got {num_shared!r}")
    if mode == "none" and num_shared != 0:
        raise ValueError(f"mode 'none' has no shared experts: num_shared must be 0, got {num_shared}")
    if not 0 <= top_k <= n - num_shared:
        raise ValueError(f"top_k must be an int in [0, N - S = {n - num_shared}] (the sparse pool), got {top_k!r}")
    if top_k + num_shared == 0:
        raise ValueError("top_k + num_shared must be at least 1: every token needs an active expert")
    if tasks < 1 or n < 1:
        raise ValueError(f"router_weight must have at least one task and one expert, got {tuple(router_weight.shape)}")
    return x.reshape(-1, d_in), token_task_ids(task_ids, x, tasks), top_k, num_shared


def check_moe_lora(x, lora_A, lora_B, routing, base_input, base_weight, base_bias):
    """Validate the arguments of ``moe_lora``. Returns x as (T, d_in) and the leading shape of x."""
    check_x(x)
    d_in = x.shape[-1]
    dtype, device = x.dtype, x.device  # once: each x.device builds a torch.device
    _check_tensor("lora_A", lora_A, dim=3, dtype=dtype, device=device)
    _check_tensor("lora_B", lora_B, dim=3, dtype=dtype, device=device)
    n, rank, a_in = lora_A.shape
    if a_in != d_in:
        raise ValueError(f"lora_A must have shape (N, r, {d_in}), got {tuple(lora_A.shape)}")
    if lora_B.shape[0] != n or lora_B.shape[2] != rank:
        raise ValueError(f"lora_B must have shape ({n}, d_out, {rank}) to match lora_A, got {tuple(lora_B.shape)}")
    if rank < 1:
        raise ValueError(f"lora_A must have rank >= 1, got shape {tuple(lora_A.shape)}")
    if not isinstance(routing, tuple) or len(routing) != 3:
        raise TypeError("routing must be the Routing returned by route(), (indices, gates, prob_sums)")
    indices, gates = routing[0], routing[1]
    tokens = x.shape[:-1].numel()
    _check_tensor("routing.indices", indices, dim=2, device=device)
    _check_tensor("routing.gates", gates, dim=2, device=device)
    if indices.dtype != torch.int64:
        raise TypeError(f"routing.indices must be int64, got {indices.dtype}")
    if not gates.dtype.is_floating_point:
        raise TypeError(f"routing.gates must be floating point, got {gates.dtype}")
    if indices.shape[0] != tokens or gates.shape != indices.shape:
        raise ValueError(
            f"routing must cover the {tokens} tokens of x: indices {tuple(indices.shape)}, gates {tuple(gates.shape)}"
        )
    _check_index_values(indices, n)
    d_out = lora_B.shape[1]
    if base_weight is not None:
        _check_tensor("base_weight", base_weight, dim=2, dtype=dtype, device=device)
        if base_weight.shape[0] != d_out:
            raise ValueError(f"base_weight must have shape ({d_out}, d_base), got {tuple(base_weight.shape)}")
        if base_input is None:
            raise ValueError("base_input is required when base_weight is given")
        _check_tensor("base_input", base_input, dtype=dtype, device=device)
        if base_input.shape[:-1] != x.shape[:-1] or base_input.shape[-1] != base_weight.shape[1]:
            raise ValueError(
                f"base_input must have shape {(*x.shape[:-1], base_weight.shape[1])}, got {tuple(base_input.shape)}"
            )
        if base_bias is not None:
            _check_tensor("base_bias", base_bias, dim=1, dtype=dtype, device=device)
            if base_bias.shape[0] != d_out:
                raise ValueError(f"base_bias must have shape ({d_out},), got {tuple(base_bias.shape)}")
    elif base_input is not None or base_bias is not None:
        raise ValueError("base_input and base_bias need base_weight")
    return x.reshape(-1, d_in), x.shape[:-1]


def check_moe_lora_ffn(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, lora_A, lora_B, routing):
    """Validate the arguments of ``moe_lora_ffn``. Returns x as (T, d) and the leading shape of x."""
    check_x(x)
    dtype, device = x.dtype, x.device
    _check_tensor("fc1_weight", fc1_weight, dim=2, dtype=dtype, device=device)
    hidden, d = fc1_weight.shape
    if d != x.shape[-1]:
        raise ValueError(f"fc1_weight must have shape (hidden, {x.shape[-1]}), got {tuple(fc1_weight.shape)}")
    _check_tensor("fc2_weight", fc2_weight, dim=2, dtype=dtype, device=device)
    if fc2_weight.shape[1] != hidden:
        raise ValueError(f"fc2_weight must have shape (d_out, {hidden}), got {tuple(fc2_weight.shape)}")
    for name, bias, size in (("fc1_bias", fc1_bias, hidden), ("fc2_bias", fc2_bias, fc2_weight.shape[0])):
        if bias is not None:
            _check_tensor(name, bias, dim=1, dtype=dtype, device=device)
            if bias.shape[0] != size:
                raise ValueError(f"{name} must have shape ({size},), got {tuple(bias.shape)}")
    if lora_B.dim() == 3 and lora_B.shape[1] != fc2_weight.shape[0]:
        raise ValueError(f"lora_B must have shape (N, {fc2_weight.shape[0]}, r) to match fc2, got "
                         f"{tuple(lora_B.shape)}")
    return check_moe_lora(x, lora_A, lora_B, routing, None, None, None)
