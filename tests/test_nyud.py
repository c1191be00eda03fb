"""NYUD-v2 (ase_model/datasets/nyud.py, nyud_synthetic.py): decoding of hand-made NYUD_MT files, the depth loss
and every NYUD metric against independent implementations of Multi-Task-Learning-PyTorch's code (written out here
in numpy), the edge tolerance, the synthetic data's cross-task consistency, and bad files named before the first
step. Training on NYUD (resume, two processes) is in test_train.py."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

from ase_model import check_data, datasets
from ase_model.data import IGNORE, DataError
from ase_model.datasets import nyud, pascal_context
from ase_model.datasets.nyud_synthetic import make_synthetic_nyud, rays
from ase_model.losses import depth_l1

NYUD = datasets.get("nyud")


def _write_sample(root, image_id="0001", h=6, w=8):
    """One hand-made sample with known labels in every file of the layout (val split)."""
    for sub in ("images", "segmentation", "depth", "normals", "edge", "gt_sets"):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    Image.fromarray(np.full((h, w, 3), 128, np.uint8)).save(f"{root}/images/{image_id}.jpg")
    segmentation = np.full((h, w), 5, np.uint8)
    segmentation[0, :] = 0  # unlabelled
    segmentation[:, -1] = 40  # the last class
    Image.fromarray(segmentation).save(f"{root}/segmentation/{image_id}.png")
    depth = np.full((h, w), 2.5, np.float32)
    depth[1, 1] = 0  # invalid
    np.save(f"{root}/depth/{image_id}.npy", depth)
    normals = np.zeros((h, w, 3), np.float32)
    normals[..., 2] = -1
    normals[2, 2] = 0  # invalid
    np.save(f"{root}/normals/{image_id}.npy", normals)
    edge = np.zeros((h, w), np.float32)
    edge[:, 3] = 1
    np.save(f"{root}/edge/{image_id}.npy", edge)
    with open(f"{root}/gt_sets/val.txt", "w") as f:
        f.write(image_id + "\n")
    return root


def test_hand_made_sample_decodes_as_the_reference(tmp_path):
    root = _write_sample(str(tmp_path))
    sample = NYUD.loader(root, "val", img_size=16, train=False)[0]
    # segmentation: v - 1, and 0 -> 255 (MTL data/nyud.py _load_semseg)
    want = torch.full((6, 8), 4)
    want[0, :], want[:, -1] = IGNORE, 39  # the last column was written after the unlabelled row
    assert sample["semseg"].dtype == torch.int64 and torch.equal(sample["semseg"], want)
    depth = torch.full((6, 8), 2.5)
    depth[1, 1] = IGNORE  # AddIgnoreRegions: depth 0 -> 255
    assert torch.equal(sample["depth"], depth)
    assert (sample["normals"][:, 2, 2] == IGNORE).all() and (sample["normals"][2, 0, 0] == -1).all()
    assert torch.equal(sample["edge"][:, 3], torch.ones(6)) and sample["edge"].sum() == 6
    assert sample["image"].shape == (3, 16, 16) and sample["size"].tolist() == [6, 8]


def test_augmentation_zooms_and_divides_the_depth(tmp_path):
    root = _write_sample(str(tmp_path))
    os.rename(f"{root}/gt_sets/val.txt", f"{root}/gt_sets/train.txt")
    data = NYUD.loader(root, "train", img_size=16, seed=0)
    seen = set()
    for epoch in range(12):
        data.set_epoch(epoch)
        sample = data[0]
        depth = sample["depth"][sample["depth"] != IGNORE]
        scale = 2.5 / depth.unique().item()  # one depth, seen from a zoom of 1, 1.2 or 1.5
        assert min(abs(scale - s) for s in (1.0, 1.2, 1.5)) < 1e-5, scale
        seen.add(round(scale, 1))
        assert sample["semseg"].shape == (16, 16) and set(sample["semseg"].unique().tolist()) <= {4, 39, IGNORE}
        n = sample["normals"][:, sample["normals"][0] != IGNORE]
        torch.testing.assert_close(n.norm(dim=0), torch.ones(n.shape[1]))
    assert seen == {1.0, 1.2, 1.5}
    data.set_epoch(3)
    assert all(torch.equal(a, b) for a, b in zip(data[0].values(), data[0].values(), strict=True)), "reproducible"


# --- the loss and the metrics against the reference's code, written out ------------------------------------------

def test_depth_loss_is_l1_over_valid_pixels():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(3, 1, 5, 7, generator=g), torch.rand(3, 5, 7, generator=g) * 5
    target[0, :2] = IGNORE
    target[2] = IGNORE  # an image without depth adds nothing
    # MTL losses/loss_functions.py DepthLoss: L1Loss of masked_select(out), masked_select(label), mask = label != 255
    mask = target[:, None] != IGNORE
    want = torch.nn.L1Loss()(torch.masked_select(pred, mask), torch.masked_select(target[:, None], mask))
    torch.testing.assert_close(depth_l1(pred, target), want)
    assert NYUD.tasks["depth"].loss is depth_l1 and NYUD.tasks["depth"].weight == 1.0


def test_loss_weights_are_mtl_s_nyud_config():
    # configs/nyud/hrnet18/mti_net+edges_normals.yml: semseg 1.0, depth 1.0, normals 10, edge 50.0
    assert {t: task.weight for t, task in NYUD.tasks.items()} == {"semseg": 1.0, "depth": 1.0, "normals": 10.0,
                                                                  "edge": 50.0}
    assert {t: task.channels for t, task in NYUD.tasks.items()} == {"semseg": 40, "depth": 1, "normals": 3, "edge": 1}
    assert [(t.metric, t.lower_is_better) for t in NYUD.tasks.values()] == [
        ("mIoU", False), ("rmse", True), ("mean", True), ("odsF", False)]


def ref_eval_depth(preds, labels):
    """evaluation/eval_depth.py eval_depth: dataset-level sums over the label != 0 pixels."""
    total, total_log, n = 0.0, 0.0, 0
    for pred, label in zip(preds, labels, strict=True):
        pred, label = pred.astype(np.float32).copy(), label.astype(np.float32).copy()
        valid = label != 0
        n += valid.sum()
        label[label == 0] = 1e-9
        pred[pred <= 0] = 1e-9
        total_log += np.sum((np.log(label[valid]) - np.log(pred[valid])) ** 2)
        total += np.sum((label[valid] - pred[valid]) ** 2)
    return {"rmse": np.sqrt(total / n), "log_rmse": np.sqrt(total_log / n)}


def test_depth_meter_is_eval_depth():
    rng = np.random.default_rng(0)
    labels = [rng.uniform(0.5, 9, size=s) for s in ((7, 9), (4, 11))]
    labels[0][2:4] = 0  # invalid
    preds = [label + rng.normal(0, 0.7, size=label.shape) for label in labels]
    preds[1][0, :5] = -0.3  # at or below 0: 1e-9 before the log
    meter = NYUD.make_meters(["depth"])["depth"]
    for pred, label in zip(preds, labels, strict=True):
        target = torch.from_numpy(np.where(label == 0, IGNORE, label).astype(np.float32))  # as the loader marks it
        meter.update(torch.from_numpy(pred.astype(np.float32))[None], target[None])
    got, want = meter.compute(), ref_eval_depth(preds, labels)
    assert got["rmse"] == pytest.approx(want["rmse"], rel=1e-6)
    assert got["log_rmse"] == pytest.approx(want["log_rmse"], rel=1e-6)


def test_semseg_miou_is_eval_semseg_over_40_classes():
    rng = np.random.default_rng(1)
    labels = [rng.integers(0, 40, size=(12, 15)) for _ in range(2)]
    labels[0][0, :40 % 15] = IGNORE
    labels[1].flat[:40] = np.arange(40)  # every class occurs, as on the full val set
    preds = [np.where(rng.random(label.shape) < 0.6, label, rng.integers(0, 40, size=label.shape)) for label in labels]
    meter = NYUD.make_meters(["semseg"])["semseg"]
    for pred, label in zip(preds, labels, strict=True):
        meter.update(torch.from_numpy(pred)[None], torch.from_numpy(label)[None])
    # evaluation/eval_semseg.py eval_semseg(n_classes=40, has_bg=False): per-class tp, fp, fn over valid pixels
    tp, fp, fn = np.zeros(40), np.zeros(40), np.zeros(40)
    for pred, gt in zip(preds, labels, strict=True):
        valid = gt != IGNORE
        for c in range(40):
            tp[c] += np.sum((gt == c) & (pred == c) & valid)
            fp[c] += np.sum((gt != c) & (pred == c) & valid)
            fn[c] += np.sum((gt == c) & (pred != c) & valid)
    want = 100 * np.mean(tp / np.maximum(tp + fp + fn, 1e-8))
    assert meter.compute()["mIoU"] == pytest.approx(want, rel=1e-9)


def test_normals_mean_angle_is_eval_normals():
    rng = np.random.default_rng(2)
    label = rng.normal(size=(9, 10, 3))
    label /= np.linalg.norm(label, axis=2, keepdims=True)
    label[0, :4] = 0  # invalid
    pred = label + rng.normal(0, 0.4, size=label.shape)
    # the meter takes what evaluate.decode("unit") gives: the prediction normalised at the network's resolution
    # (utils/utils.py get_output), here already at the label's size
    unit = pred / np.linalg.norm(pred, axis=2, keepdims=True)
    meter = NYUD.make_meters(["normals"])["normals"]
    target = torch.from_numpy(np.where(np.linalg.norm(label, axis=2, keepdims=True) == 0, IGNORE, label))
    meter.update(torch.from_numpy(unit).permute(2, 0, 1)[None].float(), target.permute(2, 0, 1)[None].float())
    # evaluation/eval_normals.py: that prediction saved as an 8-bit PNG ((n + 1) 255 / 2, truncated) and read back,
    # both normalised, the angle over label norm != 0
    read = 2.0 * ((unit + 1.0) * 255 / 2.0).astype(np.uint8).astype(np.float32) / 255.0 - 1
    read = read / (np.linalg.norm(read, axis=2, keepdims=True) + 1e-12)
    valid = np.linalg.norm(label, axis=2) != 0
    gt = label / (np.linalg.norm(label, axis=2, keepdims=True) + 1e-12)
    angle = np.rad2deg(np.arccos(np.clip(np.sum(read * gt, axis=2), -1, 1)))[valid]
    assert meter.compute()["mean"] == pytest.approx(angle.mean(), abs=1e-4)


def test_edges_match_within_0_011_of_the_diagonal_as_seism_on_nyud(pyedgeeval):
    """A prediction 2 pixels off the ground truth of a 140 x 140 image (diagonal 198): inside NYUD's 0.011 (2.2
    pixels), outside PASCAL's 0.0075 (1.5 pixels)."""
    gt = torch.zeros(1, 140, 140)
    gt[0, 20:120, 60] = 1
    prob = torch.zeros(1, 140, 140)
    prob[0, 20:120, 62] = 1
    scores = {}
    for name in ("nyud", "pascal_context"):
        meter = datasets.get(name).make_meters(["edge"], edge_thresholds=3)["edge"]
        meter.update(prob, gt)
        scores[name] = meter.compute()["odsF"]
    assert nyud.EDGE_MAX_DIST == 0.011 and pascal_context.EDGE_MAX_DIST == 0.0075
    assert scores["nyud"] == pytest.approx(100.0) and scores["pascal_context"] < 5, scores


# --- the synthetic data ----------------------------------------------------------------------------------------

def test_synthetic_labels_agree_across_tasks(tmp_path):
    root = make_synthetic_nyud(str(tmp_path / "syn"), num_train=3, num_val=2, size=24, seed=3)
    data = NYUD.loader(root, "train", img_size=24)
    for i in range(len(data)):
        raw = data.load(i)
        depth, normals, semseg = raw["depth"], raw["normals"], raw["semseg"]
        h, w = depth.shape
        points = rays(h, w) * depth[..., None]  # back-projected, z = depth
        valid = depth != IGNORE
        # neighbours on the same plane (same normal, both with depth): their difference lies in the plane
        for dy, dx in ((0, 1), (1, 0)):
            a = (slice(0, h - dy), slice(0, w - dx))
            b = (slice(dy, h), slice(dx, w))
            same = valid[a] & valid[b] & (np.abs(normals[a] - normals[b]).sum(-1) < 1e-6)
            step = points[b] - points[a]
            off = np.abs((step * normals[a]).sum(-1))[same] / np.linalg.norm(step, axis=-1)[same]
            assert same.sum() > 0.5 * same.size and off.max() < 1e-3, off.max()
        np.testing.assert_allclose(np.linalg.norm(normals, axis=2), 1.0, rtol=1e-5)
        assert (normals[..., 2] < 0).all(), "facing the camera"
        assert ((semseg == IGNORE) | ((semseg >= 0) & (semseg < 40))).all()
        # edges are the class boundaries: every edge pixel has a neighbour of another class (or unlabelled)
        padded = np.pad(np.where(semseg == IGNORE, -1, semseg), 1, mode="edge")
        neighbours = [padded[1 + dy:1 + dy + h, 1 + dx:1 + dx + w] for dy, dx in ((0, 1), (1, 0), (0, -1), (-1, 0))]
        boundary = np.logical_or.reduce([n != padded[1:-1, 1:-1] for n in neighbours])
        assert raw["edge"].any() and (boundary[raw["edge"] == 1]).all()
        assert (semseg == IGNORE).any() and (~valid).any(), "an unlabelled patch and a depth hole"
    assert NYUD.is_synthetic(root) and not datasets.get("pascal_context").is_synthetic(root)


def test_check_data_lists_bad_nyud_files(tmp_path, capsys):
    root = make_synthetic_nyud(str(tmp_path / "syn"), num_train=2, num_val=1, size=16)
    assert check_data.main(["--dataset", "nyud", "--data", root]) == 0
    depth = os.path.join(root, "depth", "train_00001.npy")
    with open(depth, "r+b") as f:
        f.truncate(60)
    os.remove(os.path.join(root, "normals", "val_00000.npy"))
    capsys.readouterr()
    assert check_data.main(["--dataset", "nyud", "--data", root]) == 1
    out = capsys.readouterr().out
    assert f"cannot read .npy file {depth}" in out and "missing file: " + os.path.join(root, "normals") in out
    with pytest.raises(DataError, match="gt_sets/train.txt"):
        NYUD.loader(str(tmp_path / "nowhere"), "train")
