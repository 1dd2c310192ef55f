"""Magnitude |θ| (Han et al. 2015): data-free."""

from speft_bench.salience import SALIENCE_METRICS, Scores, score_dtype


@SALIENCE_METRICS.register("magnitude")
def magnitude(model, weights, batches, calibration_micro_batch=None, offload: bool = False) -> Scores:
    # abs() first: .to() of a float32 weight on its own device would be the weight itself
    return {name: w.detach().abs().to("cpu" if offload else w.device, score_dtype(w)) for name, w in weights.items()}
