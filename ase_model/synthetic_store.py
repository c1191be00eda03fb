"""Where the synthetic datasets live: one directory per dataset and set of generation options (image counts, size,
seed and the generator's own source), generated into a temporary directory and renamed into place, so runs with
other options never share or regenerate each other's data and concurrent generators never see a half-written one."""

import hashlib
import inspect
import os
import shutil
import tempfile

from . import datasets


def generator_version(dataset: str = "pascal_context") -> str:
    """A digest of the dataset's generator source file: data written by another version of it is another dataset."""
    with open(inspect.getsourcefile(datasets.get(dataset).make_synthetic), "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:10]


def synthetic_root(base: str, num_train: int, num_val: int, size: int, seed: int,
                   dataset: str = "pascal_context") -> str:
    return os.path.join(base, f"{dataset}-train{num_train}-val{num_val}-{size}px-seed{seed}-gen"
                              f"{generator_version(dataset)}")


def ensure_synthetic(base: str, num_train: int, num_val: int, size: int, seed: int,
                     dataset: str = "pascal_context") -> str:
    """The synthetic copy of `dataset`'s layout under base, generated first if it does not exist yet."""
    root = synthetic_root(base, num_train, num_val, size, seed, dataset)
    if os.path.isdir(root):
        return root
    os.makedirs(base, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=base, prefix=f".{os.path.basename(root)}.", suffix=".tmp")
    try:
        datasets.get(dataset).make_synthetic(tmp, num_train, num_val, size=size, seed=seed)
        try:
            os.rename(tmp, root)
        except OSError:
            if not os.path.isdir(root):
                raise
            # another process generated the same dataset first: theirs is identical, keep it
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp)
    return root
