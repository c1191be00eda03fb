"""Inspect one forward+backward of an ASE module for a GPU, without a GPU.

    python -m bench.inspect_kernels [--target sm_80|sm_86|sm_89|sm_90|sm_100|sm_120] [--dtype bf16|fp16|fp32]
                                    [--tf32] [--json FILE] [shape options]

from the repository root, with ase_kernels importable (``pip install -e .`` or ``PYTHONPATH=.``) and neither
``TRITON_INTERPRET`` nor ``ASE_KERNELS_BACKEND`` set; ``--help`` lists the options.

Runs ``ASEMlp`` (default: ViT-B FFN 768 -> 3072, 32 experts, top-6, 2 shared, rank 2, 5 tasks, placement ffn,
bf16, x = (64, 197, 768) task-major with 13/13/13/13/12 images per task, frozen fc1/fc2) on CPU tensors with
every Triton launch compiled for the target through Triton's own binder and not launched
(``bench/kernel_inspect``), and prints Markdown tables:

- per compiled variant (every autotune configuration that survives the kernels' pruning for the target):
  role, tile, warps, stages, registers, spill bytes, shared memory, programs per SM of the target, the MMA in
  its main loop (wgmma, mma.sync or tcgen05), TMA loads (UTMALDG);
- per launch: grid per variant, FLOPs, minimum HBM bytes, the roofline floor at the target GPU's datasheet
  peaks (``kernel_inspect/roofline.py`` names the GPU and cites each figure);
- for the whole forward+backward: device launches (Triton launches + torch ops that launch a CUDA kernel),
  host syncs and where they happen, and the host CPU time with the device work stubbed beside a bare timm
  ``Mlp``'s, measured fairly: both in fp32 (the CPU's 16-bit GEMMs and conversions would pad the bare side), the
  bare Mlp at small widths (its CPU compute negligible), the same gradient reset on both sides, no profiler
  markers in the timed steps, this thread's CPU time, alternating calls, and the ratio's spread over
  ``--host-rounds`` rounds.

Three passes: (1) compile and record (every autotuned launch compiles all its surviving configurations, or with
``--first-config`` the first), (2) count under ``torch.profiler`` and a sync detector (steady state: nothing is
compiled or tuned), (3) host time (``--host-rounds 0`` skips it). Compiled
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
TARGETS = tuple(roofline.GPUS)  # sm_80 sm_86 sm_89 sm_90 sm_100 sm_120
HOST_TOKENS_PER_IMAGE = 16  # host-time inputs: one image of 16 tokens per task, negligible CPU compute
BARE_HOST_DIMS = (16, 64)  # the bare Mlp's host path does not depend on its width; its CPU GEMMs at 768 cost ms


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        sys.exit(f"inspect_kernels: error: {message}")


def parse_args(argv=None) -> argparse.Namespace:
    p = _Parser(prog="python -m bench.inspect_kernels", description=__doc__.split("\n\n")[0])
    p.add_argument("--target", choices=TARGETS, default="sm_90", help="GPU to compile for")
    p.add_argument("--tf32", action="store_true",
                   help="fp32: allow TF32 tensor cores (torch.set_float32_matmul_precision('high')), as a user can")
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
    p.add_argument("--host-reps", type=int, default=50, help="timed calls per host-time round")
    p.add_argument("--host-rounds", type=int, default=5,
                   help="host-time rounds (the ratio's spread is over them); 0 skips the host-time pass")
    p.add_argument("--json", metavar="FILE", help="also write everything as JSON")
    args = p.parse_args(argv)
    for name in ("experts", "rank", "images", "tokens", "tasks", "dim", "hidden", "host_reps", "host_rounds"):
        least = 0 if name == "host_rounds" else 1
        if getattr(args, name) < least:
            p.error(f"--{name.replace('_', '-')} must be >= {least}, got {getattr(args, name)}")
    if args.images < args.tasks:
        p.error(f"--images ({args.images}) must be >= --tasks ({args.tasks}): every task needs an image")
    return args


def task_ids(images: int, tasks: int) -> torch.Tensor:
    """One id per image, task-major, the first tasks taking one image more: 64 images, 5 tasks -> 13,13,13,13,12."""
    per_task = [images // tasks + (t < images % tasks) for t in range(tasks)]
    return torch.repeat_interleave(torch.arange(tasks), torch.tensor(per_task))


def build(args, dtype: str | None = None) -> torch.nn.Module:
    torch.manual_seed(0)
    module = ASEMlp(args.dim, args.hidden, num_experts=args.experts, top_k=args.top_k, num_shared=args.shared,
                    rank=args.rank, num_tasks=args.tasks, mode=args.mode, placement=args.placement,
                    dtype=DTYPES[dtype or args.dtype])
    module.fc1.requires_grad_(False)
    module.fc2.requires_grad_(False)
    return module


def make_step(module, x, ids, recorder=None, detector=None, markers=True):
    """One forward+backward with fresh gradients; phases marked for the recorder, the detector and (markers) the
    trace. Without markers, the step is a user's: what the host-time pass times."""
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

    def user_step():
        module.zero_grad(set_to_none=True)
        x.grad = None
        module(x, ids).backward(grad)

    return step if markers else user_step


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
    with hooks.gpu_code_path("ase_kernels", args.target, on_sync=detector.record), \
            hooks.compile_only(recorder, args.target, args.first_config):
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
        host = _host_pass(args, module) if args.host_rounds else None
    phases = {"inspect::fwd": "fwd", "inspect::bwd": "bwd"}
    torch_ops = torch_side.device_ops(prof.events(), phases)
    return assemble(args, recorder, counts, torch_ops, detector.syncs, host)


def _host_pass(args, module) -> dict:
    """Pass 3: host time, both sides in fp32 (the same module in fp32: the host path does not depend on the dtype,
    the CPU's 16-bit arithmetic does); the bare Mlp runs inside the hooks too, which it never calls."""
    host_module = module if args.dtype == "fp32" else build(args, "fp32")
    small = torch.randn(args.tasks, HOST_TOKENS_PER_IMAGE, args.dim, requires_grad=True)
    ase = make_step(host_module, small, task_ids(args.tasks, args.tasks), markers=False)
    bare = _bare_step(small.shape[:2])
    rounds = [torch_side.host_times_us(dict(ase=ase, bare=bare), args.host_reps) for _ in range(args.host_rounds)]
    bare_marked = _bare_step(small.shape[:2], markers=True)
    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], record_shapes=True) as bare_prof:
        bare_marked()  # its device ops, counted the same way (their number does not depend on its width)
    bare_ops = [o["op"] for o in torch_side.device_ops(bare_prof.events(), {"inspect::fwd": "fwd",
                                                                              "inspect::bwd": "bwd"})]
    return dict(tokens=small.shape[0] * small.shape[1], bare_ops=bare_ops, bare_dims=BARE_HOST_DIMS, dtype="fp32",
                **torch_side.host_ratio(rounds))


def _bare_step(lead, markers=False):
    """A frozen fp32 timm Mlp's eager forward+backward at the host-time shapes (input gradient only), with the
    ASE step's gradient reset; markers: phases marked for the trace (counting its ops, never timed)."""
    from timm.layers import Mlp

    mlp = Mlp(*BARE_HOST_DIMS).requires_grad_(False)
    x = torch.randn(*lead, BARE_HOST_DIMS[0], requires_grad=True)
    grad = torch.randn_like(x)

    def step():
        mlp.zero_grad(set_to_none=True)
        x.grad = None
        with record_function("inspect::fwd"):
            y = mlp(x)
        with record_function("inspect::bwd"):
            y.backward(grad)

    def user_step():
        mlp.zero_grad(set_to_none=True)
        x.grad = None
        mlp(x).backward(grad)

    return step if markers else user_step


def assemble(args, recorder, counts, torch_ops, syncs, host) -> dict:
    """Everything as one JSON-ready dictionary (what --json writes and the tables print)."""
    gpu = roofline.GPUS[args.target]
    peak = roofline.peak_flops(gpu, args.dtype, args.tf32)
    variants, ids = [], {}
    for h, v in recorder.variants.items():
        facts = cubin.analyse(v.compiled)
        meta = v.compiled.metadata
        progs, limit = roofline.programs_per_sm(facts["regs"], meta.num_warps, facts["smem"], gpu)
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
        floor, bound = roofline.floor_us(n_flops, n_bytes, gpu, peak)
        configs = []
        for i, (h, grid) in enumerate(launch.configs):
            v = variants[ids[h] - 1]
            if len(launch.configs) > 1:
                v["config"] = str(i)
            programs = grid[0] * grid[1] * grid[2]
            configs.append(dict(variant=ids[h], grid=list(grid), programs=programs,
                                waves=programs / (gpu["sms"] * max(v["programs_per_sm"], 1))))
        launches.append(dict(**asdict(launch) | dict(configs=configs), flops=n_flops, bytes=n_bytes,
                             floor_us=floor, bound=bound,
                             role=roofline.role(launch.kernel, first["constexprs"], launch.scalars)))
    for op in torch_ops:
        op["floor_us"] = op["bytes"] / gpu["hbm"] * 1e6

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
                   max_smem=max((v["smem"] for v in variants), default=0),
                   min_programs_per_sm=min((v["programs_per_sm"] for v in variants), default=0),
                   two_per_sm_launches=sum(1 for la in launches
                                           if any(variants[c["variant"] - 1]["programs_per_sm"] >= 2
                                                  for c in la["configs"])),
                   recorded_launches=len(launches))
    workload = dict(module=f"ASEMlp({args.dim}, {args.hidden}, num_experts={args.experts}, top_k={args.top_k}, "
                           f"num_shared={args.shared}, rank={args.rank}, num_tasks={args.tasks}, mode={args.mode!r}, "
                           f"placement={args.placement!r})",
                    dtype=args.dtype, x_shape=[args.images, args.tokens, args.dim],
                    images_per_task=task_ids(args.images, args.tasks).bincount().tolist())
    workload["ffn_path"] = args.ffn
    workload["fp32_precision"] = ("tf32" if args.tf32 else "ieee") if args.dtype == "fp32" else None
    return dict(command=" ".join(["python -m bench.inspect_kernels", *sys.argv[1:]]), target=args.target,
                ptxas_arch=cubin.compilable(hooks.arch(args.target))[1], peak_flops=peak,
                versions=dict(torch=torch.__version__, triton=triton.__version__), workload=workload,
                gpu=gpu, summary=summary, variants=variants, launches=launches, torch_ops=torch_ops,
                syncs=syncs, host=host)


def main(argv=None) -> int:
    args = parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("inspect_kernels: error: unset TRITON_INTERPRET: the kernels must be compiled, not interpreted")
    if os.environ.get("ASE_KERNELS_BACKEND", "triton").strip().lower() not in ("", "triton"):
        sys.exit("inspect_kernels: error: unset ASE_KERNELS_BACKEND: it would route the ops past the Triton kernels")
    os.environ["ASE_KERNELS_FFN"] = args.ffn  # a GPU measures both paths once per shape: here there is no GPU
    ok, name = cubin.compilable(hooks.arch(args.target))
    if not ok:
        sys.exit(f"inspect_kernels: error: --target {args.target}: Triton {triton.__version__}'s bundled ptxas "
                 f"cannot compile for {name}; nothing was compiled")
    if args.tf32:
        torch.set_float32_matmul_precision("high")
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
