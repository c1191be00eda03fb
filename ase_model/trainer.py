"""The training of a frozen ViT with Adaptive Shared Experts: the `Trainer`, which sets a run up (data, model,
optimizer, schedule) and runs its loop. What the data is (tasks, losses, metrics) comes from the --dataset's module
(ase_model/datasets/). Its other concerns are mixed in from their own files: logging
(`runlog.py`), signals (`signals.py`), the state it saves and resumes (`resume.py`); the processes come from
`distributed.py`, the command line from `train.py`."""

import hashlib
import math
import os
import random
import time

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from . import datasets
from .data import DataError, probe
from .distributed import setup_distributed
from .errors import UserError
from .evaluate import evaluate, flatten
from .losses import multi_task_loss
from .metrics import delta_m, load_reference
from .model import build_model, load_pretrained
from .resume import Resumable
from .rundir import RunDir
from .runlog import RunLog
from .signals import SignalStop
from .synthetic_store import ensure_synthetic


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


def missing_files(dataset, limit: int = 5) -> tuple[list[str], int]:
    """The first `limit` files of the dataset's samples that do not exist, and how many are missing in all."""
    missing = [path for i in range(len(dataset)) for path in dataset.files(i) if not os.path.exists(path)]
    return missing[:limit], len(missing)


def unreadable_files(dataset, limit: int = 5) -> tuple[list[str], int]:
    """The first `limit` files of the dataset's samples whose header or length is wrong (`data.probe`: "path: what is
    wrong"), and how many are in all. 0.07-0.2 ms a file on the synthetic data (2-core CPU, files in the page
    cache): PASCAL-Context's 10,103 images x 6 files take 4-12 s, more where the files are not yet cached (two
    reads a file, its head and its tail)."""
    bad = [f"{path}: {problem}" for i in range(len(dataset)) for path in dataset.files(i)
           if (problem := probe(path))]
    return bad[:limit], len(bad)


# --------------------------------------------------------------------------------------------------- training


class Trainer(RunLog, SignalStop, Resumable):
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
        self.dataset = datasets.get(args.dataset)
        root = args.data
        if root is None:
            synthetic = (args.synthetic_dir, *args.synthetic_size, args.seed, args.dataset)
            if self.main:
                root = ensure_synthetic(*synthetic)
            if self.world > 1:
                dist.barrier()
            if not self.main:  # after rank 0 made it: found (a shared file system) or made here (a node's own)
                root = ensure_synthetic(*synthetic)
        try:
            self.train_set = self.dataset.loader(root, "train", args.img_size, seed=args.seed, augment=args.augment)
            self.val_set = self.dataset.loader(root, "val", args.img_size, train=False)
        except DataError as e:
            raise UserError(f"--data {root}: {e}") from e
        for dataset in ([self.val_set] if args.eval_only else [self.train_set, self.val_set]):
            first, count = missing_files(dataset)
            if count:
                raise UserError(f"--data {root}: {count} files of the {dataset.split} split are missing, e.g. "
                                f"{', '.join(first)}")
            first, count = unreadable_files(dataset)
            if count:
                raise UserError(f"--data {root}: {count} files of the {dataset.split} split cannot be read, e.g. "
                                f"{first[0]} (python -m ase_model.check_data decodes them all)")
        self.model = build_model(args).to(self.device)
        self.load_backbone()
        if not args.reference and not args.eval_only:
            self.log(f"--dataset {args.dataset} ships no single-task reference numbers and no --reference is given: "
                     "no delta_m, and no best.pt (last.pt holds the run)")
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
        loss, parts = multi_task_loss({t: p.float() for t, p in preds.items()}, targets, self.dataset.tasks)
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

    def fit(self) -> dict:
        self.start()
        with self.catching_signals():
            try:
                return self.loop()
            except DataError:
                # a file that cannot be read (between steps, or in the evaluation after an epoch's steps): keep the
                # work done so far; a resumed run starts with the batch or evaluation that failed. Under torchrun
                # only this rank failed, and the others wait in another collective: last.pt stays the last periodic
                # one.
                if self.world == 1:
                    self.checkpoint("last.pt")
                raise

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
        """What best.pt is chosen by: delta_m over the tasks that every evaluation scores (NaN without a --reference:
        no best.pt). A boundary task's odsF is computed only at the final evaluation and every --edge-eval-every
        epochs (its BCE has no reference number), so it counts here only when every evaluation computes it;
        otherwise epochs would be compared on 5 tasks against 4."""
        if not self.args.reference:
            return math.nan
        tasks = self.dataset.tasks
        keep = {t: m for t, m in results.items() if not (t in tasks and tasks[t].boundary)
                or self.args.edge_eval_every == 1}
        return delta_m(keep, load_reference(self.args.reference))[0]

    def evaluate(self, edge_ods: bool = True) -> dict:
        """The validation metrics; the edge odsF (slow: boundary matching) where edge_ods, else the edge BCE."""
        return evaluate(self.model, self.val_set, self.dataset, device=self.device, batch_size=self.per_rank,
                        workers=self.workers, amp=self.amp, reference=self.args.reference, show=self.main,
                        edge_ods=edge_ods, eval_workers=self.args.eval_workers,
                        edge_thresholds=self.args.edge_thresholds, edge_matcher=self.args.edge_matcher,
                        edge_ids=self.args.edge_ids)
