"""The measurements a short GPU session can afford, side by side in one process (``bash bench/gpu_session.sh
quick`` runs it after tests/test_gpu.py):

1. the ASE FFN forward+backward (ViT-B, 64 x 197 tokens, bf16, frozen fc1/fc2) over the bare frozen timm ``Mlp``,
   for 32/6/2/2 and 16/3/1/4, on both GPU paths (``ASE_KERNELS_FFN=fused|cublas``), eager and replayed as one
   CUDA graph, each path first checked against the float64 reference;
2. the peak memory of that step over the bare ``Mlp``'s;
3. one 5-task ViT-B training step (bench/bench_vit.py's model, 16 images per task), images/s, ASE 32/6/2/2 against
   the plain MTL-ViT, eager;
4. a torch.profiler top-10 of one ASE FFN forward+backward (32/6/2/2, fused).

    python -m bench.gpu_quick [--out DIR] [--dry-run]

Writes DIR/gpu_quick.json and DIR/gpu_quick.md (DIR: --out, else $OUT, else bench/) after every step, and prints
the table last. A failed step is recorded and the others run (exit status 1); no step starts past --budget-s.
``--dry-run`` runs the same code on the CPU at bench/conftest.py's CPU shapes, the kernels under Triton's
interpreter (no CUDA graph is captured there: the graphed rows replay the eager step), so that CI finds what a CPU
can find before a GPU minute is spent. Nothing is installed or compiled by torch.compile; the Triton kernels compile
(and the one autotuned kernel tries those of its configurations that fit the GPU) on first use.
"""

import argparse
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = ((32, 6, 2, 2), (16, 3, 1, 4))  # the paper's best, and the 4-rank configuration of DESIGN.md
PATHS = ("fused", "cublas")
VIT_IMAGES = 16  # images per task of the training step on a GPU (80 images through the backbone)


BUDGET_S = 480  # the whole quick session (tests included) stops measuring here: a 10-minute command keeps its files


def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m bench.gpu_quick", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT") or os.path.join(ROOT, "bench"),
                   help="folder for gpu_quick.json and gpu_quick.md (default: $OUT, else bench/)")
    p.add_argument("--dry-run", action="store_true",
                   help="run on the CPU at tiny shapes, kernels under TRITON_INTERPRET=1 (what CI runs)")
    p.add_argument("--budget-s", type=float, default=None,
                   help=f"seconds of measuring; steps not started by then are listed as skipped (default: {BUDGET_S} "
                        "on a GPU, no limit on a dry run)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    """Runs every step it has time for, writing DIR/gpu_quick.{json,md} after each (a killed run keeps what it
    measured); a step that fails is recorded and the others still run. Exits 1 if any step or check failed."""
    args = _parse(argv)
    if args.dry_run:
        # before torch and triton are imported: no GPU is seen, and kernels are defined for the interpreter
        os.environ.update(CUDA_VISIBLE_DEVICES="", TRITON_INTERPRET="1")
    os.environ["ASE_KERNELS_BACKEND"] = "triton"  # the kernels, also on the CPU of a dry run
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import bench_vit
    import torch
    from baselines import build, make_ase, reference
    from bench_ffn import _check, _inputs, ffn_flops
    from conftest import ENV, GPU, Timer, memory_mb

    if args.dry_run == GPU:
        sys.exit("gpu_quick: --dry-run is for a CPU, and without it a CUDA GPU is needed "
                 f"(torch.cuda.is_available() is {GPU})")
    os.makedirs(args.out, exist_ok=True)
    budget_s = args.budget_s if args.budget_s is not None else BUDGET_S if GPU else float("inf")
    start = time.perf_counter()
    torch.manual_seed(0)
    warmup, reps = (5, 20) if GPU else (0, 1)  # a dry run checks that it runs, once
    tokens = ENV.images * ENV.tokens_per_image
    result = dict(machine=_machine(torch, GPU), dry_run=args.dry_run,
                  shapes=dict(ffn=f"{ENV.dim} -> {ENV.hidden} -> {ENV.dim}", tokens=tokens,
                              dtype=str(ENV.dtype).removeprefix("torch."), vit=ENV.vit),
                  ffn=[], memory=[], vit_step=[], profile=None, errors=[], skipped=[], complete=False, wall_s=0.0)

    def save():
        """gpu_quick.{json,md} as they stand (each replaced whole, so a kill leaves the previous version)."""
        result["wall_s"] = time.perf_counter() - start
        for name, text in (("gpu_quick.json", json.dumps(result, indent=1)), ("gpu_quick.md", _markdown(result))):
            path = os.path.join(args.out, name)
            with open(path + ".tmp", "w") as f:
                f.write(text)
            os.replace(path + ".tmp", path)

    def step(name, fn):
        """fn() unless the budget is spent (then name is listed as skipped); an exception is recorded, not raised."""
        if time.perf_counter() - start > budget_s:
            result["skipped"].append(name)
            print(f"gpu_quick: {name}: skipped, past the {budget_s:.0f} s budget", file=sys.stderr)
            return
        try:
            fn()
        except Exception as e:  # recorded and shown; the other steps still measure
            result["errors"].append(f"{name}: {type(e).__name__}: {str(e)[:500]}")
            print(f"gpu_quick: {name}: FAILED: {type(e).__name__}: {str(e)[:500]}", file=sys.stderr)
            try:  # a failed launch surfaces here, not in the next step; a lost CUDA context fails each step after
                if GPU:
                    torch.cuda.synchronize()
            except Exception as lost:
                result["errors"].append(f"{name}: then torch.cuda.synchronize: {type(lost).__name__}: {lost}"[:600])
        print(f"gpu_quick: {name}: done at {time.perf_counter() - start:.0f} s", file=sys.stderr)
        save()

    save()  # the machine and shapes, before the first step

    def median_ms(fn, *inputs) -> float:
        timer = Timer(fn)
        for _ in range(warmup + reps):
            timer(*inputs)
        return statistics.median(timer.times[warmup:])

    def graphed(fn, *inputs):
        """fn(*inputs) captured once as a CUDA graph; the returned callable replays it (a dry run: runs it)."""
        if not GPU:
            return lambda: fn(*inputs)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the capture: kernels compile and tune, gradients exist
            for _ in range(3):
                fn(*inputs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn(*inputs)
        return graph.replay

    def fwd_bwd(module):
        return lambda x, grad: module(x).backward(grad)

    def ffn(config):
        cid = "/".join(map(str, config))
        ase = make_ase(ENV.dim, ENV.hidden, config, "ffn", ENV.device, ENV.dtype)
        ref = reference("ase", ase, ase)  # float64, built before the first forward
        bare = build("bare", ase)
        x, grad = _inputs(ENV.images, True)
        exclude = [*ase.parameters(), *bare.parameters(), x, grad]
        bare_ms = {"eager": median_ms(fwd_bwd(bare), x, grad), "graphed": median_ms(graphed(fwd_bwd(bare), x, grad))}
        bare_mb = memory_mb(fwd_bwd(bare), (x, grad), exclude=exclude)
        for path in PATHS:
            os.environ["ASE_KERNELS_FFN"] = path  # read at every call (kernels/ffn.py: ffn_path)
            try:
                for p in [*ref.parameters(), *ase.parameters()]:  # what the previous path accumulated
                    p.grad = None
                try:
                    err, failed = _check("ase", ase, ref, ase, ENV.images, True), None
                except AssertionError as e:  # timed all the same, and flagged: the exit status says so
                    err, failed = None, str(e)[:500]
                    result["errors"].append(f"ffn {cid} {path}: check against float64 failed: {failed}")
                fn, flops = fwd_bwd(ase), ffn_flops(tokens, config, "ffn", "ase", True)
                times = {"eager": median_ms(fn, x, grad), "graphed": median_ms(graphed(fn, x, grad))}
                for mode, ms in times.items():
                    result["ffn"].append(dict(config=cid, path=path, mode=mode, ms=ms, bare_ms=bare_ms[mode],
                                              ratio=ms / bare_ms[mode], rel_err=err, check_failed=failed,
                                              tflops=flops / (ms * 1e-3) / 1e12))
                mb = memory_mb(fwd_bwd(ase), (x, grad), exclude=exclude)
                result["memory"].append(dict(config=cid, path=path, ase_mb=mb, bare_mb=bare_mb,
                                             ratio=mb / max(bare_mb, 1e-9), kind="peak" if GPU else "saved"))
            finally:
                os.environ.pop("ASE_KERNELS_FFN")

    def vit(impl):
        images = VIT_IMAGES if GPU else ENV.vit_images[0]
        model = bench_vit.make_model(impl)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=GPU)
        ms = median_ms(bench_vit.train_step(model, model, impl, opt), bench_vit.make_batch(images))
        result["vit_step"].append(dict(impl=impl, images_per_task=images, tasks=len(bench_vit.TASKS), ms=ms,
                                       images_per_s=images / ms * 1e3))
        rows = {r["impl"]: r for r in result["vit_step"]}
        if {"ase", "plain"} <= rows.keys():
            rows["ase"]["vs_plain"] = rows["ase"]["images_per_s"] / rows["plain"]["images_per_s"]

    def profile():
        result["profile"] = _profile(torch, make_ase, _inputs, ENV, GPU)

    for config in CONFIGS:
        step(f"ffn {'/'.join(map(str, config))}", lambda config=config: ffn(config))
        if GPU:
            torch.cuda.empty_cache()  # the next configuration starts without this one's cached blocks
    for impl in ("ase", "plain"):
        step(f"vit {impl}", lambda impl=impl: vit(impl))
        if GPU:
            torch.cuda.empty_cache()
    step("profile", profile)
    result["complete"] = True
    save()
    print(_markdown(result))
    return result


def _profile(torch, make_ase, inputs, env, gpu) -> dict:
    """torch.profiler's top 10 by self device time (CPU time on a dry run) of one ASE FFN forward+backward."""
    from torch.profiler import ProfilerActivity, profile

    os.environ["ASE_KERNELS_FFN"] = "fused"
    try:
        ase = make_ase(env.dim, env.hidden, CONFIGS[0], "ffn", env.device, env.dtype)
        x, grad = inputs(env.images, True)
        for _ in range(2):  # compiled and tuned before the profiled call
            ase(x).backward(grad)
        if gpu:
            torch.cuda.synchronize()  # the warm-up's kernels end before the profiler starts
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
        with profile(activities=activities) as prof:
            ase(x).backward(grad)
            if gpu:
                torch.cuda.synchronize()
    finally:
        os.environ.pop("ASE_KERNELS_FFN")
    key = "self_device_time_total" if gpu else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)[:10]
    rows = [dict(name=e.key, calls=e.count, self_us=getattr(e, key)) for e in events]
    return dict(layer="ASE FFN 32/6/2/2, fused, forward+backward", sorted_by=key, rows=rows,
                device=_device_busy(prof.events(), torch.autograd.DeviceType.CUDA))


def _device_busy(events, device_type) -> dict | None:
    """Whether the GPU idles between launches: the time in which some kernel (or copy) of ``events`` of
    ``device_type`` ran, over the span from the first one's start to the last one's end (microseconds, the
    profiler's ``time_range``). None where there is none (a dry run)."""
    spans = sorted((e.time_range.start, e.time_range.end) for e in events if e.device_type == device_type)
    if not spans:
        return None
    busy, (lo, hi) = 0.0, spans[0]
    for start, end in spans[1:]:  # merged, so that overlapping kernels (several streams) count once
        if start > hi:
            busy, lo, hi = busy + hi - lo, start, end
        else:
            hi = max(hi, end)
    busy += hi - lo
    span = max(end for _, end in spans) - spans[0][0]
    return dict(launches=len(spans), busy_us=busy, span_us=span, idle_share=1 - busy / span if span > 0 else 0.0)


def _machine(torch, gpu) -> dict:
    import triton

    info = dict(torch=torch.__version__, triton=triton.__version__, python=sys.version.split()[0])
    if gpu:
        info.update(gpu=torch.cuda.get_device_name(), cuda=torch.version.cuda)
    return info


def _markdown(r: dict) -> str:
    """The tables of what r holds so far (a step not yet run, skipped or failed has no rows)."""
    m, s = r["machine"], r["shapes"]
    where = m.get("gpu", "CPU (dry run: interpreter, tiny shapes; no number here is a measurement)")
    state = "complete" if r["complete"] else "INCOMPLETE (still running, or killed)"
    lines = [f"## Quick GPU session: {where}", "",
             f"torch {m['torch']}, triton {m['triton']}; FFN {s['ffn']}, {s['tokens']} tokens, {s['dtype']}; "
             f"wall {r['wall_s']:.0f} s; {state}", ""]
    notes = [f"- FAILED {e}" for e in r["errors"]] + [f"- skipped (budget): {x}" for x in r["skipped"]]
    lines += notes + [""] * bool(notes)
    lines += ["### ASE FFN forward+backward over the bare frozen timm Mlp", "",
              "| N/k/S/r | path | mode | ms | bare ms | ratio | TFLOP/s | rel. err vs fp64 |",
              "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {x['config']} | {x['path']} | {x['mode']} | {x['ms']:.3f} | {x['bare_ms']:.3f} | {x['ratio']:.2f}x | "
              f"{x['tflops']:.1f} | {'CHECK FAILED' if x['rel_err'] is None else format(x['rel_err'], '.1e')} |"
              for x in r["ffn"]]
    kind = r["memory"][0]["kind"] if r["memory"] else ""
    lines += ["", f"### Memory of the step over the bare Mlp ({kind} MiB)", "",
              "| N/k/S/r | path | ASE MiB | bare MiB | ratio |", "|---|---|---|---|---|"]
    lines += [f"| {x['config']} | {x['path']} | {x['ase_mb']:.1f} | {x['bare_mb']:.1f} | {x['ratio']:.2f}x |"
              for x in r["memory"]]
    lines += ["", "### 5-task ViT training step (eager)", "",
              "| model | images per task | ms | images/s |", "|---|---|---|---|"]
    names = {"ase": "ASE 32/6/2/2", "plain": "plain MTL-ViT"}
    lines += [f"| {names[x['impl']]} | {x['images_per_task']} | {x['ms']:.1f} | {x['images_per_s']:.1f} |"
              for x in r["vit_step"]]
    if r["vit_step"] and "vs_plain" in r["vit_step"][0]:
        lines += ["", f"ASE / plain throughput: {r['vit_step'][0]['vs_plain']:.2f}x"]
    if r["profile"]:
        lines += ["", f"### Profile: {r['profile']['layer']}, top 10 by {r['profile']['sorted_by']}", "",
                  "| op | calls | self us |", "|---|---|---|"]
        lines += [f"| `{x['name'][:80]}` | {x['calls']} | {x['self_us']:.1f} |" for x in r["profile"]["rows"]]
        d = r["profile"].get("device")
        if d:
            lines += ["", f"The GPU ran {d['launches']} kernels and copies for {d['busy_us']:.0f} us of the "
                          f"{d['span_us']:.0f} us from the first one's start to the last one's end: idle "
                          f"{100 * d['idle_share']:.0f}% of it (between launches)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(1 if main()["errors"] else 0)
