"""Multi-task training of a frozen ViT with Adaptive Shared Experts on PASCAL-Context: the training loop and
`main` (options in `options.py`, checkpoints in `checkpoints.py`, evaluation in `evaluate.py`).

    python -m ase_model.train --help
"""

import argparse
import hashlib
import json
import math
import os
import random
import signal
import sys
import threading
import time

import numpy as np
import torch
import torch.distributed as dist
import yaml
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from .checkpoints import read_latest, rng_state, save_atomic, set_rng_state, write_text_atomic
from .data import DataError, PascalContextMT
from .errors import UserError
from .evaluate import evaluate, flatten, metrics_table
from .losses import LOSS_WEIGHTS, multi_task_loss
from .metrics import delta_m, load_reference
from .model import build_model, load_pretrained
from .options import resolve, resolve_args, resume_changes
from .rundir import RunDir
from .synthetic_store import ensure_synthetic

# ------------------------------------------------------------------------------------------------ distributed


def setup_distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, device). torchrun sets WORLD_SIZE; NCCL on GPUs, gloo on CPUs."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def rank_zero() -> bool:
    """Whether this is rank 0 of a torchrun job or the only process (before or without `setup_distributed`)."""
    return int(os.environ.get("RANK", "0")) == 0


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def lr_lambda(args, total_steps: int):
    def f(step: int) -> float:
        if step < args.warmup_steps:
            return (step + 1) / args.warmup_steps
        progress = min(1.0, (step - args.warmup_steps) / max(1, total_steps - args.warmup_steps))
        if args.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * progress))
        return (1 - progress) ** 0.9

    return f


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def missing_files(dataset: PascalContextMT, limit: int = 5) -> tuple[list[str], int]:
    """The first `limit` files of the dataset's samples that do not exist, and how many are missing in all."""
    missing = [path for i in range(len(dataset)) for path in dataset.files(i) if not os.path.exists(path)]
    return missing[:limit], len(missing)


class Stop(Exception):
    """SIGTERM or SIGINT: the run saved last.pt and stops with status 128 + the signal's number."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


# --------------------------------------------------------------------------------------------------- training


class Trainer:
    def __init__(self, args, run: RunDir | None = None, state: dict | None = None, notes: list[str] = ()):
        """Sets everything up and checks it (options, data files, weights, checkpoint) without writing to the run
        directory: `fit` writes there from its first step on. state: the checkpoint a --resume continues;
        notes: the schedule options it changes."""
        self.args, self.run = args, run
        self.rank, self.world, self.device = setup_distributed()
        self.main = self.rank == 0
        cuda = self.device.type == "cuda"
        if args.batch_size % self.world:
            raise UserError(f"--batch-size {args.batch_size} must divide over {self.world} processes")
        # the default is this machine's, kept out of args and so out of the checkpoint (as --amp auto is): a run
        # resumed on another machine takes that machine's default, not the first machine's
        self.workers = args.workers if args.workers is not None else min(8, os.cpu_count() or 1) if cuda else 0
        seed_everything(args.seed)
        root = args.data
        if root is None:
            synthetic = (args.synthetic_dir, *args.synthetic_size, args.seed)
            if self.main:
                root = ensure_synthetic(*synthetic)
            if self.world > 1:
                dist.barrier()
            if not self.main:  # after rank 0 made it: found (a shared file system) or made here (a node's own)
                root = ensure_synthetic(*synthetic)
        try:
            self.train_set = PascalContextMT(root, "train", args.img_size, seed=args.seed, augment=args.augment)
            self.val_set = PascalContextMT(root, "val", args.img_size, train=False)
        except DataError as e:
            raise UserError(f"--data {root}: {e}") from e
        for dataset in ([self.val_set] if args.eval_only else [self.train_set, self.val_set]):
            first, count = missing_files(dataset)
            if count:
                raise UserError(f"--data {root}: {count} files of the {dataset.split} split are missing, e.g. "
                                f"{', '.join(first)}")
        self.model = build_model(args).to(self.device)
        self.load_backbone()
        self.net = self.model
        if self.world > 1:
            self.net = DistributedDataParallel(self.model, device_ids=[self.device.index] if self.device.index
                                               is not None else None)
        if args.compile or args.cuda_graphs:  # compiled around DDP, so that its optimizer splits at the buckets
            mode = None
            if args.cuda_graphs and not cuda:
                self.log("--cuda-graphs: no CUDA device, so no CUDA graphs" + (": the model is compiled without"
                                                                               if args.compile else ""))
            elif args.cuda_graphs:
                mode = "reduce-overhead"
            if args.compile or mode:
                self.net = torch.compile(self.net, mode=mode)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=args.lr, weight_decay=args.weight_decay, fused=cuda)
        self.per_rank = args.batch_size // self.world
        self.steps_per_epoch = len(self.train_set) // args.batch_size
        if self.steps_per_epoch == 0 and not args.eval_only:
            raise UserError(f"--batch-size {args.batch_size} is larger than the {len(self.train_set)} train images")
        self.total_steps = self.steps_per_epoch * args.epochs
        # --max-steps stops the loop early but does not change the schedule: a run stopped there and resumed
        # is the run that never stopped
        self.stop_at = min(self.total_steps, args.max_steps) if args.max_steps else self.total_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(args, self.total_steps))
        self.amp = args.amp == "bf16" or (args.amp == "auto" and cuda)
        self.step, self.epoch, self.step_in_epoch, self.best = 0, 0, 0, -math.inf
        self.history: list[dict] = []
        self.epoch_sums: dict[str, float] = {}  # running loss sums of the current epoch, checkpointed with it
        self.pending: list[torch.Tensor] = []  # per-step losses still on the device (read every --log-every)
        self.stat_names: list[str] | None = None
        self.signal: int | None = None  # the signal this process received
        self.agreed_signal: int | None = None  # ... and the one every rank agreed on (torchrun)
        self.writer = None
        self.saved = None  # (step, epoch) of the last last.pt written
        if state is not None:
            self.load(state)
            self.log(f"resuming at step {self.step} (epoch {self.epoch})")
            if notes:
                self.apply_schedule()
                self.log("--resume applies the changed options " + ", ".join(notes))

    def log(self, msg: str) -> None:
        if self.main:
            tqdm.write(msg, file=sys.stderr)

    def load_backbone(self) -> None:
        """--pretrained, checked against the sha256 the run was trained with (--resume, --eval-only)."""
        args = self.args
        if not args.pretrained:
            if not args.eval_only and self.main:
                self.log("WARNING: no --pretrained weights given: the frozen ViT starts from RANDOM weights. "
                         "Multi-task results are only meaningful from a pretrained backbone.")
            return
        recorded = " (the weights this run was trained with; pass --pretrained PATH where they are now)"
        if not os.path.isfile(args.pretrained):
            raise UserError(f"--pretrained {args.pretrained}: no such file" + (recorded if args.pretrained_sha256
                                                                                else ""))
        digest = sha256_file(args.pretrained)
        if args.pretrained_sha256 and digest != args.pretrained_sha256:
            raise UserError(f"--pretrained {args.pretrained}: its sha256 is {digest[:16]}..., not the "
                            f"{args.pretrained_sha256[:16]}... of the weights this run was trained with")
        args.pretrained_sha256 = digest
        try:
            load_pretrained(self.model, args.pretrained)
        except Exception as e:  # a foreign file fails in many ways (KeyError, UnpicklingError, ValueError, ...)
            first = (str(e).strip().splitlines() or [""])[0][:300]
            raise UserError(f"--pretrained {args.pretrained}: not ViT weights this model can load "
                            f"({type(e).__name__}: {first})") from e
        self.log(f"loaded pretrained ViT weights from {args.pretrained}")

    # -------------------------------------------------------------------------------------------- checkpoints

    def checkpoint(self, name: str) -> None:
        self.flush()  # the losses of every step so far are read and finite before anything is saved
        if not self.main or (name == "last.pt" and self.saved == (self.step, self.epoch)):
            return  # (saved already: last.prev.pt stays the checkpoint before it)
        if name == "last.pt":
            self.saved = (self.step, self.epoch)
        state = dict(model=self.model.trainable_state_dict(), optimizer=self.optimizer.state_dict(),
                     scheduler=self.scheduler.state_dict(), step=self.step, epoch=self.epoch,
                     step_in_epoch=self.step_in_epoch, epoch_sums=self.epoch_sums, best=self.best,
                     history=self.history, rng=rng_state(),
                     args=vars(self.args))
        save_atomic(state, os.path.join(self.args.output, name), keep_previous=name == "last.pt")

    def load(self, state: dict, training: bool = True, path: str = "the checkpoint") -> None:
        missing, unexpected = self.model.load_state_dict(state["model"], strict=False)
        trainable = {n for n, p in self.model.named_parameters() if p.requires_grad}
        if unexpected or trainable - set(state["model"]):
            raise UserError(f"{path} does not fit this model: unexpected {unexpected[:5]}, "
                            f"missing {sorted(trainable - set(state['model']))[:5]}")
        if training:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.step, self.epoch, self.step_in_epoch = state["step"], state["epoch"], state["step_in_epoch"]
            self.best, self.history, self.epoch_sums = state["best"], state["history"], state["epoch_sums"]
            set_rng_state(state["rng"])

    def apply_schedule(self) -> None:
        """A resumed run with a changed --lr, --weight-decay, --epochs, --warmup-steps or --schedule: the optimizer
        and scheduler states loaded from the checkpoint take the new values from this step on."""
        scheduler, args = self.scheduler, self.args
        scheduler.base_lrs = [args.lr for _ in self.optimizer.param_groups]
        for group, f in zip(self.optimizer.param_groups, scheduler.lr_lambdas, strict=True):
            group["initial_lr"], group["weight_decay"] = args.lr, args.weight_decay
            group["lr"] = args.lr * f(scheduler.last_epoch)
        scheduler._last_lr = [g["lr"] for g in self.optimizer.param_groups]

    # ---------------------------------------------------------------------------------------------- the loop

    def batches(self, epoch: int, start: int):
        """This rank's batches of an epoch from step `start` on: a seeded permutation shared by all ranks, each
        global batch split over the ranks (rank r takes every world-th image of it)."""
        self.train_set.set_epoch(epoch)
        sampler = DistributedSampler(self.train_set, self.world, self.rank, shuffle=True, seed=self.args.seed,
                                     drop_last=True)
        sampler.set_epoch(epoch)
        indices = list(sampler)
        batches = [indices[i * self.per_rank:(i + 1) * self.per_rank] for i in range(self.steps_per_epoch)]
        return DataLoader(self.train_set, batch_sampler=batches[start:], num_workers=self.workers,
                          pin_memory=self.device.type == "cuda")

    def train_step(self, batch) -> torch.Tensor:
        """One optimizer step. Returns the step's numbers on the device, float64 (loss, mi, the task losses, the
        gradient norm): nothing here waits for the device; `flush` reads them."""
        images = batch["image"].to(self.device, non_blocking=True)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            preds = self.net(images)
        targets = {t: batch[t].to(self.device, non_blocking=True) for t in self.model.tasks}
        loss, parts = multi_task_loss({t: p.float() for t, p in preds.items()}, targets,
                                      {t: LOSS_WEIGHTS[t] for t in self.model.tasks})
        mi = self.model.mi_loss() if self.args.mi_weight else loss.new_zeros(())
        total = loss + self.args.mi_weight * mi
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        norm = total.new_zeros(())
        if self.args.clip_grad:
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.args.clip_grad)
        self.optimizer.step()
        self.scheduler.step()
        if self.stat_names is None:
            self.stat_names = ["loss", "mi", *parts]
        return torch.stack([total.detach(), mi.detach(), *(v.detach() for v in parts.values()), norm]).double()

    def flush(self, bar=None) -> None:
        """Read the losses of the steps since the last flush (one transfer), averaged over the ranks; a non-finite
        loss or gradient stops the run before anything is saved (last.pt stays the last good state). Also where
        the ranks agree to stop on a signal."""
        if not self.pending:
            return
        rows = torch.stack(self.pending)
        self.pending = []
        if self.world > 1:
            flag = rows.new_zeros(rows.shape[0], 1)
            flag[-1, 0] = float(self.signal or 0)
            rows = torch.cat([rows, flag], 1)
            dist.all_reduce(rows)
            rows = rows / self.world
        rows = rows.tolist()  # the one read from the device
        if self.world > 1:
            if rows[-1][-1]:  # some rank received a signal
                self.agreed_signal = self.signal or signal.SIGTERM
            rows = [row[:-1] for row in rows]
        first = self.step - len(rows) + 1
        last = os.path.join(self.args.output, "last.pt")
        for i, row in enumerate(rows):
            *values, norm = row
            stats = dict(zip(self.stat_names, values, strict=True))
            if not math.isfinite(stats["loss"]):
                raise FloatingPointError(
                    f"non-finite loss ({stats['loss']}) at step {first + i} (epoch {self.epoch}); task losses "
                    f"{ {t: v for t, v in stats.items() if t not in ('loss', 'mi')} }. The last good checkpoint is "
                    f"{last}; lower --lr or raise --warmup-steps and --resume.")
            if not math.isfinite(norm):
                # a finite loss with a non-finite gradient (bf16 overflow)
                raise FloatingPointError(
                    f"non-finite gradient norm at step {first + i} (epoch {self.epoch}), loss {stats['loss']}. The "
                    f"last good checkpoint is {last}; lower --lr or try --amp off.")
            for k, v in stats.items():
                self.epoch_sums[k] = self.epoch_sums.get(k, 0.0) + v
            if self.writer:
                self.writer.add_scalar("train/loss", stats["loss"], first + i)
        if bar is not None:
            bar.set_postfix(loss=f"{stats['loss']:.3f}")

    # ------------------------------------------------------------------------------------------------ signals

    def on_signal(self, signum, frame) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now (last.pt is the last periodic checkpoint)
        self.signal = signum
        self.log(f"{signal.Signals(signum).name}: finishing the current step, then saving last.pt")

    def stop_if_signalled(self) -> None:
        """After a step: stop if a signal came (under torchrun, once the ranks agreed on it in `flush`)."""
        signum = self.signal if self.world == 1 else self.agreed_signal
        if signum is not None:
            self.checkpoint("last.pt")
            raise Stop(signum)

    # ---------------------------------------------------------------------------------------------- the run

    def start(self) -> None:
        """The run is set up and checked: from here on it writes to its directory."""
        if not self.main:
            return
        args = self.args
        if args.overwrite:
            self.run.clear()
        write_text_atomic(os.path.join(args.output, "config.yaml"), yaml.safe_dump(vars(args), sort_keys=True))
        # the log is the checkpoint's history: a record written after the checkpoint it resumes from is not kept
        write_text_atomic(os.path.join(args.output, "metrics.jsonl"),
                          "".join(json.dumps(r) + "\n" for r in self.history))
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(os.path.join(args.output, "tb"))
        except ImportError:
            self.log("tensorboard is not installed: metrics go to metrics.jsonl only")

    def fit(self) -> dict:
        self.start()
        handlers = {}
        if threading.current_thread() is threading.main_thread():
            handlers = {s: signal.signal(s, self.on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            return self.loop()
        except DataError:
            # a file that cannot be read (between steps, or in the evaluation after an epoch's steps): keep the
            # work done so far; a resumed run starts with the batch or evaluation that failed. Under torchrun only
            # this rank failed, and the others wait in another collective: last.pt stays the last periodic one.
            if self.world == 1:
                self.checkpoint("last.pt")
            raise
        finally:
            for s, h in handlers.items():
                signal.signal(s, h)

    def loop(self) -> dict:
        args = self.args
        results = {}
        while self.epoch < args.epochs and self.step < self.stop_at:
            self.model.train()
            count, t0 = 0, time.perf_counter()
            loader = self.batches(self.epoch, self.step_in_epoch)
            bar = tqdm(loader, total=len(loader), disable=not self.main, desc=f"epoch {self.epoch}", leave=False)
            for batch in bar:
                self.pending.append(self.train_step(batch))
                self.step += 1
                self.step_in_epoch += 1
                count += 1
                if self.step % args.log_every == 0:
                    self.flush(bar)
                if args.checkpoint_every and self.step % args.checkpoint_every == 0:
                    self.checkpoint("last.pt")
                self.stop_if_signalled()
                if self.step >= self.stop_at:
                    break
            self.flush(bar)
            self.stop_if_signalled()
            if self.step_in_epoch < self.steps_per_epoch:
                # --max-steps stopped the run inside an epoch: the epoch's record waits for the resumed run
                self.checkpoint("last.pt")
                break
            record = {"epoch": self.epoch, "step": self.step, "lr": self.scheduler.get_last_lr()[0],
                      "images_per_s": count * args.batch_size / max(time.perf_counter() - t0, 1e-9),
                      **{f"train/{k}": v / self.steps_per_epoch for k, v in self.epoch_sums.items()}}
            better = False
            if (self.epoch + 1) % args.eval_every == 0 or self.epoch + 1 >= args.epochs:
                done, every = self.epoch + 1, args.edge_eval_every
                results = self.evaluate(edge_ods=done >= args.epochs or (every > 0 and done % every == 0))
                record.update(flatten(results))
                score = self.selection_score(results)
                better = math.isfinite(score) and score > self.best
                self.best = max(self.best, score) if better else self.best
            self.history.append(record)
            self.epoch += 1
            self.step_in_epoch = 0
            self.epoch_sums = {}
            if better:
                self.checkpoint("best.pt")
            self.log_record(record)
            self.checkpoint("last.pt")
            self.stop_if_signalled()
        if not results:
            results = self.evaluate()
        if self.main and not args.no_plots:
            from .plots import save_plots

            shared = args.num_shared if args.num_experts else 0
            save_plots(self.history, args.output, self.model.tasks, num_shared=shared)
        return results

    def selection_score(self, results: dict) -> float:
        """What best.pt is chosen by: delta_m over the tasks that every evaluation scores. The edge odsF is computed
        only at the final evaluation and every --edge-eval-every epochs (the edge BCE has no reference number), so
        edges count here only when every evaluation computes it; otherwise epochs would be compared on 5 tasks
        against 4."""
        keep = {t: m for t, m in results.items() if t != "edge" or self.args.edge_eval_every == 1}
        return delta_m(keep, load_reference(self.args.reference))[0]

    def evaluate(self, edge_ods: bool = True) -> dict:
        """The validation metrics; the edge odsF (slow: boundary matching) where edge_ods, else the edge BCE."""
        return evaluate(self.model, self.val_set, device=self.device, batch_size=self.per_rank,
                        workers=self.workers, amp=self.amp, reference=self.args.reference, show=self.main,
                        edge_ods=edge_ods, eval_workers=self.args.eval_workers,
                        edge_thresholds=self.args.edge_thresholds, edge_matcher=self.args.edge_matcher,
                        edge_ids=self.args.edge_ids)

    def log_record(self, record: dict) -> None:
        if not self.main:
            return
        with open(os.path.join(self.args.output, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer:
            for k, v in record.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self.writer.add_scalar(k, v, record["step"])
            self.writer.flush()
        keys = [k for k in record if k.startswith("train/")]
        self.log(f"epoch {record['epoch']} step {record['step']}: " + ", ".join(
            f"{k[6:]} {record[k]:.4f}" for k in keys) + f", {record['images_per_s']:.1f} img/s")


def say(msg: str) -> None:
    if rank_zero():
        print(msg, file=sys.stderr)


def evaluate_only(args, state: dict) -> dict:
    """Evaluate the checkpoint args.eval_only, whose state `resolve` read."""
    trainer = Trainer(args)
    trainer.load(state, training=False, path=args.eval_only)
    results = trainer.evaluate()
    if trainer.main:
        os.makedirs(args.output, exist_ok=True)
        # an evaluation may share its training run's directory: it writes eval_* files only
        write_text_atomic(os.path.join(args.output, "eval_config.yaml"), yaml.safe_dump(vars(args), sort_keys=True))
        write_text_atomic(os.path.join(args.output, "eval_metrics.json"),
                          json.dumps({"checkpoint": args.eval_only, **results}, indent=1))
    return results


def train(argv, args: argparse.Namespace) -> tuple[dict, argparse.Namespace]:
    run = RunDir(args.output)
    if rank_zero():
        run.lock()
    try:
        path = run.checkpoint(args.resume, args.overwrite)
        state, notes = None, []
        if path is not None:
            state = read_latest(path, say, repair=rank_zero())
            args = resolve_args(argv, resumed=state["args"])
            notes = resume_changes(args, state["args"])
        trainer = Trainer(args, run, state, notes)
        try:
            return trainer.fit(), trainer.args  # a resumed run's options are the checkpoint's
        except Stop as stop:
            trainer.log(f"stopped by {stop}: last.pt holds step {trainer.step}; continue with --resume")
            raise SystemExit(128 + stop.signum) from None
        except DataError as e:
            message = str(e).strip().splitlines()[-1]  # a worker's error comes with its traceback as text
            saved = f"step {trainer.step}" if trainer.world == 1 else "the last periodic checkpoint"
            trainer.log(f"stopping: {message}. last.pt holds {saved}: fix or replace the file, check the data with "
                        "python -m ase_model.check_data, and --resume")
            if trainer.world > 1:
                print(f"rank {trainer.rank}: stopping: {message}", file=sys.stderr, flush=True)  # maybe not rank 0
                os._exit(2)  # the other ranks wait in a collective that will not come
            raise SystemExit(2) from None
        except FloatingPointError as e:
            trainer.log(f"stopping: {e}")
            raise SystemExit(2) from e
        finally:
            if trainer.writer:
                trainer.writer.close()
    finally:
        run.release()


def main(argv=None) -> dict:
    """The command line; exit status 2 for a user error, 128 + N after signal N (SIGTERM 143, SIGINT 130) once
    last.pt is saved."""
    try:
        args, evaluated = resolve(argv)
        if args.eval_only:
            results = evaluate_only(args, evaluated)
        else:
            results, args = train(argv, args)
    except UserError as e:
        say(f"python -m ase_model.train: error: {e}")
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        say("interrupted")
        raise SystemExit(130) from None
    if rank_zero():
        print(metrics_table(results, args.reference))
    if dist.is_initialized():
        dist.destroy_process_group()
    return results


if __name__ == "__main__":
    main()
