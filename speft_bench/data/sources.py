"""Real datasets in their original file layouts, read into the hub's schema (or the hub when online).

A :class:`Source` names, per split, the files it reads below the data root (the original releases:
``gsm8k/train.jsonl``, ``arc/ARC-Easy/ARC-Easy-Test.jsonl``, MMLU's csv folders, ...) and a reader
that turns them into rows with the *same fields as the dataset on the hub*, so one lm-eval task
config or one instruction format works on either.  A GLUE task's source comes from its config
(:func:`glue_source`: ``glue/<TASK>/{train,dev}.tsv``, columns and labels as the task names them).
Without the files, the hub is used when it is reachable; offline, loading fails at once, naming the
files it looked for (:func:`load_source`, the one loader, and :func:`offline_error`, its one error).
"""

from __future__ import annotations

import csv
import gzip
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from speft_bench.models import ModelSourceError, hub_reachable
from speft_bench.registry import Registry

if TYPE_CHECKING:
    from speft_bench.schemas import TaskSchema


def default_data_root() -> Path:
    """``paths.data_root`` of ``conf/paths/default.yaml`` (SPEFT_DATA_ROOT overrides), for callers without a config.

    The YAML is the one place the default lives; its interpolations resolve as at composition.
    """
    from omegaconf import OmegaConf

    from speft_bench import PROJECT_ROOT
    from speft_bench.config import register_schemas

    register_schemas()  # the ``speft_root`` resolver the YAML uses
    return Path(OmegaConf.load(PROJECT_ROOT / "conf" / "paths" / "default.yaml").data_root)


# --------------------------------------------------------------------------- readers: files -> rows
def json_records(*paths: Path) -> list[dict]:
    """Rows of a JSON list (``.json``) or JSON lines (``.jsonl``, ``.jsonl.gz``) file."""
    (path,) = paths
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        if path.suffix == ".json":
            return json.load(f)
        return [json.loads(line) for line in f if line.strip()]


def tsv_records(path: Path, names: Sequence[str] | None = None) -> list[dict[str, str]]:
    """Rows of a tab-separated release file (GLUE, OpenBookQA) as strings; the first line names the
    fields unless ``names`` does (CoLA has no header line).

    Quotes are literal text in these files, so quoting is off.  A line with more fields than names is
    skipped (a few QQP/MNLI lines of the original GLUE release are malformed), a shorter one is padded
    with "", blank lines are skipped, and a byte-order mark (MRPC) is not part of the first name.
    """
    with open(path, encoding="utf-8-sig", newline="") as f:
        lines = (fields for fields in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
                 if fields and not (len(fields) == 1 and not fields[0].strip(" ")))
        names = list(next(lines, []) if names is None else names)
        return [dict(zip(names, fields + [""] * (len(names) - len(fields))))
                for fields in lines if len(fields) <= len(names)]


def arc(*paths: Path) -> list[dict]:
    """AI2 release: ``question: {stem, choices: [{text, label}]}`` → hub: ``question``, ``choices: {text, label}``."""
    return [{"id": r["id"], "question": r["question"]["stem"], "answerKey": r["answerKey"],
             "choices": {"text": [c["text"] for c in r["question"]["choices"]],
                         "label": [c["label"] for c in r["question"]["choices"]]}}
            for r in json_records(*paths)]


# "(A) text (B) text (C) text (D) text"; D takes the rest (one train row repeats "(D)" inside it).
_OBQA_CHOICES = re.compile(r"\(A\) (.*?) \(B\) (.*?) \(C\) (.*?) \(D\) (.*)", re.DOTALL)


def openbookqa(*paths: Path) -> list[dict]:
    """OpenBookQA-V1 ``Main/*.tsv`` → hub ``main``: ``question_stem``, ``choices: {text, label}``, ``answerKey``."""
    rows = []
    for r in tsv_records(*paths):
        match = _OBQA_CHOICES.fullmatch(r["Choices"].strip())
        if match is None:
            raise ValueError(f"{paths[0]}: row {r['ID']}: cannot split the choices {r['Choices']!r}")
        rows.append({"id": r["ID"], "question_stem": r["Question Stem"], "answerKey": r["Answer Key"],
                     "choices": {"text": list(match.groups()), "label": ["A", "B", "C", "D"]}})
    return rows


def piqa(questions: Path, labels: Path) -> list[dict]:
    """``valid.jsonl`` + ``valid-labels.lst`` (one 0/1 per line) → hub: ``goal, sol1, sol2, label``."""
    answers = [int(line) for line in labels.read_text().split()]
    rows = json_records(questions)
    if len(rows) != len(answers):
        raise ValueError(f"{questions} has {len(rows)} rows but {labels} has {len(answers)} labels")
    return [{"goal": r["goal"], "sol1": r["sol1"], "sol2": r["sol2"], "label": a} for r, a in zip(rows, answers)]


def boolq(*paths: Path) -> list[dict]:
    """SuperGLUE ``val.jsonl`` (label "true"/"false") → hub ``super_glue/boolq`` (label 1/0)."""
    return [{"question": r["question"], "passage": r["passage"], "idx": r["idx"],
             "label": int(str(r["label"]).lower() == "true")} for r in json_records(*paths)]


def rte(*paths: Path) -> list[dict]:
    """GLUE ``RTE/{train,dev}.tsv`` → hub ``glue/rte`` (label 0 entailment, 1 not_entailment)."""
    names = ["entailment", "not_entailment"]
    return [{"sentence1": r["sentence1"], "sentence2": r["sentence2"], "label": names.index(r["label"]),
             "idx": int(r["index"])} for r in tsv_records(*paths)]


def mmlu(*paths: Path) -> list[dict]:
    """hendrycks csv (no header: question, A, B, C, D, answer letter) → hub ``cais/mmlu``."""
    (path,) = paths
    subject = path.stem.rsplit("_", 1)[0]  # "anatomy_test" -> "anatomy"
    with open(path, encoding="utf-8", newline="") as f:
        return [{"question": q, "subject": subject, "choices": [a, b, c, d], "answer": "ABCD".index(ans.strip())}
                for q, a, b, c, d, ans in csv.reader(f)]


def mbpp(*paths: Path) -> dict[str, list[dict]]:
    """All 974 problems in one file → the hub's ``full`` splits by task id (prompt 1-10, test 11-510, ...)."""
    rows = json_records(*paths)
    ranges = {"prompt": range(1, 11), "test": range(11, 511), "validation": range(511, 601), "train": range(601, 975)}
    return {split: [r for r in rows if r["task_id"] in ids] for split, ids in ranges.items()}


# --------------------------------------------------------------------------- the sources
@dataclass(frozen=True)
class Source:
    """One dataset: its hub id and, per split, the local files and the reader that takes them."""

    hub_path: str
    hub_name: str | None = None  # None: the subset (MMLU subject) names the hub config
    files: dict[str, tuple[str, ...]] = field(default_factory=dict)  # split -> paths below the data root
    read: Callable[..., list[dict] | dict[str, list[dict]]] = json_records
    offline_note: str = ""  # what the shared data root lacks, for error messages and records

    def paths(self, data_root: str | Path, subset: str | None = None) -> dict[str, list[Path]]:
        root = Path(data_root).expanduser().resolve()
        return {split: [root / f.format(subset=subset) for f in files] for split, files in self.files.items()}


SOURCES: Registry[Source] = Registry("source")
for _name, _source in {
    # instruction data (train split)
    "gsm8k": Source("openai/gsm8k", "main", {"train": ("gsm8k/train.jsonl",), "test": ("gsm8k/test.jsonl",)}),
    "openbookqa": Source("allenai/openbookqa", "main", {
        "train": ("openbookqa/Main/train.tsv",), "validation": ("openbookqa/Main/dev.tsv",),
        "test": ("openbookqa/Main/test.tsv",)}, openbookqa),
    "alpaca": Source("tatsu-lab/alpaca", None, {"train": ("alpaca/alpaca_data.json",)},
                     offline_note="Stanford Alpaca is not in the shared data (see its README)"),
    "oasst2": Source("OpenAssistant/oasst2", None, {"train": ("oasst2/2023-11-05_oasst2_ready.messages.jsonl.gz",)},
                     offline_note="OASST2 is not in the shared data"),
    "metamathqa": Source("meta-math/MetaMathQA", None, {"train": ("metamathqa/MetaMathQA-395K.json",)},
                         offline_note="MetaMathQA is not in the shared data; GSM8K train stands in (task=gsm8k)"),
    "codefeedback": Source("m-a-p/CodeFeedback-Filtered-Instruction", None,
                           {"train": ("codefeedback/CodeFeedback-Filtered-Instruction.jsonl",)},
                           offline_note="CodeFeedback is not in the shared data"),
    # evaluation data
    "arc_easy": Source("allenai/ai2_arc", "ARC-Easy", {
        "validation": ("arc/ARC-Easy/ARC-Easy-Dev.jsonl",), "test": ("arc/ARC-Easy/ARC-Easy-Test.jsonl",)}, arc),
    "arc_challenge": Source("allenai/ai2_arc", "ARC-Challenge", {
        "validation": ("arc/ARC-Challenge/ARC-Challenge-Dev.jsonl",),
        "test": ("arc/ARC-Challenge/ARC-Challenge-Test.jsonl",)}, arc),
    "boolq": Source("aps/super_glue", "boolq", {"validation": ("boolq_superglue/val.jsonl",)}, boolq),
    "piqa": Source("baber/piqa", None, {"validation": ("piqa/valid.jsonl", "piqa/valid-labels.lst")}, piqa),
    "rte": Source("nyu-mll/glue", "rte", {"train": ("glue/RTE/train.tsv",), "validation": ("glue/RTE/dev.tsv",)}, rte),
    "mmlu": Source("cais/mmlu", None, {"test": ("mmlu/data/test/{subset}_test.csv",),
                                       "dev": ("mmlu/data/dev/{subset}_dev.csv",)}, mmlu),
    "hellaswag": Source("Rowan/hellaswag", None, {"validation": ("hellaswag/hellaswag_val.jsonl",)},
                        offline_note="HellaSwag is not in the shared data"),
    "winogrande": Source("allenai/winogrande", "winogrande_xl", {"validation": ("winogrande/dev.jsonl",)},
                         offline_note="WinoGrande is not in the shared data"),
    "humaneval": Source("openai/openai_humaneval", None, {"test": ("humaneval/HumanEval.jsonl.gz",)}),
    "mbpp": Source("google-research-datasets/mbpp", "full", {"all": ("mbpp/mbpp.jsonl",)}, mbpp),
}.items():
    SOURCES.register(_name)(_source)


def glue_rows(task: TaskSchema, path: Path) -> list[dict]:
    """One file of a GLUE task (fields ``task.columns``) → rows in its hub schema (``task.hub_columns``).

    File labels become class indices through ``task.label_names`` (a float score for regression);
    unlabelled rows are dropped (none in train/dev of the released files).
    """
    cols, hub = task.columns, task.hub_columns
    if (cols.text_b is None) != (hub.text_b is None):
        raise ValueError(f"task {task.name}: columns.text_b={cols.text_b!r} and hub_columns.text_b={hub.text_b!r} "
                         f"must both name a column or both be null")
    rows = tsv_records(path, None if task.header else task.column_names)
    fields = list(rows[0]) if rows else []
    missing = [c for c in (cols.text_a, cols.text_b, cols.label) if c is not None and c not in fields]
    if missing:
        raise ValueError(f"task {task.name}: columns {missing} not in {path} (has {fields})")

    def label(raw: str) -> float | int:
        if task.is_regression:
            return float(raw)
        try:
            return task.label_names.index(raw)
        except ValueError:
            raise ValueError(f"task {task.name}: label {raw!r} not in task.label_names {task.label_names}") from None

    pairs = [(hub.text_a, cols.text_a)] + ([(hub.text_b, cols.text_b)] if cols.text_b is not None else [])
    return [{**{h: r[c] for h, c in pairs}, hub.label: label(r[cols.label])} for r in rows if r[cols.label] != ""]


def glue_source(task: TaskSchema) -> Source:
    """A GLUE task's source, from its knobs: ``glue/<glue_dir>/{train_file,dev_file}`` of the original
    release (read by :func:`glue_rows`), or the hub's ``train`` and ``hub_dev_split`` splits."""
    folder = f"glue/{task.glue_dir}"
    return Source(task.hub_path, task.hub_name,
                  {"train": (f"{folder}/{task.train_file}",), task.hub_dev_split: (f"{folder}/{task.dev_file}",)},
                  partial(glue_rows, task), "the original GLUE release layout")


def load_source(source: str | Source, data_root: str | Path, subset: str | None = None, what: str | None = None):
    """``(DatasetDict, origin)``: the local copy when all its files exist, else the hub when reachable.

    ``source`` is a name in :data:`SOURCES` or a :class:`Source` built from a config (a GLUE task's,
    :func:`glue_source`); ``what`` names it in the error (default: its name, or its hub id).
    ``origin`` says where the rows came from (file paths or ``hub:<id>``) for the run record.
    Offline and without the files: :class:`ModelSourceError` naming every missing file.
    """
    import datasets

    if isinstance(source, str):
        what = what or source + (f"/{subset}" if subset else "")
        source = SOURCES[source]
    paths = source.paths(data_root, subset)
    missing = [str(p) for files in paths.values() for p in files if not p.exists()]
    if paths and not missing:
        splits: dict[str, list[dict]] = {}
        for split, files in paths.items():
            rows = source.read(*files)
            splits |= rows if isinstance(rows, dict) else {split: rows}
        origin = {split: [str(p) for p in files] for split, files in paths.items()}
        return datasets.DatasetDict({s: datasets.Dataset.from_list(r) for s, r in splits.items()}), origin
    hub_name = source.hub_name or subset
    hub_id = source.hub_path + (f"/{hub_name}" if hub_name else "")
    if hub_reachable():
        return datasets.load_dataset(source.hub_path, hub_name), f"hub:{hub_id}"
    raise offline_error(what or hub_id, missing, data_root, hub_id, source.offline_note)


def offline_error(what: str, missing: list[str], data_root, hub_id: str, note: str = "") -> ModelSourceError:
    """The one "no local files and no hub" error for every dataset: what is missing and both ways out."""
    note = f" ({note})" if note else ""
    return ModelSourceError(
        f"{what}: missing {missing} below the data root {data_root}{note}, and the hub is unreachable (offline). "
        f"Put the files there (set paths.data_root or SPEFT_DATA_ROOT), or run online to load {hub_id}"
    )
