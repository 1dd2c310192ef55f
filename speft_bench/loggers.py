"""Experiment logging to Weights & Biases: ``disabled`` (default), ``offline`` or ``online``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from speft_bench.schemas import LoggerMode, LoggerSchema


class RunLogger:
    """A wandb run carrying the resolved config; a no-op when ``logger.mode=disabled``."""

    def __init__(self, spec: LoggerSchema, config: dict[str, Any], run_dir: Path):
        self._run = None
        if spec.mode is not LoggerMode.disabled:
            import wandb

            run_dir.mkdir(parents=True, exist_ok=True)
            self._run = wandb.init(project=spec.project, entity=spec.entity, mode=spec.mode.value,
                                   config=config, tags=list(spec.tags), dir=str(run_dir), reinit="finish_previous")

    def log(self, values: dict[str, float], step: int) -> None:
        if self._run is not None:
            self._run.log(values, step=step)

    def finish(self) -> None:
        if self._run is not None:
            self._run.finish()
            self._run = None
