"""SPSFT: importance metrics vs brute force, the row-delta layer vs the dense formulation, trainable
counts on MiniLM-L6 in closed form, merge/export, adapter files, bad configs, and tiny end-to-end runs."""

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from speft_bench.config import validate
from speft_bench.errors import ConfigError, NonFiniteError
from speft_bench.methods.base import MethodContext
from speft_bench.methods.speft.model import ADAPTER_FORMAT as SPEFT_FORMAT
from speft_bench.methods.speft.model import load_adapter as load_speft_adapter
from speft_bench.methods.spsft.importance import (
    IMPORTANCE,
    neuron_importance,
    quantile_mean,
    split_by_label,
    top_rows,
)
from speft_bench.methods.spsft.layer import RowDeltaLinear
from speft_bench.methods.spsft.method import SPSFT
from speft_bench.methods.spsft.model import (
    ADAPTER_FORMAT,
    AdapterError,
    attach_row_deltas,
    detach_row_deltas,
    load_adapter,
    row_deltas,
    save_adapter,
)
from speft_bench.run import run

from conftest import compose_config, saved_numels

TINY = ("task=mrpc", "task.train_limit=16", "task.eval_limit=8", "task.max_length=32", "train.max_steps=2",
        "train.batch_size=4", "method.calibration_examples=8", "method.calibration_batch_size=4")
# MiniLM-L6: 6 blocks of q, k, v, attention-out (384 → 384), intermediate (384 → 1536), output (1536 → 384)
PER_ROW_ALL = 6 * (5 * 384 + 1536)  # Σ d_in over the 36 `all` targets: 20 736 per row of budget
PER_ROW_MLP = 6 * (384 + 1536)  # the 12 `mlp` targets: 11 520
HEAD = 384 * 2 + 2  # classifier weight and bias
NORMS = 6 * 2 * 2 * 384  # per block: attention.output.LayerNorm and output.LayerNorm, weight and bias
QUERY = "bert.encoder.layer.0.attention.self.query"


# --- importance on a tiny network, against brute force ---------------------------------------------

class TinyNet(nn.Module):
    """4 → 5 → 3 classifier with dropout (importance must be computed in eval mode)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2 = nn.Linear(4, 5, dtype=torch.float64), nn.Linear(5, 3, dtype=torch.float64)
        self.drop = nn.Dropout(0.5)

    def forward(self, x, labels):
        logits = self.fc2(self.drop(torch.tanh(self.fc1(x))))
        return SimpleNamespace(loss=F.cross_entropy(logits, labels), logits=logits)


def tiny_batches():
    """Two uneven batches (4 + 3 examples) over 3 labels."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(7, 4, generator=gen, dtype=torch.float64)
    labels = torch.tensor([0, 2, 1, 0, 2, 2, 1])
    return [{"x": x[:4], "labels": labels[:4]}, {"x": x[4:], "labels": labels[4:]}]


def brute_taylor(model, examples) -> dict[str, list[float]]:
    """Per row i: Σ_j |(1/n Σ_x ∂ℓ(x)/∂w_ij) · w_ij|, one example at a time, with explicit loops."""
    model.eval()
    out = {}
    for name in ("fc1", "fc2"):
        w = model.get_submodule(name).weight
        mean = torch.zeros_like(w)
        for x, label in examples:
            (g,) = torch.autograd.grad(model(x[None], label[None]).loss, w)
            mean += g / len(examples)
        out[name] = [sum(abs(mean[i, j].item() * w[i, j].item()) for j in range(w.shape[1])) for i in range(w.shape[0])]
    return out


def hand_quantile_mean(values: list[float], levels: int = 11) -> float:
    """Mean of the k/(levels-1) quantiles, linear interpolation between the sorted values."""
    v, total = sorted(values), 0.0
    for k in range(levels):
        pos = k / (levels - 1) * (len(v) - 1)
        lo = math.floor(pos)
        hi = min(lo + 1, len(v) - 1)
        total += v[lo] + (pos - lo) * (v[hi] - v[lo])
    return total / levels


def examples_of(batches, label=None):
    return [(b["x"][i], b["labels"][i]) for b in batches for i in range(len(b["labels"]))
            if label is None or b["labels"][i] == label]


def weights_of(model):
    return {"fc1": model.fc1.weight, "fc2": model.fc2.weight}


def test_registered_metrics():
    assert IMPORTANCE.names() == ["l2", "qm_taylor", "taylor"]
    assert [IMPORTANCE[n].needs_data for n in ("l2", "taylor", "qm_taylor")] == [False, True, True]
    assert [IMPORTANCE[n].classification_only for n in ("l2", "taylor", "qm_taylor")] == [False, False, True]


def test_l2_is_the_norm_of_each_output_row():
    model = TinyNet()
    scores = neuron_importance("l2", model, weights_of(model), [])
    for name, w in weights_of(model).items():
        expected = [math.sqrt(sum(w[i, j].item() ** 2 for j in range(w.shape[1]))) for i in range(w.shape[0])]
        assert scores[name].tolist() == pytest.approx(expected, rel=1e-12)


def test_taylor_matches_per_example_brute_force():
    model, batches = TinyNet(), tiny_batches()
    scores = neuron_importance("taylor", model.train(), weights_of(model), batches)
    expected = brute_taylor(model, examples_of(batches))
    for name in expected:
        assert scores[name].tolist() == pytest.approx(expected[name], rel=1e-10)
    assert all(s.min() > 0 for s in scores.values())


def test_qm_taylor_is_the_quantile_mean_of_per_label_taylor_scores():
    model, batches = TinyNet(), tiny_batches()
    scores = neuron_importance("qm_taylor", model, weights_of(model), batches)
    per_label = [brute_taylor(model, examples_of(batches, label)) for label in (0, 1, 2)]
    for name in ("fc1", "fc2"):
        expected = [hand_quantile_mean([t[name][i] for t in per_label]) for i in range(len(per_label[0][name]))]
        assert scores[name].tolist() == pytest.approx(expected, rel=1e-10)
        mean = [sum(t[name][i] for t in per_label) / 3 for i in range(len(expected))]
        assert scores[name].tolist() != pytest.approx(mean, rel=1e-3)  # 3 labels: not just the mean


@pytest.mark.parametrize("metric", ["taylor", "qm_taylor"])
def test_micro_batches_give_the_same_importance(metric):
    model, batches = TinyNet(), tiny_batches()
    whole = neuron_importance(metric, model, weights_of(model), batches)
    for micro in (1, 3):
        split = neuron_importance(metric, model, weights_of(model), batches, calibration_micro_batch=micro)
        for name in whole:
            torch.testing.assert_close(split[name], whole[name], rtol=1e-12, atol=0)


def test_quantile_mean_by_hand():
    # levels 0, .1, …, 1 over [0, 1, 5] sit at positions 0, .2, …, 2 of the sorted values:
    # 0 .2 .4 .6 .8 1 | 1.8 2.6 3.4 4.2 5  → sum 20 → 20/11 (the mean would be 2, the median 1)
    scores = torch.tensor([[5.0, 2.0], [0.0, 2.0], [1.0, 2.0]], dtype=torch.float64)
    assert quantile_mean(scores).tolist() == pytest.approx([20 / 11, 2.0], rel=1e-12)
    # two labels: the quantiles are evenly spread between them, so the mean of the two
    assert quantile_mean(torch.tensor([[1.0], [4.0]])).item() == pytest.approx(2.5)
    assert quantile_mean(scores, levels=2).tolist() == pytest.approx([2.5, 2.0])  # (min + max) / 2


def test_split_by_label_keeps_every_field_of_the_selected_rows():
    batches = tiny_batches()
    groups = split_by_label(batches)
    assert list(groups) == [0, 1, 2]
    assert [[len(b["labels"]) for b in groups[label]] for label in groups] == [[2], [1, 1], [1, 2]]
    assert torch.equal(groups[2][1]["x"], batches[1]["x"][[0, 1]])


def test_top_rows_takes_the_highest_and_breaks_ties_by_lower_index():
    scores = torch.tensor([1.0, 3.0, 3.0, 2.0, 3.0, 0.5])
    assert top_rows(scores, 2).tolist() == [1, 2]
    assert top_rows(scores, 4).tolist() == [1, 2, 3, 4]
    assert top_rows(scores, 4).dtype == torch.int64
    with pytest.raises(ValueError, match="cannot select 7 rows out of 6"):
        top_rows(scores, 7)


def test_non_finite_importance_names_the_layer():
    model = TinyNet()
    with torch.no_grad():
        model.fc2.weight[1, 2] = float("nan")
    with pytest.raises(NonFiniteError, match="non-finite importance l2 of fc2"):
        neuron_importance("l2", model, weights_of(model), [])


# --- the layer against the dense formulation W + M W_f ------------------------------------------------

def random_layer(d_in=6, d_out=5, rows=(3, 0), bias=True, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    layer = RowDeltaLinear(nn.Linear(d_in, d_out, bias=bias, dtype=dtype), torch.tensor(rows))
    with torch.no_grad():
        layer.delta.copy_(torch.randn(len(rows), d_in, generator=gen, dtype=dtype))
    return layer


def dense_delta(layer):
    """M W_f built independently: row rows[j] of a zero (d_out, d_in) matrix is delta[j]."""
    out = torch.zeros_like(layer.base.weight)
    for j, row in enumerate(layer.rows.tolist()):
        out[row] = layer.delta[j]
    return out


@pytest.mark.parametrize("shape", [(6,), (4, 6), (2, 3, 6)])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_equals_linear_with_dense_row_delta(shape, bias):
    layer = random_layer(bias=bias)
    assert layer.rows.tolist() == [0, 3]  # stored sorted; delta rows follow the sorted rows
    x = torch.randn(shape, dtype=torch.float64)
    expected = F.linear(x, layer.base.weight + dense_delta(layer), layer.base.bias)
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(layer.delta_dense(), dense_delta(layer), rtol=0, atol=0)


@pytest.mark.parametrize("bias", [True, False])
def test_gradients_equal_the_dense_formulation_on_the_chosen_rows(bias):
    layer = random_layer(d_in=6, d_out=7, rows=(5, 1, 2), bias=bias)
    x = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, _: layer(x), (x, layer.delta))

    w_full = (layer.base.weight + dense_delta(layer)).detach().requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    upstream = torch.randn(2, 3, 7, dtype=torch.float64)
    F.linear(x_ref, w_full, layer.base.bias).backward(upstream)
    layer(x).backward(upstream)
    torch.testing.assert_close(layer.delta.grad, w_full.grad[[1, 2, 5]], rtol=0, atol=1e-12)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=0, atol=1e-12)
    assert layer.base.weight.grad is None and not layer.base.weight.requires_grad


def test_only_x_is_saved_neither_the_dense_weight_nor_w_f_x():
    # x (3, 5, 40): N = 15 tokens; W 24 × 40 = 960; r = 3: W_f x is N × r = 45, W_f is 120
    layer = random_layer(d_in=40, d_out=24, rows=(7, 2, 19), dtype=torch.float32)
    x = torch.randn(3, 5, 40, requires_grad=True)
    assert sorted(saved_numels(layer, x)) == [3, 120, 600]  # rows, W_f, x
    # the test can tell: the naive W + M W_f saves 960, LoRA's B(Ax) saves Ax (45)
    naive = lambda x: F.linear(x, layer.base.weight + dense_delta(layer), layer.base.bias)  # noqa: E731
    assert 960 in saved_numels(naive, x)
    a, b = torch.randn(3, 40, requires_grad=True), torch.randn(24, 3, requires_grad=True)
    assert 45 in saved_numels(lambda x: F.linear(F.linear(x, a), b), x)

    model = nn.Sequential(layer, nn.ReLU(), random_layer(d_in=24, d_out=40, rows=(1, 30), dtype=torch.float32))
    numels = saved_numels(lambda: model(x).sum().backward())
    # layer 1: rows 3, W_f 120, x 600; ReLU: its output 360; layer 2: rows 2, W_f 48, x 360
    assert sorted(numels) == [2, 3, 48, 120, 360, 360, 600]
    assert all(m.delta.grad.abs().sum() > 0 for m in model if isinstance(m, RowDeltaLinear))


def test_merge_gives_a_plain_linear_with_the_same_output():
    layer = random_layer()
    x = torch.randn(4, 6, dtype=torch.float64)
    y, w0 = layer(x), layer.base.weight.detach().clone()
    merged = layer.merge()
    assert type(merged) is nn.Linear and not layer.delta.any()
    torch.testing.assert_close(merged(x), y, rtol=0, atol=1e-12)
    torch.testing.assert_close(merged.weight[[1, 2, 4]], w0[[1, 2, 4]], rtol=0, atol=0)  # other rows untouched


def test_editing_the_weight_between_forward_and_backward_fails_loudly():
    layer = random_layer(dtype=torch.float32)
    y = layer(torch.randn(2, 6))
    with torch.no_grad():
        layer.base.weight.add_(1.0)
    with pytest.raises(RuntimeError, match="base weight changed between forward and backward"):
        y.sum().backward()


def test_bf16_body_with_an_fp32_delta_matches_an_fp64_reference():
    # as precision.setup leaves it under train.precision=bf16: bf16 base, fp32 master W_f
    layer = random_layer(d_in=40, d_out=24, rows=(7, 2, 19), dtype=torch.float32)
    layer.base.to(torch.bfloat16)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(600, 40, generator=gen).bfloat16().requires_grad_()
    upstream = torch.randn(600, 24, generator=gen).bfloat16()
    y = layer(x)
    y.backward(upstream)
    assert y.dtype == x.grad.dtype == torch.bfloat16 and layer.delta.grad.dtype == torch.float32

    # float64 from the same bf16 inputs, W_f rounded to bf16 as the forward uses it
    x64, g64, w64 = x.detach().double(), upstream.double(), layer.base.weight.double()
    delta64 = torch.zeros_like(w64).index_add_(0, layer.rows, layer.delta.detach().bfloat16().double())
    reference = g64.t()[layer.rows] @ x64
    # the bf16 GEMM sums in float32, then rounds to bf16: half an ulp, 2^-8 of each entry
    assert ((layer.delta.grad.double() - reference).abs() <= 2 ** -8 * reference.abs() + 1e-6 * reference.abs().max()).all()
    # y and grad_x: bf16 outputs of sums of two bf16 GEMMs (W x, and the rows' W_f x)
    torch.testing.assert_close(y.double(), F.linear(x64, w64 + delta64, layer.base.bias.double()), rtol=2 ** -7, atol=1e-2)
    torch.testing.assert_close(x.grad.double(), g64 @ (w64 + delta64), rtol=2 ** -7, atol=1e-2)


def test_an_fp32_delta_merges_into_a_bf16_weight():
    layer = random_layer(dtype=torch.float32)
    layer.base.to(torch.bfloat16)
    w0, delta = layer.base.weight.detach().clone(), layer.delta.detach().clone()
    merged = layer.merge()
    assert merged.weight.dtype == torch.bfloat16 and layer.delta.dtype == torch.float32 and not layer.delta.any()
    assert torch.equal(merged.weight[[0, 3]], w0[[0, 3]] + delta.bfloat16())


@pytest.mark.parametrize(("rows", "message"), [
    (torch.tensor([1, 1]), "rows contain duplicates"),
    (torch.tensor([0, 5]), r"rows must lie in \[0, 5\), found \[0, 5\]"),
    (torch.tensor([-1]), r"rows must lie in \[0, 5\)"),
    (torch.tensor([1.0]), "rows must be a 1-D integer tensor, got torch.float32"),
    (torch.tensor([[1]]), "rows must be a 1-D integer tensor"),
])
def test_bad_rows_are_rejected(rows, message):
    with pytest.raises(ValueError, match=message):
        RowDeltaLinear(nn.Linear(6, 5), rows)


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
    assert info["targets"]["modules"] == len(row_deltas(model)) == (36 if per_row == PER_ROW_ALL else 12)
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
    assert row_deltas(model)[QUERY].rows.tolist() == expected.tolist()


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


@pytest.fixture
def tuned(minilm):
    """MiniLM-L6 with 16 l2-chosen rows per target and random deltas, and a batch with its base logits."""
    model = minilm().eval()
    batch = {"input_ids": token_batch()["input_ids"]}
    with torch.no_grad():
        base_logits = model(**batch).logits
    prepare(model, "metric=l2")
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for layer in row_deltas(model).values():
            layer.delta.copy_(0.05 * torch.randn(layer.delta.shape, generator=gen))
        logits = model(**batch).logits
    assert (logits - base_logits).abs().max() > 1e-3  # the deltas matter
    return model, batch, base_logits, logits


def test_merged_export_loads_in_plain_transformers(tuned, tmp_path):
    from transformers import AutoModelForSequenceClassification

    model, batch, _, logits = tuned
    restored = detach_row_deltas(model, merge=True)
    assert len(restored) == 36 and not row_deltas(model)
    assert not any(".base." in key or key.endswith(".delta") for key in model.state_dict())
    model.save_pretrained(tmp_path / "merged")
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(**batch).logits, logits, rtol=0, atol=1e-5)


def test_detach_without_merge_restores_the_pretrained_model(tuned):
    model, batch, base_logits, _ = tuned
    detach_row_deltas(model, merge=False)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, base_logits, rtol=0, atol=0)


def test_adapter_round_trip_reproduces_logits(tuned, minilm, tmp_path):
    model, batch, _, logits = tuned
    path = tmp_path / "adapter.safetensors"
    metadata = {"model": "minilm_l6", "targets": ["all"], "metric": "l2", "r": 16}
    save_adapter(path, model, metadata)
    assert path.stat().st_size < 1.4e6  # 331 776 floats + rows: not the 22.7 M-parameter model

    fresh = minilm().eval()
    attach_row_deltas(fresh, {QUERY: torch.tensor([1, 2, 3])})  # attached layers are reset, not stacked
    assert load_adapter(path, fresh, model_id="minilm_l6", targets=["all"]) == metadata
    with torch.no_grad():
        torch.testing.assert_close(fresh(**batch).logits, logits, rtol=0, atol=1e-6)
    assert {n: m.rows.tolist() for n, m in row_deltas(fresh).items()} == \
           {n: m.rows.tolist() for n, m in row_deltas(model).items()}

    with pytest.raises(AdapterError, match="adapter was trained on model 'minilm_l6', not 'opt_125m'"):
        load_adapter(path, minilm(), model_id="opt_125m")
    with pytest.raises(AdapterError, match=r"adapter targets \['all'\], expected \['mlp'\]"):
        load_adapter(path, minilm(), targets=["mlp"])
    with pytest.raises(AdapterError, match="not a speft sparse-delta adapter .*'spsft-row-delta/2'"):
        load_speft_adapter(path, minilm())  # the formats do not mix


def test_unsorted_rows_in_a_file_keep_their_delta_rows(minilm, tmp_path):
    path = tmp_path / "a.safetensors"
    delta = torch.arange(3 * 384, dtype=torch.float32).view(3, 384)
    save_file({f"{QUERY}.rows": torch.tensor([9, 2, 5]), f"{QUERY}.delta": delta}, str(path),
              metadata={"format": ADAPTER_FORMAT})
    model = minilm()
    load_adapter(path, model)
    layer = row_deltas(model)[QUERY]
    assert layer.rows.tolist() == [2, 5, 9]
    assert torch.equal(layer.delta_dense()[[9, 2, 5]], delta)


GOOD = {f"{QUERY}.rows": torch.tensor([0, 5, 7]), f"{QUERY}.delta": torch.ones(3, 384)}
LAYER9 = "bert.encoder.layer.9.attention.self.query"


@pytest.mark.parametrize(("tensors", "metadata", "message"), [
    ({**GOOD, f"{QUERY}.rows": torch.tensor([0, 5, 384])}, None,
     rf"layer '{QUERY}': rows must lie in \[0, 384\), found \[0, 384\] \(its weight is \(384, 384\)\)"),
    ({**GOOD, f"{QUERY}.rows": torch.tensor([0, 5, 5])}, None, "rows contain duplicates"),
    ({**GOOD, f"{QUERY}.rows": torch.tensor([0.0, 5.0, 7.0])}, None,
     "rows must be a 1-D integer tensor, got torch.float32"),
    ({**GOOD, f"{QUERY}.rows": torch.tensor([[0, 5, 7]])}, None,
     r"rows must be a 1-D integer tensor, got torch.int64 of shape \(1, 3\)"),
    ({**GOOD, f"{QUERY}.delta": torch.ones(3, 383)}, None,
     r"delta must have shape \(rows, d_in\) = \(3, 384\), got \(3, 383\)"),
    ({**GOOD, f"{QUERY}.delta": torch.ones(4, 384)}, None,
     r"delta must have shape \(rows, d_in\) = \(3, 384\), got \(4, 384\)"),
    ({**GOOD, f"{QUERY}.delta": torch.ones(3, 384, dtype=torch.int64)}, None,
     "delta must be floating point, got torch.int64"),
    ({**GOOD, f"{QUERY}.delta": torch.ones(3, 384).index_fill(1, torch.tensor([4]), float("nan"))}, None,
     "delta contains NaN or inf"),
    ({**GOOD, f"{LAYER9}.rows": torch.tensor([1]), f"{LAYER9}.delta": torch.ones(1, 384)}, None,
     rf"layer '{LAYER9}' is not a linear layer of the model \(missing\)"),
    ({"bert.embeddings.LayerNorm.rows": torch.tensor([0]), "bert.embeddings.LayerNorm.delta": torch.ones(1, 384)}, None,
     r"layer 'bert.embeddings.LayerNorm' is not a linear layer of the model \(LayerNorm\); linear layers are "),
    ({f"{QUERY}.rows": GOOD[f"{QUERY}.rows"]}, None, f"layer '{QUERY}' has no delta tensor"),
    ({**GOOD, "classifier.weight": torch.ones(2, 384)}, None,
     r"unexpected tensor 'classifier.weight' \(expected '<layer>.rows' and '<layer>.delta'\)"),
    ({}, None, "adapter holds no layers"),
    (GOOD, {}, "not a spsft row-delta adapter"),
    (GOOD, {"format": SPEFT_FORMAT}, "not a spsft row-delta adapter .*format='speft-sparse-delta/2'"),
    (GOOD, {"format": ADAPTER_FORMAT, "model": "{not json"}, "metadata is not JSON-encoded"),
])
def test_bad_adapters_raise_adapter_error_and_change_nothing(minilm, tmp_path, tensors, metadata, message):
    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path), metadata={"format": ADAPTER_FORMAT} if metadata is None else metadata)
    model = minilm()
    before = {n: p.clone() for n, p in model.state_dict().items()}
    with pytest.raises(AdapterError, match=message):
        load_adapter(path, model)
    assert not row_deltas(model)  # nothing half-applied (a good layer 0 comes before a bad layer 9)
    assert all(torch.equal(p, before[n]) for n, p in model.state_dict().items())


def test_save_refuses_a_model_without_row_deltas_and_the_reserved_key(tuned, minilm, tmp_path):
    with pytest.raises(ValueError, match="the model has no RowDeltaLinear layers"):
        save_adapter(tmp_path / "a.safetensors", minilm(), {})
    with pytest.raises(ValueError, match="metadata key 'format' is reserved"):
        save_adapter(tmp_path / "a.safetensors", tuned[0], {"format": "mine"})


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
def test_mlp_only_and_train_norms_run_end_to_end(tmp_path, overrides, expected):
    record = run(compose_config("method=spsft", "metric=l2", *TINY, *overrides), tmp_path)
    assert record["status"] == "completed"
    assert record["parameters"]["trainable"] == expected == record["method"]["trainable"]["total"]
