"""Convert a loaded model in place: its FFNs (or named Linears) become ASE modules around the same frozen weights.

The PEFT habit: load the pretrained model the usual way (``timm.create_model(..., pretrained=True)``,
``checkpoint_path=``, ``from_pretrained``), then ``ak.convert(model, num_tasks=5)``. Nothing is copied: an ASE module
holds the original Linear modules, and its experts start at zero, so the converted model returns what it returned.
"""

import fnmatch
import re
from collections.abc import Iterable

from timm.layers import Mlp
from torch import nn

from .modules import ASEFFN, ASEMlp, MoELoRALinear, _Routed

OPTIONS = ("num_experts", "top_k", "num_shared", "rank", "alpha", "num_tasks", "mode", "placement")
# class names that mark a feed-forward block when target=None: timm's Mlp, GluMlp, SwiGLU; LlamaMLP, MistralMLP...
_FFN_CLASS = re.compile(r"(mlp|ffn|feedforward|swiglu)$", re.IGNORECASE)


def convert(model: nn.Module, *, target: str | Iterable[str] | None = None, **options) -> nn.Module:
    """Replace FFNs or Linears of model, in place, by ASE modules that reuse their weight tensors (frozen).

    Args:
        model: any nn.Module, its weights already loaded.
        target: None converts every FFN recognised: timm's ``Mlp`` becomes an :class:`ASEMlp` (the fused FFN when
            its activation is an exact GELU), and any other module whose class name ends in Mlp/MLP/FFN/FeedForward/
            SwiGLU and whose Linears map d -> d (first input width = last output width) is wrapped in an
            :class:`ASEFFN` (experts in parallel with the whole module, Eq. 10). Otherwise module-name patterns
            (``fnmatch``, matched against the full name or a dotted suffix of it: ``"mlp"``, ``"blocks.*.mlp"``,
            ``"fc1"``) naming FFN modules (as above) or ``nn.Linear`` layers (into :class:`MoELoRALinear`).
        **options: num_experts, top_k, num_shared, rank, alpha, num_tasks, mode (every ASE module) and placement
            (timm ``Mlp`` only; other modules take the default ``ffn``). Integers may be numpy integers.

    Returns:
        model, with new trainable routers and experts; the reused weights are frozen, the rest is untouched
        (freeze the backbone before converting and only the ASE parameters train).

    Raises:
        TypeError for an unknown option; ValueError naming the patterns that match nothing, the modules matched
        that are neither FFNs nor Linears or already converted, and matches nested inside one another.

    Example:
        >>> import timm, torch, ase_kernels as ak
        >>> vit = timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=0).eval()
        >>> x = torch.randn(2, 3, 32, 32)
        >>> before = vit(x)
        >>> vit = ak.convert(vit.requires_grad_(False), num_experts=8, top_k=2, num_shared=1, rank=2, num_tasks=2)
        >>> with ak.task_ids(vit, torch.tensor([0, 1])):
        ...     torch.equal(vit(x), before)
        True
    """
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise TypeError(f"convert() got unknown options {unknown}; known: {list(OPTIONS)}")
    names = _recognised_ffns(model) if target is None else _matched(model, target)
    if not names:
        raise ValueError(f"convert() found no FFN to convert in {type(model).__name__} (timm Mlp, or a module named "
                         "*Mlp/*MLP/*FFN/*FeedForward/*SwiGLU mapping d -> d): name them with target=[...]")
    for name in names:
        convert_module(model, name, options)
    return model


def convert_module(model: nn.Module, name: str, options: dict) -> _Routed:
    """Replace the submodule called name (an nn.Linear, a timm Mlp or an FFN mapping d -> d) by its ASE module."""
    if not name:
        raise ValueError(f"convert replaces submodules in place; the model itself ({type(model).__name__}) is not one")
    module = model.get_submodule(name)
    placement = options.get("placement", "ffn")
    routing = {k: v for k, v in options.items() if k != "placement"}
    if isinstance(module, nn.Linear):
        if "placement" in options:
            raise ValueError(f"placement applies to FFN modules, not to the nn.Linear {name!r}")
        new = MoELoRALinear(module, **routing)
    elif _is_timm_mlp(module):
        new = _ase_mlp(module, **options)
    else:
        if placement != "ffn":
            raise ValueError(f"placement={placement!r} needs a timm Mlp with fc1/fc2; {name!r} is a "
                             f"{type(module).__name__}, whose experts can only sit beside it (placement='ffn')")
        weight = _linears(module)[0].weight
        new = ASEFFN(module, _ffn_width(module), device=weight.device, dtype=weight.dtype, **routing)
    new.train(module.training)
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, new)
    return new


def converted_type(module: nn.Module) -> str | None:
    """The name of the ASE class that convert makes of module, or None where it cannot convert it."""
    if isinstance(module, nn.Linear):
        return "MoELoRALinear"
    if _is_timm_mlp(module):
        return "ASEMlp"
    return "ASEFFN" if _ffn_width(module) else None


def _ase_mlp(mlp: Mlp, **options) -> ASEMlp:
    """An ASEMlp holding mlp's own fc1/act/drop/norm/fc2 modules (fc1 and fc2 frozen)."""
    fc1, fc2 = mlp.fc1, mlp.fc2
    ase = ASEMlp(fc1.in_features, fc1.out_features, fc2.out_features, bias=(fc1.bias is not None, fc2.bias is not None),
                 device=fc1.weight.device, dtype=fc1.weight.dtype, **options)
    for part in ("fc1", "act", "drop1", "norm", "fc2", "drop2"):
        setattr(ase, part, getattr(mlp, part))
    fc1.requires_grad_(False), fc2.requires_grad_(False)
    return ase


def _is_timm_mlp(module: nn.Module) -> bool:
    return isinstance(module, Mlp) and isinstance(module.fc1, nn.Linear) and isinstance(module.fc2, nn.Linear)


def _linears(module: nn.Module) -> list[nn.Linear]:
    return [m for m in module.modules() if isinstance(m, nn.Linear)]


def _ffn_width(module: nn.Module) -> int | None:
    """d when module's Linears (in registration order) start from d and end at d, else None."""
    linears = _linears(module)
    if not linears or any(isinstance(m, _Routed) for m in module.modules()):
        return None
    d = linears[0].in_features
    return d if linears[-1].out_features == d else None


def _recognised_ffns(model: nn.Module) -> list[str]:
    """Names of the outermost FFNs of model that target=None converts, skipping what is converted already."""
    names, skip = [], []
    for name, module in model.named_modules():
        if not name or any(name.startswith(p + ".") for p in skip):
            continue
        if isinstance(module, _Routed):
            skip.append(name)
        elif _is_timm_mlp(module) or (_FFN_CLASS.search(type(module).__name__) and _ffn_width(module)):
            names.append(name)
            skip.append(name)
    return names


def _matched(model: nn.Module, target) -> list[str]:
    """Names of the modules the patterns name; every pattern must match, every match be convertible, none nested."""
    patterns = [target] if isinstance(target, str) else list(target)
    if not patterns or not all(isinstance(p, str) for p in patterns):
        raise TypeError(f"target must be None or module-name patterns (str), got {target!r}")
    modules = dict(model.named_modules())
    routed = [n for n, m in modules.items() if isinstance(m, _Routed)]
    names, unmatched, wrong = [], [], []
    for pattern in patterns:
        hits = [n for n in modules if n and (fnmatch.fnmatchcase(n, pattern) or fnmatch.fnmatchcase(n, "*." + pattern))]
        if not hits:
            unmatched.append(pattern)
        for n in hits:
            module = modules[n]
            if any(n == r or n.startswith(r + ".") for r in routed):
                wrong.append(f"{n} (already converted)")
            elif converted_type(module) is None:
                wrong.append(f"{n} ({type(module).__name__}: neither an nn.Linear nor an FFN mapping d -> d)")
            elif n not in names:
                names.append(n)
    if unmatched:
        examples = [n for n in modules if n][:6]
        raise ValueError(f"target patterns {unmatched} match no module of {type(model).__name__} "
                         f"(its module names look like {examples})")
    if wrong:
        raise ValueError(f"target matches modules that cannot be converted: {wrong}")
    nested = [(a, b) for a in names for b in names if b.startswith(a + ".")]
    if nested:
        raise ValueError(f"target is ambiguous: it matches modules inside other matched modules: {nested}")
    return names
