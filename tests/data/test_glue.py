"""GLUE data from the shared data root and the official metrics, against hand-computed values."""

import math
import time
from pathlib import Path

import numpy as np
import pytest

from speft_bench.config import validate
from speft_bench.data.glue import load_glue
from speft_bench.data.sources import default_data_root, glue_rows, load_source, tsv_records
from speft_bench.evaluation.glue import glue_scores, majority_baseline
from speft_bench.models import ModelSourceError
from tests.helpers import ROOT, compose_config

DATA_ROOT = ROOT.parent / "shared" / "data"


def task_spec(name: str, *overrides: str):
    return validate(compose_config(f"task={name}", "method=full", *overrides))["task"]


# Row counts from shared/data/README.md (original GLUE releases).
@pytest.mark.parametrize(("task", "train", "dev"), [
    ("cola", 8551, 1043), ("sst2", 67349, 872), ("mrpc", 3668, 408), ("stsb", 5749, 1500), ("rte", 2490, 277),
])
@pytest.mark.slow
def test_local_glue_splits_have_the_published_sizes(task, train, dev):
    splits = load_glue(task_spec(task), DATA_ROOT)
    assert (len(splits["train"]), len(splits["dev"])) == (train, dev)


def test_mrpc_rows_and_labels_are_read_verbatim():
    dev = load_glue(task_spec("mrpc"), DATA_ROOT)["dev"]
    # first dev row of the official file: quotes are literal text, not CSV quoting
    assert dev.text_a[0].startswith("He said the foodservice pie business doesn 't fit")
    assert dev.text_b[0] == '" The foodservice pie business does not fit our long-term growth strategy .'
    assert dev.labels[0] == 1 and sum(dev.labels) == 279  # 279 paraphrases of 408


def test_string_labels_map_through_label_names_and_stsb_is_regression():
    rte = load_glue(task_spec("rte"), DATA_ROOT)["dev"]
    assert rte.labels[0] == 1 and set(rte.labels) == {0, 1}  # first dev row is not_entailment
    stsb = load_glue(task_spec("stsb"), DATA_ROOT)["dev"]
    assert stsb.labels[0] == 5.0 and isinstance(stsb.labels[0], float)
    cola = load_glue(task_spec("cola"), DATA_ROOT)["dev"]  # headerless file
    assert cola.text_a[0] == "The sailors rode the breeze clear of the rocks." and cola.labels[0] == 1


def test_limits_cap_the_splits():
    splits = load_glue(task_spec("mrpc", "task.train_limit=100", "task.eval_limit=10"), DATA_ROOT)
    assert (len(splits["train"]), len(splits["dev"])) == (100, 10)
    assert splits["train"].source.endswith("(first 100)")


@pytest.mark.parametrize("task", ["qnli", "mnli", "qqp"])
def test_absent_task_fails_fast_offline_naming_the_files(task, tmp_path):
    start = time.perf_counter()
    with pytest.raises(ModelSourceError) as caught:
        load_glue(task_spec(task), DATA_ROOT)
    message = str(caught.value)
    assert "train.tsv" in message and "hub is unreachable" in message and "SPEFT_DATA_ROOT" in message
    assert time.perf_counter() - start < 5


def test_read_tsv_reports_missing_columns(tmp_path):
    bad = tmp_path / "train.tsv"
    bad.write_text("a\tb\nx\ty\n")
    with pytest.raises(ValueError, match=r"columns \['#1 String', '#2 String', 'Quality'\] not in"):
        glue_rows(task_spec("mrpc"), bad)


def test_tsv_reader_skips_malformed_lines_as_the_glue_release_needs(tmp_path):
    # too many fields: skipped (a few QQP/MNLI lines); too few: padded with ""; blank lines skipped;
    # a byte-order mark (MRPC) is not part of the first name; quotes are text
    path = tmp_path / "train.tsv"
    path.write_text('\ufeffa\tb\tc\n1\t"2\t3\n4\t5\t6\t7\n\n   \n8\t9\n', encoding="utf-8")
    assert tsv_records(path) == [{"a": "1", "b": '"2', "c": "3"}, {"a": "8", "b": "9", "c": ""}]
    assert tsv_records(path, ["x", "y", "z"])[1:] == [{"x": "1", "y": '"2', "z": "3"}, {"x": "8", "y": "9", "z": ""}]


@pytest.mark.slow
def test_glue_rte_and_the_lm_eval_rte_source_read_the_same_rows():
    rows = load_source("rte", DATA_ROOT)[0]["validation"]
    dev = load_glue(task_spec("rte"), DATA_ROOT)["dev"]
    assert (rows["sentence1"], rows["sentence2"], rows["label"]) == (dev.text_a, dev.text_b, dev.labels)


def test_a_missing_glue_file_fails_offline_as_every_source_does(tmp_path):
    """One loader, one error: the GLUE task's names the task, the files looked for and both ways out."""
    def message(load) -> str:
        with pytest.raises(ModelSourceError) as caught:
            load()
        return str(caught.value)

    (tmp_path / "glue" / "RTE").mkdir(parents=True)
    (tmp_path / "glue" / "RTE" / "dev.tsv").write_text("index\tsentence1\tsentence2\tlabel\n")
    root = tmp_path.resolve()
    form = ("{what}: missing {files} below the data root {root}{note}, and the hub is unreachable (offline). "
            "Put the files there (set paths.data_root or SPEFT_DATA_ROOT), or run online to load {hub}")
    assert message(lambda: load_glue(task_spec("rte"), tmp_path)) == form.format(
        what="task=rte", files=[str(root / "glue/RTE/train.tsv")], root=tmp_path,
        note=" (the original GLUE release layout)", hub="nyu-mll/glue/rte")
    assert message(lambda: load_source("gsm8k", tmp_path)) == form.format(
        what="gsm8k", files=[str(root / "gsm8k/train.jsonl"), str(root / "gsm8k/test.jsonl")], root=tmp_path,
        note="", hub="openai/gsm8k/main")


def test_default_data_root_is_the_composed_paths_data_root(monkeypatch):
    """conf/paths/default.yaml is the one place the default lives; SPEFT_DATA_ROOT overrides both."""
    def composed() -> Path:
        return Path(compose_config("task=rte", "method=full").paths.data_root)

    monkeypatch.delenv("SPEFT_DATA_ROOT", raising=False)
    assert default_data_root() == composed() == ROOT / ".." / "shared" / "data"
    monkeypatch.setenv("SPEFT_DATA_ROOT", "/elsewhere/data")
    assert default_data_root() == composed() == Path("/elsewhere/data")


def test_metrics_match_hand_computed_values():
    preds, refs = np.array([1, 0, 1, 1, 0, 1]), np.array([1, 0, 0, 1, 1, 1])
    # tp=3 fp=1 fn=1 tn=1: acc 4/6, f1 = 2·3/(2·3+1+1) = 0.75, mcc = (3·1−1·1)/sqrt(4·4·2·2) = 0.25
    scores = glue_scores(["accuracy", "f1", "mcc"], preds, refs)
    assert scores == pytest.approx({"accuracy": 4 / 6, "f1": 0.75, "mcc": 0.25})
    x, y = np.array([1.0, 2.0, 3.0, 4.0]), np.array([1.0, 3.0, 2.0, 5.0])
    # pearson = Σdxdy/sqrt(Σdx²Σdy²) = 5.5/sqrt(5·8.75); spearman on ranks [1,2,3,4] vs [1,3,2,4] = 1 − 6·2/(4·15) = 0.8
    corr = glue_scores(["pearson", "spearman"], x, y)
    assert corr == pytest.approx({"pearson": 5.5 / math.sqrt(5 * 8.75), "spearman": 0.8})


def test_majority_baseline_uses_the_training_majority():
    refs = np.array([1, 1, 0, 1])
    assert majority_baseline(["accuracy", "f1"], refs,
                             np.array([0, 1, 1])) == pytest.approx({"accuracy": 0.75, "f1": 6 / 7})

