"""SNIP |E[g] ⊙ θ|: connection sensitivity (Lee et al. 2019)."""

from speft_bench.salience import SALIENCE_METRICS
from speft_bench.salience.base import Scores, mean_gradients


@SALIENCE_METRICS.register("snip")
def snip(model, weights, batches, **memory) -> Scores:
    return {name: g.mul_(weights[name].detach().to(g.device)).abs_()
            for name, g in mean_gradients(model, weights, batches, **memory).items()}
