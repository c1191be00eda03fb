"""Datasets as plug-ins of the trainer, found by name (``--dataset NAME``).

A dataset is one module of this package that defines ``DATASET``, a `Dataset`: its tasks (output channels, loss,
loss weight, how a prediction is decoded, the metric delta_m reads and its direction), its loader (decoding and
augmentation), its meters (the edge tolerance among them), its delta_m reference file and its synthetic generator.
The model, the loop, the evaluation and the checkpoints read these facts and name no task. Adding a dataset is
adding a module here.
"""

import functools
import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Task:
    """One task of a dataset.

    channels: the head's output channels. loss: (pred (B, C, H, W), target, *, distributed) -> 0-dim loss.
    weight: its weight in the multi-task loss. decode: how one image's output becomes a prediction at the
    original size (see evaluate.decode): "labels" (arg-max, nearest), "probability" (sigmoid, bilinear), "unit"
    (unit vectors, bilinear) or "value" (as is, bilinear). metric, lower_is_better: the number delta_m and best.pt
    read. boundary: that number is the boundary-matched odsF, computed only at some evaluations
    (--edge-eval-every)."""

    channels: int
    loss: Callable
    weight: float
    decode: str
    metric: str
    lower_is_better: bool
    boundary: bool = False


@dataclass(frozen=True)
class Dataset:
    """Everything the trainer knows of a dataset.

    loader: (root, split, img_size, train=None, seed=0, augment="reference") -> a torch Dataset with ``files(i)``
    (the paths sample i reads), ``load(i)`` (its decoded arrays), ``set_epoch``, ``root`` and ``split``.
    make_meters: (tasks, device, *, edge_ods, edge_thresholds, eval_workers, edge_matcher) -> {task: metrics.Meter}.
    reference: the YAML file of single-task numbers delta_m is taken against, or None (no cited numbers: pass
    --reference). make_synthetic: (root, num_train, num_val, size, seed) -> root, a synthetic copy of the layout;
    is_synthetic: (root) -> whether root was made by it. augmentations: the --augment choices its loader takes."""

    name: str
    tasks: dict[str, Task]
    loader: Callable
    make_meters: Callable
    reference: str | None
    make_synthetic: Callable
    is_synthetic: Callable
    augmentations: tuple[str, ...] = ("reference",)


@functools.cache
def names() -> tuple[str, ...]:
    """The datasets of this package: its modules that define DATASET."""
    found = []
    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_") and hasattr(importlib.import_module(f"{__name__}.{info.name}"), "DATASET"):
            found.append(info.name)
    return tuple(sorted(found))


def get(name: str) -> Dataset:
    """The dataset called name (ValueError listing the known ones otherwise)."""
    if name not in names():
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(names())}")
    return importlib.import_module(f"{__name__}.{name}").DATASET
