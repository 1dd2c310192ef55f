"""The SPSFT method: neuron importance on calibration batches, the top rows, row deltas (and norms)."""

from __future__ import annotations

import re
import time
from collections import Counter
from functools import partial
from typing import Any

import torch
from torch import nn

from speft_bench.errors import ConfigError
from speft_bench.methods import METHODS
from speft_bench.methods.base import Method, MethodContext, Prepared, freeze_all_but
from speft_bench.methods.spsft.config import SpsftSchema
from speft_bench.methods.spsft.importance import IMPORTANCE, neuron_importance, top_rows
from speft_bench.methods.spsft.model import ROW_DELTAS
from speft_bench.models import head_parameters, is_norm, targets_for
from speft_bench.schemas import TaskKind

_BLOCK = re.compile(r"(.*\.\d+)\.")  # "bert.encoder.layer.3.attention..." -> "bert.encoder.layer.3"


def rows_per_layer(spec: SpsftSchema, name: str, d_out: int) -> int:
    """Rows to train in a layer with d_out outputs: ``method.r``, or round(fraction · d_out) ≥ 1."""
    if spec.fraction is not None:
        return max(1, round(spec.fraction * d_out))
    if spec.r > d_out:
        raise ConfigError(f"method.r={spec.r} exceeds the {d_out} output rows of {name}; use a smaller method.r "
                          f"or method.fraction")
    return spec.r


def block_norm_parameters(model: nn.Module, targets: dict[str, nn.Module]) -> dict[str, nn.Parameter]:
    """Weights and biases of the norm layers inside the transformer blocks that hold the targets.

    A block is the module path up to the last layer index of a target name (``….layer.3``), so
    embedding and final norms, which sit outside the blocks, stay frozen.
    """
    blocks = tuple({match.group(1) + "." for name in targets if (match := _BLOCK.match(name))})
    return {f"{name}.{p_name}": p for name, m in model.named_modules() if name.startswith(blocks) and is_norm(m)
            for p_name, p in m.named_parameters(recurse=False)}


def attach_trainable_rows(model: nn.Module, targets: dict[str, nn.Module], rows: dict[str, torch.Tensor],
                          spec: SpsftSchema) -> tuple[dict[str, nn.Module], dict[str, dict[str, nn.Parameter]]]:
    """Row deltas at ``rows`` on the ``targets``; returns the layers and the trainable groups (row deltas,
    block norms with ``method.train_norms``, the head with ``method.train_head``), everything else frozen."""
    model.requires_grad_(False)
    layers = ROW_DELTAS.attach(model, rows)
    groups = {"row_deltas": {f"{name}.delta": layer.delta for name, layer in layers.items()},
              "norms": block_norm_parameters(model, targets) if spec.train_norms else {},
              "head": head_parameters(model) if spec.train_head else {}}
    freeze_all_but(model, {name: p for group in groups.values() for name, p in group.items()})
    return layers, groups


@METHODS.register("spsft")
class SPSFT(Method):
    @classmethod
    def check(cls, typed) -> None:
        metric, task = typed["metric"].name, typed["task"]
        if metric not in IMPORTANCE:
            raise ConfigError(f"method=spsft needs a neuron-importance metric: metric must be one of "
                              f"{', '.join(IMPORTANCE.names())}; got {metric!r}")
        if IMPORTANCE[metric].classification_only and (task.kind is not TaskKind.glue or task.is_regression):
            raise ConfigError(f"metric={metric} ranks neurons per label and needs a classification task; "
                              f"task={task.name} is not one (use metric=taylor or metric=l2)")
        if typed["method"].calibration_mode != "eval" and not IMPORTANCE[metric].needs_data:
            raise ConfigError(f"metric={metric} is data-free, so method.calibration_mode="
                              f"{typed['method'].calibration_mode} would be ignored (leave it at eval)")

    def prepare(self, model: nn.Module, ctx: MethodContext) -> Prepared:
        spec, metric = ctx.typed["method"], ctx.typed["metric"]
        targets = targets_for(model, ctx.typed["model"], spec.targets)
        budget = {name: rows_per_layer(spec, name, m.out_features) for name, m in targets.items()}
        options = {key: value for key, value in vars(metric).items() if key != "name"}

        def choose() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
            start = time.perf_counter()
            batches, kwargs = [], dict(options)
            if IMPORTANCE[metric.name].needs_data:
                batches = ctx.calibration_batches(0, spec.calibration_examples, spec.calibration_batch_size)
                kwargs |= {"calibration_micro_batch": spec.calibration_micro_batch, "mode": spec.calibration_mode}
            scores = neuron_importance(metric.name, model, {n: m.weight for n, m in targets.items()}, batches, **kwargs)
            rows = {name: top_rows(scores[name], budget[name]) for name in targets}
            cost = {"importance_s": round(time.perf_counter() - start, 3),
                    "examples": sum(len(b["labels"]) for b in batches)}
            if IMPORTANCE[metric.name].classification_only:
                labels = Counter(torch.cat([b["labels"] for b in batches]).tolist())
                cost["examples_per_label"] = {str(int(label)): n for label, n in sorted(labels.items())}
            return rows, cost

        rows, calibration = ctx.first_selection(choose)
        layers, groups = attach_trainable_rows(model, targets, rows, spec)
        info: dict[str, Any] = {
            "metric": metric.name,
            "budget_rule": f"fraction={spec.fraction}" if spec.fraction is not None else f"r={spec.r}",
            "targets": {"scope": spec.targets.name, "modules": len(layers),
                        "pattern": ctx.typed["model"].targets[spec.targets.name]},
            "rows_per_layer": {name: layer.r for name, layer in layers.items()},
            "trainable": {group: sum(p.numel() for p in params.values()) for group, params in groups.items()},
            "calibration": calibration,
        }
        info["trainable"]["total"] = sum(info["trainable"].values())
        metadata = {"model": ctx.typed["model"].name, "targets": [info["targets"]["pattern"]], "metric": metric.name,
                    "rows_per_layer": info["rows_per_layer"]}
        return Prepared(model, info, save=partial(ROW_DELTAS.save_run, model=model, metadata=metadata))

    @classmethod
    def load(cls, model, run_dir, typed):
        return ROW_DELTAS.load_run(model, run_dir, typed["model"].name)
