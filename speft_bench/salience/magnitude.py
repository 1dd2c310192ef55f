"""Magnitude |θ| (Han et al. 2015): data-free."""

from speft_bench.salience import SALIENCE_METRICS, Scores


@SALIENCE_METRICS.register("magnitude")
def magnitude(model, weights, batches) -> Scores:
    return {name: w.detach().abs() for name, w in weights.items()}
