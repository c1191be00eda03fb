"""The paper's Figures 2-4 from a sweep's runs (as `report.load_runs` reads them): each drawn from the runs that
exist, so a partial sweep gives partial figures. The runs are found by their configuration (N/k/S/r and gating),
not by name, so a row shared by several figures runs once."""

import math
import os

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .metrics import delta_m, load_reference  # noqa: E402
from .options import REFERENCE  # noqa: E402


def shape(config: dict) -> str:
    """N/k/S/r of a run, as the paper names its configurations ("-" without experts)."""
    if not config["num_experts"]:
        return "-"
    return f"{config['num_experts']}/{config['top_k']}/{config['num_shared']}/{config['expert_rank']}"


def finite(v):
    """v, or None where it is None or not finite (JSON and the figures hold no NaN)."""
    return v if v is not None and math.isfinite(v) else None


def _find(runs: dict, n: int, k: int, s: int, r: int, mode: str) -> dict | None:
    """The multi-task run of configuration N/k/S/r and gating `mode` (the first by name), or None."""
    for run in runs.values():
        c = run["config"]
        if (len(c["tasks"]) > 1 and run["results"] and c["num_experts"] == n and c["top_k"] == k
                and c["num_shared"] == s and c["expert_rank"] == r and c["mode"] == mode):
            return run
    return None


def _score(run: dict | None, reference: dict) -> float | None:
    return None if run is None else finite(delta_m(run["results"], reference)[0])


def _lines(ax, xs, series: dict, runs, reference) -> int:
    """Plot each series {label: [(n, k, s, r, mode) per x]}; returns the points drawn."""
    drawn = 0
    for label, configs in series.items():
        points = [(x, _score(_find(runs, *c), reference)) for x, c in zip(xs, configs, strict=True)]
        points = [(x, y) for x, y in points if y is not None]
        if points:
            ax.plot(*zip(*points, strict=True), marker="o", label=label)
            drawn += len(points)
    return drawn


def write_figures(runs: dict, output: str, reference: dict | None = None, against: str | None = None) -> list[str]:
    """Fig. 2 (naive shared experts vs ASE), Fig. 3a (k with S = 1, baseline vs ASE), Fig. 3b (16/32/64 experts at
    N r = 64) as delta_m against the paper's single-task row, or against `reference` named `against` (our own
    single-task rows where the paper has no table: the titles say so), and Fig. 4 (the per-layer shared-expert gate
    of an ASE run at epochs 1, 3 and the last); each written where at least one of its runs has been evaluated."""
    reference = reference if reference is not None else load_reference(REFERENCE)
    synthetic = " (SYNTHETIC data)" if any(r["synthetic"] for r in runs.values()) else ""
    paths = []
    label = "Δm vs the paper's single-task row (%)" if against is None else f"Δm vs {against} (%)"
    # the delta_m figures name a reference that is not the paper's in their titles
    scored = synthetic if against is None else f"{synthetic}\nΔm vs {against}: no paper reference"

    shapes = [(16, 3, 1, 4), (32, 6, 2, 2)]
    bars = {mode: [_score(_find(runs, *c, mode), reference) for c in shapes] for mode in ("naive", "adaptive")}
    if any(v is not None for vs in bars.values() for v in vs):
        fig, ax = plt.subplots(figsize=(6, 4))
        for j, (mode, values) in enumerate(bars.items()):
            xs = [i + 0.4 * j for i, v in enumerate(values) if v is not None]
            ax.bar(xs, [v for v in values if v is not None], width=0.4,
                   label={"naive": "naive shared (Eq. 5)", "adaptive": "ASE"}[mode])
        ax.set_xticks([i + 0.2 for i in range(len(shapes))], ["/".join(map(str, c)) for c in shapes])
        ax.set_xlim(-0.4, len(shapes) - 0.2)
        ax.axhline(0, color="k", lw=0.8)
        _finish(fig, ax, "N/k/S/r", label, f"Fig. 2: naive shared experts vs ASE{scored}")
        paths.append(_save(fig, output, "fig2.png"))

    ks = list(range(3, 8))
    fig, ax = plt.subplots(figsize=(6, 4))
    drawn = _lines(ax, ks, {"LoRA-MoE, k + 1 experts (S = 0)": [(16, k + 1, 0, 4, "none") for k in ks],
                            "ASE, k sparse + S = 1": [(16, k, 1, 4, "adaptive") for k in ks]}, runs, reference)
    paths += _keep(fig, ax, drawn, output, "fig3a.png", "k (sparse experts of ASE; 16 experts of rank 4)", label,
                   f"Fig. 3a: active experts{scored}")

    ns = [16, 32, 64]
    fig, ax = plt.subplots(figsize=(6, 4))
    drawn = _lines(ax, ns, {"LoRA-MoE": [(16, 4, 0, 4, "none"), (32, 8, 0, 2, "none"), (64, 16, 0, 1, "none")],
                            "ASE": [(16, 3, 1, 4, "adaptive"), (32, 6, 2, 2, "adaptive"), (64, 12, 4, 1, "adaptive")]},
                   runs, reference)
    ax.set_xscale("log", base=2)
    paths += _keep(fig, ax, drawn, output, "fig3b.png", "experts N (N r = 64)", label,
                   f"Fig. 3b: finer experts at the same budget{scored}")

    gated = next((r for c in [(32, 6, 2, 2), (16, 3, 1, 4), (64, 12, 4, 1)]
                  if (r := _find(runs, *c, "adaptive")) is not None), None)
    routed = [r for r in gated["history"] if "routing" in r] if gated else []
    if routed:
        chosen = {r["epoch"] + 1: r for r in routed if r["epoch"] + 1 in (1, 3)}
        chosen[routed[-1]["epoch"] + 1] = routed[-1]
        tasks = gated["config"]["tasks"]
        fig, axes = plt.subplots(1, len(tasks), figsize=(3 * len(tasks), 3), sharey=True, squeeze=False)
        for t, task in enumerate(tasks):
            for epoch, record in sorted(chosen.items()):
                gates = [layer[t] for layer in record["routing"]["shared_gate"]]
                axes[0, t].plot(range(1, len(gates) + 1), gates, marker=".", label=f"epoch {epoch}")
            axes[0, t].set_title(task)
            axes[0, t].set_xlabel("layer")
            axes[0, t].xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        axes[0, 0].set_ylabel("mean shared-expert gate")
        axes[0, -1].legend(fontsize=7)
        fig.suptitle(f"Fig. 4: shared-expert gate per layer, ASE {shape(gated['config'])}{synthetic}", fontsize=10)
        paths.append(_save(fig, output, "fig4.png"))
    return paths


def _finish(fig, ax, xlabel, ylabel, title):
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)


def _keep(fig, ax, drawn, output, name, xlabel, ylabel, title) -> list[str]:
    if not drawn:
        plt.close(fig)
        return []
    _finish(fig, ax, xlabel, ylabel, title)
    return [_save(fig, output, name)]


def _save(fig, output: str, name: str) -> str:
    path = os.path.join(output, name)
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=100)
    os.replace(path + ".tmp.png", path)
    plt.close(fig)
    return path
