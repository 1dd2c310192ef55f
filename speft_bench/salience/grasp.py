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
"""

from torch.nn.attention import SDPBackend, sdpa_kernel

from speft_bench.batches import weighted_pieces
from speft_bench.progress import progress
from speft_bench.salience import (SALIENCE_METRICS, Scores, adder, backward_per_layer, calibration_mode, mean_gradients,
                                  score_buffers)


def dot_into(terms: dict, vectors: Scores):
    """``consume`` that keeps ⟨grad, vectors[name]⟩, still differentiable, as ``terms[name]``."""
    def dot(name, grad):
        terms[name] = (grad * vectors[name].to(grad.device)).sum()

    return dot


@SALIENCE_METRICS.register("grasp")
def grasp(model, weights, batches, calibration_micro_batch: int | None = None, offload: bool = False) -> Scores:
    g_mean = mean_gradients(model, weights, batches, calibration_micro_batch, offload)
    hvp = score_buffers(weights, offload)
    with calibration_mode(model, weights), sdpa_kernel(SDPBackend.MATH):
        for piece, share in progress(weighted_pieces(batches, calibration_micro_batch), desc="salience: grasp Hg",
                                     leave=False):
            terms = {}
            backward_per_layer(model(**piece).loss * share, weights, dot_into(terms, g_mean), create_graph=True)
            backward_per_layer(sum(terms[name] for name in weights), weights, adder(hvp))
    return {name: h.neg_().mul_(weights[name].detach().to(h.device)) for name, h in hvp.items()}
