"""Fisher information E[(∂ℓ/∂θ)²] over per-example gradients (Sung et al. 2021, FishMASK).

The square of a mean gradient is not the mean of squares, so the default (``micro_batch=1``) takes one
backward per example.  ``micro_batch=m > 1`` squares the gradient of m-example means instead:
m× fewer backward passes, and an estimate biased towards the squared mean (E[ḡ²] = E[g]² + Var[g]/m).

An expectation over *examples*: each m-example piece weighs by its share of the examples (not of the
loss terms, as the mean gradient does).  ``calibration_micro_batch`` smaller than m only splits the
forward/backward of a piece: its slices' gradients sum in ``.grad`` (one more W while a piece is
open) and are squared once complete.  Pieces without any loss term (causal LMs: no response token)
are left out, in the count of examples too.
"""

from speft_bench.batches import loss_terms, micro_batches, weighted_pieces
from speft_bench.progress import progress
from speft_bench.salience import (SALIENCE_METRICS, Scores, adder, backward_per_layer, batch_size, calibration_mode,
                                  score_buffers)


@SALIENCE_METRICS.register("fisher")
def fisher(model, weights, batches, micro_batch: int = 1, calibration_micro_batch: int | None = None,
           offload: bool = False) -> Scores:
    pieces = [p for b in batches for p in micro_batches(b, micro_batch) if loss_terms(p)]
    total = sum(batch_size(p) for p in pieces)
    squares = score_buffers(weights, offload)
    with calibration_mode(model, weights):
        for piece in progress(pieces, desc="salience: fisher", leave=False):
            add = adder(squares, alpha=batch_size(piece) / total)
            *first, (last, share) = weighted_pieces([piece], calibration_micro_batch)
            for part, part_share in first:
                (model(**part).loss * part_share).backward(inputs=list(weights.values()))
            backward_per_layer(model(**last).loss * share, weights, lambda name, g: add(name, g.square_()))
    return squares
