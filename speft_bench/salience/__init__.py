"""Salience metrics for SPEFT: one module per metric, selected by ``metric.name`` through ``SALIENCE_METRICS``.

A metric is a pure function ``(model, weights, batches, **options) -> scores``: ``weights`` maps
target-layer names to their (d_out, d_in) weight Parameters, ``batches`` are calibration batches
(dicts the model takes as ``model(**batch)``, with ``labels``), and ``scores`` has one tensor of the
weight's shape per name.  Higher means more salient: masks keep the top-k.

Data-driven metrics run in eval mode (no dropout) with gradients enabled on the target weights only,
and restore the model's flags afterwards (``calibration_mode``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from speft_bench.errors import check_finite
from speft_bench.progress import progress
from speft_bench.registry import Registry

Scores = dict[str, Tensor]
SalienceFn = Callable[..., Scores]  # (model, weights, batches, **options) -> scores

SALIENCE_METRICS: Registry[SalienceFn] = Registry("metric.name", "speft_bench.salience")


def batch_size(batch: dict) -> int:
    return len(batch["labels"])


@contextmanager
def calibration_mode(model: nn.Module, weights: dict[str, Tensor]) -> Iterator[None]:
    """Eval mode, gradients on ``weights`` only; flags and mode restored on exit."""
    flags = {p: p.requires_grad for p in model.parameters()}
    training = model.training
    keep = {id(w) for w in weights.values()}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
    model.eval()
    try:
        with torch.enable_grad():
            yield
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
        model.train(training)


def mean_gradients(model: nn.Module, weights: dict[str, Tensor], batches: list[dict]) -> Scores:
    """E[∂ℓ/∂θ]: the gradient of the mean loss over every example of ``batches``, per weight.

    Each batch's mean loss is weighted by its share of the examples, so uneven batch sizes give the
    same result as one big batch.
    """
    total = sum(batch_size(b) for b in batches)
    names, params = list(weights), list(weights.values())
    grads = [torch.zeros_like(p) for p in params]
    with calibration_mode(model, weights):
        for batch in progress(batches, desc="salience: gradients", leave=False):
            loss = model(**batch).loss * (batch_size(batch) / total)
            for acc, g in zip(grads, torch.autograd.grad(loss, params)):
                acc.add_(g)
    return dict(zip(names, grads))


def compute_salience(name: str, model: nn.Module, weights: dict[str, Tensor], batches: list[dict],
                     **options) -> Scores:
    """Scores of metric ``name`` for each weight; a NaN/inf score stops the run naming the layer."""
    return check_finite(SALIENCE_METRICS[name](model, weights, batches, **options), f"salience {name}")
