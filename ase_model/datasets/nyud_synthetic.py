"""A small synthetic dataset in exactly the NYUD_MT layout that :mod:`ase_model.datasets.nyud` reads.

Each image is a room seen by a pinhole camera: a wall plane behind one to three planar objects. Every label
comes from the same scene, so the tasks agree: a pixel's class is the class of the plane it sees, its depth is
where its ray meets that plane, its normal is that plane's normal, and the edges are the class boundaries. Every
image has an unlabelled patch (segmentation 0) and a patch without depth (0, as where the sensor saw nothing).
Colours depend on the class and darken with depth, so a model can learn the tasks.

Geometry: camera coordinates x right, y down, z forward; focal length 0.8 W, principal point the image centre;
the ray of pixel (u, v) is r = ((u + 0.5 - W/2) / f, (v + 0.5 - H/2) / f, 1) (its z is 1, so a point's depth is its
z). A plane n . X = n . P0 through P0 is seen at depth z = (n . P0) / (n . r); its stored normal n is the unit
normal facing the camera (n_z < 0).
"""

import os

import numpy as np
from PIL import Image

from ..data import edges_from_context
from ..synthetic import image_size, read_stamp, write_stamp, written_already

STAMP = "synthetic NYUD_MT"
_PALETTE = np.random.default_rng(4321).integers(40, 255, size=(41, 3))


def rays(h: int, w: int) -> np.ndarray:
    """The camera ray of every pixel centre (H, W, 3), z = 1."""
    f = 0.8 * w
    u, v = np.meshgrid(np.arange(w) + 0.5 - w / 2, np.arange(h) + 0.5 - h / 2, indexing="xy")
    return np.stack([u / f, v / f, np.ones_like(u)], axis=-1)


def _plane(rng, tilt: float) -> np.ndarray:
    """A unit normal facing the camera, tilted up to `tilt` (in x and y slope)."""
    n = np.array([rng.uniform(-tilt, tilt), rng.uniform(-tilt, tilt), -1.0])
    return n / np.linalg.norm(n)


def _scene(rng, h, w):
    """image (H, W, 3) uint8, segmentation (H, W) uint8 (0 unlabelled, 1..40), depth (H, W) float32 metres (0
    invalid), normals (H, W, 3) float32."""
    r = rays(h, w)
    yy, xx = np.mgrid[:h, :w]
    segmentation = np.ones((h, w), dtype=np.uint8)  # class 1, the NYUD-40 "wall"
    n = _plane(rng, 0.4)
    depth = (n @ (r[h // 2, w // 2] * rng.uniform(4.0, 7.0))) / (r @ n)
    normals = np.broadcast_to(n, (h, w, 3)).copy()
    for _ in range(int(rng.integers(1, 4))):
        cls = int(rng.integers(2, 41))
        cy, cx = rng.uniform(0.25, 0.75, size=2) * (h, w)
        ry, rx = rng.uniform(0.1, 0.3, size=2) * (h, w)
        if rng.random() < 0.5:
            mask = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        else:
            mask = (abs(yy - cy) <= ry) & (abs(xx - cx) <= rx)
        n = _plane(rng, 0.6)
        z = (n @ (r[int(cy), int(cx)] * rng.uniform(1.0, 3.5))) / (r @ n)
        mask &= (z > 0) & (z < depth)  # in front of what it covers
        segmentation[mask], depth[mask], normals[mask] = cls, z[mask], n
    image = _PALETTE[segmentation] * (1.6 / (1 + 0.15 * depth))[..., None] + rng.normal(0, 8, size=(h, w, 3))
    y0, x0 = int(rng.integers(0, h // 2)), int(rng.integers(0, w // 2))
    segmentation[y0:y0 + h // 6, x0:x0 + w // 6] = 0  # an unlabelled patch
    y0, x0 = int(rng.integers(0, h // 2)), int(rng.integers(0, w // 2))
    depth[y0:y0 + h // 8, x0:x0 + w // 5] = 0  # a patch the depth sensor missed
    return image.clip(0, 255).astype(np.uint8), segmentation, depth.astype(np.float32), normals.astype(np.float32)


def is_synthetic(root: str) -> bool:
    """Whether root holds a dataset written by `make_synthetic_nyud`."""
    return read_stamp(root).startswith(STAMP)


def make_synthetic_nyud(root: str, num_train: int = 48, num_val: int = 16, size: int = 64, seed: int = 0) -> str:
    """Write a synthetic NYUD_MT dataset under root (skipped if root already holds this very one). Images have
    varied, non-square sizes, each side at least `size`. Returns root."""
    stamp = f"{STAMP} v1: {num_train} train, {num_val} val, sides >= {size}, seed {seed}\n"
    if written_already(root, stamp):
        return root
    rng = np.random.default_rng(seed)
    for sub in ("images", "segmentation", "depth", "normals", "edge", "gt_sets"):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    for split, count in (("train", num_train), ("val", num_val)):
        ids = [f"{split}_{i:05d}" for i in range(count)]
        for image_id in ids:
            image, segmentation, depth, normals = _scene(rng, *image_size(rng, size))
            Image.fromarray(image).save(os.path.join(root, "images", f"{image_id}.jpg"), quality=95)
            Image.fromarray(segmentation).save(os.path.join(root, "segmentation", f"{image_id}.png"))
            np.save(os.path.join(root, "depth", f"{image_id}.npy"), depth)
            np.save(os.path.join(root, "normals", f"{image_id}.npy"), normals)
            np.save(os.path.join(root, "edge", f"{image_id}.npy"), edges_from_context(segmentation).astype(np.float32))
        with open(os.path.join(root, "gt_sets", f"{split}.txt"), "w") as f:
            f.write("\n".join(ids) + "\n")
    return write_stamp(root, stamp)
