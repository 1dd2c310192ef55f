"""GRaSP −(H·E[g]) ⊙ θ: gradient signal preservation (Wang et al. 2020).

H·E[g] is a Hessian-vector product by double backward, never an explicit Hessian: a first pass
takes E[g]; a second differentiates ⟨∂ℓ_b/∂θ, stop_grad(E[g])⟩ per micro-batch.  2× the gradient
passes of a first-order metric, as the SPEFT paper says.  Attention runs on SDPA's math kernel here:
the fused CPU/GPU kernels have no second derivative.

Memory: E[g] and the H·E[g] sums (float32, 2 W); each layer's differentiable gradient lives only
until its term of the inner product is taken (the terms are then summed in the weights' order, as
before, so the order in which backward reaches the layers does not matter).  On top, about 1 W that
autograd holds: the double backward reaches each weight twice, through its linear and through that
linear's own backward (∂x = ∂y·W), far apart in the graph, and keeps the first contribution until the
second arrives.  Splitting the two would free it, but would change how the sums round.

``variant="reference"``: what the authors' code (0-ml/speft, ``compute_grasp_scores``) computes, which
produced the paper's numbers: +(H₂·g₁) ⊙ θ, where g₁ is the mean gradient over the calibration
examples, H₂ the Hessian of the mean loss over the *next* as many examples (so it draws two sets,
``calibration_sets``), and every cross-entropy divides its logits by a temperature of 200 in both
passes.  Its top-k keeps what GraSP itself (Wang et al.) keeps, since GraSP prunes the highest −θ ⊙ Hg;
the paper variant's top-k of −(Hg) ⊙ θ keeps exactly what GraSP prunes.  Each set is averaged over its
loss terms, as everywhere in the harness (the authors weigh each batch's mean loss by 1/steps: the
same for equal-size batches, the default 64 × 16).
"""

from collections.abc import Iterator
from contextlib import contextmanager

import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from speft_bench.batches import weighted_pieces
from speft_bench.progress import progress
from speft_bench.salience import SALIENCE_METRICS
from speft_bench.salience.base import (
    Scores,
    adder,
    backward_per_layer,
    calibration_mode,
    mean_gradients,
    score_buffers,
    split_examples,
)

TEMPERATURE = 200.0  # the authors' `temperature = 200`, in both passes of the reference variant


def dot_into(terms: dict, vectors: Scores):
    """``consume`` that keeps ⟨grad, vectors[name]⟩, still differentiable, as ``terms[name]``."""
    def dot(name, grad):
        terms[name] = (grad * vectors[name].to(grad.device)).sum()

    return dot


@contextmanager
def cross_entropy_temperature(temperature: float) -> Iterator[None]:
    """Every cross-entropy takes logits / ``temperature`` (MSE, the regression loss, is untouched).

    The authors patch ``nn.CrossEntropyLoss.forward``, the loss of BERT-style heads (and of causal LMs in
    the transformers versions they required); patching ``F.cross_entropy``, which that module and
    today's transformers losses both call, gives the same loss on both.  Restored on exit.
    """
    original = F.cross_entropy

    def scaled(input, target, *args, **kwargs):
        return original(input / temperature, target, *args, **kwargs)

    F.cross_entropy = scaled
    try:
        yield
    finally:
        F.cross_entropy = original


def hessian_gradient_products(model, weights, gradient_batches, hessian_batches, calibration_micro_batch=None,
                              offload: bool = False, mode: str = "eval") -> Scores:
    """H·E[g] per weight: E[g] over ``gradient_batches``, the Hessian of the mean loss over ``hessian_batches``."""
    g_mean = mean_gradients(model, weights, gradient_batches, calibration_micro_batch, offload, mode)
    hvp = score_buffers(weights, offload)
    with calibration_mode(model, weights, mode), sdpa_kernel(SDPBackend.MATH):
        for piece, share in progress(weighted_pieces(hessian_batches, calibration_micro_batch),
                                     desc="salience: grasp Hg", leave=False):
            terms = {}
            backward_per_layer(model(**piece).loss * share, weights, dot_into(terms, g_mean), create_graph=True)
            backward_per_layer(sum(terms[name] for name in weights), weights, adder(hvp))
    return hvp


@SALIENCE_METRICS.register("grasp")
def grasp(model, weights, batches, variant: str = "paper", calibration_micro_batch: int | None = None,
          offload: bool = False, mode: str = "eval") -> Scores:
    if variant == "reference":
        first, second = split_examples(batches, 2)
        with cross_entropy_temperature(TEMPERATURE):
            hvp = hessian_gradient_products(model, weights, first, second, calibration_micro_batch, offload, mode)
        return {name: h.mul_(weights[name].detach().to(h.device)) for name, h in hvp.items()}  # +(Hg) ⊙ θ
    hvp = hessian_gradient_products(model, weights, batches, batches, calibration_micro_batch, offload, mode)
    return {name: h.neg_().mul_(weights[name].detach().to(h.device)) for name, h in hvp.items()}


grasp.calibration_sets = lambda variant="paper", **_: 2 if variant == "reference" else 1
