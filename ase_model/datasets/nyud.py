"""NYUD-v2, the four tasks of the multi-task benchmark as Multi-Task-Learning-PyTorch reads them (MTL below:
SimonVandenhende/Multi-Task-Learning-PyTorch at ed3d9ac).

Layout under ``root`` (NYUD_MT, MTL data/nyud.py lines 65-124)::

    images/{id}.jpg          RGB image
    segmentation/{id}.png    0 = unlabelled, 1..40 the NYUD-40 classes
    depth/{id}.npy           (H, W) float depth in metres, 0 where invalid
    normals/{id}.npy         (H, W, 3) float surface normals, the zero vector where invalid
    edge/{id}.npy            (H, W) float edge map in {0, 1}
    gt_sets/{train,val}.txt  image ids, one per line

Decoding (MTL data/nyud.py lines 188-209 and data/custom_transforms.py AddIgnoreRegions, lines 251-266): semseg
label v becomes v - 1 and 0 becomes 255 (ignored), so the 40 classes are 0..39; depth 0 becomes 255 (ignored);
normals of length 0 become 255 (ignored); edges are read as they are.

Augmentation (MTL utils/common_config.py lines 158-164, custom_transforms.py ScaleNRotate lines 34-80): horizontal
flip with probability 1/2, a scale drawn from {1.0, 1.2, 1.5} about the image centre with no rotation (a zoom: no
pixel comes from outside the image), the depth divided by the scale (what the zoomed camera would see), then a
resize to img_size x img_size. Interpolation as MTL's FLAGVALS (utils/config.py lines 26-88): cubic for the image
and the normals (renormalised here), nearest for semseg, edges and depth. The warp and the resize are one
resampling here, as for PASCAL (ase_model/data.py).

Evaluation: the image is resized to img_size x img_size, every label kept at the original resolution; the
predictions are resized back there (depth bilinearly: INFER_FLAGVALS, utils/config.py line 88) and scored. MTL
trains and tests at 480 x 640 (utils/config.py lines 151-155); a ViT here takes a square img_size.
"""

import functools
import os

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset as TorchDataset

from ..data import IGNORE, MEAN, STD, DataError, _hflip, _open, _warp, read_ids, same_shape
from ..losses import EDGE_POS_WEIGHT, balanced_bce, cross_entropy, depth_l1, normals_l1
from ..metrics import ConfusionMeter, DepthMeter, EdgeMeter, NormalsMeter
from . import Dataset, Task
from .nyud_synthetic import is_synthetic, make_synthetic_nyud

NUM_CLASSES = 40  # MTL utils/config.py line 36 (NYUD semseg), evaluation/eval_semseg.py lines 87-90 (no background)
SCALES = (1.0, 1.2, 1.5)  # MTL utils/common_config.py line 163: ScaleNRotate(rots=[0], scales=[1.0, 1.2, 1.5])
# SEISM's maxDist for NYUD (0.011 of the image diagonal, against PASCAL's 0.0075)
EDGE_MAX_DIST = 0.011


def _load_npy(path: str) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except FileNotFoundError as e:
        raise DataError(f"missing file: {path}") from e
    except Exception as e:  # a truncated or foreign file: ValueError, EOFError, OSError, ...
        raise DataError(f"cannot read .npy file {path}: {e}") from e


class NYUDMT(TorchDataset):
    """The four NYUD-v2 tasks of one split: augmented and resized to ``img_size`` (train), or the image resized to
    ``img_size`` with full-resolution labels (eval). Samples: ``image (3, S, S)`` float32, ``semseg`` int64,
    ``depth`` float32 (metres, IGNORE where invalid), ``normals (3, ...)`` float32 (IGNORE where invalid), ``edge``
    float32 in {0, 1}, ``index``, ``size`` (the original (H, W))."""

    def __init__(self, root: str, split: str = "train", img_size: int = 224, train: bool | None = None,
                 seed: int = 0, augment: str = "reference"):
        if augment != "reference":
            raise ValueError(f"augment must be 'reference' for NYUD, got {augment!r}")
        self.root, self.split, self.img_size = root, split, img_size
        self.train = split == "train" if train is None else train
        self.seed, self.epoch = seed, 0
        self.ids = read_ids(os.path.join(root, "gt_sets", f"{split}.txt"), root, "NYUD_MT")

    def set_epoch(self, epoch: int) -> None:
        """Augmentation is a function of (seed, epoch, index): reproducible across workers and resumes."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.ids)

    def files(self, index: int) -> list[str]:
        """The files `load(index)` reads: image, segmentation, depth, normals, edge."""
        i = self.ids[index]
        return [os.path.join(self.root, "images", f"{i}.jpg"), os.path.join(self.root, "segmentation", f"{i}.png"),
                *(os.path.join(self.root, sub, f"{i}.npy") for sub in ("depth", "normals", "edge"))]

    def load(self, index: int) -> dict[str, np.ndarray]:
        """The decoded labels of one image at full resolution (numpy, before any resize)."""
        image_path, semseg_path, depth_path, normals_path, edge_path = self.files(index)
        image = np.asarray(_open(image_path).convert("RGB"))
        shape = image.shape[:2]
        semseg = np.asarray(_open(semseg_path)).astype(np.int64)
        semseg = np.where(semseg == 0, IGNORE, semseg - 1)
        depth = _load_npy(depth_path).astype(np.float32)
        depth = np.where(depth == 0, np.float32(IGNORE), depth)
        normals = _load_npy(normals_path).astype(np.float32)
        if normals.ndim != 3 or normals.shape[2] != 3:
            raise DataError(f"{normals_path}: expected an (H, W, 3) array, got shape {normals.shape}")
        normals[np.linalg.norm(normals, axis=2) == 0] = IGNORE
        edge = _load_npy(edge_path).astype(np.float32)
        return same_shape(dict(image=image, semseg=semseg, depth=depth, normals=normals, edge=edge), shape,
                          self.ids[index])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        raw = self.load(index)
        image = torch.from_numpy((raw["image"].astype(np.float32) / 255.0 - MEAN) / STD).permute(2, 0, 1)
        labels = {k: torch.from_numpy(raw[k].astype(np.float32)) for k in ("semseg", "depth", "edge")}
        normals = torch.from_numpy(raw["normals"]).permute(2, 0, 1)
        size = torch.tensor(image.shape[1:])
        if self.train:
            rng = np.random.default_rng((self.seed, self.epoch, index))
            image, labels, normals = _augment_reference(image, labels, normals, self.img_size, rng)
        else:
            image = F.interpolate(image[None], size=(self.img_size, self.img_size), mode="bicubic",
                                  align_corners=False)[0]
        return {"image": image, "semseg": labels["semseg"].long(), "depth": labels["depth"], "edge": labels["edge"],
                "normals": normals, "index": torch.tensor(index), "size": size}


def _augment_reference(image, labels, normals, size, rng):
    """Flip (p = 1/2), zoom by a scale of SCALES about the centre, depth / scale, resize to size x size (see the
    module's docstring). Output pixel centres are mapped back to the source: x = c + (x' - c) / scale."""
    h, w = image.shape[1:]
    if rng.random() < 0.5:
        image, labels, normals = _hflip(image, labels, normals)
    scale = SCALES[int(rng.integers(len(SCALES)))]
    axis = np.arange(size, dtype=np.float64) + 0.5
    canvas = np.stack(np.meshgrid(axis * w / size - 0.5, axis * h / size - 0.5, indexing="xy"), axis=-1)
    centre = np.array([w / 2, h / 2])
    src = torch.from_numpy((canvas - centre) / scale + centre)  # (size, size, 2): (x, y) in the source
    black = torch.from_numpy(-MEAN / STD)[:, None, None]
    image = _warp(image - black, src, "bicubic") + black
    valid = normals[0] != IGNORE
    inside = _warp(valid[None].float(), src, "nearest")[0] > 0
    normals = _warp(torch.where(valid[None], normals, 0.0), src, "bicubic")
    normals = normals / normals.norm(dim=0, keepdim=True).clamp_min(1e-6)
    normals[:, ~inside] = IGNORE
    out = {k: _warp(v[None], src, "nearest")[0] for k, v in labels.items()}
    depth = out["depth"]
    out["depth"] = torch.where((depth == IGNORE) | (depth == 0), IGNORE, depth / scale)
    return image.contiguous(), out, normals.contiguous()


def make_meters(tasks, device="cpu", *, edge_ods: bool = True, edge_thresholds: int = 99, eval_workers: int = 0,
                edge_matcher: str = "fast"):
    """semseg mIoU over the 40 classes, depth RMSE and log-RMSE, the normals angle, the edge odsF at maxDist 0.011
    (see ase_model/metrics.py)."""
    meters = {
        "semseg": lambda: ConfusionMeter(NUM_CLASSES, device),
        "depth": lambda: DepthMeter(device),
        "normals": lambda: NormalsMeter(device),
        "edge": lambda: EdgeMeter(device, thresholds=edge_thresholds, max_dist=EDGE_MAX_DIST, ods=edge_ods,
                                  workers=eval_workers, matcher=edge_matcher),
    }
    return {t: meters[t]() for t in tasks}


# losses and weights: MTL configs/nyud/hrnet18/mti_net+edges_normals.yml lines 42-46 (semseg 1.0, depth 1.0,
# normals 10, edge 50.0; edge_w 0.95 at line 37); the losses of utils/common_config.py get_loss lines 277-295
TASKS = {
    "semseg": Task(NUM_CLASSES, cross_entropy, 1.0, "labels", "mIoU", False),
    "depth": Task(1, depth_l1, 1.0, "value", "rmse", True),
    "normals": Task(3, normals_l1, 10.0, "unit", "mean", True),
    "edge": Task(1, functools.partial(balanced_bce, pos_weight=EDGE_POS_WEIGHT), 50.0, "probability", "odsF", False,
                 boundary=True),
}

DATASET = Dataset(
    name="nyud",
    tasks=TASKS,
    loader=NYUDMT,
    make_meters=make_meters,
    reference=None,  # the ASE paper has no NYUD row; delta_m needs the user's single-task runs (--reference)
    make_synthetic=make_synthetic_nyud,
    is_synthetic=is_synthetic,
)
