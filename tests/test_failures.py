"""What the harness does when things go wrong: bad sources fail fast, NaNs end the run with a record
that says where, and the same seed gives bit-identical results."""

import json
import time

import pytest
import torch

from speft_bench.errors import ConfigError
from speft_bench.models import ModelSourceError
from speft_bench.run import run
from speft_bench.tasks import Glue

from conftest import compose_config

TINY = ("task=mrpc", "task.train_limit=16", "task.eval_limit=8", "task.max_length=32", "train.max_steps=2",
        "train.batch_size=4")
SPEFT = ("method=speft", "metric=gradient", "method.calibration_examples=8", "method.calibration_batch_size=4")


@pytest.mark.parametrize(("overrides", "error", "message"), [
    (["method=lora", "paths.data_root=/nonexistent"], ModelSourceError,
     r"task=mrpc: missing \['/nonexistent/glue/MRPC/train.tsv', '/nonexistent/glue/MRPC/dev.tsv'\] below the data "
     r"root /nonexistent \(the original GLUE release layout\), and the hub is unreachable"),
    (["method=lora", "model.pretrained=/nonexistent/model"], ModelSourceError, "no such folder /nonexistent/model"),
    (["method=lora", "model=bert_base_uncased"], ModelSourceError,
     "'google-bert/bert-base-uncased' is a hub id, the hub is unreachable"),
    ([*SPEFT, "method.lora_rank=100000"], ConfigError,
     "method.lora_rank=100000 asks for 4,147,200,000 trainable entries, more than the 10,616,832 weights"),
    (["method=spsft", "metric=l2", "method.r=5000"], ConfigError, "method.r=5000 exceeds the 384 output rows"),
])
def test_bad_sources_and_budgets_fail_in_seconds_naming_the_problem(tmp_path, overrides, error, message):
    start = time.perf_counter()
    with pytest.raises(error, match=message):
        run(compose_config(*TINY, *overrides), tmp_path)
    assert time.perf_counter() - start < 15 and not (tmp_path / "record.json").exists()


@pytest.fixture
def nan_weight(monkeypatch):
    """The real model with one NaN in its classifier, as a corrupted checkpoint would have."""
    load = Glue.load_model

    def corrupted(self, *args):
        model = load(self, *args)
        with torch.no_grad():
            model.classifier.weight[0, 0] = float("nan")
        return model

    monkeypatch.setattr(Glue, "load_model", corrupted)


@pytest.mark.parametrize(("method", "tensor", "step"), [
    (["method=lora"], "loss", 0),
    (list(SPEFT), "salience gradient of bert.encoder.layer.0.attention.self.query", None),
])
def test_a_nan_ends_the_run_with_a_record_saying_where(tmp_path, nan_weight, method, tensor, step):
    record = run(compose_config(*TINY, *method, "method.train_head=false"), tmp_path)
    on_disk = json.loads((tmp_path / "record.json").read_text())
    assert on_disk["status"] == record["status"] == "failed"
    assert on_disk["failure"]["tensor"] == tensor and on_disk["failure"]["step"] == step
    assert "metrics" not in on_disk


def test_same_seed_gives_the_same_mask_and_numbers_and_another_seed_does_not(tmp_path):
    a, b = (run(compose_config(*TINY, *SPEFT), tmp_path / name) for name in "ab")
    assert a["method"]["mask_sha256"] == b["method"]["mask_sha256"]
    assert a["train"]["loss_curve"] == b["train"]["loss_curve"] and a["metrics"] == b["metrics"]
    c = run(compose_config(*TINY, *SPEFT, "train.seed=1"), tmp_path / "c")  # other calibration examples
    assert c["method"]["mask_sha256"] != a["method"]["mask_sha256"]
    other = run(compose_config(*TINY, *SPEFT, "metric=magnitude"), tmp_path / "d")
    assert other["method"]["mask_sha256"] != a["method"]["mask_sha256"]
