"""Schemas of the single-module methods: full and head take the base ``MethodSchema`` as is."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from speft_bench.errors import ConfigError
from speft_bench.schemas import MethodSchema, TaskKind, register_schema


@register_schema("method", "pretrained")
@dataclass
class PretrainedSchema(MethodSchema):
    """method=pretrained (methods/pretrained.py): the loaded model, evaluated as is."""

    def check_groups(self, typed: dict[str, Any]) -> None:
        super().check_groups(typed)
        kind = typed["task"].kind
        if kind is not TaskKind.instruct:  # a GLUE head would be freshly initialised: its score measures nothing
            raise ConfigError(f"method=pretrained needs a task whose model is used as loaded (task.kind=instruct), "
                              f"got task.kind={kind.name!r}; use method=head for a linear probe on GLUE")
