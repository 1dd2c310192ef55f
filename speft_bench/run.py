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
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Subset
from transformers import get_linear_schedule_with_warmup

from speft_bench import precision, records
from speft_bench.batches import loss_terms, to_device, weighted_pieces
from speft_bench.device import device_record, reset_peak_memory, resolve_device
from speft_bench.errors import NonFiniteError
from speft_bench.loggers import RunLogger
from speft_bench.methods import METHODS, MethodContext
from speft_bench.models import load_tokenizer, parameter_counts, resolve_pretrained
from speft_bench.progress import progress
from speft_bench.schemas import ConfigError, TrainSchema, validate
from speft_bench.tasks import TASK_KINDS

log = logging.getLogger(__name__)
ADAPTER_NAME = "adapter.safetensors"


def seed_everything(spec: TrainSchema) -> dict[str, Any]:
    """Seed every RNG and pin the settings that change numerics on CPU; return them for the record."""
    random.seed(spec.seed)
    np.random.seed(spec.seed)
    torch.manual_seed(spec.seed)
    if spec.num_threads is not None:
        torch.set_num_threads(spec.num_threads)
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


def train(model, loader: DataLoader, spec: TrainSchema, on_step, logger: RunLogger,
          device: torch.device) -> dict[str, Any]:
    """AdamW + linear warmup/decay over the trainable parameters; returns the loss curve."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:  # method=pretrained: nothing to train, the loaded model is evaluated as is
        return {"steps": 0, "epochs": 0.0, "loss_curve": []}
    total = spec.max_steps or math.ceil(spec.epochs * len(loader))
    optimizer = torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay)
    scheduler = get_linear_schedule_with_warmup(optimizer, math.ceil(spec.warmup_ratio * total), total)
    curve, window, step = [], [], 0
    model.train()
    with progress(total=total, desc="train") as bar:
        while step < total:
            for batch in loader:
                if on_step is not None:  # a mask refresh's salience forward meets the fp32 head, as training's does
                    with precision.autocast(spec, device):
                        on_step(step, optimizer)
                loss = forward_backward(model, batch, step, spec, device)
                if spec.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(params, spec.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                window.append(loss)
                if step % spec.log_every == 0 or step == total:
                    point = {"step": step, "loss": sum(window) / len(window), "lr": scheduler.get_last_lr()[0]}
                    curve.append(point)
                    logger.log({"train/loss": point["loss"], "train/lr": point["lr"]}, step)
                    bar.set_postfix(loss=f"{point['loss']:.4f}")
                    window = []
                bar.update()
                if step >= total:
                    break
    return {"steps": total, "epochs": total / len(loader), "loss_curve": curve}


def run(cfg: DictConfig, run_dir: Path, command: str | None = None) -> dict[str, Any]:
    """Run one configuration and write ``run_dir/record.json``; return the record.

    ``command`` is the command line that produced the run, stored so results can be re-made.
    """
    typed = validate(cfg)  # before anything heavy: a bad value fails in milliseconds
    spec_model, spec_task, spec_train, paths = typed["model"], typed["task"], typed["train"], typed["paths"]
    config = records.resolved_config(cfg)
    record: dict[str, Any] = {"status": "running", "command": command, "run_dir": str(run_dir),
                              "config_hash": records.config_hash(config), "config": config}
    timer = PhaseTimer()
    device = resolve_device(spec_train.device)  # a missing GPU fails here, before anything loads
    record["determinism"] = seed_everything(spec_train)

    kind = TASK_KINDS[spec_task.kind.name](spec_task, paths)
    with timer("load"):  # cheap checks first: a missing model folder or data file fails before the weights load
        source = resolve_pretrained(spec_model, paths.cache_dir)
        tokenizer = load_tokenizer(source, spec_model)
        data = kind.load_data(tokenizer)
        model = kind.load_model(spec_model, source, tokenizer, precision.body_dtype(spec_train.precision)).to(device)
    reset_peak_memory(device)  # peak device memory from here on: the method, training and evaluation
    record["model"] = {"name": spec_model.name, "label": spec_model.label, "source": source}
    record["data"] = data.record

    ctx = MethodContext(cfg, typed, calibration_sampler(data.train, data.collate, spec_train.seed, device))
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
            record["train"] = train(model, loader, spec_train, prepared.on_step, logger, device)
        with timer("evaluate"), precision.autocast(spec_train, device):
            record |= kind.evaluate(model, tokenizer, spec_train)  # metrics (+ main metric, baselines, lm-eval output)
        if prepared.save is not None:  # git-ignored: records are committed, weights never
            run_dir.mkdir(parents=True, exist_ok=True)
            prepared.save(run_dir / ADAPTER_NAME)
            record["adapter"] = ADAPTER_NAME
        logger.log({f"dev/{k}": v for k, v in record["metrics"].items()}, record["train"]["steps"])
        record["status"] = "completed"
    except NonFiniteError as err:
        log.error("stopping: %s", err)
        record |= {"status": "failed", "failure": {"reason": str(err), "tensor": err.tensor, "step": err.step}}
    finally:
        logger.finish()
    record["time_s"] = dict(timer) | {"total": round(sum(timer.values()), 3)}
    record["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    record["device"] = device_record(device)
    record["environment"] = records.environment()
    records.write_json_atomic(run_dir / records.RECORD_NAME, record)
    return record
