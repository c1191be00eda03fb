"""A small synthetic dataset in exactly the PASCAL_MT layout that :mod:`ase_model.data` reads.

Each image holds one to three coloured shapes on a textured background; one of them may be a "person" built
from head, torso, arm and leg parts. All five labels are derived from the same drawing, so they agree across
tasks: the shape's class is its semseg label and (with an offset) its context label, its pixels are salient, it
has one surface normal, its outline is an edge, and a person's parts are written to a PASCAL-Part .mat file.
The colours depend on the class, so a model can learn the tasks. As in the real dataset, normals count only on
some context classes (json/nyu_classes.json: the background "wall" and indoor objects; not animals or vehicles).
"""

import json
import os

import numpy as np
import scipy.io
from PIL import Image

VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
               "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor")
PERSON_CLASS = VOC_CLASSES.index("person") + 1  # 15
# context id of every class: the background is a "wall" (0), VOC class c is 2 c
CONTEXT_CLASSES = {"wall": 0, **{name: 2 * (i + 1) for i, name in enumerate(VOC_CLASSES)}}
# "floor" is not a context class and "unknown" never counts: the loader must take the intersection
NYU_CLASSES = ["unknown", "wall", "floor", "bottle", "chair", "diningtable", "person", "pottedplant", "sofa"]
_PALETTE = np.random.default_rng(12345).integers(40, 255, size=(21, 3))


def _ellipse(h, w, cy, cx, ry, rx):
    yy, xx = np.mgrid[:h, :w]
    return ((yy - cy) / max(ry, 1)) ** 2 + ((xx - cx) / max(rx, 1)) ** 2 <= 1.0


def _rect(h, w, y0, x0, y1, x1):
    mask = np.zeros((h, w), dtype=bool)
    mask[max(y0, 0):max(y1, 0), max(x0, 0):max(x1, 0)] = True
    return mask


def _person_parts(h, w, rng):
    """Masks of a stick-figure person's parts, keyed by PASCAL-Part names."""
    s = rng.uniform(0.45, 0.8) * h
    cy, cx = rng.uniform(0.45, 0.55) * h, rng.uniform(0.3, 0.7) * w
    top, u = int(cy - s / 2), s / 8
    mid = int(cx)
    return {
        "head": _ellipse(h, w, top + u, cx, u, u * 0.8),
        "torso": _rect(h, w, int(top + 2 * u), int(mid - u), int(top + 4.5 * u), int(mid + u)),
        "luarm": _rect(h, w, int(top + 2 * u), int(mid - 1.8 * u), int(top + 3.3 * u), int(mid - u)),
        "llarm": _rect(h, w, int(top + 3.3 * u), int(mid - 1.8 * u), int(top + 4.6 * u), int(mid - u)),
        "ruarm": _rect(h, w, int(top + 2 * u), int(mid + u), int(top + 3.3 * u), int(mid + 1.8 * u)),
        "rlarm": _rect(h, w, int(top + 3.3 * u), int(mid + u), int(top + 4.6 * u), int(mid + 1.8 * u)),
        "luleg": _rect(h, w, int(top + 4.5 * u), int(mid - u), int(top + 6.2 * u), mid),
        "llleg": _rect(h, w, int(top + 6.2 * u), int(mid - u), int(top + 8 * u), mid),
        "ruleg": _rect(h, w, int(top + 4.5 * u), mid, int(top + 6.2 * u), int(mid + u)),
        "rlleg": _rect(h, w, int(top + 6.2 * u), mid, int(top + 8 * u), int(mid + u)),
    }


def _struct_array(rows: list[dict], fields: tuple[str, ...]) -> np.ndarray:
    """A MATLAB struct array (1, n) as scipy.io.savemat writes it."""
    arr = np.empty((1, len(rows)), dtype=[(f, object) for f in fields])
    for j, row in enumerate(rows):
        for f in fields:
            arr[0, j][f] = row[f]
    return arr


def image_size(rng, size: int) -> tuple[int, int]:
    """(H, W) of one synthetic image, PASCAL-like: the shorter side in [size, 1.25 size], the longer 1.2-1.5 times
    it (PASCAL's 500 x 375 is 1.33), landscape three times in four. Never square, never below the training crop
    `size`, so every resize of the train and eval paths runs."""
    short = int(rng.integers(size, round(1.25 * size) + 1))
    long = max(short + 1, round(short * rng.uniform(1.2, 1.5)))
    return (short, long) if rng.random() < 0.75 else (long, short)


def _draw(rng, h, w):
    """One image and its labels: image (H, W, 3) uint8, semseg, context, saliency, normals, objects."""
    image = (rng.normal(90, 20, size=(h, w, 3)) + np.linspace(0, 30, w)[None, :, None]).clip(0, 255)
    semseg = np.zeros((h, w), dtype=np.uint8)
    normals = np.zeros((h, w, 3), dtype=np.float32)
    normals[..., 2] = 1.0
    objects = []
    with_person = rng.random() < 0.6
    for n in range(int(rng.integers(1, 4))):
        person = with_person and n == 0
        if person:
            parts = _person_parts(h, w, rng)
            mask = np.logical_or.reduce(list(parts.values()))
            cls = PERSON_CLASS
        else:
            parts = {}
            cls = int(rng.choice([c for c in range(1, 21) if c != PERSON_CLASS]))
            cy, cx = rng.uniform(0.2, 0.8, size=2) * (h, w)
            ry, rx = rng.uniform(0.1, 0.3, size=2) * (h, w)
            if rng.random() < 0.5:
                mask = _ellipse(h, w, cy, cx, ry, rx)
            else:
                mask = _rect(h, w, int(cy - ry), int(cx - rx), int(cy + ry), int(cx + rx))
        if not mask.any():
            continue
        semseg[mask] = cls
        image[mask] = _PALETTE[cls] + rng.normal(0, 12, size=(int(mask.sum()), 3))
        normal = rng.normal(size=3)
        normal[2] = abs(normal[2]) + 0.5
        normals[mask] = normal / np.linalg.norm(normal)
        objects.append(dict(cls=cls, mask=mask, parts=parts))
    for obj in objects:  # later shapes occlude earlier ones: keep only what is still visible
        visible = semseg == obj["cls"]
        obj["mask"] = obj["mask"] & visible
        obj["parts"] = {name: m & visible for name, m in obj["parts"].items()}
    context = semseg.astype(np.uint16) * 2  # CONTEXT_CLASSES: a different id space, the same boundaries
    saliency = (semseg > 0).astype(np.uint8) * 255
    return image.astype(np.uint8), semseg, context, saliency, normals, objects


def read_stamp(root: str) -> str:
    """What a synthetic generator wrote to root's `.complete` (its last file, so an interrupted write has none):
    '' where there is none."""
    try:
        with open(os.path.join(root, ".complete")) as f:
            return f.read()
    except OSError:
        return ""


def written_already(root: str, stamp: str) -> bool:
    """Whether root holds the very synthetic dataset `stamp` describes; a stamp of another (other sizes or seed) is
    removed, so that the caller writes it anew."""
    if read_stamp(root) == stamp:
        return True
    if os.path.exists(os.path.join(root, ".complete")):
        os.remove(os.path.join(root, ".complete"))
    return False


def write_stamp(root: str, stamp: str) -> str:
    """Mark root's synthetic dataset complete (after its last file). Returns root."""
    with open(os.path.join(root, ".complete"), "w") as f:
        f.write(stamp)
    return root


def is_synthetic(root: str) -> bool:
    """Whether root holds a dataset written by `make_synthetic_pascal`."""
    return read_stamp(root).startswith("synthetic PASCAL_MT")


def make_synthetic_pascal(root: str, num_train: int = 48, num_val: int = 16, size: int = 64, seed: int = 0) -> str:
    """Write a synthetic PASCAL_MT dataset under root (skipped if root already holds this very one; written anew
    over one made with other sizes or seed). Images have varied, non-square sizes, each side at least `size`
    (see `image_size`). Returns root."""
    stamp = f"synthetic PASCAL_MT v2 (varied sizes): {num_train} train, {num_val} val, sides >= {size}, seed {seed}\n"
    if written_already(root, stamp):
        return root
    rng = np.random.default_rng(seed)
    for sub in ("JPEGImages", "ImageSets/Context", "semseg/pascal-context", "human_parts", "normals_distill",
                "sal_distill", "pascal-context/trainval", "json"):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    for name, value in (("context", CONTEXT_CLASSES), ("nyu", NYU_CLASSES)):
        with open(os.path.join(root, "json", f"{name}_classes.json"), "w") as f:
            json.dump(value, f)
    splits = {"train": [f"2008_{i:06d}" for i in range(num_train)],
              "val": [f"2009_{i:06d}" for i in range(num_val)]}
    for split, ids in splits.items():
        for image_id in ids:
            image, semseg, context, saliency, normals, objects = _draw(rng, *image_size(rng, size))
            Image.fromarray(image).save(os.path.join(root, "JPEGImages", f"{image_id}.jpg"), quality=95)
            Image.fromarray(semseg).save(os.path.join(root, "semseg", "pascal-context", f"{image_id}.png"))
            Image.fromarray(saliency).save(os.path.join(root, "sal_distill", f"{image_id}.png"))
            encoded = np.round((normals + 1.0) / 2.0 * 255.0).clip(0, 255).astype(np.uint8)
            Image.fromarray(encoded).save(os.path.join(root, "normals_distill", f"{image_id}.png"))
            scipy.io.savemat(os.path.join(root, "pascal-context", "trainval", f"{image_id}.mat"),
                             {"LabelMap": context})
            rows = []
            for obj in objects:
                parts = [dict(part_name=name, mask=m.astype(np.uint8)) for name, m in obj["parts"].items()]
                rows.append({"class": VOC_CLASSES[obj["cls"] - 1], "class_ind": obj["cls"],
                             "mask": obj["mask"].astype(np.uint8),
                             "parts": _struct_array(parts, ("part_name", "mask"))})
            anno = {"imname": image_id, "objects": _struct_array(rows, ("class", "class_ind", "mask", "parts"))}
            scipy.io.savemat(os.path.join(root, "human_parts", f"{image_id}.mat"), {"anno": anno})
        with open(os.path.join(root, "ImageSets", "Context", f"{split}.txt"), "w") as f:
            f.write("\n".join(ids) + "\n")
    return write_stamp(root, stamp)
