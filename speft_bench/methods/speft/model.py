"""Sparse deltas on a model: attach/detach ``SparseDeltaLinear``, save/load adapters (``SparseDeltaTuner``).

An adapter file (``speft_bench.adapters``) holds, per wrapped layer, ``<name>.indices`` (k,) integer
flat positions into its (d_out, d_in) weight and ``<name>.values`` (k,) floats; after dynamic-mask
refreshes also ``<name>.base_indices`` and ``<name>.base_weight``: the positions where earlier masks'
deltas were merged into W and W's values there (so loading sets them exactly, with no re-summing).
Plus the dense tensors (head, other trained parameters) and JSON-encoded metadata (model id,
targets, metric, budget, …) under a ``format`` marker.  ``SPARSE_DELTAS.load`` validates everything
against the model before touching it, so a bad file never half-applies.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from speft_bench.adapters import AdapterError, is_integer_dtype, wrap_linears
from speft_bench.methods.sparse_tuner import SparseTuner
from speft_bench.methods.speft.layer import SparseDeltaLinear, ValueGrad

ADAPTER_FORMAT = "speft-sparse-delta/2"  # /1 held no head nor merged refreshes: not the trained model


class SparseDeltaTuner(SparseTuner):
    """SPEFT's tuner: ``SparseDeltaLinear`` layers, k values at flat indices, and the W entries earlier
    dynamic masks merged into (``base_indices``, ``base_weight``)."""

    layer = SparseDeltaLinear
    format = ADAPTER_FORMAT
    description = "speft sparse-delta"
    parts = (".indices", ".values")
    optional_parts = (".base_indices", ".base_weight")

    def attach(self, model: nn.Module, indices: dict[str, Tensor],
               value_grad: ValueGrad = "auto") -> dict[str, SparseDeltaLinear]:
        """Replace each named ``nn.Linear`` in place by a ``SparseDeltaLinear`` training ``indices[name]``.

        Only the wrapped base weights are frozen; all other ``requires_grad`` flags are the caller's.
        All names are checked before any module is replaced.
        """
        return wrap_linears(model, indices, lambda name, linear: SparseDeltaLinear(linear, indices[name], value_grad))

    def reselect(self, layer: SparseDeltaLinear, selection: Tensor) -> None:
        layer.set_mask(selection)

    def layer_tensors(self, name: str, layer: SparseDeltaLinear) -> dict[str, Tensor]:
        if layer.merged:  # the file stores the delta apart from W; here part of it lives in W
            raise ValueError(f"save: layer {name!r} has its delta merged into the base weight; "
                             f"unmerge() it, or export merged weights with SPARSE_DELTAS.detach(model, merge=True)")
        tensors = {".indices": layer.indices.contiguous(), ".values": layer.values.detach().contiguous()}
        if layer.base_changed:
            tensors |= {".base_indices": layer.base_touched, ".base_weight": layer.merged_entries()}
        return tensors

    def counts(self, layers: dict[str, SparseDeltaLinear]) -> dict[str, int]:
        return {"sparse_values": sum(layer.k for layer in layers.values()),
                "base_weight_entries": sum(layer.base_touched.numel() for layer in layers.values())}

    def checked_layer(self, where: str, linear: nn.Linear,
                      tensors: dict[str, Tensor]) -> tuple[Tensor, tuple[Tensor, tuple[Tensor, Tensor] | None]]:
        """(indices, (values, (base positions, W values there) or None)) after checking them against ``linear``."""
        values = tensors[".values"]
        indices = _checked_positions(where, linear, tensors[".indices"], values, "indices", "values")
        base = None
        if ".base_indices" in tensors:
            weight = tensors[".base_weight"]
            positions = _checked_positions(where, linear, tensors[".base_indices"], weight, "base_indices",
                                           "base_weight")

            base = positions, weight
        return indices, (values, base)

    @torch.no_grad()
    def restore(self, layer: SparseDeltaLinear, selection: Tensor,
                trained: tuple[Tensor, tuple[Tensor, Tensor] | None]) -> None:
        values, base = trained
        layer.values.data = values[selection.argsort()].to(layer.values.device)  # set_mask sorted the indices
        if base is not None:
            layer.restore_merged_entries(*base)

    def unwrap(self, layer: SparseDeltaLinear, merge: bool) -> nn.Linear:
        """With ``merge`` the delta is added into W; without it a pending ``merge()`` is undone.  Deltas
        committed by ``set_mask`` after a merge (earlier dynamic-mask rounds) stay in W either way."""
        if merge:
            layer.merge()
        elif layer.merged:
            layer.unmerge()
        return layer.base


SPARSE_DELTAS = SparseDeltaTuner()


def value_grad_counts(layers: dict[str, SparseDeltaLinear], dtype: torch.dtype) -> dict[str, int]:
    """How many layers run each value-gradient kernel when the forward computes in ``dtype`` (for the record)."""
    kernels = [layer.value_grad(dtype) for layer in layers.values()]
    return {kernel: kernels.count(kernel) for kernel in ("sampled", "dense")}


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
