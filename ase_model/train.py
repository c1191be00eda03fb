"""Multi-task training of a frozen ViT with Adaptive Shared Experts: the command line (options in `options.py`,
the trainer in `trainer.py`, checkpoints in `checkpoints.py`, evaluation in `evaluate.py`).

    python -m ase_model.train --help
"""

import argparse
import json
import os
import sys

import torch.distributed as dist
import yaml

from .checkpoints import read_latest, write_text_atomic
from .data import DataError
from .distributed import rank_zero, say
from .errors import UserError
from .evaluate import metrics_table
from .options import resolve, resolve_args, resume_changes
from .rundir import RunDir
from .signals import Stop
from .trainer import Trainer

__all__ = ["Trainer", "main"]


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
