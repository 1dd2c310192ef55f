"""Typed schemas for every config group, so that a typo fails at composition.

Each YAML option pulls its schema in with ``- /schema/<group>@_here_: <schema>``; OmegaConf then
rejects unknown keys and wrong types while Hydra composes.  Ranges and cross-group rules are
checked by :func:`validate`, which the entry point calls before any model or data loads.
Every message names the knob (``method.r``) and the allowed values or range.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
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


class ModelInit(Enum):
    pretrained = "pretrained"  # the weights at model.pretrained
    random = "random"  # the architecture only (model.architecture), random weights: benchmarks and dry runs


# train.precision: the dtype of the frozen body and how the forward runs (speft_bench/precision.py).
PRECISIONS = ("fp32", "bf16", "bf16-mixed")
VALUE_GRADS = ("auto", "sampled", "dense")  # SPEFT's value-gradient kernel (methods/speft/layer.py)
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
    init: ModelInit = ModelInit.pretrained
    # config.json of the architecture for init=random: a shipped pkg://speft_bench/architectures/<name>.json,
    # a local file or a hub id; null: the config at `pretrained`.
    architecture: Optional[str] = None
    num_layers: Optional[int] = None  # keep only the first N transformer blocks (benchmarks, dry runs); null: all
    targets: Dict[str, str] = field(default_factory=dict)  # scope -> regex over full module names

    def __post_init__(self) -> None:
        _positive("model.num_layers", self.num_layers, allow_none=True)
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
        _check(len(set(self.tasks)) == len(self.tasks), f"task.eval.tasks has duplicates: {self.tasks}")
        for name, shots in self.num_fewshot.items():
            _check(shots >= 0, f"task.eval.num_fewshot.{name} must be >= 0, got {shots}")
        _positive("task.eval.limit", self.limit, allow_none=True)
        for name, limit in self.limit_per_task.items():
            _positive(f"task.eval.limit_per_task.{name}", limit, allow_none=True)
        _check(self.batch_size == "auto" or (isinstance(self.batch_size, int) and not isinstance(self.batch_size, bool)
                                             and self.batch_size > 0),
               f"task.eval.batch_size must be a positive integer or 'auto', got {self.batch_size!r}")
        _positive("task.eval.max_gen_toks", self.max_gen_toks, allow_none=True)

    def limit_for(self, task: str) -> Optional[int]:
        return self.limit_per_task.get(task, self.limit)


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
        _positive("task.max_length", self.max_length)
        _positive("task.train_limit", self.train_limit, allow_none=True)
        _check(self.sample_seed is None or self.sample_seed >= 0, f"task.sample_seed must be >= 0 or null, got {self.sample_seed}")
        _check(len(self.eval.tasks) > 0, "task.eval.tasks must name at least one lm-eval task")


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


def _check_calibration(spec) -> None:
    _positive("method.calibration_examples", spec.calibration_examples)
    _positive("method.calibration_batch_size", spec.calibration_batch_size)
    _positive("method.calibration_micro_batch", spec.calibration_micro_batch, allow_none=True)
    _check(spec.calibration_mode in CALIBRATION_MODES,
           f"method.calibration_mode must be one of {list(CALIBRATION_MODES)}, got {spec.calibration_mode!r}")


@dataclass
class SpeftSchema(MethodSchema):
    targets: TargetScope = TargetScope.all
    lora_rank: Optional[int] = 8  # budget = LoRA's trainable count at this rank on the same targets
    density: Optional[float] = None  # or a fraction of the target weights (when lora_rank is null)
    calibration_examples: int = 1024
    calibration_batch_size: int = 16
    calibration_micro_batch: Optional[int] = None  # examples per forward/backward of salience; null: the whole batch
    salience_offload: bool = False  # accumulate salience scores on the CPU (frees W of device memory)
    calibration_mode: str = "eval"  # eval: dropout off while salience runs the model; train: dropout on
    value_grad: str = "auto"  # auto: the cost model's cheaper kernel per layer; sampled | dense: forced

    def __post_init__(self) -> None:
        _check(self.value_grad in VALUE_GRADS, f"method.value_grad must be one of {list(VALUE_GRADS)}, got {self.value_grad!r}")
        _check_calibration(self)
        _check((self.lora_rank is None) != (self.density is None),
               f"method.lora_rank and method.density: set exactly one (got lora_rank={self.lora_rank}, density={self.density})")
        _positive("method.lora_rank", self.lora_rank, allow_none=True)
        _check(self.density is None or 0.0 < self.density <= 1.0, f"method.density must be in (0, 1], got {self.density}")


@dataclass
class SpsftSchema(MethodSchema):
    targets: TargetScope = TargetScope.all  # mlp: the SPSFT paper's "FA" (attention frozen)
    r: Optional[int] = 16  # rows per target linear; r = 2R has about LoRA rank R's trainable count
    fraction: Optional[float] = None  # or this fraction of each layer's rows (when r is null)
    train_norms: bool = False  # also train the blocks' LayerNorm/RMSNorm weights and biases
    calibration_examples: int = 1024  # for data-driven importance (taylor, qm_taylor)
    calibration_batch_size: int = 16
    calibration_micro_batch: Optional[int] = None  # examples per forward/backward of importance; null: the whole batch
    calibration_mode: str = "eval"  # eval: dropout off while importance runs the model; train: dropout on

    def __post_init__(self) -> None:
        _check_calibration(self)
        _check((self.r is None) != (self.fraction is None),
               f"method.r and method.fraction: set exactly one (got r={self.r}, fraction={self.fraction})")
        _positive("method.r", self.r, allow_none=True)
        _check(self.fraction is None or 0.0 < self.fraction <= 1.0,
               f"method.fraction must be in (0, 1], got {self.fraction}")


@dataclass
class MetricSchema:
    name: str = "none"


# metric.variant of grasp, synflow and fisher: paper: the SPEFT paper's written formula; reference: what
# the authors' code (0-ml/speft, model/sparse_peft.py) computes, which produced the published numbers.
METRIC_VARIANTS = ("paper", "reference")


@dataclass
class VariantMetricSchema(MetricSchema):
    """A metric whose paper formula and the authors' code differ (README: "Paper formulas vs the authors' code")."""

    variant: str = "paper"

    def __post_init__(self) -> None:
        _check(self.variant in METRIC_VARIANTS,
               f"metric.variant must be one of {list(METRIC_VARIANTS)}, got {self.variant!r}")


@dataclass
class FisherSchema(VariantMetricSchema):
    micro_batch: int = 1  # 1: exact per-example gradients; larger: faster, approximate

    def __post_init__(self) -> None:
        super().__post_init__()
        _positive("metric.micro_batch", self.micro_batch)
        _check(self.variant == "paper" or self.micro_batch == 1,
               f"metric.micro_batch={self.micro_batch} with metric.variant=reference: the authors' code takes one "
               f"example per gradient (leave metric.micro_batch at 1)")


@dataclass
class QmTaylorSchema(MetricSchema):
    quantiles: int = 11  # evenly spaced levels in [0, 1] averaged over labels; 11: eq. 7's 0 %, 10 %, …, 100 %

    def __post_init__(self) -> None:
        _check(self.quantiles >= 2, f"metric.quantiles must be >= 2, got {self.quantiles}")


# masking.optimizer_reset: whose optimizer state a dynamic-mask refresh drops (methods/speft/__init__.py)
OPTIMIZER_RESETS = ("all", "values")
_DYNAMIC_ONLY = ("interval", "optimizer_reset")  # knobs read only by a dynamic mask's refresh
# masking.local_split: how a local mask shares k among the layers (masking.py)
LOCAL_SPLITS = ("proportional", "equal")


@dataclass
class MaskingSchema:
    name: str = MISSING  # <static|dynamic>_<scope>: must agree with `scope` and `dynamic`
    scope: str = "global"  # global: one top-k over all targets; local: per layer, share ∝ size
    dynamic: bool = False
    interval: int = 1000  # steps between mask refreshes when dynamic (paper: I = 1000)
    optimizer_reset: str = "all"  # at a refresh: all: every parameter's state, as the paper (§3.4); values: the sparse values' only
    # local masks: proportional: each layer's share of k ∝ its size; equal: k / (number of layers) each,
    # as the authors' code does with an integer k
    local_split: str = "proportional"

    def __post_init__(self) -> None:
        _check(self.scope in ("global", "local"), f"masking.scope must be one of ['global', 'local'], got {self.scope!r}")
        _positive("masking.interval", self.interval)
        _check(self.optimizer_reset in OPTIMIZER_RESETS,
               f"masking.optimizer_reset must be one of {list(OPTIMIZER_RESETS)}, got {self.optimizer_reset!r}")
        _check(self.local_split in LOCAL_SPLITS,
               f"masking.local_split must be one of {list(LOCAL_SPLITS)}, got {self.local_split!r}")
        implied = f"{'dynamic' if self.dynamic else 'static'}_{self.scope}"
        _check(self.name == implied, f"masking.scope={self.scope} and masking.dynamic={str(self.dynamic).lower()} "
                                     f"contradict masking={self.name}; choose masking={implied} instead")
        if not self.dynamic:  # a static mask never refreshes: a changed refresh knob would be silently ignored
            for knob in _DYNAMIC_ONLY:
                default = MASKING_DEFAULTS[knob]
                _check(getattr(self, knob) == default, f"masking.{knob}={getattr(self, knob)} is read only by dynamic "
                                                       f"masks; masking={self.name} is static (leave it at {default})")
        default = MASKING_DEFAULTS["local_split"]  # a global mask has no per-layer shares: the knob would be ignored
        _check(self.scope == "local" or self.local_split == default,
               f"masking.local_split={self.local_split} is read only by local masks; masking={self.name} is global "
               f"(leave it at {default})")


# Defaults of every masking knob but the name: what a method that does not use masking must leave.
MASKING_DEFAULTS = {f.name: f.default for f in fields(MaskingSchema) if f.name != "name"}


@dataclass
class TrainSchema:
    optimizer: str = "adamw"
    lr: float = 5e-4
    weight_decay: float = 0.0
    batch_size: int = 16  # examples per optimizer step (the effective batch)
    micro_batch_size: Optional[int] = None  # examples per forward/backward (gradient accumulation); null: batch_size
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
    device: str = "auto"  # auto (CUDA when available) | cpu | cuda | cuda:N
    precision: str = "fp32"  # fp32 | bf16 (frozen body in bf16) | bf16-mixed (fp32 weights, bf16 autocast)
    master_fp32: bool = True  # trainable tensors kept in fp32 whatever the precision (false: the body's dtype)
    gradient_checkpointing: bool = False  # recompute block activations in backward (non-reentrant)
    checkpoint_every: Optional[int] = None  # optimizer steps between resumable checkpoints (null: only on a stop signal)

    def __post_init__(self) -> None:
        _check(_DEVICE.fullmatch(self.device) is not None,
               f"train.device must be one of auto, cpu, cuda, cuda:N; got {self.device!r}")
        _check(self.precision in PRECISIONS, f"train.precision must be one of {list(PRECISIONS)}, got {self.precision!r}")
        _positive("train.micro_batch_size", self.micro_batch_size, allow_none=True)
        _check(self.micro_batch_size is None or self.batch_size % self.micro_batch_size == 0,
               f"train.micro_batch_size={self.micro_batch_size} must divide train.batch_size={self.batch_size}")
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
        _positive("train.checkpoint_every", self.checkpoint_every, allow_none=True)


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
    "task": {"glue": TaskSchema, "instruct": InstructTaskSchema},
    "method": {"method": MethodSchema, "lora": LoraSchema, "speft": SpeftSchema, "spsft": SpsftSchema},
    "metric": {"metric": MetricSchema, "grasp": VariantMetricSchema, "synflow": VariantMetricSchema,
               "fisher": FisherSchema, "qm_taylor": QmTaylorSchema},
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

    _check(isinstance(cfg.get("resume"), bool), f"resume must be true or false, got {cfg.get('resume')!r}")
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
    _check_masking_is_used(METHODS, method_name, typed["masking"])
    from speft_bench.tasks import TASK_KINDS

    TASK_KINDS[typed["task"].kind.name].check(typed)  # cross-group rules of the task kind (model family, ...)
    return typed


def _check_masking_is_used(methods, method_name: str, masking: MaskingSchema) -> None:
    """A method that does not read masking (``Method.uses_masking``) takes only its default.

    Otherwise the knob would be silently ignored yet enter the record and the config hash.
    """
    if methods[method_name].uses_masking:
        return
    changed = [f"masking.{knob}={getattr(masking, knob)!r}" for knob, default in MASKING_DEFAULTS.items()
               if getattr(masking, knob) != default]  # the name agrees with scope and dynamic (MaskingSchema)
    users = [name for name in methods.names() if methods[name].uses_masking]
    _check(not changed, f"method={method_name} does not use masking, so {', '.join(changed)} would be ignored; "
                        f"only method={'|'.join(users)} reads it: leave masking at its default "
                        f"(masking=static_{MASKING_DEFAULTS['scope']}: "
                        f"{', '.join(f'masking.{k}={v!r}' for k, v in MASKING_DEFAULTS.items())})")


register_schemas()
