"""The torch side of a forward+backward: device ops, host syncs, host time.

Device ops: from a ``torch.profiler`` trace of CPU tensors, an ``aten::`` op counts as one CUDA kernel when
torch registers a CUDA kernel for it (``torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA")``), it is
not a view, an allocation without initialisation (``empty``, ``empty_strided``, ...) or a scalar read-back, and
no op around it already counted (a CPU kernel's internal ``fill_``/``copy_`` belongs to the op that called
it). ``aten::copy_`` counts too (its CUDA work sits behind a composite registration). Composite ops (``zeros``,
``to``, ``clone``, ``linear``) count through the kernels they call. Each counted op's input bytes give a
memory floor (a lower bound: outputs are not in the trace).

Host syncs: a ``TorchFunctionMode`` sees every Python-level call that reads device data back to the host on a
GPU: ``item``, ``tolist``, ``bool``/``int``/``float``/``index`` of a tensor, ``cpu``, ``numpy``, ``nonzero``,
``argwhere``, ``masked_select``, ``unique``/``unique_consecutive``, ``repeat_interleave`` without
``output_size``, indexing with a boolean tensor; plus ``torch.cuda.synchronize`` (reported by the hooks). Each
is listed with the first caller outside torch. Not seen: a read-back inside a C++ op, and ``.to(device)``, which
cannot tell a copy to the host from a no-op while every tensor is on the CPU.

Host time: the CPU time of fwd+bwd (one thread, fp32, no profiler markers) with the device work stubbed: Triton
launches are compiled-only (argument binding, cache lookup and the launchers' Python run; the driver's own
launch, a few microseconds per kernel on a GPU host, does not), and torch ops run on CPU tensors small enough that
their CPU compute is negligible next to their dispatch.
"""

import functools
import gc
import math
import os
import statistics
import time
import traceback

import torch
from torch.overrides import TorchFunctionMode

_NO_KERNEL = {"aten::empty", "aten::empty_strided", "aten::empty_permuted", "aten::_local_scalar_dense",
              "aten::resize_", "aten::set_", "aten::record_stream", "aten::lift_fresh"}
_ALWAYS_KERNEL = {"aten::copy_"}
_SYNC_METHODS = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy", "nonzero",
                 "argwhere", "masked_select", "unique", "unique_consecutive", "_unique", "_unique2"}
_DTYPE_BYTES = {"float": 4, "c10::BFloat16": 2, "c10::Half": 2, "double": 8, "long int": 8, "int": 4,
                "bool": 1, "unsigned char": 1, "signed char": 1, "short int": 2}


class SyncDetector(TorchFunctionMode):
    """Records {phase, what, where} for every call that is a device-to-host synchronisation on a GPU."""

    def __init__(self, root: str):
        super().__init__()
        self.root, self.syncs, self.phase = root, [], "?"

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if (name in _SYNC_METHODS or (name == "repeat_interleave" and _tensor_repeats(args, kwargs))
                or (name == "__getitem__" and _has_bool_index(args[1:]))):
            self.record(name)
        return func(*args, **kwargs)

    def record(self, what: str):
        where = "?"
        for frame in reversed(traceback.extract_stack()[:-2]):
            if "/torch/" not in frame.filename and "kernel_inspect" not in frame.filename:
                where = f"{os.path.relpath(frame.filename, self.root)}:{frame.lineno}"
                break
        self.syncs.append(dict(phase=self.phase, what=what, where=where))


def _tensor_repeats(args, kwargs) -> bool:
    """repeat_interleave with a tensor of repeats and no output_size: the output size is read back."""
    if kwargs.get("output_size") is not None:
        return False
    repeats = args[1] if len(args) > 1 else kwargs.get("repeats", args[0] if args else None)
    return isinstance(repeats, torch.Tensor)


def _has_bool_index(index) -> bool:
    items = index[0] if index and isinstance(index[0], tuple) else index
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


@functools.cache
def launches_kernel(name: str) -> bool:
    """Whether aten op `name` ('aten::sum') runs a CUDA kernel of its own (see the module docstring)."""
    if name in _ALWAYS_KERNEL:
        return True
    if not name.startswith("aten::") or name in _NO_KERNEL:
        return False
    packet = getattr(torch.ops.aten, name.removeprefix("aten::"), None)
    overloads = [getattr(packet, o) for o in packet.overloads()] if packet is not None else []
    return not any(o.is_view for o in overloads) and any(_has_cuda_kernel(o.name()) for o in overloads)


def _has_cuda_kernel(op: str) -> bool:
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA")
    except RuntimeError:  # an overload the dispatcher does not know
        return False


def device_ops(events, phases: dict[str, str]) -> list[dict]:
    """The trace's device ops: [{op, phase, shapes, bytes}], phase from the enclosing record_function range."""
    ops = []
    for e in events:
        if not launches_kernel(e.name):
            continue
        phase, parent, nested = "?", e.cpu_parent, False
        while parent is not None:
            nested = nested or launches_kernel(parent.name)
            phase = phases.get(parent.name, phase)
            parent = parent.cpu_parent
        if nested:
            continue
        shapes = [list(s) for s in e.input_shapes if s]
        # torch 2.11 and older record no FunctionEvent.input_dtypes: there every input counts as 4-byte elements
        dtypes = (e.input_dtypes or []) if hasattr(e, "input_dtypes") else [None] * len(e.input_shapes)
        nbytes = sum(math.prod(s) * _DTYPE_BYTES.get(t, 4) for s, t in zip(e.input_shapes, dtypes, strict=False) if s)
        ops.append(dict(op=e.name.removeprefix("aten::"), phase=phase, shapes=shapes, bytes=nbytes))
    return ops


def host_times_us(steps: dict, reps: int) -> dict:
    """{name: {median, min}} microseconds of this thread's CPU time per call of each step() over reps rounds,
    after two warm-up rounds. CPU time, not wall time: on a shared machine the wall clock also counts the waits
    for a core (2-3x here under load); with one torch thread and the device stubbed, nothing else runs the step.
    The steps alternate within a round; the garbage collector is off while timing, as in timeit."""
    times = {name: [] for name in steps}
    gc.collect()
    gc.disable()
    try:
        for i in range(reps + 2):
            for name, step in steps.items():
                t0 = time.thread_time()
                step()
                if i >= 2:
                    times[name].append(time.thread_time() - t0)
    finally:
        gc.enable()
    return {name: dict(median=statistics.median(t) * 1e6, min=min(t) * 1e6) for name, t in times.items()}


def host_ratio(rounds: list[dict]) -> dict:
    """The ASE / bare host-time ratio over rounds of host_times_us(dict(ase=..., bare=...)): per round the ratio of
    the medians; reported as their median and range, with the medians of the per-round times."""
    ratios = sorted(r["ase"]["median"] / r["bare"]["median"] for r in rounds)
    return dict(ase_us=dict(median=statistics.median(r["ase"]["median"] for r in rounds),
                            min=min(r["ase"]["min"] for r in rounds)),
                bare_us=dict(median=statistics.median(r["bare"]["median"] for r in rounds),
                             min=min(r["bare"]["min"] for r in rounds)),
                ratio=statistics.median(ratios), ratio_low=ratios[0], ratio_high=ratios[-1], rounds=len(rounds))
