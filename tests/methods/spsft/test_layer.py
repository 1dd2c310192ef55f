"""RowDeltaLinear (methods/spsft/layer.py) against the dense formulation W + M W_f: forward, gradients,
what is saved for backward, merge, precision, bad rows."""


import pytest
import torch
import torch.nn.functional as F
from torch import nn

from speft_bench.methods.spsft.layer import RowDeltaLinear
from tests.helpers import saved_numels

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
    assert ((layer.delta.grad.double() - reference).abs()
            <= 2 ** -8 * reference.abs() + 1e-6 * reference.abs().max()).all()
    # y and grad_x: bf16 outputs of sums of two bf16 GEMMs (W x, and the rows' W_f x)
    torch.testing.assert_close(y.double(), F.linear(x64, w64 + delta64, layer.base.bias.double()),
                               rtol=2 ** -7, atol=1e-2)

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
