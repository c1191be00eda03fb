"""Metrics of the five PASCAL-Context tasks, accumulated over batches, reducible across data-parallel ranks.

Every meter keeps its state in one float64 tensor (``state``), so ranks sum their states with one all-reduce
and any rank can then ``compute()`` the dataset-level numbers.
"""

import importlib.util
import math
import warnings

import numpy as np
import torch
import torch.distributed as dist
import yaml

from .data import IGNORE, NUM_OUTPUTS
from .losses import EDGE_POS_WEIGHT, balanced_bce


class Meter:
    state: torch.Tensor

    def reduce(self) -> None:
        """Sum the state over the ranks of the default process group (no-op without one)."""
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.state)


class ConfusionMeter(Meter):
    """Dataset-level confusion matrix -> mIoU (percent) over classes that occur in labels or predictions."""

    def __init__(self, num_classes: int, device="cpu"):
        self.num_classes = num_classes
        self.state = torch.zeros(num_classes, num_classes, dtype=torch.float64, device=device)

    @torch.no_grad()
    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        """logits (B, C, H, W); target (B, H, W) with IGNORE."""
        pred = logits.argmax(1)
        valid = target != IGNORE
        idx = target[valid] * self.num_classes + pred[valid]
        self.state += torch.bincount(idx, minlength=self.num_classes**2).view(self.num_classes, -1).to(self.state)

    def compute(self) -> dict[str, float]:
        conf = self.state
        tp = conf.diag()
        union = conf.sum(0) + conf.sum(1) - tp
        present = union > 0
        iou = tp[present] / union[present]
        return {"mIoU": 100.0 * iou.mean().item() if present.any() else float("nan")}


class SaliencyMeter(Meter):
    """Saliency mIoU (max over thresholds of the mean per-image Jaccard) and maxF (max over thresholds of the
    F-measure, beta^2 = 0.3, of the mean per-image precision and recall), in percent."""

    def __init__(self, thresholds=None, device="cpu"):
        self.thresholds = torch.linspace(0.05, 0.95, 19, dtype=torch.float64) if thresholds is None else thresholds
        # per threshold: sum of Jaccard, precision, recall over images; last column: image count
        self.state = torch.zeros(len(self.thresholds), 4, dtype=torch.float64, device=device)

    @torch.no_grad()
    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        """logits (B, 1, H, W); target (B, H, W) in {0, 1, IGNORE}."""
        prob = torch.sigmoid(logits.double()[:, 0])
        valid = target != IGNORE
        gt = (target == 1) & valid
        for i, th in enumerate(self.thresholds.tolist()):
            pred = (prob > th) & valid
            inter = (pred & gt).flatten(1).sum(1).double()
            union = (pred | gt).flatten(1).sum(1).double()
            n_pred, n_gt = pred.flatten(1).sum(1).double(), gt.flatten(1).sum(1).double()
            jaccard = torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))
            precision = torch.where(n_pred > 0, inter / n_pred.clamp_min(1), (n_gt == 0).double())
            recall = torch.where(n_gt > 0, inter / n_gt.clamp_min(1), torch.ones_like(n_gt))
            self.state[i, 0] += jaccard.sum()
            self.state[i, 1] += precision.sum()
            self.state[i, 2] += recall.sum()
            self.state[i, 3] += prob.shape[0]

    def compute(self) -> dict[str, float]:
        n = self.state[:, 3].clamp_min(1)
        jaccard, precision, recall = (self.state[:, j] / n for j in range(3))
        beta2 = 0.3
        f = (1 + beta2) * precision * recall / (beta2 * precision + recall).clamp_min(1e-12)
        return {"mIoU": 100.0 * jaccard.max().item(), "maxF": 100.0 * f.max().item()}


class NormalsMeter(Meter):
    """Angular error of the predicted normals over valid pixels: mean, median (from a 0.05-degree histogram),
    RMSE, and the share within 11.25 / 22.5 / 30 degrees."""

    BINS = 3600  # 0.05-degree bins over [0, 180]

    def __init__(self, device="cpu"):
        # histogram, then sum, sum of squares
        self.state = torch.zeros(self.BINS + 2, dtype=torch.float64, device=device)

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """pred (B, 3, H, W) unnormalised; target (B, 3, H, W), IGNORE where invalid."""
        valid = target[:, 0] != IGNORE
        cos = (torch.nn.functional.normalize(pred.double(), dim=1) * target.double()).sum(1)[valid]
        angle = torch.rad2deg(torch.acos(cos.clamp(-1, 1)))
        self.state[: self.BINS] += torch.histc(angle, bins=self.BINS, min=0, max=180)
        self.state[self.BINS] += angle.sum()
        self.state[self.BINS + 1] += angle.square().sum()

    def compute(self) -> dict[str, float]:
        hist = self.state[: self.BINS]
        n = hist.sum().item()
        if n == 0:
            return {"mean": float("nan"), "median": float("nan")}
        width = 180.0 / self.BINS
        cdf = hist.cumsum(0) / n
        median = (torch.searchsorted(cdf, torch.tensor(0.5, dtype=cdf.dtype, device=cdf.device)).item() + 0.5) * width
        within = {f"within_{t}": 100.0 * cdf[min(int(t / width) - 1, self.BINS - 1)].item() for t in (11.25, 22.5, 30)}
        return {"mean": self.state[self.BINS].item() / n, "median": median,
                "rmse": math.sqrt(self.state[self.BINS + 1].item() / n), **within}


def _boundary_matcher():
    """pyEdgeEval's per-image boundary matching of the BSDS protocol (thinned predictions matched to the ground
    truth within a distance tolerance), or None where pyEdgeEval is not installed."""
    if importlib.util.find_spec("pyEdgeEval") is None:
        return None
    try:
        from pyEdgeEval.common.binary_label.evaluate_boundaries import evaluate_boundaries_threshold
    except ImportError as e:  # its modules moved between releases
        warnings.warn(f"pyEdgeEval is installed but has no evaluate_boundaries_threshold ({e}): no edge odsF",
                      stacklevel=2)
        return None
    return evaluate_boundaries_threshold


class EdgeMeter(Meter):
    """Edge detection: the balanced BCE (pos weight 0.95) of the predictions, averaged per image (lower is
    better), and, where pyEdgeEval is installed, the benchmark's odsF (percent): per threshold, the matched and
    total pixel counts of every image are summed over the dataset, and odsF is the best F-measure over thresholds.

    max_dist 0.0075 (of the image diagonal) is the tolerance of the PASCAL-Context edge benchmark; the thresholds
    are fewer than its 99 as the matching costs one assignment problem per image and threshold.
    """

    def __init__(self, device="cpu", thresholds: int = 20, max_dist: float = 0.0075):
        self.match = _boundary_matcher()
        self.thresholds = (np.arange(thresholds) + 0.5) / thresholds
        self.max_dist = max_dist
        # loss sum, image count, then per threshold: matched gt, gt, matched prediction, prediction pixel counts
        self.state = torch.zeros(2 + 4 * thresholds, dtype=torch.float64, device=device)

    @torch.no_grad()
    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        """logits (B, 1, H, W); target (B, H, W) in {0, 1, IGNORE}."""
        self.state[0] += balanced_bce(logits, target, EDGE_POS_WEIGHT).double() * logits.shape[0]
        self.state[1] += logits.shape[0]
        if self.match is None:
            return
        prob = torch.sigmoid(logits.float()[:, 0]).cpu().numpy()
        gt = (target == 1).cpu().numpy()
        for p, g in zip(prob, gt, strict=True):
            counts = self.match(self.thresholds, p, [g], max_dist=self.max_dist)  # cntR, sumR, cntP, sumP
            self.state[2:] += torch.as_tensor(np.stack(counts), dtype=torch.float64).flatten().to(self.state)

    def compute(self) -> dict[str, float]:
        out = {"loss": (self.state[0] / self.state[1].clamp_min(1)).item()}
        if self.match is not None:
            count_r, sum_r, count_p, sum_p = self.state[2:].view(4, -1)
            recall = count_r / sum_r.clamp_min(1)
            precision = count_p / sum_p.clamp_min(1)
            f = 2 * precision * recall / (precision + recall).clamp_min(1e-12)
            out["odsF"] = 100.0 * f.max().item()
        return out


def make_meters(tasks, device="cpu") -> dict[str, Meter]:
    meters = {}
    for t in tasks:
        if t in ("semseg", "human_parts"):
            meters[t] = ConfusionMeter(NUM_OUTPUTS[t], device)
        elif t == "sal":
            meters[t] = SaliencyMeter(device=device)
        elif t == "normals":
            meters[t] = NormalsMeter(device)
        elif t == "edge":
            meters[t] = EdgeMeter(device)
        else:
            raise ValueError(f"unknown task {t!r}")
    return meters


def load_reference(path: str) -> dict:
    """The single-task reference file: {task: {metric, value, lower_is_better}}."""
    with open(path) as f:
        return yaml.safe_load(f)["tasks"]


def delta_m(results: dict[str, dict[str, float]], reference: dict) -> tuple[float, list[str]]:
    """Multi-task gain in percent, mean over tasks of (-1)^l (M - M_ref) / M_ref, l = 1 where lower is better.

    results: {task: {metric: value}}. Tasks whose reference metric is not in results (edge odsF without
    pyEdgeEval) are left out; the second value lists the tasks that were counted."""
    terms, used = [], []
    for task, ref in reference.items():
        value = results.get(task, {}).get(ref["metric"])
        if value is None or not math.isfinite(value):
            continue
        sign = -1.0 if ref["lower_is_better"] else 1.0
        terms.append(sign * (value - ref["value"]) / ref["value"])
        used.append(task)
    return (100.0 * sum(terms) / len(terms) if terms else float("nan")), used
