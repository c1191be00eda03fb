"""ase_model/train.py end to end on a tiny synthetic dataset: the loss falls, a resumed run is the uninterrupted
run, two gloo processes train exactly like one process on the same global batch, a NaN stops the run without a
broken checkpoint, and --eval-only evaluates a checkpoint. Also ase_model/plots.py and ase_model/synthetic.py."""

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

import ase_model.options as options
import ase_model.train as train


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Command-line options of a seconds-long run; the synthetic dataset is generated once for the module."""
    syn = str(tmp_path_factory.mktemp("data") / "syn")
    return ["--synthetic-dir", syn, "--synthetic-size", "16", "4", "32", "--img-size", "32", "--patch-size", "8",
            "--embed-dim", "48", "--depth", "2", "--num-heads", "3", "--head-dim", "16", "--batch-size", "4",
            "--num-experts", "8", "--top-k", "2", "--num-shared", "1", "--expert-rank", "2", "--epochs", "2",
            "--warmup-steps", "2", "--lr", "3e-3"]


def _params(output):
    return torch.load(os.path.join(output, "last.pt"), map_location="cpu", weights_only=False)["model"]


def _history(output):
    with open(os.path.join(output, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_training_lowers_the_loss_and_writes_its_outputs(tiny, tmp_path):
    out = str(tmp_path / "run")
    results = train.main(tiny + ["--output", out, "--epochs", "4"])
    history = _history(out)
    assert history[-1]["train/loss"] < 0.7 * history[0]["train/loss"], [h["train/loss"] for h in history]
    for name in ("config.yaml", "last.pt", "best.pt", "losses.png", "shared_gates.png", "expert_usage.png"):
        assert os.path.exists(os.path.join(out, name)), name
    with open(os.path.join(out, "config.yaml")) as f:
        assert yaml.safe_load(f)["num_experts"] == 8
    assert {"semseg", "human_parts", "sal", "normals", "edge", "delta_m"} <= set(results)
    gates = history[-1]["routing"]["shared_gate"]
    assert len(gates) == 2 and len(gates[0]) == 5 and all(0 < g < 1 for row in gates for g in row)


def test_resume_reproduces_the_uninterrupted_run(tiny, tmp_path):
    whole, parts = str(tmp_path / "whole"), str(tmp_path / "parts")
    train.main(tiny + ["--output", whole, "--no-plots"])
    train.main(tiny + ["--output", parts, "--no-plots", "--max-steps", "3"])  # stops in the middle of epoch 0
    assert torch.load(os.path.join(parts, "last.pt"), weights_only=False)["step"] == 3
    train.main(tiny + ["--output", parts, "--no-plots", "--resume"])
    a, b = _params(whole), _params(parts)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"
    # and its log: one record per epoch, with the same losses and metrics (not the same speed)
    logged = [{k: v for k, v in r.items() if k != "images_per_s"} for r in _history(parts)]
    assert logged == [{k: v for k, v in r.items() if k != "images_per_s"} for r in _history(whole)]

    # a crash in the middle of an epoch: the run continues from its last periodic checkpoint (step 3)
    crashed, real_step, calls = str(tmp_path / "crashed"), train.Trainer.train_step, []

    def dies_at_step_4(self, batch):
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("killed")
        return real_step(self, batch)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train.Trainer, "train_step", dies_at_step_4)
        with pytest.raises(RuntimeError, match="killed"):
            train.main(tiny + ["--output", crashed, "--no-plots", "--checkpoint-every", "3"])
    assert torch.load(os.path.join(crashed, "last.pt"), weights_only=False)["step"] == 3
    train.main(tiny + ["--output", crashed, "--no-plots", "--resume"])
    c = _params(crashed)
    for k in a:
        assert torch.equal(a[k], c[k]), f"{k} differs after the crash and resume"


def test_two_gloo_processes_match_one_process(tiny, tmp_path):
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    args = tiny + ["--epochs", "1", "--no-plots"]
    # the same intra-op thread count as the two processes below (OMP_NUM_THREADS=1): matmuls split over threads
    # round differently, which Adam amplifies on near-zero gradients beyond the tolerance (2.6e-5 vs 2.4e-7)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train.main(args + ["--output", one])
    finally:
        torch.set_num_threads(threads)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "ase_model.train", *args, "--output", two], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = _params(one), _params(two)
    for k in a:
        # the same arithmetic up to the order of the cross-process sums
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")


def test_non_finite_loss_stops_without_a_broken_checkpoint(tiny, tmp_path, monkeypatch):
    out = str(tmp_path / "nan")
    real, calls = train.multi_task_loss, []

    def poisoned(*args, **kwargs):
        total, parts = real(*args, **kwargs)
        calls.append(1)
        return (total * float("nan") if len(calls) == 3 else total), parts

    monkeypatch.setattr(train, "multi_task_loss", poisoned)
    with pytest.raises(SystemExit) as stop:
        train.main(tiny + ["--output", out, "--checkpoint-every", "1"])
    assert stop.value.code == 2
    state = torch.load(os.path.join(out, "last.pt"), weights_only=False)
    assert state["step"] == 2, "last.pt must hold the last good step"
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]


def test_non_finite_gradient_stops_before_the_step(tiny, tmp_path, monkeypatch):
    out = str(tmp_path / "nangrad")
    real, calls = train.multi_task_loss, []

    def poisoned(preds, *args, **kwargs):
        total, parts = real(preds, *args, **kwargs)
        calls.append(1)
        if len(calls) == 2:  # the loss stays 0 + total, its gradient is 0 * inf = NaN
            total = total + torch.sqrt(preds["semseg"].sum() * 0.0)
        return total, parts

    monkeypatch.setattr(train, "multi_task_loss", poisoned)
    with pytest.raises(SystemExit) as stop:
        train.main(tiny + ["--output", out, "--checkpoint-every", "1", "--no-plots"])
    assert stop.value.code == 2
    state = torch.load(os.path.join(out, "last.pt"), weights_only=False)
    assert state["step"] == 1 and all(torch.isfinite(v).all() for v in state["model"].values())


def test_eval_only_evaluates_a_checkpoint(tiny, tmp_path, capsys):
    out = str(tmp_path / "run")
    trained = train.main(tiny + ["--output", out, "--epochs", "1"])
    again = train.main(tiny + ["--output", str(tmp_path / "eval"), "--eval-only", os.path.join(out, "last.pt")])
    assert again["semseg"]["mIoU"] == pytest.approx(trained["semseg"]["mIoU"])
    # without the model options: they come from the checkpoint
    alone = train.main(["--output", str(tmp_path / "eval2"), "--eval-only", os.path.join(out, "last.pt")])
    assert alone["normals"]["mean"] == pytest.approx(trained["normals"]["mean"])
    with open(tmp_path / "eval2" / "eval_metrics.json") as f:
        assert json.load(f)["semseg"]["mIoU"] == pytest.approx(trained["semseg"]["mIoU"])
    assert not os.path.exists(tmp_path / "eval2" / "config.yaml"), "an evaluation writes eval_config.yaml"
    assert "| semseg | mIoU |" in capsys.readouterr().out


def test_options_resolve_preset_then_config_then_command_line(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("preset: paper\nlr: 0.5\nepochs: 7\n")
    args = options.resolve_args(["-c", str(cfg), "--epochs", "9"])
    assert (args.preset, args.embed_dim, args.lr, args.epochs) == ("paper", 768, 0.5, 9)
    assert options.resolve_args([]).embed_dim == options.PRESETS["tiny"]["embed_dim"]
    cfg.write_text("learning_rate: 1\n")
    with pytest.raises(SystemExit):
        options.resolve_args(["-c", str(cfg)])
    with pytest.raises(SystemExit):
        options.resolve_args(["--mode", "none", "--num-shared", "2"])
