"""The schema of method=speft (``conf/method/speft.yaml``); its metric is any salience metric (``SPEFT.check``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

from speft_bench.errors import check, check_positive
from speft_bench.schemas import MethodSchema, TargetScope, check_calibration, register_schema

VALUE_GRADS = ("auto", "sampled", "dense")  # SPEFT's value-gradient kernel (methods/speft/layer.py)


@register_schema("method", "speft")
@dataclass
class SpeftSchema(MethodSchema):
    metrics: ClassVar[Optional[tuple[str, ...]]] = None  # the registered salience metrics (SPEFT.check)
    uses_masking: ClassVar[bool] = True

    targets: TargetScope = TargetScope.all
    lora_rank: Optional[int] = 8  # budget = LoRA's trainable count at this rank on the same targets
    density: Optional[float] = None  # or a fraction of the target weights (when lora_rank is null)
    calibration_examples: int = 1024
    calibration_batch_size: int = 16
    calibration_micro_batch: Optional[int] = None  # examples per forward/backward of salience; null: the whole batch
    salience_offload: bool = False  # accumulate salience scores on the CPU (frees W of device memory)
    calibration_mode: str = "eval"  # eval: dropout off while salience runs the model; train: dropout on
    value_grad: str = "auto"  # auto: the cost model's cheaper kernel per layer; sampled | dense: forced

    def __post_init__(self) -> None:
        check(self.value_grad in VALUE_GRADS,
              f"method.value_grad must be one of {list(VALUE_GRADS)}, got {self.value_grad!r}")
        check_calibration(self)
        check((self.lora_rank is None) != (self.density is None),
              f"method.lora_rank and method.density: set exactly one "
              f"(got lora_rank={self.lora_rank}, density={self.density})")
        check_positive("method.lora_rank", self.lora_rank, allow_none=True)
        check(self.density is None or 0.0 < self.density <= 1.0,
              f"method.density must be in (0, 1], got {self.density}")
