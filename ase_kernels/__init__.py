"""ase-kernels: exact, fused Adaptive Shared Experts (LoRA mixture of experts) for vision transformers.

>>> import ase_kernels as ak
>>> r = ak.route(x, router_weight, task_ids, top_k=6, num_shared=2)          # doctest: +SKIP
>>> y = ak.moe_lora(x, lora_A, lora_B, r, base_input=h, base_weight=w2)      # doctest: +SKIP
"""

from . import reference
from .adapters import load_adapters, save_adapters
from .checks import Routing
from .convert import convert
from .modules import ASEFFN, PLACEMENTS, ASEMlp, LoRAExperts, MoELoRALinear, ase_modules, task_ids
from .ops import BACKENDS, backend, mi_loss, moe_lora, moe_lora_ffn, route
from .split_ffn import ASESplitFFN, ASESplitFFNOutput

__version__ = "0.1.0"

__all__ = [
    "BACKENDS", "PLACEMENTS", "ASEFFN", "ASEMlp", "ASESplitFFN", "ASESplitFFNOutput", "LoRAExperts", "MoELoRALinear",
    "Routing", "ase_modules", "backend", "convert", "load_adapters", "mi_loss", "moe_lora", "moe_lora_ffn",
    "reference", "route", "save_adapters", "task_ids",
]
