"""GLUE tasks: read the original TSV layout from the data root, or the hub when online.

``<data_root>/glue/<TASK>/{train,dev}.tsv`` as produced by the official GLUE download script.
Labels are mapped to class indices through ``task.label_names`` (``[]``: a regression score).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from speft_bench.data.sources import offline_error
from speft_bench.models import hub_reachable
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


def _label_index(task: TaskSchema, raw) -> float | int:
    if task.is_regression:
        return float(raw)
    try:
        return task.label_names.index(str(raw))
    except ValueError:
        raise ValueError(f"task {task.name}: label {raw!r} not in task.label_names {task.label_names}") from None


def read_tsv(task: TaskSchema, path: Path) -> GlueSplit:
    """Read one GLUE TSV; quotes are literal text in GLUE files, so quoting is off."""
    frame = pd.read_csv(
        path, sep="\t", quoting=csv.QUOTE_NONE, dtype=str, keep_default_na=False, encoding="utf-8-sig",
        header=0 if task.header else None, names=None if task.header else task.column_names,
        on_bad_lines="skip",  # a few QQP/MNLI lines are malformed in the original release
    )
    cols = task.columns
    missing = [c for c in (cols.text_a, cols.text_b, cols.label) if c is not None and c not in frame.columns]
    if missing:
        raise ValueError(f"task {task.name}: columns {missing} not in {path} (has {list(frame.columns)})")
    frame = frame[frame[cols.label] != ""]  # unlabelled rows (none in train/dev of the released files)
    return GlueSplit(
        text_a=frame[cols.text_a].tolist(),
        text_b=None if cols.text_b is None else frame[cols.text_b].tolist(),
        labels=[_label_index(task, v) for v in frame[cols.label]],
        source=str(path),
    )


def _read_hub(task: TaskSchema, split: str) -> GlueSplit:
    from datasets import load_dataset

    data = load_dataset(task.hub_path, task.hub_name, split=split)
    cols = task.hub_columns
    labels = data[cols.label]
    return GlueSplit(
        text_a=data[cols.text_a],
        text_b=None if cols.text_b is None else data[cols.text_b],
        labels=[float(v) for v in labels] if task.is_regression else [int(v) for v in labels],
        source=f"hub:{task.hub_path}/{task.hub_name}:{split}",
    )


def load_glue(task: TaskSchema, data_root: str | Path) -> dict[str, GlueSplit]:
    """Train and dev splits, from the data root if the files are there, else from the hub."""
    folder = Path(data_root).resolve() / "glue" / task.glue_dir
    files = {"train": folder / task.train_file, "dev": folder / task.dev_file}
    if all(p.exists() for p in files.values()):
        splits = {name: read_tsv(task, path) for name, path in files.items()}
    elif hub_reachable():
        splits = {"train": _read_hub(task, "train"), "dev": _read_hub(task, task.hub_dev_split)}
    else:
        absent = [str(p) for p in files.values() if not p.exists()]
        raise offline_error(f"task={task.name}", absent, data_root, f"{task.hub_path}/{task.hub_name}",
                            "the original GLUE release layout")
    return {"train": splits["train"].head(task.train_limit), "dev": splits["dev"].head(task.eval_limit)}


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
