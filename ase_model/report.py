"""The paper's Table 1 (and its Figures 2-4, drawn by paper_figures.py) from a sweep's run directories
(ase_model/reproduce.py), made from the runs' own config.yaml and metrics.jsonl, so a partial sweep gives a partial
table and partial figures.

    python -m ase_model.report runs/paper        # -> runs/paper/table1.md, table1.json, fig2.png ... fig4.png

Our numbers are each run's final evaluation (the last record of metrics.jsonl, which has the edge odsF where
pyEdgeEval is installed). delta_m is taken twice: against the paper's single-task ResNet-18 row (its Table 1
reference, ase_model/reference_metrics.yaml) and against our own single-task ViT-B rows (single-*), over the tasks
each has. Parameters are counted from the model each run's options build (on the meta device: no memory).
A sweep on a dataset the paper has no table for (NYUD: paper_table1.yaml names its dataset) has no paper columns:
our numbers, parameters and delta_m against our own single-task rows, the tasks and metrics read from the dataset
plug-in (ase_model/datasets/); its figures plot that delta_m, and say so.
"""

import json
import math
import os
import sys

import yaml

from . import datasets
from .checkpoints import write_text_atomic
from .errors import UserError
from .metrics import delta_m, load_reference
from .options import DEFAULT_DATASET
from .paper_figures import finite, shape, write_figures

PAPER = os.path.join(os.path.dirname(__file__), "paper_table1.yaml")
SYNTHETIC_NOTE = ("SYNTHETIC data: these runs trained and were scored on the generated dataset, not PASCAL-Context; "
                  "their numbers, and every difference from the paper, say nothing about the method.")
PAPER_REFERENCE = "the paper's single-task ResNet-18 row (ase_model/reference_metrics.yaml), and our single-task rows"
OWN_REFERENCE = ("our single-task rows (single-*: the same backbone and schedule, one task each); the paper has no "
                 "table for this dataset and no cited single-task numbers ship for it")


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
    has a finished run training it alone with a finite, non-zero score (the metric and direction of `reference`,
    {task: {metric, lower_is_better, ...}}, in its order)."""
    own = {}
    for run in runs.values():
        tasks = run["config"]["tasks"]
        if len(tasks) == 1 and run["finished"] and tasks[0] in reference:
            task = tasks[0]
            value = run["results"].get(task, {}).get(reference[task]["metric"])
            if value is not None and math.isfinite(value) and value != 0:  # no relative change from 0
                own[task] = {**reference[task], "value": value}
    return dict(sorted(own.items(), key=lambda kv: list(reference).index(kv[0])))


def dataset_of(runs: dict) -> str:
    """The dataset the runs trained on (their --dataset); UserError for runs of several in one directory."""
    names = sorted({run["config"].get("dataset", DEFAULT_DATASET) for run in runs.values()})
    if len(names) > 1:
        raise UserError(f"runs of several datasets ({', '.join(names)}) in one directory: one sweep directory each")
    return names[0] if names else DEFAULT_DATASET


def task_metrics(dataset: str) -> dict:
    """{task: {metric, lower_is_better}}: the number delta_m reads of each task, as the dataset plug-in states it."""
    return {t: {"metric": task.metric, "lower_is_better": task.lower_is_better}
            for t, task in datasets.get(dataset).tasks.items()}


def build_table(runs: dict) -> dict:
    """The table as data: one entry per run (Table 1's rows first, in the paper's order; single-task rows last), our
    numbers and parameter counts, and delta_m against our single-task rows; where the paper has a table for the
    runs' dataset (paper_table1.yaml's `dataset`), also the paper's cells, our difference from them and delta_m
    against the paper's single-task reference. Without one (NYUD), our single-task rows are the only reference."""
    dataset = dataset_of(runs)
    paper, reference = _load_yaml(PAPER), None
    if paper["dataset"] == dataset:
        reference = load_reference(datasets.get(dataset).reference)
    else:
        paper = {"rows": {}}
    metrics_of = reference or task_metrics(dataset)
    own = own_reference(runs, metrics_of)
    order = [n for n in paper["rows"] if n in runs] + [n for n in runs if n not in paper["rows"]]
    order.sort(key=lambda n: (n not in paper["rows"], len(runs[n]["config"]["tasks"]) == 1))
    rows = []
    for name in order:
        run = runs[name]
        ours = {t: finite(run["results"].get(t, {}).get(ref["metric"])) for t, ref in metrics_of.items()
                if t in run["config"]["tasks"]}
        dm_own, used_own = delta_m(run["results"], own)
        trainable, total = count_parameters(run["config"])
        theirs = paper["rows"].get(name)
        row = dict(row=name, label=f"{theirs['label']} ({name})" if theirs else name, shape=shape(run["config"]),
                   mode=run["config"]["mode"] if run["config"]["num_experts"] else "-", tasks=run["config"]["tasks"],
                   epochs=run["epochs"], epochs_planned=run["config"]["epochs"], finished=run["finished"],
                   seed=run["config"]["seed"], synthetic=run["synthetic"], params_trainable_m=trainable,
                   params_total_m=total, ours=ours)
        if reference:
            dm_paper, used_paper = delta_m(run["results"], reference)
            row["delta_m_vs_paper_single_task"] = {"value": finite(dm_paper), "tasks": used_paper}
        row["delta_m_vs_our_single_task"] = {"value": finite(dm_own), "tasks": used_own}
        if theirs:
            row["paper"] = {k: theirs.get(k) for k in [*reference, "delta_m", "params_m"]}
            row["difference"] = {t: _diff(ours.get(t), theirs.get(t)) for t in reference}
            row["difference"]["delta_m"] = _diff(row["delta_m_vs_paper_single_task"]["value"], theirs.get("delta_m"))
        rows.append(row)
    metrics = {t: {"metric": ref["metric"], "lower_is_better": ref["lower_is_better"]} for t, ref in metrics_of.items()}
    table = dict(dataset=dataset, source=paper.get("source"), synthetic=any(r["synthetic"] for r in rows),
                 metrics=metrics, delta_m_reference=OWN_REFERENCE if reference is None else PAPER_REFERENCE)
    if reference:
        table["paper_reference_row"] = {t: paper["rows"][paper["reference_row"]][t] for t in reference}
    return table | dict(our_single_task_reference={t: ref["value"] for t, ref in own.items()}, rows=rows)


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
    if "paper_reference_row" not in table:
        return _own_markdown(table)
    tasks = list(table["metrics"])
    lines = []
    if table["synthetic"]:
        lines += [f"**{SYNTHETIC_NOTE}**", ""]
    lines += ["# Table 1: ours beside the paper's", "",
              "Each cell: our final evaluation, then in brackets the paper's value and our difference from it "
              f"where the paper's cell is transcribed ({table['source']}). delta_m in percent: against the paper's "
              "single-task ResNet-18 row, and against our own single-task ViT-B rows (over the tasks listed).", "",
              _head(table) + " | Δm vs paper ST | Δm vs our ST |", "|" + "---|" * (6 + len(tasks) + 1)]
    ref = table["paper_reference_row"]
    lines.append("| Single-task ResNet-18 (paper; the reference) | | | | | "
                 + " | ".join(_cell(None, ref[t]) for t in tasks) + " | | |")
    for r in table["rows"]:
        paper, diff = r.get("paper") or {}, r.get("difference") or {}
        cells = [_cell(r["ours"].get(t), paper.get(t), diff.get(t)) for t in tasks]
        dm = _cell(r["delta_m_vs_paper_single_task"]["value"], paper.get("delta_m"), diff.get("delta_m"), "{:+.2f}")
        lines.append(_start(r) + " | ".join(cells) + f" | {dm} | {_own_dm(r)} |")
    return "\n".join(lines + ["", _own_line(table)]) + "\n"


def _own_markdown(table: dict) -> str:
    """A dataset the paper has no table for: our numbers, delta_m against our single-task rows, no paper column."""
    tasks, name = list(table["metrics"]), table["dataset"]
    lines = []
    if table["synthetic"]:
        lines += [f"**SYNTHETIC data: these runs trained and were scored on a generated copy of the {name} layout, "
                  "not the real dataset; their numbers say nothing about the method.**", ""]
    lines += [f"# {name}: our sweep (the paper has no table for it)", "",
              "Each cell: our final evaluation (three decimals). delta_m in percent, over "
              "the tasks listed beside it, against " + table["delta_m_reference"] + ".", "",
              _head(table) + " | Δm vs our ST |", "|" + "---|" * (6 + len(tasks))]
    for r in table["rows"]:
        lines.append(_start(r) + " | ".join(_cell(r["ours"].get(t), fmt="{:.3f}") for t in tasks)
                     + f" | {_own_dm(r)} |")
    return "\n".join(lines + ["", _own_line(table, "{:.3f}")]) + "\n"


def _head(table: dict) -> str:
    return "| row | N/k/S/r | gating | epochs | params M (trainable / total) | " + " | ".join(
        f"{t} {m['metric']} {'↓' if m['lower_is_better'] else '↑'}" for t, m in table["metrics"].items())


def _start(r: dict) -> str:
    return (f"| {r['label']} | {r['shape']} | {r['mode']} | {r['epochs']}/{r['epochs_planned']} | "
            f"{r['params_trainable_m']:.2f} / {r['params_total_m']:.1f} | ")


def _own_dm(r: dict) -> str:
    own = r["delta_m_vs_our_single_task"]
    return "" if own["value"] is None else f"{own['value']:+.2f} ({', '.join(own['tasks'])})"


def _own_line(table: dict, fmt: str = "{:.2f}") -> str:
    return "Our single-task reference: " + (", ".join(f"{t} {fmt.format(v)}" for t, v in
                                                     table["our_single_task_reference"].items())
                                            or "none yet (no finished single-* row)")


def write_report(output: str, dataset: str | None = None) -> list[str]:
    """table1.md, table1.json and the figures of the runs under output (those on `dataset` where it is given);
    returns the paths written. Without a paper table for the dataset, the figures plot delta_m against our
    single-task rows."""
    runs = load_runs(output)
    if dataset is not None:
        runs = {n: r for n, r in runs.items() if r["config"].get("dataset", DEFAULT_DATASET) == dataset}
    table = build_table(runs)
    md, js = os.path.join(output, "table1.md"), os.path.join(output, "table1.json")
    write_text_atomic(md, table_markdown(table))
    write_text_atomic(js, json.dumps(table, indent=1) + "\n")
    if "paper_reference_row" in table:
        figures = write_figures(runs, output)
    else:
        figures = write_figures(runs, output, own_reference(runs, table["metrics"]), against="our single-task rows")
    return [md, js, *figures]


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or not os.path.isdir(argv[0]):
        print("usage: python -m ase_model.report SWEEP_DIR (the --output of python -m ase_model.reproduce)",
              file=sys.stderr)
        return 2
    try:
        paths = write_report(argv[0])
    except UserError as e:
        print(f"python -m ase_model.report: error: {e}", file=sys.stderr)
        return 2
    for path in paths:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
