"""A frozen ``nn.Linear`` plus trainable rows: y = x Wᵀ + b + M (W_f x), paper §3.1, eq. 5.

W_f (r × d_in) holds the deltas of r chosen output rows; M (d_out × r) is the fixed row selection
(M[rows[j], j] = 1), applied as an ``index_add`` on the output's last dim, never built.  The custom
autograd Function keeps only x between forward and backward (plus W_f and the row indices): neither
a d_out × d_in tensor (W + M W_f) nor the (N, r) hidden state W_f x, which LoRA has to cache for
∂L/∂B (§5.4, appendix D.4).  Backward:

* grad_x   = g W + g[..., rows] W_f     (the frozen linear's GEMM plus an N × r × d_in one)
* grad_W_f = g[..., rows]ᵀ x            (r × d_in, as for a linear layer with r outputs)

All of it runs in one dtype (``adapters.compute_dtype``: autocast's, else W's), so an fp32 W_f in a
bf16 body and bf16 autocast over fp32 weights work, and backward needs no autocast.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from speft_bench.adapters import compute_dtype, frozen_weight, is_integer_dtype, keep_frozen_weight


def rows_problem(rows: Tensor, d_out: int) -> str | None:
    """Why ``rows`` is not a valid row selection of a d_out-row weight, or None when it is."""
    if rows.ndim != 1 or not is_integer_dtype(rows.dtype):
        return f"rows must be a 1-D integer tensor, got {rows.dtype} of shape {tuple(rows.shape)}"
    if rows.numel() and (rows.min() < 0 or rows.max() >= d_out):
        return f"rows must lie in [0, {d_out}), found [{int(rows.min())}, {int(rows.max())}]"
    if rows.unique().numel() != rows.numel():
        return "rows contain duplicates"
    return None


class RowDeltaFunction(torch.autograd.Function):
    """y = F.linear(x, W, b) with ``delta`` added to output columns ``rows``; differentiable in x and delta.

    Shapes: x (…, d_in), delta (r, d_in), weight (d_out, d_in), bias (d_out,) or None, rows (r,) int64
    → y (…, d_out), computed in ``dtype`` (x, W, b and delta are cast to it; x is saved in it).  Gradients
    come back in their tensors' dtypes: grad_x is cast to x's by autograd, grad_delta to delta's (an fp32
    master stays fp32).  The frozen weight is held on ``ctx`` rather than saved (it is the parameter, not a
    copy, and the saved tensors stay activation-only for accounting); backward checks its version so an
    in-place edit of W mid-step fails instead of giving wrong gradients.
    """

    @staticmethod
    def forward(ctx, x: Tensor, delta: Tensor, weight: Tensor, bias: Tensor | None, rows: Tensor,
                dtype: torch.dtype) -> Tensor:
        x = x.to(dtype)
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, delta, rows)
        keep_frozen_weight(ctx, weight)
        out = F.linear(x, weight.to(dtype), None if bias is None else bias.to(dtype))
        return out.index_add_(-1, rows, F.linear(x, delta.to(dtype)))  # the (…, r) term is freed on return

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, delta, rows = ctx.saved_tensors
        weight = frozen_weight(ctx, "RowDeltaLinear")
        dtype = grad_out.dtype  # the forward's
        g_rows = grad_out.index_select(-1, rows)  # (…, r): transient
        grad_x = grad_delta = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad_out @ weight.to(dtype)).add_(g_rows @ delta.to(dtype))
        if ctx.needs_input_grad[1]:
            grad_delta = (g_rows.reshape(-1, len(rows)).t() @ x.reshape(-1, x.shape[-1])).to(delta.dtype)
        return grad_x, grad_delta, None, None, None, None


class RowDeltaLinear(nn.Module):
    """``base`` (frozen) plus a trainable delta W_f on the output ``rows``: W_eff = W + M W_f.

    Args:
        base: the linear to wrap, kept as a submodule so its weights stay at ``<name>.base.*``.
        rows: (r,) distinct output-row indices in [0, d_out); stored sorted as int64.

    Shapes: input (…, d_in) → output (…, d_out); ``delta`` (r, d_in), zero at start, its row j belongs to
    output row ``rows[j]``; in the weight's dtype until the run gives it its own (``speft_bench.precision``).
    """

    def __init__(self, base: nn.Linear, rows: Tensor):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.register_buffer("rows", torch.empty(0, dtype=torch.int64, device=base.weight.device))
        self.delta = nn.Parameter(torch.empty(0, base.in_features, dtype=base.weight.dtype, device=base.weight.device))
        self.set_rows(rows)

    @property
    def r(self) -> int:
        return self.rows.numel()

    def forward(self, x: Tensor) -> Tensor:
        if self.base.weight.requires_grad:
            raise RuntimeError("RowDeltaLinear trains only its delta; the base weight must stay frozen")
        return RowDeltaFunction.apply(x, self.delta, self.base.weight, self.base.bias, self.rows,
                                      compute_dtype(x, self.base.weight))

    @torch.no_grad()
    def set_rows(self, rows: Tensor) -> None:
        """Train the output ``rows`` (r,) from a zero delta.

        ``delta`` stays the same Parameter object (resized in place), so an optimizer holding it keeps it.
        """
        problem = rows_problem(rows, self.base.out_features)
        if problem is not None:
            raise ValueError(problem)
        self.rows = rows.to(self.rows.device, torch.int64).sort().values
        self.delta.data = self.delta.new_zeros(self.r, self.base.in_features)
        self.delta.grad = None

    @torch.no_grad()
    def merge(self) -> nn.Linear:
        """W[rows] += W_f, delta ← 0; returns the base linear, which now computes this layer's output."""
        self.base.weight.index_add_(0, self.rows, self.delta.to(self.base.weight.dtype))
        self.delta.zero_()
        return self.base

    @torch.no_grad()
    def delta_dense(self) -> Tensor:
        """M W_f as a dense (d_out, d_in) tensor (for tests and inspection)."""
        return torch.zeros_like(self.base.weight).index_add_(0, self.rows, self.delta.to(self.base.weight.dtype))

    def extra_repr(self) -> str:
        return f"r={self.r}, rows of {self.base.out_features}"
