"""Fisher information E[(∂ℓ/∂θ)²] over per-example gradients (Sung et al. 2021, FishMASK).

The square of a mean gradient is not the mean of squares, so the default (``micro_batch=1``) takes one
backward per example.  ``micro_batch=m > 1`` squares the gradient of m-example means instead:
m× fewer backward passes, and an estimate biased towards the squared mean (E[ḡ²] = E[g]² + Var[g]/m).

An expectation over *examples*: each m-example piece weighs by its share of the examples (not of the
loss terms, as the mean gradient does).  ``calibration_micro_batch`` smaller than m only splits the
forward/backward of a piece: its slices' gradients sum in ``.grad`` (one more W while a piece is
open) and are squared once complete.  Pieces without any loss term (causal LMs: no response token)
are left out, in the count of examples too.

``variant="reference"``: what the authors' code (0-ml/speft, ``compute_fisher_info_scores``) computes on
BERT-family models, which produced the paper's GLUE numbers.  Its per-example call is
``model(input_ids, attention_mask, labels)`` *positionally*; the third parameter of
``BertForSequenceClassification.forward`` (and RoBERTa's, DeBERTa's, MiniLM's) is ``token_type_ids``, so
the example's label becomes its token type at every position (the batch's segment ids are dropped),
and the model, given no labels, computes no loss.  The loss is then the cross-entropy of the logits
against the labels, computed outside the model as the authors do: per example the same loss as the
model's own.  One example per gradient (``metric.micro_batch=1``), classification only (a regression
label is no token type: ``config.FisherSchema``).
"""

import inspect

import torch.nn.functional as F

from speft_bench.batches import loss_terms, micro_batches, weighted_pieces
from speft_bench.errors import ConfigError
from speft_bench.progress import progress
from speft_bench.salience import SALIENCE_METRICS
from speft_bench.salience.base import Scores, adder, backward_per_layer, batch_size, calibration_mode, score_buffers


def own_loss(model, piece):
    return model(**piece).loss


def positional_loss(model, piece):
    """The authors' call: labels as the forward's third positional argument, the loss from the logits."""
    logits = model(piece["input_ids"], piece["attention_mask"], piece["labels"]).logits
    return F.cross_entropy(logits.view(-1, logits.shape[-1]), piece["labels"].view(-1))


def check_positional(model, batches) -> None:
    """ConfigError unless ``model``'s third forward parameter is ``token_type_ids`` and every label is one
    of its token types (the authors' code fails on any other model: an index error, or a crash)."""
    params = list(inspect.signature(model.forward).parameters)
    name = f"{type(model).__name__}.forward"
    if params[2:3] != ["token_type_ids"]:
        raise ConfigError(f"metric=fisher metric.variant=reference passes the labels as the forward's third positional "
                          f"argument, token_type_ids on BERT-family models; {name} takes {params[2:3]} there")
    types = getattr(getattr(model, "config", None), "type_vocab_size", 0)
    top = max(int(b["labels"].max()) for b in batches)
    if types and top >= types:
        raise ConfigError(f"metric=fisher metric.variant=reference makes each label a token type, but {name} has "
                          f"type_vocab_size={types} and the labels go up to {top}; use metric.variant=paper")


@SALIENCE_METRICS.register("fisher")
def fisher(model, weights, batches, variant: str = "paper", micro_batch: int = 1,
           calibration_micro_batch: int | None = None, offload: bool = False, mode: str = "eval") -> Scores:
    loss_of = own_loss
    if variant == "reference":
        check_positional(model, batches)
        loss_of, micro_batch = positional_loss, 1
    pieces = [p for b in batches for p in micro_batches(b, micro_batch) if loss_terms(p)]
    total = sum(batch_size(p) for p in pieces)
    squares = score_buffers(weights, offload)
    with calibration_mode(model, weights, mode):
        for piece in progress(pieces, desc="salience: fisher", leave=False):
            add = adder(squares, alpha=batch_size(piece) / total)
            *first, (last, share) = weighted_pieces([piece], calibration_micro_batch)
            for part, part_share in first:
                (loss_of(model, part) * part_share).backward(inputs=list(weights.values()))
            backward_per_layer(loss_of(model, last) * share, weights, lambda name, g: add(name, g.square_()))
    return squares
