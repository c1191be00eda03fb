"""Metrics of the five PASCAL-Context tasks, accumulated over batches, reducible across data-parallel ranks.

Every meter keeps its state in one float64 tensor (``state``), so ranks sum their states with one all-reduce
and any rank can then ``compute()`` the dataset-level numbers.
"""

import functools
import importlib.util
import math
import multiprocessing
import warnings

import numpy as np
import torch
import torch.distributed as dist
import yaml

from .data import IGNORE
from .edge_match import match_counts
from .losses import EDGE_POS_WEIGHT


def quantize(x: torch.Tensor) -> torch.Tensor:
    """x in [0, 1] as the reference reads it back from the 8-bit PNG it saved: floor(255 x) / 255
    (evaluation/evaluate_utils.py save_model_predictions writes ``result.astype(np.uint8)``)."""
    return torch.floor(x.clamp(0, 1) * 255) / 255


class Meter:
    state: torch.Tensor

    def reduce(self) -> None:
        """Sum the state over the ranks of the default process group (no-op without one)."""
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.state)


class ConfusionMeter(Meter):
    """Dataset-level confusion matrix -> mIoU (percent) over the classes that occur in labels or predictions
    (on the full PASCAL-Context val set every class occurs, and this equals the reference's mean over all classes:
    eval_semseg.py, eval_human_parts.py).

    skip_unlabelled: leave out images whose labels are all background or all IGNORE, as the reference's human
    parts evaluation does (eval_human_parts.py: images without parts ground truth are not scored)."""

    def __init__(self, num_classes: int, device="cpu", skip_unlabelled: bool = False):
        self.num_classes, self.skip_unlabelled = num_classes, skip_unlabelled
        # the matrix, then the number of images scored
        self.state = torch.zeros(num_classes * num_classes + 1, dtype=torch.float64, device=device)

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """pred: labels (B, H, W) or logits (B, C, H, W); target (B, H, W) with IGNORE, at the same size."""
        if pred.dim() == target.dim() + 1:
            pred = pred.argmax(1)
        valid = target != IGNORE
        if self.skip_unlabelled:
            labelled = (valid & (target != 0)).flatten(1).any(1)  # (B,)
            valid = valid & labelled.view(-1, *[1] * (valid.dim() - 1))
            self.state[-1] += labelled.sum()
        else:
            self.state[-1] += target.shape[0]
        idx = target[valid].long() * self.num_classes + pred[valid].long()
        self.state[:-1] += torch.bincount(idx, minlength=self.num_classes**2).to(self.state)

    def compute(self) -> dict[str, float]:
        conf = self.state[:-1].view(self.num_classes, self.num_classes)
        tp = conf.diag()
        union = conf.sum(0) + conf.sum(1) - tp
        present = union > 0
        iou = tp[present] / union[present]
        return {"mIoU": 100.0 * iou.mean().item() if present.any() else float("nan")}


class SaliencyMeter(Meter):
    """Saliency as Multi-Task-Learning-PyTorch evaluates it (evaluation/eval_sal.py with jaccard.py; the same code
    as ASTMT and M3ViT, which the paper's numbers follow), in percent:

    - per image and threshold t in linspace(0.2, 0.9, 15), the prediction ``p > t`` (p read back as 8-bit);
      Jaccard = |pred & gt| / |pred | gt|, and 1 when both are empty; precision = tp / (tp + fp + 1e-12) and
      recall = tp / (tp + fn + 1e-12), so 0 for an empty prediction or an empty ground truth;
    - mIoU: the max over thresholds of the mean per-image Jaccard;
    - maxF: the max over thresholds of F = 2 P R / (P + R + 1e-12) (beta = 1) of the MEAN per-image P and R.

    IGNORE pixels of the target are void (jaccard.py's void_pixels); PASCAL's saliency labels have none."""

    def __init__(self, thresholds=None, device="cpu", quantized: bool = True):
        self.thresholds = torch.linspace(0.2, 0.9, 15, dtype=torch.float64) if thresholds is None else thresholds
        self.quantized = quantized
        # per threshold: sum of Jaccard, precision, recall over images; last column: image count
        self.state = torch.zeros(len(self.thresholds), 4, dtype=torch.float64, device=device)

    @torch.no_grad()
    def update(self, prob: torch.Tensor, target: torch.Tensor) -> None:
        """prob (B, H, W) foreground probability; target (B, H, W) in {0, 1, IGNORE}, at the same size."""
        prob = prob.double()
        if self.quantized:
            prob = quantize(prob)
        valid = target != IGNORE
        gt = (target == 1) & valid
        n_gt = gt.flatten(1).sum(1).double()
        for i, th in enumerate(self.thresholds.tolist()):
            pred = (prob > th) & valid
            tp = (pred & gt).flatten(1).sum(1).double()
            union = (pred | gt).flatten(1).sum(1).double()
            n_pred = pred.flatten(1).sum(1).double()
            jaccard = torch.where((n_gt == 0) & (n_pred == 0), torch.ones_like(union), tp / union.clamp_min(1))
            self.state[i, 0] += jaccard.sum()
            self.state[i, 1] += (tp / (n_pred + 1e-12)).sum()
            self.state[i, 2] += (tp / (n_gt + 1e-12)).sum()
            self.state[i, 3] += prob.shape[0]

    def compute(self) -> dict[str, float]:
        n = self.state[:, 3].clamp_min(1)
        jaccard, precision, recall = (self.state[:, j] / n for j in range(3))
        f = 2 * precision * recall / (precision + recall + 1e-12)
        return {"mIoU": 100.0 * jaccard.max().item(), "maxF": 100.0 * f.max().item()}


def normal_ize(x: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """x / (|x| + 1e-12) along dim: evaluation/eval_normals.py ``normal_ize`` (lines 18-20), which divides by the norm
    plus 1e-12 (torch's F.normalize divides by max(norm, eps) instead)."""
    return x / (torch.linalg.vector_norm(x, dim=dim, keepdim=True) + 1e-12)


class NormalsMeter(Meter):
    """Angular error of the predicted normals over valid pixels, as evaluation/eval_normals.py ``eval_normals``
    scores the PNGs that evaluation/evaluate_utils.py ``save_model_predictions`` wrote: mean, median (from a
    0.05-degree histogram), RMSE, and the share strictly within 11.25 / 22.5 / 30 degrees.

    quantized (the reference): pred is the prediction as the reference writes it, unit normals at the network's
    resolution resized to the label's (utils/utils.py ``get_output`` normalises before the resize, so pred need not be
    of unit length); it is written as (n + 1) 255 / 2 truncated to uint8, read back as 2 p / 255 - 1 and renormalised
    (eval_normals.py lines 36-38). Not quantized: pred (any length) is normalised. Either way the label is
    renormalised (``label = normal_ize(label)``, eval_normals.py line 46): the 8-bit label decoded as 2 p / 255 - 1 is
    not of unit length."""

    BINS = 3600  # 0.05-degree bins over [0, 180]

    def __init__(self, device="cpu", quantized: bool = True):
        self.quantized = quantized
        # histogram, then sum, sum of squares
        self.state = torch.zeros(self.BINS + 2, dtype=torch.float64, device=device)

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """pred (B, 3, H, W); target (B, 3, H, W), IGNORE where invalid, at the same size."""
        valid = target[:, 0] != IGNORE  # the reference's invalid pixels are zero vectors (its valid_mask, line 42)
        pred = pred.double()
        pred = normal_ize(2 * quantize((pred + 1) / 2) - 1) if self.quantized else normal_ize(pred)
        cos = (pred * normal_ize(target.double())).sum(1)[valid]
        angle = torch.rad2deg(torch.acos(cos.clamp(-1, 1)))  # eval_normals.py line 48
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


class DepthMeter(Meter):
    """Depth error over the dataset's valid pixels, as Multi-Task-Learning-PyTorch evaluation/eval_depth.py
    (eval_depth, lines 39-53): a pixel counts where its label is valid (not 0, which the loader marks IGNORE);
    predictions at or below 0 become 1e-9 before the log; ``rmse = sqrt(sum (label - pred)^2 / n)`` and
    ``log_rmse = sqrt(sum (ln label - ln pred)^2 / n)``, both summed over every valid pixel of the dataset (not
    averaged per image). The prediction is not quantised: the reference saves depth as a float .mat."""

    def __init__(self, device="cpu"):
        # sum of squared errors, of squared log errors, valid pixel count
        self.state = torch.zeros(3, dtype=torch.float64, device=device)

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """pred (B, H, W) depth in metres; target (B, H, W), IGNORE (or 0) where invalid, at the same size."""
        valid = (target != IGNORE) & (target != 0)
        label = target.double()[valid]
        pred = pred.double()[valid]
        pred = torch.where(pred <= 0, torch.full_like(pred, 1e-9), pred)  # pred[pred <= 0] = 1e-9
        self.state[0] += (label - pred).square().sum()
        self.state[1] += (label.log() - pred.log()).square().sum()
        self.state[2] += valid.sum()

    def compute(self) -> dict[str, float]:
        n = self.state[2].item()
        if n == 0:
            return {"rmse": float("nan"), "log_rmse": float("nan")}
        return {"rmse": math.sqrt(self.state[0].item() / n), "log_rmse": math.sqrt(self.state[1].item() / n)}


@functools.cache
def _boundary_matcher():
    """pyEdgeEval's per-image boundary matching of the BSDS / SEISM protocol (thinned predictions matched to the
    ground truth within a distance tolerance), or None where pyEdgeEval is not installed (said once: the answer is
    cached for the process and the workers it forks)."""
    if importlib.util.find_spec("pyEdgeEval") is None:
        warnings.warn("pyEdgeEval is not installed: no edge odsF with --edge-matcher pyedgeeval (the edge metric "
                      "is the balanced BCE, and delta_m leaves edges out). Install it with: pip install -e "
                      "\".[eval]\", or use --edge-matcher fast", stacklevel=2)
        return None
    try:
        from pyEdgeEval.common.binary_label.evaluate_boundaries import evaluate_boundaries_threshold
    except ImportError as e:  # its modules moved between releases
        warnings.warn(f"pyEdgeEval is installed but has no evaluate_boundaries_threshold ({e}): no edge odsF",
                      stacklevel=2)
        return None
    return evaluate_boundaries_threshold


def edge_thresholds(n: int) -> np.ndarray:
    """The n thresholds of SEISM and pyEdgeEval: linspace(1 / (n + 1), 1 - 1 / (n + 1), n); 99 -> 0.01 ... 0.99."""
    return np.linspace(1.0 / (n + 1), 1.0 - 1.0 / (n + 1), n)


def _match_counts(thresholds, prob_u8, gt, max_dist, matcher="fast"):
    """One image's (count_r, sum_r, count_p, sum_p) per threshold (4, n): pyEdgeEval's single-gt matching, or its
    fast equivalent (edge_match.py), with the prediction thinned at each threshold (SEISM edgesEvalImg.m). Runs in
    worker processes."""
    prob = prob_u8.astype(np.float64) / 255.0
    if matcher == "fast":
        return match_counts(thresholds, prob, gt, max_dist)
    counts = _boundary_matcher()(thresholds, prob, gt, max_dist=max_dist, apply_thinning=True)
    return np.stack(counts[:4])


class EdgeMeter(Meter):
    """Edge detection, in the SEISM protocol that the reference code uses (seism, via Multi-Task-Learning-PyTorch
    evaluation/eval_edge.py and seism/pr_curves_base.m):

    - odsF (percent, where ``ods`` is on): for each of 99 thresholds, the prediction (read back as 8-bit) is
      binarised and thinned, matched to the thinned full-resolution ground truth within max_dist = 0.0075 of the
      image diagonal, and the matched / total pixel counts of every image are summed over the dataset
      (gather_measure.m); odsF is the best F = 2 P R / (P + R) over thresholds;
    - loss: the balanced BCE (pos weight 0.95) of the prediction against the labels, over the dataset's valid
      pixels (lower is better); the metric where odsF is not computed.

    matcher: "fast" (edge_match.py: a maximum matching, pyEdgeEval's count up to its own run-to-run spread) or
    "pyedgeeval" (its BSDS assignment; no odsF where pyEdgeEval is not installed). workers > 0 spreads the
    matching (per image, all thresholds) over that many processes.
    """

    def __init__(self, device="cpu", thresholds: int = 99, max_dist: float = 0.0075, ods: bool = True,
                 workers: int = 0, matcher: str = "fast"):
        if matcher not in ("fast", "pyedgeeval"):
            raise ValueError(f"edge matcher: expected 'fast' or 'pyedgeeval', got {matcher!r}")
        self.matcher = matcher
        self.match = (matcher == "fast" or _boundary_matcher()) if ods else None
        self.thresholds = edge_thresholds(thresholds)
        self.max_dist, self.workers = max_dist, workers
        self._pool, self._pending = None, []
        # loss sum, valid pixel count, then per threshold: matched gt, gt, matched prediction, prediction counts
        self.state = torch.zeros(2 + 4 * thresholds, dtype=torch.float64, device=device)

    @torch.no_grad()
    def update(self, prob: torch.Tensor, target: torch.Tensor) -> None:
        """prob (B, H, W) edge probability; target (B, H, W) in {0, 1, IGNORE}, at the same size."""
        valid = target != IGNORE
        y = (target == 1).double()
        p = prob.double().clamp(1e-7, 1 - 1e-7)
        loss = -(EDGE_POS_WEIGHT * y * torch.log(p) + (1 - EDGE_POS_WEIGHT) * (1 - y) * torch.log1p(-p))
        self.state[0] += loss[valid].sum()
        self.state[1] += valid.sum()
        if self.match is None:
            return
        prob_u8 = (quantize(prob.double()) * 255).round().to(torch.uint8).cpu().numpy()
        gt = ((target == 1) & valid).cpu().numpy()
        for p8, g in zip(prob_u8, gt, strict=True):
            if self.workers > 0:
                if self._pool is None:
                    ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods()
                                                      else "spawn")
                    self._pool = ctx.Pool(self.workers)
                self._pending.append(self._pool.apply_async(_match_counts, (self.thresholds, p8, g, self.max_dist,
                                                                            self.matcher)))
            else:
                self._add(_match_counts(self.thresholds, p8, g, self.max_dist, self.matcher))

    def _add(self, counts: np.ndarray) -> None:
        self.state[2:] += torch.as_tensor(counts, dtype=torch.float64).flatten().to(self.state)

    def finish(self) -> None:
        """Wait for the matching still running in worker processes and add its counts."""
        for result in self._pending:
            self._add(result.get())
        self._pending = []
        if self._pool is not None:
            self._pool.close()
            self._pool.join()
            self._pool = None

    def reduce(self) -> None:
        self.finish()
        super().reduce()

    def compute(self) -> dict[str, float]:
        self.finish()
        out = {"loss": (self.state[0] / self.state[1].clamp_min(1)).item()}
        if self.match is not None:
            count_r, sum_r, count_p, sum_p = self.state[2:].view(4, -1)
            recall = count_r / sum_r.clamp_min(1)
            precision = count_p / sum_p.clamp_min(1)
            f = 2 * precision * recall / (precision + recall).clamp_min(1e-12)
            out["odsF"] = 100.0 * f.max().item()
        return out


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
