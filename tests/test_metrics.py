"""ase_model/metrics.py against small independent implementations of the reference's formulas
(Multi-Task-Learning-PyTorch evaluation/: eval_semseg.py, eval_human_parts.py, eval_sal.py with jaccard.py,
eval_normals.py; SEISM's edge protocol through pyEdgeEval), on hand-made cases: an all-ignore image, an empty
saliency mask, non-square images; and delta_m against the paper's own numbers."""

import importlib.util
import math

import numpy as np
import pytest
import torch
import yaml

from ase_model import metrics
from ase_model.data import IGNORE
from ase_model.datasets.pascal_context import make_meters
from ase_model.metrics import (
    ConfusionMeter,
    EdgeMeter,
    NormalsMeter,
    SaliencyMeter,
    delta_m,
    edge_thresholds,
    load_reference,
    quantize,
)
from ase_model.options import REFERENCE

HAS_PYEDGEEVAL = importlib.util.find_spec("pyEdgeEval") is not None


def _logits_for(labels: torch.Tensor, classes: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(labels, classes).permute(0, 3, 1, 2).float()


# --- semseg and human parts ---------------------------------------------------------------------------------------

def test_miou_from_the_dataset_confusion_matrix():
    meter = ConfusionMeter(3)
    target = torch.tensor([[[0, 0, 1, IGNORE]]])
    pred = torch.tensor([[[0, 1, 1, 2]]])  # the last pixel is ignored whatever it predicts
    meter.update(_logits_for(pred, 3), target)
    # class 0: tp 1, union 2 -> 1/2; class 1: tp 1, union 2 -> 1/2; class 2 never occurs -> not counted
    assert math.isclose(meter.compute()["mIoU"], 50.0)
    meter.update(torch.tensor([[[2]]]), torch.tensor([[[2]]]))  # labels work as well as logits
    assert math.isclose(meter.compute()["mIoU"], 100 * (0.5 + 0.5 + 1.0) / 3)


def ref_human_parts(preds, gts, n_parts=6):
    """eval_human_parts.py: images whose gt is a single value, 0 or 255, are skipped; tp / fp / fn per part over
    the valid pixels of the others; here averaged over the parts that occur (all of them on the real val set)."""
    tp, fp, fn = (np.zeros(n_parts + 1) for _ in range(3))
    for pred, gt in zip(preds, gts, strict=True):
        uniq = np.unique(gt)
        if len(uniq) == 1 and uniq[0] in (0, 255):
            continue
        valid = gt != 255
        for c in range(n_parts + 1):
            tp[c] += np.sum((gt == c) & (pred == c) & valid)
            fp[c] += np.sum((gt != c) & (pred == c) & valid)
            fn[c] += np.sum((gt == c) & (pred != c) & valid)
    union = tp + fp + fn
    return 100 * np.mean(tp[union > 0] / union[union > 0])


def test_human_parts_skip_images_without_parts_ground_truth():
    rng = np.random.default_rng(0)
    gts = [rng.integers(0, 7, (5, 9)), np.full((6, 4), 255), np.zeros((7, 3), int), rng.integers(0, 7, (3, 8))]
    gts[3][0] = 255
    preds = [rng.integers(0, 7, g.shape) for g in gts]
    meter = make_meters(["human_parts"])["human_parts"]
    for p, g in zip(preds, gts, strict=True):  # one image at a time, each at its own (non-square) size
        meter.update(torch.as_tensor(p)[None], torch.as_tensor(g)[None])
    assert meter.compute()["mIoU"] == pytest.approx(ref_human_parts(preds, gts))
    # the all-background image with a prediction of parts would have lowered every part's IoU
    counted = ConfusionMeter(7)
    for p, g in zip(preds, gts, strict=True):
        counted.update(torch.as_tensor(p)[None], torch.as_tensor(g)[None])
    assert counted.compute()["mIoU"] < meter.compute()["mIoU"]


# --- saliency ---------------------------------------------------------------------------------------------------

SAL_THRESHOLDS = np.linspace(0.2, 0.9, 15)


def ref_saliency(probs, gts, thresholds=SAL_THRESHOLDS):
    """eval_sal.py + jaccard.py: per image and threshold, Jaccard (1 if both empty), precision and recall with
    the 1e-12 guards; mean over images; mIoU = max mean Jaccard, maxF = max 2PR / (P + R + 1e-12)."""
    jac, prec, rec = (np.zeros((len(probs), len(thresholds))) for _ in range(3))
    for i, (p, gt) in enumerate(zip(probs, gts, strict=True)):
        gt = gt.astype(bool)
        for j, t in enumerate(thresholds):
            mask = p > t
            if gt.sum() == 0 and mask.sum() == 0:
                jac[i, j] = 1
            else:
                jac[i, j] = np.sum(gt & mask) / np.sum(gt | mask)
            tp, fp, fn = np.sum(mask & gt), np.sum(mask & ~gt), np.sum(~mask & gt)
            prec[i, j], rec[i, j] = tp / (tp + fp + 1e-12), tp / (tp + fn + 1e-12)
    mp, mr = prec.mean(0), rec.mean(0)
    return 100 * jac.mean(0).max(), 100 * np.max(2 * mp * mr / (mp + mr + 1e-12))


def test_saliency_is_the_reference_formula_with_empty_masks_and_odd_sizes():
    rng = np.random.default_rng(1)
    shapes = [(5, 9), (7, 4), (6, 6), (3, 11)]
    probs = [rng.random(s) for s in shapes]
    gts = [(rng.random(s) < 0.4).astype(np.uint8) for s in shapes]
    gts[1][:] = 0  # an empty saliency mask
    probs[2][:] = 0.05  # an empty prediction at every threshold, on a non-empty mask
    gts[3][:] = 0
    probs[3][:] = 0.1  # both empty: Jaccard 1, precision and recall 0
    meter = SaliencyMeter()
    for p, g in zip(probs, gts, strict=True):
        meter.update(torch.as_tensor(p)[None], torch.as_tensor(g)[None])
    want_miou, want_f = ref_saliency([quantize(torch.as_tensor(p)).numpy() for p in probs], gts)
    got = meter.compute()
    assert got["mIoU"] == pytest.approx(want_miou) and got["maxF"] == pytest.approx(want_f)


def test_saliency_hand_computed():
    meter = SaliencyMeter(quantized=False)
    target = torch.tensor([[[1.0, 1.0, 0.0, 0.0]]])
    meter.update(torch.tensor([[[1.0, 1.0, 0.0, 0.0]]]), target)
    assert meter.compute() == {"mIoU": pytest.approx(100.0), "maxF": pytest.approx(100.0)}
    meter = SaliencyMeter(thresholds=torch.tensor([0.5], dtype=torch.float64), quantized=False)
    meter.update(torch.tensor([[[1.0, 0.0, 1.0, 0.0]]]), target)
    # one hit of two predicted, two true: Jaccard 1/3, precision = recall = 1/2, F = 1/2
    assert meter.compute() == {"mIoU": pytest.approx(100 / 3), "maxF": pytest.approx(50.0)}
    meter.update(torch.zeros(1, 1, 4), torch.zeros(1, 1, 4))  # both empty: J 1, P = R = 0 (jaccard.py)
    assert meter.compute() == {"mIoU": pytest.approx(100 * (1 / 3 + 1) / 2), "maxF": pytest.approx(25.0)}


# --- normals ----------------------------------------------------------------------------------------------------

def test_normals_angular_error():
    meter = NormalsMeter(quantized=False)
    target = torch.zeros(1, 3, 1, 3)
    target[0, 2] = 1.0
    target[0, :, 0, 2] = IGNORE
    pred = torch.zeros(1, 3, 1, 3)
    pred[0, 2, 0, 0] = 3.0  # 0 degrees
    pred[0, 0, 0, 1] = 1.0  # 90 degrees
    pred[0, 0, 0, 2] = -1.0  # ignored
    meter.update(pred, target)
    out = meter.compute()
    # the reference's norm + 1e-12 leaves an exact match at cos = 1 - 1e-12, an angle of 8e-5 degrees
    assert math.isclose(out["mean"], 45.0, abs_tol=1e-4)
    assert math.isclose(out["rmse"], math.sqrt((0 + 90**2) / 2), abs_tol=1e-4)
    assert out["within_11.25"] == pytest.approx(50.0) and out["within_30"] == pytest.approx(50.0)


def _reference_mean_angle(pred_png: np.ndarray, label: np.ndarray) -> float:
    """eval_normals.py, written out for the test: the saved PNG read back as 2 p / 255 - 1 and renormalised
    (normal_ize: norm + 1e-12), the label renormalised the same way, the angle over the valid pixels."""
    def normal_ize(a):
        return a / (np.linalg.norm(a, axis=1, keepdims=True) + 1e-12)

    back = normal_ize(2.0 * pred_png.astype(np.float64) / 255 - 1)
    valid = np.linalg.norm(label, axis=1) != 0
    angle = np.rad2deg(np.arccos(np.clip((back * normal_ize(label)).sum(1), -1, 1)))
    return float(angle[valid].mean())


def test_normals_read_back_as_the_reference_png():
    """The prediction is what the reference writes: unit normals at the network's resolution, resized (so no longer
    of unit length), saved as (n + 1) 255 / 2 truncated to uint8 (utils/utils.py get_output, evaluate_utils.py
    save_model_predictions); eval_normals.py renormalises it after reading it back, not before writing it."""
    rng = np.random.default_rng(2)
    gt = rng.normal(size=(1, 3, 5, 7))
    gt /= np.linalg.norm(gt, axis=1, keepdims=True)
    unit = rng.normal(size=(1, 3, 10, 14))
    unit /= np.linalg.norm(unit, axis=1, keepdims=True)
    resized = torch.nn.functional.interpolate(torch.as_tensor(unit), size=(5, 7), mode="bilinear").numpy()
    assert np.linalg.norm(resized, axis=1).min() < 0.9  # the case that tells the two orders apart
    png = ((resized + 1) * 255 / 2).astype(np.uint8)
    meter = NormalsMeter()
    meter.update(torch.as_tensor(resized), torch.as_tensor(gt))
    assert meter.compute()["mean"] == pytest.approx(_reference_mean_angle(png, gt), rel=1e-9)


def test_normals_renormalise_the_8_bit_label():
    """The label decoded from its 8-bit PNG (2 p / 255 - 1) is not of unit length; eval_normals.py renormalises it
    (``label = normal_ize(label)``) before the angle. IGNORE pixels stay out."""
    rng = np.random.default_rng(3)
    unit = rng.normal(size=(2, 3, 6, 9))
    unit /= np.linalg.norm(unit, axis=1, keepdims=True)
    label = 2.0 * np.floor((unit + 1) * 255 / 2) / 255 - 1  # the dataset's decoding of its PNG
    pred = rng.normal(size=(2, 3, 6, 9))
    pred /= np.linalg.norm(pred, axis=1, keepdims=True)
    png = ((pred + 1) * 255 / 2).astype(np.uint8)
    want = _reference_mean_angle(png, label)
    target = torch.as_tensor(label).clone()
    target[0, :, 0, :4] = IGNORE
    ignored = label.copy()
    ignored[0, :, 0, :4] = 0  # the reference's invalid pixels are zero vectors
    meter = NormalsMeter()
    meter.update(torch.as_tensor(pred), target)
    assert meter.compute()["mean"] == pytest.approx(_reference_mean_angle(png, ignored), rel=1e-9)
    assert _reference_mean_angle(png, ignored) != pytest.approx(want, rel=1e-9)  # the IGNORE pixels mattered
    unquantized = NormalsMeter(quantized=False)
    unquantized.update(torch.as_tensor(2 * pred), target)
    cos = (pred * label / np.linalg.norm(label, axis=1, keepdims=True)).sum(1)
    keep = np.ones(cos.shape, dtype=bool)
    keep[0, 0, :4] = False
    assert unquantized.compute()["mean"] == pytest.approx(np.rad2deg(np.arccos(cos[keep])).mean(), rel=1e-9)


# --- edges ------------------------------------------------------------------------------------------------------

def test_edge_loss_over_the_valid_pixels():
    meter = EdgeMeter(ods=False)
    meter.update(torch.full((2, 1, 2), 0.5), torch.tensor([[[1.0, 0.0]], [[1.0, IGNORE]]]))
    assert math.isclose(meter.compute()["loss"], (0.95 + 0.05 + 0.95) * math.log(2) / 3, rel_tol=1e-6)
    assert "odsF" not in meter.compute()


def test_edge_thresholds_are_seism_s():
    t = edge_thresholds(99)
    assert len(t) == 99 and t[0] == pytest.approx(0.01) and t[-1] == pytest.approx(0.99)


def test_edge_ods_f_sums_boundary_counts_over_images(monkeypatch):
    """pyEdgeEval's matcher replaced by exact pixel matching: the dataset's counts per threshold give odsF."""

    def exact_match(thresholds, pred, gt, max_dist, apply_thinning):
        counts = [[(p & gt).sum(), gt.sum(), (p & gt).sum(), p.sum()] for p in (pred >= t for t in thresholds)]
        return tuple(np.array(c, dtype=float) for c in zip(*counts, strict=True))

    monkeypatch.setattr(metrics, "_boundary_matcher", lambda: exact_match)
    meter = EdgeMeter(thresholds=3, matcher="pyedgeeval")  # thresholds 0.25, 0.5 and 0.75
    prob = torch.tensor([0.9, 0.3, 0.6, 0.1])
    meter.update(prob.view(1, 1, 4), torch.tensor([[[1.0, 1.0, 0.0, 0.0]]]))
    # t = 0.25: predicted 1 1 1 0 -> R 2/2, P 2/3, F 0.8; t = 0.5: 1 0 1 0 -> F 1/2; t = 0.75: 1 0 0 0 -> F 2/3
    assert meter.compute()["odsF"] == pytest.approx(80.0)
    meter.update(prob.view(1, 1, 4), torch.tensor([[[0.0, 0.0, 1.0, 0.0]]]))
    # summed: t = 0.25: R (2 + 1) / 3, P (2 + 1) / 6 -> F 2/3; t = 0.5: R 2/3, P 2/4 -> F 4/7; t = 0.75: F 0.4
    assert meter.compute()["odsF"] == pytest.approx(200 / 3)


def test_edge_meter_reports_ods_f_with_pyedgeeval_s_matcher_only_where_it_is_installed():
    for matcher, has_ods in (("fast", True), ("pyedgeeval", HAS_PYEDGEEVAL)):
        meter = EdgeMeter(matcher=matcher)
        meter.update(torch.zeros(1, 8, 8), torch.zeros(1, 8, 8))
        assert ("odsF" in meter.compute()) == has_ods, matcher
    with pytest.raises(ValueError, match="edge matcher"):
        EdgeMeter(matcher="csa")


def _edge_images(seed=3):
    """Non-square thinned boundary maps and noisy, blurred predictions of them."""
    import scipy.ndimage

    from ase_model.data import edges_from_context

    rng = np.random.default_rng(seed)
    out = []
    for h, w in [(37, 52), (48, 33), (40, 40)]:
        label = np.zeros((h, w), np.uint8)
        for _ in range(3):
            y0, x0 = rng.integers(0, h - 10), rng.integers(0, w - 10)
            label[y0:y0 + rng.integers(5, 15), x0:x0 + rng.integers(5, 20)] = rng.integers(1, 5)
        gt = edges_from_context(label).astype(bool)
        shifted = np.roll(gt, int(rng.integers(-1, 2)), axis=int(rng.integers(0, 2))).astype(float)
        prob = np.clip(scipy.ndimage.gaussian_filter(shifted, 0.7) * 2.5 + rng.random((h, w)) * 0.3, 0, 1)
        out.append((prob, gt))
    return out


@pytest.mark.parametrize("matcher,workers", [pytest.param("fast", 0, id="fast-in-process"),
                                             pytest.param("fast", 2, id="fast-2-workers"),
                                             pytest.param("pyedgeeval", 2, id="pyedgeeval-2-workers")])
def test_edge_ods_f_matches_pyedgeeval(pyedgeeval, matcher, workers):
    from pyEdgeEval.common.binary_label.evaluate_boundaries import evaluate_boundaries_threshold
    from pyEdgeEval.common.metrics import compute_rec_prec_f1
    from pyEdgeEval.common.utils import check_thresholds

    images = _edge_images()
    thresholds = check_thresholds(99)
    np.testing.assert_allclose(thresholds, edge_thresholds(99))
    total = np.zeros((4, 99))
    for prob, gt in images:  # the reference reads the prediction back as 8-bit
        total += np.stack(evaluate_boundaries_threshold(thresholds, np.floor(prob * 255) / 255, gt, max_dist=0.0075,
                                                        apply_thinning=True))
    _, _, f1 = compute_rec_prec_f1(*total)
    meter = EdgeMeter(workers=workers, matcher=matcher)
    for prob, gt in images:
        meter.update(torch.as_tensor(prob)[None], torch.as_tensor(gt, dtype=torch.float32)[None])
    ods = meter.compute()["odsF"]
    counts = meter.state[2:].view(4, -1).numpy()
    # the ground-truth and (thinned) prediction pixel counts are exact; the matched counts come from BSDS's
    # assignment solver, whose outlier connections are random (the same call can match a pixel or two more or
    # less), and the fast matcher's are the maximum it approaches (tests/test_edge_match.py)
    np.testing.assert_array_equal(counts[[1, 3]], total[[1, 3]])
    np.testing.assert_allclose(counts[[0, 2]], total[[0, 2]], rtol=0.02, atol=2)
    assert ods == pytest.approx(100 * f1.max(), abs=1.0)
    assert 20 < ods < 100, "a case where matching within the tolerance matters"


# --- delta_m ----------------------------------------------------------------------------------------------------

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
    meters = make_meters(["semseg", "human_parts", "sal", "normals", "edge"], edge_ods=False, edge_matcher="pyedgeeval")
    assert set(meters) == {"semseg", "human_parts", "sal", "normals", "edge"}
    assert meters["human_parts"].skip_unlabelled and not meters["semseg"].skip_unlabelled
    assert meters["edge"].matcher == "pyedgeeval" and meters["edge"].max_dist == 0.0075
    with pytest.raises(KeyError, match="depth"):
        make_meters(["depth"])
