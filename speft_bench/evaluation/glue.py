"""GLUE metrics (the official ones, via scikit-learn/scipy) and the dev-set evaluation loop.

``evaluate.load("glue")`` needs the hub, so the same formulas are computed here.
Scores are fractions in [0, 1] (correlations in [-1, 1]); tables scale them to percent.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from speft_bench.batches import to_device
from speft_bench.progress import progress
from speft_bench.registry import Registry

# (predictions, references) -> score.  Classification: class indices; regression: floats.
GLUE_METRICS: Registry[Callable[[np.ndarray, np.ndarray], float]] = Registry("task.metrics")
GLUE_METRICS.register("accuracy")(lambda p, r: float(accuracy_score(r, p)))
GLUE_METRICS.register("f1")(lambda p, r: float(f1_score(r, p)))  # positive class 1, as GLUE
GLUE_METRICS.register("mcc")(lambda p, r: float(matthews_corrcoef(r, p)))
GLUE_METRICS.register("pearson")(lambda p, r: float(pearsonr(p, r)[0]))
GLUE_METRICS.register("spearman")(lambda p, r: float(spearmanr(p, r)[0]))


def glue_scores(names: list[str], predictions: np.ndarray, references: np.ndarray) -> dict[str, float]:
    return {name: GLUE_METRICS[name](predictions, references) for name in names}


def majority_baseline(names: list[str], references: np.ndarray, train_labels: np.ndarray) -> dict[str, float]:
    """Scores of always predicting the most frequent training label (classification only)."""
    majority = np.bincount(train_labels.astype(int)).argmax()
    constant = np.full_like(references, majority)
    return {n: GLUE_METRICS[n](constant, references) for n in names if n in ("accuracy", "f1")}


@torch.no_grad()
def predict(model: torch.nn.Module, loader, is_regression: bool) -> tuple[np.ndarray, np.ndarray, float]:
    """Predictions, references and mean loss over ``loader`` (model left in eval mode), computed on the
    model's device."""
    model.eval()
    device = next(model.parameters()).device
    preds, refs, loss_sum, n = [], [], 0.0, 0
    for batch in progress(loader, desc="eval", leave=False):
        out = model(**to_device(batch, device))
        logits = out.logits.float()
        preds.append(logits.squeeze(-1) if is_regression else logits.argmax(-1))
        refs.append(batch["labels"])  # the loader's CPU copy
        loss_sum += out.loss.item() * len(batch["labels"])
        n += len(batch["labels"])
    return torch.cat(preds).cpu().numpy(), torch.cat(refs).numpy(), loss_sum / n
