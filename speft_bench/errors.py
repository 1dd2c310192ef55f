"""Errors that stop a run with a record saying why (rather than a bare traceback)."""

from __future__ import annotations


class NonFiniteError(FloatingPointError):
    """A loss or a salience score became NaN/inf: the run stops and its record names the tensor and step."""

    def __init__(self, tensor: str, step: int | None):
        super().__init__(f"non-finite {tensor}" + (f" at step {step}" if step is not None else ""))
        self.tensor, self.step = tensor, step
