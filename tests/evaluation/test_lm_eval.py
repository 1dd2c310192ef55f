"""The lm-eval bridge: shipped task configs read the real local files, a tiny evaluation of the real
SmolLM2 returns lm-eval's numbers, code execution needs the explicit flag, bad knobs name themselves."""

import os
import time

import pytest
import torch

from speft_bench.config import validate
from speft_bench.data.sources import default_data_root, load_source
from speft_bench.errors import ConfigError
from speft_bench.evaluation import lm_eval as bridge
from speft_bench.models import ModelSourceError, load_causal_lm, load_tokenizer, resolve_pretrained
from speft_bench.schemas import LmEvalSchema
from tests.helpers import chained_message, compose_config

DATA = default_data_root()


def test_shipped_configs_index_in_milliseconds_without_lm_evals_own():
    start = time.perf_counter()
    manager = bridge.task_manager(DATA)
    assert time.perf_counter() - start < 3  # lm-eval's 14k built-in tasks take far longer
    names = bridge.task_names()
    assert sorted(manager.all_subtasks) == [n for n in names if n != "mmlu"] and manager.all_groups == ["mmlu"]
    assert [n for n in names if not n.startswith("mmlu")] == [
        "arc_challenge", "arc_easy", "boolq", "gsm8k", "gsm8k_cot", "hellaswag", "humaneval", "mbpp",
        "openbookqa", "piqa", "rte", "winogrande"]
    assert sum(n.startswith("mmlu_") for n in names) == 57
    from lm_eval.tasks._yaml_loader import load_yaml

    unsafe = {p.stem for p in bridge.TASKS_DIR.glob("*.yaml") if load_yaml(p, resolve_func=False).get("unsafe_code")}
    assert unsafe == bridge.CODE_EXECUTION_TASKS == {"humaneval", "mbpp"}


@pytest.mark.slow
def test_task_configs_read_the_local_files_in_full():
    """Every offline task builds from the data root with the official split sizes; MMLU has 5 dev shots."""
    loaded = bridge.task_manager(DATA).load(["arc_easy", "arc_challenge", "boolq", "openbookqa", "piqa", "rte",
                                             "gsm8k", "gsm8k_cot", "mmlu"])
    tasks = loaded["tasks"]
    sizes = {name: len(list(tasks[name].eval_docs)) for name in tasks if not name.startswith("mmlu")}
    assert sizes == {"arc_easy": 2376, "arc_challenge": 1172, "boolq": 3270, "openbookqa": 500, "piqa": 1838,
                     "rte": 277, "gsm8k": 1319, "gsm8k_cot": 1319}
    mmlu = [t for name, t in tasks.items() if name.startswith("mmlu_")]
    assert len(mmlu) == 57 and sum(len(t.test_docs()) for t in mmlu) == 14_042
    assert all(len(t.fewshot_docs()) == 5 for t in mmlu)
    assert loaded["group_map"]["mmlu"] == sorted(t.task_name for t in mmlu)
    anatomy = bridge._LOADED["mmlu/anatomy"]
    assert anatomy == {"test": [str(DATA.resolve() / "mmlu/data/test/anatomy_test.csv")],
                       "dev": [str(DATA.resolve() / "mmlu/data/dev/anatomy_dev.csv")]}
    doc = tasks["boolq"].validation_docs()[0]
    assert doc["label"] == 0 and tasks["boolq"].doc_to_choice(doc) == ["no", "yes"]


def test_code_tasks_and_piqa_labels_read_from_their_original_files():
    data, _ = load_source("mbpp", DATA)
    assert {s: len(d) for s, d in data.items()} == {"prompt": 10, "test": 500, "validation": 90, "train": 374}
    assert len(load_source("humaneval", DATA)[0]["test"]) == 164
    piqa = load_source("piqa", DATA)[0]["validation"]
    assert piqa[0]["label"] == 0 and sum(piqa["label"]) == 928  # valid-labels.lst: 928 ones, 910 zeros


@pytest.fixture(scope="module")
def smollm2():
    typed = validate(compose_config("task=gsm8k", "method=lora", "model=smollm2_135m"))
    source = resolve_pretrained(typed["model"], typed["paths"].cache_dir)
    return load_causal_lm(typed["model"], source, torch.float32), load_tokenizer(source, typed["model"])


@pytest.mark.slow
def test_tiny_evaluation_of_smollm2(smollm2):
    """ARC-Easy (4 questions, 0-shot) and GSM8K (2 questions, 1-shot, strict and flexible extract)."""
    spec = LmEvalSchema(tasks=["arc_easy", "gsm8k"], num_fewshot={"gsm8k": 1}, limit=2,
                        limit_per_task={"arc_easy": 4}, batch_size=4, max_gen_toks=16)
    out = bridge.evaluate(*smollm2, spec, DATA)
    assert set(out["metrics"]) == {"arc_easy/acc,none", "arc_easy/acc_norm,none", "gsm8k/exact_match,strict-match",
                                   "gsm8k/exact_match,flexible-extract"}
    assert all(0.0 <= v <= 1.0 for v in out["metrics"].values())
    ev = out["lm_eval"]
    assert ev["n-shot"] == {"arc_easy": 0, "gsm8k": 1} and ev["limit"] == {"arc_easy": 4, "gsm8k": 2}
    assert ev["n-samples"] == {"arc_easy": {"original": 2376, "effective": 4},
                               "gsm8k": {"original": 1319, "effective": 2}}

    assert ev["versions"] == {"arc_easy": 1.0, "gsm8k": 3.0} and ev["lm_eval_version"].startswith("0.4")
    assert ev["num_fewshot_requested"] == {"arc_easy": None, "gsm8k": 1} and ev["max_gen_toks"] == 16
    assert ev["data"]["arc_easy"]["test"] == [str(DATA.resolve() / "arc/ARC-Easy/ARC-Easy-Test.jsonl")]
    assert ev["results"]["arc_easy"]["sample_len"] == 4  # lm-eval's own output is kept whole


def test_headline_metrics_take_a_groups_aggregate_not_its_subtasks():
    output = {"results": {"mmlu": {"acc,none": 0.3, "acc_stderr,none": 0.01, "alias": "mmlu"},
                          "mmlu_anatomy": {"acc,none": 0.2, "acc_stderr,none": 0.1},
                          "gsm8k": {"exact_match,strict-match": 0.1, "exact_match_stderr,strict-match": 0.05,
                                    "sample_len": 2}},
              "groups": {"mmlu": {"acc,none": 0.31, "acc_stderr,none": 0.01, "alias": "mmlu"}}}
    assert bridge.headline_metrics(["mmlu", "gsm8k"], output) == {"mmlu/acc,none": 0.31,
                                                                  "gsm8k/exact_match,strict-match": 0.1}


def test_code_execution_is_refused_without_the_flag():
    with pytest.raises(ConfigError, match=r"\['humaneval', 'mbpp'\].*task.eval.allow_code_execution=true"):
        validate(compose_config("task=codefeedback", "method=lora", "model=smollm2_135m"))
    with pytest.raises(ConfigError, match="allow_code_execution"):  # also at the bridge, before the model is touched
        bridge.evaluate(None, None, LmEvalSchema(tasks=["mbpp"]), DATA)
    assert "HF_ALLOW_CODE_EVAL" not in os.environ
    typed = validate(compose_config("task=codefeedback", "method=lora", "model=smollm2_135m",
                                    "task.eval.allow_code_execution=true"))
    assert typed["task"].eval.allow_code_execution


def test_missing_eval_files_offline_are_named(tmp_path):
    with pytest.raises(ModelSourceError) as caught:
        bridge.dataset("hellaswag", data_root=str(tmp_path))
    assert str(tmp_path / "hellaswag" / "hellaswag_val.jsonl") in str(caught.value)
    assert "Rowan/hellaswag" in str(caught.value) and "not in the shared data" in str(caught.value)


BAD = [
    (["task.eval.limit=0"], "task.eval.limit must be > 0, got 0"),
    (["task.eval.batch_size=0"], "task.eval.batch_size must be a positive integer or 'auto', got 0"),
    (["task.eval.batch_size=big"], "task.eval.batch_size must be a positive integer or 'auto', got 'big'"),
    (["task.eval.max_gen_toks=-1"], "task.eval.max_gen_toks must be > 0"),
    (["task.eval.num_fewshot.gsm8k=-1"], "task.eval.num_fewshot.gsm8k must be >= 0, got -1"),
    (["+task.eval.limit_per_task.gsm8k=0"], "task.eval.limit_per_task.gsm8k must be > 0"),
    (["task.eval.tasks=[]"], "task.eval.tasks must name at least one lm-eval task"),
    (["task.eval.tasks=[gsm8k,gsm8k]"], "task.eval.tasks has duplicates"),
    (["task.eval.tasks=[gsm8x]"], "task.eval.tasks: unknown tasks ['gsm8x']; allowed values: arc_challenge"),
    (["+task.eval.num_fewshot.mmlu_x=5"], "task.eval.num_fewshot: unknown tasks ['mmlu_x']"),
    (["task.max_length=0"], "task.max_length must be > 0"),
    (["task.train_limit=0"], "task.train_limit must be > 0"),
    (["task.sample_seed=-1"], "task.sample_seed must be >= 0 or null, got -1"),
    (["task.source=alpacca"], "task.source='alpacca' is not known; allowed values: alpaca, codefeedback, gsm8k"),
    (["task.split=dev"], "task.split='dev': gsm8k has splits ['test', 'train']"),
    (["task.template=chatml"], "expected one of [alpaca]"),
    (["model=minilm_l6"], "model.family must be decoder; model=minilm_l6 is an encoder"),
    (["method=head"], "method=head trains only a classification head"),
]


@pytest.mark.parametrize(("overrides", "message"), BAD, ids=lambda v: str(v)[:40])
def test_bad_instruct_knobs_name_themselves(overrides, message):

    method = [] if any(o.startswith("method=") for o in overrides) else ["method=lora"]
    model = [] if any(o.startswith("model=") for o in overrides) else ["model=smollm2_135m"]
    with pytest.raises(Exception) as caught:
        validate(compose_config("task=gsm8k", *method, *model, *overrides))
    assert message in chained_message(caught.value)
