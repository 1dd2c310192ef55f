"""Batches as the recipe, salience and evaluation move them: loss terms, micro-batches, device.

Every batch is a dict of equally long tensors ``{input_ids, attention_mask, labels, …}``.  A model's
``.loss`` is a mean over its *loss terms*: examples for classification, response tokens for causal
LMs (labels ≠ -100 after the one-token shift).  Weighting each piece's mean loss by its share of the
terms of the whole batch gives the mean over the whole batch, however it is split.
"""

from __future__ import annotations

import torch
from torch import Tensor

IGNORE_INDEX = -100  # labels that carry no loss (prompt and padding tokens)


def loss_terms(batch: dict[str, Tensor]) -> int:
    """Number of terms the batch's mean loss averages over."""
    labels = batch["labels"]
    if labels.ndim == 1:  # one label (class or score) per example
        return len(labels)
    return int((labels[:, 1:] != IGNORE_INDEX).sum())  # causal LM: token t predicts label t+1


def micro_batches(batch: dict[str, Tensor], size: int | None) -> list[dict[str, Tensor]]:
    """Consecutive slices of at most ``size`` examples (``None``: the batch itself)."""
    n = len(batch["labels"])
    if size is None or size >= n:
        return [batch]
    return [{key: value[start:start + size] for key, value in batch.items()} for start in range(0, n, size)]


def weighted_pieces(batches: list[dict[str, Tensor]], micro_batch: int | None) -> list[tuple[dict[str, Tensor], float]]:
    """(micro-batch, weight) over all ``batches``: the weight is the piece's share of the loss terms of
    all of them, so Σ weight · mean loss(piece) is the per-term mean over the whole set.

    Terms are examples for classification (so whole batches keep the weights they always had) and
    response tokens for causal LMs.  Pieces without a loss term (only prompt tokens) are left out: their
    mean loss is 0/0.
    """
    total = sum(loss_terms(b) for b in batches)
    if total == 0:
        raise ValueError("the batches carry no loss terms (every label is ignored)")
    return [(piece, terms / total) for batch in batches for piece in micro_batches(batch, micro_batch)
            if (terms := loss_terms(piece))]


def to_device(batch: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    return {key: value.to(device, non_blocking=True) for key, value in batch.items()}
