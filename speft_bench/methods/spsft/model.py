"""Row deltas on a model: attach/detach ``RowDeltaLinear`` (detach can merge), save/load adapters.

An adapter file (``speft_bench.adapters``) holds, per wrapped layer, ``<name>.rows`` (r,) int64
output-row indices and ``<name>.delta`` (r, d_in) floats, plus JSON metadata (model id, targets,
metric, …) under the ``spsft-row-delta/2`` format marker, and the dense tensors (head, trained norms:
``speft_bench.adapters``).  ``load_adapter`` checks every layer
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
    layer_names,
    numel_of,
    modules_of_type,
    read_adapter,
    submodule,
    wrap_linears,
    write_adapter,
)
from speft_bench.methods.spsft.layer import RowDeltaLinear, rows_problem

ADAPTER_FORMAT = "spsft-row-delta/2"  # /1 held no head nor trained norms: not the trained model
_PARTS = (".rows", ".delta")


def row_deltas(model: nn.Module) -> dict[str, RowDeltaLinear]:
    """The ``RowDeltaLinear`` modules currently in ``model``, by module name."""
    return modules_of_type(model, RowDeltaLinear)


def attach_row_deltas(model: nn.Module, rows: dict[str, Tensor]) -> dict[str, RowDeltaLinear]:
    """Replace each named ``nn.Linear`` in place by a ``RowDeltaLinear`` training ``rows[name]`` (r,).

    Only the wrapped base weights are frozen; all other ``requires_grad`` flags are the caller's.
    All names and rows are checked before any module is replaced.
    """
    for name, selection in rows.items():
        module = submodule(model, name)
        problem = rows_problem(selection, module.out_features) if isinstance(module, nn.Linear) else None
        if problem is not None:
            raise ValueError(f"{name!r}: {problem}")
    return wrap_linears(model, rows, lambda name, linear: RowDeltaLinear(linear, rows[name]))


def detach_row_deltas(model: nn.Module, merge: bool) -> dict[str, nn.Linear]:
    """Put the plain ``nn.Linear`` modules back, with W[rows] += W_f (``merge``) or unchanged.

    After merging, ``model.save_pretrained`` writes a checkpoint that plain transformers loads with
    the fine-tuned outputs.  Base weights stay frozen.
    """
    restored = {}
    for name, layer in row_deltas(model).items():
        restored[name] = layer.merge() if merge else layer.base
        model.set_submodule(name, restored[name])
    return restored


def save_adapter(path: str | Path, model: nn.Module, metadata: dict[str, Any]) -> dict[str, int]:
    """Write every attached layer's rows and delta, the dense tensors and ``metadata`` (JSON-encoded per key);
    return the number of values per kind of tensor (for the record)."""
    layers = row_deltas(model)
    if not layers:
        raise ValueError("save_adapter: the model has no RowDeltaLinear layers")
    tensors = {}
    for name, layer in layers.items():
        tensors[f"{name}.rows"] = layer.rows.contiguous()
        tensors[f"{name}.delta"] = layer.delta.detach().contiguous()
    dense = dense_tensors(model, RowDeltaLinear)
    write_adapter(path, tensors, metadata, ADAPTER_FORMAT, dense)
    return {"row_deltas": sum(layer.delta.numel() for layer in layers.values()),
            "dense": numel_of(dense)}


def load_adapter(path: str | Path, model: nn.Module, *, model_id: str | None = None,
                 targets: list[str] | None = None) -> dict[str, Any]:
    """Attach the adapter at ``path`` to ``model`` (or reset already attached layers); return its metadata.

    Raises ``AdapterError`` naming the problem for an unreadable file, a foreign or malformed one,
    layers that are not linears of ``model``, invalid rows or deltas, dense tensors that are not
    parameters of ``model``, or metadata that disagrees with ``model_id``/``targets`` when those are
    given.  The model is unchanged when it raises.  Deltas and dense tensors keep the file's dtype.
    """
    metadata, tensors, dense = read_adapter(path, ADAPTER_FORMAT, "spsft row-delta")
    check_origin(path, metadata, model_id, targets)
    deltas = {name: _checked_layer(path, model, name, tensors) for name in layer_names(path, tensors, _PARTS)}
    params = checked_dense(path, model, dense)
    for name, (rows, delta) in deltas.items():
        layer = model.get_submodule(name)
        if isinstance(layer, RowDeltaLinear):
            layer.set_rows(rows)
        else:
            layer = attach_row_deltas(model, {name: rows})[name]
        # set_rows stores rows sorted; delta rows follow
        layer.delta.data = delta[rows.argsort()].to(layer.delta.device)
    apply_dense(params)
    return metadata


def _checked_layer(path: str | Path, model: nn.Module, name: str, tensors: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """(rows, delta) of layer ``name`` after checking them against the model's linear of that name."""
    where = f"{path}: layer {name!r}"
    module = base_linear(model, name, RowDeltaLinear, where)
    rows, delta = tensors[f"{name}.rows"], tensors[f"{name}.delta"]
    problem = rows_problem(rows, module.out_features)
    if problem is not None:
        raise AdapterError(f"{where}: {problem} (its weight is {tuple(module.weight.shape)})")
    if not delta.dtype.is_floating_point:
        raise AdapterError(f"{where}: delta must be floating point, got {delta.dtype}")
    if delta.shape != (len(rows), module.in_features):
        raise AdapterError(f"{where}: delta must have shape (rows, d_in) = {(len(rows), module.in_features)}, "
                           f"got {tuple(delta.shape)}")
    if not torch.isfinite(delta).all():
        raise AdapterError(f"{where}: delta contains NaN or inf")
    return rows.long(), delta
