"""Convert a loaded model in place: its FFNs (or named Linears) become ASE modules around the same frozen weights.

The PEFT habit: load the pretrained model the usual way (``timm.create_model(..., pretrained=True)``,
``checkpoint_path=``, ``from_pretrained``), then ``ak.convert(model, num_tasks=5)``. Nothing is copied: an ASE module
holds the original Linear modules, and its experts start at zero, so the converted model returns what it returned.
"""

import fnmatch
import re
import warnings
from collections.abc import Iterable

import torch
from timm.layers import Mlp
from torch import nn

from .modules import ASEFFN, ASEMlp, MoELoRALinear, _Routed, adapter_parameters, linear_weight
from .split_ffn import ASESplitFFN, ASESplitFFNOutput

OPTIONS = ("num_experts", "top_k", "num_shared", "rank", "alpha", "num_tasks", "mode", "placement")
# class names that mark a feed-forward block when target=None: timm's Mlp, GluMlp, SwiGLU; LlamaMLP, MistralMLP...
_FFN_CLASS = re.compile(r"(mlp|ffn|feedforward|swiglu)$", re.IGNORECASE)


def convert(model: nn.Module, *, target: str | Iterable[str | tuple[str, str]] | None = None,
            **options) -> nn.Module:
    """Replace FFNs or Linears of model, in place, by ASE modules that reuse their weight tensors (frozen).

    Args:
        model: any nn.Module, its weights already loaded.
        target: None converts every FFN recognised: timm's ``Mlp`` becomes an :class:`ASEMlp` (the fused FFN when
            its activation is an exact GELU); any other module whose class name ends in Mlp/MLP/FFN/FeedForward/
            SwiGLU and whose Linears (``nn.Linear`` or transformers' ``Conv1D``, as in GPT-2) map d -> d (first
            input width = last output width) is wrapped in an :class:`ASEFFN` (experts in parallel with the whole
            module, Eq. 10); and the split FFN of BERT-style layers (a module with ``intermediate.dense`` and
            ``output.dense`` mapping d -> hidden -> d: BERT, RoBERTa) becomes a pair, as below. Otherwise a list
            of module-name patterns (``fnmatch``, matched against the full name or a dotted suffix of it:
            ``"mlp"``, ``"blocks.*.mlp"``, ``"fc1"``) naming FFN modules (as above) or Linears (into
            :class:`MoELoRALinear`), and of pattern pairs ``("*.intermediate.dense", "*.output.dense")`` naming the
            two projections of split FFNs: each module matching the first pattern is paired with the next module
            (in registration order) matching the second, and the pair becomes one ASE FFN
            (:class:`~ase_kernels.split_ffn.ASESplitFFN` and its output) with one routing, computed from the first
            projection's input.
        **options: num_experts, top_k, num_shared, rank, alpha, num_tasks, mode (every ASE module) and placement
            (timm ``Mlp`` and split FFNs; other FFN modules take the default ``ffn``). Integers may be numpy
            integers.

    Returns:
        model, with new trainable routers and experts; the reused weights are frozen, the rest is untouched
        (freeze the backbone before converting and only the ASE parameters train). When other parameters still
        require grad, one warning says how many: :func:`ak.save_adapters` would refuse to leave them out.

    Raises:
        TypeError for an unknown option; ValueError naming the patterns that match nothing, the modules matched
        that are neither FFNs nor Linears or already converted, matches nested inside one another, pairs without
        a second module, and 1x1-convolution MLPs (ConvNeXt's ``conv_mlp=True``), which it cannot convert
        without a copy (see :func:`conv_mlp_refusal`).

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
    names, pairs = _recognised_ffns(model) if target is None else _matched(model, target)
    if not names and not pairs:
        raise ValueError(f"convert() found no FFN to convert in {type(model).__name__} (timm Mlp, a module named "
                         "*Mlp/*MLP/*FFN/*FeedForward/*SwiGLU mapping d -> d, or BERT's intermediate/output pair): "
                         "name them with target=[...]")
    for name in names:
        convert_module(model, name, options)
    for first, second in pairs:
        convert_pair(model, first, second, options)
    _warn_trainable(model)
    return model


def convert_module(model: nn.Module, name: str, options: dict) -> _Routed:
    """Replace the submodule called name (a Linear, a timm Mlp or an FFN mapping d -> d) by its ASE module."""
    if not name:
        raise ValueError(f"convert replaces submodules in place; the model itself ({type(model).__name__}) is not one")
    module = model.get_submodule(name)
    placement = options.get("placement", "ffn")
    routing = {k: v for k, v in options.items() if k != "placement"}
    if linear_weight(module) is not None:
        if "placement" in options:
            raise ValueError(f"placement applies to FFN modules, not to the {type(module).__name__} {name!r}")
        new = MoELoRALinear(module, **routing)
    elif _is_timm_mlp(module):
        new = _ase_mlp(module, **options)
    else:
        if placement != "ffn":
            raise ValueError(f"placement={placement!r} needs a timm Mlp with fc1/fc2 or a split FFN; {name!r} is a "
                             f"{type(module).__name__}, whose experts can only sit beside it (placement='ffn')"
                             f"{_as_pair(name, module)}")
        weight = _linears(module)[0]
        new = ASEFFN(module, _ffn_width(module), device=weight.device, dtype=weight.dtype, **routing)
    _replace(model, name, module, new)
    return new


def convert_pair(model: nn.Module, first: str, second: str, options: dict) -> ASESplitFFN:
    """Replace the two projections first (d -> hidden) and second (hidden -> d_out) of a split FFN by an
    :class:`~ase_kernels.split_ffn.ASESplitFFN` and its :class:`~ase_kernels.split_ffn.ASESplitFFNOutput`."""
    fc1, fc2 = model.get_submodule(first), model.get_submodule(second)
    problem = _pair_problem(fc1, fc2)
    if problem:
        raise ValueError(f"({first!r}, {second!r}) is not a split FFN: {problem}")
    new = ASESplitFFN(fc1, linear_weight(fc2).shape[0], **options)
    _replace(model, first, fc1, new)
    _replace(model, second, fc2, ASESplitFFNOutput(fc2, new))
    return new


def conv_mlp_refusal(names: list[str]) -> str:
    """Why convert refuses 1x1-convolution MLPs on (B, C, H, W), and the way out.

    The kernels read the tokens as the rows of a (T, d) matrix through two strides and write a fresh (T, d_out)
    output. In an NCHW tensor a token's channels are H*W apart and the images C*H*W apart: (B*H*W, C) is no strided
    view of it (for B > 1), so the experts would need a permuted copy of the input and another of their output on
    every forward and backward, the very traffic the fused kernels exist to avoid (the kernels take no batch
    stride and no output layout). Refusing costs little: timm's ConvNeXt runs the same MLP with nn.Linear on
    (B, H, W, C) when built with ``conv_mlp=False`` (the class default; atto to nano set True), whose fc1/fc2
    weights are the 1x1 conv weights flattened, (out, in, 1, 1) -> (out, in); that model converts as any timm Mlp.
    """
    return (f"convert cannot put experts on 1x1-convolution MLPs over (B, C, H, W) ({_some(names)}) without "
            "copying every activation into (tokens, channels) rows; build the model with conv_mlp=False (the same "
            "MLP as nn.Linear on (B, H, W, C); load its weights with each 4-d mlp.fc1/fc2 weight .flatten(1)), or "
            "name other modules with target=[...]")


def converted_type(module: nn.Module) -> str | None:
    """The name of the ASE class that convert makes of module, or None where it cannot convert it alone."""
    if linear_weight(module) is not None:
        return "MoELoRALinear"
    if _is_timm_mlp(module):
        return "ASEMlp"
    return "ASEFFN" if _ffn_width(module) else None


def _as_pair(name: str, module: nn.Module) -> str:
    """For an FFN of exactly two Linears that chain (d -> hidden -> d), the way to LoRA deltas on them: name its
    projections as a split pair."""
    linears = {n: m for n, m in module.named_modules() if linear_weight(m) is not None}
    if len(linears) != 2 or _pair_problem(*linears.values()):
        return ""
    first, second = (f"{name.rpartition('.')[2]}.{n}" for n in linears)
    return f", or name its two projections as a pair: target=[({first!r}, {second!r})]"


def _replace(model: nn.Module, name: str, old: nn.Module, new: nn.Module) -> None:
    new.train(old.training)
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, new)


def _ase_mlp(mlp: Mlp, **options) -> ASEMlp:
    """An ASEMlp holding mlp's own fc1/act/drop/norm/fc2 modules (fc1 and fc2 frozen)."""
    fc1, fc2 = mlp.fc1, mlp.fc2
    ase = ASEMlp(fc1.in_features, fc1.out_features, fc2.out_features, bias=(fc1.bias is not None, fc2.bias is not None),
                 device=fc1.weight.device, dtype=fc1.weight.dtype, **options)
    for part in ("fc1", "act", "drop1", "norm", "fc2", "drop2"):
        setattr(ase, part, getattr(mlp, part))
    fc1.requires_grad_(False), fc2.requires_grad_(False)
    return ase


def _converted(module: nn.Module) -> bool:
    return isinstance(module, _Routed | ASESplitFFNOutput)


def _is_timm_mlp(module: nn.Module) -> bool:
    return isinstance(module, Mlp) and isinstance(module.fc1, nn.Linear) and isinstance(module.fc2, nn.Linear)


def _is_conv_mlp(module: nn.Module) -> bool:
    """A 1x1-convolution MLP on (B, C, H, W): timm's ConvMlp, Mlp(use_conv=True), GlobalResponseNormMlp(use_conv)."""
    fc1 = getattr(module, "fc1", None)
    return (_FFN_CLASS.search(type(module).__name__) is not None and isinstance(fc1, nn.Conv2d)
            and fc1.kernel_size == (1, 1))


def _linears(module: nn.Module) -> list[torch.Tensor]:
    """The (d_out, d_in) weights of module's Linears (nn.Linear or transformers Conv1D), in registration order."""
    return [w for w in map(linear_weight, module.modules()) if w is not None]


def _ffn_width(module: nn.Module) -> int | None:
    """d when module's Linears (in registration order) start from d and end at d, else None."""
    linears = _linears(module)
    if not linears or any(map(_converted, module.modules())):
        return None
    d = linears[0].shape[1]
    return d if linears[-1].shape[0] == d else None


def _pair_problem(fc1: nn.Module, fc2: nn.Module) -> str | None:
    """Why fc1 and fc2 cannot be the two projections of one FFN, or None."""
    w1, w2 = linear_weight(fc1), linear_weight(fc2)
    if w1 is None or w2 is None:
        return (f"both must be nn.Linear or transformers Conv1D, got {type(fc1).__name__} and "
                f"{type(fc2).__name__}")
    if w2.shape[1] != w1.shape[0]:
        return f"the first maps to {w1.shape[0]} features, the second takes {w2.shape[1]}"
    return None


def _bert_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """The split FFNs of BERT-style layers (BERT, RoBERTa, ...): a module with children ``intermediate`` and
    ``output`` whose ``dense`` Linears map d -> hidden -> d."""
    pairs = []
    for name, module in model.named_modules():
        fc1 = getattr(getattr(module, "intermediate", None), "dense", None)
        fc2 = getattr(getattr(module, "output", None), "dense", None)
        if fc1 is None or fc2 is None or _pair_problem(fc1, fc2):
            continue
        if linear_weight(fc2).shape[0] == linear_weight(fc1).shape[1]:
            prefix = f"{name}." if name else ""
            pairs.append((f"{prefix}intermediate.dense", f"{prefix}output.dense"))
    return pairs


def _recognised_ffns(model: nn.Module) -> tuple[list[str], list[tuple[str, str]]]:
    """Names of the outermost FFNs of model that target=None converts, and its split FFN pairs, skipping what is
    converted already or inside an FFN converted whole. Refuses 1x1-convolution MLPs."""
    names, skip, convs = [], [], []
    for name, module in model.named_modules():
        if not name or any(name.startswith(p + ".") for p in skip):
            continue
        if _converted(module):
            skip.append(name)
        elif _is_timm_mlp(module) or (_FFN_CLASS.search(type(module).__name__) and _ffn_width(module)):
            names.append(name)
            skip.append(name)
        elif _is_conv_mlp(module):
            convs.append(name)
            skip.append(name)
    if convs:
        raise ValueError(conv_mlp_refusal(convs))
    return names, [pair for pair in _bert_pairs(model) if not any(pair[0].startswith(n + ".") for n in names)]


def _hits(modules: dict, pattern: str) -> list[str]:
    return [n for n in modules if n and (fnmatch.fnmatchcase(n, pattern) or fnmatch.fnmatchcase(n, "*." + pattern))]


def _matched(model: nn.Module, target) -> tuple[list[str], list[tuple[str, str]]]:
    """Names of the modules the patterns name and the pairs the pattern pairs name; every pattern must match, every
    match be convertible, none nested."""
    items = [target] if isinstance(target, str) else list(target)  # a pair is an item of the list
    if not items or not all(isinstance(p, str) or _is_pattern_pair(p) for p in items):
        raise TypeError(f"target must be None, module-name patterns (str) or pairs of them as tuples "
                        f"(first, second), got {target!r}")
    modules = dict(model.named_modules())
    order = {n: i for i, n in enumerate(modules)}
    routed = [n for n, m in modules.items() if _converted(m)]
    names, pairs, unmatched, wrong, convs = [], [], [], [], []

    def usable(n: str) -> bool:
        if any(n == r or n.startswith(r + ".") for r in routed):
            wrong.append(f"{n} (already converted)")
            return False
        return True

    for item in items:
        if isinstance(item, str):
            hits = _hits(modules, item)
            unmatched += [] if hits else [item]
            for n in filter(usable, hits):
                if _is_conv_mlp(modules[n]):
                    convs.append(n)
                elif converted_type(modules[n]) is None:
                    wrong.append(f"{n} ({type(modules[n]).__name__}: neither a Linear nor an FFN mapping d -> d)")
                elif n not in names:
                    names.append(n)
            continue
        firsts, seconds = (_hits(modules, p) for p in item)
        unmatched += [p for p, hits in zip(item, (firsts, seconds), strict=True) if not hits]
        for i, a in enumerate(firsts):
            end = order[firsts[i + 1]] if i + 1 < len(firsts) else len(order)
            b = next((b for b in seconds if order[a] < order[b] < end), None)
            if b is None:
                wrong.append(f"{a} (no module matching {item[1]!r} follows it before the next {item[0]!r})")
            elif usable(a) and usable(b):
                problem = _pair_problem(modules[a], modules[b])
                if problem:
                    wrong.append(f"({a}, {b}) ({problem})")
                elif (a, b) not in pairs:
                    pairs.append((a, b))
    if unmatched:
        examples = [n for n in modules if n][:6]
        raise ValueError(f"target patterns {unmatched} match no module of {type(model).__name__} "
                         f"(its module names look like {examples})")
    if convs:
        raise ValueError(conv_mlp_refusal(convs))
    if wrong:
        raise ValueError(f"target matches modules that cannot be converted: {wrong}")
    every = names + [n for pair in pairs for n in pair]
    nested = [(a, b) for a in every for b in every if b.startswith(a + ".")]
    twice = sorted({n for n in every if every.count(n) > 1})
    if nested or twice:
        raise ValueError(f"target is ambiguous: it matches modules inside other matched modules {nested} or the same "
                         f"module twice {twice}")
    return names, pairs


def _is_pattern_pair(item) -> bool:
    return isinstance(item, tuple) and len(item) == 2 and all(isinstance(p, str) for p in item)


def _warn_trainable(model: nn.Module) -> None:
    """One warning when parameters outside the ASE routers and experts still require grad."""
    others = trainable_outside(model)
    if others:
        count = sum(p.numel() for p in others.values())
        warnings.warn(f"{count:,} parameters in {len(others)} tensors outside the ASE modules still require grad "
                      f"({_some(list(others))}): they train along with the experts; freeze them first "
                      "(model.requires_grad_(False) before convert) or save them with save_adapters(..., extra=[...])",
                      stacklevel=3)


def trainable_outside(model: nn.Module) -> dict[str, nn.Parameter]:
    """Parameters of model that require grad and are not ASE routers or experts (not in an adapter file)."""
    adapters = {id(p) for p in adapter_parameters(model).values()}
    return {n: p for n, p in model.named_parameters() if p.requires_grad and id(p) not in adapters}


def _some(names: list[str], shown: int = 3) -> str:
    """The first few names, and how many more."""
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")
