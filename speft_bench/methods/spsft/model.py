"""Row deltas on a model: attach/detach ``RowDeltaLinear`` (detach can merge), save/load adapters (``RowDeltaTuner``).

An adapter file (``speft_bench.adapters``) holds, per wrapped layer, ``<name>.rows`` (r,) int64
output-row indices and ``<name>.delta`` (r, d_in) floats, plus JSON metadata (model id, targets,
metric, …) under the ``spsft-row-delta/2`` format marker, and the dense tensors (head, trained norms:
``speft_bench.adapters``).  ``ROW_DELTAS.load`` checks every layer
against the model before touching it, so a bad file never half-applies.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from speft_bench.adapters import AdapterError, submodule, wrap_linears
from speft_bench.methods.sparse_tuner import SparseTuner
from speft_bench.methods.spsft.layer import RowDeltaLinear, rows_problem

ADAPTER_FORMAT = "spsft-row-delta/2"  # /1 held no head nor trained norms: not the trained model


class RowDeltaTuner(SparseTuner):
    """SPSFT's tuner: ``RowDeltaLinear`` layers, a delta W_f on r chosen output rows of each."""

    layer = RowDeltaLinear
    format = ADAPTER_FORMAT
    description = "spsft row-delta"
    parts = (".rows", ".delta")

    def attach(self, model: nn.Module, rows: dict[str, Tensor]) -> dict[str, RowDeltaLinear]:
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

    def reselect(self, layer: RowDeltaLinear, selection: Tensor) -> None:
        layer.set_rows(selection)

    def layer_tensors(self, name: str, layer: RowDeltaLinear) -> dict[str, Tensor]:
        return {".rows": layer.rows.contiguous(), ".delta": layer.delta.detach().contiguous()}

    def counts(self, layers: dict[str, RowDeltaLinear]) -> dict[str, int]:
        return {"row_deltas": sum(layer.delta.numel() for layer in layers.values())}

    def checked_layer(self, where: str, linear: nn.Linear, tensors: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """(rows, delta) after checking them against ``linear``."""
        rows, delta = tensors[".rows"], tensors[".delta"]
        problem = rows_problem(rows, linear.out_features)
        if problem is not None:
            raise AdapterError(f"{where}: {problem} (its weight is {tuple(linear.weight.shape)})")
        if not delta.dtype.is_floating_point:
            raise AdapterError(f"{where}: delta must be floating point, got {delta.dtype}")
        if delta.shape != (len(rows), linear.in_features):
            raise AdapterError(f"{where}: delta must have shape (rows, d_in) = {(len(rows), linear.in_features)}, "
                               f"got {tuple(delta.shape)}")
        if not torch.isfinite(delta).all():
            raise AdapterError(f"{where}: delta contains NaN or inf")
        return rows.long(), delta

    def restore(self, layer: RowDeltaLinear, selection: Tensor, trained: Tensor) -> None:
        layer.delta.data = trained[selection.argsort()].to(layer.delta.device)  # set_rows sorted the rows

    def unwrap(self, layer: RowDeltaLinear, merge: bool) -> nn.Linear:
        """With ``merge`` W[rows] += W_f, so the linear computes the fine-tuned outputs; else W as it came."""
        return layer.merge() if merge else layer.base


ROW_DELTAS = RowDeltaTuner()
