"""ase_model/evaluate.py: predictions are decoded and resized back to each image's original size as the reference
does (nearest for label maps, bilinear for probabilities and normals), and scored on full-resolution labels."""

import dataclasses
import math

import pytest
import torch

from ase_model import datasets, metrics
from ase_model import evaluate as ev
from ase_model.data import PascalContextMT
from ase_model.errors import UserError
from ase_model.evaluate import decode, metrics_table
from ase_model.synthetic import make_synthetic_pascal


def test_decode_resizes_back_to_a_non_square_size():
    logits = torch.zeros(21, 2, 3)
    logits[4, 0, :] = 1.0  # top row class 4, bottom row class 0
    labels = decode("labels", logits, (4, 9))
    assert labels.shape == (4, 9) and labels.dtype == torch.int64
    assert (labels[:2] == 4).all() and (labels[2:] == 0).all(), "nearest: each output pixel takes one input pixel"
    prob = decode("probability", torch.tensor([[[-9.0, 9.0]]]), (1, 4))
    # bilinear with half-pixel centres (cv2.INTER_LINEAR): the outer pixels copy, the inner two blend 3:1
    lo, hi = torch.sigmoid(torch.tensor(-9.0)), torch.sigmoid(torch.tensor(9.0))
    torch.testing.assert_close(prob, torch.stack([lo, 0.75 * lo + 0.25 * hi, 0.25 * lo + 0.75 * hi, hi])[None])
    normals = decode("unit", torch.randn(3, 2, 2) * 5, (3, 5))
    assert normals.shape == (3, 3, 5)
    torch.testing.assert_close(normals.norm(dim=0)[[0, -1]][:, [0, -1]], torch.ones(2, 2))  # corners: unit vectors
    depth = decode("value", torch.tensor([[[1.0, 3.0]]]), (1, 4))  # depth: as predicted, bilinear, no activation
    torch.testing.assert_close(depth, torch.tensor([[1.0, 1.5, 2.5, 3.0]]))
    with pytest.raises(ValueError, match="unknown decoding"):
        decode("semseg", logits, (4, 9))


PASCAL = datasets.get("pascal_context")


class _Constant(torch.nn.Module):
    """A model that predicts the same thing everywhere, at its input's size."""

    tasks = tuple(PASCAL.tasks)

    def forward(self, images):
        b, _, h, w = images.shape
        return {t: torch.zeros(b, PASCAL.tasks[t].channels, h, w) for t in self.tasks}

    def routing_stats(self):
        return None


def _record_updates(task: str, what) -> tuple[list, datasets.Dataset]:
    """PASCAL-Context whose task's meter records what(prediction, target) of its every update, and the records."""
    seen = []

    def recording(*args, **kwargs):
        meters = PASCAL.make_meters(*args, **kwargs)
        update = meters[task].update
        meters[task].update = lambda p, t: (seen.append(what(p, t)), update(p, t))
        return meters

    return seen, dataclasses.replace(PASCAL, make_meters=recording)


def test_evaluation_scores_full_resolution_labels(tmp_path, monkeypatch):
    root = make_synthetic_pascal(str(tmp_path / "syn"), num_train=1, num_val=5, size=20)
    val = PascalContextMT(root, "val", img_size=16, train=False)
    seen, recording = _record_updates("semseg", lambda p, t: (tuple(p.shape), tuple(t.shape)))
    results = ev.evaluate(_Constant(), val, recording, device=torch.device("cpu"), batch_size=2, workers=0, amp=False,
                          reference=PASCAL.reference, show=False, edge_ods=False)
    sizes = [tuple(val.load(i)["image"].shape[:2]) for i in range(len(val))]
    assert [s[1][1:] for s in seen] == sizes and all(p == t for p, t in seen)
    assert len(set(sizes)) > 1 and all(h != w for h, w in sizes)
    assert results["delta_m"]["synthetic"] is True
    table = metrics_table(results, PASCAL.reference)
    assert "SYNTHETIC" in table and "(synthetic data)" in table
    # p = 1/2 everywhere: the balanced BCE of every edge pixel is 0.95 log 2, of every other pixel 0.05 log 2
    edges = sum(float(val[i]["edge"].sum()) for i in range(len(val)))
    pixels = sum(h * w for h, w in sizes)
    want = (0.95 * edges + 0.05 * (pixels - edges)) * math.log(2) / pixels
    assert "odsF" not in results["edge"] and results["edge"]["loss"] == pytest.approx(want, rel=1e-5)


def test_edge_ods_f_only_when_asked(pyedgeeval, tmp_path):
    root = make_synthetic_pascal(str(tmp_path / "syn"), num_train=1, num_val=2, size=16)
    val = PascalContextMT(root, "val", img_size=16, train=False)
    kwargs = dict(device=torch.device("cpu"), batch_size=2, workers=0, amp=False, show=False, edge_thresholds=9,
                  reference=PASCAL.reference)
    with_ods = ev.evaluate(_Constant(), val, PASCAL, edge_ods=True, **kwargs)
    assert "odsF" in with_ods["edge"] and "edge" in with_ods["delta_m"]["tasks"]
    without = ev.evaluate(_Constant(), val, PASCAL, edge_ods=False, **kwargs)
    assert "odsF" not in without["edge"] and "edge" not in without["delta_m"]["tasks"]


def test_two_ranks_score_every_image_once(tmp_path, monkeypatch):
    """5 images over 2 ranks: the sampler pads rank 1 with a repeat of image 0, which rank 0 scores."""
    root = make_synthetic_pascal(str(tmp_path / "syn"), num_train=1, num_val=5, size=12)
    val = PascalContextMT(root, "val", img_size=8, train=False)
    scored, recording = _record_updates("sal", lambda p, t: t.shape)
    for rank in range(2):
        monkeypatch.setattr(ev.dist, "is_initialized", lambda: True)
        monkeypatch.setattr(ev.dist, "get_world_size", lambda: 2)
        monkeypatch.setattr(ev.dist, "get_rank", lambda rank=rank: rank)
        monkeypatch.setattr(metrics.Meter, "reduce", lambda self: None)  # each rank alone: no process group
        monkeypatch.setattr(metrics.EdgeMeter, "reduce", lambda self: self.finish())
        ev.evaluate(_Constant(), val, recording, device=torch.device("cpu"), batch_size=2, workers=0, amp=False,
                    show=False, edge_ods=False)
    assert sorted(scored) == sorted(torch.Size((1, *val.load(i)["image"].shape[:2])) for i in range(5))


def test_edges_are_scored_on_the_listed_images_only(tmp_path):
    """--edge-ids: SEISM's test_new list (a subset of val) scores the edges; the other tasks keep all of val."""
    root = make_synthetic_pascal(str(tmp_path / "syn"), num_train=1, num_val=4, size=12)
    val = PascalContextMT(root, "val", img_size=8, train=False)
    listed = tmp_path / "test_new.txt"
    listed.write_text(f"{val.ids[3]}\n{val.ids[1]}\nnot_in_val\n")
    edges, recording = _record_updates("edge", lambda p, t: t.shape)
    kwargs = dict(device=torch.device("cpu"), batch_size=3, workers=0, amp=False, show=False, edge_ods=False)
    results = ev.evaluate(_Constant(), val, recording, edge_ids=str(listed), **kwargs)
    assert edges == [torch.Size((1, *val.load(i)["image"].shape[:2])) for i in (1, 3)]
    assert results["edge"]["images"] == 2 and "images" not in results["semseg"]
    listed.write_text("not_in_val\n")
    with pytest.raises(UserError, match="none of its ids"):
        ev.evaluate(_Constant(), val, recording, edge_ids=str(listed), **kwargs)
