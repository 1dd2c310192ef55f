"""SPSFT as a method (methods/spsft/method.py) on MiniLM-L6: trainable counts in closed form, row
choice, bad configs, and tiny end-to-end runs on real MRPC."""


import pytest
import torch

from speft_bench.config import validate
from speft_bench.errors import ConfigError
from speft_bench.methods.base import MethodContext
from speft_bench.methods.spsft.method import SPSFT
from speft_bench.methods.spsft.model import ROW_DELTAS
from speft_bench.run import run
from tests.helpers import CALIBRATION, TINY_MRPC, compose_config

TINY = (*TINY_MRPC, *CALIBRATION)
# MiniLM-L6: 6 blocks of q, k, v, attention-out (384 → 384), intermediate (384 → 1536), output (1536 → 384)
PER_ROW_ALL = 6 * (5 * 384 + 1536)  # Σ d_in over the 36 `all` targets: 20 736 per row of budget
PER_ROW_MLP = 6 * (384 + 1536)  # the 12 `mlp` targets: 11 520
HEAD = 384 * 2 + 2  # classifier weight and bias
NORMS = 6 * 2 * 2 * 384  # per block: attention.output.LayerNorm and output.LayerNorm, weight and bias
QUERY = "bert.encoder.layer.0.attention.self.query"


# --- on MiniLM-L6 ------------------------------------------------------------------------------------------

def prepare(model, *overrides, batches=None):
    cfg = compose_config("task=mrpc", "method=spsft", *overrides)
    ctx = MethodContext(cfg, validate(cfg), lambda round_, n, batch_size: batches)
    return SPSFT().prepare(model, ctx)


def trainable(model) -> dict[str, int]:
    return {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}


def token_batch(n=2, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(1000, 20000, (n, 16), generator=gen), "labels": torch.tensor([0, 1] * (n // 2))}


@pytest.mark.parametrize(("overrides", "rows", "per_row", "extra"), [
    (["metric=l2"], 16, PER_ROW_ALL, HEAD),  # r = 16 = 2 × LoRA r 8: exactly LoRA's 331 776
    (["metric=l2", "method.r=4", "method.targets=mlp"], 4, PER_ROW_MLP, HEAD),
    (["metric=l2", "method.train_norms=true"], 16, PER_ROW_ALL, HEAD + NORMS),
    (["metric=l2", "method.train_head=false"], 16, PER_ROW_ALL, 0),
])
def test_trainable_count_is_the_closed_form(minilm, overrides, rows, per_row, extra):
    model = minilm()
    prepared = prepare(model, *overrides)
    info = prepared.info
    assert sum(trainable(model).values()) == rows * per_row + extra == info["trainable"]["total"]
    assert set(info["rows_per_layer"].values()) == {rows}
    assert info["targets"]["modules"] == len(ROW_DELTAS.layers(model)) == (36 if per_row == PER_ROW_ALL else 12)
    assert info["trainable"]["row_deltas"] == rows * per_row
    assert info["calibration"]["examples"] == 0  # l2 is data-free: no calibration drawn

    # gradients reach exactly the trainable parameters, base weights stay frozen
    model.train()
    model(**token_batch()).loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert grads == set(trainable(model))


def test_fraction_rounds_rows_per_layer(minilm):
    info = prepare(minilm(), "metric=l2", "method.r=null", "method.fraction=0.05").info
    # 5 % of 384 rows = 19.2 → 19, of 1536 = 76.8 → 77
    assert info["rows_per_layer"][QUERY] == 19
    assert info["rows_per_layer"]["bert.encoder.layer.0.intermediate.dense"] == 77
    assert info["trainable"]["row_deltas"] == 6 * (4 * 19 * 384 + 77 * 384 + 19 * 1536) == 527_616
    assert info["budget_rule"] == "fraction=0.05"


def test_train_norms_trains_the_block_norms_only(minilm):
    model = minilm()
    prepare(model, "metric=l2", "method.train_norms=true")
    norms = sorted(n for n in trainable(model) if "LayerNorm" in n)
    assert len(norms) == 24 and "bert.embeddings.LayerNorm.weight" not in norms
    assert norms[:2] == ["bert.encoder.layer.0.attention.output.LayerNorm.bias",
                         "bert.encoder.layer.0.attention.output.LayerNorm.weight"]


def test_l2_selects_the_largest_rows(minilm):
    model = minilm()
    weight = model.get_submodule(QUERY).weight.detach().clone()
    prepare(model, "metric=l2", "method.r=5")
    expected = weight.norm(dim=1).argsort(descending=True)[:5].sort().values
    assert ROW_DELTAS.layers(model)[QUERY].rows.tolist() == expected.tolist()


def test_taylor_prepare_uses_the_calibration_batches(minilm):
    model = minilm()
    info = prepare(model, "metric=qm_taylor", batches=[token_batch(4, seed=2), token_batch(2, seed=3)]).info
    assert info["calibration"]["examples"] == 6
    assert info["calibration"]["examples_per_label"] == {"0": 3, "1": 3}
    assert info["calibration"]["importance_s"] > 0
    assert all(p.requires_grad == ("delta" in n or n.startswith("classifier")) for n, p in model.named_parameters())


def test_r_larger_than_a_layer_is_rejected(minilm):
    with pytest.raises(ConfigError, match="method.r=400 exceeds the 384 output rows of bert.encoder.layer.0"):
        prepare(minilm(), "metric=l2", "method.r=400")


# --- configs ------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("overrides", "message"), [
    (["method=spsft"], "method=spsft needs a neuron-importance metric: metric must be one of l2, qm_taylor, taylor; "
                       "got 'none'"),
    (["method=spsft", "metric=gradient"], "metric must be one of l2, qm_taylor, taylor; got 'gradient'"),
    (["method=speft", "metric=taylor"], "method=speft needs a salience metric: metric must be one of fisher"),
    (["method=lora", "metric=l2"], "metric='l2' is not valid for method='lora'; allowed: none"),
    (["method=spsft", "metric=qm_taylor", "task=stsb"],
     "metric=qm_taylor ranks neurons per label and needs a classification task; task=stsb is not one"),
    (["method=spsft", "metric=l2", "method.fraction=0.05"],
     "method.r and method.fraction: set exactly one (got r=16, fraction=0.05)"),
    (["method=spsft", "metric=l2", "method.r=null"], "set exactly one (got r=None, fraction=None)"),
    (["method=spsft", "metric=l2", "method.r=-4"], "method.r must be > 0, got -4"),
    (["method=spsft", "metric=l2", "method.r=null", "method.fraction=0"], "method.fraction must be in (0, 1], got 0"),
    (["method=spsft", "metric=l2", "method.r=null", "method.fraction=1.5"],
     "method.fraction must be in (0, 1], got 1.5"),
    (["method=spsft", "metric=taylor", "method.calibration_examples=0"],
     "method.calibration_examples must be > 0, got 0"),
    (["method=spsft", "metric=taylor", "method.calibration_batch_size=-1"],
     "method.calibration_batch_size must be > 0, got -1"),
    (["method=spsft", "metric=qm_taylor", "metric.quantiles=1"], "metric.quantiles must be >= 2, got 1"),
])
def test_bad_spsft_configs_name_the_knob(overrides, message):
    with pytest.raises(ConfigError) as caught:
        validate(compose_config("task=mrpc", *overrides))
    assert message in str(caught.value)


def test_qm_taylor_is_fine_on_a_three_label_task_and_taylor_on_regression():
    assert validate(compose_config("task=mnli", "method=spsft", "metric=qm_taylor"))["metric"].quantiles == 11
    assert validate(compose_config("task=stsb", "method=spsft", "metric=taylor"))["method"].r == 16


# --- end to end on real MRPC --------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("metric", ["l2", "taylor", "qm_taylor"])
def test_every_metric_runs_end_to_end(tmp_path, metric):
    record = run(compose_config("method=spsft", f"metric={metric}", *TINY), tmp_path)
    assert record["status"] == "completed"
    assert record["parameters"]["trainable"] == 16 * PER_ROW_ALL + HEAD == 332_546
    info = record["method"]
    assert info["metric"] == metric and info["budget_rule"] == "r=16" and info["targets"]["modules"] == 36
    assert info["calibration"]["examples"] == (0 if metric == "l2" else 8)
    assert sum(info["rows_per_layer"].values()) == 36 * 16


@pytest.mark.parametrize(("overrides", "expected"), [
    (["method.targets=mlp"], 16 * PER_ROW_MLP + HEAD),  # FA-SPSFT: attention frozen
    (["method.train_norms=true"], 16 * PER_ROW_ALL + NORMS + HEAD),
])
@pytest.mark.slow
def test_mlp_only_and_train_norms_run_end_to_end(tmp_path, overrides, expected):
    record = run(compose_config("method=spsft", "metric=l2", *TINY, *overrides), tmp_path)
    assert record["status"] == "completed"
    assert record["parameters"]["trainable"] == expected == record["method"]["trainable"]["total"]
