"""SparseDeltaLinear against the dense formulation W + Δ, and the adapter file on MiniLM-L6."""

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from speft_bench.methods.speft.layer import SparseDeltaLinear, choose_value_grad
from speft_bench.methods.speft.model import (
    ADAPTER_FORMAT,
    AdapterError,
    attach_sparse_deltas,
    detach_sparse_deltas,
    load_adapter,
    save_adapter,
    sparse_deltas,
)
from speft_bench.models import target_linears

from conftest import saved_numels

KERNELS = ["dense", "sampled"]
# conf/targets/bert.yaml `all`: the 36 linears of MiniLM-L6's blocks
TARGETS = r".*\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense|intermediate\.dense|output\.dense)"


def random_layer(d_in=6, d_out=5, k=8, bias=True, dtype=torch.float64, value_grad="auto", seed=0):
    """A SparseDeltaLinear with k random entries set to random (non-zero) values."""
    gen = torch.Generator().manual_seed(seed)
    base = nn.Linear(d_in, d_out, bias=bias, dtype=dtype)
    layer = SparseDeltaLinear(base, torch.randperm(d_in * d_out, generator=gen)[:k], value_grad)
    with torch.no_grad():
        layer.values.copy_(torch.randn(k, generator=gen, dtype=dtype))
    return layer


# --- the layer -------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(6,), (4, 6), (2, 3, 6)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_forward_equals_linear_with_dense_delta(shape, bias, dtype):
    layer = random_layer(bias=bias, dtype=dtype)
    x = torch.randn(shape, dtype=dtype)
    delta = layer.delta_dense()
    assert delta.count_nonzero() == 8 and layer.values.dtype == dtype
    assert torch.equal(delta.view(-1)[layer.indices.long()], layer.values.detach())
    expected = F.linear(x, layer.base.weight + delta, layer.base.bias)
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-6 if dtype == torch.float32 else 1e-12)


@pytest.mark.parametrize("value_grad", KERNELS)
@pytest.mark.parametrize("bias", [True, False])
def test_gradients_equal_the_dense_formulation(value_grad, bias):
    layer = random_layer(bias=bias, value_grad=value_grad)
    x = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, _: layer(x), (x, layer.values))

    # dense reference: W + Δ as one trainable matrix; its gradient at the indices is the values' gradient
    w_full = (layer.base.weight + layer.delta_dense()).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    upstream = torch.randn(2, 3, 5, dtype=torch.float64)
    F.linear(x_ref, w_full, layer.base.bias).backward(upstream)
    layer(x).backward(upstream)
    torch.testing.assert_close(layer.values.grad, w_full.grad.view(-1)[layer.indices.long()], rtol=0, atol=1e-12)
    torch.testing.assert_close(x.grad, upstream @ w_full.detach(), rtol=0, atol=1e-12)
    assert layer.base.weight.grad is None


def test_both_kernels_give_the_same_value_gradient_on_many_tokens():
    layer = random_layer(d_in=40, d_out=24, k=100, dtype=torch.float32)
    x = torch.randn(1300, 40)  # > one 512-token chunk, not a multiple of it
    grads = {}
    for kernel in KERNELS:
        layer.value_grad_mode = kernel
        layer.values.grad = None
        layer(x).square().sum().backward()
        grads[kernel] = layer.values.grad
    torch.testing.assert_close(grads["sampled"], grads["dense"], rtol=1e-4, atol=1e-3)


def test_auto_picks_sampled_at_lora_budgets_and_dense_when_dense_is_cheaper():
    for d_out, d_in in [(384, 384), (1536, 384), (384, 1536), (4096, 4096)]:
        assert choose_value_grad(d_out, d_in, 8 * (d_in + d_out)) == "sampled"  # LoRA r=8 budget
        assert choose_value_grad(d_out, d_in, d_out * d_in // 2) == "dense"
    assert choose_value_grad(16, 8, 4) == "dense"  # tiny layer: the transposes dominate
    layer = random_layer(d_in=384, d_out=384, k=6144, dtype=torch.float32)
    assert layer.value_grad(torch.float32) == "sampled"
    layer.value_grad_mode = "dense"
    assert layer.value_grad(torch.float32) == "dense"  # a forced kernel ignores the cost model


# --- in bf16 ---------------------------------------------------------------------------------------------

def bf16_layer(d_in=40, d_out=24, k=100, value_grad="auto"):
    """A bf16 base with fp32 master values, as ``precision.setup`` leaves SPEFT's layers under train.precision=bf16."""
    layer = random_layer(d_in, d_out, k, dtype=torch.float32, value_grad=value_grad)
    layer.base.to(torch.bfloat16)
    return layer


@pytest.mark.parametrize("value_grad", KERNELS)
def test_bf16_body_with_fp32_values_matches_an_fp64_reference(value_grad):
    layer = bf16_layer(value_grad=value_grad)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(1300, 40, generator=gen).bfloat16().requires_grad_()  # > one 512-token chunk
    upstream = torch.randn(1300, 24, generator=gen).bfloat16()
    y = layer(x)
    y.backward(upstream)
    assert y.dtype == x.grad.dtype == torch.bfloat16 and layer.values.grad.dtype == torch.float32

    # the same bf16 inputs in float64: W + Δ as the forward uses it (rounded to bf16 once)
    w_eff = (layer.base.weight + layer.delta_dense()).double()
    x64, g64 = x.detach().double(), upstream.double()
    reference = (g64.t() @ x64).view(-1)[layer.indices.long()]
    scale = reference.abs().max()
    error = (layer.values.grad.double() - reference).abs()
    if value_grad == "sampled":  # float32 dot products over the tokens
        assert error.max() <= 1e-6 * scale
    else:  # the bf16 GEMM sums in float32, then rounds to bf16: half an ulp, 2^-8 of each entry
        assert (error <= 2 ** -8 * reference.abs() + 1e-6 * scale).all()
    torch.testing.assert_close(y.double(), F.linear(x64, w_eff, layer.base.bias.double()), rtol=2 ** -8, atol=1e-2)
    torch.testing.assert_close(x.grad.double(), g64 @ w_eff, rtol=2 ** -8, atol=1e-2)


# the faster kernel measured on Llama3-8B's shapes at LoRA r=64's budget, 256 tokens (BENCHMARKS.md)
LLAMA3_R64_FASTER = {
    torch.float32: {(4096, 4096): "sampled", (1024, 4096): "sampled", (14336, 4096): "sampled", (4096, 14336): "sampled"},
    torch.bfloat16: {(4096, 4096): "sampled", (1024, 4096): "dense", (14336, 4096): "sampled", (4096, 14336): "sampled"},
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_cost_model_picks_the_measured_faster_kernel_for_the_dtype(dtype):
    # a bf16 GEMM costs half a float32 one; the sampled kernel computes in float32 either way
    for (d_out, d_in), faster in LLAMA3_R64_FASTER[dtype].items():
        assert choose_value_grad(d_out, d_in, 64 * (d_out + d_in), dtype) == faster, (d_out, d_in)
    assert choose_value_grad(16, 8, 4, dtype) == "dense"


def test_fp32_values_merge_into_a_bf16_weight_and_survive_set_mask():
    layer = bf16_layer()
    values, w0 = layer.values, layer.base.weight.detach().clone()
    layer.merge()
    assert torch.equal(layer.base.weight.view(-1)[layer.indices.long()],
                       (w0.view(-1)[layer.indices.long()] + layer._merged[1].bfloat16()))
    layer.unmerge()
    assert torch.equal(layer.base.weight, w0) and layer.values.dtype == torch.float32
    layer.merge()
    layer.set_mask(torch.tensor([5, 1]))
    assert layer.values is values and layer.values.dtype == torch.float32 and layer.k == 2


def reference_forward(layer: SparseDeltaLinear, x):
    """The reference SPEFT formulation: W + scatter(values) inside autograd."""
    delta = torch.zeros(layer.base.weight.numel()).scatter_add(0, layer.indices.long(), layer.values)
    return F.linear(x, layer.base.weight + delta.view_as(layer.base.weight), layer.base.bias)


def test_no_d_out_by_d_in_tensor_is_saved_for_backward():
    # d_out × d_in = 960; activations are 3·5·40 = 600 and 3·5·24 = 360, k = 50
    layer = random_layer(d_in=40, d_out=24, k=50, dtype=torch.float32)
    x = torch.randn(3, 5, 40, requires_grad=True)
    numels = saved_numels(layer, x)
    assert numels and 960 not in numels and 600 in numels  # saves the input, never W or W + Δ
    assert 960 in saved_numels(reference_forward, layer, x)  # the test can tell the difference

    model = nn.Sequential(random_layer(40, 24, 50, dtype=torch.float32, value_grad="sampled"), nn.ReLU(),
                          random_layer(24, 40, 50, dtype=torch.float32, seed=1, value_grad="dense"), nn.GELU(),
                          random_layer(40, 24, 50, dtype=torch.float32, seed=2))
    numels = saved_numels(lambda: model(x).sum().backward())
    # per SparseDeltaLinear: its input, values, indices; ReLU its output (360), GELU its input (600)
    assert sorted(numels) == [50] * 6 + [360] * 2 + [600] * 3
    assert all(m.values.grad.abs().sum() > 0 for m in model if isinstance(m, SparseDeltaLinear))


def test_merge_and_unmerge_round_trip_exactly():
    layer = random_layer(dtype=torch.float32)
    x = torch.randn(4, 6)
    w0, v0, delta, y0 = layer.base.weight.detach().clone(), layer.values.detach().clone(), layer.delta_dense(), layer(x)
    layer.merge()
    assert layer.merged and not layer.values.any()
    torch.testing.assert_close(layer.base.weight.detach(), w0 + delta)
    torch.testing.assert_close(layer(x), y0)
    with torch.no_grad():
        layer.values.fill_(0.5)  # trained further after merging, merged again
    layer.merge()
    layer.unmerge()
    assert not layer.merged
    assert torch.equal(layer.base.weight, w0)  # bit-exact, not W + v - v
    assert torch.equal(layer.values, v0 + 0.5)
    with pytest.raises(RuntimeError, match="nothing merged"):
        layer.unmerge()


def test_editing_the_weight_between_forward_and_backward_fails_loudly():
    layer = random_layer(dtype=torch.float32)
    y = layer(torch.randn(2, 6))
    with torch.no_grad():
        layer.base.weight.add_(1.0)  # the frozen weight is not among autograd's saved tensors
    with pytest.raises(RuntimeError, match="base weight changed between forward and backward"):
        y.sum().backward()
    y = layer(torch.randn(2, 6))
    layer.merge()  # changes the values too: autograd's own version check fires
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_set_mask_resets_values_keeps_the_parameter_and_commits_merges():
    layer = random_layer(dtype=torch.float32)
    values = layer.values
    optimizer = torch.optim.AdamW([values], lr=0.1)
    layer(torch.randn(3, 6)).sum().backward()
    optimizer.step()
    layer.merge()
    merged_w = layer.base.weight.detach().clone()

    layer.set_mask(torch.tensor([29, 3, 17]))
    assert layer.values is values and layer.values.grad is None  # the optimizer still holds it
    assert torch.equal(layer.values, torch.zeros(3)) and layer.values.requires_grad
    assert layer.indices.tolist() == [3, 17, 29] and layer.indices.dtype == torch.int32
    assert torch.equal(layer.base.weight, merged_w) and layer.base_changed and not layer.merged
    assert "k=3, density=0.1" in repr(layer)
    # the optimizer's stale moments (sized for k=8) are the refresh's to drop: see
    # test_speft_method.py::test_a_refresh_resets_the_optimizer_state_it_names, which drives the real one
    with pytest.raises(RuntimeError, match="size"):
        layer(torch.randn(3, 6)).sum().backward()
        optimizer.step()


@pytest.mark.parametrize(("indices", "message"), [
    (torch.tensor([1, 1]), "indices must be unique"),
    (torch.tensor([0, 30]), r"indices must lie in \[0, 30\)"),
    (torch.tensor([-1]), r"indices must lie in \[0, 30\)"),
    (torch.tensor([1.0]), "1-D integer tensor"),
    (torch.tensor([[1]]), "1-D integer tensor"),
])
def test_set_mask_rejects_bad_indices(indices, message):
    with pytest.raises(ValueError, match=message):
        random_layer().set_mask(indices)


# --- on a real model ---------------------------------------------------------------------------------

def random_indices(model, per_layer=300, seed=0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {name: torch.randperm(m.weight.numel(), generator=gen)[:per_layer]
            for name, m in target_linears(model, TARGETS).items()}


@pytest.fixture
def trained(minilm):
    """MiniLM-L6 with sparse deltas (300 random entries per target linear, random values), its base logits."""
    model = minilm().eval()
    batch = {"input_ids": torch.randint(1000, 20000, (2, 16), generator=torch.Generator().manual_seed(1))}
    with torch.no_grad():
        base_logits = model(**batch).logits
    layers = attach_sparse_deltas(model, random_indices(model))
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for layer in layers.values():
            layer.values.copy_(0.05 * torch.randn(layer.k, generator=gen))
    return model, batch, base_logits


def test_attach_replaces_linears_in_place_and_freezes_only_their_bases(trained, minilm):
    model, _, _ = trained
    layers = sparse_deltas(model)
    assert len(layers) == 36 and all(layer.k == 300 for layer in layers.values())
    assert "bert.encoder.layer.0.attention.self.query.base.weight" in dict(model.named_parameters())
    assert not any(layer.base.weight.requires_grad for layer in layers.values())
    assert model.bert.embeddings.word_embeddings.weight.requires_grad  # the rest is the caller's business
    with pytest.raises(ValueError, match=r"'bert.embeddings.LayerNorm' is not an nn.Linear of the model \(LayerNorm\)"):
        attach_sparse_deltas(minilm(), {"bert.embeddings.LayerNorm": torch.tensor([0])})


def test_adapter_round_trip_reproduces_logits(trained, minilm, tmp_path):
    model, batch, base_logits = trained
    with torch.no_grad():
        logits = model(**batch).logits
    assert (logits - base_logits).abs().max() > 1e-3  # the deltas matter

    metadata = {"model": "minilm_l6", "targets": [TARGETS], "metric": "gradient", "budget": 36 * 300}
    save_adapter(tmp_path / "adapter.safetensors", model, metadata)
    fresh = minilm().eval()
    assert load_adapter(tmp_path / "adapter.safetensors", fresh, model_id="minilm_l6", targets=[TARGETS]) == metadata
    with torch.no_grad():
        assert torch.equal(fresh(**batch).logits, logits)
    assert {n: layer.indices.tolist() for n, layer in sparse_deltas(fresh).items()} == \
           {n: layer.indices.tolist() for n, layer in sparse_deltas(model).items()}

    with pytest.raises(AdapterError, match="adapter was trained on model 'minilm_l6', not 'opt_125m'"):
        load_adapter(tmp_path / "adapter.safetensors", minilm(), model_id="opt_125m")
    with pytest.raises(AdapterError, match=r"adapter targets \['\.\*"):
        load_adapter(tmp_path / "adapter.safetensors", minilm(), targets=["query", "value"])


def test_merged_export_loads_in_plain_transformers(trained, tmp_path):
    from transformers import AutoModelForSequenceClassification

    model, batch, base_logits = trained
    with torch.no_grad():
        logits = model(**batch).logits
    restored = detach_sparse_deltas(model, merge=True)
    assert len(restored) == 36 and not sparse_deltas(model)
    assert not any(".base." in key for key in model.state_dict())
    model.save_pretrained(tmp_path / "merged")
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(**batch).logits, logits, rtol=0, atol=1e-5)


def test_detach_without_merge_restores_the_pretrained_model(trained):
    model, batch, base_logits = trained
    next(iter(sparse_deltas(model).values())).merge()  # a pending merge is undone too
    detach_sparse_deltas(model, merge=False)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, base_logits, rtol=0, atol=0)


def test_save_refuses_a_pending_merge_and_keeps_a_refresh_merged_into_the_base(trained, tmp_path):
    model, _, _ = trained
    layer = sparse_deltas(model)["bert.encoder.layer.0.attention.self.query"]
    old = layer.indices.long().clone()
    layer.merge()
    with pytest.raises(ValueError, match="layer 'bert.encoder.layer.0.attention.self.query' has its delta merged"):
        save_adapter(tmp_path / "a.safetensors", model, {})
    layer.set_mask(torch.tensor([0, 1]))  # as a dynamic-mask refresh does: the merge is permanent
    assert torch.equal(layer.base_touched, old)
    save_adapter(tmp_path / "a.safetensors", model, {})
    with safe_open(str(tmp_path / "a.safetensors"), framework="pt") as f:
        assert torch.equal(f.get_tensor(f"{QUERY}.base_indices"), old)
        assert torch.equal(f.get_tensor(f"{QUERY}.base_weight"), layer.base.weight.view(-1)[old])


QUERY = "bert.encoder.layer.0.attention.self.query"  # a 384 × 384 weight
GOOD = {f"{QUERY}.indices": torch.tensor([0, 5, 7], dtype=torch.int32), f"{QUERY}.values": torch.ones(3)}


@pytest.mark.parametrize(("tensors", "metadata", "message"), [
    ({**GOOD, f"{QUERY}.indices": torch.tensor([0, 5, 147456], dtype=torch.int32)}, None,
     rf"layer '{QUERY}': indices must lie in \[0, 147456\) for its weight \(384, 384\), found \[0, 147456\]"),
    ({f"bert.encoder.layer.9.attention.self.query.{k.rsplit('.', 1)[1]}": v for k, v in GOOD.items()}, None,
     r"layer 'bert.encoder.layer.9.attention.self.query' is not a linear layer of the model \(missing\)"),
    ({"bert.embeddings.LayerNorm.indices": GOOD[f"{QUERY}.indices"], "bert.embeddings.LayerNorm.values": torch.ones(3)},
     None, r"layer 'bert.embeddings.LayerNorm' is not a linear layer of the model \(LayerNorm\)"),
    ({**GOOD, f"{QUERY}.values": torch.ones(4)}, None,
     r"indices \(3,\) and values \(4,\) must be 1-D of the same length"),
    ({**GOOD, f"{QUERY}.indices": torch.tensor([0.0, 5.0, 7.0])}, None,
     "indices must be integers, got torch.float32"),
    ({**GOOD, f"{QUERY}.values": torch.ones(3, dtype=torch.int64)}, None,
     "values must be floating point, got torch.int64"),
    ({**GOOD, f"{QUERY}.indices": torch.tensor([0, 5, 5])}, None, "indices contain duplicates"),
    ({**GOOD, f"{QUERY}.values": torch.tensor([0.0, float("nan"), 1.0])}, None, "values contain NaN or inf"),
    ({f"{QUERY}.indices": GOOD[f"{QUERY}.indices"]}, None, f"layer '{QUERY}' has no values tensor"),
    ({**GOOD, "classifier.weight": torch.ones(2, 384)}, None, "unexpected tensor 'classifier.weight'"),
    (GOOD, {}, "not a speft sparse-delta adapter"),
    (GOOD, {"format": ADAPTER_FORMAT, "model": "{not json"}, "metadata is not JSON-encoded"),
])
def test_bad_adapters_raise_adapter_error_naming_the_problem(minilm, tmp_path, tensors, metadata, message):
    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path), metadata={"format": ADAPTER_FORMAT} if metadata is None else metadata)
    model = minilm()
    with pytest.raises(AdapterError, match=message):
        load_adapter(path, model)
    assert not sparse_deltas(model)  # nothing half-applied


