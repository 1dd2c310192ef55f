"""Sweeps: launchers compose (SLURM) and run (submitit_local), a killed multirun resumes without loss."""

import json
import shutil
import signal
import subprocess
import sys
import time

import pytest
from hydra import compose, initialize_config_dir

from speft_bench.config import register_schemas
from tests.helpers import CONF, ROOT, TINY_MRPC

pytestmark = pytest.mark.slow  # every test here trains, saves or sweeps

TINY_JOB = ["method=head", *TINY_MRPC]


def records_under(root) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(root.rglob("record.json"))]


def test_slurm_launcher_takes_cluster_settings_from_the_local_file(tmp_path):
    # the project's configs without a user's own (git-ignored) site/local.yaml
    conf = shutil.copytree(CONF, tmp_path / "conf", ignore=shutil.ignore_patterns("local.yaml"))
    register_schemas()

    def launcher():
        with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
            cfg = compose("config", overrides=["task=mrpc", "method=lora", "hydra/launcher=slurm"],
                          return_hydra_config=True)

        return cfg.hydra.launcher

    default = launcher()
    assert default._target_ == "hydra_plugins.speft_bench_launcher.SlurmLauncher"  # speft_bench/launcher.py
    # what any node has: 1 CPU, the partition's default memory, no GPU; jobs named after the sweep
    assert (default.partition, default.gpus_per_node, default.cpus_per_task, default.mem_gb) == (None, None, 1, None)
    assert (default.name, default.array_parallelism, default.timeout_min) == ("auto", 16, 720)
    shutil.copy(conf / "hydra/launcher/site/local.yaml.example", conf / "hydra/launcher/site/local.yaml")
    local = launcher()
    assert (local.partition, local.account, local.gpus_per_node, local.mem_gb) == ("gpu", "my-account", 1, 64)
    ignored = subprocess.run(["git", "check-ignore", "-q", "conf/hydra/launcher/site/local.yaml"], cwd=ROOT)
    assert ignored.returncode == 0  # cluster settings are never committed


def test_submitit_local_launcher_runs_a_sweep(tmp_path):
    done = subprocess.run([sys.executable, "-m", "speft_bench", "--multirun", "hydra/launcher=submitit_local",
                           *TINY_JOB, "train.seed=0,1", f"paths.output_dir={tmp_path}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    recs = records_under(tmp_path)
    assert sorted(r["config"]["train"]["seed"] for r in recs) == [0, 1]
    assert all(r["status"] == "completed" for r in recs)
    assert list(tmp_path.rglob(".submitit"))  # really went through submitit


def test_a_killed_multirun_is_resumed_without_redoing_finished_jobs(tmp_path):
    command = [sys.executable, "-m", "speft_bench", "--multirun", *TINY_JOB, "train.seed=0,1,2",
               f"paths.output_dir={tmp_path}"]
    sweep = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not list(tmp_path.rglob("record.json")) and time.time() < deadline and sweep.poll() is None:
        time.sleep(0.2)
    sweep.send_signal(signal.SIGTERM)  # mid-sweep: job 0 is done, job 1 is loading or training
    sweep.wait(timeout=60)
    first = records_under(tmp_path)  # every record.json parses: written atomically
    assert 1 <= len(first) < 3 and all(r["status"] == "completed" for r in first)

    sweeps = sorted((tmp_path / "multirun").iterdir())
    status = subprocess.run([*command, "hydra/launcher=status"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert status.returncode == 0, status.stderr[-2000:]
    said = status.stdout + status.stderr
    assert f"{len(first)} of 3 jobs have a completed record of their config; {3 - len(first)} to run" in said
    assert said.count("-- done: ") == len(first) and said.count("-- to run") == 3 - len(first)
    assert records_under(tmp_path) == first and sorted((tmp_path / "multirun").iterdir()) == sweeps  # ran nothing

    again = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert (again.stdout + again.stderr).count("skipping: a completed record of this config exists") == len(first)
    recs = records_under(tmp_path)
    assert sorted(r["config"]["train"]["seed"] for r in recs) == [0, 1, 2]  # each job once, none twice
    assert len({r["config_hash"] for r in recs}) == 3
