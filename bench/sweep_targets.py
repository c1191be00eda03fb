"""The inspection tool over every target GPU and dtype, and the per-target table of bench/RESULTS.md.

    python -m bench.sweep_targets [--out DIR] [--first-config] [--targets sm_80,...] [--dtypes bf16,fp16,fp32,tf32]

Runs ``python -m bench.inspect_kernels`` (ViT-B FFN fwd+bwd, every autotune configuration unless --first-config)
once per target and dtype, in a child process each, writing ``DIR/<target>-<dtype>.json``; ``tf32`` is fp32 with
``--tf32`` (TF32 tensor cores allowed). A row whose JSON exists is not run again (delete it to redo it). Then
prints one Markdown row per target and dtype: variants, spilling variants, largest shared memory against the
block limit, the least programs per SM, launches with a variant that fits two programs per SM, and the floor of
one fwd+bwd at the target's peaks. Exits non-zero if any variant spills or does not fit.
"""

import argparse
import json
import os
import subprocess
import sys

from bench.kernel_inspect.roofline import GPUS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DTYPES = {"bf16": ["--dtype", "bf16"], "fp16": ["--dtype", "fp16"], "fp32": ["--dtype", "fp32"],
          "tf32": ["--dtype", "fp32", "--tf32"]}


def _list(kind: str, allowed):
    def parse(text: str) -> list[str]:
        items = [t for t in text.split(",") if t]
        bad = [t for t in items if t not in allowed]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"{kind} must be a comma list of {', '.join(allowed)}, got {text!r}")
        return items
    return parse


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        sys.exit(f"sweep_targets: error: {message}")


def run_row(target: str, dtype: str, path: str, first_config: bool, extra: list[str]) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "ASE_KERNELS_BACKEND")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
    tmp = path + ".part"
    cmd = [sys.executable, "-m", "bench.inspect_kernels", "--target", target, *DTYPES[dtype], "--host-rounds", "0",
           "--json", tmp, *(["--first-config"] if first_config else []), *extra]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"sweep_targets: error: {target} {dtype} failed:\n{proc.stderr[-3000:]}")
    os.replace(tmp, path)  # a row exists only once it is complete


def row(report: dict, dtype: str) -> tuple[list, bool]:
    """A table row and whether it holds (no spills, everything fits)."""
    s, g = report["summary"], report["gpu"]
    floor = s["triton_floor_us"]["total"] + s["torch_floor_us"]["total"]
    ok = s["spilling_variants"] == 0 and s["max_smem"] <= g["smem_per_block"] and s["min_programs_per_sm"] >= 1
    return [report["target"], g["gpu"], dtype, len(report["variants"]), s["spilling_variants"],
            f"{s['max_smem'] / 1024:.0f} / {g['smem_per_block'] // 1024}", s["min_programs_per_sm"],
            f"{s['two_per_sm_launches']} of {len(report['launches'])}", s["launches"], f"{floor:.0f}"], ok


HEADER = ["target", "GPU (figures)", "dtype", "variants", "spilling", "max smem KB / block limit",
          "least progs/SM", "launches with a 2-per-SM variant", "device launches", "floor µs fwd+bwd"]


def main(argv=None) -> int:
    p = _Parser(prog="python -m bench.sweep_targets", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "targets"),
                   help="directory of the JSON rows (default: runs/targets, git-ignored)")
    p.add_argument("--first-config", action="store_true", help="only the first surviving configuration per launch")
    p.add_argument("--targets", type=_list("--targets", tuple(GPUS)), default=list(GPUS))
    p.add_argument("--dtypes", type=_list("--dtypes", tuple(DTYPES)), default=list(DTYPES))
    args, extra = p.parse_known_args(argv)
    os.makedirs(args.out, exist_ok=True)
    rows, failed = [], []
    for target in args.targets:
        for dtype in args.dtypes:
            path = os.path.join(args.out, f"{target}-{dtype}{'-first' if args.first_config else ''}.json")
            if not os.path.exists(path):
                print(f"sweep_targets: {target} {dtype} ...", file=sys.stderr, flush=True)
                run_row(target, dtype, path, args.first_config, extra)
            with open(path) as f:
                cells, ok = row(json.load(f), dtype)
            rows.append(cells)
            if not ok:
                failed.append(f"{target} {dtype}")
    print("| " + " | ".join(HEADER) + " |\n|" + "---|" * len(HEADER))
    print("\n".join("| " + " | ".join(str(c) for c in r) + " |" for r in rows))
    if failed:
        print(f"sweep_targets: spills or shared memory over the limit in: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
