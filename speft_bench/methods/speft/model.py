"""Sparse deltas on a model: attach/detach ``SparseDeltaLinear``, save/load adapters.

An adapter file is safetensors with, per wrapped layer, ``<name>.indices`` (k,) integer flat
positions into its (d_out, d_in) weight and ``<name>.values`` (k,) floats, plus JSON-encoded string
metadata (model id, targets, metric, budget, …) under a ``format`` marker.  ``load_adapter``
validates everything against the model before touching it, so a bad file never half-applies.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from speft_bench.adapters import (
    AdapterError,
    base_linear,
    check_origin,
    is_integer_dtype,
    layer_names,
    modules_of_type,
    read_adapter,
    wrap_linears,
    write_adapter,
)
from speft_bench.methods.speft.layer import SparseDeltaLinear, ValueGrad

ADAPTER_FORMAT = "speft-sparse-delta/1"
_PARTS = (".indices", ".values")


def sparse_deltas(model: nn.Module) -> dict[str, SparseDeltaLinear]:
    """The ``SparseDeltaLinear`` modules currently in ``model``, by module name."""
    return modules_of_type(model, SparseDeltaLinear)


def attach_sparse_deltas(model: nn.Module, indices: dict[str, Tensor],
                         value_grad: ValueGrad = "auto") -> dict[str, SparseDeltaLinear]:
    """Replace each named ``nn.Linear`` in place by a ``SparseDeltaLinear`` training ``indices[name]``.

    Only the wrapped base weights are frozen; all other ``requires_grad`` flags are the caller's.
    All names are checked before any module is replaced.
    """
    return wrap_linears(model, indices, lambda name, linear: SparseDeltaLinear(linear, indices[name], value_grad))


def value_grad_counts(layers: dict[str, SparseDeltaLinear], dtype: torch.dtype) -> dict[str, int]:
    """How many layers run each value-gradient kernel when the forward computes in ``dtype`` (for the record)."""
    kernels = [layer.value_grad(dtype) for layer in layers.values()]
    return {kernel: kernels.count(kernel) for kernel in ("sampled", "dense")}


def detach_sparse_deltas(model: nn.Module, merge: bool) -> dict[str, nn.Linear]:
    """Put plain ``nn.Linear`` modules back: with the delta added into W (``merge``) or without it.

    Without ``merge`` a pending ``merge()`` is undone; deltas committed by ``set_mask`` after a merge
    (earlier dynamic-mask rounds) stay in W.  Afterwards ``model.save_pretrained`` writes a checkpoint
    plain transformers loads.  Base weights stay frozen.
    """
    restored = {}
    for name, layer in sparse_deltas(model).items():
        if merge:
            layer.merge()
        elif layer.merged:
            layer.unmerge()
        model.set_submodule(name, layer.base)
        restored[name] = layer.base
    return restored


def save_adapter(path: str | Path, model: nn.Module, metadata: dict[str, Any]) -> None:
    """Write every attached delta's indices and values, and ``metadata`` (JSON-encoded per key)."""
    layers = sparse_deltas(model)
    if not layers:
        raise ValueError("save_adapter: the model has no SparseDeltaLinear layers")
    for name, layer in layers.items():
        if layer.merged or layer.base_changed:
            # the file stores deltas against the pretrained weights; here part of it lives in W
            raise ValueError(f"save_adapter: layer {name!r} has its delta (partly) merged into the base weight; "
                             f"unmerge() it, or export merged weights with detach_sparse_deltas(model, merge=True)")
    tensors = {}
    for name, layer in layers.items():
        tensors[f"{name}.indices"] = layer.indices.contiguous()
        tensors[f"{name}.values"] = layer.values.detach().contiguous()
    write_adapter(path, tensors, metadata, ADAPTER_FORMAT)


def load_adapter(path: str | Path, model: nn.Module, *, model_id: str | None = None,
                 targets: list[str] | None = None) -> dict[str, Any]:
    """Attach the adapter at ``path`` to ``model`` (or reset already attached layers) and return its metadata.

    Raises ``AdapterError`` naming the problem for an unreadable file, a foreign or malformed one,
    layers that are not linears of ``model``, invalid indices or values, or metadata that disagrees
    with ``model_id``/``targets`` when those are given.  The model is unchanged when it raises.
    """
    metadata, tensors = read_adapter(path, ADAPTER_FORMAT, "speft sparse-delta")
    check_origin(path, metadata, model_id, targets)
    deltas = {name: _checked_layer(path, model, name, tensors) for name in layer_names(path, tensors, _PARTS)}
    for name, (indices, values) in deltas.items():
        layer = model.get_submodule(name)
        if isinstance(layer, SparseDeltaLinear):
            layer.set_mask(indices)
        else:
            layer = attach_sparse_deltas(model, {name: indices})[name]
        order = indices.argsort()  # set_mask stores indices sorted; values must follow
        with torch.no_grad():
            layer.values.copy_(values[order])
    return metadata


def _checked_layer(path: str | Path, model: nn.Module, name: str, tensors: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """(indices, values) of layer ``name`` after checking them against the model's linear of that name."""
    where = f"{path}: layer {name!r}"
    module = base_linear(model, name, SparseDeltaLinear, where)
    indices, values = tensors[f"{name}.indices"], tensors[f"{name}.values"]
    if not is_integer_dtype(indices.dtype):
        raise AdapterError(f"{where}: indices must be integers, got {indices.dtype}")
    if not values.dtype.is_floating_point:
        raise AdapterError(f"{where}: values must be floating point, got {values.dtype}")
    if indices.ndim != 1 or values.ndim != 1 or len(indices) != len(values):
        raise AdapterError(f"{where}: indices {tuple(indices.shape)} and values {tuple(values.shape)} "
                           f"must be 1-D of the same length")
    numel = module.weight.numel()
    flat = indices.long()
    if len(flat) and (flat.min() < 0 or flat.max() >= numel):
        raise AdapterError(f"{where}: indices must lie in [0, {numel}) for its weight {tuple(module.weight.shape)}, "
                           f"found [{int(flat.min())}, {int(flat.max())}]")
    if flat.unique().numel() != len(flat):
        raise AdapterError(f"{where}: indices contain duplicates")
    if not torch.isfinite(values).all():
        raise AdapterError(f"{where}: values contain NaN or inf")
    return flat, values  # copy_ casts them to the layer's values dtype
