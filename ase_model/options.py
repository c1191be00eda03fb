"""Multi-task training of a frozen ViT with Adaptive Shared Experts on PASCAL-Context or NYUD-v2.

    python -m ase_model.train                                  # tiny ViT, synthetic data, CPU-friendly
    python -m ase_model.train --dataset nyud                   # the same on synthetic NYUD-v2 data
    python -m ase_model.train --preset paper --data PASCAL_MT --pretrained vit_b16.safetensors
    torchrun --nproc_per_node=8 -m ase_model.train --preset paper --data PASCAL_MT ...
    python -m ase_model.train -c run.yaml --resume              # continue a run where it stopped

Options come from (later wins): the preset, a YAML config (-c), the command line. Every run writes its resolved
config, metrics (metrics.jsonl, TensorBoard when installed), checkpoints (last.pt, best.pt, written atomically)
and plots (PNG) to --output.
"""

import argparse
import os

import yaml

from . import datasets
from .errors import UserError

# options (this module's docstring is the --help text): presets, the parser, and how a preset, a config
# file, a checkpoint and the command line combine into one resolved set

DEFAULT_DATASET = "pascal_context"
REFERENCE = datasets.get(DEFAULT_DATASET).reference  # the default dataset's delta_m reference file

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


class Parser(argparse.ArgumentParser):
    """A user error is one line naming the option (not the whole usage), exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n(--help lists the options)\n")


def parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m ase_model.train", description=__doc__, epilog=_presets_table(),
                formatter_class=_HelpFormatter)
    add = p.add_argument
    add("-c", "--config", help="YAML file of options (keys as the long option names, with _)")
    add("--preset", choices=sorted(PRESETS), help="defaults for the model and schedule (default: tiny)")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default=DEFAULT_DATASET, choices=datasets.names(),
                   help="the benchmark: its tasks, losses, metrics and layout (ase_model/datasets/)")
    g.add_argument("--data", help="the dataset's root (PASCAL_MT, NYUD_MT); default: a synthetic copy of its layout "
                   "generated under --synthetic-dir")
    g.add_argument("--synthetic-dir", default="runs/synthetic", help="where the synthetic data lives")
    g.add_argument("--synthetic-size", type=int, nargs=3, default=[48, 16, 64], metavar=("TRAIN", "VAL", "PIXELS"),
                   help="images per split and the least shorter side, of the synthetic data (varied, non-square)")
    g.add_argument("--tasks", nargs="+", metavar="TASK",
                   help="tasks to learn (default: all of the dataset's: " + "; ".join(
                       f"{name}: {' '.join(datasets.get(name).tasks)}" for name in datasets.names()) + ")")
    g.add_argument("--img-size", type=int, help="train crop and eval resize")
    g.add_argument("--augment", default="reference", choices=["reference", "crop"],
                   help="training geometry: the reference's flip, scale 0.75-1.25 and rotation +-20 degrees, then "
                        "a resize to --img-size; or crop: aspect-preserving random scale, random --img-size crop, flip")
    g.add_argument("--workers", type=int, help="data loader processes (default: 0 on a CPU, 8 on CUDA, where "
                   "batches also come in pinned memory)")
    g = p.add_argument_group("model")
    g.add_argument("--pretrained", help="local ViT weights (.safetensors, .npz, .pth); none: random init")
    g.add_argument("--pretrained-sha256", help="the sha256 --pretrained must have (recorded in every checkpoint; "
                   "--resume and --eval-only check it)")
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
    g.add_argument("--edge-eval-every", type=int, default=0,
                   help="epochs between evaluations with the edge odsF (the final evaluation always has it; the "
                        "others report the edge BCE); 0: the final evaluation only")
    g.add_argument("--eval-workers", type=int, default=0, help="processes for the edge odsF boundary matching")
    g.add_argument("--edge-matcher", default="fast", choices=["fast", "pyedgeeval"],
                   help="the edge odsF boundary matching: fast (a maximum matching, the count pyEdgeEval's "
                        "assignment reaches up to its run-to-run spread; about 1 s per 500x375 image at 99 "
                        "thresholds) or pyedgeeval (the BSDS assignment itself, 47-185 s per image; needs pyEdgeEval)")
    g.add_argument("--edge-thresholds", type=int, default=99,
                   help="thresholds of the edge odsF (SEISM's 99; the matching runs once per image and threshold)")
    g.add_argument("--edge-ids", metavar="FILE", help="score the edges on the val images listed in FILE only (one "
                   "id a line): SEISM's test_new list (2,498 images), as MTL-PyTorch's seism evaluation; default: all "
                   "of val (5,105 images, as ASTMT)")
    g.add_argument("--checkpoint-every", type=int, help="steps between checkpoints (and one per epoch)")
    g.add_argument("--resume", action="store_true", help="continue from OUTPUT/last.pt, with the options saved in "
                   "it (a changed model or data option is refused, a changed schedule option applied)")
    g.add_argument("--overwrite", action="store_true", help="start anew in an OUTPUT that holds a run: its files "
                   "are removed once the new run is set up (without it, a non-empty OUTPUT is refused)")
    g.add_argument("--log-every", type=int, default=10, help="steps between reading the losses on the host "
                   "(progress bar, TensorBoard, the non-finite check); the logs are the same for any value")
    g.add_argument("--compile", action="store_true", help="torch.compile the model for training")
    g.add_argument("--cuda-graphs", action="store_true", help="capture the fixed-shape training forward and "
                   "backward in CUDA graphs (torch.compile mode reduce-overhead); ignored, with a message, without "
                   "CUDA")
    g.add_argument("--eval-only", metavar="CHECKPOINT", help="evaluate a checkpoint and exit")
    g.add_argument("--reference", help="single-task reference metrics for delta_m (default: the dataset's file, "
                   "where it ships one)")
    g.add_argument("--no-plots", action="store_true", help="skip the PNG plots at the end")
    return p


# what a checkpoint's model is and what data it learned from: --eval-only takes these from the checkpoint
CHECKPOINT_OPTIONS = ("dataset", "tasks", "img_size", "patch_size", "embed_dim", "depth", "num_heads", "head_dim",
                      "lora_rank", "num_experts", "top_k", "num_shared", "expert_rank", "mode", "placement", "data",
                      "synthetic_dir", "synthetic_size", "seed", "pretrained", "pretrained_sha256")
# --resume takes every option from the checkpoint except these, which say how to run, not what
RUN_CONTROL = ("config", "output", "resume", "overwrite", "eval_only", "max_steps", "eval_workers", "edge_matcher")
# ... and refuses to change what the run is (the model, its weights, its data and their order)
FIXED_ON_RESUME = tuple(k for k in CHECKPOINT_OPTIONS if k != "pretrained") + ("preset", "batch_size", "augment")
# ... and applies a changed schedule, saying so (the run is then no longer the one it would have been)
SCHEDULE_OPTIONS = ("epochs", "lr", "warmup_steps", "schedule", "weight_decay", "clip_grad", "mi_weight", "amp",
                    "edge_eval_every", "edge_thresholds", "edge_ids")

POSITIVE = ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "head_dim", "epochs", "batch_size", "lr",
            "eval_every", "log_every", "edge_thresholds")
NON_NEGATIVE = ("lora_rank", "num_experts", "top_k", "num_shared", "expert_rank", "weight_decay", "warmup_steps",
                "clip_grad", "mi_weight", "max_steps", "checkpoint_every", "workers", "edge_eval_every", "eval_workers")


def _option(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def validate(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Values a run cannot use are refused here, naming the option (also those from a config file or checkpoint,
    which argparse does not type-check)."""
    types = {a.dest: a.type for a in p._actions if a.type in (int, float)}
    for dest, kind in types.items():
        value = getattr(args, dest)
        values = value if isinstance(value, list) else [value]
        for v in values:
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))
                                  or (kind is int and not isinstance(v, int))):
                p.error(f"{_option(dest)}: expected {'an integer' if kind is int else 'a number'}, got {v!r}")
    for action in p._actions:  # argparse checks choices and nargs on the command line only
        value = getattr(args, action.dest, None)
        if value is None:
            continue
        if action.nargs in ("+", "*", 3) and not (isinstance(value, list) and value
                                                 and (action.nargs != 3 or len(value) == 3)):
            count = action.nargs if action.nargs == 3 else "one or more"
            p.error(f"{_option(action.dest)}: expected a list of {count} values, got {value!r}")
        if action.choices is not None:
            bad = [v for v in (value if isinstance(value, list) else [value]) if v not in action.choices]
            if bad:
                p.error(f"{_option(action.dest)}: expected one of {', '.join(map(str, action.choices))}, got "
                        f"{', '.join(map(repr, bad))}")
    for dest in POSITIVE:
        if getattr(args, dest) is not None and not getattr(args, dest) > 0:
            p.error(f"{_option(dest)} must be positive, got {getattr(args, dest)}")
    for dest in NON_NEGATIVE:
        if getattr(args, dest) is not None and getattr(args, dest) < 0:
            p.error(f"{_option(dest)} must be 0 or more, got {getattr(args, dest)}")
    if min(args.synthetic_size) < 1:
        p.error(f"--synthetic-size: counts and size must be positive, got {args.synthetic_size}")
    if args.img_size % args.patch_size:
        p.error(f"--img-size {args.img_size} must be a multiple of --patch-size {args.patch_size}")
    if args.embed_dim % args.num_heads:
        p.error(f"--embed-dim {args.embed_dim} must be a multiple of --num-heads {args.num_heads}")
    if args.num_experts:
        if args.expert_rank < 1 or args.top_k < 1:
            p.error("--expert-rank and --top-k must be positive when --num-experts is")
        if args.top_k + args.num_shared > args.num_experts:
            p.error(f"--top-k {args.top_k} + --num-shared {args.num_shared} exceed --num-experts {args.num_experts}")
    if args.num_experts and args.mode == "none" and args.num_shared:
        p.error("--mode none is the baseline without shared experts: set --num-shared 0")
    if args.edge_ids and not os.path.isfile(args.edge_ids):
        p.error(f"--edge-ids {args.edge_ids}: no such file")
    dataset = datasets.get(args.dataset)
    if args.tasks is None:
        args.tasks = list(dataset.tasks)
    unknown = [t for t in args.tasks if t not in dataset.tasks]
    if unknown or len(set(args.tasks)) != len(args.tasks):
        p.error(f"--tasks: expected distinct tasks of --dataset {args.dataset} ({', '.join(dataset.tasks)}), got "
                f"{' '.join(map(str, args.tasks))}")
    if args.augment not in dataset.augmentations:
        p.error(f"--augment {args.augment}: --dataset {args.dataset} has {', '.join(dataset.augmentations)}")
    if args.reference is None:
        args.reference = dataset.reference
    if args.resume and args.overwrite:
        p.error("--resume continues the run in --output, --overwrite replaces it: choose one")
    if args.eval_only and (args.resume or args.overwrite):
        p.error("--eval-only writes eval_*.{yaml,json} beside a run: it takes neither --resume nor --overwrite")


def resume_changes(args: argparse.Namespace, saved: dict) -> list[str]:
    """What a resumed run changes against the checkpoint's options: UserError naming every changed model or data
    option; the list of changed schedule options, which the trainer applies."""
    def show(v):
        return " ".join(map(str, v)) if isinstance(v, list | tuple) else str(v)

    fixed = [f"{_option(k)} {show(getattr(args, k))} (the run has {show(saved[k])})"
             for k in FIXED_ON_RESUME if k in saved and getattr(args, k) != saved[k]]
    if args.pretrained and not saved.get("pretrained"):  # a moved file is fine: its sha256 is checked on loading
        fixed.append(f"--pretrained {args.pretrained} (the run has None: a random backbone)")
    if fixed:
        raise UserError(f"--resume cannot change the model or data of the run in {args.output}: " + "; ".join(fixed)
                        + ". Keep them, or start a new run with another --output")
    return [f"{_option(k)} {show(getattr(args, k))} (was {show(saved[k])})"
            for k in SCHEDULE_OPTIONS if k in saved and getattr(args, k) != saved[k]]


def resolve_args(argv=None, resumed: dict | None = None) -> argparse.Namespace:
    """preset < the checkpoint's options (its model and data for --eval-only; all but RUN_CONTROL for `resumed`,
    the options of the checkpoint a --resume continues) < config file < command line; every option ends with a
    valid value."""
    return resolve(argv, resumed)[0]


def resolve(argv=None, resumed: dict | None = None) -> tuple[argparse.Namespace, dict | None]:
    """The options of `resolve_args`, and the --eval-only checkpoint they took the model and data from (None
    without --eval-only): the evaluation loads its weights from it instead of reading the file again."""
    p = parser()
    first, _ = p.parse_known_args(argv)
    cfg = {}
    if first.config:
        try:
            with open(first.config) as f:
                cfg = yaml.safe_load(f) or {}
        except (OSError, yaml.YAMLError) as e:
            p.error(f"-c {first.config}: cannot read it as YAML ({e})")
        if not isinstance(cfg, dict):
            p.error(f"-c {first.config}: expected a mapping of option names to values")
        unknown = set(cfg) - {a.dest for a in p._actions}
        if unknown:
            p.error(f"{first.config}: unknown options {sorted(unknown)}")
    saved, evaluated = {}, None
    known = {a.dest for a in p._actions}
    if first.eval_only:
        from .checkpoints import read_checkpoint

        try:
            evaluated = read_checkpoint(first.eval_only)
        except UserError as e:
            p.error(f"--eval-only: {e}")
        saved = {k: evaluated["args"][k] for k in CHECKPOINT_OPTIONS if k in evaluated["args"]}
    elif resumed:
        saved = {k: v for k, v in resumed.items() if k in known and k not in RUN_CONTROL}
    preset = first.preset or cfg.get("preset") or saved.get("preset") or "tiny"
    if preset not in PRESETS:
        p.error(f"--preset {preset}: expected one of {sorted(PRESETS)}")
    p.set_defaults(**(PRESETS[preset] | saved | cfg | {"preset": preset}))
    args = p.parse_args(argv)
    validate(p, args)
    return args, evaluated
