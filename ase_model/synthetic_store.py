"""Where the synthetic dataset lives: one directory per set of generation options (image counts, size, seed and
the generator's own source), generated into a temporary directory and renamed into place, so runs with other
options never share or regenerate each other's data and concurrent generators never see a half-written one."""

import hashlib
import os
import shutil
import tempfile

from . import synthetic


def generator_version() -> str:
    """A digest of synthetic.py: data written by another version of the generator is another dataset."""
    with open(synthetic.__file__, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:10]


def synthetic_root(base: str, num_train: int, num_val: int, size: int, seed: int) -> str:
    return os.path.join(base, f"train{num_train}-val{num_val}-{size}px-seed{seed}-gen{generator_version()}")


def ensure_synthetic(base: str, num_train: int, num_val: int, size: int, seed: int) -> str:
    """The dataset's directory under base, generated first if it does not exist yet."""
    root = synthetic_root(base, num_train, num_val, size, seed)
    if os.path.isdir(root):
        return root
    os.makedirs(base, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=base, prefix=f".{os.path.basename(root)}.", suffix=".tmp")
    try:
        synthetic.make_synthetic_pascal(tmp, num_train, num_val, size=size, seed=seed)
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
