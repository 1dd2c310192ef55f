"""Magnitude |θ| (Han et al. 2015): data-free, and the model never runs (``method.calibration_mode`` n/a)."""

from speft_bench.salience import SALIENCE_METRICS
from speft_bench.salience.base import Scores, score_dtype


@SALIENCE_METRICS.register("magnitude")
def magnitude(model, weights, batches, calibration_micro_batch=None, offload: bool = False,
              mode: str = "eval") -> Scores:
    # abs() first: .to() of a float32 weight on its own device would be the weight itself
    return {name: w.detach().abs().to("cpu" if offload else w.device, score_dtype(w)) for name, w in weights.items()}


magnitude.runs_model = False  # method.calibration_mode=train would be ignored: rejected (methods/speft)
magnitude.reads_data = False  # its calibration draw may be empty (methods.base.prepare_without_data)
