"""lm-evaluation-harness on the fine-tuned model in memory, with task configs this project ships.

``lm_eval_tasks/`` holds lm-eval 0.4's configs for the papers' benchmarks (same prompts, metrics and
versions) whose data come from :func:`dataset`: the original files below the data root
(``speft_bench.data.sources``), or the hub when online.  ``TaskManager(include_defaults=False)``
indexes only these (~70 files) instead of lm-eval's 14k built-in tasks.

Each requested task runs in its own ``simple_evaluate`` call, so n-shot and ``limit`` can differ per
task; a limit applies per leaf task (per subject for ``mmlu``).  Tasks that execute model-written
code (HumanEval, MBPP) are refused unless ``task.eval.allow_code_execution=true``.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from importlib.metadata import version
from pathlib import Path
from typing import Any

from speft_bench.data.sources import default_data_root, load_source
from speft_bench.errors import ConfigError
from speft_bench.schemas import LmEvalSchema

TASKS_DIR = Path(__file__).resolve().parent / "lm_eval_tasks"
CODE_EXECUTION_TASKS = frozenset({"humaneval", "mbpp"})  # `unsafe_code: true` in their configs
_LOADED: dict[str, Any] = {}  # what dataset() read during the current evaluation: for the record
# lm-eval warns once per task (57 times for mmlu) that a custom_dataset may take CLI metadata: not for us.
logging.getLogger("lm_eval.api.task").addFilter(lambda r: "Custom kwargs can be passed" not in r.getMessage())


def task_names() -> list[str]:
    """Task and group names this project ships (file name = task name; ``_template_yaml`` excluded)."""
    return sorted(p.stem for p in TASKS_DIR.rglob("*.yaml"))


def dataset(source: str, data_root: str | None = None, subset: str | None = None, **_):
    """lm-eval ``custom_dataset`` hook: a task's DatasetDict, in the hub's schema.

    lm-eval calls it with the task's ``dataset_kwargs`` and metadata; ``data_root`` comes from the
    TaskManager's metadata (the run's ``paths.data_root``).
    """
    data, origin = load_source(source, data_root or default_data_root(), subset)
    _LOADED[f"{source}/{subset}" if subset else source] = origin
    return data


def check_code_execution(spec: LmEvalSchema) -> None:
    code = sorted(set(spec.tasks) & CODE_EXECUTION_TASKS)
    if code and not spec.allow_code_execution:
        raise ConfigError(
            f"task.eval.tasks includes {code}, which execute model-written code; they run only with the explicit "
            f"opt-in task.eval.allow_code_execution=true (default false)"
        )


@contextmanager
def _code_execution(allowed: bool):
    """HF_ALLOW_CODE_EVAL=1 (the `evaluate` library's code_eval gate) only while evaluating, only if allowed."""
    previous = os.environ.get("HF_ALLOW_CODE_EVAL")
    if allowed:
        os.environ["HF_ALLOW_CODE_EVAL"] = "1"
    try:
        yield
    finally:
        if allowed and previous is None:
            del os.environ["HF_ALLOW_CODE_EVAL"]
        elif allowed:
            os.environ["HF_ALLOW_CODE_EVAL"] = previous


def eval_batch_size(requested: int | str, device) -> int | str:
    """``task.eval.batch_size``: an int as given; ``auto`` is 1 on CPU and lm-eval's own search on CUDA.

    lm-eval materialises full-vocabulary fp32 logits and their log-softmax for every position of a
    batch: on CPU, batch 1 of MMLU 5-shot on SmolLM2-135M was both faster and ~4× smaller than batch 8
    (BENCHMARKS.md, "Evaluation memory").  On a GPU, lm-eval finds the largest batch that fits.
    """
    if requested != "auto":
        return requested
    return "auto" if device.type == "cuda" else 1


def task_manager(data_root: str | Path):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(TASKS_DIR), include_defaults=False, metadata={"data_root": str(data_root)})


def evaluate(model, tokenizer, spec: LmEvalSchema, data_root: str | Path) -> dict[str, Any]:
    """Score ``model`` on ``spec.tasks``; return ``{"metrics": {"<task>/<metric>,<filter>": value}, "lm_eval": ...}``.

    ``lm_eval`` keeps lm-eval's own output (results of every task and subtask, versions, n-shot,
    n-samples) plus the limits, generation cap, data origins and lm-eval version used.
    """
    check_code_execution(spec)
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    model.eval()
    batch_size = eval_batch_size(spec.batch_size, model.device)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)  # runs on the model's device
    manager = task_manager(data_root)
    gen_kwargs = None if spec.max_gen_toks is None else {"max_gen_toks": spec.max_gen_toks}
    keys = ("results", "groups", "group_subtasks", "versions", "n-shot", "n-samples", "higher_is_better")
    merged: dict[str, dict] = {key: {} for key in keys}
    _LOADED.clear()
    with _code_execution(spec.allow_code_execution):
        for name in spec.tasks:
            out = simple_evaluate(model=lm, tasks=[name], task_manager=manager, num_fewshot=spec.num_fewshot.get(name),
                                  limit=spec.limit_for(name), gen_kwargs=gen_kwargs, log_samples=False,
                                  confirm_run_unsafe_code=spec.allow_code_execution)
            for key in keys:
                merged[key] |= out.get(key) or {}
    return {"metrics": headline_metrics(spec.tasks, merged), "lm_eval": merged | {
        "limit": {name: spec.limit_for(name) for name in spec.tasks},
        "num_fewshot_requested": {name: spec.num_fewshot.get(name) for name in spec.tasks},  # None: the task's own
        "max_gen_toks": spec.max_gen_toks,
        "batch_size": {"requested": spec.batch_size, "used": batch_size},
        "data": dict(_LOADED),
        "lm_eval_version": version("lm_eval"),
    }}


def headline_metrics(names: list[str], output: dict[str, dict]) -> dict[str, float]:
    """``{"<task>/<metric>,<filter>": value}`` for each requested task or group (a group's aggregate,
    not its subtasks), without standard errors: those stay in lm-eval's ``results``."""
    return {f"{name}/{metric}": float(value)
            for name in names
            for metric, value in (output["groups"].get(name) or output["results"][name]).items()
            if "," in metric and "_stderr" not in metric}  # lm-eval's "<metric>,<filter>" keys
