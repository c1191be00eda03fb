"""The multi-task ViT-B/16 with Adaptive Shared Experts on PASCAL-Context and NYUD-v2: model, datasets (one module
each in ``ase_model.datasets``, found by name), losses, metrics and the training program
(``python -m ase_model.train``)."""

from . import datasets
from .data import NUM_OUTPUTS, TASKS, PascalContextMT
from .datasets.nyud import NYUDMT
from .datasets.nyud_synthetic import make_synthetic_nyud
from .model import DenseHead, LoRALinear, MultiTaskViT, load_pretrained
from .synthetic import make_synthetic_pascal

__all__ = ["NUM_OUTPUTS", "NYUDMT", "TASKS", "DenseHead", "LoRALinear", "MultiTaskViT", "PascalContextMT", "datasets",
           "load_pretrained", "make_synthetic_nyud", "make_synthetic_pascal"]
