"""Errors that stop a run with a record saying why (rather than a bare traceback)."""

from __future__ import annotations


class NonFiniteError(FloatingPointError):
    """A loss or a salience score became NaN/inf: the run stops and its record names the tensor and step."""

    def __init__(self, tensor: str, step: int | None):
        super().__init__(f"non-finite {tensor}" + (f" at step {step}" if step is not None else ""))
        self.tensor, self.step = tensor, step


def check_finite(scores: dict, what: str) -> dict:
    """``scores`` ({layer: tensor}) unchanged, or NonFiniteError naming ``what`` and the first bad layer."""
    for layer, score in scores.items():
        if not score.isfinite().all():
            raise NonFiniteError(f"{what} of {layer}", step=None)
    return scores
