"""GLUE tasks: the original TSV layout from the data root, or the hub when online.

``<data_root>/glue/<TASK>/{train,dev}.tsv`` as produced by the official GLUE download script is one
more source of :mod:`speft_bench.data.sources` (:func:`~speft_bench.data.sources.glue_source`), read
by its TSV reader; labels are mapped to class indices through ``task.label_names`` (``[]``: a
regression score).  Here the rows become :class:`GlueSplit` and tokenized features.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from speft_bench.data.sources import glue_source, load_source
from speft_bench.schemas import TaskSchema


@dataclass
class GlueSplit:
    """One split as parallel lists: ``text_b`` is None for single-sentence tasks."""

    text_a: list[str]
    text_b: list[str] | None
    labels: list[float] | list[int]
    source: str  # file path or hub id: recorded in the run record

    def __len__(self) -> int:
        return len(self.labels)

    def head(self, n: int | None) -> "GlueSplit":
        if n is None or n >= len(self):
            return self
        b = None if self.text_b is None else self.text_b[:n]
        return GlueSplit(self.text_a[:n], b, self.labels[:n], f"{self.source} (first {n})")


def load_glue(task: TaskSchema, data_root: str | Path) -> dict[str, GlueSplit]:
    """Train and dev splits of the task's source (:func:`~speft_bench.data.sources.glue_source`): its
    files below the data root, else the hub, else the offline error naming the files."""
    data, origin = load_source(glue_source(task), data_root, what=f"task={task.name}")
    splits = {"train": _split(task, data, origin, "train"), "dev": _split(task, data, origin, task.hub_dev_split)}
    return {"train": splits["train"].head(task.train_limit), "dev": splits["dev"].head(task.eval_limit)}


def _split(task: TaskSchema, data, origin: str | dict[str, list[str]], split: str) -> GlueSplit:
    """One split's rows (the hub schema, local or not) as a GlueSplit; ``source`` is its file or hub split."""
    rows, cols = data[split], task.hub_columns

    def column(name: str) -> list:
        return list(rows[name]) if rows.num_rows else []  # no rows, no columns

    labels = column(cols.label)
    return GlueSplit(
        text_a=column(cols.text_a),
        text_b=None if cols.text_b is None else column(cols.text_b),
        labels=[float(v) for v in labels] if task.is_regression else [int(v) for v in labels],
        source=f"{origin}:{split}" if isinstance(origin, str) else origin[split][0],
    )


class TokenizedSplit(torch.utils.data.Dataset):
    """Tokenized features of a split; padding happens per batch in the collator."""

    def __init__(self, split: GlueSplit, tokenizer, max_length: int):
        pairs = (split.text_a,) if split.text_b is None else (split.text_a, split.text_b)
        self.features = tokenizer(*pairs, truncation=True, max_length=max_length)
        self.labels = split.labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        item = {k: v[i] for k, v in self.features.items()}
        item["labels"] = self.labels[i]
        return item
