"""Turn pytest-benchmark JSON from ``pytest bench/ --benchmark-json=out.json`` into Markdown tables, the targets
of DESIGN.md section 5 with pass/fail, and a PNG plot (time and memory per implementation and configuration,
scaling with tokens and with N at fixed N * r, routing, the ViT training step).

    python bench/report.py out.json [more.json ...] [--md bench/report.md] [--png bench/report.png]

Several JSON files (e.g. runs split with ``-k``) are merged; they should come from the same machine.
"""

import argparse
import functools
import json
import math
from collections import defaultdict

IMPLS = ("bare", "lora", "loop", "dense", "compiled", "ase")
PLACEMENTS = ("ffn", "fc1", "fc2", "fc1+fc2")
TARGET = "32/6/2/2"
CONFIG_ORDER = ("16/4/0/4", "32/8/0/2", "16/3/1/4", "32/6/2/2", "64/12/4/1")  # DESIGN.md's order
COLORS = dict(zip(IMPLS, ("C7", "C1", "C3", "C0", "C4", "C2"), strict=True)) | {"torch": "C0", "plain": "C7",
                                                                               "reference": "C3"}
NAN = math.nan


class ReportError(Exception):
    """A JSON file that is missing, empty, not pytest-benchmark's, or holds no measurement; the message names it."""


def load(paths: list[str]):
    """All benchmark rows of the files (extra_info plus the test name), the first file's machine info and date."""
    rows, machine, when = [], {}, ""
    for path in paths:
        try:
            with open(path) as f:
                data = json.load(f)
        except FileNotFoundError:
            raise ReportError(f"{path}: no such file (write it with pytest bench/ --benchmark-json={path})") from None
        except (OSError, ValueError) as e:
            raise ReportError(f"{path}: empty or not JSON ({e}); did the benchmark run finish?") from None
        if not isinstance(data, dict) or not isinstance(data.get("benchmarks"), list):
            raise ReportError(f"{path}: not pytest-benchmark JSON (no 'benchmarks' list)")
        machine, when = machine or data.get("machine_info", {}), when or data.get("datetime", "")
        for b in data["benchmarks"]:
            if "ms" in b.get("extra_info", {}):
                # rows from before the benchmarks had modes ran eager
                rows.append({"mode": "eager", **b["extra_info"], "test": b["name"].split("[")[0]})
    if not rows:
        raise ReportError(f"{', '.join(paths)}: no benchmark measured anything (all skipped or failed?)")
    return rows, machine, when


def impl_label(impl: str, gpu: bool) -> str:
    """On a CPU, ak's ops dispatch to their vectorised PyTorch path, not to the Triton kernels: say so."""
    return "ase (torch fallback, CPU)" if impl == "ase" and not gpu else impl


def _config_key(config: str):
    return (CONFIG_ORDER.index(config) if config in CONFIG_ORDER else len(CONFIG_ORDER), config)


def _n(config: str) -> int:
    return int(config.split("/")[0])


def _shared(config: str) -> int:
    return int(config.split("/")[2])


def _fmt(value, spec=".3f", none="-") -> str:
    return none if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def _ratio(a, b) -> float:
    return a / b if a is not None and b else NAN


class FFN:
    """The bench_ffn rows by (impl, config, placement, pass); bare is measured once and is the floor of all."""

    def __init__(self, rows):
        self.cells = {(r["impl"], r["config"], r["placement"], r["pass_"]): r for r in rows if r["test"] == "bench_ffn"}
        self.configs = sorted({c for (_, c, _, _) in self.cells}, key=_config_key)

    def get(self, impl, config, placement, pass_):
        cell = self.cells.get((impl, config, placement, pass_))
        if cell is None and impl == "bare":  # the frozen Mlp has no experts: one measurement for every row
            cell = next((r for (i, _, _, p), r in self.cells.items() if i == "bare" and p == pass_), None)
        if cell is None and impl == "lora":  # rank (k+S)*r = 16 in every configuration: measured at 32/6/2/2
            cell = self.cells.get(("lora", TARGET, placement, pass_))
        return cell

    def value(self, key, impl, config=TARGET, placement="ffn", pass_="fwd+bwd"):
        cell = self.get(impl, config, placement, pass_)
        return cell.get(key) if cell else None


def targets(ffn: FFN) -> list[tuple[str, float, str, float, str]]:
    """DESIGN.md section 5 at 32/6/2/2, ffn placement, forward+backward: (name, value, op, goal, verdict)."""
    ms, mem = functools.partial(ffn.value, "ms"), functools.partial(ffn.value, "memory_mb")
    ase = ms("ase")
    checks = [
        ("ASE FFN fwd+bwd / bare frozen Mlp", _ratio(ase, ms("bare")), "<=", 1.25),
        ("per-expert loop / ASE (speed-up)", _ratio(ms("loop"), ase), ">=", 10.0),
        ("dense-masked eager / ASE (speed-up)", _ratio(ms("dense"), ase), ">=", 2.0),
        ("torch.compile(dense) / ASE (speed-up)", _ratio(ms("compiled"), ase), ">", 1.0),
        ("ASE 64/12/4/1 / ASE 16/3/1/4", _ratio(ms("ase", "64/12/4/1"), ms("ase", "16/3/1/4")), "<=", 1.05),
        ("memory ASE / bare frozen Mlp", _ratio(mem("ase"), mem("bare")), "<=", 1.10),
    ]
    out = []
    for name, value, op, goal in checks:
        ok = {"<=": value <= goal, ">=": value >= goal, ">": value > goal}[op]
        out.append((name, value, op, goal, "n/a" if math.isnan(value) else ("pass" if ok else "FAIL")))
    return out


def header(machine: dict, when: str) -> str:
    device = machine.get("gpu") or (machine.get("cpu", {}) or {}).get("brand_raw") or machine.get("processor", "?")
    gpu = "gpu" in machine
    lines = ["# ASE kernels: benchmark results",
             f"Measured {when or '?'} on **{device}** ({'GPU' if gpu else 'CPU, not a performance claim'}); "
             f"torch {machine.get('torch')}, triton {machine.get('triton')}, CUDA {machine.get('cuda', '-')}, "
             f"Python {machine.get('python')}; {machine.get('dtype')}; {machine.get('shape')}.",
             f"Command: `{machine.get('command', '?')}`."]
    if not gpu:
        lines.append("The targets are defined for an H100 in bf16 at 12,608 tokens: on this CPU run the verdicts "
                     "only show that the report works.")
    return "\n\n".join(lines)


def targets_table(rows) -> str:
    lines = ["\n### Targets (32/6/2/2, ffn placement, forward+backward)\n", "| target | measured | goal | verdict |",
             "|---|---|---|---|"]
    for name, value, op, goal, verdict in rows:
        lines.append(f"| {name} | {_fmt(value, '.2f')} | {op} {goal:g} | {verdict} |")
    return "\n".join(lines)


def ffn_tables(ffn: FFN, gpu: bool = True) -> str:
    memory_kind = next((r.get("memory_kind") for r in ffn.cells.values()), "peak")
    what = {"ms": "median ms (ratio to the bare frozen Mlp)", "tflops": "TFLOP/s of useful work",
            "memory_mb": f"{'peak' if memory_kind == 'peak' else 'saved-activation'} memory MiB (ratio to bare)"}
    lines = []
    for pass_ in ("fwd", "fwd+bwd"):
        for key, title in what.items():
            if all(r.get(key) is None for (_, _, _, p), r in ffn.cells.items() if p == pass_):
                continue  # e.g. saved-activation memory of a CPU forward without grad: there is none
            lines += [f"\n### FFN {pass_}: {title}\n",
                      "| config | placement | " + " | ".join(impl_label(i, gpu) for i in IMPLS) + " |",
                      "|---|---|" + "---|" * len(IMPLS)]
            for config in ffn.configs:
                for placement in PLACEMENTS:
                    floor = ffn.value(key, "bare", config, placement, pass_)
                    cells = []
                    for impl in IMPLS:
                        v = ffn.value(key, impl, config, placement, pass_)
                        cell = _fmt(v, ".3f" if key == "ms" else ".2f" if key == "tflops" else ".1f")
                        if key != "tflops" and v is not None and floor:
                            cell += f" ({v / floor:.2f}x)"
                        cells.append(cell)
                    lines.append(f"| {config} | {placement} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def scaling_table(rows, test: str, impls, title: str, gpu: bool = True) -> str:
    by = defaultdict(dict)
    for r in rows:
        if r["test"] == test:
            by[(r["images"], r["tokens"])][r["impl"]] = r["ms"]
    if not by:
        return ""
    lines = [f"\n### {title}\n", "| images | tokens | " + " | ".join(impl_label(i, gpu) for i in impls) + " |",
             "|---|---|" + "---|" * len(impls)]
    for (images, tokens), v in sorted(by.items()):
        lines.append(f"| {images} | {tokens} | " + " | ".join(_fmt(v.get(i)) for i in impls) + " |")
    return "\n".join(lines)


def route_table(rows) -> str:
    by = {(r["config"], r["pass_"], r["impl"]): r for r in rows if r["test"] == "bench_route"}
    if not by:
        return ""
    lines = ["\n### Routing alone (5 task routers): median ms, TFLOP/s, memory MiB\n",
             "| config | pass | ak.route | torch topk+softmax | speed-up | ak.route TFLOP/s | memory ak / torch |",
             "|---|---|---|---|---|---|---|"]
    for config in sorted({c for c, _, _ in by}, key=_config_key):
        for pass_ in ("fwd", "fwd+bwd"):
            a, t = by.get((config, pass_, "ase"), {}), by.get((config, pass_, "torch"), {})
            lines.append(f"| {config} | {pass_} | {_fmt(a.get('ms'))} | {_fmt(t.get('ms'))} | "
                         f"{_fmt(_ratio(t.get('ms'), a.get('ms')), '.2f')}x | {_fmt(a.get('tflops'), '.2f')} | "
                         f"{_fmt(a.get('memory_mb'), '.2f')} / {_fmt(t.get('memory_mb'), '.2f')} |")
    return "\n".join(lines)


def vit_table(rows, gpu: bool = True) -> str:
    vit = [r for r in rows if r["test"] == "bench_vit_train_step"]
    if not vit:
        return ""
    plain = {r["images"]: r["ms"] for r in vit if r["impl"] == "plain" and r["mode"] == "eager"}
    modes = ("eager", "compiled", "graphed")
    lines = ["\n### 5-task ViT training step (images per task; the backbone batch is 5x that)\n",
             "| images/task | implementation, mode | images/s | ms/step | x plain eager | TFLOP/s | memory MiB |",
             "|---|---|---|---|---|---|---|"]
    for r in sorted(vit, key=lambda r: (r["images"], ("plain", "ase", "reference").index(r["impl"]),
                                        modes.index(r["mode"]))):
        label = impl_label(r["impl"], gpu) + ("" if r["mode"] == "eager" else f", {r['mode']}")
        lines.append(f"| {r['images']} | {label} | {r['images_per_s']:.1f} | {r['ms']:.1f} | "
                     f"{_fmt(_ratio(r['ms'], plain.get(r['images'])), '.2f')} | {_fmt(r.get('tflops'), '.2f')} | "
                     f"{_fmt(r.get('memory_mb'), '.0f')} |")
    return "\n".join(lines)


def plot(rows, ffn: FFN, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 4, figsize=(24, 9))
    width = 0.8 / len(IMPLS)

    def bars(ax, key, groups, get, title):
        for j, impl in enumerate(IMPLS):
            values = [(get(key, impl, g) or NAN) for g in groups]
            ax.bar([i + j * width for i in range(len(groups))], values, width, label=impl, color=COLORS[impl])
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(groups))], groups)
        ax.set_yscale("log")
        ax.set_title(title)
        ax.legend(fontsize=7)

    bars(axes[0, 0], "ms", ffn.configs, lambda k, i, c: ffn.value(k, i, c), "FFN fwd+bwd, ffn placement: ms")
    bars(axes[0, 1], "memory_mb", ffn.configs, lambda k, i, c: ffn.value(k, i, c), "FFN fwd+bwd: memory MiB")
    bars(axes[0, 2], "ms", list(PLACEMENTS), lambda k, i, p: ffn.value(k, i, TARGET, p),
         "FFN fwd+bwd at 32/6/2/2 per placement: ms")
    bars(axes[0, 3], "ms", ffn.configs, lambda k, i, c: ffn.value(k, i, c, "ffn", "fwd"), "FFN fwd only: ms")

    def curves(ax, test, impls, title, xkey="tokens"):
        for impl in impls:
            pts = sorted((r[xkey], r["ms"]) for r in rows if r["test"] == test and r["impl"] == impl)
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=impl, color=COLORS[impl])
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(xkey)
        ax.set_title(title)
        ax.legend(fontsize=7)

    curves(axes[1, 0], "bench_ffn_scaling", IMPLS, "FFN fwd+bwd 32/6/2/2 against tokens: ms")
    ax = axes[1, 1]  # N at fixed N * r = 64, (k + S) * r = 16: with shared experts solid, without dashed
    for impl in ("loop", "dense", "compiled", "ase"):
        for shared, style in ((True, "-"), (False, "--")):
            pts = sorted((_n(c), ffn.value("ms", impl, c)) for c in ffn.configs
                         if (_shared(c) > 0) == shared and ffn.value("ms", impl, c))
            if pts:
                ax.plot(*zip(*pts, strict=True), style, marker="o", label=f"{impl}{'' if shared else ' (S=0)'}",
                        color=COLORS[impl])
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("N (N*r = 64)")
    ax.set_title("FFN fwd+bwd against N at fixed N*r: ms")
    ax.legend(fontsize=7)
    curves(axes[1, 2], "bench_route_scaling", ("ase", "torch"), "routing fwd+bwd against tokens: ms")
    ax = axes[1, 3]
    for impl in ("plain", "ase", "reference"):
        for mode, style in (("eager", "-"), ("compiled", "--"), ("graphed", ":")):
            pts = sorted((r["images"], r["images_per_s"]) for r in rows if r["test"] == "bench_vit_train_step"
                         and r["impl"] == impl and r["mode"] == mode)
            if pts:
                ax.plot(*zip(*pts, strict=True), style, marker="o", color=COLORS[impl],
                        label=impl if mode == "eager" else f"{impl} {mode}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("images per task")
    ax.set_title("5-task ViT training step: images/s")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("json", nargs="+", help="pytest-benchmark JSON file(s)")
    p.add_argument("--md", default=None, help="also write the Markdown here (it is printed in any case)")
    p.add_argument("--png", default=None, help="write the plot here")
    args = p.parse_args(argv)
    try:
        rows, machine, when = load(args.json)
    except ReportError as e:
        p.error(str(e))
    gpu = "gpu" in machine
    ffn = FFN(rows)
    parts = [header(machine, when), targets_table(targets(ffn)), ffn_tables(ffn, gpu),
             scaling_table(rows, "bench_ffn_scaling", IMPLS, "FFN fwd+bwd at 32/6/2/2-ffn against tokens: median ms",
                           gpu),
             route_table(rows),
             scaling_table(rows, "bench_route_scaling", ("ase", "torch"), "Routing fwd+bwd at 32/6/2/2 against "
                           "tokens: median ms (ase = ak.route)", gpu),
             vit_table(rows, gpu)]
    text = "\n".join(part for part in parts if part)
    if args.md:
        with open(args.md, "w") as f:
            f.write(text + "\n")
    if args.png:
        plot(rows, ffn, args.png)
    print(text)
    return text


if __name__ == "__main__":
    main()
