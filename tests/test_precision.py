"""train.precision × every method on tiny random-init models (a BERT classifier, a Llama causal LM).

Each case loads the model in ``precision.body_dtype``, prepares the method (under ``precision.autocast``,
as every forward), runs ``precision.setup`` and a few AdamW steps through the recipe's own
``forward_backward`` (two micro-batches per step), then checks the masters', the body's and the
gradients' dtypes and that training did something.
"""

import math

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from speft_bench import precision
from speft_bench.batches import micro_batches
from speft_bench.config import validate
from speft_bench.errors import ConfigError
from speft_bench.methods import METHODS
from speft_bench.methods.base import MethodContext
from speft_bench.methods.speft.layer import SparseDeltaLinear
from speft_bench.methods.speft.model import SPARSE_DELTAS, value_grad_counts
from speft_bench.methods.spsft.layer import RowDeltaLinear
from speft_bench.run import forward_backward
from speft_bench.schemas import TrainSchema
from tests.helpers import compose_config, instruct_batch, tiny_llama

pytestmark = pytest.mark.slow  # every test here trains, saves or sweeps

CPU = torch.device("cpu")
PRECISIONS = ["fp32", "bf16", "bf16-mixed"]
CALIBRATION = ("method.calibration_examples=16", "method.calibration_batch_size=8")
METHOD_OVERRIDES = {
    "full": (), "head": (), "lora": (), "pissa": (), "dora": (),
    "speft": ("metric=gradient", *CALIBRATION),
    "spsft": ("metric=taylor", "method.r=4", "method.train_norms=true", *CALIBRATION),  # norms train too
}
MODELS = {"classifier": ("model=minilm_l6", "task=mrpc"), "causal_lm": ("model=smollm2_135m", "task=gsm8k")}
# a causal LM has no classification head: method=head is refused there
CASES = [(kind, method) for kind in MODELS for method in METHOD_OVERRIDES if (kind, method) != ("causal_lm", "head")]


def tiny_bert():
    """A 2-layer random-init BERT classifier, hidden 64 (MiniLM's family and target names), seed 0."""
    torch.manual_seed(0)
    config = BertConfig(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=64, num_labels=2)
    return BertForSequenceClassification(config)


def classifier_batch(n: int = 16, width: int = 12) -> dict:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 97, (n, width), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "labels": torch.randint(0, 2, (n,), generator=gen)}


def prepared(kind: str, method: str, *overrides: str):
    """(Prepared, train spec, batch): ``method`` on the tiny model of ``kind``, loaded in the precision's body dtype."""
    cfg = compose_config(f"method={method}", *MODELS[kind], *METHOD_OVERRIDES[method], "train.micro_batch_size=8",
                         *overrides)
    typed = validate(cfg)
    spec = typed["train"]
    batch = classifier_batch() if kind == "classifier" else instruct_batch()
    model = (tiny_bert if kind == "classifier" else tiny_llama)().to(precision.body_dtype(spec.precision))
    ctx = MethodContext(cfg, typed, lambda round_, n, size: micro_batches(batch, size))
    with precision.autocast(spec, CPU):
        return METHODS[method]().prepare(model, ctx), spec, batch


def train(prep, spec: TrainSchema, batch: dict, steps: int = 4) -> list[float]:
    """AdamW steps as the recipe takes them (refresh hook, accumulated forward/backward, clipping); the losses."""
    params = [p for p in prep.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)  # no decay: a change means a gradient
    prep.model.train()
    losses = []
    for step in range(steps):
        if prep.on_step is not None:
            with precision.autocast(spec, CPU):  # a refresh recomputes salience: a forward like any other
                prep.on_step(step, optimizer)
        losses.append(forward_backward(prep.model, batch, step, spec, CPU))
        assert all(p.grad.dtype == p.dtype for p in params if p.grad is not None)  # accumulated in the masters' dtype
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return losses


def trainable(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("train_precision", PRECISIONS)
@pytest.mark.parametrize(("kind", "method"), CASES)
def test_every_method_trains_in_every_precision_with_fp32_masters(kind, method, train_precision):
    prep, spec, batch = prepared(kind, method, f"train.precision={train_precision}")
    info = precision.setup(prep.model, spec)
    params = trainable(prep.model)
    frozen = [p for p in prep.model.parameters() if not p.requires_grad]
    before = {n: p.detach().clone() for n, p in params.items()}
    losses = train(prep, spec, batch)

    assert all(math.isfinite(loss) for loss in losses) and losses[-1] < losses[0], losses
    # every trainable moved (a global mask may leave a layer no entries)
    assert [n for n, p in params.items() if p.numel() and torch.equal(p.detach(), before[n])] == []
    assert all(p.dtype == torch.float32 for p in params.values())
    body = precision.body_dtype(train_precision)
    assert all(p.dtype == body for p in frozen) and (frozen == []) == (method == "full")
    assert info == {
        "precision": train_precision, "master_fp32": True, "body_dtype": str(body).removeprefix("torch."),
        "compute_dtype": "float32" if train_precision == "fp32" else "bfloat16",
        "autocast": train_precision != "fp32",
        "trainable_dtypes": {"float32": sum(p.numel() for p in params.values())},
        "frozen_dtypes": {str(body).removeprefix("torch."): sum(p.numel() for p in frozen)} if frozen else {},
    }


@pytest.mark.parametrize(("kind", "method"), CASES)
def test_without_masters_bf16_trains_in_bf16_throughout(kind, method):
    prep, spec, batch = prepared(kind, method, "train.precision=bf16", "train.master_fp32=false")
    info = precision.setup(prep.model, spec)
    before = {n: p.detach().clone() for n, p in trainable(prep.model).items()}
    losses = train(prep, spec, batch)
    assert all(math.isfinite(loss) for loss in losses)
    assert [n for n, p in trainable(prep.model).items() if p.numel() and torch.equal(p.detach(), before[n])] == []
    assert {p.dtype for p in prep.model.parameters()} == {torch.bfloat16}
    assert not info["autocast"] and list(info["trainable_dtypes"]) == ["bfloat16"]


def test_dynamic_masks_resize_the_same_fp32_masters_in_a_bf16_body():
    prep, spec, batch = prepared("causal_lm", "speft", "train.precision=bf16", "masking=dynamic_global",
                                 "masking.interval=2")
    layers = SPARSE_DELTAS.layers(prep.model)
    values = {name: layer.values for name, layer in layers.items()}
    precision.setup(prep.model, spec)
    assert all(layers[name].values is v and v.dtype == torch.float32 for name, v in values.items())  # cast in place
    masks = {name: layer.indices.clone() for name, layer in layers.items()}
    losses = train(prep, spec, batch)  # refreshes before step 2: merge into W, new mask, Adam state dropped
    assert all(math.isfinite(loss) for loss in losses) and [r["step"] for r in prep.info["refreshes"]] == [2]
    assert any(not torch.equal(layer.indices, masks[name]) for name, layer in layers.items())
    for name, layer in layers.items():
        assert layer.values is values[name] and layer.values.dtype == torch.float32
        assert layer.base.weight.dtype == torch.bfloat16
        assert torch.equal(layer.base_touched, masks[name].long())  # the first mask's entries were merged into W


@pytest.mark.parametrize(("value_grad", "expected"), [("auto", "dense"), ("sampled", "sampled"), ("dense", "dense")])
def test_method_value_grad_reaches_every_layer(value_grad, expected):
    prep, spec, _ = prepared("causal_lm", "speft", "train.precision=bf16", f"method.value_grad={value_grad}")
    layers = SPARSE_DELTAS.layers(prep.model)
    assert {layer.value_grad_mode for layer in layers.values()} == {value_grad}
    # auto: on layers this small the transposes cost more than the whole dense product
    other = {"sampled": "dense", "dense": "sampled"}[expected]
    assert value_grad_counts(layers, precision.compute_dtype(spec)) == {expected: len(layers), other: 0}


@pytest.mark.parametrize(("train_precision", "master_fp32", "body", "autocast"), [
    ("fp32", True, torch.float32, False),
    ("bf16", True, torch.bfloat16, True),
    ("bf16", False, torch.bfloat16, False),
    ("bf16-mixed", True, torch.float32, True),
    ("bf16-mixed", False, torch.float32, True),  # the body is fp32: masters or not, the same run
])
def test_body_dtype_and_autocast_follow_the_knobs(train_precision, master_fp32, body, autocast):
    spec = TrainSchema(precision=train_precision, master_fp32=master_fp32)
    assert precision.body_dtype(train_precision) == body
    with precision.autocast(spec, CPU):
        assert torch.is_autocast_enabled("cpu") == autocast
        assert not autocast or torch.get_autocast_dtype("cpu") == torch.bfloat16
    assert precision.master_dtype(spec) == (torch.float32 if master_fp32 else body)


def test_an_unknown_precision_names_the_knob():
    with pytest.raises(ConfigError,
                       match=r"train.precision must be one of \['fp32', 'bf16', 'bf16-mixed'\], got 'fp16'"):

        precision.body_dtype("fp16")


def sparse_layer(value_grad: str):
    gen = torch.Generator().manual_seed(0)
    layer = SparseDeltaLinear(torch.nn.Linear(40, 24), torch.randperm(960, generator=gen)[:100], value_grad)
    with torch.no_grad():
        layer.values.copy_(torch.randn(100, generator=gen))
    return layer, "values"


def row_layer():
    gen = torch.Generator().manual_seed(0)
    layer = RowDeltaLinear(torch.nn.Linear(40, 24), torch.tensor([7, 2, 19]))
    with torch.no_grad():
        layer.delta.copy_(torch.randn(3, 40, generator=gen))
    return layer, "delta"


@pytest.mark.parametrize("build", [lambda: sparse_layer("dense"), lambda: sparse_layer("sampled"), row_layer],
                         ids=["speft-dense", "speft-sampled", "spsft"])
def test_the_sparse_layers_under_bf16_autocast_match_fp32(build):
    layer, trainable = build()
    x = torch.randn(3, 300, 40, generator=torch.Generator().manual_seed(4), requires_grad=True)
    grads = {}
    for autocast in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = layer(x)
        assert y.dtype == (torch.bfloat16 if autocast else torch.float32)
        y.float().square().sum().backward()  # outside autocast, as training does
        grads[autocast] = getattr(layer, trainable).grad, x.grad
        getattr(layer, trainable).grad = x.grad = None
    (t32, x32), (t16, x16) = grads[False], grads[True]
    assert t16.dtype == x16.dtype == torch.float32
    # bf16 rounding of x, W (+ the delta) and the upstream gradient: ~2^-8 relative each
    torch.testing.assert_close(t16, t32, rtol=0, atol=2e-2 * t32.abs().max().item())
    torch.testing.assert_close(x16, x32, rtol=0, atol=2e-2 * x32.abs().max().item())
    assert not torch.equal(t16, t32)  # it did compute in bf16
