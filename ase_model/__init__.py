"""The multi-task ViT-B/16 with Adaptive Shared Experts on PASCAL-Context: model, data, losses, metrics and the
training program (``python -m ase_model.train``)."""

from .data import NUM_OUTPUTS, TASKS, PascalContextMT
from .model import DenseHead, LoRALinear, MultiTaskViT, load_pretrained
from .synthetic import make_synthetic_pascal

__all__ = ["NUM_OUTPUTS", "TASKS", "DenseHead", "LoRALinear", "MultiTaskViT", "PascalContextMT", "load_pretrained",
           "make_synthetic_pascal"]
