"""The schema of method=lora|pissa|dora: ``conf/method/lora.yaml`` and the two options that inherit it."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from speft_bench.errors import check, check_positive
from speft_bench.schemas import MethodSchema, TargetScope, register_schema


class LoraInit(Enum):
    gaussian = "gaussian"  # peft's default: A Kaiming-uniform, B zero
    pissa = "pissa"  # principal singular vectors (PiSSA is an init option of LoRA)


@register_schema("method", "lora")
@dataclass
class LoraSchema(MethodSchema):
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: TargetScope = TargetScope.all
    init: LoraInit = LoraInit.gaussian
    use_dora: bool = False

    def __post_init__(self) -> None:
        check_positive("method.r", self.r)
        check_positive("method.alpha", self.alpha)
        check(0.0 <= self.dropout < 1.0, f"method.dropout must be in [0, 1), got {self.dropout}")
