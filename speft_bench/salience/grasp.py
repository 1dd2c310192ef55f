"""GRaSP −(H·E[g]) ⊙ θ: gradient signal preservation (Wang et al. 2020).

H·E[g] is a Hessian-vector product by double backward, never an explicit Hessian: a first pass
takes E[g]; a second differentiates ⟨∂ℓ_b/∂θ, stop_grad(E[g])⟩ per batch.  2× the gradient passes of
a first-order metric, as the SPEFT paper says.  Attention runs on SDPA's math kernel here: the fused
CPU/GPU kernels have no second derivative.
"""

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from speft_bench.progress import progress
from speft_bench.salience import SALIENCE_METRICS, Scores, batch_size, calibration_mode, mean_gradients


@SALIENCE_METRICS.register("grasp")
def grasp(model, weights, batches) -> Scores:
    g_mean = mean_gradients(model, weights, batches)
    total = sum(batch_size(b) for b in batches)
    names, params = list(weights), list(weights.values())
    hvp = [torch.zeros_like(p) for p in params]
    with calibration_mode(model, weights), sdpa_kernel(SDPBackend.MATH):
        for batch in progress(batches, desc="salience: grasp Hg", leave=False):
            loss = model(**batch).loss * (batch_size(batch) / total)
            grads = torch.autograd.grad(loss, params, create_graph=True)
            inner = sum((g * g_mean[n]).sum() for n, g in zip(names, grads))
            for acc, h in zip(hvp, torch.autograd.grad(inner, params)):
                acc.add_(h)
    return {n: -h * weights[n].detach() for n, h in zip(names, hvp)}
