"""Task losses of the multi-task dense-prediction benchmarks, as the reference code computes them
(Multi-Task-Learning-PyTorch losses/loss_functions.py, the same in ASTMT and M3ViT). Which task takes which loss
and weight, each dataset says (ase_model/datasets/):

- semseg, human parts: cross-entropy averaged over the valid (non-255) pixels of the whole batch
  (``NLLLoss(ignore_index=255)``); an image whose labels are all 255 adds nothing and dilutes nothing;
- saliency: balanced BCE, positives weighted by the batch's fraction of negative pixels (``w`` per batch);
- edges: balanced BCE with the fixed positive weight 0.95;
- normals: L1 between the unit-normalised prediction and the label, summed over the valid elements (3 per valid
  pixel) and divided by their number (``NormalsLoss(normalize=True)``);
- depth: L1 between the raw prediction and the label over the valid (non-255) pixels (``DepthLoss('l1')``:
  ``L1Loss`` of the masked_select'ed values).

Binary losses are averaged over the batch's valid pixels (the reference divides by every pixel of the batch; its
labels have no void pixels, so the two agree; ours have IGNORE only where augmentation padded).

Data parallelism: every normaliser (valid pixel counts, the saliency weight's counts) is all-reduced over the
default process group, and each rank's loss is ``world * (its share of the sum) / (global count)``. DDP averages
gradients over ranks, so N processes train exactly like one process on the global batch; the mean of the ranks'
losses is the global batch's loss. Nothing here reads a value back to the host.
"""

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .data import IGNORE

EDGE_POS_WEIGHT = 0.95


def _world(distributed: bool | None) -> int:
    """The number of processes whose batches form the global batch (1 unless torch.distributed is initialised and
    `distributed` is not False)."""
    if distributed is False or not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size()


def _global_sum(x: torch.Tensor, world: int) -> torch.Tensor:
    """Sum of a (non-differentiable) statistic over the ranks; x itself with one process."""
    x = x.detach().double()
    if world > 1:
        x = x.clone()
        dist.all_reduce(x)
    return x


def _batch_mean(values: torch.Tensor, valid: torch.Tensor, world: int) -> torch.Tensor:
    """Sum of values over the valid elements of the global batch of `world` processes, divided by their number
    (0 if none)."""
    count = _global_sum(valid.sum(), world).clamp_min(1)
    return (values * valid).sum() * (world / count).to(values.dtype)


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, *, distributed: bool | None = None) -> torch.Tensor:
    """logits (B, C, H, W), target (B, H, W) int64 with IGNORE: mean over the batch's valid pixels."""
    valid = target != IGNORE
    loss = F.cross_entropy(logits.float(), target.masked_fill(~valid, 0), reduction="none")
    return _batch_mean(loss, valid, _world(distributed))


def balanced_bce(logits: torch.Tensor, target: torch.Tensor, pos_weight: float | None = None, *,
                 distributed: bool | None = None) -> torch.Tensor:
    """Class-balanced binary cross-entropy. logits (B, 1, H, W), target (B, H, W) in {0, 1, IGNORE}.

    Positives weigh w and negatives 1 - w, with w = pos_weight, or, when None, the batch's fraction of negative
    pixels among its valid ones (the rarer class weighs more). Mean over the batch's valid pixels."""
    logits = logits.float()[:, 0]
    valid = target != IGNORE
    y = target.masked_fill(~valid, 0).float()
    world = _world(distributed)
    if pos_weight is None:
        counts = _global_sum(torch.stack([((1 - y) * valid).sum(), valid.sum()]), world)
        w = (counts[0] / counts[1].clamp_min(1)).float()
    else:
        w = torch.tensor(pos_weight, dtype=torch.float32)  # a 0-dim CPU tensor: a scalar operand, no copy to the GPU
    loss = -(w * y * F.logsigmoid(logits) + (1 - w) * (1 - y) * F.logsigmoid(-logits))
    return _batch_mean(loss, valid, world)


def normals_l1(pred: torch.Tensor, target: torch.Tensor, *, distributed: bool | None = None) -> torch.Tensor:
    """L1 between the unit-normalised prediction and the target normals, averaged over the valid elements (3 per
    valid pixel). pred, target (B, 3, H, W); target is IGNORE where invalid."""
    valid = target != IGNORE
    pred = F.normalize(pred.float(), dim=1)
    loss = (pred - target.masked_fill(~valid, 0)).abs()
    return _batch_mean(loss, valid, _world(distributed))


def depth_l1(pred: torch.Tensor, target: torch.Tensor, *, distributed: bool | None = None) -> torch.Tensor:
    """L1 between the raw depth prediction and the label, averaged over the batch's valid pixels. pred (B, 1, H, W),
    target (B, H, W) in metres, IGNORE where invalid (Multi-Task-Learning-PyTorch losses/loss_functions.py
    DepthLoss, lines 138-140)."""
    valid = target != IGNORE
    loss = (pred.float()[:, 0] - target.masked_fill(~valid, 0)).abs()
    return _batch_mean(loss, valid, _world(distributed))


def multi_task_loss(preds: dict, batch: dict, tasks: dict, *, distributed: bool | None = None):
    """Weighted sum of the task losses. tasks: {name: datasets.Task} (its loss and weight), for the tasks of preds.
    Returns (total, {task: unweighted loss}), all 0-dim tensors.

    distributed: None (default) reduces the normalisers over the default process group when one is initialised;
    False computes the loss of this process's batch alone."""
    losses = {t: tasks[t].loss(preds[t], batch[t], distributed=distributed) for t in preds}
    total = sum(tasks[t].weight * loss for t, loss in losses.items())
    return total, losses
