"""ase_model/losses.py on small hand-computed cases."""

import math

import torch

from ase_model.data import IGNORE
from ase_model.losses import LOSS_WEIGHTS, balanced_bce, cross_entropy, multi_task_loss, normals_l1


def test_cross_entropy_ignores_255_and_averages_per_image():
    logits = torch.zeros(2, 3, 1, 2)
    logits[0, 1, 0, 0] = math.log(2.0)  # image 0, pixel 0: p(class 1) = 2 / 4
    target = torch.tensor([[[1, IGNORE]], [[0, 2]]])
    # image 0: one valid pixel, -log(1/2); image 1: two pixels of a uniform 3-way softmax, -log(1/3)
    want = (math.log(2.0) + math.log(3.0)) / 2
    assert math.isclose(cross_entropy(logits, target).item(), want, rel_tol=1e-6)


def test_balanced_bce_weights_the_rarer_class():
    logits = torch.zeros(1, 1, 1, 4)  # p = 1/2 everywhere: every pixel costs log 2 before weighting
    target = torch.tensor([[[1.0, 0.0, 0.0, IGNORE]]])
    # automatic weight: 2 of the 3 valid pixels are negative -> w = 2/3 on positives, 1/3 on negatives
    want = (2 / 3 * math.log(2) + 2 * (1 / 3) * math.log(2)) / 3
    assert math.isclose(balanced_bce(logits, target).item(), want, rel_tol=1e-6)
    # fixed positive weight 0.95 (the edge task)
    want = (0.95 * math.log(2) + 2 * 0.05 * math.log(2)) / 3
    assert math.isclose(balanced_bce(logits, target, 0.95).item(), want, rel_tol=1e-6)


def test_normals_l1_normalises_the_prediction_and_skips_invalid_pixels():
    target = torch.zeros(1, 3, 1, 2)
    target[0, 2] = 1.0
    target[0, :, 0, 1] = IGNORE
    pred = torch.zeros(1, 3, 1, 2)
    pred[0, 2, 0, 0] = 5.0  # same direction, any length: no loss
    pred[0, 0, 0, 1] = 1.0  # wrong, but on an ignored pixel
    assert normals_l1(pred, target).item() == 0.0
    pred[0, :, 0, 0] = torch.tensor([1.0, 0.0, 0.0])  # orthogonal: |1 - 0| + |0| + |0 - 1| = 2
    assert math.isclose(normals_l1(pred, target).item(), 2.0, rel_tol=1e-6)


def test_multi_task_loss_weights():
    preds = {"semseg": torch.zeros(1, 21, 2, 2), "edge": torch.zeros(1, 1, 2, 2)}
    batch = {"semseg": torch.zeros(1, 2, 2, dtype=torch.long), "edge": torch.zeros(1, 2, 2)}
    total, parts = multi_task_loss(preds, batch)
    assert math.isclose(total.item(), LOSS_WEIGHTS["semseg"] * parts["semseg"].item()
                        + LOSS_WEIGHTS["edge"] * parts["edge"].item(), rel_tol=1e-6)
    assert LOSS_WEIGHTS == {"semseg": 1.0, "human_parts": 2.0, "sal": 5.0, "normals": 10.0, "edge": 50.0}
