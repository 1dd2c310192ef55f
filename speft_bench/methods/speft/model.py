"""Sparse deltas on a model: attach/detach ``SparseDeltaLinear``, save/load adapters.

An adapter file (``speft_bench.adapters``) holds, per wrapped layer, ``<name>.indices`` (k,) integer
flat positions into its (d_out, d_in) weight and ``<name>.values`` (k,) floats; after dynamic-mask
refreshes also ``<name>.base_indices`` and ``<name>.base_weight``: the positions where earlier masks'
deltas were merged into W and W's values there (so loading sets them exactly, with no re-summing).
Plus the dense tensors (head, other trained parameters) and JSON-encoded metadata (model id,
targets, metric, budget, …) under a ``format`` marker.  ``load_adapter`` validates everything
against the model before touching it, so a bad file never half-applies.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from speft_bench.adapters import (
    AdapterError,
    apply_dense,
    base_linear,
    checked_dense,
    check_origin,
    dense_tensors,
    is_integer_dtype,
    layer_names,
    numel_of,
    modules_of_type,
    read_adapter,
    wrap_linears,
    write_adapter,
)
from speft_bench.methods.speft.layer import SparseDeltaLinear, ValueGrad

ADAPTER_FORMAT = "speft-sparse-delta/2"  # /1 held no head nor merged refreshes: not the trained model
_PARTS = (".indices", ".values")
_BASE_PARTS = (".base_indices", ".base_weight")


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


def save_adapter(path: str | Path, model: nn.Module, metadata: dict[str, Any]) -> dict[str, int]:
    """Write every attached delta (and the W entries earlier masks changed), the dense tensors and ``metadata``;
    return the number of values per kind of tensor (for the record)."""
    layers = sparse_deltas(model)
    if not layers:
        raise ValueError("save_adapter: the model has no SparseDeltaLinear layers")
    for name, layer in layers.items():
        if layer.merged:  # the file stores the delta apart from W; here part of it lives in W
            raise ValueError(f"save_adapter: layer {name!r} has its delta merged into the base weight; "
                             f"unmerge() it, or export merged weights with detach_sparse_deltas(model, merge=True)")
    tensors = {}
    for name, layer in layers.items():
        tensors[f"{name}.indices"] = layer.indices.contiguous()
        tensors[f"{name}.values"] = layer.values.detach().contiguous()
        if layer.base_changed:
            tensors[f"{name}.base_indices"] = layer.base_touched
            tensors[f"{name}.base_weight"] = layer.merged_entries()
    dense = dense_tensors(model, SparseDeltaLinear)
    write_adapter(path, tensors, metadata, ADAPTER_FORMAT, dense)
    return {"sparse_values": sum(layer.k for layer in layers.values()),
            "base_weight_entries": sum(layer.base_touched.numel() for layer in layers.values()),
            "dense": numel_of(dense)}


def load_adapter(path: str | Path, model: nn.Module, *, model_id: str | None = None,
                 targets: list[str] | None = None) -> dict[str, Any]:
    """Attach the adapter at ``path`` to ``model`` (or reset already attached layers) and return its metadata.

    Raises ``AdapterError`` naming the problem for an unreadable file, a foreign or malformed one,
    layers that are not linears of ``model``, invalid indices or values, dense tensors that are not
    parameters of ``model``, or metadata that disagrees with ``model_id``/``targets`` when those are
    given.  The model is unchanged when it raises.  Values and dense tensors keep the file's dtype.
    """
    metadata, tensors, dense = read_adapter(path, ADAPTER_FORMAT, "speft sparse-delta")
    check_origin(path, metadata, model_id, targets)
    names = layer_names(path, tensors, _PARTS, _BASE_PARTS)
    deltas = {name: _checked_layer(path, model, name, tensors) for name in names}
    bases = {name: _checked_base(path, model, name, tensors) for name in names if f"{name}.base_indices" in tensors}
    params = checked_dense(path, model, dense)
    for name, (indices, values) in deltas.items():
        layer = model.get_submodule(name)
        if isinstance(layer, SparseDeltaLinear):
            layer.set_mask(indices)
        else:
            layer = attach_sparse_deltas(model, {name: indices})[name]
        with torch.no_grad():
            layer.values.data = values[indices.argsort()].to(layer.values.device)  # set_mask sorted the indices
            if name in bases:
                layer.restore_merged_entries(*bases[name])
    apply_dense(params)
    return metadata


def _checked_layer(path: str | Path, model: nn.Module, name: str, tensors: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """(indices, values) of layer ``name`` after checking them against the model's linear of that name."""
    where = f"{path}: layer {name!r}"
    module = base_linear(model, name, SparseDeltaLinear, where)
    return (_checked_positions(where, module, tensors[f"{name}.indices"], tensors[f"{name}.values"], "indices", "values"),
            tensors[f"{name}.values"])


def _checked_base(path: str | Path, model: nn.Module, name: str, tensors: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """(positions, W values) of layer ``name``'s merged refreshes, checked like its indices and values."""
    where = f"{path}: layer {name!r}"
    module = base_linear(model, name, SparseDeltaLinear, where)
    weight = tensors[f"{name}.base_weight"]
    return _checked_positions(where, module, tensors[f"{name}.base_indices"], weight, "base_indices", "base_weight"), weight


def _checked_positions(where: str, module: nn.Linear, indices: Tensor, values: Tensor, index_part: str,
                       value_part: str) -> Tensor:
    """``indices`` as int64 after checking them and their ``values`` against ``module``'s weight."""
    if not is_integer_dtype(indices.dtype):
        raise AdapterError(f"{where}: {index_part} must be integers, got {indices.dtype}")
    if not values.dtype.is_floating_point:
        raise AdapterError(f"{where}: {value_part} must be floating point, got {values.dtype}")
    if indices.ndim != 1 or values.ndim != 1 or len(indices) != len(values):
        raise AdapterError(f"{where}: {index_part} {tuple(indices.shape)} and {value_part} {tuple(values.shape)} "
                           f"must be 1-D of the same length")
    numel = module.weight.numel()
    flat = indices.long()
    if len(flat) and (flat.min() < 0 or flat.max() >= numel):
        raise AdapterError(f"{where}: {index_part} must lie in [0, {numel}) for its weight "
                           f"{tuple(module.weight.shape)}, found [{int(flat.min())}, {int(flat.max())}]")
    if flat.unique().numel() != len(flat):
        raise AdapterError(f"{where}: {index_part} contain duplicates")
    if not torch.isfinite(values).all():
        raise AdapterError(f"{where}: {value_part} contain NaN or inf")
    return flat
