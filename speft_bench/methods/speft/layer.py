"""A frozen ``nn.Linear`` plus a trainable sparse additive delta: y = x (W + Δ)ᵀ + b.

Δ (d_out × d_in) has k non-zeros, stored as sorted flat indices into W.view(-1) and their values.
The reference SPEFT code scatters the values into a dense copy of W inside autograd, so every
step keeps d_out × d_in activations and computes the full weight gradient.  Here no tensor of
d_out × d_in elements is saved between forward and backward:

* forward builds W_eff = W + Δ as a transient (one copy, ~0.05 ms) and runs one GEMM;
* backward rebuilds W_eff for grad_x (the same GEMM a frozen linear does) and computes only the k
  value gradients, ∂L/∂v_j = Σ_n g[n, r_j] · x[n, c_j], with one of two kernels (``choose_value_grad``);
* both GEMMs run in one compute dtype (autocast's or W's: a bf16 body, bf16 autocast, fp32 values
  all meet there), and the value gradients are summed in float32 (float64 for float64) whatever it is.
"""

from __future__ import annotations

import warnings
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from speft_bench.adapters import compute_dtype, frozen_weight, is_integer_dtype, keep_frozen_weight

ValueGrad = Literal["auto", "dense", "sampled"]

# Cost model for choosing the value-gradient kernel, in units of one multiply-add of a dense float32
# GEMM, per token (both kernels scale with the number of tokens N, so N cancels), for g and x in the
# dtype the layer computes in.  Fitted to `python scripts/bench.py kernels` on a 2-core AVX-512 (+BF16)
# EPYC with torch 2.13: MiniLM shapes at 2,048 tokens and Llama3-8B shapes at 256, float32 and bfloat16
# (BENCHMARKS.md; the worst wrong pick there costs 1.2×):
#   dense-then-gather: d_out·d_in MACs at BLAS speed in the inputs' dtype: bf16 (AVX512-BF16) at half
#                      float32's cost, fp16 (no fast CPU GEMM; one measurement, 1024×4096) at 18×;
#                      transient d_out × d_in.
#   sampled (SDDMM):   k MACs as float32 dot products over tokens whatever the inputs' dtype (the CPU
#                      kernel has no bf16/fp16), ~6× a GEMM MAC (no register blocking), plus
#                      transposing both activations into float32, ~70× per element: the reduction runs
#                      over tokens, the strided axis of both g and x.  Transient chunk × (d_in + d_out).
# On MiniLM's layers the transpose term dominates the sampled kernel, on Llama3-8B's at LoRA r=64 the
# k MACs do; at LoRA-matched budgets (density 1–5 %) it is cheaper than the dense product, except where
# a bf16 GEMM halves the dense side (1024×4096 at LoRA r=64's 7.8 %).  Dtypes not listed (float64:
# tests) use float32's dense cost.
SAMPLED_MAC_COST = 6
TRANSPOSE_COST = 70
DENSE_MAC_COST = {torch.float32: 1.0, torch.bfloat16: 0.5, torch.float16: 18.0}
TOKEN_CHUNK = 512  # tokens per sampled call: keeps the transposed chunks in cache (measured best)


def choose_value_grad(d_out: int, d_in: int, k: int, dtype: torch.dtype = torch.float32) -> Literal["dense", "sampled"]:
    """The cheaper value-gradient kernel for a d_out × d_in layer with k trainable entries, g and x in ``dtype``."""
    sampled = SAMPLED_MAC_COST * k + TRANSPOSE_COST * (d_in + d_out)
    return "sampled" if sampled < DENSE_MAC_COST.get(dtype, 1.0) * d_out * d_in else "dense"


def grad_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype value gradients are accumulated and returned in: float32, or float64 for float64 inputs."""
    return torch.promote_types(dtype, torch.float32)


def _with_delta(weight: Tensor, indices: Tensor, values: Tensor) -> Tensor:
    """W + Δ as a new (d_out, d_in) tensor in W's dtype; ``weight`` is untouched."""
    return weight.reshape(-1).index_add(0, indices, values.to(weight.dtype)).view_as(weight)


def dense_value_grad(grad_out: Tensor, x: Tensor, indices: Tensor) -> Tensor:
    """(gᵀ x)[indices] for g (N, d_out), x (N, d_in) → (k,) in ``grad_dtype``: one GEMM in the inputs'
    dtype (BLAS accumulates bf16 in float32; the output is rounded to it), d_out × d_in transient."""
    return (grad_out.t() @ x).view(-1).index_select(0, indices).to(grad_dtype(x.dtype))


def _token_minor(a: Tensor, dtype: torch.dtype) -> Tensor:
    """(B, d) → (d, B) contiguous in ``dtype``: one copy transposes and converts.  Through a 3-D view the
    copy runs on TensorIterator's 2 threads instead of ATen's single-threaded 2-D transpose path: ~1.7×
    faster for (512, 384) chunks."""
    return a.new_empty((1, a.shape[1], a.shape[0]), dtype=dtype).copy_(a.unsqueeze(0).transpose(1, 2))[0]


def sampled_value_grad(grad_out: Tensor, x: Tensor, indices: Tensor) -> Tensor:
    """(gᵀ x)[indices] for g (N, d_out), x (N, d_in) → (k,) in ``grad_dtype``, computing only the k entries.

    Uses the CSR SDDMM kernel (``torch.sparse.sampled_addmm``), which takes dot products along
    contiguous rows of gᵀ and xᵀ; ``indices`` must be sorted so that flat order is CSR order.
    Chunked over tokens, each chunk converted to ``grad_dtype`` (the kernel rejects bf16 and fp16),
    accumulating into the pattern's values (beta=1).
    """
    d_out, d_in = grad_out.shape[1], x.shape[1]
    dtype = grad_dtype(x.dtype)
    rows, cols = indices // d_in, indices % d_in
    row_starts = torch.arange(d_out + 1, dtype=rows.dtype, device=rows.device)
    crow = torch.searchsorted(rows, row_starts, out_int32=rows.dtype == torch.int32)
    with warnings.catch_warnings():  # "sparse CSR support is in beta"; we only use a stable kernel
        warnings.simplefilter("ignore", UserWarning)
        # zeros, not empty: beta=0 still multiplies the old values, so NaN garbage would propagate
        acc = torch.sparse_csr_tensor(crow, cols, x.new_zeros(len(indices), dtype=dtype), (d_out, d_in),
                                      check_invariants=False)
    for start in range(0, x.shape[0], TOKEN_CHUNK):
        chunk = slice(start, start + TOKEN_CHUNK)
        acc = torch.sparse.sampled_addmm(acc, _token_minor(grad_out[chunk], dtype), _token_minor(x[chunk], dtype).t(),
                                         beta=1.0)
    return acc.values()


class SparseDeltaFunction(torch.autograd.Function):
    """y = F.linear(x, W + Δ, b) computed in ``dtype``, differentiable in x and the k values only (W, b frozen).

    x, W + Δ (built in W's dtype) and b are cast to ``dtype`` (``adapters.compute_dtype``: autocast's or
    W's), so fp32 values in a bf16 body and bf16 autocast over fp32 weights both work; backward needs no
    autocast.  Gradients come back in their tensors' dtypes: grad_x is cast to x's by autograd, the value
    gradient is accumulated in float32 by ``kernel`` and cast to the values' dtype (an fp32 master stays fp32).

    Saved for backward: x (…, d_in) in ``dtype``, the values and indices (k,).  The frozen weight is held
    on ``ctx`` instead: it is the parameter itself (no copy), and keeping it out of the saved tensors
    keeps them activation-only for saved-tensor accounting.  Autograd does not version-check it
    there, so backward does: an in-place edit of W mid-step fails loudly instead of giving wrong
    gradients.
    """

    @staticmethod
    def forward(ctx, x: Tensor, values: Tensor, weight: Tensor, bias: Tensor | None, indices: Tensor,
                dtype: torch.dtype, kernel: str) -> Tensor:
        x = x.to(dtype)
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, values, indices)
        keep_frozen_weight(ctx, weight)
        ctx.kernel = kernel
        # W_eff freed on return
        return F.linear(x, _with_delta(weight, indices, values).to(dtype), None if bias is None else bias.to(dtype))

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, values, indices = ctx.saved_tensors
        weight = frozen_weight(ctx, "SparseDeltaLinear")
        grad_x = grad_values = None
        if ctx.needs_input_grad[0]:  # (…, d_out) @ (d_out, d_in), in the forward's dtype (grad_out's)
            grad_x = grad_out @ _with_delta(weight, indices, values).to(grad_out.dtype)
        if ctx.needs_input_grad[1]:
            g2, x2 = grad_out.reshape(-1, weight.shape[0]), x.reshape(-1, weight.shape[1])
            kernel = sampled_value_grad if ctx.kernel == "sampled" else dense_value_grad
            grad_values = kernel(g2, x2, indices).to(values.dtype)
        return grad_x, grad_values, None, None, None, None, None


class SparseDeltaLinear(nn.Module):
    """``base`` (frozen) plus a sparse delta with k trainable ``values`` at flat ``indices``.

    Args:
        base: the linear to wrap, kept as a submodule so its weights stay at ``<name>.base.*``.
        indices: (k,) flat indices into the (d_out, d_in) weight, unique; stored sorted, as int32
            when d_out·d_in fits.
        value_grad: "auto" picks the cheaper kernel for the forward's dtype (``choose_value_grad``);
            "dense"/"sampled" force one.

    Shapes: input (…, d_in) → output (…, d_out); ``values`` (k,), zero at start, in the weight's dtype
    until the run gives them their own (``speft_bench.precision``: fp32 masters in a bf16 body).
    """

    def __init__(self, base: nn.Linear, indices: Tensor, value_grad: ValueGrad = "auto"):
        super().__init__()
        if value_grad not in get_args(ValueGrad):
            raise ValueError(f"value_grad must be one of {list(get_args(ValueGrad))}, got {value_grad!r}")
        self.base = base.requires_grad_(False)
        self.value_grad_mode = value_grad
        self.register_buffer("indices", torch.empty(0, dtype=torch.int64, device=base.weight.device))
        self.values = nn.Parameter(torch.empty(0, dtype=base.weight.dtype, device=base.weight.device))
        # (W entries at `indices` before merge(), values merged so far): lets unmerge() restore W
        # exactly, since (W + v) - v is not W in floating point.
        self._merged: tuple[Tensor, Tensor] | None = None
        # flat positions of W that hold deltas merged under earlier masks (dynamic masking), sorted:
        # an adapter stores W there, so the base model plus the file is the trained model bit for bit
        self.register_buffer("base_touched", torch.empty(0, dtype=torch.int64, device=base.weight.device),
                             persistent=False)
        self.set_mask(indices)

    @property
    def k(self) -> int:
        return self.indices.numel()

    @property
    def density(self) -> float:
        return self.k / self.base.weight.numel()

    @property
    def merged(self) -> bool:
        return self._merged is not None

    @property
    def base_changed(self) -> bool:
        """W differs from the wrapped weight as it came: deltas of earlier masks were merged into it."""
        return self.base_touched.numel() > 0

    def value_grad(self, dtype: torch.dtype) -> Literal["dense", "sampled"]:
        """The value-gradient kernel this layer's backward runs when its forward computes in ``dtype``."""
        if self.value_grad_mode != "auto":
            return self.value_grad_mode
        return choose_value_grad(*self.base.weight.shape, self.k, dtype)

    def forward(self, x: Tensor) -> Tensor:
        if self.base.weight.requires_grad:
            raise RuntimeError("SparseDeltaLinear trains only its values; the base weight must stay frozen")
        dtype = compute_dtype(x, self.base.weight)
        return SparseDeltaFunction.apply(x, self.values, self.base.weight, self.base.bias, self.indices, dtype,
                                         self.value_grad(dtype))

    @torch.no_grad()
    def set_mask(self, indices: Tensor) -> None:
        """Train the entries at ``indices`` (k,) from zero; a pending merge() becomes permanent.

        ``values`` stays the same Parameter object (resized in place) so an optimizer holding it keeps
        training it; its optimizer state is stale and must be reset by the caller.
        """
        numel = self.base.weight.numel()
        if indices.ndim != 1 or not is_integer_dtype(indices.dtype):
            raise ValueError(f"indices must be a 1-D integer tensor of flat positions, "
                             f"got {indices.dtype} of shape {tuple(indices.shape)}")
        flat = indices.to(self.indices.device, torch.int64).sort().values
        if flat.numel() and (flat[0] < 0 or flat[-1] >= numel):
            raise ValueError(f"indices must lie in [0, {numel}) for weight {tuple(self.base.weight.shape)}, "
                             f"got range [{int(flat[0])}, {int(flat[-1])}]")
        if (flat[1:] == flat[:-1]).any():
            raise ValueError("indices must be unique")
        if self._merged is not None:  # the pending merge (of the old mask's entries) becomes permanent
            self.base_touched = torch.cat([self.base_touched, self.indices.long()]).unique()
        self.indices = flat.to(torch.int32) if numel <= torch.iinfo(torch.int32).max else flat
        self.values.data = torch.zeros(flat.numel(), dtype=self.values.dtype, device=flat.device)
        self.values.grad = None
        self._merged = None

    @torch.no_grad()
    def merge(self) -> None:
        """W ← W + Δ and values ← 0 (SPEFT Algorithm 1, line 5); undone by ``unmerge()``."""
        flat = self.base.weight.view(-1)
        if self._merged is None:
            self._merged = (flat.index_select(0, self.indices), torch.zeros_like(self.values))
        self._merged[1].add_(self.values)
        flat.index_add_(0, self.indices, self.values.to(flat.dtype))  # an fp32 master is rounded to a bf16 W here
        self.values.zero_()

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore W bit-exactly and move the merged delta back into ``values``."""
        if self._merged is None:
            raise RuntimeError("unmerge(): nothing merged since the mask was set")
        before, merged = self._merged
        self.base.weight.view(-1).index_put_((self.indices,), before)
        self.values.add_(merged)
        self._merged = None

    def merged_entries(self) -> Tensor:
        """W's values at ``base_touched``: what an adapter or a checkpoint keeps of earlier masks' merges."""
        return self.base.weight.detach().view(-1)[self.base_touched]

    @torch.no_grad()
    def restore_merged_entries(self, positions: Tensor, weight: Tensor) -> None:
        """Set W at flat ``positions`` to ``weight`` (``merged_entries`` of the trained layer), bit for bit."""
        positions = positions.to(self.base_touched.device, torch.int64)
        self.base.weight.view(-1)[positions] = weight.to(self.base.weight)
        self.base_touched = positions

    @torch.no_grad()
    def delta_dense(self) -> Tensor:
        """Δ as a dense (d_out, d_in) tensor (for tests and inspection)."""
        return _with_delta(torch.zeros_like(self.base.weight), self.indices, self.values)

    def extra_repr(self) -> str:
        return f"k={self.k}, density={self.density:.4g}, value_grad={self.value_grad_mode}, merged={self.merged}"
