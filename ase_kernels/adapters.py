"""Adapters on disk: the routers and experts of a model's ASE modules, with their options, in one safetensors file.

File layout: one tensor per trainable ASE parameter, named as in ``model.state_dict()`` (``blocks.0.mlp.router``,
``blocks.0.mlp.experts.ffn.A``, ...), in the parameter's dtype, and the ``extra`` parameters asked for (a head, a
task embedding: whatever else was trained); the safetensors metadata holds ``format = "ase_kernels.adapters"``,
``version = "1"``, ``modules``, a JSON object mapping each ASE module's name to ``{"type": "ASEMlp" |
"MoELoRALinear" | "ASEFFN" | "ASESplitFFN", "options": {...}}`` (the options :func:`ak.convert` takes; a split FFN
adds ``"output"``, the name of its second projection), and ``extra``, a JSON list of the extra tensors' names.
The frozen base weights are not in the file: they come from the model's own checkpoint. Nothing trained is left
out silently: :func:`save_adapters` refuses a model with other trainable parameters unless they are named.
"""

import fnmatch
import json
import os
from collections.abc import Iterable

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .convert import _pair_problem, _some, convert_module, convert_pair, converted_type, trainable_outside
from .modules import adapter_parameters, ase_modules
from .split_ffn import ASESplitFFN, ASESplitFFNOutput

FORMAT, VERSION = "ase_kernels.adapters", "1"


def _specs(model: nn.Module) -> dict[str, dict]:
    """The spec of each ASE module of model by name: type, options, and a split FFN's second projection."""
    names = {m: n for n, m in model.named_modules()}
    outputs = {m.first: n for n, m in model.named_modules() if isinstance(m, ASESplitFFNOutput)}
    specs = {}
    for m in ase_modules(model):
        specs[names[m]] = {"type": type(m).__name__, "options": m.options()}
        if isinstance(m, ASESplitFFN):
            specs[names[m]]["output"] = outputs.get(m)
    return specs


def _differences(name: str, saved: dict, present: dict) -> list[str]:
    """The type, options and second projection in which a module differs from its saved spec, one entry each."""
    file, model = ({"type": spec["type"], **spec["options"], "output": spec.get("output")} for spec in (saved, present))
    return [f"{name}: {key} file {file.get(key)!r}, model {model.get(key)!r}" for key in {**file, **model}
            if file.get(key) != model.get(key)]


def _extras(model: nn.Module, extra: Iterable[str]) -> dict[str, nn.Parameter]:
    """The parameters of model (other than routers and experts) that the extra patterns name (fnmatch on the full
    parameter name); every pattern must name one."""
    patterns = [extra] if isinstance(extra, str) else list(extra)
    if not all(isinstance(p, str) for p in patterns):
        raise TypeError(f"extra must be parameter-name patterns (str), got {extra!r}")
    adapters = adapter_parameters(model)
    params = {n: p for n, p in model.named_parameters() if n not in adapters}
    unmatched = [p for p in patterns if not any(fnmatch.fnmatchcase(n, p) for n in params)]
    if unmatched:
        raise ValueError(f"extra patterns {unmatched} match no parameter of {type(model).__name__} (besides the ASE "
                         f"routers and experts; its parameter names look like {list(params)[:6]})")
    return {n: p for n, p in params.items() if any(fnmatch.fnmatchcase(n, pat) for pat in patterns)}


def save_adapters(model: nn.Module, path: str | os.PathLike, *, extra: Iterable[str] = ()) -> None:
    """Write the routers and experts of every ASE module of model, and their options, to one safetensors file.

    Args:
        model: a model with ASE modules (from :func:`ak.convert`, or built with them).
        path: the file to write (``.safetensors`` by convention).
        extra: parameter-name patterns (``fnmatch`` on the full name: ``"head.*"``, ``"task_embed"``) of other
            parameters to save with them: what trained beside the experts (PEFT's ``modules_to_save``).

    Raises:
        ValueError when parameters outside the ASE routers and experts require grad and extra does not name them
        (the file would silently leave trained weights out): it names the first few and how many, and the two ways
        on, freezing them or naming them in extra; also for extra patterns that match no parameter, and for a
        split FFN whose second projection is not inside model.

    Example:
        >>> ak.save_adapters(vit, "ase.safetensors", extra=["head.*"])  # doctest: +SKIP
    """
    specs = _specs(model)
    if not specs:
        raise ValueError(f"{type(model).__name__} has no ASE modules to save: convert it first (ak.convert)")
    orphans = [n for n, spec in specs.items() if "output" in spec and spec["output"] is None]
    if orphans:  # the file could not name the second projection to convert on load
        raise ValueError(f"the split FFNs {orphans} have no ASESplitFFNOutput inside {type(model).__name__}: save the "
                         "model that holds both projections")
    extras = _extras(model, extra)
    left = {n: p for n, p in trainable_outside(model).items() if n not in extras}
    if left:
        count = sum(p.numel() for p in left.values())
        heads = sorted({n.rsplit(".", 1)[0] + ".*" if "." in n else n for n in list(left)[:3]})
        raise ValueError(f"{type(model).__name__} has {count:,} trainable parameters in {len(left)} tensors outside "
                         f"the ASE modules, which the adapter file would leave out: {_some(list(left), 5)}. Freeze "
                         f"them (requires_grad_(False)) or save them too with extra=[...] (e.g. extra={heads})")
    tensors = {k: t.detach().contiguous().cpu() for k, t in {**adapter_parameters(model), **extras}.items()}
    metadata = {"format": FORMAT, "version": VERSION, "modules": json.dumps(specs), "extra": json.dumps(list(extras))}
    save_file(tensors, os.fspath(path), metadata=metadata)


def load_adapters(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load routers and experts saved by :func:`save_adapters` into model, converting a plain model first.

    Args:
        model: the model the adapters were trained on, plain (it is converted as the file says, in place) or
            already converted with the same modules and options.
        path: a file written by :func:`save_adapters`.

    Returns:
        model. The tensors are copied into its parameters (cast to their dtype and device), the extra parameters
        saved with ``extra=`` included.

    Raises:
        ValueError naming the modules missing on either side, the modules whose type or options differ, the
        extra parameters the model lacks or holds in another shape, and the tensors missing, unexpected or of
        another shape; nothing is loaded then (a plain model whose module names and types fit may be left
        converted, with fresh experts, when only the tensor shapes or the extra parameters differ).

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
        extra = json.loads(metadata.get("extra", "[]"))  # files written before extras existed have none
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    present = _specs(model)
    if not present:
        _convert_as_saved(model, saved, path)
        present = _specs(model)
    missing, unexpected = sorted(set(saved) - set(present)), sorted(set(present) - set(saved))
    if missing or unexpected:
        raise ValueError(f"{path} does not fit the model's ASE modules: in the file only {missing}, in the model only "
                         f"{unexpected}")
    differ = [d for n, spec in present.items() for d in _differences(n, saved[n], spec)]
    if differ:
        raise ValueError(f"{path} was saved with other ASE options: {differ}")
    params = adapter_parameters(model)
    others = {n: p for n, p in model.named_parameters() if n not in params}
    misfits = [f"{k}: not in the model" if k not in others else
               f"{k}: file {tuple(tensors[k].shape)}, model {tuple(others[k].shape)}"
               for k in extra if k not in others or (k in tensors and tensors[k].shape != others[k].shape)]
    if misfits:
        raise ValueError(f"{path} holds extra parameters that do not fit {type(model).__name__}: {misfits}")
    params |= {k: others[k] for k in extra}
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


def _convert_as_saved(model: nn.Module, saved: dict, path: str) -> None:
    """Convert a plain model as the file's specs say, once every named module is there and of a fitting type."""
    plain = dict(model.named_modules())
    absent = sorted({n for name, spec in saved.items() for n in (name, spec.get("output", name))} - set(plain))
    if absent:
        raise ValueError(f"{path} has adapters for modules that {type(model).__name__} lacks: {absent}")
    wrong = []
    for n, spec in saved.items():
        if spec["type"] == "ASESplitFFN":
            problem = _pair_problem(plain[n], plain[spec["output"]])
            wrong += [f"{n}: the file has a split FFN ending at {spec['output']}, but {problem}"] if problem else []
        elif converted_type(plain[n]) != spec["type"]:
            wrong.append(f"{n}: the file has {spec['type']}, {type(plain[n]).__name__} converts to "
                         f"{converted_type(plain[n])}")
    if wrong:
        raise ValueError(f"{path} does not fit {type(model).__name__}: {wrong}")
    for name, spec in saved.items():
        if spec["type"] == "ASESplitFFN":
            convert_pair(model, name, spec["output"], spec["options"])
        else:
            convert_module(model, name, spec["options"])
