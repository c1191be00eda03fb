"""ase_model/metrics.py on small hand-computed cases, and delta_m against the paper's own numbers."""

import importlib.util
import math

import numpy as np
import pytest
import torch
import yaml

from ase_model import metrics
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
from ase_model.options import REFERENCE


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


def test_edge_ods_f_sums_boundary_counts_over_images(monkeypatch):
    """pyEdgeEval's matcher replaced by exact pixel matching: the dataset's counts per threshold give odsF."""

    def exact_match(thresholds, pred, gts, max_dist):
        (gt,) = gts
        counts = [[(p & gt).sum(), gt.sum(), (p & gt).sum(), p.sum()] for p in (pred >= t for t in thresholds)]
        return tuple(np.array(c, dtype=float) for c in zip(*counts, strict=True))

    monkeypatch.setattr(metrics, "_boundary_matcher", lambda: exact_match)
    meter = EdgeMeter(thresholds=2)  # thresholds 0.25 and 0.75
    prob = torch.tensor([0.9, 0.3, 0.6, 0.1])
    meter.update(torch.logit(prob).view(1, 1, 1, 4), torch.tensor([[[1.0, 1.0, 0.0, 0.0]]]))
    # t = 0.25: predicted 1 1 1 0 -> recall 2/2, precision 2/3, F 0.8; t = 0.75: 1 0 0 0 -> R 1/2, P 1, F 2/3
    assert meter.compute()["odsF"] == pytest.approx(80.0)
    meter.update(torch.logit(prob).view(1, 1, 1, 4), torch.tensor([[[0.0, 0.0, 1.0, 0.0]]]))
    # summed: t = 0.25: R (2 + 1) / 3, P (2 + 1) / 6 -> F 2/3; t = 0.75: R 1/3, P 1/2 -> F 0.4
    assert meter.compute()["odsF"] == pytest.approx(200 / 3)


def test_edge_meter_reports_ods_f_only_with_pyedgeeval():
    has = importlib.util.find_spec("pyEdgeEval") is not None
    meter = EdgeMeter()
    meter.update(torch.zeros(1, 1, 8, 8), torch.zeros(1, 8, 8))
    assert ("odsF" in meter.compute()) == has


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
