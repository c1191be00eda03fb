"""PASCAL-Context, the five tasks of the multi-task benchmark (DESIGN.md; Multi-Task-Learning-PyTorch
utils/common_config.py get_loss and configs/pascal_context). Decoding and augmentation: ase_model/data.py; the
synthetic copy: ase_model/synthetic.py."""

import functools
import os

from ..data import AUGMENTATIONS, NUM_OUTPUTS, PascalContextMT
from ..losses import EDGE_POS_WEIGHT, balanced_bce, cross_entropy, normals_l1
from ..metrics import ConfusionMeter, EdgeMeter, NormalsMeter, SaliencyMeter
from ..synthetic import is_synthetic, make_synthetic_pascal
from . import Dataset, Task

# SEISM's maxDist for PASCAL-Context (seism/src/scripts/pr_curves_base.m via the reference's eval_edge.py)
EDGE_MAX_DIST = 0.0075

# losses and weights (DESIGN.md): CE 1.0, CE 2.0, balanced BCE 5.0, L1 on normalised normals 10.0, balanced BCE
# (pos weight 0.95) 50.0
TASKS = {
    "semseg": Task(NUM_OUTPUTS["semseg"], cross_entropy, 1.0, "labels", "mIoU", False),
    "human_parts": Task(NUM_OUTPUTS["human_parts"], cross_entropy, 2.0, "labels", "mIoU", False),
    "sal": Task(NUM_OUTPUTS["sal"], balanced_bce, 5.0, "probability", "mIoU", False),
    "normals": Task(NUM_OUTPUTS["normals"], normals_l1, 10.0, "unit", "mean", True),
    "edge": Task(NUM_OUTPUTS["edge"], functools.partial(balanced_bce, pos_weight=EDGE_POS_WEIGHT), 50.0,
                 "probability", "odsF", False, boundary=True),
}


def make_meters(tasks, device="cpu", *, edge_ods: bool = True, edge_thresholds: int = 99, eval_workers: int = 0,
                edge_matcher: str = "fast"):
    """One meter per task: mIoU (parts: images without parts are not scored), saliency mIoU and maxF, the normals
    angle, the edge odsF (see ase_model/metrics.py)."""
    meters = {
        "semseg": lambda: ConfusionMeter(NUM_OUTPUTS["semseg"], device),
        "human_parts": lambda: ConfusionMeter(NUM_OUTPUTS["human_parts"], device, skip_unlabelled=True),
        "sal": lambda: SaliencyMeter(device=device),
        "normals": lambda: NormalsMeter(device),
        "edge": lambda: EdgeMeter(device, thresholds=edge_thresholds, max_dist=EDGE_MAX_DIST, ods=edge_ods,
                                  workers=eval_workers, matcher=edge_matcher),
    }
    return {t: meters[t]() for t in tasks}


DATASET = Dataset(
    name="pascal_context",
    tasks=TASKS,
    loader=PascalContextMT,
    make_meters=make_meters,
    reference=os.path.join(os.path.dirname(os.path.dirname(__file__)), "reference_metrics.yaml"),
    make_synthetic=make_synthetic_pascal,
    is_synthetic=is_synthetic,
    augmentations=AUGMENTATIONS,
)
