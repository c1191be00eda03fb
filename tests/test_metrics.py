"""ase_model/metrics.py on small hand-computed cases, and delta_m against the paper's own numbers."""

import math

import pytest
import torch
import yaml

from ase_model.data import IGNORE
from ase_model.metrics import (
    ConfusionMeter,
    EdgeMeter,
    NormalsMeter,
    SaliencyMeter,
    delta_m,
    load_reference,
    make_meters,
)
from ase_model.train import REFERENCE


def _logits_for(labels: torch.Tensor, classes: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(labels, classes).permute(0, 3, 1, 2).float()


def test_miou_from_the_dataset_confusion_matrix():
    meter = ConfusionMeter(3)
    target = torch.tensor([[[0, 0, 1, IGNORE]]])
    pred = torch.tensor([[[0, 1, 1, 2]]])  # the last pixel is ignored whatever it predicts
    meter.update(_logits_for(pred, 3), target)
    # class 0: tp 1, union 2 -> 1/2; class 1: tp 1, union 2 -> 1/2; class 2 never occurs -> not counted
    assert math.isclose(meter.compute()["mIoU"], 50.0)
    meter.update(_logits_for(torch.tensor([[[2]]]), 3), torch.tensor([[[2]]]))
    assert math.isclose(meter.compute()["mIoU"], 100 * (0.5 + 0.5 + 1.0) / 3)


def test_saliency_perfect_and_half_right():
    meter = SaliencyMeter()
    target = torch.tensor([[[1.0, 1.0, 0.0, 0.0]]])
    meter.update(torch.tensor([[[[9.0, 9.0, -9.0, -9.0]]]]), target)
    assert meter.compute() == {"mIoU": pytest.approx(100.0), "maxF": pytest.approx(100.0)}
    meter = SaliencyMeter(thresholds=torch.tensor([0.5], dtype=torch.float64))
    meter.update(torch.tensor([[[[9.0, -9.0, 9.0, -9.0]]]]), target)
    # one hit of two predicted, two true: Jaccard 1/3, precision = recall = 1/2, F = 1/2
    assert meter.compute() == {"mIoU": pytest.approx(100 / 3), "maxF": pytest.approx(50.0)}


def test_normals_angular_error():
    meter = NormalsMeter()
    target = torch.zeros(1, 3, 1, 3)
    target[0, 2] = 1.0
    target[0, :, 0, 2] = IGNORE
    pred = torch.zeros(1, 3, 1, 3)
    pred[0, 2, 0, 0] = 3.0  # 0 degrees
    pred[0, 0, 0, 1] = 1.0  # 90 degrees
    pred[0, 0, 0, 2] = -1.0  # ignored
    meter.update(pred, target)
    out = meter.compute()
    assert math.isclose(out["mean"], 45.0, rel_tol=1e-9)
    assert math.isclose(out["rmse"], math.sqrt((0 + 90**2) / 2), rel_tol=1e-9)
    assert out["within_11.25"] == pytest.approx(50.0) and out["within_30"] == pytest.approx(50.0)


def test_edge_meter_averages_the_balanced_bce_per_image():
    meter = EdgeMeter()
    meter.update(torch.zeros(2, 1, 1, 2), torch.tensor([[[1.0, 0.0]], [[1.0, 0.0]]]))
    assert math.isclose(meter.compute()["loss"], (0.95 + 0.05) * math.log(2) / 2, rel_tol=1e-6)


def test_delta_m_reproduces_the_papers_table():
    """The shipped reference is the paper's single-task row: its ASE and MTL-ViT-B rows give its delta_m."""
    reference = load_reference(REFERENCE)
    with open(REFERENCE) as f:
        rows = yaml.safe_load(f)["paper_rows"]
    metric = {t: ref["metric"] for t, ref in reference.items()}
    for row in rows.values():
        results = {t: {metric[t]: row[t]} for t in reference}
        value, used = delta_m(results, reference)
        assert used == list(reference) and value == pytest.approx(row["delta_m"], abs=0.01)


def test_delta_m_leaves_out_tasks_without_their_metric():
    reference = load_reference(REFERENCE)
    value, used = delta_m({"semseg": {"mIoU": 60.1 * 1.1}, "edge": {"loss": 0.1}}, reference)
    assert used == ["semseg"] and value == pytest.approx(10.0)


def test_make_meters_covers_every_task():
    assert set(make_meters(["semseg", "human_parts", "sal", "normals", "edge"])) == {
        "semseg", "human_parts", "sal", "normals", "edge"}
    with pytest.raises(ValueError, match="unknown task"):
        make_meters(["depth"])
