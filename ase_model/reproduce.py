"""Reproduce the ASE paper (arXiv 2510.00570): its Table 1 and Figures 2-4 from the checked-in sweep.

    python -m ase_model.reproduce --data PASCAL_MT --pretrained vit_b16.safetensors --output runs/paper
    python -m ase_model.reproduce --dataset nyud --data NYUD_MT --pretrained ...        # the NYUD-v2 sweep
    python -m ase_model.reproduce --rows ase-32-6-2-2 mtl-vit 'single-*' --dry-run    # the commands, nothing run
    python -m ase_model.reproduce --nproc-per-node 8 --data PASCAL_MT --pretrained ...  # every row on 8 GPUs
    python -m ase_model.reproduce --data PASCAL_MT --pretrained ... --edge-eval-every 5 # unknown options: to each row

The sweep is data: one file per row in ase_model/configs/<dataset>/ (trainer options, seed included), each
loadable by itself with `python -m ase_model.train -c FILE`; every row is passed --dataset. The rows run one after
another, each in its own directory OUTPUT/ROW as a `python -m ase_model.train` process (under torchrun with
--nproc-per-node N: launch this command with python, not torchrun; it starts every row on all N processes). A row
whose metrics.jsonl has its last epoch is finished and never run again; a row with a checkpoint resumes (--resume);
a row that fails is reported and the sweep goes on. SIGTERM or Ctrl-C stops the running row at a step boundary (it
saves last.pt) and the sweep: the same command continues it. Each row's output goes to OUTPUT/logs/ROW.log. At the
end, OUTPUT/table1.md, table1.json and the figures are written from the runs' own logs (ase_model/report.py).
Without --data every row trains on a small synthetic dataset, and the report says so.
"""

import argparse
import contextlib
import fnmatch
import glob
import io
import os
import shlex
import signal
import subprocess
import sys
import time

import yaml
from tqdm import tqdm

from . import datasets
from .errors import UserError
from .options import DEFAULT_DATASET, Parser

CONFIGS = os.path.join(os.path.dirname(__file__), "configs")
# what the sweep sets for every row itself: the trainer options a user may not pass through
OWN = ("config", "output", "resume", "overwrite", "eval_only")


def say(msg: str) -> None:
    """A line to stderr, above the progress bar."""
    tqdm.write(msg, file=sys.stderr)


def parser() -> argparse.ArgumentParser:
    # no abbreviations: an option it does not know is the trainer's, however it starts
    p = Parser(prog="python -m ase_model.reproduce", description=__doc__, allow_abbrev=False,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="dataset root, passed to every row (default: synthetic data, labelled as such)")
    p.add_argument("--pretrained", help="ViT weights, passed to every row (default: a random backbone, which the "
                                        "trainer warns about)")
    p.add_argument("--output", help="the sweep's directory: one run directory per row, logs/, the table and figures "
                                    f"(default: runs/paper for {DEFAULT_DATASET}, runs/paper-DATASET for the others)")
    p.add_argument("--dataset", default=DEFAULT_DATASET, help="the benchmark every row trains on, and the sweep: "
                   f"ase_model/configs/DATASET/*.yaml (one of {', '.join(datasets.names())}; default: %(default)s)")
    p.add_argument("--configs", help="a directory of row files to run instead of the checked-in sweep")
    p.add_argument("--rows", nargs="+", metavar="ROW", help="rows to run: file names without .yaml, or patterns "
                                                            "('ase-*'); default: all")
    p.add_argument("--nproc-per-node", type=int, default=1, help="processes (GPUs) per row: more than 1 starts each "
                                                                 "row with torchrun (default: %(default)s)")
    p.add_argument("--dry-run", action="store_true", help="print each row's state and command; run nothing")
    p.add_argument("--no-report", action="store_true", help="skip the table and figures at the end")
    return p


def row_files(directory: str, patterns: list[str] | None) -> dict[str, str]:
    """{row name: config file} of the rows to run: all in file-name order, or those of `patterns` in their order;
    UserError for a pattern matching none."""
    files = {os.path.basename(f)[:-5]: f for f in sorted(glob.glob(os.path.join(directory, "*.yaml")))}
    if not files:
        raise UserError(f"{directory}: no row files (*.yaml)")
    if not patterns:
        return files
    chosen = {}
    for pattern in patterns:
        names = fnmatch.filter(files, pattern.removesuffix(".yaml"))
        if not names:
            raise UserError(f"--rows {pattern}: no such row in {directory} (rows: {' '.join(files)})")
        chosen.update((n, files[n]) for n in names)
    return chosen


def epochs_logged(run_dir: str) -> int:
    """Epochs a run has finished: the records of its metrics.jsonl (one per epoch)."""
    try:
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            return sum(1 for line in f if line.strip())
    except FileNotFoundError:
        return 0


def row_state(run_dir: str, epochs: int) -> str:
    """done (its last epoch is logged), resume (it has a checkpoint), restart (it stopped before its first
    checkpoint: nothing to keep) or new."""
    if epochs_logged(run_dir) >= epochs:
        return "done"
    entries = os.listdir(run_dir) if os.path.isdir(run_dir) else []
    if any(name in entries for name in ("last.pt", "last.prev.pt")):
        return "resume"
    return "restart" if entries else "new"


def command(config: str, run_dir: str, state: str, args, passthrough: list[str]) -> list[str]:
    train = ["-m", "ase_model.train", "-c", config, "--dataset", args.dataset, "--output", run_dir]
    if args.data:
        train += ["--data", args.data]
    if args.pretrained:
        train += ["--pretrained", args.pretrained]
    train += passthrough + {"resume": ["--resume"], "restart": ["--overwrite"]}.get(state, [])
    if args.nproc_per_node > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                str(args.nproc_per_node), *train]
    return [sys.executable, *train]


def check(args, passthrough: list[str], rows: dict[str, str]) -> dict[str, int]:
    """Every row's options resolved as the trainer will (a bad row file or pass-through option is refused before
    anything runs); returns the epochs of each row."""
    from .options import parser as parser_of_train
    from .options import resolve_args

    if "WORLD_SIZE" in os.environ:
        raise UserError("run it with python, not under torchrun: --nproc-per-node N starts every row with torchrun")
    # as the trainer's parser reads them (it takes abbreviations: --out is --output)
    train = parser_of_train()
    given, _ = train.parse_known_args(passthrough)
    own = [name for name in OWN if getattr(given, name) != train.get_default(name)]
    if own:
        raise UserError(f"--{own[0].replace('_', '-')}: the sweep sets it for every row (one run directory per row "
                        "under --output)")
    if args.nproc_per_node < 1:
        raise UserError(f"--nproc-per-node must be positive, got {args.nproc_per_node}")
    if args.data and not os.path.isdir(args.data):
        raise UserError(f"--data {args.data}: no such directory")
    if args.pretrained and not os.path.isfile(args.pretrained):
        raise UserError(f"--pretrained {args.pretrained}: no such file")
    epochs = {}
    for name, config in rows.items():
        said = io.StringIO()
        try:
            with contextlib.redirect_stderr(said):
                epochs[name] = resolve_args(["-c", config, "--dataset", args.dataset, *passthrough]).epochs
        except SystemExit as e:  # the trainer's parser names the option it refuses
            reason = said.getvalue().strip().splitlines()[0].removeprefix("python -m ase_model.train: error: ")
            raise UserError(f"row {name} ({config}): {reason}") from e
        mixed = _dataset_of_run(os.path.join(args.output, name))
        if mixed not in (None, args.dataset):
            raise UserError(f"{os.path.join(args.output, name)} is a run on {mixed}, not --dataset {args.dataset}: "
                            "give this sweep its own --output")
    return epochs


def _dataset_of_run(run_dir: str) -> str | None:
    """The dataset of the run in run_dir (its config.yaml), or None where there is none yet."""
    try:
        with open(os.path.join(run_dir, "config.yaml")) as f:
            return (yaml.safe_load(f) or {}).get("dataset", DEFAULT_DATASET)
    except FileNotFoundError:
        return None


class Sweep:
    """Runs the rows one after another; SIGTERM / SIGINT go to the running row once, and stop the sweep after it."""

    def __init__(self, args, passthrough: list[str], rows: dict[str, str], epochs: dict[str, int]):
        self.args, self.passthrough, self.rows, self.epochs = args, passthrough, rows, epochs
        self.proc: subprocess.Popen | None = None
        self.signal: int | None = None

    def on_signal(self, signum, frame) -> None:
        self.signal = signum
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signum)  # the row finishes its step, saves last.pt and exits

    def run(self) -> dict[str, str]:
        """{row: outcome} of the rows this invocation reached: done, skipped (finished before), failed (exit N),
        stopped (by a signal, or --max-steps)."""
        args = self.args
        logs = os.path.join(args.output, "logs")
        os.makedirs(logs, exist_ok=True)
        outcome = {}
        total = sum(self.epochs.values())
        done = sum(min(epochs_logged(os.path.join(args.output, n)), e) for n, e in self.epochs.items())
        bar = tqdm(total=total, initial=done, unit="epoch", dynamic_ncols=True, file=sys.stderr)
        handlers = {s: signal.signal(s, self.on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            for i, (name, config) in enumerate(self.rows.items(), 1):
                if self.signal is not None:  # came between two rows
                    break
                run_dir = os.path.join(args.output, name)
                state = row_state(run_dir, self.epochs[name])
                if state == "done":
                    outcome[name] = "skipped"
                    say(f"row {i}/{len(self.rows)} {name}: finished before, not run again")
                    continue
                outcome[name] = self.run_row(name, config, run_dir, state, bar, i, logs)
        finally:
            for s, h in handlers.items():
                signal.signal(s, h)
            bar.close()
        return outcome

    def run_row(self, name, config, run_dir, state, bar, i, logs) -> str:
        cmd = command(config, run_dir, state, self.args, self.passthrough)
        log = os.path.join(logs, f"{name}.log")
        epochs, before = self.epochs[name], epochs_logged(run_dir)
        say(f"row {i}/{len(self.rows)} {name}: {'resuming' if state == 'resume' else 'starting'} (log: {log})")
        with open(log, "a") as out:
            out.write(f"\n$ {shlex.join(cmd)}\n")
            out.flush()
            # its own session: a Ctrl-C in the terminal reaches the sweep, which passes it on once (a second
            # SIGINT would stop the row without saving)
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
            if self.signal is not None:  # came while it started
                self.proc.send_signal(self.signal)
            seen = before
            bar.set_description(f"row {i}/{len(self.rows)} {name} epoch {seen}/{epochs}")
            while True:
                try:
                    code = self.proc.wait(timeout=1.0)
                    break
                except subprocess.TimeoutExpired:
                    pass
                now = min(epochs_logged(run_dir), epochs)
                if now != seen:
                    bar.set_description(f"row {i}/{len(self.rows)} {name} epoch {now}/{epochs}", refresh=False)
                    bar.update(now - seen)
                    seen = now
            self.proc = None
        now = min(epochs_logged(run_dir), epochs)
        bar.update(now - seen)
        if now >= epochs:
            return "done"
        if self.signal is not None:
            say(f"row {name}: stopped by {signal.Signals(self.signal).name} at epoch {now}/{epochs} (it saved "
                "last.pt); the same command continues the sweep")
            return "stopped"
        if code == 0:  # a pass-through --max-steps
            say(f"row {name}: ended at epoch {now}/{epochs} without an error (--max-steps?); it resumes next time")
            return "stopped"
        with open(log) as f:
            tail = f.read().strip().splitlines()[-3:]
        say(f"row {name}: FAILED (exit {code}) at epoch {now}/{epochs}; the sweep goes on. Last lines of {log}:"
            + "".join(f"\n    {line}" for line in tail))
        return f"failed (exit {code})"


def main(argv=None) -> int:
    """The command line; exit status 0 when every row chosen is finished, 1 when one failed, 2 for a user error,
    128 + N after signal N."""
    p = parser()
    args, passthrough = p.parse_known_args(argv)
    try:
        directory = args.configs or os.path.join(CONFIGS, args.dataset)
        if args.dataset not in datasets.names() or not (args.configs or os.path.isdir(directory)):
            known = [d for d in datasets.names() if os.path.isdir(os.path.join(CONFIGS, d))]
            raise UserError(f"--dataset {args.dataset}: no sweep for it (sweeps: {', '.join(known)})")
        if args.output is None:
            args.output = "runs/paper" if args.dataset == DEFAULT_DATASET else f"runs/paper-{args.dataset}"
        rows = row_files(directory, args.rows)
        epochs = check(args, passthrough, rows)
    except UserError as e:
        print(f"{p.prog}: error: {e}", file=sys.stderr)
        return 2
    if not args.data:
        print("no --data: every row trains on a small SYNTHETIC dataset; its numbers say nothing about the paper",
              file=sys.stderr)
    if args.dry_run:
        for name, config in rows.items():
            run_dir = os.path.join(args.output, name)
            state = row_state(run_dir, epochs[name])
            print(f"# {name}: {state}")
            if state != "done":
                print(shlex.join(command(config, run_dir, state, args, passthrough)))
        return 0
    start = time.monotonic()
    sweep = Sweep(args, passthrough, rows, epochs)
    outcome = sweep.run()
    failed = [n for n, o in outcome.items() if o.startswith("failed")]
    print(f"sweep: {sum(o in ('done', 'skipped') for o in outcome.values())} of {len(rows)} rows finished"
          + (f", failed: {', '.join(failed)}" if failed else "") + f" ({time.monotonic() - start:.0f} s)",
          file=sys.stderr)
    if not args.no_report:
        from .report import write_report

        for path in write_report(args.output, args.dataset):
            print(f"wrote {path}", file=sys.stderr)
    if sweep.signal is not None:
        return 128 + sweep.signal
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
