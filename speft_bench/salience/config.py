"""Schemas of the salience metrics with options (grasp, synflow, fisher); the others take ``MetricSchema``.

A schema's fields are its metric function's keyword options (tests/test_configs.py checks it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from speft_bench.errors import ConfigError, check, check_positive
from speft_bench.schemas import MetricSchema, TaskKind, register_schema

# metric.variant of grasp, synflow and fisher: paper: the SPEFT paper's written formula; reference: what
# the authors' code (0-ml/speft, model/sparse_peft.py) computes, which produced the published numbers.
METRIC_VARIANTS = ("paper", "reference")


@register_schema("metric", "grasp", "synflow")
@dataclass
class VariantMetricSchema(MetricSchema):
    """A metric whose paper formula and the authors' code differ (README: "Paper formulas vs the authors' code")."""

    variant: str = "paper"

    def __post_init__(self) -> None:
        check(self.variant in METRIC_VARIANTS,
              f"metric.variant must be one of {list(METRIC_VARIANTS)}, got {self.variant!r}")


@register_schema("metric", "fisher")
@dataclass
class FisherSchema(VariantMetricSchema):
    micro_batch: int = 1  # 1: exact per-example gradients; larger: faster, approximate

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive("metric.micro_batch", self.micro_batch)
        check(self.variant == "paper" or self.micro_batch == 1,
              f"metric.micro_batch={self.micro_batch} with metric.variant=reference: the authors' code takes one "
              f"example per gradient (leave metric.micro_batch at 1)")

    def check_groups(self, typed: dict[str, Any]) -> None:
        """The reference variant needs class labels (GLUE classification): each label becomes a token type."""
        task = typed["task"]
        if self.variant == "reference" and (task.kind is not TaskKind.glue or task.is_regression):
            raise ConfigError(f"metric=fisher metric.variant=reference makes each label a token type (the authors' "
                              f"positional call), so it needs a classification task; task={task.name} is not one "
                              f"(use metric.variant=paper)")
