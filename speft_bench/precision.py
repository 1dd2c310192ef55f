"""Numerical precision of a run (``train.precision``, ``train.master_fp32``): weights' dtypes and the
forward's autocast.

- ``fp32``: everything in float32.
- ``bf16``: the frozen body is stored and run in bfloat16 (the model is loaded in it).
- ``bf16-mixed``: weights stay float32; the forward runs under bfloat16 autocast.

The trainable tensors (SPEFT's sparse values, SPSFT's W_f, LoRA's A/B and DoRA's magnitude, the
classification head, trained norms, every parameter for ``method=full``) are fp32 *masters* unless
``train.master_fp32=false``, in which case they keep the body's dtype (bf16 under ``bf16``; the flag
changes nothing under ``fp32`` and ``bf16-mixed``, whose body is fp32).  A master is the Parameter
the optimizer holds, in place in the model: its gradient arrives in fp32, so gradient accumulation,
clipping and AdamW's state are fp32, and SPEFT's dynamic masks, which resize ``values`` in place and
drop its optimizer state, keep working on the same object.

Where an fp32 master meets the bf16 body, the forward runs under bf16 autocast (``bf16`` with
masters, and ``bf16-mixed``): matmuls use a bf16 copy of the master, as in mixed-precision training
with master weights, while the frozen bf16 weights are used as they are; autocast keeps losses (and
on CUDA softmax and norms) in fp32.  SPEFT's and SPSFT's own autograd Functions compute in
autocast's dtype and return their gradients in the tensors' dtypes (``adapters.compute_dtype``);
peft casts LoRA's input to the adapter's dtype itself.  ``bf16`` without masters is pure bf16, no
autocast.  Under ``method=full`` every weight is trainable, so ``bf16`` with masters leaves no bf16
body: it computes as ``bf16-mixed`` from weights that were rounded to bf16 on loading.
"""

from __future__ import annotations

from collections import Counter
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn

from speft_bench.errors import ConfigError
from speft_bench.schemas import PRECISIONS, TrainSchema

BODY_DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16, "bf16-mixed": torch.float32}


def body_dtype(precision: str) -> torch.dtype:
    """The dtype the model's weights are loaded and kept in."""
    if precision not in BODY_DTYPE:
        raise ConfigError(f"train.precision must be one of {list(PRECISIONS)}, got {precision!r}")
    return BODY_DTYPE[precision]


def master_dtype(spec: TrainSchema) -> torch.dtype:
    """The dtype of the trainable tensors: float32 masters, or the body's (``train.master_fp32=false``)."""
    return torch.float32 if spec.master_fp32 else body_dtype(spec.precision)


def compute_dtype(spec: TrainSchema) -> torch.dtype:
    """The dtype the forward's matmuls run in (what SPEFT's kernel choice depends on)."""
    return torch.float32 if spec.precision == "fp32" else torch.bfloat16


def _uses_autocast(spec: TrainSchema) -> bool:
    return master_dtype(spec) != compute_dtype(spec) or body_dtype(spec.precision) != compute_dtype(spec)


def _numel_by_dtype(params) -> dict[str, int]:
    counts = Counter()
    for p in params:
        counts[str(p.dtype).removeprefix("torch.")] += p.numel()
    return dict(sorted(counts.items()))


def setup(model: nn.Module, spec: TrainSchema) -> dict[str, Any]:
    """Give the trainable tensors (``requires_grad``) their dtype in place; return what the record says about it.

    Call after the method's ``prepare`` and before the optimizer is built: the Parameter objects stay
    the same, only their data changes dtype.  Returns precision, master_fp32, the body, compute and
    master dtypes, whether forwards autocast, and the numel per dtype of the trainable and frozen parameters.
    """
    master = master_dtype(spec)
    params = list(model.parameters())
    for p in params:
        if p.requires_grad and p.is_floating_point() and p.dtype != master:
            p.data = p.data.to(master)
    return {
        "precision": spec.precision,
        "master_fp32": spec.master_fp32,
        "body_dtype": str(body_dtype(spec.precision)).removeprefix("torch."),
        "compute_dtype": str(compute_dtype(spec)).removeprefix("torch."),
        "autocast": _uses_autocast(spec),
        "trainable_dtypes": _numel_by_dtype(p for p in params if p.requires_grad),
        "frozen_dtypes": _numel_by_dtype(p for p in params if not p.requires_grad),
    }


def autocast(spec: TrainSchema, device: torch.device):
    """The context every forward of the run (training, salience, evaluation) runs in.

    Enter it per forward (or per optimizer step), never around ``optimizer.step()``: autocast caches its
    bf16 copies of the fp32 masters until the context exits.
    """
    if _uses_autocast(spec):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()
