"""The paper's Table 1 (and its Figures 2-4, drawn by paper_figures.py) from a sweep's run directories
(ase_model/reproduce.py), made from the runs' own config.yaml and metrics.jsonl, so a partial sweep gives a partial
table and partial figures.

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

import yaml

from .checkpoints import write_text_atomic
from .metrics import delta_m, load_reference
from .options import REFERENCE
from .paper_figures import finite, shape, write_figures

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
        ours = {t: finite(run["results"].get(t, {}).get(ref["metric"])) for t, ref in reference.items()
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
                   delta_m_vs_paper_single_task={"value": finite(dm_paper), "tasks": used_paper},
                   delta_m_vs_our_single_task={"value": finite(dm_own), "tasks": used_own})
        if theirs:
            row["paper"] = {k: theirs.get(k) for k in [*reference, "delta_m", "params_m"]}
            row["difference"] = {t: _diff(ours.get(t), theirs.get(t)) for t in reference}
            row["difference"]["delta_m"] = _diff(row["delta_m_vs_paper_single_task"]["value"], theirs.get("delta_m"))
        rows.append(row)
    metrics = {t: {"metric": ref["metric"], "lower_is_better": ref["lower_is_better"]} for t, ref in reference.items()}
    return dict(source=paper["source"], synthetic=any(r["synthetic"] for r in rows), metrics=metrics,
                paper_reference_row={t: paper["rows"][paper["reference_row"]][t] for t in reference},
                our_single_task_reference={t: ref["value"] for t, ref in own.items()}, rows=rows)


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
