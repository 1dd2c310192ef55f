"""Taylor-FO (E[g] ⊙ θ)² (Molchanov et al. 2019).

It ranks exactly as SNIP does (a square of the same magnitude), which is why the SPEFT paper's
SNIP and Taylor-FO rows are identical; both are kept for the tables.
"""

from speft_bench.salience import SALIENCE_METRICS
from speft_bench.salience.base import Scores, mean_gradients


@SALIENCE_METRICS.register("taylor_fo")
def taylor_fo(model, weights, batches, **memory) -> Scores:
    return {name: g.mul_(weights[name].detach().to(g.device)).square_()
            for name, g in mean_gradients(model, weights, batches, **memory).items()}
