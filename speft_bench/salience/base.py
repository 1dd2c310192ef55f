"""What the salience metrics share: score buffers, per-layer backward, the calibration mode and data sets.

Memory is bounded by one score buffer per target weight: each layer's ``.grad`` is folded into its
buffer and freed as soon as backward has produced it (``backward_per_layer``), so at most one layer's
dense gradient exists at a time, and the scores are built in place in the buffers.

Metrics that run the model do so in eval mode (no dropout; ``mode="train"``: dropout on) with gradients
enabled on the target weights only, and restore the model's flags afterwards (``calibration_mode``).

A metric may draw more than one set of calibration examples (GRaSP's reference variant: a second set
for its Hessian pass): its function's ``calibration_sets(**options)`` says how many, the method draws
that many times ``method.calibration_examples`` (``calibration_sets`` below), and the metric splits them
(``split_examples``).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from speft_bench.batches import weighted_pieces
from speft_bench.errors import check_finite
from speft_bench.progress import progress
from speft_bench.salience import SALIENCE_METRICS

Scores = dict[str, Tensor]  # what a metric returns: target name -> its (d_out, d_in) scores
Consume = Callable[[str, Tensor], None]  # (target name, its complete gradient) -> None


def batch_size(batch: dict) -> int:
    return len(batch["labels"])


def calibration_sets(name: str, **options) -> int:
    """How many sets of ``method.calibration_examples`` metric ``name`` with ``options`` takes (default 1)."""
    sets = getattr(SALIENCE_METRICS[name], "calibration_sets", None)
    return 1 if sets is None else sets(**options)


def split_examples(batches: list[dict], parts: int) -> list[list[dict]]:
    """``batches`` cut into ``parts`` consecutive sets of equally many examples (the first sets take one
    more where they do not divide); a batch that straddles a cut is sliced."""
    total = sum(batch_size(b) for b in batches)
    ends = [total * (i + 1) // parts for i in range(parts)]
    sets, start = [[] for _ in range(parts)], 0
    for batch in batches:
        n, offset = batch_size(batch), 0
        while offset < n:
            part = next(i for i, end in enumerate(ends) if start + offset < end)
            take = min(n - offset, ends[part] - start - offset)
            sets[part].append(batch if take == n else {key: v[offset:offset + take] for key, v in batch.items()})
            offset += take
        start += n
    return sets


@contextmanager
def calibration_mode(model: nn.Module, weights: dict[str, Tensor], mode: str = "eval") -> Iterator[None]:
    """Eval mode (``mode="train"``: train mode, dropout on), gradients on ``weights`` only; flags, mode
    and any existing ``.grad`` restored on exit."""
    flags = {p: p.requires_grad for p in model.parameters()}
    stashed = {name: w.grad for name, w in weights.items()}  # the per-layer hooks must see only our gradients
    training = model.training
    keep = {id(w) for w in weights.values()}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
    for w in weights.values():
        w.grad = None
    model.train(mode == "train")
    try:
        with torch.enable_grad():
            yield
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
        for name, w in weights.items():
            w.grad = stashed[name]
        model.train(training)


def score_buffers(weights: dict[str, Tensor], offload: bool = False) -> Scores:
    """A zeroed (d_out, d_in) buffer per weight, on the weight's device or the CPU (``offload``).

    At least float32 (float64 weights keep float64): 64 bf16 gradients summed in bf16 lose most of
    their bits.
    """
    return {name: torch.zeros(w.shape, dtype=score_dtype(w), device="cpu" if offload else w.device)
            for name, w in weights.items()}


def score_dtype(weight: Tensor) -> torch.dtype:
    return torch.promote_types(weight.dtype, torch.float32)


def backward_per_layer(loss: Tensor, weights: dict[str, Tensor], consume: Consume, create_graph: bool = False) -> None:
    """``loss.backward()`` into ``weights`` only, handing each weight's gradient to ``consume(name, grad)``
    the moment it is complete and then freeing it.

    ``autograd.grad`` would return every layer's dense gradient at once (one more W); here at most one
    exists at a time.  ``consume`` may modify ``grad`` in place: it is dropped afterwards.
    """
    def hook(name: str) -> Callable[[Tensor], None]:
        def fold(param: Tensor) -> None:
            consume(name, param.grad)
            param.grad = None

        return fold

    handles = [w.register_post_accumulate_grad_hook(hook(name)) for name, w in weights.items()]
    try:
        with warnings.catch_warnings():
            # "create_graph=True will create a reference cycle between the parameter and its gradient":
            # not here, the hook drops every .grad as soon as it is consumed
            warnings.filterwarnings("ignore", message=r"Using backward\(\) with create_graph=True")
            loss.backward(inputs=list(weights.values()), create_graph=create_graph)
    finally:
        for handle in handles:
            handle.remove()


def adder(buffers: Scores, alpha: float = 1.0) -> Consume:
    """``consume`` that adds ``alpha`` · grad into the float32 buffer of its layer (on the buffer's device)."""
    def add(name: str, grad: Tensor) -> None:
        buffers[name].add_(grad.to(buffers[name].device), alpha=alpha)

    return add


def mean_gradients(model: nn.Module, weights: dict[str, Tensor], batches: list[dict],
                   calibration_micro_batch: int | None = None, offload: bool = False, mode: str = "eval") -> Scores:
    """E[∂ℓ/∂θ]: the gradient of the mean loss over every loss term of ``batches``, per weight, as
    float32 (d_out, d_in) buffers (on the CPU with ``offload``) that the caller may modify in place.

    Each micro-batch's mean loss is weighted by its share of the loss terms (``weighted_pieces``), so
    any split into batches and micro-batches gives the gradient of one big batch's mean loss.
    """
    sums = score_buffers(weights, offload)
    with calibration_mode(model, weights, mode):
        for piece, share in progress(weighted_pieces(batches, calibration_micro_batch), desc="salience: gradients",
                                     leave=False):
            backward_per_layer(model(**piece).loss * share, weights, adder(sums))
    return sums


def compute_salience(name: str, model: nn.Module, weights: dict[str, Tensor], batches: list[dict],
                     **options) -> Scores:
    """Scores of metric ``name`` for each weight; a NaN/inf score stops the run naming the layer."""
    scores = SALIENCE_METRICS[name](model, weights, batches, **options)
    check_finite({layer: s for layer, s in scores.items() if not all_finite(s)}, f"salience {name}")
    return scores


def all_finite(score: Tensor) -> bool:
    """No NaN or ±inf in ``score``, without an extra tensor: min and max propagate NaN and show ±inf
    (``isfinite()`` allocates ~1.75× the layer, a quarter of W on a 2-block Llama-3-8B)."""
    low, high = torch.aminmax(score)
    return bool(torch.isfinite(low) & torch.isfinite(high))
