"""On a CUDA device: placement, every method training in every precision, accumulation and
checkpointing equalities.  Skipped without a GPU; ``scripts/gpu_check.sh`` runs them.  Its rehearsal
(``REHEARSE=1``) runs them on the CPU (``SPEFT_TEST_DEVICE=cpu``), with the GPU image's library versions.

Only tiny random-init Llamas (no weights to download): the GPU machine has no network.
"""

import os

import pytest
import torch

from speft_bench import precision
from speft_bench.device import device_record, resolve_device
from speft_bench.run import enable_gradient_checkpointing, forward_backward
from tests.helpers import (
    assert_close,
    assert_micro_batches_of_4_match,
    gradients,
    instruct_batch,
    prepare_method,
    tiny_llama,
)

DEVICE = os.environ.get("SPEFT_TEST_DEVICE", "cuda")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(),
                                                  reason="needs a CUDA device")]
INSTRUCT = ("model=smollm2_135m", "task=gsm8k")
METHOD_OVERRIDES = {"full": (), "lora": (), "pissa": (), "dora": (),
                    "speft": ("metric=gradient", "method.calibration_examples=16"),
                    "spsft": ("metric=l2", "method.r=4")}


def on_device(batch: dict) -> dict:
    return {k: v.to(DEVICE) for k, v in batch.items()}


@pytest.mark.parametrize("train_precision", ["fp32", "bf16", "bf16-mixed"])
@pytest.mark.parametrize("method", sorted(METHOD_OVERRIDES))
def test_every_method_trains_on_cuda_in_every_precision(method, train_precision):
    device = resolve_device("auto" if DEVICE == "cuda" else DEVICE)
    assert device.type == DEVICE  # auto picks the GPU
    batch = instruct_batch()
    model = tiny_llama().to(device, precision.body_dtype(train_precision))
    overrides = (f"method={method}", *INSTRUCT, *METHOD_OVERRIDES[method], f"train.precision={train_precision}")
    model, spec = prepare_method(model, overrides, on_device(batch))
    info = precision.setup(model, spec)
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    model.train()
    losses = []
    for step in range(3):
        losses.append(forward_backward(model, batch, step, spec, device))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert all(p.device.type == DEVICE for p in model.parameters())
    assert all(p.dtype == torch.float32 for p in params), info  # fp32 masters (train.master_fp32=true)
    if train_precision == "bf16":
        frozen = [p for p in model.parameters() if not p.requires_grad]
        assert frozen == [] or all(p.dtype == torch.bfloat16 for p in frozen)
    assert any(not torch.equal(a, p.detach()) for a, p in zip(before, params))
    if DEVICE == "cuda":
        assert device_record(device)["peak_allocated_mb"] > 0


def test_accumulation_and_checkpointing_equalities_on_cuda():
    device = resolve_device(DEVICE)
    batch = instruct_batch()
    model, spec = prepare_method(tiny_llama().to(device), ("method=lora", *INSTRUCT), on_device(batch))
    model.train()
    whole, reference = assert_micro_batches_of_4_match(model, batch, spec, device)
    enable_gradient_checkpointing(model)
    assert forward_backward(model, batch, 0, spec, device) == pytest.approx(whole, rel=1e-6)
    assert_close(gradients(model), reference, rtol=1e-5, atol=1e-7)
