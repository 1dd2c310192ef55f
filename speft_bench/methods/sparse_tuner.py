"""What SPEFT's and SPSFT's tuners share (peft's ``BaseTuner`` is the model): wrapping target linears, finding
the wrapped layers, writing and reading their adapter file, and putting plain linears back.

A :class:`SparseTuner` subclass names its layer type and its adapter format and says what differs: how
it wraps a linear (``attach``), what its layers store (``layer_tensors``, ``counts``), how a layer's
tensors are checked against its linear (``checked_layer``) and put back (``reselect``, ``restore``),
and how a layer becomes a plain linear again (``unwrap``).  The file format itself (per-layer tensors,
dense tensors, JSON metadata under a ``format`` marker) is ``speft_bench.adapters``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor, nn

from speft_bench.adapters import (
    FILE,
    apply_dense,
    base_linear,
    check_origin,
    checked_dense,
    dense_tensors,
    layer_names,
    modules_of_type,
    numel_of,
    read_adapter,
    write_adapter,
)


class SparseTuner:
    """Wraps target ``nn.Linear`` modules of a model in ``layer`` modules that train a selection of W.

    ``parts`` are the tensor suffixes every layer has in an adapter file, ``optional_parts`` those it
    has all or none of; ``description`` names the kind of file in errors ("not a … adapter").
    """

    layer: type[nn.Module]
    format: str
    description: str
    parts: tuple[str, ...]
    optional_parts: tuple[str, ...] = ()

    # ------------------------------------------------------------------ what a tuner supplies

    def attach(self, model: nn.Module, selections: dict[str, Tensor]) -> dict[str, nn.Module]:
        """Replace each named linear by a ``layer`` training ``selections[name]`` (``adapters.wrap_linears``)."""
        raise NotImplementedError

    def reselect(self, layer: nn.Module, selection: Tensor) -> None:
        """Make an attached layer train ``selection`` from zero."""
        raise NotImplementedError

    def layer_tensors(self, name: str, layer: nn.Module) -> dict[str, Tensor]:
        """What the adapter file stores of ``layer``, by part (suffix); ``ValueError`` if it cannot be saved."""
        raise NotImplementedError

    def counts(self, layers: dict[str, nn.Module]) -> dict[str, int]:
        """The number of values per kind of tensor in the layers (for the record)."""
        raise NotImplementedError

    def checked_layer(self, where: str, linear: nn.Linear, tensors: dict[str, Tensor]) -> tuple[Tensor, Any]:
        """(selection, the rest ``restore`` needs) of a layer's file ``tensors`` (by part), after checking
        them against its ``linear``; ``AdapterError`` (naming ``where``) otherwise."""
        raise NotImplementedError

    def restore(self, layer: nn.Module, selection: Tensor, trained: Any) -> None:
        """Give a layer that trains ``selection`` (as given, before the layer sorted it) its ``trained`` values."""
        raise NotImplementedError

    def unwrap(self, layer: nn.Module, merge: bool) -> nn.Linear:
        """The plain linear to put back for ``layer``: with its delta added into W (``merge``) or without it."""
        raise NotImplementedError

    # ------------------------------------------------------------------ shared

    def layers(self, model: nn.Module) -> dict[str, nn.Module]:
        """The ``layer`` modules currently in ``model``, by module name."""
        return modules_of_type(model, self.layer)

    def detach(self, model: nn.Module, merge: bool) -> dict[str, nn.Linear]:
        """Put plain ``nn.Linear`` modules back (``unwrap``); return them by name.  Base weights stay frozen,
        and afterwards ``model.save_pretrained`` writes a checkpoint plain transformers loads."""
        restored = {}
        for name, layer in self.layers(model).items():
            restored[name] = self.unwrap(layer, merge)
            model.set_submodule(name, restored[name])
        return restored

    def save(self, path: str | Path, model: nn.Module, metadata: dict[str, Any]) -> dict[str, int]:
        """Write every attached layer's tensors, the dense tensors and ``metadata`` (JSON-encoded per key);
        return the number of values per kind of tensor (for the record)."""
        layers = self.layers(model)
        if not layers:
            raise ValueError(f"save: the model has no {self.layer.__name__} layers")
        tensors = {name + part: tensor for name, layer in layers.items()
                   for part, tensor in self.layer_tensors(name, layer).items()}
        dense = dense_tensors(model, self.layer)
        write_adapter(path, tensors, metadata, self.format, dense)
        return self.counts(layers) | {"dense": numel_of(dense)}

    def load(self, path: str | Path, model: nn.Module, *, model_id: str | None = None,
             targets: list[str] | None = None) -> dict[str, Any]:
        """Attach the adapter at ``path`` to ``model`` (or reset already attached layers); return its metadata.

        Raises ``AdapterError`` naming the problem for an unreadable file, a foreign or malformed one,
        layers that are not linears of ``model``, layer tensors that do not fit them, dense tensors that
        are not parameters of ``model``, or metadata that disagrees with ``model_id``/``targets`` when
        those are given.  The model is unchanged when it raises.  Trained tensors keep the file's dtype.
        """
        metadata, tensors, dense = read_adapter(path, self.format, self.description)
        check_origin(path, metadata, model_id, targets)
        checked = {}
        for name in layer_names(path, tensors, self.parts, self.optional_parts):
            where = f"{path}: layer {name!r}"
            parts = {part: tensors[name + part] for part in (*self.parts, *self.optional_parts)
                     if name + part in tensors}
            checked[name] = self.checked_layer(where, base_linear(model, name, self.layer, where), parts)
        params = checked_dense(path, model, dense)
        for name, (selection, trained) in checked.items():
            layer = model.get_submodule(name)
            if isinstance(layer, self.layer):
                self.reselect(layer, selection)
            else:
                layer = self.attach(model, {name: selection})[name]
            self.restore(layer, selection, trained)
        apply_dense(params)
        return metadata

    def save_run(self, run_dir: Path, model: nn.Module, metadata: dict[str, Any]) -> dict[str, Any]:
        """``Prepared.save``: the adapter written into the run folder, and what the record says of it."""
        return {"path": FILE, "format": self.format, "numel": self.save(run_dir / FILE, model, metadata)}

    def load_run(self, model: nn.Module, run_dir: Path, model_id: str) -> nn.Module:
        """``Method.load``: ``model`` with the run folder's adapter applied."""
        self.load(run_dir / FILE, model, model_id=model_id)
        return model
