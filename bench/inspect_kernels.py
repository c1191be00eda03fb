"""Inspect one forward+backward of an ASE module for a GPU, without a GPU.

    python -m bench.inspect_kernels [--target sm_90] [--json FILE] [shape options]

from the repository root, with ase_kernels importable (``pip install -e .`` or ``PYTHONPATH=.``) and neither
``TRITON_INTERPRET`` nor ``ASE_KERNELS_BACKEND`` set; ``--help`` lists the options.

Runs ``ASEMlp`` (default: ViT-B FFN 768 -> 3072, 32 experts, top-6, 2 shared, rank 2, 5 tasks, placement ffn,
bf16, x = (64, 197, 768) task-major with 13/13/13/13/12 images per task, frozen fc1/fc2) on CPU tensors with
every Triton launch compiled for the target through Triton's own binder and not launched
(``bench/kernel_inspect``), and prints Markdown tables:

- per compiled variant (every autotune configuration): role, tile, warps, stages, registers, spill bytes,
  shared memory, programs per H100 SM, wgmma (HGMMA) in a loop, TMA loads (UTMALDG);
- per launch: grid per variant, FLOPs, minimum HBM bytes, the roofline floor at 700 TFLOP/s and 3 TB/s;
- for the whole forward+backward: device launches (Triton launches + torch ops that launch a CUDA kernel),
  host syncs and where they happen, and the host CPU time with the device work stubbed beside a bare timm
  ``Mlp``'s (both in this run, one thread, alternating calls).

Three passes: (1) compile and record (every autotuned launch compiles all its configurations), (2) count under
``torch.profiler`` and a sync detector (steady state: nothing is compiled or tuned), (3) host time. Compiled
variants and their ptxas/cuobjdump results stay in Triton's cache (``TRITON_CACHE_DIR``): a second run takes
seconds. Values that the Triton kernels would compute are never computed (their outputs stay uninitialised).
"""

import argparse
import contextlib
import json
import os
import sys
from dataclasses import asdict

import torch
import triton
from torch.profiler import ProfilerActivity, profile, record_function

from ase_kernels import ASEMlp
from ase_kernels.kernels.ffn import FFN_PATHS
from ase_kernels.modules import PLACEMENTS
from bench.kernel_inspect import cubin, hooks, roofline, tables, torch_side

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TARGETS = {"sm_90": 90, "sm_80": 80}
HOST_TOKENS_PER_IMAGE = 16  # host-time inputs: one image of 16 tokens per task, negligible CPU compute
BARE_HOST_DIMS = (16, 64)  # the bare Mlp's host path does not depend on its width; its bf16 CPU GEMMs at 768 cost ms


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        sys.exit(f"inspect_kernels: error: {message}")


def parse_args(argv=None) -> argparse.Namespace:
    p = _Parser(prog="python -m bench.inspect_kernels", description=__doc__.split("\n\n")[0])
    p.add_argument("--target", choices=TARGETS, default="sm_90", help="GPU to compile for")
    p.add_argument("--placement", choices=PLACEMENTS, default="ffn")
    p.add_argument("--ffn", choices=FFN_PATHS, default="fused",
                   help="which ASE FFN implementation (placement ffn) to inspect: the fused Triton GEMMs, or the "
                        "cuBLAS hedge (its torch GEMMs count as torch ops); a GPU picks the faster per shape")
    p.add_argument("--experts", type=int, default=32, help="N")
    p.add_argument("--top-k", type=int, default=6, help="k")
    p.add_argument("--shared", type=int, default=2, help="S")
    p.add_argument("--rank", type=int, default=2, help="r")
    p.add_argument("--mode", choices=("adaptive", "naive", "none"), default="adaptive")
    p.add_argument("--dtype", choices=DTYPES, default="bf16")
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--tokens", type=int, default=197, help="tokens per image")
    p.add_argument("--tasks", type=int, default=5, help="task count; images are split task-major")
    p.add_argument("--dim", type=int, default=768, help="d")
    p.add_argument("--hidden", type=int, default=3072, help="FFN hidden width")
    p.add_argument("--first-config", action="store_true", help="compile only the first autotune configuration")
    p.add_argument("--host-reps", type=int, default=50, help="timed calls per host-time measurement")
    p.add_argument("--json", metavar="FILE", help="also write everything as JSON")
    args = p.parse_args(argv)
    for name in ("experts", "rank", "images", "tokens", "tasks", "dim", "hidden", "host_reps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.images < args.tasks:
        p.error(f"--images ({args.images}) must be >= --tasks ({args.tasks}): every task needs an image")
    return args


def task_ids(images: int, tasks: int) -> torch.Tensor:
    """One id per image, task-major, the first tasks taking one image more: 64 images, 5 tasks -> 13,13,13,13,12."""
    per_task = [images // tasks + (t < images % tasks) for t in range(tasks)]
    return torch.repeat_interleave(torch.arange(tasks), torch.tensor(per_task))


def build(args) -> torch.nn.Module:
    torch.manual_seed(0)
    module = ASEMlp(args.dim, args.hidden, num_experts=args.experts, top_k=args.top_k, num_shared=args.shared,
                    rank=args.rank, num_tasks=args.tasks, mode=args.mode, placement=args.placement,
                    dtype=DTYPES[args.dtype])
    module.fc1.requires_grad_(False)
    module.fc2.requires_grad_(False)
    return module


def make_step(module, x, ids, recorder=None, detector=None):
    """One forward+backward with fresh gradients; phases marked for the recorder, the detector and the trace."""
    grad = torch.randn(*x.shape[:-1], module.fc2.out_features, dtype=x.dtype)

    def mark(phase):
        for obj in (recorder, detector):
            if obj is not None:
                obj.phase = phase

    def step():
        module.zero_grad(set_to_none=True)
        x.grad = None
        mark("fwd")
        with record_function("inspect::fwd"):
            y = module(x, ids)
        mark("bwd")
        with record_function("inspect::bwd"):
            y.backward(grad)

    return step


@contextlib.contextmanager
def _quiet_stderr():
    """The CPU-only profiler prints a CUDA device-count error and tracing markers on fd 2: hide them."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def run_passes(args, module) -> dict:
    """Passes 1-3 (see the module docstring) on the built module; returns the report dictionary."""
    # one thread: the CPU work is tiny, and a spinning OpenMP barrier on a shared core would dwarf the host time
    torch.set_num_threads(1)
    x = torch.randn(args.images, args.tokens, args.dim, dtype=DTYPES[args.dtype], requires_grad=True)
    ids = task_ids(args.images, args.tasks)
    recorder = hooks.Recorder()
    detector = torch_side.SyncDetector(ROOT)
    with hooks.gpu_code_path("ase_kernels", on_sync=detector.record), \
            hooks.compile_only(recorder, TARGETS[args.target], args.first_config):
        recorder.recording = True  # pass 1: compile every variant, record every launch
        make_step(module, x, ids, recorder)()
        recorder.recording = False
        # pass 1 cleared the autotuner's choice at every tuned launch (to compile every configuration): one
        # uncounted step lets each launch pick its configuration again, so pass 2 sees no tuning copies
        make_step(module, x, ids, recorder)()
        recorder.counts.clear()
        step = make_step(module, x, ids, recorder, detector)  # pass 2: steady state, counted
        with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            with detector:
                step()
            counts = dict(recorder.counts)
        small = torch.randn(args.tasks, HOST_TOKENS_PER_IMAGE, args.dim, dtype=x.dtype, requires_grad=True)
        ase = make_step(module, small, task_ids(args.tasks, args.tasks))
        bare = _bare_step(small.shape[:2], x.dtype)
        # pass 3: host time; the bare Mlp runs inside the hooks too, which it never calls
        host = torch_side.host_times_us(dict(ase=ase, bare=bare), args.host_reps)
        with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], record_shapes=True) as bare_prof:
            bare()  # its device ops, counted the same way (their number does not depend on its width)
    phases = {"inspect::fwd": "fwd", "inspect::bwd": "bwd"}
    torch_ops = torch_side.device_ops(prof.events(), phases)
    bare_ops = [o["op"] for o in torch_side.device_ops(bare_prof.events(), phases)]
    return assemble(args, recorder, counts, torch_ops, detector.syncs,
                    dict(tokens=small.shape[0] * small.shape[1], ase_us=host["ase"], bare_us=host["bare"],
                         bare_ops=bare_ops,
                         ratio=host["ase"]["median"] / host["bare"]["median"],
                         ratio_min=host["ase"]["min"] / host["bare"]["min"], bare_dims=BARE_HOST_DIMS))


def _bare_step(lead, dtype):
    """A frozen timm Mlp's eager forward+backward at the host-time shapes (input gradient only)."""
    from timm.layers import Mlp

    mlp = Mlp(*BARE_HOST_DIMS).to(dtype).requires_grad_(False)
    x = torch.randn(*lead, BARE_HOST_DIMS[0], dtype=dtype, requires_grad=True)
    grad = torch.randn_like(x)

    def step():
        x.grad = None
        with record_function("inspect::fwd"):
            y = mlp(x)
        with record_function("inspect::bwd"):
            y.backward(grad)

    return step


def assemble(args, recorder, counts, torch_ops, syncs, host) -> dict:
    """Everything as one JSON-ready dictionary (what --json writes and the tables print)."""
    variants, ids = [], {}
    for h, v in recorder.variants.items():
        facts = cubin.analyse(v.compiled)
        meta = v.compiled.metadata
        progs, limit = roofline.programs_per_sm(facts["regs"], meta.num_warps, facts["smem"])
        ids[h] = len(variants) + 1
        variants.append(dict(id=ids[h], hash=h, kernel=v.kernel, role=roofline.role(v.kernel, v.constexprs),
                             config="", tile=roofline.tile(v.constexprs), num_warps=meta.num_warps,
                             num_stages=meta.num_stages, constexprs=v.constexprs, programs_per_sm=progs,
                             limit=limit, **facts))
    launches = []
    for launch in recorder.launches:
        first = variants[ids[launch.configs[0][0]] - 1]
        n_flops = roofline.flops(launch.kernel, {**first["constexprs"], **launch.scalars})
        n_bytes = roofline.min_bytes(launch.tensors)
        floor, bound = roofline.floor_us(n_flops, n_bytes)
        configs = []
        for i, (h, grid) in enumerate(launch.configs):
            v = variants[ids[h] - 1]
            if len(launch.configs) > 1:
                v["config"] = str(i)
            programs = grid[0] * grid[1] * grid[2]
            configs.append(dict(variant=ids[h], grid=list(grid), programs=programs,
                                waves=programs / (roofline.H100["sms"] * max(v["programs_per_sm"], 1))))
        launches.append(dict(**asdict(launch) | dict(configs=configs), flops=n_flops, bytes=n_bytes,
                             floor_us=floor, bound=bound,
                             role=roofline.role(launch.kernel, first["constexprs"], launch.scalars)))
    for op in torch_ops:
        op["floor_us"] = op["bytes"] / roofline.H100["hbm"] * 1e6

    def by_phase(values):
        return dict(fwd=sum(v for p, v in values if p == "fwd"), bwd=sum(v for p, v in values if p == "bwd"),
                    total=sum(v for _, v in values))

    triton_n = by_phase([(p, n) for p, n in counts.items()])
    torch_n = by_phase([(o["phase"], 1) for o in torch_ops])
    summary = dict(triton=triton_n, torch_ops=torch_n, launches=triton_n["total"] + torch_n["total"],
                   syncs=by_phase([(s["phase"], 1) for s in syncs]),
                   triton_floor_us=by_phase([(la["phase"], la["floor_us"]) for la in launches]),
                   torch_floor_us=by_phase([(o["phase"], o["floor_us"]) for o in torch_ops]),
                   spilling_variants=sum(1 for v in variants if v["spill_store"] or v["spill_load"]),
                   recorded_launches=len(launches))
    workload = dict(module=f"ASEMlp({args.dim}, {args.hidden}, num_experts={args.experts}, top_k={args.top_k}, "
                           f"num_shared={args.shared}, rank={args.rank}, num_tasks={args.tasks}, mode={args.mode!r}, "
                           f"placement={args.placement!r})",
                    dtype=args.dtype, x_shape=[args.images, args.tokens, args.dim],
                    images_per_task=task_ids(args.images, args.tasks).bincount().tolist())
    workload["ffn_path"] = args.ffn
    return dict(command=" ".join(["python -m bench.inspect_kernels", *sys.argv[1:]]), target=args.target,
                versions=dict(torch=torch.__version__, triton=triton.__version__), workload=workload,
                gpu=roofline.H100, summary=summary, variants=variants, launches=launches, torch_ops=torch_ops,
                syncs=syncs, host=host)


def main(argv=None) -> int:
    args = parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("inspect_kernels: error: unset TRITON_INTERPRET: the kernels must be compiled, not interpreted")
    if os.environ.get("ASE_KERNELS_BACKEND", "triton").strip().lower() not in ("", "triton"):
        sys.exit("inspect_kernels: error: unset ASE_KERNELS_BACKEND: it would route the ops past the Triton kernels")
    os.environ["ASE_KERNELS_FFN"] = args.ffn  # a GPU measures both paths once per shape: here there is no GPU
    try:
        module = build(args)
    except (ValueError, TypeError) as e:  # the module's own argument checks (e.g. top_k + shared > experts)
        sys.exit(f"inspect_kernels: error: {e}")
    report = run_passes(args, module)
    print(tables.markdown(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
