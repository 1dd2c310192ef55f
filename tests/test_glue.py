"""GLUE data from the shared data root and the official metrics, against hand-computed values."""

import math
import time

import numpy as np
import pytest

from speft_bench.data.glue import load_glue, read_tsv
from speft_bench.evaluation.glue import glue_scores, majority_baseline
from speft_bench.models import ModelSourceError
from speft_bench.schemas import validate

from conftest import ROOT, compose_config

DATA_ROOT = ROOT.parent / "shared" / "data"


def task_spec(name: str, *overrides: str):
    return validate(compose_config(f"task={name}", "method=full", *overrides))["task"]


# Row counts from shared/data/README.md (original GLUE releases).
@pytest.mark.parametrize(("task", "train", "dev"), [
    ("cola", 8551, 1043), ("sst2", 67349, 872), ("mrpc", 3668, 408), ("stsb", 5749, 1500), ("rte", 2490, 277),
])
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
        read_tsv(task_spec("mrpc"), bad)


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
    assert majority_baseline(["accuracy", "f1"], refs, np.array([0, 1, 1])) == pytest.approx({"accuracy": 0.75, "f1": 6 / 7})
