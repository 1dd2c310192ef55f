"""Instruction data on real files and the real SmolLM2 tokenizer: Alpaca prompt, response-only labels,
padding; the instruct recipe end to end (LoRA on GSM8K train → lm-eval gsm8k) and every method on it."""

import json
import time

import pytest
import torch

from speft_bench.config import validate
from speft_bench.data.instruct import (
    ALPACA_PROMPT_NO_INPUT,
    FORMATS,
    IGNORE_INDEX,
    Example,
    InstructSplit,
    PadCollator,
    TokenizedInstruct,
    alpaca_prompt,
    load_instruct,
    tokenize,
)
from speft_bench.data.sources import default_data_root, load_source
from speft_bench.evaluation import lm_eval as bridge
from speft_bench.models import ModelSourceError, load_causal_lm, load_tokenizer, resolve_pretrained
from speft_bench.run import run
from tests.helpers import compose_config

SMOLLM2 = ("model=smollm2_135m",)
DATA = default_data_root()  # ../shared/data: the real files
EOS = 2  # SmolLM2-Instruct's <|im_end|>: its EOS and its pad token


@pytest.fixture(scope="module")
def tokenizer():
    typed = validate(compose_config("task=gsm8k", "method=lora", *SMOLLM2))
    return load_tokenizer(resolve_pretrained(typed["model"], typed["paths"].cache_dir), typed["model"])


def test_alpaca_templates_are_verbatim():
    assert alpaca_prompt(Example("Add 2 and 3.", "", "5")) == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nAdd 2 and 3.\n\n### Response:")
    assert alpaca_prompt(Example("Name a colour.", "The sky", "Blue.")) == (
        "Below is an instruction that describes a task, paired with an input that provides further context. Write a "
        "response that appropriately completes the request.\n\n### Instruction:\nName a colour.\n\n### Input:\nThe sky"
        "\n\n### Response:")


def test_labels_cover_the_response_only(tokenizer):
    example = Example("Add 2 and 3.", "", "5")
    features = tokenize(example, tokenizer, max_length=512)
    prompt = tokenizer(ALPACA_PROMPT_NO_INPUT.format(instruction="Add 2 and 3."))["input_ids"]
    assert len(prompt) == 36 and prompt[-3:] == [3757, 14212, 42]  # "###", " Response", ":"
    assert features["input_ids"] == prompt + [37, EOS]  # "5", <|im_end|>
    assert features["labels"] == [IGNORE_INDEX] * 36 + [37, EOS]
    assert features["attention_mask"] == [1] * 38
    # cut on the right; nothing left to learn → dropped
    assert tokenize(example, tokenizer, max_length=37)["labels"] == [IGNORE_INDEX] * 36 + [37]
    assert tokenize(example, tokenizer, max_length=36) is None
    batched = TokenizedInstruct(InstructSplit([example] * 2, "test"), tokenizer, max_length=512)
    assert batched[1] == features and len(batched) == 2 and batched.dropped == 0
    assert TokenizedInstruct(InstructSplit([example], "test"), tokenizer, max_length=36).dropped == 1


def test_padding_is_masked_but_the_real_eos_is_learned(tokenizer):
    short = tokenize(Example("Add 2 and 3.", "", "5"), tokenizer, 512)
    long = tokenize(Example("Name a colour.", "The sky", "Blue."), tokenizer, 512)
    batch = PadCollator(tokenizer.pad_token_id)([short, long])
    assert {k: tuple(v.shape) for k, v in batch.items()} == {k: (2, 53)
                                                              for k in ("input_ids", "attention_mask", "labels")}
    assert batch["input_ids"][0, 38:].tolist() == [EOS] * 15  # pad id == EOS id for SmolLM2 ...
    assert batch["labels"][0, 36:].tolist() == [37, EOS] + [IGNORE_INDEX] * 15  # ... yet only the real EOS is a target
    assert batch["attention_mask"][0].tolist() == [1] * 38 + [0] * 15
    assert batch["labels"][1, -3:].tolist() == [23390, 30, EOS]  # "Blue", ".", <|im_end|>


@pytest.mark.slow
def test_model_loss_is_the_mean_over_response_tokens(tokenizer):
    """model(**batch).loss = cross-entropy over response tokens only; padding changes no real logit."""
    typed = validate(compose_config("task=gsm8k", "method=lora", *SMOLLM2))
    model = load_causal_lm(typed["model"], resolve_pretrained(typed["model"], typed["paths"].cache_dir), torch.float32)
    short = tokenize(Example("Add 2 and 3.", "", "5"), tokenizer, 512)
    long = tokenize(Example("Name a colour.", "The sky", "Blue."), tokenizer, 512)
    batch = PadCollator(tokenizer.pad_token_id)([short, long])
    with torch.no_grad():
        out = model(**batch)
        alone = model(input_ids=torch.tensor([short["input_ids"]])).logits
    logits, labels = out.logits[:, :-1], batch["labels"][:, 1:]
    keep = labels != IGNORE_INDEX
    assert int(keep.sum()) == 2 + 3
    manual = torch.nn.functional.cross_entropy(logits[keep], labels[keep])
    assert torch.allclose(out.loss, manual, atol=1e-5)
    assert torch.allclose(out.logits[0, :38], alone[0], atol=1e-4)


@pytest.mark.slow
def test_formats_on_the_real_files():
    [first] = FORMATS["openbookqa"](load_source("openbookqa", DATA)[0]["train"].select([0]))
    assert first == Example("The sun is responsible for",
                            "(A) puppies learning new tricks\n(B) children growing up and getting old\n"
                            "(C) flowers wilting in a vase\n(D) plants sprouting, blooming and wilting",

                            "plants sprouting, blooming and wilting")
    split = load_instruct("gsm8k", "train", DATA, limit=2)
    assert split.source.endswith("gsm8k/train.jsonl (first 2)") and split.examples[0].output.endswith("#### 72")
    drawn = load_instruct("openbookqa", "train", DATA, limit=256, sample_seed=0)
    assert len(drawn.examples) == 256 and drawn.source.endswith("train.tsv (256 drawn at random, seed 0)")
    assert drawn.examples == load_instruct("openbookqa", "train", DATA, limit=256, sample_seed=0).examples
    assert drawn.examples[:2] != load_instruct("openbookqa", "train", DATA, limit=2).examples


def test_oasst2_takes_first_turns_with_the_best_reply():
    rows = [{"message_id": "p", "parent_id": None, "role": "prompter", "text": "Hi?", "rank": None},
            {"message_id": "a0", "parent_id": "p", "role": "assistant", "text": "Hello.", "rank": 0},
            {"message_id": "a1", "parent_id": "p", "role": "assistant", "text": "Yo.", "rank": 1},
            {"message_id": "p2", "parent_id": "a0", "role": "prompter", "text": "More?", "rank": 0},
            {"message_id": "a2", "parent_id": "p2", "role": "assistant", "text": "Sure.", "rank": 0}]
    assert FORMATS["oasst2"](rows) == [Example("Hi?", "", "Hello.")]


def test_offline_without_local_files_fails_fast_naming_them(tmp_path):
    start = time.perf_counter()
    with pytest.raises(ModelSourceError) as caught:
        load_instruct("alpaca", "train", tmp_path)
    assert time.perf_counter() - start < 2
    message = str(caught.value)
    assert str(tmp_path / "alpaca" / "alpaca_data.json") in message and "tatsu-lab/alpaca" in message
    assert "hub is unreachable" in message and "paths.data_root" in message


TINY = ("task.train_limit=4", "task.max_length=160", "train.batch_size=2", "train.max_steps=2", "train.log_every=1",
        "task.eval.limit=2", "task.eval.num_fewshot.gsm8k=1", "task.eval.max_gen_toks=16", "task.eval.batch_size=2")


@pytest.mark.slow
def test_lora_on_gsm8k_end_to_end_writes_lm_eval_results(tmp_path):
    record = run(compose_config("task=gsm8k", "method=lora", *SMOLLM2, *TINY), tmp_path, command="pytest")
    assert record["status"] == "completed"
    assert json.loads((tmp_path / "record.json").read_text()) == json.loads(json.dumps(record, default=str))
    # LoRA r=8 on 30 Llama blocks: q,o 576→576; k,v 576→192; gate,up 576→1536; down 1536→576; no head
    assert record["parameters"]["trainable"] == 30 * 8 * (2 * 1152 + 2 * 768 + 3 * 2112) == 2_442_240
    assert [p["step"] for p in record["train"]["loss_curve"]] == [1, 2]
    data = record["data"]
    assert data["train"]["examples"] == 4 and data["train"]["source"].endswith("gsm8k/train.jsonl (first 4)")
    assert "MetaMathQA" in data["stand_ins"]["train"]
    assert set(record["metrics"]) == {"gsm8k/exact_match,strict-match", "gsm8k/exact_match,flexible-extract"}
    assert all(0.0 <= v <= 1.0 for v in record["metrics"].values())
    ev = record["lm_eval"]
    assert ev["n-shot"] == {"gsm8k": 1} and ev["limit"] == {"gsm8k": 2} and ev["versions"] == {"gsm8k": 3.0}
    assert ev["n-samples"]["gsm8k"] == {"original": 1319, "effective": 2} and ev["max_gen_toks"] == 16
    assert ev["data"]["gsm8k"]["test"][0].endswith("gsm8k/test.jsonl")
    assert set(record["time_s"]) == {"load", "prepare", "train", "evaluate", "total"}


ATTENTION = "method.targets=attention"  # 120 of the 210 target linears: PiSSA's SVDs and SPEFT's top-k stay quick


@pytest.mark.slow
@pytest.mark.parametrize("method", [("method=full",), ("method=pissa", ATTENTION), ("method=dora", ATTENTION),
                                    ("method=speft", "metric=gradient", ATTENTION, "method.calibration_examples=2",
                                     "method.calibration_batch_size=2"),
                                    ("method=spsft", "metric=l2", ATTENTION)], ids=lambda m: m[0])
def test_every_method_trains_a_causal_lm(tmp_path, method):
    """One step of each method on 2 OpenBookQA instructions, then one ARC-Easy question through lm-eval."""
    cfg = compose_config("task=openbookqa_256", *method, *SMOLLM2, "task.train_limit=2", "task.max_length=96",
                         "train.batch_size=2", "train.max_steps=1", "task.eval.tasks=[arc_easy]", "task.eval.limit=1")
    record = run(cfg, tmp_path)
    assert record["status"] == "completed" and record["train"]["loss_curve"][0]["loss"] > 0
    assert 0 < record["parameters"]["trainable"] <= record["parameters"]["total"]
    assert set(record["metrics"]) == {"arc_easy/acc,none", "arc_easy/acc_norm,none"}


@pytest.mark.slow
def test_pretrained_evaluates_the_loaded_model_untouched(tmp_path):
    """method=pretrained trains nothing and scores exactly what lm-eval scores on the freshly loaded model."""
    cfg = compose_config("task=openbookqa_256", "method=pretrained", *SMOLLM2, "task.train_limit=2",
                         "task.eval.tasks=[arc_easy]", "task.eval.limit=8")
    record = run(cfg, tmp_path)
    assert record["status"] == "completed" and record["parameters"]["trainable"] == 0
    assert record["train"] == {"steps": 0, "epochs": 0.0, "loss_curve": []}
    typed = validate(cfg)
    source = resolve_pretrained(typed["model"], typed["paths"].cache_dir)
    reference = bridge.evaluate(load_causal_lm(typed["model"], source, torch.float32),
                                load_tokenizer(source, typed["model"]), typed["task"].eval, DATA)

    assert record["metrics"] == reference["metrics"]
