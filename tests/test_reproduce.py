"""ase_model/reproduce.py and ase_model/report.py end to end on a tiny sweep: three checked-in rows on synthetic data
with a tiny ViT (the trainer options passed through), killed in the middle of a row, continued without redoing the
finished row, and reported (the table's delta_m recomputed here from its per-task numbers, the figures decoded).
Also the checked-in sweep itself: every row loads as the trainer's config and no two rows are the same run."""

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

import ase_model.reproduce as reproduce
from ase_model.options import resolve_args

ROWS = ["ase-16-3-1-4", "mtl-vit", "single-semseg"]  # run in this order
# the paper's single-task ResNet-18 row (arXiv 2510.00570, Table 1; DESIGN.md): metric, value, lower is better
PAPER_SINGLE_TASK = {"semseg": ("mIoU", 60.1, False), "normals": ("mean", 15.4, True),
                     "human_parts": ("mIoU", 51.0, False), "sal": ("mIoU", 63.2, False), "edge": ("odsF", 50.8, False)}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Trainer options that make a paper row a seconds-long run (2 epochs of 2 steps, checkpoints every step)."""
    syn = str(tmp_path_factory.mktemp("data") / "syn")
    return ["--synthetic-dir", syn, "--synthetic-size", "8", "4", "32", "--img-size", "32", "--patch-size", "8",
            "--embed-dim", "48", "--depth", "2", "--num-heads", "3", "--head-dim", "16", "--batch-size", "4",
            "--epochs", "2", "--warmup-steps", "1", "--lr", "3e-3", "--checkpoint-every", "1", "--edge-thresholds",
            "5", "--no-plots"]


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


def test_several_processes_run_every_row_under_torchrun(tmp_path, capsys):
    assert reproduce.main(["--output", str(tmp_path), "--rows", "ase-32-6-2-2", "--nproc-per-node", "8",
                           "--dry-run"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == "# ase-32-6-2-2: new"
    assert "-m torch.distributed.run --standalone --nproc-per-node 8 -m ase_model.train -c " in printed[1]
    assert printed[1].endswith(f"--output {tmp_path}/ase-32-6-2-2")


def test_the_checked_in_sweep_loads_and_holds_every_row_once():
    files = sorted(glob.glob(os.path.join(reproduce.CONFIGS, "pascal_context", "*.yaml")))
    runs = {}
    for path in files:
        with open(path) as f:
            assert "seed" in yaml.safe_load(f), f"{path} names no seed"
        args = resolve_args(["-c", path])
        assert (args.preset, args.img_size, args.epochs) == ("paper", 224, 40), path
        key = (tuple(args.tasks), args.num_experts, args.num_experts and (args.top_k, args.num_shared,
                                                                          args.expert_rank, args.mode))
        assert key not in runs, f"{path} is the same run as {runs.get(key)}"
        runs[key] = path
    names = {os.path.basename(p)[:-5] for p in files}
    with open(os.path.join(os.path.dirname(reproduce.__file__), "paper_table1.yaml")) as f:
        paper = yaml.safe_load(f)
    assert set(paper["rows"]) - {paper["reference_row"]} <= names  # every transcribed row has its run
    reference = paper["rows"][paper["reference_row"]]
    assert {t: reference[t] for t in PAPER_SINGLE_TASK} == {t: v for t, (_, v, _) in PAPER_SINGLE_TASK.items()}
    for name, row in paper["rows"].items():  # a complete row's delta_m follows from its cells (the transcription)
        if row["delta_m"] is not None:
            assert _delta_m(row, PAPER_SINGLE_TASK) == pytest.approx(row["delta_m"], abs=0.01), name
    assert {f"single-{t}" for t in ("semseg", "human-parts", "sal", "normals", "edge")} <= names
