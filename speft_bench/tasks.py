"""Task kinds, selected by ``task.kind``: a task's model head, data, batches and evaluation.

- ``glue``: sentence(-pair) classification or regression; a sequence-classification head; GLUE
  metrics on dev.
- ``instruct``: instruction fine-tuning of a causal LM with the loss on response tokens; scored by
  lm-evaluation-harness on the fine-tuned model in memory.

The recipe (``run.py``) calls the same steps for every kind: ``load_data`` (with the tokenizer, before
the weights, so missing data fails in seconds), ``load_model``, (training), ``evaluate``.  Every batch
is ``{input_ids, attention_mask, labels}``, so methods and salience metrics work on either kind
through ``model(**batch).loss``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from speft_bench.errors import ConfigError
from speft_bench.registry import Registry
from speft_bench.schemas import Family, PathsSchema, TrainSchema


@dataclass
class TaskData:
    train: torch.utils.data.Dataset
    collate: Callable[[list[dict]], dict[str, torch.Tensor]]  # features -> padded batch
    record: dict[str, Any]  # what the run record says about the data


class Kind:
    """Base class: subclasses register with ``@TASK_KINDS.register("<task.kind>")``."""

    def __init__(self, spec, paths: PathsSchema):
        self.spec, self.paths = spec, paths

    @classmethod
    def check(cls, typed: dict[str, Any]) -> None:
        """Cross-group rules that need code registries, run by ``config.validate`` before anything loads."""

    def load_model(self, model_spec, source: str, tokenizer, dtype: torch.dtype) -> torch.nn.Module:
        raise NotImplementedError

    def load_data(self, tokenizer) -> TaskData:
        raise NotImplementedError

    def evaluate(self, model, tokenizer, train_spec: TrainSchema) -> dict[str, Any]:
        """Record fields; ``metrics`` is a flat ``{name: float}``."""
        raise NotImplementedError


TASK_KINDS: Registry[type[Kind]] = Registry("task.kind")


@TASK_KINDS.register("glue")
class Glue(Kind):
    def load_model(self, model_spec, source, tokenizer, dtype):
        from speft_bench.models import load_model

        return load_model(model_spec, self.spec, source, tokenizer, dtype)

    def load_data(self, tokenizer) -> TaskData:
        from transformers import DataCollatorWithPadding

        from speft_bench.data.glue import TokenizedSplit, load_glue

        self.splits = load_glue(self.spec, self.paths.data_root)
        self.dev = TokenizedSplit(self.splits["dev"], tokenizer, self.spec.max_length)
        self.collate = DataCollatorWithPadding(tokenizer)
        record = {split: {"examples": len(s), "source": s.source} for split, s in self.splits.items()}
        return TaskData(TokenizedSplit(self.splits["train"], tokenizer, self.spec.max_length), self.collate, record)

    def evaluate(self, model, tokenizer, train_spec):
        import numpy as np
        from torch.utils.data import DataLoader

        from speft_bench.evaluation.glue import glue_scores, majority_baseline, predict

        task = self.spec
        loader = DataLoader(self.dev, batch_size=train_spec.eval_batch_size, collate_fn=self.collate)
        preds, refs, eval_loss = predict(model, loader, task.is_regression)
        out = {"metrics": glue_scores(task.metrics, preds, refs) | {"eval_loss": eval_loss},
               "main_metric": task.main_metric}
        if not task.is_regression:
            out["majority_baseline"] = majority_baseline(task.metrics, refs, np.asarray(self.splits["train"].labels))
        return out


@TASK_KINDS.register("instruct")
class Instruct(Kind):
    @classmethod
    def check(cls, typed):
        from speft_bench.data.instruct import FORMATS
        from speft_bench.data.sources import SOURCES
        from speft_bench.evaluation.lm_eval import check_code_execution, task_names

        task, model, method = typed["task"], typed["model"], typed["method"]
        if model.family is not Family.decoder:
            raise ConfigError(f"task={task.name} (kind instruct) fine-tunes a causal LM: model.family must be decoder; "
                              f"model={model.name} is an {model.family.name} (try model=smollm2_135m)")
        if method.name == "head":
            raise ConfigError(f"method=head trains only a classification head, which task={task.name} (kind instruct) "
                              f"does not have; use full, lora, pissa, dora, speft or spsft")
        if task.source not in FORMATS:
            raise ConfigError(f"task.source={task.source!r} is not known; allowed values: {', '.join(FORMATS.names())}")
        if task.split not in (splits := sorted(SOURCES[task.source].files)):
            raise ConfigError(f"task.split={task.split!r}: {task.source} has splits {splits}")
        for knob, names in (("tasks", task.eval.tasks), ("num_fewshot", task.eval.num_fewshot),
                            ("limit_per_task", task.eval.limit_per_task)):
            if unknown := sorted(set(names) - set(task_names())):
                shown = [n for n in task_names() if not n.startswith("mmlu_")] + ["mmlu_<subject> (57)"]
                raise ConfigError(f"task.eval.{knob}: unknown tasks {unknown}; allowed values: {', '.join(shown)}")
        check_code_execution(task.eval)

    def load_model(self, model_spec, source, tokenizer, dtype):
        from speft_bench.models import load_causal_lm

        return load_causal_lm(model_spec, source, dtype)

    def load_data(self, tokenizer) -> TaskData:
        from speft_bench.data.instruct import PadCollator, TokenizedInstruct, load_instruct

        task = self.spec
        split = load_instruct(task.source, task.split, self.paths.data_root, task.train_limit, task.sample_seed)
        train = TokenizedInstruct(split, tokenizer, task.max_length)
        record = {"train": {"examples": len(train), "source": train.source, "template": task.template.name,
                            "max_length": task.max_length, "dropped_prompt_too_long": train.dropped},
                  "stand_ins": {"train": task.stand_in, "eval": task.eval.stand_in}}
        return TaskData(train, PadCollator(tokenizer.pad_token_id), record)

    def evaluate(self, model, tokenizer, train_spec):
        from speft_bench.evaluation.lm_eval import evaluate

        return evaluate(model, tokenizer, self.spec.eval, self.paths.data_root)
