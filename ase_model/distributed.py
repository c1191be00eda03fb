"""The processes of a run: torchrun's rank and world size, the device of each process, and rank-0-only output."""

import os
import sys

import torch
import torch.distributed as dist


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


def say(msg: str) -> None:
    """Print msg to stderr on rank 0 only (before or without `setup_distributed`)."""
    if rank_zero():
        print(msg, file=sys.stderr)
