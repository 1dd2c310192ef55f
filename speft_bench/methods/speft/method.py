"""The SPEFT method: salience on calibration batches, a top-k mask, sparse deltas; a dynamic mask's refresh."""

from __future__ import annotations

import time
from contextlib import contextmanager
from functools import partial
from typing import Any

from torch import nn

from speft_bench import precision
from speft_bench.errors import ConfigError
from speft_bench.masking import (
    LOCAL_SPLITS,
    budget_from_density,
    density_per_layer,
    lora_param_count,
    mask_digest,
    mask_overlap,
    select_mask,
)
from speft_bench.methods import METHODS
from speft_bench.methods.base import Method, MethodContext, Prepared, freeze_all_but
from speft_bench.methods.speft.config import SpeftSchema
from speft_bench.methods.speft.layer import SparseDeltaLinear
from speft_bench.methods.speft.model import SPARSE_DELTAS, value_grad_counts
from speft_bench.models import head_parameters, targets_for
from speft_bench.salience import SALIENCE_METRICS
from speft_bench.salience.base import calibration_sets, compute_salience


@contextmanager
def plain_linears(model: nn.Module, layers: dict[str, SparseDeltaLinear]):
    """Put the (merged) base linears back in place, so salience sees ordinary weights."""
    for name, layer in layers.items():
        model.set_submodule(name, layer.base)
    try:
        yield
    finally:
        for name, layer in layers.items():
            model.set_submodule(name, layer)


def _reset_values(optimizer, layers: dict[str, SparseDeltaLinear]) -> None:
    for layer in layers.values():
        optimizer.state.pop(layer.values, None)


# masking.optimizer_reset -> what a refresh drops; param groups (lr, schedule) are kept either way.
# all: the paper's reinitialised optimizer (Algorithm 1), head moments included.
OPTIMIZER_RESETS = {"all": lambda optimizer, layers: optimizer.state.clear(), "values": _reset_values}


def budget(targets: dict[str, nn.Linear], spec: SpeftSchema, model_name: str) -> tuple[dict, int, int]:
    """(shapes by target, the budget k, the targets' weight count): k is LoRA's count at
    ``method.lora_rank`` on the same targets, or ``method.density`` of their weights."""
    shapes = {name: tuple(m.weight.shape) for name, m in targets.items()}
    k = lora_param_count(shapes, spec.lora_rank) if spec.lora_rank else budget_from_density(shapes, spec.density)
    total = sum(a * b for a, b in shapes.values())
    if k > total:  # only LoRA's rank can overshoot: density ≤ 1 is checked by the schema
        raise ConfigError(f"method.lora_rank={spec.lora_rank} asks for {k:,} trainable entries, more than the "
                          f"{total:,} weights of the {len(shapes)} target linears of model={model_name}")
    return shapes, k, total


def budget_rule(spec: SpeftSchema) -> str:
    return f"lora_rank={spec.lora_rank}" if spec.lora_rank else f"density={spec.density}"


class MaskChooser:
    """``choose(round_)``: a mask of ``k`` entries of the targets' weights and what it cost (for the record).

    Salience (``metric``) is computed on calibration round ``round_``'s examples (0: the first mask, n: the
    n-th refresh's) and its top-k taken per ``masking.scope``/``local_split``.  The weights are read at
    each call, so a refresh ranks the merged W.
    """

    def __init__(self, model: nn.Module, ctx: MethodContext, targets: dict[str, nn.Linear], k: int):
        self.model, self.ctx, self.targets, self.k = model, ctx, targets, k
        self.spec, self.masking, self.metric = ctx.typed["method"], ctx.typed["masking"], ctx.typed["metric"]
        self.options = {key: value for key, value in vars(self.metric).items() if key != "name"}
        # GRaSP's reference: 2 calibration sets
        self.examples = self.spec.calibration_examples * calibration_sets(self.metric.name, **self.options)

    def __call__(self, round_: int) -> tuple[dict[str, Any], dict[str, float]]:
        spec, start = self.spec, time.perf_counter()
        batches = self.ctx.calibration_batches(round_, self.examples, spec.calibration_batch_size)
        weights = {name: module.weight for name, module in self.targets.items()}
        scores = compute_salience(self.metric.name, self.model, weights, batches, **self.options,
                                  calibration_micro_batch=spec.calibration_micro_batch,
                                  offload=spec.salience_offload, mode=spec.calibration_mode)
        indices = select_mask(scores, self.k, self.masking.scope, self.masking.local_split)
        return indices, {"salience_s": round(time.perf_counter() - start, 3),
                         "examples": sum(len(b["labels"]) for b in batches)}


class MaskRefresh:
    """A dynamic mask's ``on_step(step, optimizer)``: every ``masking.interval`` steps merge the delta into
    W, recompute salience on fresh calibration examples (round ``step // interval``), select a new mask
    and reset the optimizer state per ``masking.optimizer_reset`` (Algorithm 1).

    ``state_dict()``/``load_state_dict()`` hold what a resumed run needs besides the layers and the
    optimizer (``speft_bench.checkpoints``): the current mask (the previous one of the next refresh's
    overlap) and the refreshes so far (``info["refreshes"]``, the record's list, updated in place).
    """

    def __init__(self, model: nn.Module, layers: dict[str, SparseDeltaLinear], choose: MaskChooser, masking,
                 indices: dict[str, Any], info: dict[str, Any]):
        self.model, self.layers, self.choose, self.masking = model, layers, choose, masking
        self.indices, self.info = indices, info

    def __call__(self, step: int, optimizer) -> None:
        if step == 0 or step % self.masking.interval:
            return
        for layer in self.layers.values():
            layer.merge()  # Algorithm 1 line 5: θ ← θ + θsp, θsp ← 0
        with plain_linears(self.model, self.layers):
            new, cost = self.choose(step // self.masking.interval)
        for name, layer in self.layers.items():
            layer.set_mask(new[name])
        OPTIMIZER_RESETS[self.masking.optimizer_reset](optimizer, self.layers)  # no stale Adam moments on new entries
        self.model.train()
        self.info["refreshes"].append({"step": step, "overlap": mask_overlap(self.indices, new),
                                       "mask_sha256": mask_digest(new), "optimizer_reset": self.masking.optimizer_reset,
                                       **cost})
        self.indices = new

    def state_dict(self) -> dict[str, Any]:
        return {"indices": dict(self.indices), "refreshes": [dict(r) for r in self.info["refreshes"]]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # on the device choose() puts masks on (a checkpoint is read onto the CPU)
        self.indices = {name: index.to(self.indices[name].device) for name, index in state["indices"].items()}
        self.info["refreshes"][:] = [dict(r) for r in state["refreshes"]]


@METHODS.register("speft")
class SPEFT(Method):
    @classmethod
    def check(cls, typed) -> None:
        metric = typed["metric"].name
        if metric not in SALIENCE_METRICS:
            raise ConfigError(f"method=speft needs a salience metric: metric must be one of "
                              f"{', '.join(SALIENCE_METRICS.names())}; got {metric!r}")
        if typed["method"].calibration_mode != "eval" and not getattr(SALIENCE_METRICS[metric], "runs_model", True):
            raise ConfigError(f"metric={metric} never runs the model, so method.calibration_mode="
                              f"{typed['method'].calibration_mode} would be ignored (leave it at eval)")

    def prepare(self, model: nn.Module, ctx: MethodContext) -> Prepared:
        spec, masking, metric = ctx.typed["method"], ctx.typed["masking"], ctx.typed["metric"]
        targets = targets_for(model, ctx.typed["model"], spec.targets)
        shapes, k, total = budget(targets, spec, ctx.typed["model"].name)
        if masking.scope == "local":
            try:  # a share larger than its layer fails here, before any salience is spent
                LOCAL_SPLITS[masking.local_split](shapes, k)
            except ValueError as err:
                raise ConfigError(str(err)) from None
        choose = MaskChooser(model, ctx, targets, k)
        model.requires_grad_(False)
        indices, cost = ctx.first_selection(partial(choose, 0))
        layers = SPARSE_DELTAS.attach(model, indices, spec.value_grad)
        trainable = {f"{name}.values": layer.values for name, layer in layers.items()}
        if spec.train_head:
            trainable |= head_parameters(model)
        freeze_all_but(model, trainable)
        info: dict[str, Any] = {
            "budget": k, "target_weights": total, "density": k / total, "target_modules": len(layers),
            "value_grad": {"mode": spec.value_grad,
                           **value_grad_counts(layers, precision.compute_dtype(ctx.typed["train"]))},
            "budget_rule": budget_rule(spec),
            "salience": {"metric": metric.name, **choose.options}, "calibration": cost,
            "mask_sha256": mask_digest(indices),
            "density_per_layer": density_per_layer(indices, shapes), "refreshes": [],
        }
        metadata = {"model": ctx.typed["model"].name, "targets": [ctx.typed["model"].targets[spec.targets.name]],
                    "metric": metric.name, "masking": masking.name, "budget": k}
        refresh = MaskRefresh(model, layers, choose, masking, indices, info) if masking.dynamic else None
        return Prepared(model, info, on_step=refresh,
                        save=partial(SPARSE_DELTAS.save_run, model=model, metadata=metadata))


    @classmethod
    def load(cls, model, run_dir, typed):
        return SPARSE_DELTAS.load_run(model, run_dir, typed["model"].name)
