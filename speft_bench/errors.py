"""Errors that stop a run with a message or a record saying why (rather than a bare traceback).

Torch-free: the config schemas (``speft_bench.schemas`` and every package's ``config.py``) raise
:class:`ConfigError` through :func:`check` and :func:`check_positive` while Hydra composes.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A config value is out of range or inconsistent with another group."""


def check(ok: bool, message: str) -> None:
    """ConfigError(``message``) unless ``ok``."""
    if not ok:
        raise ConfigError(message)


def check_positive(knob: str, value: float | int | None, allow_none: bool = False) -> None:
    """ConfigError naming ``knob`` unless ``value`` > 0 (or None, with ``allow_none``)."""
    if value is None and allow_none:
        return
    check(value is not None and value > 0, f"{knob} must be > 0, got {value}")


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
