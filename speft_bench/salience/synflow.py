"""SynFlow |θ| ⊙ ∂R/∂|θ| with R = 1ᵀ(Π_l |θ⁽ˡ⁾|)1 (Tanaka et al. 2020): data-free synaptic flow.

R is the output of the *linearised* model: every parameter replaced by its absolute value,
normalisations and activation functions bypassed (identity), an all-ones input, summed outputs.  On
a chain of linears this is exactly the path-product formula.  Attention stays as it is: under |θ|
its logits are huge, the softmax saturates, and Q/K get (near-)zero scores — an honest property of
SynFlow on transformers, and one reason it ranks poorly in the SPEFT paper.

No copy of the model: the parameters take |θ| in place, their sign bits kept packed (1 bit per
entry) and put back bit for bit afterwards; norms and activations are swapped for identities and
each ``nn.Linear`` for a float64 stand-in sharing its parameters, all swapped back afterwards.

Overflow guard: the product over L layers grows like ‖θ‖^L (~1e50 on MiniLM-L6), so activations are
float64, and each linear casts its weight to float64 one chunk of rows at a time, in forward and
again in backward, where it recomputes that chunk with autograd: the same kernels as on a float64
copy of the model, so the scores are bit for bit those of one, without ever holding it.  The scores
are divided by their global maximum (one scale for all layers, so global and local rankings are
unchanged): a first backward pass finds the maximum, a second writes the scaled scores straight into
the float32 buffers, so no float64 score per weight is kept either (the graph of a 16-token all-ones
input is small).  A model deep enough to overflow float64 stops the run as non-finite.

``variant="reference"``: what the authors' code (0-ml/speft, ``compute_synflow_scores``) computes, which
produced the paper's numbers.  It takes |·| of the whole state dict (parameters and persistent buffers)
in place and "linearises" by setting the activation functions of ``torch.nn.functional`` to the
identity (``AUTHORS_IDENTITIES``) while R runs.  That reaches only modules that look the function up at
call time (torch's ``nn.ReLU``, ``nn.GELU``, ``nn.SiLU``, ``nn.Softmax``; transformers' ``SiLUActivation``,
eager attention's softmax), not those that bound it at construction (transformers' ``GELUActivation``:
BERT's MLP), nor ``torch.tanh`` (the pooler), nor any norm: on BERT-family models with SDPA attention
nothing is bypassed.  The input is one all-ones ``inputs_embeds`` token (1 × 1 × hidden) in the model's
dtype, nothing is cast to float64 or rescaled, and the score is |∂R/∂|θ| · |θ||.  Parameters and
buffers are put back bit for bit afterwards (the authors multiply by the signs again, which loses the
sign of a weight tied to another: the second |·| already made it positive).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from speft_bench.errors import ConfigError
from speft_bench.models import is_norm
from speft_bench.salience import SALIENCE_METRICS
from speft_bench.salience.base import Scores, backward_per_layer, calibration_mode, score_buffers

SEQ_LEN = 16  # all-ones input tokens for sequence models: > 1 so positions (and so Q, K) matter
CHUNK = 1 << 21  # weight entries per float64 cast (16 MiB) and per sign-bit packing step

ACTIVATIONS = (nn.ReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.ELU, nn.Mish, nn.Softplus)
OTHER_NORMS = (nn.GroupNorm, nn.modules.batchnorm._BatchNorm)  # beyond LayerNorm/RMSNorm (models.is_norm)
BITS = torch.arange(8, dtype=torch.uint8)
SAME_WIDTH_INT = {8: torch.int64, 4: torch.int32, 2: torch.int16}  # float element size -> int dtype (sign bit view)
FoldFn = Callable[[slice, Tensor, Tensor], None]  # (rows, float64 ∂R/∂|W[rows]|, float64 |W[rows]|) -> None


def _bypassed(module: nn.Module) -> bool:
    """Activation functions and normalisations, including transformers' own classes."""
    return (isinstance(module, ACTIVATIONS + OTHER_NORMS) or is_norm(module)
            or type(module).__module__ == "transformers.activations")


# --------------------------------------------------------------------------- |θ| in place, signs kept
def _pack(bits: Tensor) -> Tensor:
    """(n,) bool → (⌈n/8⌉,) uint8, 8 entries per byte."""
    padded = F.pad(bits.to(torch.uint8), (0, -len(bits) % 8)).view(-1, 8)
    return (padded << BITS.to(bits.device)).sum(dim=1, dtype=torch.uint8)


def _unpack(packed: Tensor, n: int) -> Tensor:
    """Inverse of ``_pack``: the first n bits as (n,) bool."""
    return ((packed[:, None] >> BITS.to(packed.device)) & 1).view(-1)[:n].bool()


def _sign_view(p: Tensor) -> Tensor:
    """The entries of ``p`` as same-width signed integers: negative exactly where the sign bit is set."""
    return p.detach().view(-1).view(SAME_WIDTH_INT[p.element_size()])


@contextmanager
def absolute_values(model: nn.Module) -> Iterator[None]:
    """Every parameter of ``model`` |θ| in place; on exit the sign bits are set again, so every entry
    (−0.0 and NaN payloads included) is bit for bit what it was.  Costs 1 bit per entry."""
    params = list(model.parameters())
    signs = []
    with torch.no_grad():
        for p in params:
            ints, chunks = _sign_view(p), []
            for start in range(0, ints.numel(), CHUNK):
                part = ints[start:start + CHUNK]
                chunks.append(_pack(part < 0))
                part.bitwise_and_(torch.iinfo(ints.dtype).max)  # clear the sign bit: |θ|, exactly
            signs.append(chunks)
    try:
        yield
    finally:
        with torch.no_grad():
            for p, chunks in zip(params, signs):
                ints = _sign_view(p)
                for start, packed in zip(range(0, ints.numel(), CHUNK), chunks):
                    part = ints[start:start + CHUNK]
                    part.bitwise_or_(_unpack(packed, part.numel()).to(ints.dtype) * torch.iinfo(ints.dtype).min)


# --------------------------------------------------------------------------- modules swapped in place
@contextmanager
def swapped(model: nn.Module, stand_in: Callable[[nn.Module], nn.Module | None]) -> Iterator[None]:
    """Each module for which ``stand_in`` returns a replacement is replaced (the outermost one where
    they nest); the originals are put back on exit."""
    originals: dict[str, tuple[nn.Module, nn.Module]] = {}
    for name, module in model.named_modules():
        if name and not any(name.startswith(outer + ".") for outer in originals):
            if (replacement := stand_in(module)) is not None:
                originals[name] = (module, replacement)
    for name, (_, replacement) in originals.items():
        model.set_submodule(name, replacement)
    try:
        yield
    finally:
        for name, (module, _) in originals.items():
            model.set_submodule(name, module)


def _row_chunks(weight: Tensor) -> list[slice]:
    rows = max(1, CHUNK // max(1, weight.shape[1]))
    return [slice(start, min(start + rows, weight.shape[0])) for start in range(0, weight.shape[0], rows)]


class _Linear64(torch.autograd.Function):
    """x·Wᵀ + b in float64 from float32 (or bf16) W and b, cast a chunk of rows at a time.

    Saves x and the parameters themselves, never their float64 casts: backward casts again and lets
    autograd differentiate each chunk's ``F.linear``, so the gradients come from the same kernels as a
    float64 module's.  The weight's gradient goes to ``fold`` (a target) instead of to the parameter,
    whose dtype could not hold it.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, fold: FoldFn | None) -> Tensor:
        ctx.save_for_backward(x, weight, bias)
        ctx.fold = fold
        outs = [F.linear(x, weight[rows].double(), None if bias is None else bias[rows].double())
                for rows in _row_chunks(weight)]
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, weight, bias = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[:2]
        chunks = _row_chunks(weight)
        grad_x = None
        for rows in chunks:
            x_in = x.detach().requires_grad_(need_x)
            w64 = weight[rows].detach().double().requires_grad_(need_w)
            with torch.enable_grad():
                out = F.linear(x_in, w64, None if bias is None else bias[rows].detach().double())
            wanted = [t for t in (x_in, w64) if t.requires_grad]
            grads = torch.autograd.grad(out, wanted, grad_out if len(chunks) == 1 else grad_out[..., rows])
            if need_w and ctx.fold is not None:
                ctx.fold(rows, grads[-1], w64.detach())
            if need_x:
                grad_x = grads[0] if grad_x is None else grad_x.add_(grads[0])
            del x_in, w64, out, grads  # before the next chunk's cast, not after it
        return grad_x, None, None, None


class Float64Linear(nn.Module):
    """Stands in for an ``nn.Linear`` (sharing its parameters) with a float64 output."""

    def __init__(self, linear: nn.Linear, fold: FoldFn | None):
        super().__init__()
        self.weight, self.bias, self.fold = linear.weight, linear.bias, fold

    def forward(self, x: Tensor) -> Tensor:
        return _Linear64.apply(x.double(), self.weight, self.bias, self.fold)


class _Flow:
    """Folds each target's ∂R/∂|θ| into its score: pass 1 finds the global max, pass 2 writes scores / max."""

    def __init__(self, scores: Scores):
        self.scores, self.top, self.scale = scores, -math.inf, None

    def folder(self, name: str) -> FoldFn:
        def fold(rows: slice, grad: Tensor, weight: Tensor) -> None:
            score = grad.mul_(weight)  # |θ| ⊙ ∂R/∂|θ|, float64
            if self.scale is None:
                self.top = max(self.top, float(score.max()))
            else:
                self.scores[name][rows].copy_(score.div_(self.scale))  # float64 → float32, rounded once

        return fold

    def end_first_pass(self) -> None:
        finite = self.top > 0 and math.isfinite(self.top)
        self.scale = self.top if finite else 1.0  # non-finite: reported by the caller


def ones_input(model: nn.Module, length: int = SEQ_LEN,
               dtype: torch.dtype | None = torch.float64) -> tuple[tuple, dict]:
    """(args, kwargs) of an all-ones input of ``length`` tokens in ``dtype`` (None: the first layer's):
    input embeddings for transformers, features otherwise."""
    device = next(model.parameters()).device
    if hasattr(model, "get_input_embeddings"):
        embedding = model.get_input_embeddings()
        shape = (1, length, embedding.embedding_dim)
        return (), {"inputs_embeds": torch.ones(shape, dtype=dtype or embedding.weight.dtype, device=device)}
    first = next((m for m in model.modules() if isinstance(m, nn.Linear)), None)
    if first is None:
        raise ConfigError("metric=synflow needs a model with an input embedding or an nn.Linear first layer")
    return (torch.ones(1, first.in_features, dtype=dtype or first.weight.dtype, device=device),), {}


def _output(out) -> Tensor:
    return out.logits if hasattr(out, "logits") else out


# --------------------------------------------------------------------------- the authors' variant
# The torch.nn.functional names the authors' code sets to the identity while R runs.
AUTHORS_IDENTITIES = ("threshold", "relu", "rrelu", "hardtanh", "relu6", "sigmoid", "hardsigmoid", "tanh", "silu",
                      "mish", "hardswish", "elu", "celu", "selu", "glu", "gelu", "hardshrink", "leaky_relu",
                      "logsigmoid", "softplus", "softshrink", "prelu", "softsign", "tanhshrink", "softmin", "softmax",
                      "log_softmax")


def _identity(x, *args, **kwargs):
    return x


@contextmanager
def functional_identities(names: tuple[str, ...]) -> Iterator[None]:
    """``torch.nn.functional.<name>`` is the identity for each name inside the block; restored on exit."""
    originals = {name: getattr(F, name) for name in names}
    for name in names:
        setattr(F, name, _identity)
    try:
        yield
    finally:
        for name, function in originals.items():
            setattr(F, name, function)


@contextmanager
def absolute_buffers(model: nn.Module) -> Iterator[None]:
    """|b| in place for every persistent buffer of ``model`` (the rest of its state dict) with a negative
    entry; each such buffer is copied first and put back on exit."""
    params = {id(p) for p in model.parameters()}
    saved: dict[int, tuple[Tensor, Tensor]] = {}
    with torch.no_grad():
        for tensor in model.state_dict(keep_vars=True).values():
            if id(tensor) in params or id(tensor) in saved or tensor.dtype == torch.bool:
                continue
            if not bool((tensor < 0).any()):
                continue
            saved[id(tensor)] = (tensor, tensor.clone())
            tensor.abs_()
    try:
        yield
    finally:
        with torch.no_grad():
            for tensor, original in saved.values():
                tensor.copy_(original)


def reference_synflow(model, weights, offload: bool = False, mode: str = "eval") -> Scores:
    """|∂R/∂|θ| · |θ|| with R the summed output of the |state dict| model on a 1 × 1 all-ones input,
    the authors' activation names the identity (module docstring), in the model's dtype."""
    scores = score_buffers(weights, offload)

    def fold(name: str, grad: Tensor) -> None:  # weights[name] holds |θ| here
        scores[name].copy_(grad.mul_(weights[name].detach()).abs_())

    with (calibration_mode(model, weights, mode), absolute_values(model), absolute_buffers(model),
          functional_identities(AUTHORS_IDENTITIES)):
        args, kwargs = ones_input(model, length=1, dtype=None)
        backward_per_layer(_output(model(*args, **kwargs)).sum(), weights, fold)
    return scores


@SALIENCE_METRICS.register("synflow")
def synflow(model, weights, batches, variant: str = "paper", calibration_micro_batch=None, offload: bool = False,
            mode: str = "eval") -> Scores:
    if variant == "reference":
        return reference_synflow(model, weights, offload, mode)
    linears = {id(m.weight): m for m in model.modules() if isinstance(m, nn.Linear)}
    if outside := [name for name, w in weights.items() if id(w) not in linears]:
        raise ConfigError(f"metric=synflow scores nn.Linear weights only; not one: {', '.join(outside)}")
    scores = score_buffers(weights, offload)
    flow = _Flow(scores)
    folds = {id(w): flow.folder(name) for name, w in weights.items()}

    def stand_in(module: nn.Module) -> nn.Module | None:
        if isinstance(module, nn.Linear):
            return Float64Linear(module, folds.get(id(module.weight)))
        return nn.Identity() if _bypassed(module) else None

    args, kwargs = ones_input(model)
    # SDPA's math kernel: the fused CPU kernel returns NaN gradients for the huge logits of |θ| chains
    with (calibration_mode(model, weights, mode), swapped(model, stand_in), absolute_values(model),
          sdpa_kernel(SDPBackend.MATH)):
        flow_sum = _output(model(*args, **kwargs)).sum()
        flow_sum.backward(retain_graph=True)
        flow.end_first_pass()
        flow_sum.backward()
    return scores


synflow.reads_data = False  # an all-ones input in both variants: the calibration draw may be empty
