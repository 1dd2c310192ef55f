"""SNIP |E[g] ⊙ θ|: connection sensitivity (Lee et al. 2019)."""

from speft_bench.salience import SALIENCE_METRICS, Scores, mean_gradients


@SALIENCE_METRICS.register("snip")
def snip(model, weights, batches) -> Scores:
    return {name: (g * weights[name].detach()).abs() for name, g in mean_gradients(model, weights, batches).items()}
