"""Typed schemas of the shared config groups, and the table every group's schemas register in.

A leaf: stdlib, omegaconf and :mod:`speft_bench.errors` only, so a config is checked before torch loads.

Each YAML option pulls its schema in with ``- /schema/<group>@_here_: <name>``; OmegaConf then
rejects unknown keys and wrong types while Hydra composes, and each schema's ``__post_init__`` checks
ranges when :func:`speft_bench.config.validate` turns the group into its typed object.  Every message
names the knob (``method.r``) and the allowed values or range.

Here: the groups every run shares (model, task kinds, lm-eval, masking, train, logger, paths), the base
:class:`MethodSchema` and :class:`MetricSchema`, and :func:`register_schema`.  A method's or a metric's
own schema subclasses its base next to its code, in its package's ``config.py`` (``methods/speft/config.py``,
``salience/config.py``, ...), and registers with ``@register_schema("method", "<name>")``;
:func:`speft_bench.config.register_schemas` imports those modules and stores the table in Hydra's
ConfigStore.  Cross-group rules that need no code registry are the schemas' ``check_groups`` hooks.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from enum import Enum
from typing import Any, ClassVar, Dict, List, Optional, TypeVar

from omegaconf import MISSING

from speft_bench.errors import ConfigError, check, check_positive

S = TypeVar("S", bound=type)

# group -> schema name -> dataclass, stored as ``schema/<group>/<name>`` (speft_bench.config.register_schemas)
SCHEMAS: dict[str, dict[str, type]] = {}


def register_schema(group: str, *names: str) -> Callable[[S], S]:
    """Class decorator: the schema of ``group`` options whose YAML names it ``/schema/<group>@_here_: <name>``.

    A method's or a metric's schema registers under that method's or metric's name.
    """
    def add(schema: S) -> S:
        table = SCHEMAS.setdefault(group, {})
        for name in names:
            if name in table:
                raise KeyError(f"schema/{group}/{name} registered twice")
            table[name] = schema
        return schema

    return add


# --------------------------------------------------------------------------- enums
# Enum member names are what users type; OmegaConf lists them when a value is wrong.
class Family(Enum):
    encoder = "encoder"  # bidirectional encoder + classification head (BERT, RoBERTa, DeBERTa, MiniLM)
    decoder = "decoder"  # causal decoder (OPT, Llama, Gemma, Qwen, SmolLM2)


class ModelInit(Enum):
    pretrained = "pretrained"  # the weights at model.pretrained
    random = "random"  # the architecture only (model.architecture), random weights: benchmarks and dry runs


# train.precision: the dtype of the frozen body and how the forward runs (speft_bench/precision.py).
PRECISIONS = ("fp32", "bf16", "bf16-mixed")
# method.calibration_mode: the mode salience / importance runs the model in (salience.calibration_mode).
# eval: dropout off (the harness's choice); train: dropout on (the authors' code does not show theirs).
CALIBRATION_MODES = ("eval", "train")
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


class TaskKind(Enum):
    glue = "glue"
    instruct = "instruct"  # instruction fine-tuning of a causal LM, scored by lm-eval (speft_bench/tasks.py)


class PromptTemplate(Enum):
    alpaca = "alpaca"  # Stanford Alpaca's instruction / input / response template (data/instruct.py)


class TargetScope(Enum):
    all = "all"  # every linear layer of the transformer blocks
    mlp = "mlp"  # MLP only: the SPSFT paper's "FA" (attention frozen)
    attention = "attention"


class LoggerMode(Enum):
    disabled = "disabled"
    offline = "offline"
    online = "online"


# --------------------------------------------------------------------------- groups
@register_schema("model", "model")
@dataclass
class ModelSchema:
    name: str = MISSING
    pretrained: str = MISSING  # hub id, local path, or pkg://<package>/<path inside it>
    family: Family = MISSING
    label: str = ""  # what the weights honestly are, e.g. "Q4_1-dequantised"
    gguf_file: Optional[str] = None  # GGUF inside `pretrained`: converted once to an fp32 folder
    revision: Optional[str] = None
    init: ModelInit = ModelInit.pretrained
    # config.json of the architecture for init=random: a shipped pkg://speft_bench/architectures/<name>.json,
    # a local file or a hub id; null: the config at `pretrained`.
    architecture: Optional[str] = None
    num_layers: Optional[int] = None  # keep only the first N transformer blocks (benchmarks, dry runs); null: all
    targets: Dict[str, str] = field(default_factory=dict)  # scope -> regex over full module names

    def __post_init__(self) -> None:
        check_positive("model.num_layers", self.num_layers, allow_none=True)
        missing = {s.name for s in TargetScope} - set(self.targets)
        check(not missing,
              f"model.targets must define a regex for every scope {sorted(s.name for s in TargetScope)}; "
              f"missing {sorted(missing)}")
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


@register_schema("task", "glue")
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
        check_positive("task.max_length", self.max_length)
        check_positive("task.train_limit", self.train_limit, allow_none=True)
        check_positive("task.eval_limit", self.eval_limit, allow_none=True)
        check(self.is_regression or len(self.label_names) >= 2,
              f"task.label_names needs at least 2 labels for a classification task, got {self.label_names}")
        check(self.main_metric in self.metrics,
              f"task.main_metric={self.main_metric!r} must be one of task.metrics {self.metrics}")

    @property
    def num_labels(self) -> int:
        return 1 if self.is_regression else len(self.label_names)


@dataclass
class LmEvalSchema:
    """Evaluation through lm-evaluation-harness (speft_bench/evaluation/lm_eval.py) of an instruct task."""

    tasks: List[str] = field(default_factory=list)  # task/group names in speft_bench/evaluation/lm_eval_tasks/
    # Per-task settings, used when the task is in `tasks` (so a task config's defaults survive an
    # experiment that swaps the task list); names must still be shipped tasks.
    num_fewshot: Dict[str, int] = field(default_factory=dict)  # a task not listed keeps its config's n-shot
    limit: Optional[int] = None  # examples per task (per subject of mmlu); null: all (paper scale)
    limit_per_task: Dict[str, Optional[int]] = field(default_factory=dict)  # overrides `limit` for these tasks
    # int, or "auto": 1 on CPU (lm-eval's full-vocabulary fp32 logits make larger batches slower and
    # several GB bigger), lm-eval's own largest-that-fits search on CUDA.
    batch_size: Any = "auto"
    max_gen_toks: Optional[int] = None  # cap on generated tokens for generative tasks; null: the task's own
    allow_code_execution: bool = False  # humaneval/mbpp run model-written code: explicit opt-in only
    stand_in: Optional[str] = None  # how the evaluation differs from the paper's, and why (recorded)

    def __post_init__(self) -> None:
        check(len(set(self.tasks)) == len(self.tasks), f"task.eval.tasks has duplicates: {self.tasks}")
        for name, shots in self.num_fewshot.items():
            check(shots >= 0, f"task.eval.num_fewshot.{name} must be >= 0, got {shots}")
        check_positive("task.eval.limit", self.limit, allow_none=True)
        for name, limit in self.limit_per_task.items():
            check_positive(f"task.eval.limit_per_task.{name}", limit, allow_none=True)
        check(self.batch_size == "auto" or (isinstance(self.batch_size, int) and not isinstance(self.batch_size, bool)
                                             and self.batch_size > 0),
              f"task.eval.batch_size must be a positive integer or 'auto', got {self.batch_size!r}")
        check_positive("task.eval.max_gen_toks", self.max_gen_toks, allow_none=True)

    def limit_for(self, task: str) -> Optional[int]:
        return self.limit_per_task.get(task, self.limit)


@register_schema("task", "instruct")
@dataclass
class InstructTaskSchema:
    """Instruction data for a causal LM (loss on response tokens), evaluated with lm-eval."""

    name: str = MISSING
    kind: TaskKind = TaskKind.instruct
    source: str = MISSING  # dataset in speft_bench/data/sources.py with a format in data/instruct.py
    split: str = "train"
    template: PromptTemplate = PromptTemplate.alpaca
    max_length: int = 512  # tokens of prompt + response; longer examples are cut on the right
    train_limit: Optional[int] = None  # cap on train examples (CPU-scale runs; SPSFT's 256); recorded
    sample_seed: Optional[int] = None  # with train_limit: draw the examples at random with this seed; null: first n
    stand_in: Optional[str] = None  # which paper dataset this one replaces, and why (recorded)
    eval: LmEvalSchema = field(default_factory=LmEvalSchema)

    def __post_init__(self) -> None:
        check_positive("task.max_length", self.max_length)
        check_positive("task.train_limit", self.train_limit, allow_none=True)
        check(self.sample_seed is None or self.sample_seed >= 0,
              f"task.sample_seed must be >= 0 or null, got {self.sample_seed}")
        check(len(self.eval.tasks) > 0, "task.eval.tasks must name at least one lm-eval task")


@register_schema("method", "method")
@dataclass
class MethodSchema:
    """Every method's schema: as is for a method without options (full, head), else a subclass.

    The class attributes are the method's torch-free cross-group rules (not config keys), read by
    :meth:`check_groups` and :func:`speft_bench.config.validate` before anything loads.
    """

    # metric.name values the method takes; None: the method's code decides (its ``Method.check``, after
    # the torch-free rules: SPEFT's salience metrics, SPSFT's neuron importance)
    metrics: ClassVar[Optional[tuple[str, ...]]] = ("none",)
    # Reads the masking group; a method that does not takes only its defaults (speft_bench.config.validate),
    # so an ignored masking knob cannot enter the record and the config hash.
    uses_masking: ClassVar[bool] = False

    name: str = MISSING
    train_head: bool = True  # the classifier head stays densely trainable, as in both papers

    def check_groups(self, typed: dict[str, Any]) -> None:
        """Rules against the other typed groups (``typed``: group -> schema object); by default the metric
        is one of ``metrics``.  A subclass extends it (``super().check_groups(typed)``)."""
        metric = typed["metric"].name
        if self.metrics is not None and metric not in self.metrics:
            raise ConfigError(f"metric={metric!r} is not valid for method={self.name!r}; "
                              f"allowed: {', '.join(self.metrics)}")


def check_calibration(spec) -> None:
    """The calibration knobs of a method that runs a metric on calibration batches (SPEFT, SPSFT)."""
    check_positive("method.calibration_examples", spec.calibration_examples)
    check_positive("method.calibration_batch_size", spec.calibration_batch_size)
    check_positive("method.calibration_micro_batch", spec.calibration_micro_batch, allow_none=True)
    check(spec.calibration_mode in CALIBRATION_MODES,
          f"method.calibration_mode must be one of {list(CALIBRATION_MODES)}, got {spec.calibration_mode!r}")


@register_schema("metric", "metric")
@dataclass
class MetricSchema:
    """Every metric's schema: as is for a metric without options (gradient, l2, ...), else a subclass
    whose fields are the keyword options of the metric's function (tests/test_configs.py checks it)."""

    name: str = "none"

    def check_groups(self, typed: dict[str, Any]) -> None:
        """Rules against the other typed groups, run after the method's; by default none."""


# masking.optimizer_reset: whose optimizer state a dynamic-mask refresh drops (methods/speft/method.py)
OPTIMIZER_RESETS = ("all", "values")
_DYNAMIC_ONLY = ("interval", "optimizer_reset")  # knobs read only by a dynamic mask's refresh
# masking.local_split: how a local mask shares k among the layers (masking.py)
LOCAL_SPLITS = ("proportional", "equal")


@register_schema("masking", "masking")
@dataclass
class MaskingSchema:
    name: str = MISSING  # <static|dynamic>_<scope>: must agree with `scope` and `dynamic`
    scope: str = "global"  # global: one top-k over all targets; local: per layer, share ∝ size
    dynamic: bool = False
    interval: int = 1000  # steps between mask refreshes when dynamic (paper: I = 1000)
    # at a refresh: all: every parameter's state, as the paper (§3.4); values: the sparse values' only
    optimizer_reset: str = "all"
    # local masks: proportional: each layer's share of k ∝ its size; equal: k / (number of layers) each,
    # as the authors' code does with an integer k
    local_split: str = "proportional"

    def __post_init__(self) -> None:
        check(self.scope in ("global", "local"),
              f"masking.scope must be one of ['global', 'local'], got {self.scope!r}")
        check_positive("masking.interval", self.interval)
        check(self.optimizer_reset in OPTIMIZER_RESETS,
              f"masking.optimizer_reset must be one of {list(OPTIMIZER_RESETS)}, got {self.optimizer_reset!r}")
        check(self.local_split in LOCAL_SPLITS,
              f"masking.local_split must be one of {list(LOCAL_SPLITS)}, got {self.local_split!r}")
        implied = f"{'dynamic' if self.dynamic else 'static'}_{self.scope}"
        check(self.name == implied, f"masking.scope={self.scope} and masking.dynamic={str(self.dynamic).lower()} "
                                    f"contradict masking={self.name}; choose masking={implied} instead")
        if not self.dynamic:  # a static mask never refreshes: a changed refresh knob would be silently ignored
            for knob in _DYNAMIC_ONLY:
                default = MASKING_DEFAULTS[knob]
                check(getattr(self, knob) == default, f"masking.{knob}={getattr(self, knob)} is read only by dynamic "
                                                      f"masks; masking={self.name} is static (leave it at {default})")
        default = MASKING_DEFAULTS["local_split"]  # a global mask has no per-layer shares: the knob would be ignored
        check(self.scope == "local" or self.local_split == default,
              f"masking.local_split={self.local_split} is read only by local masks; masking={self.name} is global "
              f"(leave it at {default})")


# Defaults of every masking knob but the name: what a method that does not use masking must leave.
MASKING_DEFAULTS = {f.name: f.default for f in fields(MaskingSchema) if f.name != "name"}


SCHEDULES = ("linear", "cosine", "constant")  # linear decay to 0 (both papers), cosine to 0, constant


@register_schema("train", "train")
@dataclass
class TrainSchema:
    lr: float = 5e-4
    weight_decay: float = 0.0
    batch_size: int = 16  # examples per optimizer step (the effective batch)
    micro_batch_size: Optional[int] = None  # examples per forward/backward (gradient accumulation); null: batch_size
    eval_batch_size: int = 64
    epochs: float = 3.0
    max_steps: Optional[int] = None  # overrides epochs when set
    warmup_ratio: float = 0.03
    schedule: str = "linear"  # the learning rate after warmup: one of SCHEDULES (speft_bench.run.SCHEDULERS)
    max_grad_norm: Optional[float] = 1.0
    seed: int = 0
    log_every: int = 10
    num_threads: Optional[int] = None  # torch intra-op threads; None keeps torch's default
    deterministic: bool = True  # torch.use_deterministic_algorithms
    device: str = "auto"  # auto (CUDA when available) | cpu | cuda | cuda:N
    precision: str = "fp32"  # fp32 | bf16 (frozen body in bf16) | bf16-mixed (fp32 weights, bf16 autocast)
    master_fp32: bool = True  # trainable tensors kept in fp32 whatever the precision (false: the body's dtype)
    gradient_checkpointing: bool = False  # recompute block activations in backward (non-reentrant)
    # optimizer steps between resumable checkpoints (null: only on a stop signal)
    checkpoint_every: Optional[int] = None

    def __post_init__(self) -> None:
        check(_DEVICE.fullmatch(self.device) is not None,
              f"train.device must be one of auto, cpu, cuda, cuda:N; got {self.device!r}")
        check(self.precision in PRECISIONS,
              f"train.precision must be one of {list(PRECISIONS)}, got {self.precision!r}")

        check_positive("train.micro_batch_size", self.micro_batch_size, allow_none=True)
        check(self.micro_batch_size is None or self.batch_size % self.micro_batch_size == 0,
              f"train.micro_batch_size={self.micro_batch_size} must divide train.batch_size={self.batch_size}")
        check(self.schedule in SCHEDULES, f"train.schedule must be one of {list(SCHEDULES)}, got {self.schedule!r}")
        check_positive("train.lr", self.lr)
        check(self.weight_decay >= 0, f"train.weight_decay must be >= 0, got {self.weight_decay}")
        check_positive("train.batch_size", self.batch_size)
        check_positive("train.eval_batch_size", self.eval_batch_size)
        check_positive("train.epochs", self.epochs)
        check_positive("train.max_steps", self.max_steps, allow_none=True)
        check(0.0 <= self.warmup_ratio < 1.0, f"train.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        check_positive("train.max_grad_norm", self.max_grad_norm, allow_none=True)
        check(self.seed >= 0, f"train.seed must be >= 0, got {self.seed}")
        check_positive("train.log_every", self.log_every)
        check_positive("train.num_threads", self.num_threads, allow_none=True)
        check_positive("train.checkpoint_every", self.checkpoint_every, allow_none=True)


@register_schema("logger", "logger")
@dataclass
class LoggerSchema:
    mode: LoggerMode = LoggerMode.disabled
    project: str = "speft-bench"
    entity: Optional[str] = None
    tags: List[str] = field(default_factory=list)


@register_schema("paths", "paths")
@dataclass
class PathsSchema:
    data_root: str = MISSING
    cache_dir: str = MISSING  # converted models (GGUF -> fp32); git-ignored
    output_dir: str = MISSING
