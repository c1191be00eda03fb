"""The paper's Table 1 and Figures 2-4 from a sweep's run directories (ase_model/reproduce.py), made from the runs'
own config.yaml and metrics.jsonl, so a partial sweep gives a partial table and partial figures.

    python -m ase_model.report runs/paper        # -> runs/paper/table1.md, table1.json, fig2.png ... fig4.png

Our numbers are each run's final evaluation (the last record of metrics.jsonl, which has the edge odsF where
pyEdgeEval is installed). delta_m is taken twice: against the paper's single-task ResNet-18 row (its Table 1
reference, ase_model/reference_metrics.yaml) and against our own single-task ViT-B rows (single-*), over the tasks
each has. Parameters are counted from the model each run's options build (on the meta device: no memory).
"""

import json
import math
import os
import sys

import matplotlib
import matplotlib.ticker
import yaml

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .checkpoints import write_text_atomic  # noqa: E402
from .metrics import delta_m, load_reference  # noqa: E402
from .options import REFERENCE  # noqa: E402

PAPER = os.path.join(os.path.dirname(__file__), "paper_table1.yaml")
SYNTHETIC_NOTE = ("SYNTHETIC data: these runs trained and were scored on the generated dataset, not PASCAL-Context; "
                  "their numbers, and every difference from the paper, say nothing about the method.")


def load_runs(output: str) -> dict[str, dict]:
    """{row: run} for every directory under output holding config.yaml and metrics.jsonl: its options, its log,
    its final metrics {task: {metric: value}} and how many epochs it has finished."""
    runs = {}
    for name in sorted(os.listdir(output)) if os.path.isdir(output) else []:
        path = os.path.join(output, name)
        if not (os.path.isfile(os.path.join(path, "config.yaml")) and os.path.isfile(os.path.join(path,
                                                                                                  "metrics.jsonl"))):
            continue
        with open(os.path.join(path, "config.yaml")) as f:
            config = yaml.safe_load(f)
        with open(os.path.join(path, "metrics.jsonl")) as f:
            history = [json.loads(line) for line in f if line.strip()]
        evaluated = [r for r in history if any(k.startswith("val/") for k in r)]
        results = {}
        for key, value in (evaluated[-1] if evaluated else {}).items():
            if key.startswith("val/"):
                _, task, metric = key.split("/", 2)
                results.setdefault(task, {})[metric] = value
        runs[name] = dict(config=config, history=history, results=results, epochs=len(history),
                          finished=len(history) >= config["epochs"], synthetic=config.get("data") is None)
    return runs


def count_parameters(config: dict) -> tuple[float, float]:
    """(trainable, total) parameters in millions of the model a run's options build."""
    import argparse

    import torch

    from .model import build_model

    with torch.device("meta"):
        model = build_model(argparse.Namespace(**config))
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable / 1e6, total / 1e6


def own_reference(runs: dict, reference: dict) -> dict:
    """Our single-task rows as a delta_m reference: {task: {metric, value, lower_is_better}} for every task that
    has a finished run training it alone (the paper reference's metric and direction)."""
    own = {}
    for run in runs.values():
        tasks = run["config"]["tasks"]
        if len(tasks) == 1 and run["finished"] and tasks[0] in reference:
            task = tasks[0]
            value = run["results"].get(task, {}).get(reference[task]["metric"])
            if value is not None and math.isfinite(value):
                own[task] = {**reference[task], "value": value}
    return dict(sorted(own.items(), key=lambda kv: list(reference).index(kv[0])))


def shape(config: dict) -> str:
    """N/k/S/r and the gating of a run, as the paper names them."""
    if not config["num_experts"]:
        return "-"
    return f"{config['num_experts']}/{config['top_k']}/{config['num_shared']}/{config['expert_rank']}"


def build_table(runs: dict, paper: dict | None = None, reference: dict | None = None) -> dict:
    """The table as data: one entry per run (Table 1's rows first, in the paper's order), our numbers, the paper's
    where it has the row, their difference per cell, both delta_m and the parameter counts."""
    paper = paper if paper is not None else _load_yaml(PAPER)
    reference = reference if reference is not None else load_reference(REFERENCE)
    own = own_reference(runs, reference)
    order = [n for n in paper["rows"] if n in runs] + [n for n in runs if n not in paper["rows"]]
    order.sort(key=lambda n: (n not in paper["rows"], len(runs[n]["config"]["tasks"]) == 1))
    rows = []
    for name in order:
        run = runs[name]
        ours = {t: run["results"].get(t, {}).get(ref["metric"]) for t, ref in reference.items()
                if t in run["config"]["tasks"]}
        dm_paper, used_paper = delta_m(run["results"], reference)
        dm_own, used_own = delta_m(run["results"], own)
        trainable, total = count_parameters(run["config"])
        theirs = paper["rows"].get(name)
        row = dict(row=name, label=f"{theirs['label']} ({name})" if theirs else name, shape=shape(run["config"]),
                   mode=run["config"]["mode"] if run["config"]["num_experts"] else "-", tasks=run["config"]["tasks"],
                   epochs=run["epochs"], epochs_planned=run["config"]["epochs"], finished=run["finished"],
                   seed=run["config"]["seed"], synthetic=run["synthetic"], params_trainable_m=trainable,
                   params_total_m=total, ours=ours,
                   delta_m_vs_paper_single_task={"value": _finite(dm_paper), "tasks": used_paper},
                   delta_m_vs_our_single_task={"value": _finite(dm_own), "tasks": used_own})
        if theirs:
            row["paper"] = {k: theirs.get(k) for k in [*reference, "delta_m", "params_m"]}
            row["difference"] = {t: _diff(ours.get(t), theirs.get(t)) for t in reference}
            row["difference"]["delta_m"] = _diff(row["delta_m_vs_paper_single_task"]["value"], theirs.get("delta_m"))
        rows.append(row)
    metrics = {t: {"metric": ref["metric"], "lower_is_better": ref["lower_is_better"]} for t, ref in reference.items()}
    return dict(source=paper["source"], synthetic=any(r["synthetic"] for r in rows), metrics=metrics,
                paper_reference_row={t: paper["rows"][paper["reference_row"]][t] for t in reference},
                our_single_task_reference={t: ref["value"] for t, ref in own.items()}, rows=rows)


def _finite(v):
    return v if v is not None and math.isfinite(v) else None


def _diff(ours, theirs):
    return None if ours is None or theirs is None else ours - theirs


def _load_yaml(path: str) -> dict:
    with open(path) as f:
        return yaml.safe_load(f)


def _cell(ours, theirs=None, diff=None, fmt="{:.2f}") -> str:
    text = "" if ours is None else fmt.format(ours)
    if theirs is not None:
        text += f" ({fmt.format(theirs)}" + ("" if diff is None else f", {diff:+.2f}") + ")"
    return text


def table_markdown(table: dict) -> str:
    tasks = list(table["metrics"])
    head = [f"{t} {m['metric']} {'↓' if m['lower_is_better'] else '↑'}" for t, m in table["metrics"].items()]
    lines = []
    if table["synthetic"]:
        lines += [f"**{SYNTHETIC_NOTE}**", ""]
    lines += ["# Table 1: ours beside the paper's", "",
              "Each cell: our final evaluation, then in brackets the paper's value and our difference from it "
              f"where the paper's cell is transcribed ({table['source']}). delta_m in percent: against the paper's "
              "single-task ResNet-18 row, and against our own single-task ViT-B rows (over the tasks listed).", "",
              "| row | N/k/S/r | gating | epochs | params M (trainable / total) | " + " | ".join(head)
              + " | Δm vs paper ST | Δm vs our ST |",
              "|" + "---|" * (6 + len(tasks) + 1)]
    ref = table["paper_reference_row"]
    lines.append("| Single-task ResNet-18 (paper; the reference) | | | | | "
                 + " | ".join(_cell(None, ref[t]) for t in tasks) + " | | |")
    for r in table["rows"]:
        paper, diff = r.get("paper") or {}, r.get("difference") or {}
        cells = [_cell(r["ours"].get(t), paper.get(t), diff.get(t)) for t in tasks]
        own = r["delta_m_vs_our_single_task"]
        own_text = "" if own["value"] is None else f"{own['value']:+.2f} ({', '.join(own['tasks'])})"
        epochs = f"{r['epochs']}/{r['epochs_planned']}"
        dm = _cell(r["delta_m_vs_paper_single_task"]["value"], paper.get("delta_m"), diff.get("delta_m"), "{:+.2f}")
        lines.append(f"| {r['label']} | {r['shape']} | {r['mode']} | {epochs} | "
                     f"{r['params_trainable_m']:.2f} / {r['params_total_m']:.1f} | " + " | ".join(cells)
                     + f" | {dm} | {own_text} |")
    own_ref = table["our_single_task_reference"]
    lines += ["", "Our single-task reference: " + (", ".join(f"{t} {v:.2f}" for t, v in own_ref.items())
                                                  or "none yet (no finished single-* row)")]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------------ figures

def _find(runs: dict, n: int, k: int, s: int, r: int, mode: str) -> dict | None:
    """The multi-task run of configuration N/k/S/r and gating `mode` (the first by name), or None."""
    for run in runs.values():
        c = run["config"]
        if (len(c["tasks"]) > 1 and run["results"] and c["num_experts"] == n and c["top_k"] == k
                and c["num_shared"] == s and c["expert_rank"] == r and c["mode"] == mode):
            return run
    return None


def _score(run: dict | None, reference: dict) -> float | None:
    return None if run is None else _finite(delta_m(run["results"], reference)[0])


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


def write_figures(runs: dict, output: str, reference: dict | None = None) -> list[str]:
    """Fig. 2 (naive shared experts vs ASE), Fig. 3a (k with S = 1, baseline vs ASE), Fig. 3b (16/32/64 experts at
    N r = 64) as delta_m against the paper's single-task row, and Fig. 4 (the per-layer shared-expert gate of an ASE
    run at epochs 1, 3 and the last); each written where at least one of its runs has been evaluated."""
    reference = reference if reference is not None else load_reference(REFERENCE)
    synthetic = " (SYNTHETIC data)" if any(r["synthetic"] for r in runs.values()) else ""
    paths = []
    label = "Δm vs the paper's single-task row (%)"

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
        _finish(fig, ax, "N/k/S/r", label, f"Fig. 2: naive shared experts vs ASE{synthetic}")
        paths.append(_save(fig, output, "fig2.png"))

    ks = list(range(3, 8))
    fig, ax = plt.subplots(figsize=(6, 4))
    drawn = _lines(ax, ks, {"LoRA-MoE, k + 1 experts (S = 0)": [(16, k + 1, 0, 4, "none") for k in ks],
                            "ASE, k sparse + S = 1": [(16, k, 1, 4, "adaptive") for k in ks]}, runs, reference)
    paths += _keep(fig, ax, drawn, output, "fig3a.png", "k (sparse experts of ASE; 16 experts of rank 4)", label,
                   f"Fig. 3a: active experts{synthetic}")

    ns = [16, 32, 64]
    fig, ax = plt.subplots(figsize=(6, 4))
    drawn = _lines(ax, ns, {"LoRA-MoE": [(16, 4, 0, 4, "none"), (32, 8, 0, 2, "none"), (64, 16, 0, 1, "none")],
                            "ASE": [(16, 3, 1, 4, "adaptive"), (32, 6, 2, 2, "adaptive"), (64, 12, 4, 1, "adaptive")]},
                   runs, reference)
    ax.set_xscale("log", base=2)
    paths += _keep(fig, ax, drawn, output, "fig3b.png", "experts N (N r = 64)", label,
                   f"Fig. 3b: finer experts at the same budget{synthetic}")

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


def write_report(output: str) -> list[str]:
    """table1.md, table1.json and the figures of the runs under output; returns the paths written."""
    runs = load_runs(output)
    table = build_table(runs)
    md, js = os.path.join(output, "table1.md"), os.path.join(output, "table1.json")
    write_text_atomic(md, table_markdown(table))
    write_text_atomic(js, json.dumps(table, indent=1) + "\n")
    return [md, js, *write_figures(runs, output)]


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or not os.path.isdir(argv[0]):
        print("usage: python -m ase_model.report SWEEP_DIR (the --output of python -m ase_model.reproduce)",
              file=sys.stderr)
        return 2
    for path in write_report(argv[0]):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
