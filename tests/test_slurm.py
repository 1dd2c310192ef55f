"""SLURM: what a job knows of its allocation, a sweep that submits only what is not done, and a real
one-node cluster (``bash scripts/slurm_local.sh up``) running a sweep through ``hydra/launcher=slurm``:
records naming their job, a requeued job resuming from its checkpoint, a cancelled one recording
``interrupted``, and a rerun submitting only what is missing.

Tests marked ``slurm`` skip, with the reason, when no cluster answers.  They use the test site config
``tests/slurm_conf/hydra/launcher/site/test_cluster.yaml`` in place of a user's site/local.yaml.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from speft_bench import cluster, launcher, records
from tests.helpers import ROOT, compose_config

SITE = ROOT / "tests" / "slurm_conf"
LAUNCH = ["--multirun", "hydra/launcher=slurm", f"hydra.searchpath=[file://{SITE}]",
          "hydra/launcher/site@hydra.launcher=test_cluster"]
# debug=tiny, at the default batch of 16 (the timings below assume its step time)
JOB = ["debug=tiny", "method=head", "task=mrpc", "train.batch_size=16", "train.log_every=1"]
SLURM_ENV = {"SLURM_JOB_ID": "8", "SLURM_ARRAY_JOB_ID": "7", "SLURM_ARRAY_TASK_ID": "1", "SLURM_JOB_NAME": "speft-x",
             "SLURM_JOB_PARTITION": "gpu", "SLURMD_NODENAME": "n1", "SLURM_CPUS_ON_NODE": "4",
             "SLURM_GPUS_ON_NODE": "1", "SLURM_JOB_GPUS": "3", "SLURM_RESTART_COUNT": "2"}


# --------------------------------------------------------------------------- no cluster needed


def test_a_job_knows_its_slurm_allocation(monkeypatch):
    for name in [k for k in os.environ if k.startswith("SLURM")]:
        monkeypatch.delenv(name)
    assert cluster.slurm_environment() is None and cluster.default_threads(None) is None
    assert cluster.default_threads(3) == 3
    for name, value in SLURM_ENV.items():
        monkeypatch.setenv(name, value)
    env = cluster.slurm_environment()
    assert {k: env[k] for k in ("job", "job_id", "array_job_id", "array_task_id", "node", "partition", "cpus",
                                "gpus", "gpu_ids", "restart_count")} == {
        "job": "7_1", "job_id": "8", "array_job_id": "7", "array_task_id": 1, "node": "n1", "partition": "gpu",
        "cpus": 4, "gpus": 1, "gpu_ids": "3", "restart_count": 2}
    assert cluster.default_threads(None) == 4  # train.num_threads=null: the CPUs the job was given
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "2")  # --cpus-per-task wins over the node's share
    assert cluster.default_threads(None) == 2 and cluster.default_threads(1) == 1
    assert records.environment()["slurm"]["cpus"] == 2


def test_jobs_are_named_after_their_methods_and_tasks():
    configs = [compose_config(f"method={m}", f"task={t}") for m, t in (("lora", "mrpc"), ("pissa", "mrpc"),
                                                                         ("lora", "rte"))]
    assert launcher.job_name(configs) == "speft-lora+pissa-mrpc+rte"
    assert launcher.job_name(configs[:1]) == "speft-lora-mrpc"


@pytest.mark.slow
def test_a_sweep_whose_runs_are_done_submits_nothing(tmp_path):
    """Completed records of both configs exist: the launcher submits nothing (no sbatch, no cluster needed)."""
    for seed in (0, 1):
        cfg = compose_config(*JOB, f"train.seed={seed}", f"paths.output_dir={tmp_path}")
        identity = records.config_hash(records.resolved_config(cfg))
        records.write_json_atomic(tmp_path / f"done{seed}" / records.RECORD_NAME,
                                  {"status": "completed", "config_hash": identity, "main_metric": "accuracy",
                                   "metrics": {"accuracy": 0.5}})
    done = subprocess.run([sys.executable, "-m", "speft_bench", *LAUNCH, *JOB, "train.seed=0,1",
                           f"paths.output_dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-3000:]
    assert "2 of 2 jobs have a completed record of their config" in log and "submitting 0" in log, log[-3000:]
    assert not list(tmp_path.rglob(".submitit"))  # nothing went to SLURM


def test_without_accounting_jobs_are_followed_in_squeue(tmp_path, monkeypatch):
    """sacct fails (no slurmdbd): states come from squeue, and a job gone from it is over (no endless polling)."""
    bin_dir, queue = tmp_path / "bin", tmp_path / "queue"
    bin_dir.mkdir()
    (bin_dir / "sacct").write_text("#!/bin/sh\necho 'sacct: error: Slurm accounting storage is disabled' >&2\nexit 1\n")
    (bin_dir / "squeue").write_text(f"#!/bin/sh\ncat {queue}\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    watcher = launcher.watcher_class()(delay_s=0)
    jobs = ("7_0", "7_1", "7_2")
    for job in jobs:
        watcher.register_job(job)

    def states():
        watcher.update()
        return [watcher.get_state(job, mode="cache") for job in jobs]

    queue.write_text("7_0|RUNNING|n1\n7_[1-2%2]|PENDING|\n")
    assert states() == ["RUNNING", "PENDING", "PENDING"]
    queue.write_text("7_1|CANCELLED|n1\n7_2|RUNNING|n1\n")  # 7_0 has left the queue
    assert states() == ["LEFT_QUEUE", "CANCELLED", "RUNNING"]
    assert [watcher.is_done(job, mode="cache") for job in jobs] == [True, True, False]


# --------------------------------------------------------------------------- the one-node cluster


@pytest.fixture(scope="session")
def slurm_cluster():
    """Skip unless a SLURM cluster with an idle (or partly used) node answers."""
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        pytest.skip("no SLURM client (sinfo, sbatch): start the test cluster with `bash scripts/slurm_local.sh up`")
    try:  # the test site config's partition, "local": the cluster of scripts/slurm_local.sh, not a real one
        done = subprocess.run(["sinfo", "-h", "-p", "local", "-o", "%T"], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        pytest.skip("sinfo did not answer in 20 s (slurmctld down?): bash scripts/slurm_local.sh up")
    if done.returncode != 0:
        reason = (done.stderr.strip().splitlines() or ["no output"])[-1]
        pytest.skip(f"sinfo failed ({reason}): bash scripts/slurm_local.sh up")
    if not {"idle", "mixed"} & set(done.stdout.split()):
        pytest.skip(f"no idle node in partition 'local' (sinfo: {' '.join(done.stdout.split()) or 'none'}): "
                    f"bash scripts/slurm_local.sh up")


def wait_for(what: str, check, log: Path, timeout: float, process=None):
    """Poll ``check()`` until it returns something truthy; fail naming ``what`` (with the launcher's log)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = check()
        if found:
            return found
        if process is not None and process.poll() is not None:
            break
        time.sleep(0.2)
    pytest.fail(f"no {what} within {timeout:.0f} s; launcher log:\n{log.read_text()[-4000:]}")


def checkpoint_of(root: Path, num: int) -> Path | None:
    """The checkpoint of sweep job ``num`` (its run folder is named by the job number)."""
    return next((p for p in root.rglob("checkpoint.pt") if p.parent.name == str(num)), None)


def records_by_num(sweep_dir: Path) -> dict[int, dict]:
    return {int(p.parent.name): json.loads(p.read_text()) for p in sweep_dir.rglob(records.RECORD_NAME)}


def requeue_now(job: str) -> None:
    """``scontrol requeue``, then start the job at once: SLURM 22.05 holds a requeued job for 121 s."""
    subprocess.run(["scontrol", "requeue", job], check=True, timeout=30)
    deadline = time.time() + 30
    while time.time() < deadline:
        shown = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True).stdout
        fields = dict(re.findall(r"(\w+)=(\S*)", shown))
        if int(fields.get("Restarts", 0)) >= 1 and fields.get("JobState") != "COMPLETING":
            if fields.get("JobState") == "PENDING":
                subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], timeout=30)
            return
        time.sleep(0.2)
    pytest.fail(f"job {job} was not requeued within 30 s: {shown}")


@pytest.fixture(scope="module")
def sweep(slurm_cluster, tmp_path_factory):
    """Two head-only MRPC jobs, one CPU each, checkpointing every step: job 0 (40 steps) is requeued
    (``scontrol requeue``) after its first checkpoint, job 1 (60 steps) cancelled (``scancel``) after
    its first.  Then the same command again.  Tens of steps (10–20 s a job on one
    CPU): with ten, a job could finish before the test's requeue or scancel reached it."""
    out = tmp_path_factory.mktemp("slurm")
    command = [sys.executable, "-m", "speft_bench", *LAUNCH, *JOB, "train.checkpoint_every=1",
               "train.max_steps=40,60", f"paths.output_dir={out}"]
    log = out / "launcher.log"
    start = time.time()
    with open(log, "w") as sink:
        first = subprocess.Popen(command, cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT, text=True)
    ids = None
    try:
        ids = wait_for("submission", lambda: re.search(r"submitted (\S+), (\S+)$", log.read_text(), re.MULTILINE),
                       log, 60, first).groups()
        wait_for("checkpoint of job 0", lambda: checkpoint_of(out, 0), log, 120, first)
        requeue_now(ids[0])
        wait_for("checkpoint of job 1", lambda: checkpoint_of(out, 1), log, 120, first)
        subprocess.run(["scancel", ids[1]], check=True, timeout=30)
        cancelled_at = time.time()
        first.wait(timeout=180)
    finally:
        if first.poll() is None:
            first.kill()
            if ids:
                subprocess.run(["scancel", ids[0].split("_")[0]], timeout=30)
    ended = time.time()
    (sweep_dir,) = (out / "multirun").iterdir()
    result = SimpleNamespace(ids=ids, rc=first.returncode, log=log.read_text(), records=records_by_num(sweep_dir),
                             after_cancel_s=ended - cancelled_at, first_s=ended - start)
    again = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    result.again, result.again_log = again, again.stdout + again.stderr
    (again_dir,) = set((out / "multirun").iterdir()) - {sweep_dir}
    result.again_records = records_by_num(again_dir)
    print(f"first sweep {result.first_s:.0f} s (launcher ended {result.after_cancel_s:.0f} s after scancel), "
          f"rerun {time.time() - ended:.0f} s")
    return result


@pytest.mark.slurm
def test_records_say_which_slurm_job_ran_them(sweep):
    record = sweep.records[0]
    assert record["status"] == "completed", sweep.log[-3000:]
    slurm = record["environment"]["slurm"]
    array_job = sweep.ids[0].split("_")[0]
    assert (slurm["job"], slurm["array_job_id"], slurm["array_task_id"]) == (sweep.ids[0], array_job, 0)
    assert (slurm["job_name"], slurm["partition"], slurm["cpus"], slurm["gpus"]) == ("speft-head-mrpc", "local", 1, 0)
    assert slurm["node"]
    # train.num_threads=null under SLURM: the CPUs allocated (not one thread per core of the node)
    assert record["determinism"]["torch_threads"] == 1, "speft_bench/run.py must set cluster.default_threads()"


@pytest.mark.slurm
def test_a_requeued_job_resumes_from_its_checkpoint(sweep):
    record = sweep.records[0]
    assert record["status"] == "completed", sweep.log[-3000:]
    assert record["environment"]["slurm"]["restart_count"] == 1
    assert 1 <= record["train"]["resumed_from"] < 40 and record["train"]["steps"] == 40


@pytest.mark.slurm
def test_a_cancelled_job_records_interrupted_and_fails_the_sweep(sweep):
    record = sweep.records[1]
    assert record["status"] == "interrupted" and record["interrupted"]["signal"] == "SIGTERM"
    assert record["environment"]["slurm"]["job"] == sweep.ids[1]
    assert sweep.rc != 0  # the launcher came back (sacct: CANCELLED), naming the job
    assert re.search(rf"job {re.escape(sweep.ids[1])} \(#1: .*\) did not complete \(state CANCELLED", sweep.log)
    assert sweep.after_cancel_s < 90


@pytest.mark.slurm
def test_a_rerun_submits_only_what_is_missing(sweep):
    assert sweep.again.returncode == 0, sweep.again_log[-3000:]
    assert "1 of 2 jobs have a completed record of their config" in sweep.again_log
    assert len(re.findall(r"submitted (.+)$", sweep.again_log, re.MULTILINE)[0].split(", ")) == 1
    (num, record), = sweep.again_records.items()
    assert num == 1 and record["status"] == "completed"
    assert record["train"]["resumed_from"] == sweep.records[1]["interrupted"]["step"]  # the cancelled run's checkpoint
