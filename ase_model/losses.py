"""Task losses of the PASCAL-Context multi-task setup, each averaged per image, then over images.

Per-image averaging makes the loss of a batch the mean of its images' losses, so a batch split across
data-parallel ranks averages back to the same number (and gradient) as the whole batch on one device.
"""

import torch
import torch.nn.functional as F

from .data import IGNORE

# DESIGN.md: CE 1.0, CE 2.0, balanced BCE 5.0, L1 on normalised normals 10.0, balanced BCE (pos weight 0.95) 50.0
LOSS_WEIGHTS = {"semseg": 1.0, "human_parts": 2.0, "sal": 5.0, "normals": 10.0, "edge": 50.0}
EDGE_POS_WEIGHT = 0.95


def _per_image_mean(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """values, valid: (B, ...). Mean over each image's valid pixels (0 for an image with none), then over B."""
    dims = tuple(range(1, values.dim()))
    per_image = (values * valid).sum(dims) / valid.sum(dims).clamp_min(1)
    return per_image.mean()


def cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """logits (B, C, H, W), target (B, H, W) int64 with IGNORE."""
    valid = target != IGNORE
    loss = F.cross_entropy(logits.float(), target.masked_fill(~valid, 0), reduction="none")
    return _per_image_mean(loss, valid)


def balanced_bce(logits: torch.Tensor, target: torch.Tensor, pos_weight: float | None = None) -> torch.Tensor:
    """Class-balanced binary cross-entropy. logits (B, 1, H, W), target (B, H, W) in {0, 1, IGNORE}.

    Positives weigh w and negatives 1 - w, with w = pos_weight, or, when None, each image's fraction of negative
    pixels (the rarer class weighs more)."""
    logits = logits.float()[:, 0]
    valid = target != IGNORE
    y = target.masked_fill(~valid, 0)
    if pos_weight is None:
        dims = (1, 2)
        neg = ((1 - y) * valid).sum(dims) / valid.sum(dims).clamp_min(1)
        w = neg[:, None, None]
    else:
        w = torch.full_like(logits, pos_weight)
    loss = -(w * y * F.logsigmoid(logits) + (1 - w) * (1 - y) * F.logsigmoid(-logits))
    return _per_image_mean(loss, valid)


def normals_l1(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L1 between the unit-normalised prediction and the target normals. pred, target (B, 3, H, W); target is
    IGNORE where invalid."""
    valid = target[:, 0] != IGNORE
    pred = F.normalize(pred.float(), dim=1)
    loss = (pred - target.masked_fill(target == IGNORE, 0)).abs().sum(1)
    return _per_image_mean(loss, valid)


def task_loss(task: str, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if task in ("semseg", "human_parts"):
        return cross_entropy(pred, target)
    if task == "sal":
        return balanced_bce(pred, target)
    if task == "edge":
        return balanced_bce(pred, target, EDGE_POS_WEIGHT)
    if task == "normals":
        return normals_l1(pred, target)
    raise ValueError(f"unknown task {task!r}")


def multi_task_loss(preds: dict, batch: dict, weights: dict | None = None):
    """Weighted sum of the task losses. Returns (total, {task: unweighted loss})."""
    weights = LOSS_WEIGHTS if weights is None else weights
    losses = {t: task_loss(t, preds[t], batch[t]) for t in preds}
    total = sum(weights[t] * loss for t, loss in losses.items())
    return total, losses
