"""Instruction data for causal LMs: rows → (instruction, input, output) → Alpaca prompt → tokens.

The loss covers the response only: prompt and padding positions carry label -100 (ignored by the
models' cross-entropy), response positions carry their own token ids (the model shifts them).
A batch is ``{input_ids, attention_mask, labels}``, each ``(batch, longest)``, so methods that
score weights on calibration batches use ``model(**batch).loss`` exactly as for GLUE.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from speft_bench.data.sources import load_source
from speft_bench.registry import Registry

IGNORE_INDEX = -100  # torch cross-entropy's ignore_index

# Stanford Alpaca's templates, verbatim (tatsu-lab/stanford_alpaca, train.py PROMPT_DICT).
ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)


@dataclass(frozen=True)
class Example:
    instruction: str
    input: str
    output: str


def alpaca_prompt(example: Example) -> str:
    template = ALPACA_PROMPT if example.input.strip() else ALPACA_PROMPT_NO_INPUT
    return template.format(instruction=example.instruction, input=example.input)


# --------------------------------------------------------------------------- formats: hub rows -> examples
# Keyed by task.source (speft_bench.data.sources): the rows have the hub's fields.
FORMATS: Registry[Callable[[Iterable[dict]], list[Example]]] = Registry("task.source")


@FORMATS.register("alpaca")
def _alpaca(rows):
    return [Example(r["instruction"], r["input"], r["output"]) for r in rows]


@FORMATS.register("gsm8k")
def _gsm8k(rows):  # the answer keeps its worked steps and the final "#### <number>" line
    return [Example(r["question"], "", r["answer"]) for r in rows]


@FORMATS.register("metamathqa")
def _metamathqa(rows):
    return [Example(r["query"], "", r["response"]) for r in rows]


@FORMATS.register("codefeedback")
def _codefeedback(rows):
    return [Example(r["query"], "", r["answer"]) for r in rows]


@FORMATS.register("openbookqa")
def _openbookqa(rows):  # the options go in the input, the response is the correct option's text
    out = []
    for r in rows:
        options = "\n".join(f"({label}) {text}" for label, text in zip(r["choices"]["label"], r["choices"]["text"]))
        answer = r["choices"]["text"][r["choices"]["label"].index(r["answerKey"].strip())]
        out.append(Example(r["question_stem"], options, answer))
    return out


@FORMATS.register("oasst2")
def _oasst2(rows):
    """First turns of the message trees: a root prompt and its best-ranked (rank 0) assistant reply."""
    rows = list(rows)
    roots = {r["message_id"]: r["text"] for r in rows if r["parent_id"] is None and r["role"] == "prompter"}
    return [Example(roots[r["parent_id"]], "", r["text"]) for r in rows
            if r["role"] == "assistant" and r.get("rank") == 0 and r["parent_id"] in roots]


# --------------------------------------------------------------------------- loading and tokenizing
@dataclass
class InstructSplit:
    examples: list[Example]
    source: str  # file paths or hub id, and any subsetting: recorded in the run record


def load_instruct(source: str, split: str, data_root: str | Path, limit: int | None = None,
                  sample_seed: int | None = None) -> InstructSplit:
    """The split's examples; ``limit`` keeps the first n, or n drawn at random with ``sample_seed``."""
    data, origin = load_source(source, data_root)
    if split not in data:
        raise ValueError(f"task.split={split!r}: {source} has splits {sorted(data)}")
    examples = FORMATS[source](data[split])
    where = "+".join(origin[split]) if isinstance(origin, dict) else f"{origin}:{split}"
    if limit is not None and limit < len(examples):
        if sample_seed is None:
            examples, where = examples[:limit], f"{where} (first {limit})"
        else:
            order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(sample_seed))
            examples = [examples[i] for i in order[:limit].tolist()]
            where = f"{where} ({limit} drawn at random, seed {sample_seed})"
    return InstructSplit(examples, where)


def join(prompt: list[int], response: list[int], max_length: int) -> dict[str, list[int]] | None:
    """``prompt + response`` cut on the right to ``max_length``, labels -100 over the prompt.

    None when no response token survives the cut (nothing to learn; an all -100 batch has no loss).
    """
    ids = (prompt + response)[:max_length]
    if len(ids) <= len(prompt):
        return None
    return {"input_ids": ids, "attention_mask": [1] * len(ids),
            "labels": [IGNORE_INDEX] * len(prompt) + ids[len(prompt):]}


def tokenize(example: Example, tokenizer, max_length: int) -> dict[str, list[int]] | None:
    """Prompt and response tokenized apart, so the boundary is exact; EOS ends the response."""
    prompt = tokenizer(alpaca_prompt(example), add_special_tokens=True)["input_ids"]  # BOS if the model uses one
    response = tokenizer(example.output, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return join(prompt, response, max_length)


class TokenizedInstruct(torch.utils.data.Dataset):
    """Tokenized examples (as :func:`tokenize`, in two batched tokenizer calls); ``dropped`` counts
    those whose prompt alone fills ``max_length``."""

    def __init__(self, split: InstructSplit, tokenizer, max_length: int):
        prompts = tokenizer([alpaca_prompt(e) for e in split.examples], add_special_tokens=True)["input_ids"]
        responses = tokenizer([e.output for e in split.examples], add_special_tokens=False)["input_ids"]
        features = [join(p, r + [tokenizer.eos_token_id], max_length) for p, r in zip(prompts, responses)]
        self.items = [f for f in features if f is not None]
        self.dropped = len(features) - len(self.items)
        self.source = split.source

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return self.items[i]


@dataclass
class PadCollator:
    """Right-pads a list of features to the longest: ids with ``pad_token_id``, mask 0, labels -100."""

    pad_token_id: int

    def __call__(self, features: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)
        pad = {"input_ids": self.pad_token_id, "attention_mask": 0, "labels": IGNORE_INDEX}
        return {key: torch.tensor([f[key] + [value] * (width - len(f[key])) for f in features])
                for key, value in pad.items()}
