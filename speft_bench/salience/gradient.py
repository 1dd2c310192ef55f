"""Gradient |E[∂ℓ/∂θ]|: the SPEFT paper's recommended metric."""

from speft_bench.salience import SALIENCE_METRICS
from speft_bench.salience.base import Scores, mean_gradients


@SALIENCE_METRICS.register("gradient")
def gradient(model, weights, batches, **memory) -> Scores:
    return {name: g.abs_() for name, g in mean_gradients(model, weights, batches, **memory).items()}
