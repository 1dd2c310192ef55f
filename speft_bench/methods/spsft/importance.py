"""Neuron importance for SPSFT (paper §3.2, appendix A): one score per output row of each target weight.

Per-row scores are pure functions of a (d_out, d_in) weight and, for Taylor, the gradient of the mean
calibration loss with respect to it:

* ``l2``:        η_i = ‖W_i‖₂, data-free (the paper's choice for LLMs, where gradients cost as much
                 memory as dense fine-tuning);
* ``taylor``:    η_i = Σ_j |G_ij · W_ij|, G = ∂L(D)/∂W, the mean of the per-example gradients;
* ``qm_taylor``: η_i^t = the Taylor score on the calibration examples of label t (eq. 6), then the
                 mean of the 0 %, 10 %, …, 100 % quantiles of {η_i^t}_t over labels (eq. 7).

The data-driven ones run the model in eval mode (``mode="train"``, ``method.calibration_mode``: dropout on).

Eq. 6 writes η_i^t as |wᵀ∇L|; like appendix A (and Torch-Pruning, which the paper builds on) the
absolute value is taken per weight before summing, so ``qm_taylor`` averages exactly the ``taylor``
scores of the classes.  The metrics are registered in ``IMPORTANCE`` under their ``metric.name``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from speft_bench.errors import check_finite
from speft_bench.registry import Registry
from speft_bench.salience.base import mean_gradients

Scores = dict[str, Tensor]  # layer name -> (d_out,) importance of each output row
ScoreFn = Callable[..., Scores]  # (model, weights, batches, **options) -> scores


@dataclass(frozen=True)
class Importance:
    """A registered metric: its score function and what it needs from the calibration data."""

    score: ScoreFn
    needs_data: bool  # False: no calibration batches are drawn (l2)
    classification_only: bool = False  # per-label scores: invalid for regression tasks (qm_taylor)


IMPORTANCE: Registry[Importance] = Registry("metric.name")


def register(name: str, *, needs_data: bool, classification_only: bool = False) -> Callable[[ScoreFn], ScoreFn]:
    def add(score: ScoreFn) -> ScoreFn:
        IMPORTANCE.register(name)(Importance(score, needs_data, classification_only))
        return score

    return add


# --------------------------------------------------------------------------- per-row math
def row_l2(weight: Tensor) -> Tensor:
    """(d_out, d_in) → (d_out,): the ℓ2 norm of each output row."""
    return weight.detach().norm(dim=1)


def row_taylor(weight: Tensor, grad: Tensor) -> Tensor:
    """(d_out, d_in) weight and mean gradient → (d_out,): Σ_j |G_ij · W_ij|.

    Computed in place in ``grad`` (no second d_out × d_in tensor), which is overwritten.
    """
    return grad.mul_(weight.detach().to(grad.device)).abs_().sum(dim=1)


def quantile_mean(scores: Tensor, levels: int = 11) -> Tensor:
    """(p, d_out) scores of p groups → (d_out,): the mean of ``levels`` evenly spaced quantiles
    (0, 1/(levels-1), …, 1) over the groups, linearly interpolated (eq. 7 with the default 11)."""
    q = torch.linspace(0, 1, levels, dtype=scores.dtype, device=scores.device)
    return torch.quantile(scores, q, dim=0).mean(dim=0)


def top_rows(scores: Tensor, r: int) -> Tensor:
    """The r highest-scoring rows of (d_out,) ``scores`` as sorted int64 indices.

    Ties go to the lower row index (stable sort), so the selection is a function of the scores.
    """
    if not 0 < r <= scores.numel():
        raise ValueError(f"cannot select {r} rows out of {scores.numel()}")
    order = torch.sort(scores.detach(), descending=True, stable=True).indices
    return order[:r].sort().values


def split_by_label(batches: list[dict]) -> dict[int, list[dict]]:
    """The rows of each batch grouped by their ``labels`` value: {label: batches of that label only}."""
    groups: dict[int, list[dict]] = {}
    for batch in batches:
        for label in batch["labels"].unique().tolist():
            keep = batch["labels"] == label
            groups.setdefault(int(label), []).append({key: value[keep] for key, value in batch.items()})
    return dict(sorted(groups.items()))


# --------------------------------------------------------------------------- registered metrics
@register("l2", needs_data=False)
def l2(model: nn.Module, weights: dict[str, Tensor], batches: list[dict]) -> Scores:
    return {name: row_l2(w) for name, w in weights.items()}


@register("taylor", needs_data=True)
def taylor(model: nn.Module, weights: dict[str, Tensor], batches: list[dict],
           calibration_micro_batch: int | None = None, mode: str = "eval") -> Scores:
    # float32 mean gradients (one W), turned into row scores in place and freed one layer at a time
    grads = mean_gradients(model, weights, batches, calibration_micro_batch, mode=mode)
    return {name: row_taylor(w, grads.pop(name)) for name, w in weights.items()}


@register("qm_taylor", needs_data=True, classification_only=True)
def qm_taylor(model: nn.Module, weights: dict[str, Tensor], batches: list[dict], quantiles: int = 11,
              calibration_micro_batch: int | None = None, mode: str = "eval") -> Scores:
    # one label at a time: only (d_out,) scores per label are kept, never a gradient per label
    per_label = [taylor(model, weights, group, calibration_micro_batch, mode)
                 for group in split_by_label(batches).values()]
    return {name: quantile_mean(torch.stack([s[name] for s in per_label]), quantiles) for name in weights}


def neuron_importance(name: str, model: nn.Module, weights: dict[str, Tensor], batches: list[dict],
                      **options) -> Scores:
    """Scores of metric ``name`` for each weight; a NaN/inf score stops the run naming the layer."""
    return check_finite(IMPORTANCE[name].score(model, weights, batches, **options), f"importance {name}")
