"""Adapter files of speft-bench's own tuners (SPEFT, SPSFT, head-only): reading, writing and the generic checks.

An adapter is a safetensors file of per-layer tensors, ``<layer name>.<part>``, plus *dense* tensors,
``dense/<parameter name>``: every parameter outside the tuner's layers that the run trained or
initialised itself (the task head, which no base checkpoint has; SPSFT's trained norms), so that the
file on the base model is the trained model.  String metadata: one JSON-encoded value per key plus a
``format`` marker that names the method and version.  Each tuner's ``load`` reads it with
:func:`read_adapter`, checks every tensor against the model with the helpers below, and only then
changes the model, so a bad file never half-applies.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

FILE = "adapter.safetensors"  # the adapter's name in a run folder
DENSE = "dense/"  # key prefix of the dense tensors: "/" never occurs in a module name


class AdapterError(ValueError):
    """An adapter file is unreadable, malformed, or does not fit the model."""


def keep_frozen_weight(ctx, weight: Tensor) -> None:
    """For a sparse tuner's autograd Function: hold the frozen base weight by reference, with its version.

    It is a parameter that lives anyway, so it is not a saved activation; the version lets backward
    refuse a weight edited in place mid-step, which would silently give wrong gradients.
    """
    ctx.weight, ctx.weight_version = weight, weight._version


def frozen_weight(ctx, layer: str) -> Tensor:
    """The weight :func:`keep_frozen_weight` held, after checking it was not changed since forward."""
    if ctx.weight._version != ctx.weight_version:
        raise RuntimeError(f"{layer}: the base weight changed between forward and backward "
                           "(edited in place during a step?)")
    return ctx.weight


def compute_dtype(x: Tensor, weight: Tensor) -> torch.dtype:
    """The dtype a sparse tuner's Function computes in: autocast's where autocast would cast the weight,
    else the weight's.

    Its input, frozen weight and trainable tensor (an fp32 master in a bf16 body) are all cast to it, so
    they meet in one dtype; the output comes out in it, and backward, which runs without autocast, takes
    it from ``grad_out``.  Like autocast, float64 is never cast.
    """
    device = x.device.type
    if torch.is_autocast_enabled(device) and weight.dtype != torch.float64:
        return torch.get_autocast_dtype(device)
    return weight.dtype


def is_integer_dtype(dtype: torch.dtype) -> bool:
    """Integer index dtypes (int8 … int64, uint8): not floating, complex or bool."""
    return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)


def linear_names(model: nn.Module) -> list[str]:
    """Distinct linear-layer names with block numbers folded (``layer.0.`` → ``layer.N.``), for messages."""
    names = (re.sub(r"\.\d+\.", ".N.", n) for n, m in model.named_modules() if isinstance(m, nn.Linear))
    return sorted(set(names))


def submodule(model: nn.Module, name: str) -> nn.Module | None:
    """``model.get_submodule(name)``, or None when there is no such module."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def module_kind(module: nn.Module | None) -> str:
    return "missing" if module is None else type(module).__name__


def base_linear(model: nn.Module, name: str, wrapper: type[nn.Module], where: str) -> nn.Linear:
    """The ``nn.Linear`` at ``name``, or the ``.base`` of a ``wrapper`` there; ``AdapterError`` otherwise."""
    module = submodule(model, name)
    if isinstance(module, wrapper):
        module = module.base
    if not isinstance(module, nn.Linear):
        raise AdapterError(f"{where} is not a linear layer of the model ({module_kind(module)}); linear layers are "
                           f"{', '.join(linear_names(model))}")
    return module


def dense_tensors(model: nn.Module, tuner: type[nn.Module] | None) -> dict[str, Tensor]:
    """The parameters an adapter must carry besides the ``tuner`` layers' own: the task head (trained, or
    as the run initialised it) and every other trainable parameter, in their dtypes (fp32 masters)."""
    from speft_bench.models import head_parameters

    own = set() if tuner is None else {id(p) for m in modules_of_type(model, tuner).values() for p in m.parameters()}
    head = head_parameters(model)
    return {name: p.detach() for name, p in model.named_parameters()
            if id(p) not in own and (p.requires_grad or name in head)}


def numel_of(tensors: dict[str, Tensor]) -> int:
    return sum(t.numel() for t in tensors.values())


def write_adapter(path: str | Path, tensors: dict[str, Tensor], metadata: dict[str, Any], fmt: str,
                  dense: dict[str, Tensor]) -> None:
    """Save the layers' ``tensors`` and the ``dense`` ones with ``metadata`` (each value JSON-encoded) under ``fmt``."""
    if "format" in metadata:
        raise ValueError("save: metadata key 'format' is reserved for the file format")
    header = {key: json.dumps(value) for key, value in metadata.items()} | {"format": fmt}
    everything = tensors | {DENSE + name: t.contiguous() for name, t in dense.items()}
    save_file(everything, str(path), metadata=header)


def read_adapter(path: str | Path, fmt: str, description: str
                 ) -> tuple[dict[str, Any], dict[str, Tensor], dict[str, Tensor]]:
    """Decoded metadata, the layers' tensors and the dense tensors of an adapter file in format ``fmt``,
    or ``AdapterError``.

    ``description`` names the expected kind of file in the error for a foreign one
    ("not a speft sparse-delta adapter").
    """
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except FileNotFoundError:
        raise AdapterError(f"{path}: no such adapter file") from None
    except Exception as err:  # safetensors raises its own error types for every malformed input
        raise AdapterError(f"{path}: not a readable safetensors file ({type(err).__name__}: {err})") from None
    if header.get("format") != fmt:
        raise AdapterError(f"{path}: not a {description} adapter (metadata format={header.get('format')!r}, "
                           f"expected {fmt!r})")
    try:
        metadata = {key: json.loads(value) for key, value in header.items() if key != "format"}
    except json.JSONDecodeError as err:
        raise AdapterError(f"{path}: metadata is not JSON-encoded ({err})") from None
    dense = {key.removeprefix(DENSE): tensors.pop(key) for key in list(tensors) if key.startswith(DENSE)}
    return metadata, tensors, dense


def checked_dense(path: str | Path, model: nn.Module, dense: dict[str, Tensor]) -> dict[nn.Parameter, Tensor]:
    """``{parameter: tensor}`` for the dense tensors, after checking each names a parameter of ``model`` of
    its shape and holds finite floats; ``AdapterError`` otherwise."""
    params = dict(model.named_parameters())
    checked = {}
    for name, tensor in dense.items():
        where = f"{path}: dense tensor {name!r}"
        if name not in params:
            raise AdapterError(f"{where} is not a parameter of the model")
        if tensor.shape != params[name].shape:
            raise AdapterError(f"{where} has shape {tuple(tensor.shape)}, the parameter {tuple(params[name].shape)}")
        if not tensor.dtype.is_floating_point or not torch.isfinite(tensor).all():
            raise AdapterError(f"{where} must hold finite floating-point values")
        checked[params[name]] = tensor
    return checked


@torch.no_grad()
def apply_dense(checked: dict[nn.Parameter, Tensor]) -> None:
    """Give each parameter its tensor, in the file's dtype (the trained one: an fp32 master stays fp32)."""
    for param, tensor in checked.items():
        param.data = tensor.to(param.device)


def check_origin(path: str | Path, metadata: dict[str, Any], model_id: str | None, targets: list[str] | None) -> None:
    """``AdapterError`` when the metadata names another model or other targets than the given ones."""
    if model_id is not None and metadata.get("model") != model_id:
        raise AdapterError(f"{path}: adapter was trained on model {metadata.get('model')!r}, not {model_id!r}")
    if targets is not None and metadata.get("targets") != list(targets):
        raise AdapterError(f"{path}: adapter targets {metadata.get('targets')!r}, expected {list(targets)!r}")


def layer_names(path: str | Path, tensors: dict[str, Tensor], parts: Sequence[str],
                optional: Sequence[str] = ()) -> list[str]:
    """Sorted layer names of the file; each layer must have exactly one tensor per suffix in ``parts``,
    and the ``optional`` suffixes all or none."""
    names = {key.rsplit(".", 1)[0] for key in tensors}
    if not names:
        raise AdapterError(f"{path}: adapter holds no layers")
    for key in tensors:
        if not key.endswith((*parts, *optional)):
            expected = " and ".join(f"'<layer>{part}'" for part in parts)
            raise AdapterError(f"{path}: unexpected tensor {key!r} (expected {expected})")
    for name in sorted(names):
        for part in parts:
            if name + part not in tensors:
                raise AdapterError(f"{path}: layer {name!r} has no {part[1:]} tensor")
        if 0 < sum(name + part in tensors for part in optional) < len(optional):
            raise AdapterError(f"{path}: layer {name!r} must have all of {', '.join(optional)} or none")
    return sorted(names)


def wrap_linears(model: nn.Module, names, wrap) -> dict[str, nn.Module]:
    """Replace each named ``nn.Linear`` in place by ``wrap(name, linear)``; return the wrappers.

    Every name is checked, and every wrapper built, before any module is replaced: a bad name or a
    wrapper that refuses its arguments leaves the model as it was.
    """
    for name in names:
        module = submodule(model, name)
        if not isinstance(module, nn.Linear):
            raise ValueError(f"{name!r} is not an nn.Linear of the model ({module_kind(module)}); linear layers are "
                             f"{', '.join(linear_names(model))}")
    layers = {name: wrap(name, model.get_submodule(name)) for name in names}
    for name, layer in layers.items():
        model.set_submodule(name, layer)
    return layers


def modules_of_type(model: nn.Module, kind: type) -> dict[str, nn.Module]:
    """The modules of ``model`` that are ``kind``, by name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, kind)}
