"""Checkpoints inside a run: stopped by a signal (or killed) and rerun, a run ends bit-identical to an
uninterrupted one.

Real MiniLM-L6 on 16 real MRPC pairs: 4 batches per epoch, 6 steps, with dropout on (the RNG).  The
resume points (the data order): in the first epoch (3), at its end (4) and in the second epoch (5).
A stop signal is sent to this process from inside the step it must stop after.
"""

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import speft_bench.run as run_module
from speft_bench import checkpoints, records
from speft_bench.run import run
from tests.helpers import CALIBRATION, TINY_MRPC, compose_config

pytestmark = pytest.mark.slow  # every test here trains, saves or sweeps

# one torch thread: a run takes ~2 s instead of ~30 s when another process holds one of 2 cores
TINY = (*TINY_MRPC, "train.max_steps=6", "train.log_every=1", "train.num_threads=1")
# attention only: a third of the weights to rank, a third of the top-k time
SPEFT = ("method=speft", "metric=gradient", *CALIBRATION, "method.targets=attention")


@pytest.fixture(autouse=True)
def torch_threads():
    """The runs set torch's thread count for the process: the tests after these get theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def passed_on():
    """Stand-in handlers for the stop signals (the default would end pytest): the signals a run passes on."""
    received = []
    previous = {s: signal.signal(s, lambda signum, frame: received.append(signum)) for s in checkpoints.STOP_SIGNALS}
    yield received
    for s, handler in previous.items():
        signal.signal(s, handler)


def stop_at(monkeypatch, step: int, how):
    """During optimizer step ``step`` (1-based) call ``how()``: send a signal, or raise (a kill)."""
    forward_backward = run_module.forward_backward

    def hooked(model, batch, index, spec, device):
        if index + 1 == step:
            how()
        return forward_backward(model, batch, index, spec, device)

    monkeypatch.setattr(run_module, "forward_backward", hooked)


def send(signum):
    return lambda: os.kill(os.getpid(), signum)


def killed():
    raise KeyboardInterrupt  # no record, no checkpoint beyond the periodic ones: what SIGKILL leaves


def resumable(tmp_path, name, *overrides):
    """A run of ``overrides`` with its run folder ``name`` under ``tmp_path``, the output_dir resume searches."""
    return run(compose_config(*overrides, f"paths.output_dir={tmp_path}"), tmp_path / "runs" / name)


def assert_interrupted(record, step: int, signum, total: int = 6):
    assert record["status"] == "interrupted" and "metrics" not in record and "adapter" not in record
    assert record["interrupted"] == {"step": step, "of": total, "signal": signal.Signals(signum).name,
                                     "checkpoint": str(Path(record["run_dir"]) / checkpoints.CHECKPOINT_NAME)}
    assert record["train"]["steps"] == step and ([p["step"] for p in record["train"]["loss_curve"]]
                                                 == list(range(1, step + 1)))

    on_disk = records.read_record(Path(record["run_dir"]) / records.RECORD_NAME)
    assert on_disk == json.loads(json.dumps(record, default=str))


def assert_same_result(resumed, reference, step: int, checkpoint):
    assert resumed["status"] == "completed" and resumed["config_hash"] == reference["config_hash"]
    assert resumed["train"]["resumed_from"] == step and resumed["train"]["resumed_checkpoint"] == str(checkpoint)
    assert reference["train"]["resumed_from"] is None
    assert resumed["train"]["loss_curve"] == reference["train"]["loss_curve"]  # every float, bit for bit
    assert resumed["metrics"] == reference["metrics"]


def assert_same_adapter(a, b):
    x, y = (load_file(Path(r["run_dir"]) / r["adapter"]["path"]) for r in (a, b))
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_static_speft_stopped_by_sigterm_resumes_bit_identically(tmp_path, monkeypatch, passed_on):
    """Stopped after step 5: one batch into the second epoch, whose shuffle the checkpoint must restore."""
    reference = run(compose_config(*SPEFT, *TINY, f"paths.output_dir={tmp_path / 'elsewhere'}"), tmp_path / "reference")
    with monkeypatch.context() as patch:
        stop_at(patch, 5, send(signal.SIGTERM))
        stopped = resumable(tmp_path, "stopped", *SPEFT, *TINY)
    assert_interrupted(stopped, 5, signal.SIGTERM)
    assert passed_on == [signal.SIGTERM]  # handed on after the record, to the handler training displaced
    assert all(signal.getsignal(s) is not None and signal.getsignal(s).__name__ == "<lambda>"
               for s in checkpoints.STOP_SIGNALS)  # and those handlers are back
    checkpoint = tmp_path / "runs/stopped/checkpoint.pt"
    assert checkpoints.latest(tmp_path, stopped["config_hash"]) == checkpoint

    resumed = resumable(tmp_path, "resumed", *SPEFT, *TINY)
    assert_same_result(resumed, reference, 5, checkpoint)
    # the stopped process's training up to its checkpoint counts in the resumed record's time
    times = resumed["time_s"]
    assert 0 < times["train_before"] <= stopped["time_s"]["train"] and "train_before" not in reference["time_s"]
    assert times["total"] == pytest.approx(sum(v for k, v in times.items() if k != "total"), abs=0.01)
    assert_same_adapter(resumed, reference)
    assert not list(tmp_path.rglob("checkpoint.pt"))  # a completed run deletes its config's checkpoints


def test_dynamic_speft_resumed_between_refreshes_is_bit_identical(tmp_path, monkeypatch, passed_on):
    """Refreshes at steps 2 (before the stop: merged W entries, a new mask) and 4 (after the resume)."""
    dynamic = (*SPEFT, "masking=dynamic_global", "masking.interval=2", *TINY)
    reference = run(compose_config(*dynamic, f"paths.output_dir={tmp_path / 'elsewhere'}"), tmp_path / "reference")
    with monkeypatch.context() as patch:
        stop_at(patch, 3, send(signal.SIGTERM))
        stopped = resumable(tmp_path, "stopped", *dynamic)
    assert_interrupted(stopped, 3, signal.SIGTERM)
    assert [r["step"] for r in stopped["method"]["refreshes"]] == [2]

    resumed = resumable(tmp_path, "resumed", *dynamic)
    assert_same_result(resumed, reference, 3, tmp_path / "runs/stopped/checkpoint.pt")
    timeless = [{k: v for k, v in r.items() if k != "salience_s"} for r in reference["method"]["refreshes"]]
    assert [r["step"] for r in timeless] == [2, 4]
    assert [{k: v for k, v in r.items() if k != "salience_s"} for r in resumed["method"]["refreshes"]] == timeless
    assert_same_adapter(resumed, reference)  # the mask, its values and the W entries refreshes merged into


def test_lora_stopped_then_killed_resumes_from_the_latest_checkpoint(tmp_path, monkeypatch, passed_on):
    """SIGUSR1 after step 3; the resumed run killed in step 5 leaves its periodic checkpoint of step 4 (the
    end of the first epoch), which the third run, in a third folder, continues from.  The reference and the
    killed run checkpoint on a schedule, the others not: ``train.checkpoint_every`` is not part of a run's
    identity."""
    lora = ("method=lora", "method.dropout=0.1", *TINY)
    reference = run(compose_config(*lora, "train.checkpoint_every=2", f"paths.output_dir={tmp_path / 'elsewhere'}"),
                    tmp_path / "reference")
    assert not list(tmp_path.rglob("checkpoint.pt"))  # written at 2, 4, 6 and deleted at completion
    with monkeypatch.context() as patch:
        stop_at(patch, 3, send(signal.SIGUSR1))
        stopped = resumable(tmp_path, "stopped", *lora)
    assert_interrupted(stopped, 3, signal.SIGUSR1)
    assert passed_on == [signal.SIGUSR1]
    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        stop_at(patch, 5, killed)
        resumable(tmp_path, "killed", *lora, "train.checkpoint_every=2")
    assert not (tmp_path / "runs/killed/record.json").exists()
    assert [step for step, _ in checkpoints.of_config(tmp_path, stopped["config_hash"])] == [3, 4]

    resumed = resumable(tmp_path, "resumed", *lora)
    assert_same_result(resumed, reference, 4, tmp_path / "runs/killed/checkpoint.pt")
    assert not list(tmp_path.rglob("checkpoint.pt")) and not list(tmp_path.rglob("*.tmp"))
    assert [r["config"]["train"]["checkpoint_every"] for r in (reference, stopped, resumed)] == [2, None, None]
    assert resumed["config_hash"] == stopped["config_hash"] == reference["config_hash"]


@pytest.mark.parametrize("method, computes", [
    # calibration in train mode: dropout draws on the RNG, which the rerun must find where salience left it
    ((*SPEFT, "method.calibration_mode=train"), "speft_bench.methods.speft.method.compute_salience"),
    (("method=spsft", "metric=taylor", "method.r=8", *CALIBRATION),
     "speft_bench.methods.spsft.method.neuron_importance"),
], ids=["speft", "spsft"])
def test_a_run_killed_before_any_checkpoint_keeps_its_first_selection(tmp_path, monkeypatch, method, computes):
    """No checkpoint (checkpoint_every=null), killed in step 2: the rerun trains from step 0 on the first
    selection the killed run wrote, without computing it, and ends bit-identical to an uninterrupted run."""
    elsewhere = f"paths.output_dir={tmp_path / 'elsewhere'}"
    reference = run(compose_config(*method, *TINY, elsewhere), tmp_path / "reference")
    assert not list(tmp_path.rglob("*.pt"))  # a completed run leaves no checkpoint or selection
    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        stop_at(patch, 2, killed)
        resumable(tmp_path, "killed", *method, *TINY)
    selection = tmp_path / "runs/killed" / checkpoints.SELECTION_NAME
    assert not list(tmp_path.rglob("checkpoint.pt")) and selection.is_file()

    with monkeypatch.context() as patch:
        patch.setattr(computes, lambda *a, **k: pytest.fail("the first selection was computed again"))
        resumed = resumable(tmp_path, "resumed", *method, *TINY)
    assert resumed["train"]["resumed_from"] is None  # no checkpoint: training restarts, the selection does not
    calibration = resumed["method"]["calibration"]
    assert calibration.pop("reused_from") == str(selection) and calibration == reference["method"]["calibration"] | {
        k: v for k, v in calibration.items() if k.endswith("_s")}  # the killed run's own seconds
    assert resumed["train"]["loss_curve"] == reference["train"]["loss_curve"]
    assert resumed["metrics"] == reference["metrics"]
    assert_same_adapter(resumed, reference)
    assert not list(tmp_path.rglob("*.pt"))


def test_ctrl_c_stops_after_the_step_with_a_checkpoint_and_twice_stops_at_once(tmp_path, monkeypatch, passed_on):
    lora = ("method=lora", *TINY)
    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        stop_at(patch, 2, lambda: [os.kill(os.getpid(), signal.SIGINT) for _ in range(2)])
        resumable(tmp_path, "twice", *lora)
    assert not list(tmp_path.rglob("record.json")) and not list(tmp_path.rglob("checkpoint.pt"))
    with monkeypatch.context() as patch:
        stop_at(patch, 2, send(signal.SIGINT))
        stopped = resumable(tmp_path, "once", *lora)
    assert_interrupted(stopped, 2, signal.SIGINT)
    assert passed_on == [signal.SIGINT]  # Python's own handler then raises KeyboardInterrupt
    assert checkpoints.latest(tmp_path, stopped["config_hash"]) == tmp_path / "runs/once/checkpoint.pt"


def test_checkpoint_every_must_be_positive():
    from speft_bench.config import validate
    from speft_bench.errors import ConfigError

    with pytest.raises(ConfigError, match="train.checkpoint_every must be > 0, got 0"):
        validate(compose_config("method=lora", "task=mrpc", "train.checkpoint_every=0"))


def test_a_checkpoint_puts_spsft_rows_and_deltas_back_over_other_ones():
    """The state a checkpoint keeps of an SPSFT model, loaded into one with other rows (no run needed)."""
    from speft_bench.methods.spsft.layer import RowDeltaLinear
    from tests.helpers import instruct_batch, prepare_method, tiny_llama

    overrides = ("method=spsft", "metric=l2", "method.r=4", "model=smollm2_135m", "task=gsm8k")
    trained, _ = prepare_method(tiny_llama(), overrides, instruct_batch())
    with torch.no_grad():
        for p in trained.parameters():
            if p.requires_grad:
                p.normal_()
    state = checkpoints.model_state(trained)
    fresh, _ = prepare_method(tiny_llama(), overrides, instruct_batch())
    rows = {n: m for n, m in fresh.named_modules() if isinstance(m, RowDeltaLinear)}
    for layer in rows.values():
        layer.set_rows(torch.arange(4) + 1)
    checkpoints.load_model_state(fresh, state, Path("checkpoint.pt"))
    assert all(torch.equal(m.rows, trained.get_submodule(n).rows) for n, m in rows.items()) and rows
    params = dict(fresh.named_parameters())
    assert all(torch.equal(params[n], p) for n, p in trained.named_parameters() if p.requires_grad)
