"""SPEFT (Liu et al., 2024): train a sparse additive delta θ = θ0 + θsp on the target linears.

The entries of θsp are the top-k of a salience metric computed on calibration batches (Algorithm 1),
ranked globally or per layer.  With a dynamic mask, every ``masking.interval`` steps the delta is
merged into θ0, salience is recomputed on fresh batches, a new mask is chosen and the optimizer
is reinitialised (section 3.4; ``masking.optimizer_reset=values``: only the sparse values' state).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Any

from torch import nn

from speft_bench import precision
from speft_bench.adapters import FILE
from speft_bench.masking import (LOCAL_SPLITS, budget_from_density, density_per_layer, lora_param_count, mask_digest,
                                 mask_overlap, select_mask)
from speft_bench.methods import METHODS, Method, MethodContext, Prepared, freeze_all_but
from speft_bench.methods.speft.layer import SparseDeltaLinear
from speft_bench.methods.speft.model import (ADAPTER_FORMAT, attach_sparse_deltas, load_adapter, save_adapter,
                                             value_grad_counts)
from speft_bench.models import head_parameters, targets_for
from speft_bench.salience import SALIENCE_METRICS, calibration_sets, compute_salience
from speft_bench.schemas import ConfigError, SpeftSchema


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


class MaskRefresh:
    """A dynamic mask's ``on_step(step, optimizer)``: every ``masking.interval`` steps merge the delta into
    W, recompute salience on fresh calibration examples (round ``step // interval``), select a new mask
    and reset the optimizer state per ``masking.optimizer_reset`` (Algorithm 1).

    ``state_dict()``/``load_state_dict()`` hold what a resumed run needs besides the layers and the
    optimizer (``speft_bench.checkpoints``): the current mask (the previous one of the next refresh's
    overlap) and the refreshes so far (``info["refreshes"]``, the record's list, updated in place).
    """

    def __init__(self, model: nn.Module, layers: dict[str, SparseDeltaLinear], choose, masking, indices, info):
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
    uses_masking = True

    @classmethod
    def check(cls, cfg, typed) -> None:
        metric = typed["metric"].name
        if metric not in SALIENCE_METRICS:
            raise ConfigError(f"method=speft needs a salience metric: metric must be one of "
                              f"{', '.join(SALIENCE_METRICS.names())}; got {metric!r}")
        score = SALIENCE_METRICS[metric]
        if typed["method"].calibration_mode != "eval" and not getattr(score, "runs_model", True):
            raise ConfigError(f"metric={metric} never runs the model, so method.calibration_mode="
                              f"{typed['method'].calibration_mode} would be ignored (leave it at eval)")
        if (check := getattr(score, "check", None)) is not None:  # the metric's own cross-group rules
            check(typed)

    def prepare(self, model: nn.Module, ctx: MethodContext) -> Prepared:
        spec, masking, metric = ctx.typed["method"], ctx.typed["masking"], ctx.typed["metric"]
        targets = targets_for(model, ctx.typed["model"], spec.targets)
        shapes, k, total = budget(targets, spec, ctx.typed["model"].name)
        if masking.scope == "local":
            try:  # a share larger than its layer fails here, before any salience is spent
                LOCAL_SPLITS[masking.local_split](shapes, k)
            except ValueError as err:
                raise ConfigError(str(err)) from None
        options = {key: value for key, value in vars(metric).items() if key != "name"}
        examples = spec.calibration_examples * calibration_sets(metric.name, **options)  # GRaSP reference: 2 sets

        def choose(round_: int) -> tuple[dict[str, Any], dict[str, float]]:
            start = time.perf_counter()
            batches = ctx.calibration_batches(round_, examples, spec.calibration_batch_size)
            scores = compute_salience(metric.name, model, {n: m.weight for n, m in targets.items()}, batches, **options,
                                      calibration_micro_batch=spec.calibration_micro_batch,
                                      offload=spec.salience_offload, mode=spec.calibration_mode)
            indices = select_mask(scores, k, masking.scope, masking.local_split)
            return indices, {"salience_s": round(time.perf_counter() - start, 3), "examples": sum(len(b["labels"]) for b in batches)}

        model.requires_grad_(False)
        indices, cost = choose(0)
        layers = attach_sparse_deltas(model, indices, spec.value_grad)
        trainable = {f"{name}.values": layer.values for name, layer in layers.items()}
        if spec.train_head:
            trainable |= head_parameters(model)
        freeze_all_but(model, trainable)
        info: dict[str, Any] = {
            "budget": k, "target_weights": total, "density": k / total, "target_modules": len(layers),
            "value_grad": {"mode": spec.value_grad,
                           **value_grad_counts(layers, precision.compute_dtype(ctx.typed["train"]))},
            "budget_rule": budget_rule(spec),
            "salience": {"metric": metric.name, **options}, "calibration": cost, "mask_sha256": mask_digest(indices),
            "density_per_layer": density_per_layer(indices, shapes), "refreshes": [],
        }
        metadata = {"model": ctx.typed["model"].name, "targets": [ctx.typed["model"].targets[spec.targets.name]],
                    "metric": metric.name, "masking": masking.name, "budget": k}

        def save(run_dir):
            return {"path": FILE, "format": ADAPTER_FORMAT, "numel": save_adapter(run_dir / FILE, model, metadata)}

        if not masking.dynamic:
            return Prepared(model, info, save=save)

        return Prepared(model, info, on_step=MaskRefresh(model, layers, choose, masking, indices, info), save=save)

    @classmethod
    def load(cls, model, run_dir, typed):
        load_adapter(run_dir / FILE, model, model_id=typed["model"].name)
        return model
