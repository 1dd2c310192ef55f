"""Every LLM-track experiment config composes and validates without any download (a dry validation)."""

import re

import pytest

from speft_bench.config import validate
from tests.helpers import CONF, compose_config


def llm_track(path) -> bool:
    """An experiment that pins an instruct task (``override /task: <option>`` with ``kind: instruct``)."""
    task = re.search(r"override /task: (\w+)", path.read_text())
    return task is not None and "kind: instruct" in (CONF / "task" / f"{task.group(1)}.yaml").read_text()


EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml") if llm_track(p))
PAPER_MODELS = {"gemma2_2b", "qwen2_7b", "llama2_7b", "llama3_8b"}


def test_the_llm_tracks_exist():
    assert EXPERIMENTS == [
        "cpu_smollm2_commonsense", "cpu_smollm2_gsm8k",
        "speft_gemma2_alpaca_mmlu", "speft_gemma2_metamath_gsm8k", "speft_gemma2_oasst2_mmlu",
        "speft_llama3_codefeedback_humaneval", "speft_qwen2_alpaca_mmlu", "speft_qwen2_oasst2_mmlu",
        "spsft_llama2_alpaca_commonsense", "spsft_llama3_alpaca_commonsense"]


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes_and_validates(name):
    opt_in = ["task.eval.allow_code_execution=true"] if "codefeedback" in name else []
    typed = validate(compose_config(f"experiment={name}", "method=lora", *opt_in))
    task, model = typed["task"], typed["model"]
    assert task.kind.name == "instruct" and model.family.name == "decoder"
    if name.startswith("cpu_"):  # real offline data, CPU-sized evaluation
        assert model.name == "smollm2_135m" and task.stand_in and task.eval.stand_in
        assert task.eval.limit is not None and task.train_limit is not None
    else:  # the papers' models and full evaluation
        assert model.name in PAPER_MODELS and task.eval.limit is None and not task.eval.limit_per_task


def test_paper_settings_are_pinned():
    metamath = validate(compose_config("experiment=speft_gemma2_metamath_gsm8k", "method=lora"))
    assert metamath["task"].eval.tasks == ["gsm8k_cot"] and metamath["task"].eval.num_fewshot == {"gsm8k_cot": 5}
    assert (metamath["task"].max_length, metamath["train"].batch_size, metamath["train"].lr) == (1024, 16, 2e-5)
    spsft = validate(compose_config("experiment=spsft_llama2_alpaca_commonsense", "method=spsft", "metric=l2"))
    assert (spsft["task"].train_limit, spsft["task"].sample_seed, spsft["train"].epochs) == (256, 0, 5)
    assert spsft["task"].eval.tasks == ["arc_challenge", "arc_easy", "boolq", "hellaswag", "openbookqa", "rte",
                                        "winogrande"]
    assert all(spsft["task"].eval.num_fewshot[t] == 0 for t in spsft["task"].eval.tasks)
    mmlu = validate(compose_config("experiment=speft_qwen2_oasst2_mmlu", "method=speft", "metric=gradient"))
    assert mmlu["task"].eval.num_fewshot == {"mmlu": 5} and mmlu["model"].name == "qwen2_7b"
