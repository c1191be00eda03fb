"""ase_model/data.py and ase_model/synthetic.py: every label type decoded as the PASCAL_MT layout defines it."""

import math
import os

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

from ase_model.data import (
    IGNORE,
    MEAN,
    STD,
    DataError,
    PascalContextMT,
    _augment_reference,
    collate,
    decode_human_parts,
    edges_from_context,
    normals_valid_classes,
    rotation_matrix,
    thin,
)
from ase_model.synthetic import CONTEXT_CLASSES, PERSON_CLASS, _struct_array, make_synthetic_pascal


def _write_sample(root, image_id="2008_000001", size=8):
    """One hand-made 8x8 sample with known labels in every file of the layout."""
    for sub in ("JPEGImages", "ImageSets/Context", "semseg/pascal-context", "human_parts", "normals_distill",
                "sal_distill", "pascal-context/trainval"):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    Image.fromarray(np.full((size, size, 3), 128, np.uint8)).save(f"{root}/JPEGImages/{image_id}.jpg")
    semseg = np.zeros((size, size), np.uint8)
    semseg[2:6, 2:6] = PERSON_CLASS
    semseg[0, 0] = IGNORE
    Image.fromarray(semseg).save(f"{root}/semseg/pascal-context/{image_id}.png")
    sal = np.zeros((size, size), np.uint8)
    sal[:, :4] = 128  # 128/255 > 0.5 -> salient
    sal[:, 4:] = 127  # 127/255 < 0.5 -> not
    Image.fromarray(sal).save(f"{root}/sal_distill/{image_id}.png")
    normals = np.zeros((size, size, 3), np.uint8)
    normals[..., 0], normals[..., 1], normals[..., 2] = 255, 0, 128
    Image.fromarray(normals).save(f"{root}/normals_distill/{image_id}.png")
    context = np.zeros((size, size), np.uint16)
    context[:, 5:] = 7
    scipy.io.savemat(f"{root}/pascal-context/trainval/{image_id}.mat", {"LabelMap": context})
    head, llarm = np.zeros((size, size), np.uint8), np.zeros((size, size), np.uint8)
    head[2, 2:6], llarm[5, 2:4] = 1, 1
    parts = _struct_array([dict(part_name="head", mask=head), dict(part_name="llarm", mask=llarm)],
                          ("part_name", "mask"))
    objects = _struct_array([{"class": "person", "class_ind": 15, "mask": (semseg == PERSON_CLASS).astype(np.uint8),
                              "parts": parts}], ("class", "class_ind", "mask", "parts"))
    scipy.io.savemat(f"{root}/human_parts/{image_id}.mat", {"anno": {"imname": image_id, "objects": objects}})
    with open(f"{root}/ImageSets/Context/val.txt", "w") as f:
        f.write(image_id + "\n")
    return root


def test_hand_made_sample_decodes_every_label(tmp_path):
    ds = PascalContextMT(_write_sample(str(tmp_path)), "val", img_size=8, normals_valid=[7])
    raw = ds.load(0)
    assert raw["semseg"][3, 3] == PERSON_CLASS and raw["semseg"][0, 0] == IGNORE
    parts = raw["human_parts"]
    assert (parts[2, 2:6] == 1).all() and (parts[5, 2:4] == 4).all(), "head -> 1, left lower arm -> 4"
    assert parts.sum() == 4 * 1 + 2 * 4, "every other pixel is background"
    assert (raw["sal"][:, :4] == 1).all() and (raw["sal"][:, 4:] == 0).all()
    normals = raw["normals"]
    np.testing.assert_allclose(normals[0, 6], [1.0, -1.0, 2 * 128 / 255 - 1], atol=1e-6)
    assert (normals[:, :5] == IGNORE).all(), "normals outside the valid context classes are ignored"
    edge = raw["edge"]
    assert not edge[:, :4].any() and not edge[:, 6:].any(), "edges only at the 4|5 boundary"
    assert (edge[:, 4:6].sum(1) <= 1).all() and edge.sum() >= 7, "one pixel wide, along the whole boundary"


def test_semseg_prefers_the_voc12_annotation(tmp_path):
    root = _write_sample(str(tmp_path))
    ds = PascalContextMT(root, "val", img_size=8, normals_valid=None)
    assert ds.load(0)["semseg"][3, 3] == PERSON_CLASS
    os.makedirs(f"{root}/semseg/VOC12")
    Image.fromarray(np.full((8, 8), 3, np.uint8)).save(f"{root}/semseg/VOC12/2008_000001.png")
    assert (ds.load(0)["semseg"] == 3).all()


def test_parts_without_a_person_are_ignored(tmp_path):
    path = str(tmp_path / "p.mat")
    objects = _struct_array([{"class": "dog", "class_ind": 12, "mask": np.ones((4, 4), np.uint8),
                              "parts": _struct_array([], ("part_name", "mask"))}], ("class", "class_ind", "mask",
                                                                                    "parts"))
    scipy.io.savemat(path, {"anno": {"imname": "x", "objects": objects}})
    assert (decode_human_parts(path, (4, 4)) == IGNORE).all()


def test_edges_are_the_thinned_laplacian_support():
    label = np.zeros((7, 7), np.uint8)
    label[2:5, 2:5] = 3
    # the 5-point Laplacian marks the square's border and its 4-neighbours outside: a ring two pixels thick
    # around the centre, which thinning keeps as the closed one-pixel loop around that hole
    expected = np.zeros((7, 7), np.uint8)
    expected[2, 3] = expected[3, 2] = expected[3, 4] = expected[4, 3] = 1
    np.testing.assert_array_equal(edges_from_context(label), expected)


def test_thinning_keeps_lines_and_halves_a_two_pixel_strip():
    line = np.zeros((6, 6), bool)
    line[3, :] = True
    np.testing.assert_array_equal(thin(line), line)
    strip = np.zeros((9, 6), bool)
    strip[1:8, 2:4] = True
    thinned = thin(strip)
    assert not (thinned & ~strip).any() and (thinned.sum(1) <= 1).all() and thinned.sum() >= 5, thinned.astype(int)


def test_thinning_reproduces_the_scikit_image_docstring_example():
    square = np.zeros((7, 7), bool)
    square[1:-1, 2:-2] = True
    square[0, 1] = True
    expected = np.zeros((7, 7), bool)
    expected[0, 1] = expected[1, 2] = True
    expected[2:5, 3] = True
    np.testing.assert_array_equal(thin(square), expected)


def test_normals_valid_classes_follow_the_json_files(tmp_path):
    os.makedirs(tmp_path / "json")
    (tmp_path / "json" / "context_classes.json").write_text('{"wall": 3, "chair": 9, "dog": 4, "tvmonitor": 12}')
    (tmp_path / "json" / "nyu_classes.json").write_text('["unknown", "wall", "floor", "chair"]')
    # NYUD classes that PASCAL-Context has, "unknown" never, tvmonitor always
    assert normals_valid_classes(str(tmp_path)) == [3, 9, 12]
    with pytest.warns(UserWarning, match="nyu_classes.json"):
        assert normals_valid_classes(str(tmp_path / "elsewhere")) is None


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return make_synthetic_pascal(str(tmp_path_factory.mktemp("syn")), num_train=6, num_val=3, size=32)


def test_synthetic_labels_agree_across_tasks(synthetic):
    ds = PascalContextMT(synthetic, "train", img_size=32)
    persons = 0
    for i in range(len(ds)):
        raw = ds.load(i)
        assert ((raw["semseg"] > 0) == (raw["sal"] == 1)).all(), "salient pixels are the objects"
        parts = raw["human_parts"]
        if (parts != IGNORE).any():
            persons += 1
            assert (raw["semseg"][parts > 0] == PERSON_CLASS).all(), "parts lie on the person"
        boundary = np.zeros_like(raw["edge"], dtype=bool)
        boundary[:, 1:] |= raw["semseg"][:, 1:] != raw["semseg"][:, :-1]
        support = scipy.ndimage.laplace(raw["semseg"].astype(float), mode="mirror") != 0
        assert not (raw["edge"] & ~support).any(), "edges lie on the Laplacian support"
        near_edge = scipy.ndimage.binary_dilation(raw["edge"], np.ones((3, 3)))
        # thinning may erase the boundaries of one- or two-pixel-wide slivers (as in the reference loaders)
        assert near_edge[boundary].mean() > 0.75, "class boundaries have an edge next to them"
        valid = raw["normals"][..., 0] != IGNORE
        assert np.allclose(np.linalg.norm(raw["normals"][valid], axis=-1), 1.0, atol=0.02)
        context = raw["semseg"] * 2
        assert (valid == np.isin(context, [CONTEXT_CLASSES[c] for c in ("wall", "bottle", "chair", "diningtable",
                                                                         "person", "pottedplant", "sofa",
                                                                         "tvmonitor")])).all()
    assert persons > 0, "the generator drew no person: the parts task would be untested"


def test_train_samples_are_augmented_and_reproducible(synthetic):
    ds = PascalContextMT(synthetic, "train", img_size=24, seed=3)
    a, b = ds[2], ds[2]
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k}: the same (seed, epoch, index) must give the same sample"
    assert a["image"].shape == (3, 24, 24) and a["normals"].shape == (3, 24, 24)
    assert a["semseg"].dtype == torch.int64 and a["sal"].dtype == torch.float32
    ds.set_epoch(1)
    assert any(not torch.equal(a[k], ds[2][k]) for k in ("image", "semseg")), "a new epoch re-augments"


def test_horizontal_flip_mirrors_normals_x(synthetic):
    from ase_model.data import _augment

    normals = torch.zeros(3, 4, 4)
    normals[0] = 0.6
    normals[2] = 0.8
    labels = {"semseg": torch.zeros(4, 4)}

    class FlipAlways:
        def uniform(self, lo, hi):
            return 1.0

        def integers(self, lo, hi):
            return 0

        def random(self):
            return 0.0

    _, _, flipped = _augment(torch.zeros(3, 4, 4), labels, normals, 4, FlipAlways(), (1.0, 1.0))
    assert torch.allclose(flipped[0], torch.full((4, 4), -0.6)) and torch.allclose(flipped[2], torch.full((4, 4), 0.8))


def test_missing_and_corrupt_files_are_named(synthetic, tmp_path):
    with pytest.raises(DataError, match="ImageSets/Context/train.txt"):
        PascalContextMT(str(tmp_path), "train")
    root = _write_sample(str(tmp_path / "broken"))
    os.remove(f"{root}/sal_distill/2008_000001.png")
    with pytest.raises(DataError, match="sal_distill/2008_000001.png"):
        PascalContextMT(root, "val", normals_valid=None).load(0)
    with open(f"{root}/human_parts/2008_000001.mat", "wb") as f:
        f.write(b"not a mat file")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(f"{root}/sal_distill/2008_000001.png")
    with pytest.raises(DataError, match="human_parts/2008_000001.mat"):
        PascalContextMT(root, "val", normals_valid=None).load(0)


def test_synthetic_dataset_is_reused_only_when_it_matches(tmp_path):
    root = str(tmp_path / "syn")
    make_synthetic_pascal(root, num_train=2, num_val=1, size=16)
    first = os.path.getmtime(f"{root}/JPEGImages/2008_000000.jpg")
    make_synthetic_pascal(root, num_train=2, num_val=1, size=16)
    assert os.path.getmtime(f"{root}/JPEGImages/2008_000000.jpg") == first, "the same request reuses the files"
    make_synthetic_pascal(root, num_train=3, num_val=1, size=24)
    ds = PascalContextMT(root, "train", img_size=24)
    assert len(ds) == 3 and min(ds.load(2)["image"].shape[:2]) >= 24, "another request writes a new dataset"


# --- geometry: PASCAL-like synthetic sizes, full-resolution evaluation labels, the reference's augmentation -------

def test_synthetic_images_are_pascal_like_in_geometry(synthetic):
    ds = PascalContextMT(synthetic, "train", img_size=32)
    shapes = [ds.load(i)["image"].shape[:2] for i in range(len(ds))]
    assert all(h != w and min(h, w) >= 32 for h, w in shapes), shapes
    assert len(set(shapes)) > 1, "sizes vary"


def test_eval_samples_keep_full_resolution_labels(synthetic):
    ds = PascalContextMT(synthetic, "val", img_size=24)
    raw, sample = ds.load(1), ds[1]
    h, w = raw["image"].shape[:2]
    assert sample["image"].shape == (3, 24, 24) and sample["size"].tolist() == [h, w]
    for k in ("semseg", "human_parts", "sal", "edge"):
        np.testing.assert_array_equal(sample[k].numpy(), raw[k].astype(np.float64), err_msg=k)
    assert sample["normals"].shape == (3, h, w)
    np.testing.assert_array_equal(sample["edge"].numpy(), edges_from_context(raw["semseg"] * 2),
                                  err_msg="edges thinned at full resolution, not resized")
    batch = collate([ds[i] for i in range(len(ds))])
    assert batch["image"].shape == (len(ds), 3, 24, 24)
    assert isinstance(batch["semseg"], list) and [t.shape for t in batch["semseg"]] == [
        tuple(ds[i]["size"].tolist()) for i in range(len(ds))]


class _Draws:
    """An rng whose random() returns the given values in turn: flip?, angle, scale."""

    def __init__(self, *values):
        self.values = list(values)

    def random(self):
        return self.values.pop(0)


def _labels(h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"semseg": torch.randint(0, 21, (h, w), generator=g).float(),
            "human_parts": torch.randint(0, 7, (h, w), generator=g).float(),
            "sal": torch.randint(0, 2, (h, w), generator=g).float(),
            "edge": torch.randint(0, 2, (h, w), generator=g).float()}


def test_reference_augmentation_without_flip_rotation_or_scaling_is_the_resize():
    s = 6
    h, w = 3 * s, 5 * s  # integer ratios: the nearest source pixel of (y, x) is (3 y + 1, 5 x + 2), no ties
    labels = _labels(h, w)
    normals = torch.nn.functional.normalize(torch.randn(3, h, w), dim=0)
    # random() draws: 0.9 -> no flip; 0.5 -> angle 0; 0.5 -> scale 1
    image, out, _ = _augment_reference(torch.randn(3, h, w), labels, normals, s, _Draws(0.9, 0.5, 0.5),
                                       (0.75, 1.25), 20.0)
    assert image.shape == (3, s, s)
    ys, xs = torch.arange(s) * 3 + 1, torch.arange(s) * 5 + 2
    for k, v in labels.items():
        assert torch.equal(out[k], v[ys][:, xs]), k


def test_reference_rotation_is_cv2_s_and_turns_the_normals():
    n = 8
    labels = {k: torch.zeros(n, n) for k in ("semseg", "human_parts", "sal", "edge")}
    labels["semseg"][2, 5] = 7  # source (x, y) = (5, 2)
    normals = torch.zeros(3, n, n)
    normals[0] = 1.0  # pointing along +x everywhere
    # random() draws: 0.9 -> no flip; 1.0 -> angle +max_rotation = 90 degrees; 0.5 -> scale 1
    _, out, turned = _augment_reference(torch.zeros(3, n, n), labels, normals, n, _Draws(0.9, 1.0, 0.5),
                                        (0.75, 1.25), 90.0)
    m = rotation_matrix((n / 2, n / 2), 90.0, 1.0)
    x, y = m @ np.array([5.0, 2.0, 1.0])  # cv2.getRotationMatrix2D's destination of the source pixel
    assert out["semseg"][int(round(y)), int(round(x))] == 7 and out["semseg"].sum() == 7
    # the reference: in_plane = atan2(n_x, n_y) + angle, (n_x, n_y) = (sin, cos) * |(n_x, n_y)|
    in_plane = math.atan2(1.0, 0.0) + math.radians(90.0)
    inside = turned[0] != IGNORE
    assert inside.sum() > 0.5 * n * n
    torch.testing.assert_close(turned[0][inside], torch.full_like(turned[0][inside], math.sin(in_plane)),
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(turned[1][inside], torch.full_like(turned[1][inside], math.cos(in_plane)),
                               atol=1e-5, rtol=0)


def test_reference_augmentation_pads_like_warp_affine():
    h, w = 12, 16
    labels = _labels(h, w)
    labels["semseg"] += 1  # no background in the source
    labels["human_parts"][:] = IGNORE  # an image without a person
    normals = torch.nn.functional.normalize(torch.randn(3, h, w), dim=0)
    # a 20-degree rotation at scale 0.75: the corners come from outside the canvas
    image, out, turned = _augment_reference(torch.randn(3, h, w), labels, normals, 10, _Draws(0.9, 1.0, 0.0),
                                            (0.75, 1.25), 20.0)
    corner = (0, 0)
    black = torch.from_numpy(-MEAN / STD)
    torch.testing.assert_close(image[:, 0, 0], black, msg="the image is padded black, as the raw image was")
    assert out["semseg"][corner] == 0 and out["sal"][corner] == 0 and out["edge"][corner] == 0
    assert (turned[:, 0, 0] == IGNORE).all(), "normals from outside the canvas are invalid"
    assert (out["human_parts"] == IGNORE).all(), "an image without parts stays all IGNORE"
    valid = turned[0] != IGNORE
    torch.testing.assert_close(turned[:, valid].norm(dim=0), torch.ones(int(valid.sum())))


def test_train_samples_use_the_chosen_augmentation(synthetic):
    for augment in ("reference", "crop"):
        sample = PascalContextMT(synthetic, "train", img_size=20, augment=augment)[0]
        assert sample["image"].shape == (3, 20, 20) and sample["semseg"].shape == (20, 20)
    with pytest.raises(ValueError, match="augment"):
        PascalContextMT(synthetic, "train", augment="rotate")
