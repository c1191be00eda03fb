"""What a run reports: rank-0 messages, the run directory's config.yaml and metrics.jsonl, TensorBoard, and the
per-step losses read back from the device every --log-every steps (where a non-finite loss stops the run)."""

import json
import math
import os
import signal
import sys

import torch
import torch.distributed as dist
import yaml
from tqdm import tqdm

from .checkpoints import write_text_atomic


class RunLog:
    """The trainer's logging. Expects `main`, `world`, `args`, `run`, `history`, `pending`, `stat_names`,
    `epoch_sums`, `step`, `epoch`, `signal`, `agreed_signal` and `writer`."""

    def log(self, msg: str) -> None:
        if self.main:
            tqdm.write(msg, file=sys.stderr)

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
