"""The training step at paper scale: gradient accumulation, gradient checkpointing, device placement.

GLUE on the real MiniLM-L6 with real MRPC batches; the instruct case on a tiny random-init Llama
(SmolLM2's architecture family and target names) with uneven response lengths, where a mean of
micro-batch means is *not* the batch's per-token mean.
"""

import pytest
import torch
from torch.utils.data import DataLoader

from speft_bench.batches import IGNORE_INDEX, loss_terms, micro_batches
from speft_bench.config import validate
from speft_bench.device import resolve_device
from speft_bench.errors import ConfigError
from speft_bench.run import enable_gradient_checkpointing, forward_backward
from speft_bench.tasks import TASK_KINDS

from conftest import assert_close, compose_config, gradients, instruct_batch, prepare_method, saved_numels, tiny_llama

CPU = torch.device("cpu")
GLUE = ("task=mrpc", "task.max_length=48")
INSTRUCT = ("model=smollm2_135m", "task=gsm8k")


@pytest.fixture(scope="module")
def mrpc_batch():
    """16 real MRPC training pairs, tokenized and padded by the task's own collator."""
    from speft_bench.models import load_tokenizer, package_path

    typed = validate(compose_config("method=full", *GLUE))
    kind = TASK_KINDS["glue"](typed["task"], typed["paths"])
    data = kind.load_data(load_tokenizer(str(package_path(typed["model"].pretrained)), typed["model"]))
    return next(iter(DataLoader(data.train, batch_size=16, collate_fn=data.collate)))


def test_loss_terms_count_examples_or_shifted_response_tokens():
    batch = instruct_batch()
    assert loss_terms(batch) == sum(2 + i for i in range(16))
    first = {"labels": torch.tensor([[5, 6, IGNORE_INDEX]])}  # token t predicts label t+1: label 0 is never a target
    assert loss_terms(first) == 1
    assert loss_terms({"labels": torch.tensor([0, 1, 1])}) == 3
    assert [len(p["labels"]) for p in micro_batches(batch, 5)] == [5, 5, 5, 1]


@pytest.mark.parametrize("method", ["full", "lora", "speft"])
def test_4x4_accumulation_gives_the_gradients_of_one_batch_of_16_glue(minilm, mrpc_batch, method):
    extra = ("metric=gradient", "method.calibration_examples=16") if method == "speft" else ()
    model, spec = prepare_method(minilm(), (f"method={method}", *GLUE, *extra), mrpc_batch)
    model.eval()  # dropout would draw other masks in the two passes
    whole = forward_backward(model, mrpc_batch, 0, spec, CPU)
    reference = gradients(model)
    spec.micro_batch_size = 4
    accumulated = forward_backward(model, mrpc_batch, 0, spec, CPU)
    assert accumulated == pytest.approx(whole, rel=1e-5)
    assert_close(gradients(model), reference, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method", ["full", "spsft"])
def test_4x4_accumulation_gives_the_gradients_of_one_batch_of_16_instruct(method):
    batch = instruct_batch()
    extra = ("metric=l2", "method.r=4") if method == "spsft" else ()
    model, spec = prepare_method(tiny_llama(), (f"method={method}", *INSTRUCT, *extra), batch)
    model.eval()
    whole = forward_backward(model, batch, 0, spec, CPU)
    reference = gradients(model)
    spec.micro_batch_size = 4
    assert forward_backward(model, batch, 0, spec, CPU) == pytest.approx(whole, rel=1e-5)
    assert_close(gradients(model), reference, rtol=1e-4, atol=1e-6)
    # the rule matters: a mean of the 4 micro-batch means weights short responses up, and is off
    for piece in micro_batches(batch, 4):
        (model(**piece).loss / 4).backward()
    naive = gradients(model)
    off = sum((naive[n] - reference[n]).norm() ** 2 for n in reference) ** 0.5
    assert off > 0.05 * sum(g.norm() ** 2 for g in reference.values()) ** 0.5


@pytest.mark.parametrize("method", ["full", "lora", "dora", "pissa", "speft", "spsft"])
def test_gradient_checkpointing_gives_identical_gradients(method):
    batch = instruct_batch()
    extra = {"speft": ("metric=gradient", "method.calibration_examples=16"), "spsft": ("metric=l2", "method.r=4")}
    model, spec = prepare_method(tiny_llama(), (f"method={method}", *INSTRUCT, *extra.get(method, ())), batch)
    model.train()  # checkpointing only acts in training mode; the tiny Llama has no dropout
    plain_loss = forward_backward(model, batch, 0, spec, CPU)
    plain = gradients(model)
    enable_gradient_checkpointing(model)
    assert model.model.gradient_checkpointing
    checkpointed_loss = forward_backward(model, batch, 0, spec, CPU)
    assert checkpointed_loss == plain_loss
    assert_close(gradients(model), plain, rtol=0, atol=0)  # recomputation runs the same kernels


def test_gradient_checkpointing_saves_fewer_activations():
    batch = instruct_batch()
    model, spec = prepare_method(tiny_llama(), ("method=lora", *INSTRUCT), batch)
    model.train()
    plain = sum(saved_numels(lambda: model(**batch).loss.backward()))
    enable_gradient_checkpointing(model)
    checkpointed = sum(saved_numels(lambda: model(**batch).loss.backward()))
    assert checkpointed < 0.6 * plain


def test_device_knob_resolves_or_names_the_allowed_values():
    assert resolve_device("cpu") == CPU
    assert resolve_device("auto") == (torch.device("cuda") if torch.cuda.is_available() else CPU)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="train.device=cuda:1: torch sees no CUDA device"):
            resolve_device("cuda:1")
    with pytest.raises(ConfigError, match=r"train.device must be one of auto, cpu, cuda, cuda:N; got 'gpu'"):
        validate(compose_config("method=full", "task=mrpc", "train.device=gpu"))
    with pytest.raises(ConfigError, match="train.micro_batch_size=5 must divide train.batch_size=16"):
        validate(compose_config("method=full", "task=mrpc", "train.micro_batch_size=5"))
