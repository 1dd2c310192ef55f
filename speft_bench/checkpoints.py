"""Checkpoints inside a run: a run stopped by a time limit, a preemption or ``scancel`` continues where it was.

Every ``train.checkpoint_every`` optimizer steps (and after the last one), and when SIGTERM, SIGUSR1,
SIGUSR2 or SIGINT (Ctrl-C) arrives during training, the loop finishes the optimizer step it is in and writes
``<run_dir>/checkpoint.pt`` (a temp file renamed over it: a kill leaves the previous checkpoint or the
new one, whole).  A checkpoint holds what decides the rest of the run, so a resumed run's loss curve
and metrics are bit-identical to an uninterrupted run's (on CPU; ``tests/test_checkpoints.py``):

* the trainable tensors by name, and the layers' selections: a SPEFT layer's mask (flat indices) and the W
  entries earlier dynamic masks merged into (their positions and values: as ``SPARSE_DELTAS.save`` stores
  them), an SPSFT layer's rows; the rest of the model is what ``prepare()`` rebuilds from the config;
* the optimizer's and the lr schedule's state;
* the RNG states (python, numpy, torch, CUDA) as the next step will find them;
* the data position: the shuffling generator's state when the epoch's iterator was made and the number
  of batches of that epoch already trained on;
* the dynamic mask's refresh state (``on_step.state_dict()``: its current mask and the refreshes so far);
* the loss curve so far and the logging window;
* the training seconds spent so far, by every process of the run (a resumed record's ``time_s.train_before``).

On a signal the run then stops: its record says ``status: interrupted`` with the step and the checkpoint,
and the signal is handed to the handler it displaced (by default: the process ends with it; under
submitit, its requeue).  A rerun of the same config (same config hash) with ``resume=true`` continues
from the latest checkpoint of that hash under ``paths.output_dir``, in whichever run folder, and says so
(``train.resumed_from``, ``train.resumed_checkpoint``).

The first selection (SPEFT's first mask, SPSFT's rows), the costly part of ``prepare()`` (GRaSP's double
backward, Fisher's per-example passes), is written to ``<run_dir>/selection.pt`` as soon as it is computed,
with its cost and the RNG states after it.  A rerun of the same config with ``resume=true`` takes it from
there instead of computing it again (``Checkpoints.first_selection``): a run killed before its first
checkpoint, or during one, loses its training steps but not its salience.  A completed run deletes the
checkpoints and selections of its config hash: the record and the adapter are the result.
"""

from __future__ import annotations

import logging
import random
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import numpy as np
import torch
from torch import Tensor, nn

from speft_bench import records
from speft_bench.errors import ConfigError
from speft_bench.methods.speft.layer import SparseDeltaLinear
from speft_bench.methods.speft.model import SPARSE_DELTAS
from speft_bench.methods.spsft.layer import RowDeltaLinear
from speft_bench.methods.spsft.model import ROW_DELTAS

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pt"  # git-ignored (*.pt)
FORMAT = "speft-bench-checkpoint/1"
SELECTION_NAME = "selection.pt"  # git-ignored (*.pt)
FORMATS = {CHECKPOINT_NAME: FORMAT, SELECTION_NAME: "speft-bench-selection/1"}
# SLURM sends SIGTERM on scancel and at the time limit, a --signal=USR1@T warning before it; submitit's
# preemption/time-limit signal is USR2 (SUBMITIT_PREEMPT_SIGNAL). Ctrl-C stops a run the same way; a second
# Ctrl-C stops it at once (StopSignals._note).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT)


class CheckpointError(ConfigError):
    """A checkpoint that cannot resume this run (another format, config or data): rerun with resume=false."""


@dataclass
class Position:
    """Where the training loop is: after ``step`` optimizer steps, ``batches_done`` of them in the epoch
    whose iterator was made when the loader's shuffling generator was in state ``epoch_start``."""

    step: int = 0
    loss_curve: list[dict[str, float]] = field(default_factory=list)
    window: list[float] = field(default_factory=list)  # losses since the last loss-curve point
    epoch_start: torch.Tensor | None = None
    batches_done: int = 0
    # training seconds spent reaching ``step``, over every process of the run; None: a checkpoint written
    # before it was kept
    train_s: float | None = 0.0


# --------------------------------------------------------------------------- the model's part


def model_state(model: nn.Module) -> dict[str, Any]:
    """The trainable parameters by name, and each sparse layer's selection (and W entries merged under
    earlier masks): what training changed in ``model`` since ``prepare()``."""
    sparse = {name: {"indices": m.indices, "base_touched": m.base_touched, "base_weight": m.merged_entries()}
              for name, m in SPARSE_DELTAS.layers(model).items()}
    rows = {name: m.rows for name, m in ROW_DELTAS.layers(model).items()}
    params = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    return {"parameters": params, "sparse_deltas": sparse, "row_deltas": rows}


@torch.no_grad()
def load_model_state(model: nn.Module, state: dict[str, Any], where: Path) -> None:
    """Put ``model_state``'s tensors back into a freshly prepared ``model`` of the same config."""
    modules = dict(model.named_modules())
    for name, part in state["sparse_deltas"].items():
        layer = modules.get(name)
        if not isinstance(layer, SparseDeltaLinear):
            raise CheckpointError(f"{where}: layer {name!r} is not a sparse delta of this model")
        layer.set_mask(part["indices"])  # the first mask prepare() chose may differ (a refresh, or GPU ties)
        layer.restore_merged_entries(part["base_touched"], part["base_weight"])
    for name, rows in state["row_deltas"].items():
        layer = modules.get(name)
        if not isinstance(layer, RowDeltaLinear):
            raise CheckpointError(f"{where}: layer {name!r} is not a row delta of this model")
        layer.set_rows(rows)
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if params.keys() != state["parameters"].keys():
        raise CheckpointError(f"{where}: trains {sorted(state['parameters'].keys() ^ params.keys())[:5]} "
                              f"differently from this run's method")
    for name, saved in state["parameters"].items():
        if saved.shape != params[name].shape or saved.dtype != params[name].dtype:
            raise CheckpointError(f"{where}: {name} is {saved.dtype} {tuple(saved.shape)} there, "
                                  f"{params[name].dtype} {tuple(params[name].shape)} here")
        params[name].copy_(saved)


# --------------------------------------------------------------------------- RNG


def rng_state() -> dict[str, Any]:
    """Every global RNG's state, as plain data and tensors (loadable with ``weights_only``)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": random.getstate(), "numpy": [name, keys.tolist(), pos, has_gauss, cached],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else []}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------- signals


class StopSignals:
    """While entered (the training loop): ``STOP_SIGNALS`` only note that the run must stop after its step.

    The displaced handlers come back on exit; ``pass_on()`` hands the noted signal to its displaced handler
    once the run has written its record.  Outside the main thread Python cannot install handlers: nothing
    is installed there.
    """

    def __init__(self, signals: tuple[int, ...] = STOP_SIGNALS):
        self.signals, self.received, self.previous = signals, None, {}

    def _note(self, signum: int, frame) -> None:
        if self.received is None:
            self.received = signum
        elif signum == signal.SIGINT:  # Ctrl-C again: the user will not wait for the step (periodic checkpoints stay)
            raise KeyboardInterrupt

    def __enter__(self) -> Self:
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._note) for s in self.signals}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self.previous.items():  # None: installed outside Python, not restorable
            signal.signal(s, signal.SIG_DFL if handler is None else handler)

    @property
    def name(self) -> str | None:
        return None if self.received is None else signal.Signals(self.received).name

    def pass_on(self) -> None:
        """Deliver the noted signal as if the run had not caught it: to the handler it displaced (SIGINT's
        default raises KeyboardInterrupt), or by the default action (the others end the process: exit status
        128 + signal number)."""
        if self.received is None:
            return
        handler = self.previous.get(self.received, signal.SIG_DFL)
        if handler is signal.SIG_IGN:
            return
        if callable(handler):
            handler(self.received, None)
            return
        signal.signal(self.received, signal.SIG_DFL)
        signal.raise_signal(self.received)


# --------------------------------------------------------------------------- files


def _header(path: Path) -> dict[str, Any] | None:
    """A checkpoint's (or selection's) contents, memory-mapped (its tensors are read only when used); None if
    unreadable or not of the format its file name says."""
    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as err:  # noqa: BLE001 (any unreadable file is skipped, with a warning)
        log.warning("ignoring unreadable checkpoint %s: %s", path, err)
        return None
    return state if isinstance(state, dict) and state.get("format") == FORMATS[path.name] else None


def of_config(root: Path, config_hash: str, name: str = CHECKPOINT_NAME) -> list[tuple[int, Path]]:
    """``(step, path)`` of every checkpoint (``name``: or selection, step 0) of ``config_hash`` under ``root``,
    latest step last."""
    found = []
    for path in Path(root).rglob(name) if Path(root).is_dir() else ():
        state = _header(path)
        if state is not None and state.get("config_hash") == config_hash:
            found.append((state.get("step", 0), path.stat().st_mtime, path))
    return [(step, path) for step, _, path in sorted(found)]


def latest(root: Path, config_hash: str, name: str = CHECKPOINT_NAME) -> Path | None:
    """The checkpoint (or selection) of ``config_hash`` under ``root`` with the most steps (the newest among
    equals), or None."""
    found = of_config(root, config_hash, name)
    return found[-1][1] if found else None


def save_atomic(path: Path, state: dict[str, Any]) -> None:
    """``torch.save`` to a temp file in the same folder, fsync, rename over ``path``."""
    records.write_atomic(path, lambda f: torch.save(state, f), binary=True)


# the first selection and its cost (for the record): SPEFT's mask or SPSFT's rows, by layer
Selection = tuple[dict[str, Tensor], dict[str, Any]]


class Checkpoints:
    """One run's checkpointing: where it writes, how often, what it resumes from, the signals it stops on.

    ``search``: the folder (``paths.output_dir``) whose latest checkpoint and selection of ``config_hash``
    the run resumes from; None (``resume=false``): it starts afresh.
    """

    def __init__(self, run_dir: Path, config_hash: str, every: int | None, search: Path | None = None):
        self.run_dir, self.config_hash, self.every = Path(run_dir), config_hash, every
        self.path, self.search, self.signals = self.run_dir / CHECKPOINT_NAME, search, StopSignals()
        self.resume_from = latest(search, config_hash) if search is not None else None

    def first_selection(self, compute: Callable[[], Selection], device: torch.device) -> Selection:
        """``compute()``'s selection (on ``device``) and cost, computed once per config: read from this
        config's selection file under ``search`` (its cost then says ``reused_from``, and the RNGs are put
        where computing it left them), else computed and written to ``<run_dir>/selection.pt`` at once."""
        found = latest(self.search, self.config_hash, SELECTION_NAME) if self.search is not None else None
        state = _header(found) if found is not None else None
        if state is not None:
            set_rng_state(state["rng"])
            log.info("first selection from %s, not computed again (its cost: %s)", found, state["cost"])
            # copied out of the memory-mapped file, which the completed run deletes
            return ({name: t.clone().to(device) for name, t in state["selection"].items()},
                    dict(state["cost"]) | {"reused_from": str(found)})
        selection, cost = compute()
        save_atomic(self.run_dir / SELECTION_NAME, {
            "format": FORMATS[SELECTION_NAME], "config_hash": self.config_hash,
            "selection": {name: t.cpu() for name, t in selection.items()}, "cost": cost, "rng": rng_state()})
        return selection, cost

    @property
    def stopped(self) -> bool:
        return self.signals.received is not None

    def interruption(self, step: int, total: int) -> dict[str, Any]:
        """What the record of a run stopped by a signal after ``step`` says about it."""
        return {"step": step, "of": total, "signal": self.signals.name, "checkpoint": str(self.path)}

    def due(self, step: int, total: int) -> bool:
        """After optimizer step ``step`` of ``total``: a stop signal came, or a periodic (or the last) save is due."""
        return self.stopped or (self.every is not None and (step % self.every == 0 or step == total))

    def save(self, model, optimizer, scheduler, on_step, position: Position, batches_per_epoch: int,
             total: int) -> None:
        if on_step is not None and not hasattr(on_step, "state_dict"):
            raise TypeError(f"{type(on_step).__name__}: a stateful on_step needs state_dict()/load_state_dict() "
                            f"to be checkpointed")
        save_atomic(self.path, {
            "format": FORMAT, "config_hash": self.config_hash, "step": position.step, "total_steps": total,
            "model": model_state(model), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "on_step": None if on_step is None else on_step.state_dict(), "rng": rng_state(),
            "data": {"epoch_start": position.epoch_start, "batches_done": position.batches_done,
                     "batches_per_epoch": batches_per_epoch},
            "loss_curve": position.loss_curve, "window": position.window, "train_s": position.train_s,
        })
        log.info("checkpoint at step %d: %s", position.step, self.path)

    def resume(self, model, optimizer, scheduler, on_step, batches_per_epoch: int,
               total: int) -> tuple[Position, dict[str, Any]] | None:
        """Load ``resume_from`` into the model, optimizer, schedule and ``on_step``; return the loop's position
        and the RNG states to set once the data iterator is back at it.  None: nothing to resume."""
        if self.resume_from is None:
            return None
        where = self.resume_from
        state = _header(where)
        if state is None or state["config_hash"] != self.config_hash:
            raise CheckpointError(f"{where}: not a checkpoint of config {self.config_hash}")
        data = state["data"]
        if (state["total_steps"], data["batches_per_epoch"]) != (total, batches_per_epoch):
            raise CheckpointError(f"{where}: {state['total_steps']} steps of {data['batches_per_epoch']} batches per "
                                  f"epoch there, {total} of {batches_per_epoch} here (the data changed?); "
                                  f"delete it or rerun with resume=false")
        if (state["on_step"] is None) != (on_step is None):
            raise CheckpointError(f"{where}: its mask refresh state does not match this run's method")
        load_model_state(model, state["model"], where)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if on_step is not None:
            on_step.load_state_dict(state["on_step"])
        log.info("resuming at step %d of %d from %s", state["step"], total, where)
        position = Position(state["step"], list(state["loss_curve"]), list(state["window"]), data["epoch_start"],
                            data["batches_done"], state.get("train_s"))
        return position, state["rng"]

    def remove_all(self, root: Path) -> None:
        """Delete this run's checkpoint and selection and every other of its config under ``root`` (the run
        completed)."""
        paths = {self.path, self.run_dir / SELECTION_NAME} | {
            path for name in FORMATS for _, path in of_config(root, self.config_hash, name)}
        for path in paths:
            path.unlink(missing_ok=True)
            for tmp in path.parent.glob(f".{path.name}.*.tmp"):  # left by a kill mid-save (records.write_atomic)
                tmp.unlink(missing_ok=True)
