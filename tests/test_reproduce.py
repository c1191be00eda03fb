"""ase_model/reproduce.py and ase_model/report.py end to end on a tiny sweep: three checked-in rows on synthetic data
with a tiny ViT (the trainer options passed through), killed in the middle of a row, continued without redoing the
finished row, and reported (the table's delta_m recomputed here from its per-task numbers, the figures decoded).
The same on NYUD, which has no paper table: delta_m against the sweep's own single-task rows, no paper columns.
Also the checked-in sweeps themselves: every row loads as the trainer's config and no two rows are the same run."""

import glob
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml
from PIL import Image

import ase_model.paper_figures as paper_figures
import ase_model.reproduce as reproduce
from ase_model import datasets
from ase_model.options import resolve_args

ROWS = ["ase-16-3-1-4", "mtl-vit", "single-semseg"]  # run in this order
# the paper's single-task ResNet-18 row (arXiv 2510.00570, Table 1; DESIGN.md): metric, value, lower is better
PAPER_SINGLE_TASK = {"semseg": ("mIoU", 60.1, False), "normals": ("mean", 15.4, True),
                     "human_parts": ("mIoU", 51.0, False), "sal": ("mIoU", 63.2, False), "edge": ("odsF", 50.8, False)}


def _tiny(syn: str, epochs: int) -> list[str]:
    """Trainer options that make a paper row a seconds-long run (epochs of 2 steps, checkpoints every step)."""
    return ["--synthetic-dir", syn, "--synthetic-size", "8", "4", "32", "--img-size", "32", "--patch-size", "8",
            "--embed-dim", "48", "--depth", "2", "--num-heads", "3", "--head-dim", "16", "--batch-size", "4",
            "--epochs", str(epochs), "--warmup-steps", "1", "--lr", "3e-3", "--checkpoint-every", "1",
            "--edge-thresholds", "5", "--no-plots"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return _tiny(str(tmp_path_factory.mktemp("data") / "syn"), epochs=2)


def _env():
    root = os.path.dirname(os.path.dirname(reproduce.__file__))
    return dict(os.environ, PYTHONPATH=os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])]))


def _records(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _delta_m(ours: dict, reference: dict) -> float:
    """The multi-task gain as MTL-PyTorch's calculate_multi_task_performance defines it, in percent."""
    terms = [(-1 if lower else 1) * (ours[t] - value) / value for t, (_, value, lower) in reference.items()
             if ours.get(t) is not None]
    return 100 * sum(terms) / len(terms)


def test_a_killed_sweep_resumes_skips_finished_rows_and_reports(tiny, tmp_path, capsys):
    out = str(tmp_path / "paper")
    argv = ["--output", out, "--rows", *ROWS, *tiny]
    proc = subprocess.Popen([sys.executable, "-m", "ase_model.reproduce", *argv], env=_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    second = os.path.join(out, ROWS[1], "last.pt")
    deadline = time.monotonic() + 300
    while not os.path.exists(second) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)  # a scheduler stopping the sweep in the middle of its second row
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err[-3000:]
    assert "no --data: every row trains on a small SYNTHETIC dataset" in err
    assert f"row {ROWS[1]}: stopped by SIGTERM" in err, err[-3000:]
    first = os.path.join(out, ROWS[0])
    assert len(_records(first)) == 2 and len(_records(os.path.join(out, ROWS[1]))) < 2
    finished = open(os.path.join(first, "metrics.jsonl")).read()

    assert reproduce.main(argv + ["--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert f"# {ROWS[0]}: done\n# {ROWS[1]}: resume\n" in printed and f"# {ROWS[2]}: new" in printed
    assert "--resume" in printed.split(f"# {ROWS[1]}")[1].split("#")[0]

    assert reproduce.main(argv) == 0
    err = capsys.readouterr().err
    assert f"row 1/3 {ROWS[0]}: finished before, not run again" in err and "3 of 3 rows finished" in err
    assert open(os.path.join(first, "metrics.jsonl")).read() == finished, "a finished row ran again"
    with open(os.path.join(out, "logs", f"{ROWS[1]}.log")) as f:
        log = f.read()
    assert "--resume" in log and "resuming at step" in log
    for name in ROWS:
        assert [r["epoch"] for r in _records(os.path.join(out, name))] == [0, 1], name

    with open(os.path.join(out, "table1.json")) as f:
        table = json.load(f)
    rows = {r["row"]: r for r in table["rows"]}
    assert list(rows) == ["mtl-vit", "ase-16-3-1-4", "single-semseg"]  # Table 1's rows first, single-task last
    assert table["synthetic"] and all(r["synthetic"] and r["finished"] for r in rows.values())
    own = {"semseg": ("mIoU", rows["single-semseg"]["ours"]["semseg"], False)}
    assert table["our_single_task_reference"] == {"semseg": own["semseg"][1]}
    for name, row in rows.items():
        last = _records(os.path.join(out, name))[-1]
        for task, number in row["ours"].items():  # our numbers are the final evaluation's
            assert number == last[f"val/{task}/{PAPER_SINGLE_TASK[task][0]}"], (name, task)
        assert row["delta_m_vs_paper_single_task"]["value"] == pytest.approx(_delta_m(row["ours"], PAPER_SINGLE_TASK))
        assert row["delta_m_vs_our_single_task"]["value"] == pytest.approx(_delta_m(row["ours"], own))
        assert row["delta_m_vs_our_single_task"]["tasks"] == ["semseg"]
        assert 0 < row["params_trainable_m"] < row["params_total_m"] < 1
    assert set(rows["mtl-vit"]["ours"]) == set(PAPER_SINGLE_TASK) and "odsF" in json.dumps(table["metrics"])
    paper = rows["mtl-vit"]["paper"]  # the paper's MTL-ViT-B row, and our difference from it per cell
    assert (paper["semseg"], paper["delta_m"]) == (69.1, 2.68)
    assert rows["mtl-vit"]["difference"]["normals"] == pytest.approx(rows["mtl-vit"]["ours"]["normals"] - 16.2)
    assert rows["ase-16-3-1-4"]["paper"]["semseg"] is None  # not transcribed: an empty cell, not a number
    assert rows["ase-16-3-1-4"]["difference"]["semseg"] is None
    assert rows["ase-16-3-1-4"]["params_trainable_m"] > rows["mtl-vit"]["params_trainable_m"]

    with open(os.path.join(out, "table1.md")) as f:
        md = f.read()
    assert md.startswith("**SYNTHETIC data")
    for name in ROWS:
        assert f"({name}) |" in md or f"| {name} |" in md, name
    for name in ("fig2.png", "fig3a.png", "fig3b.png", "fig4.png"):
        with Image.open(os.path.join(out, name)) as image:
            image.load()
            assert image.width > 100 and image.height > 100, name


def test_a_sweep_without_a_paper_table_takes_delta_m_against_its_own_single_task_rows(tmp_path, capsys, monkeypatch):
    """The NYUD sweep (no paper table, no cited single-task numbers): one ASE row and the single-task rows of a
    higher-is-better and a lower-is-better task, one epoch each; its tasks and metrics read from the plug-in."""
    nyud = datasets.get("nyud")
    up = next(t for t, task in nyud.tasks.items() if not task.lower_is_better)
    down = next(t for t, task in nyud.tasks.items() if task.lower_is_better)
    singles = {t: f"single-{t.replace('_', '-')}" for t in (up, down)}
    out = str(tmp_path / "nyud")
    titles = {}
    save = paper_figures._save

    def spy(fig, output, name):
        titles[name] = fig.axes[0].get_title()
        return save(fig, output, name)

    monkeypatch.setattr(paper_figures, "_save", spy)
    argv = ["--dataset", "nyud", "--output", out, "--rows", "ase-16-3-1-4", *singles.values(),
            *_tiny(str(tmp_path / "syn"), epochs=1)]
    assert reproduce.main(argv) == 0, capsys.readouterr().err[-3000:]
    for name in ["ase-16-3-1-4", *singles.values()]:
        with open(os.path.join(out, name, "config.yaml")) as f:
            assert yaml.safe_load(f)["dataset"] == "nyud", name

    with open(os.path.join(out, "table1.json")) as f:
        table = json.load(f)
    assert table["dataset"] == "nyud" and table["synthetic"]
    assert table["metrics"] == {t: {"metric": task.metric, "lower_is_better": task.lower_is_better}
                                for t, task in nyud.tasks.items()}
    assert "paper_reference_row" not in table and table["delta_m_reference"].startswith("our single-task rows")
    rows = {r["row"]: r for r in table["rows"]}
    assert list(rows) == ["ase-16-3-1-4", *sorted(singles.values())]  # the single-task rows last
    own = {}
    for task in nyud.tasks:  # the reference: each single-task row's final number, as its own log has it
        if task in singles:
            own[task] = (nyud.tasks[task].metric, _records(os.path.join(out, singles[task]))[-1][
                f"val/{task}/{nyud.tasks[task].metric}"], nyud.tasks[task].lower_is_better)
    assert all(v != 0 for _, v, _ in own.values()), "a zero single-task score: no relative change from it"
    assert table["our_single_task_reference"] == {t: v for t, (_, v, _) in own.items()}
    for name, row in rows.items():
        assert not {"paper", "difference", "delta_m_vs_paper_single_task"} & set(row), name
        last = _records(os.path.join(out, name))[-1]
        assert row["ours"] == {t: last.get(f"val/{t}/{nyud.tasks[t].metric}") for t in row["tasks"]}, name
        assert row["delta_m_vs_our_single_task"]["value"] == pytest.approx(_delta_m(row["ours"], own)), name
    assert rows["ase-16-3-1-4"]["delta_m_vs_our_single_task"]["tasks"] == list(own)
    assert set(rows["ase-16-3-1-4"]["ours"]) == set(nyud.tasks)

    with open(os.path.join(out, "table1.md")) as f:
        md = f.read()
    assert md.startswith("**SYNTHETIC data") and "paper has no table" in md and "Δm vs paper" not in md
    assert f"| {up} {own[up][0]} ↑ |" in md and f"| {down} {own[down][0]} ↓ |" in md
    assert "against our single-task rows" in md and f"Our single-task reference: {up} " in md
    assert set(titles) == {"fig2.png", "fig3a.png", "fig3b.png", "fig4.png"}
    for name in ("fig2.png", "fig3a.png", "fig3b.png"):  # delta_m against our rows, and the title says so
        assert "Δm vs our single-task rows: no paper reference" in titles[name], titles[name]

    # a PASCAL-Context sweep into the same directory would mix two datasets' rows: refused before anything runs
    capsys.readouterr()
    assert reproduce.main(["--output", out, "--rows", "ase-16-3-1-4", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a run on nyud, not --dataset pascal_context" in err[0], err


def test_a_failed_row_is_reported_and_the_sweep_goes_on(tmp_path, capsys, monkeypatch):
    """Row files of the user's own (--configs); the trainer replaced by a stand-in: the first row fails, the second
    logs its epoch."""
    configs = tmp_path / "configs"
    configs.mkdir()
    for name in ("a-fails", "b-works"):
        (configs / f"{name}.yaml").write_text("seed: 1\nepochs: 1\n")

    def stand_in(config, run_dir, state, args, passthrough):
        if config.endswith("a-fails.yaml"):
            return [sys.executable, "-c", "import sys; print('boom: a bad file'); sys.exit(3)"]
        return [sys.executable, "-c", f"import os; os.makedirs({run_dir!r}); "
                                      f"open(os.path.join({run_dir!r}, 'metrics.jsonl'), 'w').write('{{}}\\n')"]

    monkeypatch.setattr(reproduce, "command", stand_in)
    out = str(tmp_path / "sweep")
    assert reproduce.main(["--configs", str(configs), "--output", out, "--no-report"]) == 1
    err = capsys.readouterr().err
    assert "row a-fails: FAILED (exit 3) at epoch 0/1; the sweep goes on" in err and "boom: a bad file" in err
    assert "row 2/2 b-works: starting" in err and "1 of 2 rows finished, failed: a-fails" in err
    assert reproduce.main(["--configs", str(configs), "--output", out, "--no-report"]) == 1
    assert "row 2/2 b-works: finished before" in capsys.readouterr().err


def test_user_errors_are_one_or_two_lines(tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "paper")
    for argv, expected in [(["--rows", "nope"], "--rows nope: no such row"),
                           (["--rows", "mtl-vit", "--bogus", "1"], "unrecognized arguments: --bogus 1"),
                           (["--overwrite"], "--overwrite: the sweep sets it"),
                           (["--out", "elsewhere"], "--output: the sweep sets it"),
                           (["--data", str(tmp_path / "nowhere")], "no such directory"),
                           (["--dataset", "nowhere"], "--dataset nowhere: no sweep for it")]:
        assert reproduce.main(["--output", out, *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert 1 <= len(err) <= 2 and expected in err[0] and "Traceback" not in "".join(err), err
    assert not os.path.exists(out)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert reproduce.main(["--output", out, "--dry-run"]) == 2
    assert "not under torchrun" in capsys.readouterr().err
    monkeypatch.delenv("WORLD_SIZE")
    # a dataset the trainer knows whose sweep is missing
    (tmp_path / "configs" / "pascal_context").mkdir(parents=True)
    monkeypatch.setattr(reproduce, "CONFIGS", str(tmp_path / "configs"))
    assert reproduce.main(["--output", out, "--dataset", "nyud", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--dataset nyud: no sweep for it (sweeps: pascal_context)" in err[0], err


def test_several_processes_run_every_row_under_torchrun(tmp_path, capsys):
    assert reproduce.main(["--output", str(tmp_path), "--rows", "ase-32-6-2-2", "--nproc-per-node", "8",
                           "--dry-run"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == "# ase-32-6-2-2: new"
    assert "-m torch.distributed.run --standalone --nproc-per-node 8 -m ase_model.train -c " in printed[1]
    assert printed[1].endswith(f"--output {tmp_path}/ase-32-6-2-2")


def test_every_sweep_is_of_a_dataset_of_the_trainer():
    assert {"pascal_context", "nyud"} <= set(os.listdir(reproduce.CONFIGS)) <= set(datasets.names())


@pytest.mark.parametrize("dataset", ["pascal_context", "nyud"])
def test_the_checked_in_sweep_loads_and_holds_every_row_once(dataset):
    files = sorted(glob.glob(os.path.join(reproduce.CONFIGS, dataset, "*.yaml")))
    runs = {}
    for path in files:
        with open(path) as f:
            assert "seed" in yaml.safe_load(f), f"{path} names no seed"
        args = resolve_args(["-c", path])  # each file alone trains on its sweep's dataset
        assert (args.dataset, args.preset, args.img_size, args.epochs) == (dataset, "paper", 224, 40), path
        key = (tuple(args.tasks), args.num_experts, args.num_experts and (args.top_k, args.num_shared,
                                                                          args.expert_rank, args.mode))
        assert key not in runs, f"{path} is the same run as {runs.get(key)}"
        runs[key] = path
    names = {os.path.basename(p)[:-5] for p in files}
    # our own single-task reference: one row per task of the dataset
    assert {f"single-{t.replace('_', '-')}" for t in datasets.get(dataset).tasks} <= names
    assert {"mtl-vit", "lora-moe-16-4-0-4", "lora-moe-32-8-0-2", "ase-16-3-1-4", "ase-32-6-2-2"} <= names
    with open(os.path.join(os.path.dirname(reproduce.__file__), "paper_table1.yaml")) as f:
        paper = yaml.safe_load(f)
    if paper["dataset"] != dataset:
        return
    assert set(paper["rows"]) - {paper["reference_row"]} <= names  # every transcribed row has its run
    reference = paper["rows"][paper["reference_row"]]
    assert {t: reference[t] for t in PAPER_SINGLE_TASK} == {t: v for t, (_, v, _) in PAPER_SINGLE_TASK.items()}
    for name, row in paper["rows"].items():  # a complete row's delta_m follows from its cells (the transcription)
        if row["delta_m"] is not None:
            assert _delta_m(row, PAPER_SINGLE_TASK) == pytest.approx(row["delta_m"], abs=0.01), name
