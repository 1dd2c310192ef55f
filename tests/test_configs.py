"""Every option of every config group composes and validates; bad values fail before a model loads."""

import dataclasses
import inspect
import subprocess
import sys
import time

import pytest
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import OmegaConf

from speft_bench.config import register_schemas, validate
from speft_bench.errors import ConfigError
from speft_bench.schemas import SCHEMAS
from tests.helpers import CONF, ROOT, chained_message, compose_config

REQUIRED = ("task=mrpc", "method=lora")
GROUPS = ("model", "task", "method", "metric", "masking", "train", "logger", "paths")


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def all_options() -> list[tuple[str, str]]:
    return [(g, o) for g in GROUPS for o in options(g)]


def test_every_group_has_options():
    assert {g: len(options(g)) > 0 for g in GROUPS} == dict.fromkeys(GROUPS, True)
    # the 12 models of the issue and all 8 GLUE tasks of the SPSFT paper
    assert len(options("model")) == 12
    # + the LLM tracks' instruct tasks
    assert options("task") == ["alpaca", "codefeedback", "cola", "gsm8k", "metamathqa", "mnli", "mrpc", "oasst2",
                               "openbookqa_256", "qnli", "qqp", "rte", "sst2", "stsb"]


def partners(group: str, option: str) -> tuple[str, ...]:
    """Options of the other groups that ``group=option`` is valid with."""
    if group == "metric" and option in ("l2", "taylor", "qm_taylor"):
        return ("task=mrpc", "method=spsft")  # neuron-importance metrics choose SPSFT's rows
    if group == "metric" and option != "none":
        return ("task=mrpc", "method=speft")  # salience metrics choose SPEFT's entries
    if group == "masking":
        return ("task=mrpc", "method=speft", "metric=gradient")  # only SPEFT reads masking
    if group == "method" and option == "speft":
        return ("task=mrpc", "metric=gradient")
    if group == "method" and option == "spsft":
        return ("task=mrpc", "metric=taylor")
    if group == "method" and option == "pretrained":  # evaluation of the loaded LM, no classifier head
        return ("task=gsm8k", "model=smollm2_135m")
    if group == "task" and option == "codefeedback":  # scoring runs model-written code: explicit opt-in
        return ("method=lora", "model=smollm2_135m", "task.eval.allow_code_execution=true")
    if group == "task" and (CONF / "task" / f"{option}.yaml").read_text().count("kind: instruct"):
        return ("method=lora", "model=smollm2_135m")  # instruction tuning needs a causal LM
    return REQUIRED


@pytest.mark.parametrize(("group", "option"), all_options())
def test_option_composes_and_validates(group, option):
    cfg = compose_config(*partners(group, option), f"{group}={option}")
    typed = validate(cfg)
    assert cfg[group] is not None and typed[group] is not None
    if group == "model":  # every model names its targets for every scope
        assert set(typed["model"].targets) == {"all", "mlp", "attention"}


def test_required_axes_have_no_default():
    with pytest.raises(ConfigCompositionException, match="You must specify 'task'"):
        compose_config("method=lora")
    with pytest.raises(ConfigCompositionException, match="You must specify 'method'"):
        compose_config("task=mrpc")


# (overrides, exception type, message fragment naming the knob or the allowed values).  task=mrpc and
# method=lora are added unless an entry picks its own task or method.
BAD_CONFIGS = [
    # unknown options of every group
    (["task=nope"], MissingConfigException, "Available options in 'task'"),
    (["method=nope"], MissingConfigException, "Available options in 'method'"),
    (["model=nope"], MissingConfigException, "Available options in 'model'"),
    (["metric=nope"], MissingConfigException, "Available options in 'metric'"),
    (["masking=nope"], MissingConfigException, "Available options in 'masking'"),
    (["experiment=nope"], MissingConfigException, "Available options in 'experiment'"),
    (["hydra/launcher=nope"], MissingConfigException, "Available options in 'hydra/launcher'"),
    (["unknown_knob=1"], ConfigCompositionException, "Key 'unknown_knob' is not in struct"),
    (["method.rank=8"], ConfigCompositionException, "method.rank"),
    # wrong types and enum values
    (["method.r=abc"], ConfigCompositionException, "'abc' of type 'str' could not be converted to Integer"),
    (["method.init=svd"], ConfigCompositionException, "expected one of [gaussian, pissa]"),
    (["logger.mode=loud"], ConfigCompositionException, "expected one of [disabled, offline, online]"),
    (["model.family=rnn"], ConfigCompositionException, "expected one of [encoder, decoder]"),
    (["resume=maybe"], ConfigError, "resume must be true or false, got 'maybe'"),
    # ranges
    (["method.r=-4"], ConfigError, "method.r must be > 0, got -4"),
    (["method.r=0"], ConfigError, "method.r must be > 0, got 0"),
    (["method.alpha=0"], ConfigError, "method.alpha must be > 0, got 0"),
    (["method.dropout=1.5"], ConfigError, "method.dropout must be in [0, 1)"),
    (["train.lr=-1"], ConfigError, "train.lr must be > 0"),
    (["train.batch_size=0"], ConfigError, "train.batch_size must be > 0"),
    (["train.max_steps=-5"], ConfigError, "train.max_steps must be > 0"),
    (["train.epochs=0"], ConfigError, "train.epochs must be > 0"),
    (["train.warmup_ratio=1.5"], ConfigError, "train.warmup_ratio must be in [0, 1)"),
    (["train.seed=-1"], ConfigError, "train.seed must be >= 0, got -1"),
    (["train.schedule=step"], ConfigError,
     "train.schedule must be one of ['linear', 'cosine', 'constant'], got 'step'"),
    (["masking.interval=0"], ConfigError, "masking.interval must be > 0"),
    (["task.train_limit=0"], ConfigError, "task.train_limit must be > 0"),
    (["task.max_length=0"], ConfigError, "task.max_length must be > 0"),
    # SPEFT
    (["method=speft"], ConfigError,
     "method=speft needs a salience metric: metric must be one of fisher, force, gradient"),
    (["method=speft", "metric=qm_taylor"], ConfigError, "method=speft needs a salience metric"),
    (["method=speft", "metric=gradient", "method.density=0.01"], ConfigError,
     "method.lora_rank and method.density: set exactly one"),
    (["method=speft", "metric=gradient", "method.lora_rank=null", "method.density=0"], ConfigError,
     "method.density must be in (0, 1], got 0"),
    (["method=speft", "metric=gradient", "method.lora_rank=null", "method.density=1.5"], ConfigError,
     "method.density must be in (0, 1], got 1.5"),
    (["method=speft", "metric=gradient", "method.lora_rank=0"], ConfigError, "method.lora_rank must be > 0"),
    (["method=speft", "metric=fisher", "metric.micro_batch=0"], ConfigError, "metric.micro_batch must be > 0"),
    # SPSFT
    (["method=spsft", "metric=gradient"], ConfigError, "metric must be one of l2, qm_taylor, taylor; got 'gradient'"),
    (["method=spsft", "metric=qm_taylor", "task=stsb"], ConfigError,
     "metric=qm_taylor ranks neurons per label and needs a classification task"),
    (["method=spsft", "metric=l2", "method.r=null", "method.fraction=1.5"], ConfigError,
     "method.fraction must be in (0, 1], got 1.5"),
    # baselines and task kinds
    (["metric=gradient"], ConfigError, "metric='gradient' is not valid for method='lora'; allowed: none"),
    (["task=gsm8k"], ConfigError, "model.family must be decoder; model=minilm_l6 is an encoder"),
    (["task=gsm8k", "model=smollm2_135m", "method=head"], ConfigError, "method=head trains only a classification head"),
    (["method=pretrained"], ConfigError,
     "method=pretrained needs a task whose model is used as loaded (task.kind=instruct), got task.kind='glue'"),
    (["task=gsm8k", "model=smollm2_135m", "task.eval.tasks=[humaneval]"], ConfigError, "allow_code_execution"),
    (["task=gsm8k", "model=smollm2_135m", "task.eval.tasks=[mmlu_nope]"], ConfigError,
     "task.eval.tasks: unknown tasks ['mmlu_nope']"),
    (["method=full", "metric=fisher"], ConfigError, "metric='fisher' is not valid for method='full'; allowed: none"),
    (["task=gsm8k", "model=smollm2_135m", "method=pretrained", "metric=taylor"], ConfigError,
     "metric='taylor' is not valid for method='pretrained'"),
    # masking knobs that would be silently ignored (yet enter the record and the config hash)
    (["masking=dynamic_global"], ConfigError,
     "method=lora does not use masking, so masking.dynamic=True would be ignored; only method=speft reads it"),
    (["method=spsft", "metric=taylor", "masking=static_local"], ConfigError,
     "method=spsft does not use masking, so masking.scope='local' would be ignored"),
    (["method=head", "masking=dynamic_local"], ConfigError, "method=head does not use masking"),
    (["method=pissa", "masking=dynamic_global"], ConfigError, "method=pissa does not use masking"),
    (["method=dora", "masking=static_local"], ConfigError, "method=dora does not use masking"),
    (["method=full", "masking=dynamic_global", "masking.interval=10"], ConfigError, "method=full does not use masking"),
    (["task=gsm8k", "model=smollm2_135m", "method=pretrained", "masking=dynamic_global"], ConfigError,
     "method=pretrained does not use masking"),
    (["method=speft", "metric=gradient", "masking=static_global", "masking.scope=local"], ConfigError,
     "masking.scope=local and masking.dynamic=false contradict masking=static_global; choose masking=static_local"),
    (["method=speft", "metric=gradient", "masking=dynamic_local", "masking.dynamic=false"], ConfigError,
     "contradict masking=dynamic_local; choose masking=static_local"),
    (["method=speft", "metric=gradient", "masking.interval=10"], ConfigError,
     "masking.interval=10 is read only by dynamic masks; masking=static_global is static (leave it at 1000)"),
    (["method=speft", "metric=gradient", "masking=static_local", "masking.optimizer_reset=values"], ConfigError,
     "masking.optimizer_reset=values is read only by dynamic masks"),
    (["method=speft", "metric=gradient", "masking=dynamic_global", "masking.optimizer_reset=none"], ConfigError,
     "masking.optimizer_reset must be one of ['all', 'values'], got 'none'"),
    # paper formulas vs the authors' code: metric.variant, masking.local_split, method.calibration_mode
    (["method=speft", "metric=grasp", "metric.variant=authors"], ConfigError,
     "metric.variant must be one of ['paper', 'reference'], got 'authors'"),
    (["method=speft", "metric=gradient", "metric.variant=reference"], ConfigCompositionException,
     "Key 'variant' not in 'MetricSchema'"),  # only grasp, synflow and fisher have the knob
    (["method=speft", "metric=fisher", "metric.variant=reference", "metric.micro_batch=4"], ConfigError,
     "metric.micro_batch=4 with metric.variant=reference: the authors' code takes one example per gradient"),
    (["method=speft", "metric=fisher", "metric.variant=reference", "task=stsb"], ConfigError,
     "metric=fisher metric.variant=reference makes each label a token type"),
    (["method=speft", "metric=gradient", "masking=static_local", "masking.local_split=half"], ConfigError,
     "masking.local_split must be one of ['proportional', 'equal'], got 'half'"),
    (["method=speft", "metric=gradient", "masking.local_split=equal"], ConfigError,
     "masking.local_split=equal is read only by local masks; masking=static_global is global "
     "(leave it at proportional)"),
    (["method=speft", "metric=gradient", "masking=dynamic_global", "masking.local_split=equal"], ConfigError,
     "masking.local_split=equal is read only by local masks"),
    (["method=lora", "masking.local_split=equal"], ConfigError,
     "masking.local_split=equal is read only by local masks"),
    (["method=speft", "metric=gradient", "method.calibration_mode=dropout"], ConfigError,
     "method.calibration_mode must be one of ['eval', 'train'], got 'dropout'"),
    (["method=speft", "metric=magnitude", "method.calibration_mode=train"], ConfigError,
     "metric=magnitude never runs the model, so method.calibration_mode=train would be ignored"),
    (["method=spsft", "metric=l2", "method.calibration_mode=train"], ConfigError,
     "metric=l2 is data-free, so method.calibration_mode=train would be ignored"),
    (["method=lora", "method.calibration_mode=train"], ConfigCompositionException, "method.calibration_mode"),
]


@pytest.mark.slow
def test_new_knobs_validate_and_enter_the_config_hash():
    from speft_bench.records import config_hash, resolved_config

    def digest(*overrides):
        cfg = compose_config("task=mrpc", "method=speft", *overrides)
        validate(cfg)
        return config_hash(resolved_config(cfg))

    for metric in ("grasp", "synflow", "fisher"):
        assert compose_config("task=mrpc", "method=speft", f"metric={metric}").metric.variant == "paper"
        assert digest(f"metric={metric}") != digest(f"metric={metric}", "metric.variant=reference")
    assert "variant" not in compose_config("task=mrpc", "method=speft", "metric=snip").metric  # unchanged records
    assert digest("metric=gradient", "masking=static_local") != digest("metric=gradient", "masking=static_local",
                                                                        "masking.local_split=equal")
    assert digest("metric=gradient") != digest("metric=gradient", "method.calibration_mode=train")
    assert validate(compose_config("task=mrpc", "method=spsft", "metric=taylor",
                                   "method.calibration_mode=train"))["method"].calibration_mode == "train"


def with_required(overrides: list[str]) -> list[str]:
    chosen = {o.split("=", 1)[0] for o in overrides}
    return [r for r in REQUIRED if r.split("=", 1)[0] not in chosen] + overrides


def test_the_bad_config_table_is_large():
    assert len(BAD_CONFIGS) >= 40


@pytest.mark.parametrize(("overrides", "error", "message"), BAD_CONFIGS, ids=lambda v: str(v)[:60])
def test_bad_config_is_rejected_with_a_clear_message(overrides, error, message):
    with pytest.raises(error) as caught:
        validate(compose_config(*with_required(overrides)))
    assert message in chained_message(caught.value)


@pytest.mark.slow
def test_cli_rejects_a_bad_override_before_any_model_loads(tmp_path):
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "speft_bench", "method=lora", "task=mrpc", "method.r=-4",
         f"paths.output_dir={tmp_path}"],

        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    out = done.stdout + done.stderr
    assert done.returncode != 0
    assert "method.r must be > 0, got -4" in out
    assert "Loading weights" not in out and not list(tmp_path.rglob("record.json"))
    assert time.perf_counter() - start < 30  # python + hydra start-up only


def test_cli_lists_allowed_tasks_for_an_unknown_task():
    done = subprocess.run([sys.executable, "-m", "speft_bench", "method=lora", "task=mrcp"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "Could not find 'task/mrcp'" in done.stderr and "mrpc" in done.stderr


# The entry point (python -m speft_bench), run in-process so that the modules it imported can be read
# once it exits; argv: the overrides.
ENTRY_POINT = """
import runpy, sys
sys.argv[0] = "speft_bench"
try:
    runpy.run_module("speft_bench", run_name="__main__", alter_sys=True)
finally:
    print(f"torch imported: {'torch' in sys.modules}", file=sys.stderr)
"""


@pytest.mark.slow
@pytest.mark.parametrize(("overrides", "code", "message"), [
    (["method=speft", "metric=gradient", "method.lora_rank=0"], 2, "method.lora_rank must be > 0, got 0"),  # a range
    (["method=lora", "train.lr=abc"], 1, "'abc' of type 'str' could not be converted to Float"),  # a type
    (["method=speft", "metric=fisher", "metric.variant=reference", "task=stsb"], 2,  # a cross-group rule
     "metric=fisher metric.variant=reference makes each label a token type"),
], ids=["range", "type", "cross-group"])
def test_a_bad_override_fails_before_torch_loads(tmp_path, overrides, code, message):
    done = subprocess.run([sys.executable, "-c", ENTRY_POINT, "task=mrpc", *overrides, f"paths.output_dir={tmp_path}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    out = done.stdout + done.stderr
    assert done.returncode == code, out
    assert message in out
    assert "torch imported: False" in out


# What every metric function takes from the method, not from its metric's schema (SPEFT.prepare, SPSFT.prepare).
METHOD_OPTIONS = {"calibration_micro_batch", "offload", "mode"}


def metric_functions() -> dict:
    """metric.name -> its function: SPEFT's salience metrics and SPSFT's neuron importance."""
    from speft_bench.methods.spsft.importance import IMPORTANCE
    from speft_bench.salience import SALIENCE_METRICS

    assert not set(SALIENCE_METRICS) & set(IMPORTANCE)
    return {name: SALIENCE_METRICS[name] for name in SALIENCE_METRICS} | {name: IMPORTANCE[name].score
                                                                            for name in IMPORTANCE}


def test_a_metric_schema_is_its_functions_keyword_options():
    """Fields (but the name) and defaults of a metric's schema are the keyword options of its function;
    a metric without a schema of its own (MetricSchema) takes none."""
    register_schemas()
    functions, schemas = metric_functions(), SCHEMAS["metric"]
    assert set(schemas) - {"metric"} <= set(functions)  # no schema of a metric that does not exist
    for name, function in functions.items():
        schema = schemas.get(name, schemas["metric"])
        fields = {f.name: f.default for f in dataclasses.fields(schema) if f.name != "name"}
        keywords = list(inspect.signature(function).parameters.values())[3:]  # after (model, weights, batches)
        options = {p.name: p.default for p in keywords if p.kind is not p.VAR_KEYWORD and p.name not in METHOD_OPTIONS}
        assert fields == options, f"metric={name}: schema {schema.__name__} has {fields}, the function takes {options}"


@pytest.mark.parametrize(("group", "option"), [(g, o) for g in ("method", "metric") for o in options(g)])
def test_a_method_or_metric_yaml_resolves_to_its_registered_schema(group, option):
    """The schema a YAML composes to is registered, and is the one registered under its name if any."""
    cfg = compose_config(*partners(group, option), f"{group}={option}")
    schema, registered = OmegaConf.get_type(cfg[group]), SCHEMAS[group]
    assert schema in registered.values()
    assert registered.get(cfg[group].name, schema) is schema
