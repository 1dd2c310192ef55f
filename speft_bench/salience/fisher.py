"""Fisher information E[(∂ℓ/∂θ)²] over per-example gradients (Sung et al. 2021, FishMASK).

The square of a mean gradient is not the mean of squares, so the default (``micro_batch=1``) takes one
backward per example.  ``micro_batch=m > 1`` squares the gradient of m-example means instead:
m× fewer backward passes, and an estimate biased towards the squared mean (E[ḡ²] = E[g]² + Var[g]/m).
"""

import torch

from speft_bench.progress import progress
from speft_bench.salience import SALIENCE_METRICS, Scores, batch_size, calibration_mode


def micro_batches(batches: list[dict], size: int) -> list[dict]:
    """Split every batch into consecutive slices of at most ``size`` examples."""
    return [{key: value[start:start + size] for key, value in batch.items()}
            for batch in batches for start in range(0, batch_size(batch), size)]


@SALIENCE_METRICS.register("fisher")
def fisher(model, weights, batches, micro_batch: int = 1) -> Scores:
    pieces = micro_batches(batches, micro_batch)
    total = sum(batch_size(p) for p in pieces)
    names, params = list(weights), list(weights.values())
    acc = [torch.zeros_like(p) for p in params]
    with calibration_mode(model, weights):
        for piece in progress(pieces, desc="salience: fisher", leave=False):
            grads = torch.autograd.grad(model(**piece).loss, params)
            for a, g in zip(acc, grads):
                a.add_(g.square(), alpha=batch_size(piece) / total)
    return dict(zip(names, acc))
