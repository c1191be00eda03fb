"""Turn a pytest-benchmark JSON (``pytest bench/ --benchmark-json=out.json``) into Markdown tables, the targets
of DESIGN.md with pass/fail, and a PNG plot.

    python bench/report.py out.json [--png bench/results.png] [--md bench/results.md]
"""

import argparse
import json
import math
from collections import defaultdict

IMPLS = ("bare", "lora", "loop", "dense", "compiled", "ase")


def load(path: str):
    with open(path) as f:
        data = json.load(f)
    rows = [dict(b["extra_info"], name=b["name"], median_s=b["stats"]["median"] if b.get("stats") else None)
            for b in data["benchmarks"]]
    return data.get("machine_info", {}), data.get("datetime", ""), rows


def _ms(row) -> float:
    return row.get("ms") or (1e3 * row["median_s"] if row.get("median_s") else math.nan)


def ffn_tables(rows) -> tuple[str, dict]:
    ffn = [r for r in rows if r["name"].startswith("bench_ffn[")]
    cells = {(r["impl"], r["config"], r["placement"], r["pass_"]): r for r in ffn}
    bare = {(r["placement"], r["pass_"]): r for r in ffn if r["impl"] == "bare"}
    lines = []
    for pass_ in ("fwd", "fwd+bwd"):
        lines += [f"\n### FFN {pass_}: median ms (ratio to the bare frozen Mlp; TFLOP/s of useful work)\n",
                  "| config | placement | " + " | ".join(IMPLS) + " | ase memory / bare |",
                  "|---|---|" + "---|" * (len(IMPLS) + 1)]
        for config in sorted({r["config"] for r in ffn}, key=lambda c: tuple(map(int, c.split("/")))):
            for placement in ("ffn", "fc1", "fc2", "fc1+fc2"):
                floor = bare.get((placement, pass_))
                out = []
                for impl in IMPLS:
                    r = cells.get((impl, config, placement, pass_))
                    if impl in ("bare", "lora") and r is None:
                        r = cells.get((impl, "32/6/2/2", placement, pass_))
                    if r is None:
                        out.append("-")
                        continue
                    ratio = f" ({_ms(r) / _ms(floor):.2f}x)" if floor else ""
                    out.append(f"{_ms(r):.3f}{ratio}, {r.get('tflops', math.nan):.1f}")
                ase, base = cells.get(("ase", config, placement, pass_)), floor
                mem = "-"
                if ase and base and ase.get("memory_mb") and base.get("memory_mb"):
                    mem = f"{ase['memory_mb'] / base['memory_mb']:.2f}x"
                lines.append(f"| {config} | {placement} | " + " | ".join(out) + f" | {mem} |")
    return "\n".join(lines), cells


def targets(cells) -> str:
    """DESIGN.md section 5, at 32/6/2/2, ffn placement, forward+backward."""
    def get(impl, config="32/6/2/2"):
        r = cells.get((impl, config, "ffn", "fwd+bwd"))
        return _ms(r) if r else math.nan

    def mem(impl):
        r = cells.get((impl, "32/6/2/2", "ffn", "fwd+bwd"))
        return r.get("memory_mb") if r else None

    ase = get("ase")
    checks = [
        ("ASE FFN / bare frozen Mlp (fwd+bwd)", ase / get("bare"), "<=", 1.25, "stretch 1.10"),
        ("per-expert loop / ASE", get("loop") / ase, ">=", 10.0, ""),
        ("dense-masked eager / ASE", get("dense") / ase, ">=", 2.0, ""),
        ("torch.compile(dense) / ASE", get("compiled") / ase, ">", 1.0, ""),
        ("ASE 64/12/4/1 / ASE 16/3/1/4", get("ase", "64/12/4/1") / get("ase", "16/3/1/4"), "<=", 1.05, ""),
        ("memory ASE / bare", (mem("ase") or math.nan) / (mem("bare") or math.nan), "<=", 1.10, ""),
    ]
    lines = ["\n### Targets (32/6/2/2, ffn placement, forward+backward)\n", "| target | measured | goal | |",
             "|---|---|---|---|"]
    for name, value, op, goal, note in checks:
        ok = {"<=": value <= goal, ">=": value >= goal, ">": value > goal}[op] if math.isfinite(value) else None
        verdict = "n/a" if ok is None else ("pass" if ok else "FAIL")
        lines.append(f"| {name} | {value:.2f} | {op} {goal} {note} | {verdict} |")
    return "\n".join(lines)


def other_tables(rows) -> str:
    lines = []
    route = [r for r in rows if r["name"].startswith("bench_route[")]
    if route:
        lines += ["\n### Routing alone, fwd+bwd (ms)\n", "| config | ak.route | torch topk+softmax |", "|---|---|---|"]
        by = defaultdict(dict)
        for r in route:
            by[r["config"]][r["impl"]] = _ms(r)
        for config, v in by.items():
            lines.append(f"| {config} | {v.get('ase', math.nan):.3f} | {v.get('torch', math.nan):.3f} |")
    vit = [r for r in rows if r["name"].startswith("bench_vit_train_step[")]
    if vit:
        lines += ["\n### 5-task ViT training step\n", "| implementation | images/s | ms/step | memory MB |",
                  "|---|---|---|---|"]
        for r in vit:
            lines.append(f"| {r['impl']} | {r['images_per_s']:.1f} | {_ms(r):.1f} | {r['memory_mb']:.0f} |")
    scaling = [r for r in rows if r["name"].startswith("bench_ffn_token_scaling[")]
    if scaling:
        lines += ["\n### Token scaling, 32/6/2/2 ffn fwd+bwd (ms)\n", "| images | tokens | bare | ase |",
                  "|---|---|---|---|"]
        by = defaultdict(dict)
        for r in scaling:
            by[(r["images"], r["tokens"])][r["impl"]] = _ms(r)
        for (images, tokens), v in sorted(by.items()):
            lines.append(f"| {images} | {tokens} | {v.get('bare', math.nan):.3f} | {v.get('ase', math.nan):.3f} |")
    return "\n".join(lines)


def plot(rows, cells, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = sorted({c for (_, c, _, _) in cells}, key=lambda c: tuple(map(int, c.split("/"))))
    fig, axes = plt.subplots(1, 3, figsize=(16, 4))
    width = 0.8 / len(IMPLS)
    for j, impl in enumerate(IMPLS):
        values = []
        for c in configs:
            r = cells.get((impl, c, "ffn", "fwd+bwd")) or cells.get((impl, "32/6/2/2", "ffn", "fwd+bwd"))
            values.append(_ms(r) if r else math.nan)
        axes[0].bar([i + j * width for i in range(len(configs))], values, width, label=impl)
        mems = []
        for c in configs:
            r = cells.get((impl, c, "ffn", "fwd+bwd")) or cells.get((impl, "32/6/2/2", "ffn", "fwd+bwd"))
            mems.append(r.get("memory_mb") or math.nan if r else math.nan)
        axes[1].bar([i + j * width for i in range(len(configs))], mems, width, label=impl)
    for ax, title in zip(axes[:2], ["FFN fwd+bwd time (ms), ffn placement", "FFN fwd+bwd memory (MB)"],
                         strict=True):
        ax.set_xticks([i + 0.4 for i in range(len(configs))], configs)
        ax.set_yscale("log")
        ax.set_title(title)
        ax.legend(fontsize=7)
    scaling = [r for r in rows if r["name"].startswith("bench_ffn_token_scaling[")]
    for impl in ("bare", "ase"):
        pts = sorted((r["tokens"], _ms(r)) for r in scaling if r["impl"] == impl)
        if pts:
            axes[2].plot(*zip(*pts, strict=True), marker="o", label=impl)
    axes[2].set_xscale("log")
    axes[2].set_yscale("log")
    axes[2].set_xlabel("tokens")
    axes[2].set_title("fwd+bwd time (ms) against tokens")
    axes[2].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("json")
    p.add_argument("--png", default=None, help="write the plot here")
    p.add_argument("--md", default=None, help="write the Markdown here (it is printed in any case)")
    args = p.parse_args(argv)
    machine, when, rows = load(args.json)
    tables, cells = ffn_tables(rows)
    head = (f"Measured {when} on {machine.get('gpu', machine.get('cpu', {}).get('brand_raw', 'CPU'))}; "
            f"torch {machine.get('torch')}, triton {machine.get('triton')}, CUDA {machine.get('cuda', '-')}; "
            f"{machine.get('dtype')}, {machine.get('shape')}.")
    text = "\n".join([head, targets(cells), tables, other_tables(rows)])
    if args.md:
        with open(args.md, "w") as f:
            f.write(text + "\n")
    if args.png:
        plot(rows, cells, args.png)
    print(text)
    return text


if __name__ == "__main__":
    main()
