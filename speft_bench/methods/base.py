"""What every method shares: the ``Method`` base class, its context and result, ``prepare_without_data``
and ``freeze_all_but``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig
from torch import nn


def compute_now(compute: Callable[[], tuple]) -> tuple:
    return compute()


@dataclass
class MethodContext:
    """What a method may use besides the model: the typed config and calibration data.

    ``first_selection(compute)``: ``compute()``'s ``(selection by layer, cost)``, the method's costly
    first choice of what trains; a run (``speft_bench.checkpoints``) computes it once per config and a
    rerun reads it back.  Elsewhere (tests, dry runs, benchmarks) it is computed.
    """

    cfg: DictConfig
    typed: dict[str, Any]  # group -> schema object (see speft_bench.config.validate)
    # (round, n_examples, batch_size) -> training batches; each round draws a fresh sample
    calibration_batches: Callable[[int, int, int], list[dict]]
    first_selection: Callable[[Callable[[], tuple]], tuple] = compute_now


@dataclass
class Prepared:
    """A model ready to train, what the record should say about it, and two optional hooks.

    ``on_step(step, optimizer)`` runs before each optimizer step is taken (dynamic masks use it to
    re-select entries and reset the optimizer state, per ``masking.optimizer_reset``).
    ``save(run_dir)`` writes what the base model needs to become the trained one (the method's
    ``load`` reads it back) and returns what the record says about it: ``path`` (in the run folder),
    ``format`` and the number of values per kind of tensor.  None: nothing was trained.
    """

    model: nn.Module
    info: dict[str, Any] = field(default_factory=dict)
    on_step: Callable[[int, Any], None] | None = None
    save: Callable[[Path], dict[str, Any]] | None = None


class Method:
    """Base class: subclasses register with ``@METHODS.register("name")``.

    The method's schema (``speft_bench.schemas.MethodSchema``) holds the torch-free rules: the metrics
    it takes, whether it reads masking, its own ``check_groups``.
    """

    @classmethod
    def check(cls, typed: dict[str, Any]) -> None:
        """Cross-group rules that need code registries (the metric's flags), run by
        ``speft_bench.config.validate`` after the schemas' rules, before any model loads."""

    def prepare(self, model: nn.Module, ctx: MethodContext) -> Prepared:
        raise NotImplementedError

    @classmethod
    def load(cls, model: nn.Module, run_dir: Path, typed: dict[str, Any]) -> nn.Module:
        """The trained model: ``model`` (the base, as the run loaded it) with what ``Prepared.save`` wrote
        in ``run_dir`` applied (``speft_bench.export.load_trained``).  The base: nothing was trained."""
        return model


def prepare_without_data(model: nn.Module, cfg: DictConfig, typed: dict[str, Any]) -> Prepared:
    """The run's own method (``METHODS[method.name]().prepare``) on ``model`` with no calibration data:
    what the dry run and the benchmarks attach.  SPEFT and SPSFT then need a data-free metric
    (magnitude, l2): which entries or rows train changes neither the time nor the memory of a step."""
    from speft_bench.errors import ConfigError
    from speft_bench.methods import METHODS  # the registry, filled by the method modules that import this one
    from speft_bench.salience import SALIENCE_METRICS

    def no_draws(*_: int) -> list[dict]:
        name = typed["metric"].name
        if name in SALIENCE_METRICS and not getattr(SALIENCE_METRICS[name], "reads_data", True):
            return []
        # a data-driven metric fed nothing would rank every entry alike: refuse rather than pick silently
        raise ConfigError(f"metric={typed['metric'].name} needs calibration data, which this attach has none of; "
                          "use a data-free metric (magnitude for speft, l2 for spsft)")

    return METHODS[typed["method"].name]().prepare(model, MethodContext(cfg, typed, no_draws))


def freeze_all_but(model: nn.Module, trainable: dict[str, nn.Parameter]) -> None:
    """Make exactly the given parameters trainable."""
    keep = {id(p) for p in trainable.values()}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
