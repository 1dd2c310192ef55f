"""FORCE −E[g] ⊙ θ: foresight connection sensitivity, signed (de Jorge et al. 2021).

Signed on purpose: entries whose first-order change would *lower* the loss rank highest.
"""

from speft_bench.salience import SALIENCE_METRICS
from speft_bench.salience.base import Scores, mean_gradients


@SALIENCE_METRICS.register("force")
def force(model, weights, batches, **memory) -> Scores:
    # −(g·θ) is bit for bit (−g)·θ: IEEE rounding is symmetric in the sign
    return {name: g.mul_(weights[name].detach().to(g.device)).neg_()
            for name, g in mean_gradients(model, weights, batches, **memory).items()}
