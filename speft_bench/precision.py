"""Numerical precision of a run (``train.precision``): the frozen body's dtype and the forward's autocast.

- ``fp32``: everything in float32.
- ``bf16``: the frozen body is stored and run in bfloat16.
- ``bf16-mixed``: weights stay float32; the forward runs under bfloat16 autocast.

SKELETON (being completed): trainable tensors keep an fp32 master copy unless ``train.master_fp32=false``.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
from torch import nn

from speft_bench.schemas import TrainSchema

BODY_DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16, "bf16-mixed": torch.float32}


def body_dtype(precision: str) -> torch.dtype:
    """The dtype the model's weights are loaded and kept in."""
    return BODY_DTYPE[precision]


def setup(model: nn.Module, spec: TrainSchema) -> dict[str, Any]:
    """Give the trainable tensors their dtype (fp32 masters); return what the record says about it."""
    return {"precision": spec.precision, "body_dtype": str(body_dtype(spec.precision)).removeprefix("torch.")}


def autocast(spec: TrainSchema, device: torch.device):
    """The context every forward of the run (training, salience, evaluation) runs in."""
    if spec.precision == "bf16-mixed":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()
