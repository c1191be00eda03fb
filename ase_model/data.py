"""PASCAL-Context multi-task data (the PASCAL_MT layout of the multi-task dense-prediction code bases).

Layout under ``root``::

    JPEGImages/{id}.jpg                      RGB image
    ImageSets/Context/{train,val}.txt        image ids, one per line
    semseg/VOC12/{id}.png                    21-class labels, 255 = ignore; else semseg/pascal-context/{id}.png
    human_parts/{id}.mat                     PASCAL-Part annotation ('anno' struct: objects -> parts)
    normals_distill/{id}.png                 RGB-encoded surface normals, n = 2 p / 255 - 1
    sal_distill/{id}.png                     saliency, foreground where p / 255 > 0.5
    pascal-context/trainval/{id}.mat         context label map ('LabelMap'): edges are its thinned Laplacian's support
    json/{nyu,context}_classes.json          the context classes whose distilled normals are valid

Every sample is a dict of tensors: ``image (3, S, S)`` normalised float32, ``semseg`` int64, ``human_parts``
int64, ``sal`` float32 in {0, 1, 255}, ``normals (3, ...)`` float32 (255 where invalid), ``edge`` float32 in
{0, 1, 255}, ``index`` and ``size`` (the image's original (H, W)). 255 marks pixels no loss or metric counts.

Geometry, as the reference multi-task code (Multi-Task-Learning-PyTorch utils/common_config.py, the same in
M3ViT): training samples are augmented and resized to S x S with their labels (`augment`: "reference" is random
horizontal flip, then ScaleNRotate with scale 0.75-1.25 and rotation +-20 degrees about the image centre on the
image's own canvas, then a resize to S x S; "crop" is an aspect-preserving random scale and an S x S crop).
Evaluation samples hold the image resized to S x S and every label at the ORIGINAL resolution (H, W): the
predictions are resized back to (H, W) and scored there, as the reference does (evaluation/evaluate_utils.py,
save_model_predictions). Images differ in size: batch them with `collate`, which keeps such labels as lists.
"""

import json
import math
import os
import warnings

import numpy as np
import scipy.io
import scipy.ndimage
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

TASKS = ("semseg", "human_parts", "sal", "normals", "edge")
NUM_OUTPUTS = {"semseg": 21, "human_parts": 7, "sal": 1, "normals": 3, "edge": 1}
IGNORE = 255
PERSON_CLASS_IND = 15  # the VOC / PASCAL-Part class index of "person"
# PASCAL-Part person parts -> 6 coarse parts (0 is background): head, torso, upper arm, lower arm, upper leg,
# lower leg, as the multi-task PASCAL-Context benchmark defines them.
PART_MAP = {
    "head": 1, "hair": 1, "lear": 1, "rear": 1, "lebrow": 1, "rebrow": 1, "leye": 1, "reye": 1, "nose": 1,
    "mouth": 1, "torso": 2, "neck": 2, "luarm": 3, "ruarm": 3, "llarm": 4, "rlarm": 4, "lhand": 4, "rhand": 4,
    "luleg": 5, "ruleg": 5, "llleg": 6, "rlleg": 6, "lfoot": 6, "rfoot": 6,
}
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


class DataError(RuntimeError):
    """A dataset file is missing or unreadable; the message names it."""


def read_ids(ids_file: str, root: str, layout: str) -> list[str]:
    """The image ids ids_file lists, one a line; DataError where it is missing (root is then not a `layout` root)
    or lists none."""
    try:
        with open(ids_file) as f:
            ids = [line.strip() for line in f if line.strip()]
    except FileNotFoundError as e:
        raise DataError(f"missing file: {ids_file} (is {root} a {layout} dataset root?)") from e
    if not ids:
        raise DataError(f"{ids_file} lists no images")
    return ids


def same_shape(arrays: dict, shape: tuple, image_id: str) -> dict:
    """arrays (name -> (H, W, ...) array) when every one is of the image's (H, W) shape; DataError naming the first
    that is not."""
    for name, value in arrays.items():
        if value.shape[:2] != shape:
            raise DataError(f"image {image_id}: {name} has shape {value.shape[:2]}, the image {shape}")
    return arrays


def _open(path: str) -> Image.Image:
    try:
        with Image.open(path) as img:
            img.load()
            return img
    except FileNotFoundError as e:
        raise DataError(f"missing file: {path}") from e
    except Exception as e:  # PIL raises several types for a truncated or foreign file
        raise DataError(f"cannot read image {path}: {e}") from e


def _loadmat(path: str) -> dict:
    try:
        return scipy.io.loadmat(path)
    except FileNotFoundError as e:
        raise DataError(f"missing file: {path}") from e
    except Exception as e:
        raise DataError(f"cannot read .mat file {path}: {e}") from e


def probe(path: str) -> str | None:
    """What is wrong with an existing data file, seen from its header and its length without decoding it (None
    when nothing is): an image's header and its end marker (PNG IEND, JPEG EOI, in the last KiB), a .npy header
    and the bytes it promises, a .mat header and the lengths of its top-level elements. A file damaged inside its
    data is found only when decoded (python -m ase_model.check_data)."""
    ext = os.path.splitext(path)[1].lower()
    size = os.path.getsize(path)
    try:
        with open(path, "rb") as f:
            if ext == ".npy":
                version = np.lib.format.read_magic(f)
                read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
                if version not in read:  # 3.0 (utf-8 field names): not probed, np.load will say
                    return None
                shape, _, dtype = read[version](f)
                need = f.tell() + math.prod(shape) * dtype.itemsize
                if not dtype.hasobject and size < need:
                    return f"truncated: {size} bytes, its header promises {need}"
            elif ext == ".mat":
                scipy.io.whosmat(f)
                f.seek(126)
                order = {b"IM": "<", b"MI": ">"}.get(f.read(2))  # MAT 5's endian indicator; none in MAT 4
                offset = end = 128
                while order and offset + 8 <= size:  # MAT 5 top-level elements: a (type, nbytes) tag, the data
                    f.seek(offset)
                    kind, nbytes = (int(v) for v in np.frombuffer(f.read(8), f"{order}u4"))
                    end = offset + 8 + nbytes
                    offset = end + (0 if kind == 15 else -nbytes % 8)  # padded to 8 bytes, but miCOMPRESSED (15)
                if end > size:
                    return f"truncated: {size} bytes, its elements need {end}"
            elif ext in Image.registered_extensions():
                with Image.open(path) as img:
                    img.size  # noqa: B018 (parsed with the header)
                    end = {"PNG": b"IEND", "JPEG": b"\xff\xd9"}.get(img.format)
                f.seek(max(0, size - 1024))
                if end and end not in f.read():
                    return f"truncated: no {img.format} end marker"
    except Exception as e:  # numpy, scipy and PIL raise several types for a truncated or foreign header
        return f"unreadable header: {e}"
    return None


def decode_human_parts(path: str, shape: tuple[int, int]) -> np.ndarray:
    """Parts label map (H, W) uint8 from a PASCAL-Part .mat: every person's parts mapped by PART_MAP, 0 elsewhere.
    An image without an annotated person is all IGNORE: nothing says where its parts would be."""
    label = np.zeros(shape, dtype=np.uint8)
    found = False
    anno = _loadmat(path).get("anno")
    if anno is None:
        raise DataError(f"{path}: no 'anno' struct")
    objects = anno[0, 0]["objects"]
    for obj in objects.reshape(-1):
        # the class index, as the reference loaders test it (the class name is a convenience of some files)
        if int(np.asarray(obj["class_ind"]).reshape(-1)[0]) != PERSON_CLASS_IND:
            continue
        parts = obj["parts"]
        for part in parts.reshape(-1):
            name = str(np.asarray(part["part_name"]).reshape(-1)[0])
            mask = np.asarray(part["mask"]).astype(bool)
            if mask.shape != shape:
                raise DataError(f"{path}: part mask {mask.shape} does not match the image {shape}")
            label[mask] = PART_MAP.get(name, 0)
            found = True
    return label if found else np.full(shape, IGNORE, dtype=np.uint8)


def edges_from_context(label_map: np.ndarray) -> np.ndarray:
    """Edge map (H, W) uint8 of the reference loaders: the support of the context label map's 5-point Laplacian
    (cv2.Laplacian, ksize 1, border reflect-101 = scipy's "mirror"), which marks both sides of every class
    boundary, thinned to one pixel (skimage.morphology.thin)."""
    laplacian = scipy.ndimage.laplace(label_map.astype(np.float64), mode="mirror")
    return thin(laplacian != 0).astype(np.uint8)


def _thin_luts() -> tuple[np.ndarray, np.ndarray]:
    """Deletion tables of the two sub-iterations of Guo & Hall's thinning (1989, conditions G1, G2, G3 / G3'),
    indexed by the 8-neighbourhood code of `thin` (bit i = neighbour i counter-clockwise from east)."""
    first, second = np.zeros(256, bool), np.zeros(256, bool)
    for n in range(256):
        b = [bool(n >> i & 1) for i in range(8)]
        g1 = sum(not b[i] and (b[i + 1] or b[(i + 2) % 8]) for i in (0, 2, 4, 6)) == 1
        n1 = sum(b[k - 1] or b[k] for k in (1, 3, 5, 7))
        n2 = sum(b[k] or b[(k + 1) % 8] for k in (1, 3, 5, 7))
        g12 = g1 and min(n1, n2) in (2, 3)
        first[n] = g12 and not ((b[1] or b[2] or not b[7]) and b[0])
        second[n] = g12 and not ((b[5] or b[6] or not b[3]) and b[4])
    return first, second


_THIN_LUTS = _thin_luts()
# neighbour weights: east 1, north-east 2, north 4, ... south-east 128
_THIN_CODE = np.array([[8, 4, 2], [16, 0, 1], [32, 64, 128]], dtype=np.uint8)


def thin(mask: np.ndarray) -> np.ndarray:
    """Morphological thinning of a binary mask (H, W) to one-pixel-wide lines, the algorithm of
    skimage.morphology.thin (Guo & Hall), without scikit-image."""
    skel = np.asarray(mask, dtype=bool).astype(np.uint8)
    count = -1
    while count != skel.sum():
        count = skel.sum()
        for lut in _THIN_LUTS:
            code = scipy.ndimage.correlate(skel, _THIN_CODE, mode="constant")
            skel[lut[code]] = 0
    return skel.astype(bool)


def normals_valid_classes(root: str) -> list[int] | None:
    """The context class ids on which the distilled normals are valid, as the reference loaders define them from
    root/json/{nyu,context}_classes.json: the NYUD classes that PASCAL-Context also has ("unknown" excluded),
    plus tvmonitor. None (every pixel valid, with a warning) when the files are absent."""
    nyu_path, context_path = (os.path.join(root, "json", f"{n}_classes.json") for n in ("nyu", "context"))
    if not (os.path.exists(nyu_path) and os.path.exists(context_path)):
        warnings.warn(f"{root}/json/nyu_classes.json or context_classes.json is missing: the normals of every "
                      "pixel count, not only those of the NYUD classes", stacklevel=2)
        return None
    try:
        with open(nyu_path) as f:
            nyu = json.load(f)
        with open(context_path) as f:
            context = json.load(f)
        valid = [context[name] for name in nyu if name in context and name != "unknown"]
        return valid + [context["tvmonitor"]]
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"cannot read the normals classes from {nyu_path} and {context_path}: {e!r}") from e


AUGMENTATIONS = ("reference", "crop")


class PascalContextMT(Dataset):
    """The five PASCAL-Context tasks of one split: augmented and resized to ``img_size`` (train), or the image
    resized to ``img_size`` with full-resolution labels (eval).

    normals_valid: context classes whose normals count ("auto": from root/json, see `normals_valid_classes`;
    None: all); other pixels get IGNORE, as the distilled normals are only meaningful on those surfaces.
    augment: "reference" (flip, scale 0.75-1.25 and rotation +-20 degrees, resize) or "crop" (random scale in
    scale_range times img_size / shorter side, random img_size crop padded with IGNORE, flip).
    """

    def __init__(self, root: str, split: str = "train", img_size: int = 224, train: bool | None = None,
                 seed: int = 0, normals_valid="auto", scale_range=(0.75, 1.25), augment: str = "reference",
                 max_rotation: float = 20.0):
        if augment not in AUGMENTATIONS:
            raise ValueError(f"augment must be one of {AUGMENTATIONS}, got {augment!r}")
        self.root, self.split, self.img_size = root, split, img_size
        self.train = split == "train" if train is None else train
        self.seed, self.epoch, self.scale_range = seed, 0, scale_range
        self.augment, self.max_rotation = augment, max_rotation
        self.ids = read_ids(os.path.join(root, "ImageSets", "Context", f"{split}.txt"), root, "PASCAL_MT")
        if isinstance(normals_valid, str) and normals_valid == "auto":
            normals_valid = normals_valid_classes(root)
        self.normals_valid = None if normals_valid is None else np.asarray(sorted(normals_valid))

    def set_epoch(self, epoch: int) -> None:
        """Augmentation is a function of (seed, epoch, index): reproducible across workers and resumes."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.ids)

    def _path(self, *parts: str) -> str:
        return os.path.join(self.root, *parts)

    def files(self, index: int) -> list[str]:
        """The files `load(index)` reads (semseg: the VOC12 annotation where it exists, else pascal-context's)."""
        i = self.ids[index]
        # the reference loaders take the VOC 2012 annotation where an image has one (its masks are finer)
        semseg = self._path("semseg", "VOC12", f"{i}.png")
        if not os.path.exists(semseg):
            semseg = self._path("semseg", "pascal-context", f"{i}.png")
        return [self._path("JPEGImages", f"{i}.jpg"), semseg, self._path("pascal-context", "trainval", f"{i}.mat"),
                self._path("normals_distill", f"{i}.png"), self._path("sal_distill", f"{i}.png"),
                self._path("human_parts", f"{i}.mat")]

    def load(self, index: int) -> dict[str, np.ndarray]:
        """The decoded labels of one image at full resolution (numpy, before any resize)."""
        i = self.ids[index]
        image_path, semseg_path, context_path, normals_path, sal_path, parts_path = self.files(index)
        image = np.asarray(_open(image_path).convert("RGB"))
        shape = image.shape[:2]
        semseg = np.asarray(_open(semseg_path))
        context = _loadmat(context_path).get("LabelMap")
        if context is None:
            raise DataError(f"{context_path}: no 'LabelMap'")
        normals = np.asarray(_open(normals_path).convert("RGB")).astype(np.float32)
        normals = 2.0 * normals / 255.0 - 1.0
        if self.normals_valid is not None:
            normals[~np.isin(context, self.normals_valid)] = IGNORE
        sal = (np.asarray(_open(sal_path).convert("L")) / 255.0 > 0.5).astype(np.uint8)
        parts = decode_human_parts(parts_path, shape)
        out = dict(image=image, semseg=semseg, human_parts=parts, sal=sal, normals=normals,
                   edge=edges_from_context(context))
        return same_shape(out, shape, i)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        raw = self.load(index)
        image = torch.from_numpy((raw["image"].astype(np.float32) / 255.0 - MEAN) / STD).permute(2, 0, 1)
        labels = {k: torch.from_numpy(np.array(raw[k], dtype=np.float32)) for k in TASKS if k != "normals"}
        normals = torch.from_numpy(raw["normals"]).permute(2, 0, 1)
        size = torch.tensor(image.shape[1:])
        if self.train:
            rng = np.random.default_rng((self.seed, self.epoch, index))
            if self.augment == "reference":
                image, labels, normals = _augment_reference(image, labels, normals, self.img_size, rng,
                                                            self.scale_range, self.max_rotation)
            else:
                image, labels, normals = _augment(image, labels, normals, self.img_size, rng, self.scale_range)
        else:
            # the reference's test transform squashes the image to the network's input size (FixedResize, cubic);
            # labels stay at full resolution for the metrics
            image = F.interpolate(image[None], size=(self.img_size, self.img_size), mode="bicubic",
                                  align_corners=False)[0]
        sample = {"image": image, "normals": normals, "index": torch.tensor(index), "size": size}
        for k, v in labels.items():
            sample[k] = v.long() if k in ("semseg", "human_parts") else v
        return sample


def _resize(image, labels, normals, size):
    """Bilinear for the image and the normals (renormalised), nearest for label maps; invalid normals stay
    invalid."""
    image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
    labels = {k: F.interpolate(v[None, None], size=size, mode="nearest")[0, 0] for k, v in labels.items()}
    invalid = F.interpolate((normals[:1] == IGNORE).float()[None], size=size, mode="nearest")[0, 0] > 0
    normals = F.interpolate(torch.where(normals == IGNORE, 0.0, normals)[None], size=size, mode="bilinear",
                            align_corners=False)[0]
    normals = normals / normals.norm(dim=0, keepdim=True).clamp_min(1e-6)
    normals[:, invalid] = IGNORE
    return image, labels, normals


def _hflip(image, labels, normals):
    """Everything mirrored left to right; the normals' x turns with it (invalid normals stay IGNORE)."""
    image, normals = image.flip(-1), normals.flip(-1).clone()
    labels = {k: v.flip(-1) for k, v in labels.items()}
    valid = normals[0] != IGNORE
    normals[0, valid] = -normals[0, valid]
    return image, labels, normals


def _augment(image, labels, normals, size, rng, scale_range):
    """Random scale, random crop (padded with IGNORE), horizontal flip (which mirrors the normals' x)."""
    h, w = image.shape[1:]
    scale = rng.uniform(*scale_range) * size / min(h, w)
    image, labels, normals = _resize(image, labels, normals, (max(1, round(h * scale)), max(1, round(w * scale))))
    h, w = image.shape[1:]
    ph, pw = max(size - h, 0), max(size - w, 0)
    if ph or pw:
        image = F.pad(image, (0, pw, 0, ph), value=0.0)
        labels = {k: F.pad(v, (0, pw, 0, ph), value=IGNORE) for k, v in labels.items()}
        normals = F.pad(normals, (0, pw, 0, ph), value=IGNORE)
        h, w = image.shape[1:]
    top, left = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
    crop = (slice(top, top + size), slice(left, left + size))
    image, normals = image[:, crop[0], crop[1]], normals[:, crop[0], crop[1]]
    labels = {k: v[crop] for k, v in labels.items()}
    if rng.random() < 0.5:
        image, labels, normals = _hflip(image, labels, normals)
    return image.contiguous(), {k: v.contiguous() for k, v in labels.items()}, normals.contiguous()


def collate(samples: list[dict]) -> dict:
    """Batch samples: entries of equal shape are stacked, others (full-resolution evaluation labels of images of
    different sizes) are kept as a list, one tensor per sample."""
    out = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        out[key] = torch.stack(values) if all(v.shape == values[0].shape for v in values) else values
    return out


def rotation_matrix(center: tuple[float, float], angle: float, scale: float) -> np.ndarray:
    """The 2 x 3 map of cv2.getRotationMatrix2D: rotate by angle degrees (counter-clockwise on screen) and scale
    about center (x, y); destination = M @ (x, y, 1)."""
    a, b = scale * math.cos(math.radians(angle)), scale * math.sin(math.radians(angle))
    cx, cy = center
    return np.array([[a, b, (1 - a) * cx - b * cy], [-b, a, b * cx + (1 - a) * cy]])


def _warp(x: torch.Tensor, src_xy: torch.Tensor, mode: str) -> torch.Tensor:
    """Sample x (C, h, w) at source pixel coordinates src_xy (S, S, 2) (pixel centres at integers); 0 outside."""
    h, w = x.shape[1:]
    grid = torch.stack([(2 * src_xy[..., 0] + 1) / w - 1, (2 * src_xy[..., 1] + 1) / h - 1], dim=-1)
    return F.grid_sample(x[None], grid[None].to(x.dtype), mode=mode, padding_mode="zeros", align_corners=False)[0]


def _augment_reference(image, labels, normals, size, rng, scale_range, max_rotation):
    """The reference's training geometry (Multi-Task-Learning-PyTorch data/custom_transforms.py): horizontal flip
    with probability 1/2 (mirroring the normals' x), ScaleNRotate (scale uniform in scale_range, angle uniform in
    +-max_rotation, about (w/2, h/2), on the image's own h x w canvas, zeros outside it, the normals' in-plane
    direction rotated by the angle), then a resize of everything to size x size (FixedResize). The warp and the
    resize are one resampling here: cubic for the image and the normals (renormalised), nearest for the labels.
    As cv2.warpAffine does, pixels that come from outside the canvas are 0: black in the image, background in the
    labels; normals there are invalid, and a parts map left without any part becomes all IGNORE (AddIgnoreRegions)."""
    h, w = image.shape[1:]
    if rng.random() < 0.5:
        image, labels, normals = _hflip(image, labels, normals)
    lo, hi = scale_range
    angle = 2 * max_rotation * rng.random() - max_rotation
    scale = (hi - lo) * rng.random() - (hi - lo) / 2 + (hi + lo) / 2
    valid = normals[0] != IGNORE
    # output pixel (x, y) of the size x size result -> the warped canvas (resize, half-pixel centres) -> source
    axis = np.arange(size, dtype=np.float64) + 0.5
    canvas = np.stack(np.meshgrid(axis * w / size - 0.5, axis * h / size - 0.5, indexing="xy"), axis=-1)
    m = rotation_matrix((w / 2, h / 2), angle, scale)
    src = torch.from_numpy((canvas - m[:, 2]) @ np.linalg.inv(m[:, :2]).T)  # (size, size, 2): (x, y) in the source
    black = torch.from_numpy(-MEAN / STD)[:, None, None]  # warpAffine pads the raw image with 0: black
    image = _warp(image - black, src, "bicubic") + black
    inside = _warp(valid[None].float(), src, "nearest")[0] > 0
    normals = _warp(torch.where(valid[None], normals, 0.0), src, "bicubic")
    # the reference turns the in-plane direction atan2(n_x, n_y) by the angle: (n_x, n_y) <- (n_x cos + n_y sin,
    # n_y cos - n_x sin), a linear map, so it commutes with the resampling and is applied to the small result
    c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    normals = torch.stack([normals[0] * c + normals[1] * s, normals[1] * c - normals[0] * s, normals[2]])
    normals = normals / normals.norm(dim=0, keepdim=True).clamp_min(1e-6)
    normals[:, ~inside] = IGNORE
    out = {}
    for k, v in labels.items():
        out[k] = _warp(v[None], src, "nearest")[0]
        if k == "human_parts" and ((v == IGNORE).all() or (out[k] == 0).all()):
            out[k] = torch.full_like(out[k], IGNORE)
    return image.contiguous(), out, normals.contiguous()
