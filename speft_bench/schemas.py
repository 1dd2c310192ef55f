"""Typed schemas for every config group, so that a typo fails at composition.

Each YAML option pulls its schema in with ``- /schema/<group>@_here_: <schema>``; OmegaConf then
rejects unknown keys and wrong types while Hydra composes.  Ranges and cross-group rules are
checked by :func:`validate`, which the entry point calls before any model or data loads.
Every message names the knob (``method.r``) and the allowed values or range.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

PROJECT_ROOT = Path(__file__).resolve().parent.parent


class ConfigError(ValueError):
    """A config value is out of range or inconsistent with another group."""


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _positive(knob: str, value: float | int | None, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    _check(value is not None and value > 0, f"{knob} must be > 0, got {value}")


# --------------------------------------------------------------------------- enums
# Enum member names are what users type; OmegaConf lists them when a value is wrong.
class Family(Enum):
    encoder = "encoder"  # bidirectional encoder + classification head (BERT, RoBERTa, DeBERTa, MiniLM)
    decoder = "decoder"  # causal decoder (OPT, Llama, Gemma, Qwen, SmolLM2)


class DType(Enum):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class TaskKind(Enum):
    glue = "glue"


class TargetScope(Enum):
    all = "all"  # every linear layer of the transformer blocks
    mlp = "mlp"  # MLP only: the SPSFT paper's "FA" (attention frozen)
    attention = "attention"


class LoraInit(Enum):
    gaussian = "gaussian"  # peft's default: A Kaiming-uniform, B zero
    pissa = "pissa"  # principal singular vectors (PiSSA is an init option of LoRA)


class LoggerMode(Enum):
    disabled = "disabled"
    offline = "offline"
    online = "online"


# --------------------------------------------------------------------------- groups
@dataclass
class ModelSchema:
    name: str = MISSING
    pretrained: str = MISSING  # hub id, local path, or pkg://<package>/<path inside it>
    family: Family = MISSING
    label: str = ""  # what the weights honestly are, e.g. "Q4_1-dequantised"
    gguf_file: Optional[str] = None  # GGUF inside `pretrained`: converted once to an fp32 folder
    revision: Optional[str] = None
    dtype: DType = DType.float32
    targets: Dict[str, str] = field(default_factory=dict)  # scope -> regex over full module names

    def __post_init__(self) -> None:
        missing = {s.name for s in TargetScope} - set(self.targets)
        _check(not missing, f"model.targets must define a regex for every scope {sorted(s.name for s in TargetScope)}; missing {sorted(missing)}")
        for scope, pattern in self.targets.items():
            try:
                re.compile(pattern)
            except re.error as err:
                raise ConfigError(f"model.targets.{scope} is not a valid regex ({err}): {pattern!r}") from None


@dataclass
class GlueColumns:
    text_a: str = MISSING
    text_b: Optional[str] = None
    label: str = MISSING


@dataclass
class TaskSchema:
    name: str = MISSING
    kind: TaskKind = TaskKind.glue
    # Local copy in the original GLUE layout: <data_root>/glue/<glue_dir>/<split file>.
    glue_dir: str = MISSING
    train_file: str = "train.tsv"
    dev_file: str = "dev.tsv"
    header: bool = True
    column_names: Optional[List[str]] = None  # for files without a header line (CoLA)
    columns: GlueColumns = field(default_factory=GlueColumns)
    # The same data on the hub (nyu-mll/glue) for users who are online.
    hub_path: str = "nyu-mll/glue"
    hub_name: str = MISSING
    hub_dev_split: str = "validation"
    hub_columns: GlueColumns = field(default_factory=GlueColumns)
    label_names: List[str] = field(default_factory=list)  # file label -> class index; [] for regression
    is_regression: bool = False
    metrics: List[str] = field(default_factory=list)
    main_metric: str = MISSING
    max_length: int = 128
    train_limit: Optional[int] = None  # cap on train examples (CPU-scale runs); recorded
    eval_limit: Optional[int] = None

    def __post_init__(self) -> None:
        _positive("task.max_length", self.max_length)
        _positive("task.train_limit", self.train_limit, allow_none=True)
        _positive("task.eval_limit", self.eval_limit, allow_none=True)
        _check(self.is_regression or len(self.label_names) >= 2,
               f"task.label_names needs at least 2 labels for a classification task, got {self.label_names}")
        _check(self.main_metric in self.metrics, f"task.main_metric={self.main_metric!r} must be one of task.metrics {self.metrics}")

    @property
    def num_labels(self) -> int:
        return 1 if self.is_regression else len(self.label_names)


@dataclass
class MethodSchema:
    name: str = MISSING
    train_head: bool = True  # the classifier head stays densely trainable, as in both papers


@dataclass
class LoraSchema(MethodSchema):
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: TargetScope = TargetScope.all
    init: LoraInit = LoraInit.gaussian
    use_dora: bool = False

    def __post_init__(self) -> None:
        _positive("method.r", self.r)
        _positive("method.alpha", self.alpha)
        _check(0.0 <= self.dropout < 1.0, f"method.dropout must be in [0, 1), got {self.dropout}")


@dataclass
class MetricSchema:
    name: str = "none"


@dataclass
class MaskingSchema:
    name: str = MISSING
    scope: str = "global"  # global: one top-k over all targets; local: per layer, share ∝ size
    dynamic: bool = False
    interval: int = 1000  # steps between mask refreshes when dynamic (paper: I = 1000)

    def __post_init__(self) -> None:
        _check(self.scope in ("global", "local"), f"masking.scope must be one of ['global', 'local'], got {self.scope!r}")
        _positive("masking.interval", self.interval)


@dataclass
class TrainSchema:
    optimizer: str = "adamw"
    lr: float = 5e-4
    weight_decay: float = 0.0
    batch_size: int = 16
    eval_batch_size: int = 64
    epochs: float = 3.0
    max_steps: Optional[int] = None  # overrides epochs when set
    warmup_ratio: float = 0.03
    schedule: str = "linear"
    max_grad_norm: Optional[float] = 1.0
    seed: int = 0
    log_every: int = 10
    num_threads: Optional[int] = None  # torch intra-op threads; None keeps torch's default
    deterministic: bool = True  # torch.use_deterministic_algorithms

    def __post_init__(self) -> None:
        _check(self.optimizer == "adamw", f"train.optimizer must be one of ['adamw'], got {self.optimizer!r}")
        _check(self.schedule == "linear", f"train.schedule must be one of ['linear'], got {self.schedule!r}")
        _positive("train.lr", self.lr)
        _check(self.weight_decay >= 0, f"train.weight_decay must be >= 0, got {self.weight_decay}")
        _positive("train.batch_size", self.batch_size)
        _positive("train.eval_batch_size", self.eval_batch_size)
        _positive("train.epochs", self.epochs)
        _positive("train.max_steps", self.max_steps, allow_none=True)
        _check(0.0 <= self.warmup_ratio < 1.0, f"train.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        _positive("train.max_grad_norm", self.max_grad_norm, allow_none=True)
        _check(self.seed >= 0, f"train.seed must be >= 0, got {self.seed}")
        _positive("train.log_every", self.log_every)
        _positive("train.num_threads", self.num_threads, allow_none=True)


@dataclass
class LoggerSchema:
    mode: LoggerMode = LoggerMode.disabled
    project: str = "speft-bench"
    entity: Optional[str] = None
    tags: List[str] = field(default_factory=list)


@dataclass
class PathsSchema:
    data_root: str = MISSING
    cache_dir: str = MISSING  # converted models (GGUF -> fp32); git-ignored
    output_dir: str = MISSING


_SCHEMAS: dict[str, dict[str, Any]] = {
    "model": {"model": ModelSchema},
    "task": {"glue": TaskSchema},
    "method": {"method": MethodSchema, "lora": LoraSchema},
    "metric": {"metric": MetricSchema},
    "masking": {"masking": MaskingSchema},
    "train": {"train": TrainSchema},
    "logger": {"logger": LoggerSchema},
    "paths": {"paths": PathsSchema},
}


def register_schemas() -> None:
    """Store every schema under ``schema/<group>/<name>`` and the ``speft_root`` resolver."""
    store = ConfigStore.instance()
    for group, schemas in _SCHEMAS.items():
        for name, node in schemas.items():
            store.store(group=f"schema/{group}", name=name, node=node)
    if not OmegaConf.has_resolver("speft_root"):
        OmegaConf.register_new_resolver("speft_root", lambda: str(PROJECT_ROOT))


def validate(cfg: DictConfig) -> dict[str, Any]:
    """Check ranges (dataclass ``__post_init__``) and cross-group rules; return the typed groups.

    Runs before any model or data loads.  Raises :class:`ConfigError` naming the knob.
    """
    from speft_bench.methods import METHODS  # registries import torch-heavy code: keep lazy

    typed = {}
    for group in _SCHEMAS:
        try:
            typed[group] = OmegaConf.to_object(cfg[group])
        except ConfigError:
            raise
        except Exception as err:  # OmegaConf's own message names the key
            raise ConfigError(f"{group}: {err}") from None
    method_name = typed["method"].name
    _check(method_name in METHODS, f"method.name={method_name!r} is not known; allowed values: {', '.join(METHODS.names())}")
    METHODS[method_name].check(cfg, typed)
    return typed


register_schemas()
