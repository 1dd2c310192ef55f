"""Baseline methods on the real MiniLM-L6: trainable counts equal the closed form, outputs unchanged at init."""

import pytest
import torch

from speft_bench.config import validate
from speft_bench.methods import METHODS
from speft_bench.methods.base import MethodContext
from speft_bench.models import targets_for
from speft_bench.schemas import TargetScope
from tests.helpers import compose_config

# MiniLM-L6: 6 layers, hidden 384, intermediate 1536; head: classifier 384 -> 2 (+ bias).
LAYERS, H, FF = 6, 384, 1536
HEAD = H * 2 + 2
# (d_in, d_out) of each target scope's linears per layer
SHAPES = {"all": [(H, H)] * 4 + [(H, FF), (FF, H)], "mlp": [(H, FF), (FF, H)], "attention": [(H, H)] * 4}


def lora_count(r: int, scope: str = "all") -> int:
    return LAYERS * sum(r * (d_in + d_out) for d_in, d_out in SHAPES[scope])


def dora_magnitudes(scope: str = "all") -> int:
    return LAYERS * sum(d_out for _, d_out in SHAPES[scope])


def prepare(model, *overrides):
    cfg = compose_config("task=mrpc", *overrides)
    typed = validate(cfg)
    prepared = METHODS[typed["method"].name]().prepare(model, MethodContext(cfg, typed, calibration_batches=None))
    return prepared.model, typed


def trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.slow
@pytest.mark.parametrize(("overrides", "expected"), [
    (["method=lora", "method.r=8"], lora_count(8) + HEAD),
    (["method=lora", "method.r=4", "method.targets=mlp"], lora_count(4, "mlp") + HEAD),
    (["method=lora", "method.r=2", "method.targets=attention", "method.train_head=false"], lora_count(2, "attention")),
    (["method=pissa", "method.r=8"], lora_count(8) + HEAD),
    (["method=dora", "method.r=8"], lora_count(8) + dora_magnitudes() + HEAD),
    (["method=head"], HEAD),
])
def test_trainable_count_is_the_closed_form(minilm, overrides, expected):
    model, _ = prepare(minilm(), *overrides)
    assert trainable(model) == expected


def test_lora_r8_matches_the_issue_reference_count(minilm):
    # "equal trainable count 332k" in the SPEFT issue: peft's own injected adapters, counted by name
    model, _ = prepare(minilm(), "method=lora", "method.r=8")
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n and p.requires_grad)
    assert lora == 331_776 and trainable(model) == 331_776 + 770


def test_full_trains_everything(minilm):
    model, _ = prepare(minilm(), "method=full")
    assert trainable(model) == sum(p.numel() for p in model.parameters()) == 22_713_986


def test_targets_resolve_to_the_expected_linears(minilm):
    model, typed = minilm(), validate(compose_config("task=mrpc", "method=lora"))
    names = {s: list(targets_for(model, typed["model"], TargetScope[s])) for s in SHAPES}
    assert [len(names[s]) for s in ("all", "mlp", "attention")] == [36, 12, 24]
    assert "bert.encoder.layer.0.output.dense" in names["mlp"]
    assert "bert.encoder.layer.0.attention.output.dense" not in names["mlp"]
    assert not any("pooler" in n or "classifier" in n for n in names["all"])


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "pissa", "dora"])
def test_adapters_leave_the_function_unchanged_at_init(minilm, method):
    torch.manual_seed(0)
    batch = {"input_ids": torch.randint(1000, 2000, (2, 12)), "attention_mask": torch.ones(2, 12, dtype=torch.long)}
    model = minilm().eval()
    with torch.no_grad():
        before = model(**batch).logits
        model, _ = prepare(model, f"method={method}")
        after = model.eval()(**batch).logits
    torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(("method", "metric", "raises"), [
    ("speft", "gradient", True), ("spsft", "taylor", True), ("speft", "magnitude", False), ("speft", "synflow", False),
    ("spsft", "l2", False)])
def test_prepare_without_data_refuses_a_data_driven_metric(method, metric, raises):
    from speft_bench.errors import ConfigError
    from speft_bench.methods.base import prepare_without_data
    from tests.helpers import tiny_llama

    cfg = compose_config("task=gsm8k", "model=smollm2_135m", f"method={method}", f"metric={metric}")
    typed = validate(cfg)
    if raises:
        with pytest.raises(ConfigError, match=f"metric={metric} needs calibration data"):
            prepare_without_data(tiny_llama(), cfg, typed)
    else:
        model = prepare_without_data(tiny_llama(), cfg, typed).model
        assert 0 < trainable(model) < sum(p.numel() for p in model.parameters())
