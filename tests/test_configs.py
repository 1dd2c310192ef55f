"""Every option of every config group composes and validates; bad values fail before a model loads."""

import subprocess
import sys
import time

import pytest
from hydra.errors import ConfigCompositionException, MissingConfigException

from speft_bench.schemas import ConfigError, validate

from conftest import CONF, ROOT, compose_config

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
    assert options("task") == ["alpaca", "codefeedback", "cola", "gsm8k", "metamathqa", "mnli", "mrpc", "oasst2",
                               "openbookqa_256", "qnli", "qqp", "rte", "sst2", "stsb"]  # + the LLM tracks' instruct tasks


def partners(group: str, option: str) -> tuple[str, ...]:
    """Options of the other groups that ``group=option`` is valid with."""
    if group == "metric" and option in ("l2", "taylor", "qm_taylor"):
        return ("task=mrpc", "method=spsft")  # neuron-importance metrics choose SPSFT's rows
    if group == "metric" and option != "none":
        return ("task=mrpc", "method=speft")  # salience metrics choose SPEFT's entries
    if group == "method" and option == "speft":
        return ("task=mrpc", "metric=gradient")
    if group == "method" and option == "spsft":
        return ("task=mrpc", "metric=taylor")
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


# (overrides, exception type, message fragment naming the knob or the allowed values)
BAD_CONFIGS = [
    (["task=nope"], MissingConfigException, "Available options in 'task'"),
    (["method=nope"], MissingConfigException, "Available options in 'method'"),
    (["model=nope"], MissingConfigException, "Available options in 'model'"),
    (["metric=nope"], MissingConfigException, "Available options in 'metric'"),
    (["masking=nope"], MissingConfigException, "Available options in 'masking'"),
    (["method.r=-4"], ConfigError, "method.r must be > 0, got -4"),
    (["method.r=0"], ConfigError, "method.r must be > 0, got 0"),
    (["method.r=abc"], ConfigCompositionException, "'abc' of type 'str' could not be converted to Integer"),
    (["method.rank=8"], ConfigCompositionException, "method.rank"),
    (["method.init=svd"], ConfigCompositionException, "expected one of [gaussian, pissa]"),
    (["method.dropout=1.5"], ConfigError, "method.dropout must be in [0, 1)"),
    (["train.lr=-1"], ConfigError, "train.lr must be > 0"),
    (["train.batch_size=0"], ConfigError, "train.batch_size must be > 0"),
    (["train.max_steps=-5"], ConfigError, "train.max_steps must be > 0"),
    (["train.epochs=0"], ConfigError, "train.epochs must be > 0"),
    (["train.warmup_ratio=1.5"], ConfigError, "train.warmup_ratio must be in [0, 1)"),
    (["train.optimizer=sgd"], ConfigError, "train.optimizer must be one of ['adamw']"),
    (["masking.interval=0"], ConfigError, "masking.interval must be > 0"),
    (["logger.mode=loud"], ConfigCompositionException, "expected one of [disabled, offline, online]"),
    (["model.family=rnn"], ConfigCompositionException, "expected one of [encoder, decoder]"),
    (["task.train_limit=0"], ConfigError, "task.train_limit must be > 0"),
    (["unknown_knob=1"], ConfigCompositionException, "Key 'unknown_knob' is not in struct"),
]


@pytest.mark.parametrize(("overrides", "error", "message"), BAD_CONFIGS, ids=lambda v: str(v)[:40])
def test_bad_config_is_rejected_with_a_clear_message(overrides, error, message):
    with pytest.raises(error) as caught:
        validate(compose_config(*REQUIRED, *overrides))
    assert message in chained_message(caught.value)


def chained_message(err: BaseException | None) -> str:
    """Hydra wraps the OmegaConf error that names the key and the allowed values: read both."""
    text = ""
    while err is not None:
        text, err = text + f"{err}\n", err.__cause__
    return text


def test_cli_rejects_a_bad_override_before_any_model_loads(tmp_path):
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "speft_bench", "method=lora", "task=mrpc", "method.r=-4", f"paths.output_dir={tmp_path}"],
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
