"""The schemas of method=spsft (``conf/method/spsft.yaml``) and of its qm_taylor importance's options.

Its metric is any neuron-importance metric of ``importance.py`` (``SPSFT.check``, with their flags).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

from speft_bench.errors import check, check_positive
from speft_bench.schemas import MethodSchema, MetricSchema, TargetScope, check_calibration, register_schema


@register_schema("method", "spsft")
@dataclass
class SpsftSchema(MethodSchema):
    metrics: ClassVar[Optional[tuple[str, ...]]] = None  # the registered neuron-importance metrics (SPSFT.check)

    targets: TargetScope = TargetScope.all  # mlp: the SPSFT paper's "FA" (attention frozen)
    r: Optional[int] = 16  # rows per target linear; r = 2R has about LoRA rank R's trainable count
    fraction: Optional[float] = None  # or this fraction of each layer's rows (when r is null)
    train_norms: bool = False  # also train the blocks' LayerNorm/RMSNorm weights and biases
    calibration_examples: int = 1024  # for data-driven importance (taylor, qm_taylor)
    calibration_batch_size: int = 16
    calibration_micro_batch: Optional[int] = None  # examples per forward/backward of importance; null: the whole batch
    calibration_mode: str = "eval"  # eval: dropout off while importance runs the model; train: dropout on

    def __post_init__(self) -> None:
        check_calibration(self)
        check((self.r is None) != (self.fraction is None),
              f"method.r and method.fraction: set exactly one (got r={self.r}, fraction={self.fraction})")
        check_positive("method.r", self.r, allow_none=True)
        check(self.fraction is None or 0.0 < self.fraction <= 1.0,
              f"method.fraction must be in (0, 1], got {self.fraction}")


@register_schema("metric", "qm_taylor")
@dataclass
class QmTaylorSchema(MetricSchema):
    quantiles: int = 11  # evenly spaced levels in [0, 1] averaged over labels; 11: eq. 7's 0 %, 10 %, …, 100 %

    def __post_init__(self) -> None:
        check(self.quantiles >= 2, f"metric.quantiles must be >= 2, got {self.quantiles}")
