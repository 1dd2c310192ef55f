"""The recipe: config → seeded model and data → method → train → evaluate → run record.

Read top to bottom; every swappable piece comes from a registry selected by the config: the task
kind (``task.kind``: GLUE classification or causal-LM instruction tuning, ``tasks.py``) brings the
model head, data, collator and evaluation; the method (``method.name``) the trainable parameters.
"""

from __future__ import annotations

import logging
import math
import random
import resource
import time
from contextlib import contextmanager, nullcontext
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Subset
from transformers import (
    get_constant_schedule_with_warmup,
    get_cosine_schedule_with_warmup,
    get_linear_schedule_with_warmup,
)

from speft_bench import cluster, precision, records
from speft_bench.batches import loss_terms, to_device, weighted_pieces
from speft_bench.checkpoints import Checkpoints, Position, set_rng_state
from speft_bench.config import validate
from speft_bench.device import device_record, reset_peak_memory, resolve_device
from speft_bench.errors import ConfigError, NonFiniteError
from speft_bench.loggers import RunLogger
from speft_bench.methods import METHODS
from speft_bench.methods.base import MethodContext
from speft_bench.models import load_tokenizer, parameter_counts, resolve_pretrained
from speft_bench.progress import progress
from speft_bench.schemas import TrainSchema
from speft_bench.tasks import TASK_KINDS

log = logging.getLogger(__name__)
# How a record's adapter becomes the trained model again (speft_bench/export.py).
RELOAD = "speft_bench.export.load_trained(run_dir); python -m speft_bench.export RUN_DIR --evaluate | --merged OUT"


def seed_everything(spec: TrainSchema) -> dict[str, Any]:
    """Seed every RNG and pin the settings that change numerics on CPU; return them for the record."""
    random.seed(spec.seed)
    np.random.seed(spec.seed)
    torch.manual_seed(spec.seed)
    if (threads := cluster.default_threads(spec.num_threads)) is not None:  # null: SLURM's CPUs, else torch's default
        torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(spec.deterministic)
    return {"seed": spec.seed, "deterministic": spec.deterministic, "torch_threads": torch.get_num_threads()}


class PhaseTimer(dict):
    """Wall time per phase of the run, in seconds."""

    @contextmanager
    def __call__(self, phase: str):
        start = time.perf_counter()
        yield
        self[phase] = round(time.perf_counter() - start, 3)


def calibration_sampler(dataset, collate, seed: int, device: torch.device):
    """``(round, n, batch_size) -> batches`` on ``device``: n training examples drawn afresh for every round."""

    def batches(round_: int, n: int, batch_size: int) -> list[dict]:
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed * 1_000_003 + round_ + 1))
        subset = Subset(dataset, order[: min(n, len(dataset))].tolist())
        return [to_device(b, device) for b in DataLoader(subset, batch_size=batch_size, collate_fn=collate)]

    return batches


def forward_backward(model, batch: dict, step: int, spec: TrainSchema, device: torch.device) -> float:
    """Mean loss of one (effective) batch, its gradients accumulated over micro-batches.

    Each micro-batch's mean loss is weighted by its share of the batch's loss terms (examples, or
    response tokens for causal LMs), so the gradients are those of the batch's own mean loss
    (the per-token mean over the whole batch, not a mean of micro-batch means).  The graphs die with
    this frame: one kept alive until the next step would pin the parameters' gradient accumulators,
    which a dynamic mask resizes.
    """
    if loss_terms(batch) == 0:  # every label ignored: the batch's mean loss is 0/0
        raise NonFiniteError("loss", step)
    mean = 0.0
    for piece, weight in weighted_pieces([batch], spec.micro_batch_size):  # slices without a term are left out
        with precision.autocast(spec, device):
            loss = model(**to_device(piece, device)).loss
        if not torch.isfinite(loss):
            raise NonFiniteError("loss", step)
        (loss * weight).backward()
        mean += loss.item() * weight
    return mean


def enable_gradient_checkpointing(model) -> None:
    """Recompute each block's activations in backward (transformers' non-reentrant checkpointing).

    Non-reentrant: gradients reach trainables inside a block even when its input needs no grad
    (frozen embeddings under LoRA/SPEFT/SPSFT), and custom autograd Functions are recomputed as is.
    """
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ConfigError(f"train.gradient_checkpointing=true: {type(model).__name__} does not support it; "
                          f"set train.gradient_checkpointing=false")
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers ≥ 5.2x; the old name warns
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


# train.schedule -> (optimizer, warmup steps, total steps) -> the learning-rate scheduler (schemas.SCHEDULES)
SCHEDULERS = {
    "linear": get_linear_schedule_with_warmup,
    "cosine": get_cosine_schedule_with_warmup,
    "constant": lambda optimizer, warmup, _total: get_constant_schedule_with_warmup(optimizer, warmup),
}


def make_scheduler(optimizer: torch.optim.Optimizer, spec: TrainSchema, total: int):
    """``train.schedule`` after ``ceil(warmup_ratio · total)`` steps of linear warmup from 0."""
    return SCHEDULERS[spec.schedule](optimizer, math.ceil(spec.warmup_ratio * total), total)


def train(model, loader: DataLoader, spec: TrainSchema, on_step, logger: RunLogger, device: torch.device,
          checkpoints: Checkpoints | None = None) -> dict[str, Any]:
    """AdamW + warmup and ``train.schedule`` over the trainable parameters; returns the loss curve.

    With ``checkpoints``: resumes from its checkpoint, saves one when due, and stops after the step a
    stop signal arrived in (the result then has ``interrupted``).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:  # method=pretrained: nothing to train, the loaded model is evaluated as is
        return {"steps": 0, "epochs": 0.0, "loss_curve": []}
    total = spec.max_steps or math.ceil(spec.epochs * len(loader))
    optimizer = torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay)
    scheduler = make_scheduler(optimizer, spec, total)
    resumed = checkpoints and checkpoints.resume(model, optimizer, scheduler, on_step, len(loader), total)
    at = resumed[0] if resumed else Position()  # step, loss curve, logging window, place in the data order
    result = {"resumed_from": at.step, "resumed_checkpoint": str(checkpoints.resume_from),
              "train_s_before": at.train_s} if resumed else {"resumed_from": None}
    before, started = at.train_s, time.perf_counter()
    model.train()
    with (checkpoints.signals if checkpoints else nullcontext(),  # stop signals: noted, acted on after the step
          progress(total=total, initial=at.step, desc="train") as bar):
        while at.step < total:
            if resumed:  # the epoch it stopped in: the same shuffle, then past the batches already trained on
                loader.generator.set_state(at.epoch_start)
            else:
                at.epoch_start, at.batches_done = loader.generator.get_state(), 0
            batches = iter(loader)
            for _ in range(at.batches_done):
                next(batches)
            if resumed:  # dropout and the rest draw on from where they were
                set_rng_state(resumed[1])
                resumed = None
            for batch in batches:
                if on_step is not None:  # a mask refresh's salience forward meets the fp32 head, as training's does
                    with precision.autocast(spec, device):
                        on_step(at.step, optimizer)
                loss = forward_backward(model, batch, at.step, spec, device)
                if spec.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(params, spec.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                at.step += 1
                at.batches_done += 1
                at.window.append(loss)
                if at.step % spec.log_every == 0 or at.step == total:
                    point = {"step": at.step, "loss": sum(at.window) / len(at.window), "lr": scheduler.get_last_lr()[0]}
                    at.loss_curve.append(point)
                    logger.log({"train/loss": point["loss"], "train/lr": point["lr"]}, at.step)
                    bar.set_postfix(loss=f"{point['loss']:.4f}")
                    at.window = []
                bar.update()
                if checkpoints and checkpoints.due(at.step, total):
                    at.train_s = None if before is None else before + time.perf_counter() - started
                    checkpoints.save(model, optimizer, scheduler, on_step, at, len(loader), total)
                    if checkpoints.stopped:  # the run ends here; a rerun of its config resumes
                        return result | {"steps": at.step, "epochs": at.step / len(loader), "loss_curve": at.loss_curve,
                                         "interrupted": checkpoints.interruption(at.step, total)}
                if at.step >= total:
                    break
        if resumed:  # resumed after the last step: evaluation draws on from where the run was
            set_rng_state(resumed[1])
    return {"steps": total, "epochs": total / len(loader), "loss_curve": at.loss_curve} | result


def load_base(typed: dict[str, Any], device: torch.device):
    """``(task kind, model source, tokenizer, training data, base model on device)`` of a validated config.

    Cheap checks first: a missing model folder or data file fails before the weights load.
    """
    spec_model, spec_train = typed["model"], typed["train"]
    kind = TASK_KINDS[typed["task"].kind.name](typed["task"], typed["paths"])
    source = resolve_pretrained(spec_model, typed["paths"].cache_dir)
    tokenizer = load_tokenizer(source, spec_model)
    data = kind.load_data(tokenizer)
    model = kind.load_model(spec_model, source, tokenizer, precision.body_dtype(spec_train.precision)).to(device)
    return kind, source, tokenizer, data, model


def run(cfg: DictConfig, run_dir: Path, command: str | None = None) -> dict[str, Any]:
    """Run one configuration and write ``run_dir/record.json``; return the record.

    ``command`` is the command line that produced the run, stored so results can be re-made.
    """
    typed = validate(cfg)  # before anything heavy: a bad value fails in milliseconds
    spec_model, spec_train = typed["model"], typed["train"]
    config = records.resolved_config(cfg)
    environment = records.environment()  # the code version that runs: a commit made while it trains is not it
    record: dict[str, Any] = {"status": "running", "command": command, "run_dir": str(run_dir),
                              "config_hash": records.config_hash(config), "config": config}
    timer = PhaseTimer()
    output_dir = Path(typed["paths"].output_dir)  # this config's checkpoint or selection there: go on from it
    checkpoints = Checkpoints(run_dir, record["config_hash"], spec_train.checkpoint_every,
                              output_dir if cfg.resume else None)
    device = resolve_device(spec_train.device)  # a missing GPU fails here, before anything loads
    record["determinism"] = seed_everything(spec_train)

    with timer("load"):
        kind, source, tokenizer, data, model = load_base(typed, device)
    reset_peak_memory(device)  # peak device memory from here on: the method, training and evaluation
    record["model"] = {"name": spec_model.name, "label": spec_model.label, "source": source}
    record["data"] = data.record

    ctx = MethodContext(cfg, typed, calibration_sampler(data.train, data.collate, spec_train.seed, device),
                        partial(checkpoints.first_selection, device=device))  # a rerun's salience: read back
    logger = RunLogger(typed["logger"], config, run_dir)
    try:  # a non-finite salience (prepare) or loss (train) ends the run with a record that says so
        with timer("prepare"):
            prepared = METHODS[typed["method"].name]().prepare(model, ctx)
        model = prepared.model
        record["precision"] = precision.setup(model, spec_train)
        if spec_train.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        counts = parameter_counts(model)
        record["parameters"] = counts | {"trainable_percent": 100.0 * counts["trainable"] / counts["total"]}
        record["method"] = prepared.info
        loader = DataLoader(data.train, batch_size=spec_train.batch_size, shuffle=True, collate_fn=data.collate,
                            generator=torch.Generator().manual_seed(spec_train.seed))
        with timer("train"):
            record["train"] = train(model, loader, spec_train, prepared.on_step, logger, device, checkpoints)
        if checkpoints.stopped:  # a stop signal: checkpointed after the step; a rerun of this config resumes
            record |= {"status": "interrupted", "interrupted": record["train"].pop("interrupted")}
        else:
            with timer("evaluate"), precision.autocast(spec_train, device):
                record |= kind.evaluate(model, tokenizer, spec_train)  # metrics (+ main metric, baselines, lm-eval)
            if prepared.save is not None:  # git-ignored: records are committed, weights never
                run_dir.mkdir(parents=True, exist_ok=True)
                record["adapter"] = prepared.save(run_dir) | {"reload": RELOAD}
                records.honour_umask(run_dir / record["adapter"]["path"])
            logger.log({f"dev/{k}": v for k, v in record["metrics"].items()}, record["train"]["steps"])
            record["status"] = "completed"
    except NonFiniteError as err:
        log.error("stopping: %s", err)
        record |= {"status": "failed", "failure": {"reason": str(err), "tensor": err.tensor, "step": err.step}}
    finally:
        logger.finish()
    if "train_s_before" in record.get("train", {}):  # resumed: the earlier processes' training up to its checkpoint
        before = record["train"].pop("train_s_before")  # None: the checkpoint did not keep it
        timer["train_before"] = None if before is None else round(before, 3)
    known = None not in timer.values()  # else the total is unknown
    record["time_s"] = dict(timer) | {"total": round(sum(timer.values()), 3) if known else None}
    record["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    record["device"] = device_record(device)
    record["environment"] = environment
    records.write_json_atomic(run_dir / records.RECORD_NAME, record)
    if record["status"] == "completed":  # the record and the adapter are the result now
        checkpoints.remove_all(output_dir)
    elif record["status"] == "interrupted":
        log.warning("interrupted by %s after step %d; rerun the same config to resume from %s",
                    record["interrupted"]["signal"], record["interrupted"]["step"], record["interrupted"]["checkpoint"])
        checkpoints.signals.pass_on()  # default: the process ends by the signal; submitit's handler: requeue
    return record
