"""Multi-task training of a frozen ViT with Adaptive Shared Experts on PASCAL-Context: the training loop and
`main` (options in `options.py`, checkpoints in `checkpoints.py`, evaluation in `evaluate.py`).

    python -m ase_model.train --help
"""

import json
import math
import os
import random
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import yaml
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from .checkpoints import rng_state, save_atomic, set_rng_state
from .data import PascalContextMT
from .evaluate import evaluate, flatten, metrics_table
from .losses import LOSS_WEIGHTS, multi_task_loss
from .model import build_model, load_pretrained
from .options import resolve_args
from .synthetic import make_synthetic_pascal

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


# --------------------------------------------------------------------------------------------------- training


class Trainer:
    def __init__(self, args):
        self.args = args
        self.rank, self.world, self.device = setup_distributed()
        self.main = self.rank == 0
        if args.batch_size % self.world:
            raise SystemExit(f"--batch-size {args.batch_size} must divide over {self.world} processes")
        seed_everything(args.seed)
        root = args.data
        if root is None:
            if self.main:
                make_synthetic_pascal(args.synthetic_dir, *args.synthetic_size[:2], size=args.synthetic_size[2],
                                      seed=args.seed)
            if self.world > 1:
                dist.barrier()
            root = args.synthetic_dir
        self.train_set = PascalContextMT(root, "train", args.img_size, seed=args.seed, augment=args.augment)
        self.val_set = PascalContextMT(root, "val", args.img_size, train=False)
        self.model = build_model(args).to(self.device)
        if args.pretrained:
            load_pretrained(self.model, args.pretrained)
            self.log(f"loaded pretrained ViT weights from {args.pretrained}")
        elif not args.eval_only:
            self.log("WARNING: no --pretrained weights given: the frozen ViT starts from RANDOM weights. "
                     "Multi-task results are only meaningful from a pretrained backbone.")
        self.net = self.model
        if self.world > 1:
            self.net = DistributedDataParallel(self.model, device_ids=[self.device.index] if self.device.index
                                               is not None else None)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=args.lr, weight_decay=args.weight_decay)
        self.per_rank = args.batch_size // self.world
        self.steps_per_epoch = len(self.train_set) // args.batch_size
        if self.steps_per_epoch == 0:
            raise SystemExit(f"--batch-size {args.batch_size} is larger than the {len(self.train_set)} train images")
        self.total_steps = self.steps_per_epoch * args.epochs
        # --max-steps stops the loop early but does not change the schedule: a run stopped there and resumed
        # is the run that never stopped
        self.stop_at = min(self.total_steps, args.max_steps) if args.max_steps else self.total_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(args, self.total_steps))
        self.amp = args.amp == "bf16" or (args.amp == "auto" and self.device.type == "cuda")
        self.step, self.epoch, self.step_in_epoch, self.best = 0, 0, 0, -math.inf
        self.history: list[dict] = []
        self.epoch_sums: dict[str, float] = {}  # running loss sums of the current epoch, checkpointed with it
        self.writer = None
        if self.main:
            os.makedirs(args.output, exist_ok=True)
            # an evaluation may share its training run's directory: it must not overwrite that run's config
            name = "eval_config.yaml" if args.eval_only else "config.yaml"
            with open(os.path.join(args.output, name), "w") as f:
                yaml.safe_dump(vars(args), f, sort_keys=True)
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(os.path.join(args.output, "tb"))
            except ImportError:
                self.log("tensorboard is not installed: metrics go to metrics.jsonl only")

    def log(self, msg: str) -> None:
        if self.main:
            tqdm.write(msg, file=sys.stderr)

    # -------------------------------------------------------------------------------------------- checkpoints

    def checkpoint(self, name: str) -> None:
        if not self.main:
            return
        state = dict(model=self.model.trainable_state_dict(), optimizer=self.optimizer.state_dict(),
                     scheduler=self.scheduler.state_dict(), step=self.step, epoch=self.epoch,
                     step_in_epoch=self.step_in_epoch, epoch_sums=self.epoch_sums, best=self.best,
                     history=self.history, rng=rng_state(),
                     args=vars(self.args))
        save_atomic(state, os.path.join(self.args.output, name))

    def load(self, path: str, training: bool = True) -> None:
        state = torch.load(path, map_location="cpu", weights_only=False)
        missing, unexpected = self.model.load_state_dict(state["model"], strict=False)
        trainable = {n for n, p in self.model.named_parameters() if p.requires_grad}
        if unexpected or trainable - set(state["model"]):
            raise SystemExit(f"{path} does not fit this model: unexpected {unexpected[:5]}, "
                             f"missing {sorted(trainable - set(state['model']))[:5]}")
        if training:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.step, self.epoch, self.step_in_epoch = state["step"], state["epoch"], state["step_in_epoch"]
            self.best, self.history, self.epoch_sums = state["best"], state["history"], state["epoch_sums"]
            set_rng_state(state["rng"])

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
        return DataLoader(self.train_set, batch_sampler=batches[start:], num_workers=self.args.workers)

    def train_step(self, batch) -> dict[str, float]:
        images = batch["image"].to(self.device, non_blocking=True)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            preds = self.net(images)
        targets = {t: batch[t].to(self.device, non_blocking=True) for t in self.model.tasks}
        loss, parts = multi_task_loss({t: p.float() for t, p in preds.items()}, targets,
                                      {t: LOSS_WEIGHTS[t] for t in self.model.tasks})
        mi = self.model.mi_loss() if self.args.mi_weight else loss.new_zeros(())
        total = loss + self.args.mi_weight * mi
        # the global batch's numbers: every rank logs them, and a NaN on any rank stops every rank at once
        stats = self.mean_over_ranks({"loss": total.item(), "mi": mi.item(), **{t: v.item() for t, v in parts.items()}})
        value = stats["loss"]
        if not math.isfinite(value):
            # nothing is saved: last.pt stays the last good state
            raise FloatingPointError(
                f"non-finite loss ({value}) at step {self.step} (epoch {self.epoch}); task losses "
                f"{ {t: stats[t] for t in parts} }. The last good checkpoint is "
                f"{os.path.join(self.args.output, 'last.pt')}; lower --lr or raise --warmup-steps and --resume.")
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        if self.args.clip_grad:
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.args.clip_grad)
            if not torch.isfinite(norm):
                # a finite loss with a non-finite gradient (bf16 overflow): stop before the step spoils the weights
                raise FloatingPointError(
                    f"non-finite gradient norm at step {self.step} (epoch {self.epoch}), loss {value}. The last good "
                    f"checkpoint is {os.path.join(self.args.output, 'last.pt')}; lower --lr or try --amp off.")
        self.optimizer.step()
        self.scheduler.step()
        return stats

    def fit(self) -> dict:
        args = self.args
        if args.resume:
            path = os.path.join(args.output, "last.pt")
            if os.path.exists(path):
                self.load(path)
                self.log(f"resumed from {path} at step {self.step} (epoch {self.epoch})")
            else:
                self.log(f"--resume: no {path} yet, starting fresh")
        results = {}
        log = os.path.join(args.output, "metrics.jsonl")
        if self.main and self.step == 0 and os.path.exists(log):
            os.remove(log)  # a fresh run in an old directory: its log starts over, as its checkpoints do
        while self.epoch < args.epochs and self.step < self.stop_at:
            self.model.train()
            sums, count, t0 = self.epoch_sums, 0, time.perf_counter()
            loader = self.batches(self.epoch, self.step_in_epoch)
            bar = tqdm(loader, total=len(loader), disable=not self.main, desc=f"epoch {self.epoch}", leave=False)
            for batch in bar:
                stats = self.train_step(batch)
                self.step += 1
                self.step_in_epoch += 1
                count += 1
                for k, v in stats.items():
                    sums[k] = sums.get(k, 0.0) + v
                ips = count * args.batch_size / (time.perf_counter() - t0)
                bar.set_postfix(loss=f"{stats['loss']:.3f}", img_s=f"{ips:.1f}")
                if self.writer:
                    self.writer.add_scalar("train/loss", stats["loss"], self.step)
                if args.checkpoint_every and self.step % args.checkpoint_every == 0:
                    self.checkpoint("last.pt")
                if self.step >= self.stop_at:
                    break
            if self.step_in_epoch < self.steps_per_epoch:
                # --max-steps stopped the run inside an epoch: the epoch's record waits for the resumed run
                self.checkpoint("last.pt")
                break
            record = {"epoch": self.epoch, "step": self.step, "lr": self.scheduler.get_last_lr()[0],
                      "images_per_s": count * args.batch_size / max(time.perf_counter() - t0, 1e-9),
                      **{f"train/{k}": v / self.steps_per_epoch for k, v in sums.items()}}
            self.epoch += 1
            self.step_in_epoch = 0
            self.epoch_sums = {}
            if self.epoch % args.eval_every == 0 or self.epoch >= args.epochs:
                results = self.evaluate(final=self.epoch >= args.epochs)
                record.update(flatten(results))
                score = results.get("delta_m", {}).get("value", -math.inf)
                if math.isfinite(score) and score > self.best:
                    self.best = score
                    self.checkpoint("best.pt")
            self.history.append(record)
            self.log_record(record)
            self.checkpoint("last.pt")
        if not results:
            results = self.evaluate()
        if self.main and not args.no_plots:
            from .plots import save_plots

            save_plots(self.history, args.output, self.model.tasks)
        return results

    def mean_over_ranks(self, sums: dict[str, float]) -> dict[str, float]:
        """Each rank's loss is the mean over its share of the global batch: their mean is the global batch's."""
        if self.world == 1 or not sums:
            return sums
        keys = sorted(sums)
        values = torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=self.device)
        dist.all_reduce(values)
        return {k: v / self.world for k, v in zip(keys, values.tolist(), strict=True)}

    def evaluate(self, final: bool = True) -> dict:
        every = self.args.edge_eval_every
        return evaluate(self.model, self.val_set, device=self.device, batch_size=self.per_rank,
                        workers=self.args.workers, amp=self.amp, reference=self.args.reference, show=self.main,
                        edge_ods=final or (every > 0 and self.epoch % every == 0), eval_workers=self.args.eval_workers,
                        edge_thresholds=self.args.edge_thresholds)

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


def main(argv=None) -> dict:
    args = resolve_args(argv)
    trainer = Trainer(args)
    try:
        if args.eval_only:
            trainer.load(args.eval_only, training=False)
            results = trainer.evaluate()
            if trainer.main:
                with open(os.path.join(args.output, "eval_metrics.json"), "w") as f:
                    json.dump({"checkpoint": args.eval_only, **results}, f, indent=1)
        else:
            results = trainer.fit()
    except FloatingPointError as e:
        trainer.log(f"stopping: {e}")
        raise SystemExit(2) from e
    finally:
        if trainer.writer:
            trainer.writer.close()
    if trainer.main:
        print(metrics_table(results, args.reference))
    if dist.is_initialized():
        dist.destroy_process_group()
    return results


if __name__ == "__main__":
    main()
