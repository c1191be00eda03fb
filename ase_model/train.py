"""Multi-task training of a frozen ViT with Adaptive Shared Experts on PASCAL-Context.

    python -m ase_model.train                                  # tiny ViT, synthetic data, CPU-friendly
    python -m ase_model.train --preset paper --data PASCAL_MT --pretrained vit_b16.safetensors
    torchrun --nproc_per_node=8 -m ase_model.train --preset paper --data PASCAL_MT ...
    python -m ase_model.train -c run.yaml --resume              # continue a run where it stopped

Options come from (later wins): the preset, a YAML config (-c), the command line. Every run writes its resolved
config, metrics (metrics.jsonl, TensorBoard when installed), checkpoints (last.pt, best.pt, written atomically)
and plots (PNG) to --output.
"""

import argparse
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

from .data import TASKS, PascalContextMT
from .losses import LOSS_WEIGHTS, multi_task_loss
from .metrics import delta_m, load_reference, make_meters
from .model import build_model, load_pretrained
from .synthetic import make_synthetic_pascal

REFERENCE = os.path.join(os.path.dirname(__file__), "reference_metrics.yaml")

PRESETS = {
    # a tiny ViT on synthetic 64x64 images: about a minute on two CPU cores (96 steps, an evaluation per epoch)
    "tiny": dict(img_size=64, patch_size=8, embed_dim=96, depth=4, num_heads=3, head_dim=64, epochs=16,
                 batch_size=8, lr=2e-3, warmup_steps=5, num_experts=16, top_k=3, num_shared=1, expert_rank=4,
                 eval_every=1, checkpoint_every=20),
    # the paper: ViT-B/16 at 224x224, 40 epochs, ASE 32/6/2/2
    "paper": dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12, head_dim=256, epochs=40,
                  batch_size=64, lr=1e-4, warmup_steps=500, num_experts=32, top_k=6, num_shared=2, expert_rank=2,
                  eval_every=1, checkpoint_every=1000),
}


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Every option shows its default: its value, or "preset" where --preset sets it (tabled below)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.dest in {k for v in PRESETS.values() for k in v}:
            return f"{text} (default: preset)".lstrip()
        if action.default is None or action.default is False or action.default is argparse.SUPPRESS:
            return action.help
        return f"{text} (default: %(default)s)".lstrip()


def _presets_table() -> str:
    keys = sorted({k for v in PRESETS.values() for k in v})
    names = sorted(PRESETS)
    rows = [f"  {'option':<20}" + "".join(f"{n:>12}" for n in names)]
    rows += [f"  --{k.replace('_', '-'):<18}" + "".join(f"{PRESETS[n].get(k, '-')!s:>12}" for n in names)
             for k in keys]
    return "defaults set by --preset (a config file or the command line overrides them):\n" + "\n".join(rows)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ase_model.train", description=__doc__, epilog=_presets_table(),
                                formatter_class=_HelpFormatter)
    add = p.add_argument
    add("-c", "--config", help="YAML file of options (keys as the long option names, with _)")
    add("--preset", choices=sorted(PRESETS), help="defaults for the model and schedule (default: tiny)")
    g = p.add_argument_group("data")
    g.add_argument("--data", help="PASCAL_MT root; default: a synthetic dataset generated under --synthetic-dir")
    g.add_argument("--synthetic-dir", default="runs/synthetic_pascal", help="where the synthetic data lives")
    g.add_argument("--synthetic-size", type=int, nargs=3, default=[48, 16, 64], metavar=("TRAIN", "VAL", "PIXELS"),
                   help="images per split and their size, of the synthetic data")
    g.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS, metavar="TASK",
                   help=f"tasks to learn, of {' '.join(TASKS)}")
    g.add_argument("--img-size", type=int, help="train crop and eval resize")
    g.add_argument("--workers", type=int, default=0, help="data loader processes")
    g = p.add_argument_group("model")
    g.add_argument("--pretrained", help="local ViT weights (.safetensors, .npz, .pth); none: random init")
    g.add_argument("--patch-size", type=int, help="ViT patch")
    g.add_argument("--embed-dim", type=int, help="ViT width")
    g.add_argument("--depth", type=int, help="ViT blocks")
    g.add_argument("--num-heads", type=int, help="attention heads")
    g.add_argument("--head-dim", type=int, help="hidden channels of each task head")
    g.add_argument("--lora-rank", type=int, default=4, help="plain LoRA on attention qkv/proj (0: none)")
    g.add_argument("--num-experts", type=int, help="N (0: plain MTL-ViT without experts)")
    g.add_argument("--top-k", type=int, help="k sparse experts per token")
    g.add_argument("--num-shared", type=int, help="S shared experts")
    g.add_argument("--expert-rank", type=int, help="r, the LoRA rank of each expert")
    g.add_argument("--mode", default="adaptive", choices=["adaptive", "naive", "none"],
                   help="ASE, naive shared experts, or the LoRA-MoE baseline (none: S must be 0)")
    g.add_argument("--placement", default="ffn", choices=["ffn", "fc1", "fc2", "fc1+fc2"],
                   help="where the experts attach in each FFN")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, help="passes over the train split")
    g.add_argument("--batch-size", type=int, help="global batch (images), split over the processes")
    g.add_argument("--lr", type=float, help="peak AdamW learning rate")
    g.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW weight decay")
    g.add_argument("--warmup-steps", type=int, help="linear warm-up steps")
    g.add_argument("--schedule", default="cosine", choices=["cosine", "poly"], help="decay after warm-up")
    g.add_argument("--clip-grad", type=float, default=1.0, help="max gradient norm (0: off)")
    g.add_argument("--mi-weight", type=float, default=0.005, help="weight of the Mod-Squad MI loss")
    g.add_argument("--amp", default="auto", choices=["auto", "bf16", "off"], help="auto: bf16 on CUDA")
    g.add_argument("--seed", type=int, default=0, help="seeds init, data order and augmentation")
    g.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0: all epochs)")
    g = p.add_argument_group("run")
    g.add_argument("--output", default="runs/ase", help="directory for config, logs, checkpoints, plots")
    g.add_argument("--eval-every", type=int, help="epochs between evaluations")
    g.add_argument("--checkpoint-every", type=int, help="steps between checkpoints (and one per epoch)")
    g.add_argument("--resume", action="store_true", help="continue from OUTPUT/last.pt")
    g.add_argument("--eval-only", metavar="CHECKPOINT", help="evaluate a checkpoint and exit")
    g.add_argument("--reference", default=REFERENCE, help="single-task reference metrics for delta_m")
    g.add_argument("--no-plots", action="store_true", help="skip the PNG plots at the end")
    return p


# what a checkpoint's model is and what data it learned from: --eval-only takes these from the checkpoint
CHECKPOINT_OPTIONS = ("tasks", "img_size", "patch_size", "embed_dim", "depth", "num_heads", "head_dim", "lora_rank",
                      "num_experts", "top_k", "num_shared", "expert_rank", "mode", "placement", "data",
                      "synthetic_dir", "synthetic_size", "seed")


def resolve_args(argv=None) -> argparse.Namespace:
    """preset < the checkpoint's model and data options (--eval-only) < config file < command line; every option
    ends with a value."""
    p = parser()
    first, _ = p.parse_known_args(argv)
    cfg = {}
    if first.config:
        with open(first.config) as f:
            cfg = yaml.safe_load(f) or {}
        unknown = set(cfg) - {a.dest for a in p._actions}
        if unknown:
            p.error(f"{first.config}: unknown options {sorted(unknown)}")
    saved = {}
    if first.eval_only:
        if not os.path.isfile(first.eval_only):
            p.error(f"--eval-only: no such file: {first.eval_only}")
        saved = torch.load(first.eval_only, map_location="cpu", weights_only=False).get("args", {})
        saved = {k: saved[k] for k in CHECKPOINT_OPTIONS if k in saved}
    preset = first.preset or cfg.get("preset") or "tiny"
    p.set_defaults(**(PRESETS[preset] | saved | cfg | {"preset": preset}))
    args = p.parse_args(argv)
    if args.num_experts and args.mode == "none" and args.num_shared:
        p.error("--mode none is the baseline without shared experts: set --num-shared 0")
    return args


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


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------------------------ checkpoints


def save_atomic(obj, path: str) -> None:
    """Write to a temporary file, flush it to disk, then rename: a crash leaves the old file or the new one."""
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
        self.train_set = PascalContextMT(root, "train", args.img_size, seed=args.seed)
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
                results = self.evaluate()
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

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Metrics over the validation set, reduced over ranks; routing statistics of the last ASE forward."""
        self.model.eval()
        meters = make_meters(self.model.tasks, self.device)
        sampler = DistributedSampler(self.val_set, self.world, self.rank, shuffle=False, drop_last=False)
        loader = DataLoader(self.val_set, batch_size=max(1, self.per_rank), sampler=sampler,
                            num_workers=self.args.workers)
        seen = torch.zeros(len(self.val_set), dtype=torch.bool)
        gates, loads, batches = None, None, 0
        for batch in tqdm(loader, disable=not self.main, desc="eval", leave=False):
            index = batch["index"]
            fresh = ~seen[index]  # DistributedSampler pads with repeats: count every image once
            seen[index] = True
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
                preds = self.model(batch["image"].to(self.device))
            keep = fresh.to(self.device)
            for t in self.model.tasks:
                meters[t].update(preds[t].float()[keep], batch[t].to(self.device)[keep])
            stats = self.model.routing_stats()
            if stats is not None:
                gates = stats["shared_gate"] if gates is None else gates + stats["shared_gate"]
                loads = stats["load"] if loads is None else loads + stats["load"]
            batches += 1
        results = {}
        for t, meter in meters.items():
            meter.reduce()
            results[t] = meter.compute()
        value, used = delta_m(results, load_reference(self.args.reference))
        results["delta_m"] = {"value": value, "tasks": used}
        if gates is not None:
            results["routing"] = {"shared_gate": (gates / batches).tolist(), "load": (loads / batches).tolist()}
        self.model.train()
        return results

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


def flatten(results: dict) -> dict:
    """{task: {metric: v}} -> {"val/task/metric": v} for the numeric entries (routing stats are kept nested)."""
    out = {}
    for task, metrics in results.items():
        if task == "routing":
            out["routing"] = metrics
            continue
        for name, v in metrics.items():
            if isinstance(v, (int, float)):
                out[f"val/{task}/{name}"] = v
    return out


def metrics_table(results: dict, reference: str = REFERENCE) -> str:
    lines = ["| task | metric | value |", "|---|---|---|"]
    for task, metrics in results.items():
        if task in ("routing",):
            continue
        for name, v in metrics.items():
            if isinstance(v, (int, float)):
                lines.append(f"| {task} | {name} | {v:.3f} |")
    used = results.get("delta_m", {}).get("tasks")
    if used is not None:
        lines.append(f"\ndelta_m over {', '.join(used) or 'no task'} (reference: {reference})")
    return "\n".join(lines)


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
