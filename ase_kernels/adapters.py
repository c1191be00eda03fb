"""Adapters on disk: the routers and experts of a model's ASE modules, with their options, in one safetensors file.

File layout: one tensor per trainable ASE parameter, named as in ``model.state_dict()`` (``blocks.0.mlp.router``,
``blocks.0.mlp.experts.ffn.A``, ...), in the parameter's dtype; the safetensors metadata holds
``format = "ase_kernels.adapters"``, ``version = "1"`` and ``modules``, a JSON object mapping each ASE module's name
to ``{"type": "ASEMlp" | "MoELoRALinear" | "ASEFFN", "options": {...}}`` (the options :func:`ak.convert` takes).
The frozen base weights are not in the file: they come from the model's own checkpoint.
"""

import json
import os

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .convert import convert_module, converted_type
from .modules import ase_modules

FORMAT, VERSION = "ase_kernels.adapters", "1"


def _adapters(model: nn.Module) -> dict[str, nn.Module]:
    """The ASE modules of model by name."""
    names = {m: n for n, m in model.named_modules()}
    return {names[m]: m for m in ase_modules(model)}


def _spec(module) -> dict:
    return {"type": type(module).__name__, "options": module.options()}


def _differences(name: str, saved: dict, module) -> list[str]:
    """The type and options in which a module differs from its saved spec, one entry each."""
    file, model = ({"type": spec["type"], **spec["options"]} for spec in (saved, _spec(module)))
    return [f"{name}: {key} file {file.get(key)!r}, model {model.get(key)!r}" for key in {**file, **model}
            if file.get(key) != model.get(key)]


def _tensors(name: str, module) -> dict[str, torch.Tensor]:
    """The module's trainable ASE parameters (router, experts) by their state_dict name in the model."""
    prefix = f"{name}." if name else ""
    return {prefix + p: t for p, t in module.named_parameters() if p == "router" or p.startswith("experts.")}


def save_adapters(model: nn.Module, path: str | os.PathLike) -> None:
    """Write the routers and experts of every ASE module of model, and their options, to one safetensors file.

    Args:
        model: a model with ASE modules (from :func:`ak.convert`, or built with them).
        path: the file to write (``.safetensors`` by convention).

    Example:
        >>> ak.save_adapters(vit, "ase.safetensors")  # doctest: +SKIP
    """
    modules = _adapters(model)
    if not modules:
        raise ValueError(f"{type(model).__name__} has no ASE modules to save: convert it first (ak.convert)")
    tensors = {k: t.detach().contiguous().cpu() for n, m in modules.items() for k, t in _tensors(n, m).items()}
    metadata = {"format": FORMAT, "version": VERSION,
                "modules": json.dumps({n: _spec(m) for n, m in modules.items()})}
    save_file(tensors, os.fspath(path), metadata=metadata)


def load_adapters(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load routers and experts saved by :func:`save_adapters` into model, converting a plain model first.

    Args:
        model: the model the adapters were trained on, plain (it is converted as the file says, in place) or
            already converted with the same modules and options.
        path: a file written by :func:`save_adapters`.

    Returns:
        model. The tensors are copied into its parameters (cast to their dtype and device).

    Raises:
        ValueError naming the modules missing on either side, the modules whose type or options differ, and the
        tensors missing, unexpected or of another shape; nothing is loaded then (a plain model whose module names
        and types fit may be left converted, with fresh experts, when only the shapes differ).

    Example:
        >>> vit = ak.load_adapters(timm.create_model("vit_base_patch16_224", pretrained=True), "ase.safetensors")
        ... # doctest: +SKIP
    """
    path = os.fspath(path)
    with safe_open(path, framework="pt", device="cpu") as f:
        metadata = f.metadata() or {}
        if metadata.get("format") != FORMAT or "modules" not in metadata:
            raise ValueError(f"{path} is not an ase_kernels adapter file (no {FORMAT!r} metadata)")
        if metadata.get("version") != VERSION:
            raise ValueError(f"{path} has adapter format version {metadata.get('version')!r}; this release reads "
                             f"{VERSION!r}")
        saved = json.loads(metadata["modules"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    present = _adapters(model)
    if not present:
        plain = dict(model.named_modules())
        absent = sorted(set(saved) - set(plain))
        if absent:
            raise ValueError(f"{path} has adapters for modules that {type(model).__name__} lacks: {absent}")
        wrong = [f"{n}: the file has {spec['type']}, {type(plain[n]).__name__} converts to {converted_type(plain[n])}"
                 for n, spec in saved.items() if converted_type(plain[n]) != spec["type"]]
        if wrong:
            raise ValueError(f"{path} does not fit {type(model).__name__}: {wrong}")
        for name, spec in saved.items():
            convert_module(model, name, spec["options"])
        present = _adapters(model)
    missing, unexpected = sorted(set(saved) - set(present)), sorted(set(present) - set(saved))
    if missing or unexpected:
        raise ValueError(f"{path} does not fit the model's ASE modules: in the file only {missing}, in the model only "
                         f"{unexpected}")
    differ = [d for n, m in present.items() for d in _differences(n, saved[n], m)]
    if differ:
        raise ValueError(f"{path} was saved with other ASE options: {differ}")
    params = {k: p for n, m in present.items() for k, p in _tensors(n, m).items()}
    missing, unexpected = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
    shapes = [f"{k}: file {tuple(tensors[k].shape)}, model {tuple(p.shape)}" for k, p in params.items()
              if k in tensors and tensors[k].shape != p.shape]
    if missing or unexpected or shapes:
        raise ValueError(f"{path} does not fit the model: missing tensors {missing}, unexpected {unexpected}, "
                         f"shapes {shapes}")
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(tensors[k])
    return model
