"""SparseDeltaLinear (methods/speft/layer.py) against the dense formulation W + Δ: forward, gradients, both
value-gradient kernels, precision, merge, set_mask."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from speft_bench.methods.speft.layer import SparseDeltaLinear, choose_value_grad
from tests.helpers import saved_numels

KERNELS = ["dense", "sampled"]
# conf/targets/bert.yaml `all`: the 36 linears of MiniLM-L6's blocks
TARGETS = (r".*\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense"
           r"|intermediate\.dense|output\.dense)")


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
    torch.float32: {(4096, 4096): "sampled", (1024, 4096): "sampled", (14336, 4096): "sampled",
                    (4096, 14336): "sampled"},
    torch.bfloat16: {(4096, 4096): "sampled", (1024, 4096): "dense", (14336, 4096): "sampled",
                     (4096, 14336): "sampled"},

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
    # methods/speft/test_method.py::test_a_refresh_resets_the_optimizer_state_it_names, which drives the real one
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
