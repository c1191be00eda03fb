"""ase_model/train.py end to end on a tiny synthetic dataset: the loss falls, a resumed run is the uninterrupted
run, two gloo processes train exactly like one process on the same global batch, a NaN stops the run without a
broken checkpoint, and --eval-only evaluates a checkpoint. Also ase_model/plots.py and ase_model/synthetic.py."""

import argparse
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
import yaml

import ase_model.options as options
import ase_model.train as train
import ase_model.trainer as trainer_module


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


@pytest.fixture(scope="module")
def whole(tiny, tmp_path_factory):
    """The uninterrupted run that stopped and resumed runs must reproduce."""
    out = str(tmp_path_factory.mktemp("whole") / "run")
    train.main(tiny + ["--output", out, "--no-plots"])
    return out


def _logged(output):
    """The log's records without their speed."""
    return [{k: v for k, v in r.items() if k != "images_per_s"} for r in _history(output)]


def _assert_same_run(whole, other, what):
    a, b = _params(whole), _params(other)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs {what}"
    assert _logged(other) == _logged(whole), f"the log differs {what}"


def test_pascal_runs_are_those_of_before_the_dataset_plug_in(whole):
    """The `whole` run against the one recorded before PASCAL-Context became a plug-in (tests/pascal_tiny_run.json,
    whose parameters' sha256 this run reproduced exactly on the machine that recorded it). Another CPU's kernels
    round differently, so the comparison uses the bounds `_run_bounds` derives: each parameter tensor's sum and
    absolute sum within numel times the per-element bound, the logged training losses within the relative loss
    bound. The validation metrics are not compared: an arg-max that flips on one pixel moves an mIoU by more than
    any rounding bound (and the normals and edge meters were changed on purpose since the recording)."""
    with open(os.path.join(os.path.dirname(__file__), "pascal_tiny_run.json")) as f:
        recorded = json.load(f)
    atol, rel = _run_bounds(whole)
    params = _params(whole)
    assert sorted(params) == sorted(recorded["parameters"])
    for name, (total, absolute) in recorded["parameters"].items():
        p = params[name].double()
        assert p.sum().item() == pytest.approx(total, rel=0, abs=p.numel() * atol), name
        assert p.abs().sum().item() == pytest.approx(absolute, rel=0, abs=p.numel() * atol), name
    logged = _logged(whole)
    assert len(logged) == len(recorded["log"])
    for got, want in zip(logged, recorded["log"], strict=True):
        assert {k: got[k] for k in ("epoch", "step", "lr")} == {k: want[k] for k in ("epoch", "step", "lr")}
        for key in [k for k in want if k.startswith("train/")]:
            assert got[key] == pytest.approx(want[key], rel=rel, abs=0), key


def test_resume_reproduces_the_uninterrupted_run(tiny, whole, tmp_path, capsys):
    parts = str(tmp_path / "parts")
    train.main(tiny + ["--output", parts, "--no-plots", "--max-steps", "3"])  # stops in the middle of epoch 0
    assert torch.load(os.path.join(parts, "last.pt"), weights_only=False)["step"] == 3
    # the options come from the checkpoint: none but --output and --resume are needed
    train.main(["--output", parts, "--no-plots", "--resume"])
    assert "WARNING: no --pretrained" in capsys.readouterr().err
    _assert_same_run(whole, parts, "after resume")

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
    train.main(["--output", crashed, "--no-plots", "--resume"])
    _assert_same_run(whole, crashed, "after the crash and resume")


@pytest.mark.parametrize("dataset", ["pascal_context", "nyud"])
def test_two_gloo_processes_match_one_process(tiny, tmp_path, dataset):
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    args = tiny + ["--epochs", "1", "--no-plots", "--dataset", dataset]
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
    real, calls = trainer_module.multi_task_loss, []

    def poisoned(*args, **kwargs):
        total, parts = real(*args, **kwargs)
        calls.append(1)
        return (total * float("nan") if len(calls) == 3 else total), parts

    monkeypatch.setattr(trainer_module, "multi_task_loss", poisoned)
    with pytest.raises(SystemExit) as stop:
        train.main(tiny + ["--output", out, "--checkpoint-every", "1"])
    assert stop.value.code == 2
    state = torch.load(os.path.join(out, "last.pt"), weights_only=False)
    assert state["step"] == 2, "last.pt must hold the last good step"
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]


def test_non_finite_gradient_stops_before_the_step(tiny, tmp_path, monkeypatch):
    out = str(tmp_path / "nangrad")
    real, calls = trainer_module.multi_task_loss, []

    def poisoned(preds, *args, **kwargs):
        total, parts = real(preds, *args, **kwargs)
        calls.append(1)
        if len(calls) == 2:  # the loss stays 0 + total, its gradient is 0 * inf = NaN
            total = total + torch.sqrt(preds["semseg"].sum() * 0.0)
        return total, parts

    monkeypatch.setattr(trainer_module, "multi_task_loss", poisoned)
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
    assert options.resolve_args([]).edge_matcher == "fast"
    cfg.write_text("learning_rate: 1\n")
    with pytest.raises(SystemExit):
        options.resolve_args(["-c", str(cfg)])
    with pytest.raises(SystemExit):
        options.resolve_args(["--mode", "none", "--num-shared", "2"])


# ---------------------------------------------------------------------------------------------- no lost work


def _kill_self_at_step(monkeypatch, signum, at):
    """The signal arrives while step `at` runs (as from `kill` or Ctrl-C)."""
    real, calls = train.Trainer.train_step, []

    def step(self, batch):
        calls.append(1)
        if len(calls) == at:
            os.kill(os.getpid(), signum)
        return real(self, batch)

    monkeypatch.setattr(train.Trainer, "train_step", step)


@pytest.mark.parametrize("signum, code, at", [(signal.SIGTERM, 143, 3), (signal.SIGINT, 130, 4)],
                         ids=["SIGTERM-mid-epoch", "SIGINT-before-eval"])
def test_a_signal_finishes_the_step_saves_and_resumes_exactly(tiny, whole, tmp_path, capsys, signum, code, at):
    out = str(tmp_path / "run")
    handlers = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with pytest.MonkeyPatch.context() as mp:
        _kill_self_at_step(mp, signum, at)  # step 3: between periodic checkpoints; 4: the last of epoch 0
        with pytest.raises(SystemExit) as stop:
            train.main(tiny + ["--output", out, "--no-plots"])
    assert stop.value.code == code
    err = capsys.readouterr().err
    assert f"stopped by {signal.Signals(signum).name}: last.pt holds step {at}" in err and "Traceback" not in err
    assert torch.load(os.path.join(out, "last.pt"), weights_only=False)["step"] == at
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == handlers
    train.main(["--output", out, "--no-plots", "--resume"])
    _assert_same_run(whole, out, "after the signal and resume")


def test_a_damaged_last_checkpoint_falls_back_to_the_previous_one(tiny, whole, tmp_path, capsys):
    out = str(tmp_path / "run")
    train.main(tiny + ["--output", out, "--no-plots", "--max-steps", "3", "--checkpoint-every", "1"])
    prev = os.path.join(out, "last.prev.pt")
    assert torch.load(prev, weights_only=False)["step"] == 2
    last = os.path.join(out, "last.pt")
    with open(last, "r+b") as f:  # a write cut short (a full disk, a copy that stopped)
        f.truncate(os.path.getsize(last) // 2)
    capsys.readouterr()
    damaged = open(last, "rb").read()
    train.main(["--output", out, "--no-plots", "--resume"])
    assert f"resuming from the previous checkpoint {prev} (step 2)" in capsys.readouterr().err
    _assert_same_run(whole, out, "after resuming from last.prev.pt")
    # the next save kept a readable previous checkpoint, not the damaged file, which is kept aside
    assert torch.load(prev, weights_only=False)["step"] > 2
    assert open(os.path.join(out, "last.damaged.pt"), "rb").read() == damaged


# ---------------------------------------------------------------------------------------------- no mixed runs


def _snapshot(directory):
    return {name: open(os.path.join(directory, name), "rb").read() for name in sorted(os.listdir(directory))
            if os.path.isfile(os.path.join(directory, name))}


def _user_error(argv, capsys, *expected, mid_run=False):
    """argv ends in a user error: exit status 2, one or two lines naming what is wrong, no traceback (mid_run: the
    run's log comes first, the last line is the error)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        train.main(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "".join(err), err
    if mid_run:
        err = err[-1:]
    assert 1 <= len(err) <= 2, err
    for text in expected:
        assert text in "\n".join(err), (text, err)


@pytest.mark.parametrize("error", ["user", "internal"])
def test_user_errors_are_one_line_and_internal_errors_keep_their_traceback(tiny, tmp_path, capsys, monkeypatch,
                                                                           error):
    from ase_model.errors import UserError

    def fit(self):
        raise UserError("--pretrained w.pth: not ViT weights") if error == "user" else RuntimeError("a bug")

    monkeypatch.setattr(train.Trainer, "fit", fit)
    argv = tiny + ["--output", str(tmp_path / "run"), "--no-plots"]
    if error == "user":
        _user_error(argv, capsys, "--pretrained w.pth: not ViT weights")
    else:
        with pytest.raises(RuntimeError, match="a bug"):
            train.main(argv)


def test_an_existing_run_is_never_overwritten_or_mixed(tiny, tmp_path, capsys):
    out = str(tmp_path / "run")
    train.main(tiny + ["--output", out, "--no-plots", "--epochs", "1"])
    before = _snapshot(out)
    _user_error(tiny + ["--output", out], capsys, "already holds a run", "--resume", "--overwrite")
    # a resumed run that would be another run, or fails before its first step, changes nothing either
    _user_error(["--output", out, "--resume", "--num-experts", "16", "--top-k", "4"], capsys,
                "--num-experts 16 (the run has 8)", "--top-k 4 (the run has 2)")
    _user_error(["--output", out, "--resume", "--pretrained", str(tmp_path / "vit.safetensors")], capsys,
                "--pretrained", "(the run has None")
    _user_error(tiny + ["--output", out, "--overwrite", "--batch-size", "64"], capsys, "--batch-size 64")
    assert _snapshot(out) == before
    # a second run into the same directory at the same time is refused by the directory's lock
    from ase_model.rundir import RunDir

    held = RunDir(out)
    held.lock()
    try:
        _user_error(["--output", out, "--resume"], capsys, "in use by another run")
    finally:
        held.release()
    assert _snapshot(out) == before
    # --overwrite starts anew: the old run's files are gone, the log is the new run's
    (tmp_path / "run" / "losses.png").write_bytes(b"old plot")
    train.main(tiny + ["--output", out, "--no-plots", "--overwrite", "--max-steps", "2"])
    assert not os.path.exists(os.path.join(out, "losses.png")) and not os.path.exists(os.path.join(out, "best.pt"))
    assert _history(out) == [] and torch.load(os.path.join(out, "last.pt"), weights_only=False)["step"] == 2
    (tmp_path / "run" / "notes.txt").write_text("mine")
    _user_error(tiny + ["--output", out, "--overwrite"], capsys, "notes.txt")


def test_synthetic_data_is_keyed_by_its_options_and_generated_atomically(tmp_path):
    from concurrent.futures import ProcessPoolExecutor

    from ase_model.synthetic_store import ensure_synthetic

    base = str(tmp_path / "syn")
    with ProcessPoolExecutor(2) as pool:  # two generators of the same data at once: one directory, complete
        roots = list(pool.map(ensure_synthetic, [base] * 2, [4] * 2, [2] * 2, [16] * 2, [0] * 2))
    assert roots[0] == roots[1] and os.listdir(base) == [os.path.basename(roots[0])]
    other = ensure_synthetic(base, 4, 2, 16, 1)
    assert other != roots[0] and sorted(os.listdir(base)) == sorted(os.path.basename(r) for r in (roots[0], other))
    with open(os.path.join(roots[0], "ImageSets", "Context", "train.txt")) as f:
        assert len(f.read().split()) == 4
    assert ensure_synthetic(base, 4, 2, 16, 0) == roots[0]


# -------------------------------------------------------------------------------------------- resume is resume


def test_resume_applies_a_changed_schedule_and_says_so(tiny, tmp_path, capsys):
    out = str(tmp_path / "run")
    train.main(tiny + ["--output", out, "--no-plots", "--max-steps", "3"])
    capsys.readouterr()
    train.main(["--output", out, "--no-plots", "--resume", "--lr", "1e-5", "--epochs", "3", "--max-steps", "5"])
    assert "--resume applies the changed options --epochs 3 (was 2), --lr 1e-05 (was 0.003)" in capsys.readouterr().err
    state = torch.load(os.path.join(out, "last.pt"), weights_only=False)
    assert state["step"] == 5 and state["optimizer"]["param_groups"][0]["initial_lr"] == 1e-5
    assert state["scheduler"]["base_lrs"] == [1e-5] and state["args"]["lr"] == 1e-5 and state["args"]["epochs"] == 3
    with open(os.path.join(out, "config.yaml")) as f:
        config = yaml.safe_load(f)
    assert (config["lr"], config["epochs"], config["num_experts"]) == (1e-5, 3, 8)  # what ran


def test_the_default_worker_count_is_the_machine_s_not_the_run_s(tiny, tmp_path):
    """Without --workers each machine takes its own default (8 on CUDA, 0 on a CPU): the options a checkpoint saves
    keep it unset, so a run started on CUDA and resumed on a CPU does not start 8 loader processes there."""
    trainer = train.Trainer(options.resolve_args(tiny + ["--output", str(tmp_path / "run")]))
    assert trainer.args.workers is None
    assert trainer.workers == (min(8, os.cpu_count() or 1) if torch.cuda.is_available() else 0)
    resumed = options.resolve_args(["--output", str(tmp_path / "run"), "--resume"], resumed=vars(trainer.args))
    assert resumed.workers is None


def _save_backbone(tiny, path, seed=0):
    """A ViT weight file that fits the tiny model (what a user passes as --pretrained)."""
    from safetensors.torch import save_file

    from ase_model.model import build_model

    torch.manual_seed(seed)
    model = build_model(options.resolve_args(tiny))
    keep = {k: v.contiguous() for k, v in model.vit.state_dict().items()
            if not any(a in k for a in ("lora_", "router", "experts."))}
    save_file(keep, path)


def test_pretrained_weights_are_recorded_and_reloaded(tiny, tmp_path, capsys):
    weights, out = str(tmp_path / "vit.safetensors"), str(tmp_path / "run")
    _save_backbone(tiny, weights)
    trained = train.main(tiny + ["--output", out, "--epochs", "1", "--no-plots", "--pretrained", weights])
    state = torch.load(os.path.join(out, "last.pt"), weights_only=False)
    assert state["args"]["pretrained"] == weights and len(state["args"]["pretrained_sha256"]) == 64
    again = train.main(["--output", str(tmp_path / "eval"), "--eval-only", os.path.join(out, "last.pt")])
    assert again["semseg"]["mIoU"] == trained["semseg"]["mIoU"]  # the backbone it was trained on, not a random one
    assert again["normals"]["mean"] == trained["normals"]["mean"]
    _save_backbone(tiny, weights, seed=1)  # the file changed under the run
    _user_error(["--output", str(tmp_path / "eval"), "--eval-only", os.path.join(out, "last.pt")], capsys,
                "sha256", "--pretrained")
    _user_error(["--output", out, "--resume", "--epochs", "2"], capsys, "sha256")
    os.remove(weights)
    _user_error(["--output", str(tmp_path / "eval"), "--eval-only", os.path.join(out, "last.pt")], capsys,
                f"--pretrained {weights}: no such file")
    text = tmp_path / "x.pth"
    text.write_text("not weights\n")
    _user_error(tiny + ["--output", str(tmp_path / "new"), "--pretrained", str(text)], capsys,
                f"--pretrained {text}: not ViT weights")
    assert not os.path.exists(tmp_path / "new"), "a run refused while it sets up leaves nothing behind"


# ---------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("bad, expected", [
    (["--batch-size", "-4"], "--batch-size must be positive, got -4"),
    (["--batch-size", "0"], "--batch-size must be positive, got 0"),
    (["--lr", "0"], "--lr must be positive"),
    (["--workers", "-1"], "--workers must be 0 or more"),
    (["--img-size", "30"], "--img-size 30 must be a multiple of --patch-size 8"),
    (["--top-k", "8"], "--top-k 8 + --num-shared 1 exceed --num-experts 8"),
    (["--resume", "--overwrite"], "choose one"),
])
def test_bad_options_are_refused_at_parse_time(tiny, tmp_path, capsys, bad, expected):
    _user_error(tiny + ["--output", str(tmp_path / "run")] + bad, capsys, expected)
    assert not os.path.exists(tmp_path / "run")


@pytest.mark.parametrize("config, expected", [
    ({"schedule": "linear"}, "--schedule: expected one of cosine, poly, got 'linear'"),
    ({"amp": "fp16"}, "--amp: expected one of"),
    ({"tasks": "semseg"}, "--tasks: expected a list of one or more values, got 'semseg'"),
    ({"tasks": []}, "--tasks: expected a list of one or more values, got []"),
    ({"augment": "x"}, "--augment: expected one of reference, crop, got 'x'"),
    ({"edge_matcher": "csa"}, "--edge-matcher: expected one of fast, pyedgeeval, got 'csa'"),
])
def test_bad_config_file_values_are_refused_like_the_command_line(tiny, tmp_path, capsys, config, expected):
    """argparse checks choices and list options on the command line only: values from -c FILE are checked too."""
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(config))
    _user_error(tiny + ["--output", str(tmp_path / "run"), "-c", str(cfg)], capsys, expected)
    assert not os.path.exists(tmp_path / "run")


def _copy_of_the_data(tiny, tmp_path):
    import shutil

    from ase_model.synthetic_store import ensure_synthetic

    args = options.resolve_args(tiny)
    root = ensure_synthetic(args.synthetic_dir, *args.synthetic_size, args.seed)
    copy = str(tmp_path / "data")
    shutil.copytree(root, copy)
    return copy


def test_missing_data_files_are_found_before_the_first_step(tiny, tmp_path, capsys):
    data = _copy_of_the_data(tiny, tmp_path)
    os.remove(os.path.join(data, "human_parts", "2009_000002.mat"))  # a val label: needed only at the first eval
    _user_error(tiny + ["--data", data, "--output", str(tmp_path / "run")], capsys,
                "1 files of the val split are missing", "human_parts/2009_000002.mat")
    assert not os.path.exists(tmp_path / "run")
    _user_error(tiny + ["--data", str(tmp_path / "nowhere"), "--output", str(tmp_path / "run")], capsys,
                "--data", "ImageSets/Context/train.txt")


def _truncate(path, keep=0.5):
    with open(path, "r+b") as f:
        f.truncate(int(os.path.getsize(path) * keep))


@pytest.mark.parametrize("name", ["JPEGImages/2008_000005.jpg", "sal_distill/2009_000002.png",
                                  "human_parts/2009_000002.mat"])
def test_truncated_data_files_are_found_before_the_first_step(tiny, tmp_path, capsys, name):
    data = _copy_of_the_data(tiny, tmp_path)
    _truncate(os.path.join(data, name))
    split = "train" if name.startswith("JPEG") else "val"
    _user_error(tiny + ["--data", data, "--output", str(tmp_path / "run")], capsys,
                f"1 files of the {split} split cannot be read", f"{name}: truncated", "check_data")
    assert not os.path.exists(tmp_path / "run")


def test_an_unreadable_file_mid_run_stops_after_saving(tiny, tmp_path, capsys, monkeypatch):
    from ase_model import check_data

    monkeypatch.setattr(trainer_module, "unreadable_files", lambda dataset: ([], 0))  # as if damaged inside its data
    data = _copy_of_the_data(tiny, tmp_path)
    jpeg = os.path.join(data, "JPEGImages", "2008_000005.jpg")
    with open(jpeg, "r+b") as f:
        f.truncate(100)
    out = str(tmp_path / "run")
    _user_error(tiny + ["--data", data, "--output", out, "--no-plots", "--epochs", "1"], capsys,
                "2008_000005.jpg", "last.pt holds step", mid_run=True)
    state = torch.load(os.path.join(out, "last.pt"), weights_only=False)
    assert 0 <= state["step"] < 4 and all(torch.isfinite(v).all() for v in state["model"].values())
    assert check_data.main(["--data", data]) == 1
    assert "2008_000005.jpg" in capsys.readouterr().out
    assert check_data.main(["--data", _copy_of_the_data(tiny, tmp_path / "good")]) == 0


# -------------------------------------------------------------------------------------------------- plots


def test_usage_plot_marks_the_shared_experts_and_scales_to_the_sparse_ones(tmp_path):
    from ase_model.plots import save_plots, usage_image

    tasks, n, k, s = ("semseg", "edge"), 8, 2, 2
    load = torch.full((2, len(tasks), n), k / (n - s)).numpy()  # (layers, tasks, N): k sparse + S shared a token
    load[..., 0] = 0.9
    load[..., n - s:] = 1.0
    image, top = usage_image(load[-1], s)
    assert image.mask[:, n - s:].all() and not image.mask[:, :n - s].any()
    assert top == pytest.approx(0.9)  # the colour scale spans the sparse experts, not the shared 1.0
    assert usage_image(load[-1], 0)[1] == 1.0
    history = [{"epoch": 0, "train/loss": 1.0, "routing": {"shared_gate": [[0.5, 0.5]] * 2, "load": load.tolist()}}]
    paths = save_plots(history, str(tmp_path), tasks, num_shared=s)
    assert [os.path.basename(p) for p in paths] == ["losses.png", "shared_gates.png", "expert_usage.png"]


# ------------------------------------------------------------------------------ a step the host cannot slow down


def test_log_every_changes_nothing_and_compile_matches_eager_and_resumes(tiny, whole, tmp_path, capsys):
    every = str(tmp_path / "every")
    train.main(tiny + ["--output", every, "--no-plots", "--log-every", "1"])
    _assert_same_run(whole, every, "with --log-every 1")
    compiled = str(tmp_path / "compiled")
    train.main(tiny + ["--output", compiled, "--no-plots", "--compile", "--cuda-graphs"])
    assert "--cuda-graphs: no CUDA device, so no CUDA graphs: the model is compiled without" in capsys.readouterr().err
    # the compiled kernels round differently; the bounds are derived in _assert_close_runs (measured on one AMD EPYC
    # under torch 2.14.1 at ATEN_CPU_CAPABILITY=avx512/avx2/default: parameters 4.6e-6/5.5e-6/6.9e-6 on one element
    # of a head's weight, at most two elements of a tensor past 1e-6; logged losses 1.3e-5 relative at most)
    _assert_close_runs(whole, compiled)
    # a compiled run stopped and resumed (compiled again: --compile comes from the checkpoint) is the compiled run
    # up to rounding, not bit for bit (a freshly compiled model rounds a step after an evaluation differently;
    # eager runs resume exactly): the same bounds, over the steps after the resume (measured 1e-8 on the parameters)
    parts = str(tmp_path / "parts")
    train.main(tiny + ["--output", parts, "--no-plots", "--compile", "--max-steps", "3"])
    train.main(["--output", parts, "--no-plots", "--resume"])
    assert torch.load(os.path.join(parts, "last.pt"), weights_only=False)["args"]["compile"]
    _assert_close_runs(compiled, parts, first_step=3)


FP32_EPS = torch.finfo(torch.float32).eps


def _adam_step_bound(t: int, beta1: float = 0.9, beta2: float = 0.999) -> float:
    """The largest |m_t / sqrt(v_t)| of bias-corrected Adam at step t (1-based), whatever the gradients: with
    m_t = sum_i a_i g_i and v_t = sum_i b_i g_i^2, Cauchy-Schwarz gives |m_t| <= sqrt(sum_i a_i^2 / b_i) sqrt(v_t)
    (1 at t = 1, 1.04 at t = 8)."""
    a = [(1 - beta1) * beta1 ** (t - i) / (1 - beta1 ** t) for i in range(1, t + 1)]
    b = [(1 - beta2) * beta2 ** (t - i) / (1 - beta2 ** t) for i in range(1, t + 1)]
    return sum(x * x / y for x, y in zip(a, b, strict=True)) ** 0.5


def _assert_close_runs(want: str, got: str, first_step: int = 0) -> None:
    """Two runs of one configuration whose arithmetic rounds differently (compiled vs eager kernels, another CPU's
    vector width) and agrees up to step `first_step`, held to bounds derived from the arithmetic, not measured:

    - parameters: AdamW moves an element by lr_t * m_t / (sqrt(v_t) + eps) per step. Where the element's gradient
      is a sum that cancels to within rounding of zero, the summation order decides its sign and size, and Adam's
      division by sqrt(v_t) gives that noise a full-size step: such an element may part by up to
      2 * sum_t lr_t * _adam_step_bound(t) (weight decay only shrinks the gap), and that is the per-element bound.
      Such elements are rare (one in 6,912 of a head's weight off by 1.6e-5 on one CPU, 4.6e-6 on another), and,
      their gradient being ~0, leave the loss unchanged to first order, so the losses are the tight check:
    - logged training losses: a loss is a mean over P = batch * img^2 pixels per task, the longest reduction in the
      tiny model, whose rounding is about eps32 * sqrt(P) relative; each of the T steps before a log adds its own
      through the parameters it leaves, so the bound is T * eps32 * sqrt(P) relative (6.1e-5 here; the MI loss,
      a cancelling sum of ~1e-3 measured 1.3e-5 under ATEN_CPU_CAPABILITY=default)."""
    a, b = _params(want), _params(got)
    atol, rel = _run_bounds(want, first_step)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=atol, msg=lambda m, k=k: f"{k}: {m}")
    for x, y in zip(_history(want), _history(got), strict=True):
        for key in [k for k in x if k.startswith("train/")]:
            assert y[key] == pytest.approx(x[key], rel=rel, abs=0), key


def _run_bounds(run: str, first_step: int = 0) -> tuple[float, float]:
    """(per-element parameter bound, relative loss bound) of `_assert_close_runs` for the run in `run`, over its
    steps after `first_step`."""
    with open(os.path.join(run, "config.yaml")) as f:
        cfg = yaml.safe_load(f)
    steps = torch.load(os.path.join(run, "last.pt"), map_location="cpu", weights_only=False)["step"]
    schedule = trainer_module.lr_lambda(argparse.Namespace(**cfg), steps)
    atol = 2 * sum(cfg["lr"] * schedule(s) * _adam_step_bound(s + 1) for s in range(first_step, steps))
    return atol, steps * FP32_EPS * (cfg["batch_size"] * cfg["img_size"] ** 2) ** 0.5


HOST_READS = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "numpy", "masked_select"}


class _HostReads(torch.overrides.TorchFunctionMode):
    """Counts the calls that read a tensor back to the host (a device sync on a GPU), by caller, leaving out
    torch.optim's: its step counters are CPU tensors, or device tensors with the fused CUDA AdamW."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in HOST_READS:
            import traceback

            callers = [f for f in traceback.extract_stack()[:-1] if "/torch/" not in f.filename]
            optim = any("/torch/optim/" in f.filename for f in traceback.extract_stack())
            if not optim:
                self.calls.append(f"{func.__name__} at {callers[-1].filename}:{callers[-1].lineno}")
        return func(*args, **(kwargs or {}))


def test_a_training_step_reads_nothing_back_from_the_device(tiny, tmp_path):
    trainer = train.Trainer(options.resolve_args(tiny + ["--output", str(tmp_path / "run")]))
    batches = iter(trainer.batches(0, 0))
    trainer.pending.append(trainer.train_step(next(batches)))  # the first step range-checks the task ids once
    for _ in range(2):
        batch = next(batches)
        with _HostReads() as reads:
            trainer.pending.append(trainer.train_step(batch))
        assert reads.calls == []
    with _HostReads() as reads:
        trainer.flush()  # the steps' losses: one read per --log-every steps
    assert len(reads.calls) == 1 and reads.calls[0].startswith("tolist"), reads.calls
    assert set(trainer.epoch_sums) >= {"loss", "mi", "semseg"} and not os.path.exists(tmp_path / "run")


def test_sigterm_from_another_process_saves_and_resumes_exactly(tiny, whole, tmp_path):
    import time

    out = str(tmp_path / "run")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(os.path.dirname(train.__file__))]
                                                      + os.environ.get("PYTHONPATH", "").split(os.pathsep)))
    proc = subprocess.Popen([sys.executable, "-m", "ase_model.train", *tiny, "--output", out, "--no-plots",
                             "--checkpoint-every", "2"], env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not os.path.exists(os.path.join(out, "last.pt")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.terminate()  # SIGTERM, as a scheduler preempting the job
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err[-2000:]
    step = torch.load(os.path.join(out, "last.pt"), weights_only=False)["step"]
    assert f"stopped by SIGTERM: last.pt holds step {step}" in err and 2 <= step < 8
    train.main(["--output", out, "--no-plots", "--resume"])
    _assert_same_run(whole, out, "after SIGTERM from outside and resume")


@pytest.mark.parametrize("edge_eval_every", [0, 1, 3])
def test_best_checkpoint_compares_evaluations_on_the_same_tasks(edge_eval_every):
    """An evaluation without the edge odsF (only some compute it) is compared with one that has it on the tasks
    both score: edges count only when every evaluation computes their odsF (--edge-eval-every 1)."""
    from types import SimpleNamespace

    from ase_model.datasets import get

    dataset = get("pascal_context")
    trainer = SimpleNamespace(dataset=dataset, args=SimpleNamespace(edge_eval_every=edge_eval_every,
                                                                    reference=dataset.reference))
    four = {"semseg": {"mIoU": 61.0}, "human_parts": {"mIoU": 50.0}, "sal": {"mIoU": 60.0}, "normals": {"mean": 16.0},
            "edge": {"bce": 0.2}}
    five = {**four, "edge": {"bce": 0.2, "odsF": 20.0}}  # a poor edge score would sink a 5-task delta_m
    without, with_edges = (train.Trainer.selection_score(trainer, r) for r in (four, five))
    if edge_eval_every == 1:
        assert with_edges < without
    else:
        assert with_edges == without


# ---------------------------------------------------------------------------------------------------- NYUD-v2


def test_nyud_trains_to_a_depth_table_and_resumes_exactly(tiny, tmp_path, capsys):
    whole, parts = str(tmp_path / "whole"), str(tmp_path / "parts")
    results = train.main(tiny + ["--dataset", "nyud", "--output", whole, "--no-plots"])
    out = capsys.readouterr()
    assert set(results) == {"semseg", "depth", "normals", "edge", "delta_m", "routing"}
    assert results["depth"]["rmse"] > 0 and results["depth"]["log_rmse"] > 0
    assert "| depth | rmse |" in out.out and "no delta_m" in out.out and "| delta_m |" not in out.out
    assert "no single-task reference" in out.err
    assert not os.path.exists(os.path.join(whole, "best.pt")), "no reference: nothing to choose best.pt by"
    assert {"train/depth", "val/depth/rmse", "val/semseg/mIoU"} <= set(_history(whole)[-1])
    train.main(tiny + ["--dataset", "nyud", "--output", parts, "--no-plots", "--max-steps", "3"])
    train.main(["--output", parts, "--no-plots", "--resume"])  # --dataset nyud comes from the checkpoint
    _assert_same_run(whole, parts, "after resume on NYUD")
    again = train.main(["--output", str(tmp_path / "eval"), "--eval-only", os.path.join(whole, "last.pt")])
    assert again["depth"]["rmse"] == pytest.approx(results["depth"]["rmse"])  # the dataset is the checkpoint's


def test_nyud_missing_files_and_tasks_are_named_before_the_first_step(tiny, tmp_path, capsys):
    import shutil

    from ase_model.synthetic_store import ensure_synthetic

    args = options.resolve_args(tiny + ["--dataset", "nyud"])
    data = str(tmp_path / "data")
    shutil.copytree(ensure_synthetic(args.synthetic_dir, *args.synthetic_size, args.seed, "nyud"), data)
    os.remove(os.path.join(data, "depth", "val_00001.npy"))
    _user_error(tiny + ["--dataset", "nyud", "--data", data, "--output", str(tmp_path / "run")], capsys,
                "1 files of the val split are missing", "depth/val_00001.npy")
    _truncate(os.path.join(data, "normals", "train_00002.npy"))
    _user_error(tiny + ["--dataset", "nyud", "--data", data, "--output", str(tmp_path / "run")], capsys,
                "1 files of the train split cannot be read", "normals/train_00002.npy: truncated")
    _user_error(tiny + ["--dataset", "nyud", "--tasks", "semseg", "sal", "--output", str(tmp_path / "run")], capsys,
                "--tasks: expected distinct tasks of --dataset nyud (semseg, depth, normals, edge)")
    _user_error(tiny + ["--dataset", "nyud", "--augment", "crop", "--output", str(tmp_path / "run")], capsys,
                "--augment crop: --dataset nyud has reference")
    assert not os.path.exists(tmp_path / "run")
